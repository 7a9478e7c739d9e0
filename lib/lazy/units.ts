/**
 * The units of an image file for the lazy file: a framed chunk (lib/image/frames.ts) is a group
 * of its frames whose table is read and verified on the chunk's first touch, not up front (one
 * ranged GET per chunk: ~1000 for a 60 GB image before a VM could start); a chunk without a table
 * (zeros, older sarde) is one unit, read whole.
 *
 * A group's unit count comes from the table's length in the chunk's annotation, which the manifest
 * pins: the presence log numbers units the same way before and after any table is read.
 *
 * @module
 */

import {
  chunkFrameUnits,
  framesInTable,
  type FrameTableLocation,
  frameTableLocation,
  parseFrameTable,
} from "../image/frames.ts";
import { chunkUnits, type ImageFile } from "../image/format.ts";
import type { Descriptor } from "../oci/types.ts";
import type { RegistryClient } from "../registry/client.ts";
import type { UnitGroup } from "./source.ts";

/** Reads the (unverified) bytes of a chunk blob's frame table, where `where` says. */
export type TableReader = (
  blob: Descriptor,
  where: FrameTableLocation,
  signal?: AbortSignal,
) => Promise<Uint8Array>;

/** A {@link TableReader} asking `client` for a ranged GET of the table in `repository`. */
export function registryTableReader(client: RegistryClient, repository: string): TableReader {
  return (blob, where, signal) =>
    client.readBlob(repository, blob, { offset: where.offset, length: where.length }, signal);
}

/**
 * The unit groups of zstd file `file`, one per chunk (annotations checked as `chunkUnits` does):
 * a framed chunk's frames, resolved by `readTable` and verified against the annotation's digest;
 * else the chunk itself.
 */
export function chunkGroups(
  file: ImageFile,
  readTable: TableReader,
  what = file.name,
): UnitGroup[] {
  return chunkUnits(file, what).map((chunk) => {
    const { offset, length, blob } = chunk;
    const where = frameTableLocation(blob);
    if (!where) return { offset, length, count: 1, units: [chunk] };
    return {
      offset,
      length,
      count: framesInTable(where),
      resolve: async (signal) =>
        chunkFrameUnits(blob, offset, parseFrameTable(await readTable(blob, where, signal), blob)),
    };
  });
}
