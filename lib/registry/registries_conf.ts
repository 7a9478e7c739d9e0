/**
 * Mirrors and blocked registries from containers-registries.conf(5), the file skopeo, podman and
 * buildah read: `[[registry]]` tables (`prefix`, `location`, `insecure`, `blocked`,
 * `mirror-by-digest-only`) with their `[[registry.mirror]]` tables (`location`, `insecure`,
 * `pull-from-mirror`), in the version 2 format only.
 *
 * Which files, as containers/image reads them: the main file is `--registries-conf`, else
 * `$CONTAINERS_REGISTRIES_CONF`, else `~/.config/containers/registries.conf` if it exists, else
 * `/etc/containers/registries.conf`; then the `*.conf` drop-ins of
 * `/etc/containers/registries.conf.d` and `~/.config/containers/registries.conf.d` in name order
 * (only the user's folder when the user's main file was read). `$SARDE_REGISTRIES_CONF_DIR`
 * replaces both folders (containers/image has no variable for them; tests need one). Within one
 * file the first `[[registry]]` of a prefix wins and entries of one location must agree on
 * `insecure` and `blocked`; a later file's entry replaces an earlier file's of the same prefix.
 * Short-name keys
 * (`unqualified-search-registries`, `[aliases]`, `short-name-mode`) are accepted and ignored:
 * sarde references are always fully qualified.
 *
 * @module
 */

import { join } from "node:path";
import { parse, TomlError } from "smol-toml";
import { fail, type SardeError } from "../util/errors.ts";
import { warn } from "../util/log.ts";
import {
  formatReference,
  parseReference,
  parseRegistryHost,
  type Reference,
} from "../oci/reference.ts";

/** Which references a mirror serves (`pull-from-mirror`). */
export type PullFromMirror = "all" | "digest-only" | "tag-only";

/** A `[[registry.mirror]]` table. */
export interface RegistryMirror {
  /** `host[:port][/namespace…]` that replaces the matched prefix. */
  location: string;
  /** Plain http for this mirror (what `--insecure` means). */
  insecure: boolean;
  /** Which references this mirror is asked for. */
  pullFromMirror: PullFromMirror;
}

/** A `[[registry]]` table, after validation. */
export interface RegistryEntry {
  /** What references it applies to: `host[:port][/path…]` or `*.example.com`. */
  prefix: string;
  /** Where the matched prefix really lives; `""` only for wildcard prefixes (no rewriting). */
  location: string;
  /** Plain http for the primary location (what `--insecure` means). */
  insecure: boolean;
  /** Refuse every pull and push of matching references. */
  blocked: boolean;
  /** The older registry-wide switch: mirrors only for references by digest. */
  mirrorByDigestOnly: boolean;
  /** Mirrors, tried in order before the primary location. */
  mirrors: RegistryMirror[];
  /** The file that defined it, for messages. */
  file: string;
}

/** The merged configuration. */
export interface RegistriesConf {
  /** Entries, at most one per prefix. */
  registries: RegistryEntry[];
  /** The files read, in order. */
  files: string[];
}

/** Where a pull may get a reference from. */
export interface PullSource {
  /** The reference to ask that host for (location rewriting applied). */
  reference: Reference;
  /** Plain http for this host. */
  insecure: boolean;
  /** A mirror (failures fall back to the next source) rather than the primary location. */
  mirror: boolean;
}

/** Options of {@link loadRegistriesConf}. */
export interface RegistriesConfOptions {
  /** The main file (skopeo's `--registries-conf`); it must exist. */
  file?: string;
}

const SYSTEM_FILE = "/etc/containers/registries.conf";
const SYSTEM_DIR = "/etc/containers/registries.conf.d";

/** The keys of version 2 files that name no registry behaviour sarde acts on. */
const IGNORED_TOP_KEYS = new Set([
  "unqualified-search-registries",
  "short-name-mode",
  "aliases",
  "credential-helpers",
  "additional-layer-store-auth-helper",
]);

function bad(file: string, message: string): SardeError {
  return fail(
    "usage",
    `${file}: ${message}`,
    "see containers-registries.conf(5) for the version 2 format",
  );
}

