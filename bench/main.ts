/**
 * `deno task bench`: sarde push/fetch against skopeo copy on a throw-away local registry.
 *
 * Starts a fresh plain `docker-registry` on 127.0.0.1 (data under /var/tmp), generates the test
 * images into a sarde store, and for each case times, in the same run and on the same data:
 *
 * - `sarde push` (store → fresh repository) and `sarde fetch` (→ empty store),
 * - `skopeo copy oci:… docker://…` (→ another fresh repository) and `skopeo copy docker://… oci:…`.
 *
 * It records wall-clock seconds and the peak RSS of the client process, checks that every
 * measurement really moved the bytes (no cross-repository mount, no "already exists" skip, digest
 * preserved), and prints a table (or `--json`). Then it runs the VM benchmark of `bench/vm.ts`,
 * the fleet benchmark of `bench/fleet.ts` and the lazy-pull benchmark of `bench/lazy.ts`
 * (`--only registry|vm|fleet|lazy` runs one of them). See bench/README.md for the method.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { join } from "node:path";
import { digestFile } from "../lib/oci/digest.ts";
import { addToIndex, openLayout, readIndex, writeBlob, writeIndex } from "../lib/oci/layout.ts";
import { type Descriptor, MediaType } from "../lib/oci/types.ts";
import { parseReference } from "../lib/oci/reference.ts";
import { layoutDir } from "../lib/oci/store.ts";
import { SARDE } from "../tests/support/images.ts";
import { startRegistry, type TestRegistry } from "../tests/support/registry.ts";
import {
  addCleanup,
  cpuOf,
  formatTable,
  GiB,
  haveTimeBin,
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
  RSS_GOAL_MB,
  runCleanups,
  settle,
  versions,
} from "./common.ts";
import { formatVmReport, runVmBench, type VmReport } from "./vm.ts";
import { type FleetReport, formatFleetReport, runFleetBench } from "./fleet.ts";
import { formatLazyReport, type LazyReport, runLazyBench } from "./lazy.ts";

const TAG = "v1";

type Tool = "sarde" | "skopeo";
type Operation = "push" | "fetch";

/** One benchmark case: a single-disk-layer image of `size` bytes filled according to `mix`. */
interface BenchCase {
  id: string;
  label: string;
  size: number;
  /** Shares of 1 MiB blocks that are random / text / zeros (sum 1). */
  mix: { random: number; text: number; zero: number };
}

/** One timed run of one tool. */
interface Sample {
  seconds: number;
  rssMB: number;
  /** User + system CPU seconds of the client process (NaN without /usr/bin/time). */
  cpuSeconds: number;
  /** CPU seconds the registry process used meanwhile (NaN when its pid is unknown). */
  registryCpuSeconds: number;
}

/** The aggregated result of a case × tool × operation. */
interface Row {
  case: string;
  caseLabel: string;
  tool: Tool;
  operation: Operation;
  blobBytes: number;
  /** Best (lowest) of the samples. */
  seconds: number;
  medianSeconds: number;
  mbPerSecond: number;
  /** sarde MB/s ÷ skopeo MB/s for the same case and operation (sarde rows only). */
  ratio?: number;
  /** Highest peak RSS of the samples, 10^6 bytes. */
  peakRssMB: number;
  /** Client and registry CPU seconds of the best sample. */
  cpuSeconds: number;
  registryCpuSeconds: number;
  samples: Sample[];
}

const USAGE =
  `usage: deno task bench [--only registry|vm|fleet|lazy] [--quick] [--repeat N] [--json]

  --only WHAT   run one benchmark: registry (sarde push/fetch vs skopeo copy), vm (export+push,
                pull, clone, 1 % change of a libvirt VM vs sardinecake 0.4's gzip+skopeo),
                fleet (fetch direct vs through a cold and a warm pull-through mirror; a budget
                prune of 20 images) or lazy (job start to first script line of a booting VM:
                pull --lazy vs full pull vs warm cache, through a 30 MB/s link); default: all
                four, in that order
  --quick       registry: 256 MiB random + 512 MiB disk-mix instead of 1 GiB + 2 GiB;
                vm: a 512 MiB disk instead of 2 GiB; fleet: a 256 MiB image instead of 1 GiB;
                lazy: a 384 MiB extra disk instead of 2 GiB
  --repeat N    registry: measure every case N times (default 1), alternating which tool goes
                first; fleet: N rounds of the mirror fetches, a fresh mirror each; the tables
                show the best time and the highest peak RSS (vm: one run)
  --json        machine-readable output on stdout (progress stays on stderr)
`;

