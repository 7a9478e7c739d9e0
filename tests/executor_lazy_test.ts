/**
 * The executor's `lazy-pull = true` end to end: the tiny guest plus a 64 MiB incompressible
 * extra disk (16 MiB chunks), pushed to a real registry on 127.0.0.1 and pulled through a proxy
 * that paces blob downloads and holds back the whole downloads of the extra disk's chunks until
 * the test lets them go, so that jobs provably run while the image is partial. Real libvirtd
 * (`qemu:///system`, TCG), the real detached lazy server, the fake runner of `support/runner.ts`.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { groupDiskLayers } from "../lib/image/format.ts";
import { parseReference } from "../lib/oci/reference.ts";
import { readLocalManifest } from "../lib/oci/store.ts";
import { type LazyState, lazyStateDir, readLazyState } from "../lib/vm/lazy_pull.ts";
import { ensureGuest } from "./support/guest.ts";
import { run, sarde, tempDir, until } from "./support/images.ts";
import { JOB_IMAGE_VMCONFIGS, jobImageDomainXml } from "./support/job_image.ts";
import { startThrottledProxy, type ThrottleOptions } from "./support/proxy.ts";
import { startRegistry, type TestRegistry } from "./support/registry.ts";
import {
  callOf,
  describeJob,
  type JobResult,
  runJob,
  type RunJobOptions,
} from "./support/runner.ts";
import {
  ensureLibvirtd,
  makeVmDir,
  removeVmDir,
  shTry,
  TEST_URI,
  uniqueVmName,
  virshDefine,
  writeRandom,
} from "./support/vms.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };
const MiB = 1 << 20;

interface LazyJobImage {
  registry: TestRegistry;
  /** `sardines/tiny-lazy:latest`, to ask a proxy for. */
  path: string;
  imageId: string;
  /** Every blob of the image (config and layers). */
  blobs: string[];
  /** The extra disk's chunk blobs. */
  extraChunks: string[];
  work: string;
}

let building: Promise<LazyJobImage> | undefined;

/** The job image (vmconfig of `tiny`: root / sarde, SSH on 22) with an extra disk, once. */
function lazyJobImage(): Promise<LazyJobImage> {
  return building ??= (async () => {
    const guest = await ensureGuest();
    await ensureLibvirtd();
    const registry = await startRegistry("plain");
    const work = await tempDir("exec-lazy");
    const vmDir = await makeVmDir("exec-lazy-src");
    const name = uniqueVmName("sarde-execlazy");
    try {
      const root = join(vmDir, "root.qcow2");
      await run("qemu-img", ["convert", "-O", "qcow2", guest.rootfs, root], { check: true });
      const extra = join(vmDir, "extra.raw");
      await writeRandom(extra, 0, 64);
      const xml = jobImageDomainXml({
        name,
        dir: vmDir,
        rootDisk: root,
        kernel: guest.kernel,
        initrd: guest.initrd,
      }).replace(
        "<controller type='usb'",
        `<disk type='file' device='disk'><driver name='qemu' type='raw'/>` +
          `<source file='${extra}'/><target dev='vdb' bus='virtio'/></disk>\n    ` +
          "<controller type='usb'",
      );
      await virshDefine(xml, TEST_URI, vmDir);
      const vmconfig = join(work, "vmconfig.json");
      await Deno.writeTextFile(vmconfig, JSON.stringify(JOB_IMAGE_VMCONFIGS.tiny));
      const ocidir = join(work, "oci");
      const path = "sardines/tiny-lazy:latest";
      const ref = `${registry.host}/${path}`;
      const exp = await sarde([
        ...["export", "-d", ocidir, "-c", TEST_URI, "--chunksize", "16M"],
        ...["--vmconfig", vmconfig, name, ref],
      ]);
      assert.equal(exp.code, 0, exp.stderr);
      const push = await sarde(["push", "-d", ocidir, ref]);
      assert.equal(push.code, 0, push.stderr);
      const { manifest } = await readLocalManifest(ocidir, parseReference(ref));
      const extraFile = groupDiskLayers(manifest, ref).find((f) => f.name === "extra.raw")!;
      return {
        registry,
        path,
        imageId: manifest.config.digest,
        blobs: [...new Set([manifest.config, ...manifest.layers].map((d) => d.digest))],
        extraChunks: extraFile.layers.map((l) => l.digest),
        work,
      };
    } finally {
      await shTry("virsh", ["-c", TEST_URI, "undefine", "--domain", name]);
      await removeVmDir(vmDir);
    }
  })();
}

/** A proxy in front of the image's registry, its whole extra-disk downloads held until `go`. */
async function lazyProxy(img: LazyJobImage, more: Partial<ThrottleOptions> = {}) {
  const gate = Promise.withResolvers<void>();
  const proxy = await startThrottledProxy({ url: `http://${img.registry.host}` }, {
    bytesPerSecond: 4 * MiB,
    holdWhole: { digests: img.extraChunks, until: gate.promise },
    ...more,
  });
  return { proxy, image: `${proxy.host}/${img.path}`, go: () => gate.resolve() };
}

