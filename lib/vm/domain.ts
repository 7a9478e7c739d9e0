/**
 * libvirt domain XML: reading what export needs, anonymising it, and making an untrusted image's
 * XML safe to define on this host (import) or to run as a copy (clone).
 *
 * An image's XML is hostile input: it could point a disk at `/dev/sda`, pass through a PCI
 * device, or name another program as `<emulator>`. Import therefore rewrites every file
 * reference into the VM's own folder and refuses whatever still reaches outside it.
 *
 * @module
 */

import { DOMParser, type Element, XMLSerializer } from "@xmldom/xmldom";
import { basename, join, normalize } from "node:path";
import { fail } from "../util/errors.ts";

/** A parsed domain document. */
export type DomainDoc = ReturnType<DOMParser["parseFromString"]>;

/** XML namespace of `<qemu:commandline>` and friends. */
export const QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0";

/** Parses domain XML; malformed XML is a one-line `usage` error naming `what`. */
export function parseDomainXml(text: string, what = "domain XML"): DomainDoc {
  let doc: DomainDoc;
  try {
    doc = new DOMParser({
      onError: (level, message) => {
        if (level !== "warning") throw new Error(message.split("\n")[0]);
      },
    }).parseFromString(text, "text/xml");
  } catch (err) {
    throw fail("usage", `${what} is not valid XML: ${(err as Error).message}`);
  }
  const root = doc.documentElement;
  if (!root || root.nodeName !== "domain") {
    throw fail("usage", `${what} is not a libvirt <domain> document`);
  }
  return doc;
}

/** Serialises a domain document (with an XML declaration, as sardinecake 0.4 writes it). */
export function serializeDomainXml(doc: DomainDoc): string {
  const body = new XMLSerializer().serializeToString(doc.documentElement!);
  return `<?xml version="1.0" ?>\n${body}\n`;
}

/** Direct children of `el` named `name`. */
export function childElements(el: Element, name?: string): Element[] {
  const out: Element[] = [];
  for (let n = el.firstChild; n; n = n.nextSibling) {
    if (n.nodeType === 1 && (name === undefined || n.nodeName === name)) out.push(n as Element);
  }
  return out;
}

/** First direct child of `el` named `name`. */
export function childElement(el: Element, name: string): Element | undefined {
  return childElements(el, name)[0];
}

/** Every element below `el` (depth first, `el` excluded). */
function descendants(el: Element): Element[] {
  const out: Element[] = [];
  for (const c of childElements(el)) out.push(c, ...descendants(c));
  return out;
}

/** The element's own text (its text-node children, not its descendants'), trimmed. */
function childTextOf(el: Element): string {
  let t = "";
  for (let n = el.firstChild; n; n = n.nextSibling) {
    if (n.nodeType === 3 || n.nodeType === 4) t += n.nodeValue ?? "";
  }
  return t.trim();
}

/** Removes an element together with the indentation before it, so no blank line remains. */
export function removeElement(el: Element): void {
  const prev = el.previousSibling;
  if (prev && prev.nodeType === 3 && /^\s*$/.test(prev.nodeValue ?? "")) {
    el.parentNode?.removeChild(prev);
  }
  el.parentNode?.removeChild(el);
}

function root(doc: DomainDoc): Element {
  return doc.documentElement!;
}

function devices(doc: DomainDoc): Element | undefined {
  return childElement(root(doc), "devices");
}

/** The domain's `<name>`. */
export function domainName(doc: DomainDoc): string {
  return childElement(root(doc), "name")?.textContent?.trim() ?? "";
}

/** Sets `<name>` (creating it if needed). */
export function setDomainName(doc: DomainDoc, name: string): void {
  let el = childElement(root(doc), "name");
  if (!el) {
    el = doc.createElement("name");
    root(doc).insertBefore(el, root(doc).firstChild);
  }
  el.textContent = name;
}

/** Sets the domain `type` (`kvm`, `qemu`): hosts without KVM need `qemu`. */
export function setDomainType(doc: DomainDoc, type: string): void {
  root(doc).setAttribute("type", type);
}

