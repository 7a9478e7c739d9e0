/**
 * Signing on push and sigstore keys, checked against independent implementations: openssl
 * verifies sarde's ECDSA signatures and reads the keys `generate-sigstore-key` writes;
 * go-securesystemslib's published vectors pin the encrypted key format; a real registry on
 * 127.0.0.1 holds the `sha256-<hex>.sig` attachments, and skopeo (Debian's, built without
 * sigstore) proves that it finds them where cosign puts them.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Buffer } from "node:buffer";
import {
  decryptWithPassphrase,
  generateSigstoreKey,
  publicKeyPem,
  readSigstorePrivateKey,
} from "../lib/trust/keys.ts";
import { attachSignature, signManifest } from "../lib/trust/sign.ts";
import { createRegistryClient } from "../lib/registry/client.ts";
import { digestHex, digestOf } from "../lib/oci/digest.ts";
import { MediaType } from "../lib/oci/types.ts";
import { SardeError } from "../lib/util/errors.ts";
import { makeImage, run, SARDE, sarde, tempDir } from "./support/images.ts";
import { startRegistry, type TestRegistry } from "./support/registry.ts";
import { defineTestVm, ensureLibvirtd, TEST_URI } from "./support/vms.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

// go-securesystemslib's encrypted/encrypted_test.go, all under "supersecret": TestDecrypt (the
// plaintext "reallyimportant"), then TestKDFSettingVectors (the legacy, standard and OWASP scrypt
// strengths), which go through its Marshal: the plaintext is JSON, a base64 string of it.
const GO_VECTORS = [
  `{"kdf":{"name":"scrypt","params":{"N":32768,"r":8,"p":1},"salt":"N9a7x5JFGbrtB2uBR81jPwp0eiLR4A7FV3mjVAQrg1g="},"cipher":{"name":"nacl/secretbox","nonce":"2h8HxMmgRfuYdpswZBQaU3xJ1nkA/5Ik"},"ciphertext":"SEW6sUh0jf2wfdjJGPNS9+bkk2uB+Cxamf32zR8XkQ=="}`,
  `{"kdf":{"name":"scrypt","params":{"N":32768,"r":8,"p":1},"salt":"WO3mVvyTwJ9vwT5/Tk5OW5WPIBUofMjcpEfrLnfY4uA="},"cipher":{"name":"nacl/secretbox","nonce":"tCy7HcTFr4uxv4Nrg/DWmncuZ148U1MX"},"ciphertext":"08n43p5G5yviPEZpO7tPPF4aZQkWiWjkv4taFdhDBA0tamKH4nw="}`,
  `{"kdf":{"name":"scrypt","params":{"N":65536,"r":8,"p":1},"salt":"FhzPOt9/bJG4PTq6lQ6ecG6GzaOuOy/ynG5+yRiFlNs="},"cipher":{"name":"nacl/secretbox","nonce":"aw1ng1jHaDz/tQ7V2gR9O2+IGQ8xJEuE"},"ciphertext":"HycvuLZL4sYH0BrYTh4E/H20VtAW6u5zL5Pr+IBjYLYnCPzDkq8="}`,
  `{"kdf":{"name":"scrypt","params":{"N":131072,"r":8,"p":1},"salt":"m38E3kouJTtiheLQN22NQ8DTito5hrjpUIskqcd375k="},"cipher":{"name":"nacl/secretbox","nonce":"Y6PM13yA+o44pE/W1ZBwczeGnTV/m9Zc"},"ciphertext":"6H8sqj1K6B6yDjtH5AQ6lbFigg/C2yDDJc4rYJ79w9aVPImFIPI="}`,
];
// TestUnsupportedKDFParameters: refused before any scrypt work.
const GO_UNSUPPORTED =
  `{"kdf":{"name":"scrypt","params":{"N":99,"r":99,"p":99},"salt":"cZFcQJdwPhPyhU1R4qkl0qVOIjZd4V/7LYYAavq166k="},"cipher":{"name":"nacl/secretbox","nonce":"7vhRS7j0hEPBWV05skAdgLj81AkGeE7U"},"ciphertext":"6WYU/YSXVbYzl/NzaeAzmjLyfFhOOjLc0d8/GFV0aBFdJvyCcXc="}`;

const usage = (re: RegExp) => (err: unknown) =>
  err instanceof SardeError && err.kind === "usage" && re.test(err.message);

Deno.test("keys: go-securesystemslib's encrypted vectors decrypt; wrong, tampered, unsupported refused", async () => {
  const text = async (v: string) =>
    new TextDecoder().decode(await decryptWithPassphrase(v, "supersecret"));
  assert.equal(await text(GO_VECTORS[0]), "reallyimportant");
  for (const v of GO_VECTORS.slice(1)) {
    assert.equal(Buffer.from(JSON.parse(await text(v)), "base64").toString(), "reallyimportant");
  }
  await assert.rejects(
    decryptWithPassphrase(GO_VECTORS[0], "Supersecret"),
    usage(/wrong passphrase/),
  );
  const tampered = JSON.parse(GO_VECTORS[0]);
  const c = Buffer.from(tampered.ciphertext, "base64");
  c[0] ^= 0xff;
  tampered.ciphertext = c.toString("base64");
  await assert.rejects(
    decryptWithPassphrase(JSON.stringify(tampered), "supersecret"),
    usage(/wrong passphrase/),
  );
  await assert.rejects(
    decryptWithPassphrase(GO_UNSUPPORTED, "supersecret"),
    usage(/unsupported scrypt parameters/),
  );
});

Deno.test("keys: a generated key reads back in either PEM type, and not with another passphrase", async () => {
  const pair = await generateSigstoreKey("pw");
  assert.match(pair.privatePem, /^-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n/);
  const json = JSON.parse(
    Buffer.from(pair.privatePem.split("\n").slice(1, -2).join(""), "base64").toString(),
  );
  assert.deepEqual(json.kdf.params, { N: 32768, r: 8, p: 1 });
  assert.equal(json.cipher.name, "nacl/secretbox");
  const key = await readSigstorePrivateKey(pair.privatePem, "pw");
  assert.equal(publicKeyPem(key), pair.publicPem);
  const older = pair.privatePem.replaceAll("SIGSTORE", "COSIGN");
  assert.equal(publicKeyPem(await readSigstorePrivateKey(older, "pw")), pair.publicPem);
  await assert.rejects(readSigstorePrivateKey(pair.privatePem, "pw2"), usage(/wrong passphrase/));
  await assert.rejects(
    readSigstorePrivateKey(pair.publicPem, "pw"),
    usage(/PUBLIC KEY, not an ENCRYPTED SIGSTORE PRIVATE KEY/),
  );
});

Deno.test("generate-sigstore-key: openssl reads a P-256 pair whose halves match; no overwrite, no silent empty passphrase", async () => {
  const dir = await tempDir("sigkey");
  try {
    const pass = join(dir, "pass");
    await Deno.writeTextFile(pass, "correct horse\nignored second line\n");
    const prefix = join(dir, "signing");
    const r = await sarde([
      "generate-sigstore-key",
      "--output-prefix",
      prefix,
      "--passphrase-file",
      pass,
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, `${prefix}.key\n${prefix}.pub\n`);
    assert.equal((await Deno.stat(`${prefix}.key`)).mode! & 0o777, 0o600);
    const text = await run(
      "openssl",
      ["pkey", "-pubin", "-in", `${prefix}.pub`, "-text", "-noout"],
      {
        check: true,
      },
    );
    assert.match(text.stdout, /Public-Key: \(256 bit\)/);
    assert.match(text.stdout, /NIST CURVE: P-256/);
    // openssl derives the public key from the decrypted private key: it must be the .pub.
    const key = await readSigstorePrivateKey(
      await Deno.readTextFile(`${prefix}.key`),
      "correct horse",
    );
    const plain = join(dir, "plain.pem");
    await Deno.writeTextFile(plain, key.export({ type: "pkcs8", format: "pem" }) as string, {
      mode: 0o600,
    });
    const derived = await run("openssl", ["pkey", "-in", plain, "-pubout"], { check: true });
    assert.equal(derived.stdout, await Deno.readTextFile(`${prefix}.pub`));

    const before = await Deno.readTextFile(`${prefix}.key`);
    const again = await sarde([
      "generate-sigstore-key",
      "--output-prefix",
      prefix,
      "--passphrase-file",
      pass,
    ]);
    assert.equal(again.code, 2);
    assert.match(again.stderr, /signing\.key exists; refusing to overwrite it/);
    assert.equal(await Deno.readTextFile(`${prefix}.key`), before);

    const other = join(dir, "other");
    const noTty = await sarde(["generate-sigstore-key", "--output-prefix", other]);
    assert.equal(noTty.code, 2);
    assert.match(noTty.stderr, /^error: no passphrase: stdin is not a terminal/m);
    assert.doesNotMatch(noTty.stderr, /\n\s+at /, "no stack trace");
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name).sort(), [
      "pass",
      "plain.pem",
      "signing.key",
      "signing.pub",
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("generate-sigstore-key on a terminal asks twice without echo", async () => {
  const dir = await tempDir("sigtty");
  try {
    const prefix = join(dir, "tty");
    // script(1) gives sarde a pseudo-terminal; what the terminal echoes comes back on its stdout.
    const child = new Deno.Command("script", {
      args: ["-qfec", `${SARDE} generate-sigstore-key --output-prefix ${prefix}`, "/dev/null"],
      stdin: "piped",
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const writer = child.stdin.getWriter();
    let seen = "";
    const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    const waitFor = async (text: string) => {
      while (!seen.includes(text)) {
        const { value, done } = await reader.read();
        if (done) throw new Error(`no "${text}" in: ${seen}`);
        seen += value;
      }
    };
    await waitFor("Passphrase: ");
    await writer.write(new TextEncoder().encode("tty secret\r"));
    await waitFor("Passphrase again: ");
    await writer.write(new TextEncoder().encode("tty secret\r"));
    await waitFor("tty.pub");
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      seen += value;
    }
    await writer.close().catch(() => {});
    assert.equal((await child.status).code, 0, seen);
    assert.doesNotMatch(seen, /tty secret/, "the passphrase is not echoed");
    const key = await readSigstorePrivateKey(
      await Deno.readTextFile(`${prefix}.key`),
      "tty secret",
    );
    assert.equal(publicKeyPem(key), await Deno.readTextFile(`${prefix}.pub`));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Verifies `signature` (base64 DER) over `payload` with `openssl dgst` and the PEM `pub`. */
