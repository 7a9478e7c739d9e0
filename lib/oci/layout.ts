/**
 * One OCI image layout on disk (`oci-layout`, `index.json`, `blobs/sha256/`), as sardinecake 0.4
 * and skopeo's `oci:` transport read and write it.
 *
 * Every write is crash-safe: blobs are written to a hidden temp file, verified against their
 * digest, fsynced and renamed into place; `index.json` is replaced atomically under a lock, and a
 * tag moves by replacing its descriptor (0.4 appended duplicates).
 *
 * @module
 */

import { dirname, join, resolve, sep } from "node:path";
import { onInterrupt } from "../util/cleanup.ts";
import { assertDigest, createDigester, digestHex, digestOf } from "./digest.ts";
import { fail, SardeError } from "../util/errors.ts";
import { borrowBuffer, DIRECT_ALIGN, openDirect, releaseBuffer } from "../util/direct_io.ts";
import {
  combineLocks,
  exists,
  type FileLock,
  lockFile,
  osReason,
  syncDir,
  tryLockFile,
  writeFileAtomic,
} from "../util/fsutil.ts";
import { debug } from "../util/log.ts";
import {
  type Descriptor,
  type ImageIndex,
  MediaType,
  parseIndex,
  REF_NAME_ANNOTATION,
} from "./types.ts";

/** An opened image layout directory. */
export interface Layout {
  /** The layout's folder (with `oci-layout`, `index.json` and `blobs/`). */
  readonly dir: string;
}

const LAYOUT_FILE = "oci-layout";
const INDEX_FILE = "index.json";
/** Writers of the layout (fetch, export) take this exclusively, one at a time. */
const LOCK_FILE = ".sarde.lock";
/**
 * Every process using the layout (fetch, export, import, list) holds this shared for as long as
 * it does; `sarde rm` and `prune` take it exclusively before they remove anything, so nothing
 * disappears under a running pull.
 */
const USE_FILE = ".sarde.use";

/** Whether `dir` holds an image layout. */
export async function isLayout(dir: string): Promise<boolean> {
  return await exists(join(dir, LAYOUT_FILE)) && await exists(join(dir, INDEX_FILE));
}

/**
 * Opens a layout; with `create`, makes the folders, `oci-layout` and an empty `index.json` when
 * missing. Without `create`, a missing layout is a `not-found` error naming `what`.
 */
