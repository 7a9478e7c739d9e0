/**
 * The lazy-pull benchmark (`deno task bench --only lazy`, issue 10): how long a CI job waits for
 * its first script line on a fresh runner, with `sarde pull --lazy` against a full pull and a warm
 * cache.
 *
 * The image is the tiny test guest (tests/support/guest.ts) plus an incompressible extra disk of
 * 2 GiB (`--quick`: 384 MiB), exported with sarde's defaults (zstd, 64 MiB chunks of 2 MiB
 * frames) and pushed to a throw-away `docker-registry` on 127.0.0.1, which the pulls reach through
 * a proxy on 127.0.0.1 whose blob downloads share one link of {@link LINK_BYTES_PER_SECOND}.
 * Three runs of what the executor's `prepare` does, with the CLI: pull, `sarde clone`,
 * `virsh start`, then `ssh … echo` until it answers:
 *
 * - **full pull**: into an empty store and vmdir;
 * - **warm cache**: the same again, the image already imported (the baseline of the ratios);
 * - **lazy pull**: `pull --lazy` into an empty store and vmdir; the pulled VM itself is started
 *   (cloning a VM that is still lazy is not supported yet).
 *
 * Then, for the lazy run: the bytes of ranged GETs until SSH answered (demand reads and frame
 * tables), the time until the background download had committed the import, and the peak RSS
 * (`VmHWM`) of the `lazy-serve` process until it exits; and the cost of frames: the image's files
 * compressed as exported against the same files compressed without frames. Goals are marked
 * PASS/MISS; nothing here is a test. Every VM, process and file it makes is removed at the end,
 * also after an error or a signal. See bench/README.md.
 *
 * @module
 */

import { basename, join } from "node:path";
import { encodeZstd, groupDiskLayers } from "../lib/image/mod.ts";
import { parseReference } from "../lib/oci/reference.ts";
import { readLocalManifest } from "../lib/oci/store.ts";
import { DEFAULT_ZSTD_CHUNK, DEFAULT_ZSTD_LEVEL } from "../lib/util/defaults.ts";
import { lazyStateDir, readLazyState } from "../lib/vm/lazy_pull.ts";
import {
  ensureGuest,
  freePort,
  guestDomainXml,
  sshRun,
  type SshTarget,
} from "../tests/support/guest.ts";
import { SARDE } from "../tests/support/images.ts";
import { startThrottledProxy, type ThrottledProxy } from "../tests/support/proxy.ts";
import { startRegistry, type TestRegistry } from "../tests/support/registry.ts";
import {
  ensureLibvirtd,
  makeVmDir,
  removeVmDir,
  TEST_URI,
  undefineVms,
  uniqueVmName,
  virshDefine,
  writeRandom,
} from "../tests/support/vms.ts";
import {
  addCleanup,
  cpuOf,
  formatTable,
  killCurrent,
  loadavg,
  log,
  measure,
  type Measured,
  MiB,
  RSS_GOAL_MB,
  runQuiet,
  settle,
} from "./common.ts";

/** The link the pulls share: 30 MB/s, a busy office line or a cloud runner's fair share. */
export const LINK_BYTES_PER_SECOND = 30e6;
const REPO = "bench/lazy";
const TAG = "v1";
/** What the "job" prints first; the run ends when it comes back over SSH. */
const FIRST_LINE = "sarde-bench-first-script-line";
/** Give up on a boot after this long (TCG on a busy machine is slow, but not this slow). */
const BOOT_TIMEOUT_MS = 300_000;
/** The lazy server exits this long after its last NBD client once done (30 s by default). */
const SARDE_ENV = { LIBVIRT_DEFAULT_URI: TEST_URI, SARDE_LAZY_IDLE_MS: "2000" };

/** Goals of issue 10. */
const GOAL_COLD_VS_WARM = 1.3;
const GOAL_DEMAND_SHARE = 0.1;
const GOAL_COMPLETION_VS_PULL = 1.2;
const GOAL_FRAME_OVERHEAD = 0.03;

/** Options of {@link runLazyBench}. */
export interface LazyBenchOptions {
  /** A 384 MiB extra disk instead of 2 GiB. */
  quick: boolean;
  /** Measure with /usr/bin/time (else poll /proc). */
  useTime: boolean;
}

