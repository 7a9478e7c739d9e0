/**
 * Test images: OCI layouts generated on the fly (random or compressible layers of any size),
 * written straight into a sarde store the way `sarde export` will.
 *
 * @module
 */

import { join } from "node:path";
import { digestFile } from "../../lib/oci/digest.ts";
import {
  addToIndex,
  blobPath,
  openLayout,
  readIndex,
  writeBlob,
  writeIndex,
} from "../../lib/oci/layout.ts";
import { type Descriptor, MediaType } from "../../lib/oci/types.ts";
import { parseReference } from "../../lib/oci/reference.ts";
import { layoutDir } from "../../lib/oci/store.ts";
import { type ProxyTarget, type RunningProxy, startFaultyProxy } from "./proxy.ts";

/** One layer to generate: random bytes (incompressible) or repetitive text (compressible). */
export interface LayerSpec {
  size: number;
  kind?: "random" | "text";
  mediaType?: string;
}

/** What {@link makeImage} produced. */
export interface MadeImage {
  dir: string;
  manifestDigest: string;
  configDigest: string;
  layers: Descriptor[];
}

/** Writes `size` bytes of the given kind to `path` with external tools (fast, no memory). */
export async function generateFile(
  path: string,
  size: number,
  kind: "random" | "text" = "random",
): Promise<void> {
  const source = kind === "random"
    ? "head -c $1 /dev/urandom"
    : "yes 'sarde compressible test line 0123456789' | head -c $1";
  const out = await new Deno.Command("sh", {
    args: ["-c", `${source} > "$2"`, "sh", String(size), path],
  }).output();
  if (!out.success) {
    throw new Error(`cannot generate ${path}: ${new TextDecoder().decode(out.stderr)}`);
  }
}

/** Creates an image `name:tag` in `ocidir` with a vmconfig layer and the given disk layers. */
export async function makeImage(
  ocidir: string,
  reference: string,
  layers: LayerSpec[],
): Promise<MadeImage> {
  const ref = parseReference(reference);
  const layout = await openLayout(layoutDir(ocidir, ref), { create: true });
  const vmconfig = await writeBlob(
    layout,
    new TextEncoder().encode(
      JSON.stringify({ users: [{ username: "root", password: "sarde" }] }, null, 2),
    ),
    MediaType.sardineConfig,
  );
  const disk: Descriptor[] = [];
  for (const [i, spec] of layers.entries()) {
    const tmp = join(layout.dir, "blobs", "sha256", `.gen-${i}-${crypto.randomUUID()}`);
    await generateFile(tmp, spec.size, spec.kind);
    const { digest, size } = await digestFile(tmp);
    await Deno.rename(tmp, blobPath(layout, digest));
    disk.push({ mediaType: spec.mediaType ?? "application/x-qemu-disk+zstd", digest, size });
  }
  const config = await writeBlob(
    layout,
    new TextEncoder().encode(JSON.stringify(
      {
        architecture: "amd64",
        os: "linux",
        rootfs: { type: "layers", diff_ids: [vmconfig.digest, ...disk.map((d) => d.digest)] },
        history: [],
      },
      null,
      2,
    )),
    MediaType.ociConfig,
  );
  const manifest = await writeBlob(
    layout,
    new TextEncoder().encode(JSON.stringify(
      {
        schemaVersion: 2,
        mediaType: MediaType.ociManifest,
        config,
        layers: [vmconfig, ...disk],
      },
      null,
      2,
    )),
    MediaType.ociManifest,
  );
  await writeIndex(layout, addToIndex(await readIndex(layout), manifest, ref.tag ?? "latest"));
  return {
    dir: layout.dir,
    manifestDigest: manifest.digest,
    configDigest: config.digest,
    layers: [vmconfig, ...disk],
  };
}

/** All regular files below `dir` (relative paths), for "nothing half-written" checks. */
export async function listFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string, prefix: string) => {
    for await (const e of Deno.readDir(d)) {
      if (e.isDirectory) await walk(join(d, e.name), `${prefix}${e.name}/`);
      else out.push(`${prefix}${e.name}`);
    }
  };
  try {
    await walk(dir, "");
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  return out.sort();
}

/** A fresh temp folder under /var/tmp (not /root: libvirt's qemu user must reach VM files later). */
export function tempDir(prefix: string): Promise<string> {
  return Deno.makeTempDir({ dir: "/var/tmp", prefix: `sarde-test-${prefix}-` });
}

/** Runs a program and returns its result; throws with stderr when `check` and it fails. */
export async function run(
  cmd: string,
  args: string[],
  options: { check?: boolean; stdin?: string; env?: Record<string, string> } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const child = new Deno.Command(cmd, {
    args,
    stdin: options.stdin !== undefined ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
    env: options.env,
  }).spawn();
  if (options.stdin !== undefined) {
    const w = child.stdin.getWriter();
    await w.write(new TextEncoder().encode(options.stdin));
    await w.close();
  }
  const out = await child.output();
  const result = {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
  if (options.check && result.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} failed (${result.code}): ${result.stderr}`);
  }
  return result;
}

/** Path of the `sarde` launcher (or `SARDE_BIN`, e.g. the bundled build). */
export const SARDE = Deno.env.get("SARDE_BIN") ??
  new URL("../../bin/sarde", import.meta.url).pathname;

/** Runs the sarde CLI as a user would. */
export function sarde(
  args: string[],
  options: { stdin?: string; env?: Record<string, string> } = {},
) {
  return run(SARDE, args, options);
}

/** A sarde process started by {@link spawnSarde}. */
export interface SardeProcess {
  child: Deno.ChildProcess;
  /** Resolves with stderr so far once it matches `re`; rejects if the process ends first. */
  stderrMatches(re: RegExp): Promise<string>;
  /** Waits for the end: exit code and all output. */
  done(): Promise<{ code: number; stdout: string; stderr: string }>;
}

/** Starts the sarde CLI without waiting for it (to act while it runs). */
export function spawnSarde(
  args: string[],
  options: { env?: Record<string, string> } = {},
): SardeProcess {
  const child = new Deno.Command(SARDE, {
    args,
    env: options.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stdout = new Response(child.stdout).text();
  let stderr = "";
  const waiters: { re: RegExp; resolve: (s: string) => void }[] = [];
  const drained = (async () => {
    for await (const piece of child.stderr.pipeThrough(new TextDecoderStream())) {
      stderr += piece;
      for (const w of waiters.filter((w) => w.re.test(stderr))) w.resolve(stderr);
    }
  })();
  return {
    child,
    stderrMatches: (re) =>
      re.test(stderr) ? Promise.resolve(stderr) : new Promise<string>((resolve, reject) => {
        waiters.push({ re, resolve });
        drained.then(() => reject(new Error(`sarde ${args[0]} ended without ${re}: ${stderr}`)));
      }),
    async done() {
      const { code } = await child.status;
      await drained;
      return { code, stdout: await stdout, stderr };
    },
  };
}

/** Polls `condition` every 50 ms until it holds; fails after `timeoutMs` (generous: a stuck test). */
export async function until(
  condition: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 120_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!await condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * A proxy in front of `registry` whose blob downloads stop after 1 MiB until `release()`: a
 * transfer surely in flight while a test acts.
 */
export async function startPausingProxy(
  registry: ProxyTarget,
): Promise<RunningProxy & { release(): void }> {
  const gate = Promise.withResolvers<void>();
  const proxy = await startFaultyProxy(registry, {
    kind: "pause-blob",
    afterBytes: 1 << 20,
    until: gate.promise,
  });
  return Object.assign(proxy, { release: () => gate.resolve() });
}
