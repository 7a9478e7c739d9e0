/**
 * The sardinecake image format: how a VM's files become OCI layers and back.
 *
 * Two disk encodings share one manifest shape (layer 0 the domain XML, then the optional VM
 * config, then the disk files, base before overlay):
 * - `gzip`: sardinecake 0.4's layout. One gzip stream per file (the file name lives in the gzip
 *   header), cut into pieces; the first piece has media type `<mime>+gzip`, the N-th following
 *   one `<mime>+gzip;chunk=N`. 0.4 can import these.
 * - `zstd`: fixed-size uncompressed chunks, each independent zstd frames plus a table of them
 *   (lib/image/frames.ts; one frame without a table from older sarde), media type
 *   `<mime>+zstd`, with annotations naming the file, the chunk's place and the uncompressed
 *   digests, so chunks can be fetched, decoded and verified in parallel and unchanged chunks are
 *   identical blobs.
 *
 * @module
 */

import { fail } from "../util/errors.ts";
import { isDigest } from "../oci/digest.ts";
import type { Descriptor, Manifest } from "../oci/types.ts";
import { MediaType } from "../oci/types.ts";

/** Annotation keys on zstd disk layers. */
export const Annotation = {
  /** OCI's own: the file name (basename) the layer belongs to. */
  title: "org.opencontainers.image.title",
  fileName: "org.sardinecake.file.name",
  fileSize: "org.sardinecake.file.size",
  fileDigest: "org.sardinecake.file.digest",
  chunkIndex: "org.sardinecake.chunk.index",
  chunkOffset: "org.sardinecake.chunk.offset",
  chunkSize: "org.sardinecake.chunk.size",
  chunkDigest: "org.sardinecake.chunk.digest",
  /**
   * Where a framed chunk's frame table is and its sha256: `<offset>:<length>:sha256:<hex>` (see
   * lib/image/frames.ts). Absent on chunks read whole: zero or empty chunks, older sarde.
   */
  chunkFrames: "org.sardinecake.chunk.frames",
  /** Basename of the file's qcow2 backing file inside the image, and its format. */
  backingFile: "org.sardinecake.file.backing",
  backingFormat: "org.sardinecake.file.backing-format",
  /** Manifest annotation: the total uncompressed size of all files (free-space checks). */
  uncompressedSize: "org.sardinecake.uncompressed-size",
  /**
   * Image config label: the zstd files (JSON list of {@link ZstdFileEntry}), so that the config
   * — the image ID — pins how the chunks make up files, not only the chunks' contents.
   */
  files: "org.sardinecake.files",
} as const;

/** One zstd file as the image config lists it (label {@link Annotation.files}). */
export interface ZstdFileEntry {
  name: string;
  size: number;
  digest: string;
  chunks: number;
  backing?: string;
  backingFormat?: string;
}

/** The {@link ZstdFileEntry} of a file grouped from a manifest. */
export function zstdFileEntry(f: ImageFile): ZstdFileEntry {
  return {
    name: f.name,
    size: f.size!,
    digest: f.digest!,
    chunks: f.layers.length,
    ...(f.backingFile ? { backing: f.backingFile, backingFormat: f.backingFormat } : {}),
  };
}

/** Disk encodings `sarde export --compression` offers. */
export type Compression = "zstd" | "gzip";

/** The media type without parameters (`a/b+gzip;chunk=2` → `a/b+gzip`). */
export function bareMediaType(mediaType: string): string {
  return mediaType.split(";")[0].trim();
}

/** The `chunk=N` parameter of a gzip continuation layer, or 0 for a first piece. */
export function gzipChunkIndex(mediaType: string): number {
  const m = /;\s*chunk=(\d+)/.exec(mediaType);
  return m ? Number(m[1]) : 0;
}

