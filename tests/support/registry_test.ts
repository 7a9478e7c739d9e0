/**
 * Checks the registry fixtures themselves: every mode answers `/v2/` as expected, the token
 * server's grants work, the limited proxy answers 413, the faulty proxies inject their faults, the
 * servers that are no registry behave as promised, and skopeo (an independent client) can push to
 * and inspect the htpasswd-tls and limited registries.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  freePort,
  startBlackHole,
  startFaultyProxy,
  startForwarder,
  startHtmlServer,
  startRegistry,
  type TestRegistry,
  TOKEN_SERVICE,
} from "./registry.ts";
import { startThrottledProxy } from "./proxy.ts";

const dec = new TextDecoder();

interface Output {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command (stdin closed) and returns its exit code and output. */
async function sh(cmd: string, args: string[]): Promise<Output> {
  const o = await new Deno.Command(cmd, { args, stdin: "null", stdout: "piped", stderr: "piped" })
    .output();
  return { code: o.code, stdout: dec.decode(o.stdout), stderr: dec.decode(o.stderr) };
}

/** `curl -s -o /dev/null -w %{http_code} …` → the status code. */
async function curlStatus(args: string[]): Promise<number> {
  const o = await sh("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", ...args]);
  return Number(o.stdout);
}

function sha256(data: Uint8Array | string): string {
  return "sha256:" + createHash("sha256").update(data).digest("hex");
}

function basic(user: string, pw: string): string {
  return "Basic " + btoa(`${user}:${pw}`);
}

/** Decodes the claims of a JWT. */
function jwtClaims(token: string): Record<string, unknown> {
  const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
  return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
}

/** fetch that always consumes the body; returns status, headers and body text. */
async function req(
  url: string,
  init: RequestInit & { client?: Deno.HttpClient } = {},
): Promise<{ status: number; headers: Headers; text: string }> {
  const r = await fetch(url, init);
  return { status: r.status, headers: r.headers, text: await r.text() };
}

/** Pushes `data` as a blob of `repo` (POST, then PUT with the body); returns its digest. */
async function pushBlob(reg: TestRegistry, repo: string, data: Uint8Array<ArrayBuffer>) {
  const digest = sha256(data);
  const r = await uploadBlob(reg.url, repo, data);
  assert.equal(r.status, 201, r.text);
  return digest;
}

/** POST an upload session, then PUT `data` with `?digest=`; returns the PUT's answer. */
async function uploadBlob(base: string, repo: string, data: Uint8Array<ArrayBuffer> | string) {
  const start = await req(`${base}/v2/${repo}/blobs/uploads/`, { method: "POST" });
  assert.equal(start.status, 202, start.text);
  const put = new URL(start.headers.get("location")!, base);
  put.searchParams.set("digest", sha256(data));
  return await req(put.href, {
    method: "PUT",
    headers: { "content-type": "application/octet-stream" },
    body: data,
  });
}

/** Writes a minimal OCI image layout (config + one layer + manifest) tagged `tag`. */
async function makeOciLayout(dir: string, tag: string): Promise<{ manifestDigest: string }> {
  const blobs = `${dir}/blobs/sha256`;
  await Deno.mkdir(blobs, { recursive: true });
  const put = async (data: Uint8Array | string): Promise<{ digest: string; size: number }> => {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    const digest = sha256(bytes);
    await Deno.writeFile(`${blobs}/${digest.slice(7)}`, bytes);
    return { digest, size: bytes.length };
  };
  const layerBytes = new TextEncoder().encode("sarde fixture layer\n");
  const layer = await put(layerBytes);
  const config = await put(JSON.stringify({
    architecture: "amd64",
    os: "linux",
    config: { Labels: { "org.sarde.test": "1" } },
    rootfs: { type: "layers", diff_ids: [layer.digest] },
  }));
  const manifest = await put(JSON.stringify({
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: { mediaType: "application/vnd.oci.image.config.v1+json", ...config },
    layers: [{
      mediaType: "application/vnd.sarde.test.layer.v1",
      ...layer,
      annotations: { "org.opencontainers.image.title": "layer.txt" },
    }],
  }));
  await Deno.writeTextFile(`${dir}/oci-layout`, JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  await Deno.writeTextFile(
    `${dir}/index.json`,
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        ...manifest,
        annotations: { "org.opencontainers.image.ref.name": tag },
      }],
    }),
  );
  return { manifestDigest: manifest.digest };
}

