/**
 * Framed zstd chunks: a chunk blob made of independent zstd frames of {@link FRAME_SIZE}
 * uncompressed bytes, followed by a table that lets a lazy reader fetch and verify one frame
 * without the rest of the blob.
 *
 * Layout of a framed chunk blob (all integers little-endian):
 *
 * ```
 * frame 0 … frame N-1                     zstd frames (content size and XXH64 checksum set)
 * 0x184D2A53  8+32·N  sha256 × N          sarde's skippable frame: digest of each frame's bytes
 * 0x184D2A5E  8·(N+1)+9  entries  footer  zstd seekable format seek table
 * ```
 *
 * The seek table follows zstd's seekable format (contrib/seekable_format): one entry
 * (compressed size, decompressed size) per frame *including* sarde's skippable frame (a
 * skippable frame is listed with decompressed size 0), no checksum flag, footer
 * `N+1, 0x00, 0x8F92EAB1` as the blob's last bytes; so zstd's own seekable tools can seek in a
 * sarde chunk. The sha256 list lives in a frame of its own because the seekable format has room
 * for 32-bit XXH64 checksums only, which do not resist a hostile registry. Skippable frames produce
 * no output: `zstd -d` and sarde versions that decode whole chunks read a framed blob as the
 * chunk's bytes.
 *
 * The *table* is the two skippable frames, from the sha256 frame to the end of the blob. The
 * chunk's layer descriptor pins it with {@link Annotation.chunkFrames}
 * (`<table offset>:<table length>:sha256:<hex>`), and the manifest pins the descriptor: the chain
 * of trust is manifest → table → frame digests → frame bytes.
 *
 * Chunks of zeros and empty chunks are not framed (no annotation): the zero chunk is one blob
 * reused for every chunk of that length (lib/image/zstd.ts), and a reader knows the bytes of a
 * chunk whose digest is that of zeros without fetching anything. Chunks of older sarde have no
 * annotation either: they are read whole.
 *
 * @module
 */

import { createDigester } from "../oci/digest.ts";
import type { Descriptor } from "../oci/types.ts";
import { fail } from "../util/errors.ts";
import { Annotation, type FileUnit, type ImageFile } from "./format.ts";

/**
 * Uncompressed bytes per frame of a zstd chunk: 2 MiB, the smallest size that stays within the
 * 3 % size budget of lazy pull (issue 10) on a disk like a real root file system. Measured at
 * level 2 with 64 MiB chunks, compressed size against one frame per chunk:
 *
 * - ext4 qcow2 of /usr/{bin,share,libexec,include} and /etc, 1.4 GB → 479.3 MB: 1 MiB frames
 *   +3.41 %, 2 MiB +1.34 %, 4 MiB +0.63 %;
 * - 512 MiB tar of /usr/lib and /usr/share → 222.0 MB: +1.34 %, +0.64 %, +0.32 %;
 * - 2 GiB mixed qcow2 (/work/shared/recipes/make-mixed-qcow2.sh: random, zeros, files) → 960.2 MB:
 *   +0.70 %, +0.30 %, +0.14 %.
 *
 * A frame is the unit a lazy pull fetches: 32 per chunk where a booting guest touching scattered
 * 1 MiB regions made chunk-granular fetching pull ~30 % of the disk. Export CPU rises by 4–15 %
 * whatever the frame size, mostly because every byte is hashed once more (sha256) for the frame
 * digests: the ext4 disk with 2 workers took 11.2 → 11.7 CPU s (median of 3) and no longer in
 * wall time (7.5–9.0 s before, 7.1–9.1 s after, on a busy 2-core machine).
 */
export const FRAME_SIZE = 2 << 20;

/**
 * Largest frame a table may declare: a lazy reader holds a frame in memory, so a hostile table
 * must not make it allocate more.
 */
export const MAX_FRAME_SIZE = 64 << 20;

/** One frame of a framed chunk, from its verified table. */
export interface Frame {
  /** Offset of the frame's compressed bytes in the blob. */
  offset: number;
  /** Compressed bytes of the frame. */
  compressedSize: number;
  /** Offset of the frame's uncompressed bytes in the chunk. */
  chunkOffset: number;
  /** Uncompressed bytes of the frame. */
  size: number;
  /** sha256 of the frame's uncompressed bytes (`sha256:…`). */
  digest: string;
}

