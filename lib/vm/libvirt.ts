/**
 * Thin wrappers around `virsh` (libvirt 9.0 on Debian 12).
 *
 * Every call runs `virsh [-c URI] COMMAND --domain NAME …` through `Deno.Command` with an argv
 * array (no shell, so names with `:`, spaces, quotes or a leading `-` are passed intact),
 * `LC_ALL=C` and stdin closed. The URI comes from {@link ConnectOptions.connect}, else from
 * `LIBVIRT_DEFAULT_URI`, else nothing is passed and libvirt picks its default (`uri_default` in
 * libvirt.conf, then `qemu:///system` for root).
 *
 * Failures become one-line {@link SardeError}s: `"not-found"` for a missing domain, `"external"`
 * for everything else; a connection failure carries the hint to start libvirtd. Domain XML is
 * handed to virsh in a private (0600) temp file, never on the command line.
 *
 * Caveat: virsh resolves `--domain X` as an ID first, then a UUID, then a name. A VM whose name is a
 * bare number or a UUID can therefore be shadowed by a running domain with that ID or UUID.
 *
 * @module
 */

import { runProgram } from "../util/command.ts";
import { fail, type SardeError } from "../util/errors.ts";

/** How to reach libvirt. */
export interface ConnectOptions {
  /** Connection URI (`qemu:///system`, `test:///default`, …); see {@link connectOptions}. */
  connect?: string;
}

/** A parsed libvirt or hypervisor version. */
export interface Version {
  major: number;
  minor: number;
  micro: number;
  /** libvirt's encoding: `major * 1_000_000 + minor * 1_000 + micro` (9.0.0 → 9000000). */
  number: number;
  /** As virsh printed it, e.g. `9.0.0`. */
  text: string;
}

/** The hypervisor's name and version, e.g. `QEMU` 7.2.22. */
export interface HypervisorVersion extends Version {
  /** `QEMU`, `TEST`, … */
  name: string;
}

/**
 * A domain's state, simplified from `virsh domstate`:
 * - `running`: running, idle or blocked (the guest is alive);
 * - `paused`: paused by libvirt or the user;
 * - `shutting-down`: `in shutdown` (still running);
 * - `stopped`: `shut off` (a defined, inactive domain);
 * - `crashed`: the guest crashed and qemu is gone;
 * - `suspended`: `pmsuspended` (guest-initiated S3/S4);
 * - `unknown`: `no state` or anything new;
 * - `missing`: no such domain.
 */
export type DomainState =
  | "running"
  | "paused"
  | "shutting-down"
  | "stopped"
  | "crashed"
  | "suspended"
  | "unknown"
  | "missing";

const VIRSH = "virsh";
const CONNECT_HINT = "is libvirtd running? (tools/libvirtd.sh start)";

/** Longest VM name: it also names a folder, and `.NAME.partial-PID-RANDOM` must fit in 255 bytes. */
export const MAX_VM_NAME_BYTES = 200;

/**
 * Checks a VM name chosen by the user (`-n`, a clone target) before anything is done with it; the
 * name becomes a libvirt domain name and a folder name. Returns it unchanged.
 */
export function checkVmName(name: string): string {
  const bad = (why: string, hint?: string) =>
    fail("usage", `invalid VM name '${name}': ${why}`, hint);
  if (!name) throw bad("it is empty");
  const bytes = new TextEncoder().encode(name).length;
  if (bytes > MAX_VM_NAME_BYTES) {
    throw fail(
      "usage",
      `invalid VM name '${name.slice(0, 40)}…': ${bytes} bytes long, at most ${MAX_VM_NAME_BYTES}`,
    );
  }
  // deno-lint-ignore no-control-regex
  if (/[\x00-\x1f\x7f]/.test(name)) throw bad("it contains control characters");
  if (name.includes("/")) throw bad("it contains '/'", "a VM name is one folder name");
  if (name.startsWith(".")) throw bad("it starts with '.'", "such names are sarde's temp folders");
  return name;
}

/**
 * Resolves the connection to use: the given URI, else `LIBVIRT_DEFAULT_URI`, else none (libvirt's
 * default).
 */
export function connectOptions(uri?: string): ConnectOptions {
  if (uri) return { connect: uri };
  const env = Deno.env.get("LIBVIRT_DEFAULT_URI");
  return env ? { connect: env } : {};
}

interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

function describeUri(opts: ConnectOptions): string {
  return connectOptions(opts.connect).connect ?? "libvirt's default URI";
}

function run(opts: ConnectOptions, args: string[]): Promise<RunResult> {
  const uri = connectOptions(opts.connect).connect;
  return runProgram(VIRSH, uri ? ["-c", uri, ...args] : args, "install libvirt-clients");
}

/** virsh's `error: …` lines, prefix removed. */
function errorLines(stderr: string): string[] {
  return stderr.split("\n").map((l) => l.trim()).filter(Boolean).map((l) =>
    l.replace(/^error: /, "")
  );
}

