/**
 * libvirt VMs and images: virsh and qemu-img, the domain XML (anonymised on export, made safe on
 * import), export, atomic import, pull (import behind the download), clone, rm/prune.
 *
 * Private to this folder (not re-exported): `qemu.ts`.
 *
 * @module
 */

export * from "./clone.ts";
export * from "./domain.ts";
export * from "./export.ts";
export * from "./export_push.ts";
export * from "./import.ts";
export * from "./lazy_pull.ts";
export * from "./libvirt.ts";
export * from "./prune.ts";
export * from "./pull.ts";
