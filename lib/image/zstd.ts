/**
 * sarde's disk encoding: a file cut into fixed-size *uncompressed* chunks, every chunk a blob of
 * independent zstd frames of {@link FRAME_SIZE} bytes followed by their table (lib/image/frames.ts).
 *
 * Fixed uncompressed boundaries keep the blob of an unchanged region identical across exports
 * (registry dedup), and independent frames let a pull fetch, decode and verify chunks in
 * parallel. The byte work (reading, sha256, libzstd) runs on worker threads
 * ({@link createCodecPool}); this module plans the chunks, handles holes and zero chunks, and
 * cleans up after errors and Ctrl-C.
 *
 * Holes: `qemu-img map -f raw` (SEEK_DATA/SEEK_HOLE) lists the regions that read as zeros; they
 * are not read. A chunk that is all zeros, be it a hole or written zeros, is not compressed
 * either: its blob is a copy of the frame of zeros made once per chunk length, so both give the
 * same blob. That blob is one frame without a table, as older sarde wrote every chunk: a reader
 * never fetches a chunk of zeros. On decoding, a chunk whose digest is that of zeros is not even read, and all-zero
 * 4 MiB blocks are left as holes.
 *
 * Running VMs (`export --force`): chunks and the whole-file digest are computed from separate
 * reads, so a disk written meanwhile can give a file digest that matches no chunk list. Such an
 * export is not a consistent image anyway; import verifies the chunks, which pin the content.
 *
 * @module
 */

import { type Range, regularFileSize, segmentsOf, zeroRanges } from "./holes.ts";
import { asSardeError, checkAborted, interrupted, Job } from "./job.ts";
import {
  CodecError,
  type CodecPool,
  createCodecPool,
  type DecodePiece,
  type EncodeResult,
  type WorkerFailure,
} from "./codec_worker.ts";
import { FRAME_SIZE, type FrameTableLocation, MAX_FRAME_SIZE } from "./frames.ts";
import { createDigester } from "../oci/digest.ts";
import { fail, SardeError } from "../util/errors.ts";

/** One compressed chunk of a file, as {@link encodeZstd} returns it. */
export interface ChunkBlob {
  /** Temp file in `opts.outDir` holding the compressed bytes; the caller renames (adopts) it. */
  path: string;
  /** sha256 of the compressed blob (`sha256:…`). */
  digest: string;
  /** Size of the compressed blob in bytes. */
  size: number;
  /** Start of the uncompressed range of the file this chunk holds. */
  offset: number;
  /** Length of that uncompressed range. */
  length: number;
  /** sha256 of the uncompressed range. */
  uncompressedDigest: string;
  /** Where the frame table is; absent for a blob of one frame (zero or empty chunks). */
  table?: FrameTableLocation;
}

/** Result of {@link encodeZstd}. */
export interface EncodedFile {
  /** Size of the uncompressed file. */
  fileSize: number;
  /** sha256 of the whole uncompressed file (the image config's diff_id). */
  fileDigest: string;
  /** The chunks in file order; an empty file still has one (empty) chunk. */
  chunks: ChunkBlob[];
}

/** Options of {@link encodeZstd}. */
export interface ZstdEncodeOptions {
  /** Uncompressed bytes per chunk (a positive integer). */
  chunkSize: number;
  /** zstd level 1…19; default 3 (sarde export uses DEFAULT_ZSTD_LEVEL of lib/util/defaults.ts). */
  level?: number;
  /**
   * Uncompressed bytes per frame (default {@link FRAME_SIZE}, at most {@link MAX_FRAME_SIZE});
   * 0 writes each chunk as one frame without a table, as sarde did before frames.
   */
  frameSize?: number;
  /** Directory for the temp blob files (the OCI `blobs/sha256`, so that a rename adopts them). */
  outDir: string;
  /**
   * Chunks compressed at once (one worker thread each; one more thread hashes the whole file).
   * Default: the number of CPUs. It does not change the output bytes.
   */
  concurrency?: number;
  /** Aborting stops the workers, removes the temp files, throws an `interrupted` error. */
  signal?: AbortSignal;
  /** Called with the number of uncompressed bytes processed since the previous call. */
  onProgress?: (uncompressedBytes: number) => void;
  /**
   * Called with each chunk as soon as its blob is complete (in completion order, before
   * {@link encodeZstd} returns), e.g. to upload it while the rest is still being compressed.
   */
  onChunk?: (chunk: ChunkBlob) => void;
}

/** Options of {@link decodeZstdChunk} and {@link decodeFrame}. */
export interface ZstdDecodeOptions {
  signal?: AbortSignal;
  /** Workers to decode on (shared by the chunks of an import); default: a new one-worker pool. */
  pool?: CodecPool;
}

