/**
 * Sigstore signatures as cosign writes them and containers/image reads them: a simple-signing
 * payload (`critical.identity.docker-reference`, `critical.image.docker-manifest-digest`,
 * `critical.type` = "cosign container image signature", `optional`), signed with a key whose
 * signature is the base64 annotation `dev.cosignproject.cosign/signature` of the attachment's
 * layer. The checks and their order follow containers/image's `VerifySigstorePayload`:
 * cryptographic signature first, then the payload (strictly), then the digest, then the
 * identity.
 *
 * @module
 */

import { createPublicKey, type KeyObject, verify } from "node:crypto";
import { digestHex } from "../oci/digest.ts";
import { osReason } from "../util/fsutil.ts";
import { parseJsonStrict } from "../util/json.ts";
import { parseReference, type Reference } from "../oci/reference.ts";
import { type IdentityRule, imageIdentity, type KeySource } from "./policy.ts";

/** The media type of a simple-signing payload layer. */
export const SIMPLE_SIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json";
/** The layer annotation holding the base64 signature. */
export const SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature";
/** `critical.type` of a sigstore payload. */
export const SIGNATURE_TYPE = "cosign container image signature";

/** The tag of the sigstore attachment of a manifest: `sha256-<hex>.sig`. */
export function signatureTag(manifestDigest: string): string {
  return `sha256-${digestHex(manifestDigest)}.sig`;
}

/** A signature as found in a registry: nothing in it is trusted yet. */
export interface UntrustedSignature {
  mimeType: string;
  payload: Uint8Array;
  annotations: Record<string, string>;
}

/** The fields of a payload that matter. */
export interface SigstorePayload {
  dockerReference: string;
  manifestDigest: string;
  creator?: string;
  timestamp?: number;
}

/** Why a signature was not accepted; `kind` sorts the reasons for users. */
export class SignatureRejection extends Error {
  /** The class of the reason. */
  readonly kind: "invalid" | "key" | "digest" | "identity";
  /** A rejection of `kind` with a one-line reason. */
  constructor(kind: SignatureRejection["kind"], message: string) {
    super(message);
    this.name = "SignatureRejection";
    this.kind = kind;
  }
}

const invalid = (why: string) => new SignatureRejection("invalid", `invalid signature: ${why}`);

/** A JSON object with exactly `keys` (all present, no others), like `ParanoidUnmarshal…Exact`. */
function exactObject(value: unknown, keys: string[], where: string): Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw invalid(`${where} is not a JSON object`);
  }
  const obj = value as Record<string, unknown>;
  for (const k of Object.keys(obj)) {
    if (!keys.includes(k)) throw invalid(`unexpected field ${where}.${k}`);
  }
  for (const k of keys) if (!(k in obj)) throw invalid(`field ${where}.${k} is missing`);
  return obj;
}

function string(value: unknown, where: string): string {
  if (typeof value !== "string") throw invalid(`${where} is not a string`);
  return value;
}

