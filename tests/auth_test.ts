import assert from "node:assert/strict";
import { parseChallenges, repositoryScope } from "../lib/auth.ts";

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
