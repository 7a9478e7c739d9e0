/**
 * `sarde import`: an image from the local store becomes a defined libvirt VM whose files live in
 * `<vmdir>/<name>/`.
 *
 * Atomic, unlike sardinecake 0.4 (which defined the VM first and extracted after, so an
 * interrupted import left a VM with broken disks forever): files are extracted into a hidden
 * temp folder, verified chunk by chunk, marked complete, renamed into place, and only then is the
 * VM defined. A half-done import is noticed and redone; a finished one is a no-op.
 *
 * @module
 */

import { basename, dirname, join } from "node:path";
import { onInterrupt } from "../util/cleanup.ts";
import { decodeGzip, parseGzipHeader } from "../image/mod.ts";
import { decodeZstdChunk } from "../image/zstd.ts";
import { createCodecPool } from "../image/codec_worker.ts";
import {
  type DomainDoc,
  parseDomainXml,
  prepareImportedDomain,
  serializeDomainXml,
} from "./domain.ts";
import { fail } from "../util/errors.ts";
import {
  Annotation,
  checkDiffIds,
  checkImageFileName,
  checkZstdFiles,
  domainLayer,
  groupDiskLayers,
  hasZstdLayers,
  type ImageFile,
} from "../image/format.ts";
import {
  ensureDir,
  exists,
  freeBytes,
  lockFile,
  osReason,
  processExists,
  syncDir,
  touch,
  writeFileAtomic,
} from "../util/fsutil.ts";
import { blobPath, type Layout, readBlob, useLayout } from "../oci/layout.ts";
import {
  checkVmName,
  type ConnectOptions,
  defineXml,
  domainExists,
  domainUuid,
} from "./libvirt.ts";
import { debug, info, warn } from "../util/log.ts";
import { type Manifest, MediaType, parseJsonObject } from "../oci/types.ts";
import { forEachConcurrent } from "../util/pool.ts";
import { formatBytes, startProgress } from "../util/progress.ts";
import { info as imageInfo, rebaseUnsafe } from "./qemu.ts";
import { formatLocalName, parseReference } from "../oci/reference.ts";
import { defaultDataDir, layoutDir, readLocalManifest } from "../oci/store.ts";
import type { FetchingImage } from "../transfer/transfer.ts";

/** Name of the marker file that says a VM folder is complete. */
export const IMPORT_MARKER = ".sarde-import.json";

/** Default folder for imported VMs: `/var/lib/sardinecake/VMs` for root. */
export function defaultVmdir(): string {
  return defaultDataDir("SARDE_VMDIR", "VMs");
}

/** Options for {@link importVm}. */
export interface ImportOptions extends ConnectOptions {
  ocidir: string;
  /** Folder holding one sub-folder per imported VM. */
  vmdir: string;
  /** VM name (default: the image ID, `sha256:…`, as sardinecake 0.4). */
  name?: string;
  /** Accept domain XML that uses host resources (devices, absolute paths, qemu:commandline). */
  allowHostResources?: boolean;
  /** Force the domain type (`qemu` on hosts without KVM). */
  domainType?: string;
  /** Chunks decoded at once (default: the number of CPUs). */
  concurrency?: number;
  /** Draw a progress bar on a terminal (default true; a pull shows the fetch's instead). */
  progress?: boolean;
  /**
   * Awaited after the files are extracted and verified, before the import is committed (VM
   * folder in place, VM defined); a rejection undoes the import. `pull` waits here for its
   * fetch to store the manifest and tag.
   */
  beforeCommit?: () => Promise<void>;
  signal?: AbortSignal;
}

/** What {@link importVm} did. */
export interface ImportResult {
  /** The libvirt domain name. */
  name: string;
  /** The libvirt domain UUID. */
  uuid: string;
  /** The VM's folder under the vmdir (disks, NVRAM, logs). */
  vmFolder: string;
  /** The config digest of the image: its ID. */
  imageId: string;
  /** True when the VM was already imported and nothing was done. */
  alreadyImported: boolean;
}

