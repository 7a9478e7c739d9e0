/**
 * Moving images between a registry and the local store: `fetch` (registry → store) and `push`
 * (store → registry), blobs in parallel, each verified before it enters the store. A fetch tries
 * the mirrors registries.conf names for the image before its primary location; blocked registries
 * are refused before any connection.
 *
 * @module
 */

import { join } from "node:path";
import { findCredentials } from "../registry/credentials.ts";
import { describeError, fail, SardeError } from "../util/errors.ts";
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
import { debug, info, warn } from "../util/log.ts";
import {
  type Descriptor,
  isIndexMediaType,
  type Manifest,
  manifestBlobs,
  MediaType,
  parseManifest,
} from "../oci/types.ts";
import { forEachConcurrent } from "../util/pool.ts";
import { DEFAULT_CONCURRENCY } from "../util/defaults.ts";
import { formatBytes, startProgress } from "../util/progress.ts";
import {
  formatLocalName,
  formatReference,
  manifestSelector,
  type Reference,
} from "../oci/reference.ts";
import {
  createRegistryClient,
  type FetchedManifest,
  type RegistryClient,
  type RegistryOptions,
} from "../registry/client.ts";
import { layoutDir, readLocalManifest } from "../oci/store.ts";
import {
  loadRegistriesConf,
  type PullSource,
  resolvePullSources,
  resolvePushTarget,
} from "../registry/registries_conf.ts";
import { type TlsSettings, transportFor } from "../registry/tls.ts";
import type { TransportOptions } from "../registry/http.ts";

