/**
 * sardinecake 0.4's gzip disk encoding. sarde's own zstd encoding is in lib/image/zstd.ts.
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
import { createDigester, type Digester } from "../oci/digest.ts";
import { fail, SardeError } from "../util/errors.ts";
import { osReason } from "../util/fsutil.ts";
import { feed, localHasher, newSlots } from "./feed.ts";
import { type GzipHeader, pythonGzipHeader, tryParseGzipHeader } from "./gzip_header.ts";
import { regularFileSize, segmentsOf, zeroRanges } from "./holes.ts";
import {
  asSardeError,
  checkAborted,
  expectSuccess,
  firstRealError,
  Job,
  kill,
  spawn,
} from "./job.ts";
import { drainInto, SparseWriter, writeAll } from "./sparse_writer.ts";

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

/** Result of {@link decodeGzip}. */
export interface DecodedGzip {
  /** Bytes written (the uncompressed size). */
  size: number;
  /** sha256 of the uncompressed data. */
  digest: string;
  /** Header of the first gzip member. */
  header: GzipHeader;
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
