/**
 * sardinecake 0.4's gzip disk encoding, and the helpers both encodings share (holes, temp files
 * and child processes of a job, error mapping). sarde's own zstd encoding is in lib/image/zstd.ts.
 *
 * **gzip.** Exactly the layout sardinecake 0.4 writes (spec §1.5) so that 0.4 can import it: one
 * gzip stream per file with Python's header (FNAME, MTIME, XFL=0, OS=255), deflate level 6, the
 * compressed stream cut into pieces of `chunkSize` bytes. The deflate data comes from `pigz` (all
 * cores; its output does not depend on its thread count) or, without pigz, `gzip`. Neither is
 * byte-identical to Python's zlib (nor is Deno's `node:zlib`), which does not matter for 0.4: it
 * only needs a valid stream and reads the name and mtime from the header.
 *
 * Holes: `qemu-img map -f raw` (SEEK_DATA/SEEK_HOLE) lists the regions that read as zeros; they
 * are fed from a zero buffer instead of being read. Decoding writes sparsely: a 4 MiB-aligned
 * block of zeros is skipped (left as a hole), as tart does since its "284% faster pulls" change.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { join, resolve } from "node:path";
import { onInterrupt } from "../util/cleanup.ts";
import { createDigester, type Digester, IO_CHUNK } from "../oci/digest.ts";
import { fail, SardeError } from "../util/errors.ts";
import { osReason } from "../util/fsutil.ts";
import { debug } from "../util/log.ts";
import { type MapExtent, qemuImgMap } from "../util/qemu_img.ts";

// ------------------------------------------------------------------------------------------------
// Public types

/** One piece of a gzip stream, as {@link encodeGzip} returns it. */
export interface GzipPiece {
  /** Temp file in `opts.outDir` holding the piece; the caller renames (adopts) it. */
  path: string;
  /** sha256 of the piece (`sha256:…`). */
  digest: string;
  /** Size of the piece in bytes. */
  size: number;
}

/** Options of {@link encodeGzip}. */
export interface GzipEncodeOptions {
  /**
   * The file name stored in the gzip header (FNAME): the basename the disk gets on import.
   * As Python's `gzip` does, a directory part is dropped and a trailing `.gz` is stripped, and an
   * empty result stores no name. A name that is not Latin-1 encodable (or contains NUL) is
   * refused with a `usage` error; 0.4 silently stored no name, and its import then wrote the disk
   * under a random name.
   */
  storedName: string;
  /** MTIME in the header: integer seconds since the epoch, 0 ≤ mtime < 2³². */
  mtime: number;
  /** Bytes per piece of the *compressed* stream; 0 means one piece for the whole file. */
  chunkSize: number;
  /** Directory for the temp piece files. */
  outDir: string;
  /** Aborting kills the compressor, removes the temp files and throws an `interrupted` error. */
  signal?: AbortSignal;
  /** Called with the number of uncompressed bytes processed since the previous call. */
  onProgress?: (uncompressedBytes: number) => void;
}

/** Result of {@link encodeGzip}. */
export interface EncodedGzip {
  /** Size of the uncompressed file. */
  fileSize: number;
  /** sha256 of the uncompressed file. */
  fileDigest: string;
  /** The pieces in stream order (at least one). */
  pieces: GzipPiece[];
}

/** The fields of a gzip member header (RFC 1952). */
export interface GzipHeader {
  /** FLG byte (FTEXT 1, FHCRC 2, FEXTRA 4, FNAME 8, FCOMMENT 16). */
  flags: number;
  /** MTIME, seconds since the epoch (0 = none). */
  mtime: number;
  /** XFL byte. */
  xfl: number;
  /** OS byte (255 = unknown, which Python writes). */
  os: number;
  /** FNAME decoded as Latin-1, if present. */
  name?: string;
  /** Bytes from the magic up to the first deflate byte. */
  headerLength: number;
}

