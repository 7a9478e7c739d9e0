/**
 * Test VMs built from scratch (no network, no downloads): qcow2 disks with known content, backing
 * chains with absolute references across folders, sparse raw disks, ISO images, NVRAM files and
 * libvirt domain XML that `virsh define`s under `qemu:///system` (libvirt 9.0, `type='qemu'`).
 *
 * ```ts
 * import { defineTestVm } from "./support/vms.ts";
 * Deno.test("export", async () => {
 *   await using vm = await defineTestVm({ chain: true, cdrom: true, nvram: true });
 *   // vm.name (defined, shut off), vm.dir, vm.disks, vm.chain, vm.xml …
 * });
 * ```
 *
 * Everything lives in a fresh directory under {@link TEST_VM_ROOT} (`/var/tmp`, because qemu runs
 * as `libvirt-qemu` and cannot reach `/root`; directories are made 0755 for the same reason). The
 * helpers here call `qemu-img`, `qemu-io` and `virsh` directly, not through `lib/`, so the library
 * is tested against independent fixtures. Set `SARDE_TEST_KEEP=1` to keep files after cleanup.
 *
 * @module
 */

import { basename, join } from "node:path";

/** Parent of all test VM directories. */
export const TEST_VM_ROOT = "/var/tmp/sarde-test-vms";
/** The libvirt connection tests use. */
export const TEST_URI = "qemu:///system";
/** The UEFI firmware code image of Debian's `ovmf` package (2 MiB, non-secure-boot). */
export const OVMF_CODE = "/usr/share/OVMF/OVMF_CODE.fd";
/** The matching UEFI variables template (128 KiB). */
export const OVMF_VARS = "/usr/share/OVMF/OVMF_VARS.fd";
/** The libosinfo OS id put into generated domains' metadata. */
export const DEFAULT_OSINFO = "http://debian.org/debian/12";

const MiB = 1024 * 1024;
const KiB = 1024;
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------------------------
// processes, names and directories

/** Runs a program (argv, no shell) and returns its stdout; throws with its stderr on failure. */
export async function sh(cmd: string, args: string[]): Promise<string> {
  const out = await shTry(cmd, args);
  if (out.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} failed (exit ${out.code}): ${out.stderr.trim()}`);
  }
  return out.stdout;
}

/** Like {@link sh} but returns the exit code and output instead of throwing. */
export async function shTry(
  cmd: string,
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(cmd, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: { LC_ALL: "C" },
  }).output();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

let counter = 0;

/**
 * A VM name no other test (in this or a parallel process) uses:
 * `PREFIX-PID-COUNTER-RANDOM`. `prefix` may contain `:` (image IDs are VM names).
 */
export function uniqueVmName(prefix = "sarde-test"): string {
  const rand = Array.from(crypto.getRandomValues(new Uint8Array(3)))
    .map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${prefix}-${Deno.pid}-${++counter}-${rand}`;
}

/** A fresh, world-traversable (0755) directory under {@link TEST_VM_ROOT}. */
export async function makeVmDir(prefix = "vm"): Promise<string> {
  await Deno.mkdir(TEST_VM_ROOT, { recursive: true });
  await Deno.chmod(TEST_VM_ROOT, 0o1777);
  // makeTempDir gives 0700, which libvirt-qemu cannot traverse
  const dir = await Deno.makeTempDir({ dir: TEST_VM_ROOT, prefix: `${prefix}-` });
  await Deno.chmod(dir, 0o755);
  return dir;
}

/** A 0755 subdirectory of `dir`. */
async function subdir(dir: string, name: string): Promise<string> {
  const p = join(dir, name);
  await Deno.mkdir(p, { recursive: true });
  await Deno.chmod(p, 0o755);
  return p;
}

/** Removes a test directory (unless `SARDE_TEST_KEEP=1`). */
export async function removeVmDir(dir: string): Promise<void> {
  if (Deno.env.get("SARDE_TEST_KEEP") === "1") return;
  if (!dir.startsWith(TEST_VM_ROOT + "/")) throw new Error(`refusing to remove ${dir}`);
  await Deno.remove(dir, { recursive: true }).catch(() => {});
}

