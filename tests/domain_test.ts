import assert from "node:assert/strict";
import {
  anonymizeDomain,
  bootFiles,
  domainName,
  fileDisks,
  ociArchitecture,
  ociOs,
  parseDomainXml,
  prepareImportedDomain,
  serializeDomainXml,
  setVmSize,
} from "../lib/vm/domain.ts";
import { SardeError } from "../lib/util/errors.ts";
import { validateVmConfig } from "../lib/image/format.ts";

const XML = `<domain type='kvm' id='7'>
  <name>debian12</name>
  <uuid>0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://microsoft.com/win/10"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>65536</memory>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/debian12_VARS.fd</nvram>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/debian12.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/x/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/install &amp; more.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='user'>
      <mac address='52:54:00:12:34:56'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='/var/log/debian12-serial.log'/>
      <target port='0'/>
    </serial>
    <watchdog model='itco' action='reset'/>
  </devices>
</domain>`;

Deno.test("domain: reads name, disks, boot files, arch and os", () => {
  const doc = parseDomainXml(XML);
  assert.equal(domainName(doc), "debian12");
  assert.deepEqual(fileDisks(doc).map((d) => [d.device, d.target, d.path, d.format]), [
    ["disk", "vda", "/var/lib/libvirt/images/debian12.qcow2", "qcow2"],
    ["cdrom", "sda", "/isos/install & more.iso", undefined],
  ]);
  assert.deepEqual(bootFiles(doc).map((b) => [b.kind, b.path]), [[
    "nvram",
    "/var/lib/libvirt/qemu/nvram/debian12_VARS.fd",
  ]]);
  assert.equal(ociArchitecture(doc), "amd64");
  assert.equal(ociOs(doc), "windows");
});

Deno.test("domain: anonymise drops uuid, MACs, itco watchdog, emulator, backingStore, id", () => {
  const doc = parseDomainXml(XML);
  anonymizeDomain(doc);
  const out = serializeDomainXml(doc);
  for (const gone of ["<uuid>", "52:54:00", "itco", "<emulator>", "backingStore", 'id="7"']) {
    assert.ok(!out.includes(gone), `${gone} should be gone`);
  }
  assert.match(out, /^<\?xml version="1.0" \?>\n<domain/);
  assert.ok(!/\n\s*\n/.test(out), "no blank lines where elements were removed");
});

Deno.test("domain: import rewrites names into the VM folder", () => {
  const doc = parseDomainXml(
    XML.replace("/var/lib/libvirt/images/debian12.qcow2", "debian12.qcow2")
      .replace("/isos/install &amp; more.iso", "install.iso")
      .replace("/var/lib/libvirt/qemu/nvram/debian12_VARS.fd", "debian12_VARS.fd"),
  );
  prepareImportedDomain(doc, {
    name: "sha256:abc",
    vmFolder: "/vms/sha256:abc",
    domainType: "qemu",
  });
  const out = serializeDomainXml(doc);
  assert.match(out, /<name>sha256:abc<\/name>/);
  assert.match(out, /type="qemu"/);
  assert.match(out, /file="\/vms\/sha256:abc\/debian12.qcow2"/);
  assert.match(out, /file="\/vms\/sha256:abc\/install.iso"/);
  assert.match(out, /<nvram>\/vms\/sha256:abc\/debian12_VARS.fd<\/nvram>/);
  assert.match(out, /path="\/vms\/sha256:abc\/serial-debian12-serial.log"/);
  assert.match(out, /\/usr\/share\/OVMF\/OVMF_CODE.fd/, "host firmware stays a host reference");
});

function refusal(xml: string): string {
  try {
    prepareImportedDomain(parseDomainXml(xml), { name: "x", vmFolder: "/vms/x" });
  } catch (e) {
    assert.ok(e instanceof SardeError && e.kind === "usage");
    return e.message;
  }
  return "";
}

const wrap = (devices: string, os = "") =>
  `<domain type='qemu'><name>x</name><os><type>hvm</type>${os}</os><devices>${devices}</devices></domain>`;

