/**
 * Thin wrappers around `qemu-img` (QEMU 7.2 on Debian 12): backing chains, overlays, rebase,
 * check, compare and map.
 *
 * Every function runs `qemu-img` through `Deno.Command` with an argv array (no shell), `LC_ALL=C`
 * and stdin closed; failures become one-line {@link SardeError}s of kind `"external"` that quote
 * qemu-img's own message (the last stderr line included), or `"not-found"` when an image file does
 * not exist. Nothing secret is ever passed on the command line.
 *
 * File arguments are always handed to qemu-img as absolute paths: qemu treats a relative name with
 * a colon before the first slash (`sha256:abc.qcow2`) as `PROTOCOL:…` and fails with
 * "Unknown protocol". Backing references written into a qcow2 header are checked for the same
 * trap (see {@link looksLikeProtocol}).
 *
 * Private to `lib/vm/`: other folders use what `lib/vm/mod.ts` offers.
 *
 * @module
 */

import { dirname, isAbsolute, normalize, resolve } from "node:path";
import { fail } from "../util/errors.ts";
import {
  type MapExtent,
  parseQemuImgJson,
  qemuImgError,
  qemuImgMap,
  runQemuImg,
  runQemuImgOk,
} from "../util/qemu_img.ts";

export type { MapExtent };

/** One image as reported by `qemu-img info` (one element of a backing chain). */
export interface ImageInfo {
  /** Absolute, lexically normalised path (`..` and `.` removed; symlinks are NOT followed). */
  filename: string;
  /** The same file with every symlink resolved (`realpath`); use it to spot one file reached twice. */
  realFilename: string;
  /** Image format: `qcow2`, `raw` (also for ISO images), `vmdk`, … */
  format: string;
  /** Guest-visible size in bytes. */
  virtualSize: number;
  /** Bytes allocated on the host filesystem (absent when qemu-img cannot tell). */
  actualSize?: number;
  /** qcow2 cluster size in bytes (absent for raw). */
  clusterSize?: number;
  /** Whether the qcow2 dirty flag is set (image not closed cleanly). */
  dirty: boolean;
  /**
   * The backing reference exactly as written in the image header (may be relative, e.g.
   * `base.qcow2` or `../b/base.qcow2`, or absolute). Absent when the image has no backing file.
   */
  backingFilename?: string;
  /**
   * The backing file as qemu resolves it (a relative reference is relative to the directory of
   * this image, never to the cwd), made absolute and lexically normalised.
   */
  fullBackingFilename?: string;
  /** The backing format recorded in the header (`backing_fmt`), if any. */
  backingFormat?: string;
  /** A qcow2 external data file (`data_file`), if the header names one. */
  dataFile?: string;
}

/** One element of a backing chain; see {@link backingChain}. */
export type ChainElement = ImageInfo;

/** Result of {@link check}. */
export interface CheckResult {
  /** False when the format has no consistency checks (raw, ISO); then all counters are 0. */
  supported: boolean;
  /** No corruptions and no check errors (leaked clusters only waste space and do not count). */
  ok: boolean;
  /** Corrupted metadata entries found. */
  corruptions: number;
  /** Leaked (allocated but unreferenced) clusters found. */
  leaks: number;
  /** Errors that kept the check from completing parts of the image. */
  checkErrors: number;
  /** The parsed JSON report (empty when unsupported). */
  report: Record<string, unknown>;
}

/** A parsed `qemu-img --version`. */
export interface QemuImgVersion {
  major: number;
  minor: number;
  micro: number;
  /** The whole first line, e.g. `qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`. */
  text: string;
}

/** Options shared by read-only queries. */
export interface FormatOptions {
  /**
   * Image format to pass as `-f`. When absent qemu-img probes the format, which is unsafe for
   * untrusted raw images (a raw disk whose first bytes look like a qcow2 header is read as qcow2).
   */
  format?: string;
}

/** Absolute path of `file` (relative to the cwd), so qemu never parses it as `protocol:…`. */
function abs(file: string): string {
  return resolve(file);
}

async function mustExist(file: string, what = "disk image"): Promise<void> {
  try {
    await Deno.stat(file);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw fail("not-found", `${what} ${file} does not exist`);
    }
    throw fail("io", `cannot access ${file}: ${(err as Error).message}`);
  }
}

/**
 * Whether qemu would read `name` as `PROTOCOL:rest` rather than as a file name: it has a colon
 * before its first slash (`sha256:abc.qcow2`, `nbd:…`, `json:{…}`). Such a name can still be used as
 * a relative backing reference when written as `./sha256:abc.qcow2`.
 */
export function looksLikeProtocol(name: string): boolean {
  const colon = name.indexOf(":");
  if (colon < 0) return false;
  const slash = name.indexOf("/");
  return slash < 0 || colon < slash;
}

function num(v: unknown): number | undefined {
  return typeof v === "number" ? v : undefined;
}
function str(v: unknown): string | undefined {
  return typeof v === "string" ? v : undefined;
}