/** Starts libvirtd via `tools/libvirtd.sh start` unless `virsh -c qemu:///system` already works. */
export async function ensureLibvirtd(): Promise<void> {
  const probe = await shTry("virsh", ["-c", TEST_URI, "version"]);
  if (probe.code === 0) return;
  const script = new URL("../../tools/libvirtd.sh", import.meta.url).pathname;
  await sh("bash", [script, "start"]);
}

// ---------------------------------------------------------------------------------------------
// disks with known content

/** One deterministic write: `length` bytes of the byte `pattern` at guest offset `offset`. */
export interface PatternWrite {
  pattern: number;
  offset: number;
  length: number;
}

/** A generated disk image. */
export interface TestDisk {
  /** Absolute path. */
  path: string;
  /** `qcow2` or `raw`. */
  format: string;
  /** Guest-visible size in bytes. */
  virtualSize: number;
  /** The writes made to *this* file (for a chain element: only its own layer). */
  writes: PatternWrite[];
}

function hex(n: number): string {
  return "0x" + n.toString(16).padStart(2, "0");
}

/** Runs `qemu-io` commands on an image (absolute path, explicit format). */
export async function qemuIo(
  path: string,
  format: string,
  commands: string[],
  opts: { readOnly?: boolean } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const args = ["-f", format];
  if (opts.readOnly) args.push("-r", "-U");
  for (const c of commands) args.push("-c", c);
  args.push(path);
  return await shTry("qemu-io", args);
}

async function writePatterns(path: string, format: string, writes: PatternWrite[]): Promise<void> {
  if (writes.length === 0) return;
  const r = await qemuIo(
    path,
    format,
    writes.map((w) => `write -P ${hex(w.pattern)} ${w.offset} ${w.length}`),
  );
  if (r.code !== 0) throw new Error(`qemu-io write on ${path} failed: ${r.stderr || r.stdout}`);
}

/** Whether the image (read through its chain) holds `pattern` in the given range (`qemu-io read -P`). */
export async function hasPattern(
  path: string,
  format: string,
  write: PatternWrite,
): Promise<boolean> {
  const r = await qemuIo(path, format, [
    `read -P ${hex(write.pattern)} ${write.offset} ${write.length}`,
  ], { readOnly: true });
  return r.code === 0 && !/verification failed/i.test(r.stdout + r.stderr);
}

/** The guest-visible bytes after applying `layers` of writes in order (base first) to zeros. */
export function expectedContent(size: number, layers: PatternWrite[][]): Uint8Array {
  const buf = new Uint8Array(size);
  for (const layer of layers) {
    for (const w of layer) buf.fill(w.pattern, w.offset, w.offset + w.length);
  }
  return buf;
}

/**
 * A qcow2 image with known content: `size` (default 4 MiB) of zeros with the given pattern
 * writes (default 0xa5 over the first MiB and 0x5a over 64 KiB at 2 MiB).
 */
export async function createPlainQcow2(
  dir: string,
  opts: { name?: string; size?: number; writes?: PatternWrite[] } = {},
): Promise<TestDisk> {
  const path = join(dir, opts.name ?? "plain.qcow2");
  const size = opts.size ?? 4 * MiB;
  const writes = opts.writes ?? [
    { pattern: 0xa5, offset: 0, length: MiB },
    { pattern: 0x5a, offset: 2 * MiB, length: 64 * KiB },
  ];
  await sh("qemu-img", ["create", "-q", "-f", "qcow2", path, String(size)]);
  await writePatterns(path, "qcow2", writes);
  return { path, format: "qcow2", virtualSize: size, writes };
}

/** A 3-level backing chain; see {@link createAbsoluteChain}. */
export interface TestChain {
  base: TestDisk;
  mid: TestDisk;
  top: TestDisk;
  /** Top first, as `qemu-img info --backing-chain` lists them. */
  topFirst: TestDisk[];
  /** A raw file with the guest-visible content of `top` (for `qemu-img compare`). */
  expectedRaw: string;
  /** The same content in memory. */
  expected: Uint8Array;
}

