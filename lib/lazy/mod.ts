/**
 * Lazy pull: serving an image's disks to QEMU before they have finished downloading. For now the
 * transport: a read-only NBD server on a UNIX socket with named exports, each backed by a
 * {@link BlockSource} that knows nothing about NBD, and the domain XML that points a disk at it.
 *
 * @module
 */

export * from "./domain_xml.ts";
export * from "./file_source.ts";
export * from "./nbd.ts";
