/**
 * `sarde pull` (and the executor's prepare): fetch an image and import it as a libvirt VM, with
 * the import running behind the download.
 *
 * @module
 */

import { importImage, type ImportOptions, type ImportResult } from "./import.ts";
import { checkVmName } from "./libvirt.ts";
import { formatLocalName, type Reference } from "../oci/reference.ts";
import {
  fetchImage,
  type FetchingImage,
  type FetchOptions,
  type TransferResult,
} from "../transfer/transfer.ts";

/** Options of {@link pullImage}. */
export interface PullOptions {
  /** How to fetch: the store (`ocidir`), transport, credentials, concurrency, retries. */
  fetch: Omit<FetchOptions, "signal" | "target" | "onManifest">;
  /** How to import: `vmdir`, VM name, domain type, libvirt connection (the store is `fetch`'s). */
  import: Omit<ImportOptions, "ocidir" | "progress" | "beforeCommit" | "signal">;
  /** Where to download from (default: `target`). */
  source?: Reference;
  /** Stops both the download and the import. */
  signal?: AbortSignal;
  /** Called once the registry has sent the manifest (the image exists), before any blob. */
  onManifest?: () => void;
  /**
   * Called after `onManifest`; the download waits for it and the pull fails with its error
   * (the executor's disk budget makes room here, see `makeRoom`).
   */
  beforeDownload?: (image: FetchingImage) => Promise<void>;
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
  const stop = new AbortController();
  const signal = options.signal ? AbortSignal.any([options.signal, stop.signal]) : stop.signal;
  let importing: Promise<ImportResult> | undefined;
  // Whichever side fails first has the error worth reporting: the other one then fails only
  // because it was stopped ("interrupted") or lost its blobs.
  let first: { error: unknown } | undefined;
  const fetching: Promise<TransferResult> = fetchImage(source, {
    ...options.fetch,
    signal,
    target,
    async onManifest(image) {
      options.onManifest?.();
      await options.beforeDownload?.(image);
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
}
