/**
 * The fleet benchmark (`deno task bench --only fleet`): what issue 9's runner fleets cost.
 *
 * 1. **Mirror**: an upstream `docker-registry` and a second one in proxy mode (a pull-through
 *    cache, `proxy: remoteurl:`) on 127.0.0.1. A generated image (random 64 MiB layers, the
 *    shape of sarde's zstd chunks) is pushed to the upstream, then `sarde fetch` into an empty
 *    store is timed three ways: direct from the upstream (a registries.conf without mirror),
 *    through the cold mirror (its first pull fills its cache) and through the warm mirror. Every
 *    run is checked: the digest printed, every blob in the store, and the registry logs say who
 *    served the blob bytes (and that the warm mirror did not ask the upstream for any).
 * 2. **Budget prune**: a store of 20 images and a few imported VMs (defined under qemu:///system,
 *    one of them used by another defined VM) with staggered last-use times, then `makeRoom` as
 *    the executor's `cache-budget` calls it, for a need that forces about half of it out. The
 *    removals must follow the LRU order and spare the VM in use.
 *
 * Everything (registries, VMs, files) is removed at the end, also after an error or a signal.
 * See bench/README.md.
 *
 * @module
 */

import { join } from "node:path";
import { hasBlob, openLayout } from "../lib/oci/layout.ts";
import { parseReference } from "../lib/oci/reference.ts";
import { layoutDir } from "../lib/oci/store.ts";
import { makeRoom, type Removed } from "../lib/vm/prune.ts";
import { IMPORT_MARKER } from "../lib/vm/import.ts";
import { generateFile, type MadeImage, makeImage, SARDE } from "../tests/support/images.ts";
import { startRegistry, type TestRegistry } from "../tests/support/registry.ts";
import {
  domainXml,
  ensureLibvirtd,
  makeVmDir,
  removeVmDir,
  TEST_URI,
  undefineVms,
  uniqueVmName,
  virshDefine,
} from "../tests/support/vms.ts";
import {
  addCleanup,
  cpuOf,
  formatTable,
  killCurrent,
  loadavg,
  log,
  logSince,
  logSize,
  measure,
  median,
  MiB,
  registryActivity,
  registryPid,
  registryRequests,
  runQuiet,
  settle,
} from "./common.ts";

const REPO = "bench/fleet";
const TAG = "v1";
/** Layer size of the mirror image: sarde's default zstd chunk. */
const LAYER = 64 * MiB;
/** Images in the store of the budget prune (issue 9's figure). */
const PRUNE_IMAGES = 20;
/** Imported VMs next to them; the first is used by another defined VM (a job's) and stays. */
const PRUNE_VMS = 4;
/** makeRoom is destructive: the store is restored from a copy before each round. */
const PRUNE_ROUNDS = 3;
const HOUR = 3600_000;

/** Options of {@link runFleetBench}. */
export interface FleetBenchOptions {
  /** A 256 MiB image and smaller store files instead of 1 GiB. */
  quick: boolean;
  /** Measure with /usr/bin/time (else poll /proc). */
  useTime: boolean;
  /** Rounds of the mirror runs (a fresh, cold mirror each); the table shows the best. */
  repeat: number;
}

/** Where a fetch was served from. */
export type FleetSource = "direct" | "cold mirror" | "warm mirror";

/** One timed `sarde fetch`. */
export interface FleetSample {
  seconds: number;
  rssMB: number;
  cpuSeconds: number;
  /** Blob bytes the upstream / the mirror served during the run (their logs). */
  upstreamBytes: number;
  mirrorBytes: number;
  upstreamCpuSeconds: number;
  mirrorCpuSeconds: number;
  /** 1-minute load average at the start. */
  load: string;
}