/** Guesses the MIME type of a disk file from its first bytes, as libmagic would name it. */
export function detectMime(head: Uint8Array): string {
  if (
    head.length >= 4 && head[0] === 0x51 && head[1] === 0x46 && head[2] === 0x49 && head[3] === 0xfb
  ) {
    return "application/x-qemu-disk";
  }
  const iso = (off: number) =>
    head.length >= off + 5 && String.fromCharCode(...head.subarray(off, off + 5)) === "CD001";
  if (iso(0x8001) || iso(0x8801) || iso(0x9001)) return "application/x-iso9660-image";
  return "application/octet-stream";
}

/** Reads the first 40 KiB of a file for {@link detectMime}. */
export async function detectFileMime(path: string): Promise<string> {
  using f = await Deno.open(path);
  const buf = new Uint8Array(40 * 1024);
  let n = 0;
  for (;;) {
    const r = await f.read(buf.subarray(n));
    if (r === null || r === 0) break;
    n += r;
    if (n === buf.length) break;
  }
  return detectMime(buf.subarray(0, n));
}

/** One file of the VM as stored in an image, with the layers that carry it, in order. */
export interface ImageFile {
  /** Basename in the VM folder. */
  name: string;
  encoding: Compression;
  layers: Descriptor[];
  /** zstd only: uncompressed size and digest of the whole file. */
  size?: number;
  digest?: string;
  /** zstd only: the file's backing file (basename) and its format. */
  backingFile?: string;
  backingFormat?: string;
}

const isGzipLayer = (d: Descriptor) => bareMediaType(d.mediaType).endsWith("+gzip");
const isZstdLayer = (d: Descriptor) => bareMediaType(d.mediaType).endsWith("+zstd");

/** A file name from an image is used as a path component: only plain basenames are accepted. */
export function checkImageFileName(name: string, where: string): string {
  if (
    !name || name === "." || name === ".." || name.includes("/") || name.includes("\0") ||
    name.startsWith(".") ||
    name.length > 255
  ) {
    throw fail(
      "usage",
      `refusing to import: ${where} names the file '${name}', which is not a plain file name`,
    );
  }
  return name;
}

function intAnnotation(d: Descriptor, key: string, where: string): number {
  const v = d.annotations?.[key];
  const n = Number(v);
  if (v === undefined || !/^\d+$/.test(v) || !Number.isSafeInteger(n)) {
    throw fail("integrity", `${where}: annotation ${key} is missing or not a whole number`);
  }
  return n;
}

/**
 * Groups a manifest's disk layers into files. gzip pieces follow 0.4's rule (a layer without
 * `chunk=N` starts a file, `chunk=N` continues it), file names come later from the gzip header;
 * zstd chunks are grouped by their file-name annotation and checked to tile the file exactly.
 */