/** The writes of each chain level (base, mid, top) on a 4 MiB disk; levels overlap on purpose. */
export const CHAIN_WRITES: readonly PatternWrite[][] = [
  [{ pattern: 0x11, offset: 0, length: MiB }, { pattern: 0x12, offset: 2 * MiB, length: MiB }],
  [{ pattern: 0x21, offset: 512 * KiB, length: MiB }],
  [{ pattern: 0x31, offset: 3 * MiB, length: 512 * KiB }],
];

/**
 * A base → mid → top qcow2 chain whose backing references are **absolute** paths into
 * **different folders** (`DIR/base/`, `DIR/mid/`, `DIR/top/`), each level writing its own patterns
 * ({@link CHAIN_WRITES}). With `sameBasename` every file is called `disk.qcow2` (the case that
 * broke sardinecake 0.4's export, which identified files by basename only). Also writes
 * `DIR/expected.raw` with the merged content.
 */
export async function createAbsoluteChain(
  dir: string,
  opts: { sameBasename?: boolean } = {},
): Promise<TestChain> {
  const size = 4 * MiB;
  const names = opts.sameBasename
    ? ["disk.qcow2", "disk.qcow2", "disk.qcow2"]
    : ["base.qcow2", "mid.qcow2", "top.qcow2"];
  const folders = ["base", "mid", "top"];
  const disks: TestDisk[] = [];
  for (let i = 0; i < 3; i++) {
    const path = join(await subdir(dir, folders[i]), names[i]);
    const args = ["create", "-q", "-f", "qcow2"];
    if (i > 0) args.push("-F", "qcow2", "-b", disks[i - 1].path); // absolute, other folder
    args.push(path);
    if (i === 0) args.push(String(size));
    await sh("qemu-img", args);
    await writePatterns(path, "qcow2", CHAIN_WRITES[i]);
    disks.push({ path, format: "qcow2", virtualSize: size, writes: [...CHAIN_WRITES[i]] });
  }
  const expected = expectedContent(size, [...CHAIN_WRITES]);
  const expectedRaw = join(dir, "expected.raw");
  await Deno.writeFile(expectedRaw, expected);
  const [base, mid, top] = disks;
  return { base, mid, top, topFirst: [top, mid, base], expectedRaw, expected };
}

/**
 * A sparse raw disk: `size` (default 64 MiB) that is mostly a hole, with data only at 1 MiB
 * (0x5a × 64 KiB) and 40 MiB (0xc3 × 128 KiB).
 */
export async function createSparseRaw(
  dir: string,
  opts: { name?: string; size?: number } = {},
): Promise<TestDisk> {
  const path = join(dir, opts.name ?? "sparse.raw");
  const size = opts.size ?? 64 * MiB;
  const writes = [
    { pattern: 0x5a, offset: MiB, length: 64 * KiB },
    { pattern: 0xc3, offset: 40 * MiB, length: 128 * KiB },
  ].filter((w) => w.offset + w.length <= size);
  const f = await Deno.open(path, { createNew: true, write: true, mode: 0o644 });
  await f.truncate(size);
  f.close();
  await writePatterns(path, "raw", writes);
  return { path, format: "raw", virtualSize: size, writes };
}

/** Overwrites `mib` MiB of `path` at `offsetMib` MiB with random bytes (incompressible data). */
export async function writeRandom(path: string, offsetMib: number, mib: number): Promise<void> {
  await sh("dd", [
    "if=/dev/urandom",
    `of=${path}`,
    "bs=1M",
    `count=${mib}`,
    `seek=${offsetMib}`,
    "conv=notrunc",
    "status=none",
  ]);
}

/**
 * An ISO 9660 image (Rock Ridge + Joliet) holding `README.TXT` and `data/hello.txt`, made with
 * `xorriso -as mkisofs` (or `genisoimage`). Returns the TestDisk (format `raw`) and its label.
 */
