/**
 * `sarde generate-sigstore-key`: make a key pair for signing pushes, in cosign's format (the
 * skopeo of Debian 12 has no `generate-sigstore-key`).
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { fail } from "../../lib/util/errors.ts";
import { exists, osReason } from "../../lib/util/fsutil.ts";
import { info } from "../../lib/util/log.ts";
import { pathOption } from "../options.ts";
import { out } from "../output.ts";
import { passphrase } from "../signing.ts";

/** Adds `generate-sigstore-key` to `program`. */
export function generateSigstoreKeyCommand(program: Command): Command {
  return program.command("generate-sigstore-key")
    .description(
      "write a new ECDSA P-256 signing key pair: PREFIX.key (encrypted, cosign's format, mode " +
        "0600) and PREFIX.pub (for policy.json's keyPath); prints the two file names",
    )
    .addOption(
      pathOption("--output-prefix <prefix>", "write <prefix>.key and <prefix>.pub")
        .makeOptionMandatory(),
    )
    .addOption(
      pathOption(
        "--passphrase-file <file>",
        "the passphrase is the first line of this file (default: asked twice without echo)",
      ),
    )
    .addHelpText(
      "after",
      "\nExample:\n  sarde generate-sigstore-key --output-prefix /etc/sardinecake/signing" +
        "\n  sarde push --sign-by-sigstore-private-key /etc/sardinecake/signing.key " +
        "registry.example.org/sardines/debian12:latest",
    )
    .action(async (o: { outputPrefix: string; passphraseFile?: string }) => {
      const keyFile = `${o.outputPrefix}.key`;
      const pubFile = `${o.outputPrefix}.pub`;
      for (const f of [keyFile, pubFile]) {
        if (await exists(f)) {
          throw fail("usage", `${f} exists; refusing to overwrite it`, "choose another prefix");
        }
      }
      const pass = await passphrase(o.passphraseFile, "--passphrase-file", true);
      const pair = await sarde.generateSigstoreKey(pass);
      await writeNew(keyFile, pair.privatePem, 0o600);
      try {
        await writeNew(pubFile, pair.publicPem, 0o644);
      } catch (err) {
        // A private key without its public half is of no use: leave neither.
        await Deno.remove(keyFile).catch(() => {});
        throw err;
      }
      info(`wrote the private key ${keyFile} and the public key ${pubFile}`);
      out(`${keyFile}\n${pubFile}\n`);
    });
}

/** Writes a file that must not exist yet (a race with another writer fails, never overwrites). */
async function writeNew(path: string, text: string, mode: number): Promise<void> {
  try {
    await Deno.writeTextFile(path, text, { createNew: true, mode });
    // The umask must not widen or narrow what the file is for.
    await Deno.chmod(path, mode);
  } catch (err) {
    if (err instanceof Deno.errors.AlreadyExists) {
      throw fail("usage", `${path} exists; refusing to overwrite it`, "choose another prefix");
    }
    throw fail("io", `cannot write ${path}: ${osReason(err)}`);
  }
}
