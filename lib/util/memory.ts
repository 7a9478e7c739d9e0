/**
 * Giving an array's memory back at once. V8 frees an ArrayBuffer's memory only when a garbage
 * collection finds it dead; buffers of a few MiB that live across an await are promoted to the
 * old generation, which V8 collects only after tens of MB of them have piled up, per isolate
 * (measured: a codec worker inflating 2 MiB frames grew the process by ~1.3 MB per frame). Code
 * that owns such a buffer and is done with it releases it here, or moves it to the thread that
 * is next to use it rather than copying it.
 *
 * @module
 */

/** Whether `bytes` spans all of an ArrayBuffer it can give away (not shared memory). */
export function spansBuffer(bytes: Uint8Array): boolean {
  const buf = bytes.buffer;
  return buf instanceof ArrayBuffer && !buf.detached && bytes.byteOffset === 0 &&
    bytes.byteLength === buf.byteLength;
}

/**
 * Frees the memory of `bytes` now if it {@link spansBuffer} (detaching it: every view of that
 * buffer then reads as empty); a view of part of a larger buffer is left alone. Only for arrays
 * nobody else holds.
 */
export function releaseBytes(bytes: Uint8Array): void {
  if (spansBuffer(bytes)) (bytes.buffer as ArrayBuffer).transfer(0);
}