const archMap: Record<string, string> = {
  x86_64: "amd64",
  i686: "386",
  aarch64: "arm64",
  armv7l: "arm",
  armv6l: "arm",
  mipsel: "mipsle",
  mips64el: "mips64le",
};

/** The OCI `architecture` for the domain's `<os><type arch>` (as sardinecake 0.4 maps it). */
export function ociArchitecture(doc: DomainDoc): string | null {
  const os = childElement(root(doc), "os");
  const arch = os && childElement(os, "type")?.getAttribute("arch");
  if (!arch) return null;
  return archMap[arch] ?? arch;
}

const osRules: [string, string][] = [
  ["android-x86.org", "android"],
  ["apple.com/", "darwin"],
  ["dragonflybsd.org/", "dragonfly"],
  ["freebsd.org/", "freebsd"],
  ["freedos.org/", "dos"],
  ["guix.gnu.org/guix/hurd", "hurd"],
  ["guix.gnu.org/", "linux"],
  ["haiku-os.org/", "haiku"],
  ["microsoft.com/msdos/", "dos"],
  ["microsoft.com/win/1.", "win16"],
  ["microsoft.com/win/2.", "win16"],
  ["microsoft.com/win/3.", "win16"],
  ["microsoft.com/win/9", "win9x"],
  ["microsoft.com/win/me", "win9x"],
  ["microsoft.com/", "windows"],
  ["netbsd.org/", "netbsd"],
  ["novell.com/", "netware"],
  ["omnios.org/", "illumos"],
  ["openbsd.org/", "openbsd"],
  ["openindiana.org/", "illumos"],
  ["oracle.com/solaris/", "solaris"],
  ["oracle.com/", "linux"],
  ["smartos.org/", "illumos"],
  ["sun.com/", "solaris"],
];

/** The OCI `os` from the libosinfo metadata (sardinecake 0.4's table; `linux` otherwise). */
export function ociOs(doc: DomainDoc): string {
  const ids = descendants(root(doc)).filter((e) => e.nodeName === "libosinfo:os").map((e) =>
    e.getAttribute("id") ?? ""
  );
  const id = ids[0] ?? "";
  for (const [key, os] of osRules) if (id.includes(`://${key}`)) return os;
  return "linux";
}

/** A file-backed disk or cdrom of the domain. */
export interface FileDisk {
  element: Element;
  source: Element;
  /** `disk`, `cdrom`, `floppy`, `lun`. */
  device: string;
  /** Target device, e.g. `vda`. */
  target: string;
  /** Path as written in the XML. */
  path: string;
  /** Driver type (`qcow2`, `raw`), if given. */
  format?: string;
}

/** All `<disk type='file'>` with a `<source file>`, in XML order (cdroms and floppies included). */
export function fileDisks(doc: DomainDoc): FileDisk[] {
  const devs = devices(doc);
  if (!devs) return [];
  const out: FileDisk[] = [];
  for (const disk of childElements(devs, "disk")) {
    if ((disk.getAttribute("type") ?? "file") !== "file") continue;
    const source = childElement(disk, "source");
    const path = source?.getAttribute("file");
    if (!source || !path) continue;
    out.push({
      element: disk,
      source,
      device: disk.getAttribute("device") ?? "disk",
      target: childElement(disk, "target")?.getAttribute("dev") ?? "",
      path,
      format: childElement(disk, "driver")?.getAttribute("type") ?? undefined,
    });
  }
  return out;
}

/** Files referenced by `<os>` that travel with the VM: NVRAM store and direct-kernel-boot files. */
export interface BootFile {
  element: Element;
  kind: "nvram" | "kernel" | "initrd" | "dtb";
  path: string;
}

/** The `<os>` files of the domain (NVRAM, kernel, initrd, dtb) that have a path. */
export function bootFiles(doc: DomainDoc): BootFile[] {
  const os = childElement(root(doc), "os");
  if (!os) return [];
  const out: BootFile[] = [];
  for (const kind of ["nvram", "kernel", "initrd", "dtb"] as const) {
    for (const el of childElements(os, kind)) {
      const path = el.textContent?.trim();
      if (path) out.push({ element: el, kind, path });
    }
  }
  return out;
}

