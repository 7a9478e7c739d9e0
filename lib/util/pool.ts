/**
 * Bounded parallelism for blob transfers.
 *
 * @module
 */

/**
 * Runs `fn` over `items` with at most `limit` in flight. After the first failure no new item
 * starts; the in-flight ones finish (so their temp files are cleaned) and the first error is thrown.
 */
export async function forEachConcurrent<T>(
  items: readonly T[],
  limit: number,
  fn: (item: T, index: number) => Promise<void>,
): Promise<void> {
  let next = 0;
  let failure: { error: unknown } | undefined;
  const worker = async () => {
    while (!failure && next < items.length) {
      const i = next++;
      try {
        await fn(items[i], i);
      } catch (error) {
        failure ??= { error };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  if (failure) throw failure.error;
}
