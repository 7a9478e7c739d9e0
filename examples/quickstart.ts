/**
 * The quick-start demo: a real registry on 127.0.0.1, a generated image, and the `sarde` CLI
 * doing push → fetch → list, as a user would type it. Run through `examples/quickstart.sh`.
 */
import { join } from "node:path";
import { makeImage, tempDir } from "../tests/support/images.ts";
import { startRegistry } from "../tests/support/registry.ts";

const sardeBin = new URL("../bin/sarde", import.meta.url).pathname;

async function sarde(...args: string[]): Promise<string> {
  console.error(`\n$ sarde ${args.join(" ")}`);
  const out = await new Deno.Command(sardeBin, { args, stdout: "piped", stderr: "inherit" })
    .output();
  const stdout = new TextDecoder().decode(out.stdout);
  Deno.stdout.writeSync(out.stdout);
  if (!out.success) throw new Error(`sarde ${args[0]} failed with exit code ${out.code}`);
  return stdout;
}

const work = await tempDir("quickstart");
try {
  await using registry = await startRegistry("plain");
  console.error(`registry: ${registry.url} (storage ${registry.dataDir})`);
  const image = `${registry.host}/sardines/demo:latest`;
  const exported = join(work, "exported");
  const made = await makeImage(exported, image, [
    { size: 8 << 20, kind: "random", mediaType: "application/x-qemu-disk+zstd" },
    { size: 16 << 20, kind: "text", mediaType: "application/x-qemu-disk+zstd" },
  ]);
  console.error(`generated ${image} (image ID ${made.configDigest}) in ${exported}`);

  await sarde("push", "--ocidir", exported, image);
  const store = join(work, "store");
  await sarde("fetch", "--ocidir", store, image);
  await sarde("list", "--ocidir", store);
  await sarde("getconfig", "--ocidir", store, image);
  console.error("\nquick start OK: pushed, fetched back byte for byte (digests verified), listed.");
} finally {
  await Deno.remove(work, { recursive: true });
}
