/**
 * Signature verification under a trust policy: first against signatures real cosign made
 * (containers/image's fixtures, with the outcomes of upstream's `policy_eval_sigstore_test.go`),
 * then end to end with a real registry on 127.0.0.1: images pushed with sarde, sigstore
 * attachments built here with node:crypto (ECDSA P-256 over SHA-256, DER) and uploaded in
 * cosign's layout, `sarde fetch`/`pull` under a policy, and skopeo under the same policy.
 */
import assert from "node:assert/strict";
import { generateKeyPairSync, type KeyObject, sign } from "node:crypto";
import { Buffer } from "node:buffer";
import { join } from "node:path";
import { SardeError } from "../lib/util/errors.ts";
import { digestOf } from "../lib/oci/digest.ts";
import { parseReference } from "../lib/oci/reference.ts";
import { parsePolicy } from "../lib/trust/policy.ts";
import type { RegistriesD } from "../lib/trust/registries_d.ts";
import {
  SIGNATURE_ANNOTATION,
  SIGNATURE_TYPE,
  signatureTag,
  SIMPLE_SIGNING_MEDIA_TYPE,
  type UntrustedSignature,
} from "../lib/trust/signature.ts";
import { verifyImage } from "../lib/trust/verify.ts";
import {
  cosignFixtures,
  dirImageSignatures,
  readSigstoreFixture,
} from "./support/cosign_fixtures.ts";
import { listFiles, makeImage, run, sarde, tempDir } from "./support/images.ts";
import { startRegistry, type TestRegistry } from "./support/registry.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };
const attachmentsOn: RegistriesD = {
  dir: "test",
  defaultDocker: { useSigstoreAttachments: true },
  docker: new Map(),
};
/** The reference cosign signed the fixtures for (no tag: upstream's tests use a bare name). */
const COSIGN_REF = "192.168.64.2:5000/cosign-signed-single-sample";

/** A policy whose default is one sigstoreSigned requirement. */
function sigstorePolicy(key: Record<string, unknown>, signedIdentity?: Record<string, unknown>) {
  return parsePolicy(
    JSON.stringify({ default: [{ type: "sigstoreSigned", ...key, signedIdentity }] }),
    "test-policy.json",
  );
}

/** Runs verifyImage on a `dir-img-*` fixture; resolves to "accepted" or the refusal's message. */
async function verifyFixture(
  dir: string,
  reference: string,
  policy: ReturnType<typeof parsePolicy>,
  signatures?: UntrustedSignature[],
): Promise<string> {
  const fixtures = await cosignFixtures();
  const manifest = await Deno.readFile(join(fixtures, dir, "manifest.json"));
  try {
    await verifyImage({
      policy,
      registriesD: attachmentsOn,
      reference: parseReference(reference),
      manifestDigest: digestOf(manifest),
      fetchSignatures: async () => signatures ?? await dirImageSignatures(join(fixtures, dir)),
    });
    return "accepted";
  } catch (err) {
    if (!(err instanceof SardeError) || err.kind !== "trust") throw err;
    assert.ok(!err.message.includes("\n"), "one line");
    return err.message;
  }
}

