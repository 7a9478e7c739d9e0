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
  /**
   * Seconds QEMU holds the guest's requests after the connection to the server is lost, while it
   * reconnects (`<reconnect delay='N'/>`, libvirt 9.2 and later: see {@link nbdReconnectDelay});
   * absent: no element.
   */
  reconnectDelay?: number;
}

/**
 * How long QEMU waits for a restarted lazy server before failing the guest's requests: long
 * enough for the next `sarde pull` or job to start the server again on a loaded host, short
 * enough that a guest's own I/O timeouts (Linux virtio-blk has none, Windows' storport ~60 s) do
 * not fire first.
 */
export const NBD_RECONNECT_DELAY_S = 30;

/** The first libvirt that takes `<reconnect delay='N'/>` in an NBD disk `<source>` (9.2.0). */
export const LIBVIRT_NBD_RECONNECT = 9_002_000;

/**
 * The `reconnectDelay` to give NBD layers on libvirt `version` (libvirt's number, 9.2.0 →
 * 9002000): {@link NBD_RECONNECT_DELAY_S} from 9.2 on; `undefined` before, where libvirt refuses
 * the element. Without it QEMU still reconnects by itself on the next request after the server
 * is back, but the requests made while it is away fail (the guest sees I/O errors).
 */
export function nbdReconnectDelay(version: number): number | undefined {
  return version >= LIBVIRT_NBD_RECONNECT ? NBD_RECONNECT_DELAY_S : undefined;
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
    ...layer.reconnectDelay === undefined
      ? []
      : [`${inner}  <reconnect delay='${Math.round(layer.reconnectDelay)}'/>`],
    `${inner}</source>`,
    nbdBackingStoreXml(rest, inner),
    `${indent}</backingStore>`,
  ].join("\n");
}

function escape(s: string): string {
  return s.replace(/[&<>'"]/g, (c) => `&#${c.charCodeAt(0)};`);
}
