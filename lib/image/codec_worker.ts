/**
 * Worker threads that do the heavy byte work of the zstd encoding: compress one chunk of a file
 * (into frames and their table, lib/image/frames.ts), decompress one chunk blob into a file or
 * one frame into memory, hash a whole file.
 *
 * Why workers and libzstd: per GiB of disk, an export hashes twice (chunk and file) and
 * compresses once, an import decompresses and hashes once. Piping the data through the `zstd` CLI
 * cost as much kernel time as the compression itself on this kind of machine (a 2 GB pipe: 2.3 s
 * of system time), and hashing on the main thread serialised everything behind one core. Here
 * each worker reads its own input, hashes it with `node:crypto` and calls libzstd (the library
 * the `zstd` CLI is built on, Debian package `libzstd1`) through FFI, synchronously: measured on
 * a 2 GB mixed file, libzstd compresses level 3 at 370 MB/s and decompresses at 1.6 GB/s per
 * core, against 240 and 650 MB/s for Deno's `node:zlib` zstd.
 *
 * A worker runs one job at a time with fixed buffers (4 MiB in, 4 MiB out, libzstd's contexts),
 * so memory does not grow with the chunk size. The worker script is made of self-contained
 * functions (its body, and the O_DIRECT primitives and error wording of lib/util/, which the
 * main thread uses too) and started from a blob URL, so `deno bundle` and `deno compile` need no
 * extra file.
 *
 * Determinism: a frame is fed to libzstd (single-threaded streaming mode, content size pledged,
 * XXH64 checksum on, as the `zstd` CLI writes frames) in pieces of at most 4 MiB at fixed offsets
 * from the frame's start, whatever the holes; so the blob depends only on the chunk's bytes, its
 * length, the frame size, the level and the libzstd version.
 *
 * @module
 */

import { directIo } from "../util/direct_io.ts";
import { osReason } from "../util/fsutil.ts";
import { spansBuffer } from "../util/memory.ts";
import { encodeFrameTable, type FrameTableLocation } from "./frames.ts";
import type { Range } from "./holes.ts";

/**
 * Compress [offset, offset+length) of `file` into `out`: zstd frames of `frameSize` bytes and
 * their table, or one frame without a table if `frameSize` is 0 or the range empty. `out` must
 * exist and be empty: the caller creates it, so a worker that outlives an abort never creates a
 * file.
 */
export interface EncodeJob {
  kind: "encode";
  file: string;
  offset: number;
  length: number;
  /** Ranges of `file` that read as zeros (holes): not read, fed as zeros. Sorted, merged. */
  holes: Range[];
  out: string;
  level: number;
  /** Uncompressed bytes per frame (the last one shorter); 0: one frame, no table. */
  frameSize: number;
  /**
   * Report an all-zero chunk as `{ zero: true }` without compressing it (the caller has the
   * frame of zeros cached); `out` is then not created.
   */
  detectZeros: boolean;
}

/** What an {@link EncodeJob} made. */
export type EncodeResult =
  | { zero: true }
  | {
    zero: false;
    digest: string;
    size: number;
    uncompressedDigest: string;
    /** The frame table, for a framed blob. */
    table?: FrameTableLocation;
  };

/**
 * Decompress the blob `blob` into `out` at `offset`: `out` must exist, be long enough and read as
 * zeros in the range; all-zero 4 MiB blocks (aligned to the file) are not written (holes).
 * Decoding stops with an `integrity` error once more than `length` bytes come out.
 */
export interface DecodeJob {
  kind: "decode";
  blob: string;
  out: string;
  offset: number;
  length: number;
  /**
   * Verify the output piece by piece instead of as a whole: the pieces tile the range in order,
   * each is held in memory (at most 64 MiB, frames.ts's `MAX_FRAME_SIZE`) until it hashes to its
   * digest,
   * and only then written, if `write` says so (a lazy file's units that are not present yet).
   * Nothing unverified is ever written then, and what others wrote in the range is left alone.
   */
  pieces?: DecodePiece[];
}

/** A piece of a {@link DecodeJob}'s output that is verified on its own. */
export interface DecodePiece {
  length: number;
  /** sha256 of the piece's bytes (`sha256:…`). */
  digest: string;
  /** Whether to write it once verified. */
  write: boolean;
}