/** Options of {@link decodeFrame}. */
export interface FrameDecodeOptions extends ZstdDecodeOptions {
  /**
   * `bytes` is the caller's whole array and it is done with it: moved to the worker instead of
   * copied, and freed there (it reads as empty afterwards).
   */
  handOver?: boolean;
}

/** Options of {@link decodeZstdChunk}. */
export interface ZstdChunkDecodeOptions extends ZstdDecodeOptions {
  /**
   * Verify and write the chunk piece by piece (a lazy file's units): see {@link DecodePiece}.
   * `uncompressedDigest` is then not checked (the pieces' digests are), and a failure leaves
   * the range as it was but for verified pieces.
   */
  pieces?: DecodePiece[];
}

/** The failure a worker reported, as the SardeError the rest of sarde expects. */
function fromWorker(err: unknown, signal: AbortSignal | undefined, what: string): SardeError {
  if (signal?.aborted) return interrupted(err);
  if (err instanceof CodecError) {
    const f: WorkerFailure = err.failure;
    return new SardeError(f.kind, f.error, { cause: err });
  }
  return asSardeError(err, signal, what);
}

/** `work`, or an `interrupted` error as soon as `signal` aborts (without waiting for `work`). */
async function unlessAborted<T>(work: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return await work;
  let onAbort = () => {};
  const abort = new Promise<never>((_, reject) => {
    onAbort = () => reject(interrupted(signal.reason));
    if (signal.aborted) onAbort();
    else signal.addEventListener("abort", onAbort, { once: true });
  });
  try {
    return await Promise.race([work, abort]);
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}

/**
 * Compresses `file` into independent zstd frames of `chunkSize` uncompressed bytes each, written
 * to temp files in `outDir` (see the module doc for holes and zero chunks).
 *
 * Memory stays at a few tens of MiB per worker whatever the chunk size. On any error or abort,
 * every temp file is removed.
 *
 * @returns the file's size and sha256 and the chunks in order; the caller owns (renames) the
 * chunk files.
 */
export async function encodeZstd(file: string, opts: ZstdEncodeOptions): Promise<EncodedFile> {
  const { chunkSize, outDir, signal, onProgress, onChunk } = opts;
  const level = opts.level ?? 3;
  const frameSize = opts.frameSize ?? FRAME_SIZE;
  const concurrency = opts.concurrency ?? navigator.hardwareConcurrency ?? 2;
  if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0) {
    throw fail("usage", `invalid zstd chunk size ${chunkSize}: a positive number of bytes`);
  }
  if (!Number.isSafeInteger(frameSize) || frameSize < 0 || frameSize > MAX_FRAME_SIZE) {
    throw fail("usage", `invalid zstd frame size ${frameSize}: 0…${MAX_FRAME_SIZE} bytes`);
  }
  if (!Number.isInteger(level) || level < 1 || level > 19) {
    throw fail("usage", `invalid zstd level ${level}: 1…19`);
  }
  if (!Number.isInteger(concurrency) || concurrency < 1) {
    throw fail("usage", `invalid concurrency ${concurrency}`);
  }
  checkAborted(signal);
  const job = new Job(outDir);
  const pool = createCodecPool(concurrency);
  const hasher = createCodecPool(1);
  const stop = () => {
    pool.close();
    hasher.close();
  };
  signal?.addEventListener("abort", stop, { once: true });
  const chunks: Promise<ChunkBlob>[] = [];
  try {
    let fileSize: number;
    {
      using fh = await Deno.open(file, { read: true });
      fileSize = await regularFileSize(fh, file);
    }
    const zeros = await zeroRanges(file, fileSize, signal);
    const count = fileSize === 0 ? 1 : Math.ceil(fileSize / chunkSize);
    // One chunk: its digest is the file digest; hash the data once.
    const whole = count === 1
      ? undefined
      : hasher.run({ kind: "hash", file, size: fileSize, holes: zeros });
    whole?.catch(() => {});

    // A temp file made here, before a worker writes it: a worker still running after an abort
    // can then only write into a file that cleanup has already unlinked, never create one.
    const newTemp = async () => {
      const path = job.temp("zst");
      (await Deno.open(path, { write: true, createNew: true })).close();
      return path;
    };
    const encode = async (offset: number, length: number, holes: Range[], zeroBlob = false) => {
      const out = await newTemp();
      const r: EncodeResult = await pool.run({
        kind: "encode",
        file,
        offset,
        length,
        holes,
        out,
        level,
        frameSize: zeroBlob ? 0 : frameSize,
        detectZeros: !zeroBlob,
      });
      return { out, r };
    };
    // The frame of zeros per chunk length (at most two: chunkSize and the tail), encoded once
    // from a hole, so no file is read for it.
    const zeroBlobs = new Map<number, Promise<Omit<ChunkBlob, "offset">>>();
    const zeroBlob = (length: number) => {
      let blob = zeroBlobs.get(length);
      if (!blob) {
        blob = (async () => {
          const { out, r } = await encode(0, length, [{ start: 0, end: length }], true);
          if (r.zero) throw new Error("a zero frame was not encoded");
          return {
            path: out,
            digest: r.digest,
            size: r.size,
            length,
            uncompressedDigest: r.uncompressedDigest,
          };
        })();
        blob.catch(() => {});
        zeroBlobs.set(length, blob);
      }
      return blob;
    };
    const copyOfZeroBlob = async (offset: number, length: number): Promise<ChunkBlob> => {
      const z = await zeroBlob(length);
      checkAborted(signal);
      const path = job.temp("zst");
      await Deno.copyFile(z.path, path);
      return { ...z, path, offset };
    };

    // At most a few chunks are planned ahead of the workers: a 100 GB disk in small chunks
    // would otherwise make all its temp files and jobs at once.
    const ahead = concurrency * 2 + 2;
    let active = 0;
    let failed = false;
    const slotFree: (() => void)[] = [];
    for (let i = 0; i < count && !failed; i++) {
      checkAborted(signal);
      while (active >= ahead) await new Promise<void>((resolve) => slotFree.push(resolve));
      if (failed) break;
      const offset = i * chunkSize;
      const length = Math.min(chunkSize, fileSize - offset);
      const segments = segmentsOf(zeros, offset, offset + length);
      const holes: Range[] = segments.filter((seg) => seg.zero);
      const allHole = length > 0 && segments.length === 1 && segments[0].zero;
      active++;
      const chunk = (async (): Promise<ChunkBlob> => {
        let c: ChunkBlob;
        if (allHole) {
          c = await copyOfZeroBlob(offset, length);
        } else {
          const { out, r } = await encode(offset, length, holes);
          if (r.zero) {
            c = await copyOfZeroBlob(offset, length);
          } else {
            c = {
              path: out,
              digest: r.digest,
              size: r.size,
              offset,
              length,
              uncompressedDigest: r.uncompressedDigest,
              ...(r.table ? { table: r.table } : {}),
            };
          }
        }
        checkAborted(signal);
        onProgress?.(length);
        onChunk?.(c);
        return c;
      })();
      chunk.catch(() => failed = true).finally(() => {
        active--;
        slotFree.shift()?.();
      });
      chunks.push(chunk);
    }
    const done = await unlessAborted(Promise.all(chunks), signal);
    const fileDigest = whole ? (await whole).digest : done[0].uncompressedDigest;
    await job.finish(done.map((c) => c.path));
    return { fileSize, fileDigest, chunks: done };
  } catch (err) {
    stop();
    // Chunks still copying a zero frame finish first, so cleanup sees every temp file.
    await Promise.allSettled(chunks);
    await job.cleanup();
    job.dispose();
    throw fromWorker(err, signal, `cannot compress ${file}`);
  } finally {
    signal?.removeEventListener("abort", stop);
    stop();
  }
}

