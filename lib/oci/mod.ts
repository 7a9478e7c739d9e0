/**
 * OCI concepts on the local disk: image references, sha256 digests, manifest and index types, the
 * OCI image layout (blobs, index.json, locks) and the store of layouts (`ocidir`), with the list
 * of local images.
 *
 * @module
 */

export * from "./digest.ts";
export * from "./images.ts";
export * from "./layout.ts";
export * from "./reference.ts";
export * from "./store.ts";
export * from "./types.ts";
