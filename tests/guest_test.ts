/**
 * The tiny test guest under real libvirt (qemu:///system, TCG): build it, boot a throw-away VM on
 * a qcow2 overlay of its root disk, run bash over SSH, and check that a file written in the guest
 * persists in the overlay across an ACPI shutdown and a restart.
 *
 * Needs root, libvirtd running (`bash tools/libvirtd.sh start`) and the tools from
 * tools/setup.sh. Keeps the VM's files when `SARDE_TEST_KEEP=1`.
 */
import assert from "node:assert/strict";
import {
  ensureGuest,
  freePort,
  GUEST_READY_MARKER,
  guestDomainXml,
  sshRun,
  waitForSsh,
} from "./support/guest.ts";

const CONN = "qemu:///system";

Deno.test("guestDomainXml: extra disks follow the root disk as vdb, vdc", () => {
  const xml = guestDomainXml({
    name: "x",
    dir: "/var/tmp/x",
    rootDisk: "/var/tmp/x/root.qcow2",
    kernel: "/k",
    initrd: "/i",
    extraDisks: [{ path: "/var/tmp/x/a.raw", format: "raw" }, {
      path: "/var/tmp/x/b.qcow2",
      format: "qcow2",
    }],
  });
  const disks = [...xml.matchAll(/<disk type='file' device='disk'>([\s\S]*?)<\/disk>/g)]
    .map((m) => m[1].replace(/\s+/g, " ").trim());
  assert.deepEqual(disks, [
    "<driver name='qemu' type='qcow2'/> <source file='/var/tmp/x/root.qcow2'/> " +
    "<target dev='vda' bus='virtio'/>",
    "<driver name='qemu' type='raw'/> <source file='/var/tmp/x/a.raw'/> " +
    "<target dev='vdb' bus='virtio'/>",
    "<driver name='qemu' type='qcow2'/> <source file='/var/tmp/x/b.qcow2'/> " +
    "<target dev='vdc' bus='virtio'/>",
  ]);
});
const SSH_TIMEOUT_MS = 60_000;
const SHUTDOWN_TIMEOUT_MS = 30_000;

interface Out {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command (killed after `timeoutMs`) and returns its exit code and output. */
async function exec(cmd: string, args: string[], timeoutMs = 60_000): Promise<Out> {
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), timeoutMs);
  try {
    const o = await new Deno.Command(cmd, {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: ac.signal,
    }).output();
    if (ac.signal.aborted) throw new Error(`${cmd} ${args.join(" ")}: timed out`);
    const dec = new TextDecoder();
    return { code: o.code, stdout: dec.decode(o.stdout), stderr: dec.decode(o.stderr) };
  } finally {
    clearTimeout(timer);
  }
}