/** The import marker: what a complete VM folder was imported from, and its files. */
interface Marker {
  image: string;
  manifest: string;
  reference: string;
  /**
   * Each file extracted, with its size right after the import (missing in markers of sarde
   * 0.3.0 and older).
   */
  files?: { name: string; size: number }[];
}

/**
 * Whether the VM folder `folder` holds a complete import of the image whose manifest has the
 * digest `manifestDigest` (an import of it again writes nothing).
 */
export async function isImportedFrom(folder: string, manifestDigest: string): Promise<boolean> {
  const marker = await readMarker(folder).catch(() => undefined);
  return marker?.manifest === manifestDigest;
}

/** The lock an import (and `sarde prune`) holds on the VM name `name` of `vmdir`. */
export function vmLockPath(vmdir: string, name: string): string {
  return join(vmdir, ".locks", `${name}.lock`);
}

/**
 * The VM folders of `vmdir` by the image ID they were imported from (whatever their names: `-n`
 * gives others than the image ID). Unreadable markers are skipped: this only informs `list`.
 */
export async function importedVms(vmdir: string): Promise<Map<string, string[]>> {
  const byImage = new Map<string, string[]>();
  try {
    for await (const e of Deno.readDir(vmdir)) {
      if (!e.isDirectory || e.name.startsWith(".")) continue;
      const marker = await readMarker(join(vmdir, e.name)).catch(() => undefined);
      if (!marker) continue;
      byImage.set(marker.image, [...byImage.get(marker.image) ?? [], e.name]);
    }
  } catch (err) {
    debug(
      `cannot read ${vmdir} (${
        (err as Error).message
      }); VMs imported under other names are not shown`,
    );
  }
  return byImage;
}

async function readMarker(folder: string): Promise<Marker | undefined> {
  let text: string;
  try {
    text = await Deno.readTextFile(join(folder, IMPORT_MARKER));
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw fail("io", `cannot read ${join(folder, IMPORT_MARKER)}: ${osReason(err)}`);
  }
  try {
    const m = JSON.parse(text);
    const file = (f: { name?: unknown; size?: unknown }) =>
      typeof f?.name === "string" && Number.isSafeInteger(f?.size);
    if (
      typeof m?.image === "string" && typeof m?.manifest === "string" &&
      (m.files === undefined || (Array.isArray(m.files) && m.files.every(file)))
    ) return m;
  } catch { /* fall through */ }
  throw fail(
    "io",
    `${join(folder, IMPORT_MARKER)} is damaged`,
    `remove ${folder} if no VM uses it`,
  );
}

/**
 * The hidden folder where a lazy pull of the VM `name` fills its files: the temp folder of a
 * normal import, but with a fixed name, since a restarted lazy server continues in it.
 */
export function lazyPartialName(name: string): string {
  return `.${name}.partial-lazy`;
}

/** Removes temp folders of earlier imports of `name` whose process is gone. */
async function removeStalePartials(vmdir: string, name: string): Promise<void> {
  const prefix = `.${name}.partial-`;
  for await (const e of Deno.readDir(vmdir)) {
    if (!e.name.startsWith(prefix)) continue;
    // A lazy pull's files: its session (lib/vm/lazy_pull.ts) owns and removes them.
    if (e.name === lazyPartialName(name)) continue;
    const pid = Number(e.name.slice(prefix.length).split("-")[0]);
    if (pid && pid !== Deno.pid && await processExists(pid)) continue;
    debug(`removing leftovers of an interrupted import: ${e.name}`);
    await Deno.remove(join(vmdir, e.name), { recursive: true }).catch(() => {});
  }
}

async function gzipFileName(layout: Layout, file: ImageFile, what: string): Promise<string> {
  using f = await Deno.open(blobPath(layout, file.layers[0].digest));
  const head = new Uint8Array(Math.min(file.layers[0].size, 4096));
  let n = 0;
  while (n < head.length) {
    const r = await f.read(head.subarray(n));
    if (r === null) break;
    n += r;
  }
  const header = parseGzipHeader(head.subarray(0, n));
  if (!header.name) {
    throw fail("integrity", `${what}: a gzip disk layer has no file name in its header`);
  }
  return checkImageFileName(header.name, what);
}