/** Result of {@link decodeGzip}. */
export interface DecodedGzip {
  /** Bytes written (the uncompressed size). */
  size: number;
  /** sha256 of the uncompressed data. */
  digest: string;
  /** Header of the first gzip member. */
  header: GzipHeader;
}

// ------------------------------------------------------------------------------------------------
// Shared helpers

/** 4 MiB of zeros: the source of hole data and the reference of the zero test. Never written. */
const ZEROS = new Uint8Array(IO_CHUNK);
const ZEROS_BUF = Buffer.from(ZEROS.buffer);

/** Whether `b` is all zeros; `Buffer.equals` is a memcmp (≈50 GB/s, 10× a JS loop). */
function isZero(b: Uint8Array): boolean {
  for (let off = 0; off < b.length; off += IO_CHUNK) {
    const n = Math.min(IO_CHUNK, b.length - off);
    if (!Buffer.from(b.buffer, b.byteOffset + off, n).equals(ZEROS_BUF.subarray(0, n))) {
      return false;
    }
  }
  return true;
}

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
function spawn(
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

function kill(child: Deno.ChildProcess): void {
  try {
    child.kill("SIGKILL");
  } catch { /* already exited */ }
}

/** The first failure worth reporting: a broken pipe only says that the other side died. */
function firstRealError(results: PromiseSettledResult<unknown>[]): { error: unknown } | undefined {
  for (const r of results) {
    if (r.status === "rejected" && !(r.reason instanceof Deno.errors.BrokenPipe)) {
      return { error: r.reason };
    }
  }
  return undefined;
}

/** Waits for a tool and throws `kind` with its stderr if it failed. */
async function expectSuccess(
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

/** Reads exactly `buf.length` bytes at the current position (EOF early: the file shrank). */
async function readExact(file: Deno.FsFile, buf: Uint8Array, path: string): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const n = await file.read(buf.subarray(off));
    if (n === null) throw fail("io", `${path} shrank while being read`);
    off += n;
  }
}

/** The size of an opened file, which must be a regular file (a block device reports 0). */
export async function regularFileSize(fh: Deno.FsFile, path: string): Promise<number> {
  const st = await fh.stat();
  if (!st.isFile) throw fail("usage", `${path} is not a regular file`);
  return st.size;
}

async function writeAll(file: Deno.FsFile, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await file.write(data.subarray(off));
}

// ------------------------------------------------------------------------------------------------
// Holes

/** A byte range [start, end). */
export interface Range {
  start: number;
  end: number;
}

/** A part of a file, and whether it reads as zeros. */
export interface Segment extends Range {
  /** The range reads as zeros (a hole): feed zeros, do not read. */
  zero: boolean;
}

/**
 * The regions of `file` that read as zeros, from `qemu-img map` (SEEK_DATA/SEEK_HOLE; it does not
 * scan contents, so written zeros count as data). `-U` (force-share) avoids qemu's image lock,
 * which a running VM (export --force) holds. Without qemu-img, everything is data: slower, same
 * bytes.
 */
export async function zeroRanges(
  file: string,
  size: number,
  signal?: AbortSignal,
): Promise<Range[]> {
  if (size === 0) return [];
  let extents: MapExtent[];
  try {
    extents = await qemuImgMap(file, { format: "raw", signal });
  } catch (err) {
    checkAborted(signal);
    debug(`${(err as Error).message}; reading all of ${file}`);
    return [];
  }
  checkAborted(signal);
  const ranges: Range[] = [];
  for (const e of extents) {
    if (!e.zero) continue;
    const start = Math.max(0, e.start);
    const end = Math.min(size, e.start + e.length);
    if (end <= start) continue;
    const last = ranges.at(-1);
    if (last && last.end >= start) last.end = Math.max(last.end, end);
    else ranges.push({ start, end });
  }
  return ranges;
}