function isConnectFailure(stderr: string): boolean {
  return /failed to connect to the hypervisor|Failed to connect socket|no connection driver available/i
    .test(stderr);
}

function isMissingDomain(stderr: string): boolean {
  return /failed to get domain|Domain not found|no domain with matching/i.test(stderr);
}

/** Turns a failed virsh run into a one-line SardeError. */
function runError(opts: ConnectOptions, what: string, r: RunResult, name?: string): SardeError {
  const lines = errorLines(r.stderr);
  if (isConnectFailure(r.stderr)) {
    const detail = lines.filter((l) => !/failed to connect to the hypervisor/i.test(l)).join("; ");
    return fail(
      "external",
      `virsh: failed to connect to ${describeUri(opts)}${detail ? `: ${detail}` : ""}`,
      CONNECT_HINT,
    );
  }
  if (name !== undefined && isMissingDomain(r.stderr)) {
    return fail("not-found", `VM '${name}' does not exist (libvirt ${describeUri(opts)})`);
  }
  // drop the generic "Failed to define domain from /tmp/…" line when a specific one follows
  const detail = (lines.length > 1 ? lines.slice(1) : lines).join("; ") || "(no message)";
  return fail("external", `virsh ${what} failed (exit ${r.code}): ${detail}`);
}

async function runOk(
  opts: ConnectOptions,
  what: string,
  args: string[],
  name?: string,
): Promise<RunResult> {
  const r = await run(opts, args);
  if (r.code !== 0) throw runError(opts, what, r, name);
  return r;
}

function parseVersion(text: string): Version {
  const m = /^(\d+)\.(\d+)(?:\.(\d+))?/.exec(text);
  if (!m) throw fail("external", `virsh version: cannot parse '${text}'`);
  const major = +m[1], minor = +m[2], micro = +(m[3] ?? 0);
  return { major, minor, micro, number: major * 1_000_000 + minor * 1_000 + micro, text: m[0] };
}

async function versionOutput(opts: ConnectOptions): Promise<string> {
  return (await runOk(opts, "version", ["version", "--daemon"])).stdout;
}

/**
 * The libvirt version of the daemon behind the connection (`Running against daemon:`), falling
 * back to the client library's (`Using library:`) for drivers without a daemon. This is what
 * sardinecake's `getLibVersion()` checks (e.g. `< 9.10.0` → omit `<backingStore>`).
 */
export async function libvirtVersion(opts: ConnectOptions = {}): Promise<Version> {
  const out = await versionOutput(opts);
  const m = /Running against daemon:\s*(\S+)/.exec(out) ??
    /Using library: libvirt\s*(\S+)/.exec(out);
  if (!m) throw fail("external", "virsh version: no libvirt version in its output");
  return parseVersion(m[1]);
}

/** The hypervisor behind the connection (`Running hypervisor: QEMU 7.2.22`). */
export async function hypervisorVersion(opts: ConnectOptions = {}): Promise<HypervisorVersion> {
  const out = await versionOutput(opts);
  const m = /Running hypervisor:\s*(\S+)\s+(\S+)/.exec(out);
  if (!m) throw fail("external", "virsh version: no hypervisor version in its output");
  return { name: m[1], ...parseVersion(m[2]) };
}

/**
 * The domain's XML (`virsh dumpxml`). Use `inactive: true` for exports: the live XML of a running
 * domain has `<backingStore>` chains, aliases and a runtime `id`. Throws `not-found` for a missing
 * domain.
 */
export async function dumpXml(
  name: string,
  opts: ConnectOptions & { inactive?: boolean } = {},
): Promise<string> {
  const args = ["dumpxml", "--domain", name];
  if (opts.inactive) args.push("--inactive");
  return (await runOk(opts, "dumpxml", args, name)).stdout;
}

/** Writes `xml` to a private temp file, runs `fn` with its path, removes the file. */
async function withXmlFile<T>(xml: string, fn: (path: string) => Promise<T>): Promise<T> {
  const path = await Deno.makeTempFile({ prefix: "sarde-domain-", suffix: ".xml" });
  try {
    await Deno.chmod(path, 0o600);
    await Deno.writeTextFile(path, xml);
    return await fn(path);
  } finally {
    await Deno.remove(path).catch(() => {});
  }
}

function definedName(stdout: string, verb: string): string {
  const m = new RegExp(`^Domain '(.*)' ${verb} from `, "m").exec(stdout);
  return m ? m[1] : "";
}

/**
 * Defines (or redefines) a persistent domain from XML text (`virsh define [--validate]`).
 * `validate` checks the XML against libvirt's RNG schema first. Returns the domain's name as
 * libvirt reports it.
 */
