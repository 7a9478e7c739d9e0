/**
 * `sarde`: share libvirt VMs through OCI registries. A thin shell over `mod.ts`: parse options
 * (command line over INI files over built-in defaults), call the library, print results on stdout
 * and everything else on stderr.
 *
 * @module
 */

import { Command, CommanderError, Option } from "commander";
import * as sarde from "./mod.ts";
import { installSignalHandlers, interruptSignal, settleInterrupt } from "./lib/cleanup.ts";
import {
  getBoolean,
  getInt,
  getPath,
  getSize,
  getString,
  parseDuration,
  sardeConfig,
} from "./lib/config.ts";
import { SardeError } from "./lib/errors.ts";
import { formatImageTable } from "./lib/images.ts";
import { error, info, setVerbosity, warn } from "./lib/log.ts";
import { formatBytes } from "./lib/progress.ts";
import { parseRegistryHost } from "./lib/reference.ts";
import { promptLine, readStdinSecret } from "./lib/terminal.ts";
import { parseBoolean, parsePositiveInt, parseSize } from "./lib/units.ts";
import { VERSION } from "./lib/version.ts";

export { VERSION };

const out = (text: string) => Deno.stdout.writeSync(new TextEncoder().encode(text));

/** Values from the INI files for the command being run (`[DEFAULT]` + its own section). */
type Config = Record<string, string>;

interface CommonCli {
  ocidir?: string;
  vmdir?: string;
  connect?: string;
  authfile?: string;
  insecure?: boolean;
  tlsVerify?: boolean | string;
  certDir?: string;
  caFile?: string;
  concurrency?: number;
  chunkSize?: number;
}

/** Effective settings: command line first, then the INI files, then built-in defaults. */
function settings(o: CommonCli, config: Config) {
  const tlsVerify = o.tlsVerify === undefined
    ? getBoolean(config, "tls-verify")
    : o.tlsVerify === true || o.tlsVerify === "true";
  return {
    ocidir: o.ocidir ?? getPath(config, "ocidir"),
    vmdir: o.vmdir ?? getPath(config, "vmdir"),
    connect: o.connect ?? getString(config, "connect"),
    authfile: o.authfile ?? getPath(config, "authfile"),
    insecure: o.insecure ?? getBoolean(config, "insecure"),
    tlsVerify,
    certDir: o.certDir ?? getPath(config, "cert-dir"),
    caFile: o.caFile ?? getPath(config, "ca-file"),
    concurrency: o.concurrency ?? getInt(config, "concurrency"),
    chunkSize: o.chunkSize ?? getSize(config, "chunk-size"),
    signal: interruptSignal,
  };
}

const ocidirOption = () =>
  new Option("-d, --ocidir <dir>", `local image store (default: ${sarde.defaultOcidir()})`);
const vmdirOption = () =>
  new Option(
    "-o, --vmdir <dir>",
    `folder for imported VMs, one sub-folder each (default: ${sarde.defaultVmdir()})`,
  );
