/**
 * `sarde pull --lazy` end to end (lib/vm/lazy_pull.ts): the tiny guest plus a 256 MiB
 * incompressible extra disk, pushed to a real registry on 127.0.0.1 and pulled through a proxy
 * that paces every blob download (a slow network) and counts the bytes. Real libvirtd
 * (`qemu:///system`, TCG), the real detached server, `sarde` as a user runs it.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { groupDiskLayers } from "../lib/image/format.ts";
import { readLocalManifest } from "../lib/oci/store.ts";
import { parseReference } from "../lib/oci/reference.ts";
import { type LazyState, lazyStateDir, readLazyState } from "../lib/vm/lazy_pull.ts";
import { ensureGuest, freePort, guestDomainXml, sshRun, waitForSsh } from "./support/guest.ts";
import { run, sarde, spawnSarde, tempDir, until } from "./support/images.ts";
import { startThrottledProxy, type ThrottledProxy } from "./support/proxy.ts";
import { startRegistry, type TestRegistry } from "./support/registry.ts";
import {
  ensureLibvirtd,
  makeVmDir,
  removeVmDir,
  shTry,
  TEST_URI,
  uniqueVmName,
  virsh,
  virshDefine,
  writeRandom,
} from "./support/vms.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };
const MiB = 1 << 20;
const EXTRA_MIB = 256;
/** Each blob download's pace: 4 at once make a full pull of the ~270 MB image take ~70 s. */
const PACE = 1 * MiB;
/** The server exits this long after its last NBD client once done (30 s by default). */
const env = { SARDE_LAZY_IDLE_MS: "2000" };

interface LazyImage {
  registry: TestRegistry;
  /** The image on the registry itself. */
  direct: string;
  /** The repository path (`sardines/lazy:latest`) to ask a proxy for. */
  path: string;
  imageId: string;
  sshPort: number;
  key: string;
  /** The image's size: the sum of its blobs. */
  bytes: number;
  /** The extra disk's blobs (16 MiB chunks) and where each starts. */
  extraChunks: { digest: string; offset: number }[];
  /** The extra disk's bytes, to check what the guest reads. */
  extraFile: string;
  work: string;
}

let building: Promise<LazyImage> | undefined;

/** Exports and pushes the image once per process (16 MiB chunks: a kill loses little). */
function lazyImage(): Promise<LazyImage> {
  return building ??= (async () => {
    const guest = await ensureGuest();
    await ensureLibvirtd();
    const registry = await startRegistry("plain");
    const work = await tempDir("lazy-pull");
    const vmDir = await makeVmDir("lazy-src");
    const name = uniqueVmName("sarde-lazysrc");
    try {
      const root = join(vmDir, "root.qcow2");
      await run("qemu-img", ["convert", "-O", "qcow2", guest.rootfs, root], { check: true });
      const extra = join(vmDir, "extra.raw");
      await writeRandom(extra, 0, EXTRA_MIB);
      const extraFile = join(work, "extra.raw");
      await Deno.copyFile(extra, extraFile);
      const sshPort = freePort();
      const xml = guestDomainXml({
        name,
        dir: vmDir,
        rootDisk: root,
        sshPort,
        kernel: guest.kernel,
        initrd: guest.initrd,
      }).replace(
        "<controller type='usb'",
        `<disk type='file' device='disk'><driver name='qemu' type='raw'/>` +
          `<source file='${extra}'/><target dev='vdb' bus='virtio'/></disk>\n    ` +
          "<controller type='usb'",
      );
      await virshDefine(xml, TEST_URI, vmDir);
      const ocidir = join(work, "oci");
      const path = "sardines/lazy:latest";
      const direct = `${registry.host}/${path}`;
      const exp = await sarde([
        "export",
        "-d",
        ocidir,
        "-c",
        TEST_URI,
        "--chunksize",
        "16M",
        name,
        direct,
      ]);
      assert.equal(exp.code, 0, exp.stderr);
      const push = await sarde(["push", "-d", ocidir, direct]);
      assert.equal(push.code, 0, push.stderr);
      const { manifest } = await readLocalManifest(ocidir, parseReference(direct));
      const files = groupDiskLayers(manifest, direct);
      const extraImage = files.find((f) => f.name === "extra.raw")!;
      return {
        registry,
        direct,
        path,
        imageId: manifest.config.digest,
        sshPort,
        key: guest.privateKey,
        bytes: [manifest.config, ...manifest.layers].reduce((n, d) => n + d.size, 0),
        extraChunks: extraImage.layers.map((l) => ({
          digest: l.digest,
          offset: Number(l.annotations!["org.sardinecake.chunk.offset"]),
        })),
        extraFile,
        work,
      };
    } finally {
      await shTry("virsh", ["-c", TEST_URI, "undefine", "--domain", name]);
      await removeVmDir(vmDir);
    }
  })();
}