Deno.test("cosign fixtures: sarde accepts and refuses what containers/image's own tests do", async () => {
  const fixtures = await cosignFixtures();
  const keyPath = join(fixtures, "cosign.pub");
  const keyData = btoa(await Deno.readTextFile(keyPath));
  const repo = { type: "matchRepository" };
  const byPath = sigstorePolicy({ keyPath }, repo);
  const accepted = (s: string) => assert.equal(s, "accepted");
  const refused = (s: string, re: RegExp) => assert.match(s, re);

  // A single valid signature, key by path or inline.
  accepted(await verifyFixture("dir-img-cosign-valid", COSIGN_REF, byPath));
  accepted(
    await verifyFixture("dir-img-cosign-valid", COSIGN_REF, sigstorePolicy({ keyData }, repo)),
  );
  accepted(
    await verifyFixture(
      "dir-img-cosign-valid",
      COSIGN_REF,
      sigstorePolicy({ keyDatas: [keyData] }, repo),
    ),
  );
  // A key that does not exist, or data that is no public key.
  refused(
    await verifyFixture(
      "dir-img-cosign-valid",
      COSIGN_REF,
      sigstorePolicy({ keyPath: "/this/does/not/exist" }, repo),
    ),
    /cannot read public key \/this\/does\/not\/exist/,
  );
  refused(
    await verifyFixture("dir-img-cosign-valid", COSIGN_REF, sigstorePolicy({ keyData: "" }, repo)),
    /public key in keyData is not a PEM public key/,
  );
  // No cryptographic signature, a signature that does not verify, another key's signature.
  const [valid] = await dirImageSignatures(join(fixtures, "dir-img-cosign-valid"));
  refused(
    await verifyFixture("dir-img-cosign-valid", COSIGN_REF, byPath, [{
      ...valid,
      annotations: {},
    }]),
    /missing dev\.cosignproject\.cosign\/signature annotation/,
  );
  refused(
    await verifyFixture("dir-img-cosign-valid", COSIGN_REF, byPath, [{
      ...valid,
      annotations: { [SIGNATURE_ANNOTATION]: btoa("invalid signature") },
    }]),
    /wrong key/,
  );
  refused(
    await verifyFixture("dir-img-cosign-valid", COSIGN_REF, byPath, [
      await readSigstoreFixture(join(fixtures, "unknown-cosign-key.signature")),
    ]),
    /wrong key/,
  );
  // A valid signature with an identity the policy does not accept.
  refused(
    await verifyFixture(
      "dir-img-cosign-valid",
      COSIGN_REF,
      sigstorePolicy({ keyPath }, { type: "exactReference", dockerReference: "this/doesnt:match" }),
    ),
    /identity mismatch: signed for 192\.168\.64\.2:5000\/cosign-signed-single-sample, not accepted/,
  );
  // The manifest's digest cannot be computed upstream (schema 1); here it simply differs.
  refused(
    await verifyFixture("dir-img-cosign-manifest-digest-error", COSIGN_REF, byPath),
    /digest mismatch: signed for manifest sha256:634a8f35/,
  );
  // A valid signature for another manifest.
  refused(
    await verifyFixture("dir-img-cosign-modified-manifest", COSIGN_REF, byPath),
    /digest mismatch/,
  );
  // (dir-img-cosign-no-manifest has no counterpart: sarde verifies the manifest it fetched.)

  // matchExact: a signature of skopeo (with a tag) for that tag only; cosign's (no tag) never.
  const exact = sigstorePolicy({ keyPath }, { type: "matchExact" });
  accepted(
    await verifyFixture(
      "dir-img-cosign-valid-with-tag",
      "192.168.64.2:5000/skopeo-signed:tag",
      exact,
    ),
  );
  refused(
    await verifyFixture(
      "dir-img-cosign-valid-with-tag",
      "192.168.64.2:5000/skopeo-signed:othertag",
      exact,
    ),
    /identity mismatch/,
  );
  refused(await verifyFixture("dir-img-cosign-valid", COSIGN_REF, exact), /identity mismatch/);
  // The default (matchRepoDigestOrExact) refuses cosign's bare-name identity for a tag...
  refused(
    await verifyFixture("dir-img-cosign-valid", COSIGN_REF, sigstorePolicy({ keyPath })),
    /identity mismatch/,
  );
  // ...and for a digest reference too: a signature naming no tag or digest is never enough.
  const manifest = await Deno.readFile(join(fixtures, "dir-img-cosign-valid", "manifest.json"));
  refused(
    await verifyFixture(
      "dir-img-cosign-valid",
      `${COSIGN_REF}@${digestOf(manifest)}`,
      sigstorePolicy({ keyPath }),
    ),
    /identity mismatch/,
  );
  // matchRepository takes it for the digest as for any tag.
  accepted(
    await verifyFixture("dir-img-cosign-valid", `${COSIGN_REF}@${digestOf(manifest)}`, byPath),
  );

  // isRunningImageAllowed: no signatures, only other attachments, one bad identity, two valid,
  // one invalid then one valid, two bad identities.
  refused(
    await verifyFixture("dir-img-unsigned", "testing/manifest:latest", byPath),
    /: no signature$/,
  );
  refused(
    await verifyFixture("dir-img-valid", "testing/manifest:latest", byPath),
    /no signature \(1 other attachments\)/,
  );
  refused(
    await verifyFixture("dir-img-cosign-other-attachment", "testing/manifest:latest", byPath),
    /no signature \(1 other attachments\)/,
  );
  refused(
    await verifyFixture("dir-img-cosign-valid", "testing/manifest:notlatest", byPath),
    /identity mismatch/,
  );
  accepted(await verifyFixture("dir-img-cosign-valid-2", COSIGN_REF, byPath));
  accepted(await verifyFixture("dir-img-cosign-mixed", COSIGN_REF, byPath));
  refused(
    await verifyFixture("dir-img-cosign-valid-2", "this/doesnt:match", byPath),
    /none of 2 signatures was accepted: identity mismatch.*; identity mismatch/,
  );
  // Without use-sigstore-attachments the signatures are not looked for.
  const fixturesManifest = await Deno.readFile(
    join(fixtures, "dir-img-cosign-valid", "manifest.json"),
  );
  await assert.rejects(
    () =>
      verifyImage({
        policy: byPath,
        registriesD: { dir: "/etc/containers/registries.d", docker: new Map() },
        reference: parseReference(COSIGN_REF),
        manifestDigest: digestOf(fixturesManifest),
        fetchSignatures: () => Promise.reject(new Error("not asked")),
      }),
    /no signature: sigstore attachments are not enabled for it in \/etc\/containers\/registries\.d/,
  );
});

