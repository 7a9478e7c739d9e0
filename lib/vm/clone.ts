/**
 * `sarde clone`: a new VM whose disks are qcow2 overlays on an imported base VM — O(1) in disk
 * size — with its own name, UUID, MAC addresses and NVRAM copy. The executor makes one per job.
 *
 * @module
 */

import { basename, extname, join } from "node:path";
import {
  anonymizeDomain,
  bootFiles,
  childElement,
  childElements,
  type DomainDoc,
  type FileDisk,
  fileDisks,
  parseDomainXml,
  removeElement,
  serializeDomainXml,
  setDomainName,
  setDomainType,
  setElementText,
} from "./domain.ts";
import { fail } from "../util/errors.ts";
import { exists, lockFile, touch, writeFileAtomic } from "../util/fsutil.ts";
import { IMPORT_MARKER, type ImportOptions, importVm, vmLockPath } from "./import.ts";
import {
  checkVmName,
  createTransient,
  defineXml,
  domainExists,
  domainUuid,
  dumpXml,
  start,
  undefine,
} from "./libvirt.ts";
import { debug } from "../util/log.ts";
import { createOverlay } from "./qemu.ts";
import { createNbdOverlay, holdLazySession } from "./lazy_pull.ts";

/** Marker file of a clone folder (what it was cloned from). */
export const CLONE_MARKER = ".sarde-clone.json";

/** Options for {@link cloneVm}. */
export interface CloneOptions extends Omit<ImportOptions, "name"> {
  /** Where clone folders go (default: `vmdir`). */
  clonedir?: string;
  /** Start the clone after defining it. */
  start?: boolean;
  /** Create a transient VM (started at once, gone when it stops); its folder stays for cleanup. */
  transient?: boolean;
  /** Last changes to the clone's XML before it is defined (the executor's networking). */
  editXml?: (doc: DomainDoc) => void;
}

/** What {@link cloneVm} made. */
export interface CloneResult {
  /** The clone's libvirt domain name. */
  name: string;
  /** The clone's libvirt domain UUID. */
  uuid: string;
  /** The clone's own folder (overlays, NVRAM copy, logs). */
  folder: string;
  /** The base VM it was cloned from. */
  base: string;
  /** The lazy session serving the base (its folder), when the clone reads the image over NBD. */
  lazySession?: string;
}

/**
 * Clones `source` — a defined VM, or a local image (imported first under its image ID) — into a
 * new VM `target`. Disks become overlays in `<clonedir>/<target>/`; cdroms and kernels are shared
 * read-only with the base.
 */