/** A store and vmdir for one pull. */
async function place(prefix: string) {
  const dir = await makeVmDir(prefix);
  return { dir, ocidir: join(dir, "oci"), vmdir: join(dir, "vms") };
}

function pullArgs(p: { ocidir: string; vmdir: string }, ref: string, more: string[] = []) {
  return [
    "pull",
    "-d",
    p.ocidir,
    "--vmdir",
    p.vmdir,
    "-c",
    TEST_URI,
    "--domain-type",
    "qemu",
    "--allow-host-resources",
    ...more,
    ref,
  ];
}

async function state(vmdir: string, imageId: string): Promise<LazyState> {
  const s = await readLazyState(lazyStateDir(vmdir, imageId));
  assert.ok(s, "no state.json");
  return s;
}

const present = (s: LazyState) => s.files.reduce((n, f) => n + f.present, 0);

/** SSH with retries of ssh's own failures (255: a late banner on a loaded machine). */
async function ssh(img: LazyImage, script: string) {
  let r = { code: 255, stdout: "", stderr: "" };
  for (let i = 0; i < 5 && r.code === 255; i++) {
    r = await sshRun({ port: img.sshPort, key: img.key }, script);
  }
  return r;
}

async function killServer(vmdir: string, imageId: string): Promise<void> {
  const s = await readLazyState(lazyStateDir(vmdir, imageId));
  if (!s) return;
  try {
    Deno.kill(s.pid, "SIGKILL");
  } catch { /* gone */ }
}

/** Reads 4 KiB of the extra disk at `at` through the server, as QEMU does. */
function nbdRead(socket: string, at: number) {
  return run("qemu-io", [
    "-r",
    "-f",
    "raw",
    "-c",
    `read ${at} 4096`,
    `nbd+unix:///extra.raw?socket=${socket}`,
  ]);
}

/**
 * The units of the extra disk its presence log lists (entries are unit numbers + 1; a chunk's
 * first frame is unit `offset / 2 MiB`).
 */
async function presentUnits(vmdir: string, name: string): Promise<Set<number>> {
  const log = await Deno.readFile(join(vmdir, `.${name}.partial-lazy`, "extra.raw.sarde-present"));
  const listed = new Set<number>();
  const view = new DataView(log.buffer);
  for (let i = 0; i + 4 <= log.length; i += 4) listed.add(view.getUint32(i, true) - 1);
  return listed;
}

async function cleanup(name: string | undefined, p: { dir: string; vmdir: string }, id: string) {
  if (name) {
    await shTry("virsh", ["-c", TEST_URI, "destroy", "--domain", name]);
    await shTry("virsh", ["-c", TEST_URI, "undefine", "--domain", name]);
  }
  await killServer(p.vmdir, id);
  await removeVmDir(p.dir);
}

