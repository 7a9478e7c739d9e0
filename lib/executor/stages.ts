/**
 * The GitLab Runner custom executor: every CI job in a fresh copy-on-write clone of a VM image.
 *
 * Stages (GitLab's custom executor contract): `config` prints JSON; `prepare` pulls the job's
 * image through the locked cache, clones and boots a transient VM and waits for SSH; `run`
 * streams GitLab's script into `bash` in the guest; `cleanup` destroys the VM and its overlays.
 * Failures of our own making exit with `SYSTEM_FAILURE_EXIT_CODE`; failures of the job's script,
 * and job-author mistakes in prepare (image missing, refused or unknown), exit with
 * `BUILD_FAILURE_EXIT_CODE` (the script's code in `BUILD_EXIT_CODE_FILE`).
 *
 * Identity: the job id comes from the runner's `JOB_RESPONSE_FILE` (job variables can shadow
 * `CUSTOM_ENV_CI_JOB_ID`), and the VM's name, with a random part, is kept in the runner's per-job
 * TMPDIR, which only this job's stages see. State between stages lives in the job VM's folder
 * (`job.json`, the pinned `known_hosts`); no secret is written there: passwords are read again
 * from the image or the INI in each stage.
 *
 * @module
 */

import { isAbsolute, join } from "node:path";
import { cloneVm } from "../vm/clone.ts";
import {
  atOrigin,
  executorConfig,
  fnmatch,
  getBoolean,
  getList,
  getPath,
  getString,
  parseDuration,
  parsePositiveDuration,
} from "../util/config.ts";
import {
  childElement,
  childElements,
  type DomainDoc,
  QEMU_NS,
  removeElement,
  setVmSize,
  type VmSize,
} from "../vm/domain.ts";
import { type Reservation, reserveRoomForImage } from "../vm/prune.ts";
import { checkMinSize, formatSize, parsePositiveInt, parseSize } from "../util/units.ts";
import { describeError, fail, SardeError } from "../util/errors.ts";
import { exists, processExists, writeFileAtomic } from "../util/fsutil.ts";
import { getVmConfig } from "../oci/images.ts";
import { defaultVmdir, importVm } from "../vm/import.ts";
import {
  type ConnectOptions,
  destroy,
  domainAddresses,
  domainExists,
  domainState,
  hypervisorVersion,
  libvirtVersion,
  undefine,
} from "../vm/libvirt.ts";
import { error, info, warn } from "../util/log.ts";
import { DEFAULT_RESPONSE_TIMEOUT_MS } from "../util/defaults.ts";
import { loadRegistriesConf, resolvePullSources } from "../registry/registries_conf.ts";
import type { TrustOptions } from "../trust/verify.ts";
import { freePort } from "../util/net.ts";
import { pullImage, pullLazily } from "../vm/pull.ts";
import { lazyManifest, lazySessionOf, readLazyState } from "../vm/lazy_pull.ts";
import type { FetchingImage } from "../transfer/transfer.ts";
import { formatLocalName, parseReference } from "../oci/reference.ts";
import { defaultRetryPolicy, sleep } from "../util/retry.ts";
import { sshRun, type SshTarget, waitForSsh } from "./ssh.ts";
import { defaultOcidir, readLocalManifest } from "../oci/store.ts";
import { transportFor } from "../registry/tls.ts";
import { VERSION } from "../util/version.ts";

/** Job VMs are named `sarde-job-<job id>-<random>`; the prefix finds them for reaping. */
export const JOB_VM_PREFIX = "sarde-job-";
const PULL_POLICIES = ["if-not-present", "always", "never"] as const;
type PullPolicy = (typeof PULL_POLICIES)[number];

/** The environment a stage runs in (the runner's variables). */
export type Env = Record<string, string | undefined>;

/** Everything a stage needs, from the INI files (per image) and the runner's job response. */
export interface JobSettings {
  /** The job's id, from the runner's job response file (job variables cannot forge it). */
  jobId: number;
  image?: string;
  /** The pull policy the job asks for (`image: pull_policy:`), if any. */
  jobPullPolicy?: string;
  /** How to reach libvirt (INI `connect`). */
  libvirt: ConnectOptions;
  ocidir: string;
  vmdir: string;
  clonedir: string;
  timeoutMs: number;
  /** `response-timeout`: how long one registry request may wait for an answer. */
  responseTimeoutMs?: number;
  /** `retry-timeout`: how long a registry request is retried in all. */
  retryTimeoutMs?: number;
  prepareScript?: string;
  username?: string;
  password?: string;
  identityFile?: string;
  /** `guest-builds-dir`; unset: the runner's own `builds_dir`. */
  buildsDir?: string;
  /** `guest-cache-dir`; unset: the runner's own `cache_dir`. */
  cacheDir?: string;
  allowedImages?: string[];
  pullPolicies: PullPolicy[];
  network: "user" | "libvirt";
  networkRestrict: boolean;
  maxJobAgeMs: number;
  domainType?: string;
  authfile?: string;
  insecure?: boolean;
  tlsVerify?: boolean;
  certDir?: string;
  /** `registries-conf`: mirrors and blocked registries (containers-registries.conf). */
  registriesConf?: string;
  /** `policy` and `registries.d`: which images must be signed, and where signatures are. */
  trust: TrustOptions;
  /** `vcpus` / `memory`: the job VM's size (unset: the image's). */
  size: VmSize;
  /** `max-vcpus` / `max-memory`: how much a job may ask for with SARDE_VCPUS / SARDE_MEMORY. */
  maxSize: VmSize;
  /** `cache-budget`: bytes cached images and imported VMs may take; unset: no limit. */
  cacheBudgetBytes?: number;
  /** `lazy-pull`: boot job VMs of an image not imported yet while it downloads. */
  lazyPull: boolean;
}

