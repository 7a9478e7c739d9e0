/**
 * lib/util/fsutil.ts: what the lazy server's commit relies on to know that no QEMU has an overlay
 * open (lib/vm/lazy_pull.ts, finalize).
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { processesHolding } from "../lib/util/fsutil.ts";

Deno.test("processesHolding finds a process holding a file open, also after a rename", async () => {
  const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "sarde-fsutil-" });
  try {
    const file = join(dir, "overlay.qcow2");
    await Deno.writeTextFile(file, "x");
    assert.deepEqual(await processesHolding(file), []);
    // a process with the file open on a descriptor (as QEMU holds a disk), and the file renamed
    // away under it, as finalize does
    const holder = new Deno.Command("sh", {
      args: ["-c", 'exec 3<"$1"; echo ready; exec sleep 60', "sh", file],
      stdout: "piped",
    }).spawn();
    try {
      const reader = holder.stdout.getReader();
      await reader.read(); // "ready": the descriptor is open
      reader.releaseLock();
      const moved = `${file}.committing`;
      await Deno.rename(file, moved);
      assert.deepEqual(await processesHolding(moved), [holder.pid]);
    } finally {
      holder.kill("SIGKILL");
      await holder.status;
      await holder.stdout.cancel().catch(() => {});
    }
    assert.deepEqual(await processesHolding(`${file}.committing`), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