Deno.test({
  name:
    "pull --lazy: the VM boots to SSH early, survives a server kill, and ends as a normal import",
  ...opts,
  async fn() {
    const img = await lazyImage();
    await using proxy: ThrottledProxy = await startThrottledProxy(
      { url: `http://${img.registry.host}` },
      { bytesPerSecond: PACE },
    );
    const ref = `${proxy.host}/${img.path}`;
    const p = await place("lazy-pull");
    const normal = await place("lazy-normal");
    let name: string | undefined;
    try {
      // 1. returns while most of the image is still to come
      const first = await sarde(pullArgs(p, ref, ["--lazy"]), { env });
      assert.equal(first.code, 0, first.stderr);
      name = first.stdout.trim();
      assert.equal(name, img.imageId);
      const atReturn = proxy.blobBytes().all;
      assert.ok(atReturn < img.bytes / 2, `${atReturn} of ${img.bytes} bytes moved at return`);
      const s1 = await state(p.vmdir, img.imageId);
      assert.equal(s1.phase, "serving");
      // with the small young generation of every sarde process (peak RSS: bench/lazy.ts)
      const cmdline = (await Deno.readTextFile(`/proc/${s1.pid}/cmdline`)).split("\0");
      assert.ok(cmdline.includes("--v8-flags=--max-semi-space-size=1"), cmdline.join(" "));

      // 2. a second lazy pull uses the same server
      const second = await sarde(pullArgs(p, ref, ["--lazy"]), { env });
      assert.equal(second.code, 0, second.stderr);
      assert.equal(second.stdout.trim(), name);
      assert.equal((await state(p.vmdir, img.imageId)).pid, s1.pid);

      // sarde list shows the partial import and its progress
      const ls = await sarde(["list", "-d", p.ocidir, "--vmdir", p.vmdir, "-c", TEST_URI]);
      assert.equal(ls.code, 0, ls.stderr);
      assert.match(ls.stdout, new RegExp(`^${name}: lazy pull serving, \\d+ % \\(`, "m"));

      // 3. boots to SSH while the guest's demand reads are a small part of the image
      const started = await virsh("start", name);
      assert.equal(started.code, 0, started.stderr);
      await waitForSsh({ port: img.sshPort, key: img.key, timeoutMs: 180_000 });
      const demand = proxy.blobBytes().ranged;
      console.log(
        `lazy pull: ${(atReturn / MiB).toFixed(1)} MiB moved when pull --lazy returned, ` +
          `${(demand / MiB).toFixed(1)} MiB of ranged reads by SSH, image ${
            (img.bytes / MiB).toFixed(1)
          } MiB`,
      );
      assert.ok(demand < img.bytes / 10, `${demand} of ${img.bytes} bytes read on demand`);
      let r = await ssh(img, "echo lazy-pull-marker-4711 > /root/lazy.txt && sync && echo ok");
      assert.equal(r.code, 0, r.stderr);

      // 4. killed mid-download: the next lazy pull goes on from what is there
      const before = await state(p.vmdir, img.imageId);
      assert.equal(before.phase, "serving", "the download finished before the kill");
      await killServer(p.vmdir, img.imageId);
      await until(
        async () => !(await Deno.stat(`/proc/${before.pid}`).then(() => true, () => false)),
        "the server is gone",
        10_000,
      );
      const third = await sarde(pullArgs(p, ref, ["--lazy"]), { env });
      assert.equal(third.code, 0, third.stderr);
      assert.equal(third.stdout.trim(), name);
      const after = await state(p.vmdir, img.imageId);
      assert.notEqual(after.pid, before.pid);
      // what the killed server had logged present is still present (the state it wrote last may
      // lag its log, never lead it): nothing already fetched is fetched again
      assert.ok(
        present(after) >= present(before),
        `the restarted server has ${present(after)} bytes, the killed one had ${present(before)}`,
      );

      // the running VM reads its extra disk through the new server: the image's bytes (QEMU
      // reconnects on its own schedule, and libvirt 9.0 cannot ask it to hold requests meanwhile:
      // reads fail until then)
      const offset = 200; // MiB, surely not read before
      const expected = await run("sh", [
        "-c",
        `dd if=${img.extraFile} bs=1M skip=${offset} count=2 2>/dev/null | sha256sum`,
      ]);
      let got = "";
      for (let i = 0; i < 30 && got !== expected.stdout.split(" ")[0]; i++) {
        if (i) await new Promise((r) => setTimeout(r, 2000));
        r = await ssh(img, `dd if=/dev/vdb bs=1M skip=${offset} count=2 | sha256sum`);
        got = r.code === 0 ? r.stdout.split(" ")[0] : "";
        if (got !== expected.stdout.split(" ")[0]) console.log(`guest read: ${r.stderr.trim()}`);
      }
      assert.equal(got, expected.stdout.split(" ")[0]);

      // 5. a plain pull waits for the lazy one and prints the same name, starting it again when
      // its server died
      const again = await state(p.vmdir, img.imageId);
      assert.equal(again.phase, "serving", "the download finished before the second kill");
      await killServer(p.vmdir, img.imageId);
      await until(
        async () => !(await Deno.stat(`/proc/${again.pid}`).then(() => true, () => false)),
        "the server is gone",
        10_000,
      );
      const plain = spawnSarde(pullArgs(p, ref), { env });
      const timer = setTimeout(() => plain.child.kill("SIGKILL"), 240_000); // bounded
      const plainDone = await plain.done().finally(() => clearTimeout(timer));
      assert.equal(plainDone.code, 0, plainDone.stderr);
      assert.equal(plainDone.stdout.trim(), name);
      // Two kills each lose the blob downloads in flight (up to 4 chunks): more than a fresh pull
      // after the first kill can happen; twice the image cannot.
      const moved = proxy.blobBytes().all;
      assert.ok(moved < 2 * img.bytes, `${moved} bytes for a ${img.bytes}-byte image`);

      // 6. the VM stops: its writes go into its files, it is defined on them, the server exits
      await virsh("destroy", name);
      const dir = lazyStateDir(p.vmdir, img.imageId);
      await until(
        async () => !(await Deno.stat(dir).then(() => true, () => false)),
        "the lazy server is done",
        120_000,
      );
      const xml = (await virsh("dumpxml", name)).stdout;
      assert.doesNotMatch(xml, /nbd/);
      assert.match(xml, new RegExp(`<source file='${join(p.vmdir, name)}/root.qcow2'`));

      // the files are a normal pull's (but for what the guest wrote)
      const n = await sarde([
        ...pullArgs(normal, ref, ["-n", "sarde-lazy-normal", "-s", img.direct]),
      ], { env });
      assert.equal(n.code, 0, n.stderr);
      try {
        const lazyDir = join(p.vmdir, name), normalDir = join(normal.vmdir, "sarde-lazy-normal");
        const cmp = await run("qemu-img", [
          "compare",
          "-f",
          "raw",
          "-F",
          "raw",
          join(lazyDir, "extra.raw"),
          join(normalDir, "extra.raw"),
        ]);
        assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
        const marker = (d: string) => Deno.readTextFile(join(d, ".sarde-import.json"));
        assert.equal(await marker(lazyDir), await marker(normalDir));
        // (a VM that ran has its console log there too)
        const listing = (d: string) =>
          [...Deno.readDirSync(d)].map((e) => e.name).filter((n) => !n.endsWith(".console.log"))
            .sort();
        assert.deepEqual(listing(lazyDir), listing(normalDir));
        const grep = (f: string) => run("grep", ["-c", "lazy-pull-marker-4711", f]);
        assert.equal((await grep(join(lazyDir, "root.qcow2"))).code, 0, "the guest's write");
        assert.equal((await grep(join(normalDir, "root.qcow2"))).code, 1);
      } finally {
        await shTry("virsh", ["-c", TEST_URI, "undefine", "--domain", "sarde-lazy-normal"]);
      }
    } finally {
      await cleanup(name, p, img.imageId);
      await removeVmDir(normal.dir);
    }
  },
});

