/**
 * Helpers shared by the benchmarks (`bench/main.ts`: registry push/fetch, `bench/vm.ts`: VMs
 * through a registry): running a command while measuring wall time, peak RSS and CPU, waiting for
 * an idle disk, reading the test registry's log, the load average, table printing and cleanup on
 * signals.
 *
 * @module
 */

import { join } from "node:path";
import { SARDE } from "../tests/support/images.ts";
import type { TestRegistry } from "../tests/support/registry.ts";

export const MiB = 1 << 20;
export const GiB = 1 << 30;
export const TIME_BIN = "/usr/bin/time";
export const RSS_GOAL_MB = 200;

export function log(msg: string): void {
  Deno.stderr.writeSync(new TextEncoder().encode(`bench: ${msg}\n`));
}

/** Whether {@link TIME_BIN} exists (else {@link measure} polls `/proc/PID/status`). */
export async function haveTimeBin(): Promise<boolean> {
  try {
    await Deno.stat(TIME_BIN);
    return true;
  } catch {
    log(`${TIME_BIN} missing (apt-get install time); polling /proc/PID/status VmHWM instead`);
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// running and measuring

let current: Deno.ChildProcess | undefined;

/** The pids of all descendants of `pid` (from the parent pids in `/proc/PID/stat`). */
function descendants(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${e.name}/stat`);
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(e.name)]);
    } catch { /* gone */ }
  }
  const out: number[] = [];
  const todo = [pid];
  while (todo.length) {
    const next = children.get(todo.pop()!) ?? [];
    out.push(...next);
    todo.push(...next);
  }
  return out;
}

/**
 * Kills the command {@link measure} is running, if any, with everything it started (for cleanup
 * on a signal): `/usr/bin/time` does not pass a SIGKILL on to the measured program.
 */
export function killCurrent(): void {
  if (!current) return;
  for (const pid of [current.pid, ...descendants(current.pid)]) {
    try {
      Deno.kill(pid, "SIGKILL");
    } catch { /* gone */ }
  }
}

/** What {@link measure} returns. */
export interface Measured {
  seconds: number;
  /** Peak RSS, 10^6 bytes. */
  rssMB: number;
  /** User + system CPU seconds (NaN without /usr/bin/time). */
  cpuSeconds: number;
  stdout: string;
  stderr: string;
}

/** Runs a command, returning wall seconds, peak RSS (10^6 bytes) and its output. */
export async function measure(
  cmd: string,
  args: string[],
  opts: { env?: Record<string, string>; rssFile: string; useTime: boolean },
): Promise<Measured> {
  const argv = opts.useTime ? ["-f", "%M %U %S", "-o", opts.rssFile, cmd, ...args] : args;
  const start = performance.now();
  const child = new Deno.Command(opts.useTime ? TIME_BIN : cmd, {
    args: argv,
    env: opts.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  current = child;
  // Without /usr/bin/time: poll VmHWM (the kernel's peak RSS), the last read before exit wins.
  let hwmKiB = 0;
  let polling = !opts.useTime;
  const poller = (async () => {
    while (polling) {
      try {
        const status = await Deno.readTextFile(`/proc/${child.pid}/status`);
        const m = status.match(/^VmHWM:\s+(\d+) kB/m);
        if (m) hwmKiB = Math.max(hwmKiB, Number(m[1]));
      } catch { /* exited */ }
      await new Promise((r) => setTimeout(r, 20));
    }
  })();
  const out = await child.output();
  const seconds = (performance.now() - start) / 1000;
  polling = false;
  await poller;
  current = undefined;
  const dec = new TextDecoder();
  const stdout = dec.decode(out.stdout);
  const stderr = dec.decode(out.stderr);
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")} failed (exit ${out.code}):\n${stderr}${stdout}`);
  }
  let cpuSeconds = NaN;
  if (opts.useTime) {
    const text = (await Deno.readTextFile(opts.rssFile)).trim().split("\n").at(-1) ?? "";
    const [rss, user, sys] = text.split(" ").map(Number);
    if (!Number.isFinite(rss)) throw new Error(`cannot read peak RSS from ${TIME_BIN}: ${text}`);
    hwmKiB = rss;
    cpuSeconds = user + sys;
  }
  return { seconds, rssMB: (hwmKiB * 1024) / 1e6, cpuSeconds, stdout, stderr };
}

/** `io_ticks` (ms the device was busy) of the block device holding `path`, if it has one. */
export function ioTicks(path: string): number | undefined {
  try {
    const dev = Deno.statSync(path).dev;
    const major = ((dev >> 8) & 0xfff) | (Math.floor(dev / 2 ** 32) & ~0xfff);
    const minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    if (major === 0) return undefined; // tmpfs, overlay, …
    const f = Deno.readTextFileSync(`/sys/dev/block/${major}:${minor}/stat`).trim().split(/\s+/);
    return Number(f[9]);
  } catch {
    return undefined;
  }
}

/**
 * `sync`, then waits until the disk under `path` has been idle for 0.5 s (at most 15 s): ext4
 * with `discard` trims the blocks of deleted files (fetch destinations, the registry's duplicate
 * uploads) after the fact, ≈1 s of device time per 2 GB here.
 */
export async function settle(path: string): Promise<void> {
  await runQuiet("sync", []);
  const deadline = Date.now() + 15_000;
  let last = ioTicks(path);
  let idle = 0;
  while (last !== undefined && idle < 2 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 250));
    const now = ioTicks(path);
    idle = now === last ? idle + 1 : 0;
    last = now;
  }
}

const CLK_TCK = 100; // USER_HZ on Linux

/** utime + stime of a process in seconds (NaN when unreadable). */
export function cpuOf(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) / CLK_TCK; // fields 14 and 15 of stat
  } catch {
    return NaN;
  }
}