Deno.test("cosign fixtures: payloads are parsed as strictly as containers/image", async () => {
  const { parsePayload } = await import("../lib/trust/signature.ts");
  const good = {
    critical: {
      identity: { "docker-reference": "r.io/a:1" },
      image: { "docker-manifest-digest": "sha256:" + "0".repeat(64) },
      type: SIGNATURE_TYPE,
    },
    optional: { creator: "x", timestamp: 1, anything: [1] },
  };
  const enc = (v: unknown) => new TextEncoder().encode(JSON.stringify(v));
  assert.equal(parsePayload(enc(good)).dockerReference, "r.io/a:1");
  assert.equal(parsePayload(enc({ ...good, optional: null })).timestamp, undefined);
  const bad: [unknown, RegExp][] = [
    [{ ...good, extra: 1 }, /unexpected field payload\.extra/],
    [{ critical: good.critical }, /field payload\.optional is missing/],
    [{ ...good, optional: { timestamp: 1.5 } }, /optional\.timestamp is not an integer/],
    [{ ...good, optional: { creator: 1 } }, /optional\.creator is not a string/],
    [
      { ...good, critical: { ...good.critical, type: "other" } },
      /unrecognized signature type other/,
    ],
    [{ ...good, critical: { ...good.critical, extra: {} } }, /unexpected field critical\.extra/],
    [
      { ...good, critical: { ...good.critical, image: { "docker-manifest-digest": 1 } } },
      /docker-manifest-digest is not a string/,
    ],
    [
      { ...good, critical: { ...good.critical, identity: {} } },
      /critical\.identity\.docker-reference is missing/,
    ],
  ];
  for (const [payload, re] of bad) assert.throws(() => parsePayload(enc(payload)), re);
  assert.throws(() => parsePayload(new TextEncoder().encode("[")), /payload is not JSON/);
  // A signed payload naming two digests: which one would another verifier read?
  const twice = JSON.stringify(good).replace(
    '"docker-manifest-digest":',
    `"docker-manifest-digest":"sha256:${"0".repeat(64)}","docker-manifest-digest":`,
  );
  assert.throws(
    () => parsePayload(new TextEncoder().encode(twice)),
    /payload is not JSON: duplicate key "docker-manifest-digest"/,
  );
});

// --- end to end --------------------------------------------------------------------------------

/** A cosign-style simple-signing payload, signed with `key`. */
function signPayload(key: KeyObject, reference: string, digest: string) {
  const payload = new TextEncoder().encode(JSON.stringify({
    critical: {
      identity: { "docker-reference": reference },
      image: { "docker-manifest-digest": digest },
      type: SIGNATURE_TYPE,
    },
    optional: null,
  }));
  return { payload, signature: Buffer.from(sign("sha256", payload, key)).toString("base64") };
}

/** Uploads a blob to a plain-http registry (POST, then PUT with the digest). */
async function uploadBlob(reg: TestRegistry, repo: string, bytes: Uint8Array): Promise<string> {
  const digest = digestOf(bytes);
  const start = await fetch(`${reg.url}/v2/${repo}/blobs/uploads/`, { method: "POST" });
  await start.body?.cancel();
  assert.equal(start.status, 202);
  const location = new URL(start.headers.get("location")!, reg.url);
  location.searchParams.set("digest", digest);
  const put = await fetch(location, { method: "PUT", body: new Uint8Array(bytes) });
  await put.body?.cancel();
  assert.equal(put.status, 201);
  return digest;
}