Deno.test({
  name: "pull --lazy: a corrupted frame is refused, never served nor logged as present",
  ...opts,
  async fn() {
    const img = await lazyImage();
    // the last chunk: its whole blob comes last, long after the reads below
    const bad = img.extraChunks[img.extraChunks.length - 1];
    await using proxy = await startThrottledProxy(
      { url: `http://${img.registry.host}` },
      { bytesPerSecond: PACE, corruptFirstFrames: [bad.digest] },
    );
    const ref = `${proxy.host}/${img.path}`;
    const p = await place("lazy-corrupt");
    let name: string | undefined;
    try {
      const r = await sarde(pullArgs(p, ref, ["--lazy"]), { env });
      assert.equal(r.code, 0, r.stderr);
      name = r.stdout.trim();
      const s = await state(p.vmdir, img.imageId);
      const nbd = (at: number) => nbdRead(s.socket, at);
      const good = await nbd(img.extraChunks[1].offset);
      assert.equal(good.code, 0, good.stderr);
      assert.doesNotMatch(good.stdout + good.stderr, /error/i);
      const refused = await nbd(bad.offset);
      assert.match(refused.stdout + refused.stderr, /Input\/output error/);
      const listed = await presentUnits(p.vmdir, name);
      assert.ok(listed.has(img.extraChunks[1].offset / (2 * MiB)));
      assert.ok(!listed.has(bad.offset / (2 * MiB)), "a corrupted frame was logged as present");
    } finally {
      await cleanup(name, p, img.imageId);
    }
  },
});

