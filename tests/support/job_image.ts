/**
 * The VM images the executor tests run their jobs in: the tiny test guest (see `guest.ts`)
 * exported with `bin/sarde export` and pushed with `bin/sarde push` to a plain registry on
 * 127.0.0.1, built once per process.
 *
 * ```ts
 * import { ensureJobImage } from "./support/job_image.ts";
 * const img = await ensureJobImage();
 * // img.image        127.0.0.1:PORT/sardines/tiny:latest       (root / sarde, ssh on 22)
 * // img.badPortImage 127.0.0.1:PORT/sardines/tiny-deaf:latest  (vmconfig says ssh on 2222)
 * // img.noUserImage  127.0.0.1:PORT/sardines/tiny-nouser:latest (no users in the vmconfig)
 * ```
 *
 * The source domain has no `<interface>` and no `<qemu:commandline>` (an image may not carry
 * raw QEMU arguments; the executor adds networking itself), boots the guest's kernel directly
 * with {@link GUEST_CMDLINE} and has a self-contained qcow2 copy of the guest's root disk. It is
 * undefined and its folder removed as soon as the exports are done; the registry keeps running
 * until {@link JobImages.dispose} (or the end of the process).
 *
 * @module
 */

import { join } from "node:path";
import { ensureGuest, GUEST_PASSWORD, guestDomainXml, type GuestFiles } from "./guest.ts";
import { run, sarde, tempDir } from "./images.ts";
import { startRegistry, type TestRegistry } from "./registry.ts";
import {
  ensureLibvirtd,
  makeVmDir,
  removeVmDir,
  shTry,
  TEST_URI,
  uniqueVmName,
  virshDefine,
} from "./vms.ts";

/** What {@link ensureJobImage} built. */
export interface JobImages {
  /** The plain-http registry on 127.0.0.1 holding the images. */
  registry: TestRegistry;
  /** `HOST/sardines/tiny:latest`: users `[{root, sarde}]`, service ssh on port 22. */
  image: string;
  /** `HOST/sardines/tiny-deaf:latest`: same VM, but its vmconfig says ssh is on port 2222. */
  badPortImage: string;
  /** `HOST/sardines/tiny-nouser:latest`: same VM, vmconfig with services only (no users). */
  noUserImage: string;
  /** Image ID (`sha256:…`, the config digest) of each reference, as printed by `sarde export`. */
  imageIds: Record<string, string>;
  /** The vmconfig JSON stored in each image. */
  vmconfigs: Record<string, unknown>;
  /** The tiny guest's files (kernel, key, …). */
  guest: GuestFiles;
  /** Root password of the guest (what `image`'s vmconfig says). */
  password: string;
  /** Milliseconds spent building (guest build + define + 3 exports + 3 pushes). */
  buildMs: number;
  /** Stops the registry (and forgets the cache, so the next call builds again). Idempotent. */
  dispose(): Promise<void>;
}

const SSH_SERVICE = { service: "ssh", port: 22, protocol: "tcp" };

/** The vmconfig of each image (by repository name under `sardines/`). */
export const JOB_IMAGE_VMCONFIGS: Record<"tiny" | "tiny-deaf" | "tiny-nouser", unknown> = {
  "tiny": {
    users: [{ username: "root", password: GUEST_PASSWORD }],
    services: [SSH_SERVICE],
  },
  "tiny-deaf": {
    users: [{ username: "root", password: GUEST_PASSWORD }],
    services: [{ service: "ssh", port: 2222, protocol: "tcp" }],
  },
  "tiny-nouser": {
    services: [SSH_SERVICE],
  },
};

let building: Promise<JobImages> | undefined;

/**
 * Builds and pushes the job images once per process (later calls return the same promise; a
 * failed build is retried by the next call). Needs root, libvirtd (started if needed), qemu-img
 * and the registry binary, like the other VM tests.
 */
export function ensureJobImage(): Promise<JobImages> {
  if (!building) {
    building = buildJobImages();
    building.catch(() => {
      building = undefined;
    });
  }
  return building;
}

/**
 * Domain XML of the image's source VM: the tiny guest with direct kernel boot, `rootDisk` as
 * virtio `vda`, a serial console logged to a file in `dir`, virtio-rng, no NIC, no
 * `qemu:commandline`. `type='qemu'`, since KVM does not work on the test machines (the executor's
 * `domain-type` forces it anyway).
 */
export function jobImageDomainXml(
  opts: { name: string; dir: string; rootDisk: string; kernel: string; initrd: string },
): string {
  return guestDomainXml({ ...opts, serialLog: join(opts.dir, "console.log") });
}

