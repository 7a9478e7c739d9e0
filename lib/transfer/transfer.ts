/**
 * Moving images between a registry and the local store: `fetch` (registry → store) and `push`
 * (store → registry), blobs in parallel, each verified before it enters the store.
 *
 * @module
 */

import { join } from "node:path";
import { findCredentials } from "../registry/credentials.ts";
import { fail } from "../util/errors.ts";
import { writeFileAtomic } from "../util/fsutil.ts";
import {
  addToIndex,
  createBlobWriter,
  hasBlob,
  type Layout,
  lockLayout,
  openLayout,
  readBlobRange,
  readIndex,
  useLayout,
  writeIndex,
} from "../oci/layout.ts";
import { debug, info } from "../util/log.ts";
import {
  type Descriptor,
  isIndexMediaType,
  type Manifest,
  manifestBlobs,
  MediaType,
  parseManifest,
} from "../oci/types.ts";
import { forEachConcurrent } from "../util/pool.ts";
import { formatBytes, startProgress } from "../util/progress.ts";
import {
  formatLocalName,
  formatReference,
  manifestSelector,
  type Reference,
} from "../oci/reference.ts";
import {
  createRegistryClient,
  type RegistryClient,
  type RegistryOptions,
} from "../registry/client.ts";
import { layoutDir, readLocalManifest } from "../oci/store.ts";

/** Options shared by fetch and push. */
export interface TransferOptions extends Omit<RegistryOptions, "credentials"> {
  /** The local store. */
  ocidir: string;
  /** Auth file to read credentials from (default: the podman/skopeo location). */
  authfile?: string;
  /** Blobs moved at once (default 4). */
  concurrency?: number;
}

/** What a fetch or push did. */
export interface TransferResult {
  /** Manifest digest. */
  digest: string;
  /** Config digest: the image ID. */
  imageId: string;
  /** Where the image lives locally. */
  layoutDir: string;
  /** Bytes sent or received for blobs (0 when everything was already there). */
  blobBytes: number;
  /** Blobs moved. */
  blobsTransferred: number;
  /** Blobs the registry copied from another repository instead of receiving them (push only). */
  blobsMounted: number;
  /** Blobs not moved because the other side had them already. */
  blobsSkipped: number;
}

const ORIGIN_FILE = ".sarde-origin.json";

function uniqueBlobs(manifest: Manifest): Descriptor[] {
  const seen = new Set<string>();
  return manifestBlobs(manifest).filter((d) => !seen.has(d.digest) && seen.add(d.digest));
}

async function clientFor(registry: string, options: TransferOptions): Promise<RegistryClient> {
  const credentials = await findCredentials(registry, options.authfile);
  return createRegistryClient(registry, { ...options, credentials });
}

/**
 * An image whose blobs are being fetched: what {@link FetchOptions.onManifest} receives, so that
 * a consumer (a pull's import) can start on the blobs that are there while the rest downloads.
 */
export interface FetchingImage {
  layout: Layout;
  /** The manifest's descriptor (digest, media type, size). */
  descriptor: Descriptor;
  manifest: Manifest;
  /**
   * Resolves once the blob `digest` of the manifest is stored, verified (at once for blobs
   * that were already local); rejects if the fetch fails first.
   */
  blobReady(digest: string): Promise<void>;
}

/** Options of {@link fetchImage}. */
export interface FetchOptions extends TransferOptions {
  /** Local name to store the image under (default: the source reference). */
  target?: Reference;
  /**
   * Called once the manifest is known and before the first blob is downloaded; the download
   * waits for a returned promise (a disk budget makes room there), and fails with its error.
   */
  onManifest?: (image: FetchingImage) => void | Promise<void>;
}

/** A promise with its resolve/reject, observed so that an unawaited rejection is harmless. */
function deferred(): PromiseWithResolvers<void> {
  const d = Promise.withResolvers<void>();
  d.promise.catch(() => {});
  return d;
}

/**
 * Downloads `source` from its registry into the store under the local name `target` (default:
 * the same reference). Blobs already present are not downloaded again; concurrent fetches of
 * one image wait for each other and store one copy. Blobs are downloaded in manifest order.
 */
