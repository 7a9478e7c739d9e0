/**
 * In-process HTTP reverse proxies on 127.0.0.1 for registry tests: a body-size limiter (like a
 * reverse proxy with `client_max_body_size`), a fault injector (corrupted, cut or stalled blob
 * downloads, error statuses, HTML pages instead of registry answers, rewritten or late answers)
 * and a plain forwarder on a chosen port; plus servers that are no registry at all: one answering
 * HTML (`200`, or another status) to everything, and a black hole that accepts connections and
 * never answers. Every proxy and web server logs the requests it saw (`requests()`).
 *
 * The forwarder passes method, path, query, headers and bodies through (streamed), uses
 * `redirect: "manual"`, and rewrites `Location` headers that point at the upstream to the proxy.
 * Request bodies with a `Content-Length` of at most 16 MiB are buffered and forwarded with that
 * length; larger or chunked bodies are streamed (chunked) to the upstream.
 *
 * @module
 */

/** Where a proxy forwards to: a base URL, plus a PEM CA file when it is https. */
export interface ProxyTarget {
  /** `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT` */
  url: string;
  /** PEM CA that signed the upstream's certificate (https upstreams). */
  caFile?: string;
}

/** A running proxy. */
export interface RunningProxy {
  /** `127.0.0.1:PORT` — what goes in an image reference. */
  host: string;
  /** `http://127.0.0.1:PORT` */
  url: string;
  port: number;
  /** Number of requests the proxy has seen so far. */
  hits(): number;
  /** The requests seen so far, oldest first. */
  requests(): SeenRequest[];
  /** Number of faults injected so far ({@link startFaultyProxy}; 0 for other proxies). */
  faults(): number;
  /** Stops the proxy (waits for open connections to finish). Idempotent. */
  stop(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** A request a proxy saw. */
export interface SeenRequest {
  method: string;
  /** Path and query, e.g. `/v2/a/blobs/uploads/?mount=sha256:…&from=b`. */
  path: string;
  /** The request's `Content-Length` (undefined when it had none). */
  contentLength?: number;
}

function seen(req: Request): SeenRequest {
  const url = new URL(req.url);
  const length = req.headers.get("content-length");
  return {
    method: req.method,
    path: url.pathname + url.search,
    ...(length === null ? {} : { contentLength: Number(length) }),
  };
}

/**
 * Kinds of registry requests a fault can be aimed at:
 * - `blob-head`: `HEAD /v2/…/blobs/<digest>`
 * - `manifest-put`: `PUT /v2/…/manifests/<reference>`
 * - `mount`: `POST /v2/…/blobs/uploads/?mount=<digest>&from=<repository>`
 * - `blob-commit`: the closing `PUT /v2/…/blobs/uploads/…?digest=<digest>` of an upload
 * - `blob-get`: `GET /v2/…/blobs/<digest>`
 */
export type RequestKind = "blob-head" | "manifest-put" | "mount" | "blob-commit" | "blob-get";

/** Whether `req` is a request of `kind`. */
export function isRequestOf(req: Request, kind: RequestKind): boolean {
  const url = new URL(req.url);
  switch (kind) {
    case "blob-head":
      return req.method === "HEAD" && BLOB_PATH.test(url.pathname);
    case "manifest-put":
      return req.method === "PUT" && /^\/v2\/.+\/manifests\/[^/]+$/.test(url.pathname);
    case "mount":
      return req.method === "POST" && /\/blobs\/uploads\/$/.test(url.pathname) &&
        url.searchParams.has("mount");
    case "blob-commit":
      return req.method === "PUT" && /\/blobs\/uploads\/[^/]+$/.test(url.pathname) &&
        url.searchParams.has("digest");
    case "blob-get":
      return isBlobGet(req);
  }
}

/** Faults {@link startFaultyProxy} can inject. */
export type Fault =
  /**
   * Flip bytes (same length) in every `GET /v2/…/blobs/<digest>` response body (only for the
   * `digests` listed, if given).
   */
  | { kind: "corrupt-blob"; digests?: string[] }
  /**
   * Close the connection after `afterBytes` body bytes of a blob GET response, for the first
   * `times` responses that are longer than that. `Range` requests are forwarded, so clients can
   * resume.
   */
  | { kind: "cut-blob"; afterBytes: number; times: number }
  /**
   * Answer the first `times` requests (of any kind, or of the kind `requests`) with `status` (and
   * `Retry-After`).
   */
  | {
    kind: "status";
    status: number;
    times: number;
    retryAfter?: number;
    requests?: RequestKind;
  }
  /**
   * Stop sending (without closing the connection) after `afterBytes` body bytes of a blob GET
   * response, for the first `times` responses longer than that. `Range` requests are forwarded.
   */
  | { kind: "stall-blob"; afterBytes: number; times: number }
  /**
   * Answer blob `HEAD`s or manifest `PUT`s with `200` and an HTML page, as a web server would;
   * everything else is forwarded.
   */
  | { kind: "html"; requests: "blob-head" | "manifest-put" }
  /**
   * Hold every blob GET response longer than `afterBytes` after that many body bytes until
   * `until` resolves, then send the rest: a download surely in flight while a test acts.
   */
  | { kind: "pause-blob"; afterBytes: number; until: Promise<void> }
  /**
   * Forward requests of the kind `requests` and change the registry's answer: `status` replaces
   * its status, `headers` sets (a string) or removes (null) headers.
   */
  | {
    kind: "rewrite";
    requests: RequestKind;
    status?: number;
    headers?: Record<string, string | null>;
  }
  /**
   * Forward the first `times` requests of the kind `requests` at once (the registry acts on
   * them) and hold back the registry's answer for `delayMs`.
   */
  | { kind: "late-answer"; requests: RequestKind; delayMs: number; times: number }
  /**
   * Forward blob GETs without their `Range` header, as a server or cache that does not serve byte
   * ranges: the client gets `200` and the whole blob.
   */
  | { kind: "ignore-range" };

/** Hooks of the generic forwarder. */
interface ProxyHooks {
  /** Port on 127.0.0.1 to listen on (default: any free one). */
  port?: number;
  /** Answer a request directly instead of forwarding it (return undefined to forward). */
  intercept?(req: Request): Response | undefined;
  /** Change the headers a request is forwarded with. */
  requestHeaders?(req: Request, headers: Headers): void;
  /** Replace the request body stream (e.g. to count bytes). */
  requestBody?(req: Request, body: ReadableStream<Uint8Array>): ReadableStream<Uint8Array>;
  /** Turn a forwarding error into a response (e.g. 413 after a counting stream gave up). */
  onError?(req: Request, err: unknown): Response | undefined;
  /** Change (or hold back) an upstream answer's status and headers before the client gets it. */
  answer?(req: Request, res: { status: number; headers: Headers }): void | Promise<void>;
  /** Replace the response body stream before it goes to the client. */
  responseBody?(
    req: Request,
    res: Response,
    body: ReadableStream<Uint8Array>,
  ): ReadableStream<Uint8Array>;
}

const HOP_BY_HOP = new Set([
  "connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "proxy-connection",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
  "host",
]);
const NULL_BODY_STATUS = new Set([101, 103, 204, 205, 304]);
const BUFFER_LIMIT = 16 * 1024 * 1024;

/** Matches `/v2/<name>/blobs/<algorithm>:<hex>` (not `/blobs/uploads/…`). */
const BLOB_PATH = /^\/v2\/.+\/blobs\/[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$/;

/** True for a `GET` of a blob by digest. */
export function isBlobGet(req: Request): boolean {
  return req.method === "GET" && BLOB_PATH.test(new URL(req.url).pathname);
}

/** A page a web server (not a registry) answers with. */
function htmlPage(status = 200): Response {
  return new Response("<!DOCTYPE html><html><body><h1>Welcome</h1></body></html>\n", {
    status,
    headers: { "content-type": "text/html; charset=utf-8" },
  });
}

function copyHeaders(from: Headers): Headers {
  const h = new Headers();
  for (const [k, v] of from) if (!HOP_BY_HOP.has(k.toLowerCase())) h.append(k, v);
  return h;
}

/**
 * Starts a reverse proxy for `target` with the given hooks; `faults()` counts the faults that
 * `countFault` (handed to the hooks' maker) was called for.
 */
async function startProxy(
  target: ProxyTarget,
  makeHooks: (countFault: () => void) => ProxyHooks = () => ({}),
): Promise<RunningProxy> {
  let faults = 0;
  const hooks = makeHooks(() => faults++);
  const upstream = new URL(target.url);
  const client = target.caFile
    ? Deno.createHttpClient({ caCerts: [await Deno.readTextFile(target.caFile)] })
    : undefined;
  const log: SeenRequest[] = [];
  let self = "";

  const handle = async (req: Request): Promise<Response> => {
    log.push(seen(req));
    const direct = hooks.intercept?.(req);
    if (direct) {
      await req.body?.cancel().catch(() => {});
      return direct;
    }
    const inUrl = new URL(req.url);
    const outUrl = new URL(inUrl.pathname + inUrl.search, upstream);
    const headers = copyHeaders(req.headers);
    hooks.requestHeaders?.(req, headers);
    let body: BodyInit | null = null;
    if (req.body) {
      const len = Number(req.headers.get("content-length") ?? NaN);
      if (!hooks.requestBody && Number.isFinite(len) && len <= BUFFER_LIMIT) {
        body = new Uint8Array(await req.arrayBuffer());
      } else {
        headers.delete("content-length"); // streamed bodies go out chunked
        body = hooks.requestBody ? hooks.requestBody(req, req.body) : req.body;
      }
    }
    let res: Response;
    try {
      res = await fetch(outUrl, {
        method: req.method,
        headers,
        body,
        redirect: "manual",
        client,
      });
    } catch (err) {
      const alt = hooks.onError?.(req, err);
      if (alt) return alt;
      return new Response(`proxy: upstream request failed: ${err}\n`, { status: 502 });
    }
    const outHeaders = copyHeaders(res.headers);
    const loc = outHeaders.get("location");
    if (loc) {
      const abs = new URL(loc, outUrl);
      if (abs.origin === upstream.origin) {
        outHeaders.set("location", self + abs.pathname + abs.search + abs.hash);
      }
    }
    const out = { status: res.status, headers: outHeaders };
    await hooks.answer?.(req, out);
    let outBody: ReadableStream<Uint8Array> | null = res.body;
    if (req.method === "HEAD" || NULL_BODY_STATUS.has(out.status)) {
      await res.body?.cancel().catch(() => {});
      outBody = null;
    } else if (outBody && hooks.responseBody) {
      outBody = hooks.responseBody(req, res, outBody);
    }
    return new Response(outBody, {
      status: out.status,
      statusText: out.status === res.status ? res.statusText : "",
      headers: out.headers,
    });
  };

  const { promise: listening, resolve } = Promise.withResolvers<Deno.NetAddr>();
  const server = Deno.serve({
    hostname: "127.0.0.1",
    port: hooks.port ?? 0,
    onListen: (addr) => resolve(addr as Deno.NetAddr),
    onError: (err) => new Response(`proxy error: ${err}\n`, { status: 500 }),
  }, handle);
  const addr = await listening;
  self = `http://127.0.0.1:${addr.port}`;
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> => stopped ??= server.shutdown().finally(() => client?.close());
  return {
    host: `127.0.0.1:${addr.port}`,
    url: self,
    port: addr.port,
    hits: () => log.length,
    requests: () => [...log],
    faults: () => faults,
    stop,
    [Symbol.asyncDispose]: stop,
  };
}

/** Starts a proxy that forwards everything to `target`, listening on `port` of 127.0.0.1. */
export function startForwarder(target: ProxyTarget, port: number): Promise<RunningProxy> {
  return startProxy(target, () => ({ port }));
}

/**
 * Starts a web server on 127.0.0.1 that answers every request with an HTML page and `status`
 * (default `200`; e.g. `404` for a web server that has no `/v2/`).
 */
export async function startHtmlServer(status = 200): Promise<RunningProxy> {
  const log: SeenRequest[] = [];
  const { promise: listening, resolve } = Promise.withResolvers<Deno.NetAddr>();
  const server = Deno.serve({
    hostname: "127.0.0.1",
    port: 0,
    onListen: (addr) => resolve(addr as Deno.NetAddr),
  }, async (req) => {
    log.push(seen(req));
    await req.body?.cancel().catch(() => {});
    return htmlPage(status);
  });
  const { port } = await listening;
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> => stopped ??= server.shutdown();
  return {
    host: `127.0.0.1:${port}`,
    url: `http://127.0.0.1:${port}`,
    port,
    hits: () => log.length,
    requests: () => [...log],
    faults: () => 0,
    stop,
    [Symbol.asyncDispose]: stop,
  };
}

/** A TCP server that accepts connections and never reads or answers (see {@link startBlackHole}). */
export interface BlackHole {
  /** `127.0.0.1:PORT` — what goes in an image reference. */
  host: string;
  port: number;
  /** Connections accepted so far. */
  connections(): number;
  /** Closes the listener and every held connection. Idempotent. */
  stop(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Starts a {@link BlackHole} on 127.0.0.1: a registry that accepts TCP and never answers. */
export function startBlackHole(): BlackHole {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const held = new Set<Deno.Conn>();
  let accepted = 0;
  const loop = (async () => {
    try {
      for await (const conn of listener) {
        accepted++;
        held.add(conn);
      }
    } catch { /* listener closed */ }
  })();
  const { port } = listener.addr as Deno.NetAddr;
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    stopped ??= (async () => {
      listener.close();
      await loop;
      for (const c of held) {
        try {
          c.close();
        } catch { /* already closed */ }
      }
    })();
  return {
    host: `127.0.0.1:${port}`,
    port,
    connections: () => accepted,
    stop,
    [Symbol.asyncDispose]: stop,
  };
}

/** Thrown inside a request body stream when the size limit is passed. */
class BodyTooLarge extends Error {}

function tooLarge(limit: number): Response {
  return new Response(
    `<html><head><title>413 Request Entity Too Large</title></head>` +
      `<body>request body larger than ${limit} bytes</body></html>\n`,
    { status: 413, headers: { "content-type": "text/html", connection: "close" } },
  );
}

/**
 * Starts a proxy in front of `target` that answers 413 to any request whose body is larger than
 * `maxBodyBytes`: at once when `Content-Length` says so, otherwise (chunked bodies) as soon as the
 * streamed byte count passes the limit (the upstream request is then aborted).
 */
export function startLimitedProxy(
  target: ProxyTarget,
  maxBodyBytes: number,
): Promise<RunningProxy> {
  const exceeded = new WeakSet<Request>();
  return startProxy(target, () => ({
    intercept(req) {
      const len = Number(req.headers.get("content-length") ?? NaN);
      return Number.isFinite(len) && len > maxBodyBytes ? tooLarge(maxBodyBytes) : undefined;
    },
    requestBody(req, body) {
      const len = Number(req.headers.get("content-length") ?? NaN);
      if (Number.isFinite(len)) return body; // already checked in intercept
      let n = 0;
      return body.pipeThrough(
        new TransformStream<Uint8Array, Uint8Array>({
          transform(chunk, ctl) {
            n += chunk.byteLength;
            if (n > maxBodyBytes) {
              exceeded.add(req);
              ctl.error(new BodyTooLarge(`body larger than ${maxBodyBytes} bytes`));
              return;
            }
            ctl.enqueue(chunk);
          },
        }),
      );
    },
    onError: (req) => (exceeded.has(req) ? tooLarge(maxBodyBytes) : undefined),
  }));
}

/** A stream that flips bits in every chunk (same length), so digests no longer match. */
function corrupt(body: ReadableStream<Uint8Array>): ReadableStream<Uint8Array> {
  return body.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, ctl) {
        const copy = new Uint8Array(chunk);
        for (let i = 0; i < copy.length; i += 4096) copy[i] ^= 0xff;
        ctl.enqueue(copy);
      },
    }),
  );
}

/**
 * A stream that passes `limit` bytes and then errors (which makes the server drop the
 * connection) or, with `stall`, sends nothing more and keeps the connection open until the client
 * gives up. `onEnd(cut)` is called once: true when it cut or stalled, false when the body was
 * shorter.
 */
/** How long a `stall-blob` connection stays silent at most before the proxy drops it. */
const STALL_MAX_MS = 20_000;

function cutAfter(
  body: ReadableStream<Uint8Array>,
  limit: number,
  onEnd: (cut: boolean) => void,
  stall = false,
): ReadableStream<Uint8Array> {
  const reader = body.getReader();
  const cancelled = Promise.withResolvers<void>();
  let sent = 0;
  let cutNext = false;
  let ended = false;
  const end = (cut: boolean) => {
    if (!ended) {
      ended = true;
      onEnd(cut);
    }
  };
  const cut = async (ctl: ReadableStreamDefaultController<Uint8Array>): Promise<void> => {
    // give the server a moment to flush what was sent before the connection drops
    await new Promise((r) => setTimeout(r, 50));
    await reader.cancel().catch(() => {});
    if (stall) {
      // The client hangs up once its timeout passed; should it not, the proxy gives up after
      // STALL_MAX_MS, so that stopping it (which waits for open responses) cannot hang a test.
      let timer: ReturnType<typeof setTimeout> | undefined;
      const gaveUp = await Promise.race([
        cancelled.promise.then(() => false),
        new Promise<boolean>((r) => timer = setTimeout(() => r(true), STALL_MAX_MS)),
      ]);
      clearTimeout(timer);
      if (!gaveUp) return;
    }
    ctl.error(new Error("faulty proxy: connection cut"));
  };
  return new ReadableStream<Uint8Array>({
    async pull(ctl) {
      if (cutNext) return await cut(ctl);
      const { done, value } = await reader.read();
      if (done) {
        end(false);
        ctl.close();
        return;
      }
      const room = limit - sent;
      if (value.byteLength <= room) {
        sent += value.byteLength;
        ctl.enqueue(value);
        return;
      }
      // this chunk crosses the limit: send up to it, then cut (on the next pull, so that the
      // part is delivered; a pull that enqueues nothing must settle the stream itself)
      end(true);
      sent = limit;
      if (room === 0) return await cut(ctl);
      ctl.enqueue(value.subarray(0, room));
      cutNext = true;
    },
    cancel(reason) {
      end(false);
      cancelled.resolve();
      return reader.cancel(reason);
    },
  });
}

/**
 * A stream that passes `limit` bytes, calls `onPause`, and sends the rest once `until` resolves.
 */
function pauseAfter(
  body: ReadableStream<Uint8Array>,
  limit: number,
  until: Promise<void>,
  onPause: () => void,
): ReadableStream<Uint8Array> {
  const reader = body.getReader();
  let sent = 0;
  let held: Uint8Array | undefined;
  const release = async (ctl: ReadableStreamDefaultController<Uint8Array>) => {
    onPause();
    await until;
    ctl.enqueue(held!);
    held = undefined;
  };
  return new ReadableStream<Uint8Array>({
    async pull(ctl) {
      if (held) return await release(ctl);
      const { done, value } = await reader.read();
      if (done) {
        ctl.close();
        return;
      }
      const room = limit - sent;
      sent += value.byteLength;
      if (room < 0 || value.byteLength <= room) {
        ctl.enqueue(value);
        return;
      }
      held = value.subarray(room);
      if (room === 0) return await release(ctl);
      ctl.enqueue(value.subarray(0, room)); // the rest on the next pull, after the pause
    },
    cancel: (reason) => reader.cancel(reason),
  });
}

/**
 * Starts a fault-injecting proxy in front of `target` (a {@link ProxyTarget}, e.g. a
 * `TestRegistry`). `hits()` counts every request the proxy saw, including faulted ones;
 * `faults()` the faults injected.
 *
 * - `corrupt-blob`: every blob GET body (200/206) gets bytes flipped, same length.
 * - `cut-blob`: the first `times` blob GET responses longer than `afterBytes` are cut after
 *   `afterBytes` body bytes (the connection is dropped); `Range: bytes=N-` is forwarded.
 * - `stall-blob`: as `cut-blob`, but the connection stays open and silent instead.
 * - `status`: the first `times` requests (of the kind `requests`, if given) are answered with
 *   `status` (and `Retry-After: retryAfter` when given); later requests are forwarded.
 * - `html`: blob HEADs or manifest PUTs get `200` with an HTML page.
 * - `pause-blob`: blob GET responses longer than `afterBytes` stop there until `until` resolves
 *   (`faults()` counts the responses held).
 * - `rewrite`: answers to requests of the kind `requests` get another status and headers.
 * - `late-answer`: the registry's answers to the first `times` requests of the kind `requests`
 *   reach the client `delayMs` late.
 * - `ignore-range`: blob GETs lose their `Range` header on the way.
 */
export function startFaultyProxy(target: ProxyTarget, fault: Fault): Promise<RunningProxy> {
  switch (fault.kind) {
    case "corrupt-blob":
      return startProxy(target, (counted) => ({
        responseBody(req, res, body) {
          if (
            !isBlobGet(req) || (res.status !== 200 && res.status !== 206) ||
            (fault.digests && !fault.digests.some((d) => req.url.endsWith(`/blobs/${d}`)))
          ) {
            return body;
          }
          counted();
          return corrupt(body);
        },
      }));
    case "cut-blob":
    case "stall-blob": {
      let remaining = fault.times;
      return startProxy(target, (counted) => ({
        responseBody(req, res, body) {
          if (!isBlobGet(req) || (res.status !== 200 && res.status !== 206) || remaining <= 0) {
            return body;
          }
          // A body known to be too short is never a candidate: with parallel downloads, small
          // blobs reserving the cuts would otherwise let the big one through uncut.
          const length = Number(res.headers.get("content-length") ?? NaN);
          if (length <= fault.afterBytes) return body;
          remaining--; // reserved; given back if the body was too short to cut
          return cutAfter(body, fault.afterBytes, (cut) => {
            if (cut) counted();
            else remaining++;
          }, fault.kind === "stall-blob");
        },
      }));
    }
    case "status": {
      let answered = 0;
      return startProxy(target, (counted) => ({
        intercept(req) {
          if (answered >= fault.times) return undefined;
          if (fault.requests && !isRequestOf(req, fault.requests)) return undefined;
          answered++;
          counted();
          const headers = new Headers({ "content-type": "application/json" });
          if (fault.retryAfter !== undefined) headers.set("retry-after", String(fault.retryAfter));
          const body = NULL_BODY_STATUS.has(fault.status) ? null : JSON.stringify({
            errors: [{ code: "UNAVAILABLE", message: `injected status ${fault.status}` }],
          });
          return new Response(body, { status: fault.status, headers });
        },
      }));
    }
    case "pause-blob":
      return startProxy(target, (counted) => ({
        responseBody(req, res, body) {
          const length = Number(res.headers.get("content-length") ?? NaN);
          if (!isBlobGet(req) || res.status !== 200 || !(length > fault.afterBytes)) return body;
          return pauseAfter(body, fault.afterBytes, fault.until, counted);
        },
      }));
    case "html":
      return startProxy(target, (counted) => ({
        intercept(req) {
          if (!isRequestOf(req, fault.requests)) return undefined;
          counted();
          return htmlPage();
        },
      }));
    case "rewrite":
      return startProxy(target, (counted) => ({
        answer(req, res) {
          if (!isRequestOf(req, fault.requests)) return;
          counted();
          res.status = fault.status ?? res.status;
          for (const [name, value] of Object.entries(fault.headers ?? {})) {
            if (value === null) res.headers.delete(name);
            else res.headers.set(name, value);
          }
        },
      }));
    case "ignore-range":
      return startProxy(target, (counted) => ({
        requestHeaders(req, headers) {
          if (!isBlobGet(req) || !headers.has("range")) return;
          counted();
          headers.delete("range");
        },
      }));
    case "late-answer": {
      let remaining = fault.times;
      return startProxy(target, (counted) => ({
        async answer(req) {
          if (remaining <= 0 || !isRequestOf(req, fault.requests)) return;
          remaining--;
          counted();
          await new Promise((r) => setTimeout(r, fault.delayMs));
        },
      }));
    }
  }
}

/** Bytes of blob GET response bodies a {@link startThrottledProxy} has sent. */
export interface BlobBytes {
  /** All blob GET bodies. */
  all: number;
  /** Those answering a `Range` request (a lazy pull's demand reads and frame tables). */
  ranged: number;
}

/** Options of {@link startThrottledProxy}. */
export interface ThrottleOptions {
  /** Bytes per second of each blob GET response body (each response is paced on its own). */
  bytesPerSecond: number;
  /**
   * Make `bytesPerSecond` the total of all blob GET bodies (one link the responses share, each
   * 16 KiB piece in turn, as TCP flows share a slow line) instead of each response's pace. A body
   * its client does not read takes none of it (pieces are paced only when its reader asks).
   */
  shared?: boolean;
  /**
   * Flip bytes in the ranged GETs of these blobs that start at the blob's first byte (its first
   * zstd frame): corrupt data for a lazy reader, while whole downloads stay intact.
   */
  corruptFirstFrames?: string[];
  /**
   * While `active()` says so (asked as each request starts), flip bytes in every GET of these
   * blobs that starts at the blob's first byte, whole downloads and first-frame reads alike: a
   * registry or cache serving a bad blob for a while. Frame tables (at a blob's end) stay intact.
   */
  corruptBlobs?: { digests: string[]; active(): boolean };
  /** Whole (not ranged) GETs of these blobs get no answer until `until` settles. */
  holdWhole?: { digests: string[]; until: Promise<void> };
  /** While it returns true, ranged blob GETs are answered `503` (demand reads fail). */
  failRanged?: () => boolean;
}

/** A {@link RunningProxy} that paces blob downloads and counts their bytes. */
export interface ThrottledProxy extends RunningProxy {
  /** Blob body bytes sent so far. */
  blobBytes(): BlobBytes;
  /** The digest of every whole (not ranged) blob GET so far, in order. */
  wholeBlobGets(): string[];
}

/**
 * Starts a proxy whose blob GET bodies go at most `bytesPerSecond` each, or all together with
 * `shared` (a slow network, so that a full pull takes a while) and are counted, ranged ones apart;
 * other requests pass unpaced.
 */
export async function startThrottledProxy(
  target: ProxyTarget,
  options: ThrottleOptions,
): Promise<ThrottledProxy> {
  const bytes: BlobBytes = { all: 0, ranged: 0 };
  const whole: string[] = [];
  const slice = 16 * 1024;
  /** When the shared link has sent every piece handed to it so far (`shared` only). */
  let linkFree = 0;
  const digestOf = (req: Request) => new URL(req.url).pathname.split("/").pop() ?? "";
  const proxy = await startProxy(target, () => ({
    intercept(req) {
      if (!isBlobGet(req)) return undefined;
      if (!req.headers.has("range")) whole.push(digestOf(req));
      else if (options.failRanged?.()) return new Response("unavailable", { status: 503 });
      return undefined;
    },
    async answer(req) {
      const hold = options.holdWhole;
      if (
        hold && isBlobGet(req) && !req.headers.has("range") && hold.digests.includes(digestOf(req))
      ) {
        await hold.until;
      }
    },
    responseBody(req, _res, body) {
      if (!isBlobGet(req)) return body;
      const ranged = req.headers.has("range");
      const digest = new URL(req.url).pathname.split("/").pop() ?? "";
      const fromStart = !ranged || /^bytes=0-/.test(req.headers.get("range")!);
      const flip =
        (ranged && fromStart && (options.corruptFirstFrames?.includes(digest) ?? false)) ||
        (fromStart && (options.corruptBlobs?.digests.includes(digest) ?? false) &&
          options.corruptBlobs!.active());
      const start = performance.now();
      let sent = 0;
      // Pulled: a piece is paced and counted only when the client's side asks for one, so a body
      // its client does not read moves nothing (as on a real link, once buffers are full).
      const reader = body.getReader();
      let rest: Uint8Array = new Uint8Array(0);
      const paced = new ReadableStream<Uint8Array>({
        async pull(ctl) {
          if (rest.length === 0) {
            const r = await reader.read();
            if (r.done) return ctl.close();
            rest = r.value;
          }
          const piece = new Uint8Array(rest.subarray(0, slice));
          rest = rest.subarray(piece.length);
          if (flip) piece[0] ^= 0xff;
          sent += piece.length;
          const cost = (piece.length / options.bytesPerSecond) * 1000;
          const due = options.shared
            ? (linkFree = Math.max(performance.now(), linkFree) + cost)
            : start + (sent / options.bytesPerSecond) * 1000;
          const wait = due - performance.now();
          if (wait > 0) await new Promise((r) => setTimeout(r, wait));
          bytes.all += piece.length;
          if (ranged) bytes.ranged += piece.length;
          ctl.enqueue(piece);
        },
        cancel: (reason) => reader.cancel(reason),
      }, { highWaterMark: 0 });
      return paced;
    },
  }));
  return { ...proxy, blobBytes: () => ({ ...bytes }), wholeBlobGets: () => [...whole] };
}
