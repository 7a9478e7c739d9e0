/**
 * The libvirt path of lazy pull: the tiny guest boots under `qemu:///system` from a local qcow2
 * overlay whose backing layer QEMU reads from sarde's NBD server (lib/lazy), as the domain XML's
 * nested `<backingStore type='network'>` (nbdBackingStoreXml) tells it to.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import {
  type BlockSource,
  LIBVIRT_NBD_RECONNECT,
  NBD_RECONNECT_DELAY_S,
  nbdBackingStoreXml,
  nbdReconnectDelay,
  type NbdServer,
  openFileSource,
  serveNbd,
} from "../lib/lazy/mod.ts";
import { ensureGuest, freePort, guestDomainXml, sshRun, waitForSsh } from "./support/guest.ts";
import {
  cleanupTestVm,
  ensureLibvirtd,
  makeVmDir,
  removeVmDir,
  sh,
  uniqueVmName,
  virsh,
  virshDefine,
} from "./support/vms.ts";

const MiB = 1024 * 1024;

Deno.test("nbdBackingStoreXml nests one network backingStore per layer, escaped", () => {
  const xml = nbdBackingStoreXml([
    { socketPath: "/run/s'1", exportName: "top&1", format: "qcow2" },
    { socketPath: "/run/s2", exportName: "base", format: "raw" },
  ]);
  const compact = xml.replace(/\n\s*/g, "");
  assert.equal(
    compact,
    "<backingStore type='network'><format type='qcow2'/>" +
      "<source protocol='nbd' name='top&#38;1'><host transport='unix' socket='/run/s&#39;1'/></source>" +
      "<backingStore type='network'><format type='raw'/>" +
      "<source protocol='nbd' name='base'><host transport='unix' socket='/run/s2'/></source>" +
      "<backingStore/></backingStore></backingStore>",
  );
});

Deno.test("nbdBackingStoreXml: <reconnect delay> in each source from libvirt 9.2, none before", () => {
  const chain = (version: number) =>
    nbdBackingStoreXml([
      { socketPath: "/s", exportName: "top", format: "qcow2" },
      { socketPath: "/s", exportName: "base", format: "raw" },
    ].map((l) => ({ ...l, reconnectDelay: nbdReconnectDelay(version) })));
  assert.equal(LIBVIRT_NBD_RECONNECT, 9_002_000);
  // 9.0 (this machine) and 9.1 refuse the element: none at all
  for (const old of [9_000_000, 9_001_000]) assert.doesNotMatch(chain(old), /reconnect/);
  for (const v of [9_002_000, 10_000_000]) {
    const compact = chain(v).replace(/\n\s*/g, "");
    const source = (name: string) =>
      `<source protocol='nbd' name='${name}'><host transport='unix' socket='/s'/>` +
      `<reconnect delay='${NBD_RECONNECT_DELAY_S}'/></source>`;
    assert.ok(compact.includes(source("top")), compact);
    assert.ok(compact.includes(source("base")), compact);
  }
});

Deno.test("lazy boot: the tiny guest boots to SSH with its root disk's backing read over NBD", async () => {
  const g = await ensureGuest();
  await ensureLibvirtd();
  const dir = await makeVmDir("lazy-boot");
  const name = uniqueVmName("sarde-lazy");
  await using file = await openFileSource(g.rootfs);
  // What the guest reads through the export: the number the lazy pull's design lives on.
  let bytes = 0;
  let requests = 0;
  const regions = new Set<number>();
  const counted: BlockSource = {
    size: file.size,
    read(offset, length) {
      bytes += length;
      requests++;
      for (let r = Math.floor(offset / MiB); r <= Math.floor((offset + length - 1) / MiB); r++) {
        regions.add(r);
      }
      return file.read(offset, length);
    },
  };
  const socket = join(dir, "nbd", "layers.sock");
  let server: NbdServer | undefined;
  try {
    server = await serveNbd({ socketPath: socket, exports: { rootfs: counted } });
    // The overlay records only a plain name that does not exist here (like an imported image's
    // layers): the boot can only work if QEMU follows the XML's NBD backing instead.
    const info = JSON.parse(await sh("qemu-img", ["info", "--output=json", g.rootfs]));
    const overlay = join(dir, "root.qcow2");
    const create = "create -q -f qcow2 -F qcow2 -b rootfs.qcow2 -u".split(" ");
    await sh("qemu-img", [...create, overlay, String(info["virtual-size"])]);
    const port = freePort();
    const serialLog = join(dir, "console.log");
    const plain = guestDomainXml({
      name,
      dir,
      rootDisk: overlay,
      sshPort: port,
      kernel: g.kernel,
      initrd: g.initrd,
      serialLog,
    });
    const sourceLine = `<source file='${overlay}'/>`;
    assert.ok(plain.includes(sourceLine));
    const backing = nbdBackingStoreXml([
      { socketPath: socket, exportName: "rootfs", format: "qcow2" },
    ], "      ");
    await virshDefine(plain.replace(sourceLine, `${sourceLine}\n${backing}`), undefined, dir);

    const started = await virsh("start", name);
    assert.equal(started.code, 0, started.stderr);
    const sshMs = await waitForSsh({ port, key: g.privateKey, timeoutMs: 120_000, serialLog });
    console.log(
      `lazy boot: SSH after ${(sshMs / 1000).toFixed(1)} s; the guest read ${
        (bytes / MiB).toFixed(1)
      } MiB of ${(file.size / MiB).toFixed(1)} MiB through NBD in ${requests} requests, ` +
        `${regions.size} distinct 1-MiB regions`,
    );
    assert.ok(bytes > 0);

    // the guest works on it: reads its root file system, writes go to the local overlay
    // ssh's own failures (255: a banner late on a loaded machine) are retried, not the script's
    let r = { code: 255, stdout: "", stderr: "" };
    for (let i = 0; i < 5 && r.code === 255; i++) {
      r = await sshRun(
        { port, key: g.privateKey },
        "grep ' / ' /proc/mounts && echo lazy > /root/lazy.txt && sync && cat /root/lazy.txt",
      );
    }
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^\/dev\/vda \/ ext4 rw/m);
    assert.match(r.stdout, /^lazy$/m);
    const live = await virsh("dumpxml", name);
    assert.match(live.stdout, /<source protocol='nbd' name='rootfs'[ >]/);
  } finally {
    await cleanupTestVm(name); // the VM lets go of its disk before the server goes away
    await server?.close();
    await removeVmDir(dir);
  }
});