/** One way to get from "job starts" to "first script line". */
export interface LazyRow {
  scenario: "warm cache" | "full pull" | "lazy pull";
  /** `sarde pull [--lazy]`. */
  pullSeconds: number;
  /** `sarde clone` (undefined: the pulled VM was started itself). */
  cloneSeconds?: number;
  /** `virsh start`. */
  startSeconds: number;
  /** From `virsh start` returning to the first `echo` answered over SSH. */
  sshSeconds: number;
  /** All of it: job start to first script line. */
  totalSeconds: number;
  /** This total / the warm cache's (1 for the warm cache itself). */
  vsWarm: number;
  /** Blob bytes the proxy sent until the first line. */
  movedBytes: number;
  /** Of those, answers to `Range` requests (frame tables and demand reads). */
  rangedBytes: number;
  /** Peak RSS of `sarde pull` (10^6 bytes; for --lazy the client, not the server). */
  pullRssMB: number;
  /** 1-minute load average at the start. */
  load: string;
}

/** Compressed size of one image file with and without frames. */
export interface FrameCost {
  file: string;
  /** Uncompressed size. */
  size: number;
  /** Its distinct chunk blobs as exported (2 MiB frames + table). */
  framedBytes: number;
  /** The same file, same chunks and level, each chunk one zstd frame without a table. */
  plainBytes: number;
}

/** A PASS/MISS line. */
export interface LazyGoal {
  name: string;
  pass: boolean;
  detail: string;
}

/** Everything {@link runLazyBench} measured. */
export interface LazyReport {
  date: string;
  quick: boolean;
  /** Size of the random extra disk. */
  extraDiskBytes: number;
  /** All blobs of the image (config and layers). */
  imageBytes: number;
  linkBytesPerSecond: number;
  rows: LazyRow[];
  lazy: {
    /** Blob bytes moved when `pull --lazy` returned. */
    bytesAtReturn: number;
    /** Job start to the whole blobs of every layer sent by the proxy. */
    downloadSeconds: number;
    /** Job start to the import committed by the background download. */
    completionSeconds: number;
    /** The full pull's `sarde pull`, for comparison. */
    plainPullSeconds: number;
    /** Peak RSS (VmHWM) of the lazy-serve process, 10^6 bytes. */
    serverPeakRssMB: number;
    /** CPU seconds of the lazy-serve process, read last before it exited. */
    serverCpuSeconds: number;
  };
  frames: FrameCost[];
  loadavgBefore: string;
  loadavgAfter: string;
  goals: LazyGoal[];
}

interface Ctx {
  opts: LazyBenchOptions;
  dir: string;
  proxy: ThrottledProxy;
  /** The image as the pulls name it (through the proxy). */
  ref: string;
  imageId: string;
  /** The image's distinct layer blobs, what a pull downloads (besides the config). */
  layerBytes: number;
  ssh: SshTarget;
  /** VMs this run may have defined (undefined at the end). */
  domains: string[];
  /** lazy-serve processes to kill at the end, should they still run. */
  servers: number[];
  rssFile: string;
}

/** A store and vmdir. */
interface Place {
  dir: string;
  ocidir: string;
  vmdir: string;
}

async function place(ctx: Ctx, name: string): Promise<Place> {
  const dir = join(ctx.dir, name);
  await Deno.mkdir(dir, { mode: 0o755 });
  return { dir, ocidir: join(dir, "oci"), vmdir: join(dir, "vms") };
}

function sardeArgs(p: Place, command: string, more: string[]): string[] {
  return [
    command,
    "-d",
    p.ocidir,
    "--vmdir",
    p.vmdir,
    "-c",
    TEST_URI,
    "--domain-type",
    "qemu",
    // the image's domain XML carries the SSH port forward (qemu:commandline)
    "--allow-host-resources",
    ...more,
  ];
}

function sardeRun(ctx: Ctx, args: string[]): Promise<Measured> {
  return measure(SARDE, args, { env: SARDE_ENV, rssFile: ctx.rssFile, useTime: ctx.opts.useTime });
}

