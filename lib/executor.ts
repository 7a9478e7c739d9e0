/**
 * The GitLab Runner custom executor: every CI job in a fresh copy-on-write clone of a VM image.
 *
 * Stages (GitLab's custom executor contract): `config` prints JSON; `prepare` pulls the job's
 * image through the locked cache, clones and boots a transient VM and waits for SSH; `run`
 * streams GitLab's script into `bash` in the guest; `cleanup` destroys the VM and its overlays.
 * Failures of our own making exit with `SYSTEM_FAILURE_EXIT_CODE`, failures of the job's script
 * with `BUILD_FAILURE_EXIT_CODE` (the script's code in `BUILD_EXIT_CODE_FILE`).
 *
 * State between stages lives in the job VM's folder (`job.json`, the pinned `known_hosts`); no
 * secret is written there: passwords are read again from the image or the INI in each stage.
 *
 * @module
 */

import { freePort } from "./net.ts";
import { join } from "node:path";
import { cloneVm } from "./clone.ts";
import {
  executorConfig,
  fnmatch,
  getBoolean,
  getDuration,
  getList,
  getPath,
  getString,
} from "./config.ts";
import { childElement, childElements, type DomainDoc, QEMU_NS, removeElement } from "./domain.ts";
import { describeError, fail, SardeError } from "./errors.ts";
import { exists, writeFileAtomic } from "./fsutil.ts";
import { getVmConfig } from "./images.ts";
import { defaultVmdir, importVm } from "./import.ts";
import {
  type ConnectOptions,
  destroy,
  domainAddresses,
  domainExists,
  domainState,
  hypervisorVersion,
  libvirtVersion,
  listDomains,
  undefine,
} from "./libvirt.ts";
import { error, info, warn } from "./log.ts";
import { parseReference } from "./reference.ts";
import { sleep } from "./retry.ts";
import { sshRun, type SshTarget, waitForSsh } from "./ssh.ts";
import { defaultOcidir } from "./store.ts";
import { transportFor } from "./tls.ts";
import { VERSION } from "./version.ts";
import { fetchImage, readLocalManifest } from "./transfer.ts";

/** Job VMs are named `sarde-job-<runner>-<job id>`; the prefix finds them for reaping. */
export const JOB_VM_PREFIX = "sarde-job-";
const PULL_POLICIES = ["if-not-present", "always", "never"] as const;
type PullPolicy = (typeof PULL_POLICIES)[number];

/** The environment a stage runs in (the runner's variables). */
export type Env = Record<string, string | undefined>;

/** Everything a stage needs, from the INI files (per image) and the runner's environment. */
export interface JobSettings {
  image?: string;
  vmName: string;
  connect: ConnectOptions;
  ocidir: string;
  vmdir: string;
  clonedir: string;
  jobDir: string;
  timeoutMs: number;
  prepareScript?: string;
  username?: string;
  password?: string;
  identityFile?: string;
  buildsDir: string;
  cacheDir: string;
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
}

/** What prepare leaves for run and cleanup in the job folder. */
interface JobState {
  vm: string;
  image: string;
  host: string;
  port: number;
  user: string;
  createdAt: number;
}

function jobImage(env: Env): string | undefined {
  // The job response file cannot be shadowed by job variables, unlike CUSTOM_ENV_CI_JOB_IMAGE.
  const file = env.JOB_RESPONSE_FILE;
  if (file) {
    try {
      const name = JSON.parse(Deno.readTextFileSync(file))?.image?.name;
      if (typeof name === "string" && name.trim()) return name.trim();
    } catch { /* fall back to the variable */ }
  }
  const v = env.CUSTOM_ENV_CI_JOB_IMAGE ?? env.CI_JOB_IMAGE;
  return v?.trim() || undefined;
}

function jobPullPolicy(env: Env): string | undefined {
  const file = env.JOB_RESPONSE_FILE;
  if (file) {
    try {
      const p = JSON.parse(Deno.readTextFileSync(file))?.image?.pull_policy;
      if (Array.isArray(p) && typeof p[0] === "string") return p[0];
      if (typeof p === "string") return p;
    } catch { /* no policy from the job */ }
  }
  return env.CUSTOM_ENV_SARDE_PULL_POLICY?.trim() || undefined;
}