/** What prepare leaves for run, cleanup and the reaper in the job VM's folder. */
interface JobState {
  vm: string;
  jobId: number;
  image: string;
  /** The runner's per-job TMPDIR: the job is over once the runner removed it. */
  tmpDir: string;
  /** The runner process: the job is over once it is gone (it never removes a TMPDIR then). */
  runner?: ProcessId;
  host?: string;
  port?: number;
  user?: string;
  createdAt: number;
  /**
   * The job VM reads its image over NBD from this lazy session (lib/vm/lazy_pull.ts), whose
   * server (`serverPid`) had failed this many demand reads when the VM started.
   */
  lazy?: { session: string; failedReads: number; serverPid?: number };
}

const MAX_JOB_AGE_MS = 24 * 3600_000;

/** A process, told apart from a later one with the same PID by its start time. */
interface ProcessId {
  pid: number;
  /** Field 22 of `/proc/<pid>/stat`: clock ticks after boot. */
  startTime: number;
}

/** What `/proc/<pid>/stat` says about a process; undefined when there is no such process. */
async function procStat(
  pid: number,
): Promise<{ comm: string; ppid: number; startTime: number } | undefined> {
  let text: string;
  try {
    text = await Deno.readTextFile(`/proc/${pid}/stat`);
  } catch {
    return undefined;
  }
  // The name (field 2) is in parentheses and may hold spaces and ')': the rest follows the last.
  const close = text.lastIndexOf(")");
  const rest = text.slice(close + 2).split(" "); // from field 3 on
  return {
    comm: text.slice(text.indexOf("(") + 1, close),
    ppid: Number(rest[4 - 3]),
    startTime: Number(rest[22 - 3]),
  };
}

/**
 * Programs that may stand between the runner and the executor while a stage runs (`sudo -E`, a
 * shell that did not `exec`), and end with the stage: the runner is the first ancestor that is
 * none of them. bin/gitlab-sardinecake-executor `exec`s Deno, so it is not one of the ancestors.
 */
const LAUNCHERS = new Set(["sudo", "doas", "su", "runuser", "timeout", "sh", "bash", "dash"]);

/** The runner process that started this stage, if /proc tells. */
async function runnerProcess(): Promise<ProcessId | undefined> {
  let pid = Deno.ppid;
  for (let depth = 0; depth < 8 && pid > 0; depth++) {
    const st = await procStat(pid);
    if (!st) return undefined;
    if (!LAUNCHERS.has(st.comm)) return { pid, startTime: st.startTime };
    pid = st.ppid;
  }
  return undefined;
}

/**
 * Whether the runner recorded in a job's state still runs: the same PID with the same start time.
 * Unknown (no runner recorded, or no /proc to look in) counts as running: only the TMPDIR decides.
 */
async function runnerAlive(runner: unknown): Promise<boolean> {
  const r = runner as Partial<ProcessId> | undefined;
  if (typeof r?.pid !== "number" || typeof r.startTime !== "number") return true;
  if (!await procStat(Deno.pid)) return true;
  return (await procStat(r.pid))?.startTime === r.startTime;
}

/**
 * Errors the job's author made (no or a refused image, a bad reference, a pull policy the runner
 * does not allow, an image the registry does not have or will not give): build failures, which
 * the runner does not retry, rather than system failures.
 */
const jobFaults = new WeakSet<object>();

function jobFault(err: SardeError): SardeError {
  jobFaults.add(err);
  return err;
}

/** Whether `err` is the job's fault (exit `BUILD_FAILURE_EXIT_CODE`), not the runner's. */
export function isJobFault(err: unknown): boolean {
  return typeof err === "object" && err !== null && jobFaults.has(err);
}

/** What the runner's job response file says about the job. */
interface JobResponse {
  id: number;
  image?: string;
  pullPolicy?: string;
}

/**
 * Reads `JOB_RESPONSE_FILE`, which the runner writes (mode 0600) from GitLab's answer: unlike
 * `CUSTOM_ENV_*`, which job variables can shadow (`variables: {CI_JOB_ID: …}`), it cannot be
 * forged by the job. Without it the job's identity is unknown, and nothing is trusted instead.
 */
function readJobResponse(env: Env): JobResponse {
  const file = env.JOB_RESPONSE_FILE;
  const hint = "gitlab-runner 14.1 or later writes it; job variables are not trusted for this";
  if (!file) throw fail("io", "JOB_RESPONSE_FILE is not set: cannot tell which job this is", hint);
  let doc: Record<string, unknown>;
  try {
    doc = JSON.parse(Deno.readTextFileSync(file));
  } catch (err) {
    throw fail("io", `cannot read the job response file ${file}: ${describeError(err)}`, hint);
  }
  const id = typeof doc?.id === "string" && /^\d+$/.test(doc.id) ? Number(doc.id) : doc?.id;
  if (typeof id !== "number" || !Number.isSafeInteger(id) || id <= 0) {
    throw fail("io", `the job response file ${file} has no job id`, hint);
  }
  const image = doc.image as { name?: unknown; pull_policy?: unknown } | undefined;
  const name = typeof image?.name === "string" ? image.name.trim() : "";
  const p = image?.pull_policy;
  const pullPolicy = Array.isArray(p) ? p[0] : p;
  return {
    id,
    image: name || undefined,
    pullPolicy: typeof pullPolicy === "string" ? pullPolicy : undefined,
  };
}

/** Refuses an INI value, naming its `file:line` and section as `sarde`'s INI errors do. */
function badValue(ini: Record<string, string>, key: string, why: (what: string) => string): never {
  return atOrigin(ini, key, (what) => {
    throw fail("usage", why(what));
  });
}