/** Normalises a path qemu reports; non-file (protocol) names are returned unchanged. */
function normalizeReported(p: string, cwd: string): string {
  if (isAbsolute(p)) return normalize(p);
  if (looksLikeProtocol(p)) return p;
  return resolve(cwd, p);
}

async function realPathOr(p: string): Promise<string> {
  try {
    return await Deno.realPath(p);
  } catch {
    return p;
  }
}

async function toImageInfo(o: Record<string, unknown>): Promise<ImageInfo> {
  const reported = str(o["filename"]) ?? "";
  const filename = normalizeReported(reported, Deno.cwd());
  const backingFilename = str(o["backing-filename"]);
  const full = str(o["full-backing-filename"]);
  const info: ImageInfo = {
    filename,
    // the kernel resolves `..` after symlinks, so resolve the path exactly as qemu reported it
    realFilename: await realPathOr(isAbsolute(reported) ? reported : filename),
    format: str(o["format"]) ?? "unknown",
    virtualSize: num(o["virtual-size"]) ?? 0,
    dirty: o["dirty-flag"] === true,
  };
  const actual = num(o["actual-size"]);
  if (actual !== undefined) info.actualSize = actual;
  const cluster = num(o["cluster-size"]);
  if (cluster !== undefined) info.clusterSize = cluster;
  const specific = (o["format-specific"] as { data?: Record<string, unknown> } | undefined)?.data;
  const dataFile = str(specific?.["data-file"]);
  if (dataFile !== undefined) info.dataFile = dataFile;
  if (backingFilename !== undefined) {
    info.backingFilename = backingFilename;
    info.fullBackingFilename = full !== undefined
      ? normalizeReported(full, dirname(filename))
      : normalizeReported(backingFilename, dirname(filename));
    const bf = str(o["backing-filename-format"]);
    if (bf !== undefined) info.backingFormat = bf;
  }
  return info;
}

/**
 * The backing chain of `file`, **top first**: element 0 is `file` itself, element 1 its backing
 * file, …, the last element is the base (which has no `backingFilename`). Reverse it for the
 * base-first order of an export. A raw image, an ISO or a qcow2 without backing file gives a
 * single element.
 *
 * Runs `qemu-img info --backing-chain --output=json -U` (`-U`: works while a VM has the image open).
 * Throws `not-found` when `file` or a backing file is missing.
 */
export async function backingChain(
  file: string,
  opts: FormatOptions = {},
): Promise<ChainElement[]> {
  const path = abs(file);
  await mustExist(path);
  const args = ["info", "--backing-chain", "--output=json", "-U"];
  if (opts.format) args.push("-f", opts.format);
  args.push(path);
  const r = await runQemuImgOk("info", args);
  const parsed = parseQemuImgJson("info", r.stdout);
  const list = Array.isArray(parsed) ? parsed : [parsed];
  const chain: ChainElement[] = [];
  for (const o of list) chain.push(await toImageInfo(o as Record<string, unknown>));
  return chain;
}

/** `qemu-img info --output=json -U` of one image (its backing file is not opened). */
export async function info(file: string, opts: FormatOptions = {}): Promise<ImageInfo> {
  const path = abs(file);
  await mustExist(path);
  const args = ["info", "--output=json", "-U"];
  if (opts.format) args.push("-f", opts.format);
  args.push(path);
  const r = await runQemuImgOk("info", args);
  return await toImageInfo(parseQemuImgJson("info", r.stdout) as Record<string, unknown>);
}

/**
 * Rewrites the backing reference in `file`'s header without touching any data
 * (`qemu-img rebase -u -b BACKING -F FORMAT FILE`). `backing` is written verbatim, so a relative
 * name is later resolved against `file`'s directory. The new backing file is **not** opened or
 * checked (it may not exist yet); the caller must make sure it has the same content as the old
 * one. Throws `usage` for an empty reference or one qemu would parse as a protocol
 * ({@link looksLikeProtocol}; write `./name` instead).
 */
export async function rebaseUnsafe(
  file: string,
  backing: string,
  backingFormat: string,
): Promise<void> {
  if (!backing) throw fail("usage", "rebaseUnsafe: empty backing reference");
  if (!backingFormat) throw fail("usage", "rebaseUnsafe: a backing format is required");
  if (looksLikeProtocol(backing)) {
    throw fail(
      "usage",
      `backing reference '${backing}' would be read by qemu as a protocol prefix`,
      `write it as './${backing}'`,
    );
  }
  const path = abs(file);
  await mustExist(path);
  await runQemuImgOk("rebase", ["rebase", "-u", "-b", backing, "-F", backingFormat, path]);
}

/**
 * Creates a new qcow2 overlay `path` on top of `base`
 * (`qemu-img create -f qcow2 -F BASEFORMAT -b BASE PATH`). The creation is exclusive: the name is
 * first reserved with `O_EXCL`, so an existing file is never overwritten (→ `usage` error) and two
 * concurrent callers cannot get the same file. `base` is written into the header verbatim; a
 * relative `base` is resolved by qemu against the directory of `path` (not the cwd). The virtual
 * size is the base's. On failure the reserved file is removed again.
 */
