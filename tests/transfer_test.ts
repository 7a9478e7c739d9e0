/**
 * End-to-end transfer tests against real registries (Debian's docker-registry on 127.0.0.1) with
 * skopeo as the independent client.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { digestFile } from "../lib/oci/digest.ts";
import * as api from "../mod.ts";
import { listFiles, makeImage, run, sarde, spawnSarde, tempDir } from "./support/images.ts";
import {
  type Fault,
  freePort,
  startBlackHole,
  startFaultyProxy,
  startForwarder,
  startHtmlServer,
  startRegistry,
} from "./support/registry.ts";

const FAST_RETRY = { SARDE_RETRY_BASE_MS: "20" };

function blobNames(files: string[]): string[] {
  return files.filter((f) => f.startsWith("blobs/")).sort();
}

Deno.test("plain registry: sarde push → skopeo reads it byte for byte → sarde fetch into an empty store", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("plain");
  const store = join(work, "store");
  const ref = `${reg.host}/sardines/multi:v1`;
  const img = await makeImage(store, ref, [
    { size: 3 << 20, kind: "random" },
    { size: 5 << 20, kind: "text" },
    { size: 3 << 20, kind: "random" },
  ]);

  const pushed = await sarde(["push", "-d", store, ref]);
  assert.equal(pushed.code, 0, pushed.stderr);
  assert.equal(
    pushed.stdout.trim(),
    img.manifestDigest,
    "push prints the manifest digest on stdout only",
  );

  // Independent client: the registry holds exactly our manifest bytes.
  const raw = await run("skopeo", ["inspect", "--raw", "--tls-verify=false", `docker://${ref}`], {
    check: true,
  });
  assert.equal(api.parseReference(ref).tag, "v1");
  const localManifest = await Deno.readFile(
    join(img.dir, "blobs", "sha256", img.manifestDigest.slice(7)),
  );
  assert.equal(raw.stdout, new TextDecoder().decode(localManifest));

  // skopeo copies it into its own layout: same blobs, same digests.
  const skopeoDir = join(work, "skopeo-oci");
  await run(
    "skopeo",
    ["copy", "--src-tls-verify=false", `docker://${ref}`, `oci:${skopeoDir}:v1`],
    { check: true },
  );
  const expectedBlobs = blobNames(await listFiles(img.dir));
  assert.deepEqual(blobNames(await listFiles(skopeoDir)), expectedBlobs);

  // Fetch into a new store: byte-identical blobs, index tagged v1, nothing else lying around.
  const store2 = join(work, "store2");
  const fetched = await sarde(["fetch", "-d", store2, ref]);
  assert.equal(fetched.code, 0, fetched.stderr);
  assert.equal(fetched.stdout.trim(), img.manifestDigest);
  const dir2 = join(store2, reg.host, "sardines", "multi");
  assert.deepEqual(blobNames(await listFiles(dir2)), expectedBlobs);
  for (const b of expectedBlobs) {
    assert.equal((await digestFile(join(dir2, b))).digest, `sha256:${b.split("/").at(-1)}`);
  }
  const index = JSON.parse(await Deno.readTextFile(join(dir2, "index.json")));
  assert.equal(index.manifests.length, 1);
  assert.equal(index.manifests[0].annotations["org.opencontainers.image.ref.name"], "v1");

  // A second fetch downloads nothing.
  const again = await sarde(["fetch", "-d", store2, ref]);
  assert.equal(again.code, 0);
  assert.doesNotMatch(again.stderr, /fetching/);

  // list shows the image, text and JSON.
  const listed = await sarde(["list", "-d", store2, "--format", "json"]);
  const entries = JSON.parse(listed.stdout);
  assert.deepEqual(entries.map((e: api.ImageEntry) => [e.name, e.tag, e.digest, e.id, e.state]), [
    [`${reg.host}/sardines/multi`, "v1", img.manifestDigest, img.configDigest, "missing"],
  ]);
  const text = await sarde(["list", "-d", store2]);
  assert.match(text.stdout, /^SOURCE\s+NAME\s+IMAGE ID\s+STATE\n/);
  assert.match(text.stdout, new RegExp(`${reg.host}/sardines/multi:v1\\s+${img.configDigest}`));

  // getconfig prints the vmconfig layer.
  const cfg = await sarde(["getconfig", "-d", store2, ref]);
  assert.deepEqual(JSON.parse(cfg.stdout), { users: [{ username: "root", password: "sarde" }] });
  await Deno.remove(work, { recursive: true });
});

Deno.test("plain registry: skopeo pushes, sarde fetches (via --source) and pushes on with a mount", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("interop");
  const img = await makeImage(join(work, "src"), "local/thing:t1", [{ size: 2 << 20 }]);
  const remote = `${reg.host}/from/skopeo:t1`;
  await run("skopeo", [
    "copy",
    "--dest-tls-verify=false",
    `oci:${img.dir}:t1`,
    `docker://${remote}`,
  ], { check: true });

  const store = join(work, "store");
  const f = await sarde(["fetch", "-d", store, "mycopy:latest", "--source", remote]);
  assert.equal(f.code, 0, f.stderr);
  assert.equal(f.stdout.trim(), img.manifestDigest);
  assert.ok(
    (await listFiles(join(store, "mycopy"))).includes("index.json"),
    "stored under the local name",
  );

  const p = await sarde([
    "push",
    "-d",
    store,
    "mycopy:latest",
    "--target",
    `${reg.host}/other/repo:t2`,
    "-v",
  ]);
  assert.equal(p.code, 0, p.stderr);
  assert.match(p.stderr, /mounted from another repository/);
  const raw = await run("skopeo", [
    "inspect",
    "--raw",
    "--tls-verify=false",
    `docker://${reg.host}/other/repo:t2`,
  ]);
  assert.equal(JSON.parse(raw.stdout).config.digest, img.configDigest);
  await Deno.remove(work, { recursive: true });
});

Deno.test("large blob: a 1 GiB layer round-trips byte for byte", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("large");
  const ref = `${reg.host}/sardines/big:latest`;
  const img = await makeImage(join(work, "a"), ref, [{ size: 1 << 30, kind: "random" }, {
    size: 4 << 20,
    kind: "text",
  }]);
  const p = await sarde(["push", "-d", join(work, "a"), ref]);
  assert.equal(p.code, 0, p.stderr);
  const f = await sarde(["fetch", "-d", join(work, "b"), ref]);
  assert.equal(f.code, 0, f.stderr);
  const big = img.layers[1];
  const got = await digestFile(
    join(work, "b", reg.host, "sardines", "big", "blobs", "sha256", big.digest.slice(7)),
  );
  assert.deepEqual(got, { digest: big.digest, size: 1 << 30 });
  await Deno.remove(work, { recursive: true });
});

Deno.test("library API: fetch/push/list from another Deno script", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("api");
  const ref = `${reg.host}/api/img:one`;
  const img = await makeImage(join(work, "a"), ref, [{ size: 1 << 20 }]);
  const pushed = await api.push(ref, { ocidir: join(work, "a") });
  assert.equal(pushed.digest, img.manifestDigest);
  const fetched = await api.fetch(ref, { ocidir: join(work, "b") });
  assert.equal(fetched.imageId, img.configDigest);
  assert.equal(fetched.blobsTransferred, 3);
  const entries = await api.list({ ocidir: join(work, "b") });
  assert.equal(entries[0].id, img.configDigest);
  assert.deepEqual(await api.getConfig(ref, { ocidir: join(work, "b") }), {
    users: [{ username: "root", password: "sarde" }],
  });
  await assert.rejects(
    api.fetch(`${reg.host}/api/img:missing`, { ocidir: join(work, "b") }),
    (e: unknown) => e instanceof api.SardeError && e.kind === "not-found",
  );
  await Deno.remove(work, { recursive: true });
});

Deno.test("htpasswd + TLS: login checks credentials, CA options, tls-verify=false", async () => {
  await using reg = await startRegistry("htpasswd-tls");
  const work = await tempDir("tls");
  const authfile = join(work, "auth.json");
  const ref = `${reg.host}/secure/img:v1`;
  await makeImage(join(work, "s"), ref, [{ size: 1 << 20 }]);

  // Untrusted certificate: a clear TLS error.
  const untrusted = await sarde(["push", "-d", join(work, "s"), "--authfile", authfile, ref]);
  assert.equal(untrusted.code, 5, untrusted.stderr);
  assert.match(untrusted.stderr, /certificate/i);
  assert.match(untrusted.stderr, /--cert-dir/);

  // Without credentials: authentication required, with the login hint.
  const anon = await sarde([
    "push",
    "-d",
    join(work, "s"),
    "--authfile",
    authfile,
    "--cert-dir",
    reg.certDir!,
    ref,
  ]);
  assert.equal(anon.code, 4, anon.stderr);
  assert.match(anon.stderr, /sarde login/);

  // Wrong password: login fails and stores nothing; the password is never echoed.
  const wrong = await sarde(
    [
      "login",
      "--authfile",
      authfile,
      "--cert-dir",
      reg.certDir!,
      "-u",
      "sarde",
      "--password-stdin",
      reg.host,
    ],
    { stdin: "definitely-wrong-pw\n" },
  );
  assert.equal(wrong.code, 4, wrong.stderr);
  assert.doesNotMatch(wrong.stderr + wrong.stdout, /definitely-wrong-pw/);
  assert.equal((await listFiles(work)).includes("auth.json"), false);

  const ok = await sarde(
    [
      "login",
      "--authfile",
      authfile,
      "--ca-file",
      reg.caFile!,
      "-u",
      "sarde",
      "--password-stdin",
      reg.host,
    ],
    { stdin: `${reg.password}\n` },
  );
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal((await Deno.stat(authfile)).mode! & 0o777, 0o600);
  assert.doesNotMatch(ok.stderr, new RegExp(reg.password!));

  const p = await sarde([
    "push",
    "-d",
    join(work, "s"),
    "--authfile",
    authfile,
    "--cert-dir",
    reg.certDir!,
    ref,
  ]);
  assert.equal(p.code, 0, p.stderr);
  const f = await sarde([
    "fetch",
    "-d",
    join(work, "f"),
    "--authfile",
    authfile,
    "--tls-verify=false",
    ref,
  ]);
  assert.equal(f.code, 0, f.stderr);

  // skopeo agrees, with the same CA folder.
  const raw = await run("skopeo", [
    "inspect",
    "--raw",
    "--cert-dir",
    reg.certDir!,
    "--creds",
    `sarde:${reg.password}`,
    `docker://${ref}`,
  ]);
  assert.equal(raw.code, 0, raw.stderr);

  const out = await sarde(["logout", "--authfile", authfile, reg.host]);
  assert.equal(out.code, 0, out.stderr);
  const denied = await sarde([
    "fetch",
    "-d",
    join(work, "g"),
    "--authfile",
    authfile,
    "--cert-dir",
    reg.certDir!,
    ref,
  ]);
  assert.equal(denied.code, 4);
  await Deno.remove(work, { recursive: true });
});

Deno.test("token auth: login, push with a push+pull token, anonymous pull, anonymous push denied", async () => {
  await using reg = await startRegistry("token");
  const work = await tempDir("token");
  const authfile = join(work, "auth.json");
  const ref = `${reg.host}/tok/img:v1`;
  await makeImage(join(work, "s"), ref, [{ size: 2 << 20 }]);

  const anonPush = await sarde(["push", "-d", join(work, "s"), "--authfile", authfile, ref]);
  assert.notEqual(anonPush.code, 0);
  assert.match(anonPush.stderr, /sarde login/);

  const bad = await sarde([
    "login",
    "--authfile",
    authfile,
    "-u",
    "sarde",
    "--password-stdin",
    reg.host,
  ], { stdin: "nope" });
  assert.equal(bad.code, 4, bad.stderr);

  const good = await sarde([
    "login",
    "--authfile",
    authfile,
    "-u",
    "sarde",
    "--password-stdin",
    reg.host,
  ], {
    stdin: reg.password!,
  });
  assert.equal(good.code, 0, good.stderr);
  const p = await sarde(["push", "-d", join(work, "s"), "--authfile", authfile, ref]);
  assert.equal(p.code, 0, p.stderr);

  const f = await sarde([
    "fetch",
    "-d",
    join(work, "anon"),
    "--authfile",
    join(work, "none.json"),
    ref,
  ]);
  assert.equal(f.code, 0, f.stderr);
  await Deno.remove(work, { recursive: true });
});

Deno.test("registry capping request bodies: chunked upload with --chunk-size", async () => {
  await using reg = await startRegistry("limited", { maxBodyBytes: 4 << 20 });
  const work = await tempDir("limited");
  const ref = `${reg.host}/capped/img:v1`;
  const img = await makeImage(join(work, "s"), ref, [{ size: 9 << 20, kind: "random" }]);

  const whole = await sarde(["push", "-d", join(work, "s"), ref], { env: FAST_RETRY });
  assert.notEqual(whole.code, 0);
  assert.match(whole.stderr, /413|too large/);
  assert.match(whole.stderr, /--chunk-size/);

  const chunked = await sarde(["push", "-d", join(work, "s"), "--chunk-size", "4MiB", ref]);
  assert.equal(chunked.code, 0, chunked.stderr);
  const f = await sarde(["fetch", "-d", join(work, "f"), ref]);
  assert.equal(f.code, 0, f.stderr);
  assert.equal(f.stdout.trim(), img.manifestDigest);
  await Deno.remove(work, { recursive: true });
});

Deno.test("bad input: malformed reference, missing tag, refused connection", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("bad");
  const malformed = await sarde(["fetch", "-d", work, "Registry.example.org/UPPER:x"]);
  assert.equal(malformed.code, 2);
  assert.match(malformed.stderr, /invalid image reference/);
  assert.doesNotMatch(malformed.stderr, /\s+at /, "no stack trace");

  const missing = await sarde(["fetch", "-d", work, `${reg.host}/nothing/here:v9`]);
  assert.equal(missing.code, 3, missing.stderr);
  assert.match(missing.stderr, /not found/);
  assert.equal(missing.stderr.trim().split("\n").length <= 2, true, "one line (plus hint)");
  const zero = `sha256:${"0".repeat(64)}`;
  const missingDigest = await sarde(["fetch", "-d", work, `${reg.host}/nothing/here@${zero}`]);
  assert.equal(missingDigest.code, 3, missingDigest.stderr);
  assert.match(missingDigest.stderr, new RegExp(`nothing/here@${zero}`), "named as written");
  // A bad VM name is refused before any download (nothing listens on port 1).
  const badName = await sarde(["pull", "-d", work, "-n", "n".repeat(300), "127.0.0.1:1/x:v1"]);
  assert.equal(badName.code, 2, badName.stderr);
  assert.match(badName.stderr, /invalid VM name .*300 bytes long/);

  const refused = await sarde(["fetch", "-d", work, "127.0.0.1:1/nothing/here:v9"], {
    env: FAST_RETRY,
  });
  assert.equal(refused.code, 5, refused.stderr);
  assert.match(refused.stderr, /refused/);

  const noImage = await sarde(["push", "-d", work, `${reg.host}/never/made:v1`]);
  assert.equal(noImage.code, 3);
  assert.deepEqual(await listFiles(work), [], "failed commands leave the store empty");
  await Deno.remove(work, { recursive: true });
});

Deno.test("unknown host: a clear DNS error (in an offline network namespace)", async () => {
  const work = await tempDir("dns");
  const r = await run("unshare", [
    "-n",
    SARDE_PATH(),
    "fetch",
    "-d",
    work,
    "registry.invalid/x/y:z",
  ], { env: FAST_RETRY });
  assert.equal(r.code, 5, r.stderr);
  assert.match(r.stderr, /cannot resolve registry host 'registry\.invalid'/);
  await Deno.remove(work, { recursive: true });
});

function SARDE_PATH(): string {
  return Deno.env.get("SARDE_BIN") ?? new URL("../bin/sarde", import.meta.url).pathname;
}

Deno.test("faults: wrong bytes are refused and nothing is stored", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("corrupt");
  const ref = `${reg.host}/fault/img:v1`;
  await makeImage(join(work, "s"), ref, [{ size: 2 << 20 }]);
  assert.equal((await sarde(["push", "-d", join(work, "s"), ref])).code, 0);

  const proxy = await startFaultyProxy(reg, { kind: "corrupt-blob" });
  try {
    const store = join(work, "f");
    const r = await sarde(["fetch", "-d", store, `${proxy.host}/fault/img:v1`], {
      env: FAST_RETRY,
    });
    assert.equal(r.code, 6, r.stderr);
    assert.match(r.stderr, /failed verification/);
    const files = await listFiles(store);
    assert.deepEqual(blobNames(files), [], `no blobs or partial files kept: ${files}`);
  } finally {
    await proxy.stop();
  }
  await Deno.remove(work, { recursive: true });
});

Deno.test("faults: a connection cut mid-blob is resumed with Range", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("cut");
  const ref = `${reg.host}/fault/cut:v1`;
  const img = await makeImage(join(work, "s"), ref, [{ size: 8 << 20 }]);
  assert.equal((await sarde(["push", "-d", join(work, "s"), ref])).code, 0);
  const proxy = await startFaultyProxy(reg, { kind: "cut-blob", afterBytes: 3 << 20, times: 2 });
  try {
    const store = join(work, "f");
    const r = await sarde(["fetch", "-d", store, `${proxy.host}/fault/cut:v1`], {
      env: FAST_RETRY,
    });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /resuming/);
    const big = img.layers[1];
    const path = join(store, proxy.host, "fault", "cut", "blobs", "sha256", big.digest.slice(7));
    assert.deepEqual(await digestFile(path), { digest: big.digest, size: big.size });
  } finally {
    await proxy.stop();
  }
  await Deno.remove(work, { recursive: true });
});

Deno.test("faults: 503 (with Retry-After) then success is retried", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("503");
  const ref = `${reg.host}/fault/busy:v1`;
  const img = await makeImage(join(work, "s"), ref, [{ size: 1 << 20 }]);
  assert.equal((await sarde(["push", "-d", join(work, "s"), ref])).code, 0);
  const proxy = await startFaultyProxy(reg, {
    kind: "status",
    status: 503,
    times: 2,
    retryAfter: 0,
  });
  try {
    const r = await sarde(["fetch", "-d", join(work, "f"), `${proxy.host}/fault/busy:v1`], {
      env: FAST_RETRY,
    });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), img.manifestDigest);
    assert.match(r.stderr, /503; retrying/);
  } finally {
    await proxy.stop();
  }
  const always = await startFaultyProxy(reg, { kind: "status", status: 503, times: 1000 });
  try {
    const r = await sarde(["fetch", "-d", join(work, "g"), `${always.host}/fault/busy:v1`], {
      env: FAST_RETRY,
    });
    assert.equal(r.code, 5, "bounded retries, then a registry error");
    assert.ok(always.hits() <= 6, `at most 5 attempts, got ${always.hits()}`);
  } finally {
    await always.stop();
  }
  await Deno.remove(work, { recursive: true });
});

Deno.test("concurrency: two fetches of one image at once both succeed and store one copy", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("parallel");
  const ref = `${reg.host}/par/img:v1`;
  const img = await makeImage(join(work, "s"), ref, [{ size: 32 << 20 }, { size: 16 << 20 }]);
  assert.equal((await sarde(["push", "-d", join(work, "s"), ref])).code, 0);
  const store = join(work, "f");
  const [a, b] = await Promise.all([
    sarde(["fetch", "-d", store, ref]),
    sarde(["fetch", "-d", store, ref]),
  ]);
  assert.equal(a.code, 0, a.stderr);
  assert.equal(b.code, 0, b.stderr);
  assert.equal(a.stdout.trim(), img.manifestDigest);
  assert.equal(b.stdout.trim(), img.manifestDigest);
  const downloads = [a, b].filter((r) => /fetching/.test(r.stderr)).length;
  assert.equal(downloads, 1, "exactly one process downloaded the blobs");
  const files = blobNames(await listFiles(join(store, reg.host, "par", "img")));
  assert.equal(files.length, 4 + 1, "config, vmconfig, two layers, manifest; no partial files");
  await Deno.remove(work, { recursive: true });
});

Deno.test("token auth: a docker identitytoken is exchanged with the OAuth2 refresh grant", async () => {
  await using reg = await startRegistry("token");
  const work = await tempDir("identity");
  const ref = `${reg.host}/tok/refresh:v1`;
  await makeImage(join(work, "s"), ref, [{ size: 1 << 20 }]);
  // Get a refresh token the way `docker login` does for OAuth2 registries.
  const form = new URLSearchParams({
    grant_type: "password",
    username: reg.username!,
    password: reg.password!,
    service: "sarde-registry",
    scope: "repository:tok/refresh:pull,push",
    access_type: "offline",
    client_id: "test",
  });
  const res = await fetch(reg.tokenServer!.realm, { method: "POST", body: form });
  const refresh = (await res.json()).refresh_token;
  assert.ok(refresh, "the token server issued a refresh token");
  const dockerDir = join(work, "docker");
  await Deno.mkdir(dockerDir);
  await Deno.writeTextFile(
    join(dockerDir, "config.json"),
    JSON.stringify({ auths: { [reg.host]: { auth: btoa("sarde:"), identitytoken: refresh } } }),
  );
  const env = { DOCKER_CONFIG: dockerDir, HOME: work, XDG_CONFIG_HOME: join(work, "cfg") };
  const p = await sarde(
    ["push", "-d", join(work, "s"), "--authfile", join(work, "none.json"), ref],
    { env },
  );
  assert.equal(p.code, 0, p.stderr);
  const grants = reg.tokenServer!.requests().filter((r) =>
    r.grant === "refresh_token" && r.status === 200
  );
  assert.ok(grants.length >= 1, "the push authenticated with the refresh token");
  assert.doesNotMatch(p.stderr, new RegExp(refresh), "the refresh token is never printed");
  await Deno.remove(work, { recursive: true });
});

Deno.test("redirects: blob downloads follow them without sending Authorization to another host", async () => {
  await using reg = await startRegistry("htpasswd-tls");
  const work = await tempDir("redirect");
  const ref = `${reg.host}/redir/img:v1`;
  const img = await makeImage(join(work, "s"), ref, [{ size: 1 << 20 }]);
  const authfile = join(work, "auth.json");
  await sarde([
    "login",
    "--authfile",
    authfile,
    "--cert-dir",
    reg.certDir!,
    "-u",
    "sarde",
    "--password-stdin",
    reg.host,
  ], {
    stdin: reg.password!,
  });
  assert.equal(
    (await sarde([
      "push",
      "-d",
      join(work, "s"),
      "--authfile",
      authfile,
      "--cert-dir",
      reg.certDir!,
      ref,
    ])).code,
    0,
  );
  // A "storage" host on another port: serves blobs from the registry's files, records headers.
  const seen: (string | null)[] = [];
  const storage = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    seen.push(req.headers.get("authorization"));
    const digest = new URL(req.url).pathname.split("/").at(-1)!;
    const path = join(img.dir, "blobs", "sha256", digest.replace("sha256:", ""));
    return new Response(await Deno.readFile(path));
  });
  // A front that redirects blob GETs to the storage host and proxies the rest to the registry.
  const caCerts = [await Deno.readTextFile(reg.caFile!)];
  const client = Deno.createHttpClient({ caCerts });
  const front = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    const url = new URL(req.url);
    const m = /\/blobs\/(sha256:[a-f0-9]{64})$/.exec(url.pathname);
    if (m && req.method === "GET") {
      return new Response(null, {
        status: 307,
        headers: { location: `http://127.0.0.1:${storage.addr.port}/store/${m[1]}` },
      });
    }
    const upstream = await fetch(`${reg.url}${url.pathname}${url.search}`, {
      method: req.method,
      headers: req.headers,
      client,
      redirect: "manual",
    });
    const headers = new Headers(upstream.headers);
    const auth = headers.get("www-authenticate");
    if (auth) headers.set("www-authenticate", auth);
    return new Response(upstream.body, { status: upstream.status, headers });
  });
  try {
    const frontRef = `127.0.0.1:${front.addr.port}/redir/img:v1`;
    // Credentials for the front host: the same user.
    await sarde([
      "login",
      "--authfile",
      authfile,
      "-u",
      "sarde",
      "--password-stdin",
      `127.0.0.1:${front.addr.port}`,
    ], {
      stdin: reg.password!,
    });
    const f = await sarde(["fetch", "-d", join(work, "f"), "--authfile", authfile, frontRef]);
    assert.equal(f.code, 0, f.stderr);
    assert.equal(f.stdout.trim(), img.manifestDigest);
    assert.ok(seen.length >= 2, "blobs came from the storage host");
    assert.deepEqual(
      seen.filter((h) => h !== null),
      [],
      "no Authorization header reached the other host",
    );
  } finally {
    await front.shutdown();
    await storage.shutdown();
    client.close();
  }
  await Deno.remove(work, { recursive: true });
});

Deno.test("fake registry: a web server answering 200 with HTML to everything gets no push and no login", async () => {
  await using web = await startHtmlServer();
  const work = await tempDir("html");
  const authfile = join(work, "auth.json");
  const ref = `${web.host}/sardines/img:v1`;
  await makeImage(join(work, "s"), ref, [{ size: 1 << 20 }]);

  const p = await sarde(["push", "-d", join(work, "s"), "--authfile", authfile, ref]);
  assert.equal(p.code, 5, p.stderr);
  assert.match(p.stderr, /does not behave like an OCI registry/);
  assert.doesNotMatch(p.stdout, /sha256:/, "no digest printed: nothing was pushed");

  const l = await sarde(
    ["login", "--authfile", authfile, "-u", "sarde", "--password-stdin", web.host],
    { stdin: "secret\n" },
  );
  assert.equal(l.code, 5, l.stderr);
  assert.match(l.stderr, /does not behave like an OCI registry/);
  assert.doesNotMatch(l.stderr, /Login succeeded/);
  assert.equal((await listFiles(work)).includes("auth.json"), false, "no credentials stored");
  await Deno.remove(work, { recursive: true });
});

Deno.test("fake registry: a host answering GET /v2/ with 404, 405 or 400 is no registry (exit 5, not 'not found')", async () => {
  const work = await tempDir("no-v2");
  await makeImage(join(work, "s"), "local/img:v1", [{ size: 1 << 20 }]);
  for (const status of [404, 405, 400]) {
    await using web = await startHtmlServer(status);
    const f = await sarde(["fetch", "-d", join(work, "f"), `${web.host}/sardines/img:v1`]);
    assert.equal(f.code, 5, f.stderr);
    assert.match(
      f.stderr,
      new RegExp(`does not behave like an OCI registry: GET /v2/ answered HTTP ${status}`),
    );
    const p = await sarde([
      "push",
      "-d",
      join(work, "s"),
      "local/img:v1",
      "-t",
      `${web.host}/a:v1`,
    ]);
    assert.equal(p.code, 5, p.stderr);
    assert.match(p.stderr, /does not behave like an OCI registry/);
    assert.ok(web.requests().every((r) => r.path === "/v2/"), "nothing but the API check sent");
  }
  await Deno.remove(work, { recursive: true });
});

Deno.test("registry answers that prove enough: blob HEADs with the digest or the size, manifest PUTs answered 200/202 with the digest", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("proofs");
  const ocidir = join(work, "s");
  const img = await makeImage(ocidir, "local/img:v1", [{ size: 1 << 20 }]);
  const blobCount = img.layers.length + 1;
  assert.equal(
    (await api.push("local/img:v1", { ocidir, target: `${reg.host}/p/img:v1` })).digest,
    img.manifestDigest,
  );
  const cases: [string, Fault][] = [
    // Proxies and CDNs strip or zero a HEAD's Content-Length (Deno's server turns a missing one
    // into 0): the exact digest proves the blob.
    ["HEAD with the digest and Content-Length 0", {
      kind: "rewrite",
      requests: "blob-head",
      headers: { "content-length": "0" },
    }],
    ["HEAD with the size and no digest", {
      kind: "rewrite",
      requests: "blob-head",
      headers: { "docker-content-digest": null },
    }],
    ["manifest PUT answered 202 with the digest", {
      kind: "rewrite",
      requests: "manifest-put",
      status: 202,
    }],
    ["manifest PUT answered 200 with the digest", {
      kind: "rewrite",
      requests: "manifest-put",
      status: 200,
    }],
  ];
  for (const [what, fault] of cases) {
    await using proxy = await startFaultyProxy(reg, fault);
    const r = await api.push("local/img:v1", { ocidir, target: `${proxy.host}/p/img:v1` }).catch(
      (e) => assert.fail(`${what}: ${e}`),
    );
    assert.equal(r.digest, img.manifestDigest, what);
    assert.equal(r.blobsSkipped, blobCount, `${what}: the registry's blobs were believed`);
    assert.ok(proxy.faults() > 0, `${what}: the answers were rewritten`);
  }
  await Deno.remove(work, { recursive: true });
});

Deno.test("push -t: a mount source the registry does not know (202 or 404 to a mount) is asked once, and the blobs are uploaded", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("mount-refused");
  for (const answer of ["registry", 404] as const) {
    // Refused mounts: distribution opens an upload instead (202), other registries say 404.
    await using proxy = answer === "registry"
      ? await startForwarder(reg, freePort())
      : await startFaultyProxy(reg, {
        kind: "status",
        status: 404,
        times: 1000,
        requests: "mount",
      });
    const ocidir = join(work, `s-${answer}`);
    // The local name and the recorded origin name two repositories that do not exist.
    const img = await makeImage(ocidir, `${proxy.host}/ghost/img:v1`, [
      { size: 1 << 20 },
      { size: 1 << 20 },
      { size: 1 << 20 },
    ]);
    await Deno.writeTextFile(
      join(img.dir, ".sarde-origin.json"),
      JSON.stringify({ registry: proxy.host, repository: "gone/repo" }),
    );
    const r = await api.push(`${proxy.host}/ghost/img:v1`, {
      ocidir,
      target: `${proxy.host}/real-${answer}/img:v1`,
      concurrency: 4,
    });
    assert.equal(r.digest, img.manifestDigest, `${answer}`);
    assert.equal(r.blobsTransferred, img.layers.length + 1, `${answer}: all uploaded`);
    assert.equal(r.blobsMounted, 0);
    const mounts = proxy.requests().filter((q) => q.method === "POST" && q.path.includes("mount="));
    assert.deepEqual(
      mounts.map((q) => new URL(q.path, "http://x").searchParams.get("from")).sort(),
      ["ghost/img", "gone/repo"],
      `${answer}: one mount attempt per source, not one per blob`,
    );
  }
  await Deno.remove(work, { recursive: true });
});

Deno.test("push -t: a mount source holding an older version mounts the shared layers (new config and layers are uploaded)", async () => {
  await using reg = await startRegistry("plain");
  await using proxy = await startForwarder(reg, freePort());
  const work = await tempDir("mount-partial");
  const ocidir = join(work, "s");
  const ref = `${proxy.host}/src/img:v1`;
  const img = await makeImage(ocidir, ref, [{ size: 1 << 20 }, { size: 1 << 20 }]);
  await api.push(ref, { ocidir });
  // The source lacks the config and a layer in the middle, as if it held an older version.
  const [config, changed] = [img.configDigest, img.layers[1].digest];
  for (const digest of [config, changed]) {
    const del = await fetch(`${reg.url}/v2/src/img/blobs/${digest}`, { method: "DELETE" });
    await del.body?.cancel();
    assert.equal(del.status, 202);
  }
  const r = await api.push(ref, { ocidir, target: `${proxy.host}/dst/img:v1` });
  assert.equal(r.blobsMounted, img.layers.length - 1, "the shared layers mounted");
  assert.equal(r.blobsTransferred, 2, "the new config and layer uploaded");
  const mounts = proxy.requests().filter((q) => q.method === "POST" && q.path.includes("mount="));
  assert.equal(mounts.length, img.layers.length + 1, "every blob was asked for");
  await Deno.remove(work, { recursive: true });
});

Deno.test("fake registry: a blob HEAD or a manifest PUT answered with an HTML page fails the push", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("html-proxy");
  const img = await makeImage(join(work, "s"), "local/img:v1", [{ size: 1 << 20 }]);
  for (const requests of ["blob-head", "manifest-put"] as const) {
    await using proxy = await startFaultyProxy(reg, { kind: "html", requests });
    const target = `${proxy.host}/html/${requests}:v1`;
    const p = await sarde(["push", "-d", join(work, "s"), "local/img:v1", "-t", target]);
    assert.equal(p.code, 5, p.stderr);
    assert.match(p.stderr, /does not behave like an OCI registry/);
    assert.match(p.stderr, requests === "blob-head" ? /HEAD of blob/ : /instead of 201 Created/);
    assert.ok(proxy.faults() > 0, "the fake answers were given");
    const inspect = await run("skopeo", [
      "inspect",
      "--raw",
      "--tls-verify=false",
      `docker://${reg.host}/html/${requests}:v1`,
    ]);
    if (requests === "blob-head") assert.notEqual(inspect.code, 0, "no manifest was pushed");
  }
  // The real registry behind it is fine with the same push.
  const ok = await sarde(["push", "-d", join(work, "s"), "local/img:v1", "-t", `${reg.host}/x:v1`]);
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(ok.stdout.trim(), img.manifestDigest);
  await Deno.remove(work, { recursive: true });
});

Deno.test("deadlines: a registry that accepts connections and never answers fails within the limits", async () => {
  await using hole = startBlackHole();
  const work = await tempDir("blackhole");
  for (const insecure of [false, true]) {
    const t0 = Date.now();
    await assert.rejects(
      api.fetch(`${hole.host}/never/answers:v1`, {
        ocidir: work,
        insecure,
        responseTimeoutMs: 300,
        retry: { maxElapsedMs: 2000 },
        // Before deadlines existed this took 4 to 10 minutes; stop waiting long before that.
        signal: AbortSignal.timeout(60_000),
      }),
      (e: unknown) => {
        assert.ok(e instanceof api.SardeError, String(e));
        assert.equal(e.exitCode, 5, e.message);
        assert.match(e.message, /no answer within 0\.3 s \(response timeout\)/);
        assert.match(e.message, /gave up after \d+ attempts? in \d+\.\d s/);
        return true;
      },
    );
    assert.ok(Date.now() - t0 < 30_000, `gave up in ${Date.now() - t0} ms`);
  }
  assert.ok(hole.connections() >= 2, "it was tried more than once");
  assert.deepEqual(await listFiles(work), [], "nothing stored");
  await Deno.remove(work, { recursive: true });
});

Deno.test("deadlines: a download that stalls mid-blob is resumed after the response timeout", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("stall");
  const ref = `${reg.host}/fault/stall:v1`;
  const img = await makeImage(join(work, "s"), ref, [{ size: 8 << 20 }]);
  assert.equal((await sarde(["push", "-d", join(work, "s"), ref])).code, 0);
  await using proxy = await startFaultyProxy(reg, {
    kind: "stall-blob",
    afterBytes: 3 << 20,
    times: 1,
  });
  const store = join(work, "f");
  const t0 = Date.now();
  const r = await api.fetch(`${proxy.host}/fault/stall:v1`, {
    ocidir: store,
    responseTimeoutMs: 1000,
    signal: AbortSignal.timeout(60_000), // the old fixed idle timeout was 120 s
  });
  assert.ok(Date.now() - t0 < 60_000);
  assert.equal(r.digest, img.manifestDigest);
  assert.equal(proxy.faults(), 1, "the download stalled once");
  const big = img.layers[1];
  const path = join(store, proxy.host, "fault", "stall", "blobs", "sha256", big.digest.slice(7));
  assert.deepEqual(await digestFile(path), { digest: big.digest, size: big.size });
  await Deno.remove(work, { recursive: true });
});

Deno.test("deadlines: a blob commit (closing PUT) that answers late is waited for or found with HEAD, not uploaded again", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("late-commit");
  const ocidir = join(work, "s");
  const img = await makeImage(ocidir, "local/img:v1", [{ size: 2 << 20 }, { size: 1 << 20 }]);
  const blobs = img.layers.length + 1;
  const config = await Deno.stat(join(img.dir, "blobs", "sha256", img.configDigest.slice(7)));
  const bytes = img.layers.reduce((n, l) => n + l.size, config.size);
  // The closing PUT's answer comes after 2.5 response timeouts (waited for: a commit may take
  // 6), then after 9 (given up; a HEAD finds the blob the registry stored meanwhile).
  for (const delayMs of [2500, 9000]) {
    await using proxy = await startFaultyProxy(reg, {
      kind: "late-answer",
      requests: "blob-commit",
      delayMs,
      times: 1,
    });
    const r = await api.push("local/img:v1", {
      ocidir,
      target: `${proxy.host}/late-${delayMs}/img:v1`,
      responseTimeoutMs: 1000,
    });
    assert.equal(r.digest, img.manifestDigest);
    assert.equal(proxy.faults(), 1, "one commit answered late");
    const seen = proxy.requests();
    const uploads = seen.filter((q) => q.method === "POST" && /\/blobs\/uploads\/$/.test(q.path));
    assert.equal(uploads.length, blobs, `${delayMs} ms: one upload per blob, none restarted`);
    const sent = seen.filter((q) => q.method === "PATCH").reduce((n, q) => n + q.contentLength!, 0);
    assert.equal(sent, bytes, `${delayMs} ms: every byte sent once`);
    const heads = seen.filter((q) => q.method === "HEAD").length;
    assert.equal(
      heads,
      blobs + (delayMs > 6000 ? 1 : 0),
      `${delayMs} ms: HEAD only after a timeout`,
    );
  }
  await Deno.remove(work, { recursive: true });
});

Deno.test("retries: a refused connection to a loopback registry is retried (no --insecure)", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("refused-retry");
  const img = await makeImage(join(work, "s"), `${reg.host}/late/img:v1`, [{ size: 1 << 20 }]);
  assert.equal((await sarde(["push", "-d", join(work, "s"), `${reg.host}/late/img:v1`])).code, 0);
  // Nothing listens on `port` until the fetch said it will retry; then a forwarder starts there.
  const port = freePort();
  const fetch = spawnSarde(["fetch", "-d", join(work, "f"), `127.0.0.1:${port}/late/img:v1`], {
    env: { SARDE_RETRY_BASE_MS: "1000" },
  });
  await fetch.stderrMatches(/refused; retrying/);
  await using _forwarder = await startForwarder(reg, port);
  const r = await fetch.done();
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.trim(), img.manifestDigest);
  await Deno.remove(work, { recursive: true });
});

Deno.test("push -t another repository of the same registry mounts the blobs instead of uploading them", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("mount");
  const ocidir = join(work, "s");
  const ref = `${reg.host}/src/img:v1`;
  const img = await makeImage(ocidir, ref, [{ size: 2 << 20 }, { size: 1 << 20 }]);
  const first = await api.push(ref, { ocidir });
  assert.equal(first.blobsTransferred, img.layers.length + 1);

  const again = await api.push(ref, { ocidir, target: `${reg.host}/other/img:v2` });
  assert.equal(again.digest, img.manifestDigest);
  assert.equal(again.blobsMounted, img.layers.length + 1, "config and layers mounted");
  assert.equal(again.blobsTransferred, 0);
  assert.equal(again.blobBytes, 0, "nothing uploaded");
  const raw = await run("skopeo", [
    "inspect",
    "--raw",
    "--tls-verify=false",
    `docker://${reg.host}/other/img:v2`,
  ], { check: true });
  assert.equal(JSON.parse(raw.stdout).config.digest, img.configDigest);
  await Deno.remove(work, { recursive: true });
});

Deno.test("token auth: a plain-http token realm of an https registry gets no credentials", async () => {
  await using reg = await startRegistry("token-tls");
  const work = await tempDir("http-realm");
  const authfile = join(work, "auth.json");
  const tls = ["--cert-dir", reg.certDir!];
  const login = await sarde(
    ["login", "--authfile", authfile, ...tls, "-u", reg.username!, "--password-stdin", reg.host],
    { stdin: reg.password! },
  );
  assert.equal(login.code, 4, login.stderr);
  assert.match(login.stderr, /over plain http; refused, as the registry itself uses https/);
  assert.equal((await listFiles(work)).includes("auth.json"), false, "nothing stored");

  // Stored credentials (from elsewhere) are not sent there either.
  await Deno.writeTextFile(
    authfile,
    JSON.stringify({ auths: { [reg.host]: { auth: btoa(`${reg.username}:${reg.password}`) } } }),
  );
  const ref = `${reg.host}/realm/img:v1`;
  await makeImage(join(work, "s"), ref, [{ size: 1 << 20 }]);
  const push = await sarde(["push", "-d", join(work, "s"), "--authfile", authfile, ...tls, ref]);
  assert.equal(push.code, 4, push.stderr);
  assert.match(push.stderr, /plain http/);
  assert.deepEqual(
    reg.tokenServer!.requests().filter((r) => r.grant !== "anonymous"),
    [],
    "no Authorization header or credential reached the realm",
  );

  // Anonymous tokens carry no secret: an anonymous pull still gets that far (not found).
  const anon = await sarde([
    "fetch",
    "-d",
    join(work, "f"),
    "--authfile",
    join(work, "none.json"),
    ...tls,
    `${reg.host}/realm/missing:v1`,
  ]);
  assert.equal(anon.code, 3, anon.stderr);
  await Deno.remove(work, { recursive: true });
});
