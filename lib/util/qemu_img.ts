/**
 * Running `qemu-img`: its failures as one-line errors, its JSON output, and the one query two
 * layers need, the allocation map (`qemu-img map`): image/ finds the holes of a file to skip
 * with it, and vm/ offers it beside the other qemu-img commands (`qemu.ts`).
 *
 * @module
 */

import { resolve } from "node:path";
import { type ProgramResult, runProgram } from "./command.ts";
import { fail, type SardeError } from "./errors.ts";

const QEMU_IMG = "qemu-img";

/** Runs qemu-img; returns whatever exit code it had (only a missing binary throws). */
export function runQemuImg(args: string[], signal?: AbortSignal): Promise<ProgramResult> {
  return runProgram(QEMU_IMG, args, "install qemu-utils", signal);
}

/** qemu-img's stderr as one line: every non-empty line, `qemu-img: ` prefixes dropped. */
function stderrLine(stderr: string): string {
  const lines = stderr.split("\n").map((l) => l.replace(/^qemu-img: /, "").trim()).filter(Boolean);
  let text = lines.join(" ");
  if (text.length > 400) text = "…" + text.slice(-400); // keep the tail: it holds the last line
  return text || "(no message)";
}

/**
 * The error for a failed run of qemu-img `what`: `external`, quoting qemu-img's message, or
 * `not-found` when it says "No such file".
 */
export function qemuImgError(what: string, r: ProgramResult): SardeError {
  const msg = stderrLine(r.stderr);
  const kind = /No such file or directory/.test(r.stderr) ? "not-found" : "external";
  return fail(kind, `qemu-img ${what} failed (exit ${r.code}): ${msg}`);
}

/** Runs qemu-img `what` and throws {@link qemuImgError} unless it exits 0. */
export async function runQemuImgOk(
  what: string,
  args: string[],
  signal?: AbortSignal,
): Promise<ProgramResult> {
  const r = await runQemuImg(args, signal);
  if (r.code !== 0) throw qemuImgError(what, r);
  return r;
}

/** Parses the `--output=json` of qemu-img `what`; anything else is an `external` error. */
export function parseQemuImgJson(what: string, text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    throw fail("external", `qemu-img ${what}: unexpected output (not JSON): ${text.slice(0, 200)}`);
  }
}

/** One extent of `qemu-img map --output=json`. */
export interface MapExtent {
  /** Guest offset in bytes. */
  start: number;
  /** Length in bytes. */
  length: number;
  /** 0 = this image, 1 = its backing file, … (for an unallocated extent: the chain length). */
  depth: number;
  /** Whether some image in the chain allocates the range (false: reads come from nowhere). */
  present: boolean;
  /** The range reads as zeros. */
  zero: boolean;
  /** The range holds data (false for holes and zero clusters). */
  data: boolean;
  /** Host offset in the file at `depth`, when qemu-img reports it. */
  offset?: number;
}

/** Options for {@link qemuImgMap}. */
export interface MapOptions {
  /** Image format (`-f`); without it qemu-img probes, which is unsafe for untrusted raw files. */
  format?: string;
  /** Kills qemu-img. */
  signal?: AbortSignal;
}

function num(v: unknown): number | undefined {
  return typeof v === "number" ? v : undefined;
}

/**
 * The allocation map of `file` through its backing chain (`qemu-img map --output=json -U`): which
 * ranges hold data, which read as zeros and which image of the chain (`depth`) provides them.
 * Adjacent extents with equal flags are already merged by qemu-img. `-U` (force-share) avoids
 * qemu's image lock, which a running VM holds. The path is made absolute: qemu would read a
 * relative `nbd:…` or `json:…` as a protocol, not a file name. Throws {@link qemuImgError}s.
 */
export async function qemuImgMap(file: string, opts: MapOptions = {}): Promise<MapExtent[]> {
  const args = ["map", "--output=json", "-U"];
  if (opts.format) args.push("-f", opts.format);
  args.push(resolve(file));
  const r = await runQemuImgOk("map", args, opts.signal);
  const parsed = parseQemuImgJson("map", r.stdout);
  if (!Array.isArray(parsed)) throw fail("external", "qemu-img map: expected a JSON array");
  return parsed.map((o: Record<string, unknown>) => {
    const e: MapExtent = {
      start: num(o["start"]) ?? 0,
      length: num(o["length"]) ?? 0,
      depth: num(o["depth"]) ?? 0,
      present: o["present"] !== false,
      zero: o["zero"] === true,
      data: o["data"] === true,
    };
    const off = num(o["offset"]);
    if (off !== undefined) e.offset = off;
    return e;
  });
}
