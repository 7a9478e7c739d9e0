/**
 * Freeing space: `sarde rm` (one cached image) and `sarde prune` (garbage, and least recently used
 * images and imported VMs beyond an age or a byte budget). Nothing a defined VM still uses is ever
 * removed: an imported base VM is only removed when it is not running and no other VM's disks
 * are backed by its files.
 *
 * @module
 */

import { join } from "node:path";
import { CLONE_MARKER } from "./clone.ts";
import { liveLazySessions, sessionManifest } from "./lazy_pull.ts";
import { fileDisks, parseDomainXml } from "./domain.ts";
import { describeError, fail, SardeError } from "../util/errors.ts";
import {
  checkDir,
  exists,
  type FileLock,
  lockFile,
  osReason,
  processExists,
  tryLockFile,
  writeFileAtomic,
} from "../util/fsutil.ts";
import { IMPORT_MARKER, isImportedFrom, vmLockPath } from "./import.ts";
import {
  descriptorTag,
  hasBlob,
  isLayout,
  type Layout,
  layoutLeftovers,
  lockLayoutForRemoval,
  openLayout,
  readBlob,
  readIndex,
  removeFromIndex,
  removeLayout,
  writeIndex,
} from "../oci/layout.ts";
import {
  type ConnectOptions,
  domainExists,
  domainState,
  dumpXml,
  listDomains,
  undefine,
} from "./libvirt.ts";
import { debug, info, warn } from "../util/log.ts";
import { manifestBlobs, parseManifest } from "../oci/types.ts";
import { formatBytes } from "../util/progress.ts";
import { backingChain } from "./qemu.ts";
import { formatLocalName, parseReference } from "../oci/reference.ts";
import { findLayouts, layoutDir } from "../oci/store.ts";
import { groupDiskLayers } from "../image/format.ts";
import type { FetchingImage } from "../transfer/transfer.ts";

/** One thing removed, and the bytes it freed. */
export interface Removed {
  /** What was removed, in words: an image, an imported VM, a clone folder, temp files. */
  what: string;
  /** The disk space freed. */
  bytes: number;
}

/** Bytes `path` takes on disk; what vanishes meanwhile (another process at work) counts 0. */
async function diskUsage(
  path: string,
  counts = (_name: string, _isDir: boolean) => true,
): Promise<number> {
  let total = 0;
  const walk = async (p: string) => {
    const st = await Deno.lstat(p).catch(() => undefined);
    if (!st) return;
    if (!st.isDirectory) {
      total += (st.blocks ?? Math.ceil(st.size / 512)) * 512;
      return;
    }
    const entries: Deno.DirEntry[] = [];
    try {
      for await (const e of Deno.readDir(p)) entries.push(e);
    } catch (err) {
      ignoreNotFound(err);
    }
    for (const e of entries) {
      if (p !== path || counts(e.name, e.isDirectory)) await walk(join(p, e.name));
    }
  };
  await walk(path);
  return total;
}

/**
 * Disk usage of a layout's own files: a layout folder can hold another repository's layout
 * (`a/b` and `a/b/c`), which is not counted.
 */
function layoutUsage(layout: Layout): Promise<number> {
  return diskUsage(layout.dir, (name, isDir) => !isDir || name === "blobs");
}

/** Deletes blobs no manifest of the layout refers to (and stale partial files). Lock held. */
async function collectGarbage(layout: Layout): Promise<number> {
  const index = await readIndex(layout);
  const keep = new Set<string>();
  for (const d of index.manifests) {
    keep.add(d.digest.slice(7));
    try {
      for (const b of manifestBlobs(parseManifest(await readBlob(layout, d.digest)))) {
        keep.add(b.digest.slice(7));
      }
    } catch (err) {
      warn(`not collecting garbage in ${layout.dir}: ${(err as Error).message}`);
      return 0;
    }
  }
  let freed = 0;
  const dir = join(layout.dir, "blobs", "sha256");
  for await (const e of Deno.readDir(dir)) {
    if (keep.has(e.name)) continue;
    const p = join(dir, e.name);
    freed += await diskUsage(p);
    await Deno.remove(p, { recursive: true });
  }
  return freed;
}

