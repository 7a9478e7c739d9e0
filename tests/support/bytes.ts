/**
 * Comparing large byte arrays in tests: `assert.deepEqual` renders a diff of both arrays when
 * they differ, which for MiBs of bytes takes minutes and gigabytes; this names the first
 * difference instead.
 *
 * @module
 */

import assert from "node:assert/strict";

/** Asserts that `actual` holds exactly the bytes of `expected`. */
export function assertSameBytes(actual: Uint8Array, expected: Uint8Array, what = "bytes"): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  const i = actual.findIndex((b, k) => b !== expected[k]);
  if (i >= 0) assert.fail(`${what}: byte ${i} is ${actual[i]}, expected ${expected[i]}`);
}