/** Sets the text of a `<kernel>`-like element. */
export function setElementText(el: Element, text: string): void {
  while (el.firstChild) el.removeChild(el.firstChild);
  el.appendChild(el.ownerDocument!.createTextNode(text));
}

/**
 * Removes what identifies one host's copy of the VM, as sardinecake 0.4 does (uuid, MAC
 * addresses, the itco watchdog) and what only makes sense on the exporting host (`<emulator>`,
 * `<seclabel>`, `<backingStore>`, runtime aliases and ids).
 */
export function anonymizeDomain(doc: DomainDoc): void {
  const r = root(doc);
  r.removeAttribute("id");
  for (const el of childElements(r, "uuid")) removeElement(el);
  for (const el of childElements(r, "seclabel")) removeElement(el);
  const devs = devices(doc);
  if (!devs) return;
  for (const el of childElements(devs, "emulator")) removeElement(el);
  for (const el of childElements(devs, "watchdog")) {
    if (el.getAttribute("model") === "itco") removeElement(el);
  }
  for (const iface of childElements(devs, "interface")) {
    for (const mac of childElements(iface, "mac")) removeElement(mac);
    for (const target of childElements(iface, "target")) removeElement(target);
  }
  for (const disk of childElements(devs, "disk")) {
    for (const bs of childElements(disk, "backingStore")) removeElement(bs);
  }
  for (const el of descendants(r)) if (el.nodeName === "alias") removeElement(el);
}

/** Options for {@link prepareImportedDomain}. */
export interface ImportDomainOptions {
  /** libvirt name of the new VM. */
  name: string;
  /** The VM's own folder: every file reference ends up inside it. */
  vmFolder: string;
  /** Let the XML keep host resources (devices, absolute paths, qemu:commandline). */
  allowHostResources?: boolean;
  /** Force `<domain type>` (e.g. `qemu` where KVM is unavailable). */
  domainType?: string;
}

const SAFE_CHAR_TYPES = new Set([
  "pty",
  "file",
  "unix",
  "null",
  "vc",
  "spicevmc",
  "spiceport",
  "qemu-vdagent",
]);
const HOST_READONLY_PREFIX = "/usr/share/";

function isPlainBasename(p: string): boolean {
  // Hidden names are refused too: the VM folder's own marker files start with a dot.
  return p !== "" && !p.startsWith(".") && !p.includes("/") && !p.includes("\0");
}

/** Read-only host data (firmware): under /usr/share, with no `..` to climb out of it. */
function isHostReadonly(p: string): boolean {
  return p.startsWith(HOST_READONLY_PREFIX) && normalize(p) === p && !p.split("/").includes("..");
}

/** Inside `folder` for real: `..` segments are refused rather than resolved. */
function isInside(p: string, folder: string): boolean {
  return p.startsWith(folder + "/") && normalize(p) === p && !p.split("/").includes("..");
}

/** Interface types that attach the guest to a libvirt network, a host bridge or user-mode NAT. */
/** Interface types that attach the guest to a libvirt network, a host bridge or user-mode NAT. */
const SAFE_INTERFACE_TYPES = new Set(["network", "bridge", "user"]);
/** Elements whose text and attributes are free-form and never interpreted as host paths. */
const FREE_FORM = new Set(["metadata", "description", "title"]);
/** Devices whose `<source path>` and `<log file>` are files on the host. */
const CHAR_DEVICES = new Set(["serial", "console", "parallel", "channel"]);
/** Host devices an `<rng>` may read: they give randomness, nothing else. */
const RANDOM_DEVICES = ["/dev/random", "/dev/urandom", "/dev/hwrng"];

/**
 * Rewrites an image's (anonymised) domain XML for this host and checks it cannot reach outside
 * `vmFolder`: disk, NVRAM and kernel files must be plain basenames (moved into the folder),
 * file-backed serial logs and sockets are re-pointed into it, and host devices, passthrough,
 * absolute paths (read-only firmware under `/usr/share` excepted) and `qemu:commandline` are
 * refused unless `allowHostResources`. Throws one `usage` error listing every problem.
 */