/** `prefix`/`location` as containers/image normalises them: no scheme, no trailing `/`. */
function parseLocation(value: string, file: string, what: string): string {
  const text = value.trim().replace(/\/+$/, "");
  if (/^https?:\/\//i.test(text)) {
    throw bad(file, `${what} '${value}' must not name a scheme (http:// or https://)`);
  }
  if (text === "") return "";
  if (text.startsWith("*.")) {
    // containers/image: a wildcard names hosts only (no path, port or digest after it).
    if (/[/:@]/.test(text)) {
      throw bad(file, `${what} '${value}': a *.domain wildcard is a host name only`);
    }
    return text;
  }
  const slash = text.indexOf("/");
  const host = slash < 0 ? text : text.slice(0, slash);
  try {
    parseRegistryHost(host);
  } catch {
    throw bad(file, `${what} '${value}' does not start with a registry host[:port]`);
  }
  return text;
}

function optionalString(table: Record<string, unknown>, key: string, file: string, what: string) {
  const v = table[key];
  if (v === undefined) return "";
  if (typeof v !== "string") throw bad(file, `${what}: ${key} must be a string`);
  return v;
}

function optionalBoolean(table: Record<string, unknown>, key: string, file: string, what: string) {
  const v = table[key];
  if (v === undefined) return false;
  if (typeof v !== "boolean") throw bad(file, `${what}: ${key} must be true or false`);
  return v;
}

