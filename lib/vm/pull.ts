/**
 * `sarde pull` (and the executor's prepare): fetch an image and import it as a libvirt VM, with
 * the import running behind the download.
 *
 * @module
 */

import { join } from "node:path";
import { fail } from "../util/errors.ts";
import { type TrustOptions, trustVerifier } from "../trust/verify.ts";
import { importImage, type ImportOptions, type ImportResult } from "./import.ts";
import { checkVmName, domainUuid } from "./libvirt.ts";
import { type Reservation, reserveRoomForImage } from "./prune.ts";
import {
  type LazyPullSpec,
  lazySessionOf,
  startLazyPull,
  waitForLazySession,
} from "./lazy_pull.ts";
import { formatLocalName, formatReference, type Reference } from "../oci/reference.ts";
import { fetchImage, type FetchOptions, type TransferResult } from "../transfer/transfer.ts";

/** Options of {@link pullImage}. */
export interface PullOptions {
  /** How to fetch: the store (`ocidir`), transport, credentials, concurrency, retries. */
  fetch: Omit<FetchOptions, "signal" | "target" | "onManifest" | "verify">;
  /** How to import: `vmdir`, VM name, domain type, libvirt connection (the store is `fetch`'s). */
  import: Omit<ImportOptions, "ocidir" | "progress" | "beforeCommit" | "signal">;
  /** Where to download from (default: `target`). */
  source?: Reference;
  /**
   * The trust policy (containers-policy.json, registries.d) the image is checked against before
   * anything is stored (default: the policy files the containers tools read). A setting, not a
   * hook, so that a lazy pull's server process can build the same check.
   */
  trust?: TrustOptions;
  /** Stops both the download and the import. */
  signal?: AbortSignal;
  /** Called once the registry has sent the manifest (the image exists), before any blob. */
  onManifest?: () => void;
  /**
   * Keep cached images and imported VMs (the store and `vmdir`) within this many bytes: once
   * the manifest says how much the pull adds, least recently used ones that nothing uses are
   * removed to make room (`reserveRoomForImage`), or the pull fails before any blob when it
   * cannot fit. A lazy pull's server does this itself, before it downloads.
   */
  cacheBudgetBytes?: number;
}

/**
 * Downloads `target` (from `source` if given) into the store and imports it as a VM. Each chunk
 * is decoded as soon as its blob is stored and verified, so a pull takes about as long as the
 * slower of download and import instead of their sum. The VM is defined only once the image is
 * complete in the store; a failure on either side stops the other and is the error thrown.
 */
export async function pullImage(target: Reference, options: PullOptions): Promise<ImportResult> {
  // A bad name is refused before the download, not after the first manifest of many GB.
  if (options.import.name !== undefined) checkVmName(options.import.name);
  const source = options.source ?? target;
  // A lazy pull of this image is filling the VM's files: its result is this pull's.
  const session = await lazySessionOf(options.import.vmdir, formatLocalName(target));
  if (session) await waitForLazySession(session.imageId, lazySpec(target, options));
  const stop = new AbortController();
  const signal = options.signal ? AbortSignal.any([options.signal, stop.signal]) : stop.signal;
  let importing: Promise<ImportResult> | undefined;
  // Released when the pull ends: its files then count as what they are.
  let claim: Reservation | undefined;
  // Whichever side fails first has the error worth reporting: the other one then fails only
  // because it was stopped ("interrupted") or lost its blobs.
  let first: { error: unknown } | undefined;
  const fetching: Promise<TransferResult> = fetchImage(source, {
    ...options.fetch,
    verify: trustVerifier(options.trust ?? {}),
    signal,
    target,
    async onManifest(image) {
      options.onManifest?.();
      if (options.cacheBudgetBytes !== undefined) {
        claim = await reserveRoomForImage(image, {
          ...options.import,
          ocidir: options.fetch.ocidir,
          budgetBytes: options.cacheBudgetBytes,
          what: formatLocalName(target),
          vmFolder: join(options.import.vmdir, options.import.name ?? image.manifest.config.digest),
        });
      }
      importing = importImage(image, formatLocalName(target), {
        ...options.import,
        ocidir: options.fetch.ocidir,
        progress: false,
        signal,
        // The VM is defined only once the image is complete in the store (manifest, tag).
        beforeCommit: () => fetching.then(() => {}),
      });
      importing.catch((error) => {
        first ??= { error };
        stop.abort(); // stops the download too
      });
    },
  });
  fetching.catch((error) => first ??= { error });
  try {
    try {
      await fetching;
    } catch (err) {
      stop.abort();
      await importing?.catch(() => {});
      throw first?.error ?? err;
    }
    try {
      return await importing!;
    } catch (err) {
      throw first?.error ?? err;
    }
  } finally {
    await claim?.release();
  }
}

/** What a lazy server needs of a pull's options (JSON: no signal, no callbacks). */
function lazySpec(target: Reference, options: PullOptions): LazyPullSpec {
  // The trust check is rebuilt by the server from its settings; any other hook cannot cross to
  // the server process: refuse rather than let the server pull without it.
  const fetch = options.fetch;
  const hooks = Object.entries({ ...fetch, ...options.import })
    .filter(([, v]) => typeof v === "function").map(([k]) => k);
  if (hooks.length) {
    throw fail(
      "usage",
      `--lazy cannot pass ${hooks.join(", ")} to its server yet`,
      "pull without --lazy",
    );
  }
  return {
    target: formatReference(target),
    source: options.source ? formatReference(options.source) : undefined,
    fetch,
    import: options.import,
    trust: options.trust ?? {},
    cacheBudgetBytes: options.cacheBudgetBytes,
  };
}

/**
 * `sarde pull --lazy`: starts (or finds) the lazy server of the image (lib/vm/lazy_pull.ts) and
 * returns as soon as the VM is defined and can start, its disks read on demand while the image
 * downloads in the background; the server commits a normal import once complete. An image that
 * cannot be read lazily (sardinecake 0.4's gzip) is pulled in full, as {@link pullImage} does.
 * `onManifest` is not called (the server does the download).
 */
export async function pullLazily(target: Reference, options: PullOptions): Promise<ImportResult> {
  if (options.import.name !== undefined) checkVmName(options.import.name);
  options.signal?.throwIfAborted();
  const served = await startLazyPull(lazySpec(target, options), options.signal);
  if (!served) return await pullImage(target, options);
  return {
    name: served.name,
    uuid: await domainUuid(served.name, options.import),
    vmFolder: join(options.import.vmdir, served.name),
    imageId: served.imageId,
    alreadyImported: false,
  };
}