/** Splits [start, end) into data and zero segments (`zeros` is sorted and merged). */
export function segmentsOf(zeros: Range[], start: number, end: number): Segment[] {
  let lo = 0;
  let hi = zeros.length;
  while (lo < hi) { // first zero range ending after `start`
    const mid = (lo + hi) >> 1;
    if (zeros[mid].end <= start) lo = mid + 1;
    else hi = mid;
  }
  const segs: Segment[] = [];
  let pos = start;
  for (let i = lo; i < zeros.length && zeros[i].start < end; i++) {
    const zs = Math.max(zeros[i].start, start);
    const ze = Math.min(zeros[i].end, end);
    if (zs > pos) segs.push({ start: pos, end: zs, zero: false });
    segs.push({ start: zs, end: ze, zero: true });
    pos = ze;
  }
  if (pos < end) segs.push({ start: pos, end, zero: false });
  return segs;
}

// ------------------------------------------------------------------------------------------------
// Reading and hashing

/**
 * Read buffers shared by the reader, the pipe write and the file hasher. A piece's slot is
 * reused only after both its pipe write and its hashing are done; up to four pieces are in
 * flight, so reading, hashing and zstd overlap. SharedArrayBuffer-backed, so the hash worker
 * reads them without a copy.
 */
interface Slots {
  views: Uint8Array[];
  busy: Promise<unknown>[];
  next: number;
}

function newSlots(count = 4): Slots {
  const views = Array.from(
    { length: count },
    () => new Uint8Array(new SharedArrayBuffer(IO_CHUNK)),
  );
  return { views, busy: views.map(() => Promise.resolve()), next: 0 };
}

/** A sha256 fed in order, possibly on another thread. */
interface FileHasher {
  /** Hashes `view` (a view of `slots.views[slot]`); resolves once the bytes may be reused. */
  update(slot: number, view: Uint8Array): Promise<void>;
  /** Hashes `n` zero bytes. */
  zeros(n: number): void;
  /** The digest and byte count of everything fed. */
  digest(): Promise<{ digest: string; size: number }>;
  /** Stops the worker, if any. */
  close(): void;
}

/** A {@link FileHasher} on the calling thread. */
function localHasher(): FileHasher {
  const h = createDigester();
  return {
    update(_slot, view) {
      h.update(view);
      return Promise.resolve();
    },
    zeros(n) {
      for (let left = n; left > 0; left -= IO_CHUNK) {
        h.update(ZEROS.subarray(0, Math.min(IO_CHUNK, left)));
      }
    },
    digest: () => Promise.resolve({ size: h.size, digest: h.digest() }),
    close() {},
  };
}

/**
 * Streams the segments of `fh` to `sink` in ≤4 MiB pieces, updating `chunkHash` (here) and
 * `fileHash` (maybe on its worker). Zero segments come from {@link ZEROS} and cost no I/O.
 * Returns once every piece was written and hashed.
 */
async function feed(
  fh: Deno.FsFile | undefined,
  path: string,
  segments: Segment[],
  chunkHash: Digester | undefined,
  fileHash: FileHasher | undefined,
  sink: (data: Uint8Array) => Promise<void>,
  slots: Slots,
  signal?: AbortSignal,
  onProgress?: (n: number) => void,
): Promise<void> {
  try {
    for (const seg of segments) {
      if (seg.zero) {
        fileHash?.zeros(seg.end - seg.start);
      } else {
        await fh!.seek(seg.start, Deno.SeekMode.Start);
      }
      for (let pos = seg.start; pos < seg.end;) {
        checkAborted(signal);
        const n = Math.min(IO_CHUNK, seg.end - pos);
        const s = slots.next;
        slots.next = (s + 1) % slots.views.length;
        await slots.busy[s];
        let data: Uint8Array;
        let hashed: Promise<void> | undefined;
        if (seg.zero) {
          data = ZEROS.subarray(0, n);
          chunkHash?.update(data);
        } else {
          data = slots.views[s].subarray(0, n);
          await readExact(fh!, data, path);
          chunkHash?.update(data);
          hashed = fileHash?.update(s, data);
        }
        const busy = Promise.all([sink(data), hashed]);
        busy.catch(() => {}); // observed when the slot is next awaited, or below
        slots.busy[s] = busy;
        pos += n;
        onProgress?.(n);
      }
    }
    await Promise.all(slots.busy);
  } finally {
    // Slots carry no failure into the next chunk (errors surfaced above or are moot).
    await Promise.allSettled(slots.busy);
    slots.busy = slots.busy.map(() => Promise.resolve());
  }
}