/**
 * A duration key through the parser of `sarde`'s option of the same name: timeouts must be longer
 * than 0 (`Math.min(…, 0)` would fail every registry request at once), `retry-timeout` may be 0
 * (no retries). Unset or empty: undefined.
 */
function durationValue(
  ini: Record<string, string>,
  key: string,
  parse: (text: string, what: string) => number = parsePositiveDuration,
): number | undefined {
  const text = getString(ini, key)?.trim();
  return text ? atOrigin(ini, key, (what) => parse(text, what)) : undefined;
}

/** The INI values of the executor as {@link JobSettings} (without the job's own values). */
function iniSettings(ini: Record<string, string>): Omit<JobSettings, "jobId" | "jobPullPolicy"> {
  const vmdir = getPath(ini, "vmdir") ?? defaultVmdir();
  const listed = getList(ini, "pull-policy")?.map((p) => p.toLowerCase());
  // Empty means "not set", as for every other key.
  const policies = listed?.length ? listed : ["if-not-present"];
  for (const p of policies) {
    if (!(PULL_POLICIES as readonly string[]).includes(p)) {
      badValue(
        ini,
        "pull-policy",
        (what) => `invalid ${what} '${p}' (${PULL_POLICIES.join(", ")})`,
      );
    }
  }
  const network = (getString(ini, "network")?.trim() || "libvirt").toLowerCase();
  if (!["user", "libvirt", "default"].includes(network)) {
    badValue(ini, "network", (what) => `invalid ${what} '${network}' (user or libvirt)`);
  }
  return {
    image: getString(ini, "image") || undefined,
    libvirt: { connect: getString(ini, "connect") || undefined },
    ocidir: getPath(ini, "ocidir") ?? defaultOcidir(),
    vmdir,
    clonedir: getPath(ini, "clonedir") ?? vmdir,
    timeoutMs: durationValue(ini, "timeout") ?? 300_000,
    responseTimeoutMs: durationValue(ini, "response-timeout"),
    retryTimeoutMs: durationValue(ini, "retry-timeout", parseDuration),
    prepareScript: getPath(ini, "prepare-script"),
    username: getString(ini, "username"),
    password: getString(ini, "password"),
    identityFile: getPath(ini, "identity-file"),
    buildsDir: getString(ini, "guest-builds-dir") || undefined,
    cacheDir: getString(ini, "guest-cache-dir") || undefined,
    allowedImages: getList(ini, "allowed-images"),
    pullPolicies: policies as PullPolicy[],
    network: network === "user" ? "user" : "libvirt",
    networkRestrict: getBoolean(ini, "network-restrict") ?? false,
    maxJobAgeMs: durationValue(ini, "max-job-age") ?? MAX_JOB_AGE_MS,
    domainType: getString(ini, "domain-type") || undefined,
    authfile: getPath(ini, "authfile"),
    insecure: getBoolean(ini, "insecure"),
    tlsVerify: getBoolean(ini, "tls-verify"),
    certDir: getPath(ini, "cert-dir"),
    registriesConf: getPath(ini, "registries-conf"),
    trust: { policy: getPath(ini, "policy"), registriesD: getPath(ini, "registries.d") },
    size: { vcpus: vcpusValue(ini, "vcpus"), memoryBytes: memoryValue(ini, "memory") },
    maxSize: { vcpus: vcpusValue(ini, "max-vcpus"), memoryBytes: memoryValue(ini, "max-memory") },
    cacheBudgetBytes: sizeValue(ini, "cache-budget", 0),
    lazyPull: getBoolean(ini, "lazy-pull") ?? false,
  };
}

/** A VM's memory is at least this: `memory = 4` (4 bytes) is a missing unit. */
const MIN_MEMORY = 16 * 1024 * 1024;

/** A size key (`memory`, `cache-budget`) of at least `min` bytes; unset or empty: undefined. */
function sizeValue(ini: Record<string, string>, key: string, min: number): number | undefined {
  const text = getString(ini, key)?.trim();
  return text
    ? atOrigin(ini, key, (what) => checkMinSize(parseSize(text, what), min, what))
    : undefined;
}

function memoryValue(ini: Record<string, string>, key: string): number | undefined {
  return sizeValue(ini, key, MIN_MEMORY);
}

/** A vcpus key: a whole number ≥ 1; unset or empty: undefined. */
function vcpusValue(ini: Record<string, string>, key: string): number | undefined {
  const text = getString(ini, key)?.trim();
  return text ? atOrigin(ini, key, (what) => parsePositiveInt(text, what)) : undefined;
}

/**
 * The job VM's size: the INI's `vcpus`/`memory` (else the image's), or what the job asks for with
 * `SARDE_VCPUS`/`SARDE_MEMORY` within `max-vcpus`/`max-memory`. These variables are the job's
 * own (CUSTOM_ENV_*): without a `max-*` the admin set, the job may not ask at all. A request that
 * is malformed, above the bound, or not allowed is the job's fault.
 */