/** Extracts `files` into `folder`; `all` are every file of the image (backing files). */
async function extractFiles(
  { layout, ready }: ImageToExtract,
  files: ImageFile[],
  all: ImageFile[],
  folder: string,
  options: ImportOptions,
): Promise<void> {
  const total = files.reduce((n, f) => n + (f.size ?? f.layers.reduce((m, l) => m + l.size, 0)), 0);
  const progress = startProgress("import", options.progress === false ? 0 : total);
  try {
    // zstd: every chunk of every file is independent; decode them in parallel.
    const chunks: { file: ImageFile; index: number }[] = [];
    for (const f of files) {
      if (f.encoding !== "zstd") continue;
      using out = await Deno.open(join(folder, f.name), {
        write: true,
        create: true,
        truncate: true,
      });
      await out.truncate(f.size!);
      f.layers.forEach((_, index) => chunks.push({ file: f, index }));
    }
    const concurrency = options.concurrency ?? navigator.hardwareConcurrency ?? 2;
    const pool = createCodecPool(concurrency);
    try {
      await forEachConcurrent(chunks, concurrency, async ({ file, index }) => {
        const layer = file.layers[index];
        const a = layer.annotations!;
        const length = Number(a[Annotation.chunkSize]);
        await ready(layer.digest);
        await decodeZstdChunk(
          blobPath(layout, layer.digest),
          join(folder, file.name),
          Number(a[Annotation.chunkOffset]),
          length,
          a[Annotation.chunkDigest],
          { signal: options.signal, pool },
        );
        progress.add(length);
      });
    } finally {
      pool.close();
    }
    for (const f of files) {
      if (f.encoding !== "gzip") continue;
      for (const l of f.layers) await ready(l.digest);
      const r = await decodeGzip(
        f.layers.map((l) => blobPath(layout, l.digest)),
        join(folder, f.name),
        {
          signal: options.signal,
          expectedDigest: f.digest,
          // A gzip bomb fails before the file system is full (a tenth of the space, at most
          // 1 GiB, stays free).
          maxBytes: gzipCap(await freeBytes(folder)),
        },
      );
      progress.add(f.layers.reduce((m, l) => m + l.size, 0));
      if (r.header.mtime > 0) {
        await Deno.utime(join(folder, f.name), r.header.mtime, r.header.mtime);
      }
    }
  } finally {
    progress.stop();
  }
  await finishFiles(folder, files, all);
}

/**
 * The last step of an extraction into `folder`, once `files` hold the image's bytes: their qcow2
 * headers are checked ({@link checkImageHeaders}) and backing references become plain names of
 * files in the folder. A lazy pull runs it on its completed files too, so that they end as a
 * normal import's.
 */
export async function finishFiles(
  folder: string,
  files: ImageFile[],
  all: ImageFile[],
): Promise<void> {
  await checkImageHeaders(folder, files, all);
  // Backing references become plain names of files in this folder (0.4 images already have them).
  for (const f of files) {
    if (!f.backingFile) continue;
    // qemu reads "a:b" as protocol "a"; "./a:b" is a plain relative file name.
    const backing = f.backingFile.includes(":") ? `./${f.backingFile}` : f.backingFile;
    await rebaseUnsafe(join(folder, f.name), backing, f.backingFormat ?? "qcow2");
  }
}

/** How much a gzip file may take on disk, given the free space (see decodeGzip's maxBytes). */
function gzipCap(free: number | undefined): number {
  if (free === undefined) return Number.MAX_SAFE_INTEGER;
  return free - Math.min(1 << 30, Math.floor(free / 10));
}

/**
 * The qcow2 headers of an image are as untrusted as its XML: a backing file or an external data
 * file could name a host device, another VM's disk or a network server, which QEMU would open
 * when the VM starts. Only plain names of files of the same image are accepted (zstd images name
 * them in annotations instead and are rebased below).
 */