/** Where a chunk blob's frame table is, as its layer annotation pins it. */
export interface FrameTableLocation {
  /** Offset of the table in the blob (= the compressed size of the frames). */
  offset: number;
  /** Length of the table: it ends where the blob ends. */
  length: number;
  /** sha256 of the table's bytes (`sha256:…`). */
  digest: string;
}

/** One frame as the encoder records it, to write the table. */
export interface FrameRecord {
  compressedSize: number;
  size: number;
  /** The raw 32-byte sha256 of the frame's uncompressed bytes. */
  sha256: Uint8Array;
}

/**
 * The table bytes (sarde's sha256 frame, then the seek table) for `frames`, in order.
 *
 * Self-contained, as the codec worker runs its source (lib/image/codec_worker.ts): it may refer
 * to nothing outside itself. {@link parseFrameTable} accepts exactly what this writes.
 */
export function encodeFrameTable(frames: FrameRecord[]): Uint8Array {
  const SHA256_MAGIC = 0x184d2a53; // a zstd skippable frame magic (0x184D2A50–5F)
  const SEEK_MAGIC = 0x184d2a5e; // the seekable format's skippable frame
  const SEEKABLE_FOOTER_MAGIC = 0x8f92eab1;
  const n = frames.length;
  const shaFrame = 8 + 32 * n;
  const entries = n + 1; // the frames and sarde's sha256 frame
  const seekContent = 8 * entries + 9;
  const out = new Uint8Array(shaFrame + 8 + seekContent);
  const v = new DataView(out.buffer);
  v.setUint32(0, SHA256_MAGIC, true);
  v.setUint32(4, 32 * n, true);
  frames.forEach((f, i) => out.set(f.sha256, 8 + 32 * i));
  let p = shaFrame;
  v.setUint32(p, SEEK_MAGIC, true);
  v.setUint32(p + 4, seekContent, true);
  p += 8;
  for (const f of frames) {
    v.setUint32(p, f.compressedSize, true);
    v.setUint32(p + 4, f.size, true);
    p += 8;
  }
  v.setUint32(p, shaFrame, true); // sarde's frame: compressed size, decompressed 0
  v.setUint32(p + 4, 0, true);
  p += 8;
  v.setUint32(p, entries, true);
  v.setUint8(p + 4, 0); // Seek_Table_Descriptor: no checksums
  v.setUint32(p + 5, SEEKABLE_FOOTER_MAGIC, true);
  return out;
}

/** The value of {@link Annotation.chunkFrames} for a table. */
export function frameTableAnnotation(t: FrameTableLocation): string {
  return `${t.offset}:${t.length}:${t.digest}`;
}

/** Frames in a table of `length` bytes (see the module doc: 8+32·N + 8+8·(N+1)+9). */
const framesIn = (length: number) => (length - 33) / 40;

/**
 * The frames of the table at `where` (its length gives their number): a lazy reader numbers a
 * chunk's units before it reads the table, so that its presence log means the same across restarts.
 */
export function framesInTable(where: FrameTableLocation): number {
  return framesIn(where.length);
}

/** The layer's name in errors. */
const layerName = (layer: Descriptor) => {
  const a = layer.annotations ?? {};
  const name = a[Annotation.fileName] ?? a[Annotation.title] ?? layer.digest;
  return `chunk ${a[Annotation.chunkIndex] ?? "?"} of ${name}`;
};

/** A whole number from an annotation; `undefined` if it is not one. */
const wholeNumber = (s: string | undefined) =>
  s !== undefined && /^\d{1,15}$/.test(s) ? Number(s) : undefined;

/**
 * Where the frame table of a zstd chunk layer is, from its {@link Annotation.chunkFrames}
 * annotation; `undefined` for a chunk without one (older sarde, zero or empty chunks), which is
 * read whole.
 *
 * Throws an `integrity` error for a malformed annotation or one that cannot describe a table at
 * the end of this blob.
 */
export function frameTableLocation(layer: Descriptor): FrameTableLocation | undefined {
  const value = layer.annotations?.[Annotation.chunkFrames];
  if (value === undefined) return undefined;
  const bad = (why: string) =>
    fail("integrity", `${layerName(layer)}: annotation ${Annotation.chunkFrames} ${why}`);
  const m = /^(\d{1,15}):(\d{1,15}):(sha256:[a-f0-9]{64})$/.exec(value);
  if (!m) throw bad("is not <offset>:<length>:sha256:<hex>");
  const offset = Number(m[1]), length = Number(m[2]);
  if (offset + length !== layer.size) throw bad("does not end at the end of the blob");
  const chunkSize = wholeNumber(layer.annotations?.[Annotation.chunkSize]);
  if (chunkSize === undefined || chunkSize === 0) throw bad("is on a chunk without a size");
  const frames = framesIn(length);
  // At least one frame, and no more than one per byte of chunk: bounds what a reader fetches.
  if (!Number.isInteger(frames) || frames < 1 || frames > chunkSize) {
    throw bad("has a length no table has");
  }
  return { offset, length, digest: m[3] };
}

