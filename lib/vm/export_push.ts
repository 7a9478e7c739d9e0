/**
 * `sarde export --push`: export a VM and push it at the same time, each disk chunk uploaded as
 * soon as it is compressed, so the whole takes about as long as the slower of the two instead of
 * their sum.
 *
 * @module
 */

import { type ExportOptions, type ExportResult, exportVm } from "./export.ts";
import { parseReference, type Reference } from "../oci/reference.ts";
import { type PushOptions, startPushSession, type TransferResult } from "../transfer/transfer.ts";

/** What {@link exportAndPush} did: the export, and the push. */
export interface ExportAndPushResult extends ExportResult {
  pushed: TransferResult;
}

/**
 * Exports the libvirt VM `vm` into the store as `reference` and pushes it to `target` (usually
 * the same reference), uploading chunks while later ones are still being compressed. A failed
 * upload stops the export at once and is the error thrown; a failed export stops the uploads.
 */
export async function exportAndPush(
  vm: string,
  reference: string,
  target: Reference,
  options: { export: Omit<ExportOptions, "onBlob">; push: PushOptions },
): Promise<ExportAndPushResult> {
  const stop = new AbortController();
  let uploadFailure: { error: unknown } | undefined;
  const session = startPushSession(target, options.push, (error) => {
    uploadFailure = { error };
    stop.abort();
  });
  const signal = options.export.signal;
  try {
    const r = await exportVm(vm, reference, {
      ...options.export,
      signal: signal ? AbortSignal.any([signal, stop.signal]) : stop.signal,
      onBlob: (layout, blob) => session.add(layout, blob),
    });
    return { ...r, pushed: await session.finish(parseReference(r.reference)) };
  } catch (err) {
    session.abort();
    throw uploadFailure?.error ?? err;
  }
}
