/** releaseBytes and spansBuffer (lib/util/memory.ts): frees whole arrays at once, leaves shared memory alone. */
import assert from "node:assert/strict";
import { releaseBytes, spansBuffer } from "../lib/util/memory.ts";

Deno.test("releaseBytes frees an array spanning its buffer, and only such an array", () => {
  const whole = new Uint8Array(1 << 20).fill(7);
  const alias = new Uint8Array(whole.buffer, 4096, 10);
  releaseBytes(whole);
  assert.equal(whole.byteLength, 0);
  assert.equal(alias.byteLength, 0, "every view of the buffer is gone with it");
  releaseBytes(whole); // already freed: nothing to do

  const big = new Uint8Array(1 << 20).fill(7);
  const part = big.subarray(0, 4096);
  assert.ok(spansBuffer(big) && !spansBuffer(part));
  releaseBytes(part);
  assert.equal(part.byteLength, 4096);
  assert.equal(big[(1 << 20) - 1], 7, "a part of a larger buffer is not freed");
  releaseBytes(big.subarray(1));
  assert.equal(big.byteLength, 1 << 20);

  const shared = new Uint8Array(new SharedArrayBuffer(4096)).fill(1);
  releaseBytes(shared);
  assert.equal(shared.byteLength, 4096, "shared memory is never freed");
});
