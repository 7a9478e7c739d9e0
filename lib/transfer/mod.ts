/**
 * Moving images between a registry and the local store: fetch (verified, resumable, parallel,
 * through the mirrors of registries.conf) and push (skips, mounts, chunked uploads).
 *
 * @module
 */

export * from "./transfer.ts";
