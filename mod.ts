/**
 * sarde: share libvirt/QEMU virtual machines through OCI registries.
 *
 * This module is the typed public API; the `sarde` CLI (`cli.ts`) and the GitLab executor
 * (`executor.ts`) are thin shells over it.
 *
 * ```ts
 * import { fetch, list } from "./mod.ts";
 * await fetch("127.0.0.1:5000/sardines/debian12:latest", { ocidir: "/var/tmp/oci" });
 * console.log(await list({ ocidir: "/var/tmp/oci" }));
 * ```
 *
 * @module
 */

import type { Credentials } from "./lib/credentials.ts";
import { getVmConfig, type ImageEntry, listImages, type StateLookup } from "./lib/images.ts";
import { login as loginRegistry, logout as logoutRegistry } from "./lib/login.ts";
import { parseReference, type Reference } from "./lib/reference.ts";
import type { RetryPolicy } from "./lib/retry.ts";
import { defaultOcidir } from "./lib/store.ts";
import { type TlsSettings, transportFor } from "./lib/tls.ts";
import { fetchImage, pushImage, type TransferResult } from "./lib/transfer.ts";

export { SardeError } from "./lib/errors.ts";
export type { ErrorKind } from "./lib/errors.ts";
export { formatReference, parseReference } from "./lib/reference.ts";
export type { Reference } from "./lib/reference.ts";
export type { Credentials } from "./lib/credentials.ts";
export type { ImageEntry, VmState } from "./lib/images.ts";
export type { TransferResult } from "./lib/transfer.ts";
export type { TlsSettings } from "./lib/tls.ts";
export type { RetryPolicy } from "./lib/retry.ts";
export { defaultOcidir } from "./lib/store.ts";

/** Where the local image store is. */
export interface StoreOptions {
  /** The OCI store folder (default {@link defaultOcidir}). */
  ocidir?: string;
}

/** How to talk to registries. */
export interface RegistryAccessOptions extends TlsSettings {
  /** Credentials file (default: `${XDG_RUNTIME_DIR}/containers/auth.json`, as skopeo). */
  authfile?: string;
  /** Blobs transferred in parallel (default 4). */
  concurrency?: number;
  /** Largest PATCH body for uploads; 0 streams each blob in one request (default). */
  chunkSize?: number;
  /** Retry policy for connection errors, 5xx and 429. */
  retry?: RetryPolicy;
  /** Cancels the operation. */
  signal?: AbortSignal;
}

async function transferOptions(registry: string, options: RegistryAccessOptions & StoreOptions) {
  return {
    ...await transportFor(registry, options),
    ocidir: options.ocidir ?? defaultOcidir(),
    authfile: options.authfile,
    concurrency: options.concurrency,
    chunkSize: options.chunkSize,
    retry: options.retry,
    signal: options.signal,
  };
}

/**
 * Downloads an image from its registry into the local store (`sarde fetch`). With `source`, the
 * image is downloaded from `source` and stored under `reference`.
 */
export async function fetch(
  reference: string,
  options: RegistryAccessOptions & StoreOptions & { source?: string } = {},
): Promise<TransferResult> {
  const target = parseReference(reference);
  const source = options.source ? parseReference(options.source) : target;
  return await fetchImage(source, { ...await transferOptions(source.registry, options), target });
}

/** Uploads a local image to a registry (`sarde push`), to `target` if given. */
export async function push(
  local: string,
  options: RegistryAccessOptions & StoreOptions & { target?: string } = {},
): Promise<TransferResult> {
  const ref = parseReference(local);
  const target: Reference = options.target ? parseReference(options.target) : ref;
  return await pushImage(ref, { ...await transferOptions(target.registry, options), target });
}

/** Checks credentials against a registry and stores them (`sarde login`). Returns the auth file. */
export async function login(
  registry: string,
  credentials: Credentials,
  options: TlsSettings & { authfile?: string; signal?: AbortSignal } = {},
): Promise<string> {
  const transport = await transportFor(
    registry.replace(/^[a-z]+:\/\//i, "").replace(/\/.*$/, ""),
    options,
  );
  return await loginRegistry(registry, credentials, {
    ...transport,
    authfile: options.authfile,
    signal: options.signal,
  });
}

/** Forgets stored credentials (`sarde logout`). Returns whether there were any. */
export async function logout(
  registry: string | { all: true },
  options: { authfile?: string } = {},
): Promise<boolean> {
  return await logoutRegistry(registry, options);
}

/** Lists the images in the local store (`sarde list`). */
export async function list(
  options: StoreOptions & { stateOf?: StateLookup } = {},
): Promise<ImageEntry[]> {
  return await listImages(options.ocidir ?? defaultOcidir(), options.stateOf);
}

/** The sardine VM config (users, services) of a local image, or `undefined` (`sarde getconfig`). */
export async function getConfig(
  reference: string,
  options: StoreOptions = {},
): Promise<Record<string, unknown> | undefined> {
  return await getVmConfig(options.ocidir ?? defaultOcidir(), parseReference(reference));
}