export function prepareImportedDomain(doc: DomainDoc, options: ImportDomainOptions): void {
  // The policy judges both the XML as the image wrote it and what the rewriting made of it.
  const image = options.allowHostResources ? undefined : doc.cloneNode(true) as DomainDoc;
  rewriteForHost(doc, options);
  if (!image) return;
  const problems = hostResourceRefusals(image, doc, options.vmFolder);
  if (problems.length) {
    throw fail(
      "usage",
      `refusing to import: the image's domain XML reaches outside its VM folder: ${
        problems.join("; ")
      }`,
      "import only images you trust with --allow-host-resources",
    );
  }
}

/**
 * The rewriting half of {@link prepareImportedDomain}, which refuses nothing: anonymises, renames,
 * moves the files that are plain basenames into `vmFolder`, keeps displays on this host and
 * re-points the files of safe character devices into `vmFolder`. What it cannot place stays as it
 * was, for {@link hostResourceRefusals} to refuse.
 */
function rewriteForHost(doc: DomainDoc, options: ImportDomainOptions): void {
  const inFolder = (p: string) => join(options.vmFolder, p);
  anonymizeDomain(doc);
  setDomainName(doc, options.name);
  if (options.domainType) setDomainType(doc, options.domainType);
  for (const d of fileDisks(doc)) {
    if (isPlainBasename(d.path)) d.source.setAttribute("file", inFolder(d.path));
  }
  for (const f of bootFiles(doc)) {
    if (isPlainBasename(f.path)) setElementText(f.element, inFolder(f.path));
  }
  const devs = devices(doc);
  for (const el of devs ? childElements(devs) : []) {
    if (el.nodeName === "graphics") {
      // A display must not listen beyond this host: drop the image's listen addresses so
      // libvirt's own default (127.0.0.1 in qemu.conf) applies.
      el.removeAttribute("listen");
      for (const l of childElements(el, "listen")) removeElement(l);
    } else if (
      CHAR_DEVICES.has(el.nodeName) && SAFE_CHAR_TYPES.has(el.getAttribute("type") || "pty")
    ) {
      // A log or socket keeps only its name, made safe, prefixed with the device kind.
      const repoint = (e: Element, attr: string) => {
        const p = e.getAttribute(attr);
        if (p) {
          e.setAttribute(
            attr,
            inFolder(`${el.nodeName}-${basename(p).replace(/[^\w.-]/g, "_") || "log"}`),
          );
        }
      };
      for (const src of childElements(el, "source")) repoint(src, "path");
      for (const log of childElements(el, "log")) repoint(log, "file");
    }
  }
}

/**
 * The safety policy of an import: everything an image's domain XML may not do unless the user
 * trusts it (`--allow-host-resources`), one message each. `image` is the XML as the image has it,
 * `prepared` the same after {@link rewriteForHost}.
 */
function hostResourceRefusals(image: DomainDoc, prepared: DomainDoc, vmFolder: string): string[] {
  const problems = [
    ...repeatedSections(image),
    ...filesOutsideImage(image),
    ...firmwareOutsideHostData(image),
    ...hostDevices(image),
    ...rawQemuArguments(image),
  ];
  // Whatever the rules above did not anticipate: nothing may be network-backed, and every
  // absolute path left, in any attribute or text, must be inside the VM folder or read-only host
  // data.
  for (const p of strayReferences(prepared, vmFolder)) if (!problems.includes(p)) problems.push(p);
  return problems;
}

/** Refuses repeated sections: libvirt merges repeated `<devices>`/`<os>`, the checks read the first. */
function repeatedSections(doc: DomainDoc): string[] {
  const counts = new Map<string, number>();
  for (const el of childElements(root(doc))) {
    counts.set(el.nodeName, (counts.get(el.nodeName) ?? 0) + 1);
  }
  return [...counts].filter(([name, n]) => n > 1 && !name.startsWith("qemu:"))
    .map(([name, n]) => `<${name}> appears ${n} times`);
}

/** Refuses disk, NVRAM and kernel files that are not plain basenames: import cannot place them. */
function filesOutsideImage(doc: DomainDoc): string[] {
  return [
    ...fileDisks(doc).filter((d) => !isPlainBasename(d.path))
      .map((d) => `disk ${d.target || "?"} uses a path outside the image ('${d.path}')`),
    ...bootFiles(doc).filter((f) => !isPlainBasename(f.path))
      .map((f) => `<${f.kind}> uses a path outside the image ('${f.path}')`),
  ];
}