Deno.test("plain registry answers /v2/ with 200 and stores blobs", async () => {
  await using reg = await startRegistry("plain");
  assert.match(reg.host, /^127\.0\.0\.1:\d+$/);
  assert.equal(reg.url, `http://${reg.host}`);
  assert.equal(reg.username, undefined);
  assert.equal(await curlStatus([`${reg.url}/v2/`]), 200);
  const data = new TextEncoder().encode("hello");
  const digest = await pushBlob(reg, "t/plain", data);
  const r = await req(`${reg.url}/v2/t/plain/blobs/${digest}`);
  assert.equal(r.status, 200);
  assert.equal(r.text, "hello");
  const stat = await Deno.stat(`${reg.dataDir}/docker/registry/v2/blobs`);
  assert.ok(stat.isDirectory);
  await reg.stop();
  await reg.stop(); // idempotent
  await assert.rejects(Deno.stat(reg.dataDir), Deno.errors.NotFound);
});

Deno.test("htpasswd-tls registry: 401 without credentials, 200 with them, CA verifies", async () => {
  await using reg = await startRegistry("htpasswd-tls");
  assert.equal(reg.url, `https://${reg.host}`);
  assert.ok(reg.caFile && reg.certDir);
  assert.deepEqual([...Deno.readDirSync(reg.certDir)].map((e) => e.name), ["ca.crt"]);
  const port = reg.host.split(":")[1];
  const ca = ["--cacert", reg.caFile];
  assert.equal(await curlStatus([...ca, `${reg.url}/v2/`]), 401);
  assert.equal(
    await curlStatus([...ca, "-u", `${reg.username}:${reg.password}`, `${reg.url}/v2/`]),
    200,
  );
  assert.equal(await curlStatus([...ca, "-u", "sarde:wrong", `${reg.url}/v2/`]), 401);
  assert.equal(
    await curlStatus([...ca, "-u", "sarde:sarde-pw", `https://localhost:${port}/v2/`]),
    200,
  );
  // without the CA the certificate does not verify (curl exit 60, status 000)
  assert.equal(await curlStatus([`${reg.url}/v2/`]), 0);

  // Deno's fetch (rustls) accepts the chain with the CA
  using client = Deno.createHttpClient({ caCerts: [await Deno.readTextFile(reg.caFile)] });
  const anon = await req(`${reg.url}/v2/`, { client });
  assert.equal(anon.status, 401);
  assert.match(anon.headers.get("www-authenticate") ?? "", /^Basic realm=/);
  const ok = await req(`${reg.url}/v2/`, {
    client,
    headers: { authorization: basic(reg.username!, reg.password!) },
  });
  assert.equal(ok.status, 200);
});

