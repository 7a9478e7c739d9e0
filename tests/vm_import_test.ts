/**
 * Import robustness: hostile images, interrupted imports, parallel pulls, and clones.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { encodeGzip } from "../lib/image/gzip.ts";
import { digestOf } from "../lib/oci/digest.ts";
import { listFiles, run, SARDE, sarde, tempDir } from "./support/images.ts";
import { startRegistry } from "./support/registry.ts";
import { defineTestVm, ensureLibvirtd, TEST_URI, undefineVms, virsh } from "./support/vms.ts";

const env = { LIBVIRT_DEFAULT_URI: TEST_URI };
const opts = { sanitizeResources: false, sanitizeOps: false };

/**
 * Rewrites the manifest of a stored image (test helper to forge hostile images): `edit` may
 * change the manifest and the config; both are stored again and the index points at them.
 */
interface ForgedLayer {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

async function forgeImage(
  layout: string,
  edit: (
    manifest: { config: { digest: string; size: number }; layers: ForgedLayer[] },
    config: { rootfs: { diff_ids: string[] } },
    blob: (digest: string) => string,
    write: (text: string) => Promise<{ digest: string; size: number }>,
  ) => Promise<void>,
): Promise<void> {
  const blob = (d: string) => join(layout, "blobs", "sha256", d.slice(7));
  const write = async (text: string) => {
    const bytes = new TextEncoder().encode(text);
    const digest = digestOf(bytes);
    await Deno.writeFile(blob(digest), bytes);
    return { digest, size: bytes.length };
  };
  const index = JSON.parse(await Deno.readTextFile(join(layout, "index.json")));
  const manifest = JSON.parse(await Deno.readTextFile(blob(index.manifests[0].digest)));
  const config = JSON.parse(await Deno.readTextFile(blob(manifest.config.digest)));
  await edit(manifest, config, blob, write);
  Object.assign(manifest.config, await write(JSON.stringify(config)));
  Object.assign(index.manifests[0], await write(JSON.stringify(manifest)));
  await Deno.writeTextFile(join(layout, "index.json"), JSON.stringify(index));
}

/** Replaces the domain XML of a stored image, consistently (config diff_id included). */
function forgeXml(layout: string, edit: (xml: string) => string): Promise<void> {
  return forgeImage(layout, async (manifest, config, blob, write) => {
    const xml = await Deno.readTextFile(blob(manifest.layers[0].digest));
    Object.assign(manifest.layers[0], await write(edit(xml)));
    config.rootfs.diff_ids[0] = manifest.layers[0].digest;
  });
}

Deno.test({
  name: "import: hostile domain XML is refused; nothing is defined or written",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({});
    const work = await tempDir("hostile");
    const vmdir = join(work, "vms");
    try {
      assert.equal(
        (await sarde(["export", "-d", join(work, "s"), vm.name, "local/evil:v1"], { env })).code,
        0,
      );
      const cases: [string, (x: string) => string, RegExp][] = [
        [
          "disk path",
          (x) => x.replace(/<source file="[^"]+"/, '<source file="../../../../etc/shadow"'),
          /outside the image/,
        ],
        [
          "block device",
          (x) =>
            x.replace(
              "</devices>",
              "<disk type='block' device='disk'><source dev='/dev/vda'/><target dev='vdz'/></disk></devices>",
            ),
          /host storage/,
        ],
        [
          "hostdev",
          (x) =>
            x.replace(
              "</devices>",
              "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0' slot='1' function='0'/></source></hostdev></devices>",
            ),
          /host resources/,
        ],
        [
          "qemu:commandline",
          (x) =>
            x.replace(
              "<domain ",
              "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' ",
            ).replace(
              "</domain>",
              "<qemu:commandline><qemu:arg value='-nope'/></qemu:commandline></domain>",
            ),
          /raw arguments to QEMU/,
        ],
      ];
      for (const [what, edit, expected] of cases) {
        await Deno.remove(join(work, "t"), { recursive: true }).catch(() => {});
        await run("cp", ["-a", join(work, "s"), join(work, "t")], { check: true });
        await forgeXml(join(work, "t", "local", "evil"), edit);
        const r = await sarde([
          "import",
          "-d",
          join(work, "t"),
          "--vmdir",
          vmdir,
          "-n",
          `${vm.name}-evil`,
          "local/evil:v1",
        ], { env });
        assert.equal(r.code, 2, `${what}: ${r.stderr}`);
        assert.match(r.stderr, expected, what);
        assert.match(r.stderr, /--allow-host-resources/);
        assert.equal(
          (await virsh("domstate", "--domain", `${vm.name}-evil`)).code,
          1,
          `${what}: not defined`,
        );
        assert.deepEqual(
          (await listFiles(vmdir)).filter((f) => !f.startsWith(".locks/")),
          [],
          `${what}: nothing extracted`,
        );
      }
    } finally {
      await undefineVms([`${vm.name}-evil`]);
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name: "import: a killed import is redone by the next one; two parallel pulls extract once",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({ rawDisk: true });
    // A big sparse-free disk makes the extraction last long enough to be killed.
    const big = join(vm.dir, "sparse.raw");
    await run("sh", ["-c", `head -c 600M /dev/urandom > '${big}'`], { check: true });
    await using reg = await startRegistry("plain");
    const work = await tempDir("interrupt");
    const vmdir = join("/var/tmp/sarde-test-vms", `interrupt-${Deno.pid}`);
    const ref = `${reg.host}/sardines/interrupt:v1`;
    const names: string[] = [];
    try {
      assert.equal(
        (await sarde(["export", "-d", join(work, "s"), "--chunksize", "8MiB", vm.name, ref], {
          env,
        })).code,
        0,
      );
      assert.equal((await sarde(["push", "-d", join(work, "s"), ref])).code, 0);
      const store = join(work, "f");
      assert.equal((await sarde(["fetch", "-d", store, ref])).code, 0);

      // Kill -9 an import as soon as its temp folder has data in it.
      const child = new Deno.Command(SARDE, {
        args: ["import", "-d", store, "--vmdir", vmdir, ref],
        env,
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      let killed = false;
      for (let i = 0; i < 400 && !killed; i++) {
        await new Promise((r) => setTimeout(r, 25));
        const partial = (await listFiles(vmdir).catch(() => [])).find((f) =>
          f.startsWith(".") && f.includes(".partial-") && f.endsWith("sparse.raw")
        );
        if (partial) {
          child.kill("SIGKILL");
          killed = true;
        }
      }
      const status = await child.output();
      assert.ok(killed, "the import was caught mid-extraction");
      assert.notEqual(status.code, 0);
      const imageId =
        JSON.parse((await sarde(["list", "-d", store, "--format", "json"], { env })).stdout)[0].id;
      assert.equal(
        (await virsh("domstate", "--domain", imageId)).code,
        1,
        "no VM was defined by the killed import",
      );

      // Two pulls at once: both succeed, print the same name, one extracts.
      const [a, b] = await Promise.all([
        sarde(["pull", "-d", store, "--vmdir", vmdir, ref], { env }),
        sarde(["pull", "-d", store, "--vmdir", vmdir, ref], { env }),
      ]);
      assert.equal(a.code, 0, a.stderr);
      assert.equal(b.code, 0, b.stderr);
      names.push(a.stdout.trim());
      assert.equal(a.stdout, b.stdout);
      assert.equal([a, b].filter((r) => /importing/.test(r.stderr)).length, 1, "one extraction");
      const left = await listFiles(vmdir);
      assert.deepEqual(
        left.filter((f) => f.includes(".partial-")),
        [],
        "leftovers of the killed import are gone",
      );
      const raw = join(vmdir, imageId, "sparse.raw");
      const cmp = await run("cmp", [raw, big]);
      assert.equal(cmp.code, 0, "the redone import is complete");
    } finally {
      await undefineVms(names);
      await Deno.remove(vmdir, { recursive: true }).catch(() => {});
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name: "clone: copy-on-write overlays, new identity, own NVRAM; the base stays untouched",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({ chain: true, cdrom: true });
    const work = await tempDir("clone");
    const vmdir = join("/var/tmp/sarde-test-vms", `clone-${Deno.pid}`);
    const names: string[] = [];
    try {
      assert.equal((await sarde(["export", "-d", work, vm.name, "local/c:v1"], { env })).code, 0);
      const target = `${vm.name}-clone`;
      const t0 = performance.now();
      const r = await sarde(["clone", "-d", work, "--vmdir", vmdir, "local/c:v1", target], { env });
      assert.equal(r.code, 0, r.stderr);
      names.push(target);
      const imageId =
        JSON.parse((await sarde(["list", "-d", work, "--format", "json"], { env })).stdout)[0].id;
      names.push(imageId);
      assert.equal(r.stdout.trim(), target);
      const xml = (await virsh("dumpxml", "--domain", target, "--inactive")).stdout;
      const overlay = join(vmdir, target, "top.qcow2");
      assert.ok(xml.includes(overlay), "the disk is an overlay in the clone folder");
      assert.ok(
        xml.includes(join(vmdir, imageId, "cdrom.iso")),
        "the cdrom is shared with the base",
      );
      const info = JSON.parse((await run("qemu-img", ["info", "--output=json", overlay])).stdout);
      assert.equal(
        info["full-backing-filename"] ?? info["backing-filename"],
        join(vmdir, imageId, "top.qcow2"),
      );
      assert.ok(info["actual-size"] < 1 << 20, "the overlay is tiny");
      const cmp = await run("qemu-img", ["compare", overlay, vm.chain!.top.path]);
      assert.equal(cmp.code, 0, cmp.stdout);
      const baseUuid = (await virsh("domuuid", "--domain", imageId)).stdout.trim();
      const cloneUuid = (await virsh("domuuid", "--domain", target)).stdout.trim();
      assert.notEqual(baseUuid, cloneUuid);
      // Cloning a defined VM by name works too, and an existing target is refused.
      const again = await sarde(["clone", "--vmdir", vmdir, imageId, target], { env });
      assert.equal(again.code, 2);
      assert.match(again.stderr, /already exists/);
      // An image cloned onto an existing name is refused before the base is imported.
      const vmdir2 = `${vmdir}-2`;
      const taken = await sarde(["clone", "-d", work, "--vmdir", vmdir2, "local/c:v1", vm.name], {
        env,
      });
      assert.equal(taken.code, 2, taken.stderr);
      assert.match(taken.stderr, /already exists/);
      assert.deepEqual(await listFiles(vmdir2).catch(() => []), [], "nothing was imported");
      // Too long a name is named as such (it used to get the hint about '/').
      for (
        const args of [["clone", "local/c:v1", "x".repeat(300)], [
          "import",
          "-n",
          "y".repeat(300),
          "local/c:v1",
        ]]
      ) {
        const long = await sarde([...args, "-d", work, "--vmdir", vmdir2], { env });
        assert.equal(long.code, 2, long.stderr);
        assert.match(long.stderr, /300 bytes long, at most 200/);
        assert.doesNotMatch(long.stderr, /'\/'/);
      }
      console.log(`clone took ${(performance.now() - t0).toFixed(0)} ms (including the import)`);
    } finally {
      await undefineVms(names);
      await Deno.remove(vmdir, { recursive: true }).catch(() => {});
      await Deno.remove(`${vmdir}-2`, { recursive: true }).catch(() => {});
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name: "import: a qcow2 header whose backing file is a host file is refused",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({});
    const work = await tempDir("evilbacking");
    const vmdir = join(work, "vms");
    try {
      const store = join(work, "s");
      const exp = await sarde([
        "export",
        "-d",
        store,
        "--compression",
        "gzip",
        vm.name,
        "local/evil:v1",
      ], { env });
      assert.equal(exp.code, 0, exp.stderr);
      // Swap the disk for one whose header points at a host file, as a hostile 0.4-style image would.
      const evil = join(work, "plain.qcow2");
      await run("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        "/etc/passwd",
        evil,
        "1M",
      ], {
        check: true,
      });
      const enc = await encodeGzip(evil, {
        storedName: "plain.qcow2",
        mtime: 0,
        chunkSize: 0,
        outDir: work,
      });
      // A consistent forgery: the config's diff_id for the file is the new file's digest.
      await forgeImage(join(store, "local", "evil"), async (manifest, config, blob) => {
        await Deno.rename(enc.pieces[0].path, blob(enc.pieces[0].digest));
        const disk = manifest.layers.findIndex((l) => l.mediaType.endsWith("+gzip"));
        manifest.layers[disk] = {
          ...manifest.layers[disk],
          digest: enc.pieces[0].digest,
          size: enc.pieces[0].size,
        };
        config.rootfs.diff_ids[config.rootfs.diff_ids.length - 1] = enc.fileDigest;
      });

      const r = await sarde([
        "import",
        "-d",
        store,
        "--vmdir",
        vmdir,
        "-n",
        `${vm.name}-evil`,
        "local/evil:v1",
      ], { env });
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, /backed by '\/etc\/passwd', which is not a file of the image/);
      assert.equal((await virsh("domstate", "--domain", `${vm.name}-evil`)).code, 1, "not defined");
      assert.deepEqual(
        (await listFiles(vmdir)).filter((f) => !f.startsWith(".locks/")),
        [],
        "nothing kept",
      );
    } finally {
      await undefineVms([`${vm.name}-evil`]);
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name: "import: a manifest whose layers do not match its config (the image ID) is refused",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({ rawDisk: true });
    const work = await tempDir("diffids");
    const vmdir = join("/var/tmp/sarde-test-vms", `imported-diffids-${Deno.pid}`);
    try {
      const ex = await sarde(
        ["export", "-d", work, "--chunksize", "1MiB", vm.name, "local/d:v1"],
        { env },
      );
      assert.equal(ex.code, 0, ex.stderr);
      const layout = join(work, "local", "d");
      // Swap two different chunks of one file (blobs and their digests): every chunk still
      // decodes to its annotated digest, but the file is not the one the config describes.
      const key = "org.sardinecake.chunk.digest";
      await forgeImage(layout, (manifest) => {
        const chunks = manifest.layers.filter((l) => l.annotations?.[key]);
        const ann = (l: ForgedLayer, k: string) =>
          l.annotations![k.startsWith("org.") ? k : `org.sardinecake.${k}`];
        const swappable = (l: ForgedLayer, m: ForgedLayer) =>
          ann(l, "file.name") === ann(m, "file.name") &&
          ann(l, "chunk.size") === ann(m, "chunk.size") && ann(l, key) !== ann(m, key);
        const a = chunks.find((l) => chunks.some((m) => swappable(l, m)));
        const b = a && chunks.find((m) => swappable(a, m));
        assert.ok(a && b, "two different chunks of the same size");
        [a.digest, b.digest] = [b.digest, a.digest];
        [a.size, b.size] = [b.size, a.size];
        [a.annotations![key], b.annotations![key]] = [b.annotations![key], a.annotations![key]];
        return Promise.resolve();
      });
      const imp = await sarde(
        ["import", "-d", work, "--vmdir", vmdir, "-n", `${vm.name}-forged`, "local/d:v1"],
        { env },
      );
      assert.equal(imp.code, 6, imp.stderr);
      assert.match(imp.stderr, /does not match the image config/);

      // A config without the file list (sarde 0.2) is refused with a hint to re-export.
      await forgeImage(layout, (_manifest, config) => {
        delete (config as { config?: unknown }).config;
        return Promise.resolve();
      });
      const old = await sarde(
        ["import", "-d", work, "--vmdir", vmdir, "-n", `${vm.name}-old`, "local/d:v1"],
        { env },
      );
      assert.equal(old.code, 6, old.stderr);
      assert.match(old.stderr, /made by sarde 0\.2 or older[^]*re-export/);
      assert.notEqual((await virsh("dominfo", `${vm.name}-forged`)).code, 0, "no VM defined");
      const left = (await listFiles(vmdir)).filter((f) => !f.startsWith(".locks"));
      assert.deepEqual(left, []);
    } finally {
      await undefineVms([`${vm.name}-forged`, `${vm.name}-old`]); // only if the test failed
      await Deno.remove(vmdir, { recursive: true }).catch(() => {});
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "pull: files of an imported VM that vanished are extracted again (defined or not, old markers too)",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({ rawDisk: true });
    await using reg = await startRegistry("plain");
    const work = await tempDir("vanished");
    const vmdir = join("/var/tmp/sarde-test-vms", `vanished-${Deno.pid}`);
    const ref = `${reg.host}/sardines/vanished:v1`;
    const names: string[] = [];
    try {
      const src = join(work, "src");
      assert.equal((await sarde(["export", "-d", src, vm.name, ref], { env })).code, 0);
      assert.equal((await sarde(["push", "-d", src, ref])).code, 0);
      const pull = async () => {
        const r = await sarde(["pull", "-d", join(work, "store"), "--vmdir", vmdir, ref], { env });
        assert.equal(r.code, 0, r.stderr);
        names.push(r.stdout.trim());
        return r;
      };
      const name = (await pull()).stdout.trim();
      const folder = join(vmdir, name);
      const [qcow2, raw] = [join(folder, "plain.qcow2"), join(folder, "sparse.raw")];
      const intact = async () => {
        for (
          const [copy, original, format] of [[qcow2, vm.disks[0].path, "qcow2"], [
            raw,
            vm.disks[1].path,
            "raw",
          ]]
        ) {
          const r = await run("qemu-img", ["compare", "-f", format, "-F", format, copy, original]);
          assert.equal(r.code, 0, `${copy}: ${r.stdout}${r.stderr}`);
        }
        assert.equal((await virsh("domstate", "--domain", name)).code, 0, "the VM is defined");
      };
      await intact();
      assert.match((await pull()).stderr, /already imported/);

      // The disk of a defined VM is deleted.
      await Deno.remove(qcow2);
      let r = await pull();
      assert.equal(r.stdout.trim(), name);
      assert.match(r.stderr, /plain\.qcow2 vanished; extracting again/);
      await intact();

      // The VM is undefined and a disk deleted.
      assert.equal((await virsh("undefine", "--domain", name)).code, 0);
      await Deno.remove(raw);
      r = await pull();
      assert.match(r.stderr, /sparse\.raw vanished; extracting again/);
      await intact();

      // A marker of sarde 0.3.0 (no file sizes), and a disk cut short.
      const markerPath = join(folder, ".sarde-import.json");
      const marker = JSON.parse(await Deno.readTextFile(markerPath));
      assert.deepEqual(marker.files.map((f: { name: string }) => f.name).sort(), [
        "plain.qcow2",
        "sparse.raw",
      ]);
      delete marker.files;
      await Deno.writeTextFile(markerPath, JSON.stringify(marker));
      await Deno.truncate(raw, 1 << 20);
      r = await pull();
      assert.match(r.stderr, /sparse\.raw vanished; extracting again/);
      await intact();
      assert.ok(
        JSON.parse(await Deno.readTextFile(markerPath)).files,
        "the marker has the sizes again",
      );
      assert.match((await pull()).stderr, /already imported/);
      assert.deepEqual((await listFiles(vmdir)).filter((f) => f.includes(".partial-")), []);
    } finally {
      await undefineVms([...new Set(names)]);
      await Deno.remove(vmdir, { recursive: true }).catch(() => {});
      await Deno.remove(work, { recursive: true });
    }
  },
});