/** The pid of the registry serving `reg` (the process whose command line names its config). */
export async function registryPid(reg: TestRegistry): Promise<number | undefined> {
  const config = join(reg.dataDir, "..", "config.yml");
  for await (const e of Deno.readDir("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const argv = (await Deno.readTextFile(`/proc/${e.name}/cmdline`)).split("\0");
      if (argv.some((a) => a.endsWith("docker-registry")) && argv.includes(config)) {
        return Number(e.name);
      }
    } catch { /* gone */ }
  }
  return undefined;
}

/** Runs a command to completion (not measured); throws with its output on failure. */
export async function runQuiet(
  cmd: string,
  args: string[],
  env?: Record<string, string>,
): Promise<string> {
  const out = await new Deno.Command(cmd, {
    args,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")} failed: ${dec.decode(out.stderr)}`);
  }
  return dec.decode(out.stdout) + dec.decode(out.stderr);
}

// ---------------------------------------------------------------------------------------------
// the registry log

/** One `response completed` line of the registry log. */
export interface RegistryRequest {
  method: string;
  /** Request URI, decoded from the log's quoting (the query string stays percent-encoded). */
  uri: string;
  status: number;
  /** Bytes of response body written. */
  written: number;
}

/** The `response completed` lines of a piece of the registry log. */
export function registryRequests(logText: string): RegistryRequest[] {
  const out: RegistryRequest[] = [];
  for (const line of logText.split("\n")) {
    if (!line.includes('msg="response completed"')) continue;
    const method = line.match(/http\.request\.method=(\S+)/)?.[1] ?? "";
    let uri = line.match(/http\.request\.uri=("(?:[^"\\]|\\.)*"|\S+)/)?.[1] ?? "";
    if (uri.startsWith('"')) uri = JSON.parse(uri);
    const status = Number(line.match(/http\.response\.status=(\d+)/)?.[1]);
    const written = Number(line.match(/http\.response\.written=(\d+)/)?.[1] ?? 0);
    out.push({ method, uri, status, written });
  }
  return out;
}

/** What the registry log says happened to a repository during one measurement. */
export interface RegistryActivity {
  /** Blob uploads completed (`PUT …/blobs/uploads/…?digest=` → 201). */
  uploads: number;
  /** Cross-repository mounts that succeeded (`POST …?mount=` → 201). */
  mounts: number;
  /** Bytes of blob bodies the registry served (`GET …/blobs/sha256:…` → 200/206). */
  servedBytes: number;
}

export function registryActivity(logText: string, repository: string): RegistryActivity {
  const act: RegistryActivity = { uploads: 0, mounts: 0, servedBytes: 0 };
  const prefix = `/v2/${repository}/blobs/`;
  for (const { method, uri, status, written } of registryRequests(logText)) {
    if (!uri.startsWith(prefix)) continue;
    if (method === "PUT" && status === 201 && uri.includes("digest=")) act.uploads++;
    if (method === "POST" && status === 201 && uri.includes("mount=")) act.mounts++;
    if (method === "GET" && (status === 200 || status === 206)) act.servedBytes += written;
  }
  return act;
}

/** Reads what the registry logged since byte `offset` (after a moment, so the log catches up). */
export async function logSince(reg: TestRegistry, offset: number): Promise<string> {
  await new Promise((r) => setTimeout(r, 200));
  const all = await Deno.readFile(reg.logFile);
  return new TextDecoder().decode(all.subarray(offset));
}

export async function logSize(reg: TestRegistry): Promise<number> {
  return (await Deno.stat(reg.logFile)).size;
}

// ---------------------------------------------------------------------------------------------
// output

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** A plain-text table: `numeric` columns right-aligned, the others left-aligned. */
export function formatTable(head: string[], body: string[][], numeric: boolean[]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const fmt = (cells: string[]) =>
    cells.map((c, i) => (numeric[i] ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join("  ")
      .trimEnd();
  return [fmt(head), fmt(widths.map((w) => "-".repeat(w))), ...body.map(fmt)].join("\n");
}

/** The 1-minute load average: other work on the machine makes the numbers noisy. */
export function loadavg(): string {
  try {
    return Deno.readTextFileSync("/proc/loadavg").split(" ")[0];
  } catch {
    return "?";
  }
}

/** The first line of a command's output, or `unknown`. */
export async function firstLine(cmd: string, args: string[]): Promise<string> {
  try {
    return (await runQuiet(cmd, args)).trim().split("\n")[0];
  } catch {
    return "unknown";
  }
}

export async function versions(): Promise<Record<string, string>> {
  return {
    // not optional: fails early when the sarde under test does not even start
    sarde: (await runQuiet(SARDE, ["--version"])).trim(),
    deno: Deno.version.deno,
    skopeo: await firstLine("skopeo", ["--version"]),
    registry: await firstLine("docker-registry", ["--version"]),
    cpus: String(navigator.hardwareConcurrency),
    loadavg: loadavg(),
  };
}

// ---------------------------------------------------------------------------------------------
// cleanup on signals

const cleanups = new Set<() => Promise<void>>();

/**
 * Registers an idempotent cleanup that {@link runCleanups} runs (the signal handler of
 * `bench/main.ts`); the returned function unregisters it.
 */
export function addCleanup(fn: () => Promise<void>): () => void {
  cleanups.add(fn);
  return () => cleanups.delete(fn);
}

/** Runs (and forgets) every registered cleanup, newest first; errors are logged. */
export async function runCleanups(): Promise<void> {
  for (const fn of [...cleanups].reverse()) {
    cleanups.delete(fn);
    try {
      await fn();
    } catch (err) {
      log(`cleanup failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
}
