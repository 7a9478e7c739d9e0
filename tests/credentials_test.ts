import assert from "node:assert/strict";
import { join } from "node:path";
import {
  findCredentials,
  removeCredentials,
  saveCredentials,
} from "../lib/registry/credentials.ts";

async function withEnv(vars: Record<string, string | undefined>, fn: () => Promise<void>) {
  const old: Record<string, string | undefined> = {};
  for (const [k, v] of Object.entries(vars)) {
    old[k] = Deno.env.get(k);
    if (v === undefined) Deno.env.delete(k);
    else Deno.env.set(k, v);
  }
  try {
    await fn();
  } finally {
    for (const [k, v] of Object.entries(old)) {
      v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
    }
  }
}

Deno.test("credentials: saved with mode 0600, found again, removed", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sarde-cred-" });
  const authfile = join(dir, "sub", "auth.json");
  await withEnv({
    HOME: dir,
    XDG_CONFIG_HOME: join(dir, "cfg"),
    DOCKER_CONFIG: join(dir, "docker"),
    SARDE_REGISTRY_USERNAME: undefined,
  }, async () => {
    await saveCredentials(
      "127.0.0.1:5000",
      { username: "sarde", password: "pw:with:colons" },
      authfile,
    );
    assert.equal((await Deno.stat(authfile)).mode! & 0o777, 0o600);
    assert.deepEqual(await findCredentials("127.0.0.1:5000", authfile), {
      username: "sarde",
      password: "pw:with:colons",
    });
    assert.equal(await findCredentials("other:5000", authfile), undefined);
    assert.equal(await removeCredentials("127.0.0.1:5000", authfile), true);
    assert.equal(await findCredentials("127.0.0.1:5000", authfile), undefined);
    assert.equal(await removeCredentials("127.0.0.1:5000", authfile), false);
  });
  await Deno.remove(dir, { recursive: true });
});

Deno.test("credentials: docker config.json with identitytoken, URL keys and a credential helper", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sarde-cred-" });
  const bin = join(dir, "bin");
  await Deno.mkdir(bin);
  // A fake docker-credential helper: answers for one server, fails for others (as real ones do).
  await Deno.writeTextFile(
    join(bin, "docker-credential-fake"),
    '#!/bin/sh\nread host\n[ "$1" = get ] && [ "$host" = helped.example.org ] && echo \'{"Username":"hu","Secret":"hs"}\' && exit 0\necho "credentials not found" ; exit 1\n',
  );
  await Deno.chmod(join(bin, "docker-credential-fake"), 0o755);
  await Deno.mkdir(join(dir, "docker"));
  await Deno.writeTextFile(
    join(dir, "docker", "config.json"),
    JSON.stringify({
      auths: {
        "https://tok.example.org/v1/": { auth: btoa("u:"), identitytoken: "refresh-me" },
        "basic.example.org": { auth: btoa("bu:bp") },
      },
      credHelpers: { "helped.example.org": "fake" },
    }),
  );
  await withEnv({
    HOME: dir,
    DOCKER_CONFIG: join(dir, "docker"),
    XDG_CONFIG_HOME: join(dir, "cfg"),
    PATH: `${bin}:${Deno.env.get("PATH")}`,
    SARDE_REGISTRY_USERNAME: undefined,
  }, async () => {
    const authfile = join(dir, "none.json");
    assert.deepEqual(await findCredentials("tok.example.org", authfile), {
      username: "u",
      identityToken: "refresh-me",
    });
    assert.deepEqual(await findCredentials("basic.example.org", authfile), {
      username: "bu",
      password: "bp",
    });
    assert.deepEqual(await findCredentials("helped.example.org", authfile), {
      username: "hu",
      password: "hs",
    });
    assert.equal(await findCredentials("unknown.example.org", authfile), undefined);
  });
  await Deno.remove(dir, { recursive: true });
});

Deno.test("credentials: a broken auth file is a clear error", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sarde-cred-" });
  const authfile = join(dir, "auth.json");
  await Deno.writeTextFile(authfile, "{not json");
  await assert.rejects(findCredentials("x.example.org", authfile), /not valid JSON/);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("credentials: a symlinked auth file stays a link; login and logout write its target", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sarde-cred-" });
  await Deno.mkdir(join(dir, "shared"));
  const target = join(dir, "shared", "auth.json");
  await Deno.writeTextFile(
    target,
    JSON.stringify({ auths: { "other:5000": { auth: btoa("o:p") } } }),
  );
  const link = join(dir, "auth.json");
  await Deno.symlink("shared/auth.json", link); // relative, as users often write them
  const dangling = join(dir, "new.json"); // a link whose target does not exist yet
  await Deno.symlink(join(dir, "shared", "new.json"), dangling);
  await withEnv({ HOME: dir, SARDE_REGISTRY_USERNAME: undefined }, async () => {
    await saveCredentials("127.0.0.1:5000", { username: "sarde", password: "pw" }, link);
    assert.ok((await Deno.lstat(link)).isSymlink, "the link was replaced by a file");
    assert.equal(await Deno.readLink(link), "shared/auth.json");
    const saved = JSON.parse(await Deno.readTextFile(target));
    assert.deepEqual(Object.keys(saved.auths).sort(), ["127.0.0.1:5000", "other:5000"]);
    assert.equal((await Deno.stat(target)).mode! & 0o777, 0o600);

    assert.equal(await removeCredentials("other:5000", link), true);
    assert.ok((await Deno.lstat(link)).isSymlink);
    assert.deepEqual(Object.keys(JSON.parse(await Deno.readTextFile(target)).auths), [
      "127.0.0.1:5000",
    ]);

    await saveCredentials("127.0.0.1:5000", { username: "sarde", password: "pw" }, dangling);
    assert.ok((await Deno.lstat(dangling)).isSymlink);
    assert.deepEqual(await findCredentials("127.0.0.1:5000", join(dir, "shared", "new.json")), {
      username: "sarde",
      password: "pw",
    });
  });
  await Deno.remove(dir, { recursive: true });
});
