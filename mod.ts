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
 * The examples are type-checked by CI (`deno task doc-check`: `deno check --doc-only mod.ts`) and
 * never run, as `deno test --doc` would: they talk to real registries and libvirt.
 *
 * @module
 */

import { type CloneResult, cloneVm } from "./lib/vm/clone.ts";
import type { Credentials } from "./lib/registry/credentials.ts";
import { fail } from "./lib/util/errors.ts";
import {
  type ExportOptions,
  type ExportResult,
  exportVm as exportToStore,
} from "./lib/vm/export.ts";
import {
  defaultVmdir,
  importedVms,
  type ImportResult,
  importVm as importFromStore,
} from "./lib/vm/import.ts";
import { type ConnectOptions, domainExists, domainState } from "./lib/vm/libvirt.ts";
import { prune as pruneStore, type Removed, removeImage } from "./lib/vm/prune.ts";
import { pullImage, pullLazily } from "./lib/vm/pull.ts";
import { exportAndPush } from "./lib/vm/export_push.ts";
import { lazySessions } from "./lib/vm/lazy_pull.ts";
import {
  getVmConfig,
  type ImageEntry,
  listImages,
  type StateLookup,
  type VmState,
} from "./lib/oci/images.ts";
import { login as loginRegistry, logout as logoutRegistry } from "./lib/registry/login.ts";
import { parseReference, type Reference } from "./lib/oci/reference.ts";
import type { RetryPolicy } from "./lib/util/retry.ts";
import { defaultOcidir } from "./lib/oci/store.ts";
import { type TlsSettings, transportFor } from "./lib/registry/tls.ts";
import { trustVerifier } from "./lib/trust/verify.ts";
import { fetchImage, pushImage, type TransferResult } from "./lib/transfer/transfer.ts";
import {
  generateSigstoreKey as generateKeyPair,
  loadSigstorePrivateKey,
  pushSigner,
  type SigstoreKeyPair,
} from "./lib/trust/mod.ts";

export { SardeError } from "./lib/util/errors.ts";
export type { ErrorKind } from "./lib/util/errors.ts";
export { formatReference, parseReference } from "./lib/oci/reference.ts";
export type { Reference } from "./lib/oci/reference.ts";
export type { Credentials } from "./lib/registry/credentials.ts";
export type { ImageEntry, StateLookup, VmState } from "./lib/oci/images.ts";
export type { TransferResult } from "./lib/transfer/transfer.ts";
export type { SigstoreKeyPair } from "./lib/trust/keys.ts";
export type { TlsSettings } from "./lib/registry/tls.ts";
export type { RetryPolicy } from "./lib/util/retry.ts";
export { defaultOcidir } from "./lib/oci/store.ts";
export { defaultVmdir } from "./lib/vm/import.ts";
export type { ExportOptions, ExportResult } from "./lib/vm/export.ts";
export type { ConnectOptions } from "./lib/vm/libvirt.ts";
export type { Layout } from "./lib/oci/layout.ts";
export type { Descriptor } from "./lib/oci/types.ts";
export type { ImportResult } from "./lib/vm/import.ts";
export type { CloneResult } from "./lib/vm/clone.ts";
export type { Removed } from "./lib/vm/prune.ts";
export type { Compression, VmConfig } from "./lib/image/format.ts";

/** Where the local image store is. */
export interface StoreOptions {
  /** The OCI store folder (default {@link defaultOcidir}). */
  ocidir?: string;
}

/** How to talk to registries. */
export interface RegistryAccessOptions extends TlsSettings, DeadlineOptions {
  /** Credentials file (default: `${XDG_RUNTIME_DIR}/containers/auth.json`, as skopeo). */
  authfile?: string;
  /** Blobs transferred in parallel (default 4). */
  concurrency?: number;
  /** Largest PATCH body for uploads; 0 streams each blob in one request (default). */
  chunkSize?: number;
  /**
   * containers-registries.conf(5) file for mirrors and blocked registries (default:
   * `$CONTAINERS_REGISTRIES_CONF` or `/etc/containers/registries.conf`; drop-ins in
   * `registries.conf.d` apply too).
   */
  registriesConf?: string;
  /**
   * containers-policy.json(5) trust policy that fetches and pulls check before storing anything
   * (default: `~/.config/containers/policy.json` if it exists, else `/etc/containers/policy.json`;
   * neither: every image is accepted).
   */
  policy?: string;
  /**
   * containers-registries.d(5) folder saying where signatures are (`use-sigstore-attachments`;
   * default `~/.config/containers/registries.d` if it exists, else `/etc/containers/registries.d`).
   */
  registriesD?: string;
  /** Cancels the operation. */
  signal?: AbortSignal;
}