const seconds = (since: number) => (performance.now() - since) / 1000;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * `ssh … echo FIRST_LINE` until it answers (every 250 ms, as the executor's wait for SSH);
 * on a timeout the error has the tail of the guest's serial log.
 */
async function firstScriptLine(ctx: Ctx, p: Place): Promise<void> {
  const deadline = performance.now() + BOOT_TIMEOUT_MS;
  let last = "";
  while (performance.now() < deadline) {
    const r = await sshRun(ctx.ssh, `echo ${FIRST_LINE}`, { timeoutMs: 10_000 })
      .catch((err) => ({ code: -1, stdout: "", stderr: String(err) }));
    if (r.code === 0 && r.stdout.trim() === FIRST_LINE) return;
    last = `exit ${r.code}: ${r.stderr.trim()}`;
    await sleep(250);
  }
  const logs = await runQuiet("find", [p.dir, "-name", "*.console.log"]).catch(() => "");
  let tail = "";
  for (const f of logs.trim().split("\n").filter(Boolean)) {
    const text = await Deno.readTextFile(f).catch(() => "");
    tail += `\n--- ${f}:\n${text.trimEnd().split("\n").slice(-20).join("\n")}`;
  }
  throw new Error(`no SSH answer after ${BOOT_TIMEOUT_MS / 1000} s (last: ${last})${tail}`);
}

/**
 * One job start: pull (`--lazy` or not) into `p` as VM `base`, clone it (unless `lazy`), start,
 * wait for the first line. The job VM is left running.
 */
async function jobStart(
  ctx: Ctx,
  p: Place,
  scenario: LazyRow["scenario"],
  base: string,
): Promise<
  LazyRow & { vm: string; t0: number; atReturn: number; downloaded: Promise<number> }
> {
  const lazy = scenario === "lazy pull";
  log(`${scenario}: ${lazy ? "pull --lazy" : "pull"}, ${lazy ? "" : "clone, "}start, SSH echo`);
  await settle(ctx.dir);
  const load = loadavg();
  const before = ctx.proxy.blobBytes();
  ctx.domains.push(base);
  const t0 = performance.now();
  const downloaded = downloadTime(ctx, before.all - before.ranged, t0);
  const pull = await sardeRun(
    ctx,
    sardeArgs(p, "pull", ["-n", base, ...(lazy ? ["--lazy"] : []), ctx.ref]),
  );
  const atReturn = ctx.proxy.blobBytes().all - before.all;
  if (pull.stdout.trim() !== base) throw new Error(`pull printed ${pull.stdout.trim()}`);
  let vm = base;
  let cloneSeconds: number | undefined;
  if (!lazy) {
    vm = uniqueVmName("sarde-bench-lazy-job");
    ctx.domains.push(vm);
    cloneSeconds = (await sardeRun(ctx, sardeArgs(p, "clone", [base, vm]))).seconds;
  }
  const tStart = performance.now();
  await runQuiet("virsh", ["-c", TEST_URI, "start", vm]);
  const startSeconds = seconds(tStart);
  const tSsh = performance.now();
  await firstScriptLine(ctx, p);
  const sshSeconds = seconds(tSsh);
  const totalSeconds = seconds(t0);
  const after = ctx.proxy.blobBytes();
  const row = {
    scenario,
    pullSeconds: pull.seconds,
    cloneSeconds,
    startSeconds,
    sshSeconds,
    totalSeconds,
    vsWarm: NaN,
    movedBytes: after.all - before.all,
    rangedBytes: after.ranged - before.ranged,
    pullRssMB: pull.rssMB,
    load,
  };
  log(
    `  ${scenario}: first line after ${totalSeconds.toFixed(2)} s (pull ${
      pull.seconds.toFixed(2)
    } s), ${(row.movedBytes / 1e6).toFixed(1)} MB moved, ${
      (row.rangedBytes / 1e6).toFixed(1)
    } MB ranged`,
  );
  return { ...row, vm, t0, atReturn, downloaded };
}

/**
 * Seconds from `t0` until the proxy has sent whole-blob (not ranged) bytes of all the image's
 * layers since `wholeBefore` (checked every 100 ms, for at most 30 min).
 */
async function downloadTime(ctx: Ctx, wholeBefore: number, t0: number): Promise<number> {
  const deadline = Date.now() + 30 * 60_000;
  while (Date.now() < deadline) {
    const b = ctx.proxy.blobBytes();
    if (b.all - b.ranged - wholeBefore >= ctx.layerBytes) return seconds(t0);
    await sleep(100);
  }
  return NaN;
}

/** Peak RSS (VmHWM, 10^6 bytes) and last CPU seconds of `pid`, sampled until it exits. */
function watchProcess(pid: number): { done: Promise<{ rssMB: number; cpuSeconds: number }> } {
  const done = (async () => {
    let hwmKiB = 0;
    let cpu = NaN;
    for (;;) {
      try {
        const status = await Deno.readTextFile(`/proc/${pid}/status`);
        if (/^State:\s+Z/m.test(status)) break;
        const m = status.match(/^VmHWM:\s+(\d+) kB/m);
        if (m) hwmKiB = Math.max(hwmKiB, Number(m[1]));
        const c = cpuOf(pid);
        if (Number.isFinite(c)) cpu = c;
      } catch {
        break; // exited
      }
      await sleep(100);
    }
    return { rssMB: (hwmKiB * 1024) / 1e6, cpuSeconds: cpu };
  })();
  return { done };
}

/**
 * The lazy run after the first line: waits until the background download has committed the
 * import (the VM keeps running meanwhile, as a job's would), stops the VM and waits until the
 * server has folded the VM's writes in and exited, sampling its memory all along.
 */
async function lazyCompletion(
  ctx: Ctx,
  p: Place,
  run: { vm: string; t0: number; downloaded: Promise<number> },
) {
  const dir = lazyStateDir(p.vmdir, ctx.imageId);
  const state = await readLazyState(dir);
  if (!state) throw new Error(`no lazy session in ${dir}`);
  const cmdline = await Deno.readTextFile(`/proc/${state.pid}/cmdline`).catch(() => "");
  if (!cmdline.includes("lazy-serve")) {
    throw new Error(`process ${state.pid} of the lazy session is not sarde lazy-serve`);
  }
  ctx.servers.push(state.pid);
  const watch = watchProcess(state.pid);
  const deadline = Date.now() + 30 * 60_000;
  for (;;) {
    const s = await readLazyState(dir);
    if (s && s.phase !== "serving") break;
    if (Date.now() > deadline) throw new Error("the lazy pull did not complete in 30 min");
    if (!await Deno.stat(`/proc/${state.pid}`).then(() => true, () => false)) {
      throw new Error(`the lazy server died; see ${join(dir, "server.log")}`);
    }
    await sleep(100);
  }
  const completionSeconds = seconds(run.t0);
  const downloadSeconds = await run.downloaded;
  log(
    `  lazy pull: blobs downloaded ${downloadSeconds.toFixed(2)} s, import committed ` +
      `${completionSeconds.toFixed(2)} s after the job started`,
  );
  await runQuiet("virsh", ["-c", TEST_URI, "destroy", run.vm]);
  const exited = await Promise.race([watch.done, sleep(5 * 60_000).then(() => undefined)]);
  if (!exited) throw new Error(`the lazy server ${state.pid} did not exit 5 min after the VM`);
  log(`  lazy server: peak RSS ${exited.rssMB.toFixed(0)} MB, ${exited.cpuSeconds} CPU s`);
  return { completionSeconds, downloadSeconds, server: exited };
}

/** The image's files compressed as exported and without frames ({@link FrameCost}). */
async function frameCosts(
  ctx: Ctx,
  manifest: Parameters<typeof groupDiskLayers>[0],
  sources: Map<string, string>,
): Promise<FrameCost[]> {
  const out: FrameCost[] = [];
  const tmp = join(ctx.dir, "frames");
  await Deno.mkdir(tmp);
  for (const f of groupDiskLayers(manifest, ctx.ref)) {
    const path = sources.get(f.name);
    if (!path) throw new Error(`no source file for ${f.name} of the image`);
    const distinct = (xs: { digest: string; size: number }[]) =>
      [...new Map(xs.map((x) => [x.digest, x.size])).values()].reduce((n, s) => n + s, 0);
    log(`frame cost: compressing ${f.name} without frames`);
    const plain = await encodeZstd(path, {
      chunkSize: DEFAULT_ZSTD_CHUNK,
      level: DEFAULT_ZSTD_LEVEL,
      frameSize: 0,
      outDir: tmp,
    });
    for (const c of plain.chunks) await Deno.remove(c.path);
    out.push({
      file: f.name,
      size: plain.fileSize,
      framedBytes: distinct(f.layers),
      plainBytes: distinct(plain.chunks),
    });
  }
  return out;
}

/**
 * Builds the source VM (the tiny guest's root disk copied into a self-contained qcow2, the random
 * extra disk, direct kernel boot, SSH forwarded from `sshPort`), exports it with sarde's defaults
 * and pushes it to `reg`. Returns the exporter's store and the image files' sources.
 */
async function buildImage(ctx: Ctx, reg: TestRegistry, extraMiB: number) {
  const guest = await ensureGuest();
  const src = join(ctx.dir, "src");
  await Deno.mkdir(src, { mode: 0o755 });
  const root = join(src, "root.qcow2");
  await runQuiet("qemu-img", ["convert", "-O", "qcow2", guest.rootfs, root]);
  const extra = join(src, "extra.raw");
  log(`building the image: tiny guest + ${extraMiB} MiB of random bytes`);
  await writeRandom(extra, 0, extraMiB);
  const name = uniqueVmName("sarde-bench-lazy-src");
  ctx.domains.push(name);
  await virshDefine(
    guestDomainXml({
      name,
      dir: src,
      rootDisk: root,
      sshPort: ctx.ssh.port,
      kernel: guest.kernel,
      initrd: guest.initrd,
      extraDisks: [{ path: extra, format: "raw" }],
    }),
    TEST_URI,
    src,
  );
  const ocidir = join(ctx.dir, "export");
  const direct = `${reg.host}/${REPO}:${TAG}`;
  await runQuiet(SARDE, ["export", "-q", "-d", ocidir, "-c", TEST_URI, name, direct]);
  await runQuiet(SARDE, ["push", "-q", "-d", ocidir, direct]);
  await undefineVms([name]);
  const { manifest } = await readLocalManifest(ocidir, parseReference(direct));
  const sources = new Map(
    [root, extra, guest.kernel, guest.initrd].map((p) => [basename(p), p]),
  );
  return { ocidir, manifest, sources, src, key: guest.privateKey };
}

/** Runs the lazy-pull benchmark; removes everything it made before returning. */
export async function runLazyBench(opts: LazyBenchOptions): Promise<LazyReport> {
  const loadavgBefore = loadavg();
  await ensureLibvirtd();
  const dir = await makeVmDir("bench-lazy");
  let reg: TestRegistry | undefined;
  let proxy: ThrottledProxy | undefined;
  const domains: string[] = [];
  const servers: number[] = [];
  let cleaned: Promise<void> | undefined;
  const cleanup = () =>
    cleaned ??= (async () => {
      killCurrent();
      await undefineVms(domains).catch((err) => log(`cleanup of VMs: ${err.message}`));
      for (const pid of servers) {
        try {
          Deno.kill(pid, "SIGKILL");
        } catch { /* gone */ }
      }
      await proxy?.stop();
      await reg?.stop();
      await removeVmDir(dir);
    })();
  const unregister = addCleanup(cleanup);
  try {
    reg = await startRegistry("plain");
    proxy = await startThrottledProxy({ url: reg.url }, {
      bytesPerSecond: LINK_BYTES_PER_SECOND,
      shared: true,
    });
    const extraMiB = opts.quick ? 384 : 2048;
    const ctx: Ctx = {
      opts,
      dir,
      proxy,
      ref: `${proxy.host}/${REPO}:${TAG}`,
      imageId: "",
      layerBytes: 0,
      ssh: { port: freePort(), key: "" },
      domains,
      servers,
      rssFile: join(dir, "rss.txt"),
    };
    log(`lazy benchmark: registry ${reg.url} behind ${proxy.url}, work dir ${dir}`);
    const img = await buildImage(ctx, reg, extraMiB);
    ctx.imageId = img.manifest.config.digest;
    ctx.ssh.key = img.key;
    ctx.layerBytes = [...new Map(img.manifest.layers.map((l) => [l.digest, l.size])).values()]
      .reduce((n, s) => n + s, 0);
    const imageBytes = ctx.layerBytes + img.manifest.config.size;
    const frames = await frameCosts(ctx, img.manifest, img.sources);
    // the source VM and the exporter's store are not needed any more: free their disk space
    await Deno.remove(img.src, { recursive: true });
    await Deno.remove(img.ocidir, { recursive: true });

    const full = await place(ctx, "full");
    const fullBase = uniqueVmName("sarde-bench-lazy-full");
    const fullRun = await jobStart(ctx, full, "full pull", fullBase);
    await undefineVms([fullRun.vm]);
    const warmRun = await jobStart(ctx, full, "warm cache", fullBase);
    await undefineVms([warmRun.vm]);
    const lazy = await place(ctx, "lazy");
    const lazyRun = await jobStart(ctx, lazy, "lazy pull", uniqueVmName("sarde-bench-lazy-lazy"));
    const done = await lazyCompletion(ctx, lazy, lazyRun);

    // no free ride: the lazily pulled extra disk is the fully pulled one
    await runQuiet("qemu-img", [
      "compare",
      "-f",
      "raw",
      "-F",
      "raw",
      join(lazy.vmdir, lazyRun.vm, "extra.raw"),
      join(full.vmdir, fullBase, "extra.raw"),
    ]);
    const rows: LazyRow[] = [warmRun, fullRun, lazyRun].map((r) => ({
      scenario: r.scenario,
      pullSeconds: r.pullSeconds,
      cloneSeconds: r.cloneSeconds,
      startSeconds: r.startSeconds,
      sshSeconds: r.sshSeconds,
      totalSeconds: r.totalSeconds,
      vsWarm: r.totalSeconds / warmRun.totalSeconds,
      movedBytes: r.movedBytes,
      rangedBytes: r.rangedBytes,
      pullRssMB: r.pullRssMB,
      load: r.load,
    }));
    const report: LazyReport = {
      date: new Date().toISOString(),
      quick: opts.quick,
      extraDiskBytes: extraMiB * MiB,
      imageBytes,
      linkBytesPerSecond: LINK_BYTES_PER_SECOND,
      rows,
      lazy: {
        bytesAtReturn: lazyRun.atReturn,
        downloadSeconds: done.downloadSeconds,
        completionSeconds: done.completionSeconds,
        plainPullSeconds: fullRun.pullSeconds,
        serverPeakRssMB: done.server.rssMB,
        serverCpuSeconds: done.server.cpuSeconds,
      },
      frames,
      loadavgBefore,
      loadavgAfter: loadavg(),
      goals: [],
    };
    report.goals = goals(report);
    return report;
  } finally {
    await cleanup();
    unregister();
  }
}

function goals(r: LazyReport): LazyGoal[] {
  const lazy = r.rows.find((x) => x.scenario === "lazy pull")!;
  const framed = r.frames.reduce((n, f) => n + f.framedBytes, 0);
  const plain = r.frames.reduce((n, f) => n + f.plainBytes, 0);
  const overhead = framed / plain - 1;
  const worst = r.frames.reduce((a, b) =>
    b.framedBytes / b.plainBytes > a.framedBytes / a.plainBytes ? b : a
  );
  const pct = (x: number) => `${(x * 100).toFixed(1)} %`;
  const completion = r.lazy.completionSeconds / r.lazy.plainPullSeconds;
  return [
    {
      name: `lazy cold start ≤ ${GOAL_COLD_VS_WARM}× warm`,
      pass: lazy.vsWarm <= GOAL_COLD_VS_WARM,
      detail: `${lazy.vsWarm.toFixed(2)}× (${lazy.totalSeconds.toFixed(1)} s vs ${
        (lazy.totalSeconds / lazy.vsWarm).toFixed(1)
      } s)`,
    },
    {
      name: `demand reads before SSH ≤ ${pct(GOAL_DEMAND_SHARE)} of the image`,
      pass: lazy.rangedBytes <= GOAL_DEMAND_SHARE * r.imageBytes,
      detail: `${pct(lazy.rangedBytes / r.imageBytes)} (${(lazy.rangedBytes / 1e6).toFixed(1)} of ${
        (r.imageBytes / 1e6).toFixed(1)
      } MB, frame tables included)`,
    },
    {
      name: `background completion ≤ ${GOAL_COMPLETION_VS_PULL}× a plain pull`,
      pass: completion <= GOAL_COMPLETION_VS_PULL,
      detail: `${completion.toFixed(2)}× (${r.lazy.completionSeconds.toFixed(1)} s vs ${
        r.lazy.plainPullSeconds.toFixed(1)
      } s)`,
    },
    {
      name: `frame overhead ≤ ${pct(GOAL_FRAME_OVERHEAD)}`,
      pass: overhead <= GOAL_FRAME_OVERHEAD,
      detail: `${pct(overhead)} of the image's files (worst file: ${worst.file} ${
        pct(worst.framedBytes / worst.plainBytes - 1)
      })`,
    },
    {
      name: `lazy server peak RSS ≤ ${RSS_GOAL_MB} MB`,
      pass: r.lazy.serverPeakRssMB <= RSS_GOAL_MB,
      detail: `${r.lazy.serverPeakRssMB.toFixed(0)} MB`,
    },
  ];
}

/** The lazy benchmark's report as text: the job-start table, the frame costs, the goals. */
export function formatLazyReport(r: LazyReport, env: Record<string, string>): string {
  const n = (x: number | undefined, d = 2) =>
    x !== undefined && Number.isFinite(x) ? x.toFixed(d) : "-";
  const head = [
    "scenario",
    "pull s",
    "clone s",
    "start s",
    "SSH s",
    "first line s",
    "vs warm",
    "moved MB",
    "ranged MB",
    "pull peak RSS MB",
    "load",
  ];
  const body = r.rows.map((x) => [
    x.scenario,
    n(x.pullSeconds),
    n(x.cloneSeconds),
    n(x.startSeconds),
    n(x.sshSeconds),
    n(x.totalSeconds),
    `${x.vsWarm.toFixed(2)}×`,
    n(x.movedBytes / 1e6, 1),
    n(x.rangedBytes / 1e6, 1),
    n(x.pullRssMB, 0),
    x.load,
  ]);
  const frameBody = r.frames.map((f) => [
    f.file,
    n(f.size / 1e6, 1),
    n(f.plainBytes / 1e6, 3),
    n(f.framedBytes / 1e6, 3),
    `${((f.framedBytes / f.plainBytes - 1) * 100).toFixed(2)} %`,
  ]);
  const l = r.lazy;
  const lines = [
    `# lazy pull benchmark: sarde ${env.sarde} (deno ${env.deno}); ${env.registry} behind a ` +
    `proxy on 127.0.0.1 whose blob downloads share ${r.linkBytesPerSecond / 1e6} MB/s; ` +
    `${env.cpus} CPUs; libvirt qemu:///system, TCG`,
    `# image: the tiny guest + ${r.extraDiskBytes / MiB} MiB of random bytes, ` +
    `${(r.imageBytes / 1e6).toFixed(1)} MB of blobs (zstd, 64 MiB chunks of 2 MiB frames)`,
    `# load average (1 min) before ${r.loadavgBefore}, after ${r.loadavgAfter}`,
    `# one run each; first line s: job start to the first \`ssh … echo\` answered (pull + clone + ` +
    `virsh start + SSH); vs warm: these / the warm cache's; moved/ranged MB: blob bytes the proxy ` +
    `sent by then, all / answers to Range requests; the lazy VM is started without a clone`,
    formatTable(head, body, head.map((_, i) => i > 0)),
    "",
    `lazy pull: returned after ${(l.bytesAtReturn / 1e6).toFixed(1)} MB had moved; blobs ` +
    `downloaded ${l.downloadSeconds.toFixed(1)} s and import committed ` +
    `${l.completionSeconds.toFixed(1)} s after the job started (plain pull ` +
    `${l.plainPullSeconds.toFixed(1)} s); server peak RSS ${l.serverPeakRssMB.toFixed(0)} MB, ` +
    `${n(l.serverCpuSeconds, 1)} CPU s`,
    "",
    "# frame cost: the image's files, distinct chunk blobs, as exported (2 MiB frames + table) " +
    "and with one frame per chunk (same chunks and level)",
    formatTable(
      ["file", "size MB", "no frames MB", "frames MB", "overhead"],
      frameBody,
      [false, true, true, true, true],
    ),
    "",
    ...r.goals.map((x) => `goal ${x.name}: ${x.pass ? "PASS" : "MISS"} (${x.detail})`),
  ];
  return lines.join("\n") + "\n";
}
