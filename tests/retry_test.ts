import assert from "node:assert/strict";
import { SardeError } from "../lib/util/errors.ts";
import { defaultRetryPolicy, gaveUp, startRetries } from "../lib/util/retry.ts";

Deno.test("retry policy: defaults, overridden field by field (undefined keeps the default)", () => {
  const p = defaultRetryPolicy({ maxElapsedMs: 5000, attempts: undefined });
  assert.equal(p.maxElapsedMs, 5000);
  assert.equal(p.attempts, 5);
  assert.equal(defaultRetryPolicy().maxElapsedMs, 120_000);
});

Deno.test("retries: at most `attempts`, the suggested delay (Retry-After) wins over the backoff", () => {
  const r = startRetries({ attempts: 3, baseDelayMs: 10, maxDelayMs: 100, maxElapsedMs: 60_000 });
  assert.equal(r.attempt, 1);
  assert.equal(r.next(7), 7);
  const backoff = r.next()!;
  assert.ok(backoff >= 16 && backoff <= 24, `20 ms ± 20 %, got ${backoff}`);
  assert.equal(r.attempt, 3);
  assert.equal(r.next(), undefined, "no fourth attempt");
});

Deno.test("retries: no attempt starts after maxElapsedMs; the final error says how long it tried", () => {
  const policy = { attempts: 100, baseDelayMs: 10, maxDelayMs: 100, maxElapsedMs: 1000 };
  const r = startRetries(policy);
  assert.equal(r.next(2000), undefined, "a delay past the limit starts nothing");
  const err = r.exhausted(new SardeError("network", "connection to x failed", { hint: "h" }));
  assert.ok(err instanceof SardeError);
  assert.equal(err.kind, "network");
  assert.equal(err.hint, "h");
  assert.match(err.message, /^connection to x failed \(gave up after 1 attempt in \d+\.\d s\)$/);
  assert.ok(gaveUp(err), "marked, so an outer loop does not start counting again");
  assert.equal(gaveUp(new SardeError("network", "x")), false);
});
