/**
 * Whether the trust policy accepts an image, checked before anything of it is stored: the
 * policy's requirements for the image's scope, all of which must accept it, and for
 * `sigstoreSigned` the signatures stored as sigstore attachments (`sha256-<hex>.sig` in the same
 * repository: an OCI manifest with one simple-signing layer per signature) when registries.d
 * enables them. One accepted signature is enough, as in containers/image.
 *
 * @module
 */

import { fail } from "../util/errors.ts";
import { debug, info, warn } from "../util/log.ts";
import { digestOf } from "../oci/digest.ts";
import { formatReference, type Reference } from "../oci/reference.ts";
import { parseManifest } from "../oci/types.ts";
import type { ManifestToVerify } from "../transfer/transfer.ts";
import { loadPolicy, type Policy, type Requirement, requirementsFor } from "./policy.ts";
import { loadRegistriesD, type RegistriesD, useSigstoreAttachments } from "./registries_d.ts";
import {
  loadPublicKeys,
  SignatureRejection,
  signatureTag,
  SIMPLE_SIGNING_MEDIA_TYPE,
  type UntrustedSignature,
  verifySignature,
} from "./signature.ts";

/** Largest signature payload read, as containers/image (`iolimits.MaxSignatureBodySize`). */
const MAX_SIGNATURE_SIZE = 4 << 20;

/**
 * Signatures read at most, and their bytes in all: a registry (any a job names) could otherwise
 * list thousands of 4 MiB layers in the `.sig` manifest and make a runner download and hold them
 * (150 such layers took 680 MB of memory). A real image has a handful of signatures of < 1 KiB.
 */
const MAX_SIGNATURES = 64;
const MAX_SIGNATURE_BYTES = 16 << 20;

/** Reasons listed in a refusal at most (one line, however many signatures were tried). */
const MAX_REASONS = 3;

/** The trust settings of a pull (skopeo's flag names). */
export interface TrustOptions {
  /** containers-policy.json(5) file (`--policy`; default `/etc/containers/policy.json`). */
  policy?: string;
  /** containers-registries.d(5) folder (`--registries.d`; default `/etc/containers/registries.d`). */
  registriesD?: string;
}

/** What {@link verifyImage} checks. */
export interface VerifyImageOptions {
  policy: Policy;
  registriesD: RegistriesD;
  /** The reference pulled. */
  reference: Reference;
  /** The digest of its manifest. */
  manifestDigest: string;
  /** Reads the image's sigstore attachments (called only when a requirement needs them). */
  fetchSignatures: () => Promise<UntrustedSignature[]>;
}

/**
 * Accepts the image or throws a `trust` `SardeError` with a one-line reason: rejected by the
 * policy, no signature, or why each signature was refused (wrong key, identity mismatch, digest
 * mismatch).
 */
export async function verifyImage(options: VerifyImageOptions): Promise<void> {
  const { policy, reference } = options;
  const { scope, requirements } = requirementsFor(policy, reference);
  const name = formatReference(reference);
  const refuse = (why: string): never => {
    throw fail(
      "trust",
      `${name} refused by trust policy ${policy.file} (${scope}): ${why}`,
      "check the image's signature, or the policy (containers-policy.json(5))",
    );
  };
  // A signature for any tag would pass for `repo:prod@digest` (the digest decides), and the image
  // would then be stored as `:prod`: containers/image refuses such references outright.
  if (reference.tag && reference.digest && requirements.some((r) => r.type === "sigstoreSigned")) {
    refuse("a reference with both a tag and a digest cannot be checked; name the image by one");
  }
  let signatures: UntrustedSignature[] | undefined;
  for (const req of requirements) {
    if (req.type === "insecureAcceptAnything") continue;
    if (req.type === "reject") refuse("rejected by policy");
    if (req.type === "signedBaseLayer") {
      refuse("signedBaseLayer is not implemented (containers/image refuses it too)");
    }
    if (req.type === "signedBy") refuse("GPG signatures (signedBy) are not supported by sarde");
    if (req.type !== "sigstoreSigned") continue;
    if (req.unsupported) refuse(req.unsupported);
    if (!useSigstoreAttachments(options.registriesD, reference)) {
      refuse(
        `no signature: sigstore attachments are not enabled for it in ${
          options.registriesD.dir || "registries.d"
        } (use-sigstore-attachments: true)`,
      );
    }
    signatures ??= await options.fetchSignatures();
    await checkSigstore(req, signatures, options, refuse);
  }
  if (policy.file) debug(`${name}: accepted by trust policy ${policy.file} (${scope})`);
}

