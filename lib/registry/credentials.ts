/**
 * Registry credentials, stored and found the way skopeo, podman and docker do.
 *
 * Written to `auth.json` (`--authfile`, `REGISTRY_AUTH_FILE`, else
 * `${XDG_RUNTIME_DIR}/containers/auth.json`, else `/run/containers/<uid>/auth.json`) with mode
 * 0600. Read from there, `~/.config/containers/auth.json` and `~/.docker/config.json` (with its
 * `credHelpers`, `credsStore` and `identitytoken`).
 *
 * @module
 */

import { dirname, join } from "node:path";
import { fail } from "../util/errors.ts";
import { debug, warn } from "../util/log.ts";
import { followSymlinks, writeFileAtomic } from "../util/fsutil.ts";

/** What a registry login needs: a user and password, or an OAuth2 refresh ("identity") token. */
export interface Credentials {
  /** The user name (docker's `<token>` with an identity token). */
  username: string;
  /** The password or access token. */
  password?: string;
  /** A refresh token from a previous OAuth2 login (docker's `identitytoken`). */
  identityToken?: string;
}

interface AuthEntry {
  auth?: string;
  identitytoken?: string;
  username?: string;
  password?: string;
}
interface AuthFile {
  auths?: Record<string, AuthEntry>;
  credHelpers?: Record<string, string>;
  credsStore?: string;
  [key: string]: unknown;
}

function home(): string {
  return Deno.env.get("HOME") ?? "/root";
}

/** The auth file sarde writes: `--authfile`, `REGISTRY_AUTH_FILE`, or the podman default. */
export function defaultAuthFile(): string {
  const fromEnv = Deno.env.get("REGISTRY_AUTH_FILE");
  if (fromEnv) return fromEnv;
  const runtime = Deno.env.get("XDG_RUNTIME_DIR");
  if (runtime) return join(runtime, "containers", "auth.json");
  return `/run/containers/${Deno.uid() ?? 0}/auth.json`;
}

/** Files searched for credentials, most specific first. */
function searchPath(authfile?: string): string[] {
  const xdgConfig = Deno.env.get("XDG_CONFIG_HOME") ?? join(home(), ".config");
  const dockerConfig = Deno.env.get("DOCKER_CONFIG") ?? join(home(), ".docker");
  return [
    authfile ?? defaultAuthFile(),
    join(xdgConfig, "containers", "auth.json"),
    join(dockerConfig, "config.json"),
  ];
}

/** Normalises an auth-file key (`https://host/v1/`, `host`) to `host[:port]`. */
function keyHost(key: string): string {
  const host = key.replace(/^[a-z]+:\/\//i, "").replace(/\/.*$/, "");
  return ["index.docker.io", "registry-1.docker.io"].includes(host) ? "docker.io" : host;
}

async function readAuthFile(path: string): Promise<AuthFile | undefined> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw fail("io", `cannot read credentials file ${path}: ${(err as Error).message}`);
  }
  try {
    const parsed = JSON.parse(text);
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
      throw new Error("not an object");
    }
    return parsed as AuthFile;
  } catch (err) {
    throw fail(
      "usage",
      `credentials file ${path} is not valid JSON (${(err as Error).message})`,
      "fix or delete it",
    );
  }
}

function findEntry<T>(map: Record<string, T> | undefined, registry: string): T | undefined {
  if (!map) return undefined;
  for (const [key, value] of Object.entries(map)) if (keyHost(key) === registry) return value;
  return undefined;
}

function decodeEntry(entry: AuthEntry, where: string): Credentials | undefined {
  let username = entry.username;
  let password = entry.password;
  if (entry.auth) {
    let decoded: string;
    try {
      decoded = atob(entry.auth);
    } catch {
      warn(`ignoring malformed 'auth' entry in ${where}`);
      return undefined;
    }
    const i = decoded.indexOf(":");
    if (i < 0) {
      warn(`ignoring malformed 'auth' entry in ${where}`);
      return undefined;
    }
    username = decoded.slice(0, i);
    password = decoded.slice(i + 1);
  }
  if (entry.identitytoken) {
    return { username: username ?? "<token>", identityToken: entry.identitytoken };
  }
  if (username !== undefined && username !== "") return { username, password: password ?? "" };
  return undefined;
}