/**
 * Verifies and reads a frame table: `bytes` must be the blob's bytes at the place
 * {@link frameTableLocation} gives, with its sha256. The frames must tile the chunk (sizes summing
 * to its annotated size, each at most {@link MAX_FRAME_SIZE}) and the compressed frames the blob
 * up to the table.
 *
 * Throws an `integrity` error naming the layer otherwise.
 */
export function parseFrameTable(bytes: Uint8Array, layer: Descriptor): Frame[] {
  const where = frameTableLocation(layer);
  const name = layerName(layer);
  if (!where) throw fail("integrity", `${name}: no frame table annotation`);
  const bad = (why: string) => fail("integrity", `${name}: frame table ${why}`);
  if (bytes.length !== where.length) {
    throw bad(`is ${bytes.length} bytes, expected ${where.length}`);
  }
  const h = createDigester();
  h.update(bytes);
  const digest = h.digest();
  if (digest !== where.digest) throw bad(`is ${digest}, expected ${where.digest}`);
  // The digest pins what sarde wrote; the checks below keep a table sarde would never write (a
  // bug, or an image made to attack readers) from sending reads outside the blob or the chunk.
  const n = framesIn(bytes.length);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const entries = 8 + 32 * n + 8;
  const records: FrameRecord[] = [];
  const frames: Frame[] = [];
  let offset = 0, chunkOffset = 0;
  for (let i = 0; i < n; i++) {
    const compressedSize = v.getUint32(entries + 8 * i, true);
    const size = v.getUint32(entries + 8 * i + 4, true);
    if (compressedSize === 0 || size === 0 || size > MAX_FRAME_SIZE) {
      throw bad(`has a frame ${i} of ${compressedSize} bytes for ${size}`);
    }
    const sha256 = bytes.subarray(8 + 32 * i, 8 + 32 * i + 32);
    records.push({ compressedSize, size, sha256 });
    const hex = Array.from(sha256, (b) => b.toString(16).padStart(2, "0")).join("");
    frames.push({ offset, compressedSize, chunkOffset, size, digest: `sha256:${hex}` });
    offset += compressedSize;
    chunkOffset += size;
  }
  const canonical = encodeFrameTable(records);
  if (canonical.length !== bytes.length || canonical.some((b, i) => b !== bytes[i])) {
    throw bad("is not in sarde's layout");
  }
  if (offset !== where.offset) throw bad("has frames that do not end where the table starts");
  const chunkSize = Number(layer.annotations?.[Annotation.chunkSize]);
  if (chunkOffset !== chunkSize) {
    throw bad(`has frames of ${chunkOffset} bytes in all, the chunk has ${chunkSize}`);
  }
  return frames;
}

/**
 * The units of a zstd file, in file order: one per frame of a chunk with a table, one for each
 * other chunk (whole blob). `tables[i]` is the parsed table of `file.layers[i]`, `undefined` for a
 * chunk read whole; a chunk that has a table annotation must have its table given.
 */
export function frameUnits(file: ImageFile, tables: (Frame[] | undefined)[]): FileUnit[] {
  const units: FileUnit[] = [];
  for (const [i, blob] of file.layers.entries()) {
    const a = blob.annotations ?? {};
    const offset = Number(a[Annotation.chunkOffset]);
    const length = Number(a[Annotation.chunkSize]);
    const frames = tables[i];
    if (!frames) {
      if (frameTableLocation(blob)) {
        throw fail("usage", `${layerName(blob)}: its frame table was not read`);
      }
      units.push({ offset, length, blob, digest: a[Annotation.chunkDigest]! });
      continue;
    }
    units.push(...chunkFrameUnits(blob, offset, frames));
  }
  return units;
}

/** The units of the framed chunk `blob`, which starts at `offset` of its file: one per frame. */
export function chunkFrameUnits(blob: Descriptor, offset: number, frames: Frame[]): FileUnit[] {
  return frames.map((f) => ({
    offset: offset + f.chunkOffset,
    length: f.size,
    blob,
    range: { offset: f.offset, length: f.compressedSize },
    digest: f.digest,
  }));
}