export function jobSize(s: Pick<JobSettings, "size" | "maxSize">, env: Env): VmSize {
  const size = { ...s.size };
  const asks: {
    variable: string;
    key: "vcpus" | "memoryBytes";
    ini: string;
    parse: (text: string, what: string) => number;
    show: (n: number) => string;
  }[] = [
    {
      variable: "SARDE_VCPUS",
      key: "vcpus",
      ini: "max-vcpus",
      parse: parsePositiveInt,
      show: String,
    },
    {
      variable: "SARDE_MEMORY",
      key: "memoryBytes",
      ini: "max-memory",
      parse: (text, what) => checkMinSize(parseSize(text, what), MIN_MEMORY, what),
      show: formatSize,
    },
  ];
  for (const a of asks) {
    const text = env[`CUSTOM_ENV_${a.variable}`]?.trim();
    if (!text) continue;
    const max = s.maxSize[a.key];
    if (max === undefined) {
      throw jobFault(fail(
        "usage",
        `the job asks for ${a.variable}=${text}, but this runner does not let jobs choose`,
        `the runner's admin must set ${a.ini} in the executor's INI file to allow it`,
      ));
    }
    let n: number;
    try {
      n = a.parse(text, `job variable ${a.variable}`);
    } catch (err) {
      throw err instanceof SardeError ? jobFault(err) : err;
    }
    if (n > max) {
      throw jobFault(fail(
        "usage",
        `the job asks for ${a.variable}=${text}, above this runner's ${a.ini} of ${a.show(max)}`,
      ));
    }
    size[a.key] = n;
  }
  return size;
}

/** Reads the job response file and the INI files into {@link JobSettings}. */
export async function jobSettings(env: Env): Promise<JobSettings> {
  const job = readJobResponse(env);
  const s = iniSettings(await executorConfig(job.image));
  return { ...s, image: s.image ?? job.image, jobId: job.id, jobPullPolicy: job.pullPolicy };
}

/** File in the runner's per-job TMPDIR naming the VM this job owns. */
const VM_NAME_FILE = ".sarde-job-vm";
const VM_NAME = /^sarde-job-\d+-[0-9a-f]{16}$/;

/**
 * The runner's per-job TMPDIR, where this job's VM name is kept. It must be a folder only this
 * user can write (the runner makes it with mode 0700 and removes it after cleanup), so that
 * nobody else can plant a name there. Run as root through `sudo -E`, the folder is the runner
 * user's: `SUDO_UID` names that user. sudo sets it to the uid of its caller, the runner, and jobs
 * cannot set it (their variables arrive as `CUSTOM_ENV_*`); root trusts that user's folder as the
 * runner itself does.
 */
async function jobTmpDir(env: Env): Promise<string> {
  const dir = env.TMPDIR;
  const hint =
    "gitlab-runner gives every job its own TMPDIR (mode 0700); as root through sudo, keep SUDO_UID";
  if (!dir || !isAbsolute(dir)) throw fail("io", "TMPDIR is not the runner's per-job folder", hint);
  let st: Deno.FileInfo;
  try {
    st = await Deno.lstat(dir);
  } catch (err) {
    throw fail("io", `cannot use TMPDIR ${dir}: ${describeError(err)}`, hint);
  }
  const owners = [Deno.uid()];
  if (Deno.uid() === 0 && /^\d+$/.test(env.SUDO_UID ?? "")) owners.push(Number(env.SUDO_UID));
  if (!st.isDirectory || !owners.includes(st.uid) || ((st.mode ?? 0) & 0o022) !== 0) {
    const mode = ((st.mode ?? 0) & 0o7777).toString(8).padStart(4, "0");
    throw fail(
      "io",
      `TMPDIR ${dir} (owner uid ${st.uid}, mode ${mode}) is not a folder only this user can write`,
      hint,
    );
  }
  return dir;
}

/**
 * The name of the VM this job owns: `sarde-job-<job id>-<random>`, kept in the runner's per-job
 * TMPDIR by the first stage that needs it (config, or prepare without a config stage). The random
 * part makes the name impossible to guess, and since only this job's stages see this TMPDIR, no
 * other job can name — and so remove, or send scripts to — this job's VM, whatever its variables
 * say. Returns undefined when no stage made one yet and `jobId` (to make one) is not given.
 */
async function ownVmName(env: Env, jobId?: number): Promise<string | undefined> {
  const file = join(await jobTmpDir(env), VM_NAME_FILE);
  if (jobId !== undefined) {
    const random = Array.from(crypto.getRandomValues(new Uint8Array(8)))
      .map((b) => b.toString(16).padStart(2, "0")).join("");
    try {
      await Deno.writeTextFile(file, `${JOB_VM_PREFIX}${jobId}-${random}\n`, {
        createNew: true,
        mode: 0o600,
      });
    } catch (err) {
      if (!(err instanceof Deno.errors.AlreadyExists)) {
        throw fail("io", `cannot write ${file}: ${describeError(err)}`);
      }
    }
  }
  let name: string;
  try {
    name = (await Deno.readTextFile(file)).trim();
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw fail("io", `cannot read ${file}: ${describeError(err)}`);
  }
  if (!VM_NAME.test(name)) throw fail("io", `${file} does not name a job VM`);
  return name;
}

/** The VM this job owns, named now if no earlier stage did. */
async function jobVm(env: Env, s: JobSettings): Promise<string> {
  return (await ownVmName(env, s.jobId))!;
}

/** Whether the admin's `allowed-images` patterns admit `image` (no list: everything). */
export function imageAllowed(image: string, patterns: string[] | undefined): boolean {
  return patterns === undefined || patterns.some((p) => fnmatch(p, image));
}

function choosePolicy(s: JobSettings): PullPolicy {
  const wanted = s.jobPullPolicy?.toLowerCase();
  if (!wanted) return s.pullPolicies[0];
  if (!(s.pullPolicies as string[]).includes(wanted)) {
    throw jobFault(fail(
      "usage",
      `the job asks for pull policy '${wanted}', but this runner allows only: ${
        s.pullPolicies.join(", ")
      }`,
    ));
  }
  return wanted as PullPolicy;
}