async function checkSigstore(
  req: Extract<Requirement, { type: "sigstoreSigned" }>,
  signatures: UntrustedSignature[],
  options: VerifyImageOptions,
  refuse: (why: string) => never,
): Promise<void> {
  const candidates = signatures.filter((s) => s.mimeType === SIMPLE_SIGNING_MEDIA_TYPE);
  if (candidates.length === 0) {
    const others = signatures.length ? ` (${signatures.length} other attachments)` : "";
    refuse(`no signature${others}`);
  }
  let keys;
  try {
    keys = await loadPublicKeys(req.keys);
  } catch (err) {
    if (err instanceof SignatureRejection) refuse(err.message);
    throw err;
  }
  const reasons: string[] = [];
  for (const sig of candidates) {
    try {
      verifySignature(sig, {
        keys,
        manifestDigest: options.manifestDigest,
        reference: options.reference,
        signedIdentity: req.signedIdentity,
      });
      info(`${formatReference(options.reference)}: signature verified`);
      return;
    } catch (err) {
      if (!(err instanceof SignatureRejection)) throw err;
      reasons.push(err.message);
    }
  }
  const listed = reasons.slice(0, MAX_REASONS).join("; ") +
    (reasons.length > MAX_REASONS ? `; and ${reasons.length - MAX_REASONS} more` : "");
  refuse(
    reasons.length === 1
      ? reasons[0]
      : `none of ${reasons.length} signatures was accepted: ${listed}`,
  );
}

/**
 * Reads the sigstore signatures of `image` from its registry: the layers of the manifest tagged
 * {@link signatureTag}, each verified against its digest; no such tag, no signatures.
 */
export async function fetchSignatures(image: ManifestToVerify): Promise<UntrustedSignature[]> {
  const tag = signatureTag(image.digest);
  const fetched = await image.getManifest(tag);
  if (!fetched) return [];
  const manifest = parseManifest(fetched.bytes, `signature manifest ${tag}`);
  const signatures: UntrustedSignature[] = [];
  // One payload can carry several signatures (same identity, other keys): read each blob once.
  const payloads = new Map<string, Uint8Array>();
  let bytes = 0;
  let read = 0;
  for (const layer of manifest.layers) {
    // Other attachments could not be accepted anyway: they are counted, not downloaded.
    if (layer.mediaType !== SIMPLE_SIGNING_MEDIA_TYPE) {
      signatures.push({ mimeType: layer.mediaType, payload: new Uint8Array(), annotations: {} });
      continue;
    }
    if (++read > MAX_SIGNATURES) {
      warn(`${tag}: more than ${MAX_SIGNATURES} signatures; the rest are not read`);
      break;
    }
    let payload = payloads.get(layer.digest);
    if (!payload) {
      if (layer.size > MAX_SIGNATURE_SIZE || (bytes += layer.size) > MAX_SIGNATURE_BYTES) {
        throw fail(
          "trust",
          `signature ${layer.digest} of ${tag} is too large (${layer.size} bytes)`,
        );
      }
      payload = await image.readBlob(layer);
      if (digestOf(payload) !== layer.digest) {
        throw fail("integrity", `signature ${layer.digest} of ${tag}: content has another digest`);
      }
      payloads.set(layer.digest, payload);
    }
    signatures.push({
      mimeType: layer.mediaType,
      payload,
      annotations: layer.annotations ?? {},
    });
  }
  return signatures;
}

/**
 * A `verify` hook for `fetchImage` under the trust settings: the policy and registries.d are
 * read at the first fetch, and an accept-anything policy costs no request.
 */
export function trustVerifier(options: TrustOptions): (image: ManifestToVerify) => Promise<void> {
  let loaded: Promise<[Policy, RegistriesD]> | undefined;
  return async (image) => {
    loaded ??= Promise.all([
      loadPolicy({ file: options.policy }),
      loadRegistriesD(options.registriesD),
    ]);
    const [policy, registriesD] = await loaded;
    await verifyImage({
      policy,
      registriesD,
      reference: image.reference,
      manifestDigest: image.digest,
      fetchSignatures: () => fetchSignatures(image),
    });
  };
}
