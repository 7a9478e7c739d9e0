/**
 * `sarde`: share libvirt VMs through OCI registries. A thin shell over `mod.ts`: parse options,
 * call the library, print results on stdout and everything else on stderr.
 *
 * @module
 */

import { Command, CommanderError, Option } from "commander";
import * as sarde from "./mod.ts";
import { installSignalHandlers, interruptSignal } from "./lib/cleanup.ts";
import { SardeError } from "./lib/errors.ts";
import { formatImageTable } from "./lib/images.ts";
import { error, info, setVerbosity, warn } from "./lib/log.ts";
import { formatBytes } from "./lib/progress.ts";
import { parseRegistryHost } from "./lib/reference.ts";
import { promptLine, readStdinSecret } from "./lib/terminal.ts";
import { parseBoolean, parsePositiveInt, parseSize } from "./lib/units.ts";

/** The version printed by `sarde --version`. */
export const VERSION = "0.1.0";

const out = (text: string) => Deno.stdout.writeSync(new TextEncoder().encode(text));

const ocidirOption = () =>
  new Option("-d, --ocidir <dir>", `local image store (default: ${sarde.defaultOcidir()})`);

function addTlsOptions(cmd: Command): Command {
  return cmd
    .option(
      "--authfile <file>",
      "credentials file (default: $REGISTRY_AUTH_FILE or ${XDG_RUNTIME_DIR}/containers/auth.json)",
    )
    .option("--insecure", "use plain http instead of https")
    .option(
      "--tls-verify [bool]",
      "verify TLS certificates (--tls-verify=false to skip)",
      (v) => parseBoolean(v, "--tls-verify"),
    )
    .option("--cert-dir <dir>", "trust the CA certificates (*.crt) in this folder")
    .option("--ca-file <file>", "trust this PEM CA certificate");
}

function addTransferOptions(cmd: Command): Command {
  return addTlsOptions(cmd)
    .addOption(ocidirOption())
    .option(
      "-j, --concurrency <n>",
      "blobs transferred in parallel",
      (v) => parsePositiveInt(v, "--concurrency"),
      4,
    )
    .option(
      "--chunk-size <size>",
      "upload in PATCH requests of at most this size, for registries that cap request bodies (e.g. 4MiB)",
      (v) => parseSize(v, "--chunk-size"),
    );
}

interface TransferCli extends TlsCli {
  ocidir?: string;
  concurrency?: number;
  chunkSize?: number;
}

interface TlsCli {
  authfile?: string;
  insecure?: boolean;
  tlsVerify?: boolean | string | true;
  certDir?: string;
  caFile?: string;
}

function tlsFrom(o: TlsCli) {
  return {
    authfile: o.authfile,
    insecure: o.insecure,
    tlsVerify: o.tlsVerify === undefined
      ? undefined
      : o.tlsVerify === true || o.tlsVerify === "true",
    certDir: o.certDir,
    caFile: o.caFile,
  };
}

function summary(verb: string, r: sarde.TransferResult): string {
  const moved = r.blobsTransferred
    ? `${r.blobsTransferred} blobs (${formatBytes(r.blobBytes)})`
    : "no blobs";
  const mounted = r.blobsMounted ? `, ${r.blobsMounted} mounted from another repository` : "";
  return `${verb} ${r.digest}: ${moved}${mounted}, ${r.blobsSkipped} already there`;
}

