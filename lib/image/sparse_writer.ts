/**
 * Writing a decoded stream into a file sparsely: a 4 MiB-aligned block of zeros is skipped (left
 * as a hole), as tart does since its "284% faster pulls" change. Private to lib/image/.
 *
 * @module
 */

import { createDigester, IO_CHUNK } from "../oci/digest.ts";
import { fail } from "../util/errors.ts";
import { isZero } from "./holes.ts";

/** Writes all of `data` at the current position of `file`. */
export async function writeAll(file: Deno.FsFile, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await file.write(data.subarray(off));
}

/**
 * Writes a stream at a file offset in 4 MiB blocks aligned to the *file* (not the stream), skips
 * all-zero blocks (the target range must already read as zeros: a fresh or truncated file), and
 * hashes everything. Two block buffers alternate so one write is in flight while the next block
 * fills.
 */
export class SparseWriter {
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
export async function drainInto(
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