Deno.test("token registry: bearer challenge, GET/POST grants, refresh tokens", async () => {
  await using reg = await startRegistry("token", { tokenTtlSeconds: 120 });
  const ts = reg.tokenServer!;
  assert.ok(ts);
  const anon = await req(`${reg.url}/v2/`);
  assert.equal(anon.status, 401);
  const challenge = anon.headers.get("www-authenticate") ?? "";
  assert.match(challenge, /^Bearer /);
  assert.ok(challenge.includes(`realm="${ts.realm}"`), challenge);
  assert.ok(challenge.includes(`service="${TOKEN_SERVICE}"`), challenge);

  const scope = "repository:t/tok:pull,push";
  const q = `service=${TOKEN_SERVICE}&scope=${encodeURIComponent(scope)}`;

  // GET with Basic → push+pull
  const g = await req(`${ts.realm}?${q}`, {
    headers: { authorization: basic(reg.username!, reg.password!) },
  });
  assert.equal(g.status, 200);
  const gb = JSON.parse(g.text);
  assert.equal(gb.expires_in, 120);
  assert.equal(gb.token, gb.access_token);
  assert.equal(gb.refresh_token, undefined);
  const claims = jwtClaims(gb.token);
  assert.equal(claims.aud, TOKEN_SERVICE);
  assert.equal(claims.sub, "sarde");
  assert.deepEqual(claims.access, [{
    type: "repository",
    name: "t/tok",
    actions: ["pull", "push"],
  }]);
  assert.equal(
    await curlStatus(["-H", `Authorization: Bearer ${gb.token}`, `${reg.url}/v2/`]),
    200,
  );
  // a pushed blob with that token
  const data = new TextEncoder().encode("token blob");
  const auth = { authorization: `Bearer ${gb.token}` };
  const st = await req(`${reg.url}/v2/t/tok/blobs/uploads/`, { method: "POST", headers: auth });
  assert.equal(st.status, 202, st.text);
  const putUrl = new URL(st.headers.get("location")!, reg.url);
  putUrl.searchParams.set("digest", sha256(data));
  const up = await req(putUrl.href, { method: "PUT", headers: auth, body: data });
  assert.equal(up.status, 201, up.text);

  // anonymous → pull only; that token cannot push
  const a = JSON.parse((await req(`${ts.realm}?${q}`)).text);
  assert.deepEqual(jwtClaims(a.token).access, [
    { type: "repository", name: "t/tok", actions: ["pull"] },
  ]);
  const denied = await req(`${reg.url}/v2/t/tok/blobs/uploads/`, {
    method: "POST",
    headers: { authorization: `Bearer ${a.token}` },
  });
  assert.equal(denied.status, 401);
  const pulled = await req(`${reg.url}/v2/t/tok/blobs/${sha256(data)}`, {
    headers: { authorization: `Bearer ${a.token}` },
  });
  assert.equal(pulled.status, 200);
  assert.equal(pulled.text, "token blob");

  // wrong password
  assert.equal(
    (await req(`${ts.realm}?${q}`, { headers: { authorization: basic("sarde", "nope") } })).status,
    401,
  );

  // GET with offline_token=true → refresh token
  const off = JSON.parse(
    (await req(`${ts.realm}?${q}&offline_token=true&client_id=test`, {
      headers: { authorization: basic("sarde", "sarde-pw") },
    })).text,
  );
  assert.equal(typeof off.refresh_token, "string");

  // POST password grant, offline → refresh token; then refresh_token grant
  const form = (o: Record<string, string>) => ({
    method: "POST",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams(o).toString(),
  });
  const p = await req(
    ts.realm,
    form({
      grant_type: "password",
      username: "sarde",
      password: "sarde-pw",
      service: TOKEN_SERVICE,
      scope,
      access_type: "offline",
      client_id: "test",
    }),
  );
  assert.equal(p.status, 200);
  const pb = JSON.parse(p.text);
  assert.equal(pb.token, undefined);
  assert.equal(typeof pb.access_token, "string");
  assert.equal(typeof pb.refresh_token, "string");
  const r = await req(
    ts.realm,
    form({
      grant_type: "refresh_token",
      refresh_token: pb.refresh_token,
      service: TOKEN_SERVICE,
      scope,
    }),
  );
  assert.equal(r.status, 200);
  const rb = JSON.parse(r.text);
  assert.deepEqual(jwtClaims(rb.access_token).access, [
    { type: "repository", name: "t/tok", actions: ["pull", "push"] },
  ]);
  assert.equal(
    await curlStatus(["-H", `Authorization: Bearer ${rb.access_token}`, `${reg.url}/v2/`]),
    200,
  );
  // the GET-issued refresh token works as well; unknown ones do not
  assert.equal(
    (await req(ts.realm, form({ grant_type: "refresh_token", refresh_token: off.refresh_token })))
      .status,
    200,
  );
  assert.equal(
    (await req(ts.realm, form({ grant_type: "refresh_token", refresh_token: "bogus" }))).status,
    401,
  );
  assert.equal(
    (await req(ts.realm, form({ grant_type: "password", username: "sarde", password: "x" })))
      .status,
    401,
  );
  assert.equal((await req(ts.realm, form({ grant_type: "client_credentials" }))).status, 400);
  // password grant without access_type=offline → no refresh token
  const np = JSON.parse(
    (await req(
      ts.realm,
      form({ grant_type: "password", username: "sarde", password: "sarde-pw", scope }),
    )).text,
  );
  assert.equal(np.refresh_token, undefined);
  assert.ok(ts.requests().length >= 10);
});

