import assert from "node:assert/strict";
import { SardeError } from "../lib/util/errors.ts";
import { type RetryPolicy, startRetries } from "../lib/util/retry.ts";
import type { Authenticator } from "../lib/registry/auth.ts";
import type { HttpClient, HttpRequest } from "../lib/registry/http.ts";
import { registryErrorOf, responseError } from "../lib/registry/errors.ts";
import {
  authenticating,
  redirecting,
  retrying,
  type Send,
  sending,
} from "../lib/registry/request.ts";
import { fakeResponse } from "./support/fake_http.ts";

const policy: RetryPolicy = { attempts: 3, baseDelayMs: 1, maxDelayMs: 5, maxElapsedMs: 60_000 };

/** An HttpClient answering each request with the next of `answers` (a status or an error). */
function fakeHttp(answers: (number | Error)[]): HttpClient & { sent: HttpRequest[] } {
  const sent: HttpRequest[] = [];
  return {
    sent,
    send(request) {
      sent.push(request);
      const next = answers.shift();
      if (next === undefined) throw new Error("no more answers");
      return next instanceof Error
        ? Promise.reject(next)
        : Promise.resolve(fakeResponse(next, "", next === 302 ? { location: "/elsewhere" } : {}));
    },
    close() {},
  };
}

const retry = (send: Send, accepts: (status: number) => boolean = () => false) =>
  retrying(send, {
    retries: startRetries(policy),
    policy,
    registry: "r.example",
    what: "test",
    accepts,
    errorFor: (res) => responseError(res, "test", "r.example", false),
  });

const url = new URL("https://r.example/v2/a/blobs/sha256:00");
const refused = () => new SardeError("network", "connection to r.example refused");

Deno.test("retrying: connection errors and 503 are sent again, then the answer comes through", async () => {
  const http = fakeHttp([refused(), 503, 200]);
  const res = await retry(sending(http, { method: "GET" }))(url, {});
  assert.equal(res.status, 200);
  assert.equal(http.sent.length, 3);
});

Deno.test("retrying: a status the caller accepts is its answer, not retried", async () => {
  const http = fakeHttp([503]);
  const res = await retry(sending(http, { method: "GET" }), (s) => s === 503)(url, {});
  assert.equal(res.status, 503);
});

Deno.test("retrying: gives up after the policy's attempts with the last answer's fields", async () => {
  const http = fakeHttp([503, 503, 502]);
  await assert.rejects(retry(sending(http, { method: "GET" }))(url, {}), (err: SardeError) => {
    assert.match(err.message, /^test: r.example answered HTTP 502 \(gave up after 3 attempts/);
    assert.equal(registryErrorOf(err)?.status, 502);
    return true;
  });
});

Deno.test("retrying: a connection error not of the request itself (a token server) is not retried", async () => {
  let calls = 0;
  const tokenServerDown: Send = () => {
    calls++;
    return Promise.reject(refused());
  };
  await assert.rejects(retry(tokenServerDown)(url, {}), /refused/);
  assert.equal(calls, 1);
});

/** An Authenticator that hands out `Bearer t` once asked, or refuses when `grant` is false. */
function fakeAuth(grant: boolean): Authenticator {
  let token: string | undefined;
  return {
    hasCredentials: false,
    header: () => token,
    respond: () => {
      if (grant) token = "Bearer t";
      return Promise.resolve(grant);
    },
  };
}

Deno.test("authenticating: a 401 is answered and the request sent again with the token", async () => {
  const http = fakeHttp([401, 200]);
  const send = authenticating(sending(http, { method: "GET" }), {
    auth: fakeAuth(true),
    origin: url.origin,
    scopes: ["repository:a:pull"],
    registry: "r.example",
    what: "test",
  });
  assert.equal((await send(url, { accept: "x" })).status, 200);
  assert.deepEqual(http.sent.map((r) => r.headers), [
    { accept: "x" },
    { accept: "x", authorization: "Bearer t" },
  ]);
});

Deno.test("authenticating: a 401 it cannot answer is an auth error; other hosts get no token", async () => {
  const http = fakeHttp([401, 401]);
  const send = authenticating(sending(http, { method: "GET" }), {
    auth: fakeAuth(false),
    origin: url.origin,
    scopes: [],
    registry: "r.example",
    what: "test",
  });
  await assert.rejects(send(url, {}), (err: SardeError) => {
    assert.equal(err.kind, "auth");
    assert.equal(err.message, "test: r.example requires authentication");
    assert.equal(registryErrorOf(err)?.status, 401);
    return true;
  });
  const elsewhere = await send(new URL("https://cdn.example/blob"), {});
  assert.equal(elsewhere.status, 401, "passed on: the caller turns it into an error");
});

Deno.test("redirecting: follows Location, at most five times", async () => {
  const http = fakeHttp([302, 200]);
  const res = await redirecting(sending(http, { method: "GET" }), "test")(url, {});
  assert.equal(res.status, 200);
  assert.equal(http.sent[1].url.href, "https://r.example/elsewhere");
  const loop = fakeHttp(Array(6).fill(302));
  await assert.rejects(
    redirecting(sending(loop, { method: "GET" }), "test")(url, {}),
    /test: too many or broken redirects/,
  );
  assert.equal(loop.sent.length, 6);
});

Deno.test("the layers share one count per request: a redirect does not renew the retries", async () => {
  const http = fakeHttp([503, 302, 503, 503]);
  const send = redirecting(retry(sending(http, { method: "GET" })), "test");
  await assert.rejects(send(url, {}), /gave up after 3 attempts/);
  assert.equal(http.sent.length, 4);
});
