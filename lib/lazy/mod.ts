/**
 * Lazy pull: serving an image's disks to QEMU before they have finished downloading. For now the
 * transport: a read-only NBD server on a UNIX socket with named exports, each backed by a
 * {@link BlockSource} that knows nothing about NBD.
 *
 * @module
 */

export * from "./file_source.ts";
export * from "./nbd.ts";