/** Runs a command; throws with its output unless it exits 0. Returns stdout. */
async function run(cmd: string, ...args: string[]): Promise<string> {
  const o = await exec(cmd, args);
  if (o.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} failed (exit ${o.code}): ${o.stderr}${o.stdout}`);
  }
  return o.stdout;
}

const virsh = (...args: string[]) => run("virsh", "-c", CONN, ...args);

async function domState(name: string): Promise<string> {
  return (await virsh("domstate", name)).trim();
}

async function waitShutOff(name: string, timeoutMs: number): Promise<boolean> {
  const end = performance.now() + timeoutMs;
  while (performance.now() < end) {
    if (await domState(name) === "shut off") return true;
    await new Promise((r) => setTimeout(r, 250));
  }
  return false;
}

/** Reads a file out of the overlay's ext4 filesystem on the host (qemu-img convert + debugfs). */
async function readFromDisk(disk: string, path: string, scratch: string): Promise<string> {
  const raw = `${scratch}/inspect.raw`;
  try {
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", disk, raw);
    return await run("debugfs", "-R", `cat ${path}`, raw);
  } finally {
    await Deno.remove(raw).catch(() => {});
  }
}

const secs = (ms: number) => `${(ms / 1000).toFixed(2)} s`;

Deno.test("tiny guest: boots under libvirt, runs bash over SSH, state persists in the overlay", async () => {
  let t0 = performance.now();
  const g = await ensureGuest();
  console.log(`ensureGuest: ${secs(performance.now() - t0)}`);

  const version = await exec("virsh", ["-c", CONN, "version"]);
  if (version.code !== 0) {
    throw new Error(
      `libvirt is not reachable at ${CONN} (start it: bash tools/libvirtd.sh start): ` +
        version.stderr.trim(),
    );
  }

  const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "sarde-guest-test-" });
  await Deno.chmod(dir, 0o755); // qemu runs as libvirt-qemu
  const name = `sarde-guest-test-${crypto.randomUUID().slice(0, 8)}`;
  const disk = `${dir}/root.qcow2`;
  const serialLog = `${dir}/console.log`;
  const port = freePort();
  const target = { port, key: g.privateKey };
  let defined = false;
  try {
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", g.rootfs, disk);
    const xml = guestDomainXml({
      name,
      dir,
      rootDisk: disk,
      sshPort: port,
      kernel: g.kernel,
      initrd: g.initrd,
      serialLog,
    });
    await Deno.writeTextFile(`${dir}/domain.xml`, xml);
    await virsh("define", `${dir}/domain.xml`);
    defined = true;

    // first boot
    t0 = performance.now();
    await virsh("start", name);
    const startMs = performance.now() - t0;
    const sshMs = await waitForSsh({ ...target, timeoutMs: SSH_TIMEOUT_MS, serialLog });
    console.log(`virsh start: ${secs(startMs)}, start -> SSH: ${secs(performance.now() - t0)}`);
    assert.ok(sshMs > 0);

    const hello = await sshRun(target, "bash -c 'echo hello; exit 3'");
    assert.equal(hello.stdout, "hello\n");
    assert.equal(hello.code, 3);

    // a GitLab-style script fed to bash on stdin
    const script = 'set -eo pipefail\necho "bash $BASH_VERSION as $(id -u) in $PWD"\n' +
      "grep ' / ' /proc/mounts\nfalse\necho not reached\n";
    const job = await sshRun(target, "bash -s", { stdin: script });
    assert.equal(job.code, 1, job.stderr);
    assert.match(job.stdout, /^bash 5\.\S+ as 0 in \/root\n/);
    assert.match(job.stdout, /^\/dev\/vda \/ ext4 rw/m);
    assert.doesNotMatch(job.stdout, /not reached/);

    // password login (sshpass), the way a runner configured with a password would log in
    const pw = await exec("sshpass", [
      "-f",
      g.password,
      "ssh",
      ...["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"],
      ...["-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", "-o", "PubkeyAuthentication=no"],
      ...["-o", "PreferredAuthentications=password", "-p", String(port), "root@127.0.0.1"],
      "echo pw-ok",
    ]);
    assert.equal(pw.stdout, "pw-ok\n", `password login failed (exit ${pw.code}): ${pw.stderr}`);

    const marker = `sarde ${crypto.randomUUID()}`;
    const w = await sshRun(target, "cat > /root/persist.txt && sync", { stdin: marker + "\n" });
    assert.equal(w.code, 0, w.stderr);

    // ACPI shutdown (the guest's acpid runs poweroff); destroy if the guest ignores it
    t0 = performance.now();
    await virsh("shutdown", name);
    const clean = await waitShutOff(name, SHUTDOWN_TIMEOUT_MS);
    if (!clean) await virsh("destroy", name);
    console.log(`virsh shutdown -> shut off: ${clean ? secs(performance.now() - t0) : "timeout"}`);
    assert.ok(clean, "the guest did not power off on the ACPI power button");

    // the file is in the overlay (read on the host, guest off) ...
    assert.equal(await readFromDisk(disk, "/root/persist.txt", dir), marker + "\n");
    const serial = await Deno.readTextFile(serialLog);
    assert.ok(serial.includes(GUEST_READY_MARKER), "no READY marker on the serial console");

    // ... and after a restart
    t0 = performance.now();
    await virsh("start", name);
    await waitForSsh({ ...target, timeoutMs: SSH_TIMEOUT_MS, serialLog });
    console.log(`restart -> SSH: ${secs(performance.now() - t0)}`);
    const r = await sshRun(target, "cat /root/persist.txt");
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, marker + "\n");
  } finally {
    if (defined) {
      await exec("virsh", ["-c", CONN, "destroy", name]);
      await exec("virsh", ["-c", CONN, "undefine", name]);
    }
    if (Deno.env.get("SARDE_TEST_KEEP") !== "1") {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    } else {
      console.log(`kept ${dir}`);
    }
  }
});