function isTable(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function warnUnknown(table: Record<string, unknown>, known: string[], file: string, what: string) {
  for (const key of Object.keys(table)) {
    if (!known.includes(key)) warn(`${file}: ${what}: unknown key '${key}' ignored`);
  }
}

function parseMirror(raw: unknown, file: string, what: string): RegistryMirror {
  if (!isTable(raw)) throw bad(file, `${what} must be a [[registry.mirror]] table`);
  warnUnknown(raw, ["location", "insecure", "pull-from-mirror"], file, what);
  const location = parseLocation(optionalString(raw, "location", file, what), file, "location");
  if (location === "") throw bad(file, `${what}: location is unset`);
  if (location.startsWith("*.")) throw bad(file, `${what}: location '${location}' is a wildcard`);
  const pull = optionalString(raw, "pull-from-mirror", file, what) || "all";
  if (pull !== "all" && pull !== "digest-only" && pull !== "tag-only") {
    throw bad(
      file,
      `${what}: pull-from-mirror '${pull}' is not one of all, digest-only, tag-only`,
    );
  }
  return { location, insecure: optionalBoolean(raw, "insecure", file, what), pullFromMirror: pull };
}

function parseEntry(raw: unknown, index: number, file: string): RegistryEntry {
  const what = `[[registry]] #${index + 1}`;
  if (!isTable(raw)) throw bad(file, `${what} must be a table`);
  warnUnknown(
    raw,
    ["prefix", "location", "insecure", "blocked", "mirror-by-digest-only", "mirror"],
    file,
    what,
  );
  const location = parseLocation(optionalString(raw, "location", file, what), file, "location");
  let prefix = parseLocation(optionalString(raw, "prefix", file, what), file, "prefix");
  if (prefix === "") {
    if (location === "") throw bad(file, `${what}: both location and prefix are unset`);
    prefix = location;
  } else if (location === "" && !prefix.startsWith("*.")) {
    throw bad(file, `${what}: location is unset and prefix '${prefix}' is no *.domain wildcard`);
  }
  if (location.startsWith("*.")) throw bad(file, `${what}: location '${location}' is a wildcard`);
  if (raw["pull-from-mirror"] !== undefined) {
    throw bad(file, `${what}: pull-from-mirror belongs in a [[registry.mirror]] table`);
  }
  const mirrorByDigestOnly = optionalBoolean(raw, "mirror-by-digest-only", file, what);
  const rawMirrors = raw.mirror ?? [];
  if (!Array.isArray(rawMirrors)) throw bad(file, `${what}: mirror must be [[registry.mirror]]`);
  const mirrors = rawMirrors.map((m, i) => {
    if (mirrorByDigestOnly && isTable(m) && m["pull-from-mirror"] !== undefined) {
      throw bad(file, `${what}: mirror-by-digest-only and pull-from-mirror are both set`);
    }
    return parseMirror(m, file, `${what} mirror #${i + 1}`);
  });
  return {
    prefix,
    location,
    insecure: optionalBoolean(raw, "insecure", file, what),
    blocked: optionalBoolean(raw, "blocked", file, what),
    mirrorByDigestOnly,
    mirrors,
    file,
  };
}

/**
 * Parses the text of one registries.conf file (`file` names it in errors). Refuses the version 1
 * format (`[registries.search]` and friends) and broken TOML with a one-line error.
 */
export function parseRegistriesConf(text: string, file: string): RegistryEntry[] {
  let doc: Record<string, unknown>;
  try {
    doc = parse(text) as Record<string, unknown>;
  } catch (err) {
    const e = err as TomlError;
    const where = e instanceof TomlError ? `line ${e.line}: ` : "";
    throw bad(file, `not valid TOML: ${where}${e.message.split("\n")[0]}`);
  }
  if ("registries" in doc) {
    throw fail(
      "usage",
      `${file}: the version 1 format ([registries.search], [registries.insecure], [registries.block]) is not supported`,
      "rewrite it with [[registry]] tables (version 2, containers-registries.conf(5))",
    );
  }
  for (const key of Object.keys(doc)) {
    if (key !== "registry" && !IGNORED_TOP_KEYS.has(key)) {
      warn(`${file}: unknown key '${key}' ignored`);
    }
  }
  const raw = doc.registry ?? [];
  if (!Array.isArray(raw)) throw bad(file, "registry must be [[registry]] tables");
  return firstOfEachPrefix(raw.map((r, i) => parseEntry(r, i, file)), file);
}

/**
 * containers/image's rules for one file: a registry may be listed several times (prefixes with
 * different mirrors), but never with conflicting `insecure` or `blocked` (which one would hold
 * is not obvious, and for `blocked` guessing wrong lets a refused registry through); of entries
 * with the same prefix the first wins, later ones are ignored.
 */
function firstOfEachPrefix(entries: RegistryEntry[], file: string): RegistryEntry[] {
  const byLocation = new Map<string, RegistryEntry>();
  for (const e of entries) {
    const key = e.location || e.prefix;
    const first = byLocation.get(key);
    if (!first) {
      byLocation.set(key, e);
      continue;
    }
    for (const setting of ["insecure", "blocked"] as const) {
      if (first[setting] !== e[setting]) {
        throw bad(file, `registry '${key}' is listed twice with conflicting '${setting}' settings`);
      }
    }
  }
  const byPrefix = new Map<string, RegistryEntry>();
  for (const e of entries) {
    if (byPrefix.has(e.prefix)) warn(`${file}: a second [[registry]] for '${e.prefix}' is ignored`);
    else byPrefix.set(e.prefix, e);
  }
  return [...byPrefix.values()];
}

/** Merges a later file's `later` into `entries`: an entry with the same prefix replaces the earlier one. */
function merge(entries: RegistryEntry[], later: RegistryEntry[]): RegistryEntry[] {
  const byPrefix = new Map(entries.map((e) => [e.prefix, e]));
  for (const e of later) byPrefix.set(e.prefix, e);
  return [...byPrefix.values()];
}

async function readIfExists(path: string): Promise<string | undefined> {
  try {
    return await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw fail("usage", `cannot read ${path}: ${(err as Error).message}`);
  }
}

async function dropIns(dir: string): Promise<string[]> {
  const names: string[] = [];
  try {
    for await (const e of Deno.readDir(dir)) {
      if (!e.isDirectory && e.name.endsWith(".conf")) names.push(e.name);
    }
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return [];
    throw fail("usage", `cannot read ${dir}: ${(err as Error).message}`);
  }
  return names.sort().map((n) => join(dir, n));
}

/**
 * Reads and merges the registries.conf files (see the module comment for which). A main file
 * that was named (option or `$CONTAINERS_REGISTRIES_CONF`) must exist; the default ones may be
 * missing (no mirrors, nothing blocked).
 */
export async function loadRegistriesConf(
  options: RegistriesConfOptions = {},
): Promise<RegistriesConf> {
  const home = Deno.env.get("HOME");
  const userFile = home ? join(home, ".config/containers/registries.conf") : undefined;
  const userDir = home ? join(home, ".config/containers/registries.conf.d") : undefined;
  const named = options.file || Deno.env.get("CONTAINERS_REGISTRIES_CONF") || undefined;
  let main = named ?? SYSTEM_FILE;
  let dirs = [SYSTEM_DIR, userDir];
  if (!named && userFile && await readIfExists(userFile) !== undefined) {
    main = userFile;
    dirs = [userDir];
  }
  const dirOverride = Deno.env.get("SARDE_REGISTRIES_CONF_DIR");
  if (dirOverride) dirs = [dirOverride];

  const files: string[] = [];
  let registries: RegistryEntry[] = [];
  const mainText = await readIfExists(main);
  if (mainText === undefined && named) {
    throw fail("usage", `registries configuration ${main} does not exist`);
  }
  if (mainText !== undefined) {
    registries = merge([], parseRegistriesConf(mainText, main));
    files.push(main);
  }
  for (const dir of dirs) {
    if (!dir) continue;
    for (const path of await dropIns(dir)) {
      const text = await readIfExists(path);
      if (text === undefined) continue;
      registries = merge(registries, parseRegistriesConf(text, path));
      files.push(path);
    }
  }
  return { registries, files };
}

/**
 * How many characters of `ref` (a fully qualified reference string) `prefix` matches, or -1:
 * containers/image's rule. A plain prefix matches whole path components (it must be followed by
 * the end, `/`, `:` or `@`); `*.example.com` matches any subdomain of example.com in the host.
 * Host names are compared without regard to case (DNS does not care: `EVIL.example.com` must not
 * slip past a `blocked` entry for `evil.example.com`).
 */
export function prefixMatch(ref: string, prefix: string): number {
  ref = lowerHost(ref);
  prefix = lowerHost(prefix);
  if (prefix.startsWith("*.")) {
    const suffix = prefix.slice(1);
    const at = ref.indexOf(suffix);
    if (at < 0 || ref.slice(0, at).includes("/")) return -1;
    const end = at + suffix.length;
    return end === ref.length || ":/@".includes(ref[end]) ? end : -1;
  }
  if (!ref.startsWith(prefix)) return -1;
  return ref.length === prefix.length || ":/@".includes(ref[prefix.length]) ? prefix.length : -1;
}

/** `text` with its host part (up to the first `/`) in lower case; same length. */
function lowerHost(text: string): string {
  const slash = text.indexOf("/");
  return slash < 0 ? text.toLowerCase() : text.slice(0, slash).toLowerCase() + text.slice(slash);
}

/**
 * The matching entry with the longest prefix (the first of equals), if any: containers/image
 * ranks by the length of the prefix as written, so an exact `evil.example.com` entry wins over
 * `*.example.com` whichever file or order they come in.
 */
export function findRegistry(conf: RegistriesConf, ref: Reference): RegistryEntry | undefined {
  const text = formatReference(ref);
  let best: RegistryEntry | undefined;
  for (const e of conf.registries) {
    if (prefixMatch(text, e.prefix) < 0) continue;
    if (!best || e.prefix.length > best.prefix.length) best = e;
  }
  return best;
}

/** `ref` with the part `prefix` matched replaced by `location` (none for empty locations). */
function rewrite(ref: Reference, prefix: string, location: string): Reference {
  if (location === "") return ref;
  const text = formatReference(ref);
  const rewritten = location + text.slice(prefixMatch(text, prefix));
  try {
    return parseReference(rewritten);
  } catch (err) {
    throw fail(
      "usage",
      `rewriting ${text} for prefix ${prefix} gives '${rewritten}', which is no valid reference`,
      (err as Error).message,
    );
  }
}

function refuseBlocked(entry: RegistryEntry | undefined, ref: Reference): void {
  if (!entry?.blocked) return;
  throw fail(
    "usage",
    `registry ${entry.prefix} is blocked in ${entry.file}: refusing ${formatReference(ref)}`,
    "ask the administrator of the runner, or pick an image from a registry that is not blocked",
  );
}

/**
 * Where to pull `ref` from, in order: the mirrors that serve it (by `pull-from-mirror` and
 * `mirror-by-digest-only`), then the primary location, each with the reference rewritten to its
 * location. Throws a usage error (exit 2) if `ref` is blocked, before anything is contacted.
 */
export function resolvePullSources(conf: RegistriesConf, ref: Reference): PullSource[] {
  const entry = findRegistry(conf, ref);
  refuseBlocked(entry, ref);
  if (!entry) return [{ reference: ref, insecure: false, mirror: false }];
  const byDigest = ref.digest !== undefined;
  const mirrors = entry.mirrors.filter((m) =>
    entry.mirrorByDigestOnly
      ? byDigest
      : m.pullFromMirror === "all" || (m.pullFromMirror === "digest-only") === byDigest
  );
  return [
    ...mirrors.map((m) => ({
      reference: rewrite(ref, entry.prefix, m.location),
      insecure: m.insecure,
      mirror: true,
    })),
    {
      reference: rewrite(ref, entry.prefix, entry.location),
      insecure: entry.insecure,
      mirror: false,
    },
  ];
}

/**
 * Where to push `ref`: to the reference as written (never a mirror; containers/image does not
 * rewrite push destinations either), with `insecure` from its entry. Throws a usage error
 * (exit 2) if `ref` is blocked.
 */
export function resolvePushTarget(conf: RegistriesConf, ref: Reference): PullSource {
  const entry = findRegistry(conf, ref);
  refuseBlocked(entry, ref);
  return { reference: ref, insecure: entry?.insecure ?? false, mirror: false };
}
