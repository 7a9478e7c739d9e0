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
 * serving the network while a write is in flight. The codec workers call the same primitives
 * ({@link directIo}) synchronously, from the source of the function (they cannot import modules;
 * see lib/image/codec_worker.ts).
 *
 * @module
 */

/** What `pread` and `pwrite` of {@link directIo} return: a byte count, or -1 on an error. */
export type Positioned<NB extends boolean> = NB extends true ? Promise<number | bigint>
  : number | bigint;

/**
 * The O_DIRECT primitives, written once for the main thread and the codec workers: opening an
 * existing file with O_DIRECT through libc (or -1 where that is not possible or is turned off),
 * page-aligned buffers, and libc's `pread`/`pwrite`/`close`. With `nonblocking`, `pread` and
 * `pwrite` run on Deno's blocking thread pool and return promises (the main thread, whose event
 * loop must keep serving the network); without, they block the calling thread (a codec worker,
 * which runs one job at a time and has nothing else to do meanwhile).
 *
 * `SARDE_DIRECT_IO`, read at every open, turns it off when its value is one of `offValues`.
 *
 * Self-contained: it references nothing outside its own body, since lib/image/codec_worker.ts
 * puts its source into the worker script, which cannot import.
 */
export function directIo<NB extends boolean>(nonblocking: NB, offValues: readonly string[]) {
  const align = 4096; // for buffers, offsets and lengths: the page size covers all disks
  const O_DIRECT = Deno.build.os !== "linux"
    ? 0
    : Deno.build.arch === "x86_64"
    ? 0o40000
    : Deno.build.arch === "aarch64"
    ? 0o200000
    : 0;
  const positioned = {
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: nonblocking as boolean,
  } as const;
  const load = () => {
    try {
      return Deno.dlopen("libc.so.6", {
        open: { parameters: ["buffer", "i32"], result: "i32" },
        pwrite: positioned,
        pread: positioned,
        close: { parameters: ["i32"], result: "i32" },
      }).symbols;
    } catch {
      return null;
    }
  };
  let libc: ReturnType<typeof load> | undefined;
  const symbols = () => libc!;
  return {
    align,
    /** An O_DIRECT descriptor of the existing `path`, or -1 (then use normal I/O). */
    open(path: string, mode: "read" | "write"): number {
      if (!O_DIRECT || offValues.includes(Deno.env.get("SARDE_DIRECT_IO") ?? "")) return -1;
      libc ??= load();
      if (!libc) return -1;
      return libc.open(
        new TextEncoder().encode(path + "\0"),
        (mode === "write" ? 1 /* O_WRONLY */ : 0) | O_DIRECT | 0o2000000, /* O_CLOEXEC */
      );
    },
    /** libc's `pwrite` of all of `data` at `position` (one call: it may write less). */
    pwrite: (fd: number, data: Uint8Array, position: number) =>
      symbols().pwrite(fd, data, BigInt(data.length), BigInt(position)) as Positioned<NB>,
    /** libc's `pread` of up to `buf.length` bytes at `position`. */
    pread: (fd: number, buf: Uint8Array, position: number) =>
      symbols().pread(fd, buf, BigInt(buf.length), BigInt(position)) as Positioned<NB>,
    /** Closes a descriptor from {@link open}. */
    close(fd: number): void {
      symbols().close(fd);
    },
    /** A zeroed buffer of `size` bytes whose start is aligned for O_DIRECT. */
    alignedBuffer(size: number): Uint8Array {
      const raw = new Uint8Array(size + align);
      const address = Number(
        BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(raw))) % BigInt(align),
      );
      const start = (align - address) % align;
      return raw.subarray(start, start + size);
    },
  };
}

// "disk" keeps O_DIRECT for the codec workers' files (decoded disks, chunk blobs) only.
const direct = directIo(true, ["0", "disk"]);

/** Alignment O_DIRECT needs for buffers, offsets and lengths (the page size covers all disks). */
export const DIRECT_ALIGN: number = direct.align;

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
  const fd = direct.open(path, mode);
  if (fd < 0) return undefined;
  let open = true;
  // The codec workers' loops over these calls (lib/image/codec_worker.ts) are synchronous: the
  // same loop cannot both await a call and not, and awaiting there would send every 4 MiB
  // through Deno's blocking pool and back, a thread hop per call for a thread that waits anyway.
  return {
    async write(data, position) {
      for (let off = 0; off < data.length;) {
        const n = Number(await direct.pwrite(fd, data.subarray(off), position + off));
        if (n <= 0) {
          throw new Error(`write of ${data.length - off} bytes at ${position + off} failed`);
        }
        off += n;
      }
    },
    async read(buf, position) {
      const n = Number(await direct.pread(fd, buf, position));
      if (n < 0) throw new Error(`read at ${position} failed`);
      return n;
    },
    close() {
      if (open) direct.close(fd);
      open = false;
    },
  };
}

/** A zeroed buffer of `size` bytes whose start is aligned for O_DIRECT. */
export const alignedBuffer: (size: number) => Uint8Array = direct.alignedBuffer;

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
