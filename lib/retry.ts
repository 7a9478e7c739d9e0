/**
 * Bounded retries with exponential backoff, for connection errors, 5xx and 429.
 *
 * @module
 */

/** How often and how patiently to retry. */
export interface RetryPolicy {
  /** Total attempts including the first (default 5). */
  attempts: number;
  /** Delay before the first retry in ms (default 500); doubles each time. */
  baseDelayMs: number;
  /** Upper bound for one delay, also for `Retry-After` (default 30 s). */
  maxDelayMs: number;
}

/** Defaults; `SARDE_RETRY_BASE_MS` shortens the delays (tests). */
export function defaultRetryPolicy(): RetryPolicy {
  const base = Number(Deno.env.get("SARDE_RETRY_BASE_MS") ?? "");
  return {
    attempts: 5,
    baseDelayMs: Number.isFinite(base) && base > 0 ? base : 500,
    maxDelayMs: 30_000,
  };
}

/** The delay before retry number `retry` (1-based), with ±20 % jitter. */
export function backoffDelay(policy: RetryPolicy, retry: number): number {
  const raw = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (retry - 1));
  return Math.round(raw * (0.8 + Math.random() * 0.4));
}

/** Parses `Retry-After` (seconds or an HTTP date) into ms, capped by the policy. */
export function retryAfterDelay(policy: RetryPolicy, header: string | null): number | undefined {
  if (!header) return undefined;
  const seconds = Number(header);
  let ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(header) - Date.now();
  if (!Number.isFinite(ms)) return undefined;
  ms = Math.max(0, ms);
  return Math.min(ms, policy.maxDelayMs);
}

/** Whether an HTTP status is worth another try. */
export function isRetryableStatus(status: number): boolean {
  return status === 429 || status === 408 || (status >= 500 && status !== 501 && status !== 505);
}

/** Sleeps, waking early (with an error) if the signal aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
