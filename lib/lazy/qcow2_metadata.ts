/**
 * Boot metadata first (docs/lazy-pull.md, part 3): what QEMU reads of a qcow2 file before and
 * while a guest boots, whatever the guest does — the header cluster, the L1 table, the refcount
 * table and every L2 table. L2 tables are spread through the file (one per 512 MiB of disk with
 * 64 KiB clusters), each in a different frame, so a booting guest otherwise waits for them one
 * ranged GET at a time. Layout from QEMU's docs/interop/qcow2.txt: big-endian fields, the header
 * at the start of the first cluster.
 *
 * @module
 */

import type { ByteRange, LazyFile } from "./source.ts";

const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
/** Bits 9–55 of an L1 entry: the L2 table's offset (bit 63 is a flag). */
const L1E_OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
/** QEMU's own limit on the L1 table (QCOW_MAX_L1_SIZE): a hostile header cannot ask more. */
const MAX_L1_BYTES = 32 << 20;
/** Likewise for the refcount table (QCOW_MAX_REFTABLE_SIZE). */
const MAX_REFTABLE_BYTES = 8 << 20;

/** A 64-bit field as a number; `undefined` when it cannot be an offset in a file. */
function offsetAt(view: DataView, at: number): number | undefined {
  const v = view.getBigUint64(at);
  return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : undefined;
}

/**
 * Makes the qcow2 metadata of `lf` present, at the prefetch's low priority (demand reads first):
 * the header's cluster, then the L1 and refcount tables, then the L2 tables the L1 table lists,
 * in file order. Returns the ranges it asked for; none when the file is no qcow2 (or its header
 * makes no sense: the guest will see that, not this). Ranges outside the file are left out.
 */
export async function prefetchQcow2Metadata(
  lf: LazyFile,
  signal?: AbortSignal,
): Promise<ByteRange[]> {
  const asked: ByteRange[] = [];
  const fetch = async (ranges: ByteRange[]) => {
    const inside = ranges.filter((r) => r.length > 0 && r.offset + r.length <= lf.size);
    await lf.prefetch(signal, inside);
    asked.push(...inside);
  };
  if (lf.size < 104) return asked;
  await fetch([{ offset: 0, length: 104 }]);
  const head = await lf.read(0, 104);
  const h = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const clusterBits = h.getUint32(20);
  if (h.getUint32(0) !== QCOW2_MAGIC || clusterBits < 9 || clusterBits > 21) return asked;
  const cluster = 2 ** clusterBits;
  const l1Bytes = h.getUint32(36) * 8;
  const l1 = offsetAt(h, 40);
  const reftable = offsetAt(h, 48);
  const reftableBytes = h.getUint32(56) * cluster;
  await fetch([
    { offset: 0, length: Math.min(cluster, lf.size) },
    ...(l1 !== undefined && l1Bytes <= MAX_L1_BYTES ? [{ offset: l1, length: l1Bytes }] : []),
    ...(reftable !== undefined && reftableBytes <= MAX_REFTABLE_BYTES
      ? [{ offset: reftable, length: reftableBytes }]
      : []),
  ]);
  if (l1 === undefined || l1Bytes === 0 || l1Bytes > MAX_L1_BYTES || l1 + l1Bytes > lf.size) {
    return asked;
  }
  const table = await lf.read(l1, l1Bytes);
  const t = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const l2: number[] = [];
  for (let at = 0; at < l1Bytes; at += 8) {
    const offset = Number(t.getBigUint64(at) & L1E_OFFSET_MASK);
    if (offset > 0) l2.push(offset);
  }
  l2.sort((a, b) => a - b);
  await fetch(l2.map((offset) => ({ offset, length: cluster })));
  return asked;
}