export async function createIso(
  dir: string,
  opts: { name?: string; label?: string } = {},
): Promise<TestDisk & { label: string }> {
  const path = join(dir, opts.name ?? "cdrom.iso");
  const label = opts.label ?? "SARDE_TEST";
  const src = await Deno.makeTempDir({ dir, prefix: ".iso-src-" });
  try {
    await Deno.writeTextFile(join(src, "README.TXT"), "sarde test cdrom\n");
    await Deno.mkdir(join(src, "data"));
    await Deno.writeTextFile(join(src, "data", "hello.txt"), "hello from the iso\n".repeat(100));
    const common = ["-quiet", "-V", label, "-J", "-R", "-o", path, src];
    const xorriso = await shTry("xorriso", ["-as", "mkisofs", ...common]);
    if (xorriso.code !== 0) {
      const gen = await shTry("genisoimage", common);
      if (gen.code !== 0) {
        throw new Error(
          `cannot make an ISO (install xorriso or genisoimage): ${xorriso.stderr}${gen.stderr}`,
        );
      }
    }
  } finally {
    await Deno.remove(src, { recursive: true });
  }
  const { size } = await Deno.stat(path);
  return { path, format: "raw", virtualSize: size, writes: [], label };
}

/**
 * An NVRAM (UEFI variables) file: a copy of {@link OVMF_VARS} when the `ovmf` package is
 * installed, else a generated 128 KiB file.
 */
export async function createNvram(dir: string, name = "nvram_VARS.fd"): Promise<string> {
  const path = join(dir, name);
  try {
    await Deno.copyFile(OVMF_VARS, path);
  } catch {
    const data = new Uint8Array(128 * KiB);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    await Deno.writeFile(path, data);
  }
  await Deno.chmod(path, 0o644);
  return path;
}

/** Dummy direct-boot files (`vmlinuz`, `initrd.img`): enough to define a domain, not to boot. */
export async function createKernelFiles(dir: string): Promise<{ kernel: string; initrd: string }> {
  const kernel = join(dir, "vmlinuz");
  const initrd = join(dir, "initrd.img");
  await Deno.writeTextFile(kernel, "not really a kernel\n".repeat(64));
  await Deno.writeTextFile(initrd, "not really an initrd\n".repeat(64));
  return { kernel, initrd };
}