/**
 * Kills the registry process this module started (found by its own config file's path on its
 * command line, so nothing else is touched) and removes its folder, without awaiting anything.
 */
function stopRegistrySync(registry: TestRegistry): void {
  const dir = registry.dataDir.replace(/\/data$/, "");
  const config = `${dir}/config.yml`;
  try {
    for (const e of Deno.readDirSync("/proc")) {
      if (!/^\d+$/.test(e.name)) continue;
      let cmdline = "";
      try {
        cmdline = Deno.readTextFileSync(`/proc/${e.name}/cmdline`);
      } catch {
        continue;
      }
      const argv = cmdline.split("\0");
      if (argv.includes("serve") && argv.includes(config)) {
        try {
          Deno.kill(Number(e.name), "SIGTERM");
        } catch { /* gone */ }
      }
    }
  } catch { /* no /proc */ }
  if (Deno.env.get("SARDE_TEST_KEEP") !== "1") {
    try {
      Deno.removeSync(dir, { recursive: true });
    } catch { /* already gone */ }
  }
}

async function buildJobImages(): Promise<JobImages> {
  const start = performance.now();
  const guest = await ensureGuest();
  await ensureLibvirtd();
  const registry = await startRegistry("plain");
  const name = uniqueVmName("sarde-jobimage");
  let vmDir: string | undefined;
  let work: string | undefined;
  const env = { LIBVIRT_DEFAULT_URI: TEST_URI };
  try {
    vmDir = await makeVmDir("jobimage");
    work = await tempDir("jobimage");
    const rootDisk = join(vmDir, "root.qcow2");
    // A full copy, not an overlay: the exported image is self-contained either way, but a copy
    // keeps the image independent of later rebuilds of the guest.
    await run("qemu-img", ["convert", "-f", "qcow2", "-O", "qcow2", guest.rootfs, rootDisk], {
      check: true,
    });
    await Deno.chmod(rootDisk, 0o644);
    await virshDefine(
      jobImageDomainXml({
        name,
        dir: vmDir,
        rootDisk,
        kernel: guest.kernel,
        initrd: guest.initrd,
      }),
      TEST_URI,
      vmDir,
    );
    const ocidir = join(work, "oci");
    const images: Record<string, string> = {};
    const imageIds: Record<string, string> = {};
    for (const [repo, vmconfig] of Object.entries(JOB_IMAGE_VMCONFIGS)) {
      const ref = `${registry.host}/sardines/${repo}:latest`;
      const file = join(work, `${repo}.vmconfig.json`);
      await Deno.writeTextFile(file, JSON.stringify(vmconfig, null, 2));
      const exp = await sarde(
        ["export", "-d", ocidir, "-c", TEST_URI, "--vmconfig", file, name, ref],
        { env },
      );
      if (exp.code !== 0) {
        throw new Error(`sarde export ${name} ${ref} failed (exit ${exp.code}): ${exp.stderr}`);
      }
      imageIds[ref] = `sha256:${exp.stdout.trim().replace(/^sha256:/, "")}`;
      const push = await sarde(["push", "-d", ocidir, ref]);
      if (push.code !== 0) {
        throw new Error(`sarde push ${ref} failed (exit ${push.code}): ${push.stderr}`);
      }
      images[repo] = ref;
    }
    let disposed: Promise<void> | undefined;
    // A test file that never calls dispose() (a --filter that skips its teardown test) must not
    // leave the registry running: stop it synchronously when the process unloads.
    const onUnload = () => stopRegistrySync(registry);
    globalThis.addEventListener("unload", onUnload);
    const result: JobImages = {
      registry,
      image: images["tiny"],
      badPortImage: images["tiny-deaf"],
      noUserImage: images["tiny-nouser"],
      imageIds,
      vmconfigs: Object.fromEntries(
        Object.entries(JOB_IMAGE_VMCONFIGS).map(([repo, c]) => [images[repo], c]),
      ),
      guest,
      password: GUEST_PASSWORD,
      buildMs: Math.round(performance.now() - start),
      dispose: () =>
        disposed ??= (async () => {
          building = undefined;
          globalThis.removeEventListener("unload", onUnload);
          await registry.stop();
        })(),
    };
    return result;
  } catch (err) {
    await registry.stop();
    throw err;
  } finally {
    await shTry("virsh", ["-c", TEST_URI, "destroy", "--domain", name]);
    await shTry("virsh", ["-c", TEST_URI, "undefine", "--domain", name]);
    if (vmDir) await removeVmDir(vmDir);
    if (work) await Deno.remove(work, { recursive: true }).catch(() => {});
  }
}