export function groupDiskLayers(manifest: Manifest, what: string): ImageFile[] {
  const files: ImageFile[] = [];
  const zstd = new Map<string, ImageFile>();
  let gzipCurrent: ImageFile | undefined;
  for (const [i, layer] of manifest.layers.entries()) {
    const where = `${what} layer ${i}`;
    if (isGzipLayer(layer)) {
      const chunk = gzipChunkIndex(layer.mediaType);
      if (chunk === 0) {
        gzipCurrent = { name: "", encoding: "gzip", layers: [layer] };
        files.push(gzipCurrent);
      } else {
        if (!gzipCurrent || chunk !== gzipCurrent.layers.length) {
          throw fail("integrity", `${where}: gzip piece chunk=${chunk} is out of order`);
        }
        gzipCurrent.layers.push(layer);
      }
    } else if (isZstdLayer(layer)) {
      gzipCurrent = undefined;
      const name = layer.annotations?.[Annotation.fileName] ??
        layer.annotations?.[Annotation.title];
      if (!name) throw fail("integrity", `${where}: zstd layer without a file-name annotation`);
      checkImageFileName(name, where);
      let f = zstd.get(name);
      if (!f) {
        f = {
          name,
          encoding: "zstd",
          layers: [],
          size: intAnnotation(layer, Annotation.fileSize, where),
          digest: layer.annotations?.[Annotation.fileDigest],
          backingFile: layer.annotations?.[Annotation.backingFile],
          backingFormat: layer.annotations?.[Annotation.backingFormat],
        };
        if (f.backingFile) checkImageFileName(f.backingFile, `${where} backing file`);
        zstd.set(name, f);
        files.push(f);
      }
      f.layers.push(layer);
    } else {
      gzipCurrent = undefined;
    }
  }
  for (const f of zstd.values()) {
    f.layers.sort((a, b) =>
      intAnnotation(a, Annotation.chunkIndex, f.name) -
      intAnnotation(b, Annotation.chunkIndex, f.name)
    );
    let offset = 0;
    for (const [i, l] of f.layers.entries()) {
      const where = `${what}: chunk ${i} of ${f.name}`;
      if (intAnnotation(l, Annotation.chunkIndex, where) !== i) {
        throw fail("integrity", `${where} is missing or duplicated`);
      }
      if (intAnnotation(l, Annotation.chunkOffset, where) !== offset) {
        throw fail("integrity", `${where} has a wrong offset`);
      }
      const digest = l.annotations?.[Annotation.chunkDigest];
      if (!digest || !/^sha256:[a-f0-9]{64}$/.test(digest)) {
        throw fail("integrity", `${where} has no chunk digest`);
      }
      offset += intAnnotation(l, Annotation.chunkSize, where);
    }
    if (offset !== f.size) {
      throw fail("integrity", `${what}: the chunks of ${f.name} do not add up to its size`);
    }
  }
  return files;
}

/**
 * Checks that the image config's `rootfs.diff_ids` describe the manifest's layers, so that the
 * image ID (the config digest, and the default VM name) pins what gets imported; without this, a
 * manifest could pair a trusted config with other layers. The rule, layer by layer in manifest
 * order: an uncompressed layer (XML, VM config) has its own digest as diff_id; a zstd chunk has
 * its uncompressed digest (`org.sardinecake.chunk.digest`, which decoding verifies); a gzip file
 * (its first piece) has the digest of the whole uncompressed file, as sardinecake 0.4 writes it,
 * and its continuation pieces have none.
 *
 * @returns the diff_id of each gzip file, in order, to verify the decoded file against.
 */
export function checkDiffIds(manifest: Manifest, diffIds: unknown, what: string): string[] {
  const ids = Array.isArray(diffIds) && diffIds.every((d) => typeof d === "string")
    ? diffIds as string[]
    : undefined;
  if (!ids) throw fail("integrity", `${what}: the image config has no rootfs.diff_ids list`);
  const gzipFiles: string[] = [];
  let next = 0;
  const mismatch = (i: number, why: string) =>
    fail(
      "integrity",
      `${what}: layer ${i} does not match the image config (${why})`,
      "the manifest and the config disagree; re-export the image with this sarde",
    );
  const lastChunk = new Map<string, number>();
  for (const [i, layer] of manifest.layers.entries()) {
    if (isGzipLayer(layer) && gzipChunkIndex(layer.mediaType) > 0) continue;
    const id = ids[next++];
    if (id === undefined) throw mismatch(i, "more layers than diff_ids");
    if (isGzipLayer(layer)) gzipFiles.push(id);
    else if (isZstdLayer(layer)) {
      if (layer.annotations?.[Annotation.chunkDigest] !== id) throw mismatch(i, `diff_id ${id}`);
      // Chunks in manifest order (the diff_ids' order) are the file's chunks in order.
      const name = layer.annotations?.[Annotation.fileName] ?? "";
      const index = Number(layer.annotations?.[Annotation.chunkIndex]);
      if (index !== (lastChunk.get(name) ?? -1) + 1) throw mismatch(i, "chunk out of order");
      lastChunk.set(name, index);
    } else if (layer.digest !== id) throw mismatch(i, `diff_id ${id}`);
  }
  if (next !== ids.length) throw mismatch(manifest.layers.length, "more diff_ids than layers");
  return gzipFiles;
}

