/**
 * Bounded retries with exponential backoff, for connection errors, 5xx and 429: at most
 * `attempts` tries, and none started once `maxElapsedMs` have passed since the first.
 *
 * @module
 */

import { DEFAULT_RETRY_TIMEOUT_MS } from "./defaults.ts";
import { SardeError } from "./errors.ts";

/** How often and how patiently to retry. */
export interface RetryPolicy {
  /** Total attempts including the first (default 5). */
  attempts: number;
  /** Delay before the first retry in ms (default 500); doubles each time. */
  baseDelayMs: number;
  /** Upper bound for one delay, also for `Retry-After` (default 30 s). */
  maxDelayMs: number;
  /**
   * No new attempt starts this long (ms) after the first one (default 2 min): a registry that
   * keeps failing or never answers ends in an error instead of hours of waiting.
   */
  maxElapsedMs: number;
}

/**
 * The defaults, overridden by `overrides`; `SARDE_RETRY_BASE_MS` shortens the delays (tests).
 */
export function defaultRetryPolicy(overrides: Partial<RetryPolicy> = {}): RetryPolicy {
  const base = Number(Deno.env.get("SARDE_RETRY_BASE_MS") ?? "");
  const defined = Object.fromEntries(
    Object.entries(overrides).filter(([, v]) => v !== undefined),
  ) as Partial<RetryPolicy>;
  return {
    attempts: 5,
    baseDelayMs: Number.isFinite(base) && base > 0 ? base : 500,
    maxDelayMs: 30_000,
    maxElapsedMs: DEFAULT_RETRY_TIMEOUT_MS,
    ...defined,
  };
}

/** The retries of one operation: how many attempts were made, and since when. */
export interface RetryBudget {
  /** Attempts made so far (1 during the first). */
  readonly attempt: number;
  /**
   * The delay before the next attempt (`suggestedMs`, e.g. from `Retry-After`, or the backoff),
   * counting that attempt; `undefined` when the policy allows no more.
   */
  next(suggestedMs?: number): number | undefined;
  /**
   * `err` (a retryable failure {@link RetryBudget.next} refused to retry) with how long it was
   * tried added to its message, so that the final error says why sarde stopped.
   */
  exhausted(err: unknown): unknown;
}

/** Errors made by {@link RetryBudget.exhausted}: retrying them again would restart the count. */
const given = new WeakSet<SardeError>();

/** Whether `err` is a failure that was retried as long as the policy allows. */
export function gaveUp(err: unknown): boolean {
  return err instanceof SardeError && given.has(err);
}

/** Starts counting the attempts of one operation now (the first attempt is under way). */
export function startRetries(policy: RetryPolicy): RetryBudget {
  const start = Date.now();
  let attempt = 1;
  return {
    get attempt() {
      return attempt;
    },
    next(suggestedMs) {
      if (attempt >= policy.attempts) return undefined;
      const ms = suggestedMs ?? backoffDelay(policy, attempt);
      if (Date.now() + ms - start > policy.maxElapsedMs) return undefined;
      attempt++;
      return ms;
    },
    exhausted(err) {
      if (!(err instanceof SardeError)) return err;
      const seconds = ((Date.now() - start) / 1000).toFixed(1);
      const attempts = attempt === 1 ? "1 attempt" : `${attempt} attempts`;
      const final = new SardeError(
        err.kind,
        `${err.message} (gave up after ${attempts} in ${seconds} s)`,
        { hint: err.hint, cause: err },
      );
      given.add(final);
      return final;
    },
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