/** Replaces the clone's network with QEMU user-mode networking that forwards a local port to SSH. */
function userNetworking(
  doc: DomainDoc,
  hostPort: number,
  guestPort: number,
  restrict: boolean,
): void {
  const root = doc.documentElement!;
  const devices = childElement(root, "devices");
  for (const iface of devices ? childElements(devices, "interface") : []) removeElement(iface);
  if (!root.getAttribute("xmlns:qemu")) root.setAttribute("xmlns:qemu", QEMU_NS);
  const cmd = doc.createElementNS(QEMU_NS, "qemu:commandline");
  const netdev = `user,id=sardenet0${
    restrict ? ",restrict=on" : ""
  },hostfwd=tcp:127.0.0.1:${hostPort}-:${guestPort}`;
  // bus/addr pinned: without them qemu takes slot 2, which libvirt gives to a disk.
  for (
    const v of ["-netdev", netdev, "-device", "virtio-net-pci,netdev=sardenet0,bus=pci.0,addr=0x10"]
  ) {
    const arg = doc.createElementNS(QEMU_NS, "qemu:arg");
    arg.setAttribute("value", v);
    cmd.appendChild(arg);
  }
  root.appendChild(cmd);
}

/** SSH credentials: the image's vmconfig `users[0]` first, then the INI. */
async function credentials(
  s: JobSettings,
  image: string,
): Promise<{ user: string; password?: string; port: number }> {
  let config: Record<string, unknown> | undefined;
  try {
    const ref = parseReference(image);
    // While a lazy pull serves it, the store has its blobs but not yet its manifest.
    config = await getVmConfig(s.ocidir, ref, await lazyManifest(s.vmdir, formatLocalName(ref)));
  } catch (err) {
    warn(`cannot read the VM config of ${image}: ${describeError(err)}`);
  }
  const users = Array.isArray(config?.users) ? config!.users as Record<string, unknown>[] : [];
  const services = Array.isArray(config?.services)
    ? config!.services as Record<string, unknown>[]
    : [];
  const ssh = services.find((x) => x?.service === "ssh" && x?.protocol !== "udp");
  const u = users[0];
  const port = typeof ssh?.port === "number"
    ? ssh.port
    : typeof u?.port === "number"
    ? u.port as number
    : 22;
  // sardinecake 0.4's fallback account, unless the admin configured a key.
  const fromImage = typeof u?.username === "string";
  const user = fromImage ? u.username as string : s.username ?? "vagrant";
  const password = fromImage
    ? (typeof u.password === "string" ? u.password : undefined)
    : s.password ?? (s.identityFile ? undefined : "vagrant");
  return { user, password, port };
}

async function readState(jobDir: string): Promise<JobState> {
  try {
    return JSON.parse(await Deno.readTextFile(join(jobDir, "job.json")));
  } catch {
    throw fail(
      "not-found",
      `no prepared VM for this job (${jobDir}/job.json is missing)`,
      "prepare failed or cleanup already ran",
    );
  }
}

async function writeState(jobDir: string, state: JobState): Promise<void> {
  await writeFileAtomic(join(jobDir, "job.json"), JSON.stringify(state, null, 2) + "\n");
}

function target(
  s: JobSettings,
  jobDir: string,
  state: JobState,
  creds: { user: string; password?: string },
): SshTarget {
  return {
    host: state.host ?? "",
    port: state.port ?? 22,
    user: creds.user,
    password: creds.password,
    identityFile: s.identityFile,
    knownHosts: join(jobDir, "known_hosts"),
  };
}

/**
 * Destroys a job VM (transient: gone; persistent: also undefined) and removes its folder.
 * Returns whether there was anything to remove.
 */
async function removeJobVm(
  name: string,
  folder: string,
  libvirt: ConnectOptions,
): Promise<boolean> {
  let found = false;
  if (await domainExists(name, libvirt)) {
    found = true;
    await destroy(name, libvirt).catch((err) => warn(`destroy ${name}: ${describeError(err)}`));
    if (await domainExists(name, libvirt)) {
      await undefine(name, { ...libvirt, nvram: true }).catch((err) =>
        warn(`undefine ${name}: ${describeError(err)}`)
      );
    }
  }
  if (await exists(folder)) {
    found = true;
    await Deno.remove(folder, { recursive: true });
  }
  return found;
}

/**
 * Removes job VMs (and their folders) that crashed runners or failed cleanups left in clonedir.
 * A job VM is left behind only when both hold:
 * - it is older than `max-job-age`, and
 * - its job is over: either the runner's TMPDIR of the job is gone (the runner removes that
 *   folder after the job's cleanup, so no stage of that job will come any more), or the runner
 *   process that ran the job is gone, or another process holds its PID now (a killed or OOM'd
 *   runner never removes the TMPDIR, and /tmp is only cleaned at boot). A job that runs longer
 *   than `max-job-age` still has its TMPDIR and its runner, and is never touched.
 * Folders without `job.json` are skipped: not a job's, or a prepare between clone and state.
 * Job VMs of earlier sarde versions recorded no TMPDIR; they go by age alone, as before.
 */
async function reapOldJobs(
  s: Pick<JobSettings, "clonedir" | "libvirt" | "maxJobAgeMs">,
  own?: string,
): Promise<void> {
  const now = Date.now();
  const names: string[] = [];
  try {
    for await (const e of Deno.readDir(s.clonedir)) {
      if (e.isDirectory && e.name.startsWith(JOB_VM_PREFIX) && e.name !== own) names.push(e.name);
    }
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) {
      warn(`cannot look for old job VMs in ${s.clonedir}: ${describeError(err)}`);
    }
    return;
  }
  for (const name of names) {
    const folder = join(s.clonedir, name);
    let state: Partial<JobState>;
    try {
      state = JSON.parse(await Deno.readTextFile(join(folder, "job.json")));
    } catch {
      continue;
    }
    const age = now - (state.createdAt ?? now);
    if (age <= s.maxJobAgeMs) continue;
    if (
      typeof state.tmpDir === "string" && await exists(state.tmpDir) &&
      await runnerAlive(state.runner)
    ) continue;
    info(`removing job VM ${name}, left behind ${Math.round(age / 60000)} min ago`);
    await removeJobVm(name, folder, s.libvirt).catch((err) =>
      warn(`reaping ${name}: ${describeError(err)}`)
    );
  }
}

