/**
 * `sarde rm` and `sarde prune`: what goes, and above all what stays.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  addToIndex,
  hasBlob,
  openLayout,
  readBlob,
  readIndex,
  writeIndex,
} from "../lib/oci/layout.ts";
import { manifestBlobs, parseManifest } from "../lib/oci/types.ts";
import { findLayouts } from "../lib/oci/store.ts";
import { makeRoom, pullSizeEstimate, reserveRoom } from "../lib/vm/prune.ts";
import { readLocalManifest } from "../lib/oci/store.ts";
import { parseReference } from "../lib/oci/reference.ts";
import { IMPORT_MARKER } from "../lib/vm/import.ts";
import { SardeError } from "../lib/util/errors.ts";
import {
  listFiles,
  makeImage,
  run,
  sarde,
  type SardeProcess,
  spawnSarde,
  startPausingProxy,
  tempDir,
  until,
} from "./support/images.ts";
import { startRegistry } from "./support/registry.ts";
import {
  defineTestVm,
  domainXml,
  ensureLibvirtd,
  makeVmDir,
  removeVmDir,
  shTry,
  TEST_URI,
  undefineVms,
  uniqueVmName,
  virsh,
  virshDefine,
  writeRandom,
} from "./support/vms.ts";

const env = { LIBVIRT_DEFAULT_URI: TEST_URI };
const opts = { sanitizeResources: false, sanitizeOps: false };

Deno.test("pullSizeEstimate: an image's files count unless its VM folder already holds it", async () => {
  const work = await tempDir("estimate");
  try {
    await makeImage(work, "local/est:v1", [
      { size: 1 << 20, mediaType: "application/x-qemu-disk+gzip" },
    ]);
    const local = await readLocalManifest(work, parseReference("local/est:v1"));
    const folder = join(work, "vm");
    await Deno.mkdir(folder);
    const withFiles = await pullSizeEstimate(local, folder);
    assert.ok(withFiles > 0, "the files of a new import count (the blobs are all local)");
    const marker = (manifest: string) =>
      Deno.writeTextFile(
        join(folder, IMPORT_MARKER),
        JSON.stringify({
          image: local.manifest.config.digest,
          manifest,
          reference: "local/est:v1",
        }),
      );
    await marker(local.descriptor.digest);
    assert.equal(await pullSizeEstimate(local, folder), 0, "imported already: nothing to write");
    await marker("sha256:" + "0".repeat(64));
    assert.equal(await pullSizeEstimate(local, folder), withFiles, "another manifest: rewritten");
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("reserveRoom: pulls in progress count against the budget until released; a dead process's claim does not", async () => {
  const work = await tempDir("reserve");
  const MiB = 1 << 20;
  try {
    const o = {
      ocidir: join(work, "oci"),
      vmdir: join(work, "vms"),
      budgetBytes: 10 * MiB,
      what: "an image",
    };
    await Deno.mkdir(o.vmdir, { recursive: true });
    // Two pulls of 6 MiB each into an empty cache: each fits alone, not both.
    const first = await reserveRoom({ ...o, needBytes: 6 * MiB });
    await assert.rejects(
      () => reserveRoom({ ...o, needBytes: 6 * MiB }),
      /no room for an image within cache-budget 10\.0 MiB: it needs 6\.0 MiB.*6\.0 MiB of it claimed by pulls in progress/,
    );
    await first.release();
    const second = await reserveRoom({ ...o, needBytes: 6 * MiB });
    await second.release();
    // A claim left by a process that is gone (a crash) is dropped.
    const dead = 2 ** 22 + 1; // above pid_max's default: no such process
    await Deno.writeTextFile(
      join(o.vmdir, ".budget", "crashed.json"),
      JSON.stringify({ pid: dead, since: Date.now(), bytes: 9 * MiB }),
    );
    await (await reserveRoom({ ...o, needBytes: 6 * MiB })).release();
    assert.deepEqual(await Array.fromAsync(Deno.readDir(join(o.vmdir, ".budget"))), []);
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

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

/** Every manifest each index.json names is in the store, and so is every blob it needs. */
async function assertConsistent(store: string): Promise<void> {
  for (const { dir } of await findLayouts(store)) {
    for (const d of (await readIndex({ dir })).manifests) {
      const manifest = parseManifest(await readBlob({ dir }, d.digest));
      for (const b of manifestBlobs(manifest)) {
        assert.ok(await hasBlob({ dir }, b), `${dir}: blob ${b.digest} of ${d.digest} is missing`);
      }
    }
  }
}