/** Stores `signatures` as the sigstore attachment of `digest` in `repo`, as cosign does. */
async function attach(
  reg: TestRegistry,
  repo: string,
  digest: string,
  signatures: { payload: Uint8Array; signature: string }[],
): Promise<void> {
  const config = new TextEncoder().encode("{}");
  const configDigest = await uploadBlob(reg, repo, config);
  const layers = [];
  for (const s of signatures) {
    layers.push({
      mediaType: SIMPLE_SIGNING_MEDIA_TYPE,
      digest: await uploadBlob(reg, repo, s.payload),
      size: s.payload.length,
      annotations: { [SIGNATURE_ANNOTATION]: s.signature },
    });
  }
  const manifest = JSON.stringify({
    schemaVersion: 2,
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: {
      mediaType: "application/vnd.oci.image.config.v1+json",
      digest: configDigest,
      size: config.length,
    },
    layers,
  });
  const res = await fetch(`${reg.url}/v2/${repo}/manifests/${signatureTag(digest)}`, {
    method: "PUT",
    headers: { "content-type": "application/vnd.oci.image.manifest.v1+json" },
    body: manifest,
  });
  await res.body?.cancel();
  assert.equal(res.status, 201);
}

const publicPem = (k: KeyObject) => k.export({ type: "spki", format: "pem" }) as string;

