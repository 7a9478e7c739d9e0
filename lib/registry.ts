/**
 * A client for the OCI distribution API: manifests, blobs (HEAD, GET with `Range` resume,
 * cross-repository mount, streamed or chunked upload), with authentication, retries and
 * redirects handled here so callers deal only in digests and bytes.
 *
 * @module
 */

import { createAuthenticator, repositoryScope } from "./auth.ts";
import type { Credentials } from "./credentials.ts";
import { fail, SardeError } from "./errors.ts";
import {
  createHttpClient,
  type HttpResponse,
  isNetworkError,
  type RequestBody,
  type TransportOptions,
} from "./http.ts";
import { debug, warn } from "./log.ts";
import { type Descriptor, MANIFEST_ACCEPT } from "./oci.ts";
import { isLoopbackRegistry, registryEndpointHost } from "./reference.ts";
import {
  backoffDelay,
  defaultRetryPolicy,
  isRetryableStatus,
  retryAfterDelay,
  type RetryPolicy,
  sleep,
} from "./retry.ts";
import { digestOf } from "./digest.ts";

/** Options for talking to one registry. */
export interface RegistryOptions extends TransportOptions {
  /** Credentials to use; `undefined` means anonymous. */
  credentials?: Credentials;
  /** Retry policy for connection errors, 5xx and 429. */
  retry?: RetryPolicy;
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

/** Progress callback: bytes moved since the last call. */
export type ProgressFn = (bytes: number) => void;

/** A connection to one registry host. */
export interface RegistryClient {
  /** The registry host (`host[:port]`). */
  readonly registry: string;
  /** `GET /v2/`: checks that the registry answers and, with credentials, that they are accepted. */
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
  /** Whether the repository has the blob. */
  hasBlob(repository: string, digest: string): Promise<boolean>;
  /** Tries a cross-repository mount from `from`; true when the blob is now in `repository`. */
  mountBlob(repository: string, digest: string, from: string): Promise<boolean>;
  /** Downloads a blob into `sink`, resuming with `Range` after a cut connection. */
  downloadBlob(
    repository: string,
    descriptor: Descriptor,
    sink: BlobSink,
    progress?: ProgressFn,
  ): Promise<void>;
  /** Uploads a blob (POST → PATCH… → PUT `?digest=`), restarting on failure. */
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
  /** Statuses returned to the caller as-is instead of being turned into errors. */
  accept: number[];
  /** Retry on transport errors / 5xx (false for non-idempotent upload steps handled by caller). */
  retry?: boolean;
  /** A large download: `bulk` of lib/http.ts. */
  bulk?: boolean;
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
  const policy = options.retry ?? defaultRetryPolicy();
  const auth = createAuthenticator(http, registry, options.credentials);
  const endpoint = registryEndpointHost(registry);
  let base: URL | undefined;

  async function baseUrl(): Promise<URL> {
    if (base) return base;
    if (options.plainHttp) return (base = new URL(`http://${endpoint}/`));
    const https = new URL(`https://${endpoint}/`);
    if (!isLoopbackRegistry(registry)) return (base = https);
    // Loopback registries are often plain http (as docker assumes); try TLS first, fall back.
    try {
      const r = await http.send({
        method: "GET",
        url: new URL("/v2/", https),
        signal: options.signal,
      });
      await r.discard();
      return (base = https);
    } catch (err) {
      if (err instanceof SardeError && /does not speak TLS/.test(err.message)) {
        debug(`${registry} does not speak TLS; using plain http`);
        return (base = new URL(`http://${endpoint}/`));
      }
      throw err;
    }
  }

  const api = async (path: string) => new URL(`/v2/${path}`, await baseUrl());

  async function errorFor(res: HttpResponse, what: string): Promise<SardeError> {
    let detail = "";
    try {
      const body = JSON.parse(await res.text());
      const errs = Array.isArray(body?.errors) ? body.errors : [];
      detail = errs.map((e: { code?: string; message?: string }) =>
        [e.code, e.message].filter(Boolean).join(": ")
      )
        .join("; ");
    } catch { /* not a distribution error document */ }
    const suffix = detail ? ` (${detail})` : "";
    if (res.status === 404) return fail("not-found", `${what}: not found on ${registry}${suffix}`);
    if (res.status === 401 || res.status === 403) {
      return new SardeError("auth", `${what}: access denied by ${registry}${suffix}`, {
        hint: auth.hasCredentials
          ? `the stored credentials lack permission; check them with sarde login ${registry}`
          : `log in first: sarde login ${registry}`,
      });
    }
    if (res.status === 413) {
      return new SardeError(
        "registry",
        `${what}: ${registry} refused a request body as too large (413)`,
        {
          hint: "use --chunk-size (e.g. 4MiB) for registries or proxies that cap request bodies",
        },
      );
    }
    return fail("registry", `${what}: ${registry} answered HTTP ${res.status}${suffix}`);
  }

