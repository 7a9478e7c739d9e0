/**
 * VMs in and out of libvirt, for real: test VMs built from scratch (qemu-img + domain XML) under
 * libvirtd on qemu:///system, exported, pushed to a real registry, pulled back and compared.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { digestFile } from "../lib/oci/digest.ts";
import {
  listFiles,
  run,
  sarde,
  spawnSarde,
  startPausingProxy,
  tempDir,
  until,
} from "./support/images.ts";
import { startFaultyProxy } from "./support/proxy.ts";
import { startRegistry } from "./support/registry.ts";
import {
  defineTestVm,
  ensureLibvirtd,
  haveOvmf,
  TEST_URI,
  type TestVm,
  undefineVms,
  virsh,
  writeRandom,
} from "./support/vms.ts";

const env = { LIBVIRT_DEFAULT_URI: TEST_URI };
const opts = { sanitizeResources: false, sanitizeOps: false };
const FAST_RETRY = { SARDE_RETRY_BASE_MS: "20" };

async function sameContent(a: string, b: string, format: string) {
  const r = await run("qemu-img", ["compare", "-f", format, "-F", format, a, b]);
  assert.equal(r.code, 0, `qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
}

async function allocatedBytes(path: string): Promise<number> {
  const st = await Deno.stat(path);
  return (st.blocks ?? 0) * 512;
}

/** Everything a full VM has: 3-level absolute chain, sparse raw disk, cdrom, NVRAM, kernel. */
async function fullVm(extra: { chain?: true | "same-basename" } = {}): Promise<TestVm> {
  await ensureLibvirtd();
  return await defineTestVm({
    chain: extra.chain ?? true,
    rawDisk: true,
    cdrom: true,
    nvram: await haveOvmf(),
    kernel: true,
  });
}

