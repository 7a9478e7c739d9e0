/**
 * OCI image-spec types and media types, and strict parsing of untrusted manifest and index JSON.
 *
 * @module
 */

import { fail } from "../util/errors.ts";
import { isDigest } from "./digest.ts";

/** Media types sarde reads and writes. */
export const MediaType = {
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  ociIndex: "application/vnd.oci.image.index.v1+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  dockerManifestList: "application/vnd.docker.distribution.manifest.list.v2+json",
  dockerConfig: "application/vnd.docker.container.image.v1+json",
  libvirtDomain: "application/vnd.libvirt.domain.config+xml",
  sardineConfig: "application/vnd.sardinecake.vm.config.v1+json",
} as const;

/** Every manifest type a registry may hand back; sent as `Accept`. */
export const MANIFEST_ACCEPT = [
  MediaType.ociManifest,
  MediaType.ociIndex,
  MediaType.dockerManifest,
  MediaType.dockerManifestList,
];

/** Annotation that carries a tag on an `index.json` descriptor. */
export const REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name";

/** An OCI content descriptor. */
export interface Descriptor {
  /** The media type of the content, e.g. `application/vnd.oci.image.manifest.v1+json`. */
  mediaType: string;
  /** The content's digest, `sha256:…`. */
  digest: string;
  /** The content's size in bytes. */
  size: number;
  /** Free-form metadata (sarde's `org.sardinecake.*` file and chunk annotations). */
  annotations?: Record<string, string>;
  /** Other places to download the content from. */
  urls?: string[];
  /** The artifact type, for manifests of artifacts. */
  artifactType?: string;
  /** The platform the content runs on, for manifests in an index. */
  platform?: Record<string, unknown>;
}

/** An OCI image manifest (or a Docker v2 schema 2 manifest, which has the same shape). */
export interface Manifest {
  schemaVersion: 2;
  mediaType?: string;
  artifactType?: string;
  config: Descriptor;
  layers: Descriptor[];
  subject?: Descriptor;
  annotations?: Record<string, string>;
}

/** An OCI image index (also the shape of a layout's `index.json`). */
export interface ImageIndex {
  schemaVersion: 2;
  mediaType?: string;
  manifests: Descriptor[];
  annotations?: Record<string, string>;
}

const MAX_BLOB_SIZE = Number.MAX_SAFE_INTEGER;

/** Validates one descriptor from untrusted JSON; `where` names it in errors. */
export function checkDescriptor(value: unknown, where: string): Descriptor {
  if (typeof value !== "object" || value === null) {
    throw fail("integrity", `${where}: descriptor is not an object`);
  }
  const d = value as Record<string, unknown>;
  if (typeof d.mediaType !== "string" || d.mediaType === "") {
    throw fail("integrity", `${where}: descriptor has no mediaType`);
  }
  if (typeof d.digest !== "string" || !isDigest(d.digest)) {
    throw fail("integrity", `${where}: descriptor has an invalid digest '${String(d.digest)}'`);
  }
  if (
    typeof d.size !== "number" || !Number.isInteger(d.size) || d.size < 0 || d.size > MAX_BLOB_SIZE
  ) {
    throw fail("integrity", `${where}: descriptor has an invalid size '${String(d.size)}'`);
  }
  if (d.annotations !== undefined) {
    if (typeof d.annotations !== "object" || d.annotations === null) {
      throw fail("integrity", `${where}: annotations must be an object`);
    }
    for (const v of Object.values(d.annotations)) {
      if (typeof v !== "string") {
        throw fail("integrity", `${where}: annotation values must be strings`);
      }
    }
  }
  return d as unknown as Descriptor;
}

/** Parses `bytes` as a JSON object, or throws an `integrity` error naming `what`. */
export function parseJsonObject(bytes: Uint8Array, what: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (err) {
    throw fail("integrity", `${what} is not valid JSON (${(err as Error).message})`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw fail("integrity", `${what} is not a JSON object`);
  }
  return value as Record<string, unknown>;
}

/** Parses and validates manifest bytes (OCI or Docker schema 2). */
export function parseManifest(bytes: Uint8Array, what = "manifest"): Manifest {
  const m = parseJsonObject(bytes, what);
  if (m.schemaVersion !== 2) throw fail("integrity", `${what}: schemaVersion must be 2`);
  if (m.manifests !== undefined) {
    throw fail("integrity", `${what} is an image index, not an image manifest`);
  }
  checkDescriptor(m.config, `${what} config`);
  if (!Array.isArray(m.layers)) throw fail("integrity", `${what}: layers must be an array`);
  m.layers.forEach((l, i) => checkDescriptor(l, `${what} layer ${i}`));
  return m as unknown as Manifest;
}

/** Parses and validates an image index (or a layout's `index.json`). */
export function parseIndex(bytes: Uint8Array, what = "index"): ImageIndex {
  const m = parseJsonObject(bytes, what);
  if (m.schemaVersion !== 2) throw fail("integrity", `${what}: schemaVersion must be 2`);
  if (!Array.isArray(m.manifests)) throw fail("integrity", `${what}: manifests must be an array`);
  m.manifests.forEach((d, i) => checkDescriptor(d, `${what} entry ${i}`));
  return m as unknown as ImageIndex;
}

/** Whether a media type names an index / manifest list rather than a single manifest. */
export function isIndexMediaType(mediaType: string | undefined): boolean {
  return mediaType === MediaType.ociIndex || mediaType === MediaType.dockerManifestList;
}

/** Whether a media type is one of the manifest types sarde understands. */
export function isManifestMediaType(mediaType: string | undefined): boolean {
  return mediaType !== undefined && (MANIFEST_ACCEPT as string[]).includes(mediaType);
}

/** All blobs a manifest refers to: config first, then layers in order. */
export function manifestBlobs(manifest: Manifest): Descriptor[] {
  return [manifest.config, ...manifest.layers];
}