/** `config`: the JSON the runner reads (dirs, driver name and versions, shell). */
export async function configStage(env: Env): Promise<Record<string, unknown>> {
  const s = await jobSettings(env);
  const vm = await jobVm(env, s);
  let versions = "";
  try {
    const [lv, hv] = await Promise.all([libvirtVersion(s.libvirt), hypervisorVersion(s.libvirt)]);
    versions = ` (libvirt ${lv.text}, ${hv.name} ${hv.text})`;
  } catch (err) {
    warn(`cannot ask libvirt for its version: ${describeError(err)}`);
  }
  // Without guest-builds-dir/guest-cache-dir, the runner's builds_dir/cache_dir apply.
  return {
    ...(s.buildsDir ? { builds_dir: s.buildsDir } : {}),
    ...(s.cacheDir ? { cache_dir: s.cacheDir } : {}),
    builds_dir_is_shared: false,
    hostname: vm,
    driver: { name: "sarde", version: `${VERSION}${versions}` },
    shell: "bash",
  };
}

const seconds = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

/**
 * The job image's base VM: imported from the local store, or pulled first (download and import
 * at once) as the pull policy says. An image the registry does not have, or refuses to give
 * before its manifest, is the job's fault.
 */
async function baseVm(
  s: JobSettings,
  image: string,
  policy: PullPolicy,
  signal?: AbortSignal,
): Promise<string> {
  const ref = parseReference(image);
  let local: Awaited<ReturnType<typeof readLocalManifest>> | undefined;
  try {
    local = await readLocalManifest(s.ocidir, ref);
  } catch (err) {
    if (!(err instanceof SardeError) || err.kind !== "not-found") throw err;
  }
  if (policy === "never" && !local) {
    throw jobFault(
      fail("not-found", `${image} is not in the local cache and the pull policy is 'never'`),
    );
  }
  const importOptions = { ...s.libvirt, vmdir: s.vmdir, domainType: s.domainType };
  // A lazy pull of the image still downloading: this job joins it rather than wait for it.
  const joinLazy = s.lazyPull && await lazySessionOf(s.vmdir, formatLocalName(ref)) !== undefined;
  if (local && policy !== "always" && !joinLazy) {
    // Its VM may have gone for the budget while the image stayed: the import writes the disks.
    await using _claim = await keepToBudget(s, image, local);
    return (await importVm(image, { ...importOptions, ocidir: s.ocidir, signal })).name;
  }
  info(`pulling ${image}${s.lazyPull ? " lazily" : ""} (pull policy ${policy})`);
  // The pull waits at most `timeout` for the registry: for each answer, and retrying in all. A
  // download that keeps moving is not cut, however long it takes (the timeout is per piece).
  let found = false;
  try {
    const pulled = await (s.lazyPull ? pullLazily : pullImage)(ref, {
      fetch: {
        ...await transportFor(ref.registry, {
          insecure: s.insecure,
          tlsVerify: s.tlsVerify,
          certDir: s.certDir,
        }),
        ocidir: s.ocidir,
        authfile: s.authfile,
        tls: { insecure: s.insecure, tlsVerify: s.tlsVerify, certDir: s.certDir },
        registriesConf: s.registriesConf,
        responseTimeoutMs: Math.min(
          s.responseTimeoutMs ?? DEFAULT_RESPONSE_TIMEOUT_MS,
          s.timeoutMs,
        ),
        retry: {
          maxElapsedMs: Math.min(
            s.retryTimeoutMs ?? defaultRetryPolicy().maxElapsedMs,
            s.timeoutMs,
          ),
        },
      },
      import: importOptions,
      trust: s.trust,
      signal,
      onManifest: () => found = true,
      cacheBudgetBytes: s.cacheBudgetBytes,
    });
    return pulled.name;
  } catch (err) {
    if (!(err instanceof SardeError)) throw err;
    // The job chose an image the runner's policy refuses (unsigned, wrong key or identity): a
    // build failure with the reason. A broken policy file stays a system failure ("usage").
    if (err.kind === "trust") throw jobFault(err);
    if (found) throw err;
    if (err.kind === "not-found") throw jobFault(err);
    // Docker Hub, GHCR and anonymous Harbor refuse (401/403) repositories that do not exist
    // rather than say so: a refusal before the manifest is most likely a wrong image name.
    if (err.kind === "auth") {
      throw jobFault(
        new SardeError("auth", err.message, {
          hint: "does the image exist, and may this runner pull it?",
          cause: err,
        }),
      );
    }
    throw err;
  }
}

/**
 * With `cache-budget`, makes room for what pulling or importing `image` will add (nothing for a
 * VM already imported from it), removing least recently used cached images and VMs.
 */
async function keepToBudget(
  s: JobSettings,
  image: string,
  local: Pick<FetchingImage, "layout" | "descriptor" | "manifest">,
): Promise<Reservation | undefined> {
  if (s.cacheBudgetBytes === undefined) return undefined;
  return await reserveRoomForImage(local, {
    ...s.libvirt,
    ocidir: s.ocidir,
    vmdir: s.vmdir,
    budgetBytes: s.cacheBudgetBytes,
    what: image,
    // Imported under its image ID (the executor names no VM).
    vmFolder: join(s.vmdir, local.manifest.config.digest),
  });
}