const zeroDigests = new Map<number, string>();

/** sha256 of `length` zero bytes (cached: a pull asks for one or two lengths). */
export function zeroDigest(length: number): string {
  let d = zeroDigests.get(length);
  if (!d) {
    const zeros = new Uint8Array(Math.min(length, 4 << 20));
    const h = createDigester();
    for (let pos = 0; pos < length; pos += zeros.length) {
      h.update(zeros.subarray(0, Math.min(zeros.length, length - pos)));
    }
    d = h.digest();
    if (zeroDigests.size < 16) zeroDigests.set(length, d);
  }
  return d;
}

/** Turns [start, end) of `out` back into zeros (a hole) after a failed decode. */
async function rollback(out: string, start: number, end: number): Promise<void> {
  if (start < 0 || end <= start) return;
  // A hole punch frees the blocks; writing zeros is the fallback where fallocate is refused.
  try {
    const r = await new Deno.Command("fallocate", {
      args: [
        "--punch-hole",
        "--keep-size",
        "--offset",
        `${start}`,
        "--length",
        `${end - start}`,
        out,
      ],
      stdout: "null",
      stderr: "null",
    }).output();
    if (r.success) return;
  } catch { /* no fallocate */ }
  try {
    using f = await Deno.open(out, { write: true });
    await f.seek(start, Deno.SeekMode.Start);
    const zeros = new Uint8Array(Math.min(end - start, 4 << 20));
    for (let pos = start; pos < end;) {
      pos += await f.write(zeros.subarray(0, Math.min(zeros.length, end - pos)));
    }
  } catch { /* best effort: the caller discards the file anyway */ }
}