/**
 * Removes a cached image (`sarde rm`): its tag (or digest; `latest` when neither is given) and
 * every blob no other tag of that repository needs. The repository folder goes when empty.
 * Imported VMs are not touched.
 */
export async function removeImage(ocidir: string, reference: string): Promise<Removed> {
  const ref = parseReference(reference);
  const what = formatLocalName(ref);
  const layout = await openLayout(layoutDir(ocidir, ref), { what });
  using _lock = await takeForRemoval(layout, what);
  const index = await readIndex(layout);
  const selector = ref.digest ? { digest: ref.digest } : { tag: ref.tag ?? "latest" };
  const left = removeFromIndex(index, selector);
  if (left.manifests.length === index.manifests.length) {
    const tags = index.manifests.map(descriptorTag).filter(Boolean);
    throw fail(
      "not-found",
      `${what}: not in the local store`,
      tags.length ? `known tags: ${tags.join(", ")}` : undefined,
    );
  }
  await writeIndex(layout, left);
  let bytes = await collectGarbage(layout);
  if (left.manifests.length === 0) {
    bytes += await layoutUsage(layout);
    await removeLayout(layout, ocidir);
  }
  return { what, bytes };
}

/**
 * Waits until no other process uses the layout (a pull of another tag, an import) and takes it
 * for removal; a layout removed meanwhile is not in the store any more.
 */
async function takeForRemoval(layout: Layout, what: string): Promise<FileLock> {
  let lock: FileLock | undefined;
  try {
    lock = await lockLayoutForRemoval(layout, { wait: false });
    if (!lock) {
      info(`waiting for the other sarde processes using ${what}`);
      lock = (await lockLayoutForRemoval(layout, { wait: true }))!;
    }
  } catch (err) {
    if (err instanceof SardeError && err.kind === "not-found") throw removedMeanwhile(what);
    throw err;
  }
  if (!await isLayout(layout.dir)) {
    lock.release();
    throw removedMeanwhile(what);
  }
  return lock;
}

function removedMeanwhile(what: string): SardeError {
  return fail("not-found", `${what}: not in the local store (removed meanwhile)`);
}

/** Options of {@link prune}. */
export interface PruneOptions extends ConnectOptions {
  ocidir: string;
  vmdir: string;
  /** Extra folders holding clones (the executor's `clonedir`). */
  clonedirs?: string[];
  /** Remove images and unused imported VMs not used for this long (ms). */
  olderThanMs?: number;
  /** Then remove the least recently used ones until store + imported VMs use at most this. */
  keepBytes?: number;
  /** Only say what would go. */
  dryRun?: boolean;
}

/**
 * The files each defined VM uses (its disks and their backing chains), read once per domain and
 * remembered: a budget prune asks for every imported VM whether any other domain uses it, and
 * asking virsh and qemu-img anew each time cost ~0.2 s per VM and domain (bench/fleet.ts).
 * `undefined` for a domain whose files cannot be told (it then keeps everything).
 */
function domainFilesCache(
  options: ConnectOptions,
): (domain: string) => Promise<string[] | undefined> {
  const cache = new Map<string, Promise<string[] | undefined>>();
  const read = async (d: string): Promise<string[] | undefined> => {
    let doc;
    try {
      doc = parseDomainXml(await dumpXml(d, { ...options, inactive: true }), d);
    } catch {
      return undefined;
    }
    const files: string[] = [];
    for (const disk of fileDisks(doc)) {
      files.push(disk.path);
      try {
        for (const c of await backingChain(disk.path)) files.push(c.filename, c.realFilename);
      } catch {
        // Its backing files are unknown: any imported VM may be one of them.
        debug(`cannot read the backing chain of ${disk.path} (VM ${d}): keeping every VM`);
        return undefined;
      }
    }
    return files;
  };
  return (d) => {
    let files = cache.get(d);
    if (!files) cache.set(d, files = read(d));
    return files;
  };
}

/** Whether any defined VM other than `name` uses a file inside `folder` (directly or as backing). */
async function folderInUse(
  folder: string,
  name: string,
  domains: string[],
  filesOf: (domain: string) => Promise<string[] | undefined>,
): Promise<boolean> {
  for (const d of domains) {
    if (d === name) continue;
    const files = await filesOf(d);
    if (!files) return true; // cannot tell: keep it
    if (files.some((f) => f.startsWith(folder + "/"))) return true;
  }
  return false;
}

