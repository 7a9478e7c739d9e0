/**
 * lib/registry/http.ts: the response timeout covers connecting and the TLS handshake, and never cuts a
 * request that keeps making progress.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { createHttpClient, type HttpClient, MAX_SOCKETS } from "../lib/registry/http.ts";
import { startBlackHole } from "./support/proxy.ts";
import { makeTlsFiles } from "./support/registry.ts";

const TIMEOUT_MS = 3000;

async function elapsedOf(fn: () => Promise<unknown>): Promise<[number, unknown]> {
  const t0 = performance.now();
  try {
    return [performance.now() - t0, await fn()];
  } catch (err) {
    return [performance.now() - t0, err];
  }
}

Deno.test("http: a server that accepts and never answers (nor the TLS handshake) times out once", async () => {
  await using hole = startBlackHole();
  for (const scheme of ["http", "https"]) {
    const client = createHttpClient({ responseTimeoutMs: TIMEOUT_MS });
    const [ms, err] = await elapsedOf(() =>
      client.send({ method: "GET", url: new URL(`${scheme}://${hole.host}/v2/`) })
    );
    client.close();
    assert.match(String(err), /no answer within 3 s \(response timeout\)/, scheme);
    // Deno's node:https armed the socket timer only after the handshake: 2× the timeout. The
    // slack (1.5 s) is for a loaded machine; the fault doubles the time.
    assert.ok(ms < TIMEOUT_MS * 1.5, `${scheme}: gave up after ${ms.toFixed(0)} ms`);
  }
});

Deno.test("http: a slow upload that keeps sending is not cut by the timeout (fresh and kept-alive sockets)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sarde-http-" });
  await makeTlsFiles(dir);
  const [cert, key, ca] = ["server.crt", "server.key", "ca.crt"].map((f) =>
    Deno.readTextFileSync(join(dir, f))
  );
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, cert, key, onListen() {} },
    async (req) => new Response(`got ${(await req.arrayBuffer()).byteLength}`),
  );
  const client: HttpClient = createHttpClient({ responseTimeoutMs: TIMEOUT_MS, caCerts: [ca] });
  try {
    for (const round of ["fresh socket", "kept-alive socket"]) {
      // Five pieces 0.6 s apart: 3 s in all, longer than the timeout, never idle that long.
      const body = {
        length: 5,
        async *stream() {
          for (let i = 0; i < 5; i++) {
            await new Promise((r) => setTimeout(r, TIMEOUT_MS * 0.3));
            yield new Uint8Array([i]);
          }
        },
      };
      const res = await client.send({
        method: "PUT",
        url: new URL(`https://127.0.0.1:${server.addr.port}/upload`),
        body,
      });
      assert.equal(res.status, 200, round);
      assert.equal(new TextDecoder().decode(await res.bytes(100)), "got 5", round);
    }
  } finally {
    client.close();
    await server.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("http: requests queued behind busy sockets (more slow uploads than sockets) are not timed out", async () => {
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    async (req) => new Response(`got ${(await req.arrayBuffer()).byteLength}`),
  );
  const client = createHttpClient({ responseTimeoutMs: TIMEOUT_MS });
  try {
    // Each upload keeps sending for 1.2× the timeout, so the ones waiting for a socket start
    // their own after more than the timeout: the timeout must count from their socket.
    const slowBody = {
      length: 4,
      async *stream() {
        for (let i = 0; i < 4; i++) {
          await new Promise((r) => setTimeout(r, TIMEOUT_MS * 0.3));
          yield new Uint8Array([i]);
        }
      },
    };
    const answers = await Promise.allSettled(
      Array.from({ length: MAX_SOCKETS + 4 }, async () => {
        const res = await client.send({
          method: "PUT",
          url: new URL(`http://127.0.0.1:${server.addr.port}/upload`),
          body: slowBody,
        });
        return new TextDecoder().decode(await res.bytes(100));
      }),
    );
    const failed = answers.flatMap((a) => a.status === "rejected" ? [String(a.reason)] : []);
    assert.deepEqual(failed, [], "every upload got its answer");
    assert.ok(answers.every((a) => a.status === "fulfilled" && a.value === "got 4"));
  } finally {
    client.close();
    await server.shutdown();
  }
});

Deno.test("http: a request timed out on a kept-alive socket fails once and is not sent again", async () => {
  const seen: string[] = [];
  const late = Promise.withResolvers<void>();
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    const path = new URL(req.url).pathname;
    seen.push(`${req.method} ${path}`);
    await req.body?.cancel();
    if (path !== "/quick") await late.promise;
    return new Response("ok");
  });
  // Slow answers come when the test ends, or long after the timeout should the client wait.
  const lateTimer = setTimeout(late.resolve, TIMEOUT_MS * 4);
  const client = createHttpClient({ responseTimeoutMs: TIMEOUT_MS });
  const url = (path: string) => new URL(`http://127.0.0.1:${server.addr.port}${path}`);
  try {
    for (const method of ["POST", "GET"]) {
      // A quick request first, so that the slow one goes out on a kept-alive socket: Deno's
      // node:http sent it again on a new connection once it timed out, and waited for that one
      // without any timeout.
      await (await client.send({ method: "GET", url: url("/quick") })).discard();
      const [ms, err] = await elapsedOf(() =>
        client.send({ method, url: url("/slow"), body: method === "POST" ? "x" : undefined })
      );
      assert.match(String(err), new RegExp(`no answer within ${TIMEOUT_MS / 1000} s`), method);
      assert.ok(ms < TIMEOUT_MS * 1.5, `${method}: gave up after ${ms.toFixed(0)} ms`);
    }
    assert.deepEqual(
      seen,
      ["GET /quick", "POST /slow", "GET /quick", "GET /slow"],
      "each request reached the server once",
    );
  } finally {
    client.close();
    clearTimeout(lateTimer);
    late.resolve();
    await server.shutdown();
  }
});