// ------------------------------------------------------------------------------------------------
// Sparse output

/**
 * Writes a stream at a file offset in 4 MiB blocks aligned to the *file* (not the stream), skips
 * all-zero blocks (the target range must already read as zeros: a fresh or truncated file), and
 * hashes everything. Two block buffers alternate so one write is in flight while the next block
 * fills.
 */
class SparseWriter {
  readonly #file: Deno.FsFile;
  readonly #bufs = [new Uint8Array(IO_CHUNK), new Uint8Array(IO_CHUNK)];
  #cur = 0;
  #fill = 0;
  #pos: number;
  #limit: number;
  #pending: Promise<void> = Promise.resolve();
  readonly #hash = createDigester();
  /** End of the last range written (for rollback); -1 if nothing was written. */
  writtenEnd = -1;
  /** Start of the first range written. */
  writtenStart = -1;
  /** Bytes actually written (zero blocks left as holes are not counted). */
  allocated = 0;

  constructor(file: Deno.FsFile, offset: number) {
    this.#file = file;
    this.#pos = offset;
    this.#limit = IO_CHUNK - (offset % IO_CHUNK);
  }

  /** Bytes pushed so far. */
  get size(): number {
    return this.#hash.size + this.#fill;
  }

  async push(data: Uint8Array): Promise<void> {
    let off = 0;
    while (off < data.length) {
      const n = Math.min(data.length - off, this.#limit - this.#fill);
      this.#bufs[this.#cur].set(data.subarray(off, off + n), this.#fill);
      this.#fill += n;
      off += n;
      if (this.#fill === this.#limit) await this.#flush();
    }
  }

  async #flush(): Promise<void> {
    const block = this.#bufs[this.#cur].subarray(0, this.#fill);
    const pos = this.#pos;
    this.#hash.update(block);
    this.#pos += block.length;
    this.#fill = 0;
    this.#limit = IO_CHUNK;
    if (block.length === 0 || isZero(block)) return; // leave a hole; the buffer stays ours
    await this.#pending; // the other buffer's write is done, so it can take the next block
    if (this.writtenStart < 0) this.writtenStart = pos;
    this.writtenEnd = pos + block.length;
    this.allocated += block.length;
    this.#pending = (async () => {
      await this.#file.seek(pos, Deno.SeekMode.Start);
      await writeAll(this.#file, block);
    })();
    this.#pending.catch(() => {});
    this.#cur ^= 1;
  }

  /** Flushes and waits for the last write; returns the size and sha256 of all pushed bytes. */
  async end(): Promise<{ size: number; digest: string }> {
    await this.#flush();
    await this.#pending;
    return { size: this.#hash.size, digest: this.#hash.digest() };
  }

  /** Waits for a write in flight, ignoring its outcome (before rollback). */
  async settle(): Promise<void> {
    await this.#pending.catch(() => {});
  }
}

/**
 * Reads a child's stdout into `writer`, failing once more than `limit` bytes were written to
 * disk (zero blocks left as holes do not count: a sparse disk may be larger than the space).
 */
async function drainInto(
  stdout: ReadableStream<Uint8Array>,
  writer: SparseWriter,
  limit: number,
  what: string,
): Promise<void> {
  const reader = stdout.getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      await writer.push(value);
      if (writer.allocated > limit) {
        throw fail(
          "io",
          `${what}: decompresses to more than the ${limit} bytes of free space`,
          "free some space, or import into another --vmdir",
        );
      }
    }
  } finally {
    await reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}