/** Folders and an INI with `lazy-pull = true`; disposing kills the lazy server and cleans up. */
async function lazyWorkspace(name: string, extra: Record<string, string> = {}) {
  const root = await makeVmDir(`exec-lazy-${name}`);
  const vmdir = join(root, "vms");
  const values = {
    connect: TEST_URI,
    ocidir: join(root, "oci"),
    vmdir,
    clonedir: join(root, "jobs"),
    // Held downloads must not time out (the response timeout is at most `timeout`).
    timeout: "300s",
    "response-timeout": "300s",
    "domain-type": "qemu",
    network: "user",
    "network-restrict": "true",
    "guest-builds-dir": "/root/builds",
    "guest-cache-dir": "/root/cache",
    "lazy-pull": "true",
    ...extra,
  };
  const ini = join(root, "executor.ini");
  await Deno.writeTextFile(
    ini,
    "[DEFAULT]\n" + Object.entries(values).map(([k, v]) => `${k} = ${v}`).join("\n") + "\n",
  );
  const env = { GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES: ini, SARDE_LAZY_IDLE_MS: "2000" };
  const dispose = async () => {
    for (const e of await Array.fromAsync(Deno.readDir(join(vmdir, ".lazy"))).catch(() => [])) {
      const s = await readLazyState(join(vmdir, ".lazy", e.name));
      if (s) {
        try {
          Deno.kill(s.pid, "SIGKILL");
        } catch { /* gone */ }
      }
    }
    const list = await shTry("virsh", ["-c", TEST_URI, "list", "--all", "--name"]);
    for (const n of list.stdout.split("\n").map((l) => l.trim()).filter(Boolean)) {
      const xml = await shTry("virsh", ["-c", TEST_URI, "dumpxml", "--domain", n, "--inactive"]);
      if (xml.code !== 0 || !xml.stdout.includes(root + "/")) continue;
      await shTry("virsh", ["-c", TEST_URI, "destroy", "--domain", n]);
      await shTry("virsh", ["-c", TEST_URI, "undefine", "--domain", n, "--nvram"]);
      await shTry("virsh", ["-c", TEST_URI, "undefine", "--domain", n]);
    }
    await removeVmDir(root);
  };
  return {
    root,
    vmdir,
    ini,
    run: (o: RunJobOptions) =>
      runJob({
        configTimeoutMs: 60_000,
        prepareTimeoutMs: 300_000,
        cleanupTimeoutMs: 120_000,
        jobTimeoutMs: 300_000,
        afterScriptTimeoutMs: 120_000,
        gracefulKillTimeoutMs: 30_000,
        ...o,
        env: { ...env, ...(o.env ?? {}) },
      }),
    [Symbol.asyncDispose]: dispose,
  };
}

const domXml = async (name: string) =>
  (await shTry("virsh", ["-c", TEST_URI, "dumpxml", "--domain", name])).stdout;

const present = (s: LazyState) => s.files.reduce((n, f) => n + f.present, 0);
const total = (s: LazyState) => s.files.reduce((n, f) => n + f.total, 0);

