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
 * // img.userImage    127.0.0.1:PORT/sardines/tiny-ci:latest     (ci / sarde, a non-root user)
 * ```
 *
 * The image's disk is the guest's root disk plus the user {@link GUEST_USER} (uid 1000, its own
 * home `/home/ci`, bash, password {@link GUEST_PASSWORD}), added with `debugfs`: jobs of the
 * `tiny-ci` image run as that user, like a CI runner's usual non-root account.
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
  /** `HOST/sardines/tiny-ci:latest`: same VM, users `[{ci, sarde}]` (not root; home /home/ci). */
  userImage: string;
  /** Image ID (`sha256:…`, the config digest) of each reference, as printed by `sarde export`. */
  imageIds: Record<string, string>;
  /** The vmconfig JSON stored in each image. */
  vmconfigs: Record<string, unknown>;
  /** The tiny guest's files (kernel, key, …). */
  guest: GuestFiles;
  /** Root password of the guest (what `image`'s vmconfig says). */
  password: string;
  /** Milliseconds spent building (guest build + user + define + 4 exports + 4 pushes). */
  buildMs: number;
  /** Stops the registry (and forgets the cache, so the next call builds again). Idempotent. */
  dispose(): Promise<void>;
}

const SSH_SERVICE = { service: "ssh", port: 22, protocol: "tcp" };

/** The non-root user of the job images' disk (uid 1000, home `/home/ci`, password `sarde`). */
export const GUEST_USER = "ci";

/** The vmconfig of each image (by repository name under `sardines/`). */
export const JOB_IMAGE_VMCONFIGS: Record<
  "tiny" | "tiny-deaf" | "tiny-nouser" | "tiny-ci",
  unknown
> = {
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
  "tiny-ci": {
    users: [{ username: GUEST_USER, password: GUEST_PASSWORD }],
    services: [SSH_SERVICE],
  },
};

/**
 * Adds {@link GUEST_USER} to the ext4 file system in the raw disk `raw` with `debugfs`: lines in
 * /etc/passwd, /etc/shadow and /etc/group, and its home folder. `work` holds the edited files.
 */
async function addGuestUser(raw: string, work: string): Promise<void> {
  const u = GUEST_USER;
  const hash = (await run("openssl", ["passwd", "-6", GUEST_PASSWORD], { check: true })).stdout
    .trim();
  const lines: Record<string, [string, string]> = {
    passwd: [`${u}:x:1000:1000:${u}:/home/${u}:/bin/bash`, "0100644"],
    shadow: [`${u}:${hash}:19000:0:99999:7:::`, "0100600"],
    group: [`${u}:x:1000:`, "0100644"],
  };
  const cmds: string[] = [];
  for (const [file, [line, mode]] of Object.entries(lines)) {
    const text = (await run("debugfs", ["-R", `cat /etc/${file}`, raw], { check: true })).stdout;
    const local = join(work, file);
    await Deno.writeTextFile(local, text.trimEnd() + `\n${line}\n`);
    const path = `/etc/${file}`;
    cmds.push(`rm ${path}`, `write ${local} ${path}`, `sif ${path} mode ${mode}`);
    cmds.push(`sif ${path} uid 0`, `sif ${path} gid 0`);
  }
  const home = `/home/${u}`;
  cmds.push(`mkdir ${home}`, `sif ${home} mode 040755`, `sif ${home} uid 1000`);
  cmds.push(`sif ${home} gid 1000`);
  await run("debugfs", ["-w", "-f", "-", raw], { check: true, stdin: cmds.join("\n") + "\n" });
  // debugfs goes on after a failed command: check what counts.
  const passwd = (await run("debugfs", ["-R", "cat /etc/passwd", raw])).stdout;
  const stat = (await run("debugfs", ["-R", `stat ${home}`, raw])).stdout;
  if (!passwd.includes(`\n${u}:x:1000:`) || !/User:\s+1000\b/.test(stat)) {
    throw new Error(`adding ${u} to ${raw} failed:\n${passwd}\n${stat}`);
  }
}

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
    // keeps the image independent of later rebuilds of the guest. Raw in between, for debugfs.
    const raw = join(work, "root.raw");
    await run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", guest.rootfs, raw], {
      check: true,
    });
    await addGuestUser(raw, work);
    await run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, rootDisk], { check: true });
    await Deno.remove(raw);
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
      userImage: images["tiny-ci"],
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
