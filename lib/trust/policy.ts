/**
 * Trust policy files in containers-policy.json(5) format, the file skopeo and podman read:
 * `default` plus `transports` → transport → scope → requirements. Only the `docker` transport
 * applies to sarde (registries); other transports are validated and ignored.
 *
 * Requirement types: `insecureAcceptAnything`, `reject`, `sigstoreSigned` (`keyPath`, `keyPaths`,
 * `keyData`, `keyDatas`: exactly one; `signedIdentity`), `signedBy` (GPG: parsed, but an image
 * it applies to is refused) and `signedBaseLayer` (refused, as containers/image refuses it:
 * "not implemented"). Fulcio and Rekor (`fulcio`, `rekorPublicKeyPath`, `rekorPublicKeyData`) are
 * parsed, and an image they apply to is refused: sarde cannot check a transparency log, and
 * checking only the key would accept what the admin meant to refuse. `signedIdentity` kinds: `matchRepoDigestOrExact` (default), `matchExact`,
 * `matchRepository`, `exactReference`, `exactRepository`, `remapIdentity`.
 *
 * Loading is strict like containers/image's: unknown fields, unknown types, empty requirement
 * lists and wrong value types are one-line `usage` errors naming the file.
 *
 * @module
 */

import { homedir } from "node:os";
import { join } from "node:path";
import { fail, SardeError } from "../util/errors.ts";
import { osReason } from "../util/fsutil.ts";
import { parseJsonStrict } from "../util/json.ts";
import { debug } from "../util/log.ts";
import { DEFAULT_TAG, parseReference, type Reference } from "../oci/reference.ts";

/** The system policy file, as the containers tools use it. */
export const SYSTEM_POLICY = "/etc/containers/policy.json";

/** How the identity a signature claims must relate to the image pulled (`signedIdentity`). */
export type IdentityRule =
  | { type: "matchExact" }
  | { type: "matchRepoDigestOrExact" }
  | { type: "matchRepository" }
  | { type: "exactReference"; dockerReference: string }
  | { type: "exactRepository"; dockerRepository: string }
  | { type: "remapIdentity"; prefix: string; signedPrefix: string };

/** A public key of a `sigstoreSigned` requirement: a file or inline PEM. */
export type KeySource = { path: string } | { pem: Uint8Array };

/** One requirement of a scope; all requirements of a scope must accept an image. */
export type Requirement =
  | { type: "insecureAcceptAnything" }
  | { type: "reject" }
  | { type: "signedBy" }
  | { type: "signedBaseLayer" }
  | {
    type: "sigstoreSigned";
    /** Any one of them may have made the signature. */
    keys: KeySource[];
    signedIdentity: IdentityRule;
    /** Set when the requirement uses Fulcio/Rekor, which sarde cannot check: it refuses. */
    unsupported?: string;
  };

/** A loaded policy. */
export interface Policy {
  /** The file it came from, for messages (`""` when built in). */
  file: string;
  /** Requirements when no scope matches. */
  default: Requirement[];
  /** The `docker` transport's scopes (`""` is the transport default). */
  docker: Map<string, Requirement[]>;
}

/** The policy that accepts everything (what a missing default policy file means to sarde). */
export const ACCEPT_ANYTHING: Policy = {
  file: "",
  default: [{ type: "insecureAcceptAnything" }],
  docker: new Map(),
};

type Json = Record<string, unknown>;

/** A checker of one JSON object's fields, with messages naming the file and the object. */
function fields(file: string, where: string, value: unknown, allowed: readonly string[]) {
  const bad = (why: string): never => {
    throw fail("usage", `${file}: ${where}: ${why}`, "see containers-policy.json(5)");
  };
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    bad("must be a JSON object");
  }
  const obj = value as Json;
  for (const k of Object.keys(obj)) if (!allowed.includes(k)) bad(`unknown field "${k}"`);
  const str = (k: string, required = true): string | undefined => {
    if (obj[k] === undefined) return required ? bad(`"${k}" is missing`) : undefined;
    return typeof obj[k] === "string" ? obj[k] as string : bad(`"${k}" must be a string`);
  };
  return { obj, bad, str };
}

function parseIdentity(file: string, where: string, value: unknown): IdentityRule {
  const type = (value as Json | null)?.type;
  const w = `${where} signedIdentity`;
  switch (type) {
    case "matchExact":
    case "matchRepoDigestOrExact":
    case "matchRepository":
      fields(file, w, value, ["type"]);
      return { type };
    case "exactReference": {
      const { str, bad } = fields(file, w, value, ["type", "dockerReference"]);
      const ref = str("dockerReference")!;
      if (!hasTagOrDigest(ref)) bad(`dockerReference "${ref}" needs a tag or digest`);
      return { type, dockerReference: ref };
    }
    case "exactRepository": {
      const { str, bad } = fields(file, w, value, ["type", "dockerRepository"]);
      const repo = str("dockerRepository")!;
      if (!validReference(repo)) bad(`dockerRepository "${repo}" is not a repository name`);
      return { type, dockerRepository: repo };
    }
    case "remapIdentity": {
      const { str, bad } = fields(file, w, value, ["type", "prefix", "signedPrefix"]);
      const prefix = str("prefix")!, signedPrefix = str("signedPrefix")!;
      for (const p of [prefix, signedPrefix]) {
        if (!validPrefix(p)) bad(`"${p}" is not a host[:port][/namespace…] prefix`);
      }
      return { type, prefix, signedPrefix };
    }
    default:
      return fields(file, w, value, ["type"]).bad(`unknown type ${JSON.stringify(type)}`);
  }
}