/** Refuses a `<loader>` or NVRAM template that is not read-only host firmware. */
function firmwareOutsideHostData(doc: DomainDoc): string[] {
  const problems: string[] = [];
  const os = childElement(root(doc), "os");
  for (const loader of os ? childElements(os, "loader") : []) {
    const p = loader.textContent?.trim() ?? "";
    if (p && !isHostReadonly(p)) {
      problems.push(`<loader> '${p}' is not host firmware under ${HOST_READONLY_PREFIX}`);
    }
  }
  for (const nv of os ? childElements(os, "nvram") : []) {
    const template = nv.getAttribute("template");
    if (template && !isHostReadonly(template)) {
      problems.push(`<nvram template> '${template}' is not under ${HOST_READONLY_PREFIX}`);
    }
  }
  return problems;
}

/**
 * Refuses devices that reach the host: non-file disks, passthrough of any kind, host network
 * devices and ports, character devices on host devices or ports, non-random rng backends.
 */
function hostDevices(doc: DomainDoc): string[] {
  const problems: string[] = [];
  const devs = devices(doc);
  for (const el of devs ? childElements(devs) : []) {
    const type = el.getAttribute("type") ?? "";
    switch (el.nodeName) {
      case "disk":
        if (type !== "file") problems.push(`<disk type='${type}'> reaches host storage`);
        break;
      case "hostdev":
      case "filesystem":
      case "smartcard":
      case "redirdev":
      case "shmem":
        problems.push(`<${el.nodeName}> passes host resources to the guest`);
        break;
      case "interface":
        if (!SAFE_INTERFACE_TYPES.has(type)) {
          problems.push(`<interface type='${type}'> uses host devices or opens host ports`);
        }
        break;
      case "input":
        if (type === "passthrough" || type === "evdev") {
          problems.push(`<input type='${type}'> passes a host device`);
        }
        break;
      case "serial":
      case "console":
      case "parallel":
      case "channel":
        if (!SAFE_CHAR_TYPES.has(type || "pty")) {
          problems.push(`<${el.nodeName} type='${type}'> uses a host device or network port`);
        }
        break;
      case "rng":
        for (const b of childElements(el, "backend")) {
          const p = b.textContent?.trim();
          if (b.getAttribute("model") === "random" && p && !RANDOM_DEVICES.includes(p)) {
            problems.push(`<rng> backend '${p}' is not a random device`);
          }
        }
        break;
      case "tpm":
        for (const b of childElements(el, "backend")) {
          if (b.getAttribute("type") === "passthrough") {
            problems.push("<tpm> passes through the host TPM");
          }
        }
        break;
    }
  }
  return problems;
}

/** Refuses `<qemu:commandline>` and its kin: raw QEMU arguments can do anything. */
function rawQemuArguments(doc: DomainDoc): string[] {
  const r = root(doc);
  return descendants(r)
    .filter((el) =>
      (el.namespaceURI === QEMU_NS || el.nodeName.startsWith("qemu:")) && el.parentNode === r
    )
    .map((el) => `<${el.nodeName}> passes raw arguments to QEMU`);
}

/**
 * Refuses network-backed sources and every absolute path, in any attribute or text, outside
 * `vmFolder` and read-only host data; free-form elements (metadata, description) are not
 * interpreted by libvirt and are skipped. Each message once.
 */
function strayReferences(doc: DomainDoc, vmFolder: string): string[] {
  const problems = new Set<string>();
  const outside = (p: string) => p.startsWith("/") && !isInside(p, vmFolder) && !isHostReadonly(p);
  const scan = (el: Element) => {
    if (FREE_FORM.has(el.nodeName)) return;
    if (el.getAttribute("type") === "network" && el.nodeName !== "interface") {
      problems.add(`<${el.nodeName} type='network'> reaches a network storage server`);
    }
    if (el.nodeName === "source" && el.getAttribute("protocol")) {
      problems.add(
        `<source protocol='${el.getAttribute("protocol")}'> reaches a network storage server`,
      );
    }
    for (let i = 0; i < el.attributes.length; i++) {
      const a = el.attributes.item(i)!;
      const v = a.value.trim();
      if (outside(v)) problems.add(`<${el.nodeName} ${a.name}='${v}'> is outside the VM folder`);
    }
    const text = childTextOf(el);
    if (outside(text)) {
      const rng = el.nodeName === "backend" && el.parentNode?.nodeName === "rng" &&
        RANDOM_DEVICES.includes(text);
      if (!rng) problems.add(`<${el.nodeName}>${text}</${el.nodeName}> is outside the VM folder`);
    }
    for (const c of childElements(el)) scan(c);
  };
  scan(root(doc));
  return [...problems];
}

