import assert from "node:assert/strict";
import { cleartextRefusal, parseChallenges, repositoryScope } from "../lib/registry/auth.ts";

Deno.test("parseChallenges: bearer with quoted values containing commas", () => {
  const [c] = parseChallenges(
    'Bearer realm="https://auth.example.org/token",service="registry.example.org",scope="repository:a/b:pull,push"',
  );
  assert.equal(c.scheme, "bearer");
  assert.deepEqual(c.params, {
    realm: "https://auth.example.org/token",
    service: "registry.example.org",
    scope: "repository:a/b:pull,push",
  });
});

Deno.test("parseChallenges: basic, case-insensitive scheme, several challenges", () => {
  const cs = parseChallenges(
    'BASIC realm="sarde-registry", Bearer realm="http://127.0.0.1:1/token", service=x',
  );
  assert.deepEqual(cs.map((c) => c.scheme), ["basic", "bearer"]);
  assert.equal(cs[0].params.realm, "sarde-registry");
  assert.equal(cs[1].params.service, "x");
});

Deno.test("parseChallenges: escaped quotes and garbage", () => {
  const [c] = parseChallenges('Bearer realm="a\\"b"');
  assert.equal(c.params.realm, 'a"b');
  assert.deepEqual(parseChallenges(""), []);
  assert.deepEqual(parseChallenges("==="), []);
});

Deno.test("repositoryScope", () => {
  assert.equal(
    repositoryScope("sardines/debian", ["pull", "push"]),
    "repository:sardines/debian:pull,push",
  );
});

Deno.test("cleartextRefusal: credentials go to a plain-http realm only from a plain-http registry, to its host or loopback", () => {
  const realm = (url: string) => new URL(url);
  const allowed = (url: string, registry: string, plain: boolean) =>
    cleartextRefusal(realm(url), registry, plain) === undefined;
  // https realms, always.
  assert.ok(allowed("https://auth.example.org/token", "registry.example.org", false));
  assert.ok(allowed("https://auth.example.org/token", "127.0.0.1:5000", true));
  // An https registry never sends them in clear text, not even to its own host.
  assert.equal(
    cleartextRefusal(realm("http://registry.example.org/token"), "registry.example.org", false),
    "as the registry itself uses https",
  );
  // A plain-http registry: its own host (any port) and loopback addresses only.
  assert.ok(allowed("http://registry.lan:5001/token", "registry.lan:5000", true));
  assert.ok(allowed("http://127.0.0.1:5001/token", "127.0.0.1:5000", true));
  for (const loopback of ["localhost", "127.0.0.9", "[::1]"]) {
    assert.ok(allowed(`http://${loopback}:8080/token`, "127.0.0.1:5000", true), loopback);
    assert.ok(allowed(`http://${loopback}/token`, "registry.lan:5000", true), loopback);
  }
  assert.ok(allowed("http://[::1]:5001/token", "[::1]:5000", true));
  for (
    const [url, registry] of [
      ["http://auth.example.org/token", "registry.lan:5000"],
      ["http://169.254.7.7:8080/token", "127.0.0.1:5000"],
      ["http://registry.lan.evil.example/token", "registry.lan:5000"],
      ["http://10.0.0.1/token", "localhost:5000"],
    ]
  ) {
    assert.equal(
      cleartextRefusal(realm(url), registry, true),
      "as that is neither the registry's host nor a loopback address",
      url,
    );
  }
});