/**
 * What a {@link DecodeJob} wrote. `writtenStart` is -1 if nothing was written. `digest` is the
 * sha256 of the whole output, empty with `pieces` (each piece was verified instead).
 */
export interface DecodeResult {
  size: number;
  digest: string;
  writtenStart: number;
  writtenEnd: number;
}

/** Hash the first `size` bytes of `file` (holes are hashed as zeros without being read). */
export interface HashJob {
  kind: "hash";
  file: string;
  size: number;
  holes: Range[];
}

/** The sha256 and size of a {@link HashJob}. */
export interface HashResult {
  digest: string;
  size: number;
}

/**
 * Decompress one zstd frame held in memory: `bytes` must be exactly one frame whose header gives
 * `size` as its content size, and decompress to `size` bytes whose sha256 is `digest`. The
 * worker frees its copy of `bytes` once done (see lib/util/memory.ts).
 */
export interface InflateJob {
  kind: "inflate";
  bytes: Uint8Array;
  size: number;
  digest: string;
}

/** Any job of a codec worker. */
export type CodecJob = EncodeJob | DecodeJob | HashJob | InflateJob;

/** The error a worker reports: a message and the sarde error kind it maps to. */
export interface WorkerFailure {
  error: string;
  kind: "integrity" | "io" | "not-found" | "usage" | "external";
  /** For a failed decode: what was written before the failure (to be rolled back). */
  written?: { start: number; end: number };
}

/**
 * What the worker's body gets from the modules it cannot import: self-contained functions whose
 * source {@link workerSource} puts into the script. They come as properties of one argument, as
 * a bundler may rename the functions but never a property.
 */
interface WorkerShared {
  directIo: typeof directIo;
  osReason: typeof osReason;
  encodeFrameTable: typeof encodeFrameTable;
}

/**
 * The worker's body. It must not reference anything outside itself but `shared`: it is
 * serialised with `Function.prototype.toString` and started from a blob URL.
 */