/** Whether the manifest has zstd disk layers (sarde's own encoding). */
export function hasZstdLayers(manifest: Manifest): boolean {
  return manifest.layers.some(isZstdLayer);
}

/**
 * Checks the zstd files grouped from the manifest against the image config's file list (label
 * {@link Annotation.files}): names, sizes, digests, chunk counts and backing files must be the
 * ones the config — the image ID — names.
 */
export function checkZstdFiles(files: ImageFile[], label: unknown, what: string): void {
  const zstd = files.filter((f) => f.encoding === "zstd").map(zstdFileEntry);
  if (zstd.length === 0) return;
  let listed: unknown;
  try {
    listed = typeof label === "string" ? JSON.parse(label) : undefined;
  } catch { /* reported below */ }
  if (JSON.stringify(listed) !== JSON.stringify(zstd)) {
    throw fail(
      "integrity",
      `${what}: the disk files of the manifest are not the ones the image config lists`,
      listed === undefined
        ? "the image was made by an older sarde; re-export it"
        : "the manifest and the config disagree; re-export the image with this sarde",
    );
  }
}

/** The layer holding the domain XML. */
export function domainLayer(manifest: Manifest, what: string): Descriptor {
  const l = manifest.layers.find((d) => bareMediaType(d.mediaType) === MediaType.libvirtDomain);
  if (!l) throw fail("usage", `${what} is not a sardinecake VM image (no libvirt domain layer)`);
  return l;
}

/** The optional VM config layer. */
export function vmConfigLayer(manifest: Manifest): Descriptor | undefined {
  return manifest.layers.find((d) => bareMediaType(d.mediaType) === MediaType.sardineConfig);
}

/** A validated sardine VM config (`users`, `services`; other keys kept as they are). */
export interface VmConfig {
  /** Accounts of the guest, e.g. for the executor's SSH login. */
  users?: { username: string; password: string; [k: string]: unknown }[];
  /** Services the guest offers, e.g. `{ service: "ssh", port: 22, protocol: "tcp" }`. */
  services?: { service: string; port: number; protocol: "tcp" | "udp"; [k: string]: unknown }[];
  /** Other keys, kept as they are. */
  [k: string]: unknown;
}

/** Validates a VM config against sardinecake's schema; throws one `usage` error listing the faults. */
export function validateVmConfig(value: unknown, where: string): VmConfig {
  const problems: string[] = [];
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw fail("usage", `${where}: the VM config must be a JSON object`);
  }
  const v = value as Record<string, unknown>;
  if (v.users !== undefined) {
    if (!Array.isArray(v.users)) problems.push("'users' must be an array");
    else {
      v.users.forEach((u, i) => {
        if (typeof u !== "object" || u === null) {
          return problems.push(`users[${i}] must be an object`);
        }
        const o = u as Record<string, unknown>;
        if (typeof o.username !== "string") problems.push(`users[${i}].username must be a string`);
        if (typeof o.password !== "string") problems.push(`users[${i}].password must be a string`);
      });
    }
  }
  if (v.services !== undefined) {
    if (!Array.isArray(v.services)) problems.push("'services' must be an array");
    else {
      v.services.forEach((s, i) => {
        if (typeof s !== "object" || s === null) {
          return problems.push(`services[${i}] must be an object`);
        }
        const o = s as Record<string, unknown>;
        if (typeof o.service !== "string") problems.push(`services[${i}].service must be a string`);
        if (
          typeof o.port !== "number" || !Number.isInteger(o.port) || o.port < 1 || o.port > 65535
        ) {
          problems.push(`services[${i}].port must be an integer from 1 to 65535`);
        }
        if (o.protocol !== "tcp" && o.protocol !== "udp") {
          problems.push(`services[${i}].protocol must be "tcp" or "udp"`);
        }
      });
    }
  }
  if (problems.length) {
    throw fail(
      "usage",
      `${where} does not follow the sardine VM config schema: ${problems.join("; ")}`,
    );
  }
  return v as VmConfig;
}

