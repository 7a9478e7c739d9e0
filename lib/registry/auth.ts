/**
 * Registry authentication: `WWW-Authenticate` challenges, Basic, and Bearer tokens
 * (docker token protocol and OAuth2 refresh/password grants), with tokens reused until expiry.
 *
 * Private to `lib/registry/`: other folders use what `lib/registry/mod.ts` offers.
 *
 * @module
 */

import { fail, SardeError } from "../util/errors.ts";
import type { Credentials } from "./credentials.ts";
import type { HttpClient } from "./http.ts";
import { debug } from "../util/log.ts";
import { isLoopbackRegistry, registryEndpointHost } from "../oci/reference.ts";

/** One parsed challenge, e.g. `Bearer realm="…",service="…",scope="…"`. */
export interface Challenge {
  /** Lower-case scheme: `basic` or `bearer`. */
  scheme: string;
  params: Record<string, string>;
}

/** Parses a `WWW-Authenticate` header (one or more challenges, quoted values with commas). */
export function parseChallenges(header: string): Challenge[] {
  const out: Challenge[] = [];
  const s = header;
  let i = 0;
  while (i < s.length) {
    while (i < s.length && /[\s,]/.test(s[i])) i++;
    const token = /^[A-Za-z0-9!#$%&'*+.^_`|~-]+/.exec(s.slice(i))?.[0];
    if (!token) break;
    i += token.length;
    let j = i;
    while (s[j] === " ") j++;
    if (s[j] !== "=" || out.length === 0) {
      out.push({ scheme: token.toLowerCase(), params: {} });
      continue;
    }
    i = j + 1;
    while (s[i] === " ") i++;
    let value = "";
    if (s[i] === '"') {
      for (i++; i < s.length && s[i] !== '"'; i++) value += s[i] === "\\" ? s[++i] ?? "" : s[i];
      i++;
    } else {
      value = /^[^\s,]*/.exec(s.slice(i))![0];
      i += value.length;
    }
    out[out.length - 1].params[token.toLowerCase()] = value;
  }
  return out;
}

/** Scope string for a repository, e.g. `repository:sardines/debian:pull,push`. */
export function repositoryScope(repository: string, actions: string[]): string {
  return `repository:${repository}:${actions.join(",")}`;
}

/**
 * Why credentials must not go to the token realm `realm` of `registry` (`host[:port]`, reached
 * over plain http when `plainRegistry`), or undefined when they may. Over https they may. Over
 * plain http only when the registry is reached that way too (its own traffic is in clear text
 * already), and then only to the registry's own host or a loopback address: a challenge must not
 * send passwords in clear text across the network to whatever host it names.
 */
export function cleartextRefusal(
  realm: URL,
  registry: string,
  plainRegistry: boolean,
): string | undefined {
  if (realm.protocol !== "http:") return undefined;
  if (!plainRegistry) return "as the registry itself uses https";
  const registryHost = new URL(`http://${registryEndpointHost(registry)}`).hostname;
  if (realm.hostname === registryHost || isLoopbackRegistry(realm.host)) return undefined;
  return "as that is neither the registry's host nor a loopback address";
}

interface CachedToken {
  value: string;
  expiresAt: number;
}

/** Remembers how a registry wants to be authenticated and which tokens it has handed out. */
export interface Authenticator {
  /** The `Authorization` header to send for these scopes, if one is known already. */
  header(scopes: string[]): string | undefined;
  /**
   * Reacts to a 401 of a request sent with `used` (or no) authorization: obtains Basic or Bearer
   * authorization for the scopes. Returns false when nothing new can be tried (no credentials for
   * Basic, or the authorization just obtained was refused).
   */
  respond(
    challengeHeader: string | null,
    scopes: string[],
    used: string | undefined,
  ): Promise<boolean>;
  /** Whether credentials are configured (for error messages). */
  readonly hasCredentials: boolean;
}

/**
 * Creates an {@link Authenticator} for one registry. `plainRegistry` tells whether the registry
 * itself is reached over plain http: only then may credentials go to a plain-http token realm
 * (see {@link cleartextRefusal}).
 */
export function createAuthenticator(
  http: HttpClient,
  registry: string,
  credentials: Credentials | undefined,
  plainRegistry: () => boolean,
): Authenticator {
  let scheme: "basic" | "bearer" | undefined;
  const tokens = new Map<string, CachedToken>();
  const pending = new Map<string, Promise<CachedToken>>();
  const key = (scopes: string[]) => [...scopes].sort().join(" ");

  const basicHeader = () =>
    credentials && credentials.password !== undefined
      ? `Basic ${
        btoa(unescape(encodeURIComponent(`${credentials.username}:${credentials.password}`)))
      }`
      : undefined;

  async function fetchToken(challenge: Challenge, scopes: string[]): Promise<CachedToken> {
    const realm = challenge.params.realm;
    if (!realm) throw fail("auth", `${registry} sent a Bearer challenge without a realm`);
    let url: URL;
    try {
      url = new URL(realm);
    } catch {
      throw fail("auth", `${registry} sent an invalid token realm '${realm}'`);
    }
    if (url.protocol !== "https:" && url.protocol !== "http:") {
      throw fail("auth", `${registry} sent an invalid token realm '${realm}'`);
    }
    // The realm is whatever the registry's challenge says.
    const refusal = credentials && cleartextRefusal(url, registry, plainRegistry());
    if (refusal) {
      throw new SardeError(
        "auth",
        `${registry} wants the credentials sent to ${url.origin} over plain http; refused, ${refusal}`,
        { hint: "the registry's token realm must be an https URL; ask its administrator" },
      );
    }
    const service = challenge.params.service;
    let response;
    if (credentials?.identityToken) {
      // OAuth2 refresh-token grant (docker's identitytoken).
      const form = new URLSearchParams({
        grant_type: "refresh_token",
        refresh_token: credentials.identityToken,
        client_id: "sarde",
        ...(service ? { service } : {}),
        scope: scopes.join(" "),
      });
      response = await http.send({
        method: "POST",
        url,
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: form.toString(),
      });
    } else {
      if (service) url.searchParams.set("service", service);
      for (const s of scopes) url.searchParams.append("scope", s);
      if (credentials) url.searchParams.set("account", credentials.username);
      const auth = basicHeader();
      response = await http.send({
        method: "GET",
        url,
        headers: auth ? { authorization: auth } : {},
      });
    }
    if (response.status === 401 || response.status === 403) {
      await response.discard();
      throw fail(
        "auth",
        credentials
          ? `${registry}: the token server rejected the credentials for user '${credentials.username}'`
          : `${registry}: the token server refused anonymous access`,
        credentials
          ? `check them with sarde login ${registry}`
          : `log in first: sarde login ${registry}`,
      );
    }
    if (response.status !== 200) {
      const body = await response.text().catch(() => "");
      throw fail(
        "auth",
        `${registry}: token server answered ${response.status} ${body.slice(0, 200)}`.trim(),
      );
    }
    let json: Record<string, unknown>;
    try {
      json = JSON.parse(await response.text());
    } catch {
      throw fail("auth", `${registry}: token server returned malformed JSON`);
    }
    const value = (json.token ?? json.access_token) as unknown;
    if (typeof value !== "string" || value === "") {
      throw fail("auth", `${registry}: token server returned no token`);
    }
    const expiresIn = typeof json.expires_in === "number" && json.expires_in > 0
      ? json.expires_in
      : 60;
    const issuedAt = typeof json.issued_at === "string" ? Date.parse(json.issued_at) : NaN;
    const start = Number.isFinite(issuedAt) && Math.abs(issuedAt - Date.now()) < 300_000
      ? issuedAt
      : Date.now();
    debug(`got a token for ${registry} (${scopes.join(" ") || "no scope"}), valid ${expiresIn} s`);
    // Renew a little early so a token never expires in flight.
    return { value, expiresAt: start + Math.max(1, expiresIn - 10) * 1000 };
  }

  return {
    get hasCredentials() {
      return credentials !== undefined;
    },
    header(scopes) {
      if (scheme === "basic") return basicHeader();
      if (scheme === "bearer") {
        const t = tokens.get(key(scopes));
        if (t && t.expiresAt > Date.now()) return `Bearer ${t.value}`;
      }
      return undefined;
    },
    async respond(challengeHeader, scopes, used) {
      // Another request may have obtained authorization meanwhile (parallel blob requests).
      const current = this.header(scopes);
      if (current !== undefined && current !== used) return true;
      const challenges = parseChallenges(challengeHeader ?? "");
      const b = challenges.find((c) => c.scheme === "bearer");
      if (b) {
        // A token we just got was refused: the scope is not granted; asking again will not help.
        if (used?.startsWith("Bearer ")) return false;
        scheme = "bearer";
        const k = key(scopes);
        let request = pending.get(k);
        if (!request) {
          request = fetchToken(b, scopes).finally(() => pending.delete(k));
          pending.set(k, request);
        }
        tokens.set(k, await request);
        return true;
      }
      if (challenges.some((c) => c.scheme === "basic") || challenges.length === 0) {
        if (used?.startsWith("Basic ") || !basicHeader()) return false;
        scheme = "basic";
        return true;
      }
      throw fail("auth", `${registry} wants unsupported authentication '${challenges[0].scheme}'`);
    },
  };
}
