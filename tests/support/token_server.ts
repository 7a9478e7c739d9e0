/**
 * A minimal Docker/OCI registry token server (CNCF distribution "token" auth) for tests.
 *
 * - `GET /token?service=S&scope=repository:NAME:pull,push[&scope=…]` with Basic auth or anonymously.
 *   With `offline_token=true` (and valid credentials) the answer also carries a `refresh_token`.
 * - `POST /token` (OAuth2 form body):
 *   - `grant_type=password&username=&password=&service=&scope=[&access_type=offline]`
 *   - `grant_type=refresh_token&refresh_token=&service=&scope=` (a refresh token this server issued)
 *
 * Authenticated users get every action they ask for; anonymous users get `pull` only (unless
 * `anonymousPull: false`). Tokens are RS256 JWTs whose header carries `x5c = [CERT]`; the registry's
 * `auth.token.rootcertbundle` must be that certificate, `issuer` the server's issuer, and `service`
 * (the JWT audience) is whatever the client sends.
 *
 * Runs in-process ({@link startTokenServer}) or standalone:
 * `deno run -A tests/support/token_server.ts PORT KEY.pem CERT.pem [user:pass …]`.
 *
 * @module
 */
import { createPrivateKey, type KeyObject, randomBytes, sign } from "node:crypto";

/** Options for {@link startTokenServer}. */
export interface TokenServerOptions {
  /** PEM file of the RSA private key that signs tokens. */
  keyFile: string;
  /** PEM file of the certificate put in the JWT `x5c` header (the registry's rootcertbundle). */
  certFile: string;
  /** Accepted users, name → password. Default: `{ sarde: "sarde-pw" }`. */
  users?: Record<string, string>;
  /** JWT `iss`. Default `"sarde-token-issuer"`. */
  issuer?: string;
  /** Lifetime of access tokens (`exp` and `expires_in`), in seconds. Default 300. */
  ttlSeconds?: number;
  /** Whether anonymous clients get `pull`. Default true. */
  anonymousPull?: boolean;
  /** Port; 0 (default) picks a free one. */
  port?: number;
  /** Log every grant to stderr. Default false. */
  verbose?: boolean;
}

/** One request the token server answered (for assertions in tests). */
export interface TokenRequestRecord {
  method: string;
  /** `"basic"`, `"anonymous"`, `"password"` or `"refresh_token"`. */
  grant: string;
  /** The authenticated user, `""` for anonymous, `null` when the request was refused. */
  user: string | null;
  service: string;
  scopes: string[];
  status: number;
}