interface Candidate {
  what: string;
  lastUsed: number;
  bytes: number;
  /** Removes it; false when it turned out to be in use (it then stays). */
  remove: () => Promise<boolean>;
}

/**
 * Removes what `fn` removes, logging one line with its size (stderr) and recording it in
 * `removed`; `fn` returning false means it turned out to be in use and stayed.
 */
async function removeLogged(
  removed: Removed[],
  what: string,
  bytes: number,
  fn: () => Promise<boolean | void>,
  options: { dryRun?: boolean; why?: string } = {},
): Promise<boolean> {
  if (!options.dryRun) {
    try {
      if (await fn() === false) return false;
    } catch (err) {
      if (err instanceof SardeError) throw err;
      throw fail("io", `cannot remove ${what}: ${osReason(err)}`);
    }
  }
  removed.push({ what, bytes });
  const verb = options.dryRun ? "would remove" : "removed";
  info(`${options.why ? `${options.why}: ` : ""}${verb} ${what} (${formatBytes(bytes)})`);
  return true;
}

/**
 * Prunes: always removes leftovers (clone folders whose VM is gone, temp folders of killed
 * imports, temp files of killed fetches and exports); with `olderThanMs` and/or `keepBytes`, also
 * cached images and unused imported VMs, least recently used first. What another sarde process
 * is using (a pull, an import) stays. Returns what was (or, with `dryRun`, would be) removed.
 */
export async function prune(options: PruneOptions): Promise<Removed[]> {
  const removed: Removed[] = [];
  const act = (what: string, bytes: number, fn: () => Promise<boolean | void>) =>
    removeLogged(removed, what, bytes, fn, options);
  // 1. Leftovers.
  const vmdirs = new Set([options.vmdir, ...(options.clonedirs ?? [])]);
  for (const dir of vmdirs) {
    if (!await checkDir(dir, "the VM folder")) continue;
    for await (const e of Deno.readDir(dir)) {
      const p = join(dir, e.name);
      if (e.isDirectory && /^\..+\.partial-(\d+)-/.test(e.name)) {
        const pid = Number(/\.partial-(\d+)-/.exec(e.name)![1]);
        if (!await processExists(pid)) {
          await act(
            `interrupted import ${p}`,
            await diskUsage(p),
            () => Deno.remove(p, { recursive: true }),
          );
        }
      } else if (
        e.isDirectory && await exists(join(p, CLONE_MARKER)) && !await domainExists(e.name, options)
      ) {
        await act(
          `clone folder ${p} (its VM is gone)`,
          await diskUsage(p),
          () => Deno.remove(p, { recursive: true }),
        );
      }
    }
  }
  const layouts = await findLayouts(options.ocidir);
  for (const { dir } of layouts) {
    // Only in layouts no other process uses: every writer holds the use lock while it writes.
    using lock = await unusedLayout({ dir }).catch((err) => {
      debug(describeError(err));
      return undefined;
    });
    if (!lock) {
      debug(`${dir} is in use (or not ours to lock); its temp files stay`);
      continue;
    }
    const files = await layoutLeftovers({ dir });
    if (files.length === 0) continue;
    let bytes = 0;
    for (const f of files) bytes += await diskUsage(f);
    await act(
      `${files.length} temp file(s) of interrupted fetches or exports in ${dir}`,
      bytes,
      async () => {
        for (const f of files) await Deno.remove(f).catch(ignoreNotFound);
      },
    );
  }
  if (options.olderThanMs === undefined && options.keepBytes === undefined) return removed;

  // 2. Cached images and imported VMs nobody uses, least recently used first.
  const cache = await cacheUsage(options);
  let total = cache.totalBytes;
  const now = Date.now();
  for (const c of cache.candidates) {
    const old = options.olderThanMs !== undefined && c.lastUsed < now - options.olderThanMs;
    const over = options.keepBytes !== undefined && total > options.keepBytes;
    if (!old && !over) continue;
    if (await act(c.what, c.bytes, c.remove)) total -= c.bytes;
  }
  return removed;
}