async function opensslVerifies(
  dir: string,
  pub: string,
  payload: Uint8Array,
  signature: string,
): Promise<boolean> {
  const id = crypto.randomUUID();
  const [pubFile, sigFile, payloadFile] = ["pub.pem", "sig.der", "payload"].map((n) =>
    join(dir, `${id}-${n}`)
  );
  await Deno.writeTextFile(pubFile, pub);
  await Deno.writeFile(sigFile, Buffer.from(signature, "base64"));
  await Deno.writeFile(payloadFile, payload);
  const r = await run("openssl", [
    "dgst",
    "-sha256",
    "-verify",
    pubFile,
    "-signature",
    sigFile,
    payloadFile,
  ]);
  return r.code === 0 && /Verified OK/.test(r.stdout);
}

Deno.test("signManifest: a cosign simple-signing payload whose signature openssl verifies", async () => {
  const dir = await tempDir("sign");
  try {
    const pair = await generateSigstoreKey("pw");
    const privateKey = await readSigstorePrivateKey(pair.privatePem, "pw");
    const manifestDigest = digestOf("a manifest");
    const s = signManifest({
      privateKey,
      reference: "registry.example.org/sardines/debian12:latest",
      manifestDigest,
      timestamp: 1700000000,
    });
    assert.deepEqual(JSON.parse(new TextDecoder().decode(s.payload)), {
      critical: {
        identity: { "docker-reference": "registry.example.org/sardines/debian12:latest" },
        image: { "docker-manifest-digest": manifestDigest },
        type: "cosign container image signature",
      },
      optional: {
        creator: JSON.parse(new TextDecoder().decode(s.payload)).optional.creator,
        timestamp: 1700000000,
      },
    });
    assert.ok(await opensslVerifies(dir, pair.publicPem, s.payload, s.signature));
    // The same check refuses another payload and another key: it can fail.
    const other = new TextEncoder().encode(
      new TextDecoder().decode(s.payload).replace("latest", "evil"),
    );
    assert.equal(await opensslVerifies(dir, pair.publicPem, other, s.signature), false);
    const stranger = await generateSigstoreKey("pw");
    assert.equal(await opensslVerifies(dir, stranger.publicPem, s.payload, s.signature), false);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** A key pair on disk, with its passphrase file. */
async function keyFiles(dir: string) {
  const pair = await generateSigstoreKey("push pass");
  const key = join(dir, "signing.key");
  const pub = join(dir, "signing.pub");
  const pass = join(dir, "signing.pass");
  await Deno.writeTextFile(key, pair.privatePem, { mode: 0o600 });
  await Deno.writeTextFile(pub, pair.publicPem);
  await Deno.writeTextFile(pass, "push pass\n");
  return { key, pub, pass, publicPem: pair.publicPem };
}

/** Runs `fn` with a plain registry, a store folder and a key pair, all removed afterwards. */
async function withRegistryAndKey(
  prefix: string,
  fn: (
    reg: TestRegistry,
    dir: string,
    ocidir: string,
    k: Awaited<ReturnType<typeof keyFiles>>,
  ) => Promise<void>,
): Promise<void> {
  await using reg = await startRegistry("plain");
  const dir = await tempDir(prefix);
  try {
    await fn(reg, dir, join(dir, "oci"), await keyFiles(dir));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** GETs a manifest of the plain test registry, `undefined` on 404. */
async function getManifest(reg: TestRegistry, repo: string, selector: string) {
  const res = await fetch(`${reg.url}/v2/${repo}/manifests/${selector}`, {
    headers: { accept: MediaType.ociManifest },
  });
  if (res.status === 404) {
    await res.body?.cancel();
    return undefined;
  }
  assert.equal(res.status, 200);
  return { mediaType: res.headers.get("content-type"), manifest: await res.json() };
}

async function getBlob(reg: TestRegistry, repo: string, digest: string): Promise<Uint8Array> {
  const res = await fetch(`${reg.url}/v2/${repo}/blobs/${digest}`);
  assert.equal(res.status, 200);
  const bytes = new Uint8Array(await res.arrayBuffer());
  assert.equal(digestOf(bytes), digest);
  return bytes;
}

/** The signatures in the attachment of `digest`: payload JSON and whether openssl verifies. */
async function attachedSignatures(
  reg: TestRegistry,
  repo: string,
  digest: string,
  dir: string,
  pub: string,
) {
  const sig = await getManifest(reg, repo, `sha256-${digestHex(digest)}.sig`);
  assert.ok(sig, "the .sig attachment exists");
  assert.equal(sig.mediaType, MediaType.ociManifest);
  assert.equal(sig.manifest.config.mediaType, MediaType.ociConfig);
  const config = JSON.parse(
    new TextDecoder().decode(await getBlob(reg, repo, sig.manifest.config.digest)),
  );
  assert.deepEqual(
    config.rootfs.diff_ids,
    sig.manifest.layers.map((l: { digest: string }) => l.digest),
  );
  const out = [];
  for (const layer of sig.manifest.layers) {
    assert.equal(layer.mediaType, "application/vnd.dev.cosign.simplesigning.v1+json");
    const payload = await getBlob(reg, repo, layer.digest);
    const signature = layer.annotations["dev.cosignproject.cosign/signature"];
    out.push({
      payload: JSON.parse(new TextDecoder().decode(payload)),
      verified: await opensslVerifies(dir, pub, payload, signature),
      layer,
    });
  }
  return out;
}

Deno.test({
  name:
    "push --sign-by-sigstore-private-key: a .sig attachment openssl verifies, appended to by the next signature",
  ...opts,
  fn: async () => {
    await withRegistryAndKey("signpush", async (reg, dir, ocidir, k) => {
      const ref = `${reg.host}/sardines/signed:1`;
      const image = await makeImage(ocidir, ref, [{ size: 4096 }]);
      const sign = ["--sign-by-sigstore-private-key", k.key, "--sign-passphrase-file", k.pass];
      const r = await sarde(["push", "-d", ocidir, ...sign, ref]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), image.manifestDigest);
      assert.match(
        r.stderr,
        /signed .*sardines\/signed:1 \(1 signature\(s\) in sha256-[0-9a-f]{64}\.sig\)/,
      );
      let sigs = await attachedSignatures(
        reg,
        "sardines/signed",
        image.manifestDigest,
        dir,
        k.publicPem,
      );
      assert.equal(sigs.length, 1);
      assert.deepEqual(sigs[0].payload.critical, {
        identity: { "docker-reference": ref },
        image: { "docker-manifest-digest": image.manifestDigest },
        type: "cosign container image signature",
      });
      assert.ok(sigs[0].verified, "openssl verifies the signature");

      // A second push, to another tag of the same repository: its identity, one more layer.
      const second = `${reg.host}/sardines/signed:stable`;
      const r2 = await sarde(["push", "-d", ocidir, ...sign, "--target", second, ref]);
      assert.equal(r2.code, 0, r2.stderr);
      sigs = await attachedSignatures(
        reg,
        "sardines/signed",
        image.manifestDigest,
        dir,
        k.publicPem,
      );
      assert.deepEqual(sigs.map((s) => s.payload.critical.identity["docker-reference"]), [
        ref,
        second,
      ]);
      assert.ok(sigs.every((s) => s.verified));

      // The same signature attached again is not duplicated (containers/image's rule).
      const client = createRegistryClient(reg.host);
      try {
        const privateKey = await readSigstorePrivateKey(
          await Deno.readTextFile(k.key),
          "push pass",
        );
        // Its own timestamp: signed within the second of the push, the payload (and, as ECDSA
        // here is deterministic, the signature) would be the push's, which is not added again.
        const s = signManifest({
          privateKey,
          reference: second,
          manifestDigest: image.manifestDigest,
          timestamp: 1_700_000_000,
        });
        const a = await attachSignature(client, "sardines/signed", image.manifestDigest, s);
        assert.deepEqual([a.added, a.signatures], [true, 3]);
        const b = await attachSignature(client, "sardines/signed", image.manifestDigest, s);
        assert.deepEqual([b.added, b.signatures, b.digest], [false, 3, a.digest]);
      } finally {
        client.close();
      }
      assert.equal(
        (await attachedSignatures(reg, "sardines/signed", image.manifestDigest, dir, k.publicPem))
          .length,
        3,
      );
    });
  },
});

Deno.test({
  name:
    "push with a wrong passphrase: one line, exit 2, nothing pushed; no passphrase without a terminal",
  ...opts,
  fn: async () => {
    await withRegistryAndKey("signbad", async (reg, dir, ocidir, k) => {
      const ref = `${reg.host}/sardines/unsigned:1`;
      await makeImage(ocidir, ref, [{ size: 4096 }]);
      const wrong = join(dir, "wrong.pass");
      await Deno.writeTextFile(wrong, "not it\n");
      const r = await sarde([
        "push",
        "-d",
        ocidir,
        "--sign-by-sigstore-private-key",
        k.key,
        "--sign-passphrase-file",
        wrong,
        ref,
      ]);
      assert.equal(r.code, 2);
      assert.match(
        r.stderr,
        /^error: cannot decrypt private key .*signing\.key: wrong passphrase/m,
      );
      assert.equal(
        r.stderr.split("\n").filter((l) => l && !l.startsWith("hint:")).length,
        1,
        r.stderr,
      );
      assert.equal(await getManifest(reg, "sardines/unsigned", "1"), undefined, "nothing pushed");
      const noTty = await sarde([
        "push",
        "-d",
        ocidir,
        "--sign-by-sigstore-private-key",
        k.key,
        ref,
      ]);
      assert.equal(noTty.code, 2);
      assert.match(noTty.stderr, /no passphrase: stdin is not a terminal/);
      assert.match(noTty.stderr, /hint: pass --sign-passphrase-file FILE/);
      assert.equal(await getManifest(reg, "sardines/unsigned", "1"), undefined, "nothing pushed");
      const exportNoPush = await sarde(["export", "--sign-by-sigstore-private-key", k.key, "vm"]);
      assert.equal(exportNoPush.code, 2);
      assert.match(exportNoPush.stderr, /signs a push: add --push/);
    });
  },
});

Deno.test({
  name:
    "under a sigstoreSigned policy, sarde fetch accepts sarde's signature and skopeo finds it where cosign puts it",
  ...opts,
  fn: async () => {
    await withRegistryAndKey("signskopeo", async (reg, dir, ocidir, k) => {
      const signed = `${reg.host}/sardines/skopeo:signed`;
      const unsigned = `${reg.host}/sardines/skopeo-unsigned:1`;
      await makeImage(ocidir, signed, [{ size: 4096 }]);
      await makeImage(ocidir, unsigned, [{ size: 2048 }]);
      const sign = ["--sign-by-sigstore-private-key", k.key, "--sign-passphrase-file", k.pass];
      assert.equal((await sarde(["push", "-d", ocidir, ...sign, signed])).code, 0);
      assert.equal((await sarde(["push", "-d", ocidir, unsigned])).code, 0);
      const policy = join(dir, "policy.json");
      await Deno.writeTextFile(
        policy,
        JSON.stringify({
          default: [{ type: "reject" }],
          transports: {
            docker: { [reg.host]: [{ type: "sigstoreSigned", keyPath: k.pub }] },
            dir: { "": [{ type: "insecureAcceptAnything" }] },
          },
        }),
      );
      const registriesD = join(dir, "registries.d");
      await Deno.mkdir(registriesD);
      await Deno.writeTextFile(
        join(registriesD, "sarde.yaml"),
        `docker:\n  ${reg.host}:\n    use-sigstore-attachments: true\n`,
      );
      const copy = (ref: string) =>
        run("skopeo", [
          "--policy",
          policy,
          "--registries.d",
          registriesD,
          "copy",
          "--src-tls-verify=false",
          `docker://${ref}`,
          `dir:${join(dir, crypto.randomUUID())}`,
        ]);
      const withSig = await copy(signed);
      assert.notEqual(withSig.code, 0);
      // Found and handed to the verifier, which Debian compiled out.
      assert.match(withSig.stderr, /sigstore disabled/, withSig.stderr);
      const withoutSig = await copy(unsigned);
      assert.notEqual(withoutSig.code, 0);
      assert.match(withoutSig.stderr, /no signature exists/, withoutSig.stderr);

      // sarde's own verifier, under the same files, into an empty store.
      const fetch = (ref: string, policyFile = policy) =>
        sarde([
          "fetch",
          "-d",
          join(dir, "fetched"),
          "--policy",
          policyFile,
          "--registries.d",
          registriesD,
          ref,
        ]);
      const accepted = await fetch(signed);
      assert.equal(accepted.code, 0, accepted.stderr);
      const refused = await fetch(unsigned);
      assert.equal(refused.code, 7, refused.stderr);
      assert.match(refused.stderr, /no signature/);
      const otherKey = join(dir, "other-policy.json");
      const stranger = await generateSigstoreKey("x");
      await Deno.writeTextFile(join(dir, "stranger.pub"), stranger.publicPem);
      await Deno.writeTextFile(
        otherKey,
        (await Deno.readTextFile(policy)).replace(k.pub, join(dir, "stranger.pub")),
      );
      const wrongKey = await fetch(signed, otherKey);
      assert.equal(wrongKey.code, 7, wrongKey.stderr);
      assert.match(wrongKey.stderr, /wrong key/);
    });
  },
});

Deno.test({
  name: "export --push --sign-by-sigstore-private-key signs the exported image under its name",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({ rawDisk: true });
    await withRegistryAndKey("signexport", async (reg, dir, ocidir, k) => {
      const ref = `${reg.host}/sardines/exported:v1`;
      const ex = await sarde(
        [
          "export",
          "--push",
          "-d",
          ocidir,
          "--chunksize",
          "1MiB",
          "--sign-by-sigstore-private-key",
          k.key,
          "--sign-passphrase-file",
          k.pass,
          vm.name,
          ref,
        ],
        { env: { LIBVIRT_DEFAULT_URI: TEST_URI } },
      );
      assert.equal(ex.code, 0, ex.stderr);
      const head = await fetch(`${reg.url}/v2/sardines/exported/manifests/v1`, {
        method: "HEAD",
        headers: { accept: MediaType.ociManifest },
      });
      const digest = head.headers.get("docker-content-digest")!;
      const sigs = await attachedSignatures(reg, "sardines/exported", digest, dir, k.publicPem);
      assert.equal(sigs.length, 1);
      assert.equal(sigs[0].payload.critical.identity["docker-reference"], ref);
      assert.equal(sigs[0].payload.critical.image["docker-manifest-digest"], digest);
      assert.ok(sigs[0].verified);
    });
  },
});