// ------------------------------------------------------------------------------------------------
// gzip

const FHCRC = 2, FEXTRA = 4, FNAME = 8, FCOMMENT = 16;

/** The FNAME bytes Python's `gzip` would store for `name` (see {@link GzipEncodeOptions}). */
function storedNameBytes(name: string): Uint8Array {
  const base = name.slice(name.lastIndexOf("/") + 1); // os.path.basename
  const bytes: number[] = [];
  for (const ch of base) {
    const cp = ch.codePointAt(0)!;
    if (cp > 0xff) {
      throw fail(
        "usage",
        `disk name '${name}' cannot be stored in a gzip header (only Latin-1 characters can)`,
        "rename the disk file, or use the zstd format",
      );
    }
    if (cp === 0) throw fail("usage", `disk name '${JSON.stringify(name)}' contains a NUL byte`);
    bytes.push(cp);
  }
  // Python strips '.gz' after encoding, case-sensitively.
  const n = bytes.length;
  if (n >= 3 && bytes[n - 3] === 0x2e && bytes[n - 2] === 0x67 && bytes[n - 1] === 0x7a) {
    bytes.length = n - 3;
  }
  return Uint8Array.from(bytes);
}

/** The header Python 3's `gzip.GzipFile(filename, "wb", 6, fileobj, mtime)` writes. */
function pythonGzipHeader(storedName: string, mtime: number): Uint8Array {
  if (!Number.isInteger(mtime) || mtime < 0 || mtime > 0xffffffff) {
    throw fail("usage", `gzip mtime ${mtime} out of range (0 … 2^32-1 seconds)`);
  }
  const name = storedNameBytes(storedName);
  const h = new Uint8Array(10 + (name.length ? name.length + 1 : 0));
  h.set([0x1f, 0x8b, 8, name.length ? FNAME : 0]);
  new DataView(h.buffer).setUint32(4, mtime, true);
  h[8] = 0; // XFL: Python writes 2 only for level 9 and 4 for level 1
  h[9] = 0xff; // OS: Python writes 255 ("unknown")
  h.set(name, 10); // followed by the NUL already in place
  return h;
}

let crcTable: Uint32Array | undefined;