export async function fetchImage(
  source: Reference,
  options: FetchOptions,
): Promise<TransferResult> {
  const target = options.target ?? source;
  const client = await clientFor(source.registry, options);
  try {
    const selector = manifestSelector(source);
    const fetched = await client.getManifest(source.repository, selector);
    if (isIndexMediaType(fetched.mediaType)) {
      throw fail(
        "usage",
        `${formatReference(source)} is a multi-platform image index, not a sardinecake VM image`,
        "sarde images are single OCI manifests (made by sarde export)",
      );
    }
    const manifest = parseManifest(fetched.bytes, `manifest of ${formatReference(source)}`);
    const mediaType = manifest.mediaType ?? (fetched.mediaType || MediaType.ociManifest);
    const layout = await openLayout(layoutDir(options.ocidir, target), { create: true });
    using _lock = await lockLayout(layout);

    const blobs = uniqueBlobs(manifest);
    const missing: Descriptor[] = [];
    for (const b of blobs) if (!await hasBlob(layout, b)) missing.push(b);
    const total = missing.reduce((n, b) => n + b.size, 0);
    if (missing.length) {
      info(
        `fetching ${formatReference(source)}: ${missing.length} of ${blobs.length} blobs, ${
          formatBytes(total)
        }`,
      );
    } else {
      debug(`all ${blobs.length} blobs of ${formatReference(source)} are already local`);
    }
    const manifestDescriptor: Descriptor = {
      mediaType,
      digest: fetched.digest,
      size: fetched.bytes.length,
    };
    const pending = new Map(missing.map((b) => [b.digest, deferred()]));
    await options.onManifest?.({
      layout,
      descriptor: manifestDescriptor,
      manifest,
      blobReady: (digest) => pending.get(digest)?.promise ?? Promise.resolve(),
    });
    const progress = startProgress("fetch", total);
    try {
      await forEachConcurrent(missing, options.concurrency ?? 4, async (blob) => {
        // gzip disks (sardinecake 0.4's layout) are decompressed by one pipe reading the blob
        // right after: through the page cache that took 19–25 s per 2 GB here, 24–36 s with
        // O_DIRECT; zstd chunks are read with O_DIRECT by the decoding workers.
        const writer = await createBlobWriter(layout, blob, {
          direct: !blob.mediaType.includes("+gzip"),
        });
        try {
          await client.downloadBlob(source.repository, blob, writer, (n) => progress.add(n));
          await writer.commit();
          pending.get(blob.digest)?.resolve();
        } finally {
          await writer.abort();
        }
      });
    } catch (err) {
      for (const d of pending.values()) d.reject(err);
      throw err;
    } finally {
      progress.stop();
    }

    await storeManifest(layout, manifestDescriptor, fetched.bytes);
    const tag = target.digest ? target.tag : (target.tag ?? (source.digest ? undefined : "latest"));
    await writeIndex(layout, addToIndex(await readIndex(layout), manifestDescriptor, tag));
    await writeFileAtomic(
      join(layout.dir, ORIGIN_FILE),
      JSON.stringify({ registry: source.registry, repository: source.repository }) + "\n",
    );
    return {
      digest: fetched.digest,
      imageId: manifest.config.digest,
      layoutDir: layout.dir,
      blobBytes: total,
      blobsTransferred: missing.length,
      blobsMounted: 0,
      blobsSkipped: blobs.length - missing.length,
    };
  } finally {
    client.close();
  }
}

async function storeManifest(layout: Layout, d: Descriptor, bytes: Uint8Array): Promise<void> {
  if (await hasBlob(layout, d)) return;
  const w = await createBlobWriter(layout, d);
  try {
    await w.write(bytes);
    await w.commit();
  } finally {
    await w.abort();
  }
}

async function readOrigin(
  layout: Layout,
): Promise<{ registry: string; repository: string } | undefined> {
  try {
    const o = JSON.parse(await Deno.readTextFile(join(layout.dir, ORIGIN_FILE)));
    if (typeof o?.registry === "string" && typeof o?.repository === "string") return o;
  } catch { /* no origin recorded */ }
  return undefined;
}

