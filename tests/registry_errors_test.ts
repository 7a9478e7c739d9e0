import assert from "node:assert/strict";
import { SardeError } from "../lib/util/errors.ts";
import { startRetries } from "../lib/util/retry.ts";
import {
  notARegistry,
  parseErrorBody,
  RegistryError,
  registryErrorOf,
  responseError,
  restartsUpload,
} from "../lib/registry/errors.ts";
import { fakeResponse } from "./support/fake_http.ts";

const registryError = (status: number, body = "") =>
  responseError(fakeResponse(status, body), "blob sha256:0123456789ab", "r.example", false);

Deno.test("parseErrorBody: a distribution error body gives its codes, messages and details", () => {
  const body = JSON.stringify({
    errors: [
      { code: "BLOB_UNKNOWN", message: "blob unknown to registry", detail: { digest: "x" } },
      { code: "DENIED" },
    ],
  });
  assert.deepEqual(parseErrorBody(body), [
    { code: "BLOB_UNKNOWN", message: "blob unknown to registry", detail: { digest: "x" } },
    { code: "DENIED" },
  ]);
});

Deno.test("parseErrorBody: HTML, an empty body, JSON without errors or with odd entries", () => {
  assert.deepEqual(parseErrorBody("<html><body>502 Bad Gateway</body></html>"), []);
  assert.deepEqual(parseErrorBody(""), []);
  assert.deepEqual(parseErrorBody("null"), []);
  assert.deepEqual(parseErrorBody('{"message":"nope"}'), []);
  assert.deepEqual(parseErrorBody('{"errors":[null,{"message":"no code"}]}'), [
    { code: "", message: "no code" },
  ]);
});

Deno.test("responseError: status and codes as fields, the message as before", async () => {
  const err = await registryError(
    404,
    '{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}',
  );
  assert.ok(err instanceof RegistryError && err instanceof SardeError);
  assert.equal(err.kind, "not-found");
  assert.equal(err.exitCode, 3);
  assert.equal(err.status, 404);
  assert.deepEqual(err.codes, ["BLOB_UNKNOWN"]);
  assert.equal(err.retryable, false);
  assert.equal(
    err.message,
    "blob sha256:0123456789ab: not found on r.example (BLOB_UNKNOWN: blob unknown to registry)",
  );
});

Deno.test("responseError: an HTML or empty body gives no codes and no detail", async () => {
  const html = await registryError(503, "<html>Service Unavailable</html>");
  assert.equal(html.kind, "registry");
  assert.equal(html.message, "blob sha256:0123456789ab: r.example answered HTTP 503");
  assert.deepEqual(html.codes, []);
  assert.equal(html.retryable, true);
  const empty = await registryError(500);
  assert.equal(empty.message, "blob sha256:0123456789ab: r.example answered HTTP 500");
  assert.equal(empty.status, 500);
});

Deno.test("responseError: 401/403 are auth errors with a login hint, 413 hints --chunk-size", async () => {
  const denied = await registryError(403, '{"errors":[{"code":"DENIED"}]}');
  assert.equal(denied.kind, "auth");
  assert.equal(denied.message, "blob sha256:0123456789ab: access denied by r.example (DENIED)");
  assert.equal(denied.hint, "log in first: sarde login r.example");
  const withCredentials = await responseError(fakeResponse(401), "x", "r.example", true);
  assert.match(withCredentials.hint!, /stored credentials lack permission/);
  const big = await registryError(413);
  assert.equal(big.kind, "registry");
  assert.match(big.hint!, /--chunk-size/);
});

Deno.test("RegistryError.retryable: 408, 429 and 5xx but 501 and 505", async () => {
  for (const status of [408, 429, 500, 502, 503, 504]) {
    assert.equal((await registryError(status)).retryable, true, `${status}`);
  }
  for (const status of [400, 401, 403, 404, 413, 501, 505]) {
    assert.equal((await registryError(status)).retryable, false, `${status}`);
  }
});

Deno.test("registryErrorOf: finds the registry's answer behind a retry's 'gave up' error", async () => {
  const cause = await registryError(503);
  const final = startRetries({ attempts: 1, baseDelayMs: 1, maxDelayMs: 1, maxElapsedMs: 1 })
    .exhausted(cause) as SardeError;
  assert.notEqual(final, cause);
  assert.match(final.message, /answered HTTP 503 \(gave up after 1 attempt in/);
  assert.equal(registryErrorOf(final), cause);
  assert.equal(registryErrorOf(new SardeError("registry", "answered HTTP 503")), undefined);
  assert.equal(registryErrorOf("HTTP 503"), undefined);
});

Deno.test("notARegistry: carries the status only when the status gave it away", () => {
  const byStatus = notARegistry("r.example", "GET /v2/ answered HTTP 404", 404);
  assert.equal(registryErrorOf(byStatus)?.status, 404);
  assert.equal(
    byStatus.message,
    "r.example does not behave like an OCI registry: GET /v2/ answered HTTP 404",
  );
  assert.equal(registryErrorOf(notARegistry("r.example", "odd digest")), undefined);
});

Deno.test("restartsUpload: connection errors and retryable answers (408, 429, 5xx but 501/505)", async () => {
  assert.equal(restartsUpload(new SardeError("network", "connection to r.example refused")), true);
  for (const status of [408, 429, 500, 502, 503, 504]) {
    assert.equal(restartsUpload(await registryError(status)), true, `${status}`);
  }
  for (const status of [400, 401, 404, 413, 501, 505]) {
    assert.equal(restartsUpload(await registryError(status)), false, `${status}`);
  }
  const retried = startRetries({ attempts: 1, baseDelayMs: 1, maxDelayMs: 1, maxElapsedMs: 1 })
    .exhausted(await registryError(503));
  assert.equal(restartsUpload(retried), true, "the caller's gaveUp() stops these");
  // Decided on the status, not on words in the message.
  assert.equal(restartsUpload(new SardeError("registry", "x answered HTTP 503")), false);
  assert.equal(restartsUpload(notARegistry("r.example", "GET /v2/ answered HTTP 501", 501)), false);
});
