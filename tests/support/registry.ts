/**
 * Real OCI registries for tests: CNCF distribution 2.8.2 (Debian `docker-registry serve CONFIG`)
 * on 127.0.0.1 with a free port, in one of four modes, plus fault-injecting proxies.
 *
 * ```ts
 * import { startRegistry } from "./support/registry.ts";
 * Deno.test("push", async () => {
 *   await using reg = await startRegistry("htpasswd-tls");
 *   // image reference: `${reg.host}/sarde/tiny:v1`, CA: reg.caFile, creds: reg.username/password
 * });
 * ```
 *
 * Everything lives in a temp dir under /var/tmp (removed by `stop()`, kept when the environment
 * variable `SARDE_TEST_KEEP=1` is set). A registry, token server or proxy that outlives the test
 * that started it needs `sanitizeOps: false, sanitizeResources: false` on that test (they hold a
 * child process or a listening socket).
 *
 * @module
 */
import { freePort } from "../../lib/util/net.ts";
import { startTokenServer, type TokenServer } from "./token_server.ts";
import { type RunningProxy, startLimitedProxy } from "./proxy.ts";

export {
  type BlackHole,
  type Fault,
  type ProxyTarget,
  type RequestKind,
  type RunningProxy,
  type SeenRequest,
  startBlackHole,
  startFaultyProxy,
  startForwarder,
  startHtmlServer,
} from "./proxy.ts";
export type { TokenRequestRecord, TokenServer } from "./token_server.ts";

/**
 * - `plain`: http, no auth.
 * - `htpasswd-tls`: https (certificate signed by a fresh test CA) + htpasswd basic auth.
 * - `token`: http + bearer-token auth via an in-process token server.
 * - `token-tls`: https + bearer-token auth whose token server (the realm) is plain http.
 * - `limited`: plain registry behind a proxy that answers 413 to bodies over `maxBodyBytes`.
 */
export type RegistryMode = "plain" | "htpasswd-tls" | "token" | "token-tls" | "limited";

