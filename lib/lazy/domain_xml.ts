/**
 * The libvirt domain XML that points a disk's backing chain at NBD exports, so QEMU reads the
 * layers of a lazily pulled image through sarde's server instead of from local files.
 *
 * @module
 */

/** One layer of a backing chain served over NBD. */
export interface NbdBackingLayer {
  /** The server's UNIX socket (absolute path). */
  socketPath: string;
  /** The export's name on that socket. */
  exportName: string;
  /** The layer's image format, as QEMU must open it (`qcow2`, `raw`). */
  format: string;
}

/**
 * The nested `<backingStore type='network'>` elements of a disk whose backing chain is `chain`
 * (the disk's direct backing first, the base last), ending with an empty `<backingStore/>`.
 * Put it inside the `<disk>`, after its `<source>`: libvirt (9.0, QEMU 7.2 measured) then opens
 * each layer from its NBD export and ignores the backing names recorded inside the qcow2 files,
 * so the overlay may keep the image's plain names.
 *
 * ```xml
 * <backingStore type='network'>
 *   <format type='qcow2'/>
 *   <source protocol='nbd' name='EXPORT'><host transport='unix' socket='PATH'/></source>
 *   <backingStore/>
 * </backingStore>
 * ```
 */
export function nbdBackingStoreXml(chain: readonly NbdBackingLayer[], indent = ""): string {
  if (chain.length === 0) return `${indent}<backingStore/>`;
  const [layer, ...rest] = chain;
  const inner = indent + "  ";
  return [
    `${indent}<backingStore type='network'>`,
    `${inner}<format type='${escape(layer.format)}'/>`,
    `${inner}<source protocol='nbd' name='${escape(layer.exportName)}'>`,
    `${inner}  <host transport='unix' socket='${escape(layer.socketPath)}'/>`,
    `${inner}</source>`,
    nbdBackingStoreXml(rest, inner),
    `${indent}</backingStore>`,
  ].join("\n");
}

function escape(s: string): string {
  return s.replace(/[&<>'"]/g, (c) => `&#${c.charCodeAt(0)};`);
}
