/**
 * Mirrors and blocked registries (containers-registries.conf) end to end, with real registries on
 * 127.0.0.1: an upstream distribution, a second one in proxy mode (a pull-through cache) as the
 * mirror, counting forwarders in front of both, and skopeo reading the same file.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { makeImage, run, sarde, tempDir } from "./support/images.ts";
import {
  freePort,
  type RunningProxy,
  startBlackHole,
  startFaultyProxy,
  startForwarder,
  startRegistry,
  type TestRegistry,
} from "./support/registry.ts";
import { listFiles } from "./support/images.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

/** An upstream registry, a pull-through cache of it, and counting forwarders in front of both. */
interface Fleet {
  upstream: TestRegistry;
  cache: TestRegistry;
  /** What image references name: forwards to the upstream. */
  primary: RunningProxy;
  /** Forwards to the cache (which reaches the upstream directly, not through `primary`). */
  mirror: RunningProxy;
  dir: string;
  /** `SARDE_REGISTRIES_CONF_DIR` (empty: the host's drop-ins stay out of the test). */
  env: Record<string, string>;
  stop(): Promise<void>;
}

async function startFleet(): Promise<Fleet> {
  const upstream = await startRegistry("plain");
  const cache = await startRegistry("plain", { proxyRemoteUrl: upstream.url });
  const primary = await startForwarder({ url: upstream.url }, freePort());
  const mirror = await startForwarder({ url: cache.url }, freePort());
  const dir = await tempDir("mirrors");
  await Deno.mkdir(join(dir, "conf.d"));
  return {
    upstream,
    cache,
    primary,
    mirror,
    dir,
    env: { SARDE_REGISTRIES_CONF_DIR: join(dir, "conf.d") },
    async stop() {
      await Promise.all([primary.stop(), mirror.stop(), upstream.stop(), cache.stop()]);
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** Writes a registries.conf with the given mirrors for `primary` (all plain http). */
async function writeConf(fleet: Fleet, primary: string, mirrors: string[]): Promise<string> {
  const file = join(fleet.dir, `registries-${crypto.randomUUID()}.conf`);
  await Deno.writeTextFile(
    file,
    [
      'unqualified-search-registries = ["docker.io"]',
      "[[registry]]",
      `location = "${primary}"`,
      "insecure = true",
      ...mirrors.flatMap((m) => ["[[registry.mirror]]", `location = "${m}"`, "insecure = true"]),
      "",
    ].join("\n"),
  );
  return file;
}

/** Pushes a small image (config + 3 layers) to the upstream through `primary`. */
async function pushImage(fleet: Fleet, conf: string) {
  const ref = `${fleet.primary.host}/sarde/vm:1`;
  const src = join(fleet.dir, "src");
  const image = await makeImage(src, ref, [{ size: 3 << 20 }, { size: 1 << 20 }, { size: 5000 }]);
  const r = await sarde(["push", "-q", "--registries-conf", conf, "-d", src, ref], {
    env: fleet.env,
  });
  assert.equal(r.code, 0, r.stderr);
  return { ref, image, blobs: [image.configDigest, ...image.layers.map((l) => l.digest)] };
}

const blobGets = (p: RunningProxy) =>
  p.requests().filter((r) => r.method === "GET" && r.path.includes("/blobs/sha256:")).length;

/** Whether the cache has stored every blob (it stores them after streaming them out). */
async function cached(cache: TestRegistry, digests: string[]): Promise<boolean> {
  for (const d of digests) {
    const hex = d.slice("sha256:".length);
    const path = join(
      cache.dataDir,
      "docker/registry/v2/blobs/sha256",
      hex.slice(0, 2),
      hex,
      "data",
    );
    if (!await Deno.stat(path).then(() => true, () => false)) return false;
  }
  return true;
}

Deno.test(
  "a pull goes through the mirror; with the upstream down a pull by digest is served from the cache",
  opts,
  async () => {
    const fleet = await startFleet();
    try {
      const conf = await writeConf(fleet, fleet.primary.host, [fleet.mirror.host]);
      const { ref, image, blobs } = await pushImage(fleet, conf);
      const primaryBefore = fleet.primary.hits();

      const store = join(fleet.dir, "store1");
      const r = await sarde(["fetch", "--registries-conf", conf, "-d", store, ref], {
        env: fleet.env,
      });
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), image.manifestDigest);
      assert.match(r.stderr, new RegExp(`fetched .* through mirror ${fleet.mirror.host}\\n`));
      assert.equal(fleet.primary.hits(), primaryBefore, "sarde did not contact the primary");
      assert.equal(blobGets(fleet.mirror), blobs.length);

      // skopeo reads the same file and goes through the mirror too.
      const mirrorBefore = fleet.mirror.hits();
      const raw = await run(
        "skopeo",
        ["--registries-conf", conf, "inspect", "--raw", `docker://${ref}`],
        { env: { ...fleet.env } },
      );
      assert.equal(raw.code, 0, raw.stderr);
      assert.ok(fleet.mirror.hits() > mirrorBefore, "skopeo asked the mirror");
      assert.equal(fleet.primary.hits(), primaryBefore, "skopeo did not contact the primary");

      // The cache keeps blobs after it has streamed them; then the upstream goes away.
      const deadline = Date.now() + 60_000;
      while (!await cached(fleet.cache, blobs)) {
        assert.ok(Date.now() < deadline, "the cache stored the blobs");
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      await fleet.upstream.stop();

      const byDigest = `${fleet.primary.host}/sarde/vm@${image.manifestDigest}`;
      const store2 = join(fleet.dir, "store2");
      const r2 = await sarde(["fetch", "--registries-conf", conf, "-d", store2, byDigest], {
        env: fleet.env,
      });
      assert.equal(r2.code, 0, r2.stderr);
      assert.equal(r2.stdout.trim(), image.manifestDigest);
      assert.match(r2.stderr, /through mirror/);
      const files = await listFiles(store2);
      for (const d of blobs) {
        assert.ok(files.some((f) => f.endsWith(d.slice("sha256:".length))), `${d} stored`);
      }
    } finally {
      await fleet.stop();
    }
  },
);

Deno.test(
  "failing mirrors (refused, 404, corrupt blob) are skipped with a note; the primary serves",
  opts,
  async () => {
    const fleet = await startFleet();
    const empty = await startRegistry("plain"); // answers 404 (manifest unknown)
    try {
      const direct = await writeConf(fleet, fleet.primary.host, []);
      const { ref, image, blobs } = await pushImage(fleet, direct);

      const dead = `127.0.0.1:${freePort()}`; // nothing listens there: connection refused
      const conf = await writeConf(fleet, fleet.primary.host, [dead, empty.host]);
      const before = fleet.primary.hits();
      const r = await sarde(
        ["fetch", "--registries-conf", conf, "-d", join(fleet.dir, "s1"), ref],
        {
          env: { ...fleet.env, SARDE_RETRY_BASE_MS: "10" },
        },
      );
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), image.manifestDigest);
      assert.match(r.stderr, new RegExp(`mirror ${dead} skipped: [^\\n]+\\n`));
      assert.match(
        r.stderr,
        new RegExp(`mirror ${empty.host} skipped: [^\\n]*not found[^\\n]*\\n`, "i"),
      );
      assert.match(r.stderr, /from the primary location, not a mirror/);
      assert.equal(blobGets(fleet.primary), blobs.length);
      assert.ok(fleet.primary.hits() > before);

      // A mirror that corrupts a blob: the digest check catches it, the primary sends that blob.
      const bad = await startFaultyProxy({ url: fleet.cache.url }, {
        kind: "corrupt-blob",
        digests: [image.layers[1].digest],
      });
      try {
        const conf2 = await writeConf(fleet, fleet.primary.host, [bad.host]);
        const getsBefore = blobGets(fleet.primary);
        const store = join(fleet.dir, "s2");
        const r2 = await sarde(["fetch", "--registries-conf", conf2, "-d", store, ref], {
          env: fleet.env,
        });
        assert.equal(r2.code, 0, r2.stderr);
        assert.match(r2.stderr, new RegExp(`mirror ${bad.host} skipped: [^\\n]*digest`));
        assert.match(r2.stderr, /through mirror .* and the primary location/);
        assert.ok(blobGets(fleet.primary) > getsBefore, "the primary sent the corrupted blob");
        assert.ok(bad.faults() > 0);
        // Everything stored is what was pushed.
        const again = await sarde(
          ["fetch", "--registries-conf", direct, "-d", store, ref],
          { env: fleet.env },
        );
        assert.equal(again.code, 0, again.stderr);
        assert.match(again.stderr, new RegExp(`no blobs, ${blobs.length} already there`));
      } finally {
        await bad.stop();
      }
    } finally {
      await empty.stop();
      await fleet.stop();
    }
  },
);