/** One line of the mirror table: the best sample of a source. */
export interface FleetRow extends FleetSample {
  source: FleetSource;
  medianSeconds: number;
  /** Blob bytes of the image per second (10^6). */
  mbPerSecond: number;
  /** direct's seconds / these (> 1: faster than direct). */
  vsDirect: number;
  /** Highest peak RSS over the rounds. */
  peakRssMB: number;
  samples: FleetSample[];
}

/** One round of the budget prune. */
export interface PruneSample {
  seconds: number;
  /** What makeRoom removed, in its order. */
  removed: Removed[];
  freedBytes: number;
}

/** The budget prune on one shape of cache. */
export interface PruneVariant {
  /** `20 images` or `20 images + 4 imported VMs`. */
  label: string;
  /** Disk usage of the store (+ imported VMs), the budget makeRoom got. */
  cacheBytes: number;
  needBytes: number;
  samples: PruneSample[];
  medianSeconds: number;
}

/** The budget prune: the store it ran on, and its variants. */
export interface PruneReport {
  images: number;
  /** Bytes of each image's layers. */
  imageBytes: number;
  importedVms: number;
  /** Imported VMs another defined VM uses (never removable). */
  inUseVms: number;
  variants: PruneVariant[];
}

/** Everything {@link runFleetBench} measured. */
export interface FleetReport {
  date: string;
  quick: boolean;
  /** All blobs of the mirror image (config, vmconfig, layers). */
  imageBytes: number;
  layers: number;
  rounds: number;
  loadavgBefore: string;
  loadavgAfter: string;
  rows: FleetRow[];
  prune: PruneReport;
}

// ---------------------------------------------------------------------------------------------
// the mirror

interface MirrorCtx {
  opts: FleetBenchOptions;
  dir: string;
  upstream: TestRegistry;
  upstreamPid?: number;
  ref: string;
  image: MadeImage;
  blobBytes: number;
  /** The registries.conf drop-in folder sarde reads: empty, so the host's files stay out. */
  env: Record<string, string>;
  rssFile: string;
}

/** A registries.conf for the upstream, with `mirror` as its mirror when given (plain http). */
async function writeConf(ctx: MirrorCtx, name: string, mirror?: string): Promise<string> {
  const file = join(ctx.dir, `${name}.conf`);
  const lines = ["[[registry]]", `location = "${ctx.upstream.host}"`, "insecure = true"];
  if (mirror) lines.push("[[registry.mirror]]", `location = "${mirror}"`, "insecure = true");
  await Deno.writeTextFile(file, lines.join("\n") + "\n");
  return file;
}

/** Whether the pull-through cache has stored every blob (it does so after streaming them). */
async function mirrorHolds(mirror: TestRegistry, image: MadeImage): Promise<boolean> {
  for (const d of [image.configDigest, ...image.layers.map((l) => l.digest)]) {
    const hex = d.slice("sha256:".length);
    const p = join(mirror.dataDir, "docker/registry/v2/blobs/sha256", hex.slice(0, 2), hex, "data");
    if (!await Deno.stat(p).then(() => true, () => false)) return false;
  }
  return true;
}

/**
 * One timed `sarde fetch` into an empty store, checked: the manifest digest printed, every blob
 * stored, and who served the blob bytes (direct: the upstream, the mirror not even asked; cold:
 * the mirror, filled from the upstream; warm: the mirror alone).
 */