for (const compression of ["zstd", "gzip"] as const) {
  Deno.test({
    name: `vm: export (${compression}) → push → delete everything local → pull → identical VM`,
    ...opts,
    fn: async () => {
      await using vm = await fullVm();
      await using reg = await startRegistry("plain");
      const work = await tempDir(`vm-${compression}`);
      const vmdir = join("/var/tmp/sarde-test-vms", `imported-${compression}-${Deno.pid}`);
      const vmconfig = join(work, "vm.json");
      await Deno.writeTextFile(
        vmconfig,
        JSON.stringify({
          users: [{ username: "root", password: "sarde" }],
          services: [{ service: "ssh", port: 22, protocol: "tcp" }],
        }),
      );
      const ref = `${reg.host}/sardines/${compression}:v1`;
      const names: string[] = [];
      try {
        const exp = await sarde([
          "export",
          "-d",
          join(work, "a"),
          "--vmconfig",
          vmconfig,
          "--compression",
          compression,
          "--chunksize",
          compression === "zstd" ? "1MiB" : "300KiB",
          vm.name,
          ref,
        ], { env });
        assert.equal(exp.code, 0, exp.stderr);
        const imageId = `sha256:${exp.stdout.trim()}`;
        assert.match(imageId, /^sha256:[a-f0-9]{64}$/);
        assert.equal((await sarde(["push", "-d", join(work, "a"), ref])).code, 0);
        await Deno.remove(join(work, "a"), { recursive: true });

        // Interop: skopeo copies registry → OCI folder → registry without changing a digest.
        const manifestOf = async (r: string) =>
          (await run("skopeo", ["inspect", "--raw", "--tls-verify=false", `docker://${r}`], {
            check: true,
          })).stdout;
        const oci = join(work, "skopeo-oci");
        await run(
          "skopeo",
          ["copy", "--src-tls-verify=false", `docker://${ref}`, `oci:${oci}:v1`],
          { check: true },
        );
        const copy = `${reg.host}/copied/${compression}:v1`;
        await run("skopeo", [
          "copy",
          "--dest-tls-verify=false",
          `oci:${oci}:v1`,
          `docker://${copy}`,
        ], { check: true });
        assert.equal(
          await manifestOf(copy),
          await manifestOf(ref),
          "skopeo round trip keeps the manifest byte for byte",
        );

        const pulled = await sarde(["pull", "-d", join(work, "b"), "--vmdir", vmdir, ref], { env });
        assert.equal(pulled.code, 0, pulled.stderr);
        const name = pulled.stdout.trim();
        names.push(name);
        assert.equal(name, imageId, "default VM name is the image ID, as in sardinecake 0.4");
        assert.equal((await virsh("domstate", "--domain", name)).stdout.trim(), "shut off");

        const folder = join(vmdir, name);
        const xml = (await virsh("dumpxml", "--domain", name, "--inactive")).stdout;
        assert.ok(!xml.includes(vm.uuid), "new UUID");
        for (const mac of vm.macs) assert.ok(!xml.includes(mac), "new MAC addresses");
        assert.ok(!xml.includes(vm.dir), "nothing points at the exporter's files");
        const files = await listFiles(folder);
        // Chain: same guest-visible content, relative backing references, consistent images.
        const top = vm.chain!.top.path;
        const importedTop = join(folder, "top.qcow2");
        assert.ok(
          files.includes("base.qcow2") && files.includes("mid.qcow2") &&
            files.includes("top.qcow2"),
          files.join(" "),
        );
        assert.match(
          xml,
          new RegExp(`file='${importedTop.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}'`),
        );
        await sameContent(top, importedTop, "qcow2");
        const chk = await run("qemu-img", ["check", "-q", importedTop]);
        assert.equal(chk.code, 0, chk.stderr);
        const info = JSON.parse(
          (await run("qemu-img", ["info", "--backing-chain", "--output=json", importedTop])).stdout,
        );
        assert.deepEqual(
          info.map((i: { filename: string }) => i.filename),
          ["top.qcow2", "mid.qcow2", "base.qcow2"].map((f) => join(folder, f)),
        );
        // Raw sparse disk: byte-identical, and still sparse.
        const raw = vm.disks.find((d) => d.format === "raw" && d.device === "disk")!;
        assert.deepEqual(await digestFile(join(folder, "sparse.raw")), await digestFile(raw.path));
        assert.ok(
          await allocatedBytes(join(folder, "sparse.raw")) <= 16 << 20,
          "holes stay holes (64 MiB file, 192 KiB of data)",
        );
        // cdrom, NVRAM, kernel, initrd: byte-identical and referenced from the VM folder.
        const iso = vm.disks.find((d) => d.device === "cdrom")!;
        assert.deepEqual(await digestFile(join(folder, "cdrom.iso")), await digestFile(iso.path));
        for (const f of [vm.nvram, vm.kernel, vm.initrd].filter(Boolean) as string[]) {
          const base = f.split("/").at(-1)!;
          assert.deepEqual(await digestFile(join(folder, base)), await digestFile(f), base);
          assert.ok(xml.includes(join(folder, base)), `${base} is referenced from the VM folder`);
        }
        assert.ok(
          xml.includes(join(folder, "serial-serial.log")),
          "serial log re-pointed into the VM folder",
        );

        // Idempotent: the same pull again prints the same name and changes nothing.
        const again = await sarde(["pull", "-d", join(work, "b"), "--vmdir", vmdir, ref], { env });
        assert.equal(again.code, 0, again.stderr);
        assert.equal(again.stdout.trim(), name);
        assert.match(again.stderr, /already imported/);

        // list shows the state of the imported VM; getconfig the vmconfig.
        const list = JSON.parse(
          (await sarde(["list", "-d", join(work, "b"), "--format", "json"], { env })).stdout,
        );
        assert.equal(list[0].state, "stopped");
        assert.equal(
          JSON.parse((await sarde(["getconfig", "-d", join(work, "b"), ref])).stdout).services[0]
            .port,
          22,
        );
      } finally {
        await undefineVms(names);
        await Deno.remove(vmdir, { recursive: true }).catch(() => {});
        await Deno.remove(work, { recursive: true });
      }
    },
  });
}