Deno.test("limited registry: 413 for a 9 MiB PATCH, small uploads pass", async (t) => {
  await using reg = await startRegistry("limited");
  assert.ok(reg.upstreamUrl && reg.upstreamUrl !== reg.url);
  assert.equal(await curlStatus([`${reg.url}/v2/`]), 200);

  const start = async (): Promise<string> => {
    const r = await req(`${reg.url}/v2/t/lim/blobs/uploads/`, { method: "POST" });
    assert.equal(r.status, 202);
    const loc = r.headers.get("location")!;
    // Location rewritten to the proxy
    assert.ok(loc.startsWith(`${reg.url}/v2/t/lim/blobs/uploads/`), loc);
    return loc;
  };

  await t.step("Content-Length over the limit → 413 (curl)", async () => {
    const tmp = await Deno.makeTempFile({ dir: "/var/tmp" });
    try {
      await Deno.writeFile(tmp, new Uint8Array(9 * 1024 * 1024));
      const loc = await start();
      const code = await curlStatus([
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        `@${tmp}`,
        loc,
      ]);
      assert.equal(code, 413);
    } finally {
      await Deno.remove(tmp);
    }
  });

  await t.step("chunked body over the limit → 413 (fetch, streamed)", async () => {
    const loc = await start();
    const chunk = new Uint8Array(1024 * 1024);
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(c) {
        if (sent >= 9) return c.close();
        sent++;
        c.enqueue(chunk);
      },
    });
    const r = await fetch(loc, { method: "PATCH", body });
    await r.body?.cancel();
    assert.equal(r.status, 413);
  });

  await t.step("small chunked and sized bodies pass through", async () => {
    const data = new Uint8Array(1024 * 1024).fill(7);
    const loc = await start();
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(data.subarray(0, 4096));
        c.enqueue(data.subarray(4096));
        c.close();
      },
    });
    const p = await req(loc, { method: "PATCH", body });
    assert.equal(p.status, 202, p.text);
    const put = new URL(p.headers.get("location")!);
    put.searchParams.set("digest", sha256(data));
    const done = await req(put.href, { method: "PUT" });
    assert.equal(done.status, 201, done.text);
    const head = await fetch(`${reg.url}/v2/t/lim/blobs/${sha256(data)}`, { method: "HEAD" });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get("content-length"), String(data.length));
    const digest = await pushBlob(reg, "t/lim", new Uint8Array(8 * 1024 * 1024)); // exactly 8 MiB
    assert.equal((await req(`${reg.upstreamUrl}/v2/t/lim/blobs/${digest}`)).status, 200);
  });
});

Deno.test("limited registry honours maxBodyBytes", async () => {
  await using reg = await startRegistry("limited", { maxBodyBytes: 1000 });
  const ok = await uploadBlob(reg.url, "t/x", "a".repeat(1000));
  assert.equal(ok.status, 201, ok.text);
  const big = await uploadBlob(reg.url, "t/x", "a".repeat(1001));
  assert.equal(big.status, 413);
});

