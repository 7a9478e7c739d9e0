/**
 * Trust policy files (containers-policy.json(5)), registries.d (containers-registries.d(5)) and
 * signed identity rules: what loads, what is refused with a one-line error naming the file, which
 * scope applies to a reference, and which signed identities each `signedIdentity` accepts (the
 * cases of containers/image's `policy_reference_match_test.go`).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { generateKeyPairSync } from "node:crypto";
import { SardeError } from "../lib/util/errors.ts";
import { parseReference } from "../lib/oci/reference.ts";
import {
  ACCEPT_ANYTHING,
  loadPolicy,
  parsePolicy,
  requirementsFor,
  scopesFor,
} from "../lib/trust/policy.ts";
import { loadRegistriesD, useSigstoreAttachments } from "../lib/trust/registries_d.ts";
import { identityMatches } from "../lib/trust/signature.ts";
import { verifyImage } from "../lib/trust/verify.ts";
import { cosignFixtures } from "./support/cosign_fixtures.ts";
import { tempDir } from "./support/images.ts";

function refused(fn: () => unknown, re: RegExp) {
  assert.throws(fn, (err) => {
    assert.ok(err instanceof SardeError, String(err));
    assert.equal(err.kind, "usage");
    assert.match(err.message, re);
    assert.ok(!err.message.includes("\n"), "one line");
    return true;
  });
}

Deno.test("policy: upstream's example policy.json loads, with every requirement type", async () => {
  const file = join(await cosignFixtures(), "policy.json");
  const policy = await loadPolicy({ file });
  assert.equal(policy.file, file);
  assert.deepEqual(policy.default, [{ type: "reject" }]);
  const scope = (s: string) => policy.docker.get(s)?.map((r) => r.type);
  assert.deepEqual(scope("example.com/playground"), ["insecureAcceptAnything"]);
  assert.deepEqual(scope("example.com/production"), ["signedBy"]);
  assert.deepEqual(scope("example.com/hardened"), ["signedBy", "signedBy", "signedBaseLayer"]);
  assert.deepEqual(scope("example.com/hardened-x509"), ["signedBy", "signedBy"]);
  assert.deepEqual(scope("registry.access.redhat.com"), ["signedBy"]);
  assert.deepEqual(scope("private-mirror:5000/vendor-mirror"), ["signedBy"]);
  assert.deepEqual(scope("bogus/key-data-example"), ["signedBy"]);
  assert.deepEqual(scope("bogus/signed-identity-example"), ["signedBaseLayer"]);
  const sigstore = policy.docker.get("example.com/sigstore/key-data-example")?.[0];
  assert.equal(sigstore?.type, "sigstoreSigned");
  if (sigstore?.type === "sigstoreSigned") {
    assert.ok("pem" in sigstore.keys[0]);
    assert.deepEqual(sigstore.signedIdentity, { type: "matchRepoDigestOrExact" });
  }
  const byPath = policy.docker.get("example.com/sigstore/key-path-example")?.[0];
  if (byPath?.type === "sigstoreSigned") {
    assert.deepEqual(byPath.keys, [{ path: "/keys/public-key" }]);
    assert.deepEqual(byPath.signedIdentity, { type: "matchRepository" });
  } else assert.fail("key-path-example is sigstoreSigned");
});

Deno.test("policy: broken files are one-line usage errors naming the file", () => {
  const f = "/etc/p.json";
  refused(() => parsePolicy("{", f), /^\/etc\/p\.json: not valid JSON/);
  // containers/image refuses a key twice: JSON.parse would keep the last, another reader the first.
  refused(
    () =>
      parsePolicy(
        '{"default": [{"type": "reject"}], "transports": {"docker": {"r.example": [{"type": "reject"}], "r.example": [{"type": "insecureAcceptAnything"}]}}}',
        f,
      ),
    /^\/etc\/p\.json: not valid JSON: duplicate key "r\.example"$/,
  );
  refused(() => parsePolicy("{}", f), /p\.json: "default" is missing/);
  refused(() => parsePolicy('{"default": []}', f), /default: the list of requirements must not/);
  refused(
    () => parsePolicy('{"default": [{"type": "acceptEverything"}]}', f),
    /default\[0\]: unknown requirement type "acceptEverything"/,
  );
  refused(
    () => parsePolicy('{"default": [{"type": "reject", "keyPath": "/x"}]}', f),
    /default\[0\]: unknown field "keyPath"/,
  );
  refused(() => parsePolicy('{"default": [{"type": "reject"}], "x": 1}', f), /unknown field "x"/);
  refused(
    () => parsePolicy('{"default": [{"type": "sigstoreSigned"}]}', f),
    /exactly one of keyPath, keyPaths, keyData, keyDatas and fulcio/,
  );
  refused(
    () =>
      parsePolicy(
        '{"default": [{"type": "sigstoreSigned", "keyPath": "/a", "keyData": "eA=="}]}',
        f,
      ),
    /exactly one of/,
  );
  refused(
    () => parsePolicy('{"default": [{"type": "sigstoreSigned", "keyData": "%%%"}]}', f),
    /"keyData" is not valid base64/,
  );
  refused(
    () =>
      parsePolicy(
        '{"default": [{"type": "sigstoreSigned", "keyPath": "/a", "signedIdentity": {"type": "matchAll"}}]}',
        f,
      ),
    /signedIdentity: unknown type "matchAll"/,
  );
  refused(
    () =>
      parsePolicy(
        '{"default": [{"type": "sigstoreSigned", "keyPath": "/a", "signedIdentity": {"type": "exactReference", "dockerReference": "a/b"}}]}',
        f,
      ),
    /dockerReference "a\/b" needs a tag or digest/,
  );
  refused(
    () =>
      parsePolicy(
        '{"default": [{"type": "reject"}], "transports": {"docker": {"x": []}}}',
        f,
      ),
    /transports\.docker\["x"\]: the list of requirements must not be empty/,
  );
  // null where an object belongs: a one-line error, not a TypeError with a stack.
  refused(
    () => parsePolicy('{"default": [{"type": "reject"}], "transports": null}', f),
    /transports: must be a JSON object/,
  );
  refused(
    () => parsePolicy('{"default": [{"type": "reject"}], "transports": {"docker": null}}', f),
    /transports\.docker: must be a JSON object/,
  );
});

Deno.test("policy: requirements sarde cannot check refuse the image, as containers/image does", async () => {
  const ref = parseReference("r.example/a/b:1");
  const registriesD = { dir: "/nonexistent", docker: new Map() };
  const verdict = (req: string) =>
    verifyImage({
      policy: parsePolicy(`{"default": [${req}]}`, "p.json"),
      registriesD,
      reference: ref,
      manifestDigest: "sha256:" + "0".repeat(64),
      fetchSignatures: () => Promise.resolve([]),
    }).then(() => "accepted", (err: SardeError) => `${err.kind}: ${err.message}`);
  assert.match(
    await verdict('{"type": "signedBaseLayer", "baseLayerIdentity": {"type": "matchRepository"}}'),
    /^trust: .*signedBaseLayer is not implemented/,
  );
  const key = btoa("-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----\n");
  const sigstore = (extra = "") => `{"type": "sigstoreSigned", "keyData": "${key}"${extra}}`;
  assert.match(
    await verdict(sigstore(', "rekorPublicKeyPath": "/k.pub"')),
    /^trust: .*Fulcio\/Rekor signatures are not supported/,
  );
  assert.equal(await verdict('{"type": "insecureAcceptAnything"}'), "accepted");
  // Both a tag and a digest, under a signature requirement: refused before any signature is read.
  const both = await verifyImage({
    policy: parsePolicy(`{"default": [${sigstore()}]}`, "p.json"),
    registriesD,
    reference: parseReference(`r.example/a/b:prod@sha256:${"0".repeat(64)}`),
    manifestDigest: "sha256:" + "0".repeat(64),
    fetchSignatures: () => Promise.reject(new Error("not asked")),
  }).then(() => "accepted", (err: SardeError) => err.message);
  assert.match(both, /both a tag and a digest cannot be checked/);

  // A private key (or anything but a PEM public key) where a public key belongs is no key.
  const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const privatePem = privateKey.export({ type: "pkcs8", format: "pem" }) as string;
  const withPrivate = await verifyImage({
    policy: parsePolicy(
      `{"default": [{"type": "sigstoreSigned", "keyData": "${btoa(privatePem)}"}]}`,
      "p.json",
    ),
    registriesD: { dir: "", defaultDocker: { useSigstoreAttachments: true }, docker: new Map() },
    reference: ref,
    manifestDigest: "sha256:" + "0".repeat(64),
    fetchSignatures: () =>
      Promise.resolve([{
        mimeType: "application/vnd.dev.cosign.simplesigning.v1+json",
        payload: new Uint8Array([123, 125]),
        annotations: { "dev.cosignproject.cosign/signature": "AAAA" },
      }]),
  }).then(() => "accepted", (err: SardeError) => err.message);
  assert.match(withPrivate, /public key in keyData is not a PEM public key/);
});

Deno.test("policy: a missing --policy file is an error; the user's policy.json wins over the system's", async () => {
  await assert.rejects(
    () => loadPolicy({ file: "/nonexistent/policy.json" }),
    (err) =>
      err instanceof SardeError && /cannot read trust policy \/nonexistent/.test(err.message),
  );
  const home = await tempDir("trust-home");
  try {
    const old = Deno.env.get("HOME");
    Deno.env.set("HOME", home);
    try {
      const policy = await loadPolicy();
      // This host has /etc/containers/policy.json (containers-common); the user's file wins.
      const user = join(home, ".config/containers");
      await Deno.mkdir(user, { recursive: true });
      await Deno.writeTextFile(join(user, "policy.json"), '{"default": [{"type": "reject"}]}');
      const mine = await loadPolicy();
      assert.equal(mine.file, join(user, "policy.json"));
      assert.deepEqual(mine.default, [{ type: "reject" }]);
      assert.ok(policy.file === "/etc/containers/policy.json" || policy === ACCEPT_ANYTHING);
    } finally {
      if (old === undefined) Deno.env.delete("HOME");
      else Deno.env.set("HOME", old);
    }
  } finally {
    await Deno.remove(home, { recursive: true });
  }
});

Deno.test("policy: scopes go from the image to its repository, namespaces, host, *.domains", () => {
  assert.deepEqual(scopesFor(parseReference("reg.example.com:5000/ns/app:v1")), [
    "reg.example.com:5000/ns/app:v1",
    "reg.example.com:5000/ns/app",
    "reg.example.com:5000/ns",
    "reg.example.com:5000",
    "*.example.com",
    "*.com",
  ]);
  assert.deepEqual(scopesFor(parseReference("busybox")), [
    "docker.io/library/busybox:latest",
    "docker.io/library/busybox",
    "docker.io/library",
    "docker.io",
    "*.io",
  ]);
  const d = "sha256:" + "a".repeat(64);
  assert.equal(scopesFor(parseReference(`r.io/x:t@${d}`))[0], `r.io/x@${d}`);

  const policy = parsePolicy(
    JSON.stringify({
      default: [{ type: "reject" }],
      transports: {
        docker: {
          "": [{ type: "insecureAcceptAnything" }],
          "r.example.com/ns": [{ type: "sigstoreSigned", keyPath: "/k" }],
          "r.example.com/ns/app:v1": [{ type: "reject" }],
          "*.example.com": [{ type: "insecureAcceptAnything" }],
        },
        oci: { "": [{ type: "insecureAcceptAnything" }] },
      },
    }),
    "p.json",
  );
  const scope = (r: string) => requirementsFor(policy, parseReference(r)).scope;
  assert.equal(scope("r.example.com/ns/app:v1"), "docker:r.example.com/ns/app:v1");
  assert.equal(scope("r.example.com/ns/app:v2"), "docker:r.example.com/ns");
  assert.equal(scope("r.example.com/other:v2"), "docker:*.example.com");
  assert.equal(scope("127.0.0.1:5000/x"), 'docker:""');
  const noDocker = parsePolicy('{"default": [{"type": "reject"}]}', "p.json");
  assert.equal(requirementsFor(noDocker, parseReference("a.io/b")).scope, "default");
});

Deno.test("registries.d: use-sigstore-attachments by scope, default-docker, duplicates refused", async () => {
  const dir = await tempDir("registries-d");
  try {
    await Deno.writeTextFile(
      join(dir, "default.yaml"),
      "default-docker:\n  use-sigstore-attachments: true\n  lookaside: file:///var/lib/x\n",
    );
    await Deno.writeTextFile(
      join(dir, "b.yaml"),
      "docker:\n  r.example.com/off:\n    use-sigstore-attachments: false\n  r.example.com:\n    lookaside: https://x\n",
    );
    await Deno.writeTextFile(join(dir, "ignored.conf"), "not: [yaml");
    const conf = await loadRegistriesD(dir);
    const use = (r: string) => useSigstoreAttachments(conf, parseReference(r));
    assert.equal(use("r.example.com/off/app:1"), false);
    assert.equal(use("r.example.com/on/app:1"), true, "a scope without the key falls through");
    assert.equal(use("127.0.0.1:5000/x"), true);
    await assert.rejects(
      () => loadRegistriesD(join(dir, "none")),
      (err) =>
        err instanceof SardeError && err.kind === "usage" &&
        /cannot read registries\.d folder .*\/none/.test(err.message),
    );

    await Deno.writeTextFile(join(dir, "c.yaml"), "default-docker:\n  sigstore: x\n");
    await assert.rejects(
      () => loadRegistriesD(dir),
      (err) =>
        err instanceof SardeError &&
        /"default-docker" is defined both in .*c\.yaml and .*default\.yaml/.test(err.message),
    );
    await Deno.writeTextFile(join(dir, "c.yaml"), "docker:\n  r.example.com/off: {}\n");
    await assert.rejects(
      () => loadRegistriesD(dir),
      (err) =>
        err instanceof SardeError &&
        /docker scope "r.example.com\/off" is defined both/.test(err.message),
    );
    await Deno.writeTextFile(
      join(dir, "c.yaml"),
      "docker:\n  x.io:\n    use-sigstore-attachments: yes please\n",
    );
    await assert.rejects(
      () => loadRegistriesD(dir),
      (err) =>
        err instanceof SardeError &&
        /c\.yaml: docker "x.io": "use-sigstore-attachments" must be true or false/.test(
          err.message,
        ),
    );
    await Deno.writeTextFile(join(dir, "c.yaml"), "docker: [\n");
    await assert.rejects(
      () => loadRegistriesD(dir),
      (err) =>
        err instanceof SardeError && /c\.yaml: not valid YAML/.test(err.message) &&
        !err.message.includes("\n"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("identity: each signedIdentity rule, as containers/image's reference match tests", () => {
  const d = "sha256:" + "1".repeat(64);
  const cases: [Parameters<typeof identityMatches>[0], string, string, boolean][] = [
    // matchExact: both must carry the same tag or digest.
    [{ type: "matchExact" }, "r.io/a/b:t", "r.io/a/b:t", true],
    [{ type: "matchExact" }, "r.io/a/b:t", "r.io/a/b:u", false],
    [{ type: "matchExact" }, "r.io/a/b:t", "r.io/a/b", false],
    [{ type: "matchExact" }, `r.io/a/b@${d}`, `r.io/a/b@${d}`, true],
    [{ type: "matchExact" }, `r.io/a/b@${d}`, "r.io/a/b:t", false],
    [{ type: "matchExact" }, "busybox", "docker.io/library/busybox:latest", true],
    [{ type: "matchExact" }, "busybox:latest", "busybox", false],
    // matchRepoDigestOrExact: exact for tags, any tag/digest of the repository for digests.
    [{ type: "matchRepoDigestOrExact" }, "r.io/a/b:t", "r.io/a/b:t", true],
    [{ type: "matchRepoDigestOrExact" }, "r.io/a/b:t", "r.io/a/b:u", false],
    [{ type: "matchRepoDigestOrExact" }, `r.io/a/b@${d}`, "r.io/a/b:u", true],
    [{ type: "matchRepoDigestOrExact" }, `r.io/a/b@${d}`, "r.io/a/c:u", false],
    [{ type: "matchRepoDigestOrExact" }, `r.io/a/b@${d}`, "r.io/a/b", false],
    [{ type: "matchRepoDigestOrExact" }, "r.io/a/b", "r.io/a/b:latest", true],
    // matchRepository: names only.
    [{ type: "matchRepository" }, "r.io/a/b:t", "r.io/a/b", true],
    [{ type: "matchRepository" }, "r.io/a/b:t", "r.io/a/b:other", true],
    [{ type: "matchRepository" }, "r.io/a/b:t", "r.io/a/c", false],
    [{ type: "matchRepository" }, "r.io/a/b:t", "not a reference", false],
    // exactReference / exactRepository: the image's own name does not matter.
    [{ type: "exactReference", dockerReference: "s.io/x:1" }, "r.io/a:t", "s.io/x:1", true],
    [{ type: "exactReference", dockerReference: "s.io/x:1" }, "r.io/a:t", "s.io/x:2", false],
    [{ type: "exactReference", dockerReference: "s.io/x:1" }, "r.io/a:t", "s.io/x", false],
    [{ type: "exactRepository", dockerRepository: "s.io/x" }, "r.io/a:t", "s.io/x:9", true],
    [{ type: "exactRepository", dockerRepository: "s.io/x" }, "r.io/a:t", "s.io/y:9", false],
    // remapIdentity: the image's prefix is replaced, then matchRepoDigestOrExact.
    [
      { type: "remapIdentity", prefix: "mirror.lan/vendor", signedPrefix: "vendor.io/prod" },
      "mirror.lan/vendor/app:1",
      "vendor.io/prod/app:1",
      true,
    ],
    [
      { type: "remapIdentity", prefix: "mirror.lan/vendor", signedPrefix: "vendor.io/prod" },
      "mirror.lan/vendor/app:1",
      "mirror.lan/vendor/app:1",
      false,
    ],
    [
      { type: "remapIdentity", prefix: "mirror.lan/vendor", signedPrefix: "vendor.io/prod" },
      "mirror.lan/vendorx/app:1",
      "mirror.lan/vendorx/app:1",
      true,
    ],
    [
      { type: "remapIdentity", prefix: "mirror.lan", signedPrefix: "vendor.io" },
      `mirror.lan/app@${d}`,
      "vendor.io/app:any",
      true,
    ],
  ];
  for (const [rule, image, signed, want] of cases) {
    assert.equal(
      identityMatches(rule, parseReference(image), signed),
      want,
      `${rule.type}: image ${image}, signed ${signed}`,
    );
  }
});
