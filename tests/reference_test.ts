import assert from "node:assert/strict";
import { SardeError } from "../lib/util/errors.ts";
import {
  formatLocalName,
  formatReference,
  isLoopbackRegistry,
  manifestSelector,
  parseReference,
  parseRegistryHost,
} from "../lib/oci/reference.ts";

Deno.test("parseReference: docker defaults for short names", () => {
  const r = parseReference("debian");
  assert.deepEqual(r, {
    registry: "docker.io",
    repository: "library/debian",
    tag: undefined,
    digest: undefined,
    name: "debian",
  });
  assert.equal(manifestSelector(r), "latest");
  assert.equal(parseReference("sardines/debian:12").repository, "sardines/debian");
});

Deno.test("parseReference: host with port is not a tag (sardinecake 0.4 split at the first ':')", () => {
  const r = parseReference("localhost:5000/foo:bar");
  assert.equal(r.registry, "localhost:5000");
  assert.equal(r.repository, "foo");
  assert.equal(r.tag, "bar");
  assert.equal(r.name, "localhost:5000/foo");
  const noTag = parseReference("127.0.0.1:5000/sardines/debian12");
  assert.equal(noTag.registry, "127.0.0.1:5000");
  assert.equal(noTag.tag, undefined);
  assert.equal(formatReference(noTag), "127.0.0.1:5000/sardines/debian12");
});

Deno.test("parseReference: one spelling per registry (case, Docker Hub aliases); the local name as written", () => {
  const hub = parseReference("index.docker.io/acme/vm:1");
  assert.equal(hub.registry, "docker.io");
  assert.equal(
    formatReference(parseReference("registry-1.docker.io/debian")),
    "docker.io/library/debian",
  );
  const mixed = parseReference("Registry.Example.ORG:5000/sardines/vm:1");
  assert.equal(formatReference(mixed), "registry.example.org:5000/sardines/vm:1");
  assert.equal(formatLocalName(mixed), "Registry.Example.ORG:5000/sardines/vm:1");
});

Deno.test("parseReference: tag and digest together", () => {
  const digest = "sha256:" + "a".repeat(64);
  const r = parseReference(`registry.example.org/sardines/debian12:stable@${digest}`);
  assert.equal(r.tag, "stable");
  assert.equal(r.digest, digest);
  assert.equal(manifestSelector(r), digest);
  assert.equal(formatLocalName(r), `registry.example.org/sardines/debian12:stable@${digest}`);
});

Deno.test("parseReference: rejects malformed references with a usage error", () => {
  const bad = [
    "",
    "Upper",
    "docker.io/Upper/x",
    "registry.example.org/Sardines/debian",
    "host:5000/foo:bad tag",
    "foo@sha256:short",
    "foo@md5:" + "a".repeat(32),
    "foo//bar",
    "foo/",
    "host:99999/foo",
    "foo:" + "x".repeat(129),
    "-foo",
    "foo:-tag",
  ];
  for (const input of bad) {
    assert.throws(
      () => parseReference(input),
      (e: unknown) => e instanceof SardeError && e.kind === "usage",
      input,
    );
  }
});

Deno.test("parseReference: error message names the input and the rule", () => {
  try {
    parseReference("Registry.Example.org/Foo");
    assert.fail("should throw");
  } catch (e) {
    assert.ok(e instanceof SardeError);
    assert.match(e.message, /Registry\.Example\.org\/Foo/);
    assert.match(e.message, /lowercase/);
  }
});

Deno.test("isLoopbackRegistry and parseRegistryHost", () => {
  assert.ok(isLoopbackRegistry("localhost:5000"));
  assert.ok(isLoopbackRegistry("127.0.0.1:5000"));
  assert.ok(isLoopbackRegistry("127.1.2.3"));
  assert.ok(!isLoopbackRegistry("registry.example.org"));
  assert.ok(!isLoopbackRegistry("10.0.0.1:5000"));
  assert.equal(parseRegistryHost("https://index.docker.io/v1/"), "docker.io");
  assert.equal(parseRegistryHost("127.0.0.1:5000"), "127.0.0.1:5000");
  assert.throws(() => parseRegistryHost("not a host"), SardeError);
});