/**
 * The smallest verified piece of an image file (docs/lazy-pull.md, part 2): what a lazy pull
 * fetches, decodes and checks on its own. Today a whole zstd chunk; with framed chunks, one zstd
 * frame of a chunk blob, located by `range`.
 */
export interface FileUnit {
  /** Where the unit starts in the uncompressed file. */
  offset: number;
  /** Uncompressed bytes of the unit. */
  length: number;
  /** The chunk layer holding the unit. */
  blob: Descriptor;
  /** The compressed bytes of the unit in the blob; absent: the whole blob. */
  range?: { offset: number; length: number };
  /** sha256 of the uncompressed bytes (`sha256:…`). */
  digest: string;
}

/**
 * Upper bound of a zstd frame's size for `length` input bytes: libzstd's `ZSTD_COMPRESSBOUND`
 * plus room for the frame header and checksum. An honest chunk blob is never larger; a manifest
 * that says otherwise would make a reader buffer whatever the registry sends.
 */
export function zstdFrameBound(length: number): number {
  const small = length < 128 << 10 ? ((128 << 10) - length) >> 11 : 0;
  return length + Math.floor(length / 256) + small + 64;
}

/**
 * The units of a zstd file at chunk granularity: one per chunk layer, at the offset, size and
 * uncompressed digest its annotations give. The annotations come from the manifest, which may be
 * hostile, so they are checked here again even though {@link groupDiskLayers} checked them: the
 * chunks must be numbered 0…n-1 in order and tile the file exactly (no gap, no overlap, no empty
 * chunk but the one of an empty file), and a blob may not be larger than a zstd frame of its
 * chunk can be (what a lazy reader holds in memory is bounded by that).
 *
 * gzip files (sardinecake 0.4) are one compressed stream each: no part of them can be decoded
 * without all that comes before, so they cannot be read lazily. They are refused with a `usage`
 * error; callers pull them in full (check `file.encoding` first).
 */
export function chunkUnits(file: ImageFile, what = file.name): FileUnit[] {
  if (file.encoding !== "zstd") {
    throw fail(
      "usage",
      `${what} is a gzip file (sardinecake 0.4): it cannot be read lazily`,
      "pull the image in full",
    );
  }
  const size = file.size;
  if (size === undefined || !Number.isSafeInteger(size) || size < 0) {
    throw fail("integrity", `${what}: the file size is missing or invalid`);
  }
  const units: FileUnit[] = [];
  let next = 0;
  for (const [i, blob] of file.layers.entries()) {
    const where = `${what}: chunk ${i}`;
    if (intAnnotation(blob, Annotation.chunkIndex, where) !== i) {
      throw fail("integrity", `${where} is missing, duplicated or out of order`);
    }
    const offset = intAnnotation(blob, Annotation.chunkOffset, where);
    const length = intAnnotation(blob, Annotation.chunkSize, where);
    if (offset !== next) {
      throw fail(
        "integrity",
        `${where} starts at ${offset}, not at ${next}: the chunks ${
          offset < next ? "overlap" : "leave a gap"
        }`,
      );
    }
    if (length === 0 && size !== 0) throw fail("integrity", `${where} is empty`);
    if (offset + length > size) throw fail("integrity", `${where} ends beyond the file's size`);
    const digest = blob.annotations?.[Annotation.chunkDigest] ?? "";
    if (!isDigest(digest)) throw fail("integrity", `${where} has no valid chunk digest`);
    if (!isDigest(blob.digest) || !Number.isSafeInteger(blob.size) || blob.size <= 0) {
      throw fail("integrity", `${where}: the layer has an invalid digest or size`);
    }
    if (blob.size > zstdFrameBound(length)) {
      throw fail(
        "integrity",
        `${where}: a blob of ${blob.size} bytes for ${length} bytes is larger than zstd makes`,
      );
    }
    units.push({ offset, length, blob, digest });
    next = offset + length;
  }
  if (next !== size || units.length === 0) {
    throw fail("integrity", `${what}: the chunks cover ${next} of the file's ${size} bytes`);
  }
  return units;
}