function crc32(bytes: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (const b of bytes) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** Parses a header; `undefined` if `bytes` ends before the header does. */
function tryParseGzipHeader(bytes: Uint8Array): GzipHeader | undefined {
  if (bytes.length >= 1 && bytes[0] !== 0x1f || bytes.length >= 2 && bytes[1] !== 0x8b) {
    throw fail("integrity", "not a gzip stream (bad magic)");
  }
  if (bytes.length >= 3 && bytes[2] !== 8) {
    throw fail("integrity", `unsupported gzip compression method ${bytes[2]}`);
  }
  if (bytes.length >= 4 && bytes[3] & 0xe0) {
    throw fail("integrity", `gzip header has reserved flag bits set (0x${bytes[3].toString(16)})`);
  }
  if (bytes.length < 10) return undefined;
  const flags = bytes[3];
  const mtime = new DataView(bytes.buffer, bytes.byteOffset, bytes.length).getUint32(4, true);
  let pos = 10;
  if (flags & FEXTRA) {
    if (bytes.length < pos + 2) return undefined;
    pos += 2 + (bytes[pos] | bytes[pos + 1] << 8);
    if (bytes.length < pos) return undefined;
  }
  let name: string | undefined;
  for (const flag of [FNAME, FCOMMENT]) {
    if (!(flags & flag)) continue;
    const end = bytes.indexOf(0, pos);
    if (end < 0) return undefined;
    if (flag === FNAME) name = String.fromCharCode(...bytes.subarray(pos, end)); // Latin-1
    pos = end + 1;
  }
  if (flags & FHCRC) {
    if (bytes.length < pos + 2) return undefined;
    const want = bytes[pos] | bytes[pos + 1] << 8;
    if ((crc32(bytes.subarray(0, pos)) & 0xffff) !== want) {
      throw fail("integrity", "gzip header CRC mismatch");
    }
    pos += 2;
  }
  return {
    flags,
    mtime,
    xfl: bytes[8],
    os: bytes[9],
    ...(name !== undefined ? { name } : {}),
    headerLength: pos,
  };
}

/**
 * Parses a gzip member header (RFC 1952) at the start of `bytes`, including FEXTRA, FNAME,
 * FCOMMENT and FHCRC (whose CRC is checked). Throws an `integrity` error on a malformed header
 * or if `bytes` ends inside it.
 */
export function parseGzipHeader(bytes: Uint8Array): GzipHeader {
  const h = tryParseGzipHeader(bytes);
  if (!h) throw fail("integrity", "truncated gzip header");
  return h;
}

/**
 * Spawns `pigz` (multithreaded) or, if it is not installed, `gzip`, with the same arguments.
 * Trying the spawn is cheaper than probing and needs no cached state.
 */
function spawnGzipTool(
  job: Job | undefined,
  args: string[],
  signal?: AbortSignal,
): { tool: { child: Deno.ChildProcess; stderr: Promise<string> }; name: string } {
  try {
    return {
      tool: spawn(job, "pigz", args, { stdin: "piped", stdout: "piped" }, signal),
      name: "pigz",
    };
  } catch (err) {
    if (!(err instanceof SardeError && err.kind === "external")) throw err;
  }
  return {
    tool: spawn(job, "gzip", args, { stdin: "piped", stdout: "piped" }, signal),
    name: "gzip",
  };
}

/** Writes a byte stream as consecutive pieces of `chunkSize` bytes (0 = unlimited). */
class PieceSink {
  readonly pieces: GzipPiece[] = [];
  #file?: Deno.FsFile;
  #hash?: Digester;
  #path = "";

  constructor(private readonly job: Job, private readonly chunkSize: number) {}

  async write(data: Uint8Array): Promise<void> {
    try {
      let off = 0;
      while (off < data.length) {
        if (!this.#file) {
          this.#path = this.job.temp("gz");
          this.#file = await Deno.open(this.#path, { write: true, createNew: true });
          this.#hash = createDigester();
        }
        const room = this.chunkSize > 0 ? this.chunkSize - this.#hash!.size : Infinity;
        const part = data.subarray(off, off + Math.min(room, data.length - off));
        await writeAll(this.#file, part);
        this.#hash!.update(part);
        off += part.length;
        if (this.#hash!.size === this.chunkSize) this.#close();
      }
    } catch (err) {
      // The piece written is named, not the file compressed (a full store, not a bad disk).
      throw fail("io", `cannot write ${this.#path}: ${osReason(err)}`);
    }
  }

  #close(): void {
    if (!this.#file) return;
    this.#file.close();
    this.pieces.push({ path: this.#path, digest: this.#hash!.digest(), size: this.#hash!.size });
    this.#file = undefined;
  }

  /** Closes the last piece and returns all of them. */
  end(): GzipPiece[] {
    this.#close();
    return this.pieces;
  }

  /** Closes an open piece file after an error (the job removes it). */
  abort(): void {
    try {
      this.#file?.close();
    } catch { /* closed */ }
    this.#file = undefined;
  }
}

/**
 * Compresses `file` into one gzip stream laid out as sardinecake 0.4 writes it (Python's header
 * with FNAME and MTIME, deflate level 6), cut into pieces of `chunkSize` compressed bytes.
 *
 * The deflate data comes from `pigz -6 -n -c` (all cores) or else `gzip -6 -n -c`, fed by Deno
 * (which hashes the file on the way). Both write a bare 10-byte header with `-n` (no name, mtime
 * 0); we replace it with Python's. The CRC32 and ISIZE of the trailer cover only the
 * uncompressed data, so they stay valid. pigz's bytes do not depend on its thread count, but
 * pigz and gzip give different (equally valid) bytes, so blob digests depend on which is
 * installed (tools/setup.sh installs pigz). On any error or abort, every temp file is removed.
 */
export async function encodeGzip(file: string, opts: GzipEncodeOptions): Promise<EncodedGzip> {
  const { chunkSize, outDir, signal, onProgress } = opts;
  const header = pythonGzipHeader(opts.storedName, opts.mtime);
  if (!Number.isSafeInteger(chunkSize) || chunkSize < 0) {
    throw fail("usage", `invalid gzip chunk size ${chunkSize}: bytes, or 0 for one piece`);
  }
  checkAborted(signal);
  const job = new Job(outDir);
  const sink = new PieceSink(job, chunkSize);
  try {
    using fh = await Deno.open(file, { read: true });
    const fileSize = await regularFileSize(fh, file);
    const zeros = await zeroRanges(file, fileSize, signal);
    // pigz keeps both cores busy, so hashing here costs no more than on a worker.
    const fileHash = localHasher();
    const { tool, name } = spawnGzipTool(job, ["-6", "-n", "-c"], signal);
    const what = `${name} (${file})`;

    const produce = async () => {
      const writer = tool.child.stdin.getWriter();
      try {
        const segs = segmentsOf(zeros, 0, fileSize);
        const sink = (d: Uint8Array) => writer.write(d);
        await feed(fh, file, segs, undefined, fileHash, sink, newSlots(), signal, onProgress);
        await writer.close();
      } catch (err) {
        await writer.abort().catch(() => {});
        kill(tool.child);
        throw err;
      }
    };
    const consume = async () => {
      try {
        await copyStripped();
      } catch (err) {
        kill(tool.child); // or the producer blocks forever on a full pipe
        throw err;
      }
    };
    const copyStripped = async () => {
      await sink.write(header);
      const theirs = new Uint8Array(10);
      let skipped = 0;
      for await (const chunk of tool.child.stdout) {
        let data = chunk;
        if (skipped < 10) {
          const n = Math.min(10 - skipped, data.length);
          theirs.set(data.subarray(0, n), skipped);
          skipped += n;
          data = data.subarray(n);
          if (
            skipped === 10 &&
            (theirs[0] !== 0x1f || theirs[1] !== 0x8b || theirs[2] !== 8 || theirs[3] !== 0)
          ) {
            // FLG=0 guarantees a bare 10-byte header, which is what we cut off.
            throw fail(
              "external",
              `${what}: unexpected gzip header ${Buffer.from(theirs).toString("hex")}`,
            );
          }
        }
        if (data.length) await sink.write(data);
      }
    };
    const results = await Promise.allSettled([produce(), consume()]);
    const real = firstRealError(results);
    if (real) throw real.error;
    // A broken pipe alone: the tool died, and its own message says why.
    await expectSuccess(tool, "external", what, signal);
    for (const r of results) if (r.status === "rejected") throw r.reason;
    const whole = await fileHash.digest();
    if (whole.size !== fileSize) throw fail("io", `${file} changed size while being read`);
    const pieces = sink.end();
    await job.finish(pieces.map((p) => p.path));
    return { fileSize, fileDigest: whole.digest, pieces };
  } catch (err) {
    sink.abort();
    await job.cleanup();
    job.dispose();
    throw asSardeError(err, signal, `cannot compress ${file}`);
  }
}

/**
 * Decompresses a gzip stream stored as consecutive pieces (in order) into `out`, which is
 * created or truncated. Multi-member streams are fine (as with Python's reader). All-zero 4 MiB
 * blocks are left as holes. The header of the first member is returned (0.4's import takes the
 * file name from FNAME and sets the file's mtime from MTIME; that is up to the caller).
 *
 * `pigz -dc` does the work where installed (≈1.7× `gzip -dc`), else `gzip -dc`; both check the
 * CRC32 and length of every member. pigz ignores junk after the last complete member where
 * Python would fail; the data returned is still verified, and `expectedDigest` (the diff_id)
 * covers the rest.
 *
 * Throws an `integrity` error on a malformed or truncated stream or a digest mismatch, and then
 * removes `out`.
 */
export async function decodeGzip(
  pieces: string[],
  out: string,
  opts: {
    signal?: AbortSignal;
    expectedDigest?: string;
    /**
     * Most bytes the output may take on disk (a gzip image says nothing about its size, so an
     * import passes the free space of its file system: a gzip bomb fails instead of filling it).
     */
    maxBytes?: number;
  } = {},
): Promise<DecodedGzip> {
  const { signal, expectedDigest } = opts;
  if (pieces.length === 0) throw fail("usage", "no gzip pieces to decompress");
  checkAborted(signal);
  let file: Deno.FsFile | undefined;
  let tool: { child: Deno.ChildProcess; stderr: Promise<string> } | undefined;
  let writer: SparseWriter | undefined;
  try {
    file = await Deno.open(out, { write: true, create: true, truncate: true });
    const spawned = spawnGzipTool(undefined, ["-d", "-c"], signal);
    tool = spawned.tool;
    const what = `${spawned.name} -d (${pieces[0]}${
      pieces.length > 1 ? ` +${pieces.length - 1}` : ""
    })`;
    writer = new SparseWriter(file, 0);
    let header: GzipHeader | undefined;

    const produce = async () => {
      const w = tool!.child.stdin.getWriter();
      try {
        // The header is parsed from the first bytes fed; it may span pieces if they are tiny.
        let head = new Uint8Array(0);
        const buf = new Uint8Array(1 << 20);
        for (const piece of pieces) {
          using f = await Deno.open(piece, { read: true });
          for (;;) {
            checkAborted(signal);
            const n = await f.read(buf);
            if (n === null) break;
            const data = buf.subarray(0, n);
            if (!header) {
              const joined = new Uint8Array(head.length + n);
              joined.set(head);
              joined.set(data, head.length);
              head = joined;
              try {
                header = tryParseGzipHeader(head);
              } catch (err) {
                throw fail("integrity", `${pieces[0]}: ${(err as Error).message}`);
              }
              if (!header && head.length > 16 << 20) {
                throw fail("integrity", "gzip header longer than 16 MiB");
              }
            }
            await w.write(data.slice()); // copy: buf is reused before the pipe write may finish
          }
        }
        if (!header) throw fail("integrity", `${pieces[0]}: truncated gzip header`);
        await w.close();
      } catch (err) {
        await w.abort().catch(() => {});
        kill(tool!.child);
        throw err;
      }
    };
    const consume = async () => {
      try {
        await drainInto(
          tool!.child.stdout,
          writer!,
          opts.maxBytes ?? Number.MAX_SAFE_INTEGER,
          what,
        );
      } catch (err) {
        kill(tool!.child); // or the producer blocks forever on a full pipe
        throw err;
      }
    };
    const results = await Promise.allSettled([produce(), consume()]);
    // A malformed header or a missing piece is the clearest message; a broken pipe alone means
    // the tool died, and its own message (corrupt data, CRC) says why.
    const real = firstRealError(results);
    if (real) throw real.error;
    await expectSuccess(tool, "integrity", `corrupt gzip stream: ${what}`, signal);
    for (const r of results) if (r.status === "rejected") throw r.reason;
    const { size, digest } = await writer.end();
    await file.truncate(size); // trailing zeros were skipped: extend to the full size
    if (expectedDigest && digest !== expectedDigest) {
      throw fail("integrity", `${out}: content is ${digest}, expected ${expectedDigest}`);
    }
    file.close();
    file = undefined;
    return { size, digest, header: header! };
  } catch (err) {
    if (tool) {
      kill(tool.child);
      await tool.child.status.catch(() => {});
      await tool.stderr;
    }
    await writer?.settle();
    try {
      file?.close();
    } catch { /* closed */ }
    await Deno.remove(out).catch(() => {});
    throw asSardeError(err, signal, `cannot decompress into ${out}`);
  }
}
