/**
 * `sarde pull --lazy` (docs/lazy-pull.md, part 5): the VM is defined and can start before its
 * image has finished downloading.
 *
 * One session per image and vmdir, in `<vmdir>/.lazy/<first 20 hex digits of the image ID>/` (a
 * UNIX socket path must stay under 108 bytes): `lock` (an exclusive flock held by the server
 * process), the NBD socket `nbd/nbd.sock`, the disks' local overlays `overlays/`, `state.json`
 * (written atomically at most once a second) and `server.log`. The files being filled live
 * where a normal import extracts, a hidden folder beside the VM folder
 * ({@link lazyPartialName}), and are committed into the VM folder by the same function
 * ({@link commitFolder}), so the result is exactly a normal import.
 *
 * The server is a detached process (`sarde lazy-serve SPEC`, hidden): {@link startLazyPull}
 * starts it in a new session and reads one JSON line from its stdout once it serves (or fails);
 * everything else it says goes to its log.
 *
 * @module
 */

import { basename, dirname, join, resolve } from "node:path";
import { DOMParser } from "@xmldom/xmldom";
import { createCodecPool } from "../image/codec_worker.ts";
import {
  Annotation,
  domainLayer,
  hasZstdLayers,
  type ImageFile,
  vmConfigLayer,
} from "../image/format.ts";
import { MAX_FRAME_SIZE } from "../image/frames.ts";
import { decodeFrame, decodeZstdChunk, zeroDigest } from "../image/zstd.ts";
import {
  type BlockSource,
  chunkGroups,
  decodeZstdUnit,
  type LazyFile,
  nbdBackingStoreXml,
  nbdReconnectDelay,
  type NbdServer,
  openFileSource,
  openLazyFile,
  prefetchQcow2Metadata,
  PRESENCE_LOG_SUFFIX,
  registryTableReader,
  registryUnitFetcher,
  serveNbd,
  type TableReader,
  type UnitDecoder,
} from "../lazy/mod.ts";
import { digestHex } from "../oci/digest.ts";
import { blobPath, hasBlob, readBlob, readBlobRange } from "../oci/layout.ts";
import { formatLocalName, manifestSelector, parseReference } from "../oci/reference.ts";
import { isIndexMediaType, type Manifest, parseManifest } from "../oci/types.ts";
import {
  fetchImage,
  type FetchingImage,
  openPrimaryClient,
  type TransferOptions,
} from "../transfer/transfer.ts";
import { type TrustOptions, trustVerifier } from "../trust/verify.ts";
import { describeError, fail, SardeError } from "../util/errors.ts";
import {
  ensureDir,
  exists,
  type FileLock,
  lockFile,
  processesHolding,
  processExists,
  tryLockFile,
  writeFileAtomic,
} from "../util/fsutil.ts";
import { DEFAULT_RESPONSE_TIMEOUT_MS } from "../util/defaults.ts";
import { createPriorityGate } from "../util/gate.ts";
import { debug, error, info, warn } from "../util/log.ts";
import { forEachConcurrent } from "../util/pool.ts";
import { type RetryPolicy, startRetries } from "../util/retry.ts";
import {
  bootFiles,
  childElement,
  childElements,
  type DomainDoc,
  type FileDisk,
  fileDisks,
  parseDomainXml,
  prepareImportedDomain,
  removeElement,
  serializeDomainXml,
  setElementText,
} from "./domain.ts";
import {
  commitFolder,
  finishFiles,
  imageFiles,
  IMPORT_MARKER,
  type ImportOptions,
  lazyPartialName,
  vmLockPath,
} from "./import.ts";
import {
  checkVmName,
  defineXml,
  domainExists,
  domainState,
  domainUuid,
  dumpXml,
  libvirtVersion,
} from "./libvirt.ts";
import { type Reservation, reserveRoomForImage } from "./prune.ts";
import { info as qemuInfo, rebaseUnsafe } from "./qemu.ts";
import { runQemuImgOk } from "../util/qemu_img.ts";

/** What a lazy server is asked to do: a pull's options, as JSON on its command line. */
export interface LazyPullSpec {
  /** The local name of the image (`formatReference`). */
  target: string;
  /** Where to download from (default: `target`). */
  source?: string;
  /** How to fetch (the store, transport, credentials, concurrency, retries). */
  fetch: Omit<TransferOptions, "signal">;
  /** How to import (vmdir, VM name, domain type, libvirt connection). */
  import: Omit<ImportOptions, "ocidir" | "progress" | "beforeCommit" | "signal">;
  /** The trust policy the fetch checks the image against before storing or serving anything. */
  trust?: TrustOptions;
  /** Room is made within this budget before the download (see `PullOptions.cacheBudgetBytes`). */
  cacheBudgetBytes?: number;
}

/** Where a session is in its life. */
export type LazyPhase = "serving" | "committed" | "done" | "failed";

/** `state.json` of a session: what `sarde list` and waiting pulls read. */
export interface LazyState {
  /** The server's process. */
  pid: number;
  /** The image ID. */
  imageId: string;
  /** The manifest digest. */
  digest: string;
  /** The VM name. */
  name: string;
  /** The image's local name. */
  reference: string;
  /** The NBD socket. */
  socket: string;
  /** `serving`: the VM is defined on NBD; `committed`: files are in the VM folder (the VM still
   * runs on its overlays); `done`: the VM is defined on its local files; `failed`: the download
   * gave up (`problem` says why), the VM is served what is local while it runs. */
  phase: LazyPhase;
  /** Why the background download is being tried again (`serving`), or why it gave up. */
  problem?: string;
  /** Each file's present and total bytes. */
  files: { name: string; present: number; total: number }[];
  /** Demand reads that could not be served (the guest got an I/O error), and the last reason. */
  failedReads?: { count: number; last?: string };
}

/** What the server says on its stdout, once. */
export type ReadyLine =
  | { name: string; imageId: string }
  | { fallback: string }
  | { error: string; kind: string; hint?: string };

/** The folder of all lazy sessions of `vmdir`. */
export function lazyRoot(vmdir: string): string {
  return join(vmdir, ".lazy");
}

/** The session folder of image `imageId` in `vmdir`. */
export function lazyStateDir(vmdir: string, imageId: string): string {
  return join(lazyRoot(vmdir), digestHex(imageId).slice(0, 20));
}

/** The state of the session in `dir`, or `undefined` when there is none (or it is unreadable). */
export async function readLazyState(dir: string): Promise<LazyState | undefined> {
  try {
    const s = JSON.parse(await Deno.readTextFile(join(dir, "state.json")));
    return typeof s?.name === "string" && typeof s?.imageId === "string" ? s : undefined;
  } catch {
    return undefined;
  }
}

/** Every session of `vmdir` with a readable state (for `sarde list`). */
export async function lazySessions(vmdir: string): Promise<LazyState[]> {
  const out: LazyState[] = [];
  try {
    for await (const e of Deno.readDir(lazyRoot(vmdir))) {
      if (!e.isDirectory) continue;
      const s = await readLazyState(join(lazyRoot(vmdir), e.name));
      if (s) out.push(s);
    }
  } catch { /* no sessions */ }
  return out;
}