/**
 * Uploads the local image `local` to `target` (default: the same reference). Blobs the registry
 * has are skipped; blobs in another repository of the same registry are mounted, not re-sent.
 */
export async function pushImage(
  local: Reference,
  options: TransferOptions & {
    target?: Reference;
    /** Blobs already uploaded to the target repository (by a {@link PushSession}). */
    uploaded?: ReadonlyMap<string, number>;
  },
): Promise<TransferResult> {
  const target = options.target ?? local;
  // In use while it is sent, so that `sarde rm` and `prune` wait or leave it alone.
  using _use = await useLayout({ dir: layoutDir(options.ocidir, local) }, formatLocalName(local));
  const { layout, descriptor, bytes, manifest } = await readLocalManifest(options.ocidir, local);
  const blobs = uniqueBlobs(manifest);
  for (const b of blobs) {
    if (!await hasBlob(layout, b)) {
      throw fail(
        "not-found",
        `blob ${b.digest} of ${formatLocalName(local)} is missing locally`,
        "fetch it again",
      );
    }
  }
  // Repositories of the target registry that likely hold the blobs: where the image was fetched
  // from, and the one its local name points at (where it was pushed before, most likely).
  const origin = await readOrigin(layout);
  const mountFrom = [
    ...new Set(
      [origin, local].filter((r) => r?.registry === target.registry).map((r) => r!.repository),
    ),
  ].filter((repository) => repository !== target.repository);
  const client = await clientFor(target.registry, options);
  try {
    const present = new Set<string>();
    await forEachConcurrent(blobs, 8, async (b) => {
      if (options.uploaded?.has(b.digest) || await client.hasBlob(target.repository, b)) {
        present.add(b.digest);
      }
    });
    // Layers in manifest order, the config last: it changes with every version of an image, so
    // as the first blob a mount source is asked for, it would make a source that holds an older
    // version look useless (see mounter).
    const missing = [...blobs.slice(1), blobs[0]].filter((b) => !present.has(b.digest));
    const total = missing.reduce((n, b) => n + b.size, 0);
    info(
      `pushing ${formatReference(target)}: ${missing.length} of ${blobs.length} blobs to upload, ${
        formatBytes(total)
      }`,
    );
    const progress = startProgress("push", total);
    const mount = mounter(client, target.repository, mountFrom);
    let sent = 0;
    let mounted = 0;
    try {
      await forEachConcurrent(missing, options.concurrency ?? 4, async (b) => {
        const from = await mount(b.digest);
        if (from !== undefined) {
          debug(`mounted ${b.digest} from ${from}`);
          mounted++;
          progress.add(b.size);
          return;
        }
        await client.uploadBlob(
          target.repository,
          b,
          (offset, length) => readBlobRange(layout, b.digest, offset, length),
          (n) => progress.add(n),
        );
        sent += b.size;
      });
    } finally {
      progress.stop();
    }
    const mediaType = manifest.mediaType ?? descriptor.mediaType ?? MediaType.ociManifest;
    const selector = target.tag ?? (target.digest ? descriptor.digest : "latest");
    if (target.digest && target.digest !== descriptor.digest) {
      throw fail("usage", `local image has digest ${descriptor.digest}, not ${target.digest}`);
    }
    await client.putManifest(target.repository, selector, bytes, mediaType);
    // Sizes of the blobs a push session sent before this (0: the registry had them already).
    const sentEarly = blobs.map((b) => options.uploaded?.get(b.digest) ?? 0).filter((n) => n > 0);
    return {
      digest: descriptor.digest,
      imageId: manifest.config.digest,
      layoutDir: layout.dir,
      blobBytes: sent + sentEarly.reduce((a, b) => a + b, 0),
      blobsTransferred: missing.length - mounted + sentEarly.length,
      blobsMounted: mounted,
      blobsSkipped: blobs.length - missing.length - sentEarly.length,
    };
  } finally {
    client.close();
  }
}