Deno.test("skopeo pushes an OCI layout to the htpasswd-tls and limited registries", async () => {
  await using reg = await startRegistry("htpasswd-tls");
  const layout = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "sarde-layout-" });
  try {
    const { manifestDigest } = await makeOciLayout(layout, "v1");
    const ref = `docker://${reg.host}/sarde/fixture:v1`;
    const creds = `${reg.username}:${reg.password}`;

    const noCreds = await sh("skopeo", [
      "copy",
      "--dest-cert-dir",
      reg.certDir!,
      `oci:${layout}:v1`,
      ref,
    ]);
    assert.notEqual(noCreds.code, 0);
    assert.match(noCreds.stderr, /authentication required|unauthorized/i);

    const noCa = await sh("skopeo", ["copy", "--dest-creds", creds, `oci:${layout}:v1`, ref]);
    assert.notEqual(noCa.code, 0);
    assert.match(noCa.stderr, /x509|certificate/i);

    const copy = await sh("skopeo", [
      "copy",
      "--dest-creds",
      creds,
      "--dest-cert-dir",
      reg.certDir!,
      `oci:${layout}:v1`,
      ref,
    ]);
    assert.equal(copy.code, 0, copy.stderr);

    const raw = await sh("skopeo", [
      "inspect",
      "--raw",
      "--creds",
      creds,
      "--cert-dir",
      reg.certDir!,
      ref,
    ]);
    assert.equal(raw.code, 0, raw.stderr);
    assert.equal(sha256(raw.stdout), manifestDigest);
    const info = await sh("skopeo", ["inspect", "--creds", creds, "--cert-dir", reg.certDir!, ref]);
    assert.equal(info.code, 0, info.stderr);
    assert.equal(JSON.parse(info.stdout).Labels["org.sarde.test"], "1");

    // the same through the size-limiting proxy (Location rewriting, streamed bodies)
    await using lim = await startRegistry("limited");
    const limRef = `docker://${lim.host}/sarde/fixture:v1`;
    const lcopy = await sh("skopeo", [
      "copy",
      "--dest-tls-verify=false",
      `oci:${layout}:v1`,
      limRef,
    ]);
    assert.equal(lcopy.code, 0, lcopy.stderr);
    const lraw = await sh("skopeo", ["inspect", "--raw", "--tls-verify=false", limRef]);
    assert.equal(lraw.code, 0, lraw.stderr);
    assert.equal(sha256(lraw.stdout), manifestDigest);
  } finally {
    await Deno.remove(layout, { recursive: true });
  }
});

Deno.test("skopeo pushes with --dest-creds to the token registry, pulls anonymously", async () => {
  await using reg = await startRegistry("token");
  const layout = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "sarde-layout-" });
  try {
    const { manifestDigest } = await makeOciLayout(layout, "v1");
    const ref = `docker://${reg.host}/sarde/fixture:v1`;
    const anonPush = await sh("skopeo", [
      "copy",
      "--dest-tls-verify=false",
      `oci:${layout}:v1`,
      ref,
    ]);
    assert.notEqual(anonPush.code, 0);
    assert.match(anonPush.stderr, /denied|unauthorized/i);
    const copy = await sh("skopeo", [
      "copy",
      "--dest-tls-verify=false",
      "--dest-creds",
      "sarde:sarde-pw",
      `oci:${layout}:v1`,
      ref,
    ]);
    assert.equal(copy.code, 0, copy.stderr);
    const raw = await sh("skopeo", ["inspect", "--raw", "--tls-verify=false", ref]);
    assert.equal(raw.code, 0, raw.stderr);
    assert.equal(sha256(raw.stdout), manifestDigest);
  } finally {
    await Deno.remove(layout, { recursive: true });
  }
});

