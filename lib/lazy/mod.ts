/**
 * Lazy pull: serving an image's disks to QEMU before they have finished downloading
 * (docs/lazy-pull.md). The lazy file fetches, verifies and keeps each unit (a frame or a chunk) of
 * a file on first read and fills the rest in the background; a read-only NBD server on a UNIX
 * socket serves such files as named exports, each a {@link BlockSource} that knows nothing about
 * NBD; and the domain XML points a disk at it.
 *
 * @module
 */

export * from "./domain_xml.ts";
export * from "./file_source.ts";
export * from "./nbd.ts";
export * from "./source.ts";
export * from "./units.ts";
export * from "./qcow2_metadata.ts";
