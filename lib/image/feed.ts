/**
 * Streams the data and hole segments of a file into a sink (a tool's stdin) in 4 MiB pieces,
 * hashing on the way, with reading, hashing and the sink's writes overlapping. Private to
 * lib/image/.
 *
 * @module
 */

import { createDigester, type Digester, IO_CHUNK } from "../oci/digest.ts";
import { fail } from "../util/errors.ts";
import { type Segment, ZEROS } from "./holes.ts";
import { checkAborted } from "./job.ts";

/** Reads exactly `buf.length` bytes at the current position (EOF early: the file shrank). */
async function readExact(file: Deno.FsFile, buf: Uint8Array, path: string): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const n = await file.read(buf.subarray(off));
    if (n === null) throw fail("io", `${path} shrank while being read`);
    off += n;
  }
}

/**
 * Read buffers shared by the reader, the pipe write and the file hasher. A piece's slot is
 * reused only after both its pipe write and its hashing are done; up to four pieces are in
 * flight, so reading, hashing and zstd overlap. SharedArrayBuffer-backed, so the hash worker
 * reads them without a copy.
 */
export interface Slots {
  views: Uint8Array[];
  busy: Promise<unknown>[];
  next: number;
}

/** Four (or `count`) free slots of 4 MiB. */
export function newSlots(count = 4): Slots {
  const views = Array.from(
    { length: count },
    () => new Uint8Array(new SharedArrayBuffer(IO_CHUNK)),
  );
  return { views, busy: views.map(() => Promise.resolve()), next: 0 };
}

/** A sha256 fed in order, possibly on another thread. */
export interface FileHasher {
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
export function localHasher(): FileHasher {
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
export async function feed(
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
