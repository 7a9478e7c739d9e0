/**
 * Large sequential file I/O that bypasses the page cache (`O_DIRECT`, through libc by FFI).
 *
 * Why: sarde writes and reads GBs once (blobs, disk images) and nobody reads them again soon
 * from the cache. On the VMs this was measured on, every byte entering the page cache cost
 * ~2 ns of kernel time (dd of 2 GB: 5.9 s wall, 5.5 s system buffered; 1.9 s wall, 0.5 s
 * system with `oflag=direct`; reading 965 MB not cached: 2.15 s buffered, 1.15 s direct),
 * which was the largest single cost of a pull. `O_DIRECT` needs page-aligned buffers and
 * offsets and lengths in whole 4 KiB blocks; callers write unaligned tails through a normal
 * handle. Where `O_DIRECT` is unavailable (tmpfs, other architectures, no libc), {@link openDirect}
 * returns `undefined` and callers use normal I/O: same bytes, more CPU. `SARDE_DIRECT_IO=0` turns
 * it off (for comparisons, or a file system that accepts O_DIRECT but handles it badly).
 *
 * The calls run on Deno's blocking thread pool (`nonblocking` FFI), so the event loop keeps
 * serving the network while a write is in flight. The codec workers have their own synchronous
 * copy of this (they cannot import modules; see lib/image/codec_worker.ts).
 *
 * @module
 */

/** Alignment O_DIRECT needs for buffers, offsets and lengths (the page size covers all disks). */
export const DIRECT_ALIGN = 4096;

const O_DIRECT = Deno.build.os !== "linux"
  ? 0
  : Deno.build.arch === "x86_64"
  ? 0o40000
  : Deno.build.arch === "aarch64"
  ? 0o200000
  : 0;

function loadLibc() {
  try {
    return Deno.dlopen("libc.so.6", {
      open: { parameters: ["buffer", "i32"], result: "i32" },
      pwrite: {
        parameters: ["i32", "buffer", "usize", "i64"],
        result: "isize",
        nonblocking: true,
      },
      pread: {
        parameters: ["i32", "buffer", "usize", "i64"],
        result: "isize",
        nonblocking: true,
      },
      close: { parameters: ["i32"], result: "i32" },
    }).symbols;
  } catch {
    return null;
  }
}

let libc: ReturnType<typeof loadLibc> | undefined;

/** An open O_DIRECT file descriptor. */
export interface DirectFile {
  /**
   * Writes all of `data` at `position`; both aligned to {@link DIRECT_ALIGN}, `data.length` a
   * multiple of it, `data` untouched until the promise settles.
   */
  write(data: Uint8Array, position: number): Promise<void>;
  /** Reads up to `buf.length` bytes at `position` (aligned as for write); 0 at the end. */
  read(buf: Uint8Array, position: number): Promise<number>;
  close(): void;
}

/**
 * Opens an existing file with O_DIRECT for reading or writing, or returns `undefined` where
 * that is not possible (the caller then uses normal I/O).
 */
export function openDirect(path: string, mode: "read" | "write"): DirectFile | undefined {
  if (!O_DIRECT || ["0", "disk"].includes(Deno.env.get("SARDE_DIRECT_IO") ?? "")) return undefined;
  libc ??= loadLibc();
  if (!libc) return undefined;
  const c = libc;
  const fd = c.open(
    new TextEncoder().encode(path + "\0"),
    (mode === "write" ? 1 /* O_WRONLY */ : 0) | O_DIRECT | 0o2000000, /* O_CLOEXEC */
  );
  if (fd < 0) return undefined;
  let open = true;
  return {
    async write(data, position) {
      for (let off = 0; off < data.length;) {
        const n = Number(
          await c.pwrite(fd, data.subarray(off), BigInt(data.length - off), BigInt(position + off)),
        );
        if (n <= 0) {
          throw new Error(`write of ${data.length - off} bytes at ${position + off} failed`);
        }
        off += n;
      }
    },
    async read(buf, position) {
      const n = Number(await c.pread(fd, buf, BigInt(buf.length), BigInt(position)));
      if (n < 0) throw new Error(`read at ${position} failed`);
      return n;
    },
    close() {
      if (open) c.close(fd);
      open = false;
    },
  };
}

/** A zeroed buffer of `size` bytes whose start is aligned for O_DIRECT. */
export function alignedBuffer(size: number): Uint8Array {
  const raw = new Uint8Array(size + DIRECT_ALIGN);
  const address = Number(
    BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(raw))) % BigInt(DIRECT_ALIGN),
  );
  const start = (DIRECT_ALIGN - address) % DIRECT_ALIGN;
  return raw.subarray(start, start + size);
}

/** Free aligned buffers by size: blobs come and go by the hundred, their buffers need not. */
const spare = new Map<number, Uint8Array[]>();
const SPARE_PER_SIZE = 16;

/**
 * An aligned buffer of `size` bytes from a pool (see {@link alignedBuffer}); give it back with
 * {@link releaseBuffer} when done. Fresh buffers per blob piled up as garbage (V8 frees
 * ArrayBuffer memory only on a full GC), which cost up to 40 MB of peak RSS in a push.
 */
export function borrowBuffer(size: number): Uint8Array {
  return spare.get(size)?.pop() ?? alignedBuffer(size);
}

/** Returns a buffer from {@link borrowBuffer}; the caller must not use it afterwards. */
export function releaseBuffer(buf: Uint8Array): void {
  const list = spare.get(buf.length) ?? [];
  if (list.length < SPARE_PER_SIZE) list.push(buf);
  spare.set(buf.length, list);
}
