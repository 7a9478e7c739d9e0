/**
 * sarde's tiny test guest: a Debian cloud kernel with a busybox + dropbear + bash initramfs and an
 * ext4 root disk (`rootfs.qcow2`), built by `tests/support/guest/build.sh` from Debian packages,
 * plus helpers to run it under libvirt (TCG, user-mode networking with an SSH port forward on
 * 127.0.0.1) and to talk to it over SSH.
 *
 * ```ts
 * import { ensureGuest, freePort, guestDomainXml, sshRun, waitForSsh } from "./support/guest.ts";
 * const g = await ensureGuest();
 * // qemu-img create -f qcow2 -F qcow2 -b ${g.rootfs} DIR/root.qcow2
 * const port = freePort();
 * const xml = guestDomainXml({
 *   name: "sarde-t1", dir: DIR, rootDisk: `${DIR}/root.qcow2`, sshPort: port,
 *   kernel: g.kernel, initrd: g.initrd,
 * });
 * // virsh -c qemu:///system define …; virsh … start sarde-t1
 * await waitForSsh({ port, key: g.privateKey, timeoutMs: 60_000 });
 * const r = await sshRun({ port, key: g.privateKey }, "uname -r");
 * ```
 *
 * The guest's files live in `/var/tmp/sarde-tiny-guest` (or `SARDE_GUEST_DIR`), which must stay
 * readable by the `libvirt-qemu` user (so not under /root). Put VM files (overlays, serial logs)
 * in a world-traversable directory under /var/tmp as well.
 *
 * @module
 */

import { freePort } from "../../lib/util/net.ts";

/** Paths of a built tiny guest (see `tests/support/guest/build.sh`). */
export interface GuestFiles {
  /** The build directory (`/var/tmp/sarde-tiny-guest` unless `SARDE_GUEST_DIR` is set). */
  dir: string;
  /** The kernel (`vmlinuz`), for direct kernel boot. */
  kernel: string;
  /** The initramfs (`initrd.img`); it switch_roots into `sarde.root=/dev/vda` when given. */
  initrd: string;
  /** The pristine ext4 root disk (`rootfs.qcow2`, 256 MiB virtual). Use it as a backing file only. */
  rootfs: string;
  /** The ed25519 private key authorised for root (`id_ed25519`, OpenSSH format, mode 0600). */
  privateKey: string;
  /** A file holding root's password (`password`; the password is {@link GUEST_PASSWORD}). */
  password: string;
}

/** Root's password in the tiny guest (also in {@link GuestFiles.password}). */
export const GUEST_PASSWORD = "sarde";

/** The kernel command line that boots the guest from its root disk (`/dev/vda`). */
export const GUEST_CMDLINE = "console=ttyS0 sarde.root=/dev/vda";

/** Line the guest prints on its serial console once its network is configured. */
export const GUEST_READY_MARKER = "SARDE-TINY-GUEST READY";

/** Default build directory of the tiny guest. */
export const DEFAULT_GUEST_DIR = "/var/tmp/sarde-tiny-guest";

const BUILD_SCRIPT = new URL("./guest/build.sh", import.meta.url).pathname;

let building: Promise<GuestFiles> | undefined;

/**
 * Builds the tiny guest (once per process; `build.sh` itself returns at once when its output
 * directory already holds a current build) and returns the paths of its files.
 * The directory is `SARDE_GUEST_DIR` or {@link DEFAULT_GUEST_DIR}. A cold build downloads about
 * 33 MB of Debian packages and takes roughly 10–15 s. Throws with the script's output on failure
 * (a later call tries again).
 */
export function ensureGuest(): Promise<GuestFiles> {
  if (!building) {
    building = buildGuest();
    building.catch(() => {
      building = undefined;
    });
  }
  return building;
}