const connectOption = () =>
  new Option("-c, --connect <uri>", "libvirt URI (default: $LIBVIRT_DEFAULT_URI or libvirt's)");

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
      "blobs transferred in parallel (default 4)",
      (v) => parsePositiveInt(v, "--concurrency"),
    )
    .option(
      "--chunk-size <size>",
      "upload in PATCH requests of at most this size, for registries that cap request bodies (e.g. 4MiB)",
      (v) => parseSize(v, "--chunk-size"),
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

function importSettings(o: ImportCli, config: Config) {
  return {
    ...settings(o, config),
    name: o.name ?? getString(config, "name"),
    allowHostResources: o.allowHostResources ?? getBoolean(config, "allow-host-resources"),
    domainType: o.domainType ?? getString(config, "domain-type"),
  };
}

function printImported(r: sarde.ImportResult, o: ImportCli, config: Config) {
  const uuid = o.printUuid ?? getBoolean(config, "print-uuid") ?? false;
  out(`${uuid ? r.uuid : r.name}\n`);
}

/** Builds the command tree; `config` holds the INI values for the command being run. */
export function buildProgram(config: Config = {}): Command {
  const program = new Command()
    .name("sarde")
    .description(
      "Share libvirt/QEMU virtual machines through OCI registries.\n\n" +
        "Results (names, digests, JSON) go to stdout; logs and progress go to stderr.\n" +
        "Defaults come from /etc/sardinecake/sarde.ini and ~/.config/sardinecake/sarde.ini\n" +
        "(or the files in $SARDE_CONF_FILES): [DEFAULT] and a section per command.",
    )
    .version(VERSION, "-V, --version")
    .option("-v, --verbose", "more output (repeatable)", (_, n: number) => n + 1, 0)
    .option("-q, --quiet", "less output (repeatable)", (_, n: number) => n + 1, 0)
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride()
    .configureOutput({ writeErr: (s) => Deno.stderr.writeSync(new TextEncoder().encode(s)) })
    .hook("preAction", (cmd) => {
      const o = cmd.opts() as { verbose: number; quiet: number };
      setVerbosity(
        o.verbose + (getInt(config, "verbose") ?? 0),
        o.quiet + (getInt(config, "quiet") ?? 0),
      );
    });

  addTlsOptions(
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
    ) => {
      const s = settings(o, config);
      const host = parseRegistryHost(registry);
      if (o.password !== undefined && o.passwordStdin) {
        throw new SardeError("usage", "--password and --password-stdin exclude each other");
      }
      if (o.password !== undefined) {
        warn("--password is visible to other users of this machine; prefer --password-stdin");
      }
      const username = o.username ?? getString(config, "username") ??
        await promptLine("Username: ");
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
    .option("--authfile <file>", "credentials file")
    .action(async (registry: string | undefined, o: { all?: boolean; authfile?: string }) => {
      const authfile = o.authfile ?? getPath(config, "authfile");
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
    const r = await sarde.fetch(image, {
      ...settings(o, config),
      source: o.source ?? getString(config, "source"),
    });
    info(summary("fetched", r));
    out(`${r.digest}\n`);
  });

  addTransferOptions(
    program.command("push")
      .description("upload a local image to a registry; prints the manifest digest")
      .argument("<image>", "local image name, e.g. registry.example.org/sardines/debian12:latest")
      .option("-t, --target <ref>", "upload to this reference instead of <image>"),
  ).action(async (image: string, o: CommonCli & { target?: string }) => {
    const r = await sarde.push(image, {
      ...settings(o, config),
      target: o.target ?? getString(config, "target"),
    });
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
    .addOption(ocidirOption())
    .addOption(connectOption())
    .option(
      "--vmconfig <file>",
      "JSON with users and services of the VM (checked against the schema)",
    )
    .option("--libvirtconfig <file>", "read the domain XML from this file instead of libvirt")
    .addOption(
      new Option(
        "--compression <kind>",
        "disk encoding: zstd (fast, default) or gzip (readable by sardinecake 0.4)",
      ).choices(["zstd", "gzip"]),
    )
    .option(
      "--chunksize <size>",
      "zstd: uncompressed chunk size (default 64MiB); gzip: compressed piece size (default: one piece)",
      (v) => parseSize(v, "--chunksize"),
    )
    .option(
      "--zstd-level <n>",
      "zstd level 1-19 (default 2; 3 makes images ~1.5 % smaller for ~40 % more CPU)",
      (v) => {
        const level = parsePositiveInt(v, "--zstd-level");
        if (level > 19) throw new SardeError("usage", `invalid --zstd-level ${v}: 1…19`);
        return level;
      },
    )
    .option("-f, --force", "export even if the VM is running")
    .option(
      "--push",
      "also push the image to its registry, uploading each disk chunk as soon as it is compressed",
    );
  addTlsOptions(exportCmd)
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
    ) => {
      if (image && o.tag && image !== o.tag) {
        throw new SardeError("usage", "give the image name once: either --tag or the argument");
      }
      const s = settings(o, config);
      const compression = o.compression ?? getString(config, "compression") ?? "zstd";
      if (compression !== "zstd" && compression !== "gzip") {
        throw new SardeError("usage", `invalid compression '${compression}' (zstd or gzip)`);
      }
      const r = await sarde.exportVm(vm, image ?? o.tag, {
        ...s,
        vmConfig: o.vmconfig ?? getPath(config, "vmconfig"),
        libvirtConfig: o.libvirtconfig ?? getPath(config, "libvirtconfig"),
        compression,
        chunkSize: o.chunksize ?? getSize(config, "chunksize"),
        zstdLevel: o.zstdLevel ?? getInt(config, "zstd-level"),
        force: o.force ?? getBoolean(config, "force"),
        push: o.push ?? getBoolean(config, "push")
          ? { ...s, chunkSize: getSize(config, "chunk-size") }
          : undefined,
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
    printImported(await sarde.importVm(image, importSettings(o, config)), o, config);
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
    const r = await sarde.pull(image, {
      ...importSettings(o, config),
      source: o.source ?? getString(config, "source"),
    });
    printImported(r, o, config);
  });

  addImportOptions(
    program.command("clone")
      .description(
        "make a new VM with copy-on-write disks from a local image or a defined VM; prints its name",
      )
      .argument("<source>", "local image name or libvirt VM name")
      .argument("<target>", "name of the new VM")
      .addOption(ocidirOption())
      .option("--clonedir <dir>", "folder for the clone's overlays (default: the vmdir)")
      .option("--start", "start the clone")
      .option("--transient", "make a transient VM: started at once, gone when it stops"),
  ).action(
    async (
      source: string,
      target: string,
      o: ImportCli & { clonedir?: string; start?: boolean; transient?: boolean },
    ) => {
      const r = await sarde.clone(source, target, {
        ...importSettings(o, config),
        clonedir: o.clonedir ?? getPath(config, "clonedir"),
        start: o.start ?? getBoolean(config, "start"),
        transient: o.transient ?? getBoolean(config, "transient"),
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
    .addOption(new Option("--format <format>", "output format").choices(["text", "json"]))
    .action(async (o: CommonCli & { format?: string }) => {
      const format = (o.format ?? getString(config, "format") ?? "text").toLowerCase();
      if (format !== "text" && format !== "json") {
        throw new SardeError("usage", `invalid format '${format}' (text or json)`);
      }
      const entries = await sarde.list(settings(o, config));
      out(format === "json" ? JSON.stringify(entries, null, 2) + "\n" : formatImageTable(entries));
    });

  program.command("rm")
    .alias("remove")
    .description("remove cached images (a tag, or a digest) and the blobs only they needed")
    .argument("<image...>", "local image names")
    .addOption(ocidirOption())
    .action(async (images: string[], o: CommonCli) => {
      const s = settings(o, config);
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
    .option("--clonedir <dir>", "also look for leftover clones in this folder")
    .option("--older-than <duration>", "remove what was not used for this long, e.g. 14d, 12h")
    .option(
      "--keep-bytes <size>",
      "then remove until at most this much remains, e.g. 200GiB",
      (v) => parseSize(v, "--keep-bytes"),
    )
    .option("-n, --dry-run", "only say what would be removed")
    .action(
      async (
        o: CommonCli & {
          clonedir?: string;
          olderThan?: string;
          keepBytes?: number;
          dryRun?: boolean;
        },
      ) => {
        const s = settings(o, config);
        const olderThan = o.olderThan ?? getString(config, "older-than");
        const removed = await sarde.prune({
          ...s,
          clonedirs: [o.clonedir ?? getPath(config, "clonedir")].filter(Boolean) as string[],
          olderThanMs: olderThan === undefined
            ? undefined
            : parseDuration(olderThan, "--older-than"),
          keepBytes: o.keepBytes ?? getSize(config, "keep-bytes"),
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
      const c = await sarde.getConfig(image, settings(o, config));
      if (c === undefined) {
        warn(`${image} has no VM config`);
        return;
      }
      out(JSON.stringify(c, null, 2) + "\n");
    });

  return program;
}

/** The sub-command named in `args` (the first word that is not an option). */
function commandName(args: string[]): string | undefined {
  return args.find((a) => !a.startsWith("-"));
}

/** Runs the CLI with `args`; returns the exit code instead of exiting (for tests). */
export async function main(args: string[]): Promise<number> {
  try {
    const command = commandName(args);
    const config = command ? await sardeConfig(command === "ls" ? "list" : command) : {};
    await buildProgram(config).parseAsync(args, { from: "user" });
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