/** Whether the UEFI firmware is installed (so `loader`/`nvram` domains can be defined). */
export async function haveOvmf(): Promise<boolean> {
  try {
    await Deno.stat(OVMF_CODE);
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// domain XML

/** A disk of a generated domain. */
export interface DomainDisk {
  path: string;
  /** Driver type: `qcow2` or `raw`. */
  format: string;
  /** Default `disk`. */
  device?: "disk" | "cdrom";
  /** Target dev; default: `vda`, `vdb`, … for disks, `hdc`/`hdd` (ide) or `sda`… (sata) for cdroms. */
  target?: string;
  /** For cdroms: `ide` (default; i440fx has it) or `sata`. */
  bus?: "virtio" | "ide" | "sata";
}

/** Options for {@link domainXml}. */
export interface DomainXmlOptions {
  name: string;
  /** Default: a random UUID. */
  uuid?: string;
  /** Default 64. */
  memoryMiB?: number;
  disks: DomainDisk[];
  /** UEFI: adds `<loader readonly='yes' type='pflash'>` ({@link OVMF_CODE}) and this `<nvram>`. */
  nvram?: string;
  /** Loader for `nvram` domains; default {@link OVMF_CODE}. */
  loader?: string;
  /** Direct kernel boot files (host paths outside the disks). */
  kernel?: string;
  initrd?: string;
  cmdline?: string;
  /** File the serial console is logged to. */
  serialLog?: string;
  /** One user-mode (`type='user'`) virtio NIC per MAC. */
  macs?: string[];
  /** libosinfo OS id for the metadata block; `null` for none. Default {@link DEFAULT_OSINFO}. */
  osinfo?: string | null;
}

/** Escapes text for XML content and single- or double-quoted attributes. */
export function xmlEscape(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/'/g, "&apos;").replace(/"/g, "&quot;");
}

/** A random locally administered MAC in QEMU's `52:54:00` range. */
export function randomMac(): string {
  const b = crypto.getRandomValues(new Uint8Array(3));
  return "52:54:00:" + Array.from(b).map((x) => x.toString(16).padStart(2, "0")).join(":");
}

/** Assigns target devs to disks that have none. */
export function assignTargets(disks: DomainDisk[]): Required<DomainDisk>[] {
  const used = new Set(disks.map((d) => d.target).filter(Boolean) as string[]);
  const next = (prefix: string, from: number) => {
    for (let i = from; i < 26; i++) {
      const t = prefix + String.fromCharCode(97 + i);
      if (!used.has(t)) {
        used.add(t);
        return t;
      }
    }
    throw new Error(`no free ${prefix}* target`);
  };
  return disks.map((d) => {
    const device = d.device ?? "disk";
    const bus = d.bus ?? (device === "cdrom" ? "ide" : "virtio");
    let target = d.target;
    if (!target) {
      target = bus === "virtio" ? next("vd", 0) : bus === "ide" ? next("hd", 2) : next("sd", 0);
    }
    return { path: d.path, format: d.format, device, target, bus };
  });
}

/**
 * A libvirt domain XML (`type='qemu'`: KVM does not work on the test machines) with the given
 * name, 64 MiB, file-backed disks, optional UEFI loader + NVRAM, optional direct kernel boot, a
 * serial console logged to a file, a UUID, user-mode NICs with fixed MACs (never a libvirt
 * network or bridge) and a libosinfo metadata block. `<features><acpi/>` is always present:
 * libvirt refuses UEFI without ACPI ("UEFI requires ACPI on this architecture").
 */
export function domainXml(opts: DomainXmlOptions): string {
  const e = xmlEscape;
  const uuid = opts.uuid ?? crypto.randomUUID();
  const osinfo = opts.osinfo === undefined ? DEFAULT_OSINFO : opts.osinfo;
  const lines: string[] = [];
  lines.push(`<domain type='qemu'>`);
  lines.push(`  <name>${e(opts.name)}</name>`);
  lines.push(`  <uuid>${e(uuid)}</uuid>`);
  if (osinfo) {
    lines.push(`  <metadata>`);
    lines.push(
      `    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">`,
    );
    lines.push(`      <libosinfo:os id="${e(osinfo)}"/>`);
    lines.push(`    </libosinfo:libosinfo>`);
    lines.push(`  </metadata>`);
  }
  lines.push(`  <memory unit='MiB'>${opts.memoryMiB ?? 64}</memory>`);
  lines.push(`  <vcpu>1</vcpu>`);
  lines.push(`  <os>`);
  lines.push(`    <type arch='x86_64' machine='pc'>hvm</type>`);
  if (opts.nvram) {
    lines.push(`    <loader readonly='yes' type='pflash'>${e(opts.loader ?? OVMF_CODE)}</loader>`);
    lines.push(`    <nvram>${e(opts.nvram)}</nvram>`);
  }
  if (opts.kernel) lines.push(`    <kernel>${e(opts.kernel)}</kernel>`);
  if (opts.initrd) lines.push(`    <initrd>${e(opts.initrd)}</initrd>`);
  if (opts.kernel && opts.cmdline !== undefined) {
    lines.push(`    <cmdline>${e(opts.cmdline)}</cmdline>`);
  }
  if (!opts.kernel) lines.push(`    <boot dev='hd'/>`);
  lines.push(`  </os>`);
  lines.push(`  <features>`);
  lines.push(`    <acpi/>`);
  lines.push(`  </features>`);
  lines.push(`  <on_poweroff>destroy</on_poweroff>`);
  lines.push(`  <on_reboot>restart</on_reboot>`);
  lines.push(`  <on_crash>destroy</on_crash>`);
  lines.push(`  <devices>`);
  for (const d of assignTargets(opts.disks)) {
    lines.push(`    <disk type='file' device='${d.device}'>`);
    lines.push(`      <driver name='qemu' type='${e(d.format)}'/>`);
    lines.push(`      <source file='${e(d.path)}'/>`);
    lines.push(`      <target dev='${e(d.target)}' bus='${d.bus}'/>`);
    if (d.device === "cdrom") lines.push(`      <readonly/>`);
    lines.push(`    </disk>`);
  }
  for (const mac of opts.macs ?? []) {
    lines.push(`    <interface type='user'>`);
    lines.push(`      <mac address='${e(mac)}'/>`);
    lines.push(`      <model type='virtio'/>`);
    lines.push(`    </interface>`);
  }
  if (opts.serialLog) {
    lines.push(`    <serial type='file'>`);
    lines.push(`      <source path='${e(opts.serialLog)}'/>`);
    lines.push(`      <target port='0'/>`);
    lines.push(`    </serial>`);
    lines.push(`    <console type='file'>`);
    lines.push(`      <source path='${e(opts.serialLog)}'/>`);
    lines.push(`      <target type='serial' port='0'/>`);
    lines.push(`    </console>`);
  }
  lines.push(`    <memballoon model='none'/>`);
  lines.push(`  </devices>`);
  lines.push(`</domain>`);
  return lines.join("\n") + "\n";
}

// ---------------------------------------------------------------------------------------------
// whole test VMs

/** Options for {@link createTestVm} / {@link defineTestVm}. */
export interface TestVmOptions {
  /** Exact name; default {@link uniqueVmName}(`prefix`). */
  name?: string;
  /** Name prefix (may contain `:`); default `sarde-test`. */
  prefix?: string;
  /** libvirt URI; default {@link TEST_URI}. */
  connect?: string;
  /** vda: a plain qcow2 (default), or the 3-level absolute chain (`"same-basename"`: all files `disk.qcow2`). */
  chain?: boolean | "same-basename";
  /** vdb: a sparse raw disk. */
  rawDisk?: boolean;
  /** A cdrom with a generated ISO (`true` = ide hdc). */
  cdrom?: boolean | "ide" | "sata";
  /** UEFI loader + NVRAM file. */
  nvram?: boolean;
  /** Direct kernel boot with dummy kernel/initrd files. */
  kernel?: boolean;
  /** Number of user-mode NICs (default 1). */
  nics?: number;
}

/** A generated (and possibly defined) test VM. Dispose it to undefine it and delete its files. */
export interface TestVm extends AsyncDisposable {
  name: string;
  /** libvirt URI it is defined under. */
  connect: string;
  /** Directory holding every file of the VM. */
  dir: string;
  uuid: string;
  macs: string[];
  xml: string;
  /** Disks in XML order, with their target devs. */
  disks: (Required<DomainDisk> & { disk: TestDisk })[];
  /** Set when `chain` was requested (vda's chain). */
  chain?: TestChain;
  nvram?: string;
  kernel?: string;
  initrd?: string;
  serialLog: string;
  /** Whether {@link defineTestVm} defined it. */
  defined: boolean;
  /** Destroys/undefines the VM (NVRAM included) and removes {@link TestVm.dir}. Idempotent. */
  cleanup(): Promise<void>;
}

/** Builds all files and the XML of a test VM in a fresh directory, without defining it. */
export async function createTestVm(opts: TestVmOptions = {}): Promise<TestVm> {
  const name = opts.name ?? uniqueVmName(opts.prefix);
  const uri = opts.connect ?? TEST_URI;
  const dir = await makeVmDir(name.replace(/[^A-Za-z0-9_.-]/g, "_").slice(0, 40));
  try {
    const disks: (DomainDisk & { disk: TestDisk })[] = [];
    let chain: TestChain | undefined;
    if (opts.chain) {
      chain = await createAbsoluteChain(dir, { sameBasename: opts.chain === "same-basename" });
      disks.push({ path: chain.top.path, format: "qcow2", disk: chain.top });
    } else {
      const plain = await createPlainQcow2(dir);
      disks.push({ path: plain.path, format: "qcow2", disk: plain });
    }
    if (opts.rawDisk) {
      const raw = await createSparseRaw(dir);
      disks.push({ path: raw.path, format: "raw", disk: raw });
    }
    if (opts.cdrom) {
      const iso = await createIso(dir);
      const bus = opts.cdrom === "sata" ? "sata" : "ide";
      disks.push({ path: iso.path, format: "raw", device: "cdrom", bus, disk: iso });
    }
    const nvram = opts.nvram ? await createNvram(dir) : undefined;
    const kernelFiles = opts.kernel ? await createKernelFiles(dir) : undefined;
    const serialLog = join(dir, "serial.log");
    const macs = Array.from({ length: opts.nics ?? 1 }, () => randomMac());
    const uuid = crypto.randomUUID();
    const xml = domainXml({
      name,
      uuid,
      disks,
      nvram,
      kernel: kernelFiles?.kernel,
      initrd: kernelFiles?.initrd,
      cmdline: kernelFiles ? "console=ttyS0" : undefined,
      serialLog,
      macs,
    });
    const targets = assignTargets(disks);
    const vm: TestVm = {
      name,
      connect: uri,
      dir,
      uuid,
      macs,
      xml,
      disks: targets.map((t, i) => ({ ...t, disk: disks[i].disk })),
      chain,
      nvram,
      kernel: kernelFiles?.kernel,
      initrd: kernelFiles?.initrd,
      serialLog,
      defined: false,
      cleanup: () => cleanupTestVm(name, { dir, connect: uri }),
      [Symbol.asyncDispose]: () => cleanupTestVm(name, { dir, connect: uri }),
    };
    return vm;
  } catch (err) {
    await removeVmDir(dir);
    throw err;
  }
}

/** Writes `xml` to a temp file in `dir` and runs `virsh -c URI define FILE`. */
export async function virshDefine(xml: string, uri = TEST_URI, dir = TEST_VM_ROOT): Promise<void> {
  const file = join(dir, `.define-${crypto.randomUUID()}.xml`);
  await Deno.writeTextFile(file, xml, { mode: 0o600 });
  try {
    await sh("virsh", ["-c", uri, "define", "--file", file, "--validate"]);
  } finally {
    await Deno.remove(file).catch(() => {});
  }
}

/** {@link createTestVm}, then `virsh define --validate` it. Cleans up if defining fails. */
export async function defineTestVm(opts: TestVmOptions = {}): Promise<TestVm> {
  const vm = await createTestVm(opts);
  try {
    await virshDefine(vm.xml, vm.connect, vm.dir);
  } catch (err) {
    await vm.cleanup();
    throw err;
  }
  vm.defined = true;
  return vm;
}

/**
 * Destroys (if running) and undefines `name` with `--nvram` (harmless without NVRAM), ignoring a
 * missing domain, then removes `dir` if given (it must be under {@link TEST_VM_ROOT}).
 */
export async function cleanupTestVm(
  name: string,
  opts: { dir?: string; connect?: string } = {},
): Promise<void> {
  const uri = opts.connect ?? TEST_URI;
  await shTry("virsh", ["-c", uri, "destroy", "--domain", name]);
  const r = await shTry("virsh", ["-c", uri, "undefine", "--nvram", "--domain", name]);
  if (r.code !== 0 && !/failed to get domain|Domain not found/i.test(r.stderr)) {
    throw new Error(`cannot undefine test VM '${name}': ${r.stderr.trim()}`);
  }
  if (opts.dir) await removeVmDir(opts.dir);
}

/** Basenames of a chain's files, top first (handy for assertions). */
export function chainBasenames(chain: TestChain): string[] {
  return chain.topFirst.map((d) => basename(d.path));
}

/** `virsh -c TEST_URI …` without failing (tests check the result themselves). */
export function virsh(
  ...args: string[]
): Promise<{ code: number; stdout: string; stderr: string }> {
  return shTry("virsh", ["-c", TEST_URI, ...args]);
}

/** Destroys and undefines (NVRAM included) each named VM that exists; ignores the others. */
export async function undefineVms(names: string[]): Promise<void> {
  for (const n of names.filter(Boolean)) {
    await virsh("destroy", "--domain", n);
    await virsh("undefine", "--domain", n, "--nvram");
    await virsh("undefine", "--domain", n);
  }
}