Deno.test("domain: hostile XML is refused with a clear message", () => {
  const cases: [string, RegExp][] = [
    // Bypasses found in review: repeated sections, '..', network backends, open ports, hidden names.
    [
      `<domain type='qemu'><name>x</name><devices/><devices><disk type='block'><source dev='/dev/sda'/><target dev='vdb'/></disk></devices></domain>`,
      /<devices> appears 2 times/,
    ],
    [
      wrap("", "<loader readonly='no' type='pflash'>/usr/share/../../var/lib/o/d.qcow2</loader>"),
      /not host firmware/,
    ],
    [wrap("", "<nvram template='/usr/share/../../etc/shadow'>v.fd</nvram>"), /not under/],
    [
      wrap(
        "",
        "<nvram type='network'><source protocol='nbd' name='x'><host name='h'/></source></nvram>",
      ),
      /network storage/,
    ],
    [
      wrap(`<interface type='server'><source address='0.0.0.0' port='5558'/></interface>`),
      /opens host ports/,
    ],
    [
      wrap(`<disk type='file'><source file='.sarde-import.json'/><target dev='vda'/></disk>`),
      /outside the image/,
    ],
    [
      wrap(
        `<video><model type='virtio'><acceleration accel3d='yes' rendernode='/dev/dri/renderD128'/></model></video>`,
      ),
      /outside the VM folder/,
    ],
    [
      wrap(`<audio id='1' type='file' path='/usr/share/../../root/x.wav'/>`),
      /outside the VM folder/,
    ],
    [
      wrap(`<disk type='file'><source file='../../etc/shadow'/><target dev='vda'/></disk>`),
      /outside the image/,
    ],
    [
      wrap(`<disk type='file'><source file='/etc/shadow'/><target dev='vda'/></disk>`),
      /outside the image/,
    ],
    [wrap(`<disk type='block'><source dev='/dev/sda'/><target dev='vda'/></disk>`), /host storage/],
    [
      wrap(
        `<disk type='network'><source protocol='nbd' name='x'><host name='h'/></source><target dev='vda'/></disk>`,
      ),
      /host storage/,
    ],
    [wrap(`<hostdev mode='subsystem' type='pci'/>`), /host resources/],
    [
      wrap(`<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>`),
      /host resources/,
    ],
    [wrap(`<serial type='dev'><source path='/dev/ttyS0'/></serial>`), /host device/],
    [wrap(`<interface type='direct'><source dev='eth0'/></interface>`), /host devices/],
    [wrap("", "<kernel>/boot/vmlinuz</kernel>"), /<kernel> uses a path outside/],
    [wrap("", "<loader>/tmp/evil.fd</loader>"), /not host firmware/],
    [
      `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>x</name><qemu:commandline><qemu:arg value='-x'/></qemu:commandline></domain>`,
      /raw arguments to QEMU/,
    ],
    [
      wrap(`<rng model='virtio'><backend model='random'>/dev/sda</backend></rng>`),
      /not a random device/,
    ],
    [
      wrap(
        `<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>`,
      ),
      /host TPM/,
    ],
    [
      wrap(
        `<video><model type='vga'/></video><memory model='nvdimm'><source><path>/dev/pmem0</path></source></memory>`,
      ),
      /outside the VM folder/,
    ],
  ];
  for (const [xml, expected] of cases) {
    const msg = refusal(xml);
    assert.match(msg, expected, xml);
    assert.match(msg, /refusing to import/);
  }
  // --allow-host-resources lets a trusted image through.
  const doc = parseDomainXml(wrap(`<hostdev mode='subsystem' type='pci'/>`));
  prepareImportedDomain(doc, { name: "x", vmFolder: "/vms/x", allowHostResources: true });
});

Deno.test("domain: malformed XML and non-domain documents are usage errors", () => {
  assert.throws(() => parseDomainXml("<domain><name>x</domain>"), /not valid XML/);
  assert.throws(() => parseDomainXml("<network/>"), /not a libvirt <domain>/);
  assert.throws(() => parseDomainXml(""), SardeError);
});

