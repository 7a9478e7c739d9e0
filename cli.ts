/**
 * `sarde`: share libvirt VMs through OCI registries. A thin shell over `mod.ts`: parse options
 * (command line over INI files over built-in defaults), call the library, print results on stdout
 * and everything else on stderr.
 *
 * @module
 */

import { Command, CommanderError, Option } from "commander";
import * as sarde from "./mod.ts";
import { installSignalHandlers, interruptSignal, settleInterrupt } from "./lib/util/cleanup.ts";
import {
  atOrigin,
  type CommandKeys,
  expandHome,
  getString,
  parseDuration,
  parsePositiveDuration,
  sardeConfig,
} from "./lib/util/config.ts";
import { SardeError } from "./lib/util/errors.ts";
import { checkChunkSize } from "./lib/vm/export.ts";
import { formatImageTable } from "./lib/oci/images.ts";
import { error, info, setVerbosity, warn } from "./lib/util/log.ts";
import { formatBytes } from "./lib/util/progress.ts";
import { parseRegistryHost } from "./lib/oci/reference.ts";
import { promptLine, readStdinSecret } from "./lib/util/terminal.ts";
import { checkMinSize, parseBoolean, parseIntInRange, parseSize } from "./lib/util/units.ts";
import { VERSION } from "./lib/util/version.ts";

export { VERSION };

const out = (text: string) => Deno.stdout.writeSync(new TextEncoder().encode(text));

/** Values from the INI files for the command being run (`[DEFAULT]` + its own section). */
type Config = Record<string, string>;

/** Parses an option's value; `what` names it in errors (`--concurrency`, `[pull] concurrency`). */
type Parse = (text: string, what: string) => unknown;

// Each option's parser, so that its INI value gets exactly the checks of the command line.
const parsers = new WeakMap<Option, Parse>();
// The INI values each command was given, to say where a value that fails a later check came from.
const configs = new WeakMap<Command, Config>();

/** An option with a value that `parse` checks, on the command line and in INI files alike. */
function valueOption(flags: string, description: string, parse: Parse): Option {
  const option = new Option(flags, description);
  parsers.set(option, parse);
  return option.argParser((text: string) => parse(text, `--${option.name()}`));
}

/** A path: `~` is expanded (the shell leaves `--opt=~/x` alone; INI files need it anyway). */
const pathOption = (flags: string, description: string) =>
  valueOption(flags, description, (text) => expandHome(text));

/** An option with a fixed set of values. */
const choiceOption = (flags: string, description: string, choices: readonly string[]) =>
  valueOption(flags, description, (text, what) => {
    if (choices.includes(text)) return text;
    throw new SardeError("usage", `invalid ${what} '${text}' (${choices.join(" or ")})`);
  });

/** A repeatable flag (`-vv`); an INI file gives the count. */
function counterOption(flags: string, description: string): Option {
  const option = new Option(flags, description).argParser((_: string, n: number) => n + 1)
    .default(0);
  parsers.set(option, (text, what) => parseIntInRange(text, what, 0));
  return option;
}

/**
 * Smallest `--chunk-size`: PATCH requests of a few bytes (`--chunk-size 64`, the unit forgotten)
 * would turn one upload into millions of requests.
 */
const MIN_UPLOAD_PIECE = 64 << 10;

/** The options that an INI file can set: all but `--version`. */
const iniOptions = (cmd: Command) => cmd.options.filter((o) => o.attributeName() !== "version");

/**
 * The INI keys of each command: its long option names and the program's (`verbose`, `quiet`),
 * taken from the option definitions so that the two can never drift apart.
 */
export function commandKeys(program: Command): CommandKeys[] {
  const names = (cmd: Command) => iniOptions(cmd).map((o) => o.name());
  return program.commands.map((cmd) => ({
    name: cmd.name(),
    aliases: cmd.aliases(),
    keys: [...names(program), ...names(cmd)],
  }));
}

/**
 * Gives the options of `cmd` their INI values (the command line still wins), each through the
 * option's own parser: a value the command line would refuse is refused, with its file and line.
 */
function applyConfig(cmd: Command, config: Config): void {
  configs.set(cmd, config);
  for (const option of iniOptions(cmd)) {
    const text = getString(config, option.name())?.trim();
    if (!text) continue; // an empty value means "not set"
    const parse = parsers.get(option) ?? (option.isBoolean() ? parseBoolean : (t: string) => t);
    const value = atOrigin(config, option.name(), (what) => parse(text, what));
    cmd.setOptionValueWithSource(option.attributeName(), value, "config");
  }
}