/** Runs `docker-credential-<helper> get` for a registry. Never puts the secret in argv or logs. */
async function fromHelper(helper: string, registry: string): Promise<Credentials | undefined> {
  const program = `docker-credential-${helper}`;
  const serverUrls = registry === "docker.io"
    ? ["https://index.docker.io/v1/", registry]
    : [registry];
  for (const server of serverUrls) {
    let out: Deno.CommandOutput;
    try {
      const child = new Deno.Command(program, {
        args: ["get"],
        stdin: "piped",
        stdout: "piped",
        stderr: "piped",
      })
        .spawn();
      const writer = child.stdin.getWriter();
      await writer.write(new TextEncoder().encode(server));
      await writer.close();
      out = await child.output();
    } catch (err) {
      warn(`credential helper ${program} could not be run: ${(err as Error).message}`);
      return undefined;
    }
    if (!out.success) {
      debug(`${program} has no credentials for ${server}`);
      continue;
    }
    try {
      const { Username, Secret } = JSON.parse(new TextDecoder().decode(out.stdout));
      if (typeof Secret !== "string") continue;
      if (Username === "<token>") return { username: "<token>", identityToken: Secret };
      return { username: String(Username ?? ""), password: Secret };
    } catch {
      warn(`credential helper ${program} returned malformed output`);
      return undefined;
    }
  }
  return undefined;
}

/**
 * Finds credentials for a registry host (`host[:port]`), or `undefined` for anonymous access.
 * `SARDE_REGISTRY_USERNAME`/`SARDE_REGISTRY_PASSWORD` win for the registry named in
 * `SARDE_REGISTRY_HOST` (for CI without files).
 */
export async function findCredentials(
  registry: string,
  authfile?: string,
): Promise<Credentials | undefined> {
  const envUser = Deno.env.get("SARDE_REGISTRY_USERNAME");
  const envPass = Deno.env.get("SARDE_REGISTRY_PASSWORD");
  const envHost = Deno.env.get("SARDE_REGISTRY_HOST");
  // Only for the one registry named: credentials must never go to whatever host an image names.
  if (envUser && envPass !== undefined && envHost === registry) {
    return { username: envUser, password: envPass };
  }
  for (const path of searchPath(authfile)) {
    const file = await readAuthFile(path);
    if (!file) continue;
    const helper = findEntry(file.credHelpers, registry);
    if (helper) {
      const creds = await fromHelper(helper, registry);
      if (creds) return creds;
    }
    const entry = findEntry(file.auths, registry);
    if (entry) {
      const creds = decodeEntry(entry, path);
      if (creds) {
        debug(`using credentials for ${registry} from ${path}`);
        return creds;
      }
    }
    if (file.credsStore) {
      const creds = await fromHelper(file.credsStore, registry);
      if (creds) return creds;
    }
  }
  return undefined;
}

/** Stores credentials for a registry in the auth file (mode 0600, atomic write). */
export async function saveCredentials(
  registry: string,
  creds: Credentials,
  authfile?: string,
): Promise<string> {
  const path = authfile ?? defaultAuthFile();
  const file = (await readAuthFile(path)) ?? {};
  const auths = file.auths ?? {};
  for (const key of Object.keys(auths)) if (keyHost(key) === registry) delete auths[key];
  const entry: AuthEntry = creds.identityToken
    ? { auth: btoa(`${creds.username}:`), identitytoken: creds.identityToken }
    : { auth: btoa(`${creds.username}:${creds.password ?? ""}`) };
  auths[registry] = entry;
  file.auths = auths;
  const real = await followSymlinks(path);
  await Deno.mkdir(dirname(real), { recursive: true, mode: 0o700 });
  await writeFileAtomic(real, JSON.stringify(file, null, "\t") + "\n", { mode: 0o600 });
  return path;
}

/**
 * Removes stored credentials for one registry (or all with `registry === undefined`).
 * Returns whether anything was removed.
 */
export async function removeCredentials(
  registry: string | undefined,
  authfile?: string,
): Promise<boolean> {
  const path = authfile ?? defaultAuthFile();
  const file = await readAuthFile(path);
  if (!file?.auths) return false;
  let removed = false;
  for (const key of Object.keys(file.auths)) {
    if (registry === undefined || keyHost(key) === registry) {
      delete file.auths[key];
      removed = true;
    }
  }
  if (removed) {
    const real = await followSymlinks(path);
    await writeFileAtomic(real, JSON.stringify(file, null, "\t") + "\n", { mode: 0o600 });
  }
  return removed;
}
