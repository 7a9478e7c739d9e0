/**
 * sarde's image format on top of OCI: which layers a VM image has (domain XML, VM config, files
 * cut in chunks), zstd chunks (framed, with a verified frame table) encoded and decoded on worker
 * threads, and sardinecake 0.4's gzip layout.
 *
 * @module
 */

export * from "./codec_worker.ts";
export { type DecodedGzip, decodeGzip, type EncodedGzip, encodeGzip } from "./gzip.ts";
export { type GzipEncodeOptions, type GzipPiece } from "./gzip.ts";
export { type GzipHeader, parseGzipHeader } from "./gzip_header.ts";
export { type Range, regularFileSize, type Segment, segmentsOf, zeroRanges } from "./holes.ts";
export { asSardeError, checkAborted, interrupted, Job } from "./job.ts";
export * from "./format.ts";
export * from "./frames.ts";
export * from "./zstd.ts";