/** The job VM's name: unique per runner and job, and recognisable for reaping. */
export function jobVmName(env: Env): string {
  const runner = env.CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN || env.CUSTOM_ENV_CI_RUNNER_ID || "runner";
  const job = env.CUSTOM_ENV_CI_JOB_ID ?? env.CI_JOB_ID;
  if (!job) throw fail("usage", "no job id (CUSTOM_ENV_CI_JOB_ID) in the environment");
  return `${JOB_VM_PREFIX}${runner}-${job}`.replace(/[^A-Za-z0-9_.-]/g, "_");
}

/** Reads the INI files and the environment into {@link JobSettings}. */
export async function jobSettings(env: Env): Promise<JobSettings> {
  let image = jobImage(env);
  const ini = await executorConfig(image);
  image = getString(ini, "image") || image;
  const vmName = jobVmName(env);
  const vmdir = getPath(ini, "vmdir") ?? defaultVmdir();
  const clonedir = getPath(ini, "clonedir") ?? vmdir;
  const policies = (getList(ini, "pull-policy") ?? ["if-not-present"]).map((p) => p.toLowerCase());
  for (const p of policies) {
    if (!(PULL_POLICIES as readonly string[]).includes(p)) {
      throw fail(
        "usage",
        `invalid pull-policy '${p}' in the executor INI (if-not-present, always or never)`,
      );
    }
  }
  const network = (getString(ini, "network") ?? "libvirt").toLowerCase();
  if (!["user", "libvirt", "default"].includes(network)) {
    throw fail("usage", `invalid network '${network}' in the executor INI (user or libvirt)`);
  }
  return {
    image,
    vmName,
    connect: { uri: getString(ini, "connect") || undefined },
    ocidir: getPath(ini, "ocidir") ?? defaultOcidir(),
    vmdir,
    clonedir,
    jobDir: join(clonedir, vmName),
    timeoutMs: getDuration(ini, "timeout") ?? 300_000,
    prepareScript: getPath(ini, "prepare-script"),
    username: getString(ini, "username"),
    password: getString(ini, "password"),
    identityFile: getPath(ini, "identity-file"),
    buildsDir: getString(ini, "guest-builds-dir") ?? "/builds",
    cacheDir: getString(ini, "guest-cache-dir") ?? "/cache",
    allowedImages: getList(ini, "allowed-images"),
    pullPolicies: policies as PullPolicy[],
    network: network === "user" ? "user" : "libvirt",
    networkRestrict: getBoolean(ini, "network-restrict") ?? false,
    maxJobAgeMs: getDuration(ini, "max-job-age") ?? 24 * 3600_000,
    domainType: getString(ini, "domain-type") || undefined,
    authfile: getPath(ini, "authfile"),
    insecure: getBoolean(ini, "insecure"),
    tlsVerify: getBoolean(ini, "tls-verify"),
    certDir: getPath(ini, "cert-dir"),
  };
}

/** Whether the admin's `allowed-images` patterns admit `image` (no list: everything). */
export function imageAllowed(image: string, patterns: string[] | undefined): boolean {
  return patterns === undefined || patterns.some((p) => fnmatch(p, image));
}