export async function createOverlay(path: string, base: string, baseFormat: string): Promise<void> {
  if (!base) throw fail("usage", "createOverlay: empty base image");
  if (!baseFormat) throw fail("usage", "createOverlay: a base format is required");
  if (looksLikeProtocol(base)) {
    throw fail(
      "usage",
      `base image '${base}' would be read by qemu as a protocol prefix`,
      `use an absolute path or './${base}'`,
    );
  }
  const target = abs(path);
  await mustExist(isAbsolute(base) ? base : resolve(dirname(target), base), "base image");
  try {
    const f = await Deno.open(target, { createNew: true, write: true, mode: 0o644 });
    f.close();
  } catch (err) {
    if (err instanceof Deno.errors.AlreadyExists) {
      throw fail("usage", `cannot create overlay ${target}: file exists`);
    }
    throw fail("io", `cannot create overlay ${target}: ${(err as Error).message}`);
  }
  try {
    const args = ["create", "-q", "-f", "qcow2", "-F", baseFormat, "-b", base, target];
    await runQemuImgOk("create", args);
  } catch (err) {
    await Deno.remove(target).catch(() => {});
    throw err;
  }
}

/**
 * Checks an image's consistency (`qemu-img check --output=json`). Does not throw for a damaged
 * image: look at {@link CheckResult.ok}. Formats without checks (raw) give `supported: false`.
 * `forceShare` adds `-U` (check an image a running VM has open; results may then be transient).
 */
export async function check(
  file: string,
  opts: FormatOptions & { forceShare?: boolean } = {},
): Promise<CheckResult> {
  const path = abs(file);
  await mustExist(path);
  const args = ["check", "--output=json"];
  if (opts.forceShare) args.push("-U");
  if (opts.format) args.push("-f", opts.format);
  args.push(path);
  const r = await runQemuImg(args);
  // exit codes: 0 clean, 1 check could not complete, 2 corruptions, 3 leaks only, 63 unsupported
  if (r.code === 63) {
    return { supported: false, ok: true, corruptions: 0, leaks: 0, checkErrors: 0, report: {} };
  }
  if (![0, 2, 3].includes(r.code) || !r.stdout.trim()) throw qemuImgError("check", r);
  const report = parseQemuImgJson("check", r.stdout) as Record<string, unknown>;
  const corruptions = num(report["corruptions"]) ?? 0;
  const leaks = num(report["leaks"]) ?? 0;
  const checkErrors = num(report["check-errors"]) ?? 0;
  return {
    supported: true,
    ok: corruptions === 0 && checkErrors === 0,
    corruptions,
    leaks,
    checkErrors,
    report,
  };
}

/** Options for {@link compare}. */
export interface CompareOptions {
  /** Format of the first image (`-f`). */
  formatA?: string;
  /** Format of the second image (`-F`). */
  formatB?: string;
  /** `-s`: images of different sizes are different (default: the extra part must read as zeros). */
  strict?: boolean;
}

/**
 * Whether two images have the same guest-visible content (`qemu-img compare -U`), each read
 * through its whole backing chain. True for "Images are identical", false for a mismatch; a
 * missing file or an error throws.
 */
export async function compare(a: string, b: string, opts: CompareOptions = {}): Promise<boolean> {
  const pa = abs(a), pb = abs(b);
  await mustExist(pa);
  await mustExist(pb);
  const args = ["compare", "-q", "-U"];
  if (opts.formatA) args.push("-f", opts.formatA);
  if (opts.formatB) args.push("-F", opts.formatB);
  if (opts.strict) args.push("-s");
  args.push(pa, pb);
  const r = await runQemuImg(args);
  if (r.code === 0) return true;
  if (r.code === 1) return false;
  throw qemuImgError("compare", r);
}

/**
 * The allocation map of `file` through its backing chain (`qemu-img map --output=json -U`): which
 * ranges hold data, which read as zeros and which image of the chain (`depth`) provides them.
 * Adjacent extents with equal flags are already merged by qemu-img.
 */
export async function map(file: string, format?: string): Promise<MapExtent[]> {
  const path = abs(file);
  await mustExist(path);
  return await qemuImgMap(path, { format });
}

/** The installed qemu-img's version (`qemu-img --version`). */
export async function qemuImgVersion(): Promise<QemuImgVersion> {
  const r = await runQemuImgOk("--version", ["--version"]);
  const text = r.stdout.split("\n")[0].trim();
  const m = /version (\d+)\.(\d+)(?:\.(\d+))?/.exec(text);
  if (!m) throw fail("external", `qemu-img --version: cannot parse '${text}'`);
  return { major: +m[1], minor: +m[2], micro: +(m[3] ?? 0), text };
}
