/**
 * One encode or decode job: its temp files and child processes, removed and killed on error and
 * on Ctrl-C, the tools it runs, and how what it throws becomes a one-line SardeError. Both disk
 * encodings (lib/image/zstd.ts, lib/image/gzip.ts) run as jobs. Private to lib/image/ except
 * for what lib/image/mod.ts exports.
 *
 * @module
 */

import { join, resolve } from "node:path";
import { onInterrupt } from "../util/cleanup.ts";
import { fail, SardeError } from "../util/errors.ts";
import { osReason } from "../util/fsutil.ts";

/** The error of an aborted job. */
export function interrupted(cause?: unknown): SardeError {
  return new SardeError("interrupted", "interrupted", { cause });
}

/** Throws {@link interrupted} if `signal` is aborted. */
export function checkAborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw interrupted(signal.reason);
}

/** Turns anything thrown during a job into a SardeError (aborts win: killed tools fail oddly). */
export function asSardeError(
  err: unknown,
  signal: AbortSignal | undefined,
  what: string,
): SardeError {
  if (signal?.aborted) {
    return err instanceof SardeError && err.kind === "interrupted" ? err : interrupted(err);
  }
  if (err instanceof SardeError) return err;
  const kind = err instanceof Deno.errors.NotFound ? "not-found" : "io";
  return new SardeError(kind, `${what}: ${osReason(err)}`, { cause: err });
}

/**
 * Temp files and child processes of one encode, removed/killed on error and on Ctrl-C (via
 * {@link onInterrupt}, since the process exits before any `finally` could run).
 */
export class Job {
  readonly temps = new Set<string>();
  readonly children = new Set<Deno.ChildProcess>();
  #unregister: () => void;

  readonly dir: string;

  constructor(dir: string) {
    // Absolute, so no tool mistakes a path for an option (`-x`) or a qemu protocol (`nbd:`).
    this.dir = resolve(dir);
    this.#unregister = onInterrupt(() => this.cleanup());
  }

  /** A fresh hidden temp path in the job's directory (0.4 used hidden `.XXXX` names too). */
  temp(kind: string): string {
    const rand = crypto.getRandomValues(new Uint32Array(2)).join("");
    const path = join(this.dir, `.sarde-${kind}-${Deno.pid}-${rand}`);
    this.temps.add(path);
    return path;
  }

  /** Kills the children, waits for them (they may still hold a temp file) and removes temps. */
  async cleanup(): Promise<void> {
    for (const c of this.children) {
      try {
        c.kill("SIGKILL");
      } catch { /* already exited */ }
    }
    await Promise.allSettled([...this.children].map((c) => c.status));
    for (const p of this.temps) await Deno.remove(p).catch(() => {});
    this.temps.clear();
  }

  /** Ends the job: removes the temps not handed to the caller, and drops the interrupt hook. */
  async finish(keep: Iterable<string>): Promise<void> {
    for (const p of keep) this.temps.delete(p);
    await this.cleanup();
    this.#unregister();
  }

  /** Drops the interrupt hook (after {@link cleanup} on the error path). */
  dispose(): void {
    this.#unregister();
  }
}

/** Spawns a tool with stderr captured; a missing binary is an `external` error with a hint. */
export function spawn(
  job: Job | undefined,
  cmd: string,
  args: string[],
  stdio: { stdin: "piped" | "null"; stdout: "piped" | "null" },
  signal?: AbortSignal,
): { child: Deno.ChildProcess; stderr: Promise<string> } {
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(cmd, { args, ...stdio, stderr: "piped", signal }).spawn();
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw fail("external", `${cmd} is not installed`, "run tools/setup.sh (Debian package)");
    }
    throw err;
  }
  job?.children.add(child);
  // Drain stderr at once: a tool blocked on a full stderr pipe would never exit.
  const stderr = new Response(child.stderr).text().catch(() => "");
  return { child, stderr };
}

/** Kills a child that may have exited already. */
export function kill(child: Deno.ChildProcess): void {
  try {
    child.kill("SIGKILL");
  } catch { /* already exited */ }
}

/** The first failure worth reporting: a broken pipe only says that the other side died. */
export function firstRealError(
  results: PromiseSettledResult<unknown>[],
): { error: unknown } | undefined {
  for (const r of results) {
    if (r.status === "rejected" && !(r.reason instanceof Deno.errors.BrokenPipe)) {
      return { error: r.reason };
    }
  }
  return undefined;
}

/** Waits for a tool and throws `kind` with its stderr if it failed. */
export async function expectSuccess(
  tool: { child: Deno.ChildProcess; stderr: Promise<string> },
  kind: "external" | "integrity",
  what: string,
  signal?: AbortSignal,
): Promise<void> {
  const status = await tool.child.status;
  const text = (await tool.stderr).trim();
  checkAborted(signal);
  if (!status.success) {
    const why = text ? text.split("\n").slice(-3).join("; ") : `exit code ${status.code}`;
    throw fail(kind, `${what}: ${why}`);
  }
}