/** How long to wait for registries that do not answer or keep failing. */
export interface DeadlineOptions {
  /**
   * Wait at most this long (ms) for an answer, and for each piece of a download, before the
   * request counts as failed and is retried or resumed (default 30 s).
   */
  responseTimeoutMs?: number;
  /**
   * Retries of connection errors, timeouts, 5xx and 429; unset fields keep their defaults
   * (5 attempts, none started after `maxElapsedMs` = 2 min), e.g. `{ maxElapsedMs: 30_000 }`.
   */
  retry?: Partial<RetryPolicy>;
}

async function transferOptions(registry: string, options: RegistryAccessOptions & StoreOptions) {
  return {
    ...await transportFor(registry, options),
    ocidir: options.ocidir ?? defaultOcidir(),
    authfile: options.authfile,
    concurrency: options.concurrency,
    chunkSize: options.chunkSize,
    responseTimeoutMs: options.responseTimeoutMs,
    retry: options.retry,
    signal: options.signal,
    tls: {
      insecure: options.insecure,
      tlsVerify: options.tlsVerify,
      certDir: options.certDir,
      caFile: options.caFile,
    },
    registriesConf: options.registriesConf,
    verify: trustVerifier({ policy: options.policy, registriesD: options.registriesD }),
  };
}

/**
 * Downloads an image from its registry into the local store (`sarde fetch`). With `source`, the
 * image is downloaded from `source` and stored under `reference`.
 *
 * @example Download into the default store, then see what moved
 *
 * ```ts
 * import { fetch } from "./mod.ts";
 * const r = await fetch("registry.example.org/sardines/debian12:latest");
 * console.log(`${r.imageId}: ${r.blobsTransferred} blobs fetched, ${r.blobsSkipped} were here`);
 * ```
 */
export async function fetch(
  reference: string,
  options: RegistryAccessOptions & StoreOptions & { source?: string } = {},
): Promise<TransferResult> {
  const target = parseReference(reference);
  const source = options.source ? parseReference(options.source) : target;
  return await fetchImage(source, { ...await transferOptions(source.registry, options), target });
}

/**
 * Signing a push with a sigstore key, as `cosign sign --key` and `skopeo copy
 * --sign-by-sigstore-private-key` do: the signature names the reference pushed to and goes into
 * the `sha256-<digest>.sig` attachment of the repository, where cosign, skopeo and podman (built
 * with sigstore support) find it.
 */
export interface SignOptions {
  /**
   * The encrypted private key file (`sarde generate-sigstore-key`, `cosign generate-key-pair`).
   * It is decrypted before anything is uploaded: a wrong passphrase pushes nothing.
   */
  signBySigstorePrivateKey?: string;
  /** Its passphrase (the first line of skopeo's `--sign-passphrase-file`). */
  signPassphrase?: string;
}

/** The signing hook of a push, once its key is decrypted; none without a key. */
async function signingHook(options: SignOptions) {
  if (options.signBySigstorePrivateKey === undefined) return undefined;
  const key = await loadSigstorePrivateKey(
    options.signBySigstorePrivateKey,
    options.signPassphrase ?? "",
  );
  return pushSigner(key);
}

/**
 * Uploads a local image to a registry (`sarde push`), to `target` if given; with
 * `signBySigstorePrivateKey`, signs what it pushed.
 *
 * @example Push a local image under a second tag, three blobs at a time
 *
 * ```ts
 * import { push } from "./mod.ts";
 * const r = await push("registry.example.org/sardines/debian12:latest", {
 *   target: "registry.example.org/sardines/debian12:2026-12",
 *   concurrency: 3,
 * });
 * console.log(`${r.blobBytes} bytes sent, ${r.blobsMounted} mounted, ${r.blobsSkipped} known`);
 * ```
 *
 * @example Push and sign with a cosign key
 *
 * ```ts
 * import { push } from "./mod.ts";
 * await push("registry.example.org/sardines/debian12:latest", {
 *   signBySigstorePrivateKey: "/etc/sardinecake/signing.key",
 *   signPassphrase: (await Deno.readTextFile("/run/secrets/signing-pass")).split("\n")[0],
 * });
 * ```
 */