/**
 * Decompresses one zstd chunk blob into `out` at `offset` and verifies it.
 *
 * `out` must exist with its final size and read as zeros in the range (e.g. freshly created and
 * truncated): all-zero 4 MiB-aligned blocks are skipped, leaving holes. Chunks of one file can be
 * decoded in parallel. A chunk whose `uncompressedDigest` is that of `length` zero bytes is not
 * even read: the range already holds exactly those bytes (the blob's own digest is checked when
 * it is downloaded).
 *
 * Throws an `integrity` error if the blob is corrupt, decompresses to a length other than
 * `length`, or its sha256 is not `uncompressedDigest`; the range is then turned back into zeros
 * (a hole), so no unverified data is left behind. With `opts.pieces`, each piece is verified
 * before it is written and only the pieces to write need to read as zeros (or already hold
 * their bytes): a failure leaves the verified pieces written before it.
 */
export async function decodeZstdChunk(
  blobPath: string,
  out: string,
  offset: number,
  length: number,
  uncompressedDigest: string,
  opts: ZstdChunkDecodeOptions = {},
): Promise<void> {
  const { signal, pieces } = opts;
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw fail("usage", `invalid chunk range ${offset}+${length}`);
  }
  checkAborted(signal);
  const what = `zstd chunk ${blobPath} (at ${offset} of ${out})`;
  if (length > 0 && uncompressedDigest === zeroDigest(length)) return;
  try {
    await Deno.stat(blobPath);
  } catch (err) {
    throw asSardeError(err, signal, `cannot read ${blobPath}`);
  }
  const own = opts.pool ? undefined : createCodecPool(1);
  const pool = opts.pool ?? own!;
  try {
    const r = await unlessAborted(
      pool.run({ kind: "decode", blob: blobPath, out, offset, length, ...pieces && { pieces } }),
      signal,
    );
    const problem = r.size !== length
      ? `decompressed to ${r.size} bytes, expected ${length}`
      : !pieces && r.digest !== uncompressedDigest
      ? `content is ${r.digest}, expected ${uncompressedDigest}`
      : undefined;
    if (problem) {
      if (!pieces) await rollback(out, r.writtenStart, r.writtenEnd);
      throw fail("integrity", `${what}: ${problem}`);
    }
  } catch (err) {
    if (err instanceof CodecError && err.failure.written) {
      await rollback(out, err.failure.written.start, err.failure.written.end);
    }
    const e = fromWorker(err, signal, `cannot decompress ${blobPath}`);
    if (e.kind === "integrity" && !e.message.includes(blobPath)) {
      throw new SardeError("integrity", `${what}: ${e.message}`, { cause: err });
    }
    throw e;
  } finally {
    own?.close();
  }
}

/**
 * Decompresses one frame of a framed chunk (the bytes its table entry names) into memory, on a
 * codec worker, and verifies it.
 *
 * Throws an `integrity` error unless `bytes` is exactly one zstd frame whose header declares
 * `expectedSize` bytes and which decompresses to `expectedSize` bytes with sha256 `digest`; the
 * output buffer is never larger than `expectedSize` (at most {@link MAX_FRAME_SIZE}).
 */
export async function decodeFrame(
  bytes: Uint8Array,
  expectedSize: number,
  digest: string,
  opts: FrameDecodeOptions = {},
): Promise<Uint8Array> {
  const { signal } = opts;
  if (!Number.isSafeInteger(expectedSize) || expectedSize < 1 || expectedSize > MAX_FRAME_SIZE) {
    throw fail("usage", `invalid frame size ${expectedSize}: 1…${MAX_FRAME_SIZE} bytes`);
  }
  checkAborted(signal);
  const own = opts.pool ? undefined : createCodecPool(1);
  const pool = opts.pool ?? own!;
  try {
    return await unlessAborted(
      pool.run({ kind: "inflate", bytes, size: expectedSize, digest }, opts.handOver),
      signal,
    );
  } catch (err) {
    const e = fromWorker(err, signal, "cannot decompress a zstd frame");
    throw e.kind === "integrity"
      ? new SardeError("integrity", `zstd frame of ${expectedSize} bytes: ${e.message}`, {
        cause: err,
      })
      : e;
  } finally {
    own?.close();
  }
}