/** Retries of the background download 0.5, 1, 2, 4, 8 s apart: it gives up after ~16 s. */
const retryEnv = { ...env, SARDE_LAZY_RETRY_MS: "500" };
/** Fast enough that the whole image comes in seconds: these tests wait for the end. */
const FAST = 16 * MiB;

/**
 * A fast proxy to the image that serves the blob of the extra disk's last chunk (`bad`) corrupt,
 * whole or from its first frame, while `active()` says so.
 */
async function corruptingProxy(active: () => boolean) {
  const img = await lazyImage();
  const bad = img.extraChunks[img.extraChunks.length - 1];
  const proxy = await startThrottledProxy(
    { url: `http://${img.registry.host}` },
    { bytesPerSecond: FAST, corruptBlobs: { digests: [bad.digest], active } },
  );
  return { img, bad, ref: `${proxy.host}/${img.path}`, [Symbol.asyncDispose]: proxy.stop };
}

/** `sarde pull --lazy` with short retries; the VM's name. */
async function lazyPull(p: { ocidir: string; vmdir: string }, ref: string): Promise<string> {
  const r = await sarde(pullArgs(p, ref, ["--lazy"]), { env: retryEnv });
  assert.equal(r.code, 0, r.stderr);
  return r.stdout.trim();
}

Deno.test({
  name: "pull --lazy: a blob served corrupt for a while: the server keeps serving, keeps no " +
    "wrong bytes, and completes once the blob is served right",
  ...opts,
  async fn() {
    let corrupting = true;
    await using c = await corruptingProxy(() => corrupting);
    const { img, bad, ref } = c;
    const p = await place("lazy-retry");
    const normal = await place("lazy-retry-normal");
    const normalName = uniqueVmName("sarde-lazy-retry-normal");
    let name: string | undefined;
    try {
      name = await lazyPull(p, ref);
      const first = await state(p.vmdir, img.imageId);

      // the download failed on the bad blob: the trouble is recorded, the same server serves on
      let s = first;
      await until(
        async () => (s = await state(p.vmdir, img.imageId)).problem !== undefined,
        "a problem is recorded",
        120_000,
      );
      assert.equal(s.pid, first.pid);
      assert.equal(s.phase, "serving");
      assert.match(s.problem!, /digest|decode/);
      const log = await Deno.readTextFile(join(lazyStateDir(p.vmdir, img.imageId), "server.log"));
      assert.match(log, /failed: .*; trying again in/);
      const ls = await sarde(["list", "-d", p.ocidir, "--vmdir", p.vmdir, "-c", TEST_URI]);
      assert.match(ls.stdout, new RegExp(`^${name}: lazy pull serving, .*: retrying after `, "m"));
      // demand reads: the corrupt frame is refused, others are served, nothing wrong is kept
      const refused = await nbdRead(s.socket, bad.offset);
      assert.match(refused.stdout + refused.stderr, /Input\/output error/);
      const good = await nbdRead(s.socket, img.extraChunks[1].offset);
      assert.doesNotMatch(good.stdout + good.stderr, /error/i);
      assert.ok(!(await presentUnits(p.vmdir, name)).has(bad.offset / (2 * MiB)));

      // the registry serves it right again: the next attempt completes, as a normal import
      corrupting = false;
      const dir = lazyStateDir(p.vmdir, img.imageId);
      await until(
        async () => !(await Deno.stat(dir).then(() => true, () => false)),
        "the lazy server is done",
        180_000,
      );
      const n = await sarde(pullArgs(normal, ref, ["-n", normalName, "-s", img.direct]), { env });
      assert.equal(n.code, 0, n.stderr);
      const lazyDir = join(p.vmdir, name), normalDir = join(normal.vmdir, normalName);
      for (const [file, format] of [["extra.raw", "raw"], ["root.qcow2", "qcow2"]]) {
        const cmp = await run("qemu-img", [
          "compare",
          "-f",
          format,
          "-F",
          format,
          join(lazyDir, file),
          join(normalDir, file),
        ]);
        assert.equal(cmp.code, 0, `${file}: ${cmp.stdout}${cmp.stderr}`);
      }
      const marker = (d: string) => Deno.readTextFile(join(d, ".sarde-import.json"));
      assert.equal(await marker(lazyDir), await marker(normalDir));
    } finally {
      await shTry("virsh", ["-c", TEST_URI, "undefine", "--domain", normalName]);
      await cleanup(name, p, img.imageId);
      await removeVmDir(normal.dir);
    }
  },
});