export async function defineXml(
  xmlText: string,
  opts: ConnectOptions & { validate?: boolean } = {},
): Promise<string> {
  return await withXmlFile(xmlText, async (file) => {
    const args = ["define", "--file", file];
    if (opts.validate) args.push("--validate");
    const r = await runOk(opts, "define", args);
    return definedName(r.stdout, "defined");
  });
}

/**
 * Starts a transient domain from XML text (`virsh create`): it runs at once and disappears when
 * it stops. Returns the domain's name.
 */
export async function createTransient(
  xmlText: string,
  opts: ConnectOptions & { validate?: boolean } = {},
): Promise<string> {
  return await withXmlFile(xmlText, async (file) => {
    const args = ["create", "--file", file];
    if (opts.validate) args.push("--validate");
    const r = await runOk(opts, "create", args);
    return definedName(r.stdout, "created");
  });
}

/**
 * Removes a persistent domain's definition (`virsh undefine`). A running domain keeps running
 * as a transient one. `nvram: true` also deletes its NVRAM (UEFI vars) file (`--nvram`; harmless
 * without one), `false` keeps it (`--keep-nvram`); when unset libvirt refuses to undefine a domain
 * that has NVRAM. Throws `not-found` for a missing domain.
 */
export async function undefine(
  name: string,
  opts: ConnectOptions & { nvram?: boolean } = {},
): Promise<void> {
  const args = ["undefine", "--domain", name];
  if (opts.nvram === true) args.push("--nvram");
  if (opts.nvram === false) args.push("--keep-nvram");
  await runOk(opts, "undefine", args, name);
}

/** Maps `virsh domstate` output to a {@link DomainState}. */
export function parseDomainState(text: string): DomainState {
  switch (text.trim().toLowerCase()) {
    case "running":
    case "idle":
    case "blocked":
      return "running";
    case "paused":
      return "paused";
    case "in shutdown":
      return "shutting-down";
    case "shut off":
      return "stopped";
    case "crashed":
      return "crashed";
    case "pmsuspended":
      return "suspended";
    default:
      return "unknown";
  }
}

/** The domain's state (`virsh domstate`); `missing` when there is no such domain. */
export async function domainState(name: string, opts: ConnectOptions = {}): Promise<DomainState> {
  const r = await run(opts, ["domstate", "--domain", name]);
  if (r.code !== 0) {
    if (!isConnectFailure(r.stderr) && isMissingDomain(r.stderr)) return "missing";
    throw runError(opts, "domstate", r);
  }
  return parseDomainState(r.stdout);
}

/** Whether a domain (persistent or transient) with this name exists. */
export async function domainExists(name: string, opts: ConnectOptions = {}): Promise<boolean> {
  return (await domainState(name, opts)) !== "missing";
}

/** Domain names (`virsh list --name`): running ones, or with `all` also inactive ones. */
export async function listDomains(
  opts: ConnectOptions & { all?: boolean } = {},
): Promise<string[]> {
  const args = ["list", "--name"];
  if (opts.all) args.push("--all");
  const r = await runOk(opts, "list", args);
  return r.stdout.split("\n").map((l) => l.trim()).filter(Boolean);
}

/** Starts a defined domain (`virsh start`). Throws if it is already running or missing. */
export async function start(name: string, opts: ConnectOptions = {}): Promise<void> {
  await runOk(opts, "start", ["start", "--domain", name], name);
}

/**
 * Hard power-off (`virsh destroy`); a domain that is not running is left alone. A transient
 * domain is gone afterwards. Throws `not-found` for a missing domain.
 */
export async function destroy(name: string, opts: ConnectOptions = {}): Promise<void> {
  const r = await run(opts, ["destroy", "--domain", name]);
  if (r.code === 0) return;
  if (/domain is not running/i.test(r.stderr)) return;
  throw runError(opts, "destroy", r, name);
}

/** The domain's UUID (`virsh domuuid`), lowercase with dashes. */
export async function domainUuid(name: string, opts: ConnectOptions = {}): Promise<string> {
  const r = await runOk(opts, "domuuid", ["domuuid", "--domain", name], name);
  return r.stdout.trim();
}

/**
 * The guest's IPv4 addresses as libvirt knows them (`virsh domifaddr --source SOURCE`):
 * `lease` (libvirt's DHCP), `arp` (the host's neighbour table) or `agent` (QEMU guest agent).
 * An empty list when the source knows nothing (yet).
 */
export async function domainAddresses(
  name: string,
  source: "lease" | "arp" | "agent",
  opts: ConnectOptions = {},
): Promise<string[]> {
  const r = await run(opts, ["domifaddr", "--domain", name, "--source", source]);
  if (r.code !== 0) return [];
  const out: string[] = [];
  for (const line of r.stdout.split("\n")) {
    const m = /\sipv4\s+(\d+\.\d+\.\d+\.\d+)(?:\/\d+)?/.exec(line);
    if (m && !m[1].startsWith("127.")) out.push(m[1]);
  }
  return out;
}