async function timedFetch(
  ctx: MirrorCtx,
  mirror: TestRegistry,
  mirrorPid: number | undefined,
  source: FleetSource,
  conf: string,
  round: number,
): Promise<FleetSample> {
  const dest = join(ctx.dir, `fetch-${source.replace(" ", "-")}-r${round}`);
  await settle(ctx.dir);
  const upOffset = await logSize(ctx.upstream);
  const mirrorOffset = await logSize(mirror);
  const up0 = cpuOf(ctx.upstreamPid);
  const mirror0 = cpuOf(mirrorPid);
  const load = loadavg();
  const m = await measure(
    SARDE,
    ["fetch", "--registries-conf", conf, "-d", dest, ctx.ref],
    { env: ctx.env, rssFile: ctx.rssFile, useTime: ctx.opts.useTime },
  );
  const upstreamCpuSeconds = cpuOf(ctx.upstreamPid) - up0;
  const mirrorCpuSeconds = cpuOf(mirrorPid) - mirror0;
  const upLog = await logSince(ctx.upstream, upOffset);
  const mirrorLog = await logSince(mirror, mirrorOffset);
  const upstreamBytes = registryActivity(upLog, REPO).servedBytes;
  const mirrorBytes = registryActivity(mirrorLog, REPO).servedBytes;

  const problems: string[] = [];
  if (m.stdout.trim() !== ctx.image.manifestDigest) {
    problems.push(`printed ${m.stdout.trim()}, expected ${ctx.image.manifestDigest}`);
  }
  const layout = await openLayout(layoutDir(dest, parseReference(ctx.ref)));
  for (const d of ctx.image.layers) {
    if (!await hasBlob(layout, d)) problems.push(`blob ${d.digest} missing in the store`);
  }
  const viaMirror = new RegExp(`through mirror ${mirror.host}\\n`).test(m.stderr);
  if (source === "direct") {
    if (viaMirror) problems.push("sarde says it used the mirror");
    if (registryRequests(mirrorLog).length) problems.push("the mirror was asked");
    if (upstreamBytes < ctx.blobBytes) {
      problems.push(`the upstream served ${upstreamBytes} blob bytes, expected ${ctx.blobBytes}`);
    }
  } else {
    if (!viaMirror) problems.push("sarde does not say it fetched through the mirror");
    if (mirrorBytes < ctx.blobBytes) {
      problems.push(`the mirror served ${mirrorBytes} blob bytes, expected ${ctx.blobBytes}`);
    }
    if (source === "cold mirror" && upstreamBytes < ctx.blobBytes) {
      problems.push(`the upstream served the cold mirror ${upstreamBytes} blob bytes`);
    }
    if (source === "warm mirror" && upstreamBytes > 0) {
      problems.push(`the upstream served the warm mirror ${upstreamBytes} blob bytes`);
    }
  }
  if (problems.length) throw new Error(`fetch (${source}): ${problems.join("; ")}\n${m.stderr}`);
  await Deno.remove(dest, { recursive: true });
  log(
    `  round ${round + 1}: ${source} ${m.seconds.toFixed(2)} s, upstream served ${
      (upstreamBytes / 1e6).toFixed(1)
    } MB, mirror ${(mirrorBytes / 1e6).toFixed(1)} MB`,
  );
  return {
    seconds: m.seconds,
    rssMB: m.rssMB,
    cpuSeconds: m.cpuSeconds,
    upstreamBytes,
    mirrorBytes,
    upstreamCpuSeconds,
    mirrorCpuSeconds,
    load,
  };
}

