/**
 * The options that several `sarde` commands share (the store, the VM folder, libvirt, registries,
 * transfers, imports) and the library settings that they become.
 *
 * @module
 */

import { type Command, Option } from "commander";
import * as sarde from "../mod.ts";
import { interruptSignal } from "../lib/util/cleanup.ts";
import { expandHome, parseDuration, parsePositiveDuration } from "../lib/util/config.ts";
import { SardeError } from "../lib/util/errors.ts";
import { osReason } from "../lib/util/fsutil.ts";
import { checkMinSize, parseBoolean, parseIntInRange, parseSize } from "../lib/util/units.ts";
import { pathOption, valueOption } from "./options.ts";
import {
  DEFAULT_CONCURRENCY,
  DEFAULT_RESPONSE_TIMEOUT_MS,
  DEFAULT_RETRY_TIMEOUT_MS,
} from "../lib/util/defaults.ts";

/** The parsed values of the shared options (the command line, which already holds the INI's). */
export interface CommonCli {
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
  registriesConf?: string;
  policy?: string;
  "registries.d"?: string;
}

/** The library options of the parsed command line (which already holds the INI values). */
export function settings(o: CommonCli) {
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
    registriesConf: o.registriesConf,
    policy: o.policy,
    registriesD: o["registries.d"],
    signal: interruptSignal,
  };
}

/** `--ocidir`: the local image store. */
export const ocidirOption = (): Option =>
  pathOption("-d, --ocidir <dir>", `local image store (default: ${sarde.defaultOcidir()})`);

/** `--vmdir`: where imported VMs live. */
export const vmdirOption = (): Option =>
  pathOption(
    "-o, --vmdir <dir>",
    `folder for imported VMs, one sub-folder each (default: ${sarde.defaultVmdir()})`,
  );

/** `--connect`: the libvirt URI. */
export const connectOption = (): Option =>
  new Option("-c, --connect <uri>", "libvirt URI (default: $LIBVIRT_DEFAULT_URI or libvirt's)");

/** Options of the commands that talk to registries: credentials, TLS, deadlines. */
export function addRegistryOptions(cmd: Command): Command {
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
        `give up on a registry request (and retry it) after this long without an answer (default ${
          DEFAULT_RESPONSE_TIMEOUT_MS / 1000
        }s)`,
        parsePositiveDuration,
      ),
    )
    .addOption(
      valueOption(
        "--retry-timeout <duration>",
        `start no retry of a failing request after this long (default ${
          DEFAULT_RETRY_TIMEOUT_MS / 60_000
        }m; 0 = no retries)`,
        (text, what) => parseDuration(text, what),
      ),
    );
}

/**
 * Smallest `--chunk-size`: PATCH requests of a few bytes (`--chunk-size 64`, the unit forgotten)
 * would turn one upload into millions of requests.
 */
const MIN_UPLOAD_PIECE = 64 << 10;

/** Registry options plus the store and the blob transfers. */
export function addTransferOptions(cmd: Command): Command {
  return addRegistryOptions(cmd)
    .addOption(ocidirOption())
    .addOption(
      valueOption(
        "-j, --concurrency <n>",
        `blobs transferred in parallel (default ${DEFAULT_CONCURRENCY})`,
        (text, what) => parseIntInRange(text, what, 1),
      ),
    )
    .addOption(
      valueOption(
        "--chunk-size <size>",
        "upload in PATCH requests of at most this size, for registries that cap request bodies (e.g. 4MiB)",
        (text, what) => checkMinSize(parseSize(text, what), MIN_UPLOAD_PIECE, what),
      ),
    )
    .addOption(
      pathOption(
        "--registries-conf <file>",
        "mirrors and blocked registries, containers-registries.conf(5) (default: $CONTAINERS_REGISTRIES_CONF or /etc/containers/registries.conf, plus registries.conf.d/*.conf)",
      ),
    );
}

/**
 * A path that must exist (`isFile` or a folder), checked when the options are parsed: a typo
 * fails at once, not after the registry was asked for the manifest.
 */
function existingPath(text: string, what: string, file: boolean): string {
  const path = expandHome(text);
  let st: Deno.FileInfo | undefined;
  try {
    st = Deno.statSync(path);
  } catch (err) {
    throw new SardeError("usage", `${what} ${path}: ${osReason(err)}`);
  }
  if (st.isFile !== file) {
    throw new SardeError("usage", `${what} ${path}: not a ${file ? "file" : "folder"}`);
  }
  return path;
}

/** Options of the commands that check images against a trust policy (skopeo's flag names). */
export function addTrustOptions(cmd: Command): Command {
  return cmd
    .addOption(
      valueOption(
        "--policy <file>",
        "trust policy, containers-policy.json(5), checked before anything is stored (default: ~/.config/containers/policy.json or /etc/containers/policy.json; neither: accept all)",
        (text, what) => existingPath(text, what, true),
      ),
    )
    .addOption(
      valueOption(
        "--registries.d <dir>",
        "where signatures are, containers-registries.d(5) *.yaml (default: ~/.config/containers/registries.d or /etc/containers/registries.d)",
        (text, what) => existingPath(text, what, false),
      ),
    );
}

/** Options of the commands that define VMs: where, on which libvirt, under which policy. */
export function addImportOptions(cmd: Command): Command {
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

/** The parsed values of the commands that define VMs (`import`, `pull`, `clone`). */
export interface ImportCli extends CommonCli {
  name?: string;
  printUuid?: boolean;
  allowHostResources?: boolean;
  domainType?: string;
}

/** The library options of the commands that define VMs. */
export function importSettings(o: ImportCli) {
  return {
    ...settings(o),
    name: o.name,
    allowHostResources: o.allowHostResources,
    domainType: o.domainType,
  };
}