Deno.test("faulty proxy: status, corrupt-blob and cut-blob faults", async (t) => {
  await using reg = await startRegistry("plain");
  const data = crypto.getRandomValues(new Uint8Array(65536));
  const big = new Uint8Array(1024 * 1024);
  for (let i = 0; i < big.length; i += 65536) big.set(data, i);
  const digest = await pushBlob(reg, "t/f", big);

  await t.step("status", async () => {
    await using p = await startFaultyProxy(reg, {
      kind: "status",
      status: 503,
      times: 2,
      retryAfter: 1,
    });
    for (let i = 0; i < 2; i++) {
      const r = await req(`${p.url}/v2/`);
      assert.equal(r.status, 503);
      assert.equal(r.headers.get("retry-after"), "1");
    }
    assert.equal((await req(`${p.url}/v2/`)).status, 200);
    assert.equal(p.hits(), 3);
  });

  await t.step("corrupt-blob", async () => {
    await using p = await startFaultyProxy(reg, { kind: "corrupt-blob" });
    const r = await fetch(`${p.url}/v2/t/f/blobs/${digest}`);
    assert.equal(r.status, 200);
    const got = new Uint8Array(await r.arrayBuffer());
    assert.equal(got.length, big.length);
    assert.notEqual(sha256(got), digest);
    // manifests / other paths untouched
    assert.equal((await req(`${p.url}/v2/`)).status, 200);
    assert.equal(p.hits(), 2);
  });

  await t.step("cut-blob, then resume with Range", async () => {
    await using p = await startFaultyProxy(reg, {
      kind: "cut-blob",
      afterBytes: 100_000,
      times: 1,
    });
    const url = `${p.url}/v2/t/f/blobs/${digest}`;
    const r = await fetch(url);
    assert.equal(r.status, 200);
    assert.equal(r.headers.get("content-length"), String(big.length));
    const reader = r.body!.getReader();
    const parts: Uint8Array[] = [];
    let received = 0;
    await assert.rejects(async () => {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        parts.push(value);
        received += value.length;
      }
    });
    assert.equal(received, 100_000);
    const rest = await fetch(url, { headers: { range: `bytes=${received}-` } });
    assert.equal(rest.status, 206);
    const tail = new Uint8Array(await rest.arrayBuffer());
    const whole = new Uint8Array(received + tail.length);
    let off = 0;
    for (const part of [...parts, tail]) {
      whole.set(part, off);
      off += part.length;
    }
    assert.equal(sha256(whole), digest);
    // `times` used up: the next full GET is intact
    const again = new Uint8Array(await (await fetch(url)).arrayBuffer());
    assert.equal(sha256(again), digest);
    assert.equal(p.hits(), 3);
  });

  await t.step("cut-blob spares bodies shorter than afterBytes", async () => {
    const small = await pushBlob(reg, "t/f", new TextEncoder().encode("short"));
    await using p = await startFaultyProxy(reg, { kind: "cut-blob", afterBytes: 100, times: 1 });
    assert.equal((await req(`${p.url}/v2/t/f/blobs/${small}`)).text, "short");
    const r = await fetch(`${p.url}/v2/t/f/blobs/${digest}`);
    await assert.rejects(r.arrayBuffer());
  });
});