/** One round: a fresh (cold) mirror; direct, cold and warm fetches (direct last every 2nd round). */
async function mirrorRound(
  ctx: MirrorCtx,
  round: number,
  track: (reg: TestRegistry | undefined) => void,
): Promise<Map<FleetSource, FleetSample>> {
  const mirror = await startRegistry("plain", { proxyRemoteUrl: ctx.upstream.url });
  track(mirror);
  try {
    const mirrorPid = await registryPid(mirror);
    const direct = await writeConf(ctx, `direct-r${round}`);
    const viaMirror = await writeConf(ctx, `mirror-r${round}`, mirror.host);
    const out = new Map<FleetSource, FleetSample>();
    const run = async (source: FleetSource) => {
      if (source === "warm mirror") {
        const deadline = Date.now() + 60_000;
        while (!await mirrorHolds(mirror, ctx.image)) {
          if (Date.now() > deadline) throw new Error("the mirror did not store the blobs in 60 s");
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      const conf = source === "direct" ? direct : viaMirror;
      out.set(source, await timedFetch(ctx, mirror, mirrorPid, source, conf, round));
    };
    const order: FleetSource[] = round % 2 === 0
      ? ["direct", "cold mirror", "warm mirror"]
      : ["cold mirror", "warm mirror", "direct"];
    for (const s of order) await run(s);
    return out;
  } finally {
    await mirror.stop();
    track(undefined);
  }
}

function rowsOf(samples: Map<FleetSource, FleetSample[]>, blobBytes: number): FleetRow[] {
  const rows: FleetRow[] = [];
  for (const source of ["direct", "cold mirror", "warm mirror"] as FleetSource[]) {
    const ss = samples.get(source)!;
    const best = ss.reduce((a, b) => (b.seconds < a.seconds ? b : a));
    rows.push({
      ...best,
      source,
      medianSeconds: median(ss.map((s) => s.seconds)),
      mbPerSecond: blobBytes / 1e6 / best.seconds,
      vsDirect: NaN,
      peakRssMB: Math.max(...ss.map((s) => s.rssMB)),
      samples: ss,
    });
  }
  for (const r of rows) r.vsDirect = rows[0].seconds / r.seconds;
  return rows;
}

// ---------------------------------------------------------------------------------------------
// the budget prune

interface PruneStore {
  /** The live store and VM folder makeRoom works on, restored from `template` each round. */
  live: string;
  template: string;
  /** Names and ages (hours since last use) of what may go, oldest first, as makeRoom's words. */
  lru: { what: string; path: string; hours: number }[];
  /** Domain XML of the imported VMs: makeRoom undefines those it removes, a restore redefines. */
  vmXmls: string[];
  imageBytes: number;
  inUseVm: string;
}

/**
 * Builds the store template: {@link PRUNE_IMAGES} images (random layers), {@link PRUNE_VMS}
 * imported VMs (a folder with a raw disk and the import marker, defined under qemu:///system like
 * `sarde import` does) and a job VM whose disk is in the first imported VM's folder (the names
 * go into `domains`, for the cleanup). Ages are spread over a day and interleave images and VMs.
 */
async function buildPruneStore(
  dir: string,
  quick: boolean,
  domains: string[],
): Promise<PruneStore> {
  const live = join(dir, "prune");
  const template = join(dir, "prune-template");
  const layers = quick ? 4 : 8;
  const layerSize = quick ? MiB : 4 * MiB;
  const entries: { what: string; path: string; hours: number }[] = [];
  let imageBytes = 0;
  // distinct ages, images and VMs interleaved: item k was used (k * 7 mod 24) + 1 hours ago
  const hours = (k: number) => ((k * 7) % (PRUNE_IMAGES + PRUNE_VMS)) + 1;
  for (let i = 0; i < PRUNE_IMAGES; i++) {
    const name = `local/fleet-${String(i).padStart(2, "0")}`;
    const img = await makeImage(
      join(live, "oci"),
      `${name}:${TAG}`,
      Array.from({ length: layers }, () => ({ size: layerSize })),
    );
    imageBytes = img.layers.reduce((n, l) => n + l.size, 0);
    entries.push({
      what: `cached image ${name}`,
      path: join(img.dir, "index.json"),
      hours: hours(i),
    });
  }
  const vmdir = join(live, "vms");
  const names: string[] = [];
  const vmXmls: string[] = [];
  for (let j = 0; j < PRUNE_VMS; j++) {
    const name = uniqueVmName("sarde-bench-fleet");
    const folder = join(vmdir, name);
    await Deno.mkdir(folder, { recursive: true });
    await generateFile(join(folder, "disk.img"), layers * layerSize);
    await Deno.writeTextFile(join(folder, IMPORT_MARKER), "{}");
    domains.push(name);
    const xml = domainXml({ name, disks: [{ path: join(folder, "disk.img"), format: "raw" }] });
    await virshDefine(xml);
    vmXmls.push(xml);
    names.push(name);
    entries.push({
      what: `imported VM ${name}`,
      path: join(folder, IMPORT_MARKER),
      hours: hours(PRUNE_IMAGES + j),
    });
  }
  // A job's VM uses the first imported VM's disk: that one is never a candidate.
  const job = uniqueVmName("sarde-bench-fleet-job");
  domains.push(job);
  await virshDefine(
    domainXml({ name: job, disks: [{ path: join(vmdir, names[0], "disk.img"), format: "raw" }] }),
  );
  await runQuiet("cp", ["-a", live, template]);
  const lru = entries.filter((e) => e.what !== `imported VM ${names[0]}`)
    .sort((a, b) => b.hours - a.hours);
  return { live, template, lru, vmXmls, imageBytes, inUseVm: names[0] };
}

/**
 * Restores the live store from the template, redefines the imported VMs (the same XML, so the
 * same UUID) and sets the staggered last-use times.
 */
async function restorePruneStore(s: PruneStore, now: number, allEntries: PruneStore["lru"]) {
  await Deno.remove(s.live, { recursive: true });
  await runQuiet("cp", ["-a", s.template, s.live]);
  for (const xml of s.vmXmls) await virshDefine(xml);
  for (const e of allEntries) {
    const t = new Date(now - e.hours * HOUR);
    await Deno.utime(e.path, t, t);
  }
}

/**
 * Disk usage of the files below `paths` (their allocated 512-byte blocks), as makeRoom counts it:
 * folders themselves do not count (`du` counts them, which makes a budget check miss by a few KiB).
 */
async function du(...paths: string[]): Promise<number> {
  const out = await runQuiet("find", [...paths, "!", "-type", "d", "-printf", "%b\n"]);
  return out.trim().split("\n").filter(Boolean).reduce((n, b) => n + Number(b) * 512, 0);
}

/**
 * Times `makeRoom` (budget = what the cache holds now, need = half of it) {@link PRUNE_ROUNDS}
 * times on a freshly restored store, with and without the imported VMs (each costs `virsh`
 * calls), and checks that it removed the least recently used first, spared the VM in use and
 * made the room.
 */
async function benchPrune(dir: string, quick: boolean, domains: string[]): Promise<PruneReport> {
  log(`budget prune: building a store of ${PRUNE_IMAGES} images and ${PRUNE_VMS} imported VMs`);
  const s = await buildPruneStore(dir, quick, domains);
  // The VM in use is the least recently used of all: makeRoom must pass over it.
  const inUseMarker = join(s.live, "vms", s.inUseVm, IMPORT_MARKER);
  const all = [...s.lru, { what: "", path: inUseMarker, hours: 2 * (PRUNE_IMAGES + PRUNE_VMS) }];
  const noVms = join(dir, "no-vms");
  await Deno.mkdir(noVms);
  const variants: PruneVariant[] = [];
  for (const withVms of [false, true]) {
    const label = `${PRUNE_IMAGES} images${withVms ? ` + ${PRUNE_VMS} imported VMs` : ""}`;
    const lru = s.lru.filter((e) => withVms || e.what.startsWith("cached image"));
    const samples: PruneSample[] = [];
    let cacheBytes = 0;
    let needBytes = 0;
    for (let round = 0; round < PRUNE_ROUNDS; round++) {
      await restorePruneStore(s, Date.now(), all);
      const ocidir = join(s.live, "oci");
      const vmdir = withVms ? join(s.live, "vms") : noVms;
      cacheBytes = await du(ocidir, vmdir);
      needBytes = Math.floor(cacheBytes / 2);
      await settle(dir);
      const t0 = performance.now();
      const removed = await makeRoom({
        connect: TEST_URI,
        ocidir,
        vmdir,
        needBytes,
        budgetBytes: cacheBytes,
        what: "the fleet bench's next image",
      });
      const seconds = (performance.now() - t0) / 1000;
      const freedBytes = removed.reduce((n, r) => n + r.bytes, 0);
      const got = removed.map((r) => r.what.split(" (")[0]);
      const want = lru.slice(0, got.length).map((e) => e.what);
      const problems: string[] = [];
      if (got.join("\n") !== want.join("\n")) {
        problems.push(`removed ${got.join(", ")}; the LRU order says ${want.join(", ")}`);
      }
      if (!await Deno.stat(inUseMarker).then(() => true, () => false)) {
        problems.push(`removed the imported VM a defined VM uses`);
      }
      const left = await du(ocidir, vmdir);
      if (left + needBytes > cacheBytes) {
        problems.push(`${left} bytes left + ${needBytes} needed exceed the budget ${cacheBytes}`);
      }
      if (problems.length) throw new Error(`budget prune (${label}): ${problems.join("; ")}`);
      log(
        `  ${label}, round ${round + 1}: makeRoom ${(seconds * 1000).toFixed(0)} ms, removed ` +
          `${removed.length} (${(freedBytes / 1e6).toFixed(1)} MB)`,
      );
      samples.push({ seconds, removed, freedBytes });
    }
    variants.push({
      label,
      cacheBytes,
      needBytes,
      samples,
      medianSeconds: median(samples.map((x) => x.seconds)),
    });
  }
  return {
    images: PRUNE_IMAGES,
    imageBytes: s.imageBytes,
    importedVms: PRUNE_VMS,
    inUseVms: 1,
    variants,
  };
}

// ---------------------------------------------------------------------------------------------

/** Runs the fleet benchmark; removes everything it made (registries, VMs, files) before returning. */
export async function runFleetBench(opts: FleetBenchOptions): Promise<FleetReport> {
  const loadavgBefore = loadavg();
  await ensureLibvirtd();
  const dir = await makeVmDir("bench-fleet");
  const domains: string[] = [];
  let upstream: TestRegistry | undefined;
  let mirror: TestRegistry | undefined;
  let cleaned: Promise<void> | undefined;
  const cleanup = () =>
    cleaned ??= (async () => {
      killCurrent();
      await undefineVms(domains).catch((err) => log(`cleanup of VMs: ${err.message}`));
      await mirror?.stop();
      await upstream?.stop();
      await removeVmDir(dir);
    })();
  const unregister = addCleanup(cleanup);
  try {
    upstream = await startRegistry("plain");
    const size = opts.quick ? 256 * MiB : 1024 * MiB;
    const ref = `${upstream.host}/${REPO}:${TAG}`;
    const src = join(dir, "src");
    log(`fleet benchmark: upstream ${upstream.url}, work dir ${dir}`);
    log(`generating a ${size / MiB} MiB image (${size / LAYER} random layers) and pushing it`);
    const image = await makeImage(
      src,
      ref,
      Array.from({ length: size / LAYER }, () => ({ size: LAYER })),
    );
    const confDir = join(dir, "registries.conf.d");
    await Deno.mkdir(confDir);
    const ctx: MirrorCtx = {
      opts,
      dir,
      upstream,
      upstreamPid: await registryPid(upstream),
      ref,
      image,
      blobBytes: image.layers.reduce((n, l) => n + l.size, 0),
      env: { SARDE_REGISTRIES_CONF_DIR: confDir },
      rssFile: join(dir, "rss.txt"),
    };
    const pushConf = await writeConf(ctx, "push");
    await runQuiet(SARDE, ["push", "-q", "--registries-conf", pushConf, "-d", src, ref], ctx.env);
    await Deno.remove(src, { recursive: true });

    const samples = new Map<FleetSource, FleetSample[]>();
    for (let round = 0; round < opts.repeat; round++) {
      const got = await mirrorRound(ctx, round, (m) => mirror = m);
      for (const [k, v] of got) samples.set(k, [...(samples.get(k) ?? []), v]);
    }
    const rows = rowsOf(samples, ctx.blobBytes);
    const prune = await benchPrune(dir, opts.quick, domains);
    return {
      date: new Date().toISOString(),
      quick: opts.quick,
      imageBytes: ctx.blobBytes,
      layers: size / LAYER,
      rounds: opts.repeat,
      loadavgBefore,
      loadavgAfter: loadavg(),
      rows,
      prune,
    };
  } finally {
    await cleanup();
    unregister();
  }
}

/** The fleet benchmark's report as text: the mirror table, then the budget prune's. */
export function formatFleetReport(r: FleetReport, env: Record<string, string>): string {
  const n = (x: number, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : "-");
  const mirrorHead = [
    "fetch",
    "seconds",
    "median",
    "MB/s",
    "vs direct",
    "upstream MB",
    "mirror MB",
    "peak RSS MB",
    "CPU s",
    "upstream CPU s",
    "mirror CPU s",
    "load",
  ];
  const mirrorBody = r.rows.map((x) => [
    x.source,
    x.seconds.toFixed(2),
    x.medianSeconds.toFixed(2),
    n(x.mbPerSecond),
    `${x.vsDirect.toFixed(2)}×`,
    n(x.upstreamBytes / 1e6),
    n(x.mirrorBytes / 1e6),
    n(x.peakRssMB, 0),
    n(x.cpuSeconds),
    n(x.upstreamCpuSeconds),
    n(x.mirrorCpuSeconds),
    x.load,
  ]);
  const p = r.prune;
  const pruneBody = p.variants.flatMap((v) =>
    v.samples.map((x, i) => {
      const vms = x.removed.filter((y) => y.what.startsWith("imported VM")).length;
      return [
        v.label,
        String(i + 1),
        (v.cacheBytes / 1e6).toFixed(1),
        (v.needBytes / 1e6).toFixed(1),
        (x.seconds * 1000).toFixed(0),
        String(x.removed.length),
        String(x.removed.length - vms),
        String(vms),
        n(x.freedBytes / 1e6),
      ];
    })
  );
  const lines = [
    `# fleet benchmark: sarde ${env.sarde} (deno ${env.deno}); ${env.registry} as upstream and ` +
    `as pull-through cache (proxy mode); ${env.cpus} CPUs; loopback http`,
    `# image: ${r.layers} random layers of ${LAYER / MiB} MiB (${
      (r.imageBytes / 1e6).toFixed(1)
    } MB of blobs); \`sarde fetch --registries-conf CONF\` into an empty store; ` +
    `${r.rounds} round(s), a fresh (cold) mirror each`,
    `# load average (1 min) before ${r.loadavgBefore}, after ${r.loadavgAfter}`,
    `# seconds: best of ${r.rounds} (median beside); vs direct: direct's seconds / these (> 1: ` +
    `faster); upstream/mirror MB: blob bytes each served (their logs); CPU s: user+sys of sarde`,
    formatTable(mirrorHead, mirrorBody, mirrorHead.map((_, i) => i > 0)),
    "",
    `# budget prune: makeRoom (what cache-budget runs before a pull) on ${p.images} images ` +
    `(${(p.imageBytes / 1e6).toFixed(1)} MB of layers each), then with ${p.importedVms} imported ` +
    `VMs too (defined, ${p.inUseVms} used by another defined VM); budget = the cache's size ` +
    `(its files' blocks), need = half of it; the store is restored before each round`,
    formatTable(
      ["cache", "round", "cache MB", "need MB", "ms", "removed", "images", "VMs", "freed MB"],
      pruneBody,
      [false, true, true, true, true, true, true, true, true],
    ),
    "",
    ...p.variants.map((v) =>
      `budget prune, ${v.label}: median ${(v.medianSeconds * 1000).toFixed(0)} ms over ` +
      `${v.samples.length} rounds`
    ),
  ];
  return lines.join("\n") + "\n";
}