/** A running token server. */
export interface TokenServer {
  /** `http://127.0.0.1:PORT` */
  url: string;
  /** `http://127.0.0.1:PORT/token` — the registry's `auth.token.realm`. */
  realm: string;
  port: number;
  issuer: string;
  /** Every request answered so far, oldest first. */
  requests(): TokenRequestRecord[];
  /** Stops listening and waits for open requests to finish. Idempotent. */
  stop(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

interface Access {
  type: string;
  name: string;
  actions: string[];
}

const b64url = (data: string | Uint8Array): string => {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
};

/** Splits `repository:NAME:ACTIONS` scopes and decides what is granted. */
function grantAccess(user: string, scopes: string[], anonymousPull: boolean): Access[] {
  const access: Access[] = [];
  for (const s of scopes) {
    // NAME may itself contain ':' (registry:catalog:*)
    const m = /^([^:]+):(.+):([^:]+)$/.exec(s);
    if (!m) continue;
    const wanted = m[3].split(",").filter(Boolean);
    const actions = user ? wanted : anonymousPull ? wanted.filter((a) => a === "pull") : [];
    access.push({ type: m[1], name: m[2], actions });
  }
  return access;
}

function splitScopes(values: string[]): string[] {
  return values.flatMap((s) => s.split(" ")).filter(Boolean);
}

/**
 * Starts a token server on 127.0.0.1 in this process.
 *
 * @example
 * ```ts
 * await using ts = await startTokenServer({ keyFile: "token.key", certFile: "token.crt" });
 * const r = await fetch(`${ts.realm}?service=sarde-registry&scope=repository:a:pull`);
 * ```
 */
export async function startTokenServer(opts: TokenServerOptions): Promise<TokenServer> {
  const key: KeyObject = createPrivateKey(await Deno.readTextFile(opts.keyFile));
  const certDerB64 = (await Deno.readTextFile(opts.certFile))
    .replace(/-----[^-]+-----/g, "")
    .replace(/\s+/g, "");
  const users = new Map(Object.entries(opts.users ?? { sarde: "sarde-pw" }));
  const issuer = opts.issuer ?? "sarde-token-issuer";
  const ttl = opts.ttlSeconds ?? 300;
  const anonymousPull = opts.anonymousPull ?? true;
  const refreshTokens = new Map<string, string>(); // refresh token → user
  const log: TokenRequestRecord[] = [];

  const signToken = (sub: string, service: string, access: Access[]): string => {
    const now = Math.floor(Date.now() / 1000);
    const header = { typ: "JWT", alg: "RS256", x5c: [certDerB64] };
    const claims = {
      iss: issuer,
      sub,
      aud: service,
      exp: now + ttl,
      nbf: now - 10,
      iat: now,
      jti: randomBytes(8).toString("hex"),
      access,
    };
    const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    return `${input}.${b64url(sign("sha256", new TextEncoder().encode(input), key))}`;
  };

  const newRefreshToken = (user: string): string => {
    const t = randomBytes(24).toString("hex");
    refreshTokens.set(t, user);
    return t;
  };

  const reply = (status: number, body: unknown): Response =>
    new Response(JSON.stringify(body), {
      status,
      headers: { "content-type": "application/json" },
    });

  const basicUser = (h: string | null): string | false | null => {
    if (!h || !/^basic /i.test(h)) return null;
    let decoded: string;
    try {
      decoded = atob(h.slice(6).trim());
    } catch {
      return false;
    }
    const i = decoded.indexOf(":");
    if (i < 0) return false;
    const [u, p] = [decoded.slice(0, i), decoded.slice(i + 1)];
    return users.get(u) === p ? u : false;
  };

  const handle = async (req: Request): Promise<Response> => {
    const url = new URL(req.url);
    if (url.pathname !== "/token") return reply(404, { error: "not found" });
    const record = (r: Omit<TokenRequestRecord, "method">): void => {
      log.push({ method: req.method, ...r });
      if (opts.verbose) {
        console.error(
          `token-server ${req.method} ${r.grant} ${r.user ?? "(refused)"} ${r.service} ` +
            `${r.scopes.join(" ")} -> ${r.status}`,
        );
      }
    };

    if (req.method === "GET") {
      const q = url.searchParams;
      const service = q.get("service") ?? "";
      const scopes = splitScopes(q.getAll("scope"));
      const user = basicUser(req.headers.get("authorization"));
      const grant = user === null ? "anonymous" : "basic";
      if (user === false) {
        record({ grant, user: null, service, scopes, status: 401 });
        return reply(401, { error: "invalid credentials" });
      }
      const token = signToken(user ?? "", service, grantAccess(user ?? "", scopes, anonymousPull));
      const body: Record<string, unknown> = {
        token,
        access_token: token,
        expires_in: ttl,
        issued_at: new Date().toISOString(),
      };
      if (user && q.get("offline_token") === "true") body.refresh_token = newRefreshToken(user);
      record({ grant, user: user ?? "", service, scopes, status: 200 });
      return reply(200, body);
    }

    if (req.method === "POST") {
      const f = new URLSearchParams(await req.text());
      const grantType = f.get("grant_type") ?? "";
      const service = f.get("service") ?? "";
      const scopes = splitScopes(f.getAll("scope"));
      let user: string | undefined;
      let refresh: string | undefined;
      if (grantType === "password") {
        const name = f.get("username") ?? "";
        if (users.has(name) && users.get(name) === f.get("password")) user = name;
        if (user && f.get("access_type") === "offline") refresh = newRefreshToken(user);
      } else if (grantType === "refresh_token") {
        const presented = f.get("refresh_token") ?? "";
        user = refreshTokens.get(presented);
        if (user) refresh = presented;
      } else {
        record({ grant: grantType, user: null, service, scopes, status: 400 });
        return reply(400, { error: "unsupported_grant_type" });
      }
      if (!user) {
        record({ grant: grantType, user: null, service, scopes, status: 401 });
        return reply(401, {
          error: grantType === "refresh_token" ? "invalid_grant" : "invalid credentials",
        });
      }
      const body: Record<string, unknown> = {
        access_token: signToken(user, service, grantAccess(user, scopes, anonymousPull)),
        scope: scopes.join(" "),
        expires_in: ttl,
        issued_at: new Date().toISOString(),
      };
      if (refresh) body.refresh_token = refresh;
      record({ grant: grantType, user, service, scopes, status: 200 });
      return reply(200, body);
    }
    return reply(405, { error: "method not allowed" });
  };

  const { promise: listening, resolve } = Promise.withResolvers<Deno.NetAddr>();
  const server = Deno.serve({
    hostname: "127.0.0.1",
    port: opts.port ?? 0,
    onListen: (addr) => resolve(addr as Deno.NetAddr),
  }, handle);
  const addr = await listening;
  const url = `http://127.0.0.1:${addr.port}`;
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> => (stopped ??= server.shutdown());
  return {
    url,
    realm: `${url}/token`,
    port: addr.port,
    issuer,
    requests: () => [...log],
    stop,
    [Symbol.asyncDispose]: stop,
  };
}

if (import.meta.main) {
  const [port, keyFile, certFile, ...userArgs] = Deno.args;
  if (!port || !keyFile || !certFile) {
    console.error("usage: token_server.ts PORT KEY.pem CERT.pem [user:pass …]");
    Deno.exit(2);
  }
  const users = userArgs.length
    ? Object.fromEntries(
      userArgs.map((u) => [u.slice(0, u.indexOf(":")), u.slice(u.indexOf(":") + 1)]),
    )
    : undefined;
  const ts = await startTokenServer({
    port: Number(port),
    keyFile,
    certFile,
    users,
    ttlSeconds: Number(Deno.env.get("TOKEN_TTL") ?? 300),
    anonymousPull: Deno.env.get("ANON_PULL") !== "0",
    verbose: true,
  });
  console.error(`token server on ${ts.url}`);
}
