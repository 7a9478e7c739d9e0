/**
 * What `sarde` prints: results on stdout (names, digests, JSON, for scripts), the human summaries
 * that go to the log on stderr.
 *
 * @module
 */

import type * as sarde from "../mod.ts";
import { formatBytes } from "../lib/util/progress.ts";
import type { ImportCli } from "./common.ts";

/** Writes a result to stdout. */
export const out = (text: string): void => {
  Deno.stdout.writeSync(new TextEncoder().encode(text));
};

/** One line on what a fetch or push moved: `pushed sha256:…: 3 blobs (1.2 GiB), 1 already there`. */
export function summary(verb: string, r: sarde.TransferResult): string {
  const moved = r.blobsTransferred
    ? `${r.blobsTransferred} blobs (${formatBytes(r.blobBytes)})`
    : "no blobs";
  const mounted = r.blobsMounted ? `, ${r.blobsMounted} mounted from another repository` : "";
  return `${verb} ${r.digest}: ${moved}${mounted}, ${r.blobsSkipped} already there`;
}

/** Prints the VM that `import` or `pull` defined: its name, or its UUID with `--print-uuid`. */
export function printImported(r: sarde.ImportResult, o: ImportCli): void {
  out(`${o.printUuid ? r.uuid : r.name}\n`);
}