export async function push(
  local: string,
  options: RegistryAccessOptions & StoreOptions & SignOptions & { target?: string } = {},
): Promise<TransferResult> {
  const ref = parseReference(local);
  const target: Reference = options.target ? parseReference(options.target) : ref;
  const afterManifest = await signingHook(options);
  return await pushImage(ref, {
    ...await transferOptions(target.registry, options),
    target,
    afterManifest,
  });
}

/**
 * Generates an ECDSA P-256 key pair for signing (`sarde generate-sigstore-key`): the private key
 * encrypted with `passphrase` in cosign's format (write it with mode 0600), the public key as
 * PKIX PEM for the `keyPath` of a containers-policy.json `sigstoreSigned` requirement.
 *
 * @example Make a key pair
 *
 * ```ts
 * import { generateSigstoreKey } from "./mod.ts";
 * const { privatePem, publicPem } = await generateSigstoreKey("a long passphrase");
 * await Deno.writeTextFile("signing.key", privatePem, { mode: 0o600, createNew: true });
 * await Deno.writeTextFile("signing.pub", publicPem, { createNew: true });
 * ```
 */
export async function generateSigstoreKey(passphrase: string): Promise<SigstoreKeyPair> {
  return await generateKeyPair(passphrase);
}

/**
 * Checks credentials against a registry and stores them (`sarde login`). Returns the auth file.
 *
 * @example Log in with a token; rejected credentials are a `SardeError` of kind `auth`
 *
 * ```ts
 * import { login, SardeError } from "./mod.ts";
 * try {
 *   const authfile = await login("registry.example.org", {
 *     username: "ci",
 *     password: Deno.env.get("REGISTRY_TOKEN"),
 *   });
 *   console.log(`credentials stored in ${authfile}`);
 * } catch (err) {
 *   if (!(err instanceof SardeError && err.kind === "auth")) throw err;
 *   console.error(`login refused: ${err.message}`);
 * }
 * ```
 */