/** What the cache (store and imported VMs) holds, and what of it may go. */
interface CacheUsage {
  /** Bytes of every cached image and every imported VM, in use or not. */
  totalBytes: number;
  /** What may go, least recently used first. */
  candidates: Candidate[];
}

/**
 * The cache's disk usage: every repository of the store and every imported VM's folder (clones,
 * the job VMs' overlays, are not cache and not counted), and as candidates for removal every
 * repository (one another process uses stays when its turn comes) and every imported VM that is
 * not running and backs no other VM, least recently used first. Layouts in `keep` are counted
 * but never candidates.
 */
async function cacheUsage(
  options: ConnectOptions & { ocidir: string; vmdir: string; keep?: string[] },
): Promise<CacheUsage> {
  const candidates: Candidate[] = [];
  // A live lazy pull's image and VM stay (job VMs read them over NBD). While it downloads it
  // counts as what it will take: the blobs still to come and its files in full.
  const lazy = await liveLazySessions(options.vmdir);
  const lazyLayouts = lazy.map((s) => layoutDir(options.ocidir, parseReference(s.reference)));
  let totalBytes = 0;
  for (const [i, s] of lazy.entries()) {
    if (s.phase !== "serving") continue;
    const manifest = await sessionManifest(options.vmdir, s).catch(() => undefined);
    const layout = { dir: lazyLayouts[i] };
    totalBytes += manifest
      ? await pullSizeEstimate({ layout, descriptor: { digest: s.digest }, manifest })
      : s.files.reduce((m, f) => m + f.total, 0);
  }
  for (const { name, dir } of await findLayouts(options.ocidir)) {
    const layout = { dir };
    const lastUsed = await lastUse(join(dir, "index.json"));
    const bytes = await layoutUsage(layout);
    totalBytes += bytes;
    // (or removed meanwhile)
    if (lastUsed === undefined || options.keep?.includes(dir) || lazyLayouts.includes(dir)) {
      continue;
    }
    const what = `cached image ${name}`;
    candidates.push({
      what,
      lastUsed,
      bytes,
      remove: async () => {
        using lock = await unusedLayout(layout);
        if (!lock || !await isLayout(dir)) {
          if (await isLayout(dir)) info(`kept ${what}: another sarde process is using it`);
          return false; // in use, or removed meanwhile
        }
        if ((await lastUse(join(dir, "index.json")) ?? 0) > lastUsed) {
          info(`kept ${what}: it was used just now`);
          return false;
        }
        await removeLayout(layout, options.ocidir);
        return true;
      },
    });
  }
  if (!await checkDir(options.vmdir, "the VM folder")) {
    return { totalBytes, candidates: candidates.sort(leastRecentlyUsedFirst) };
  }
  const domains = await listDomains({ ...options, all: true });
  const filesOf = domainFilesCache(options);
  for await (const e of Deno.readDir(options.vmdir)) {
    const folder = join(options.vmdir, e.name);
    if (!e.isDirectory || !await exists(join(folder, IMPORT_MARKER))) continue;
    const bytes = await diskUsage(folder);
    totalBytes += bytes;
    // An import about to be renamed into place (its marker written last), or a lazy pull's
    // folder: counted, never removed.
    if (e.name.startsWith(".") || lazy.some((s) => s.name === e.name)) continue;
    const unused = (state: string) => state === "stopped" || state === "missing";
    if (!unused(await domainState(e.name, options))) continue;
    if (await folderInUse(folder, e.name, domains, filesOf)) continue;
    const what = `imported VM ${e.name} (${folder})`;
    candidates.push({
      what,
      lastUsed: await lastUse(join(folder, IMPORT_MARKER)) ?? 0,
      bytes,
      remove: async () => {
        // The lock an import (or clone) of this name holds; the VM may have started meanwhile.
        using lock = await tryLockFile(vmLockPath(options.vmdir, e.name));
        const state = await domainState(e.name, options);
        // A clone may have been defined on it since the candidates were listed: ask anew.
        const inUse = !lock || !unused(state) ||
          await folderInUse(
            folder,
            e.name,
            await listDomains({ ...options, all: true }),
            domainFilesCache(options),
          );
        if (inUse) {
          info(`kept ${what}: it is in use`);
          return false;
        }
        if (state !== "missing") await undefine(e.name, { ...options, nvram: true });
        await Deno.remove(folder, { recursive: true });
        return true;
      },
    });
  }
  return { totalBytes, candidates: candidates.sort(leastRecentlyUsedFirst) };
}