/**
 * Cross-repository mounts into `repository` for one push, from the repositories `froms` in turn;
 * the function returns the one a blob was mounted from. A repository that refuses its first
 * mount (unknown, unreadable, or without our blobs) is not asked again: every refusal costs
 * requests, thousands for a 1,600-layer image. One that mounted a blob has the image, so its
 * refusal only means that blob is new, and it is still asked. Until it has mounted one, it is
 * asked for one blob at a time.
 */
function mounter(
  client: RegistryClient,
  repository: string,
  froms: string[],
): (digest: string) => Promise<string | undefined> {
  const sources = froms.map((from) => ({
    from,
    proven: false,
    refused: false,
    asking: undefined as Promise<unknown> | undefined,
  }));
  return async (digest) => {
    for (const s of sources) {
      while (s.asking) await s.asking;
      if (s.refused) continue;
      const first = !s.proven;
      const attempt = client.mountBlob(repository, digest, s.from);
      if (first) s.asking = attempt.catch(() => {});
      try {
        if (await attempt) {
          s.proven = true;
          return s.from;
        }
        if (first) s.refused = true;
      } finally {
        if (first) s.asking = undefined;
      }
    }
    return undefined;
  };
}

/**
 * Uploads blobs while an image is still being made (`sarde export --push`): {@link PushSession.add}
 * queues each blob as soon as it is stored, and {@link PushSession.finish} pushes the finished
 * image, whose blobs are then mostly in the registry already.
 */
export interface PushSession {
  /** Queues a stored blob of `layout` for upload (skipped if the registry has it). */
  add(layout: Layout, blob: Descriptor): void;
  /** Waits for the queued uploads, then pushes the local image `local` to the target. */
  finish(local: Reference): Promise<TransferResult>;
  /** Stops: queued uploads are dropped, running ones interrupted. */
  abort(): void;
}

/**
 * Starts a {@link PushSession} to `target`. `onFailure` hears of the first failed upload at once
 * (so the caller can stop making blobs nobody will send); {@link PushSession.finish} throws it.
 */
export function startPushSession(
  target: Reference,
  options: TransferOptions,
  onFailure?: (error: unknown) => void,
): PushSession {
  const stop = new AbortController();
  const signal = options.signal ? AbortSignal.any([options.signal, stop.signal]) : stop.signal;
  const clientP = clientFor(target.registry, { ...options, signal });
  clientP.catch(() => {});
  /** Digest → bytes sent (0: the registry had it). */
  const uploaded = new Map<string, number>();
  const queued = new Set<string>();
  const queue: { layout: Layout; blob: Descriptor }[] = [];
  let running = 0;
  let failure: { error: unknown } | undefined;
  let idle: (() => void) | undefined;
  const limit = options.concurrency ?? 4;

  const pump = () => {
    while (!failure && running < limit && queue.length > 0) {
      const { layout, blob } = queue.shift()!;
      running++;
      (async () => {
        const client = await clientP;
        if (await client.hasBlob(target.repository, blob)) {
          uploaded.set(blob.digest, 0);
          return;
        }
        await client.uploadBlob(
          target.repository,
          blob,
          (offset, length) => readBlobRange(layout, blob.digest, offset, length),
        );
        uploaded.set(blob.digest, blob.size);
        debug(`uploaded ${blob.digest} during the export`);
      })().catch((error) => {
        if (failure) return;
        failure = { error };
        onFailure?.(error);
      }).finally(() => {
        running--;
        pump();
        if (running === 0 && (queue.length === 0 || failure)) idle?.();
      });
    }
  };

  return {
    add(layout, blob) {
      if (queued.has(blob.digest) || failure) return;
      queued.add(blob.digest);
      queue.push({ layout, blob });
      pump();
    },
    async finish(local) {
      if (running > 0) await new Promise<void>((resolve) => idle = resolve);
      (await clientP).close();
      if (failure) throw failure.error;
      return await pushImage(local, { ...options, target, uploaded });
    },
    abort() {
      queue.length = 0;
      stop.abort();
      clientP.then((c) => c.close(), () => {});
    },
  };
}