export async function login(
  registry: string,
  credentials: Credentials,
  options: TlsSettings & DeadlineOptions & { authfile?: string; signal?: AbortSignal } = {},
): Promise<string> {
  const transport = await transportFor(
    registry.replace(/^[a-z]+:\/\//i, "").replace(/\/.*$/, ""),
    options,
  );
  return await loginRegistry(registry, credentials, {
    ...transport,
    authfile: options.authfile,
    responseTimeoutMs: options.responseTimeoutMs,
    retry: options.retry,
    signal: options.signal,
  });
}

/**
 * Forgets stored credentials (`sarde logout`). Returns whether there were any.
 *
 * @example Forget one registry, or all
 *
 * ```ts
 * import { logout } from "./mod.ts";
 * if (!await logout("registry.example.org")) console.log("was not logged in there");
 * await logout({ all: true }); // every registry of the auth file
 * ```
 */
export async function logout(
  registry: string | { all: true },
  options: { authfile?: string } = {},
): Promise<boolean> {
  return await logoutRegistry(registry, options);
}

/** How to reach libvirt. */
/**
 * How to reach libvirt: `connect`, the URI (default: `LIBVIRT_DEFAULT_URI`, else libvirt's own
 * default). The same name as the CLI's `--connect` and the INI key `connect`.
 */
export type LibvirtOptions = ConnectOptions;

/** Where imported VMs live. */
export interface VmOptions {
  /** Folder with one sub-folder per imported VM (default {@link defaultVmdir}). */
  vmdir?: string;
}

async function vmState(id: string, connect?: string): Promise<VmState> {
  const s = await domainState(id, { connect });
  return s === "running" ? "running" : s === "missing" ? "missing" : "stopped";
}

/**
 * Lists the images in the local store (`sarde list`), with the state of the VMs imported from
 * each image, under its ID or another name (`-n`) in `vmdir`: `running` if one runs, `stopped`
 * if one is defined, else `missing`. Pass `stateOf: false` to skip libvirt.
 *
 * @example List the images, with or without the state of their VMs
 *
 * ```ts
 * import { list } from "./mod.ts";
 * for (const image of await list()) {
 *   console.log(`${image.name}:${image.tag ?? "<none>"} ${image.id} ${image.state}`);
 * }
 * // Without asking libvirt (every state is then `missing`):
 * const images = await list({ ocidir: "/srv/oci", stateOf: false });
 * console.log(images.length);
 * ```
 */
export async function list(
  options: StoreOptions & VmOptions & LibvirtOptions & { stateOf?: StateLookup | false } = {},
): Promise<(ImageEntry & { lazy?: LazyProgress })[]> {
  let stateOf: StateLookup | undefined = options.stateOf || undefined;
  if (options.stateOf === undefined) {
    const imported = await importedVms(options.vmdir ?? defaultVmdir());
    stateOf = async (id: string) => {
      const states = await Promise.all(
        [...new Set([id, ...imported.get(id) ?? []])].map((n) => vmState(n, options.connect)),
      );
      return states.includes("running")
        ? "running"
        : states.includes("stopped")
        ? "stopped"
        : "missing";
    };
  }
  const entries: (ImageEntry & { lazy?: LazyProgress })[] = await listImages(
    options.ocidir ?? defaultOcidir(),
    stateOf,
  );
  for (const s of await lazySessions(options.vmdir ?? defaultVmdir())) {
    const sum = (k: "present" | "total") => s.files.reduce((n, f) => n + f[k], 0);
    const lazy: LazyProgress = {
      name: s.name,
      phase: s.phase,
      present: sum("present"),
      total: sum("total"),
      ...s.problem === undefined ? {} : { problem: s.problem },
    };
    const known = entries.filter((e) => e.id === s.imageId);
    known.forEach((e) => e.lazy = lazy);
    // The store gets the manifest only once the download is complete: until then, the session
    // says what is coming.
    if (known.length === 0) {
      const ref = parseReference(s.reference);
      entries.push({
        source: "oci",
        name: `${ref.registry}/${ref.repository}`,
        tag: ref.tag ?? null,
        digest: s.digest,
        id: s.imageId,
        state: stateOf ? await stateOf(s.imageId) : "missing",
        lazy,
      });
    }
  }
  return entries;
}

/** A lazy pull in progress (`sarde pull --lazy`), as {@link list} shows it. */
export interface LazyProgress {
  /** The VM it defined. */
  name: string;
  /**
   * `serving`: the VM runs on files still downloading; `committed`: the files are complete and
   * in the VM folder, the VM still runs on its lazy overlays; `done`: a normal import;
   * `failed`: the download gave up (see `problem`), the VM is served what is local.
   */
  phase: "serving" | "committed" | "done" | "failed";
  /** Why the background download is being tried again, or why it gave up (`failed`). */
  problem?: string;
  /** Bytes of the image's files present locally. */
  present: number;
  /** Bytes of the image's files. */
  total: number;
}

/**
 * Options of {@link exportVm}: those of the export itself (libvirtConfig, vmConfig, compression,
 * chunkSize, force, signal), with the store and libvirt connection given as everywhere in this
 * module.
 */
export interface ExportVmOptions
  extends Omit<ExportOptions, "ocidir" | "onBlob">, StoreOptions, LibvirtOptions {
  /**
   * Also push the image to its registry (`export --push`), uploading each disk chunk as soon
   * as it is compressed: about as fast as the slower of the two instead of their sum; signed
   * with `signBySigstorePrivateKey`.
   */
  push?: RegistryAccessOptions & SignOptions;
}

/** What {@link exportVm} did; `pushed` when it pushed too. */
export interface ExportVmResult extends ExportResult {
  /** What the push did (with `push` only). */
  pushed?: TransferResult;
}

/**
 * Exports the libvirt VM `vm` into the local store as `reference` (`sarde export`). Returns the
 * image ID and manifest digest.
 *
 * @example Export the libvirt VM `debian12` with an SSH user, and push it while it is compressed
 *
 * ```ts
 * import { exportVm } from "./mod.ts";
 * const r = await exportVm("debian12", "registry.example.org/sardines/debian12:latest", {
 *   vmConfig: {
 *     users: [{ username: "ci", password: "ci" }],
 *     services: [{ service: "ssh", port: 22, protocol: "tcp" }],
 *   },
 *   compression: "zstd",
 *   push: { concurrency: 4 },
 * });
 * console.log(`${r.reference} is ${r.imageId}; ${r.pushed?.blobBytes} bytes uploaded`);
 * ```
 */
export async function exportVm(
  vm: string,
  reference?: string,
  options: ExportVmOptions = {},
): Promise<ExportVmResult> {
  const ocidir = options.ocidir ?? defaultOcidir();
  const exportOptions = { ...options, ocidir };
  if (!options.push) return await exportToStore(vm, reference, exportOptions);
  if (!reference) {
    throw fail(
      "usage",
      "exporting with push needs the image name, e.g. registry.example.org/vms/debian:12",
    );
  }
  const target = parseReference(reference);
  const afterManifest = await signingHook(options.push);
  return await exportAndPush(vm, reference, target, {
    export: exportOptions,
    push: { ...await transferOptions(target.registry, { ...options.push, ocidir }), afterManifest },
  });
}

/** Options of {@link importVm}. */
export interface ImportVmOptions extends StoreOptions, VmOptions, LibvirtOptions {
  /** VM name (default: the image ID). */
  name?: string;
  /** Accept domain XML that uses host resources. */
  allowHostResources?: boolean;
  /** Force the libvirt domain type (`qemu` where KVM is unavailable). */
  domainType?: string;
  /** Cancels the import. */
  signal?: AbortSignal;
}

function importOptions(options: ImportVmOptions) {
  return {
    ...options,
    ocidir: options.ocidir ?? defaultOcidir(),
    vmdir: options.vmdir ?? defaultVmdir(),
  };
}

/**
 * Imports a local image as a libvirt VM (`sarde import`). Idempotent.
 *
 * @example Import a fetched image as the VM `debian12`, on a host without KVM
 *
 * ```ts
 * import { importVm } from "./mod.ts";
 * const vm = await importVm("registry.example.org/sardines/debian12:latest", {
 *   name: "debian12",
 *   domainType: "qemu",
 * });
 * console.log(vm.alreadyImported ? `${vm.name} was there` : `${vm.name} is in ${vm.vmFolder}`);
 * ```
 */
export async function importVm(
  reference: string,
  options: ImportVmOptions = {},
): Promise<ImportResult> {
  return await importFromStore(reference, importOptions(options));
}

/** Options of {@link pull} beyond those of {@link importVm} and registry access. */
export interface PullVmOptions {
  /** Download from this reference instead, and store under `reference`. */
  source?: string;
  /**
   * Return as soon as the VM can start (`sarde pull --lazy`): a detached server (one per image
   * and vmdir, shared by every lazy pull of it) serves the VM's disks over NBD, fetching what the
   * guest reads first while the whole image downloads in the background, and then commits the
   * files as a normal import (same files, marker and name). A plain `pull` of the same image
   * waits for that. sardinecake 0.4's gzip images are pulled in full.
   *
   * @example Start a VM before its image has finished downloading
   *
   * ```ts
   * import { pull } from "./mod.ts";
   * const vm = await pull("registry.example.org/sardines/debian12:latest", { lazy: true });
   * await new Deno.Command("virsh", { args: ["start", vm.name] }).output();
   * ```
   */
  lazy?: boolean;
}

/**
 * Fetches an image and imports it (`sarde pull`): `name=$(sarde pull REF); virsh start "$name"`.
 *
 * @example Pull an image and start its VM
 *
 * ```ts
 * import { pull } from "./mod.ts";
 * const vm = await pull("registry.example.org/sardines/debian12:latest", {
 *   connect: "qemu:///system",
 * });
 * const virsh = new Deno.Command("virsh", { args: ["-c", "qemu:///system", "start", vm.name] });
 * if (!(await virsh.output()).success) throw new Error(`${vm.name} did not start`);
 * ```
 */
export async function pull(
  reference: string,
  options: ImportVmOptions & RegistryAccessOptions & PullVmOptions = {},
): Promise<ImportResult> {
  const target = parseReference(reference);
  const source = options.source ? parseReference(options.source) : target;
  const { signal: _, verify: __, ...fetch } = await transferOptions(source.registry, options);
  return await (options.lazy ? pullLazily : pullImage)(target, {
    fetch,
    trust: { policy: options.policy, registriesD: options.registriesD },
    import: importOptions(options),
    source,
    signal: options.signal,
  });
}

/** Options of {@link clone}. */
export interface CloneVmOptions extends Omit<ImportVmOptions, "name">, RegistryAccessOptions {
  /** Folder for the clone's overlays (default: `vmdir`). */
  clonedir?: string;
  /** Start the clone. */
  start?: boolean;
  /** Make a transient VM (started at once, gone when it stops). */
  transient?: boolean;
  /**
   * When `source` names no defined VM, pull it lazily first ({@link pull} with `lazy`, the
   * registry options apply): the clone can start before the image has downloaded, its disks
   * reading the image over the lazy server's NBD socket until the image is complete.
   */
  lazy?: boolean;
}

/**
 * Clones a local image or a defined VM into a new VM with copy-on-write disks (`sarde clone`).
 *
 * @example A throw-away VM for one CI job, started at once and gone when it stops
 *
 * ```ts
 * import { clone } from "./mod.ts";
 * const job = await clone("registry.example.org/sardines/debian12:latest", "ci-job-42", {
 *   clonedir: "/var/tmp/sarde-clones",
 *   transient: true,
 * });
 * console.log(`${job.name} runs on overlays in ${job.folder} over ${job.base}`);
 * ```
 */
export async function clone(
  source: string,
  target: string,
  options: CloneVmOptions = {},
): Promise<CloneResult> {
  let base = source;
  if (options.lazy && !await domainExists(source, importOptions(options))) {
    base = (await pull(source, { ...options, lazy: true })).name;
  }
  return await cloneVm(base, target, { ...importOptions(options), clonedir: options.clonedir });
}

/**
 * The sardine VM config (users, services) of a local image, or `undefined` (`sarde getconfig`).
 *
 * @example Read the users of an image's VM config
 *
 * ```ts
 * import { getConfig } from "./mod.ts";
 * const config = await getConfig("registry.example.org/sardines/debian12:latest");
 * console.log(config ? JSON.stringify(config.users) : "the image has no VM config");
 * ```
 */
export async function getConfig(
  reference: string,
  options: StoreOptions = {},
): Promise<Record<string, unknown> | undefined> {
  return await getVmConfig(options.ocidir ?? defaultOcidir(), parseReference(reference));
}

/**
 * Removes a cached image and the blobs only it needed (`sarde rm`). Imported VMs stay.
 *
 * @example Remove an old tag from the cache
 *
 * ```ts
 * import { remove } from "./mod.ts";
 * const { what, bytes } = await remove("registry.example.org/sardines/debian12:old");
 * console.log(`removed ${what}: ${bytes} bytes freed`);
 * ```
 */
export async function remove(reference: string, options: StoreOptions = {}): Promise<Removed> {
  return await removeImage(options.ocidir ?? defaultOcidir(), reference);
}

/** Options of {@link prune}. */
export interface PruneOptions extends StoreOptions, VmOptions, LibvirtOptions {
  /** Also look for leftover clones here (the executor's clonedir). */
  clonedirs?: string[];
  /** Remove images and unused imported VMs not used for this long (milliseconds). */
  olderThanMs?: number;
  /** Then remove the least recently used until at most this many bytes remain. */
  keepBytes?: number;
  /** Report only. */
  dryRun?: boolean;
}

/**
 * Frees space (`sarde prune`): leftovers always; with `olderThanMs`/`keepBytes` also cached images
 * and imported VMs that no defined VM uses, least recently used first.
 *
 * @example See what would go: unused for two weeks, then down to 200 GiB (drop `dryRun` to do it)
 *
 * ```ts
 * import { prune } from "./mod.ts";
 * const DAY_MS = 24 * 60 * 60 * 1000;
 * const removed = await prune({
 *   olderThanMs: 14 * DAY_MS,
 *   keepBytes: 200 * 2 ** 30,
 *   dryRun: true,
 * });
 * for (const { what, bytes } of removed) console.log(`would remove ${what} (${bytes} bytes)`);
 * ```
 */
export async function prune(options: PruneOptions = {}): Promise<Removed[]> {
  return await pruneStore({
    ...options,
    ocidir: options.ocidir ?? defaultOcidir(),
    vmdir: options.vmdir ?? defaultVmdir(),
  });
}