/**
 * Refuses an image whose registry registries.conf blocks, even one already in the store: like
 * `allowed-images`, the job chose it (a build failure). A broken registries.conf is the runner's
 * fault and stays a system failure.
 */
async function refuseBlockedImage(image: string, registriesConf?: string): Promise<void> {
  const conf = await loadRegistriesConf({ file: registriesConf });
  try {
    resolvePullSources(conf, parseReference(image));
  } catch (err) {
    throw err instanceof SardeError ? jobFault(err) : err;
  }
}

/** `prepare`: pull, clone, boot, wait for SSH, run the admin's prepare script. */
export async function prepareStage(env: Env, signal?: AbortSignal): Promise<void> {
  const s = await jobSettings(env);
  const vm = await jobVm(env, s);
  const jobDir = join(s.clonedir, vm);
  const image = s.image;
  if (!image) {
    throw jobFault(fail(
      "usage",
      "the job names no image",
      "set image: in .gitlab-ci.yml, or image= in the executor INI",
    ));
  }
  try {
    parseReference(image);
  } catch (err) {
    throw err instanceof SardeError ? jobFault(err) : err;
  }
  if (!imageAllowed(image, s.allowedImages)) {
    throw jobFault(fail(
      "usage",
      `image '${image}' is not allowed on this runner`,
      `allowed-images: ${s.allowedImages!.join(", ")}`,
    ));
  }
  await refuseBlockedImage(image, s.registriesConf);
  const policy = choosePolicy(s);
  const size = jobSize(s, env);
  await reapOldJobs(s, vm);
  // Only a prepare run twice in one TMPDIR finds something here: the name is this job's own.
  if (await removeJobVm(vm, jobDir, s.libvirt)) info(`removed the VM of an earlier prepare`);

  const t0 = Date.now();
  const base = await baseVm(s, image, policy, signal);
  const creds = await credentials(s, image);
  const tPull = Date.now();

  const hostPort = s.network === "user" ? freePort() : creds.port;
  const clone = await cloneVm(base, vm, {
    ...s.libvirt,
    ocidir: s.ocidir,
    vmdir: s.vmdir,
    clonedir: s.clonedir,
    transient: true,
    domainType: s.domainType,
    editXml: (doc) => {
      setVmSize(doc, size);
      if (s.network === "user") userNetworking(doc, hostPort, creds.port, s.networkRestrict);
    },
  });
  // At once: the reaper tells a live job from a left-over one by the TMPDIR recorded here.
  let state: JobState = {
    vm,
    jobId: s.jobId,
    image,
    tmpDir: await Deno.realPath(await jobTmpDir(env)),
    runner: await runnerProcess(),
    createdAt: Date.now(),
    lazy: clone.lazySession ? await lazyBaseline(clone.lazySession) : undefined,
  };
  await writeState(jobDir, state);
  const tClone = Date.now();
  info(
    `started job VM ${vm} from ${image} (pull ${seconds(tPull - t0)}, clone+start ${
      seconds(tClone - tPull)
    })`,
  );

  const host = s.network === "user" ? "127.0.0.1" : await findAddress(s, vm, signal);
  state = { ...state, host, port: hostPort, user: creds.user };
  await writeState(jobDir, state);
  const t = target(s, jobDir, state, creds);
  info(`waiting for SSH on ${host}:${hostPort} as ${creds.user} (timeout ${seconds(s.timeoutMs)})`);
  const waited = await waitForSsh(t, {
    timeoutMs: Math.max(5000, s.timeoutMs - (Date.now() - tClone)),
    signal,
    onWait: (ms, last) => info(`still waiting for SSH after ${seconds(ms)} (${last})`),
    alive: async () => (await domainState(vm, s.libvirt)) === "running",
  });
  info(`SSH is up after ${seconds(waited)}; prepare took ${seconds(Date.now() - t0)}`);

  if (s.prepareScript) {
    let script: Uint8Array;
    try {
      script = await Deno.readFile(s.prepareScript);
    } catch (err) {
      throw fail("usage", `cannot read prepare-script ${s.prepareScript}: ${describeError(err)}`);
    }
    info(`running prepare-script ${s.prepareScript}`);
    const q = (v: string | undefined) => `'${(v ?? "").replaceAll("'", "'\\''")}'`;
    // The job id is the response file's; the project path is informative only (a variable).
    const prologue = `export CI_JOB_ID=${q(String(s.jobId))} CI_JOB_IMAGE=${q(image)} ` +
      `CI_PROJECT_PATH=${q(env.CUSTOM_ENV_CI_PROJECT_PATH)}\n`;
    const stdin = new Uint8Array([...new TextEncoder().encode(prologue), ...script]);
    const r = await sshRun(t, ["bash", "-s"], { stdin, inherit: true, signal });
    if (r.code !== 0) {
      throw fail("external", `prepare-script ${s.prepareScript} failed with exit code ${r.code}`);
    }
  }
}

/** The lazy session in `dir` as a job VM starts on it: which server, how many failed reads. */
async function lazyBaseline(dir: string): Promise<NonNullable<JobState["lazy"]>> {
  const state = await readLazyState(dir);
  return { session: dir, failedReads: state?.failedReads?.count ?? 0, serverPid: state?.pid };
}

/**
 * Why the job VM's reads of its image over NBD may have failed since prepare, or undefined:
 * demand reads the lazy server could not serve (counted in its state; a restarted server counts
 * from 0), or the server gone.
 */