export async function cloneVm(
  source: string,
  target: string,
  options: CloneOptions,
): Promise<CloneResult> {
  checkVmName(target);
  // Refused before the base is imported: that can take minutes and many GB for nothing.
  if (await domainExists(target, options)) {
    throw fail(
      "usage",
      `a VM named '${target}' already exists`,
      "choose another name, or remove it first",
    );
  }
  let base = source;
  if (!await domainExists(source, options)) {
    base = (await importVm(source, options)).name;
  } else {
    await touch(join(options.vmdir, base, IMPORT_MARKER));
  }
  // A base a lazy pull serves: its server holds the base's name lock until the files are
  // complete, and stays (keeping the base from prune) while the clone's hold counts.
  const lazy = await holdLazySession(options.vmdir, base, target);
  // Held until the clone's domain exists: a prune (cache-budget of another job) takes this lock
  // exclusively before it removes an imported VM, and then sees the clone among its users.
  using _baseLock = lazy ? undefined : await lockFile(vmLockPath(options.vmdir, base), {
    shared: true,
  });
  if (!await domainExists(base, options)) {
    throw fail("not-found", `the VM ${base} was removed while it was being cloned`, "try again");
  }
  const folder = join(options.clonedir ?? options.vmdir, target);
  // The same per-name lock as import: a clone and an import of one name never race.
  using _lock = await lockFile(join(options.clonedir ?? options.vmdir, ".locks", `${target}.lock`));
  if (await exists(join(folder, IMPORT_MARKER))) {
    throw fail("usage", `${folder} belongs to an imported VM; choose another name`);
  }
  if (await exists(folder)) {
    // Only a folder this code made (its marker inside) is a leftover it may remove.
    if (!await exists(join(folder, CLONE_MARKER))) {
      throw fail(
        "usage",
        `${folder} exists and was not made by sarde clone`,
        "choose another name or clonedir",
      );
    }
    debug(`removing leftovers of an earlier clone in ${folder}`);
    await Deno.remove(folder, { recursive: true });
  }
  const doc = parseDomainXml(
    await dumpXml(base, { ...options, inactive: true }),
    `domain XML of ${base}`,
  );
  await Deno.mkdir(folder, { recursive: true, mode: 0o755 });
  let onNbd = false;
  /** Disks on NBD and their chain, which anonymizing would drop with the other backingStores. */
  const nbdChains: [FileDisk, FileDisk["element"][]][] = [];
  try {
    await writeFileAtomic(
      join(folder, CLONE_MARKER),
      JSON.stringify({ base, source }, null, 2) + "\n",
    );
    const used = new Set<string>();
    const unique = (name: string) => {
      let n = name;
      for (let i = 1; used.has(n); i++) n = `${basename(name, extname(name))}-${i}${extname(name)}`;
      used.add(n);
      return n;
    };
    for (const disk of fileDisks(doc)) {
      const readonly = childElement(disk.element, "readonly") !== undefined;
      if (disk.device === "cdrom" || disk.device === "floppy" || readonly) continue;
      const overlay = join(folder, unique(basename(disk.path)));
      // On the image's files over NBD, not on the lazy base's own overlay (lazy_pull.ts).
      const nbd = lazy !== undefined && await createNbdOverlay(overlay, disk);
      onNbd ||= nbd;
      if (!nbd) await createOverlay(overlay, disk.path, disk.format ?? "qcow2");
      disk.source.setAttribute("file", overlay);
      let driver = childElement(disk.element, "driver");
      if (!driver) {
        driver = doc.createElement("driver");
        driver.setAttribute("name", "qemu");
        disk.element.insertBefore(driver, disk.element.firstChild);
      }
      driver.setAttribute("type", "qcow2");
      if (nbd) {
        nbdChains.push([disk, childElements(disk.element, "backingStore")]);
        continue;
      }
      for (const bs of childElements(disk.element, "backingStore")) removeElement(bs);
    }
    if (!onNbd) await lazy?.release(); // the base went onto its local files meanwhile
    for (const bf of bootFiles(doc)) {
      if (bf.kind !== "nvram") continue;
      const copy = join(folder, unique(basename(bf.path)));
      await Deno.copyFile(bf.path, copy);
      setElementText(bf.element, copy);
    }
    const devs = childElement(doc.documentElement!, "devices");
    for (const el of devs ? childElements(devs) : []) {
      for (const src of childElements(el, "source")) {
        const p = src.getAttribute("path");
        if (p && ["serial", "console", "channel", "parallel"].includes(el.nodeName)) {
          src.setAttribute("path", join(folder, basename(p)));
        }
      }
      for (const log of childElements(el, "log")) {
        const p = log.getAttribute("file");
        if (p) log.setAttribute("file", join(folder, basename(p)));
      }
    }
    anonymizeDomain(doc);
    for (const [disk, chain] of nbdChains) {
      for (const bs of chain) disk.element.insertBefore(bs, disk.source.nextSibling);
    }
    setDomainName(doc, target);
    if (options.domainType) setDomainType(doc, options.domainType);
    options.editXml?.(doc);
    const xml = serializeDomainXml(doc);
    if (options.transient) {
      await createTransient(xml, options);
    } else {
      await defineXml(xml, options);
      if (options.start) {
        await start(target, options).catch(async (err) => {
          await undefine(target, { ...options, nvram: true }).catch(() => {});
          throw err;
        });
      }
    }
  } catch (err) {
    await Deno.remove(folder, { recursive: true }).catch(() => {});
    await lazy?.release();
    throw err;
  }
  return {
    name: target,
    uuid: await domainUuid(target, options),
    folder,
    base,
    lazySession: onNbd ? lazy?.dir : undefined,
  };
}