/** Runs a check of an option's value that needs other options, naming the value as it was given. */
function checkOption<T>(cmd: Command, key: string, check: (what: string) => T): T {
  const option = cmd.options.find((o) => o.name() === key)!;
  return cmd.getOptionValueSource(option.attributeName()) === "config"
    ? atOrigin(configs.get(cmd)!, key, check)
    : check(`--${key}`);
}

interface CommonCli {
  ocidir?: string;
  vmdir?: string;
  connect?: string;
  authfile?: string;
  insecure?: boolean;
  tlsVerify?: boolean;
  certDir?: string;
  caFile?: string;
  concurrency?: number;
  chunkSize?: number;
  responseTimeout?: number;
  retryTimeout?: number;
}

/** The library options of the parsed command line (which already holds the INI values). */
function settings(o: CommonCli) {
  return {
    ocidir: o.ocidir,
    vmdir: o.vmdir,
    connect: o.connect,
    authfile: o.authfile,
    insecure: o.insecure,
    tlsVerify: o.tlsVerify,
    certDir: o.certDir,
    caFile: o.caFile,
    concurrency: o.concurrency,
    chunkSize: o.chunkSize,
    responseTimeoutMs: o.responseTimeout,
    retry: o.retryTimeout === undefined ? undefined : { maxElapsedMs: o.retryTimeout },
    signal: interruptSignal,
  };
}

const ocidirOption = () =>
  pathOption("-d, --ocidir <dir>", `local image store (default: ${sarde.defaultOcidir()})`);
const vmdirOption = () =>
  pathOption(
    "-o, --vmdir <dir>",
    `folder for imported VMs, one sub-folder each (default: ${sarde.defaultVmdir()})`,
  );
const connectOption = () =>
  new Option("-c, --connect <uri>", "libvirt URI (default: $LIBVIRT_DEFAULT_URI or libvirt's)");

/** Options of the commands that talk to registries: credentials, TLS, deadlines. */
function addRegistryOptions(cmd: Command): Command {
  return cmd
    .addOption(
      pathOption(
        "--authfile <file>",
        "credentials file (default: $REGISTRY_AUTH_FILE or ${XDG_RUNTIME_DIR}/containers/auth.json)",
      ),
    )
    .option("--insecure", "use plain http instead of https")
    .addOption(
      valueOption(
        "--tls-verify [bool]",
        "verify TLS certificates (--tls-verify=false to skip)",
        parseBoolean,
      ),
    )
    .addOption(pathOption("--cert-dir <dir>", "trust the CA certificates (*.crt) in this folder"))
    .addOption(pathOption("--ca-file <file>", "trust this PEM CA certificate"))
    .addOption(
      valueOption(
        "--response-timeout <duration>",
        "give up on a registry request (and retry it) after this long without an answer (default 30s)",
        parsePositiveDuration,
      ),
    )
    .addOption(
      valueOption(
        "--retry-timeout <duration>",
        "start no retry of a failing request after this long (default 2m; 0 = no retries)",
        (text, what) => parseDuration(text, what),
      ),
    );
}

/** Registry options plus the store and the blob transfers. */
function addTransferOptions(cmd: Command): Command {
  return addRegistryOptions(cmd)
    .addOption(ocidirOption())
    .addOption(
      valueOption(
        "-j, --concurrency <n>",
        "blobs transferred in parallel (default 4)",
        (text, what) => parseIntInRange(text, what, 1),
      ),
    )
    .addOption(
      valueOption(
        "--chunk-size <size>",
        "upload in PATCH requests of at most this size, for registries that cap request bodies (e.g. 4MiB)",
        (text, what) => checkMinSize(parseSize(text, what), MIN_UPLOAD_PIECE, what),
      ),
    );
}

function addImportOptions(cmd: Command): Command {
  return cmd
    .addOption(vmdirOption())
    .addOption(connectOption())
    .option(
      "--allow-host-resources",
      "accept domain XML that uses host devices or paths outside the VM folder (trusted images only)",
    )
    .option(
      "--domain-type <type>",
      "force the libvirt domain type, e.g. qemu on hosts without KVM",
    );
}

function summary(verb: string, r: sarde.TransferResult): string {
  const moved = r.blobsTransferred
    ? `${r.blobsTransferred} blobs (${formatBytes(r.blobBytes)})`
    : "no blobs";
  const mounted = r.blobsMounted ? `, ${r.blobsMounted} mounted from another repository` : "";
  return `${verb} ${r.digest}: ${moved}${mounted}, ${r.blobsSkipped} already there`;
}

interface ImportCli extends CommonCli {
  name?: string;
  printUuid?: boolean;
  allowHostResources?: boolean;
  domainType?: string;
}

