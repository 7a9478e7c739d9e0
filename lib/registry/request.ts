/**
 * One registry request as layers, each a {@link Send} around the next (go-containerregistry's
 * `remote/transport`): the raw request at the bottom, then authentication, retries with backoff,
 * and redirects on top. A layer is made per request and may send it several times; its count
 * (401s answered, retries, redirects) holds for the whole request, so one request gets one retry
 * budget however often it is redirected or re-authenticated.
 *
 * Private to lib/registry/ (not re-exported by its mod.ts).
 *
 * @module
 */

import type { Authenticator } from "./auth.ts";
import { fail, SardeError } from "../util/errors.ts";
import { type HttpClient, type HttpRequest, type HttpResponse, isNetworkError } from "./http.ts";
import { debug, warn } from "../util/log.ts";
import {
  isRetryableStatus,
  retryAfterDelay,
  type RetryBudget,
  type RetryPolicy,
  sleep,
} from "../util/retry.ts";
import { RegistryError } from "./errors.ts";

/** Sends the request to `url` with `headers`: the shape of every layer. */
export type Send = (url: URL, headers: Record<string, string>) => Promise<HttpResponse>;

/**
 * Connection errors of the raw requests themselves: the only errors {@link retrying} retries (a
 * token server the authentication layer asks is not retried, as it never was).
 */
const connectionErrors = new WeakSet<object>();

/** The raw request: one `http.send` of everything in `request` but the URL and headers. */
export function sending(
  http: HttpClient,
  request: Omit<HttpRequest, "url" | "headers">,
): Send {
  return async (url, headers) => {
    try {
      return await http.send({ ...request, url, headers: { ...headers } });
    } catch (err) {
      if (isNetworkError(err)) connectionErrors.add(err as SardeError);
      throw err;
    }
  };
}

/**
 * Authentication: sends the authorization `auth` knows for `scopes` to the registry's `origin`
 * (never to another host a redirect leads to), and answers up to two 401s by obtaining new
 * authorization (a token for the scopes, or Basic) and sending again. A 401 it cannot answer is
 * an `auth` error; a third one is passed on.
 */
export function authenticating(
  send: Send,
  o: { auth: Authenticator; origin?: string; scopes: string[]; registry: string; what: string },
): Send {
  let answered = 0;
  return async (url, headers) => {
    for (;;) {
      const sameOrigin = url.origin === o.origin;
      const authorization = sameOrigin ? o.auth.header(o.scopes) : undefined;
      const res = await send(url, authorization ? { ...headers, authorization } : headers);
      if (res.status !== 401 || !sameOrigin || answered >= 2) return res;
      await res.discard();
      answered++;
      const challenge = res.headers.get("www-authenticate");
      if (!await o.auth.respond(challenge, o.scopes, authorization)) {
        throw refused(o.auth.hasCredentials, o.registry, o.what);
      }
    }
  };
}

/** The error for a 401 that new authorization cannot answer. */
function refused(hasCredentials: boolean, registry: string, what: string): RegistryError {
  return new RegistryError(
    "auth",
    hasCredentials
      ? `${what}: ${registry} rejected the credentials`
      : `${what}: ${registry} requires authentication`,
    {
      status: 401,
      hint: hasCredentials
        ? `check the user name and password: sarde login ${registry}`
        : `log in first: sarde login ${registry}`,
    },
  );
}

/**
 * Retries with backoff: a connection error of the raw request, and a retryable status (429,
 * 5xx…) unless the caller takes it as an answer (`accepts`); `Retry-After` sets the delay, capped
 * by `policy`. When `retries` (started by the caller, when the request began) allows no more, the
 * last error says how long it was tried (`errorFor` makes it from the last response).
 */
export function retrying(
  send: Send,
  o: {
    retries: RetryBudget;
    policy: RetryPolicy;
    signal?: AbortSignal;
    registry: string;
    what: string;
    accepts: (status: number) => boolean;
    errorFor: (res: HttpResponse) => Promise<SardeError>;
  },
): Send {
  const retries = o.retries;
  return async (url, headers) => {
    for (;;) {
      let res: HttpResponse;
      try {
        res = await send(url, headers);
      } catch (err) {
        if (!(err instanceof SardeError) || !connectionErrors.has(err)) throw err;
        const ms = retries.next();
        if (ms === undefined) throw retries.exhausted(err);
        warn(`${o.what}: ${err.message}; retrying in ${(ms / 1000).toFixed(1)} s`);
        await sleep(ms, o.signal);
        continue;
      }
      if (!isRetryableStatus(res.status) || o.accepts(res.status)) return res;
      const ms = retries.next(retryAfterDelay(o.policy, res.headers.get("retry-after")));
      if (ms === undefined) throw retries.exhausted(await o.errorFor(res));
      await res.discard();
      warn(
        `${o.what}: ${o.registry} answered ${res.status}; retrying in ${(ms / 1000).toFixed(1)} s`,
      );
      await sleep(ms, o.signal);
    }
  };
}

/** Follows up to five redirects (301, 302, 303, 307, 308), each to the `Location` it names. */
export function redirecting(send: Send, what: string): Send {
  let redirects = 0;
  return async (url, headers) => {
    for (;;) {
      const res = await send(url, headers);
      if (![301, 302, 303, 307, 308].includes(res.status)) return res;
      const location = res.headers.get("location");
      await res.discard();
      if (!location || ++redirects > 5) {
        throw fail("registry", `${what}: too many or broken redirects`);
      }
      url = new URL(location, url);
      debug(`${what}: redirected to ${url.origin}`);
    }
  };
}