Deno.test({
  name: "pull --lazy: a blob the registry always serves corrupt ends the download with a clear " +
    "error in state.json, sarde list and a waiting pull",
  ...opts,
  async fn() {
    await using c = await corruptingProxy(() => true);
    const { img, ref } = c;
    const p = await place("lazy-giveup");
    let name: string | undefined;
    try {
      name = await lazyPull(p, ref);
      let s = await state(p.vmdir, img.imageId);
      await until(
        async () => (s = await state(p.vmdir, img.imageId)).phase === "failed",
        "the download gives up",
        180_000,
      );
      assert.match(s.problem!, /digest|decode/);
      const log = await Deno.readTextFile(join(lazyStateDir(p.vmdir, img.imageId), "server.log"));
      assert.match(log, /failed 6 times, it cannot complete/);
      const ls = await sarde(["list", "-d", p.ocidir, "--vmdir", p.vmdir, "-c", TEST_URI]);
      assert.match(ls.stdout, new RegExp(`^${name}: lazy pull failed, \\d+ % \\(.*\\): \\S`, "m"));
      // a plain pull gives the server one more go, then says why, in one line
      const plain = await sarde(pullArgs(p, ref), { env: retryEnv });
      assert.notEqual(plain.code, 0);
      assert.equal(plain.stdout, "");
      assert.match(plain.stderr, /the lazy pull of .* failed: /);
      assert.doesNotMatch(plain.stderr, /^\s+at /m);
    } finally {
      await cleanup(name, p, img.imageId);
    }
  },
});

/** The file disks of VM `name` (its inactive definition): target and source file. */
async function disksOf(name: string): Promise<{ target: string; file: string }[]> {
  const xml = (await virsh("dumpxml", "--inactive", name)).stdout;
  return [...xml.matchAll(/<source file='([^']+)'[^]*?<target dev='(\w+)'/g)]
    .map((m) => ({ target: m[2], file: m[1] }));
}

/** The files of `file`'s backing chain as qemu-img follows its headers, the file's own first. */
async function backingFiles(file: string): Promise<string[]> {
  const r = await run("qemu-img", ["info", "--backing-chain", "--output=json", "-U", file]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout).map((i: { filename: string }) => i.filename);
}

/** The sha256 of 2 MiB of the extra disk from `offset` MiB on, as the image has it. */
async function extraHash(img: LazyImage, offset: number): Promise<string> {
  const r = await run("sh", [
    "-c",
    `dd if=${img.extraFile} bs=1M skip=${offset} count=2 2>/dev/null | sha256sum`,
  ]);
  return r.stdout.split(" ")[0];
}

