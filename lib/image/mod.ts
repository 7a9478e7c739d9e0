/**
 * sarde's image format on top of OCI: which layers a VM image has (domain XML, VM config, files
 * cut in chunks), zstd chunks encoded and decoded on worker threads, and sardinecake 0.4's gzip
 * layout.
 *
 * @module
 */

export * from "./codec_worker.ts";
export * from "./compress.ts";
export * from "./format.ts";
export * from "./zstd.ts";
