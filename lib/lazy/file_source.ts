/**
 * A {@link BlockSource} over a local file: the export of a file that is already complete (tests,
 * and the layers of a lazy import that have finished downloading).
 *
 * @module
 */

import { open } from "node:fs/promises";
import type { BlockSource } from "./nbd.ts";

/** A file opened as a {@link BlockSource}; close it (or `await using`) when the export ends. */
export interface FileSource extends BlockSource {
  /** Closes the file. */
  close(): Promise<void>;
  /** Same as {@link FileSource.close}. */
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * Opens `path` read-only as a block source of its current size. Reads are positional (`pread`),
 * so concurrent requests need no locking and never move a shared file offset.
 */
export async function openFileSource(path: string): Promise<FileSource> {
  const fh = await open(path, "r");
  const size = (await fh.stat()).size;
  const close = () => fh.close();
  return {
    size,
    async read(offset, length) {
      const buf = new Uint8Array(length);
      for (let done = 0; done < length;) {
        const { bytesRead } = await fh.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) throw new Error(`${path}: end of file at ${offset + done}`);
        done += bytesRead;
      }
      return buf;
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}