// ---------------------------------------------------------------------------------------------
// test data

/** Small deterministic PRNG (mulberry32): the block layout is the same on every run. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** 1 MiB of log/config-like text (compresses ~5-10× with zstd, like /usr/share and /var/log). */
function textBlock(rand: () => number): Uint8Array {
  const words = [
    "systemd",
    "kernel",
    "Started",
    "session",
    "of user",
    "root",
    "eth0",
    "link up",
    "mounted",
    "filesystem",
    "/usr/lib/x86_64-linux-gnu",
    "Reached target",
    "Listening on",
    "dbus",
    "sshd",
    "Accepted publickey for",
    "apt",
    "Unpacking",
    "Setting up",
    "libc6",
    "(2.36-9)",
    "Processing triggers for",
  ];
  const enc = new TextEncoder();
  const out = new Uint8Array(MiB);
  let off = 0;
  while (off < MiB) {
    let line = `Nov ${1 + Math.floor(rand() * 28)} ${Math.floor(rand() * 86400)} vm `;
    const n = 3 + Math.floor(rand() * 8);
    for (let i = 0; i < n; i++) line += words[Math.floor(rand() * words.length)] + " ";
    line += `[${Math.floor(rand() * 65536)}]\n`;
    const bytes = enc.encode(line);
    out.set(bytes.subarray(0, MiB - off), off);
    off += bytes.length;
  }
  return out;
}

/**
 * Writes `size` bytes to `path` in 1 MiB blocks whose kind (random, text, zeros) is drawn with
 * the shares in `mix`. Random blocks come from the CSPRNG, so they are incompressible.
 */
async function generateDisk(path: string, size: number, mix: BenchCase["mix"]): Promise<void> {
  const rand = prng(0x5a4de);
  const texts = Array.from({ length: 16 }, () => textBlock(rand));
  const zeros = new Uint8Array(MiB);
  const buf = new Uint8Array(4 * MiB);
  using file = await Deno.open(path, { write: true, createNew: true });
  let written = 0;
  while (written < size) {
    const n = Math.min(buf.length, size - written);
    for (let off = 0; off < n; off += MiB) {
      const blk = buf.subarray(off, Math.min(off + MiB, n));
      const r = rand();
      if (r < mix.random) {
        for (let i = 0; i < blk.length; i += 65536) {
          crypto.getRandomValues(blk.subarray(i, Math.min(i + 65536, blk.length)));
        }
      } else if (r < mix.random + mix.text) {
        blk.set(texts[Math.floor(rand() * texts.length)].subarray(0, blk.length));
      } else {
        blk.set(zeros.subarray(0, blk.length));
      }
    }
    let w = 0;
    while (w < n) w += await file.write(buf.subarray(w, n));
    written += n;
  }
}

/** Creates `ref` in the sarde store `ocidir`: vmconfig + one disk layer read from `diskFile`. */
async function buildImage(
  ocidir: string,
  ref: string,
  diskFile: string,
): Promise<{ dir: string; manifestDigest: string; blobBytes: number; blobs: number }> {
  const r = parseReference(ref);
  const layout = await openLayout(layoutDir(ocidir, r), { create: true });
  const enc = new TextEncoder();
  const vmconfig = await writeBlob(
    layout,
    enc.encode(JSON.stringify({ users: [{ username: "root", password: "sarde" }] }, null, 2)),
    MediaType.sardineConfig,
  );
  const { digest, size } = await digestFile(diskFile);
  await Deno.rename(diskFile, join(layout.dir, "blobs", "sha256", digest.slice(7)));
  const disk: Descriptor = { mediaType: "application/x-qemu-disk+zstd", digest, size };
  const config = await writeBlob(
    layout,
    enc.encode(JSON.stringify({
      architecture: "amd64",
      os: "linux",
      rootfs: { type: "layers", diff_ids: [vmconfig.digest, disk.digest] },
      history: [],
    })),
    MediaType.ociConfig,
  );
  const manifest = await writeBlob(
    layout,
    enc.encode(JSON.stringify({
      schemaVersion: 2,
      mediaType: MediaType.ociManifest,
      config,
      layers: [vmconfig, disk],
    })),
    MediaType.ociManifest,
  );
  await writeIndex(layout, addToIndex(await readIndex(layout), manifest, r.tag ?? "latest"));
  return {
    dir: layout.dir,
    manifestDigest: manifest.digest,
    blobBytes: vmconfig.size + disk.size + config.size,
    blobs: 3,
  };
}