  async function call(o: CallOptions, what: string): Promise<HttpResponse> {
    let url = o.url;
    let attempt = 1;
    let authTries = 0;
    let redirects = 0;
    for (;;) {
      const headers: Record<string, string> = { ...o.headers };
      const sameOrigin = url.origin === (await baseUrl()).origin;
      const authorization = sameOrigin ? auth.header(o.scopes) : undefined;
      if (authorization) headers.authorization = authorization;
      let res: HttpResponse;
      try {
        res = await http.send({
          method: o.method,
          url,
          headers,
          body: o.body,
          signal: options.signal,
          bulk: o.bulk,
        });
      } catch (err) {
        if (o.retry !== false && isNetworkError(err) && attempt < policy.attempts) {
          const ms = backoffDelay(policy, attempt);
          warn(`${what}: ${(err as Error).message}; retrying in ${(ms / 1000).toFixed(1)} s`);
          await sleep(ms, options.signal);
          attempt++;
          continue;
        }
        throw err;
      }
      if (res.status === 401 && sameOrigin && authTries < 2) {
        await res.discard();
        authTries++;
        if (await auth.respond(res.headers.get("www-authenticate"), o.scopes, authorization)) {
          continue;
        }
        throw new SardeError(
          "auth",
          auth.hasCredentials
            ? `${what}: ${registry} rejected the credentials`
            : `${what}: ${registry} requires authentication`,
          {
            hint: auth.hasCredentials
              ? `check the user name and password: sarde login ${registry}`
              : `log in first: sarde login ${registry}`,
          },
        );
      }
      if (o.follow && [301, 302, 303, 307, 308].includes(res.status)) {
        const location = res.headers.get("location");
        await res.discard();
        if (!location || ++redirects > 5) {
          throw fail("registry", `${what}: too many or broken redirects`);
        }
        url = new URL(location, url);
        debug(`${what}: redirected to ${url.origin}`);
        continue;
      }
      if (o.retry !== false && isRetryableStatus(res.status) && attempt < policy.attempts) {
        const ms = retryAfterDelay(policy, res.headers.get("retry-after")) ??
          backoffDelay(policy, attempt);
        await res.discard();
        warn(
          `${what}: ${registry} answered ${res.status}; retrying in ${(ms / 1000).toFixed(1)} s`,
        );
        await sleep(ms, options.signal);
        attempt++;
        continue;
      }
      if (o.accept.includes(res.status)) return res;
      throw await errorFor(res, what);
    }
  }

  const pull = (repo: string) => [repositoryScope(repo, ["pull"])];
  const push = (repo: string) => [repositoryScope(repo, ["pull", "push"])];

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
    const done = await call(
      { method: "PUT", url: put, scopes: push(repository), accept: [201, 204], retry: false },
      what,
    );
    await done.discard();
  }

  return {
    registry,
    async ping() {
      const res = await call(
        { method: "GET", url: await api(""), scopes: [], accept: [200] },
        "registry check",
      );
      await res.discard();
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
      const res = await call({
        method: "PUT",
        url: await api(`${repository}/manifests/${selector}`),
        headers: { "content-type": mediaType },
        body: bytes,
        scopes: push(repository),
        accept: [201, 200, 202],
      }, `manifest upload ${manifestName(repository, selector)}`);
      await res.discard();
      return digestOf(bytes);
    },

    async hasBlob(repository, digest) {
      const res = await call({
        method: "HEAD",
        url: await api(`${repository}/blobs/${digest}`),
        scopes: push(repository),
        follow: true,
        accept: [200, 404],
      }, `blob ${digest.slice(0, 19)}`);
      await res.discard();
      return res.status === 200;
    },

    async mountBlob(repository, digest, from) {
      const url = await api(`${repository}/blobs/uploads/`);
      url.searchParams.set("mount", digest);
      url.searchParams.set("from", from);
      const res = await call({
        method: "POST",
        url,
        scopes: [...push(repository), repositoryScope(from, ["pull"])],
        accept: [201, 202],
      }, `mount of ${digest.slice(0, 19)}`);
      await res.discard();
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

    async downloadBlob(repository, descriptor, sink, progress) {
      const what = `blob ${descriptor.digest.slice(0, 19)}`;
      let offset = 0;
      for (let attempt = 1;; attempt++) {
        const res = await call({
          method: "GET",
          url: await api(`${repository}/blobs/${descriptor.digest}`),
          headers: offset > 0 ? { range: `bytes=${offset}-` } : {},
          scopes: pull(repository),
          follow: true,
          accept: [200, 206],
          bulk: true,
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
          const cut = isNetworkError(err) || (err instanceof Error && !(err instanceof SardeError));
          if (!cut || attempt >= policy.attempts) {
            if (cut) {
              throw new SardeError(
                "network",
                `${what}: download failed: ${(err as Error).message}`,
              );
            }
            throw err;
          }
          const ms = backoffDelay(policy, attempt);
          warn(
            `${what}: interrupted at ${offset} of ${descriptor.size} bytes; resuming in ${
              (ms / 1000).toFixed(1)
            } s`,
          );
          await sleep(ms, options.signal);
        }
      }
    },

    async uploadBlob(repository, descriptor, source, progress) {
      for (let attempt = 1;; attempt++) {
        let sent = 0;
        const track: ProgressFn = (n) => {
          sent += n;
          progress?.(n);
        };
        try {
          return await uploadOnce(repository, descriptor, source, track);
        } catch (err) {
          progress?.(-sent);
          const retryable = isNetworkError(err) ||
            (err instanceof SardeError && err.kind === "registry" &&
              /HTTP 5\d\d|HTTP 429/.test(err.message));
          if (!retryable || attempt >= policy.attempts) throw err;
          const ms = backoffDelay(policy, attempt);
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