/** The CPUs and memory a VM gets (see {@link setVmSize}); what is undefined stays as it is. */
export interface VmSize {
  vcpus?: number;
  /** Bytes; written in KiB (libvirt's unit), rounded up. */
  memoryBytes?: number;
}

/**
 * Gives the VM `size.vcpus` CPUs and `size.memoryBytes` of memory (the executor's job sizes).
 * `<vcpu>` loses a `current` count (hot-plug below the maximum), `<vcpus>` (per-CPU states) goes,
 * and so does a `<cpu><topology>`, whose sockets×cores×threads must equal the count: libvirt then
 * makes each CPU a socket, which every guest handles. Pinnings of CPUs that no longer exist
 * go. `<memory>` and `<currentMemory>` (the balloon's target) both get the new size. A guest
 * NUMA topology (`<cpu><numa>`) fixes CPUs and memory per node and cannot be resized without
 * guessing what it was for: such an image is refused (a `usage` error), as is memory above
 * `<maxMemory>`.
 */
export function setVmSize(doc: DomainDoc, size: VmSize): void {
  const dom = root(doc);
  if (size.vcpus === undefined && size.memoryBytes === undefined) return;
  const cpu = childElement(dom, "cpu");
  if (cpu && childElement(cpu, "numa")) {
    throw fail(
      "usage",
      "the image defines a guest NUMA topology (<cpu><numa>): its vcpus and memory cannot be changed",
      "leave vcpus/memory unset for this image",
    );
  }
  const set = (name: string, text: string) => {
    let el = childElement(dom, name);
    if (!el) {
      el = doc.createElement(name);
      dom.appendChild(el);
    }
    el.textContent = text;
    return el;
  };
  if (size.vcpus !== undefined) {
    const vcpu = set("vcpu", String(size.vcpus));
    vcpu.removeAttribute("current");
    for (const el of childElements(dom, "vcpus")) removeElement(el);
    for (const el of cpu ? childElements(cpu, "topology") : []) removeElement(el);
    const tune = childElement(dom, "cputune");
    for (const pin of tune ? childElements(tune, "vcpupin") : []) {
      if (Number(pin.getAttribute("vcpu")) >= size.vcpus) removeElement(pin);
    }
  }
  if (size.memoryBytes !== undefined) {
    const kib = Math.ceil(size.memoryBytes / 1024);
    const max = childElement(dom, "maxMemory");
    if (max && kib > kibOf(max)) {
      throw fail(
        "usage",
        `memory ${kib} KiB is above the image's <maxMemory> of ${kibOf(max)} KiB`,
      );
    }
    for (const name of ["memory", "currentMemory"]) {
      if (name === "currentMemory" && !childElement(dom, name)) continue;
      set(name, String(kib)).setAttribute("unit", "KiB");
    }
  }
}

const memoryUnits: Record<string, number> = {
  b: 1,
  bytes: 1,
  k: 1024,
  kib: 1024,
  kb: 1000,
  m: 1024 ** 2,
  mib: 1024 ** 2,
  mb: 1000 ** 2,
  g: 1024 ** 3,
  gib: 1024 ** 3,
  gb: 1000 ** 3,
  t: 1024 ** 4,
  tib: 1024 ** 4,
  tb: 1000 ** 4,
};

/** A libvirt memory element's value in KiB (`unit` as libvirt reads it; default KiB). */
function kibOf(el: Element): number {
  const unit = (el.getAttribute("unit") || "KiB").toLowerCase();
  return Number(childTextOf(el)) * (memoryUnits[unit] ?? 1024) / 1024;
}