/** Options shared by fetch and push. */
export interface TransferOptions extends Omit<RegistryOptions, "credentials"> {
  /** The local store. */
  ocidir: string;
  /** Auth file to read credentials from (default: the podman/skopeo location). */
  authfile?: string;
  /** Blobs moved at once (default 4). */
  concurrency?: number;
  /**
   * The user's TLS settings, from which the transport of each host contacted is made (its own
   * certs.d folder, plain http where registries.conf says `insecure`). Without them every host
   * gets the transport options given here.
   */
  tls?: TlsSettings;
  /**
   * The main containers-registries.conf file (mirrors, blocked registries; default
   * `$CONTAINERS_REGISTRIES_CONF` or `/etc/containers/registries.conf`, plus the drop-ins).
   */
  registriesConf?: string;
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

/**
 * A mirror is an optimisation and the primary location the authority: a dead or hanging cache
 * must not cost every job of a fleet the full retry timeout (2 min by default) before the
 * fallback. So a mirror gets one retry within 10 s, and answers within 10 s, whatever the
 * user's (longer) settings; transient trouble beyond that falls back to the next source, which
 * serves the same verified bytes.
 */
const MIRROR_RETRY = { attempts: 2, maxElapsedMs: 10_000 };
const MIRROR_RESPONSE_TIMEOUT_MS = 10_000;

/** A client for the host of `source`, with that host's credentials and transport. */
async function clientFor(source: PullSource, options: TransferOptions): Promise<RegistryClient> {
  const registry = source.reference.registry;
  const transport: TransportOptions = options.tls
    ? await transportFor(registry, {
      ...options.tls,
      insecure: options.tls.insecure || source.insecure,
    })
    : { ...options, plainHttp: options.plainHttp || source.insecure };
  const credentials = await findCredentials(registry, options.authfile);
  if (!source.mirror) {
    return createRegistryClient(registry, { ...options, ...transport, credentials });
  }
  return createRegistryClient(registry, {
    ...options,
    ...transport,
    credentials,
    retry: {
      ...options.retry,
      attempts: Math.min(options.retry?.attempts ?? Infinity, MIRROR_RETRY.attempts),
      maxElapsedMs: Math.min(options.retry?.maxElapsedMs ?? Infinity, MIRROR_RETRY.maxElapsedMs),
    },
    responseTimeoutMs: Math.min(
      options.responseTimeoutMs ?? Infinity,
      MIRROR_RESPONSE_TIMEOUT_MS,
    ),
  });
}

/**
 * A client for the primary location of `source` (registries.conf's rewriting and `insecure`
 * applied, a blocked registry refused; mirrors are not asked), and the reference to ask it for:
 * what a lazy pull reads single frames from. Close the client when done.
 */
export async function openPrimaryClient(
  source: Reference,
  options: TransferOptions,
): Promise<{ client: RegistryClient; reference: Reference }> {
  const list = resolvePullSources(
    await loadRegistriesConf({ file: options.registriesConf }),
    source,
  );
  const primary = list.find((s) => !s.mirror) ?? list[list.length - 1];
  return { client: await clientFor(primary, options), reference: primary.reference };
}

/** The sources of one fetch, their clients (opened when first used), and which failed. */
interface Sources {
  list: (PullSource & { client?: Promise<RegistryClient>; failed?: boolean; used?: boolean })[];
  /** The first source still worth asking: mirrors before it failed. */
  current: number;
}

/**
 * Runs `step` against the sources from the first one still worth asking: a mirror that fails
 * (refused, 5xx, 404, digest mismatch, timeout, anything but Ctrl-C) is noted once and not
 * asked again by this fetch; the primary location's failure is the error.
 */
async function fromSources<T>(
  sources: Sources,
  options: TransferOptions,
  step: (client: RegistryClient, reference: Reference) => Promise<T>,
): Promise<T> {
  for (let i = sources.current;; i = Math.max(i + 1, sources.current)) {
    const s = sources.list[i];
    try {
      s.client ??= clientFor(s, options);
      const result = await step(await s.client, s.reference);
      s.used = true;
      return result;
    } catch (err) {
      const interrupted = options.signal?.aborted ||
        (err instanceof SardeError && err.kind === "interrupted");
      if (!s.mirror || interrupted) throw err;
      if (!s.failed) {
        s.failed = true;
        warn(`mirror ${s.reference.registry} skipped: ${describeError(err)}`);
      }
      sources.current = Math.max(sources.current, i + 1);
    }
  }
}

/** Says which source served a fetch, when registries.conf gave it mirrors. */
function reportSources(source: Reference, sources: Sources): void {
  if (sources.list.length < 2) return;
  const used = sources.list.filter((s) => s.used);
  const mirrors = used.filter((s) => s.mirror).map((s) => s.reference.registry);
  const name = formatReference(source);
  if (mirrors.length === 0) info(`fetched ${name} from the primary location, not a mirror`);
  else if (used.length > mirrors.length) {
    info(`fetched ${name} through mirror ${mirrors.join(", ")} and the primary location`);
  } else info(`fetched ${name} through mirror ${mirrors.join(", ")}`);
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
  /**
   * Called once the manifest is known, before anything is written to the store; a throw ends
   * the fetch with nothing stored (the trust policy's signature check).
   */
  verify?: (image: ManifestToVerify) => Promise<void>;
  /**
   * Awaited before each read of a blob body (see `DownloadOptions.gate` of lib/registry): the
   * download pauses while it waits, so other transfers get the bandwidth (a lazy pull's demand
   * reads). Keep each wait well under the response timeout.
   */
  gate?: () => Promise<void>;
}

/** What {@link FetchOptions.verify} receives: the manifest, and reads from where it came from. */
export interface ManifestToVerify {
  /** The reference fetched (as asked for, before mirrors rewrote it). */
  reference: Reference;
  /** The manifest's digest. */
  digest: string;
  /**
   * A manifest of the image's repository by tag or digest, `undefined` when the primary
   * location does not have it (a mirror without it falls back to the next source).
   */
  getManifest(selector: string): Promise<FetchedManifest | undefined>;
  /** A (small) blob of the image's repository, whole and unverified. */
  readBlob(descriptor: Descriptor): Promise<Uint8Array>;
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
  // Before any network access: a blocked registry is refused here.
  const list = resolvePullSources(
    await loadRegistriesConf({ file: options.registriesConf }),
    source,
  );
  const sources: Sources = { list, current: 0 };
  try {
    const fetched = await fromSources(
      sources,
      options,
      (client, ref) => client.getManifest(ref.repository, manifestSelector(ref)),
    );
    if (isIndexMediaType(fetched.mediaType)) {
      throw fail(
        "usage",
        `${formatReference(source)} is a multi-platform image index, not a sardinecake VM image`,
        "sarde images are single OCI manifests (made by sarde export)",
      );
    }
    const manifest = parseManifest(fetched.bytes, `manifest of ${formatReference(source)}`);
    const mediaType = manifest.mediaType ?? (fetched.mediaType || MediaType.ociManifest);
    await options.verify?.({
      reference: source,
      digest: fetched.digest,
      getManifest: async (selector) => {
        try {
          return await fromSources(
            sources,
            options,
            (client, ref) => client.getManifest(ref.repository, selector),
          );
        } catch (err) {
          // Only the primary location's answer counts: a mirror without it falls back.
          if (err instanceof SardeError && err.kind === "not-found") return undefined;
          throw err;
        }
      },
      readBlob: (blob) =>
        fromSources(sources, options, (client, ref) => client.readBlob(ref.repository, blob)),
    });
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
      await forEachConcurrent(missing, options.concurrency ?? DEFAULT_CONCURRENCY, async (blob) => {
        await fromSources(sources, options, async (client, ref) => {
          // gzip disks (sardinecake 0.4's layout) are decompressed by one pipe reading the blob
          // right after: through the page cache that took 19–25 s per 2 GB here, 24–36 s with
          // O_DIRECT; zstd chunks are read with O_DIRECT by the decoding workers.
          const writer = await createBlobWriter(layout, blob, {
            direct: !blob.mediaType.includes("+gzip"),
          });
          let moved = 0;
          try {
            await client.downloadBlob(ref.repository, blob, writer, (n) => {
              moved += n;
              progress.add(n);
            }, { gate: options.gate });
            await writer.commit();
          } catch (err) {
            progress.add(-moved); // the next source starts this blob over
            throw err;
          } finally {
            await writer.abort();
          }
        });
        pending.get(blob.digest)?.resolve();
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
    reportSources(source, sources);
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
    for (const s of sources.list) s.client?.then((c) => c.close(), () => {});
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
 * A client for pushing to `target`: its own host (never a mirror), plain http if its
 * registries.conf entry says `insecure`; a blocked registry is refused before any network access.
 */
async function pushClient(target: Reference, options: TransferOptions): Promise<RegistryClient> {
  const conf = await loadRegistriesConf({ file: options.registriesConf });
  return await clientFor(resolvePushTarget(conf, target), options);
}

/** Options of a push. */
export interface PushOptions extends TransferOptions {
  /**
   * Runs once the registry took the manifest, with the push's client and the manifest digest
   * (to attach a signature); its failure fails the push.
   */
  afterManifest?: (client: RegistryClient, target: Reference, digest: string) => Promise<void>;
}

/**
 * Uploads the local image `local` to `target` (default: the same reference). Blobs the registry
 * has are skipped; blobs in another repository of the same registry are mounted, not re-sent.
 */
export async function pushImage(
  local: Reference,
  options: PushOptions & {
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
  const client = await pushClient(target, options);
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
      await forEachConcurrent(missing, options.concurrency ?? DEFAULT_CONCURRENCY, async (b) => {
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
    await options.afterManifest?.(client, target, descriptor.digest);
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
  options: PushOptions,
  onFailure?: (error: unknown) => void,
): PushSession {
  const stop = new AbortController();
  const signal = options.signal ? AbortSignal.any([options.signal, stop.signal]) : stop.signal;
  const clientP = pushClient(target, { ...options, signal });
  clientP.catch(() => {});
  /** Digest → bytes sent (0: the registry had it). */
  const uploaded = new Map<string, number>();
  const queued = new Set<string>();
  const queue: { layout: Layout; blob: Descriptor }[] = [];
  let running = 0;
  let failure: { error: unknown } | undefined;
  let idle: (() => void) | undefined;
  const limit = options.concurrency ?? DEFAULT_CONCURRENCY;

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
