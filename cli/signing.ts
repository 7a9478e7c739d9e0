/**
 * Passphrases of sigstore keys and the signing options of `push` and `export --push`, with
 * skopeo's flag names.
 *
 * @module
 */

import type { Command } from "commander";
import type { SignOptions } from "../mod.ts";
import { fail } from "../lib/util/errors.ts";
import { promptLine } from "../lib/util/terminal.ts";
import { readPassphraseFile } from "../lib/trust/keys.ts";
import { pathOption } from "./options.ts";

/** The parsed signing options. */
export interface SigningCli {
  signBySigstorePrivateKey?: string;
  signPassphraseFile?: string;
}

/** Adds `--sign-by-sigstore-private-key` and `--sign-passphrase-file` to `cmd`. */
export function addSigningOptions(cmd: Command): Command {
  return cmd
    .addOption(
      pathOption(
        "--sign-by-sigstore-private-key <file>",
        "sign the pushed image with this cosign key (sarde generate-sigstore-key, cosign " +
          "generate-key-pair); the signature names the reference pushed to",
      ),
    )
    .addOption(
      pathOption(
        "--sign-passphrase-file <file>",
        "the key's passphrase is the first line of this file (default: asked without echo)",
      ),
    );
}

/**
 * A passphrase from the file `file`, or asked without echo (`twice` to confirm a new one). Without
 * a terminal to ask on, a one-line error naming `flag` instead of a hang or an empty passphrase.
 */
export async function passphrase(
  file: string | undefined,
  flag: string,
  twice = false,
): Promise<string> {
  if (file !== undefined) return await readPassphraseFile(file);
  if (!Deno.stdin.isTerminal()) {
    throw fail("usage", `no passphrase: stdin is not a terminal to ask on`, `pass ${flag} FILE`);
  }
  const first = await promptLine("Passphrase: ", true);
  if (twice && await promptLine("Passphrase again: ", true) !== first) {
    throw fail("usage", "the passphrases differ");
  }
  return first;
}

/** The library's signing options of the parsed command line (asking for the passphrase). */
export async function signing(o: SigningCli): Promise<SignOptions> {
  if (o.signBySigstorePrivateKey === undefined) {
    if (o.signPassphraseFile !== undefined) {
      throw fail("usage", "--sign-passphrase-file needs --sign-by-sigstore-private-key");
    }
    return {};
  }
  return {
    signBySigstorePrivateKey: o.signBySigstorePrivateKey,
    signPassphrase: await passphrase(o.signPassphraseFile, "--sign-passphrase-file"),
  };
}