async function checkImageHeaders(
  folder: string,
  files: ImageFile[],
  all: ImageFile[],
): Promise<void> {
  const names = new Set(all.map((f) => f.name));
  for (const f of files) {
    const i = await imageInfo(join(folder, f.name));
    if (i.dataFile !== undefined) {
      throw fail(
        "usage",
        `refusing to import: ${f.name} uses an external data file ('${i.dataFile}')`,
      );
    }
    if (i.backingFilename === undefined || f.backingFile) continue;
    const b = i.backingFilename.replace(/^\.\//, "");
    if (!names.has(b) || b === f.name) {
      throw fail(
        "usage",
        `refusing to import: ${f.name} is backed by '${i.backingFilename}', which is not a file of the image`,
        "images must carry their whole backing chain; re-export the VM with sarde",
      );
    }
  }
}

/**
 * Imports the local image `reference` as a libvirt VM. Returns the VM's name and UUID. Running
 * it again for the same image and name does nothing and returns the same name (files of the VM
 * that vanished are extracted again); N processes importing at once extract once (a lock per VM
 * name).
 */
export async function importVm(reference: string, options: ImportOptions): Promise<ImportResult> {
  const ref = parseReference(reference);
  const what = formatLocalName(ref);
  // In use from the first read on, so that `sarde rm` and `prune` wait or leave it alone.
  using _use = await useLayout({ dir: layoutDir(options.ocidir, ref) }, what);
  const { layout, descriptor, manifest } = await readLocalManifest(options.ocidir, ref);
  return await importImage({ layout, descriptor, manifest }, what, options);
}

/**
 * The image an import reads: a local one, or one a fetch is still downloading
 * ({@link FetchingImage}), whose blobs it waits for one by one.
 */
export type ImportSource = Pick<FetchingImage, "layout" | "descriptor" | "manifest"> & {
  blobReady?: FetchingImage["blobReady"];
};

/**
 * Imports `source` (named `what` in messages) as {@link importVm} does. With `blobReady`, each
 * blob is awaited just before it is read, so the import runs behind a fetch (`sarde pull`).
 */
export async function importImage(
  source: ImportSource,
  what: string,
  options: ImportOptions,
): Promise<ImportResult> {
  const { layout, descriptor, manifest } = source;
  const ready = (digest: string) => source.blobReady?.(digest) ?? Promise.resolve();
  if (manifest.config.mediaType !== MediaType.ociConfig) {
    throw fail(
      "usage",
      `${what} is not a sardinecake VM image (config type ${manifest.config.mediaType})`,
    );
  }
  const imageId = manifest.config.digest;
  const name = checkVmName(options.name ?? imageId);
  const vmFolder = join(options.vmdir, name);
  await ensureDir(options.vmdir, "the VM folder", "choose another one with --vmdir");
  using _use = await useLayout(layout, what);
  using _lock = await lockFile(vmLockPath(options.vmdir, name));
  const image: ImageToExtract = { layout, manifest, what, ready };
  const result = (alreadyImported: boolean) =>
    domainUuid(name, options).then((uuid) => ({ name, uuid, vmFolder, imageId, alreadyImported }));

  const marker = await readMarker(vmFolder);
  // The manifest must match too: another manifest can reuse a trusted config (same image ID)
  // with other layers, and must not pass for it.
  const ours = marker?.image === imageId && marker.manifest === descriptor.digest;
  if (await domainExists(name, options)) {
    if (!ours) {
      throw fail(
        "usage",
        `a libvirt VM named '${name}' already exists and was not imported from ${what} by sarde`,
        "choose another name with -n NAME, or remove that VM first",
      );
    }
    if (await restoreVanishedFiles(image, vmFolder, marker, options)) return await result(false);
    info(`VM ${name} is already imported from ${what}`);
    await touch(join(vmFolder, IMPORT_MARKER));
    return await result(true);
  }

  // Check the XML before spending minutes on extraction.
  const xmlDigest = domainLayer(manifest, what).digest;
  await ready(xmlDigest);
  const xml = new TextDecoder().decode(await readBlob(layout, xmlDigest, 4 << 20));
  const doc: DomainDoc = parseDomainXml(xml, `domain XML of ${what}`);
  prepareImportedDomain(doc, {
    name,
    vmFolder,
    allowHostResources: options.allowHostResources,
    domainType: options.domainType,
  });

  if (ours) {
    if (!await restoreVanishedFiles(image, vmFolder, marker, options)) {
      debug(`${vmFolder} is complete from an earlier import; defining the VM only`);
    }
  } else if (marker || await exists(vmFolder)) {
    throw fail(
      "usage",
      marker
        ? `${vmFolder} holds the files of another image (${marker.reference}), and no VM '${name}' is defined`
        : `${vmFolder} exists and was not made by sarde`,
      "choose another name with -n NAME, or remove that folder (sarde prune) if nothing uses it",
    );
  } else {
    const files = await imageFiles(image);
    info(`importing ${what} as VM ${name}: ${files.length} file(s)`);
    await extractAtomically(
      image,
      files,
      files,
      name,
      options,
      (tmp) => commitFolder(tmp, vmFolder, { imageId, manifest: descriptor.digest, what, files }),
    );
  }
  await options.beforeCommit?.();
  await defineXml(serializeDomainXml(doc), options);
  return await result(false);
}

/** What {@link commitFolder} records in the import marker. */
export interface CommitInfo {
  /** The image ID. */
  imageId: string;
  /** The manifest digest. */
  manifest: string;
  /** The image's name in messages and in the marker. */
  what: string;
  /** The files extracted into the folder. */
  files: ImageFile[];
}

/**
 * Commits a complete extraction: writes the import marker (with each file's size) into `tmp`,
 * renames `tmp` to `vmFolder` and syncs the parent. From here on the folder is an imported VM
 * folder; only the VM's definition is left. Both a normal import and a lazy pull's completion
 * end here, so their folders are the same.
 */
export async function commitFolder(tmp: string, vmFolder: string, c: CommitInfo): Promise<void> {
  const m: Marker = {
    image: c.imageId,
    manifest: c.manifest,
    reference: c.what,
    files: await Promise.all(c.files.map(async (f) => ({
      name: f.name,
      size: (await Deno.stat(join(tmp, f.name))).size,
    }))),
  };
  await writeFileAtomic(join(tmp, IMPORT_MARKER), JSON.stringify(m, null, 2) + "\n");
  await Deno.rename(tmp, vmFolder);
  await syncDir(dirname(vmFolder));
}

/** What the extraction reads: the image, named `what` in messages, and its blobs' readiness. */
export interface ImageToExtract {
  layout: Layout;
  manifest: Manifest;
  what: string;
  ready: (digest: string) => Promise<void>;
}

/**
 * The image's files, named, in order, and checked against its config (the image ID pins the
 * chunk list and the files' digests).
 */
export async function imageFiles(
  { layout, manifest, what, ready }: ImageToExtract,
): Promise<ImageFile[]> {
  await ready(manifest.config.digest);
  const config = parseJsonObject(
    await readBlob(layout, manifest.config.digest, 4 << 20),
    `the image config of ${what}`,
  ) as { rootfs?: { diff_ids?: unknown }; config?: { Labels?: Record<string, unknown> } };
  const filesLabel = config.config?.Labels?.[Annotation.files];
  if (filesLabel === undefined && hasZstdLayers(manifest)) {
    throw fail(
      "integrity",
      `${what} was made by sarde 0.2 or older: its config does not list its disk files`,
      "re-export the VM with this sarde (images are verified against their config since 0.3)",
    );
  }
  const gzipDigests = checkDiffIds(manifest, config.rootfs?.diff_ids, what);
  const files = groupDiskLayers(manifest, what);
  checkZstdFiles(files, filesLabel, what);
  files.filter((f) => f.encoding === "gzip").forEach((f, i) => f.digest = gzipDigests[i]);
  const names = new Set<string>();
  for (const f of files) {
    if (f.encoding === "gzip") {
      await ready(f.layers[0].digest);
      f.name = await gzipFileName(layout, f, what);
    }
    if (names.has(f.name)) {
      throw fail("integrity", `${what}: the file ${f.name} appears twice in the image`);
    }
    names.add(f.name);
  }
  return files;
}

/**
 * Extracts `files` (of the image's files `all`) into a fresh hidden temp folder of the VM
 * folder's parent, verified, and hands it to `commit` once `beforeCommit` allows; the temp
 * folder goes in any case (or, if this process dies, with the next import or `sarde prune`).
 */
async function extractAtomically(
  image: ImageToExtract,
  files: ImageFile[],
  all: ImageFile[],
  name: string,
  options: ImportOptions,
  commit: (tmp: string) => Promise<void>,
): Promise<void> {
  const needed = files.reduce((n, f) => n + (f.size ?? 0), 0);
  const free = await freeBytes(options.vmdir);
  if (free !== undefined && needed > free) {
    throw fail(
      "io",
      `not enough space in ${options.vmdir}: the VM needs ${formatBytes(needed)}, ${
        formatBytes(free)
      } free`,
    );
  }
  await removeStalePartials(options.vmdir, name);
  const rand = crypto.getRandomValues(new Uint32Array(1))[0].toString(36);
  const tmp = join(options.vmdir, `.${name}.partial-${Deno.pid}-${rand}`);
  await Deno.mkdir(tmp, { mode: 0o755 });
  const unregister = onInterrupt(() => Deno.removeSync(tmp, { recursive: true }));
  try {
    await extractFiles(image, files, all, tmp, options);
    await options.beforeCommit?.();
    await commit(tmp);
  } finally {
    await Deno.remove(tmp, { recursive: true }).catch(() => {}); // gone once committed
    unregister();
  }
}

/**
 * Extracts again the files of an imported VM that vanished from its folder (deleted, or cut
 * short): not there, not a file, or smaller than right after the import (a disk grows once the
 * VM runs, but never shrinks). Each is extracted and verified aside, then renamed into place.
 * Markers of sarde 0.3.0 and older record no sizes: the image's file list stands in, and the
 * marker gets them. Returns whether anything was extracted.
 */
async function restoreVanishedFiles(
  image: ImageToExtract,
  vmFolder: string,
  marker: Marker,
  options: ImportOptions,
): Promise<boolean> {
  let files: ImageFile[] | undefined;
  const expected = marker.files ??
    (files = await imageFiles(image)).map((f) => ({ name: f.name, size: f.size ?? 0 }));
  const sizes = new Map<string, number | undefined>();
  for (const f of expected) {
    const st = await Deno.stat(join(vmFolder, f.name)).catch(() => undefined);
    sizes.set(f.name, st?.isFile && st.size >= f.size ? st.size : undefined);
  }
  const vanished = expected.filter((f) => sizes.get(f.name) === undefined).map((f) => f.name);
  const record = async () => {
    const m: Marker = {
      ...marker,
      files: expected.map((f) => ({
        name: f.name,
        size: marker.files && !vanished.includes(f.name) ? f.size : sizes.get(f.name)!,
      })),
    };
    await writeFileAtomic(join(vmFolder, IMPORT_MARKER), JSON.stringify(m, null, 2) + "\n");
  };
  if (vanished.length === 0) {
    if (!marker.files) await record();
    return false;
  }
  warn(`${vmFolder}: ${vanished.join(", ")} vanished; extracting again from ${image.what}`);
  files ??= await imageFiles(image);
  const missing = files.filter((f) => vanished.includes(f.name));
  await extractAtomically(image, missing, files, basename(vmFolder), options, async (tmp) => {
    for (const f of missing) {
      const st = await Deno.stat(join(tmp, f.name));
      await Deno.rename(join(tmp, f.name), join(vmFolder, f.name));
      sizes.set(f.name, st.size);
    }
    await syncDir(vmFolder);
    await record();
  });
  return true;
}