// ---------------------------------------------------------------------------------------------
// running and measuring

/** The manifest digest the registry holds for `repo:tag`. */
async function remoteDigest(reg: TestRegistry, repo: string): Promise<string> {
  const res = await fetch(`${reg.url}/v2/${repo}/manifests/${TAG}`, {
    method: "HEAD",
    headers: { accept: MediaType.ociManifest },
  });
  await res.body?.cancel();
  return res.headers.get("docker-content-digest") ?? `HTTP ${res.status}`;
}

/** Total size of the blob files of the layout at `dir`. */
async function blobBytesIn(dir: string): Promise<number> {
  let total = 0;
  for await (const e of Deno.readDir(join(dir, "blobs", "sha256"))) {
    if (e.isFile && !e.name.startsWith(".")) {
      total += (await Deno.stat(join(dir, "blobs", "sha256", e.name))).size;
    }
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// the benchmark

interface Context {
  reg: TestRegistry;
  registryPid?: number;
  work: string;
  useTime: boolean;
}

interface Image {
  store: string;
  ref: string;
  /** Symlink to the layout dir with no ':' in its path (skopeo's `oci:` splits at the first). */
  layoutLink: string;
  manifestDigest: string;
  blobBytes: number;
  blobs: number;
}

/** One measured push or fetch, checked for free rides. */
async function runOne(
  ctx: Context,
  image: Image,
  c: BenchCase,
  tool: Tool,
  op: Operation,
  round: number,
): Promise<Sample> {
  const { reg, work } = ctx;
  const repo = `bench/${c.id}-${tool}-r${round}`;
  const remote = `${reg.host}/${repo}:${TAG}`;
  const dest = join(work, `fetch-${tool}`);
  const rssFile = join(work, "rss.txt");
  // A private, empty blob-info cache per skopeo run: skopeo (as root) otherwise remembers in
  // /var/lib/containers/cache where it saw each blob and mounts it from there.
  const skopeoEnv = {
    _CONTAINERS_ROOTLESS_UID: "65534",
    XDG_DATA_HOME: join(work, `skopeo-cache-${c.id}-${op}-r${round}`),
  };
  let cmd: string;
  let args: string[];
  let env: Record<string, string> | undefined;
  if (tool === "sarde") {
    cmd = SARDE;
    args = op === "push"
      ? ["push", "-d", image.store, image.ref, "--target", remote]
      : ["fetch", "-d", dest, remote];
  } else {
    cmd = "skopeo";
    env = skopeoEnv;
    args = op === "push"
      ? ["copy", "--dest-tls-verify=false", `oci:${image.layoutLink}:${TAG}`, `docker://${remote}`]
      : ["copy", "--src-tls-verify=false", `docker://${remote}`, `oci:${dest}:${TAG}`];
  }
  await Deno.remove(dest, { recursive: true }).catch(() => {});
  // Flush dirty pages of earlier steps, and let the discards of deleted files finish, so that
  // this work does not land in this measurement.
  await settle(work);
  const offset = await logSize(reg);
  const regCpu0 = cpuOf(ctx.registryPid);
  const s = await measure(cmd, args, { env, rssFile, useTime: ctx.useTime });
  const registryCpuSeconds = cpuOf(ctx.registryPid) - regCpu0;
  const act = registryActivity(await logSince(reg, offset), repo);
  const output = s.stdout + s.stderr;

  // No free rides: every blob crossed the wire in this very run.
  const problems: string[] = [];
  if (/mounted/i.test(output) || act.mounts > 0) problems.push("a blob was mounted");
  if (/skipped|already exists/i.test(output)) problems.push("a blob was skipped");
  if (op === "push") {
    if (act.uploads !== image.blobs) {
      problems.push(`registry completed ${act.uploads} uploads, expected ${image.blobs}`);
    }
    const got = await remoteDigest(reg, repo);
    if (got !== image.manifestDigest) {
      problems.push(`registry has manifest ${got}, expected ${image.manifestDigest}`);
    }
  } else {
    if (act.servedBytes < image.blobBytes) {
      problems.push(`registry served ${act.servedBytes} blob bytes, expected ${image.blobBytes}`);
    }
    const layout = tool === "sarde" ? layoutDir(dest, parseReference(remote)) : dest;
    const stored = await blobBytesIn(layout);
    // the fetched store also holds the manifest
    if (stored < image.blobBytes) {
      problems.push(`destination holds ${stored} blob bytes, expected ${image.blobBytes}`);
    }
  }
  if (problems.length) {
    throw new Error(`${tool} ${op} of ${c.label}: ${problems.join("; ")}\n${output}`);
  }
  await Deno.remove(dest, { recursive: true }).catch(() => {});
  const mbps = image.blobBytes / 1e6 / s.seconds;
  log(
    `  ${c.id} round ${round + 1}: ${tool} ${op} ${s.seconds.toFixed(2)} s, ` +
      `${mbps.toFixed(0)} MB/s, peak RSS ${s.rssMB.toFixed(0)} MB, CPU ${
        s.cpuSeconds.toFixed(1)
      } s, ` +
      `registry CPU ${registryCpuSeconds.toFixed(1)} s`,
  );
  return {
    seconds: s.seconds,
    rssMB: s.rssMB,
    cpuSeconds: s.cpuSeconds,
    registryCpuSeconds,
  };
}

async function benchCase(ctx: Context, c: BenchCase, repeat: number): Promise<Row[]> {
  const store = join(ctx.work, `store-${c.id}`);
  const ref = `${ctx.reg.host}/bench/${c.id}-src:${TAG}`;
  const diskFile = join(ctx.work, `${c.id}.disk`);
  log(`${c.label}: generating the image`);
  await generateDisk(diskFile, c.size, c.mix);
  const made = await buildImage(store, ref, diskFile);
  const layoutLink = join(ctx.work, `layout-${c.id}`);
  await Deno.symlink(made.dir, layoutLink);
  const image: Image = { store, ref, layoutLink, ...made };

  const samples = new Map<string, Sample[]>();
  const key = (t: Tool, o: Operation) => `${t} ${o}`;
  for (let round = 0; round < repeat; round++) {
    // Alternate who goes first, so any order effect (warm caches, writeback) hits both tools.
    const order: Tool[] = round % 2 === 0 ? ["sarde", "skopeo"] : ["skopeo", "sarde"];
    for (const op of ["push", "fetch"] as Operation[]) {
      for (const tool of order) {
        const s = await runOne(ctx, image, c, tool, op, round);
        samples.set(key(tool, op), [...(samples.get(key(tool, op)) ?? []), s]);
      }
    }
  }
  await Deno.remove(store, { recursive: true });
  await Deno.remove(layoutLink);

  const rows: Row[] = [];
  for (const op of ["push", "fetch"] as Operation[]) {
    for (const tool of ["sarde", "skopeo"] as Tool[]) {
      const ss = samples.get(key(tool, op))!;
      const best = ss.reduce((a, b) => (b.seconds < a.seconds ? b : a));
      const seconds = best.seconds;
      rows.push({
        case: c.id,
        caseLabel: c.label,
        tool,
        operation: op,
        blobBytes: image.blobBytes,
        seconds,
        medianSeconds: median(ss.map((s) => s.seconds)),
        mbPerSecond: image.blobBytes / 1e6 / seconds,
        peakRssMB: Math.max(...ss.map((s) => s.rssMB)),
        cpuSeconds: best.cpuSeconds,
        registryCpuSeconds: best.registryCpuSeconds,
        samples: ss,
      });
    }
    const [sarde, skopeo] = rows.slice(-2);
    sarde.ratio = sarde.mbPerSecond / skopeo.mbPerSecond;
  }
  return rows;
}

// ---------------------------------------------------------------------------------------------
// output

interface Goal {
  name: string;
  pass: boolean;
  detail: string;
}

function goals(rows: Row[]): Goal[] {
  const sardeRows = rows.filter((r) => r.tool === "sarde");
  const slow = sardeRows.filter((r) => (r.ratio ?? 0) < 1);
  const ratios = sardeRows.map((r) => `${r.case} ${r.operation} ${r.ratio!.toFixed(2)}×`);
  const maxRss = sardeRows.reduce((a, b) => (b.peakRssMB > a.peakRssMB ? b : a));
  const overRss = sardeRows.filter((r) => r.peakRssMB >= RSS_GOAL_MB);
  return [
    {
      name: "sarde ≥ skopeo throughput",
      pass: slow.length === 0,
      detail: ratios.join(", "),
    },
    {
      name: `RSS < ${RSS_GOAL_MB} MB`,
      pass: overRss.length === 0,
      detail: `sarde peak ${maxRss.peakRssMB.toFixed(0)} MB in ${maxRss.case} ${maxRss.operation}`,
    },
  ];
}

function table(rows: Row[]): string {
  const head = [
    "case",
    "tool",
    "operation",
    "seconds",
    "MB/s",
    "sarde/skopeo",
    "peak RSS MB",
    "CPU s",
    "registry CPU s",
  ];
  const num = (x: number) => (Number.isFinite(x) ? x.toFixed(1) : "-");
  const body = rows.map((r) => [
    r.caseLabel,
    r.tool,
    r.operation,
    r.seconds.toFixed(2),
    r.mbPerSecond.toFixed(1),
    r.ratio === undefined ? "" : r.ratio.toFixed(2),
    r.peakRssMB.toFixed(0),
    num(r.cpuSeconds),
    num(r.registryCpuSeconds),
  ]);
  const numeric = [false, false, false, true, true, true, true, true, true];
  return formatTable(head, body, numeric);
}

// ---------------------------------------------------------------------------------------------

async function main(): Promise<number> {
  const { values } = parseArgs({
    // `deno task bench -- --only vm` passes the `--` through
    args: Deno.args[0] === "--" ? Deno.args.slice(1) : Deno.args,
    options: {
      only: { type: "string" },
      quick: { type: "boolean", default: false },
      repeat: { type: "string", default: "1" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  });
  if (values.help) {
    Deno.stdout.writeSync(new TextEncoder().encode(USAGE));
    return 0;
  }
  const repeat = Number(values.repeat);
  if (!Number.isInteger(repeat) || repeat < 1) {
    Deno.stderr.writeSync(new TextEncoder().encode(`--repeat wants a positive integer\n${USAGE}`));
    return 2;
  }
  if (values.only !== undefined && !["registry", "vm", "fleet", "lazy"].includes(values.only)) {
    Deno.stderr.writeSync(
      new TextEncoder().encode(`--only wants registry, vm, fleet or lazy\n${USAGE}`),
    );
    return 2;
  }
  const runRegistryBench = values.only === undefined || values.only === "registry";
  const runVm = values.only === undefined || values.only === "vm";
  const runFleet = values.only === undefined || values.only === "fleet";
  const runLazy = values.only === undefined || values.only === "lazy";
  const cases: BenchCase[] = [
    {
      id: "random",
      label: values.quick ? "random 256 MiB" : "random 1 GiB",
      size: values.quick ? 256 * MiB : GiB,
      mix: { random: 1, text: 0, zero: 0 },
    },
    {
      id: "disk",
      label: values.quick ? "disk-mix 512 MiB" : "disk-mix 2 GiB",
      size: values.quick ? 512 * MiB : 2 * GiB,
      mix: { random: 0.4, text: 0.35, zero: 0.25 },
    },
  ];

  const useTime = await haveTimeBin();

  let work: string | undefined;
  let reg: TestRegistry | undefined;
  let cleaned: Promise<void> | undefined;
  const cleanupRegistryBench = () =>
    cleaned ??= (async () => {
      killCurrent();
      await reg?.stop();
      if (work) await Deno.remove(work, { recursive: true }).catch(() => {});
    })();
  const unregister = addCleanup(cleanupRegistryBench);
  const onSignal = (sig: Deno.Signal, code: number) => () => {
    log(`${sig}: cleaning up`);
    killCurrent();
    runCleanups().finally(() => Deno.exit(code));
  };
  const handlers: [Deno.Signal, () => void][] = [
    ["SIGINT", onSignal("SIGINT", 130)],
    ["SIGTERM", onSignal("SIGTERM", 143)],
  ];
  for (const [s, h] of handlers) Deno.addSignalListener(s, h);

  try {
    const env = await versions(); // also warms Deno's module cache for bin/sarde
    let registryResult: { rows: Row[]; goals: Goal[]; loadavgAfter: string } | undefined;
    if (runRegistryBench) {
      work = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "sarde-bench-" });
      reg = await startRegistry("plain");
      log(`registry ${reg.url}, work dir ${work}, ${repeat} round(s)`);
      const ctx: Context = { reg, registryPid: await registryPid(reg), work, useTime };
      const rows: Row[] = [];
      for (const c of cases) rows.push(...await benchCase(ctx, c, repeat));
      registryResult = { rows, goals: goals(rows), loadavgAfter: loadavg() };
      await cleanupRegistryBench(); // frees the disk space before the VM benchmark
      if (!values.json) {
        const g = registryResult.goals;
        const lines = [
          `# sarde ${env.sarde} (deno ${env.deno}) vs ${env.skopeo}; ${env.registry}; ` +
          `${env.cpus} CPUs; loopback http`,
          `# load average (1 min) before ${env.loadavg}, after ${registryResult.loadavgAfter}`,
          `# seconds: best of ${repeat}; MB = 10^6 bytes of blob data; ` +
          `sarde/skopeo > 1 means sarde is faster; peak RSS: highest of ${repeat}; ` +
          `CPU s: user+sys of the client (and of the registry) in the best run`,
          table(rows),
          "",
          ...g.map((x) => `goal ${x.name}: ${x.pass ? "PASS" : "MISS"} (${x.detail})`),
        ];
        Deno.stdout.writeSync(new TextEncoder().encode(lines.join("\n") + "\n"));
      }
    }
    let vm: VmReport | undefined;
    if (runVm) {
      vm = await runVmBench({ quick: values.quick, useTime });
      if (!values.json) {
        const text = formatVmReport(vm, env);
        Deno.stdout.writeSync(new TextEncoder().encode((runRegistryBench ? "\n" : "") + text));
      }
    }
    let fleet: FleetReport | undefined;
    if (runFleet) {
      fleet = await runFleetBench({ quick: values.quick, useTime, repeat });
      if (!values.json) {
        const text = formatFleetReport(fleet, env);
        Deno.stdout.writeSync(
          new TextEncoder().encode((runRegistryBench || runVm ? "\n" : "") + text),
        );
      }
    }
    let lazy: LazyReport | undefined;
    if (runLazy) {
      lazy = await runLazyBench({ quick: values.quick, useTime });
      if (!values.json) {
        const text = formatLazyReport(lazy, env);
        Deno.stdout.writeSync(
          new TextEncoder().encode((runRegistryBench || runVm || runFleet ? "\n" : "") + text),
        );
      }
    }
    if (values.json) {
      const out = {
        date: new Date().toISOString(),
        quick: values.quick,
        ...(registryResult
          ? {
            repeat,
            versions: env,
            loadavgAfter: registryResult.loadavgAfter,
            cases,
            rows: registryResult.rows,
            goals: registryResult.goals,
          }
          : { versions: env }),
        ...(vm ? { vm } : {}),
        ...(fleet ? { fleet } : {}),
        ...(lazy ? { lazy } : {}),
      };
      Deno.stdout.writeSync(new TextEncoder().encode(JSON.stringify(out, null, 2) + "\n"));
    }
    return 0;
  } finally {
    for (const [s, h] of handlers) Deno.removeSignalListener(s, h);
    await cleanupRegistryBench();
    unregister();
  }
}

try {
  Deno.exit(await main());
} catch (err) {
  log(`failed: ${err instanceof Error ? err.message : String(err)}`);
  Deno.exit(1);
}