Deno.test({
  name: "vm: chains whose files share one basename get unique names and stay intact",
  ...opts,
  fn: async () => {
    await using vm = await fullVm({ chain: "same-basename" });
    const work = await tempDir("samename");
    const vmdir = join("/var/tmp/sarde-test-vms", `imported-same-${Deno.pid}`);
    let name = "";
    try {
      assert.equal(
        (await sarde(["export", "-d", work, vm.name, "local/same:v1"], { env })).code,
        0,
      );
      const imp = await sarde([
        "import",
        "-d",
        work,
        "--vmdir",
        vmdir,
        "-n",
        `${vm.name}-imported`,
        "local/same:v1",
      ], { env });
      assert.equal(imp.code, 0, imp.stderr);
      name = imp.stdout.trim();
      const folder = join(vmdir, name);
      const files = await listFiles(folder);
      for (const f of ["disk.qcow2", "disk-1.qcow2", "disk-2.qcow2"]) {
        assert.ok(files.includes(f), files.join(" "));
      }
      await sameContent(vm.chain!.top.path, join(folder, "disk-2.qcow2"), "qcow2");
      // `list` finds the VM imported under another name than the image ID.
      const ls = await sarde(["list", "-d", work, "--vmdir", vmdir, "--format", "json"], { env });
      assert.equal(ls.code, 0, ls.stderr);
      assert.deepEqual(
        JSON.parse(ls.stdout).map((e: { name: string; state: string }) => [e.name, e.state]),
        [["local/same", "stopped"]],
      );
    } finally {
      await undefineVms([name]);
      await Deno.remove(vmdir, { recursive: true }).catch(() => {});
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name: "vm: export is reproducible and a changed disk re-uses the unchanged chunks",
  ...opts,
  fn: async () => {
    await using vm = await fullVm();
    const work = await tempDir("repro");
    const a = await sarde([
      "export",
      "-d",
      join(work, "a"),
      "--chunksize",
      "1MiB",
      vm.name,
      "local/r:v1",
    ], { env });
    const b = await sarde([
      "export",
      "-d",
      join(work, "b"),
      "--chunksize",
      "1MiB",
      vm.name,
      "local/r:v1",
    ], { env });
    assert.equal(a.code, 0, a.stderr);
    assert.equal(a.stdout, b.stdout, "same image ID twice");
    const index = (d: string) =>
      JSON.parse(Deno.readTextFileSync(join(work, d, "local", "r", "index.json")));
    assert.equal(
      index("a").manifests[0].digest,
      index("b").manifests[0].digest,
      "same manifest digest",
    );
    // Change 64 KiB of the raw disk: only one chunk differs.
    const raw = vm.disks.find((d) => d.format === "raw" && d.device === "disk")!;
    await run("qemu-io", ["-f", "raw", "-c", "write -P 0x77 8M 64k", raw.path], { check: true });
    const c = await sarde([
      "export",
      "-d",
      join(work, "a"),
      "--chunksize",
      "1MiB",
      vm.name,
      "local/r:v2",
    ], { env });
    assert.equal(c.code, 0, c.stderr);
    const manifests = async (tag: string) => {
      const idx = index("a");
      const d = idx.manifests.find((m: { annotations: Record<string, string> }) =>
        m.annotations["org.opencontainers.image.ref.name"] === tag
      );
      return JSON.parse(
        await Deno.readTextFile(
          join(work, "a", "local", "r", "blobs", "sha256", d.digest.slice(7)),
        ),
      );
    };
    const l1 = new Set((await manifests("v1")).layers.map((l: { digest: string }) => l.digest));
    const l2 = (await manifests("v2")).layers.map((l: { digest: string }) => l.digest);
    const fresh = l2.filter((d: string) => !l1.has(d));
    // the changed chunk, the XML is the same, the config differs (not a layer)
    assert.equal(fresh.length, 1, `exactly one new layer blob, got ${fresh.length}`);
    await Deno.remove(work, { recursive: true });
  },
});

Deno.test({
  name: "vm: gzip layout is sardinecake 0.4's (header bytes, media types, order)",
  ...opts,
  fn: async () => {
    await using vm = await defineTestVm({ chain: true });
    const work = await tempDir("gzipfmt");
    Deno.env.set("SOURCE_DATE_EPOCH", "1700000000");
    const r = await sarde([
      "export",
      "-d",
      work,
      "--compression",
      "gzip",
      "--chunksize",
      "64KiB",
      vm.name,
      "local/g:v1",
    ], {
      env: { ...env, SOURCE_DATE_EPOCH: "1700000000" },
    });
    Deno.env.delete("SOURCE_DATE_EPOCH");
    assert.equal(r.code, 0, r.stderr);
    const dir = join(work, "local", "g");
    const idx = JSON.parse(await Deno.readTextFile(join(dir, "index.json")));
    const blob = (d: string) => join(dir, "blobs", "sha256", d.slice(7));
    const manifest = JSON.parse(await Deno.readTextFile(blob(idx.manifests[0].digest)));
    assert.equal(manifest.layers[0].mediaType, "application/vnd.libvirt.domain.config+xml");
    const disks = manifest.layers.slice(1);
    // Each file: first piece "+gzip", then ";chunk=1", ";chunk=2", …; base.qcow2 first.
    const starts = disks.map((l: { mediaType: string }, i: number) => [i, l.mediaType]).filter((
      [, t]: [number, string],
    ) => !t.includes(";"));
    assert.equal(starts.length, 3, "three files: base, mid, top");
    for (const [i, t] of disks.map((l: { mediaType: string }, i: number) => [i, l.mediaType])) {
      assert.match(t, /^application\/x-qemu-disk\+gzip(;chunk=\d+)?$/, `layer ${i}`);
    }
    const names: string[] = [];
    for (const [i] of starts) {
      const head = (await Deno.readFile(blob(disks[i].digest))).subarray(0, 32);
      assert.deepEqual([...head.subarray(0, 4)], [0x1f, 0x8b, 0x08, 0x08], "magic, deflate, FNAME");
      assert.equal(
        new DataView(head.buffer, head.byteOffset).getUint32(4, true),
        1700000000,
        "MTIME",
      );
      assert.deepEqual([...head.subarray(8, 10)], [0x00, 0xff], "XFL, OS");
      const end = head.indexOf(0, 10);
      names.push(new TextDecoder("latin1").decode(head.subarray(10, end)));
    }
    assert.deepEqual(names, ["base.qcow2", "mid.qcow2", "top.qcow2"]);
    // Continuation pieces carry consecutive chunk numbers.
    let expect = 0;
    for (const l of disks) {
      const m = /;chunk=(\d+)/.exec(l.mediaType);
      expect = m ? expect + 1 : 0;
      assert.equal(m ? Number(m[1]) : 0, expect);
    }
    // The concatenated pieces of each file are one gzip stream that gunzip reads.
    const first = disks.slice(0, starts[1][0]).map((l: { digest: string }) => blob(l.digest));
    const gunzip = await run("sh", [
      "-c",
      `cat ${first.map((p: string) => `'${p}'`).join(" ")} | gzip -dc | sha256sum`,
    ]);
    assert.equal(
      gunzip.stdout.split(" ")[0],
      (await digestFile(vm.chain!.base.path)).digest.slice(7),
    );
    await Deno.remove(work, { recursive: true });
  },
});

Deno.test({
  name: "vm: zstd layers carry file, chunk and digest annotations",
  ...opts,
  fn: async () => {
    await using vm = await defineTestVm({ rawDisk: true });
    const work = await tempDir("zstdfmt");
    assert.equal(
      (await sarde(["export", "-d", work, "--chunksize", "16MiB", vm.name, "local/z:v1"], { env }))
        .code,
      0,
    );
    const dir = join(work, "local", "z");
    const idx = JSON.parse(await Deno.readTextFile(join(dir, "index.json")));
    const manifest = JSON.parse(
      await Deno.readTextFile(join(dir, "blobs", "sha256", idx.manifests[0].digest.slice(7))),
    );
    const raw = manifest.layers.filter((l: { annotations?: Record<string, string> }) =>
      l.annotations?.["org.sardinecake.file.name"] === "sparse.raw"
    );
    assert.equal(raw.length, 4, "64 MiB in 16 MiB chunks");
    raw.forEach((l: { mediaType: string; annotations: Record<string, string> }, i: number) => {
      assert.equal(l.mediaType, "application/octet-stream+zstd");
      assert.equal(l.annotations["org.sardinecake.chunk.index"], String(i));
      assert.equal(l.annotations["org.sardinecake.chunk.offset"], String(i * (16 << 20)));
      assert.equal(l.annotations["org.sardinecake.chunk.size"], String(16 << 20));
      assert.match(l.annotations["org.sardinecake.chunk.digest"], /^sha256:[a-f0-9]{64}$/);
      assert.equal(l.annotations["org.sardinecake.file.size"], String(64 << 20));
    });
    const rawDisk = vm.disks.find((d) => d.format === "raw")!;
    assert.equal(
      raw[0].annotations["org.sardinecake.file.digest"],
      (await digestFile(rawDisk.path)).digest,
    );
    assert.equal(raw[1].digest, raw[3].digest, "all-zero chunks are one blob");
    assert.notEqual(raw[0].digest, raw[1].digest);
    await Deno.remove(work, { recursive: true });
  },
});

Deno.test({
  name: "vm: a running VM is not exported without --force",
  ...opts,
  fn: async () => {
    await using vm = await defineTestVm({});
    const work = await tempDir("running");
    const started = await virsh("start", "--domain", vm.name);
    assert.equal(started.code, 0, started.stderr);
    try {
      const r = await sarde(["export", "-d", work, vm.name, "local/run:v1"], { env });
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, /is running/);
      assert.match(r.stderr, /--force/);
      const forced = await sarde(["export", "-d", work, "--force", vm.name, "local/run:v1"], {
        env,
      });
      assert.equal(forced.code, 0, forced.stderr);
    } finally {
      await virsh("destroy", "--domain", vm.name);
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "vm: export --push uploads chunks while exporting; pull decodes behind the download; a bad blob mid-pull leaves nothing",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({ rawDisk: true });
    await using reg = await startRegistry("plain");
    const work = await tempDir("pushpull");
    const vmdir = join("/var/tmp/sarde-test-vms", `imported-stream-${Deno.pid}`);
    const ref = `${reg.host}/stream/vm:v1`;
    const names: string[] = [];
    try {
      // Small chunks (the smallest allowed): several blobs, uploaded while later ones are still
      // being compressed.
      const ex = await sarde(
        ["export", "--push", "-d", join(work, "src"), "--chunksize", "1MiB", vm.name, ref],
        { env },
      );
      assert.equal(ex.code, 0, ex.stderr);
      // When the export ended, only the blobs written after the disks (XML, config) were left.
      const left = /pushing \S+: (\d+) of (\d+) blobs to upload/.exec(ex.stderr);
      assert.ok(left, ex.stderr);
      assert.ok(Number(left[1]) <= 3 && Number(left[2]) - Number(left[1]) >= 4, left[0]);
      // A registry that refuses the upload stops the export with its error, not "interrupted".
      const refusing = await startFaultyProxy(reg, { kind: "status", status: 403, times: 10_000 });
      try {
        const bad = await sarde([
          "export",
          "--push",
          "-d",
          join(work, "refused"),
          "--chunksize",
          "1MiB",
          vm.name,
          `${refusing.host}/stream/vm:v1`,
        ], { env: { ...env, ...FAST_RETRY } });
        assert.notEqual(bad.code, 0);
        assert.doesNotMatch(bad.stderr, /interrupted/, bad.stderr);
        assert.match(bad.stderr, /access denied/, bad.stderr);
      } finally {
        await refusing.stop();
      }

      // The registry serves exactly the local manifest (read by skopeo, independently).
      const index = JSON.parse(
        await Deno.readTextFile(join(work, "src", reg.host, "stream", "vm", "index.json")),
      );
      const raw = await run("sh", [
        "-c",
        `skopeo inspect --tls-verify=false --raw docker://${ref} | sha256sum`,
      ]);
      assert.equal(`sha256:${raw.stdout.split(" ")[0]}`, index.manifests[0].digest);

      const p = await sarde(
        ["pull", "-d", join(work, "dst"), "--vmdir", vmdir, "-n", `${vm.name}-s`, ref],
        { env },
      );
      assert.equal(p.code, 0, p.stderr);
      names.push(p.stdout.trim());
      for (const d of vm.disks) {
        const copy = join(vmdir, names[0], d.disk.path.split("/").at(-1)!);
        await sameContent(d.disk.path, copy, d.disk.format);
      }

      // The last disk chunk corrupted on the way: the import has started when the download
      // fails; nothing may stay behind.
      const manifest = JSON.parse(
        await Deno.readTextFile(
          join(
            work,
            "src",
            reg.host,
            "stream",
            "vm",
            "blobs",
            "sha256",
            index.manifests[0].digest.slice(7),
          ),
        ),
      );
      const chunks = manifest.layers.filter((l: { annotations?: Record<string, string> }) =>
        l.annotations?.["org.sardinecake.chunk.digest"]
      );
      const proxy = await startFaultyProxy(reg, {
        kind: "corrupt-blob",
        digests: [chunks.at(-1).digest],
      });
      const badDir = join("/var/tmp/sarde-test-vms", `imported-bad-${Deno.pid}`);
      try {
        const bad = await sarde([
          "pull",
          "-d",
          join(work, "bad"),
          "--vmdir",
          badDir,
          "-n",
          `${vm.name}-bad`,
          `${proxy.host}/stream/vm:v1`,
        ], { env: { ...env, ...FAST_RETRY } });
        assert.equal(bad.code, 6, bad.stderr);
        assert.match(bad.stderr, /failed verification/);
        assert.notEqual((await virsh("dominfo", `${vm.name}-bad`)).code, 0, "no VM defined");
        const left = (await listFiles(badDir)).filter((f) => !f.startsWith(".locks"));
        assert.deepEqual(left, [], `nothing left in the VM folder: ${left}`);
      } finally {
        await proxy.stop();
        await undefineVms([`${vm.name}-bad`]); // only if the test failed
        await Deno.remove(badDir, { recursive: true }).catch(() => {});
      }
    } finally {
      await undefineVms(names);
      await Deno.remove(vmdir, { recursive: true }).catch(() => {});
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name: "vm: export and import onto a full disk name the file they write: no space left on device",
  ...opts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({ rawDisk: true });
    await writeRandom(vm.disks[1].path, 8, 16);
    await using reg = await startRegistry("plain");
    await using proxy = await startPausingProxy(reg);
    const work = await tempDir("full");
    const small = join(work, "small");
    await Deno.mkdir(small);
    const mount = (size: string) =>
      run("mount", ["-t", "tmpfs", "-o", `size=${size}`, "tmpfs", small], { check: true });
    const oneLine = (stderr: string) => {
      assert.doesNotMatch(stderr, /bug|\n\s+at /, "no stack trace");
      assert.ok(stderr.trim().split("\n").length <= 2, `one line (and a hint): ${stderr}`);
    };
    const ref = `${reg.host}/sardines/full:v1`;
    try {
      // Export into a store with room for the small disk only.
      await mount("4m");
      for (const compression of ["zstd", "gzip"]) {
        const ex = await sarde(
          ["export", "-d", small, "--compression", compression, vm.name, ref],
          { env },
        );
        assert.equal(ex.code, 1, ex.stderr);
        assert.match(
          ex.stderr,
          new RegExp(`cannot write ${small}/\\S+/blobs/sha256/\\S+: no space left on device`),
          compression,
        );
        oneLine(ex.stderr.slice(ex.stderr.indexOf("error:")));
        assert.deepEqual(
          (await listFiles(small)).filter((f) => f.includes("/blobs/sha256/.")),
          [],
          `${compression}: no temp files left`,
        );
      }
      await run("umount", [small], { check: true });

      // Import into a VM folder that has the room when the pull checks, and none when it writes.
      assert.equal(
        (await sarde(["export", "-d", join(work, "src"), vm.name, ref], { env })).code,
        0,
      );
      assert.equal((await sarde(["push", "-d", join(work, "src"), ref])).code, 0);
      await mount("96m");
      const pull = spawnSarde([
        "pull",
        "-d",
        join(work, "store"),
        "--vmdir",
        small,
        "--source",
        `${proxy.host}/sardines/full:v1`,
        ref,
      ], { env });
      await until(
        async () =>
          proxy.faults() > 0 && (await listFiles(small)).some((f) => f.includes(".partial-")),
        "the import waits for the download",
      );
      await run("sh", ["-c", `head -c 200M /dev/zero > '${small}/filler'`]); // fails once full
      proxy.release();
      const r = await pull.done();
      assert.equal(r.code, 1, r.stderr);
      assert.match(
        r.stderr,
        new RegExp(
          `cannot write ${small}/\\.[^/ ]+\\.partial-[^/ ]+/(plain\\.qcow2|sparse\\.raw): no space left on device`,
        ),
      );
      assert.doesNotMatch(r.stderr, /blobs\/sha256/, "the destination is named, not the blob");
      oneLine(r.stderr.slice(r.stderr.indexOf("error:")));
    } finally {
      proxy.release();
      await run("umount", [small]);
      await Deno.remove(work, { recursive: true });
    }
  },
});