async function lazyTrouble(lazy: NonNullable<JobState["lazy"]>): Promise<string | undefined> {
  const state = await readLazyState(lazy.session);
  if (!state) return undefined; // complete, and left once no VM read from it
  if (!await processExists(state.pid)) return `its lazy pull server (pid ${state.pid}) stopped`;
  const since = state.pid === lazy.serverPid ? lazy.failedReads : 0;
  const failed = (state.failedReads?.count ?? 0) - since;
  if (failed <= 0) return undefined;
  const last = state.failedReads?.last;
  return `${failed} read(s) of the image could not be served by its lazy pull` +
    (last ? ` (last: ${last})` : "");
}

async function findAddress(s: JobSettings, vm: string, signal?: AbortSignal): Promise<string> {
  const deadline = Date.now() + s.timeoutMs;
  while (Date.now() < deadline) {
    for (const source of ["lease", "arp", "agent"] as const) {
      const ips = await domainAddresses(vm, source, s.libvirt);
      if (ips.length) return ips[0];
    }
    await sleep(1000, signal);
  }
  throw fail(
    "network",
    `no IP address for ${vm} after ${seconds(s.timeoutMs)}`,
    "does the VM get a DHCP lease from a libvirt network? (or use network = user)",
  );
}

/** Outcome of a `run` stage: 0, or which failure. */
export type RunOutcome = { kind: "ok" } | { kind: "build"; code: number } | {
  kind: "system";
  message: string;
};

/** `run SCRIPT STAGE`: GitLab's script into `bash` in the guest, output streamed live. */
export async function runStage(
  env: Env,
  scriptPath: string,
  stage: string,
  hooks: { onSpawn?: (child: Deno.ChildProcess) => void } = {},
): Promise<RunOutcome> {
  const s = await jobSettings(env);
  const vm = await ownVmName(env);
  if (!vm) return { kind: "system", message: "no VM was prepared for this job" };
  const jobDir = join(s.clonedir, vm);
  const state = await readState(jobDir);
  if ((await domainState(vm, s.libvirt)) !== "running") {
    return { kind: "system", message: `the job VM ${vm} is not running any more` };
  }
  let script: Uint8Array;
  try {
    script = await Deno.readFile(scriptPath);
  } catch (err) {
    return {
      kind: "system",
      message: `cannot read the ${stage} script ${scriptPath}: ${describeError(err)}`,
    };
  }
  const creds = await credentials(s, state.image);
  const t = target(s, jobDir, state, creds);
  const r = await sshRun(t, ["bash", "-s"], {
    stdin: script,
    inherit: true,
    onSpawn: hooks.onSpawn,
  });
  if (r.code === 0) return { kind: "ok" };
  // The guest got I/O errors for reads of its image the lazy pull could not serve: the job
  // failed for the runner's reasons, and a retry on a healthy registry may pass.
  const trouble = state.lazy && await lazyTrouble(state.lazy);
  if (trouble) {
    return {
      kind: "system",
      message: `${stage} failed (exit ${r.code}) after ${trouble}; see ` +
        join(state.lazy!.session, "server.log"),
    };
  }
  // 255 is ssh's own failure, 1–6 may be sshpass's (5: password refused, 6: host key changed);
  // a script can exit with those too, so ask the guest whether it still lets us in.
  if (r.code === 255 || (t.password !== undefined && r.code <= 6)) {
    const alive = (await domainState(vm, s.libvirt)) === "running" &&
      (await sshRun(t, ["true"]).catch(() => ({ code: 255 }))).code === 0;
    if (!alive) {
      return {
        kind: "system",
        message: `lost the connection to the job VM ${vm} during ${stage} (ssh exit ${r.code})`,
      };
    }
  }
  return { kind: "build", code: r.code };
}

/** The settings cleanup can still use when the job's are unreadable: the INI's, or defaults. */
async function fallbackSettings(): Promise<Omit<JobSettings, "jobId" | "jobPullPolicy">> {
  try {
    return iniSettings(await executorConfig());
  } catch {
    return iniSettings({});
  }
}

/** `cleanup`: destroy the job VM and its overlays; also reap old job VMs. Never fails. */
export async function cleanupStage(env: Env): Promise<void> {
  let s: Omit<JobSettings, "jobId" | "jobPullPolicy">;
  try {
    s = await jobSettings(env);
  } catch (err) {
    warn(`cleanup: ${describeError(err)}; using the [DEFAULT] settings`);
    s = await fallbackSettings();
  }
  let vm: string | undefined;
  try {
    vm = await ownVmName(env);
  } catch (err) {
    warn(`cleanup: ${describeError(err)}`);
  }
  if (vm && await removeJobVm(vm, join(s.clonedir, vm), s.libvirt)) info(`removed job VM ${vm}`);
  await reapOldJobs(s, vm);
}

/** Destroys this job's VM at once (the job was cancelled); returns its name if there was one. */
export async function destroyJobVm(env: Env): Promise<string | undefined> {
  const vm = await ownVmName(env);
  if (!vm) return undefined;
  const { libvirt } = await jobSettings(env).catch(fallbackSettings);
  if (!await domainExists(vm, libvirt)) return undefined;
  await destroy(vm, libvirt);
  return vm;
}

/** Exit codes the runner gave us. */
export function exitCodes(env: Env): { build: number; system: number } {
  const n = (v: string | undefined, d: number) => (v && /^\d+$/.test(v) ? Number(v) : d);
  return { build: n(env.BUILD_FAILURE_EXIT_CODE, 1), system: n(env.SYSTEM_FAILURE_EXIT_CODE, 2) };
}

/** Reports a failure on stderr in one line plus a hint. */
export function reportFailure(err: unknown): void {
  if (err instanceof SardeError) {
    error(err.message);
    if (err.hint) Deno.stderr.writeSync(new TextEncoder().encode(`hint: ${err.hint}\n`));
  } else {
    error(`unexpected failure: ${err instanceof Error ? err.stack ?? err.message : String(err)}`);
  }
}