Deno.test({
  name:
    "prune and rm during a pull: the pull's repository stays, the pull succeeds, the store stays consistent",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({ rawDisk: true });
    await using reg = await startRegistry("plain");
    await using proxy = await startPausingProxy(reg);
    const work = await tempDir("race");
    const store = join(work, "store");
    const vmdir = join("/var/tmp/sarde-test-vms", `race-${Deno.pid}`);
    const repo = `${reg.host}/sardines/race`;
    const other = `${reg.host}/sardines/other`;
    let name = "";
    try {
      const ok = (r: { code: number; stderr: string }) => assert.equal(r.code, 0, r.stderr);
      const src = join(work, "src");
      ok(await sarde(["export", "-d", src, vm.name, `${repo}:v0`], { env }));
      await writeRandom(vm.disks[1].path, 8, 16);
      ok(await sarde(["export", "-d", src, vm.name, `${repo}:v1`], { env }));
      ok(await sarde(["push", "-d", src, `${repo}:v0`]));
      ok(await sarde(["push", "-d", src, `${repo}:v1`]));
      ok(await sarde(["fetch", "-d", store, `${repo}:v0`]));
      ok(await sarde(["fetch", "-d", store, "--source", `${repo}:v0`, `${other}:v0`]));
      // Neither repository was used for a month.
      await run("touch", [
        "-d",
        "30 days ago",
        join(store, repo, "index.json"),
        join(store, other, "index.json"),
      ], { check: true });

      const pull = spawnSarde(
        [
          "pull",
          "-d",
          store,
          "--vmdir",
          vmdir,
          "--source",
          `${proxy.host}/sardines/race:v1`,
          `${repo}:v1`,
        ],
        { env },
      );
      await until(() => proxy.faults() > 0, "the pull is downloading");
      for (const limit of [["--older-than", "1d"], ["--keep-bytes", "0"]]) {
        const p = await sarde(["prune", "-d", store, "--vmdir", vmdir, ...limit], { env });
        ok(p);
        assert.match(
          p.stderr,
          /kept cached image .*sardines\/race: another sarde process is using it/,
        );
      }
      assert.ok(
        !(await listFiles(store)).some((f) => f.startsWith(other)),
        "unused repository removed",
      );
      const rm = spawnSarde(["rm", "-d", store, `${repo}:v0`]);
      await rm.stderrMatches(/waiting for the other sarde processes using/);
      proxy.release();
      const pulled = await pull.done();
      ok(pulled);
      name = pulled.stdout.trim();
      ok(await rm.done());

      const ls = await sarde(["list", "-d", store, "--vmdir", vmdir, "--format", "json"], { env });
      ok(ls);
      assert.equal(ls.stderr, "", "no warnings");
      assert.deepEqual(
        JSON.parse(ls.stdout).map((e: { name: string; tag: string }) => `${e.name}:${e.tag}`),
        [`${repo}:v1`],
      );
      await assertConsistent(store);
      assert.equal((await virsh("domstate", "--domain", name)).code, 0, "the pulled VM is defined");
    } finally {
      proxy.release();
      await undefineVms([name]);
      await Deno.remove(vmdir, { recursive: true }).catch(() => {});
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name: "prune: temp files of a killed fetch go, those of a fetch in flight stay",
  ...opts,
  fn: async () => {
    await using reg = await startRegistry("plain");
    await using proxy = await startPausingProxy(reg);
    const work = await tempDir("partials");
    const store = join(work, "store");
    const partials = async (repo: string) =>
      (await listFiles(join(store, reg.host, "sardines", repo))).filter((f) =>
        f.includes("/.partial-")
      );
    const fetch = (repo: string) =>
      spawnSarde([
        "fetch",
        "-d",
        store,
        "--source",
        `${proxy.host}/sardines/${repo}:v1`,
        `${reg.host}/sardines/${repo}:v1`,
      ]);
    let live: SardeProcess | undefined;
    try {
      const big = new Map<string, string>();
      for (const repo of ["killed", "live"]) {
        const ref = `${reg.host}/sardines/${repo}:v1`;
        const img = await makeImage(join(work, "src"), ref, [{ size: 4 << 20 }]);
        big.set(repo, img.layers[1].digest.slice(7));
        assert.equal((await sarde(["push", "-d", join(work, "src"), ref])).code, 0);
      }
      const killed = fetch("killed");
      await until(
        async () => proxy.faults() === 1 && (await partials("killed")).length > 0,
        "the first fetch is downloading",
      );
      killed.child.kill("SIGKILL");
      await killed.done();
      live = fetch("live");
      await until(
        async () => proxy.faults() === 2 && (await partials("live")).length > 0,
        "the second fetch is downloading",
      );

      const p = await sarde(["prune", "-d", store, "--vmdir", join(work, "vms")]);
      assert.equal(p.code, 0, p.stderr);
      assert.match(p.stderr, /removed \d+ temp file\(s\) of interrupted fetches or exports/);
      assert.deepEqual(await partials("killed"), [], "the killed fetch's temp files are gone");
      assert.ok(
        (await partials("live")).some((f) => f.includes(`.partial-${big.get("live")}-`)),
        "the live fetch's temp file stays",
      );
      proxy.release();
      const r = await live.done();
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(await partials("live"), []);
    } finally {
      proxy.release();
      await live?.done();
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name: "makeRoom: removes unused images and imported VMs in LRU order until it fits; " +
    "what a defined VM uses stays; an image too big fails with the numbers, removing nothing",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    const root = await makeVmDir("makeroom");
    const store = join(root, "oci");
    const vmdir = join(root, "vms");
    const user = uniqueVmName("sarde-makeroom");
    const MiB = 1 << 20;
    const daysAgo = (d: string, ...paths: string[]) =>
      run("touch", ["-d", `${d} days ago`, ...paths], { check: true });
    try {
      // Three cached images and three imported VMs of 2 MiB each, used 1 to 6 days ago.
      for (const [name, age] of [["a", 6], ["b", 4], ["c", 1]] as const) {
        const img = await makeImage(store, `local/${name}:v1`, [{ size: 2 * MiB }]);
        await daysAgo(String(age), join(img.dir, "index.json"));
      }
      for (const [name, age] of [["vm-old", 5], ["vm-used", 7], ["vm-new", 2]] as const) {
        const folder = join(vmdir, name);
        await Deno.mkdir(folder, { recursive: true });
        await run("qemu-img", ["create", "-q", "-f", "raw", join(folder, "disk.img"), "2M"], {
          check: true,
        });
        await run("dd", ["if=/dev/urandom", `of=${join(folder, "disk.img")}`, "bs=1M", "count=2"], {
          check: true,
        });
        await Deno.writeTextFile(join(folder, IMPORT_MARKER), "{}");
        await daysAgo(String(age), join(folder, IMPORT_MARKER));
      }
      // A defined VM (never started) whose disk is in the oldest imported VM's folder.
      await virshDefine(
        domainXml({
          name: user,
          disks: [{ path: join(vmdir, "vm-used", "disk.img"), format: "raw" }],
        }),
      );
      const o = { connect: TEST_URI, ocidir: store, vmdir, what: "the test image" };

      // Everything is ~12.1 MiB; 9 MiB more within 17.5 MiB: 3.6+ MiB must go: a and vm-old.
      const removed = await makeRoom({ ...o, needBytes: 9 * MiB, budgetBytes: 17.5 * MiB });
      assert.deepEqual(removed.map((r) => r.what.split(" (")[0]), [
        "cached image local/a",
        "imported VM vm-old",
      ]);
      for (const r of removed) assert.ok(r.bytes >= 2 * MiB, `${r.what}: ${r.bytes}`);
      assert.deepEqual(
        (await findLayouts(store)).map((l) => l.name).sort(),
        ["local/b", "local/c"],
      );
      const vms = async () =>
        (await Array.fromAsync(Deno.readDir(vmdir))).map((e) => e.name)
          .filter((n) => !n.startsWith(".")).sort();
      assert.deepEqual(await vms(), ["vm-new", "vm-used"], "the folder a defined VM uses stays");

      // It fits already: nothing goes.
      assert.deepEqual(await makeRoom({ ...o, needBytes: MiB, budgetBytes: 100 * MiB }), []);

      // More than the budget even with everything removable gone: an error with the numbers,
      // and nothing removed.
      await assert.rejects(
        () => makeRoom({ ...o, needBytes: 20 * MiB, budgetBytes: 21 * MiB }),
        (err) => {
          assert.ok(err instanceof SardeError, String(err));
          assert.match(
            err.message,
            /no room for the test image within cache-budget 21\.0 MiB: it needs 20\.0 MiB, and 2\.\d MiB of the cache is in use/,
          );
          return true;
        },
      );
      assert.equal((await findLayouts(store)).length, 2, "nothing removed for an image too big");
      assert.deepEqual(await vms(), ["vm-new", "vm-used"]);
    } finally {
      await undefineVms([user]);
      await removeVmDir(root);
    }
  },
});