function codecWorkerMain(shared: WorkerShared): void {
  const IO = 4 << 20;
  const scope = self as unknown as {
    onmessage: ((e: MessageEvent) => void) | null;
    postMessage(m: unknown, transfer?: Transferable[]): void;
  };

  class Failure extends Error {
    constructor(
      message: string,
      readonly kind: WorkerFailure["kind"],
      readonly written?: { start: number; end: number },
    ) {
      super(message);
    }
  }

  type Hash = {
    update(b: Uint8Array): Hash;
    digest(enc: "hex"): string;
    digest(): Uint8Array;
  };
  let createHash: (alg: string) => Hash;
  let isZero: (b: Uint8Array) => boolean;
  let zstd: ReturnType<typeof openZstd>;

  function openZstd() {
    // ZSTD_parameters, passed by value: 7 compression parameters, then contentSizeFlag,
    // checksumFlag, noDictIDFlag.
    const params = {
      struct: ["u32", "u32", "u32", "u32", "u32", "u32", "i32", "i32", "i32", "i32"],
    } as const;
    const sym = {
      ZSTD_createCCtx: { parameters: [], result: "pointer" },
      ZSTD_getParams: { parameters: ["i32", "u64", "usize"], result: params },
      ZSTD_compressBegin_advanced: {
        parameters: ["pointer", "pointer", "usize", params, "u64"],
        result: "usize",
      },
      ZSTD_compressContinue: {
        parameters: ["pointer", "buffer", "usize", "buffer", "usize"],
        result: "usize",
      },
      ZSTD_compressEnd: {
        parameters: ["pointer", "buffer", "usize", "buffer", "usize"],
        result: "usize",
      },
      ZSTD_compressBound: { parameters: ["usize"], result: "usize" },
      ZSTD_createDCtx: { parameters: [], result: "pointer" },
      ZSTD_DCtx_reset: { parameters: ["pointer", "i32"], result: "usize" },
      ZSTD_DCtx_setParameter: { parameters: ["pointer", "i32", "i32"], result: "usize" },
      ZSTD_decompressStream: { parameters: ["pointer", "buffer", "buffer"], result: "usize" },
      ZSTD_isError: { parameters: ["usize"], result: "u32" },
      ZSTD_getErrorName: { parameters: ["usize"], result: "pointer" },
      ZSTD_getFrameContentSize: { parameters: ["buffer", "usize"], result: "u64" },
      ZSTD_findFrameCompressedSize: { parameters: ["buffer", "usize"], result: "usize" },
      ZSTD_decompressDCtx: {
        parameters: ["pointer", "buffer", "usize", "buffer", "usize"],
        result: "usize",
      },
    } as const;
    let lib;
    try {
      lib = Deno.dlopen("libzstd.so.1", sym);
    } catch (err) {
      throw new Failure(
        `cannot load libzstd.so.1 (${
          (err as Error).message
        }); install it (Debian: apt install libzstd1)`,
        "external",
      );
    }
    const s = lib.symbols;
    const check = (r: number | bigint, what: string): number => {
      if (s.ZSTD_isError(r as bigint)) {
        const p = s.ZSTD_getErrorName(r as bigint);
        const name = p ? Deno.UnsafePointerView.getCString(p) : "unknown error";
        throw new Failure(`${what}: ${name}`, "integrity");
      }
      return Number(r);
    };
    const cctx = s.ZSTD_createCCtx();
    const dctx = s.ZSTD_createDCtx();
    // A hostile frame may ask for a window of up to 2 GiB; 32 MiB covers every level ≤ 19
    // for any chunk size and bounds the memory a decode can take.
    check(s.ZSTD_DCtx_setParameter(dctx, 100, /* ZSTD_d_windowLogMax */ 25), "zstd setup");
    return { s, check, cctx, dctx };
  }

  async function load(): Promise<void> {
    if (zstd) return;
    const crypto = await import("node:crypto");
    createHash = crypto.createHash as unknown as typeof createHash;
    const { Buffer } = await import("node:buffer");
    const zeros = Buffer.alloc(8 << 20); // the largest buffer tested: a piece
    isZero = (b) =>
      Buffer.from(b.buffer, b.byteOffset, b.length).equals(zeros.subarray(0, b.length));
    zstd = openZstd();
  }

  // Decoding: ZSTD_inBuffer / ZSTD_outBuffer { pointer, size, pos } over 4 MiB buffers.
  const inStruct = new BigUint64Array(3);
  const outStruct = new BigUint64Array(3);
  // O_DIRECT: synchronous calls, as this thread has nothing else to do while one runs. Only
  // SARDE_DIRECT_IO=0 turns it off here ("disk" keeps it for these files: see direct_io.ts).
  const direct = shared.directIo(false, ["0"]);
  const addr = (b: Uint8Array) => BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(b)));
  const inBuf = direct.alignedBuffer(IO); // page-aligned, as O_DIRECT wants its buffers
  const outBuf = direct.alignedBuffer(IO);
  const inAddr = addr(inBuf), outAddr = addr(outBuf);

  // Decoded disks are written with O_DIRECT where the file system allows it: on the VMs this
  // was measured on, copying into the page cache cost ~2.5 CPU s per GB (dd: 5.9 s wall, 5.5 s
  // system for 2 GB), O_DIRECT 0.3 (1.9 s wall). The disk of a VM is read by QEMU later, not
  // by us, so bypassing the cache loses nothing. Only whole 4 KiB blocks at aligned offsets go
  // that way; a chunk's unaligned edges and the file's tail are written normally.
  /** Reads the next piece of a blob: O_DIRECT (not through the page cache) where possible. */
  function blobReader(path: string, file: Deno.FsFile) {
    let fd = direct.open(path, "read");
    let pos = 0;
    const close = () => {
      if (fd >= 0) direct.close(fd);
      fd = -1;
    };
    const read = (buf: Uint8Array): number | null => {
      if (fd >= 0) {
        const n = Number(direct.pread(fd, buf, pos));
        if (n >= 0) {
          pos += n;
          return n === 0 ? null : n;
        }
        direct.close(fd); // refused: read the rest normally
        fd = -1;
        file.seekSync(pos, Deno.SeekMode.Start);
      }
      const n = file.readSync(buf);
      if (n !== null) pos += n;
      return n;
    };
    return { read, [Symbol.dispose]: close };
  }
  /** Whether `block` may go to `pos` with O_DIRECT: whole blocks at an aligned offset. */
  const isAligned = (block: Uint8Array, pos: number) =>
    pos % direct.align === 0 && block.length % direct.align === 0;
  /** Writes `block` at `pos` through the O_DIRECT `fd`; false if it cannot (caller falls back). */
  function writeDirect(fd: number, block: Uint8Array, pos: number): boolean {
    if (fd < 0 || !isAligned(block, pos)) return false;
    for (let off = 0; off < block.length;) {
      const n = Number(direct.pwrite(fd, block.subarray(off), pos + off));
      // Refused (EINVAL on this file system) or failed (a full disk): libc's errno is out of
      // reach here, so the caller writes the whole block again normally, which says why.
      if (n <= 0) return false;
      off += n;
    }
    return true;
  }
  /**
   * Writes blocks at given positions of `path`: whole aligned blocks with O_DIRECT while the file
   * system takes it, everything else through `file` (opened here if not given). A failure names
   * `path`, the file written (not the one read).
   */
  function blockWriter(path: string, file?: Deno.FsFile) {
    let fd = direct.open(path, "write");
    let normal = file;
    return {
      write(block: Uint8Array, pos: number): void {
        if (writeDirect(fd, block, pos)) return;
        if (fd >= 0 && isAligned(block, pos)) {
          direct.close(fd); // refused or failed: stop trying
          fd = -1;
        }
        try {
          normal ??= Deno.openSync(path, { write: true });
          normal.seekSync(pos, Deno.SeekMode.Start);
          writeAll(normal, block);
        } catch (err) {
          throw new Failure(`cannot write ${path}: ${shared.osReason(err)}`, "io");
        }
      },
      [Symbol.dispose](): void {
        if (fd >= 0) direct.close(fd);
        if (!file) normal?.close();
      },
    };
  }

  // Encoding uses libzstd's buffer-less API (ZSTD_compressContinue): it compresses straight from
  // our buffers, 25-35 % less CPU than ZSTD_compressStream2, which copies every byte into its
  // own window first. The price: the previous piece must stay untouched while the next one is
  // compressed (it is the match window). Three piece buffers in rotation guarantee that, with
  // gaps between them so libzstd never sees two pieces as one contiguous run (its output would
  // then depend on where the buffers happen to lie).
  const PIECE = 4 << 20;
  const GAP = 4096;
  let pieces: Uint8Array[] | undefined; // allocated by the first encode: decoders need none
  let packed: Uint8Array | undefined; // compressBound(PIECE) + frame header and checksum

  function ioFailure(err: unknown, what: string): Failure {
    if (err instanceof Failure) return err;
    const kind = err instanceof Deno.errors.NotFound ? "not-found" : "io";
    return new Failure(`${what}: ${(err as Error).message}`, kind);
  }

  function writeAll(f: Deno.FsFile, b: Uint8Array): void {
    for (let off = 0; off < b.length;) off += f.writeSync(b.subarray(off));
  }

  /** Fills `buf` with [pos, pos+buf.length) of `f`, holes as zeros. */
  function fill(f: Deno.FsFile, path: string, buf: Uint8Array, pos: number, holes: Range[]): void {
    const end = pos + buf.length;
    let at = pos;
    const readTo = (stop: number) => {
      if (stop <= at) return;
      f.seekSync(at, Deno.SeekMode.Start);
      for (let off = at - pos; off < stop - pos;) {
        const n = f.readSync(buf.subarray(off, stop - pos));
        if (n === null) throw new Failure(`${path} shrank while being read`, "io");
        off += n;
      }
      at = stop;
    };
    for (const h of holes) {
      if (h.end <= at) continue;
      if (h.start >= end) break;
      readTo(Math.max(at, h.start));
      const zEnd = Math.min(h.end, end);
      buf.fill(0, at - pos, zEnd - pos);
      at = zEnd;
    }
    readTo(end);
  }

  let stage: Uint8Array | undefined;
  /**
   * Appends to `path` (made, empty, by the caller) through a 4 MiB staging buffer, written with
   * O_DIRECT in whole aligned blocks where possible; the tail goes through a normal handle.
   */
  function appender(path: string) {
    const writer = blockWriter(path);
    let pos = 0;
    let staged = 0;
    const buf = stage ??= direct.alignedBuffer(IO);
    const flush = (all: boolean) => {
      const whole = all ? staged : staged - (staged % direct.align);
      if (whole === 0) return;
      writer.write(buf.subarray(0, whole), pos);
      pos += whole;
      buf.copyWithin(0, whole, staged);
      staged -= whole;
    };
    return {
      append(bytes: Uint8Array) {
        for (let off = 0; off < bytes.length;) {
          const n = Math.min(bytes.length - off, buf.length - staged);
          buf.set(bytes.subarray(off, off + n), staged);
          staged += n;
          off += n;
          if (staged === buf.length) flush(false);
        }
      },
      [Symbol.dispose]() {
        try {
          flush(true);
        } finally {
          writer[Symbol.dispose]();
        }
      },
    };
  }

  function encode(job: EncodeJob): EncodeResult {
    const { s, check, cctx } = zstd;
    using f = Deno.openSync(job.file, { read: true });
    packed ??= new Uint8Array(Number(s.ZSTD_compressBound(BigInt(PIECE))) + 64);
    const out = packed;
    if (!pieces) {
      const arena = new Uint8Array(3 * (PIECE + GAP));
      pieces = [0, 1, 2].map((i) => arena.subarray(i * (PIECE + GAP), i * (PIECE + GAP) + PIECE));
    }
    const bufs = pieces;
    const framed = job.frameSize > 0 && job.length > 0;
    const frameSize = framed ? job.frameSize : job.length;
    /** End of the frame holding chunk position `rel`. */
    const frameEnd = (rel: number) =>
      framed ? Math.min(job.length, rel - (rel % frameSize) + frameSize) : job.length;
    const chunkHash = createHash("sha256");
    const blobHash = createHash("sha256");
    const blob = appender(job.out);
    const frames: { compressedSize: number; size: number; sha256: Uint8Array }[] = [];
    let frameHash = framed ? createHash("sha256") : undefined;
    let frameStart = 0; // compressed size when the current frame began
    let frameRel = 0; // chunk position where it began
    let begun = false;
    let size = 0;
    let previous = -1; // the buffer of the last piece compressed: the window, keep it intact
    const emit = (bytes: Uint8Array) => {
      if (bytes.length === 0) return;
      blobHash.update(bytes);
      blob.append(bytes);
      size += bytes.length;
    };
    /** Compresses piece `buf` (`n` bytes at chunk position `rel`), beginning or ending frames. */
    const compress = (buf: number, rel: number, n: number) => {
      const end = frameEnd(rel);
      if (framed ? rel % frameSize === 0 : rel === 0) {
        // The parameters libzstd picks for this level and frame size, plus a content checksum
        // (as the zstd CLI writes) and the content size in the frame header.
        const length = BigInt(end - rel);
        const params = s.ZSTD_getParams(job.level, length, 0n);
        new DataView(params.buffer, params.byteOffset).setInt32(32, 1, true); // checksumFlag
        check(s.ZSTD_compressBegin_advanced(cctx, null, 0n, params, length), "zstd");
        frameStart = size;
        frameRel = rel;
        begun = true;
      }
      const src = bufs[buf].subarray(0, n);
      chunkHash.update(src);
      frameHash?.update(src);
      const last = rel + n === end;
      const cap = BigInt(out.length);
      const written = check(
        last
          ? s.ZSTD_compressEnd(cctx, out, cap, src, BigInt(n))
          : s.ZSTD_compressContinue(cctx, out, cap, src, BigInt(n)),
        "zstd compress",
      );
      previous = buf;
      emit(out.subarray(0, written));
      if (last && frameHash) {
        const sha256 = new Uint8Array(frameHash.digest());
        frames.push({ compressedSize: size - frameStart, size: end - frameRel, sha256 });
        frameHash = createHash("sha256");
      }
    };
    const free = (busy: number) => [0, 1, 2].find((b) => b !== previous && b !== busy)!;
    try {
      // Leading all-zero pieces are held back: a chunk that turns out all zeros is never
      // compressed.
      const held: { rel: number; n: number }[] = [];
      let current = free(-1);
      const release = () => {
        for (const h of held.splice(0)) {
          const b = free(current);
          bufs[b].fill(0, 0, h.n);
          compress(b, h.rel, h.n);
        }
      };
      for (let rel = 0; rel < job.length;) {
        const n = Math.min(PIECE, frameEnd(rel) - rel);
        const last = rel + n === job.length;
        current = free(-1);
        const piece = bufs[current].subarray(0, n);
        fill(f, job.file, piece, job.offset + rel, job.holes);
        const zero = job.detectZeros && !begun && isZero(piece);
        if (zero && !last) {
          held.push({ rel, n });
        } else if (zero && last) {
          return { zero: true };
        } else {
          release();
          compress(current, rel, n);
        }
        rel += n;
      }
      if (job.length === 0) compress(free(-1), 0, 0);
      let table: FrameTableLocation | undefined;
      if (framed) {
        const bytes = shared.encodeFrameTable(frames);
        const offset = size;
        emit(bytes);
        const digest = `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
        table = { offset, length: bytes.length, digest };
      }
      return {
        zero: false,
        digest: `sha256:${blobHash.digest("hex")}`,
        size,
        uncompressedDigest: `sha256:${chunkHash.digest("hex")}`,
        ...(table ? { table } : {}),
      };
    } finally {
      blob[Symbol.dispose]();
    }
  }

  function decode(job: DecodeJob): DecodeResult {
    const { s, check, dctx } = zstd;
    using blob = Deno.openSync(job.blob, { read: true });
    using reader = blobReader(job.blob, blob);
    using out = Deno.openSync(job.out, { write: true });
    const outSize = out.statSync().size;
    if (outSize < job.offset + job.length) {
      throw new Failure(
        `${job.out} is ${outSize} bytes, too short for a chunk at ${job.offset}+${job.length}`,
        "usage",
      );
    }
    check(s.ZSTD_DCtx_reset(dctx, 1 /* session_only */), "zstd reset");
    const pieces = job.pieces;
    const largest = pieces?.reduce((m, p) => Math.max(m, p.length), 0) ?? 0;
    if (largest > 64 << 20 || pieces?.some((p) => p.length <= 0)) {
      throw new Failure("decode pieces must be 1 byte to 64 MiB", "usage");
    }
    if (pieces && pieces.reduce((n, p) => n + p.length, 0) !== job.length) {
      throw new Failure(`decode pieces do not tile ${job.length} bytes`, "usage");
    }
    // A piece is verified whole before any of it is written: one larger than the usual buffer
    // gets its own for this job.
    const dst = largest > IO ? direct.alignedBuffer(largest) : outBuf;
    const dstAddr = dst === outBuf ? outAddr : addr(dst);
    const hash = pieces ? undefined : createHash("sha256");
    let piece = 0;
    let pos = job.offset; // file position of dst[0]
    let filled = 0;
    // Blocks aligned to the file, so holes fall on its blocks; or one piece at a time.
    let limit = pieces?.length ? pieces[0].length : IO - (pos % IO);
    let produced = 0;
    let writtenStart = -1;
    let writtenEnd = -1;
    using writer = blockWriter(job.out, out);
    const flush = () => {
      const block = dst.subarray(0, filled);
      let write = filled > 0;
      if (pieces) {
        if (filled === 0) return;
        const p = pieces[piece++];
        const digest = `sha256:${createHash("sha256").update(block).digest("hex")}`;
        if (filled !== p.length || digest !== p.digest) {
          throw new Failure(
            `bytes ${
              pos - job.offset
            }+${filled} of the chunk are not the ${p.length} bytes of ${p.digest}`,
            "integrity",
          );
        }
        write &&= p.write;
      } else hash!.update(block);
      if (write && !isZero(block)) {
        if (writtenStart < 0) writtenStart = pos;
        writtenEnd = pos + filled; // before writing: a failed write may have written part of it
        writer.write(block, pos);
      }
      pos += filled;
      filled = 0;
      limit = pieces ? pieces[piece]?.length ?? IO : IO;
    };
    try {
      let last = 1; // libzstd's return: 0 once a frame is complete
      let sawInput = false;
      for (;;) {
        const n = reader.read(inBuf);
        if (n === null) break;
        sawInput ||= n > 0;
        inStruct[0] = inAddr;
        inStruct[1] = BigInt(n);
        inStruct[2] = 0n;
        for (;;) {
          outStruct[0] = dstAddr + BigInt(filled);
          outStruct[1] = BigInt(limit - filled);
          outStruct[2] = 0n;
          const before = inStruct[2];
          const ret = check(
            s.ZSTD_decompressStream(dctx, outStruct, inStruct),
            "corrupt zstd data",
          );
          const got = Number(outStruct[2]);
          // A call that moved nothing (after a frame ended exactly on a full block) returns
          // the size of a next frame header, not "incomplete".
          if (got > 0 || inStruct[2] !== before) last = ret;
          filled += got;
          produced += got;
          if (produced > job.length) {
            throw new Failure(
              `decompresses to more than the expected ${job.length} bytes`,
              "integrity",
            );
          }
          const outFull = filled === limit;
          if (outFull) flush();
          // Done with this input once it is consumed and libzstd had room to spare.
          if (inStruct[2] === inStruct[1] && !outFull) break;
        }
      }
      if (!sawInput || last !== 0) throw new Failure("truncated zstd data", "integrity");
      flush();
      if (pieces && produced !== job.length) {
        throw new Failure(`decompresses to ${produced} bytes, expected ${job.length}`, "integrity");
      }
      const digest = hash ? `sha256:${hash.digest("hex")}` : "";
      return { size: produced, digest, writtenStart, writtenEnd };
    } catch (err) {
      const f = ioFailure(err, `cannot decode ${job.blob}`);
      // With pieces, only verified bytes were written: nothing to roll back.
      throw new Failure(
        f.message,
        f.kind,
        pieces ? undefined : { start: writtenStart, end: writtenEnd },
      );
    }
  }

  function inflate(job: InflateJob): Uint8Array {
    const { s, check, dctx } = zstd;
    const src = job.bytes;
    const n = BigInt(src.length);
    // One whole frame whose header pledges the expected size: the output buffer is that size,
    // and a second frame or trailing bytes cannot hide behind the first.
    const frame = check(s.ZSTD_findFrameCompressedSize(src, n), "corrupt zstd frame");
    if (frame !== src.length) {
      throw new Failure(`holds ${frame} bytes of frame, not ${src.length}`, "integrity");
    }
    const declared = s.ZSTD_getFrameContentSize(src, n);
    if (declared !== BigInt(job.size)) {
      const what = declared >= 0xfffffffffffffffen ? "no content size" : `${declared} bytes`;
      throw new Failure(`declares ${what}, expected ${job.size}`, "integrity");
    }
    const data = new Uint8Array(job.size);
    const got = check(
      s.ZSTD_decompressDCtx(dctx, data, BigInt(data.length), src, n),
      "corrupt zstd frame",
    );
    if (got !== job.size) {
      throw new Failure(`decompresses to ${got} bytes, expected ${job.size}`, "integrity");
    }
    const digest = `sha256:${createHash("sha256").update(data).digest("hex")}`;
    if (digest !== job.digest) {
      throw new Failure(`content is ${digest}, expected ${job.digest}`, "integrity");
    }
    return data;
  }

  /**
   * {@link inflate}, then frees the job's frame (its buffer is this thread's alone, copied or
   * moved here): this thread allocates too little JS for V8 to ever collect it (lib/util/memory.ts).
   */
  function inflateOnce(job: InflateJob): Uint8Array {
    try {
      return inflate(job);
    } finally {
      (job.bytes.buffer as ArrayBuffer).transfer(0);
    }
  }

  function hashFile(job: HashJob): HashResult {
    using f = Deno.openSync(job.file, { read: true });
    const hash = createHash("sha256");
    for (let pos = 0; pos < job.size; pos += IO) {
      const piece = inBuf.subarray(0, Math.min(IO, job.size - pos));
      fill(f, job.file, piece, pos, job.holes);
      hash.update(piece);
    }
    return { digest: `sha256:${hash.digest("hex")}`, size: job.size };
  }

  scope.onmessage = async ({ data: job }: MessageEvent<CodecJob>) => {
    try {
      await load();
      const what = job.kind === "decode"
        ? job.blob
        : job.kind === "inflate"
        ? "a zstd frame"
        : job.file;
      let result: unknown;
      try {
        result = job.kind === "encode"
          ? encode(job)
          : job.kind === "decode"
          ? decode(job)
          : job.kind === "inflate"
          ? inflateOnce(job)
          : hashFile(job);
      } catch (err) {
        throw ioFailure(err, `cannot ${job.kind} ${what}`);
      }
      // A frame's bytes move to the caller instead of being copied.
      const transfer = result instanceof Uint8Array ? [result.buffer as ArrayBuffer] : [];
      scope.postMessage({ ok: result }, transfer);
    } catch (err) {
      const f = err instanceof Failure ? err : new Failure(String(err), "io");
      scope.postMessage({ error: f.message, kind: f.kind, written: f.written });
    }
  };
}

/** The worker script: {@link codecWorkerMain} called with the sources of {@link WorkerShared}. */
function workerSource(): string {
  const shared: Record<keyof WorkerShared, string> = {
    directIo: directIo.toString(),
    osReason: osReason.toString(),
    encodeFrameTable: encodeFrameTable.toString(),
  };
  const args = Object.entries(shared).map(([name, fn]) => `${name}: ${fn}`).join(",\n");
  return `(${codecWorkerMain.toString()})({\n${args}\n});`;
}

/** Runs codec jobs on a fixed set of worker threads. */
export interface CodecPool {
  /**
   * Runs `job` on the next free worker. Rejects with the worker's {@link WorkerFailure}. An
   * inflate job's `bytes` is copied to the worker, or moved there with `handOver` (it is then
   * empty here: only for an array the caller owns whole and is done with).
   */
  run(job: EncodeJob): Promise<EncodeResult>;
  run(job: DecodeJob): Promise<DecodeResult>;
  run(job: HashJob): Promise<HashResult>;
  run(job: InflateJob, handOver?: boolean): Promise<Uint8Array>;
  /** Stops every worker at once (jobs in flight reject). Idempotent. */
  close(): void;
}

/** A rejected job: the worker's failure, or the pool was closed. */
export class CodecError extends Error {
  /** The worker's report. */
  readonly failure: WorkerFailure;
  constructor(failure: WorkerFailure) {
    super(failure.error);
    this.name = "CodecError";
    this.failure = failure;
  }
}

/** Starts `size` codec workers (lazily: a worker starts with its first job). */
export function createCodecPool(size: number): CodecPool {
  const source = workerSource();
  type Waiter = { resolve: (v: never) => void; reject: (e: unknown) => void };
  const idle: Worker[] = [];
  const all = new Set<Worker>();
  const busy = new Map<Worker, Waiter>();
  const queue: { job: CodecJob; waiter: Waiter; transfer: Transferable[] }[] = [];
  let closed = false;

  const start = (): Worker => {
    const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
    try {
      const w = new Worker(url, { type: "module" });
      all.add(w);
      return w;
    } finally {
      URL.revokeObjectURL(url);
    }
  };

  const dispatch = (w: Worker) => {
    const next = queue.shift();
    if (!next) {
      idle.push(w);
      return;
    }
    const { job, waiter, transfer } = next;
    busy.set(w, waiter);
    w.onmessage = ({ data }) => {
      busy.delete(w);
      if (data.error !== undefined) waiter.reject(new CodecError(data as WorkerFailure));
      else waiter.resolve(data.ok as never);
      if (!closed) dispatch(w);
    };
    w.onerror = (e) => {
      e.preventDefault();
      busy.delete(w);
      waiter.reject(new CodecError({ error: `codec worker: ${e.message}`, kind: "io" }));
      all.delete(w);
      w.terminate();
      if (!closed && queue.length > 0) dispatch(start());
    };
    w.postMessage(job, transfer);
  };

  const run = (job: CodecJob, handOver = false): Promise<never> => {
    if (closed) {
      return Promise.reject(new CodecError({ error: "codec pool closed", kind: "io" }));
    }
    return new Promise((resolve, reject) => {
      const move = job.kind === "inflate" && handOver && spansBuffer(job.bytes);
      const transfer = move ? [job.bytes.buffer as ArrayBuffer] : [];
      queue.push({ job, waiter: { resolve, reject }, transfer });
      const w = idle.pop() ?? (all.size < size ? start() : undefined);
      if (w) dispatch(w);
    });
  };

  return {
    run: run as CodecPool["run"],
    close() {
      if (closed) return;
      closed = true;
      for (const w of all) w.terminate();
      all.clear();
      idle.length = 0;
      const stopped = new CodecError({ error: "codec pool closed", kind: "io" });
      for (const waiter of busy.values()) waiter.reject(stopped);
      busy.clear();
      for (const { waiter } of queue.splice(0)) waiter.reject(stopped);
    },
  };
}