function importSettings(o: ImportCli) {
  return {
    ...settings(o),
    name: o.name,
    allowHostResources: o.allowHostResources,
    domainType: o.domainType,
  };
}

function printImported(r: sarde.ImportResult, o: ImportCli) {
  out(`${o.printUuid ? r.uuid : r.name}\n`);
}

/** Builds the command tree. */
export function buildProgram(): Command {
  const program = new Command()
    .name("sarde")
    .description(
      "Share libvirt/QEMU virtual machines through OCI registries.\n\n" +
        "Results (names, digests, JSON) go to stdout; logs and progress go to stderr.\n" +
        "Defaults come from /etc/sardinecake/sarde.ini and ~/.config/sardinecake/sarde.ini\n" +
        "(or the files in $SARDE_CONF_FILES): [DEFAULT] and a section per command.",
    )
    .version(VERSION, "-V, --version")
    .addOption(counterOption("-v, --verbose", "more output (repeatable)"))
    .addOption(counterOption("-q, --quiet", "less output (repeatable)"))
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride()
    .configureOutput({ writeErr: (s) => Deno.stderr.writeSync(new TextEncoder().encode(s)) })
    .hook("preAction", (cmd) => {
      const o = cmd.opts() as { verbose: number; quiet: number };
      setVerbosity(o.verbose, o.quiet);
    });

  addRegistryOptions(
    program.command("login")
      .description("check credentials against a registry and store them (like skopeo login)")
      .argument("<registry>", "registry host, e.g. registry.example.org or 127.0.0.1:5000")
      .option("-u, --username <user>", "user name (asked for when missing and interactive)")
      .option(
        "-p, --password <password>",
        "password (visible in the process list; prefer --password-stdin)",
      )
      .option("--password-stdin", "read the password from stdin")
      .addHelpText(
        "after",
        '\nExample:\n  echo "$TOKEN" | sarde login -u ci --password-stdin registry.example.org',
      ),
  ).action(
    async (
      registry: string,
      o: CommonCli & { username?: string; password?: string; passwordStdin?: boolean },
      cmd: Command,
    ) => {
      const s = settings(o);
      const host = parseRegistryHost(registry);
      if (o.password !== undefined && o.passwordStdin) {
        throw new SardeError("usage", "--password and --password-stdin exclude each other");
      }
      if (cmd.getOptionValueSource("password") === "cli") {
        warn("--password is visible to other users of this machine; prefer --password-stdin");
      }
      const username = o.username ?? await promptLine("Username: ");
      const password = o.password ??
        (o.passwordStdin ? await readStdinSecret() : await promptLine("Password: ", true));
      const file = await sarde.login(host, { username, password }, s);
      info(`Login succeeded: credentials for ${host} stored in ${file}`);
    },
  );

  program.command("logout")
    .description("forget stored credentials of a registry")
    .argument("[registry]", "registry host ('*' for all)")
    .option("-a, --all", "forget the credentials of every registry")
    .addOption(pathOption("--authfile <file>", "credentials file"))
    .action(async (registry: string | undefined, o: { all?: boolean; authfile?: string }) => {
      const authfile = o.authfile;
      if (!registry && !o.all) throw new SardeError("usage", "name a registry, or use --all");
      if (registry === "*" || o.all) {
        await sarde.logout({ all: true }, { authfile });
        info("removed all stored credentials");
        return;
      }
      const host = parseRegistryHost(registry!);
      if (!await sarde.logout(host, { authfile })) {
        throw new SardeError("not-found", `not logged in to ${host}`);
      }
      info(`removed the credentials for ${host}`);
    });

  addTransferOptions(
    program.command("fetch")
      .description(
        "download an image from a registry into the local store; prints the manifest digest",
      )
      .argument("<image>", "image reference, e.g. registry.example.org/sardines/debian12:latest")
      .option("-s, --source <ref>", "download from this reference instead, store under <image>"),
  ).action(async (image: string, o: CommonCli & { source?: string }) => {
    const r = await sarde.fetch(image, { ...settings(o), source: o.source });
    info(summary("fetched", r));
    out(`${r.digest}\n`);
  });

  addTransferOptions(
    program.command("push")
      .description("upload a local image to a registry; prints the manifest digest")
      .argument("<image>", "local image name, e.g. registry.example.org/sardines/debian12:latest")
      .option("-t, --target <ref>", "upload to this reference instead of <image>"),
  ).action(async (image: string, o: CommonCli & { target?: string }) => {
    const r = await sarde.push(image, { ...settings(o), target: o.target });
    info(summary("pushed", r));
    out(`${r.digest}\n`);
  });

  const exportCmd = program.command("export")
    .description(
      "store a libvirt VM (XML, disks with backing chains, NVRAM, kernel) as an image; prints the image ID",
    )
    .argument("<vm>", "libvirt VM name")
    .argument(
      "[image]",
      "image name, e.g. registry.example.org/sardines/debian12:latest (default: <vm>:latest)",
    )
    .option("-t, --tag <image>", "image name (same as the [image] argument)")
    .addOption(connectOption())
    .addOption(
      pathOption(
        "--vmconfig <file>",
        "JSON with users and services of the VM (checked against the schema)",
      ),
    )
    .addOption(
      pathOption("--libvirtconfig <file>", "read the domain XML from this file instead of libvirt"),
    )
    .addOption(
      choiceOption(
        "--compression <kind>",
        "disk encoding: zstd (fast, default) or gzip (readable by sardinecake 0.4)",
        ["zstd", "gzip"],
      ),
    )
    .addOption(
      valueOption(
        "--chunksize <size>",
        "zstd: uncompressed chunk size (default 64MiB, at least 1MiB); " +
          "gzip: compressed piece size (default: one piece, at least 64KiB)",
        parseSize,
      ),
    )
    .addOption(
      valueOption(
        "--zstd-level <n>",
        "zstd level 1-19 (default 2; 3 makes images ~1.5 % smaller for ~40 % more CPU)",
        (text, what) => parseIntInRange(text, what, 1, 19),
      ),
    )
    .option("-f, --force", "export even if the VM is running")
    .option(
      "--push",
      "also push the image to its registry, uploading each disk chunk as soon as it is compressed",
    );
  addTransferOptions(exportCmd)
    .addHelpText(
      "after",
      "\nExamples:\n  sarde export --vmconfig vm.json debian12 registry.example.org/sardines/debian12:latest" +
        "\n  sarde export --push debian12 registry.example.org/sardines/debian12:latest   # export and push at once",
    )
    .action(async (
      vm: string,
      image: string | undefined,
      o: CommonCli & {
        tag?: string;
        vmconfig?: string;
        libvirtconfig?: string;
        compression?: "zstd" | "gzip";
        chunksize?: number;
        zstdLevel?: number;
        force?: boolean;
        push?: boolean;
      },
      cmd: Command,
    ) => {
      if (image && o.tag && image !== o.tag) {
        throw new SardeError("usage", "give the image name once: either --tag or the argument");
      }
      const s = settings(o);
      const compression = o.compression ?? "zstd";
      const chunkSize = o.chunksize;
      if (chunkSize !== undefined) {
        checkOption(cmd, "chunksize", (what) => checkChunkSize(chunkSize, compression, what));
      }
      const r = await sarde.exportVm(vm, image ?? o.tag, {
        ...s,
        vmConfig: o.vmconfig,
        libvirtConfig: o.libvirtconfig,
        compression,
        chunkSize,
        zstdLevel: o.zstdLevel,
        force: o.force,
        push: o.push ? s : undefined,
      });
      info(`exported ${vm} as ${r.reference} (${r.files.length} file(s))`);
      if (r.pushed) info(summary("pushed", r.pushed));
      out(`${r.imageId.replace(/^sha256:/, "")}\n`);
    });

  addImportOptions(
    program.command("import")
      .description("define a libvirt VM from a local image (idempotent); prints the VM name")
      .argument("<image>", "local image name")
      .addOption(ocidirOption())
      .option("-n, --name <name>", "VM name (default: the image ID)")
      .option("--print-uuid", "print the VM's UUID instead of its name"),
  ).action(async (image: string, o: ImportCli) => {
    printImported(await sarde.importVm(image, importSettings(o)), o);
  });

  addImportOptions(
    addTransferOptions(
      program.command("pull")
        .description("fetch an image and import it as a libvirt VM; prints the VM name")
        .argument("<image>", "image reference")
        .option("-s, --source <ref>", "download from this reference instead, store under <image>")
        .option("-n, --name <name>", "VM name (default: the image ID)")
        .option("--print-uuid", "print the VM's UUID instead of its name")
        .addHelpText(
          "after",
          '\nExample:\n  name=$(sarde pull registry.example.org/sardines/debian12:latest) && virsh start "$name"',
        ),
    ),
  ).action(async (image: string, o: ImportCli & { source?: string }) => {
    printImported(await sarde.pull(image, { ...importSettings(o), source: o.source }), o);
  });

  addImportOptions(
    program.command("clone")
      .description(
        "make a new VM with copy-on-write disks from a local image or a defined VM; prints its name",
      )
      .argument("<source>", "local image name or libvirt VM name")
      .argument("<target>", "name of the new VM")
      .addOption(ocidirOption())
      .addOption(
        pathOption("--clonedir <dir>", "folder for the clone's overlays (default: the vmdir)"),
      )
      .option("--start", "start the clone")
      .option("--transient", "make a transient VM: started at once, gone when it stops"),
  ).action(
    async (
      source: string,
      target: string,
      o: ImportCli & { clonedir?: string; start?: boolean; transient?: boolean },
    ) => {
      const r = await sarde.clone(source, target, {
        ...importSettings(o),
        clonedir: o.clonedir,
        start: o.start,
        transient: o.transient,
      });
      info(`cloned ${r.base} into ${r.name} (${r.folder})`);
      out(`${r.name}\n`);
    },
  );

  program.command("list")
    .alias("ls")
    .description("list the images in the local store, with the state of the VMs imported from them")
    .addOption(ocidirOption())
    .addOption(vmdirOption())
    .addOption(connectOption())
    .addOption(choiceOption("--format <format>", "output format: text or json", ["text", "json"]))
    .action(async (o: CommonCli & { format?: string }) => {
      const entries = await sarde.list(settings(o));
      out(
        o.format === "json" ? JSON.stringify(entries, null, 2) + "\n" : formatImageTable(entries),
      );
    });

  program.command("rm")
    .alias("remove")
    .description("remove cached images (a tag, or a digest) and the blobs only they needed")
    .argument("<image...>", "local image names")
    .addOption(ocidirOption())
    .action(async (images: string[], o: CommonCli) => {
      const s = settings(o);
      let total = 0;
      for (const image of images) {
        const r = await sarde.remove(image, s);
        info(`removed ${r.what} (${formatBytes(r.bytes)} freed)`);
        total += r.bytes;
      }
      if (images.length > 1) info(`${formatBytes(total)} freed`);
    });

  program.command("prune")
    .description(
      "remove leftovers, and with --older-than/--keep-bytes cached images and imported VMs\n" +
        "that no defined VM uses, least recently used first",
    )
    .addOption(ocidirOption())
    .addOption(vmdirOption())
    .addOption(connectOption())
    .addOption(pathOption("--clonedir <dir>", "also look for leftover clones in this folder"))
    .addOption(
      valueOption(
        "--older-than <duration>",
        "remove what was not used for this long, e.g. 14d, 12h",
        (text, what) => parseDuration(text, what),
      ),
    )
    .addOption(
      valueOption(
        "--keep-bytes <size>",
        "then remove until at most this much remains, e.g. 200GiB",
        parseSize,
      ),
    )
    .option("-n, --dry-run", "only say what would be removed")
    .action(
      async (
        o: CommonCli & {
          clonedir?: string;
          olderThan?: number;
          keepBytes?: number;
          dryRun?: boolean;
        },
      ) => {
        const removed = await sarde.prune({
          ...settings(o),
          clonedirs: o.clonedir ? [o.clonedir] : [],
          olderThanMs: o.olderThan,
          keepBytes: o.keepBytes,
          dryRun: o.dryRun,
        });
        const bytes = removed.reduce((n, r) => n + r.bytes, 0);
        info(
          `${o.dryRun ? "would free" : "freed"} ${formatBytes(bytes)} in ${removed.length} item(s)`,
        );
      },
    );

  program.command("getconfig")
    .description("print the VM config (users, services) stored in a local image, as JSON")
    .argument("<image>", "local image name")
    .addOption(ocidirOption())
    .action(async (image: string, o: CommonCli) => {
      const c = await sarde.getConfig(image, settings(o));
      if (c === undefined) {
        warn(`${image} has no VM config`);
        return;
      }
      out(JSON.stringify(c, null, 2) + "\n");
    });

  return program;
}

/** The sub-command named in `args` (the first word that is not an option), if there is one. */
function commandOf(program: Command, args: string[]): Command | undefined {
  const word = args.find((a) => !a.startsWith("-"));
  return program.commands.find((c) => c.name() === word || c.aliases().includes(word!));
}

/** Runs the CLI with `args`; returns the exit code instead of exiting (for tests). */
export async function main(args: string[]): Promise<number> {
  try {
    const program = buildProgram();
    const cmd = commandOf(program, args);
    if (cmd) {
      // An alias reads its command's section: `sarde ls` is configured by [list].
      const config = await sardeConfig(cmd.name(), commandKeys(program));
      applyConfig(program, config);
      applyConfig(cmd, config);
    }
    await program.parseAsync(args, { from: "user" });
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
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
  const code = await main(Deno.args);
  await settleInterrupt();
  Deno.exit(code);
}