/** Bytes of a base64 JSON field (Go's `[]byte` in JSON). */
function base64Field(value: unknown, bad: (why: string) => never, what: string): Uint8Array {
  if (typeof value !== "string") return bad(`"${what}" must be a base64 string`);
  try {
    return Uint8Array.from(atob(value), (c) => c.charCodeAt(0));
  } catch {
    return bad(`"${what}" is not valid base64`);
  }
}

function parseRequirement(file: string, where: string, value: unknown): Requirement {
  const type = (value as Json | null)?.type;
  switch (type) {
    case "insecureAcceptAnything":
    case "reject":
      fields(file, where, value, ["type"]);
      return { type };
    case "signedBy": {
      const { obj, bad } = fields(file, where, value, [
        "type",
        "keyType",
        "keyPath",
        "keyPaths",
        "keyData",
        "signedIdentity",
      ]);
      const keyTypes = ["GPGKeys", "signedByGPGKeys", "X509Certificates", "signedByX509CAs"];
      if (!keyTypes.includes(obj.keyType as string)) {
        bad(`"keyType" must be one of ${keyTypes.join(", ")}`);
      }
      if (obj.signedIdentity !== undefined) parseIdentity(file, where, obj.signedIdentity);
      return { type };
    }
    case "signedBaseLayer": {
      const { obj } = fields(file, where, value, ["type", "baseLayerIdentity"]);
      parseIdentity(file, `${where} baseLayerIdentity`, obj.baseLayerIdentity);
      return { type };
    }
    case "sigstoreSigned": {
      const { obj, bad, str } = fields(file, where, value, [
        "type",
        "keyPath",
        "keyPaths",
        "keyData",
        "keyDatas",
        "fulcio",
        "rekorPublicKeyPath",
        "rekorPublicKeyData",
        "signedIdentity",
      ]);
      const given = ["keyPath", "keyPaths", "keyData", "keyDatas", "fulcio"].filter((k) =>
        obj[k] !== undefined
      );
      if (given.length !== 1) {
        bad(`exactly one of keyPath, keyPaths, keyData, keyDatas and fulcio must be given`);
      }
      const list = (k: string): unknown[] => {
        const v = obj[k];
        if (!Array.isArray(v) || v.length === 0) return bad(`"${k}" must be a non-empty list`);
        return v;
      };
      let keys: KeySource[] = [];
      if (obj.keyPath !== undefined) keys = [{ path: str("keyPath")! }];
      if (obj.keyPaths !== undefined) {
        keys = list("keyPaths").map((p) =>
          typeof p === "string" ? { path: p } : bad(`"keyPaths" must hold strings`)
        );
      }
      if (obj.keyData !== undefined) keys = [{ pem: base64Field(obj.keyData, bad, "keyData") }];
      if (obj.keyDatas !== undefined) {
        keys = list("keyDatas").map((d) => ({ pem: base64Field(d, bad, "keyDatas") }));
      }
      const signedIdentity: IdentityRule = obj.signedIdentity === undefined
        ? { type: "matchRepoDigestOrExact" }
        : parseIdentity(file, where, obj.signedIdentity);
      const usesLogs = ["fulcio", "rekorPublicKeyPath", "rekorPublicKeyData"].some((k) =>
        obj[k] !== undefined
      );
      return !usesLogs ? { type, keys, signedIdentity } : {
        type,
        keys,
        signedIdentity,
        unsupported: "Fulcio/Rekor signatures are not supported by sarde",
      };
    }
    default:
      return fields(file, where, value, ["type"]).bad(
        `unknown requirement type ${JSON.stringify(type)}`,
      );
  }
}

function parseRequirements(file: string, where: string, value: unknown): Requirement[] {
  if (!Array.isArray(value)) {
    throw fail("usage", `${file}: ${where}: must be a list of requirements`);
  }
  if (value.length === 0) {
    throw fail("usage", `${file}: ${where}: the list of requirements must not be empty`);
  }
  return value.map((r, i) => parseRequirement(file, `${where}[${i}]`, r));
}