async function buildGuest(): Promise<GuestFiles> {
  const dir = Deno.env.get("SARDE_GUEST_DIR") || DEFAULT_GUEST_DIR;
  const out = await new Deno.Command("bash", {
    args: [BUILD_SCRIPT, dir],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    throw new Error(`${BUILD_SCRIPT} ${dir} failed (exit ${out.code}):\n${text.trim()}`);
  }
  return {
    dir,
    kernel: `${dir}/vmlinuz`,
    initrd: `${dir}/initrd.img`,
    rootfs: `${dir}/rootfs.qcow2`,
    privateKey: `${dir}/id_ed25519`,
    password: `${dir}/password`,
  };
}

/** Options for {@link guestDomainXml}. */
export interface GuestDomainOptions {
  /** Domain name (unique on the libvirt connection). */
  name: string;
  /** The VM's own directory (for the default serial log); must be readable by libvirt-qemu. */
  dir: string;
  /** The root disk, a qcow2 image (typically an overlay over {@link GuestFiles.rootfs}). */
  rootDisk: string;
  /**
   * Host port on 127.0.0.1 forwarded to the guest's port 22. Without it the domain has no
   * network and no `qemu:commandline`, which is what an image may carry (sarde export/import).
   */
  sshPort?: number;
  /** Kernel for direct kernel boot ({@link GuestFiles.kernel}). */
  kernel: string;
  /** Initramfs ({@link GuestFiles.initrd}). */
  initrd: string;
  /** Where the serial console goes (appended to). Default `DIR/NAME.console.log`. */
  serialLog?: string;
  /** Kernel command line. Default {@link GUEST_CMDLINE}. */
  cmdline?: string;
  /** Memory in MiB. Default 256. */
  memoryMiB?: number;
  /** More virtio disks after the root disk, as `vdb`, `vdc`, … (e.g. a big data disk). */
  extraDisks?: { path: string; format: "raw" | "qcow2" }[];
}

/** Escapes a string for XML text and attribute values. */
function xmlEscape(s: string): string {
  return s.replace(/[&<>'"]/g, (c) => `&#${c.charCodeAt(0)};`);
}

/**
 * libvirt domain XML for the tiny guest: `type='qemu'` (TCG; KVM does not work on the test
 * machines), 1 vCPU, 256 MiB, direct kernel boot with {@link GUEST_CMDLINE}, the root disk as
 * virtio qcow2 `vda` (then the extra disks), virtio-rng, no USB or balloon, the serial console to
 * a file, and QEMU user-mode networking (`restrict=on`, so the guest cannot reach any network)
 * with `hostfwd=tcp:127.0.0.1:PORT-:22`, passed through `<qemu:commandline>` because libvirt 9.0
 * has no port forwards for user networking. The NIC sits at PCI slot 0x10 so that it does not
 * collide with the slots libvirt assigns.
 */
export function guestDomainXml(opts: GuestDomainOptions): string {
  const e = xmlEscape;
  const serialLog = opts.serialLog ?? `${opts.dir}/${opts.name}.console.log`;
  const port = opts.sshPort;
  if (port !== undefined && (!Number.isInteger(port) || port <= 0 || port > 65535)) {
    throw new Error(`guestDomainXml: bad sshPort ${port}`);
  }
  const network = port === undefined ? "" : `  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=sardenet0,restrict=on,hostfwd=tcp:127.0.0.1:${port}-:22'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=sardenet0,bus=pci.0,addr=0x10'/>
  </qemu:commandline>
`;
  const ns = port === undefined ? "" : " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'";
  const extraDisks = (opts.extraDisks ?? []).map((d, i) =>
    `    <disk type='file' device='disk'>
      <driver name='qemu' type='${d.format}'/>
      <source file='${e(d.path)}'/>
      <target dev='vd${String.fromCharCode(98 + i)}' bus='virtio'/>
    </disk>
`
  ).join("");
  return `<domain type='qemu'${ns}>
  <name>${e(opts.name)}</name>
  <memory unit='MiB'>${opts.memoryMiB ?? 256}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${e(opts.kernel)}</kernel>
    <initrd>${e(opts.initrd)}</initrd>
    <cmdline>${e(opts.cmdline ?? GUEST_CMDLINE)}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${e(opts.rootDisk)}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
${extraDisks}    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='${e(serialLog)}' append='on'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='${e(serialLog)}' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>
    <memballoon model='none'/>
  </devices>
${network}</domain>
`;
}

export { freePort };

/** Where and how to reach a guest over SSH (always `root@127.0.0.1`). */
export interface SshTarget {
  /** The forwarded port on 127.0.0.1. */
  port: number;
  /** Private key file ({@link GuestFiles.privateKey}). */
  key: string;
}

/** The `ssh` arguments (options, port, user@host) for a target; a remote command may follow. */
export function sshArgs(target: SshTarget): string[] {
  return [
    "-i",
    target.key,
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "ConnectTimeout=2",
    "-o",
    "BatchMode=yes",
    "-p",
    String(target.port),
    "root@127.0.0.1",
  ];
}

/** Result of {@link sshRun}. */
export interface SshResult {
  /** Exit code of the remote command (255: ssh itself failed). */
  code: number;
  stdout: string;
  stderr: string;
}

/** Options for {@link sshRun}. */
export interface SshRunOptions {
  /** Fed to the remote command's stdin (otherwise stdin is empty). */
  stdin?: string | Uint8Array;
  /** Kill ssh and throw after this long. Default 120 000 ms. */
  timeoutMs?: number;
}

/**
 * Runs `script` on the guest as root (`ssh … root@127.0.0.1 SCRIPT`, so root's login shell,
 * bash, interprets it) and returns its exit code and output. Never throws for a non-zero exit;
 * throws when `timeoutMs` passes.
 */
export async function sshRun(
  target: SshTarget,
  script: string,
  opts: SshRunOptions = {},
): Promise<SshResult> {
  const timeoutMs = opts.timeoutMs ?? 120_000;
  const child = new Deno.Command("ssh", {
    args: [...sshArgs(target), "--", script],
    stdin: opts.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      child.kill("SIGKILL");
    } catch { /* already gone */ }
  }, timeoutMs);
  try {
    const output = child.output();
    if (opts.stdin !== undefined) {
      const data = typeof opts.stdin === "string"
        ? new TextEncoder().encode(opts.stdin)
        : opts.stdin;
      const w = child.stdin.getWriter();
      try {
        await w.write(data);
        await w.close();
      } catch { /* the remote side stopped reading; its exit status tells */ }
    }
    const out = await output;
    if (timedOut) throw new Error(`sshRun: timed out after ${timeoutMs} ms: ${script}`);
    const dec = new TextDecoder();
    return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
  } finally {
    clearTimeout(timer);
  }
}

/** Options for {@link waitForSsh}. */
export interface WaitForSshOptions extends SshTarget {
  /** Give up after this long. Default 60 000 ms. */
  timeoutMs?: number;
  /** The guest's serial log; its tail goes into the error message on timeout. */
  serialLog?: string;
}

/**
 * Waits until `ssh … root@127.0.0.1 true` succeeds (tried every 250 ms, each attempt bounded)
 * and returns the milliseconds waited. Throws on timeout with ssh's last error and the tail of
 * the serial log, if given.
 */
export async function waitForSsh(opts: WaitForSshOptions): Promise<number> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const start = performance.now();
  let last = "";
  while (performance.now() - start < timeoutMs) {
    const left = timeoutMs - (performance.now() - start);
    try {
      const r = await sshRun(opts, "true", { timeoutMs: Math.max(1000, Math.min(10_000, left)) });
      if (r.code === 0) return Math.round(performance.now() - start);
      last = `exit ${r.code}: ${r.stderr.trim()}`;
    } catch (e) {
      last = String(e);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  let tail = "";
  if (opts.serialLog) {
    try {
      const lines = (await Deno.readTextFile(opts.serialLog)).trimEnd().split("\n");
      tail = `\n--- last lines of ${opts.serialLog}:\n${lines.slice(-25).join("\n")}`;
    } catch (e) {
      tail = `\n(cannot read ${opts.serialLog}: ${e})`;
    }
  }
  throw new Error(
    `no SSH on 127.0.0.1:${opts.port} after ${timeoutMs} ms (last attempt: ${last})${tail}`,
  );
}
