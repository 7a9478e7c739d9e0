/**
 * Signing a pushed image the way cosign and containers/image (`skopeo copy
 * --sign-by-sigstore-private-key`) do, so that their verifiers accept sarde's signatures:
 *
 * - the payload is a simple-signing JSON document naming the manifest digest and the reference
 *   the image was pushed to (`critical.identity.docker-reference`), which the verifier's policy
 *   matches against the reference it pulls;
 * - the signature is ECDSA P-256 over SHA-256 of the payload bytes, DER, base64;
 * - both go into the sigstore attachment: an OCI image manifest tagged `sha256-<hex>.sig` in the
 *   image's repository, one layer per signature whose blob is the payload and whose annotation
 *   `dev.cosignproject.cosign/signature` is the signature. A new signature is appended to the
 *   layers already there, as containers/image does, and an identical one is not added twice.
 *
 * @module
 */

import { type KeyObject, sign } from "node:crypto";
import { Buffer } from "node:buffer";
import { fail } from "../util/errors.ts";
import { debug, info } from "../util/log.ts";
import { VERSION } from "../util/version.ts";
import { digestOf } from "../oci/digest.ts";
import {
  type Descriptor,
  type Manifest,
  MediaType,
  parseJsonObject,
  parseManifest,
} from "../oci/types.ts";
import type { RegistryClient } from "../registry/client.ts";
import type { Reference } from "../oci/reference.ts";
import { imageIdentity } from "./policy.ts";
import {
  SIGNATURE_ANNOTATION,
  SIGNATURE_TYPE,
  signatureTag,
  SIMPLE_SIGNING_MEDIA_TYPE,
} from "./signature.ts";
import type { PushOptions } from "../transfer/transfer.ts";

/** A signature ready to attach. */
export interface Signature {
  /** The simple-signing payload: the exact bytes that were signed and that go into the blob. */
  payload: Uint8Array;
  /** Base64 of the DER ECDSA signature of `payload`. */
  signature: string;
}

/** What {@link signManifest} signs. */
export interface SignRequest {
  /** The decrypted private key (see `readSigstorePrivateKey`). */
  privateKey: KeyObject;
  /**
   * The signed identity: the reference pushed to, `host/repository:tag` (or `@digest`), in the
   * full form docker normalises to (`docker.io/library/…`).
   */
  reference: string;
  /** The digest of the manifest as pushed. */
  manifestDigest: string;
  /** `optional.timestamp` in seconds (default: now). */
  timestamp?: number;
}

/**
 * The simple-signing payload for `request` and its signature. The payload's keys are in the
 * order Go's encoding/json writes a map (sorted), as containers/image writes them; `optional`
 * carries the creator and a timestamp, which verifiers read but do not require.
 */
export function signManifest(request: SignRequest): Signature {
  const doc = {
    critical: {
      identity: { "docker-reference": request.reference },
      image: { "docker-manifest-digest": request.manifestDigest },
      type: SIGNATURE_TYPE,
    },
    optional: {
      creator: `sarde ${VERSION}`,
      timestamp: request.timestamp ?? Math.floor(Date.now() / 1000),
    },
  };
  const payload = new TextEncoder().encode(JSON.stringify(doc));
  const der = sign("sha256", payload, request.privateKey);
  return { payload, signature: Buffer.from(der).toString("base64") };
}

/** What {@link attachSignature} did. */
export interface AttachResult {
  /** The attachment's tag. */
  tag: string;
  /** The attachment manifest's digest. */
  digest: string;
  /** Signatures in it now. */
  signatures: number;
  /** False when an identical signature was there already (nothing was written). */
  added: boolean;
}

/**
 * Adds `signature` to the sigstore attachment of `manifestDigest` in `repository`: uploads the
 * payload blob and the attachment's config, then puts the attachment manifest (existing layers
 * first). The image's own manifest must be in the registry already.
 */
