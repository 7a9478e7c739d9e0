/**
 * A client for the OCI distribution API: manifests, blobs (HEAD, GET with `Range` resume,
 * cross-repository mount, streamed or chunked upload), with authentication, retries and
 * redirects handled here so callers deal only in digests and bytes.
 *
 * @module
 */

import { createAuthenticator, repositoryScope } from "./auth.ts";
import type { Credentials } from "./credentials.ts";
import { fail, SardeError } from "../util/errors.ts";
import {
  createHttpClient,
  type HttpResponse,
  isNetworkError,
  isNoTlsError,
  type RequestBody,
  type TransportOptions,
} from "./http.ts";
import { debug, warn } from "../util/log.ts";
import { DEFAULT_RESPONSE_TIMEOUT_MS } from "../util/defaults.ts";
import { type Descriptor, MANIFEST_ACCEPT } from "../oci/types.ts";
import { isLoopbackRegistry, registryEndpointHost } from "../oci/reference.ts";
import {
  defaultRetryPolicy,
  gaveUp,
  isRetryableStatus,
  type RetryBudget,
  type RetryPolicy,
  sleep,
  startRetries,
} from "../util/retry.ts";
import { digestOf } from "../oci/digest.ts";
import { notARegistry, responseError, restartsUpload } from "./errors.ts";
import { authenticating, redirecting, retrying, sending } from "./request.ts";

/** Options for talking to one registry. */
export interface RegistryOptions extends TransportOptions {
  /** Credentials to use; `undefined` means anonymous. */
  credentials?: Credentials;
  /** Retry policy for connection errors, 5xx and 429; unset fields keep their defaults. */
  retry?: Partial<RetryPolicy>;
  /**
   * Largest request body to send in one PATCH. 0 (default) streams each blob in one request;
   * set it for registries or proxies that cap request bodies (GHCR: 4 MiB).
   */
  chunkSize?: number;
  /** Aborts everything in flight (Ctrl-C). */
  signal?: AbortSignal;
}

/** A manifest as fetched: its exact bytes, media type and digest. */
export interface FetchedManifest {
  bytes: Uint8Array;
  mediaType: string;
  digest: string;
}

/** Where downloaded blob bytes go; `reset` discards what was written (server ignored `Range`). */
export interface BlobSink {
  write(chunk: Uint8Array): Promise<void>;
  reset(): Promise<void>;
}

/** Produces the bytes of a blob starting at `offset`, for (re)sending. */
export type BlobSource = (offset: number, length: number) => AsyncIterable<Uint8Array>;

/** Options of {@link RegistryClient.downloadBlob}. */
export interface DownloadOptions {
  /**
   * Awaited before each read of the blob's body: while it waits, the download pauses (TCP flow
   * control stops the sender). Keep each wait well under the response timeout.
   */
  gate?: () => Promise<void>;
}

/** Bytes `offset` to `offset + length - 1` of a blob. */
export interface BlobRange {
  offset: number;
  length: number;
}

/**
 * The largest blob {@link RegistryClient.readBlob} reads whole when the registry answers a
 * `Range` request with the whole blob (`200`): enough for a chunk of a small image, small enough
 * that a read of a few KiB never costs the download of a 64 MiB chunk.
 */
export const FULL_READ_LIMIT = 16 << 20;

/** Progress callback: bytes moved since the last call. */
export type ProgressFn = (bytes: number) => void;