/** A running test registry. */
export interface TestRegistry {
  mode: RegistryMode;
  /** `127.0.0.1:PORT` — what goes in an image reference. */
  host: string;
  /** `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT` */
  url: string;
  /** PEM CA that signed the registry's certificate (tls modes). */
  caFile?: string;
  /** A dir holding only `ca.crt` (skopeo `--cert-dir` / containers `certs.d` style; tls modes). */
  certDir?: string;
  /** `"sarde"` for auth modes. */
  username?: string;
  /** `"sarde-pw"` for auth modes. */
  password?: string;
  /** Registry storage root (`storage.filesystem.rootdirectory`). */
  dataDir: string;
  /** The registry's stdout+stderr. */
  logFile: string;
  /** `token` modes: the token server (realm, issued-token log). */
  tokenServer?: TokenServer;
  /** `limited` mode: the registry itself, bypassing the size-limiting proxy. */
  upstreamUrl?: string;
  /** Kills the registry (and token server/proxy) and removes the temp dir. Idempotent. */
  stop(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Options for {@link startRegistry}. */
export interface StartRegistryOptions {
  /** `limited` mode: largest accepted request body. Default 8 MiB. */
  maxBodyBytes?: number;
  /** `token` modes: lifetime of issued tokens (`exp`, `expires_in`). Default 300. */
  tokenTtlSeconds?: number;
  /** `token` modes: whether anonymous clients may pull. Default true. */
  anonymousPull?: boolean;
  /**
   * Runs the registry as a pull-through cache of this upstream URL (distribution's
   * `proxy: remoteurl:`): it serves pulls from its cache or the upstream and refuses pushes.
   */
  proxyRemoteUrl?: string;
}

/** User name accepted by the auth modes. */
export const TEST_USERNAME = "sarde";
/** Password accepted by the auth modes. */
export const TEST_PASSWORD = "sarde-pw";
/** `service` (JWT audience) of the token mode. */
export const TOKEN_SERVICE = "sarde-registry";
/** JWT issuer of the token mode. */
export const TOKEN_ISSUER = "sarde-token-issuer";

const READY_TIMEOUT_MS = 10_000;
const BIND_ATTEMPTS = 5;
// fixed, so upload state would survive a restart of the same registry
const HTTP_SECRET = "sarde-test-registry-http-secret";

export { freePort };

/** Runs a command to completion; throws with its stderr on failure. */
async function run(cmd: string, args: string[], cwd?: string): Promise<void> {
  const out = await new Deno.Command(cmd, {
    args,
    cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    throw new Error(
      `${cmd} ${args.join(" ")} failed (${out.code}): ${new TextDecoder().decode(out.stderr)}`,
    );
  }
}

/**
 * Makes `ca.crt`/`ca.key` (a self-signed CA) and `server.crt`/`server.key` (signed by it, SAN
 * IP:127.0.0.1 + DNS:localhost) in `dir`. A separate leaf is needed: rustls (Deno's fetch)
 * rejects a CA certificate used as the server certificate (`CaUsedAsEndEntity`).
 */
export async function makeTlsFiles(dir: string): Promise<void> {
  await run("openssl", [
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "30",
    "-subj",
    "/CN=sarde test CA",
    "-addext",
    "subjectAltName=IP:127.0.0.1,DNS:localhost",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    "-keyout",
    "ca.key",
    "-out",
    "ca.crt",
  ], dir);
  await run("openssl", [
    "req",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-subj",
    "/CN=127.0.0.1",
    "-keyout",
    "server.key",
    "-out",
    "server.csr",
  ], dir);
  await Deno.writeTextFile(
    `${dir}/server.ext`,
    "subjectAltName=IP:127.0.0.1,DNS:localhost\n" +
      "basicConstraints=critical,CA:FALSE\n" +
      "keyUsage=critical,digitalSignature,keyEncipherment\n" +
      "extendedKeyUsage=serverAuth\n",
  );
  await run("openssl", [
    "x509",
    "-req",
    "-in",
    "server.csr",
    "-CA",
    "ca.crt",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-days",
    "30",
    "-extfile",
    "server.ext",
    "-out",
    "server.crt",
  ], dir);
}

/** The registry's config.yml (like recipes/registry/start-registry.sh). */
function registryConfig(
  p: { dataDir: string; port: number; tls?: string; auth?: string; proxy?: string },
): string {
  return [
    "version: 0.1",
    "log:",
    "  level: info",
    "  formatter: text",
    "storage:",
    "  filesystem:",
    `    rootdirectory: ${p.dataDir}`,
    "  delete:",
    "    enabled: true",
    "  cache:",
    "    blobdescriptor: inmemory",
    "  maintenance:",
    "    uploadpurging:",
    "      enabled: false",
    "http:",
    `  addr: 127.0.0.1:${p.port}`,
    `  secret: ${HTTP_SECRET}`,
    "  headers:",
    "    X-Content-Type-Options: [nosniff]",
    p.tls ?? "",
    p.auth ?? "",
    p.proxy ? `proxy:\n  remoteurl: ${p.proxy}` : "",
    "",
  ].join("\n");
}

async function tail(file: string, lines = 15): Promise<string> {
  try {
    return (await Deno.readTextFile(file)).trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

/** A started `docker-registry serve` child process. */
interface RegistryProcess {
  port: number;
  child: Deno.ChildProcess;
}

/**
 * Starts `docker-registry serve` on a free port, retrying with another port when the bind fails,
 * and waits until it logged "listening on 127.0.0.1:PORT" and `/v2/` answers 200 or 401.
 */
async function spawnRegistry(
  dir: string,
  makeConfig: (port: number) => string,
  scheme: "http" | "https",
  client: Deno.HttpClient | undefined,
  logFile: string,
): Promise<RegistryProcess> {
  for (let attempt = 1;; attempt++) {
    const port = freePort();
    const config = `${dir}/config.yml`;
    await Deno.writeTextFile(config, makeConfig(port));
    await Deno.writeTextFile(logFile, `--- attempt ${attempt}, port ${port}\n`, { append: true });
    const child = new Deno.Command("sh", {
      args: ["-c", 'exec docker-registry serve "$1" >>"$2" 2>&1', "sh", config, logFile],
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
    let exited = false;
    const status = child.status.then((s) => {
      exited = true;
      return s;
    });
    const deadline = Date.now() + READY_TIMEOUT_MS;
    let lastErr = "";
    while (Date.now() < deadline && !exited) {
      const log = await Deno.readTextFile(logFile).catch(() => "");
      if (log.includes(`listening on 127.0.0.1:${port}`)) {
        try {
          const res = await fetch(`${scheme}://127.0.0.1:${port}/v2/`, {
            client,
            signal: AbortSignal.timeout(2000),
          });
          await res.body?.cancel();
          if (res.status === 200 || res.status === 401) return { port, child };
          lastErr = `/v2/ answered ${res.status}`;
        } catch (e) {
          lastErr = String(e);
        }
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    if (!exited) {
      child.kill("SIGKILL");
      await status;
      throw new Error(
        `registry on port ${port} not ready after ${READY_TIMEOUT_MS} ms (${lastErr}):\n` +
          (await tail(logFile)),
      );
    }
    await status;
    const log = await Deno.readTextFile(logFile).catch(() => "");
    const thisAttempt = log.slice(log.lastIndexOf(`--- attempt ${attempt},`));
    if (/address already in use/.test(thisAttempt) && attempt < BIND_ATTEMPTS) continue;
    throw new Error(`registry exited during startup:\n${await tail(logFile)}`);
  }
}

/**
 * Starts a registry in `mode` on 127.0.0.1. Resolves once `/v2/` answers; rejects with the log
 * tail when it does not within 10 s.
 *
 * - `plain`: `http://`, no auth.
 * - `htpasswd-tls`: `https://`, certificate for 127.0.0.1/localhost signed by a test CA
 *   (`caFile`, `certDir`), htpasswd (bcrypt) user `sarde` / `sarde-pw`.
 * - `token`: `http://`, `auth.token` against an in-process token server (`tokenServer`), service
 *   `sarde-registry`, issuer `sarde-token-issuer`; user `sarde` / `sarde-pw`, anonymous pull.
 * - `token-tls`: as `token`, but the registry is `https://` (as `htpasswd-tls`) while its token
 *   realm stays plain `http://`.
 * - `limited`: a plain registry behind a proxy (`host`/`url`) that answers 413 to request bodies
 *   larger than `maxBodyBytes` (default 8 MiB); `upstreamUrl` is the registry itself.
 */
export async function startRegistry(
  mode: RegistryMode,
  opts: StartRegistryOptions = {},
): Promise<TestRegistry> {
  const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: `sarde-registry-${mode}-` });
  const dataDir = `${dir}/data`;
  const logFile = `${dir}/registry.log`;
  await Deno.mkdir(dataDir);

  let tokenServer: TokenServer | undefined;
  let proxy: RunningProxy | undefined;
  let client: Deno.HttpClient | undefined;
  let proc: RegistryProcess | undefined;

  const cleanup = async (): Promise<void> => {
    if (proc) {
      const p = proc.child;
      try {
        p.kill("SIGTERM");
      } catch { /* already gone */ }
      const timer = setTimeout(() => {
        try {
          p.kill("SIGKILL");
        } catch { /* already gone */ }
      }, 5000);
      await p.status;
      clearTimeout(timer);
    }
    await proxy?.stop();
    await tokenServer?.stop();
    client?.close();
    if (Deno.env.get("SARDE_TEST_KEEP") !== "1") {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  };

  try {
    let tls: string | undefined;
    let auth: string | undefined;
    let caFile: string | undefined;
    let certDir: string | undefined;
    const scheme = mode === "htpasswd-tls" || mode === "token-tls" ? "https" : "http";

    if (scheme === "https") {
      await makeTlsFiles(dir);
      caFile = `${dir}/ca.crt`;
      certDir = `${dir}/certs.d`;
      await Deno.mkdir(certDir);
      await Deno.copyFile(caFile, `${certDir}/ca.crt`);
      client = Deno.createHttpClient({ caCerts: [await Deno.readTextFile(caFile)] });
      tls = `  tls:\n    certificate: ${dir}/server.crt\n    key: ${dir}/server.key`;
    }
    if (mode === "htpasswd-tls") {
      await run("htpasswd", ["-Bbc", `${dir}/htpasswd`, TEST_USERNAME, TEST_PASSWORD]);
      auth = `auth:\n  htpasswd:\n    realm: sarde-registry\n    path: ${dir}/htpasswd`;
    } else if (mode === "token" || mode === "token-tls") {
      await run("openssl", [
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "30",
        "-subj",
        `/CN=${TOKEN_ISSUER}`,
        "-keyout",
        "token.key",
        "-out",
        "token.crt",
      ], dir);
      tokenServer = await startTokenServer({
        keyFile: `${dir}/token.key`,
        certFile: `${dir}/token.crt`,
        users: { [TEST_USERNAME]: TEST_PASSWORD },
        issuer: TOKEN_ISSUER,
        ttlSeconds: opts.tokenTtlSeconds ?? 300,
        anonymousPull: opts.anonymousPull ?? true,
      });
      auth = [
        "auth:",
        "  token:",
        `    realm: ${tokenServer.realm}`,
        `    service: ${TOKEN_SERVICE}`,
        `    issuer: ${TOKEN_ISSUER}`,
        `    rootcertbundle: ${dir}/token.crt`,
      ].join("\n");
    }

    proc = await spawnRegistry(
      dir,
      (port) => registryConfig({ dataDir, port, tls, auth, proxy: opts.proxyRemoteUrl }),
      scheme,
      client,
      logFile,
    );
    const directUrl = `${scheme}://127.0.0.1:${proc.port}`;
    let host = `127.0.0.1:${proc.port}`;
    let url = directUrl;
    if (mode === "limited") {
      proxy = await startLimitedProxy({ url: directUrl }, opts.maxBodyBytes ?? 8 * 1024 * 1024);
      host = proxy.host;
      url = proxy.url;
    }

    let stopped: Promise<void> | undefined;
    const stop = (): Promise<void> => (stopped ??= cleanup());
    const auths = mode !== "plain" && mode !== "limited";
    return {
      mode,
      host,
      url,
      caFile,
      certDir,
      username: auths ? TEST_USERNAME : undefined,
      password: auths ? TEST_PASSWORD : undefined,
      dataDir,
      logFile,
      tokenServer,
      upstreamUrl: mode === "limited" ? directUrl : undefined,
      stop,
      [Symbol.asyncDispose]: stop,
    };
  } catch (e) {
    await cleanup();
    throw e;
  }
}
