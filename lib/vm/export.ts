/**
 * `sarde export`: a libvirt VM (its domain XML, every disk with its whole backing chain, NVRAM and
 * kernel files) becomes an OCI image in the local store.
 *
 * @module
 */

import { basename, dirname, extname, join, resolve } from "node:path";
import { encodeGzip, frameTableAnnotation } from "../image/mod.ts";
import { type ChunkBlob, encodeZstd } from "../image/zstd.ts";
import { onInterrupt } from "../util/cleanup.ts";
import { digestOf } from "../oci/digest.ts";
import {
  anonymizeDomain,
  bootFiles,
  type DomainDoc,
  domainName,
  fileDisks,
  ociArchitecture,
  ociOs,
  parseDomainXml,
  serializeDomainXml,
  setElementText,
} from "./domain.ts";
import { fail } from "../util/errors.ts";
import {
  Annotation,
  type Compression,
  detectFileMime,
  validateVmConfig,
  type VmConfig,
  type ZstdFileEntry,
} from "../image/format.ts";
import {
  addToIndex,
  blobPath,
  type Layout,
  lockLayout,
  openLayout,
  readIndex,
  writeBlob,
  writeIndex,
} from "../oci/layout.ts";
import { type ConnectOptions, domainState, dumpXml } from "./libvirt.ts";
import { debug, info, warn } from "../util/log.ts";
import { type Descriptor, MediaType } from "../oci/types.ts";
import { formatBytes, type Progress, startProgress } from "../util/progress.ts";
import { backingChain, rebaseUnsafe } from "./qemu.ts";
import { parseReference, type Reference } from "../oci/reference.ts";
import { layoutDir } from "../oci/store.ts";
import { checkMinSize, formatSize } from "../util/units.ts";
import { DEFAULT_ZSTD_CHUNK, DEFAULT_ZSTD_LEVEL } from "../util/defaults.ts";

/**
 * Smallest zstd chunk. Every chunk is a layer (about 700 bytes of manifest) and a task of its own:
 * `--chunksize 64`, the unit forgotten, made a 70,657-layer, 51 MB manifest out of 4 MiB.
 */
export const MIN_ZSTD_CHUNK = 1 << 20;

/**
 * Smallest gzip piece. Pieces are cuts of one compressed stream, each a small layer, so they may be
 * smaller than zstd chunks; sizes without a unit are still caught.
 */
export const MIN_GZIP_PIECE = 64 << 10;

/** Largest manifest that registries (distribution's limit) and sarde itself accept. */
export const MAX_MANIFEST_BYTES = 4 << 20;

/** Refuses a chunk size below the minimum of `compression`; `what` names it in the error. */
export function checkChunkSize(
  size: number,
  compression: Compression,
  what = "chunk size",
): number {
  return compression === "zstd"
    ? checkMinSize(size, MIN_ZSTD_CHUNK, what, "the minimum for zstd chunks")
    : checkMinSize(size, MIN_GZIP_PIECE, what, "the minimum for gzip pieces");
}

/** Options for {@link exportVm}. */
export interface ExportOptions extends ConnectOptions {
  /** The local store. */
  ocidir: string;
  /** Read the domain XML from this file instead of libvirt ("experts only", as in 0.4). */
  libvirtConfig?: string;
  /** The VM config (users, services) as a file path or an object. */
  vmConfig?: string | VmConfig;
  /** Disk encoding (default `zstd`). */
  compression?: Compression;
  /**
   * zstd: uncompressed chunk size (default {@link DEFAULT_ZSTD_CHUNK}, at least
   * {@link MIN_ZSTD_CHUNK}); gzip: compressed piece size (default: one piece per file, at least
   * {@link MIN_GZIP_PIECE}).
   */
  chunkSize?: number;
  /** zstd level 1…19 (default {@link DEFAULT_ZSTD_LEVEL}). */
  zstdLevel?: number;
  /** Export a running VM anyway (its disks may be inconsistent). */
  force?: boolean;
  /** Cancels the export. */
  signal?: AbortSignal;
  /**
   * Called with every disk blob as soon as it is in the store, before the image is complete
   * (`export --push` uploads them meanwhile). The blob's media type is not final yet.
   */
  onBlob?: (layout: Layout, blob: Descriptor) => void;
}