export async function attachSignature(
  client: RegistryClient,
  repository: string,
  manifestDigest: string,
  signature: Signature,
): Promise<AttachResult> {
  const tag = signatureTag(manifestDigest);
  const existing = await readAttachment(client, repository, tag);
  const layer: Descriptor = {
    mediaType: SIMPLE_SIGNING_MEDIA_TYPE,
    digest: digestOf(signature.payload),
    size: signature.payload.length,
    annotations: { [SIGNATURE_ANNOTATION]: signature.signature },
  };
  const layers = existing?.manifest.layers ?? [];
  if (layers.some((l) => sameSignatureLayer(l, layer))) {
    debug(`${repository}:${tag} already holds this signature`);
    return { tag, digest: existing!.digest, signatures: layers.length, added: false };
  }
  await uploadBytes(client, repository, layer, signature.payload);

  // The config lists one diff_id per layer (the payload digest, as it is not compressed), as
  // containers/image keeps it; fields another writer put there stay.
  const config = existing?.config ?? { architecture: "", os: "", config: {} };
  const rootfs = (config.rootfs ?? {}) as { type?: string; diff_ids?: unknown };
  const diffIds = Array.isArray(rootfs.diff_ids) ? rootfs.diff_ids : [];
  config.rootfs = { ...rootfs, type: "layers", diff_ids: [...diffIds, layer.digest] };
  const configBytes = new TextEncoder().encode(JSON.stringify(config));
  const configDesc: Descriptor = {
    mediaType: MediaType.ociConfig,
    digest: digestOf(configBytes),
    size: configBytes.length,
  };
  await uploadBytes(client, repository, configDesc, configBytes);

  const manifest: Manifest = {
    ...existing?.manifest,
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config: configDesc,
    layers: [...layers, layer],
  };
  const bytes = new TextEncoder().encode(JSON.stringify(manifest));
  const digest = await client.putManifest(repository, tag, bytes, MediaType.ociManifest);
  return { tag, digest, signatures: layers.length + 1, added: true };
}

interface Attachment {
  manifest: Manifest;
  digest: string;
  config: Record<string, unknown>;
}

/** The attachment under `tag`, or `undefined` when there is none yet. */
async function readAttachment(
  client: RegistryClient,
  repository: string,
  tag: string,
): Promise<Attachment | undefined> {
  if (!await client.headManifest(repository, tag)) return undefined;
  const fetched = await client.getManifest(repository, tag);
  const what = `signature attachment ${repository}:${tag}`;
  if (fetched.mediaType && fetched.mediaType !== MediaType.ociManifest) {
    // Appending to it would need a conversion nobody else does: refuse rather than overwrite.
    throw fail("registry", `${what} is a ${fetched.mediaType}, not an OCI image manifest`);
  }
  const manifest = parseManifest(fetched.bytes, what);
  const configBytes = await client.readBlob(repository, manifest.config);
  return {
    manifest,
    digest: fetched.digest,
    config: parseJsonObject(configBytes, `${what} config`),
  };
}

/** Same media type, blob and annotations: the same signature (containers/image's test). */
function sameSignatureLayer(a: Descriptor, b: Descriptor): boolean {
  if (a.mediaType !== b.mediaType || a.digest !== b.digest || a.size !== b.size) return false;
  const x = a.annotations ?? {};
  const y = b.annotations ?? {};
  return Object.keys(x).length === Object.keys(y).length &&
    Object.entries(x).every(([k, v]) => y[k] === v);
}

/** Uploads a small in-memory blob unless the repository has it. */
async function uploadBytes(
  client: RegistryClient,
  repository: string,
  descriptor: Descriptor,
  bytes: Uint8Array,
): Promise<void> {
  if (await client.hasBlob(repository, descriptor)) return;
  await client.uploadBlob(repository, descriptor, async function* (offset, length) {
    yield bytes.subarray(offset, offset + length);
  });
}

/**
 * The signed identity of a push to `target`: the reference pushed to, by its tag (`latest`
 * without one), by its digest only when it has no tag, as skopeo signs its destination.
 */
export function signedIdentity(target: Reference): string {
  return imageIdentity(target.tag ? { ...target, digest: undefined } : target);
}

/**
 * A {@link PushOptions.afterManifest} that signs each pushed manifest with `privateKey` and
 * attaches the signature, naming the push target as the signed identity.
 */
export function pushSigner(privateKey: KeyObject): NonNullable<PushOptions["afterManifest"]> {
  return async (client, target, manifestDigest) => {
    const reference = signedIdentity(target);
    const signature = signManifest({ privateKey, reference, manifestDigest });
    const r = await attachSignature(client, target.repository, manifestDigest, signature);
    info(`signed ${reference} (${r.signatures} signature(s) in ${r.tag})`);
  };
}