/** Parses a payload as strictly as containers/image; throws a {@link SignatureRejection}. */
export function parsePayload(bytes: Uint8Array): SigstorePayload {
  let json: unknown;
  try {
    json = parseJsonStrict(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (err) {
    throw invalid(`payload is not JSON: ${(err as Error).message}`);
  }
  const top = exactObject(json, ["critical", "optional"], "payload");
  const result: Partial<SigstorePayload> = {};
  // cosign writes "optional": null when there are no annotations; unknown keys are allowed.
  if (top.optional !== null) {
    if (typeof top.optional !== "object" || Array.isArray(top.optional)) {
      throw invalid("optional is not a JSON object");
    }
    const opt = top.optional as Record<string, unknown>;
    if ("creator" in opt) result.creator = string(opt.creator, "optional.creator");
    if ("timestamp" in opt) {
      if (typeof opt.timestamp !== "number") throw invalid("optional.timestamp is not a number");
      if (!Number.isInteger(opt.timestamp)) throw invalid("optional.timestamp is not an integer");
      result.timestamp = opt.timestamp;
    }
  }
  const critical = exactObject(top.critical, ["type", "image", "identity"], "critical");
  const type = string(critical.type, "critical.type");
  if (type !== SIGNATURE_TYPE) throw invalid(`unrecognized signature type ${type}`);
  const image = exactObject(critical.image, ["docker-manifest-digest"], "critical.image");
  result.manifestDigest = string(
    image["docker-manifest-digest"],
    "critical.image.docker-manifest-digest",
  );
  const identity = exactObject(critical.identity, ["docker-reference"], "critical.identity");
  result.dockerReference = string(
    identity["docker-reference"],
    "critical.identity.docker-reference",
  );
  return result as SigstorePayload;
}

/** Reads the public keys of a requirement; an unreadable key is a rejection, as upstream. */
export async function loadPublicKeys(sources: KeySource[]): Promise<KeyObject[]> {
  const keys: KeyObject[] = [];
  for (const s of sources) {
    const what = "path" in s ? `public key ${s.path}` : "public key in keyData";
    let pem: Uint8Array;
    try {
      pem = "path" in s ? await Deno.readFile(s.path) : s.pem;
    } catch (err) {
      throw new SignatureRejection("key", `cannot read ${what}: ${osReason(err)}`);
    }
    // Only what containers/image takes: a PEM `PUBLIC KEY` (or `RSA PUBLIC KEY`) block of an
    // ECDSA, RSA or Ed25519 key. node:crypto would also derive a public key from a private key
    // or a certificate, and verify with DSA keys.
    const text = new TextDecoder().decode(pem);
    let key: KeyObject | undefined;
    if (/^\s*-----BEGIN (RSA )?PUBLIC KEY-----/.test(text)) {
      try {
        key = createPublicKey({ key: text, format: "pem" });
      } catch { /* refused below */ }
    }
    if (!key || !["ec", "rsa", "ed25519"].includes(key.asymmetricKeyType ?? "")) {
      throw new SignatureRejection(
        "key",
        `${what} is not a PEM public key (ECDSA, RSA or Ed25519)`,
      );
    }
    keys.push(key);
  }
  return keys;
}

/** Whether `signature` (DER for ECDSA) over `payload` was made by `key`. */
function verifiedBy(key: KeyObject, payload: Uint8Array, signature: Uint8Array): boolean {
  try {
    // cosign signs the SHA-256 of the payload: ECDSA (DER) and RSA PKCS#1 v1.5; Ed25519 signs
    // the payload itself.
    const hash = key.asymmetricKeyType === "ed25519" ? null : "sha256";
    return verify(hash, payload, key, signature);
  } catch {
    return false;
  }
}

/** Decodes standard base64 strictly (Go's `StdEncoding`: padding required). */
function decodeBase64(text: string): Uint8Array | undefined {
  if (!/^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/.test(text)) {
    return undefined;
  }
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

/** What a signature must match. */
export interface SignatureCheck {
  /** Any of them. */
  keys: KeyObject[];
  /** The digest of the manifest pulled. */
  manifestDigest: string;
  /** The reference pulled. */
  reference: Reference;
  signedIdentity: IdentityRule;
}

/**
 * Accepts `sig` or throws a {@link SignatureRejection} saying why: not signed by one of the
 * keys, a malformed payload, another manifest digest, or an identity the rule does not accept.
 */
export function verifySignature(sig: UntrustedSignature, check: SignatureCheck): SigstorePayload {
  const b64 = sig.annotations[SIGNATURE_ANNOTATION];
  if (b64 === undefined) throw invalid(`missing ${SIGNATURE_ANNOTATION} annotation`);
  const raw = decodeBase64(b64);
  if (!raw) throw invalid(`the ${SIGNATURE_ANNOTATION} annotation is not base64`);
  if (!check.keys.some((k) => verifiedBy(k, sig.payload, raw))) {
    throw new SignatureRejection("key", "not signed by a trusted key (wrong key)");
  }
  const payload = parsePayload(sig.payload);
  if (payload.manifestDigest !== check.manifestDigest) {
    throw new SignatureRejection(
      "digest",
      `digest mismatch: signed for manifest ${payload.manifestDigest}, the image is ${check.manifestDigest}`,
    );
  }
  if (!identityMatches(check.signedIdentity, check.reference, payload.dockerReference)) {
    throw new SignatureRejection(
      "identity",
      `identity mismatch: signed for ${payload.dockerReference}, not accepted for ${
        imageIdentity(check.reference)
      } (${check.signedIdentity.type})`,
    );
  }
  return payload;
}

/** A docker reference's parts as containers/image's `reference.Named` sees them. */
interface Named {
  name: string;
  tag?: string;
  digest?: string;
}

function named(text: string): Named | undefined {
  try {
    return fromReference(parseReference(text));
  } catch {
    return undefined;
  }
}

function fromReference(r: Reference): Named {
  return { name: `${r.registry}/${r.repository}`, tag: r.tag, digest: r.digest };
}

const nameOnly = (r: Named) => r.tag === undefined && r.digest === undefined;
const asString = (r: Named) =>
  r.name + (r.tag !== undefined ? `:${r.tag}` : "") + (r.digest ? `@${r.digest}` : "");

/** `matchRepoDigestOrExact` between the image's reference and the signed one. */
function repoDigestOrExact(intended: Named, signed: Named): boolean {
  if (nameOnly(signed)) return false;
  if (intended.tag !== undefined) return asString(signed) === asString(intended);
  if (intended.digest !== undefined) return signed.name === intended.name;
  return false;
}

/**
 * Whether the identity a signature claims is acceptable for the image pulled as `ref`, under
 * `rule` (containers/image's `policy_reference_match.go`). The image's reference gets `latest`
 * when it names neither tag nor digest, as the docker transport does.
 */
export function identityMatches(rule: IdentityRule, ref: Reference, signedText: string): boolean {
  const signed = named(signedText);
  if (!signed) return false;
  let intended = fromReference(ref);
  if (nameOnly(intended)) intended = { ...intended, tag: "latest" };
  // A reference with both is fetched by digest (and containers/image refuses to pull it).
  if (intended.digest && intended.tag !== undefined) intended = { ...intended, tag: undefined };
  switch (rule.type) {
    case "matchExact":
      return !nameOnly(signed) && asString(signed) === asString(intended);
    case "matchRepoDigestOrExact":
      return repoDigestOrExact(intended, signed);
    case "matchRepository":
      return signed.name === intended.name;
    case "exactReference": {
      const want = named(rule.dockerReference);
      return !!want && !nameOnly(want) && !nameOnly(signed) && asString(signed) === asString(want);
    }
    case "exactRepository":
      return signed.name === named(rule.dockerRepository)?.name;
    case "remapIdentity": {
      const { prefix, signedPrefix } = rule;
      const n = intended.name;
      if (n === prefix || (n.startsWith(prefix) && n[prefix.length] === "/")) {
        const remapped = named(signedPrefix + asString(intended).slice(prefix.length));
        if (!remapped) return false;
        intended = remapped;
      }
      return repoDigestOrExact(intended, signed);
    }
  }
}