/** Builds the command tree. */
export function buildProgram(): Command {
  const program = new Command()
    .name("sarde")
    .description(
      "Share libvirt/QEMU virtual machines through OCI registries.\n\n" +
        "Results (names, digests, JSON) go to stdout; logs and progress go to stderr.",
    )
    .version(VERSION, "-V, --version")
    .option("-v, --verbose", "more output (repeatable)", (_, n: number) => n + 1, 0)
    .option("-q, --quiet", "less output (repeatable)", (_, n: number) => n + 1, 0)
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride()
    .configureOutput({ writeErr: (s) => Deno.stderr.writeSync(new TextEncoder().encode(s)) })
    .hook("preAction", (cmd) => {
      const o = cmd.opts() as { verbose: number; quiet: number };
      setVerbosity(o.verbose, o.quiet);
    });

  program.command("login")
    .description("check credentials against a registry and store them (like skopeo login)")
    .argument("<registry>", "registry host, e.g. registry.example.org or 127.0.0.1:5000")
    .option("-u, --username <user>", "user name (asked for when missing and interactive)")
    .option(
      "-p, --password <password>",
      "password (insecure: visible in the process list; prefer --password-stdin)",
    )
    .option("--password-stdin", "read the password from stdin")
    .addHelpText(
      "after",
      '\nExample:\n  echo "$TOKEN" | sarde login -u ci --password-stdin registry.example.org',
    )
    .action(
      async (
        registry: string,
        o: TlsCli & { username?: string; password?: string; passwordStdin?: boolean },
      ) => {
        const g = o;
        const host = parseRegistryHost(registry);
        if (o.password !== undefined && o.passwordStdin) {
          throw new SardeError("usage", "--password and --password-stdin exclude each other");
        }
        if (o.password !== undefined) {
          warn("--password is visible to other users of this machine; prefer --password-stdin");
        }
        const username = o.username ?? await promptLine("Username: ");
        const password = o.password ??
          (o.passwordStdin ? await readStdinSecret() : await promptLine("Password: ", true));
        const file = await sarde.login(host, { username, password }, {
          ...tlsFrom(g),
          signal: interruptSignal,
        });
        info(`Login succeeded: credentials for ${host} stored in ${file}`);
      },
    );
  addTlsOptions(program.commands.at(-1)!);

  program.command("logout")
    .description("forget stored credentials of a registry")
    .argument("[registry]", "registry host")
    .option("-a, --all", "forget the credentials of every registry")
    .option("--authfile <file>", "credentials file")
    .action(async (registry: string | undefined, o: { all?: boolean; authfile?: string }) => {
      if (!registry && !o.all) throw new SardeError("usage", "name a registry, or use --all");
      if (registry === "*" || o.all) {
        await sarde.logout({ all: true }, { authfile: o.authfile });
        info("removed all stored credentials");
        return;
      }
      const removed = await sarde.logout(registry!, { authfile: o.authfile });
      if (!removed) {
        throw new SardeError("not-found", `not logged in to ${parseRegistryHost(registry!)}`);
      }
      info(`removed the credentials for ${parseRegistryHost(registry!)}`);
    });

  addTransferOptions(
    program.command("fetch")
      .description("download an image from a registry into the local store")
      .argument("<image>", "image reference, e.g. registry.example.org/sardines/debian12:latest")
      .option("-s, --source <ref>", "download from this reference instead, store under <image>"),
  ).action(async (image: string, o: TransferCli & { source?: string }) => {
    const r = await sarde.fetch(image, {
      ...tlsFrom(o),
      source: o.source,
      ocidir: o.ocidir,
      concurrency: o.concurrency,
      chunkSize: o.chunkSize,
      signal: interruptSignal,
    });
    info(summary("fetched", r));
    out(`${r.digest}\n`);
  });

  addTransferOptions(
    program.command("push")
      .description("upload a local image to a registry")
      .argument("<image>", "local image name, e.g. registry.example.org/sardines/debian12:latest")
      .option("-t, --target <ref>", "upload to this reference instead of <image>"),
  ).action(async (image: string, o: TransferCli & { target?: string }) => {
    const r = await sarde.push(image, {
      ...tlsFrom(o),
      target: o.target,
      ocidir: o.ocidir,
      concurrency: o.concurrency,
      chunkSize: o.chunkSize,
      signal: interruptSignal,
    });
    info(summary("pushed", r));
    out(`${r.digest}\n`);
  });

  program.command("list")
    .alias("ls")
    .description("list the images in the local store")
    .addOption(ocidirOption())
    .addOption(
      new Option("--format <format>", "output format").choices(["text", "json"]).default("text"),
    )
    .action(async (o: { ocidir?: string; format: string }) => {
      const entries = await sarde.list({ ocidir: o.ocidir });
      out(
        o.format === "json" ? JSON.stringify(entries, null, 2) + "\n" : formatImageTable(entries),
      );
    });

  program.command("getconfig")
    .description("print the VM config (users, services) stored in a local image, as JSON")
    .argument("<image>", "local image name")
    .addOption(ocidirOption())
    .action(async (image: string, o: { ocidir?: string }) => {
      const config = await sarde.getConfig(image, { ocidir: o.ocidir });
      if (config === undefined) {
        warn(`${image} has no VM config`);
        return;
      }
      out(JSON.stringify(config, null, 2) + "\n");
    });

  return program;
}

/** Runs the CLI with `args`; returns the exit code instead of exiting (for tests). */
export async function main(args: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(args, { from: "user" });
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      return err.exitCode === 0 ? 0 : 2;
    }
    if (err instanceof SardeError) {
      error(err.message);
      if (err.hint) Deno.stderr.writeSync(new TextEncoder().encode(`hint: ${err.hint}\n`));
      return err.exitCode;
    }
    error(`unexpected failure: ${err instanceof Error ? err.stack ?? err.message : String(err)}`);
    error("this is a bug in sarde; please report it with the command you ran");
    return 70;
  }
}

if (import.meta.main) {
  installSignalHandlers();
  Deno.exit(await main(Deno.args));
}
