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

import { join } from "node:path";
import { onInterrupt } from "./cleanup.ts";
import { assertDigest, createDigester, digestHex, digestOf } from "./digest.ts";
import { fail, SardeError } from "./errors.ts";
import { borrowBuffer, DIRECT_ALIGN, openDirect, releaseBuffer } from "./direct_io.ts";
import { exists, type FileLock, lockFile, syncDir, writeFileAtomic } from "./fsutil.ts";
import { debug } from "./log.ts";
import {
  type Descriptor,
  type ImageIndex,
  MediaType,
  parseIndex,
  REF_NAME_ANNOTATION,
} from "./oci.ts";

/** An opened image layout directory. */
export interface Layout {
  readonly dir: string;
}

const LAYOUT_FILE = "oci-layout";
const INDEX_FILE = "index.json";
const LOCK_FILE = ".sarde.lock";

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
    if (!await isLayout(dir)) {
      throw fail("not-found", `${options.what ?? dir}: no such image in the local store (${dir})`);
    }
    return { dir };
  }
  try {
    await Deno.mkdir(join(dir, "blobs", "sha256"), { recursive: true });
  } catch (err) {
    throw fail("io", `cannot create ${dir}: ${(err as Error).message}`);
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

/** Takes the layout's exclusive lock (other sarde processes wait). */
export function lockLayout(layout: Layout): Promise<FileLock> {
  return lockFile(join(layout.dir, LOCK_FILE));
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
    throw fail("io", `cannot read ${path}: ${(err as Error).message}`);
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
  // Blobs bypass the page cache where possible (see lib/direct_io.ts): they are read once
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
      throw fail("io", `cannot write ${tmp}: ${(err as Error).message}`);
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
        throw fail("io", `cannot store blob ${expected.digest}: ${(err as Error).message}`);
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
  // Not through the page cache where possible (see lib/direct_io.ts): a blob is sent once.
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
    throw fail("io", `cannot read ${path}: ${(err as Error).message}`);
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
