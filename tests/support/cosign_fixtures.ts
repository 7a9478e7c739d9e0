/**
 * containers/image's signature test fixtures (cosign-made signatures, payloads, `cosign.pub`), from
 * the Debian package `golang-github-containers-image-dev`: `apt-get download`ed (nothing is
 * installed) and unpacked with `dpkg-deb -x` into `/var/tmp/sarde-cosign-fixtures` (or
 * `SARDE_COSIGN_FIXTURES_DIR`) once, under a lock, so that sarde is checked against signatures
 * that real cosign made and against the outcomes upstream's own tests expect.
 *
 * @module
 */

import { join } from "node:path";
import type { UntrustedSignature } from "../../lib/trust/signature.ts";

const PACKAGE = "golang-github-containers-image-dev";
const FIXTURES = "usr/share/gocode/src/github.com/containers/image/signature/fixtures";

async function run(cmd: string, args: string[], cwd?: string): Promise<string> {
  const out = await new Deno.Command(cmd, { args, cwd, stdout: "piped", stderr: "piped" })
    .output();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(out.stderr).trim()}`);
  }
  return new TextDecoder().decode(out.stdout);
}

let ready: Promise<string> | undefined;

/** The `signature/fixtures` folder of the unpacked package (downloaded on first use). */
export function cosignFixtures(): Promise<string> {
  return ready ??= unpack();
}

async function unpack(): Promise<string> {
  const dir = Deno.env.get("SARDE_COSIGN_FIXTURES_DIR") ?? "/var/tmp/sarde-cosign-fixtures";
  await Deno.mkdir(dir, { recursive: true });
  const fixtures = join(dir, "x", FIXTURES);
  using lock = await Deno.open(join(dir, ".lock"), { create: true, write: true });
  await lock.lock(true);
  if (await Deno.stat(join(fixtures, "cosign.pub")).then(() => true, () => false)) {
    return fixtures;
  }
  const debs = join(dir, "debs");
  await Deno.remove(debs, { recursive: true }).catch(() => {});
  await Deno.mkdir(debs);
  const sandbox = Deno.uid() === 0 ? ["-o", "APT::Sandbox::User=root"] : [];
  await run("apt-get", ["-q", ...sandbox, "download", PACKAGE], debs);
  const [deb] = [...Deno.readDirSync(debs)].filter((e) => e.name.endsWith(".deb"));
  if (!deb) throw new Error(`apt-get download ${PACKAGE} left no .deb in ${debs}`);
  const x = join(dir, "x.tmp");
  await Deno.remove(x, { recursive: true }).catch(() => {});
  await run("dpkg-deb", ["-x", join(debs, deb.name), x]);
  await Deno.remove(join(dir, "x"), { recursive: true }).catch(() => {});
  await Deno.rename(x, join(dir, "x"));
  return fixtures;
}

/**
 * A signature file of the fixtures (containers/image's blob format: `\0sigstore-json\n` and a
 * JSON object with `mimeType`, base64 `payload` and `annotations`).
 */
export async function readSigstoreFixture(path: string): Promise<UntrustedSignature> {
  const bytes = await Deno.readFile(path);
  const prefix = "\0sigstore-json\n";
  const text = new TextDecoder().decode(bytes);
  if (!text.startsWith(prefix)) throw new Error(`${path}: not a sigstore signature blob`);
  const json = JSON.parse(text.slice(prefix.length));
  return {
    mimeType: json.mimeType,
    payload: Uint8Array.from(atob(json.payload), (c) => c.charCodeAt(0)),
    annotations: json.annotations ?? {},
  };
}

/** The signatures of a `dir-img-*` fixture (`signature-1`, `signature-2`, … in order). */
export async function dirImageSignatures(dir: string): Promise<UntrustedSignature[]> {
  const sigs: UntrustedSignature[] = [];
  for (let i = 1;; i++) {
    const path = join(dir, `signature-${i}`);
    if (!await Deno.stat(path).then(() => true, () => false)) return sigs;
    const blob = await Deno.readFile(path);
    // Simple-signing (GPG) signatures are not sigstore ones: they count as "other" signatures.
    sigs.push(
      blob[0] === 0 && new TextDecoder().decode(blob.subarray(0, 14)) === "\0sigstore-json"
        ? await readSigstoreFixture(path)
        : { mimeType: "", payload: blob, annotations: {} },
    );
  }
}