Deno.test("faulty proxy: stall-blob and html faults, forwarder on a chosen port", async (t) => {
  await using reg = await startRegistry("plain");
  const big = crypto.getRandomValues(new Uint8Array(65536));
  const digest = await pushBlob(reg, "t/s", big);

  await t.step("stall-blob sends afterBytes, then nothing, and keeps the connection", async () => {
    await using p = await startFaultyProxy(reg, { kind: "stall-blob", afterBytes: 1000, times: 1 });
    const url = `${p.url}/v2/t/s/blobs/${digest}`;
    const r = await fetch(url);
    assert.equal(r.status, 200);
    const reader = r.body!.getReader();
    let received = 0;
    while (received < 1000) received += (await reader.read()).value!.length;
    assert.equal(received, 1000);
    const silent = await Promise.race([
      reader.read().then(() => "data"),
      new Promise((resolve) => setTimeout(() => resolve("silent"), 500)),
    ]);
    assert.equal(silent, "silent", "no more data and no end");
    await reader.cancel();
    assert.equal(p.faults(), 1);
    const rest = await fetch(url, { headers: { range: "bytes=1000-" } });
    assert.equal(rest.status, 206);
    assert.equal((await rest.arrayBuffer()).byteLength, big.length - 1000);
  });

  await t.step("html answers blob HEADs (only) with a page", async () => {
    await using p = await startFaultyProxy(reg, { kind: "html", requests: "blob-head" });
    const head = await fetch(`${p.url}/v2/t/s/blobs/sha256:${"0".repeat(64)}`, { method: "HEAD" });
    assert.equal(head.status, 200);
    assert.match(head.headers.get("content-type") ?? "", /text\/html/);
    assert.equal(head.headers.get("docker-content-digest"), null);
    const v2 = await req(`${p.url}/v2/`);
    assert.equal(v2.headers.get("docker-distribution-api-version"), "registry/2.0");
    assert.equal(p.faults(), 1);
  });

  await t.step("forwarder listens on the port it is given", async () => {
    const port = freePort();
    await using p = await startForwarder(reg, port);
    assert.equal(p.port, port);
    assert.equal((await req(`http://127.0.0.1:${port}/v2/`)).status, 200);
  });
});

Deno.test("no registry: an HTML server answers 200 to all; a black hole never answers", async () => {
  await using web = await startHtmlServer();
  for (const method of ["GET", "HEAD", "PUT"]) {
    const r = await req(`${web.url}/v2/x/manifests/v1`, { method });
    assert.equal(r.status, 200);
    assert.match(r.headers.get("content-type") ?? "", /text\/html/);
  }
  assert.equal(web.hits(), 3);

  await using hole = startBlackHole();
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: hole.port });
  await conn.write(new TextEncoder().encode("GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"));
  const answer = await Promise.race([
    conn.read(new Uint8Array(16)).then(() => "answered"),
    new Promise((resolve) => setTimeout(() => resolve("silent"), 500)),
  ]);
  assert.equal(answer, "silent");
  assert.equal(hole.connections(), 1);
  conn.close();
});

Deno.test("throttled proxy: with `shared`, blob downloads together keep to the pace", async () => {
  const body = new Uint8Array(512 * 1024);
  const { promise: listening, resolve } = Promise.withResolvers<Deno.NetAddr>();
  const upstream = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: (a) => resolve(a as Deno.NetAddr) },
    () => new Response(body),
  );
  try {
    const { port } = await listening;
    await using proxy = await startThrottledProxy({ url: `http://127.0.0.1:${port}` }, {
      bytesPerSecond: 1 << 20,
      shared: true,
    });
    const t0 = performance.now();
    await Promise.all(["a", "b"].map(async (x) => {
      const r = await fetch(`${proxy.url}/v2/r/blobs/sha256:${x.repeat(64)}`);
      assert.equal((await r.arrayBuffer()).byteLength, body.length);
    }));
    // 1 MiB over a 1 MiB/s link: each alone would take half of that
    const ms = performance.now() - t0;
    assert.ok(ms >= 900, `two 512 KiB downloads took ${ms.toFixed(0)} ms at 1 MiB/s in all`);
    assert.deepEqual(proxy.blobBytes(), { all: 2 * body.length, ranged: 0 });
  } finally {
    await upstream.shutdown();
  }
});

Deno.test("token-tls registry: https registry whose token realm is plain http", async () => {
  await using reg = await startRegistry("token-tls");
  assert.match(reg.url, /^https:/);
  assert.match(reg.tokenServer!.realm, /^http:/);
  const client = Deno.createHttpClient({ caCerts: [await Deno.readTextFile(reg.caFile!)] });
  try {
    const anon = await req(`${reg.url}/v2/`, { client });
    assert.equal(anon.status, 401);
    assert.ok(anon.headers.get("www-authenticate")?.includes(`realm="${reg.tokenServer!.realm}"`));
  } finally {
    client.close();
  }
});
