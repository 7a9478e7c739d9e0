/**
 * `sarde rm` and `sarde prune`: what goes, and above all what stays.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { addToIndex, openLayout, readIndex, writeIndex } from "../lib/layout.ts";
import { listFiles, makeImage, sarde, tempDir } from "./support/images.ts";
import { defineTestVm, ensureLibvirtd, shTry, TEST_URI } from "./support/vms.ts";

const env = { LIBVIRT_DEFAULT_URI: TEST_URI };
const opts = { sanitizeResources: false, sanitizeOps: false };

Deno.test("rm: removes a tag and only the blobs no other tag needs", async () => {
  const work = await tempDir("rm");
  const a = await makeImage(work, "local/img:one", [{ size: 1 << 20 }]);
  const b = await makeImage(work, "local/img:two", [{ size: 1 << 20 }]);
  const layout = await openLayout(a.dir);
  // Tag "three" points at the same manifest as "one".
  const one = (await readIndex(layout)).manifests.find((d) => d.digest === a.manifestDigest)!;
  await writeIndex(layout, addToIndex(await readIndex(layout), one, "three"));

  const r1 = await sarde(["rm", "-d", work, "local/img:one"]);
  assert.equal(r1.code, 0, r1.stderr);
  let blobs = (await listFiles(a.dir)).filter((f) => f.startsWith("blobs/"));
  assert.ok(blobs.some((f) => f.endsWith(a.layers[1].digest.slice(7))), "still used by tag three");

  const r2 = await sarde(["rm", "-d", work, "local/img:three"]);
  assert.equal(r2.code, 0, r2.stderr);
  assert.match(r2.stderr, /freed/);
  blobs = (await listFiles(a.dir)).filter((f) => f.startsWith("blobs/"));
  assert.ok(
    !blobs.some((f) => f.endsWith(a.layers[1].digest.slice(7))),
    "unique layer of one/three is gone",
  );
  assert.ok(blobs.some((f) => f.endsWith(b.layers[1].digest.slice(7))), "tag two keeps its layers");

  const missing = await sarde(["rm", "-d", work, "local/img:nope"]);
  assert.equal(missing.code, 3);
  assert.match(missing.stderr, /known tags: two/);

  assert.equal((await sarde(["rm", "-d", work, "local/img:two"])).code, 0);
  assert.deepEqual(await listFiles(work), [], "the empty repository folder is gone");
  await Deno.remove(work, { recursive: true });
});

Deno.test({
  name: "prune: leftovers go; an imported VM a clone still uses stays; unused ones go by LRU",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({});
    const work = await tempDir("prune");
    const vmdir = join("/var/tmp/sarde-test-vms", `prune-${Deno.pid}`);
    const store = join(work, "store");
    const target = `${vm.name}-clone`;
    let imageId = "";
    try {
      assert.equal((await sarde(["export", "-d", store, vm.name, "local/p:v1"], { env })).code, 0);
      const c = await sarde(["clone", "-d", store, "--vmdir", vmdir, "local/p:v1", target], {
        env,
      });
      assert.equal(c.code, 0, c.stderr);
      imageId =
        JSON.parse((await sarde(["list", "-d", store, "--format", "json"], { env })).stdout)[0].id;
      // Leftovers: a killed import's temp folder and a clone folder whose VM is gone.
      await Deno.mkdir(join(vmdir, ".sha256:dead.partial-999999-x"), { recursive: true });
      await Deno.mkdir(join(vmdir, "gone-clone"));
      await Deno.writeTextFile(join(vmdir, "gone-clone", ".sarde-clone.json"), "{}");

      const p1 = await sarde(["prune", "-d", store, "--vmdir", vmdir], { env });
      assert.equal(p1.code, 0, p1.stderr);
      const left = await listFiles(vmdir);
      assert.ok(!left.some((f) => f.includes("partial-999999")), "interrupted import removed");
      assert.ok(!left.some((f) => f.startsWith("gone-clone/")), "orphan clone folder removed");
      assert.ok(left.some((f) => f.startsWith(`${imageId}/`)), "imported base kept without limits");

      // Budget 0: the cache goes, but the base stays while the clone uses it.
      const p2 = await sarde(["prune", "-d", store, "--vmdir", vmdir, "--keep-bytes", "0"], {
        env,
      });
      assert.equal(p2.code, 0, p2.stderr);
      assert.deepEqual(await listFiles(store), [], "cached image removed");
      assert.ok(
        (await listFiles(vmdir)).some((f) => f.startsWith(`${imageId}/`)),
        "base in use is kept",
      );
      assert.equal(
        (await shTry("virsh", ["-c", TEST_URI, "domstate", "--domain", imageId])).code,
        0,
      );

      // Without the clone, the base is unused and goes (VM undefined, folder removed).
      await shTry("virsh", ["-c", TEST_URI, "undefine", "--domain", target]);
      const p3 = await sarde(["prune", "-d", store, "--vmdir", vmdir, "--keep-bytes", "0"], {
        env,
      });
      assert.equal(p3.code, 0, p3.stderr);
      assert.match(p3.stderr, /removed imported VM/);
      assert.equal(
        (await shTry("virsh", ["-c", TEST_URI, "domstate", "--domain", imageId])).code,
        1,
      );
      assert.ok(!(await listFiles(vmdir)).some((f) => f.startsWith(`${imageId}/`)));
    } finally {
      for (const n of [target, imageId].filter(Boolean)) {
        await shTry("virsh", ["-c", TEST_URI, "destroy", "--domain", n]);
        await shTry("virsh", ["-c", TEST_URI, "undefine", "--domain", n, "--nvram"]);
      }
      await Deno.remove(vmdir, { recursive: true }).catch(() => {});
      await Deno.remove(work, { recursive: true });
    }
  },
});