function leastRecentlyUsedFirst(a: Candidate, b: Candidate): number {
  return a.lastUsed - b.lastUsed;
}

/** Space a pull in progress has claimed within the budget; release it when the pull ends. */
export interface Reservation extends AsyncDisposable {
  /** What was removed to make the room. */
  removed: Removed[];
  /** Gives the claim up (idempotent). */
  release(): Promise<void>;
}

/** Claims older than this are a crashed process's, whatever its PID says now. */
const MAX_RESERVATION_AGE_MS = 24 * 3600_000;

/**
 * {@link makeRoom}, counting what other pulls in progress have claimed but maybe not written
 * yet, then claiming `needBytes` until {@link Reservation.release}: two jobs pulling two new
 * images at once would otherwise each find room for itself and together go past the budget.
 * One process at a time decides (a lock in `vmdir`); claims of processes that are gone do not
 * count. A claim counts in full while its pull writes, so concurrent pulls err on freeing more.
 */
export async function reserveRoom(options: MakeRoomOptions): Promise<Reservation> {
  const dir = join(options.vmdir, ".budget");
  using _decide = await lockFile(join(options.vmdir, ".locks", "cache-budget.lock"));
  let reservedBytes = 0;
  const entries = await Array.fromAsync(Deno.readDir(dir)).catch(() => []);
  for (const e of entries) {
    const file = join(dir, e.name);
    const claim = await Deno.readTextFile(file).then(JSON.parse).catch(() => undefined);
    const alive = Number.isSafeInteger(claim?.pid) && await processExists(claim.pid) &&
      Date.now() - Number(claim.since) < MAX_RESERVATION_AGE_MS;
    if (alive && Number.isSafeInteger(claim.bytes)) reservedBytes += claim.bytes;
    else await Deno.remove(file).catch(() => {}); // a crashed pull's claim
  }
  const removed = await makeRoom({ ...options, reservedBytes });
  await Deno.mkdir(dir, { recursive: true });
  const file = join(dir, `${Deno.pid}-${crypto.randomUUID()}.json`);
  await writeFileAtomic(
    file,
    JSON.stringify({
      pid: Deno.pid,
      since: Date.now(),
      bytes: options.needBytes,
      for: options.what,
    }),
  );
  let released: Promise<void> | undefined;
  const release = () => released ??= Deno.remove(file).catch(() => {});
  return { removed, release, [Symbol.asyncDispose]: release };
}

/** Options of {@link reserveRoomForImage}. */
export interface ReserveForImageOptions extends ConnectOptions {
  ocidir: string;
  vmdir: string;
  /** At most this much for cached images and imported VMs together, the new one included. */
  budgetBytes: number;
  /** The image, in the messages. */
  what: string;
  /** Where the image's VM is (or will be) imported: nothing for its files if it holds it. */
  vmFolder: string;
}

/**
 * {@link reserveRoom} for what pulling or importing `image` adds ({@link pullSizeEstimate}),
 * keeping its own layout, with one stderr line for what was freed.
 */
export async function reserveRoomForImage(
  image: Pick<FetchingImage, "layout" | "descriptor" | "manifest">,
  options: ReserveForImageOptions,
): Promise<Reservation> {
  const claim = await reserveRoom({
    ...options,
    needBytes: await pullSizeEstimate(image, options.vmFolder),
    keep: [image.layout.dir],
  });
  const freed = claim.removed.reduce((n, r) => n + r.bytes, 0);
  if (claim.removed.length) info(`cache-budget: freed ${formatBytes(freed)} for ${options.what}`);
  return claim;
}

/** Options of {@link makeRoom}. */
export interface MakeRoomOptions extends ConnectOptions {
  ocidir: string;
  vmdir: string;
  /** What is about to be written (an image's missing blobs plus its imported files). */
  needBytes: number;
  /** At most this much for cached images and imported VMs together, the new one included. */
  budgetBytes: number;
  /** What the bytes are for, in the messages (`127.0.0.1:5000/sardines/tiny:latest`). */
  what: string;
  /** Layout folders that stay whatever their age (the one being pulled into). */
  keep?: string[];
  /** Bytes other pulls in progress have claimed (see {@link reserveRoom}): counted as used. */
  reservedBytes?: number;
}