/** Parses policy JSON text; `file` names it in errors. */
export function parsePolicy(text: string, file: string): Policy {
  let json: unknown;
  try {
    json = parseJsonStrict(text);
  } catch (err) {
    throw fail("usage", `${file}: not valid JSON: ${(err as Error).message}`);
  }
  const { obj } = fields(file, "policy", json, ["default", "transports"]);
  if (obj.default === undefined) throw fail("usage", `${file}: "default" is missing`);
  const policy: Policy = {
    file,
    default: parseRequirements(file, "default", obj.default),
    docker: new Map(),
  };
  // Any keys, but an object: `null` or a list is a one-line error, not a TypeError.
  const anyKeys = (where: string, value: unknown): Json => {
    const isObject = typeof value === "object" && value !== null && !Array.isArray(value);
    return isObject ? value as Json : fields(file, where, value, []).obj;
  };
  const transports = obj.transports === undefined ? {} : anyKeys("transports", obj.transports);
  for (const [transport, scopes] of Object.entries(transports)) {
    const s = anyKeys(`transports.${transport}`, scopes);
    for (const [scope, reqs] of Object.entries(s)) {
      const parsed = parseRequirements(file, `transports.${transport}["${scope}"]`, reqs);
      if (transport === "docker") policy.docker.set(scope, parsed);
    }
  }
  return policy;
}

/** Options of {@link loadPolicy}. */
export interface LoadPolicyOptions {
  /** The policy file (`--policy`); must exist. */
  file?: string;
}

/**
 * Loads the trust policy: `file`, else `~/.config/containers/policy.json` if it exists, else
 * {@link SYSTEM_POLICY}. A missing default file means {@link ACCEPT_ANYTHING}: skopeo refuses to
 * run then, but sarde worked without one before and containers-common ships an
 * `insecureAcceptAnything` default anyway; a missing `--policy` file is an error.
 */
export async function loadPolicy(options: LoadPolicyOptions = {}): Promise<Policy> {
  const candidates = options.file
    ? [options.file]
    : [join(homedir(), ".config/containers/policy.json"), SYSTEM_POLICY];
  for (const file of candidates) {
    let text: string;
    try {
      text = await Deno.readTextFile(file);
    } catch (err) {
      if (err instanceof Deno.errors.NotFound && !options.file) continue;
      throw new SardeError("usage", `cannot read trust policy ${file}: ${osReason(err)}`, {
        cause: err,
      });
    }
    return parsePolicy(text, file);
  }
  debug(`no trust policy file (${candidates.join(", ")}): every image is accepted`);
  return ACCEPT_ANYTHING;
}

/**
 * The scopes that apply to `ref`, most specific first, as containers/image names them:
 * `host/repo:tag` (or `@digest`), the repository, each parent namespace, the host[:port], then
 * `*.domain` wildcards of the host (port dropped), one dot at a time.
 */
export function scopesFor(ref: Reference): string[] {
  const scopes = [imageIdentity(ref)];
  let name = `${ref.registry}/${ref.repository}`;
  for (;;) {
    scopes.push(name);
    const slash = name.lastIndexOf("/");
    if (slash < 0) break;
    name = name.slice(0, slash);
  }
  let host = name.replace(/:[0-9]+$/, "");
  for (let dot = host.indexOf("."); dot >= 0; dot = host.indexOf(".")) {
    host = host.slice(dot + 1);
    scopes.push(`*.${host}`);
  }
  return scopes;
}

/** The requirements for `ref` and the scope they come from (`default` when none matched). */
export function requirementsFor(
  policy: Policy,
  ref: Reference,
): { scope: string; requirements: Requirement[] } {
  for (const scope of [...scopesFor(ref), ""]) {
    const requirements = policy.docker.get(scope);
    if (requirements) return { scope: `docker:${scope === "" ? '""' : scope}`, requirements };
  }
  return { scope: "default", requirements: policy.default };
}

/**
 * `host/repo:tag`, or `host/repo@digest` when pinned by digest (sarde fetches by the digest
 * then, so a reference with both is identified by the digest).
 */
export function imageIdentity(ref: Reference): string {
  const name = `${ref.registry}/${ref.repository}`;
  return ref.digest ? `${name}@${ref.digest}` : `${name}:${ref.tag ?? DEFAULT_TAG}`;
}

function validReference(s: string): boolean {
  try {
    parseReference(s);
    return true;
  } catch {
    return false;
  }
}

function hasTagOrDigest(s: string): boolean {
  try {
    const r = parseReference(s);
    return r.tag !== undefined || r.digest !== undefined;
  } catch {
    return false;
  }
}

/** A `remapIdentity` prefix: `host[:port]` or `host[:port]/namespace…`, no tag or digest. */
function validPrefix(s: string): boolean {
  if (!s.includes("/")) return /^[a-zA-Z0-9.-]+(:[0-9]+)?$/.test(s);
  try {
    const r = parseReference(s);
    return r.tag === undefined && r.digest === undefined;
  } catch {
    return false;
  }
}