Deno.test({
  name: "clone --lazy: the clone boots while the image is partial; persistent clones move onto " +
    "the local files once it is complete and they are stopped, and the server exits",
  ...opts,
  async fn() {
    const t0 = Date.now();
    const img = await lazyImage();
    // the extra disk's whole downloads wait for the test: the image is surely partial meanwhile
    const gate = Promise.withResolvers<void>();
    await using proxy = await startThrottledProxy({ url: `http://${img.registry.host}` }, {
      bytesPerSecond: FAST,
      holdWhole: { digests: img.extraChunks.map((c) => c.digest), until: gate.promise },
    });
    const ref = `${proxy.host}/${img.path}`;
    const p = await place("lazy-clone");
    const booted = uniqueVmName("sarde-lzclone-run");
    const idle = uniqueVmName("sarde-lzclone-idle");
    const plain = uniqueVmName("sarde-lzclone-plain");
    const clone = (source: string, target: string, more: string[] = []) =>
      sarde([
        ...["clone", "--lazy", "-d", p.ocidir, "--vmdir", p.vmdir, "-c", TEST_URI],
        ...["--domain-type", "qemu", "--allow-host-resources", ...more, source, target],
      ], { env: { ...env, SARDE_LAZY_RETRY_MS: "500" } });
    const dir = lazyStateDir(p.vmdir, img.imageId);
    const vmFolder = join(p.vmdir, img.imageId);
    try {
      // 1. from an empty store: pulled lazily, cloned, started; returns while the image is partial
      const first = await clone(ref, booted, ["--start"]);
      assert.equal(first.code, 0, first.stderr);
      assert.equal(first.stdout, `${booted}\n`);
      const s1 = await state(p.vmdir, img.imageId);
      assert.equal(s1.phase, "serving");
      const total = s1.files.reduce((n, f) => n + f.total, 0);
      assert.ok(present(s1) < total, `${present(s1)} of ${total} bytes present`);
      const xml = (await virsh("dumpxml", booted)).stdout;
      assert.match(xml, /<source protocol='nbd' name='root\.qcow2'/);
      assert.match(xml, /<source protocol='nbd' name='extra\.raw'/);
      assert.doesNotMatch(xml, /\/overlays\//, "a clone reads the image, not the base's overlay");
      const uuid = (await virsh("domuuid", booted)).stdout.trim();

      // 2. a second clone, of the lazily served VM by its name: no pull, also on NBD, not started
      const second = await clone(img.imageId, idle);
      assert.equal(second.code, 0, second.stderr);
      assert.match((await virsh("dumpxml", idle)).stdout, /<source protocol='nbd'/);
      assert.equal((await state(p.vmdir, img.imageId)).pid, s1.pid);

      // 3. the clone boots to SSH on the partial image and reads its extra disk right
      await waitForSsh({ port: img.sshPort, key: img.key, timeoutMs: 180_000 });
      const bootedAt = Date.now() - t0;
      let r = await ssh(img, "dd if=/dev/vdb bs=1M skip=100 count=2 | sha256sum");
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.split(" ")[0], await extraHash(img, 100));
      r = await ssh(img, "echo clone-marker-0815 > /root/clone.txt && sync && echo ok");
      assert.equal(r.code, 0, r.stderr);
      assert.equal((await state(p.vmdir, img.imageId)).phase, "serving", "completed too early");

      // 4. complete while the clone runs: the stopped clone moves at once, the running one stays
      // on NBD and keeps the server
      gate.resolve();
      await until(async () => (await readLazyState(dir))?.phase === "done", "done", 180_000);
      await until(
        async () => !(await virsh("dumpxml", "--inactive", idle)).stdout.includes("nbd"),
        "the stopped clone is moved",
        30_000,
      );
      assert.match((await virsh("dumpxml", "--inactive", booted)).stdout, /protocol='nbd'/);
      assert.ok(await Deno.stat(join(dir, "holds", `${booted}.json`)).then(() => true));
      r = await ssh(img, "cat /root/clone.txt");
      assert.equal(r.stdout.trim(), "clone-marker-0815");

      // killed now, the server is started again by the next pull --lazy, for the clone
      const killed = (await state(p.vmdir, img.imageId)).pid;
      await killServer(p.vmdir, img.imageId);
      await until(
        async () => !(await Deno.stat(`/proc/${killed}`).then(() => true, () => false)),
        "the server is gone",
        10_000,
      );
      const again = await sarde(pullArgs(p, ref, ["--lazy"]), { env });
      assert.equal(again.code, 0, again.stderr);
      assert.equal(again.stdout.trim(), img.imageId);
      const pid = (await state(p.vmdir, img.imageId)).pid;
      assert.notEqual(pid, killed);

      // 5. once it stops, it moves too and the server exits
      await virsh("destroy", booted);
      await until(
        async () => !(await Deno.stat(dir).then(() => true, () => false)),
        "the lazy server is done",
        60_000,
      );
      await until(
        async () => !(await Deno.stat(`/proc/${pid}`).then(() => true, () => false)),
        "the server exits",
        10_000,
      );
      assert.equal((await virsh("domuuid", booted)).stdout.trim(), uuid, "redefined, not replaced");
      for (const name of [booted, idle]) {
        assert.doesNotMatch((await virsh("dumpxml", "--inactive", name)).stdout, /nbd/);
        for (const d of await disksOf(name)) {
          const chain = await backingFiles(d.file);
          const base = join(vmFolder, d.target === "vda" ? "root.qcow2" : "extra.raw");
          assert.equal(chain[1], base, `${name} ${d.target}: ${chain}`);
          assert.ok(chain.every((f) => !f.includes("nbd")), `${chain}`);
        }
        // the same bytes as the image: nothing written to the extra disk
        const extra = (await disksOf(name)).find((d) => d.target === "vdb")!;
        const cmp = await run("qemu-img", [
          ...["compare", "-U", "-f", "qcow2", "-F", "raw", extra.file, img.extraFile],
        ]);
        assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
      }

      // 6. the moved clone boots on the local files, with what it wrote
      const started = await virsh("start", booted);
      assert.equal(started.code, 0, started.stderr);
      await waitForSsh({ port: img.sshPort, key: img.key, timeoutMs: 180_000 });
      r = await ssh(img, "cat /root/clone.txt; dd if=/dev/vdb bs=1M skip=200 count=2 | sha256sum");
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^clone-marker-0815$/m);
      assert.match(r.stdout, new RegExp(await extraHash(img, 200)));
      await virsh("destroy", booted);

      // 7. clone --lazy of a defined VM is a plain clone: no registry, no session
      const moved = proxy.blobBytes().all;
      const third = await clone(img.imageId, plain);
      assert.equal(third.code, 0, third.stderr);
      assert.equal(proxy.blobBytes().all, moved);
      assert.ok(!await Deno.stat(dir).then(() => true, () => false), "a lazy session");
      const plainDisks = await disksOf(plain);
      assert.equal((await backingFiles(plainDisks[0].file))[1], join(vmFolder, "root.qcow2"));
      console.log(
        `clone --lazy: SSH after ${(bootedAt / 1000).toFixed(0)} s, test ${
          ((Date.now() - t0) / 1000).toFixed(0)
        } s`,
      );
    } finally {
      gate.resolve();
      for (const name of [booted, idle, plain]) {
        await shTry("virsh", ["-c", TEST_URI, "destroy", "--domain", name]);
        await shTry("virsh", ["-c", TEST_URI, "undefine", "--domain", name]);
      }
      await cleanup(img.imageId, p, img.imageId);
    }
  },
});

Deno.test({
  name: "lazy pull test image: registry stopped",
  ...opts,
  async fn() {
    if (!building) return;
    const img = await building;
    await img.registry.stop();
    await Deno.remove(img.work, { recursive: true }).catch(() => {});
  },
});