/**
 * Makes room for `needBytes` within a disk budget: when the cache (cached images and imported
 * VMs, see {@link prune}) plus `needBytes` exceeds `budgetBytes`, removes the least recently used
 * images and imported VMs nobody uses until it fits, one stderr line each. Nothing is removed
 * when it cannot fit even with everything removable gone: that throws an `io` error with the
 * numbers (needed, budget, in use). Returns what was removed.
 */
export async function makeRoom(options: MakeRoomOptions): Promise<Removed[]> {
  const { needBytes, budgetBytes } = options;
  const cache = await cacheUsage(options);
  let total = cache.totalBytes + (options.reservedBytes ?? 0);
  if (total + needBytes <= budgetBytes) return [];
  const removable = cache.candidates.reduce((n, c) => n + c.bytes, 0);
  const tooBig = (inUse: number) =>
    fail(
      "io",
      `no room for ${options.what} within cache-budget ${formatBytes(budgetBytes)}: it needs ${
        formatBytes(needBytes)
      }, and ${formatBytes(inUse)} of the cache is in use or just used${
        options.reservedBytes
          ? ` (${formatBytes(options.reservedBytes)} of it claimed by pulls in progress)`
          : ""
      }`,
      `raise cache-budget, or free space (sarde prune; the store is ${options.ocidir}, ` +
        `imported VMs are in ${options.vmdir})`,
    );
  if (total - removable + needBytes > budgetBytes) throw tooBig(total - removable);
  const removed: Removed[] = [];
  for (const c of cache.candidates) {
    if (total + needBytes <= budgetBytes) break;
    if (await removeLogged(removed, c.what, c.bytes, c.remove, { why: "cache-budget" })) {
      total -= c.bytes;
    }
  }
  // Something turned out to be in use while removing.
  if (total + needBytes > budgetBytes) throw tooBig(total);
  return removed;
}

/**
 * The bytes a pull of `image` will add to the cache, known from its manifest before any
 * download: the blobs not yet in the store, plus the files the import writes — their
 * uncompressed size from the zstd annotations (an upper bound: holes stay holes), or for gzip
 * images, which carry no such size, their compressed size (an underestimate). Nothing for the
 * files when `vmFolder` (where the import goes) already holds this image: the import then writes
 * nothing, and `pull-policy = always` must not ask the budget for the disks again on every job.
 */
export async function pullSizeEstimate(
  image: Pick<FetchingImage, "layout" | "manifest"> & { descriptor: { digest: string } },
  vmFolder?: string,
): Promise<number> {
  let bytes = 0;
  const seen = new Set<string>(); // identical chunks are one blob
  for (const b of manifestBlobs(image.manifest)) {
    if (seen.has(b.digest)) continue;
    seen.add(b.digest);
    if (!await hasBlob(image.layout, b)) bytes += b.size;
  }
  if (vmFolder && await isImportedFrom(vmFolder, image.descriptor.digest)) return bytes;
  for (const f of groupDiskLayers(image.manifest, "image")) {
    bytes += f.size ?? f.layers.reduce((n, l) => n + l.size, 0);
  }
  return bytes;
}

/** The layout's removal lock if no other process uses it; undefined if in use or gone. */
async function unusedLayout(layout: Layout): Promise<FileLock | undefined> {
  try {
    return await lockLayoutForRemoval(layout, { wait: false });
  } catch (err) {
    if (err instanceof SardeError && err.kind === "not-found") return undefined;
    throw err;
  }
}

/** When a file was last used (read or written), or undefined if it is gone. */
async function lastUse(path: string): Promise<number | undefined> {
  const st = await Deno.stat(path).catch(() => undefined);
  return st && Math.max(st.mtime?.getTime() ?? 0, st.atime?.getTime() ?? 0);
}

function ignoreNotFound(err: unknown): void {
  if (!(err instanceof Deno.errors.NotFound)) throw err;
}