/** A connection to one registry host. */
export interface RegistryClient {
  /** The registry host (`host[:port]`). */
  readonly registry: string;
  /**
   * `GET /v2/`: checks that the registry answers like an OCI registry and, with credentials,
   * that they are accepted.
   */
  ping(): Promise<void>;
  /** Fetches a manifest by tag or digest; verifies the digest when asked by digest. */
  getManifest(repository: string, selector: string): Promise<FetchedManifest>;
  /** Checks a manifest exists; returns its descriptor or `undefined`. */
  headManifest(repository: string, selector: string): Promise<Descriptor | undefined>;
  /** Uploads manifest bytes under a tag or digest; returns the digest. */
  putManifest(
    repository: string,
    selector: string,
    bytes: Uint8Array,
    mediaType: string,
  ): Promise<string>;
  /**
   * Whether the repository has the blob. A yes must prove it with the blob's exact
   * `Docker-Content-Digest`, or without one its size as `Content-Length`; anything else is an
   * error (a server that says yes to everything must not make a push skip its blobs).
   */
  hasBlob(repository: string, blob: Descriptor): Promise<boolean>;
  /**
   * Tries a cross-repository mount from `from`; true when the blob is now in `repository`, false
   * when the registry refused (any 4xx, or no right to read `from`: an upload does without it).
   */
  mountBlob(repository: string, digest: string, from: string): Promise<boolean>;
  /** Downloads a blob into `sink`, resuming with `Range` after a cut connection. */
  downloadBlob(
    repository: string,
    descriptor: Descriptor,
    sink: BlobSink,
    progress?: ProgressFn,
    options?: DownloadOptions,
  ): Promise<void>;
  /**
   * Reads a blob, or `range` of it, into memory: a `Range` GET answered `206` (a `200` — a server
   * ignoring `Range` — is read and cut when the blob is at most {@link FULL_READ_LIMIT} bytes,
   * refused otherwise). Never buffers more than the bytes asked for; a cut connection resumes
   * where it stopped, with the retry policy of every other request. A whole blob is verified
   * against its digest; a range cannot be (its reader verifies what it decodes from it).
   */
  readBlob(
    repository: string,
    descriptor: Descriptor,
    range?: BlobRange,
    signal?: AbortSignal,
  ): Promise<Uint8Array>;
  /**
   * Uploads a blob (POST → PATCH… → PUT `?digest=`), restarting on failure unless the registry
   * turns out to have the blob (a `HEAD` after a failed PATCH or PUT).
   */
  uploadBlob(
    repository: string,
    descriptor: Descriptor,
    source: BlobSource,
    progress?: ProgressFn,
  ): Promise<void>;
  /** Frees connections. */
  close(): void;
}

interface CallOptions {
  method: string;
  url: URL;
  headers?: Record<string, string>;
  body?: RequestBody;
  scopes: string[];
  /** Follow redirects (blob downloads); never forwards `Authorization` to another host. */
  follow?: boolean;
  /**
   * Statuses returned to the caller as-is instead of being turned into errors: a list, or a test
   * (retryable statuses it accepts are not retried).
   */
  accept: number[] | ((status: number) => boolean);
  /** Retry on transport errors / 5xx (false for non-idempotent upload steps handled by caller). */
  retry?: boolean;
  /** A large download: `bulk` of lib/registry/http.ts. */
  bulk?: boolean;
  /** Awaited before each body read: `gate` of lib/registry/http.ts. */
  gate?: () => Promise<void>;
  /** A longer wait for the answer: `answerTimeoutMs` of lib/registry/http.ts. */
  answerTimeoutMs?: number;
  /** The API check itself: `url` is absolute, no authentication. */
  probe?: boolean;
  /** Aborts this call only (on top of the client's own signal). */
  signal?: AbortSignal;
}

/** Whether a call takes `status` as an answer (rather than retrying it or failing). */
function accepts(o: CallOptions, status: number): boolean {
  return Array.isArray(o.accept) ? o.accept.includes(status) : o.accept(status);
}

/** Whether two digests use one algorithm (only then can they be compared). */
function sameAlgorithm(a: string, b: string): boolean {
  return a.split(":")[0] === b.split(":")[0];
}

/** `repo:tag` or `repo@sha256:…`, as users write references, for messages. */
function manifestName(repository: string, selector: string): string {
  return `${repository}${selector.includes(":") ? "@" : ":"}${selector}`;
}

