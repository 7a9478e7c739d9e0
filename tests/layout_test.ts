import assert from "node:assert/strict";
import { join } from "node:path";
import { digestOf } from "../lib/oci/digest.ts";
import { SardeError } from "../lib/util/errors.ts";
import {
  addToIndex,
  blobPath,
  createBlobWriter,
  hasBlob,
  lockLayout,
  lockLayoutForRemoval,
  openLayout,
  readBlob,
  readIndex,
  removeLayout,
  selectManifest,
  useLayout,
  writeBlob,
  writeIndex,
} from "../lib/oci/layout.ts";
import {
  type Descriptor,
  type ImageIndex,
  MediaType,
  REF_NAME_ANNOTATION,
} from "../lib/oci/types.ts";
import { listFiles, makeImage, run, SARDE, sarde, tempDir } from "./support/images.ts";
import { startRegistry } from "./support/registry.ts";

async function tempLayout() {
  const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "sarde-layout-test-" });
  return { layout: await openLayout(join(dir, "repo"), { create: true }), dir };
}

const desc = (n: number): Descriptor => ({
  mediaType: MediaType.ociManifest,
  digest: digestOf(String(n)),
  size: 1,
});

Deno.test("openLayout creates an OCI layout skopeo can read", async () => {
  const { layout, dir } = await tempLayout();
  assert.deepEqual(JSON.parse(await Deno.readTextFile(join(layout.dir, "oci-layout"))), {
    imageLayoutVersion: "1.0.0",
  });
  assert.deepEqual(await readIndex(layout), { schemaVersion: 2, manifests: [] });
  await assert.rejects(
    openLayout(join(dir, "nope")),
    (e: unknown) => e instanceof SardeError && e.kind === "not-found",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("addToIndex moves a tag instead of duplicating it (0.4 appended)", () => {
  let index: ImageIndex = { schemaVersion: 2, manifests: [] };
  index = addToIndex(index, desc(1), "latest");
  index = addToIndex(index, desc(2), "latest");
  index = addToIndex(index, desc(2), "stable");
  index = addToIndex(index, desc(3));
  index = addToIndex(index, desc(3));
  const tags = index.manifests.map((d) => d.annotations?.[REF_NAME_ANNOTATION]);
  assert.deepEqual(tags, ["latest", "stable", undefined]);
  assert.equal(selectManifest(index, { tag: "latest" }, "x").digest, desc(2).digest);
  assert.equal(selectManifest(index, {}, "x").digest, desc(2).digest, "no tag: 'latest' wins");
  assert.equal(selectManifest(index, { digest: desc(3).digest }, "x").digest, desc(3).digest);
  assert.throws(
    () => selectManifest(index, { tag: "nope" }, "x"),
    (e: unknown) =>
      e instanceof SardeError && e.kind === "not-found" && e.hint === "known tags: latest, stable",
  );
});

Deno.test("selectManifest reads 0.4 indexes with duplicate tags: the last one wins", () => {
  const tagged = (n: number) => ({ ...desc(n), annotations: { [REF_NAME_ANNOTATION]: "latest" } });
  const index = { schemaVersion: 2 as const, manifests: [tagged(1), tagged(2)] };
  assert.equal(selectManifest(index, { tag: "latest" }, "x").digest, desc(2).digest);
});

Deno.test("blob writer verifies digest and size, leaves nothing on mismatch", async () => {
  const { layout, dir } = await tempLayout();
  const data = new TextEncoder().encode("hello blob");
  const good = { mediaType: "application/octet-stream", digest: digestOf(data), size: data.length };

  const w1 = await createBlobWriter(layout, good);
  await w1.write(data.subarray(0, 3));
  await w1.reset(); // a server that ignored Range makes us start over
  await w1.write(data);
  await w1.commit();
  assert.ok(await hasBlob(layout, good));
  assert.deepEqual(await readBlob(layout, good.digest), data);

  const wrong = { ...good, digest: digestOf("something else") };
  const w2 = await createBlobWriter(layout, wrong);
  await w2.write(data);
  await assert.rejects(
    w2.commit(),
    (e: unknown) => e instanceof SardeError && e.kind === "integrity",
  );
  assert.ok(!await hasBlob(layout, wrong));
  const leftovers = [...Deno.readDirSync(join(layout.dir, "blobs", "sha256"))].map((e) => e.name);
  assert.deepEqual(leftovers, [good.digest.slice(7)], "no temp files remain");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("readBlob detects a corrupted blob file", async () => {
  const { layout, dir } = await tempLayout();
  const d = await writeBlob(layout, new TextEncoder().encode("{}"), MediaType.ociConfig);
  await Deno.writeTextFile(blobPath(layout, d.digest), "{ }");
  await assert.rejects(readBlob(layout, d.digest), /corrupt/);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("index writes are atomic and parse back", async () => {
  const { layout, dir } = await tempLayout();
  await writeIndex(layout, addToIndex(await readIndex(layout), desc(7), "v1"));
  const index = await readIndex(layout);
  assert.equal(index.manifests.length, 1);
  const names = [...Deno.readDirSync(layout.dir)].map((e) => e.name).filter((n) =>
    n.includes(".tmp-")
  );
  assert.deepEqual(names, []);
  await Deno.writeTextFile(join(layout.dir, "index.json"), "{broken");
  await assert.rejects(
    readIndex(layout),
    (e: unknown) => e instanceof SardeError && /not valid JSON/.test(e.message),
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("layout locks: removal waits for users; a user that waited on a removed layout finds it gone", async () => {
  const { layout, dir } = await tempLayout();
  const user = await useLayout(layout, "repo");
  assert.equal(await lockLayoutForRemoval(layout, { wait: false }), undefined, "in use");
  user.release();
  const removal = (await lockLayoutForRemoval(layout, { wait: false }))!;
  assert.ok(removal, "free once the user is done");

  // A reader and a writer queue up behind the removal, which then takes the layout away.
  const reader = useLayout(layout, "repo");
  const writer = lockLayout(layout);
  let settled = false;
  Promise.allSettled([reader, writer]).then(() => settled = true);
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(settled, false, "both wait for the removal");
  await removeLayout(layout, dir);
  removal.release();
  await assert.rejects(
    reader,
    (e: unknown) =>
      e instanceof SardeError && e.kind === "not-found" && /repo: no such image/.test(e.message),
  );
  using _w = await writer;
  assert.deepEqual(await readIndex(layout), { schemaVersion: 2, manifests: [] }, "made anew");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("rm: a repository's removal keeps the repository nested in its folder", async () => {
  const work = await tempDir("nested");
  const outer = await makeImage(work, "local/a:one", [{ size: 4096 }]);
  const inner = await makeImage(work, "local/a/b:one", [{ size: 4096 }]);
  const r = await sarde(["rm", "-d", work, "local/a:one"]);
  assert.equal(r.code, 0, r.stderr);
  const left = await listFiles(work);
  assert.ok(!left.some((f) => f === "local/a/index.json"), "the outer layout is gone");
  assert.ok(
    left.includes(`local/a/b/blobs/sha256/${inner.manifestDigest.slice(7)}`),
    "the inner layout is intact",
  );
  const ls = await sarde(["list", "-d", work, "--format", "json"]);
  assert.deepEqual(JSON.parse(ls.stdout).map((e: { name: string }) => e.name), ["local/a/b"]);
  assert.equal(ls.stderr, "");
  assert.notEqual(outer.manifestDigest, inner.manifestDigest);
  await Deno.remove(work, { recursive: true });
});

Deno.test({
  name: "CLI: a store or VM folder that is a file is a one-line error naming it",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const work = await tempDir("notadir");
    await using reg = await startRegistry("plain");
    try {
      const ref = `${reg.host}/sardines/notadir:v1`;
      await makeImage(work, ref, [{ size: 4096 }]);
      assert.equal((await sarde(["push", "-d", work, ref])).code, 0);
      const file = join(work, "a-file");
      await Deno.writeTextFile(file, "not a folder\n");
      const cases: [string[], RegExp][] = [
        [["list", "-d", file], /the local store .*a-file is not a folder/],
        [["prune", "-d", file, "--vmdir", work], /the local store .*a-file is not a folder/],
        [["prune", "-d", work, "--vmdir", file], /the VM folder .*a-file is not a folder/],
        [["import", "-d", work, "--vmdir", file, ref], /the VM folder .*a-file is not a folder/],
        [["pull", "-d", work, "--vmdir", file, ref], /the VM folder .*a-file is not a folder/],
      ];
      for (const [args, expected] of cases) {
        const r = await sarde(args, { env: { LIBVIRT_DEFAULT_URI: "qemu:///system" } });
        assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
        assert.match(r.stderr, expected, args.join(" "));
        assert.doesNotMatch(r.stderr, /bug|\n\s+at /, `${args[0]}: no stack trace`);
        assert.ok(r.stderr.trim().split("\n").length <= 2, `${args[0]}: one line plus a hint`);
      }
    } finally {
      await Deno.remove(work, { recursive: true });
    }
  },
});

/** Runs the sarde CLI as the unprivileged user `nobody`, with a Deno cache folder it owns. */
async function sardeAsNobody(args: string[], denoDir: string) {
  return await run(
    "setpriv",
    ["--reuid=65534", "--regid=65534", "--clear-groups", SARDE, ...args],
    { env: { DENO_DIR: denoDir, HOME: denoDir } },
  );
}

function assertOneLineError(r: { code: number; stderr: string }, expected: RegExp, what: string) {
  assert.notEqual(r.code, 0, `${what} must fail`);
  assert.match(r.stderr, expected, what);
  assert.doesNotMatch(r.stderr, /bug|\n\s+at /, `${what}: no stack trace`);
  assert.ok(r.stderr.trim().split("\n").length <= 2, `${what}: one line plus a hint: ${r.stderr}`);
}

Deno.test({
  name:
    "a store this user may only read: list, getconfig and push read it unlocked; fetch and rm fail naming the lock",
  ignore: Deno.uid() !== 0, // needs to own the store and run as another user
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const work = await tempDir("readonly");
    const denoDir = await tempDir("nobody-deno");
    await using reg = await startRegistry("plain");
    try {
      await Deno.chmod(work, 0o755); // readable, not writable, by others
      await Deno.chown(denoDir, 65534, 65534);
      const ref = `${reg.host}/sardines/readonly:v1`;
      const made = await makeImage(work, ref, [{ size: 4096 }]);
      assert.equal((await sarde(["push", "-d", work, ref])).code, 0);
      // As skopeo, sardinecake 0.4 or an older sarde leave a layout: no lock files.
      for (const f of [".sarde.use", ".sarde.lock"]) {
        await Deno.remove(join(made.dir, f)).catch(() => {});
      }
      const before = await listFiles(work);
      const asNobody = (args: string[]) => sardeAsNobody(args, denoDir);
      const version = await asNobody(["--version"]);
      assert.equal(
        version.code,
        0,
        `user nobody cannot run ${SARDE} (the checkout and its Deno must be readable by others): ${version.stderr}`,
      );

      for (const round of ["no lock files", "lock files made by root"]) {
        const ls = await asNobody(["list", "-d", work, "--format", "json"]);
        assert.equal(ls.code, 0, `${round}: ${ls.stderr}`);
        assert.deepEqual(
          JSON.parse(ls.stdout).map((e: { name: string; tag: string }) => `${e.name}:${e.tag}`),
          [`${reg.host}/sardines/readonly:v1`],
          round,
        );
        assert.equal(ls.stderr, "", round);
        const cfg = await asNobody(["getconfig", "-d", work, ref]);
        assert.equal(cfg.code, 0, `${round}: ${cfg.stderr}`);
        assert.deepEqual(JSON.parse(cfg.stdout).users, [{ username: "root", password: "sarde" }]);
        const push = await asNobody(["push", "-d", work, ref]);
        assert.equal(push.code, 0, `${round}: ${push.stderr}`);

        const fetch = await asNobody(["fetch", "-d", work, ref]);
        assertOneLineError(
          fetch,
          new RegExp(`${made.dir}/\\S+: permission denied`),
          `fetch, ${round}`,
        );
        const rm = await asNobody(["rm", "-d", work, ref]);
        assertOneLineError(rm, new RegExp(`${made.dir}/\\S+: permission denied`), `rm, ${round}`);
        if (round === "no lock files") {
          assert.deepEqual(await listFiles(work), before, "the readers wrote nothing");
          assert.match(fetch.stderr, /cannot lock .*\/\.sarde\.use: permission denied/);
        }
        // Root's commands make the lock files (0644): nobody's readers then lock them read-only.
        assert.equal((await sarde(["fetch", "-d", work, ref])).code, 0);
        assert.equal((await sarde(["list", "-d", work])).code, 0);
      }
      // Another user's private repository in a shared store: skipped with a warning.
      await makeImage(work, "private/hidden:v1", [{ size: 4096 }]);
      await Deno.chmod(join(work, "private"), 0o700);
      const ls = await asNobody(["list", "-d", work, "--format", "json"]);
      assert.equal(ls.code, 0, ls.stderr);
      assert.deepEqual(JSON.parse(ls.stdout).map((e: { name: string }) => e.name), [
        `${reg.host}/sardines/readonly`,
      ]);
      assert.match(ls.stderr, /skipping .*\/private: permission denied/);
      assert.doesNotMatch(ls.stderr, /bug|\n\s+at /, "no stack trace");
    } finally {
      await Deno.remove(work, { recursive: true });
      await Deno.remove(denoDir, { recursive: true });
    }
  },
});

/** Whether this process may mount file systems (root with CAP_SYS_ADMIN, not in every container). */
async function canMount(): Promise<boolean> {
  if (Deno.uid() !== 0) return false;
  const dir = await Deno.makeTempDir({ prefix: "sarde-mount-probe-" });
  try {
    const r = await run("mount", ["-t", "tmpfs", "-o", "ro,size=4k", "tmpfs", dir]);
    if (r.code !== 0) return false;
    await run("umount", [dir], { check: true });
    return true;
  } finally {
    await Deno.remove(dir);
  }
}

Deno.test({
  name:
    "a store on a read-only mount: list and getconfig read it unlocked; fetch fails naming the lock",
  ignore: !await canMount(),
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const work = await tempDir("rofs");
    await using reg = await startRegistry("plain");
    const store = join(work, "store");
    const mounted = join(work, "mounted");
    try {
      const ref = `${reg.host}/sardines/rofs:v1`;
      const made = await makeImage(store, ref, [{ size: 4096 }]);
      assert.equal((await sarde(["push", "-d", store, ref])).code, 0);
      for (const f of [".sarde.use", ".sarde.lock"]) {
        await Deno.remove(join(made.dir, f)).catch(() => {});
      }
      await Deno.mkdir(mounted);
      await run("mount", ["--bind", "-o", "ro", store, mounted], { check: true });
      try {
        const ls = await sarde(["list", "-d", mounted, "--format", "json"]);
        assert.equal(ls.code, 0, ls.stderr);
        assert.deepEqual(JSON.parse(ls.stdout).map((e: { name: string }) => e.name), [
          `${reg.host}/sardines/rofs`,
        ]);
        assert.equal(ls.stderr, "");
        const cfg = await sarde(["getconfig", "-d", mounted, ref]);
        assert.equal(cfg.code, 0, cfg.stderr);
        assert.deepEqual(JSON.parse(cfg.stdout).users, [{ username: "root", password: "sarde" }]);
        assertOneLineError(
          await sarde(["fetch", "-d", mounted, ref]),
          /cannot lock .*rofs\/\.sarde\.use: read-only file system/,
          "fetch",
        );
      } finally {
        await run("umount", [mounted], { check: true });
      }
    } finally {
      await Deno.remove(work, { recursive: true });
    }
  },
});