Deno.test("vmconfig: the sardine schema is enforced with every problem named", () => {
  const ok = {
    users: [{ username: "vagrant", password: "vagrant" }],
    services: [{ service: "ssh", port: 22, protocol: "tcp" }],
    extra: 1,
  };
  assert.deepEqual(validateVmConfig(ok, "vm.json"), ok);
  assert.throws(
    () =>
      validateVmConfig({
        users: [{ username: 1 }],
        services: [{ service: "ssh", port: 70000, protocol: "sctp" }],
      }, "vm.json"),
    (e: unknown) =>
      e instanceof SardeError && e.kind === "usage" && /users\[0\]\.username/.test(e.message) &&
      /users\[0\]\.password/.test(e.message) && /port must be/.test(e.message) &&
      /protocol/.test(e.message),
  );
  assert.throws(() => validateVmConfig([], "vm.json"), /must be a JSON object/);
});

const SIZED = `<domain type='kvm'>
  <name>sized</name>
  <memory unit='GiB'>2</memory>
  <currentMemory unit='MiB'>1024</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <vcpus>
    <vcpu id='0' enabled='yes'/>
    <vcpu id='1' enabled='yes'/>
  </vcpus>
  <cputune>
    <vcpupin vcpu='0' cpuset='1'/>
    <vcpupin vcpu='3' cpuset='2'/>
  </cputune>
  <cpu mode='host-model'>
    <topology sockets='1' dies='1' cores='2' threads='2'/>
  </cpu>
  <devices/>
</domain>`;

Deno.test("setVmSize: vcpus and memory, with what would contradict them", () => {
  const doc = parseDomainXml(SIZED);
  setVmSize(doc, { vcpus: 3, memoryBytes: 3 * 1024 ** 3 });
  const out = serializeDomainXml(doc);
  assert.match(out, /<vcpu placement="static">3<\/vcpu>/, out);
  assert.match(out, /<memory unit="KiB">3145728<\/memory>/, out);
  assert.match(out, /<currentMemory unit="KiB">3145728<\/currentMemory>/, out);
  assert.doesNotMatch(out, /<vcpus>|<topology|vcpu="3"/, out);
  assert.match(out, /<vcpupin vcpu="0" cpuset="1"\/>/, "pins of remaining CPUs stay");
  assert.match(out, /<cpu mode="host-model">/, "the CPU model stays");

  // Only what is given changes; missing elements are created; 1 byte more is a whole KiB.
  const bare = parseDomainXml("<domain><name>b</name></domain>");
  setVmSize(bare, { memoryBytes: 64 * 1024 * 1024 + 1 });
  const b = serializeDomainXml(bare);
  assert.match(b, /<memory unit="KiB">65537<\/memory>/, b);
  assert.doesNotMatch(b, /<vcpu|currentMemory/, b);
  const keep = parseDomainXml(SIZED);
  setVmSize(keep, {});
  assert.equal(serializeDomainXml(keep), serializeDomainXml(parseDomainXml(SIZED)));
});

Deno.test("setVmSize: a guest NUMA topology or memory above maxMemory is refused", () => {
  const numa = parseDomainXml(
    "<domain><vcpu>2</vcpu><cpu><numa><cell id='0' cpus='0-1' memory='1' unit='GiB'/></numa>" +
      "</cpu></domain>",
  );
  assert.throws(() => setVmSize(numa, { vcpus: 4 }), (e) => {
    assert.ok(e instanceof SardeError);
    assert.match(e.message, /NUMA/);
    return true;
  });
  const max = parseDomainXml(
    "<domain><maxMemory slots='4' unit='GiB'>4</maxMemory><memory>1048576</memory></domain>",
  );
  setVmSize(max, { memoryBytes: 4 * 1024 ** 3 });
  assert.throws(
    () => setVmSize(max, { memoryBytes: 5 * 1024 ** 3 }),
    /above the image's <maxMemory>/,
  );
});