/** Opens a client for `registry` (`host[:port]`). Nothing is sent until the first call. */
export function createRegistryClient(
  registry: string,
  options: RegistryOptions = {},
): RegistryClient {
  const http = createHttpClient(options);
  const policy = defaultRetryPolicy(options.retry);
  const endpoint = registryEndpointHost(registry);
  let base: URL | undefined;
  let finding: Promise<URL> | undefined;
  // Credentials go to a plain-http token server only if they go to the registry that way too.
  const auth = createAuthenticator(
    http,
    registry,
    options.credentials,
    () => base?.protocol === "http:",
  );

  /** The API root, found and checked once by the first request (the others wait for it). */
  function baseUrl(): Promise<URL> {
    finding ??= findApi().catch((err) => {
      finding = undefined;
      throw err;
    });
    return finding;
  }

  /**
   * `GET /v2/` (with retries): over https, or plain http with `--insecure`; loopback registries
   * are often plain http (as docker assumes), so for them https falls back to http. The answer
   * must come from an OCI registry, or every later "yes, I have that blob" would be believed.
   */
  async function findApi(): Promise<URL> {
    const plain = new URL(`http://${endpoint}/`);
    let url = options.plainHttp ? plain : new URL(`https://${endpoint}/`);
    const check = (root: URL) =>
      call({
        method: "GET",
        url: new URL("/v2/", root),
        scopes: [],
        follow: true,
        // Every final answer: checkApiAnswer tells a registry from a host that is none (a 404
        // from a web server is not "image not found"); 5xx and 429 are retried first.
        accept: (status) => !isRetryableStatus(status),
        probe: true,
      }, "registry check");
    let res: HttpResponse;
    try {
      res = await check(url);
    } catch (err) {
      if (url === plain || !isLoopbackRegistry(registry) || !isNoTlsError(err)) throw err;
      debug(`${registry} does not speak TLS; using plain http`);
      url = plain;
      res = await check(url);
    }
    await checkApiAnswer(res);
    return (base = url);
  }

  /**
   * `GET /v2/` must answer `200`, `401` or `403` (the last two are left to authentication), and a
   * `200` must come from a registry: the `Docker-Distribution-API-Version` header (optional in
   * the OCI spec, sent by distribution, Zot, Harbor, GHCR, GitLab…) or at least a JSON body.
   */
  async function checkApiAnswer(res: HttpResponse): Promise<void> {
    if (![200, 401, 403].includes(res.status)) {
      await res.discard();
      throw notARegistry(registry, `GET /v2/ answered HTTP ${res.status}`, res.status);
    }
    if (
      res.status !== 200 ||
      /^registry\/2\./.test(res.headers.get("docker-distribution-api-version") ?? "")
    ) {
      return await res.discard();
    }
    try {
      JSON.parse(await res.text());
    } catch {
      const type = res.headers.get("content-type")?.split(";")[0] || "no content type";
      throw notARegistry(
        registry,
        `GET /v2/ answered 200 with ${type}, not JSON, and no Docker-Distribution-API-Version`,
      );
    }
  }

  const api = async (path: string) => new URL(`/v2/${path}`, await baseUrl());

  const errorFor = (res: HttpResponse, what: string) =>
    responseError(res, what, registry, auth.hasCredentials);

  /**
   * Sends one request through its layers: authentication around the raw request, retries around
   * that (unless `o.retry` is false), redirects on top (only with `o.follow`). What comes out is
   * the caller's answer if it `accepts` the status, and an error otherwise.
   */
  async function call(o: CallOptions, what: string): Promise<HttpResponse> {
    // Started before the API check a first request waits for: that wait counts against the budget.
    const retries = startRetries(policy);
    const origin = o.probe ? undefined : (await baseUrl()).origin;
    const { method, body, bulk, answerTimeoutMs, gate } = o;
    const signal = o.signal && options.signal
      ? AbortSignal.any([o.signal, options.signal])
      : o.signal ?? options.signal;
    let send = sending(http, { method, body, signal, bulk, answerTimeoutMs, gate });
    send = authenticating(send, { auth, origin, scopes: o.scopes, registry, what });
    if (o.retry !== false) {
      send = retrying(send, {
        retries,
        policy,
        signal,
        registry,
        what,
        accepts: (status) => accepts(o, status),
        errorFor: (res) => errorFor(res, what),
      });
    }
    if (o.follow) send = redirecting(send, what);
    const res = await send(o.url, { ...o.headers });
    if (accepts(o, res.status)) return res;
    throw await errorFor(res, what);
  }

  const pull = (repo: string) => [repositoryScope(repo, ["pull"])];
  const push = (repo: string) => [repositoryScope(repo, ["pull", "push"])];

  /**
   * How long an upload's closing PUT may take to answer: registries on object storage (S3, GCS)
   * copy or assemble the blob before they answer, which takes minutes for blobs of several GB.
   * Six response timeouts (3 min by default) plus a second per 50 MB.
   */
  const commitTimeoutMs = (size: number) =>
    6 * (options.responseTimeoutMs ?? DEFAULT_RESPONSE_TIMEOUT_MS) + Math.ceil(size / 50_000);

  /**
   * The retries of a blob body that can be resumed (downloads, reads): the returned function,
   * called with what a body read threw and how far it got, waits the policy's delay before the
   * caller resumes there, or throws when the error is no cut connection or the retries are spent.
   * The budget starts anew whenever a body got further than at the previous cut.
   */
  function resumingAfterCuts(what: string, action: string, signal = options.signal) {
    let retries: RetryBudget | undefined;
    let cutAt = -1;
    return async (err: unknown, position: number, total: number): Promise<void> => {
      const cut = isNetworkError(err) || (err instanceof Error && !(err instanceof SardeError));
      if (!cut) throw err;
      if (!retries || position > cutAt) retries = startRetries(policy);
      cutAt = position;
      const ms = retries.next();
      if (ms === undefined) {
        throw retries.exhausted(
          new SardeError("network", `${what}: ${action} failed: ${(err as Error).message}`, {
            hint: err instanceof SardeError ? err.hint : undefined,
          }),
        );
      }
      warn(
        `${what}: interrupted at ${position} of ${total} bytes; resuming in ${
          (ms / 1000).toFixed(1)
        } s`,
      );
      await sleep(ms, signal);
    };
  }

  async function hasBlob(repository: string, blob: Descriptor): Promise<boolean> {
    const what = `blob ${blob.digest.slice(0, 19)}`;
    const res = await call({
      method: "HEAD",
      url: await api(`${repository}/blobs/${blob.digest}`),
      scopes: push(repository),
      follow: true,
      accept: [200, 404],
    }, what);
    await res.discard();
    if (res.status !== 200) return false;
    // The exact digest is proof enough (proxies and CDNs strip or zero a HEAD's
    // Content-Length). Without it (older registries, storage redirects) the size must match.
    const digest = res.headers.get("docker-content-digest");
    if (digest === blob.digest) return true;
    if (digest !== null && sameAlgorithm(digest, blob.digest)) {
      throw notARegistry(registry, `HEAD of ${what} answered Docker-Content-Digest ${digest}`);
    }
    const length = res.headers.get("content-length");
    if (length === null || Number(length) !== blob.size) {
      throw notARegistry(
        registry,
        `HEAD of ${what} answered Content-Length ${length ?? "(none)"} for ${blob.size} bytes`,
      );
    }
    return true;
  }

  async function uploadOnce(
    repository: string,
    descriptor: Descriptor,
    source: BlobSource,
    progress?: ProgressFn,
  ): Promise<void> {
    const what = `upload of ${descriptor.digest.slice(0, 19)}`;
    const start = await call(
      {
        method: "POST",
        url: await api(`${repository}/blobs/uploads/`),
        scopes: push(repository),
        accept: [202],
      },
      what,
    );
    await start.discard();
    let location = uploadLocation(start, await baseUrl(), what);
    const size = descriptor.size;
    const chunk = options.chunkSize && options.chunkSize > 0 ? options.chunkSize : size;
    let offset = 0;
    let done: HttpResponse;
    try {
      while (offset < size) {
        const length = Math.min(chunk, size - offset);
        const from = offset;
        const res = await call({
          method: "PATCH",
          url: location,
          headers: {
            "content-type": "application/octet-stream",
            ...(options.chunkSize ? { "content-range": `${from}-${from + length - 1}` } : {}),
          },
          body: { length, stream: () => counted(source(from, length), progress) },
          scopes: push(repository),
          accept: [202, 201, 204],
          retry: false,
        }, what);
        await res.discard();
        location = uploadLocation(res, location, what);
        offset += length;
      }
      const put = new URL(location);
      put.searchParams.set("digest", descriptor.digest);
      done = await call({
        method: "PUT",
        url: put,
        scopes: push(repository),
        accept: [201, 204],
        retry: false,
        answerTimeoutMs: commitTimeoutMs(size),
      }, what);
    } catch (err) {
      // The registry may have the blob all the same (a commit that outlasted our wait, an answer
      // a proxy lost, another push of the same blob): asking is cheaper than sending it again.
      if (restartsUpload(err) && await hasBlob(repository, descriptor).catch(() => false)) {
        debug(`${what}: the registry has the blob after all (${(err as Error).message})`);
        return;
      }
      throw err;
    }
    await done.discard();
    const stored = done.headers.get("docker-content-digest");
    if (stored && sameAlgorithm(stored, descriptor.digest) && stored !== descriptor.digest) {
      throw notARegistry(registry, `${what} was stored as ${stored}`);
    }
  }

  return {
    registry,
    async ping() {
      const res = await call(
        { method: "GET", url: await api(""), scopes: [], accept: [200] },
        "registry check",
      );
      await checkApiAnswer(res);
    },

    async getManifest(repository, selector) {
      const what = `manifest ${manifestName(repository, selector)}`;
      const res = await call({
        method: "GET",
        url: await api(`${repository}/manifests/${selector}`),
        headers: { accept: MANIFEST_ACCEPT.join(", ") },
        scopes: pull(repository),
        accept: [200],
      }, what);
      const bytes = await res.bytes(4 << 20);
      const digest = digestOf(bytes);
      if (selector.startsWith("sha256:") && digest !== selector) {
        throw fail("integrity", `${what}: registry returned content with digest ${digest}`);
      }
      const headerDigest = res.headers.get("docker-content-digest");
      if (headerDigest && headerDigest !== digest) {
        debug(
          `${what}: Docker-Content-Digest ${headerDigest} differs from content digest ${digest}`,
        );
      }
      const mediaType = (res.headers.get("content-type") ?? "").split(";")[0].trim();
      return { bytes, mediaType, digest };
    },

    async headManifest(repository, selector) {
      const res = await call({
        method: "HEAD",
        url: await api(`${repository}/manifests/${selector}`),
        headers: { accept: MANIFEST_ACCEPT.join(", ") },
        scopes: pull(repository),
        accept: [200, 404],
      }, `manifest ${manifestName(repository, selector)}`);
      await res.discard();
      if (res.status === 404) return undefined;
      const digest = res.headers.get("docker-content-digest") ?? "";
      return {
        mediaType: (res.headers.get("content-type") ?? "").split(";")[0].trim(),
        digest,
        size: Number(res.headers.get("content-length") ?? 0),
      };
    },

    async putManifest(repository, selector, bytes, mediaType) {
      const what = `manifest upload ${manifestName(repository, selector)}`;
      const res = await call({
        method: "PUT",
        url: await api(`${repository}/manifests/${selector}`),
        headers: { "content-type": mediaType },
        body: bytes,
        scopes: push(repository),
        accept: [201, 200, 202],
      }, what);
      await res.discard();
      const digest = digestOf(bytes);
      // The spec wants 201 and, when the header is sent, the digest of what was sent: proof that
      // the registry took the manifest. 200/202 only count with that proof.
      const stored = res.headers.get("docker-content-digest");
      const comparable = stored !== null && sameAlgorithm(stored, digest);
      if (comparable && stored !== digest) {
        throw notARegistry(registry, `${what} answered digest ${stored}, not ${digest}`);
      }
      if (res.status !== 201 && !comparable) {
        throw notARegistry(registry, `${what} answered ${res.status} instead of 201 Created`);
      }
      return digest;
    },

    hasBlob,

    async mountBlob(repository, digest, from) {
      const url = await api(`${repository}/blobs/uploads/`);
      url.searchParams.set("mount", digest);
      url.searchParams.set("from", from);
      let res: HttpResponse;
      try {
        res = await call({
          method: "POST",
          url,
          scopes: [...push(repository), repositoryScope(from, ["pull"])],
          // A 4xx (an unknown `from`, a registry without mounts…) only means no mount.
          accept: (s) => s === 201 || s === 202 || (s >= 400 && s < 500 && !isRetryableStatus(s)),
        }, `mount of ${digest.slice(0, 19)}`);
      } catch (err) {
        if (!(err instanceof SardeError) || err.kind !== "auth") throw err;
        debug(`cannot mount from ${from}: ${err.message}`);
        return false;
      }
      await res.discard();
      if (res.status >= 400) {
        debug(`cannot mount from ${from}: ${registry} answered HTTP ${res.status}`);
        return false;
      }
      if (res.status === 202) {
        // Mount refused; the registry opened an upload session instead. Cancel it politely.
        const loc = res.headers.get("location");
        if (loc) {
          await call({
            method: "DELETE",
            url: new URL(loc, await baseUrl()),
            scopes: push(repository),
            accept: [204, 200, 404, 405],
            retry: false,
          }, "cancel upload").then((r) => r.discard()).catch(() => {});
        }
      }
      return res.status === 201;
    },

    async downloadBlob(repository, descriptor, sink, progress, download) {
      const what = `blob ${descriptor.digest.slice(0, 19)}`;
      let offset = 0;
      const resume = resumingAfterCuts(what, "download");
      for (;;) {
        const res = await call({
          method: "GET",
          url: await api(`${repository}/blobs/${descriptor.digest}`),
          headers: offset > 0 ? { range: `bytes=${offset}-` } : {},
          scopes: pull(repository),
          follow: true,
          accept: [200, 206],
          bulk: true,
          gate: download?.gate,
        }, what);
        if (offset > 0 && res.status === 200) {
          debug(`${what}: server ignored Range; starting over`);
          progress?.(-offset);
          offset = 0;
          await sink.reset();
        }
        try {
          for await (const chunk of res.body) {
            if (offset + chunk.length > descriptor.size) {
              throw fail(
                "integrity",
                `${what}: registry sent more than the ${descriptor.size} bytes announced`,
              );
            }
            await sink.write(chunk);
            offset += chunk.length;
            progress?.(chunk.length);
          }
          if (offset === descriptor.size) return;
          throw new SardeError(
            "network",
            `${what}: connection closed after ${offset} of ${descriptor.size} bytes`,
          );
        } catch (err) {
          await resume(err, offset, descriptor.size);
        }
      }
    },

    async readBlob(repository, descriptor, range, signal) {
      const what = `blob ${descriptor.digest.slice(0, 19)}`;
      const start = range?.offset ?? 0;
      const length = range?.length ?? descriptor.size;
      if (
        !Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 ||
        start + length > descriptor.size
      ) {
        throw fail(
          "usage",
          `${what}: bytes ${start}+${length} are not within the blob's ${descriptor.size} bytes`,
        );
      }
      const out = new Uint8Array(length);
      if (length === 0) return out;
      const end = start + length - 1;
      let got = 0;
      const resume = resumingAfterCuts(what, "read", signal ?? options.signal);
      for (;;) {
        signal?.throwIfAborted();
        const res = await call({
          method: "GET",
          url: await api(`${repository}/blobs/${descriptor.digest}`),
          headers: range || got > 0 ? { range: `bytes=${start + got}-${end}` } : {},
          scopes: pull(repository),
          follow: true,
          accept: [200, 206, 416],
          bulk: true,
          signal,
        }, what);
        // A whole blob sent for a range: how many of its bytes come before ours.
        let skip = 0;
        let whole = false;
        if (res.status === 416) {
          await res.discard();
          throw fail(
            "integrity",
            `${what}: the registry has fewer than the ${descriptor.size} bytes announced`,
          );
        } else if (res.status === 206) {
          const cr = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(res.headers.get("content-range") ?? "");
          if (!cr || Number(cr[1]) !== start + got || Number(cr[2]) !== end) {
            await res.discard();
            throw fail(
              "registry",
              `${what}: asked for bytes ${start + got}-${end}, the registry sent ${
                res.headers.get("content-range") ?? "no Content-Range"
              }`,
            );
          }
        } else if (range || got > 0) {
          if (descriptor.size > FULL_READ_LIMIT) {
            await res.discard();
            throw fail(
              "registry",
              `${what}: the registry ignores Range requests (it sent all ${descriptor.size} bytes)`,
              "lazy reads need a registry that serves byte ranges",
            );
          }
          debug(`${what}: server ignored Range; reading the whole blob`);
          skip = start + got;
          whole = true;
        }
        try {
          for await (const piece of res.body) {
            signal?.throwIfAborted();
            const drop = Math.min(skip, piece.length);
            skip -= drop;
            const keep = piece.subarray(drop, drop + Math.min(piece.length - drop, length - got));
            if (keep.length < piece.length - drop && !whole) {
              throw fail(
                "integrity",
                `${what}: the registry sent more than bytes ${start}-${end}`,
              );
            }
            out.set(keep, got); // a copy: bulk bodies reuse their buffer
            got += keep.length;
            if (whole && got === length) break; // the rest of the blob is not ours
          }
          if (got === length) break;
          throw new SardeError(
            "network",
            `${what}: connection closed after ${got} of ${length} bytes`,
          );
        } catch (err) {
          if (signal?.aborted) throw err;
          await resume(err, start + got, descriptor.size);
        }
      }
      if (!range && digestOf(out) !== descriptor.digest) {
        throw fail("integrity", `${what}: the registry sent content with another digest`);
      }
      return out;
    },

    async uploadBlob(repository, descriptor, source, progress) {
      let retries: RetryBudget | undefined; // from the first failure: an upload may take long
      for (;;) {
        let sent = 0;
        const track: ProgressFn = (n) => {
          sent += n;
          progress?.(n);
        };
        try {
          return await uploadOnce(repository, descriptor, source, track);
        } catch (err) {
          progress?.(-sent);
          if (!restartsUpload(err) || gaveUp(err)) throw err;
          retries ??= startRetries(policy);
          const ms = retries.next();
          if (ms === undefined) throw retries.exhausted(err);
          warn(`${(err as Error).message}; restarting the upload in ${(ms / 1000).toFixed(1)} s`);
          await sleep(ms, options.signal);
        }
      }
    },

    close: () => http.close(),
  };
}

function uploadLocation(res: HttpResponse, base: URL, what: string): URL {
  const location = res.headers.get("location");
  if (!location) throw fail("registry", `${what}: registry sent no upload Location`);
  return new URL(location, base);
}

async function* counted(
  chunks: AsyncIterable<Uint8Array>,
  progress?: ProgressFn,
): AsyncIterable<Uint8Array> {
  for await (const c of chunks) {
    yield c;
    progress?.(c.length);
  }
}