function choosePolicy(s: JobSettings, env: Env): PullPolicy {
  const wanted = jobPullPolicy(env)?.toLowerCase();
  if (!wanted) return s.pullPolicies[0];
  if (!(s.pullPolicies as string[]).includes(wanted)) {
    throw fail(
      "usage",
      `the job asks for pull policy '${wanted}', but this runner allows only: ${
        s.pullPolicies.join(", ")
      }`,
    );
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
    config = await getVmConfig(s.ocidir, parseReference(image));
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

async function readState(s: JobSettings): Promise<JobState> {
  try {
    return JSON.parse(await Deno.readTextFile(join(s.jobDir, "job.json")));
  } catch {
    throw fail(
      "not-found",
      `no prepared VM for this job (${s.jobDir}/job.json is missing)`,
      "prepare failed or cleanup already ran",
    );
  }
}

function target(
  s: JobSettings,
  state: JobState,
  creds: { user: string; password?: string },
): SshTarget {
  return {
    host: state.host,
    port: state.port,
    user: creds.user,
    password: creds.password,
    identityFile: s.identityFile,
    knownHosts: join(s.jobDir, "known_hosts"),
  };
}

/** Destroys a job VM (transient: gone; persistent: also undefined) and removes its folder. */
async function removeJobVm(name: string, folder: string, connect: ConnectOptions): Promise<void> {
  if (await domainExists(name, connect)) {
    await destroy(name, connect).catch((err) => warn(`destroy ${name}: ${describeError(err)}`));
    if (await domainExists(name, connect)) {
      await undefine(name, { ...connect, nvram: true }).catch((err) =>
        warn(`undefine ${name}: ${describeError(err)}`)
      );
    }
  }
  if (await exists(folder)) await Deno.remove(folder, { recursive: true });
}

/** Removes job VMs older than `max-job-age` that crashed runners left behind. */
async function reapOldJobs(s: JobSettings): Promise<void> {
  const now = Date.now();
  let names: string[] = [];
  try {
    names = (await listDomains({ ...s.connect, all: true })).filter((n) =>
      n.startsWith(JOB_VM_PREFIX) && n !== s.vmName
    );
  } catch (err) {
    warn(`cannot list VMs to reap old jobs: ${describeError(err)}`);
    return;
  }
  for (const name of names) {
    const folder = join(s.clonedir, name);
    let created = 0;
    try {
      created = JSON.parse(await Deno.readTextFile(join(folder, "job.json"))).createdAt ?? 0;
    } catch {
      continue; // not ours, or still being prepared
    }
    if (now - created > s.maxJobAgeMs) {
      info(`removing job VM ${name}, left behind ${Math.round((now - created) / 60000)} min ago`);
      await removeJobVm(name, folder, s.connect).catch((err) =>
        warn(`reaping ${name}: ${describeError(err)}`)
      );
    }
  }
}

/** `config`: the JSON the runner reads (dirs, driver name and versions, shell). */
export async function configStage(env: Env): Promise<Record<string, unknown>> {
  const s = await jobSettings(env);
  let versions = "";
  try {
    const [lv, hv] = await Promise.all([libvirtVersion(s.connect), hypervisorVersion(s.connect)]);
    versions = ` (libvirt ${lv.text}, ${hv.name} ${hv.text})`;
  } catch (err) {
    warn(`cannot ask libvirt for its version: ${describeError(err)}`);
  }
  return {
    builds_dir: s.buildsDir,
    cache_dir: s.cacheDir,
    builds_dir_is_shared: false,
    hostname: s.vmName,
    driver: { name: "sarde", version: `${VERSION}${versions}` },
    shell: "bash",
  };
}

const seconds = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

/** `prepare`: pull, clone, boot, wait for SSH, run the admin's prepare script. */
export async function prepareStage(env: Env, signal?: AbortSignal): Promise<void> {
  const s = await jobSettings(env);
  const image = s.image;
  if (!image) {
    throw fail(
      "usage",
      "the job names no image",
      "set image: in .gitlab-ci.yml, or image= in the executor INI",
    );
  }
  const ref = parseReference(image);
  if (!imageAllowed(image, s.allowedImages)) {
    throw fail(
      "usage",
      `image '${image}' is not allowed on this runner`,
      `allowed-images: ${s.allowedImages!.join(", ")}`,
    );
  }
  const policy = choosePolicy(s, env);
  await reapOldJobs(s);
  if (await domainExists(s.vmName, s.connect) || await exists(s.jobDir)) {
    info(`removing the VM of an earlier attempt of this job`);
    await removeJobVm(s.vmName, s.jobDir, s.connect);
  }

  const t0 = Date.now();
  let local = false;
  try {
    await readLocalManifest(s.ocidir, ref);
    local = true;
  } catch (err) {
    if (!(err instanceof SardeError) || err.kind !== "not-found") throw err;
  }
  if (policy === "never" && !local) {
    throw fail("not-found", `${image} is not in the local cache and the pull policy is 'never'`);
  }
  if (policy === "always" || !local) {
    info(`pulling ${image} (pull policy ${policy})`);
    await fetchImage(ref, {
      ...await transportFor(ref.registry, {
        insecure: s.insecure,
        tlsVerify: s.tlsVerify,
        certDir: s.certDir,
      }),
      ocidir: s.ocidir,
      authfile: s.authfile,
      signal,
    });
  }
  const base = await importVm(image, {
    ...s.connect,
    ocidir: s.ocidir,
    vmdir: s.vmdir,
    domainType: s.domainType,
    signal,
  });
  const creds = await credentials(s, image);
  const tPull = Date.now();

  const hostPort = s.network === "user" ? freePort() : creds.port;
  await cloneVm(base.name, s.vmName, {
    ...s.connect,
    ocidir: s.ocidir,
    vmdir: s.vmdir,
    clonedir: s.clonedir,
    transient: true,
    domainType: s.domainType,
    editXml: s.network === "user"
      ? (doc) => userNetworking(doc, hostPort, creds.port, s.networkRestrict)
      : undefined,
  });
  const tClone = Date.now();
  info(
    `started job VM ${s.vmName} from ${image} (pull ${seconds(tPull - t0)}, clone+start ${
      seconds(tClone - tPull)
    })`,
  );

  let host = "127.0.0.1";
  if (s.network !== "user") host = await findAddress(s, signal);
  const state: JobState = {
    vm: s.vmName,
    image,
    host,
    port: hostPort,
    user: creds.user,
    createdAt: Date.now(),
  };
  await writeFileAtomic(join(s.jobDir, "job.json"), JSON.stringify(state, null, 2) + "\n");
  const t = target(s, state, creds);
  info(`waiting for SSH on ${host}:${hostPort} as ${creds.user} (timeout ${seconds(s.timeoutMs)})`);
  const waited = await waitForSsh(t, {
    timeoutMs: Math.max(5000, s.timeoutMs - (Date.now() - tClone)),
    signal,
    onWait: (ms, last) => info(`still waiting for SSH after ${seconds(ms)} (${last})`),
    alive: async () => (await domainState(s.vmName, s.connect)) === "running",
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
    const prologue = `export CI_JOB_ID=${q(env.CUSTOM_ENV_CI_JOB_ID)} CI_JOB_IMAGE=${q(image)} ` +
      `CI_PROJECT_PATH=${q(env.CUSTOM_ENV_CI_PROJECT_PATH)}\n`;
    const stdin = new Uint8Array([...new TextEncoder().encode(prologue), ...script]);
    const r = await sshRun(t, ["bash", "-s"], { stdin, inherit: true, signal });
    if (r.code !== 0) {
      throw fail("external", `prepare-script ${s.prepareScript} failed with exit code ${r.code}`);
    }
  }
}

async function findAddress(s: JobSettings, signal?: AbortSignal): Promise<string> {
  const deadline = Date.now() + s.timeoutMs;
  while (Date.now() < deadline) {
    for (const source of ["lease", "arp", "agent"] as const) {
      const ips = await domainAddresses(s.vmName, source, s.connect);
      if (ips.length) return ips[0];
    }
    await sleep(1000, signal);
  }
  throw fail(
    "network",
    `no IP address for ${s.vmName} after ${seconds(s.timeoutMs)}`,
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
  const state = await readState(s);
  if ((await domainState(s.vmName, s.connect)) !== "running") {
    return { kind: "system", message: `the job VM ${s.vmName} is not running any more` };
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
  const t = target(s, state, creds);
  const r = await sshRun(t, ["bash", "-s"], {
    stdin: script,
    inherit: true,
    onSpawn: hooks.onSpawn,
  });
  if (r.code === 0) return { kind: "ok" };
  // 255 is ssh's own failure, 1–6 may be sshpass's (5: password refused, 6: host key changed);
  // a script can exit with those too, so ask the guest whether it still lets us in.
  if (r.code === 255 || (t.password !== undefined && r.code <= 6)) {
    const alive = (await domainState(s.vmName, s.connect)) === "running" &&
      (await sshRun(t, ["true"]).catch(() => ({ code: 255 }))).code === 0;
    if (!alive) {
      return {
        kind: "system",
        message:
          `lost the connection to the job VM ${s.vmName} during ${stage} (ssh exit ${r.code})`,
      };
    }
  }
  return { kind: "build", code: r.code };
}

/** `cleanup`: destroy the job VM and its overlays; also reap old job VMs. Never fails. */
export async function cleanupStage(env: Env): Promise<void> {
  let s: JobSettings;
  try {
    s = await jobSettings(env);
  } catch (err) {
    // Without usable settings, fall back to the defaults so the VM still goes.
    warn(`cleanup: ${describeError(err)}; using default folders`);
    const vmdir = defaultVmdir();
    const vmName = jobVmName(env);
    s = {
      vmName,
      jobDir: join(vmdir, vmName),
      clonedir: vmdir,
      connect: {},
      maxJobAgeMs: 24 * 3600_000,
    } as JobSettings;
  }
  await removeJobVm(s.vmName, s.jobDir, s.connect);
  info(`removed job VM ${s.vmName}`);
  await reapOldJobs(s);
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
