/**
 * Lazy pull: reading an image's files before they have finished downloading. The lazy file
 * fetches, verifies and keeps each unit (a chunk) of a file on first read, and fills the rest in
 * the background.
 *
 * @module
 */

export * from "./source.ts";