/** What {@link exportVm} produced. */
export interface ExportResult {
  /** The config digest (`sha256:…`): the image ID. */
  imageId: string;
  /** The digest of the image manifest. */
  manifestDigest: string;
  /** Local name with tag, e.g. `registry.example.org/sardines/debian12:latest`. */
  reference: string;
  /** Every file stored, in image order. */
  files: { name: string; path: string; size: number; digest: string }[];
}

/** One file of the VM to store. */
interface VmFile {
  path: string;
  name: string;
  backing?: VmFile;
  backingFormat?: string;
  /** The backing reference as written in the file's qcow2 header. */
  headerBacking?: string;
}

function uniqueName(wanted: string, used: Set<string>): string {
  let name = wanted.replace(/^\.+/, "_") || "disk";
  if (used.has(name)) {
    const ext = extname(name);
    const stem = name.slice(0, name.length - ext.length);
    let i = 1;
    while (used.has(`${stem}-${i}${ext}`)) i++;
    name = `${stem}-${i}${ext}`;
  }
  used.add(name);
  return name;
}

async function readVmConfig(source: string | VmConfig | undefined): Promise<VmConfig | undefined> {
  if (source === undefined) return undefined;
  if (typeof source !== "string") return validateVmConfig(source, "VM config");
  let text: string;
  try {
    text = await Deno.readTextFile(source);
  } catch (err) {
    throw fail("usage", `cannot read VM config ${source}: ${(err as Error).message}`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw fail("usage", `VM config ${source} is not valid JSON: ${(err as Error).message}`);
  }
  return validateVmConfig(value, `VM config ${source}`);
}

/** Collects every file of the VM (disk chains base first, then boot files), with unique names. */
async function collectFiles(
  doc: DomainDoc,
  baseDir: string,
): Promise<{ files: VmFile[]; tops: Map<string, VmFile> }> {
  const byPath = new Map<string, VmFile>();
  const used = new Set<string>();
  const files: VmFile[] = [];
  const tops = new Map<string, VmFile>();
  const add = (path: string): VmFile => {
    let f = byPath.get(path);
    if (!f) {
      f = { path, name: uniqueName(basename(path), used) };
      byPath.set(path, f);
      files.push(f);
    }
    return f;
  };
  for (const disk of fileDisks(doc)) {
    const top = resolve(baseDir, disk.path);
    try {
      await Deno.stat(top);
    } catch {
      throw fail("not-found", `disk ${disk.target || "?"} of the VM: ${top} does not exist`);
    }
    const chain = (await backingChain(top)).reverse(); // base → top
    let below: VmFile | undefined;
    let belowFormat: string | undefined;
    for (const element of chain) {
      const f = add(element.realFilename);
      if (below && !f.backing) {
        f.backing = below;
        f.backingFormat = belowFormat;
        f.headerBacking = element.backingFilename;
      }
      below = f;
      belowFormat = element.format;
    }
    tops.set(disk.path, below!);
  }
  for (const bf of bootFiles(doc)) {
    const path = resolve(baseDir, bf.path);
    const real = await Deno.realPath(path).catch(() => {
      throw fail("not-found", `<${bf.kind}> of the VM: ${path} does not exist`);
    });
    add(real);
  }
  return { files, tops };
}

/** A temporary copy of `f` whose qcow2 header names its backing file by its name in the image. */
async function rebasedCopy(f: VmFile, scratch: string, cleanups: string[]): Promise<string> {
  const dir = join(scratch, `.rebase-${Deno.pid}-${crypto.randomUUID()}`);
  await Deno.mkdir(dir);
  cleanups.push(dir);
  const copy = join(dir, f.name);
  const cp = await new Deno.Command("cp", {
    args: ["--sparse=always", "--reflink=auto", f.path, copy],
    stderr: "piped",
  }).output();
  if (!cp.success) {
    throw fail("io", `cannot copy ${f.path}: ${new TextDecoder().decode(cp.stderr).trim()}`);
  }
  const backing = f.backing!.name.includes(":") ? `./${f.backing!.name}` : f.backing!.name;
  await rebaseUnsafe(copy, backing, f.backingFormat ?? "qcow2");
  debug(`${f.name}: stored with backing file ${backing} instead of ${f.headerBacking}`);
  return copy;
}

/** The manifest entry of chunk `index` of the zstd-encoded file `f`. */
function zstdChunkLayer(
  f: VmFile,
  mime: string,
  file: { size: number; digest: string },
  index: number,
  chunk: Omit<ChunkBlob, "path">,
): Descriptor {
  return {
    mediaType: `${mime}+zstd`,
    digest: chunk.digest,
    size: chunk.size,
    annotations: {
      [Annotation.title]: f.name,
      [Annotation.fileName]: f.name,
      [Annotation.fileSize]: String(file.size),
      [Annotation.fileDigest]: file.digest,
      [Annotation.chunkIndex]: String(index),
      [Annotation.chunkOffset]: String(chunk.offset),
      [Annotation.chunkSize]: String(chunk.length),
      [Annotation.chunkDigest]: chunk.uncompressedDigest,
      ...(chunk.table ? { [Annotation.chunkFrames]: frameTableAnnotation(chunk.table) } : {}),
      ...(f.backing
        ? {
          [Annotation.backingFile]: f.backing.name,
          [Annotation.backingFormat]: f.backingFormat ?? "qcow2",
        }
        : {}),
    },
  };
}

/**
 * Refuses, before anything is written, an export whose manifest would outgrow what registries and
 * sarde accept. The layer count follows from the file sizes (zstd: the whole size, holes included;
 * gzip: at most the allocated size, as holes compress to nothing), and each layer costs the JSON of
 * its file's last one.
 */
function checkManifestSize(
  files: VmFile[],
  stats: Deno.FileInfo[],
  mimes: string[],
  compression: Compression,
  chunkSize: number | undefined,
): void {
  const digest = `sha256:${"0".repeat(64)}`;
  const chunk = chunkSize ?? DEFAULT_ZSTD_CHUNK;
  let layers = 0;
  let bytes = 0;
  for (const [k, f] of files.entries()) {
    const size = stats[k].size;
    let count = 1;
    let layer: Descriptor;
    if (compression === "zstd") {
      count = Math.max(1, Math.ceil(size / chunk));
      layer = zstdChunkLayer(f, mimes[k], { size, digest }, count - 1, {
        digest,
        size: chunk,
        offset: size,
        length: chunk,
        uncompressedDigest: digest,
        table: { offset: chunk, length: chunk, digest },
      });
    } else {
      // Deflate adds at most a few bytes per 16 KiB block to incompressible data.
      const allocated = Math.min(size, (stats[k].blocks ?? Infinity) * 512) * 1.001;
      if (chunkSize) count = Math.max(1, Math.ceil(allocated / chunkSize));
      layer = { mediaType: `${mimes[k]}+gzip;chunk=${count}`, digest, size: chunkSize ?? size };
    }
    // In the manifest a layer is indented two levels deeper (4 spaces a line), then ",\n".
    const json = JSON.stringify(layer, null, 2);
    layers += count;
    bytes += count * (json.length + 4 * json.split("\n").length + 2);
  }
  // The rest of the manifest (XML and VM config layers, config, annotations) is small.
  if (bytes <= MAX_MANIFEST_BYTES - (64 << 10)) return;
  let larger = MIN_ZSTD_CHUNK;
  while (larger * MAX_MANIFEST_BYTES < chunk * bytes * 1.25) larger *= 2;
  throw fail(
    "usage",
    `the image would have ${layers} layers and a manifest of about ${formatBytes(bytes)}, ` +
      `more than the ${formatBytes(MAX_MANIFEST_BYTES)} registries and sarde accept`,
    `use larger chunks, e.g. --chunksize ${formatSize(larger)}`,
  );
}

/** Stores an encoded piece (a temp file in the blobs folder) under its digest. */
async function adoptBlob(layout: Layout, tmp: string, digest: string): Promise<void> {
  const target = blobPath(layout, digest);
  try {
    await Deno.stat(target);
    await Deno.remove(tmp);
  } catch {
    await Deno.rename(tmp, target);
  }
}

/**
 * Exports `vm` (a libvirt domain name) into the store as `reference` (default: the VM name with
 * tag `latest`). Refuses a running VM unless `force`. The result is reproducible: the same VM
 * exported twice gives the same manifest digest (no wall-clock timestamps unless
 * `SOURCE_DATE_EPOCH` is set, which is then used).
 */
export async function exportVm(
  vm: string,
  reference: string | undefined,
  options: ExportOptions,
): Promise<ExportResult> {
  if (options.chunkSize !== undefined) {
    checkChunkSize(options.chunkSize, options.compression ?? "zstd");
  }
  const { doc, baseDir } = await readDomain(vm, options);
  const ref = parseReference(reference ?? `${domainName(doc) || vm}:latest`);
  const vmConfig = await readVmConfig(options.vmConfig);
  const compression = options.compression ?? "zstd";
  const epoch = sourceDateEpoch();

  const { files, tops } = await collectFiles(doc, baseDir);
  if (files.length === 0) {
    warn(`VM '${vm}' has no file-backed disks; exporting its definition only`);
  }
  for (const f of files) {
    if (f.backing && compression === "gzip" && f.backing.name !== basename(f.backing.path)) {
      warn(
        `${f.name}: its backing file was renamed to ${f.backing.name}; sardinecake 0.4 cannot follow that`,
      );
    }
  }
  const stats = await Promise.all(files.map((f) => Deno.stat(f.path)));
  const mimes = await Promise.all(files.map((f) => detectFileMime(f.path)));
  checkManifestSize(files, stats, mimes, compression, options.chunkSize);

  const layout = await openLayout(layoutDir(options.ocidir, ref), { create: true });
  using _lock = await lockLayout(layout);
  const total = stats.reduce((n, st) => n + st.size, 0);
  info(`exporting ${vm}: ${files.length} file(s), ${formatBytes(total)}, ${compression}`);
  const stored = await storeFiles(layout, files, mimes, total, epoch, options);

  await nameFilesInXml(doc, baseDir, files, tops);
  anonymizeDomain(doc);
  return await writeImage(layout, doc, { vm, ref, vmConfig, epoch, stored });
}

/** The domain XML to export, from `options.libvirtConfig` or libvirt, and the folder its relative paths start from. */
async function readDomain(
  vm: string,
  options: ExportOptions,
): Promise<{ doc: DomainDoc; baseDir: string }> {
  if (options.libvirtConfig) {
    let xmlText: string;
    try {
      xmlText = await Deno.readTextFile(options.libvirtConfig);
    } catch (err) {
      throw fail("usage", `cannot read ${options.libvirtConfig}: ${(err as Error).message}`);
    }
    return {
      doc: parseDomainXml(xmlText, options.libvirtConfig),
      baseDir: dirname(resolve(options.libvirtConfig)),
    };
  }
  const state = await domainState(vm, options);
  if (state === "missing") {
    throw fail("not-found", `no libvirt VM named '${vm}'`, "see virsh list --all");
  }
  if (state !== "stopped") {
    if (!options.force) {
      throw fail(
        "usage",
        `VM '${vm}' is ${state}; its disks may change while they are read`,
        "shut it down first, or pass --force",
      );
    }
    warn(`exporting running VM '${vm}' (--force): the disks may be inconsistent`);
  }
  const xmlText = await dumpXml(vm, { ...options, inactive: true });
  return { doc: parseDomainXml(xmlText, `domain XML of ${vm}`), baseDir: Deno.cwd() };
}

/** `SOURCE_DATE_EPOCH` in seconds, if set to a number: the time written instead of the clock's. */
function sourceDateEpoch(): number | undefined {
  const epoch = Deno.env.get("SOURCE_DATE_EPOCH");
  return epoch && /^\d+$/.test(epoch) ? Number(epoch) : undefined;
}

/** A diff_id of the image config with the line of history that made it. */
interface DiffId {
  digest: string;
  createdBy: string;
}

/** What storing the VM's files added to the image. */
interface StoredFiles {
  /** The disk layers: zstd chunks, or gzip pieces. */
  layers: Descriptor[];
  /**
   * zstd: one diff_id per chunk layer (its uncompressed digest), so the config — the image ID —
   * pins every chunk; gzip: one per file, as sardinecake 0.4 writes them.
   */
  diffIds: DiffId[];
  /** The config's list of zstd files (empty for gzip). */
  zstdFiles: ZstdFileEntry[];
  /** Every file stored, as {@link ExportResult} lists them. */
  files: ExportResult["files"];
}

/** How the files are stored: shared by every file of one export. */
interface StoreContext {
  layout: Layout;
  options: ExportOptions;
  progress: Progress;
  /** {@link sourceDateEpoch}: gzip headers carry it instead of the file's mtime. */
  epoch?: number;
  /** Temporary folders to remove when the export ends or is interrupted. */
  cleanups: string[];
}

/**
 * Stores every file into the store's blobs as `options.compression` asks, with one progress bar
 * of `total` bytes; temporary files go away even on Ctrl-C.
 */
async function storeFiles(
  layout: Layout,
  files: VmFile[],
  mimes: string[],
  total: number,
  epoch: number | undefined,
  options: ExportOptions,
): Promise<StoredFiles> {
  const progress = startProgress("export", total);
  const stored: StoredFiles = { layers: [], diffIds: [], zstdFiles: [], files: [] };
  const cleanups: string[] = [];
  const ctx: StoreContext = { layout, options, progress, epoch, cleanups };
  const unregister = onInterrupt(() =>
    cleanups.forEach((p) => Deno.removeSync(p, { recursive: true }))
  );
  try {
    for (const [k, f] of files.entries()) {
      if ((options.compression ?? "zstd") === "zstd") await storeZstd(f, mimes[k], ctx, stored);
      else await storeGzip(f, mimes[k], ctx, stored);
      debug(`stored ${f.path} as ${f.name}`);
    }
  } finally {
    progress.stop();
    unregister();
    for (const p of cleanups) await Deno.remove(p, { recursive: true }).catch(() => {});
  }
  return stored;
}

/** Stores `f` as zstd chunks, one layer each; adds them to `stored`. */
async function storeZstd(
  f: VmFile,
  mime: string,
  { layout, options, progress }: StoreContext,
  stored: StoredFiles,
): Promise<void> {
  // Each chunk enters the store as soon as it is compressed, so that an upload running beside the
  // export (onBlob) can send it while the next chunks are compressed.
  const adopted: Promise<void>[] = [];
  const enc = await encodeZstd(f.path, {
    chunkSize: options.chunkSize ?? DEFAULT_ZSTD_CHUNK,
    level: options.zstdLevel ?? DEFAULT_ZSTD_LEVEL,
    outDir: join(layout.dir, "blobs", "sha256"),
    signal: options.signal,
    onProgress: (n) => progress.add(n),
    onChunk: (c) => {
      const done = adoptBlob(layout, c.path, c.digest).then(() =>
        options.onBlob?.(layout, { mediaType: "", digest: c.digest, size: c.size })
      );
      done.catch(() => {});
      adopted.push(done);
    },
  });
  await Promise.all(adopted);
  for (const [i, c] of enc.chunks.entries()) {
    stored.diffIds.push({
      digest: c.uncompressedDigest,
      createdBy: `sarde export (zstd) ${f.name} chunk ${i + 1}/${enc.chunks.length}`,
    });
    stored.layers.push(
      zstdChunkLayer(f, mime, { size: enc.fileSize, digest: enc.fileDigest }, i, c),
    );
  }
  stored.files.push({ name: f.name, path: f.path, size: enc.fileSize, digest: enc.fileDigest });
  stored.zstdFiles.push({
    name: f.name,
    size: enc.fileSize,
    digest: enc.fileDigest,
    chunks: enc.chunks.length,
    ...(f.backing ? { backing: f.backing.name, backingFormat: f.backingFormat ?? "qcow2" } : {}),
  });
}

/** Stores `f` as sardinecake 0.4 does: one gzip stream, cut into pieces; adds them to `stored`. */
async function storeGzip(
  f: VmFile,
  mime: string,
  { layout, options, progress, epoch, cleanups }: StoreContext,
  stored: StoredFiles,
): Promise<void> {
  // gzip images carry no rebase instructions for sardinecake 0.4, so the header itself must name
  // the backing file by its name in the image: rebase a temporary copy when it does not.
  const source = f.backing && f.headerBacking !== f.backing.name
    ? await rebasedCopy(f, layout.dir, cleanups)
    : f.path;
  const st = await Deno.stat(f.path);
  const enc = await encodeGzip(source, {
    storedName: f.name,
    mtime: epoch ?? Math.floor((st.mtime?.getTime() ?? 0) / 1000),
    chunkSize: options.chunkSize ?? 0,
    outDir: join(layout.dir, "blobs", "sha256"),
    signal: options.signal,
    onProgress: (n) => progress.add(n),
  });
  for (const [i, p] of enc.pieces.entries()) {
    await adoptBlob(layout, p.path, p.digest);
    options.onBlob?.(layout, { mediaType: "", digest: p.digest, size: p.size });
    stored.layers.push({
      mediaType: i === 0 ? `${mime}+gzip` : `${mime}+gzip;chunk=${i}`,
      digest: p.digest,
      size: p.size,
    });
  }
  if (source !== f.path) await Deno.remove(source);
  stored.diffIds.push({ digest: enc.fileDigest, createdBy: `sarde export (gzip) ${f.name}` });
  stored.files.push({ name: f.name, path: f.path, size: enc.fileSize, digest: enc.fileDigest });
}

/** Points the XML's disks and boot files at the files' names in the image; import puts them into the VM folder. */
async function nameFilesInXml(
  doc: DomainDoc,
  baseDir: string,
  files: VmFile[],
  tops: Map<string, VmFile>,
): Promise<void> {
  for (const disk of fileDisks(doc)) disk.source.setAttribute("file", tops.get(disk.path)!.name);
  const byPath = new Map(files.map((f) => [f.path, f]));
  for (const bf of bootFiles(doc)) {
    const real = await Deno.realPath(resolve(baseDir, bf.path)).catch(() =>
      resolve(baseDir, bf.path)
    );
    setElementText(bf.element, byPath.get(real)!.name);
  }
}

/** What {@link writeImage} puts around the stored files. */
interface ImageParts {
  /** The VM's name, for the XML layer's history. */
  vm: string;
  ref: Reference;
  vmConfig?: VmConfig;
  /** {@link sourceDateEpoch}: the image's `created` times, none without it. */
  epoch?: number;
  stored: StoredFiles;
}

/**
 * Completes the image in `layout`: the (anonymised) XML layer, the VM config layer, the stored
 * files' layers, the config, the manifest and its tag in the index.
 */
async function writeImage(
  layout: Layout,
  doc: DomainDoc,
  { vm, ref, vmConfig, epoch, stored }: ImageParts,
): Promise<ExportResult> {
  const encode = (value: unknown) => new TextEncoder().encode(JSON.stringify(value, null, 2));
  const xmlBytes = new TextEncoder().encode(serializeDomainXml(doc));
  const xmlLayer = await writeBlob(layout, xmlBytes, MediaType.libvirtDomain);
  const layers: Descriptor[] = [xmlLayer];
  const diffIds: DiffId[] = [
    { digest: xmlLayer.digest, createdBy: `virsh dumpxml --inactive '${vm}'` },
  ];
  if (vmConfig) {
    const cfg = await writeBlob(layout, encode(vmConfig), MediaType.sardineConfig);
    layers.push(cfg);
    diffIds.push({ digest: cfg.digest, createdBy: "sarde export --vmconfig" });
  }
  layers.push(...stored.layers);
  diffIds.push(...stored.diffIds);
  const config = imageConfig(doc, diffIds, stored.zstdFiles, epoch);
  const configLayer = await writeBlob(layout, encode(config), MediaType.ociConfig);
  const manifest = {
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config: configLayer,
    layers,
    annotations: {
      [Annotation.uncompressedSize]: String(stored.files.reduce((n, s) => n + s.size, 0)),
    },
  };
  const manifestBytes = encode(manifest);
  const manifestDesc = await writeBlob(layout, manifestBytes, MediaType.ociManifest);
  const tag = ref.tag ?? "latest";
  await writeIndex(layout, addToIndex(await readIndex(layout), manifestDesc, tag));
  if (digestOf(manifestBytes) !== manifestDesc.digest) {
    throw fail("io", "manifest changed while being written");
  }
  return {
    imageId: configLayer.digest,
    manifestDigest: manifestDesc.digest,
    reference: `${ref.name}:${tag}`,
    files: stored.files,
  };
}

/** The image config: platform, diff_ids with their history, and the zstd files' list as a label. */
function imageConfig(
  doc: DomainDoc,
  diffIds: DiffId[],
  zstdFiles: ZstdFileEntry[],
  epoch: number | undefined,
): Record<string, unknown> {
  const created = epoch !== undefined ? new Date(epoch * 1000).toISOString() : undefined;
  return {
    architecture: ociArchitecture(doc),
    os: ociOs(doc),
    ...(created ? { created } : {}),
    ...(zstdFiles.length
      ? { config: { Labels: { [Annotation.files]: JSON.stringify(zstdFiles) } } }
      : {}),
    rootfs: { type: "layers", diff_ids: diffIds.map((d) => d.digest) },
    history: diffIds.map((d) => ({ ...(created ? { created } : {}), created_by: d.createdBy })),
  };
}