Deno.test(
  "a blocked registry is refused with exit 2 before any connection, by sarde and by skopeo",
  opts,
  async () => {
    const hole = startBlackHole();
    const dir = await tempDir("blocked");
    try {
      const conf = join(dir, "registries.conf");
      await Deno.writeTextFile(
        conf,
        `[[registry]]\nprefix = "${hole.host}/sarde"\nlocation = "${hole.host}/sarde"\nblocked = true\n`,
      );
      const env = { SARDE_REGISTRIES_CONF_DIR: join(dir, "none") };
      const ref = `${hole.host}/sarde/vm:1`;
      const store = join(dir, "store");
      await makeImage(store, ref, [{ size: 1000 }]);
      for (
        const args of [
          ["fetch", "-d", join(dir, "fetched"), ref],
          ["pull", "-d", join(dir, "pulled"), "-o", join(dir, "vms"), ref],
          ["push", "-d", store, ref],
        ]
      ) {
        const r = await sarde([...args, "--registries-conf", conf], { env });
        assert.equal(r.code, 2, `${args[0]}: ${r.stderr}`);
        assert.match(r.stderr, new RegExp(`registry ${hole.host}/sarde is blocked in ${conf}`));
        assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
      }
      // The same through $CONTAINERS_REGISTRIES_CONF.
      const viaEnv = await sarde(["fetch", "-d", join(dir, "fetched"), ref], {
        env: { ...env, CONTAINERS_REGISTRIES_CONF: conf },
      });
      assert.equal(viaEnv.code, 2, viaEnv.stderr);
      assert.equal(hole.connections(), 0, "nothing connected to the blocked registry");

      const skopeo = await run("skopeo", [
        "--registries-conf",
        conf,
        "inspect",
        "--raw",
        "--tls-verify=false",
        `docker://${ref}`,
      ]);
      assert.notEqual(skopeo.code, 0);
      assert.match(skopeo.stderr, /blocked/);
      assert.equal(hole.connections(), 0, "skopeo did not connect either");

      // A broken file is a one-line usage error naming it.
      await Deno.writeTextFile(conf, "[[registry]\n");
      const broken = await sarde(["fetch", "--registries-conf", conf, "-d", store, ref], { env });
      assert.equal(broken.code, 2);
      assert.match(broken.stderr, new RegExp(`${conf}: not valid TOML`));
    } finally {
      await hole.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test("credentials and CAs are those of the mirror actually contacted", opts, async () => {
  const fleet = await startFleet();
  const secure = await startRegistry("htpasswd-tls");
  try {
    const direct = await writeConf(fleet, fleet.primary.host, []);
    const { ref, image } = await pushImage(fleet, direct);
    const authfile = join(fleet.dir, "auth.json");
    await Deno.writeTextFile(
      authfile,
      JSON.stringify({
        auths: { [secure.host]: { auth: btoa(`${secure.username}:${secure.password}`) } },
      }),
    );
    const tls = ["--authfile", authfile, "--cert-dir", secure.certDir!];
    const copy = await sarde([
      "push",
      "-q",
      ...tls,
      "--registries-conf",
      direct,
      "-d",
      join(fleet.dir, "src"),
      ref,
      "-t",
      `${secure.host}/sarde/vm:1`,
    ], { env: fleet.env });
    assert.equal(copy.code, 0, copy.stderr);
    const conf = join(fleet.dir, "secure.conf");
    await Deno.writeTextFile(
      conf,
      `[[registry]]\nlocation = "${fleet.primary.host}"\ninsecure = true\n` +
        `[[registry.mirror]]\nlocation = "${secure.host}"\n`,
    );
    const before = fleet.primary.hits();
    const r = await sarde(
      ["fetch", ...tls, "--registries-conf", conf, "-d", join(fleet.dir, "s1"), ref],
      { env: fleet.env },
    );
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), image.manifestDigest);
    assert.match(r.stderr, new RegExp(`through mirror ${secure.host}\\n`));
    assert.equal(fleet.primary.hits(), before, "the primary was not contacted");

    // Without the mirror's credentials it is skipped, and the primary serves.
    const anon = await sarde(
      [
        "fetch",
        "--cert-dir",
        secure.certDir!,
        "--registries-conf",
        conf,
        "-d",
        join(fleet.dir, "s2"),
        ref,
      ],
      { env: fleet.env },
    );
    assert.equal(anon.code, 0, anon.stderr);
    assert.match(anon.stderr, new RegExp(`mirror ${secure.host} skipped: [^\\n]*(401|auth)`, "i"));
    assert.ok(fleet.primary.hits() > before);
  } finally {
    await secure.stop();
    await fleet.stop();
  }
});