/**
 * The sessions of `vmdir` whose server is alive: their image, VM and files are in use (job VMs
 * read them over NBD) and must stay, whatever a prune or a disk budget wants.
 */
export async function liveLazySessions(vmdir: string): Promise<LazyState[]> {
  const out: LazyState[] = [];
  for (const s of await lazySessions(vmdir)) {
    if (await serverAlive(lazyStateDir(vmdir, s.imageId))) out.push(s);
  }
  return out;
}

/** Whether the server of the session in `dir` is alive (it holds the lock). */
async function serverAlive(dir: string): Promise<boolean> {
  if (!await exists(join(dir, "lock"))) return false;
  const probe = await tryLockFile(join(dir, "lock"), { folderMustExist: true }).catch(() => null);
  if (probe === null) return false; // the folder went away: finished
  if (!probe) return true;
  probe.release();
  return false;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * The V8 flags of every sarde process (bin/sarde, tools/compile.sh): a small young generation.
 * The server streams the whole image through its main thread; without it V8 lets the young
 * generation grow to tens of MB of short-lived garbage (measured: 26 MB of the server's peak).
 */
const V8_FLAGS = "--v8-flags=--max-semi-space-size=1";

/**
 * How to run this program again: the executable itself when compiled (its V8 flags are built
 * in); else `deno run` of the bundle or of `cli.ts` (the main module when it is sarde's, else the
 * one of this tree: a library user's program is not sarde), with the `deno.json` beside it (its
 * import map).
 */
async function serverCommand(): Promise<string[]> {
  const exe = Deno.execPath();
  if (!/^deno(\.exe)?$/.test(basename(exe))) return [exe];
  const own = new URL("../../cli.ts", import.meta.url);
  const main = /(cli\.ts|\.js)$/.test(Deno.mainModule) || own.protocol !== "file:"
    ? new URL(Deno.mainModule)
    : own;
  if (main.pathname.endsWith(".js")) {
    return [exe, "run", "-A", V8_FLAGS, "--no-config", main.href];
  }
  const config = new URL("deno.json", main);
  const withConfig = config.protocol === "file:" && await exists(config.pathname)
    ? ["--config", config.pathname]
    : [];
  return [exe, "run", "-A", V8_FLAGS, "--quiet", ...withConfig, main.href];
}

/**
 * Starts a lazy server for `spec` as a detached process (its own session, stdio away from this
 * terminal) and waits until it serves: the VM is defined and can start. Returns its name, or
 * `undefined` when the image cannot be pulled lazily (the reason was logged) and a normal pull
 * must be done instead. If a server for that image already runs, the new process only waits for
 * it and reports its VM: never two downloads.
 */
export async function startLazyPull(
  spec: LazyPullSpec,
  signal?: AbortSignal,
): Promise<{ name: string; imageId: string } | undefined> {
  const vmdir = spec.import.vmdir;
  await ensureDir(lazyRoot(vmdir), "the lazy pull folder", "choose another one with --vmdir");
  const rand = crypto.getRandomValues(new Uint32Array(1))[0].toString(36);
  const log = join(lazyRoot(vmdir), `server-${Deno.pid}-${rand}.log`);
  const cmd = [...await serverCommand(), "lazy-serve", JSON.stringify(absoluteSpec(spec))];
  // In "/", with temp files in the sessions' folder: the caller's folders may go before the
  // server does (a CI job's TMPDIR), and with them every later spawn ("not found").
  const child = new Deno.Command("setsid", {
    cwd: "/",
    env: { TMPDIR: lazyRoot(vmdir) },
    args: ["-f", "sh", "-c", 'log=$1; shift; exec "$@" </dev/null 2>>"$log"', "sh", log, ...cmd],
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  let text = "";
  const decoder = new TextDecoder();
  // Stopping the wait leaves the server be: its download serves whoever asks next.
  const reader = child.stdout.getReader();
  const stopWaiting = () => void reader.cancel().catch(() => {});
  signal?.addEventListener("abort", stopWaiting, { once: true });
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
      if (text.includes("\n")) break;
    }
  } finally {
    signal?.removeEventListener("abort", stopWaiting);
    reader.releaseLock();
  }
  await child.status;
  signal?.throwIfAborted();
  const line = text.split("\n")[0];
  let ready: ReadyLine;
  try {
    ready = JSON.parse(line);
  } catch {
    const tail = await Deno.readTextFile(log).catch(() => "");
    throw fail(
      "external",
      `the lazy pull server stopped before serving: ${
        tail.trim().split("\n").pop() ?? "no output"
      }`,
      `its log: ${log}`,
    );
  }
  if ("error" in ready) {
    await Deno.remove(log).catch(() => {});
    throw new SardeError(ready.kind as SardeError["kind"], ready.error, { hint: ready.hint });
  }
  if ("fallback" in ready) {
    await Deno.remove(log).catch(() => {});
    if (ready.fallback) warn(ready.fallback);
    return undefined;
  }
  // A serving server moved its log into its session; a process that only found one running
  // leaves its own here.
  await Deno.remove(log).catch(() => {});
  return ready;
}

/** `spec` with its file and folder names absolute (the server runs in `/`). */
function absoluteSpec(spec: LazyPullSpec): LazyPullSpec {
  const abs = <T extends object>(o: T, keys: string[]): T =>
    Object.fromEntries(
      Object.entries(o).map((
        [k, v],
      ) => [k, keys.includes(k) && typeof v === "string" ? resolve(v) : v]),
    ) as T;
  const fetch = abs(spec.fetch, ["ocidir", "authfile", "registriesConf"]);
  if (spec.fetch.tls) fetch.tls = abs(spec.fetch.tls, ["certDir", "caFile"]);
  return {
    ...spec,
    fetch,
    import: abs(spec.import, ["vmdir"]),
    trust: spec.trust && abs(spec.trust, ["policy", "registriesD"]),
  };
}

/**
 * Waits until the lazy session of image `imageId` (if any) has committed the VM's files, so that
 * a plain pull finds a normal import. A session whose server died is started again (it goes on
 * from what it had) with `spec`.
 */
export async function waitForLazySession(imageId: string, spec: LazyPullSpec): Promise<void> {
  const dir = lazyStateDir(spec.import.vmdir, imageId);
  let announced = false;
  let restarted = false;
  for (;;) {
    const state = await readLazyState(dir);
    // Committed: the files are the import's already, but the VM may still be defined on the
    // socket; a dead server is started again to serve it and move it onto its files.
    if (state?.phase === "committed") await reviveLazySession(dir);
    if (!state || (state.phase !== "serving" && state.phase !== "failed")) return;
    if (!announced) {
      info(`waiting for the lazy pull of ${state.reference} (VM ${state.name}) to complete`);
      announced = true;
    }
    const alive = await serverAlive(dir);
    // A server that gave up and exited is given one more go, once; one that still serves the VM
    // has the last word (a new server, still starting, has not written its state yet).
    if (state.phase === "failed" && (restarted || await processExists(state.pid))) {
      throw lazyFailure(state, dir);
    }
    if (!alive) {
      info("its server is gone: starting it again");
      await startLazyPull({ ...spec, import: { ...spec.import, name: state.name } });
      restarted = true;
    }
    await sleep(500);
  }
}

/**
 * Starts the server of the session in `dir` again when it died (a kill, a crash, a reboot), from
 * the spec it recorded, since the VM (and any job VM held on it) reads its disks through its
 * socket. Returns whether a server runs it now.
 */
async function reviveLazySession(dir: string): Promise<boolean> {
  if (await serverAlive(dir)) return true;
  const text = await Deno.readTextFile(join(dir, SPEC_FILE)).catch(() => undefined);
  if (text === undefined) return false;
  info(`the lazy server of ${dir} is gone: starting it again`);
  try {
    await startLazyPull(JSON.parse(text) as LazyPullSpec);
  } catch (err) {
    warn(`cannot start the lazy server of ${dir} again: ${describeError(err)}`);
  }
  return await serverAlive(dir);
}

/** The spec a server runs with, kept in its session for {@link reviveLazySession}. */
const SPEC_FILE = "spec.json";

/** The error of a session whose download gave up. */
function lazyFailure(state: LazyState, dir: string): SardeError {
  return fail(
    "external",
    `the lazy pull of ${state.reference} (VM ${state.name}) failed: ${state.problem}`,
    `its log: ${join(dir, "server.log")}; pull again once the registry serves the image ` +
      "(after the VM stopped, if it runs)",
  );
}

/**
 * The manifest of the image a lazy pull of `target` serves while its store does not list it yet
 * (its fetch records it last), or `undefined` when no lazy pull of it is serving.
 */
export async function lazyManifest(vmdir: string, target: string): Promise<Manifest | undefined> {
  const session = await lazySessionOf(vmdir, target);
  return session && await sessionManifest(vmdir, session);
}

/** The manifest the lazy session `state` of `vmdir` recorded, or `undefined` before it did. */
export async function sessionManifest(
  vmdir: string,
  state: LazyState,
): Promise<Manifest | undefined> {
  const file = join(lazyStateDir(vmdir, state.imageId), "manifest.json");
  const bytes = await Deno.readFile(file).catch(() => undefined);
  return bytes && parseManifest(bytes, `manifest of ${state.reference}`);
}

/** Finds the session of `target` by its reference (the image ID is not known before a fetch). */
export async function lazySessionOf(vmdir: string, target: string): Promise<LazyState | undefined> {
  return (await lazySessions(vmdir)).find((s) =>
    s.reference === target && (s.phase === "serving" || s.phase === "failed")
  );
}

/** How long the server stays once done while no NBD client is connected (read when needed: a
 * library user's program may have no env permission). */
const idleMs = () => Number(Deno.env.get("SARDE_LAZY_IDLE_MS") ?? 30_000);

/**
 * How often the background download is started again after it failed (a blob the registry
 * served corrupt, a registry down for longer than one fetch retries): 6 attempts, 5 s after the
 * first failure, doubling up to 60 s (±20 %), about 2¼ min of waiting in all; then the image is
 * taken to be unable to complete. `SARDE_LAZY_RETRY_MS` sets the first delay (tests).
 */
function completionRetryPolicy(): RetryPolicy {
  const base = Number(Deno.env.get("SARDE_LAZY_RETRY_MS") ?? "");
  return {
    attempts: 6,
    baseDelayMs: Number.isFinite(base) && base > 0 ? base : 5_000,
    maxDelayMs: 60_000,
    maxElapsedMs: Infinity,
  };
}

/** One run of the background download: the fetch, and the image once its manifest is known. */
interface BackgroundFetch {
  done: Promise<unknown>;
  image: Promise<FetchingImage>;
}

/**
 * Resolves once `server` has had no client for {@link idleMs} and no hold of the session in `dir`
 * counts (job VMs defined on its socket may start later), holding the holds lock: no clone takes
 * a hold until the caller releases it. `settle` runs every 2 s meanwhile (held clones move off
 * the socket once the image is complete).
 */
async function untilIdle(
  server: NbdServer,
  dir: string,
  connect: { connect?: string },
  settle?: () => Promise<void>,
): Promise<FileLock> {
  for (let idleSince = Date.now(), i = 0;; await sleep(500), i++) {
    if (settle && i % 4 === 0) await settle();
    if (server.clients > 0) idleSince = Date.now();
    if (Date.now() - idleSince < idleMs()) continue;
    const holds = await lockFile(join(dir, HOLDS_LOCK));
    if (!await liveHolds(dir, connect)) return holds;
    holds.release();
    idleSince = Date.now();
  }
}

/** A disk of the VM while lazy: its overlay and the image files of its backing chain. */
interface LazyDisk {
  overlay: string;
  file: string;
  format: string;
}

/**
 * The lazy server (`sarde lazy-serve`): fetches the image in the background, serves its files
 * over NBD while they fill, defines the VM on local overlays, commits the import once complete,
 * and returns once done and idle. `ready` is called exactly once, before any long wait: with the
 * VM's name once it can start, with a fallback reason, or with the error that stopped it first.
 */
export async function serveLazyPull(
  spec: LazyPullSpec,
  ready: (line: ReadyLine) => void,
): Promise<void> {
  let told = false;
  const tell = (line: ReadyLine) => {
    if (!told) ready(line);
    told = true;
  };
  try {
    await serve(spec, tell);
  } catch (err) {
    const e = err instanceof SardeError ? err : fail("external", describeError(err));
    tell({ error: e.message, kind: e.kind, hint: e.hint });
    throw err;
  }
}

async function serve(spec: LazyPullSpec, tell: (line: ReadyLine) => void): Promise<void> {
  const target = parseReference(spec.target);
  const source = parseReference(spec.source ?? spec.target);
  const what = formatLocalName(target);
  const vmdir = spec.import.vmdir;
  const connect = { connect: spec.import.connect };
  if (spec.import.name !== undefined) checkVmName(spec.import.name);
  const { client, reference } = await openPrimaryClient(source, spec.fetch);
  let claim: Reservation | undefined; // see claimTaken
  try {
    const fetched = await client.getManifest(reference.repository, manifestSelector(reference));
    if (isIndexMediaType(fetched.mediaType)) {
      throw fail("usage", `${what} is a multi-platform image index, not a sardinecake VM image`);
    }
    const manifest = parseManifest(fetched.bytes, `manifest of ${what}`);
    const imageId = manifest.config.digest;
    const name = checkVmName(spec.import.name ?? imageId);
    const vmFolder = join(vmdir, name);
    if (!hasZstdLayers(manifest)) {
      return tell({
        fallback: `${what} is a sardinecake 0.4 (gzip) image, which cannot be read lazily: ` +
          "pulling it in full",
      });
    }
    const dir = lazyStateDir(vmdir, imageId);
    await Deno.mkdir(dir, { recursive: true, mode: 0o755 });
    let lock = await tryLockFile(join(dir, "lock"));
    // Another server holds it, or a probe whether one runs (prune, clone) held it an instant.
    for (let i = 0; !lock && i < 5; i++) {
      if (await attach(dir, name, tell)) return;
      lock = await tryLockFile(join(dir, "lock"));
    }
    if (!lock) {
      throw fail(
        "external",
        "the lazy server of this image stopped while starting",
        "run it again",
      );
    }
    using _lock = lock;
    const previous = await readLazyState(dir);
    if (previous && previous.name !== name) {
      throw fail(
        "usage",
        `${what} is being pulled lazily as VM ${previous.name}`,
        `use -n ${previous.name}, or wait for it to complete`,
      );
    }
    // A server killed once done while clones still read its socket: it serves them until they
    // move (the VM is on its files already).
    const clonesWaiting = previous?.phase === "done" && await liveHolds(dir, connect);
    // Imported already (or a server died after its very last step): a plain pull is a no-op.
    if (
      previous?.phase === "done" && !clonesWaiting ||
      !previous && await exists(join(vmFolder, IMPORT_MARKER))
    ) {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      return tell({ fallback: "" });
    }
    // Moved beside the session's other files, where list and the user look for it.
    await adoptLog(dir);
    await writeFileAtomic(
      join(dir, SPEC_FILE),
      JSON.stringify({ ...spec, import: { ...spec.import, name } }) + "\n",
    );

    // The name is ours until the files are committed: imports and prune of it wait.
    let nameLock: FileLock | undefined = await lockFile(vmLockPath(vmdir, name));
    // With a cache budget, room for the whole image is claimed before its first blob, and given
    // up once state.json says "serving": prune then counts the live session as its whole image.
    // A restarted session is counted already.
    let claimTaken = previous !== undefined || spec.cacheBudgetBytes === undefined;
    // Demand reads hold it; the background download waits at it between body reads. A wait is
    // bounded well under the response timeout, after which a paused connection would be cut.
    const gate = createPriorityGate({
      maxWaitMs: (spec.fetch.responseTimeoutMs ?? DEFAULT_RESPONSE_TIMEOUT_MS) / 3,
    });
    /**
     * A fetch of the whole image into the store, as a plain pull does; `again` after a failure:
     * then by the digest served so far, as the tag may have moved meanwhile (a push of a new
     * image would otherwise be downloaded and tagged under a VM made of the old one). That
     * manifest passed the policy on the first fetch; by digest, it is the same bytes.
     */
    const startFetch = (again = false): BackgroundFetch => {
      const got = Promise.withResolvers<FetchingImage>();
      got.promise.catch(() => {});
      // The policy is checked inside fetchImage before onManifest: an image it refuses is never
      // defined nor served.
      const done = fetchImage(
        again ? { ...source, tag: undefined, digest: fetched.digest } : source,
        {
          ...spec.fetch,
          verify: again ? async () => {} : trustVerifier(spec.trust ?? {}),
          target,
          onManifest: async (image) => {
            if (!claimTaken) {
              claimTaken = true;
              claim = await reserveRoomForImage(image, {
                ...connect,
                ocidir: spec.fetch.ocidir,
                vmdir,
                budgetBytes: spec.cacheBudgetBytes!,
                what,
                vmFolder,
              });
            }
            got.resolve(image);
          },
          gate: gate.wait,
        },
      );
      done.catch((err) => got.reject(err));
      return { done, image: got.promise };
    };
    const firstFetch = startFetch();
    const image = await firstFetch.image;
    if (image.descriptor.digest !== fetched.digest) {
      throw fail("usage", `${what} changed while the lazy pull started`, "run it again");
    }
    const ex = { layout: image.layout, manifest, what, ready: image.blobReady };
    const files = await imageFiles(ex);
    if (files.some((f) => f.encoding !== "zstd")) {
      throw fail("integrity", `${what} mixes gzip and zstd files`);
    }
    const xmlDigest = domainLayer(manifest, what).digest;
    await image.blobReady(xmlDigest);
    // The VM config (SSH users) is read from the store before the manifest is in its index: the
    // executor's prepare finds the manifest here ({@link lazyManifest}) and the config's blob.
    const configLayer = vmConfigLayer(manifest);
    if (configLayer) await image.blobReady(configLayer.digest);
    await writeFileAtomic(join(dir, "manifest.json"), fetched.bytes);
    const xml = new TextDecoder().decode(await readBlob(image.layout, xmlDigest, 4 << 20));
    const partial = join(vmdir, lazyPartialName(name));

    if (!previous) {
      if (await domainExists(name, connect)) {
        throw fail(
          "usage",
          `a libvirt VM named '${name}' already exists and was not imported from ${what} by sarde`,
          "choose another name with -n NAME, or remove that VM first",
        );
      }
      if (await exists(vmFolder)) {
        throw fail("usage", `${vmFolder} exists`, "choose another name with -n NAME");
      }
      await Deno.remove(partial, { recursive: true }).catch(() => {});
    }
    const committedBefore = (previous?.phase === "committed" || clonesWaiting) &&
      await exists(join(vmFolder, IMPORT_MARKER));
    // The background completion decodes on every worker but one, which stays free for demand
    // reads' frames: they must not queue behind whole chunks. A worker costs ~25 MB of RSS, and
    // one decodes a chunk from the store at 85+ MB/s on this busy 2-core machine (more than the
    // network gives a pull): no more workers than cores.
    const workers = Math.max(2, navigator.hardwareConcurrency ?? 2);
    const fillers = workers - 1;
    const pool = createCodecPool(workers);
    const lazy = new Map<string, LazyFile>();
    /** What the NBD server exports: the lazy files, or the local files once committed. */
    const sources = new Map<string, BlockSource & { close(): Promise<void> }>();
    let server: NbdServer | undefined;
    const socket = join(dir, "nbd", "nbd.sock");
    let phase: LazyPhase = committedBefore ? "committed" : "serving";
    /** Why the background download is being retried, or why it gave up. */
    let problem: string | undefined;
    const failedReads = { count: 0, last: undefined as string | undefined };
    const writeState = () => {
      const state: LazyState = {
        pid: Deno.pid,
        imageId,
        digest: fetched.digest,
        name,
        reference: what,
        socket,
        phase,
        files: files.map((f) => ({
          name: f.name,
          present: phase === "serving" ? lazy.get(f.name)?.presentBytes ?? 0 : f.size ?? 0,
          total: f.size ?? 0,
        })),
        ...problem === undefined ? {} : { problem },
        failedReads,
      };
      return writeFileAtomic(join(dir, "state.json"), JSON.stringify(state, null, 2) + "\n");
    };
    // state.json says "serving" only once the VM is defined: other pulls report the VM by it.
    let stateTimer: ReturnType<typeof setInterval> | undefined;
    try {
      const folder = committedBefore ? vmFolder : partial;
      await Deno.mkdir(folder, { recursive: true, mode: 0o755 });
      const fetchUnit = registryUnitFetcher(client, reference.repository);
      // The fetched bytes are this decoder's alone: moved to the worker, not copied.
      const decode: UnitDecoder = (bytes, unit, signal) =>
        unit.range
          ? decodeFrame(bytes, unit.length, unit.digest, { pool, signal, handOver: true })
          : decodeZstdUnit(bytes, unit, signal);
      for (const f of committedBefore ? files : []) {
        sources.set(f.name, await openFileSource(join(vmFolder, f.name)));
      }
      // A chunk's frame table is read on its first touch: from the store once the background
      // download has its blob, else with one ranged GET.
      const fromRegistry = registryTableReader(client, reference.repository);
      const readTable: TableReader = async (blob, where, signal) => {
        if (!await hasBlob(image.layout, blob)) return await fromRegistry(blob, where, signal);
        const bytes = new Uint8Array(where.length);
        let got = 0;
        for await (
          const p of readBlobRange(image.layout, blob.digest, where.offset, where.length)
        ) {
          bytes.set(p.subarray(0, where.length - got), got);
          got += p.length;
        }
        return bytes;
      };
      for (const f of committedBefore ? [] : files) {
        const lf = await openLazyFile({
          path: join(folder, f.name),
          file: f,
          groups: chunkGroups(f, readTable, `${what}: ${f.name}`),
          fetchUnit,
          decode,
          onDemand: gate.hold,
        });
        lazy.set(f.name, lf);
        // Recorded at once: a job that fails after an I/O error fails as the runner's fault.
        sources.set(
          f.name,
          countFailures(f.name, lf, (reason) => {
            failedReads.count++;
            failedReads.last = reason;
            warn(`a demand read failed: ${reason}`);
            writeState().catch(() => {});
          }),
        );
      }
      const doc = parseDomainXml(xml, `domain XML of ${what}`);
      const domainOptions = {
        name,
        vmFolder: folder,
        allowHostResources: spec.import.allowHostResources,
        domainType: spec.import.domainType,
      };
      prepareImportedDomain(doc, domainOptions);
      // Once per server: libvirt before 9.2 refuses <reconnect> (docs/lazy-pull.md, "Reconnect").
      const reconnectDelay = nbdReconnectDelay((await libvirtVersion(connect)).number);
      const disks = clonesWaiting
        ? []
        : await lazyDisks(doc, files, sources, dir, socket, reconnectDelay);
      // Boot files (kernel, initrd, NVRAM) are read by libvirt and QEMU as local files: whole.
      // Nothing can start before them: the background download waits meanwhile.
      const release = gate.hold();
      try {
        for (const f of files) {
          if (!disks.some((d) => chainOf(d.file, files).includes(f))) {
            await lazy.get(f.name)?.prefetch();
          }
        }
      } finally {
        release();
      }
      server = await serveNbd({ socketPath: socket, exports: sources });
      if (!committedBefore) await redefine(doc, name, connect);
      await writeState();
      await claim?.release();
      stateTimer = setInterval(() => writeState().catch(() => {}), 1000);
      info(`serving ${what} lazily as VM ${name} on ${socket}`);
      tell({ name, imageId });

      // Boot metadata first, at the prefetch's low priority; the background download waits.
      const metadata = bootMetadata(disks, files, lazy, gate.hold);
      // Background completion: the normal fetch, each chunk written into the files as it lands;
      // started again after a failure while demand reads go on (docs/lazy-pull.md, "Trouble").
      const retries = startRetries(completionRetryPolicy());
      for (let fetch = firstFetch;;) {
        const filling = fetch.image.then((image) =>
          fillFromStore(image, files, lazy, pool, fillers)
        );
        try {
          await fetch.done;
          await filling;
          await metadata;
          for (const lf of lazy.values()) {
            if (!lf.complete) await lf.prefetch(); // units the store's copy could not give
          }
          if (problem !== undefined) info(`the download of ${what} is complete after all`);
          problem = undefined;
          break;
        } catch (err) {
          await filling.catch(() => {});
          problem = describeError(err);
          const delay = retries.next();
          if (delay === undefined) {
            phase = "failed";
            await writeState();
            error(
              `the download of ${what} failed ${retries.attempt} times, it cannot complete: ` +
                `${problem}; VM ${name} is served what is local until it stops`,
            );
            nameLock.release();
            nameLock = undefined;
            (await untilIdle(server, dir, connect)).release();
            throw err;
          }
          // Logged first: whoever sees the problem in state.json finds why in the log.
          warn(
            `the download of ${what} failed: ${problem}; trying again in ${
              (delay / 1000).toFixed(1)
            } s`,
          );
          await writeState();
          await sleep(delay);
          fetch = startFetch(true);
        }
      }
      if (!committedBefore) {
        await finishFiles(partial, files, files);
        for (const f of files) await Deno.remove(join(partial, f.name + PRESENCE_LOG_SUFFIX));
        await commitFolder(partial, vmFolder, {
          imageId,
          manifest: image.descriptor.digest,
          what,
          files,
        });
        phase = "committed";
        await writeState();
        info(`${what} is complete: the files of VM ${name} are in ${vmFolder}`);
      }
      nameLock?.release();
      nameLock = undefined;

      // Persistent clones leave the socket once stopped, like the VM: each poll moves those it can.
      const settle = () => settleHeldClones(dir, { socket, partial, vmFolder, files }, connect);
      // The VM leaves its overlays only when it does not run: poll until then.
      while (!clonesWaiting) {
        await settle();
        const state = await domainState(name, connect);
        if (state === "missing") break;
        if (
          !isActive(state) && await finalize(name, xml, domainOptions, vmFolder, disks, connect)
        ) break;
        await sleep(2000);
      }
      phase = "done";
      await writeState();
      for (const d of disks) await Deno.remove(d.overlay).catch(() => {});
      // Job VMs defined on the socket may start later (no client yet): their holds keep it.
      using _holds = await untilIdle(server, dir, connect, settle);
      // Under the lock: a clone finds no session from now on, and takes no hold.
      await Deno.remove(join(dir, "state.json")).catch(() => {});
      info(`VM ${name} is a normal import now; the lazy server exits`);
      await server.close();
      for (const src of sources.values()) await src.close();
      clearInterval(stateTimer);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    } finally {
      clearInterval(stateTimer);
      nameLock?.release();
      await server?.close();
      for (const src of sources.values()) await src.close();
      pool.close();
    }
  } finally {
    await claim?.release();
    client.close();
  }
}

/**
 * A second server for an image already served: waits until the first serves and reports its VM
 * (true), or returns false once nobody holds the lock (it was a probe, or the server died).
 */
async function attach(
  dir: string,
  name: string,
  tell: (line: ReadyLine) => void,
): Promise<boolean> {
  for (let i = 0;; i++) {
    const state = await readLazyState(dir);
    // A dead server's state: the server holding the lock now has not written its own yet.
    const stale = state !== undefined && !await processExists(state.pid);
    if (state && state.pid !== Deno.pid && !stale) {
      if (state.phase === "failed") throw lazyFailure(state, dir);
      if (state.name !== name) {
        throw fail(
          "usage",
          `this image is being pulled lazily as VM ${state.name}`,
          `use -n ${state.name}`,
        );
      }
      tell({ name: state.name, imageId: state.imageId });
      return true;
    }
    if (!await serverAlive(dir)) return false;
    if (i % 20 === 0) debug(`waiting for the lazy server in ${dir}`);
    await sleep(200);
  }
}

/** Moves this process's stderr log (named by {@link startLazyPull}) to `dir/server.log`. */
async function adoptLog(dir: string): Promise<void> {
  const log = await Deno.readLink("/proc/self/fd/2").catch(() => "");
  if (log.startsWith(join(dir, "..") + "/server-") && log.endsWith(".log")) {
    await Deno.rename(log, join(dir, "server.log")).catch(() => {});
  }
}

/** The files of a disk's backing chain, the disk's own first. */
function chainOf(top: string, files: ImageFile[]): ImageFile[] {
  const chain: ImageFile[] = [];
  for (let f = files.find((x) => x.name === top); f && !chain.includes(f);) {
    chain.push(f);
    f = f.backingFile ? files.find((x) => x.name === f!.backingFile) : undefined;
  }
  return chain;
}

/**
 * Points each file disk of `doc` at a local qcow2 overlay in `dir/overlays/` (kept when it is
 * there: it holds what the guest wrote) whose backing chain is the image's files on the NBD
 * socket, nested in the XML so that QEMU ignores the names inside the files.
 */
async function lazyDisks(
  doc: DomainDoc,
  files: ImageFile[],
  sources: Map<string, BlockSource>,
  dir: string,
  socket: string,
  reconnectDelay: number | undefined,
): Promise<LazyDisk[]> {
  const out: LazyDisk[] = [];
  await Deno.mkdir(join(dir, "overlays"), { recursive: true, mode: 0o755 });
  for (const d of fileDisks(doc)) {
    const name = basename(d.path);
    const chain = chainOf(name, files);
    if (chain.length === 0) continue;
    const format = d.format ?? "raw";
    const layers = chain.map((f, i) => ({
      socketPath: socket,
      exportName: f.name,
      format: i === 0 ? format : chain[i - 1].backingFormat ?? "qcow2",
      reconnectDelay,
    }));
    const overlay = join(dir, "overlays", `${name}.qcow2`);
    // Taken away by a finalize that did not finish: what the guest wrote, to be committed again.
    await takeBackSetAside(overlay);
    if (!await exists(overlay)) {
      const size = await virtualSize(sources.get(name)!, format);
      const tmp = `${overlay}.tmp`;
      const args = ["create", "-q", "-f", "qcow2", "-F", format, "-b", name, "-u"];
      await runQemuImgOk("create", [...args, tmp, String(size)]);
      await Deno.rename(tmp, overlay);
    }
    d.source.setAttribute("file", overlay);
    const driver = d.element.getElementsByTagName("driver")[0];
    driver?.setAttribute("type", "qcow2");
    for (const old of Array.from(d.element.getElementsByTagName("backingStore"))) {
      old.parentNode?.removeChild(old);
    }
    const fragment = new DOMParser().parseFromString(nbdBackingStoreXml(layers), "text/xml");
    const node = doc.importNode(fragment.documentElement!, true);
    d.element.insertBefore(node, d.source.nextSibling);
    out.push({ overlay, file: name, format });
  }
  return out;
}

/** The disk size a guest sees: a qcow2 header's, or the file's. */
async function virtualSize(file: BlockSource, format: string): Promise<number> {
  if (format !== "qcow2") return file.size;
  const head = await file.read(0, Math.min(32, file.size));
  const size = new DataView(head.buffer, head.byteOffset).getBigUint64(24);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw fail("integrity", "qcow2 size out of range");
  return Number(size);
}

/**
 * Makes the qcow2 metadata of every file in the disks' backing chains present (see
 * {@link prefetchQcow2Metadata}), holding the gate meanwhile. Never fails: it only saves the
 * guest waits, and whatever it could not fetch is fetched again on demand or at the end.
 */
async function bootMetadata(
  disks: LazyDisk[],
  files: ImageFile[],
  lazy: Map<string, LazyFile>,
  hold: () => () => void,
): Promise<void> {
  const release = hold();
  try {
    for (const d of disks) {
      const chain = chainOf(d.file, files);
      for (const [i, f] of chain.entries()) {
        const format = i === 0 ? d.format : chain[i - 1].backingFormat ?? "qcow2";
        const lf = lazy.get(f.name);
        if (format !== "qcow2" || !lf) continue;
        try {
          const ranges = await prefetchQcow2Metadata(lf);
          const bytes = ranges.reduce((n, r) => n + r.length, 0);
          debug(`${f.name}: ${ranges.length} ranges of qcow2 metadata (${bytes} bytes) present`);
        } catch (err) {
          warn(`${f.name}: its qcow2 metadata could not be fetched first: ${describeError(err)}`);
        }
      }
    }
  } finally {
    release();
  }
}

/**
 * Writes each chunk into the lazy files as the fetch stores its blob, as an import does: the
 * codec workers decode it from the store file straight into the lazy file, `concurrency` chunks
 * at once, each unit verified against its digest before it is written and only units not present
 * yet written; then one sync and one presence-log append per chunk. No blob is held in memory.
 * Units the store's copy could not give (a corrupt blob) are left for the fetch of single units
 * at the end.
 */
async function fillFromStore(
  image: FetchingImage,
  files: ImageFile[],
  lazy: Map<string, LazyFile>,
  pool: ReturnType<typeof createCodecPool>,
  concurrency: number,
): Promise<void> {
  const chunks: { name: string; lf: LazyFile; g: number; layer: ImageFile["layers"][number] }[] =
    [];
  for (const f of files) {
    const lf = lazy.get(f.name);
    if (!lf) continue; // committed before this server started
    f.layers.forEach((layer, g) => chunks.push({ name: f.name, lf, g, layer }));
  }
  await forEachConcurrent(chunks, concurrency, async ({ name, lf, g, layer }) => {
    await image.blobReady(layer.digest);
    if (lf.complete) return;
    // The chunk's units: its table is read from the stored blob if no read needed it before.
    const { first, units } = await lf.group(g);
    if (units.some((u) => u.length > MAX_FRAME_SIZE)) return; // left for the single fetches
    const indices = units.map((_, j) => first + j);
    await lf.fillWith(indices, async (missing, signal) => {
      const todo = new Set(missing);
      // Units of no bytes have nothing to decode or write.
      const pieces = units.flatMap((u, j) =>
        u.length > 0 ? [{ length: u.length, digest: u.digest, write: todo.has(first + j) }] : []
      );
      try {
        await decodeZstdChunk(
          blobPath(image.layout, layer.digest),
          lf.path,
          units[0].offset,
          pieces.reduce((n, p) => n + p.length, 0),
          layer.annotations?.[Annotation.chunkDigest] ?? "",
          { pool, signal, pieces },
        );
      } catch (err) {
        if (!(err instanceof SardeError) || err.kind !== "integrity") throw err;
        warn(`${name}: ${err.message}; its units will be fetched on their own`);
        return [];
      }
      const length = (i: number) => units[i - first].length;
      return missing.filter((i) => length(i) > 0 || units[i - first].digest === zeroDigest(0));
    });
  });
}

/** Whether a VM in `state` has (or is about to have) QEMU running on its disks. */
const isActive = (state: string) =>
  state === "running" || state === "paused" || state === "shutting-down";

/** Where {@link finalize} puts an overlay while it commits it: a name no VM definition uses. */
const committingPath = (overlay: string) => `${overlay}.committing`;

/**
 * The end of a lazy pull for a VM that does not run: what the guest wrote into the overlays goes
 * into the VM's files (`qemu-img commit`), as if it had run on them all along, and the VM is
 * defined on its local files like any imported VM. Returns false, having changed nothing, when
 * the VM turned out to run after all (the caller polls again).
 *
 * The VM may be started at any moment (`virsh start`, a job): committing an overlay QEMU has
 * open would corrupt both. So the overlays are first renamed to a name the VM's definition does
 * not have: from then on a start fails (libvirt cannot find the disk) instead of running on
 * files being committed. Then the VM is checked again, by libvirt's state (set before QEMU is
 * launched) and by the open files (QEMU keeps its descriptors across the rename): a VM that
 * started between the caller's poll and the rename still has its overlays, given back at once.
 * A server killed in between finds the renamed overlays on its next start
 * ({@link lazyDisks}) and commits them again: a commit of the same overlay into the same file
 * can be repeated.
 */
async function finalize(
  name: string,
  xml: string,
  domainOptions: { name: string; allowHostResources?: boolean; domainType?: string },
  vmFolder: string,
  disks: LazyDisk[],
  connect: { connect?: string },
): Promise<boolean> {
  const aside: LazyDisk[] = [];
  for (const d of disks) if (await exists(d.overlay)) aside.push(d);
  if (!await setAside(name, aside.map((d) => d.overlay), connect)) return false;
  for (const d of aside) {
    const overlay = committingPath(d.overlay);
    await rebaseUnsafe(overlay, join(vmFolder, d.file), d.format);
    await runQemuImgOk("commit", ["commit", "-q", "-f", "qcow2", overlay]);
    await Deno.remove(overlay);
  }
  const doc = parseDomainXml(xml, `domain XML of ${name}`);
  prepareImportedDomain(doc, { ...domainOptions, vmFolder });
  await redefine(doc, name, connect);
  return true;
}

/**
 * Renames `overlays` of VM `name` to {@link committingPath} (from then on a start fails instead
 * of running on them), then checks that the VM did not start meanwhile: by libvirt's state (set
 * before QEMU is launched) and by the open files (QEMU keeps its descriptors across a rename).
 * Returns false, the overlays back under their names, when it did.
 */
async function setAside(
  name: string,
  overlays: string[],
  connect: { connect?: string },
): Promise<boolean> {
  for (const o of overlays) await Deno.rename(o, committingPath(o));
  const held = await Promise.all(overlays.map((o) => processesHolding(committingPath(o))));
  if (isActive(await domainState(name, connect)) || held.some((pids) => pids.length > 0)) {
    for (const o of overlays) await Deno.rename(committingPath(o), o);
    debug(`VM ${name} started while its overlays were to be changed: later`);
    return false;
  }
  return true;
}

/** Gives `overlay` back its name if a server killed after {@link setAside} left it renamed. */
async function takeBackSetAside(overlay: string): Promise<void> {
  if (!await exists(overlay) && await exists(committingPath(overlay))) {
    await Deno.rename(committingPath(overlay), overlay);
  }
}

/**
 * Defines `doc` as VM `name`, keeping the UUID of the VM of that name if there is one (libvirt
 * refuses a second UUID for a name): the lazy VM is redefined, not replaced.
 */
async function redefine(doc: DomainDoc, name: string, connect: { connect?: string }) {
  if (await domainExists(name, connect)) {
    const root = doc.documentElement!;
    for (const old of childElements(root, "uuid")) root.removeChild(old);
    const uuid = doc.createElement("uuid");
    uuid.appendChild(doc.createTextNode(await domainUuid(name, connect)));
    root.insertBefore(uuid, childElement(root, "name")?.nextSibling ?? null);
  }
  await defineXml(serializeDomainXml(doc), connect);
}

/**
 * `source` as an NBD export that reports each read it cannot serve (the guest gets an I/O error
 * for it) to `failed`, with the reason, before the error goes on to the NBD server.
 */
function countFailures(
  name: string,
  source: BlockSource & { close(): Promise<void> },
  failed: (reason: string) => void,
): BlockSource & { close(): Promise<void> } {
  return {
    size: source.size,
    close: () => source.close(),
    async read(offset, length) {
      try {
        return await source.read(offset, length);
      } catch (err) {
        failed(`${name} at byte ${offset}: ${describeError(err)}`);
        throw err;
      }
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Job VMs on a lazily served base (clones, the executor's jobs)
//
// A clone of a VM that a lazy server serves has its own overlays whose backing chain is the
// image's files over NBD, not the base's overlay: the server commits that one into the files and
// removes it. QEMU connects to the socket only when the clone starts, which may be any time after
// it is defined: so a clone writes a hold (`holds/<domain>.json`) into the session before it is
// defined, and the server does not exit while a hold's domain exists. A hold whose domain does
// not exist counts only while the process that wrote it lives, for HOLD_GRACE_MS at most (the
// clone failed, or its transient VM is gone): stale holds are removed, never waited for. The
// server decides to exit and the clone takes its hold under one lock (`holds.lock`), so a hold is
// never taken on a server that is leaving.

/** The lock under which holds are taken and a server decides to exit. */
const HOLDS_LOCK = "holds.lock";

/** How long a hold without its domain counts while its writer lives (defining a clone is fast). */
const HOLD_GRACE_MS = 10 * 60_000;

/** A hold on a lazy session: the server stays while the hold's domain may use its socket. */
export interface LazyHold {
  /** The session folder. */
  dir: string;
  /** The session's state when the hold was taken. */
  state: LazyState;
  /** Removes the hold (the clone failed, or none of its disks is on NBD). */
  release(): Promise<void>;
}

/** The holds of the session in `dir`: each one's file, domain, and whether its writer may still
 * be making the clone (it lives, for {@link HOLD_GRACE_MS} at most). */
async function readHolds(dir: string) {
  const out: { file: string; domain: string; young: boolean }[] = [];
  for (const e of await Array.fromAsync(Deno.readDir(join(dir, "holds"))).catch(() => [])) {
    const file = join(dir, "holds", e.name);
    const hold = await Deno.readTextFile(file).then(JSON.parse).catch(() => undefined);
    const young = Number.isSafeInteger(hold?.pid) && await processExists(hold.pid) &&
      Date.now() - Number(hold.since) < HOLD_GRACE_MS;
    out.push({ file, domain: e.name.replace(/\.json$/, ""), young });
  }
  return out;
}

/** Whether a hold of the session in `dir` still counts; stale ones are removed. */
async function liveHolds(dir: string, connect: { connect?: string }): Promise<boolean> {
  let live = false;
  for (const { file, domain, young } of await readHolds(dir)) {
    if (young || await domainExists(domain, connect)) live = true;
    else await Deno.remove(file).catch(() => {});
  }
  return live;
}

/** A complete session: what its clones may refer to, and where it is now. */
interface CompleteSession {
  /** The NBD socket. */
  socket: string;
  /** The folder the files were filled in. */
  partial: string;
  /** The VM's folder, where the files are committed. */
  vmFolder: string;
  /** The image's files. */
  files: ImageFile[];
}

/** Clones whose move failed, warned about once (the move is tried again on each poll). */
const moveWarned = new Set<string>();

/**
 * Once the image is complete: moves each held clone that is defined and does not run off the
 * NBD socket onto the committed files ({@link moveClone}) and drops its hold, so that a
 * persistent clone does not keep the server. A clone still being made (its writer lives) is left
 * to it; a running one is moved once it stops; a transient one ends with its hold (it is gone
 * when it stops).
 */
async function settleHeldClones(
  dir: string,
  session: CompleteSession,
  connect: { connect?: string },
): Promise<void> {
  for (const { file, domain, young } of await readHolds(dir)) {
    if (young) continue;
    const state = await domainState(domain, connect);
    if (state === "missing" || isActive(state)) continue;
    try {
      if (await moveClone(domain, session, connect)) await Deno.remove(file).catch(() => {});
    } catch (err) {
      if (!moveWarned.has(domain)) warn(`clone ${domain} stays on NBD: ${describeError(err)}`);
      moveWarned.add(domain);
    }
  }
}

/**
 * Moves the stopped clone `domain` onto the committed files: each overlay whose backing chain is
 * this session's NBD socket is rebased in place (`qemu-img rebase -u`: the committed file holds
 * the bytes the export served) onto the file's absolute path, as a plain clone's overlay is, and
 * the domain is redefined, with its UUID, without the NBD chain (libvirt reads the chain from the
 * headers again); the kernel and initrd it shares with the base are pointed at the committed
 * files too. The overlays are set aside meanwhile ({@link setAside}), as in
 * {@link finalize}: a start racing the move fails instead of running on an overlay being
 * rewritten; one that comes after the overlays are back and before the new definition runs on
 * NBD, which the hold keeps serving. Returns whether the clone is off the socket and not running
 * (its hold can go).
 */
async function moveClone(
  domain: string,
  session: CompleteSession,
  connect: { connect?: string },
): Promise<boolean> {
  const doc = parseDomainXml(
    await dumpXml(domain, { ...connect, inactive: true }),
    `domain XML of ${domain}`,
  );
  const moves: { disk: FileDisk; file: string; format: string }[] = [];
  for (const disk of fileDisks(doc)) {
    // Set aside by a server killed while it moved this clone: given back first.
    await takeBackSetAside(disk.path);
    const nbd = nbdBacking(disk);
    if (nbd?.socket !== session.socket) continue;
    if (!session.files.some((f) => f.name === nbd.name)) continue; // not an image file: not ours
    moves.push({ disk, file: join(session.vmFolder, nbd.name), format: nbd.format });
  }
  // Kernel, initrd, dtb are shared with the base: they were in the folder the files filled.
  let changed = false;
  for (const bf of bootFiles(doc)) {
    if (dirname(bf.path) !== session.partial) continue;
    setElementText(bf.element, join(session.vmFolder, basename(bf.path)));
    changed = true;
  }
  if (moves.length === 0 && !changed) return !isActive(await domainState(domain, connect));
  if (!await setAside(domain, moves.map((m) => m.disk.path), connect)) return false;
  try {
    for (const m of moves) await rebaseUnsafe(committingPath(m.disk.path), m.file, m.format);
  } finally {
    for (const m of moves) await Deno.rename(committingPath(m.disk.path), m.disk.path);
  }
  for (const m of moves) {
    for (const bs of childElements(m.disk.element, "backingStore")) removeElement(bs);
  }
  await redefine(doc, domain, connect);
  info(`clone ${domain} reads the local files of ${session.vmFolder} now`);
  return !isActive(await domainState(domain, connect));
}

/**
 * Holds the lazy session serving VM `base` for the clone `domain` about to be defined on it, or
 * returns `undefined` when no lazy pull serves `base` (it is a normal VM). A session whose
 * server died is an error: its socket answers nobody until `sarde pull --lazy` starts it again.
 */
export async function holdLazySession(
  vmdir: string,
  base: string,
  domain: string,
): Promise<LazyHold | undefined> {
  const state = (await lazySessions(vmdir)).find((s) => s.name === base && s.phase !== "done");
  if (!state) return undefined;
  const dir = lazyStateDir(vmdir, state.imageId);
  using _holds = await lockFile(join(dir, HOLDS_LOCK), { shared: true, folderMustExist: true })
    .catch(() => undefined);
  if (!_holds || !await readLazyState(dir)) return undefined; // it just finished
  if (state.phase === "failed") throw lazyFailure(state, dir);
  if (!await reviveLazySession(dir)) {
    throw fail(
      "external",
      `the lazy pull server of VM ${base} is not running: its disks cannot be read`,
      `start it again with sarde pull --lazy ${state.reference}`,
    );
  }
  const file = join(dir, "holds", `${domain}.json`);
  await Deno.mkdir(join(dir, "holds"), { recursive: true, mode: 0o755 });
  await writeFileAtomic(file, JSON.stringify({ pid: Deno.pid, since: Date.now() }) + "\n");
  return { dir, state, release: () => Deno.remove(file).catch(() => {}) };
}

/**
 * Creates the clone overlay `overlay` of `disk` (a disk of a lazily served base) on the image's
 * files over NBD: the same size, the first backing layer's format and export name in its header,
 * and the base disk's nested NBD `<backingStore>` kept in the XML, which is what QEMU opens.
 * Returns false, creating nothing, when the disk's backing chain is not NBD.
 */
export async function createNbdOverlay(overlay: string, disk: FileDisk): Promise<boolean> {
  const nbd = nbdBacking(disk);
  if (!nbd) return false;
  const size = (await qemuInfo(disk.path, { format: "qcow2" })).virtualSize;
  const args = ["create", "-q", "-f", "qcow2", "-F", nbd.format, "-b", nbd.name, "-u"];
  await runQemuImgOk("create", [...args, overlay, String(size)]);
  return true;
}

/** The first layer of `disk`'s backing chain when it is an NBD export: its name (the image
 * file's), format and UNIX socket. */
function nbdBacking(disk: FileDisk) {
  const chain = childElements(disk.element, "backingStore")
    .find((b) => b.getAttribute("type") === "network");
  const source = chain && childElement(chain, "source");
  if (!chain || source?.getAttribute("protocol") !== "nbd") return undefined;
  return {
    name: source.getAttribute("name") ?? "",
    format: childElement(chain, "format")?.getAttribute("type") ?? "raw",
    socket: childElement(source, "host")?.getAttribute("socket") ?? undefined,
  };
}