Deno.test({
  name: "executor lazy-pull: two jobs boot on one lazy server and download while the image is " +
    "partial; a later job clones the complete image's local files",
  ...opts,
  async fn() {
    const t0 = Date.now();
    const img = await lazyJobImage();
    const { proxy, image, go } = await lazyProxy(img);
    await using ws = await lazyWorkspace("two");
    const dir = lazyStateDir(ws.vmdir, img.imageId);
    try {
      const seen: { state: LazyState; xml: string; held: number }[] = [];
      const jobs = await Promise.all([0, 1].map((i) =>
        ws.run({
          image,
          concurrentId: i,
          script: [`echo LAZY-JOB-${i}`, "head -c 1048576 /dev/vdb | wc -c"],
          beforeCleanup: async (ctx) => {
            const state = await readLazyState(dir);
            assert.ok(state, "no lazy session");
            const held = proxy.wholeBlobGets().filter((d) => img.extraChunks.includes(d)).length;
            seen.push({ state, xml: await domXml(ctx.vmName), held });
          },
        })
      ));
      for (const [i, job] of jobs.entries()) {
        assert.equal(job.outcome, "success", describeJob(job));
        assert.match(callOf(job, "build_script").stdout, new RegExp(`LAZY-JOB-${i}`));
        assert.match(callOf(job, "build_script").stdout, /^1048576$/m);
        assert.match(callOf(job, "prepare").stderr, /pulling .* lazily/);
      }
      assert.equal(seen.length, 2);
      for (const s of seen) {
        // the scripts ran while the image was partial: its extra disk was still held back
        assert.equal(s.state.phase, "serving");
        assert.ok(present(s.state) < total(s.state), `${present(s.state)} of ${total(s.state)}`);
        // the job VM's disks are overlays on the image's files over NBD, not on the base's overlay
        assert.match(s.xml, /<source protocol='nbd' name='root\.qcow2'/);
        assert.match(s.xml, /<source protocol='nbd' name='extra\.raw'/);
        assert.doesNotMatch(s.xml, /\/overlays\//);
      }
      assert.equal(seen[0].state.pid, seen[1].state.pid, "one lazy server for both jobs");
      const sessions = await Array.fromAsync(Deno.readDir(join(ws.vmdir, ".lazy")));
      assert.equal(sessions.filter((e) => e.isDirectory).length, 1);

      // complete: the server commits, moves the base onto its files, and leaves once idle
      go();
      await until(
        async () => !(await Deno.stat(dir).then(() => true, () => false)),
        "the lazy server finished",
        180_000,
      ).catch(async (err) => {
        const log = await Deno.readTextFile(join(dir, "server.log")).catch(() => "");
        const state = await Deno.readTextFile(join(dir, "state.json")).catch(() => "");
        throw new Error(`${err.message}\n${state}\n${log.split("\n").slice(-30).join("\n")}`);
      });
      const gets = proxy.wholeBlobGets();
      for (const d of img.blobs) {
        assert.equal(gets.filter((g) => g === d).length, 1, `whole GETs of ${d}: ${gets}`);
      }

      let xml = "";
      const later: JobResult = await ws.run({
        image,
        script: ["echo LATER-JOB"],
        beforeCleanup: async (ctx) => void (xml = await domXml(ctx.vmName)),
      });
      assert.equal(later.outcome, "success", describeJob(later));
      assert.doesNotMatch(callOf(later, "prepare").stderr, /pulling/);
      assert.doesNotMatch(xml, /nbd/);
      assert.ok(xml.includes(`'${join(ws.vmdir, img.imageId)}/root.qcow2'`), xml);
      console.log(
        `TIMING lazy jobs: prepare ${jobs.map((j) => j.timings.prepareMs).join(", ")} ms; ` +
          `later job prepare ${later.timings.prepareMs} ms; test ${Date.now() - t0} ms`,
      );
    } finally {
      go();
      await proxy.stop();
    }
  },
});

Deno.test({
  name: "executor lazy-pull: a demand read the registry cannot serve fails the job as a system " +
    "failure naming the server's log",
  ...opts,
  async fn() {
    const t0 = Date.now();
    const img = await lazyJobImage();
    let failing = false;
    const { proxy, image, go } = await lazyProxy(img, { failRanged: () => failing });
    // few retries: the demand read gives up in seconds
    await using ws = await lazyWorkspace("eio", { "retry-timeout": "3s" });
    try {
      const job = await ws.run({
        image,
        script: ["echo BEFORE-READ", "dd if=/dev/vdb of=/dev/null bs=1M iflag=direct"],
        afterCall: (call) => {
          if (call.stage === "prepare") failing = true;
        },
      });
      const info = describeJob(job);
      assert.equal(job.outcome, "system_failure", info);
      const build = callOf(job, "build_script");
      assert.equal(build.code, 2, info); // SYSTEM_FAILURE_EXIT_CODE
      assert.match(build.stdout, /BEFORE-READ/);
      assert.match(build.stderr, /could not be served by its lazy pull .*server\.log/, info);
      const state = await readLazyState(lazyStateDir(ws.vmdir, img.imageId));
      assert.ok((state?.failedReads?.count ?? 0) > 0, JSON.stringify(state));
      console.log(`TIMING lazy job with failed demand reads: test ${Date.now() - t0} ms`);
    } finally {
      go();
      await proxy.stop();
    }
  },
});

Deno.test({
  name: "executor lazy-pull: cache-budget is claimed before the download; an image that cannot " +
    "fit is a system failure with nothing downloaded and no server left",
  ...opts,
  async fn() {
    const img = await lazyJobImage();
    const { proxy, image, go } = await lazyProxy(img);
    await using ws = await lazyWorkspace("budget", { "cache-budget": "1MiB" });
    try {
      const job = await ws.run({ image, script: ["echo NEVER"] });
      const info = describeJob(job);
      assert.equal(job.outcome, "system_failure", info);
      const prep = callOf(job, "prepare");
      assert.match(
        prep.stderr,
        /no room for .*sardines\/tiny-lazy:latest within cache-budget 1\.0 MiB/,
        info,
      );
      assert.doesNotMatch(prep.stderr, /\n\s+at /, "no stack trace");
      // refused after the manifest, before any blob
      assert.deepEqual(proxy.wholeBlobGets(), []);
      // the server gave up: no live session, no claim left behind
      const dir = lazyStateDir(ws.vmdir, img.imageId);
      await until(
        async () => (await readLazyState(dir))?.phase !== "serving",
        "the lazy session is gone",
        30_000,
      );
      const claims = await Array.fromAsync(Deno.readDir(join(ws.vmdir, ".budget"))).catch(() => []);
      assert.deepEqual(claims, []);
    } finally {
      go();
      await proxy.stop();
    }
  },
});

Deno.test({
  name: "executor lazy-pull test image: registry stopped",
  ...opts,
  async fn() {
    if (!building) return;
    const img = await building;
    await img.registry.stop();
    await Deno.remove(img.work, { recursive: true }).catch(() => {});
  },
});