Deno.test(
  "sarde fetch/pull under a sigstoreSigned policy: accepted, or refused with its reason and nothing stored",
  opts,
  async () => {
    await using reg = await startRegistry("plain");
    const work = await tempDir("trust");
    try {
      const signer = generateKeyPairSync("ec", { namedCurve: "P-256" });
      const other = generateKeyPairSync("ec", { namedCurve: "P-256" });
      const stranger = generateKeyPairSync("ec", { namedCurve: "P-256" });
      await Deno.writeTextFile(join(work, "signer.pub"), publicPem(signer.publicKey));
      await Deno.writeTextFile(join(work, "other.pub"), publicPem(other.publicKey));
      const regD = join(work, "registries.d");
      await Deno.mkdir(regD);
      await Deno.writeTextFile(
        join(regD, "sarde.yaml"),
        `docker:\n  ${reg.host}:\n    use-sigstore-attachments: true\n`,
      );
      const policy = async (name: string, scope: unknown[]) => {
        const file = join(work, `${name}.json`);
        await Deno.writeTextFile(
          file,
          JSON.stringify({
            default: [{ type: "reject" }],
            transports: { docker: { [`${reg.host}/trust`]: scope } },
          }),
        );
        return file;
      };
      const signed = await policy("signed", [{
        type: "sigstoreSigned",
        keyPath: join(work, "signer.pub"),
      }]);
      const otherKey = await policy("other", [{
        type: "sigstoreSigned",
        keyPath: join(work, "other.pub"),
      }]);
      const anything = await policy("anything", [{ type: "insecureAcceptAnything" }]);

      // Five images, each with its own manifest: signed right, unsigned, another identity, a
      // signature of another manifest, and one that only reject-by-default scopes cover.
      const src = join(work, "src");
      const images: Record<string, string> = {};
      for (const tag of ["good", "unsigned", "identity", "digest"]) {
        const ref = `${reg.host}/trust/vm:${tag}`;
        images[tag] = (await makeImage(src, ref, [{ size: 4096 }])).manifestDigest;
        assert.equal((await sarde(["push", "-q", "-d", src, ref])).code, 0);
      }
      const outside = `${reg.host}/elsewhere/vm:1`;
      await makeImage(src, outside, [{ size: 4096 }]);
      assert.equal((await sarde(["push", "-q", "-d", src, outside])).code, 0);
      await attach(reg, "trust/vm", images.good, [
        // A stranger's signature first: one accepted signature is enough.
        signPayload(stranger.privateKey, `${reg.host}/trust/vm:good`, images.good),
        signPayload(signer.privateKey, `${reg.host}/trust/vm:good`, images.good),
      ]);
      await attach(reg, "trust/vm", images.identity, [
        signPayload(signer.privateKey, `${reg.host}/trust/vm:good`, images.identity),
      ]);
      await attach(reg, "trust/vm", images.digest, [
        signPayload(signer.privateKey, `${reg.host}/trust/vm:digest`, images.good),
      ]);

      let n = 0;
      const fetchWith = async (policyFile: string, ref: string, cmd = "fetch") => {
        const ocidir = join(work, `store-${n++}`);
        const vmdir = join(work, `vms-${n}`);
        const extra = cmd === "pull"
          ? ["-o", vmdir, "-c", "qemu:///system", "-n", `sarde-trust-${n}`]
          : [];
        const r = await sarde([
          cmd,
          "-d",
          ocidir,
          ...extra,
          "--policy",
          policyFile,
          "--registries.d",
          regD,
          ref,
        ]);
        return { ...r, stored: await listFiles(ocidir), vms: await listFiles(vmdir) };
      };
      const refusedWith = async (policyFile: string, ref: string, re: RegExp, cmd = "fetch") => {
        const r = await fetchWith(policyFile, ref, cmd);
        assert.equal(r.code, 7, r.stderr);
        assert.match(r.stderr, re);
        assert.equal(r.stdout, "");
        assert.ok(!r.stderr.includes("    at "), "no stack trace");
        assert.deepEqual(r.stored, [], "nothing stored");
        assert.deepEqual(r.vms, [], "nothing imported");
        if (cmd === "pull") {
          const vm = await run("virsh", ["-c", "qemu:///system", "dominfo", `sarde-trust-${n}`]);
          assert.notEqual(vm.code, 0, "no VM defined");
        }
      };

      const ok = await fetchWith(signed, `${reg.host}/trust/vm:good`);
      assert.equal(ok.code, 0, ok.stderr);
      assert.equal(ok.stdout.trim(), images.good);
      assert.match(ok.stderr, /signature verified/);
      await refusedWith(otherKey, `${reg.host}/trust/vm:good`, /wrong key/);
      await refusedWith(
        signed,
        `${reg.host}/trust/vm:unsigned`,
        /refused by trust policy .*signed\.json .*: no signature/,
      );
      await refusedWith(
        signed,
        `${reg.host}/trust/vm:identity`,
        /identity mismatch: signed for .*trust\/vm:good/,
      );
      await refusedWith(
        signed,
        `${reg.host}/trust/vm:digest`,
        new RegExp(`digest mismatch: signed for manifest ${images.good}`),
      );
      await refusedWith(signed, outside, /\(default\): rejected by policy/);
      await refusedWith(signed, `${reg.host}/trust/vm:unsigned`, /no signature/, "pull");
      // By digest, the signature of the tag is accepted (matchRepoDigestOrExact).
      assert.equal((await fetchWith(signed, `${reg.host}/trust/vm@${images.good}`)).code, 0);
      // insecureAcceptAnything takes unsigned images; a bad policy file is a usage error.
      assert.equal((await fetchWith(anything, `${reg.host}/trust/vm:unsigned`)).code, 0);
      await Deno.writeTextFile(join(work, "broken.json"), '{"default": [{"type": "acceptAll"}]}');
      const broken = await fetchWith(join(work, "broken.json"), `${reg.host}/trust/vm:good`);
      assert.equal(broken.code, 2);
      assert.match(
        broken.stderr,
        /broken\.json: default\[0\]: unknown requirement type "acceptAll"/,
      );
      assert.deepEqual(broken.stored, []);

      // skopeo under the same policy finds sarde's attachment (Debian's build then says that
      // sigstore is disabled), and finds none for the unsigned image.
      const skopeo = (ref: string) =>
        run("skopeo", [
          "--policy",
          signed,
          "--registries.d",
          regD,
          "copy",
          "--src-tls-verify=false",
          `docker://${ref}`,
          `dir:${join(work, `skopeo-${n++}`)}`,
        ]);
      const found = await skopeo(`${reg.host}/trust/vm:good`);
      assert.notEqual(found.code, 0);
      assert.match(found.stderr, /sigstore disabled/);
      assert.doesNotMatch(found.stderr, /no signature exists/);
      const none = await skopeo(`${reg.host}/trust/vm:unsigned`);
      assert.notEqual(none.code, 0);
      assert.match(none.stderr, /no signature exists/);
    } finally {
      await Deno.remove(work, { recursive: true });
    }
  },
);

Deno.test("sarde fetch/pull: a missing --policy file or --registries.d folder fails before any request", async () => {
  // Port 1 refuses connections: asking it would mean retries and a network error (exit 5).
  for (const cmd of ["fetch", "pull"]) {
    const policy = await sarde([cmd, "--policy", "/nonexistent/policy.json", "127.0.0.1:1/x:1"]);
    assert.equal(policy.code, 2, policy.stderr);
    assert.equal(
      policy.stderr,
      "error: --policy /nonexistent/policy.json: no such file or directory\n",
    );
    const dir = await sarde([cmd, "--registries.d", "/etc/hostname", "127.0.0.1:1/x:1"]);
    assert.equal(dir.code, 2, dir.stderr);
    assert.equal(dir.stderr, "error: --registries.d /etc/hostname: not a folder\n");
  }
});