export async function openLayout(
  dir: string,
  options: { create?: boolean; what?: string } = {},
): Promise<Layout> {
  if (!options.create) {
    if (!await isLayout(dir)) throw notInStore({ dir }, options.what);
    return { dir };
  }
  try {
    await Deno.mkdir(join(dir, "blobs", "sha256"), { recursive: true });
  } catch (err) {
    throw fail("io", `cannot create ${dir}: ${osReason(err)}`);
  }
  if (!await exists(join(dir, LAYOUT_FILE))) {
    await writeFileAtomic(join(dir, LAYOUT_FILE), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  }
  if (!await exists(join(dir, INDEX_FILE))) {
    await writeFileAtomic(
      join(dir, INDEX_FILE),
      JSON.stringify({ schemaVersion: 2, manifests: [] }, null, 2),
    );
  }
  return { dir };
}

/**
 * Takes the layout for writing: the exclusive write lock (other writers wait) and a shared use
 * lock (removals wait), held until released. The layout's files are made again if a removal
 * took them between {@link openLayout} and this lock.
 */
export async function lockLayout(layout: Layout): Promise<FileLock> {
  const use = await lockFile(join(layout.dir, USE_FILE), { shared: true });
  try {
    const write = await lockFile(join(layout.dir, LOCK_FILE));
    const both = combineLocks(use, write);
    try {
      await openLayout(layout.dir, { create: true });
    } catch (err) {
      both.release();
      throw err;
    }
    return both;
  } catch (err) {
    use.release();
    throw err;
  }
}

/**
 * Marks an existing layout as in use (a shared lock; any number of users) until released, so
 * that `sarde rm` and `prune` wait for it or leave it alone. A layout that is not there (or was
 * removed while this waited) is a `not-found` error naming `what`. A store this user may only
 * read is used without a lock.
 */
export async function useLayout(layout: Layout, what?: string): Promise<FileLock> {
  let lock: FileLock;
  try {
    lock = await lockFile(join(layout.dir, USE_FILE), {
      shared: true,
      folderMustExist: true,
      optional: true,
    });
  } catch (err) {
    if (err instanceof SardeError && err.kind === "not-found") throw notInStore(layout, what);
    throw err;
  }
  if (!await isLayout(layout.dir)) {
    lock.release();
    throw notInStore(layout, what);
  }
  return lock;
}

/**
 * Takes the layout for removal (`sarde rm`, `prune`): the exclusive use lock, so no other
 * process uses it meanwhile. With `wait: false`, `undefined` when the layout is in use.
 */
export function lockLayoutForRemoval(
  layout: Layout,
  options: { wait: boolean },
): Promise<FileLock | undefined> {
  const lock = options.wait ? lockFile : tryLockFile;
  return lock(join(layout.dir, USE_FILE), { folderMustExist: true });
}

/**
 * Removes a layout's files, holding {@link lockLayoutForRemoval}: `index.json` first (from then
 * on it is no image any more, and no entry ever names a removed manifest), then the blobs and
 * the rest. The folder goes only when nothing else is left in it (another repository's layout
 * can live inside: `a/b` and `a/b/c`), and so do its empty parents up to `root`.
 */
export async function removeLayout(layout: Layout, root: string): Promise<void> {
  const names = [INDEX_FILE, LAYOUT_FILE, "blobs"];
  for await (const e of Deno.readDir(layout.dir)) {
    if (e.name.startsWith(".sarde") || e.name.includes(".tmp-")) names.push(e.name);
  }
  // The lock files last: a process waiting on them then finds them gone and locks anew.
  names.sort((a, b) => Number(isLockFile(a)) - Number(isLockFile(b)));
  for (const name of new Set(names)) {
    await Deno.remove(join(layout.dir, name), { recursive: true }).catch((err) => {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
    });
  }
  const top = resolve(root);
  for (let dir = resolve(layout.dir); dir.startsWith(top + sep);) {
    try {
      await Deno.remove(dir); // only when empty
    } catch {
      break;
    }
    dir = dirname(dir);
  }
}

function isLockFile(name: string): boolean {
  return name === LOCK_FILE || name === USE_FILE;
}

function notInStore(layout: Layout, what?: string) {
  return fail(
    "not-found",
    `${what ?? layout.dir}: no such image in the local store (${layout.dir})`,
  );
}

/**
 * The temp files that interrupted writers left in a layout (`.partial-*` downloads, `.sarde-*`
 * chunks of an export, `*.tmp-*` of atomic writes). Leftovers only while no other process uses
 * the layout ({@link lockLayoutForRemoval} held): every writer holds the use lock.
 */
export async function layoutLeftovers(layout: Layout): Promise<string[]> {
  const found: string[] = [];
  const sweep = async (dir: string, leftover: (name: string) => boolean) => {
    try {
      for await (const e of Deno.readDir(dir)) {
        if (e.isFile && leftover(e.name)) found.push(join(dir, e.name));
      }
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
    }
  };
  await sweep(join(layout.dir, "blobs", "sha256"), (name) => name.startsWith("."));
  await sweep(layout.dir, (name) => name.startsWith(".") && name.includes(".tmp-"));
  return found;
}

/** The path of a blob (the digest is validated, so it can never escape the folder). */
export function blobPath(layout: Layout, digest: string): string {
  return join(layout.dir, "blobs", "sha256", digestHex(digest));
}

/** Whether the blob is present with the expected size. */
export async function hasBlob(
  layout: Layout,
  descriptor: Pick<Descriptor, "digest" | "size">,
): Promise<boolean> {
  try {
    const st = await Deno.stat(blobPath(layout, descriptor.digest));
    return st.isFile && st.size === descriptor.size;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return false;
    throw err;
  }
}

/** Reads a small blob (manifest, config) fully, verifying its digest; `limit` guards memory. */
export async function readBlob(
  layout: Layout,
  digest: string,
  limit = 16 << 20,
): Promise<Uint8Array> {
  const path = blobPath(layout, digest);
  let bytes: Uint8Array;
  try {
    const st = await Deno.stat(path);
    if (st.size > limit) throw fail("integrity", `blob ${digest} is larger than ${limit} bytes`);
    bytes = await Deno.readFile(path);
  } catch (err) {
    if (err instanceof SardeError) throw err;
    if (err instanceof Deno.errors.NotFound) {
      throw fail(
        "not-found",
        `blob ${digest} is missing from ${layout.dir}`,
        "fetch the image again",
      );
    }
    throw fail("io", `cannot read ${path}: ${osReason(err)}`);
  }
  if (digestOf(bytes) !== digest) {
    throw fail(
      "integrity",
      `blob ${digest} in ${layout.dir} is corrupt (its content has another digest)`,
    );
  }
  return bytes;
}

/** Stores bytes as a blob (atomically) and returns its descriptor. */
export async function writeBlob(
  layout: Layout,
  bytes: Uint8Array,
  mediaType: string,
): Promise<Descriptor> {
  const digest = digestOf(bytes);
  const descriptor = { mediaType, digest, size: bytes.length };
  if (!await hasBlob(layout, descriptor)) await writeFileAtomic(blobPath(layout, digest), bytes);
  return descriptor;
}

/** A blob being written: a {@link BlobSink} plus commit/abort. */
export interface BlobWriter {
  write(chunk: Uint8Array): Promise<void>;
  reset(): Promise<void>;
  /** Verifies size and digest, then renames into place. Removes the temp file on mismatch. */
  commit(): Promise<void>;
  /** Removes the temp file. Safe to call after commit. */
  abort(): Promise<void>;
}

/**
 * Starts writing the blob `expected` into the layout through a verified temp file, with O_DIRECT
 * unless `direct: false` (for blobs read back soon by one sequential reader, which the page
 * cache serves better).
 */
export async function createBlobWriter(
  layout: Layout,
  expected: Descriptor,
  options: { direct?: boolean } = {},
): Promise<BlobWriter> {
  assertDigest(expected.digest);
  const final = blobPath(layout, expected.digest);
  const rand = crypto.getRandomValues(new Uint32Array(1))[0].toString(36);
  const tmp = join(
    layout.dir,
    "blobs",
    "sha256",
    `.partial-${digestHex(expected.digest)}-${Deno.pid}-${rand}`,
  );
  const file = await Deno.open(tmp, { write: true, createNew: true });
  // Blobs bypass the page cache where possible (see lib/util/direct_io.ts): they are read once
  // soon (by an import) or much later, and filling the cache was most of a fetch's CPU time.
  let direct = options.direct === false ? undefined : openDirect(tmp, "write");
  let digester = createDigester();
  let written = 0;
  let done = false;
  const closeAll = () => {
    direct?.close();
    direct = undefined;
    try {
      file.close();
    } catch { /* already closed */ }
  };
  const unregister = onInterrupt(() => {
    closeAll();
    try {
      Deno.removeSync(tmp);
    } catch { /* already gone */ }
  });
  const abort = async () => {
    if (done) return;
    done = true;
    unregister();
    closeAll();
    giveBack();
    await Deno.remove(tmp).catch(() => {});
  };
  // Network reads come in 16–64 KiB pieces; gathering them into 1 MiB before hashing and writing
  // saves most of the per-chunk await and syscall cost (SHA-NI also prefers large inputs).
  const buffer = borrowBuffer(1 << 20);
  let returned = false;
  const giveBack = () => {
    if (!returned) releaseBuffer(buffer);
    returned = true;
  };
  let filled = 0;
  const writeAt = async (data: Uint8Array, position: number) => {
    const whole = direct ? data.length - (data.length % DIRECT_ALIGN) : 0;
    if (whole > 0) {
      try {
        await direct!.write(data.subarray(0, whole), position);
      } catch (err) {
        debug(`O_DIRECT refused for ${tmp} (${(err as Error).message}); writing normally`);
        direct?.close();
        direct = undefined;
        return await writeAt(data, position);
      }
    }
    if (whole < data.length) {
      await file.seek(position + whole, Deno.SeekMode.Start);
      let off = whole;
      while (off < data.length) off += await file.write(data.subarray(off));
    }
  };
  const flush = async () => {
    if (filled === 0) return;
    const data = buffer.subarray(0, filled);
    digester.update(data);
    try {
      await writeAt(data, written);
    } catch (err) {
      throw fail("io", `cannot write ${tmp}: ${osReason(err)}`);
    }
    written += filled;
    filled = 0;
  };
  return {
    async write(chunk) {
      let off = 0;
      while (off < chunk.length) {
        const n = Math.min(buffer.length - filled, chunk.length - off);
        buffer.set(chunk.subarray(off, off + n), filled);
        filled += n;
        off += n;
        if (filled === buffer.length) await flush();
      }
    },
    async reset() {
      filled = 0;
      written = 0;
      await file.truncate(0);
      digester = createDigester();
    },
    async commit() {
      await flush();
      const size = digester.size;
      const digest = digester.digest();
      if (size !== expected.size || digest !== expected.digest) {
        await abort();
        throw fail(
          "integrity",
          `blob ${expected.digest} failed verification: got ${size} bytes with digest ${digest}, expected ${expected.size} bytes`,
          "the registry or a proxy returned wrong data; nothing was stored",
        );
      }
      try {
        await file.sync();
        closeAll();
        await Deno.rename(tmp, final);
        await syncDir(join(layout.dir, "blobs", "sha256"));
      } catch (err) {
        await abort();
        throw fail("io", `cannot store blob ${expected.digest} as ${final}: ${osReason(err)}`);
      }
      done = true;
      unregister();
      giveBack();
    },
    abort,
  };
}

/**
 * Streams a stored blob's bytes from `offset` for `length` bytes, in 2 MiB reads into two reused
 * buffers (the next piece is read ahead): consume each piece before asking for the next.
 */
export async function* readBlobRange(
  layout: Layout,
  digest: string,
  offset: number,
  length: number,
): AsyncIterable<Uint8Array> {
  const path = blobPath(layout, digest);
  using file = await Deno.open(path);
  // Not through the page cache where possible (see lib/util/direct_io.ts): a blob is sent once.
  let direct = offset % DIRECT_ALIGN === 0 ? openDirect(path, "read") : undefined;
  const borrowed: Uint8Array[] = [];
  let pending: Promise<number> | undefined;
  try {
    await file.seek(offset, Deno.SeekMode.Start);
    // Two buffers for all pieces: the next piece is read while the consumer sends this one,
    // and a piece's buffer is reused once the consumer asks for the piece after it. (Fresh
    // buffers per piece piled up as garbage, ~60 MB per upload before a GC.)
    const bufs = [borrowBuffer(UPLOAD_PIECE), borrowBuffer(UPLOAD_PIECE)];
    borrowed.push(...bufs);
    const readAt = async (buf: Uint8Array, pos: number, want: number): Promise<number> => {
      let n: number | null = null;
      if (direct) {
        const aligned = want + (DIRECT_ALIGN - (want % DIRECT_ALIGN)) % DIRECT_ALIGN;
        try {
          n = await direct.read(buf.subarray(0, Math.min(aligned, buf.length)), pos);
          n = n === 0 ? null : Math.min(n, want);
        } catch (err) {
          debug(`O_DIRECT read of ${path} refused (${(err as Error).message}); reading normally`);
          direct.close();
          direct = undefined;
        }
      }
      if (!direct) {
        await file.seek(pos, Deno.SeekMode.Start);
        n = await file.read(buf.subarray(0, want));
      }
      if (n === null) throw fail("io", `blob ${digest} is shorter than expected`);
      return n;
    };
    let pos = offset;
    let left = length;
    let next = 0;
    pending = left > 0 ? readAt(bufs[0], pos, Math.min(UPLOAD_PIECE, left)) : undefined;
    while (pending) {
      const n = await pending;
      const buf = bufs[next];
      left -= n;
      pos += n;
      next ^= 1;
      pending = left > 0 ? readAt(bufs[next], pos, Math.min(UPLOAD_PIECE, left)) : undefined;
      pending?.catch(() => {}); // surfaced when awaited
      yield buf.subarray(0, n);
    }
  } finally {
    await pending?.catch(() => {}); // a read-ahead still filling a buffer (consumer stopped)
    direct?.close();
    borrowed.forEach(releaseBuffer);
  }
}

/** Size of the pieces {@link readBlobRange} yields. */
const UPLOAD_PIECE = 2 << 20;

/** Reads `index.json`. */
export async function readIndex(layout: Layout): Promise<ImageIndex> {
  const path = join(layout.dir, INDEX_FILE);
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (err) {
    throw fail("io", `cannot read ${path}: ${osReason(err)}`);
  }
  return parseIndex(bytes, path);
}

/** Replaces `index.json` atomically. Hold the layout lock around read-modify-write. */
export async function writeIndex(layout: Layout, index: ImageIndex): Promise<void> {
  await writeFileAtomic(join(layout.dir, INDEX_FILE), JSON.stringify(index, null, 2));
}

/** The tag a descriptor carries in `index.json`, if any. */
export function descriptorTag(d: Descriptor): string | undefined {
  return d.annotations?.[REF_NAME_ANNOTATION];
}

/**
 * Records a manifest in the index: under `tag` (moving the tag if it pointed elsewhere, never
 * duplicating it), or untagged (added once per digest).
 */
export function addToIndex(index: ImageIndex, manifest: Descriptor, tag?: string): ImageIndex {
  const entry: Descriptor = {
    mediaType: manifest.mediaType || MediaType.ociManifest,
    digest: manifest.digest,
    size: manifest.size,
    ...(tag ? { annotations: { [REF_NAME_ANNOTATION]: tag } } : {}),
  };
  let manifests = index.manifests;
  if (tag) {
    manifests = manifests.filter((d) => descriptorTag(d) !== tag);
    // An untagged entry for the same digest is now redundant.
    manifests = manifests.filter((d) =>
      !(d.digest === manifest.digest && descriptorTag(d) === undefined)
    );
  } else if (manifests.some((d) => d.digest === manifest.digest)) {
    return index;
  }
  return { ...index, manifests: [...manifests, entry] };
}

/** Removes a tag (or every entry of a digest) from the index. */
export function removeFromIndex(
  index: ImageIndex,
  selector: { tag?: string; digest?: string },
): ImageIndex {
  return {
    ...index,
    manifests: index.manifests.filter((d) =>
      selector.digest ? d.digest !== selector.digest : descriptorTag(d) !== selector.tag
    ),
  };
}

/**
 * Picks a manifest from the index as sardinecake 0.4 does: by digest; by tag (the last match,
 * for indexes 0.4 wrote with duplicates); with neither, `latest`, else the last entry.
 */
export function selectManifest(
  index: ImageIndex,
  selector: { tag?: string; digest?: string },
  what: string,
): Descriptor {
  const ms = index.manifests;
  let found: Descriptor | undefined;
  if (selector.digest) {
    found = ms.find((d) => d.digest === selector.digest);
  } else if (selector.tag) {
    found = ms.findLast((d) => descriptorTag(d) === selector.tag);
  } else {
    found = ms.findLast((d) => descriptorTag(d) === "latest") ?? ms.at(-1);
  }
  if (!found) {
    const tags = ms.map(descriptorTag).filter(Boolean);
    throw fail(
      "not-found",
      `${what}: not in the local store`,
      tags.length ? `known tags: ${tags.join(", ")}` : "fetch it first (sarde fetch)",
    );
  }
  return found;
}
