/**
 * A fake gitlab-runner that drives a custom executor through one job the way the real runner
 * (19.x, see /work/shared/reference/gitlab-custom-executor.md) does: argv, environment, per-job
 * TMPDIR, `JOB_RESPONSE_FILE`, `BUILD_EXIT_CODE_FILE`, preparation attempts with cleanup after
 * each failed one, the run sub-stages in GitLab's order with bash scripts shaped like GitLab's,
 * its stop/continue rules, exit-code semantics, cancellation by SIGTERM to the process group,
 * and cleanup whatever happened.
 *
 * ```ts
 * import { runJob } from "./support/runner.ts";
 * const job = await runJob({
 *   image: "127.0.0.1:5000/sardines/tiny:latest",
 *   env: { GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES: ini },
 *   script: ["echo hello", "uname -a"],
 *   afterScript: ["echo bye"],
 * });
 * // job.outcome, job.exitCode, job.calls, job.log, job.config, job.timings
 * ```
 *
 * Deliberate simplifications: only the `bash` shell; `get_sources` behaves like
 * `GIT_STRATEGY: none` (no git, the guests have no network) plus optional commands; cache and
 * artifact stages only print what a runner without `gitlab-runner` in the guest prints; retries
 * of stages 2–4 wait a fixed `stageRetryDelayMs`. Child processes run in a new session (Deno's
 * `detached`), which makes them process-group leaders like the runner's `Setpgid`.
 *
 * Set `SARDE_TEST_VERBOSE=1` to see every call's output live on stderr.
 *
 * @module
 */

import { join } from "node:path";

/** Exit code meaning "the job's script failed" (what the runner sets today). */
export const BUILD_FAILURE_EXIT_CODE = 1;
/** Exit code meaning "the executor/infrastructure failed" (what the runner sets today). */
export const SYSTEM_FAILURE_EXIT_CODE = 2;

/** The `gitlab-sardinecake-executor` launcher (or `SARDE_EXECUTOR_BIN`). */
export const EXECUTOR = Deno.env.get("SARDE_EXECUTOR_BIN") ??
  new URL("../../bin/gitlab-sardinecake-executor", import.meta.url).pathname;

/** Which executable a call ran. */
export type CallKind = "config" | "prepare" | "run" | "cleanup";

/** One line of a call's output, with its arrival time. */
export interface OutputLine {
  /** Milliseconds since the call started. */
  t: number;
  stream: "stdout" | "stderr";
  text: string;
}

/** One invocation of the executor. */
export interface CallResult {
  kind: CallKind;
  /** `config`, `prepare`, `cleanup`, or the run stage name (`build_script`, …). */
  stage: string;
  /** Preparation attempt (1-based) for config/prepare/cleanup-after-failed-attempt; else 0. */
  attempt: number;
  /** Full argv after the program. */
  args: string[];
  /** Exit code as the runner sees it: -1 when the process died of a signal or was abandoned. */
  code: number;
  /** The signal that killed it, if any. */
  signal: Deno.Signal | null;
  stdout: string;
  stderr: string;
  /** stdout and stderr interleaved in arrival order. */
  output: string;
  lines: OutputLine[];
  /** Wall time from spawn to exit, in milliseconds. */
  ms: number;
  /** Milliseconds since the job started when the call started. */
  startedAt: number;
  /** Why the runner terminated it (SIGTERM to its group), if it did. */
  terminated?: "cancel" | "timeout";
  /** Milliseconds from the SIGTERM to the process's exit. */
  exitAfterTermMs?: number;
  /** Whether SIGKILL had to follow the SIGTERM. */
  killed?: boolean;
  /** The process did not die within `forceKillTimeoutMs` after SIGKILL; the runner gave up. */
  abandoned?: boolean;
  /** Something (a child left behind) kept stdout/stderr open after the process exited. */
  outputLeftOpen?: boolean;
  /** The script file passed to a run call (deleted with TMPDIR afterwards). */
  scriptPath?: string;
  /** The script's text (run calls). */
  script?: string;
  /** The TMPDIR/cwd of the call. */
  tmpDir: string;
  /** The environment the call got. */
  env: Record<string, string>;
}

/** What `config_exec` printed, parsed and type-checked like the runner does. */
export interface ConfigOutput {
  builds_dir?: string;
  cache_dir?: string;
  builds_dir_is_shared?: boolean;
  hostname?: string;
  driver?: { name?: string; version?: string };
  job_env?: Record<string, string>;
  shell?: string;
}

/** How the job ended. */
export type JobOutcome = "success" | "script_failure" | "system_failure" | "canceled" | "timeout";

/** Everything {@link runJob} observed. */
export interface JobResult {
  outcome: JobOutcome;
  /** For `script_failure`: the code read from `BUILD_EXIT_CODE_FILE` (1 when it was absent). */
  exitCode?: number;
  /** The runner's error message for a failed job (first error wins). */
  failure?: string;
  /** Stage/executable whose failure decided the outcome. */
  failedStage?: string;
  jobId: number;
  /**
   * The job VM's name as the executor reported it: `hostname` of the last config call that
   * printed one (empty when none did).
   */
  vmName: string;
  runnerShortToken: string;
  /** The fake CI_JOB_TOKEN (also CI_REGISTRY_PASSWORD, inside CI_REPOSITORY_URL). */
  jobToken: string;
  /** Every call, in order. */
  calls: CallResult[];
  /** The job log as GitLab would show it (masked): runner messages + config stderr + prepare + run. */
  log: string;
  /** The runner's own log: cleanup output and warnings (not masked, like the runner's journal). */
  runnerLog: string;
  /** Parsed config output of the last attempt that got that far. */
  config?: ConfigOutput;
  /** Raw stdout of the last config call. */
  configRaw?: string;
  /** Number of preparation attempts made. */
  attempts: number;
  /** Whether preparation succeeded (run stages were called). */
  prepared: boolean;
  /** Project dir used in the scripts (`<builds_dir>/<namespace>/<project>`). */
  projectDir?: string;
  /** First line of `BUILD_EXIT_CODE_FILE` when the job ended (undefined: no file). */
  buildExitCodeFile?: string;
  /** Exit code of the final cleanup call (never changes the outcome). */
  cleanupCode?: number;
  timings: JobTimings;
  /** Errors thrown by hooks (re-thrown by runJob after cleanup unless `collectHookErrors`). */
  hookErrors: unknown[];
}

/** Wall times in milliseconds. */
export interface JobTimings {
  /** config call of the successful (else last) attempt. */
  configMs?: number;
  /** prepare call of the successful (else last) attempt. */
  prepareMs?: number;
  /** From the first config call to the end of the last prepare (attempts, cleanups, waits). */
  preparationTotalMs?: number;
  /** Per run stage (last try of retried stages). */
  stages: Record<string, number>;
  /** The final cleanup call. */
  cleanupMs?: number;
  totalMs: number;
}

/** What hooks get. */
export interface JobContext {
  jobId: number;
  /** The job VM's name so far (see {@link JobResult.vmName}). */
  vmName: string;
  tmpDir: string;
  config?: ConfigOutput;
  calls: CallResult[];
  /** Milliseconds since the job started. */
  elapsed(): number;
}

/** Options of {@link runJob}. */
export interface RunJobOptions {
  /** The executor program. Default {@link EXECUTOR}. */
  executor?: string;
  /** `config_args` etc.: put before the runner's own arguments. */
  configArgs?: string[];
  prepareArgs?: string[];
  runArgs?: string[];
  cleanupArgs?: string[];
  /** Additions to the runner's own environment (e.g. `GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES`). */
  env?: Record<string, string>;
  /** Start from an empty environment plus `env` and PATH/HOME instead of this process's. */
  cleanEnv?: boolean;

  /** `CI_JOB_ID`. Default: unique in this process. */
  jobId?: number;
  /** The job's `image:` (sets `CI_JOB_IMAGE` and `image.name`); none when undefined. */
  image?: string;
  /** The job's `image: pull_policy:` (response file only). */
  pullPolicy?: string[];
  /** `CI_RUNNER_SHORT_TOKEN`. Default: one per process (`st` + 6 hex digits). */
  runnerShortToken?: string;
  /** `CI_RUNNER_ID`. Default 4242. */
  runnerId?: number;
  /** `CI_CONCURRENT_ID` (and `CI_CONCURRENT_PROJECT_ID`). Default 0. */
  concurrentId?: number;
  /** `namespace/project`. Default `sarde/ci-test`. */
  projectPath?: string;
  /** The fake CI_JOB_TOKEN. Default: `glcbt-sardefake_` + 24 random hex digits. */
  jobToken?: string;
  /** Extra job variables (CI/CD variables; they may shadow predefined ones). */
  variables?: Record<string, string>;
  /** Names of variables masked in the job log (CI_JOB_TOKEN, CI_REGISTRY_PASSWORD always are). */
  masked?: string[];
  /** The runner's name, shown as "via NAME" and in the log. Default `sarde-fake-runner`. */
  runnerName?: string;
  /** `[[runners]] builds_dir` / `cache_dir` / `shell`, used when config does not set them. */
  runnerBuildsDir?: string;
  runnerCacheDir?: string;
  runnerShell?: string;

  /** `before_script` lines (run in build_script, before `script`). */
  beforeScript?: string[];
  /** `script` lines. Default `["true"]`. */
  script?: string[];
  /** `after_script` lines; none: after_script is not called. */
  afterScript?: string[];
  /** Commands appended to get_sources (which otherwise does what `GIT_STRATEGY: none` does). */
  getSources?: string[];
  /** Extra job steps after `script` (each called as `step_<name>`). */
  steps?: { name: string; script: string[] }[];
  /** Call restore_cache / archive_cache(_on_failure) (the job has a cache). */
  cache?: boolean;
  /** Call download_artifacts (the job has dependencies with artifacts). */
  downloadArtifacts?: boolean;
  /** Call upload_artifacts_on_success / _on_failure (the job has artifacts). */
  artifacts?: boolean;
  /** `GET_SOURCES_ATTEMPTS` etc. come from `variables`; pause between tries. Default 5000. */
  stageRetryDelayMs?: number;

  /** Preparation attempts (the runner makes 3). Default 1. */
  prepareAttempts?: number;
  /** Pause between attempts. Default 3000 (the runner's). */
  prepareRetryIntervalMs?: number;

  /** `config_exec_timeout` etc. in ms. Default 3 600 000 each (the runner's). */
  configTimeoutMs?: number;
  prepareTimeoutMs?: number;
  cleanupTimeoutMs?: number;
  /** Job timeout: bounds the run stages together (not after_script). Default 3 600 000. */
  jobTimeoutMs?: number;
  /** `RUNNER_AFTER_SCRIPT_TIMEOUT`. Default 300 000. */
  afterScriptTimeoutMs?: number;
  /** `graceful_kill_timeout`: SIGTERM → SIGKILL. Default 600 000 (the runner's). */
  gracefulKillTimeoutMs?: number;
  /** `force_kill_timeout`: SIGKILL → give up. Default 10 000. */
  forceKillTimeoutMs?: number;
  /** How long to keep reading a call's output after it exited. Default 5000. */
  outputDrainMs?: number;

  /**
   * Cancel the job while this stage's call runs (`config`, `prepare`, a run stage name):
   * SIGTERM to its process group `cancelAfterMs` after it started, or `cancelAfterMs` after its
   * output first matched `cancelWhenOutput`. A cancel during a user script stage (build_script,
   * step_*) lets after_script and the on_failure stages run; anywhere else the remaining run
   * stages are skipped. Cleanup always runs.
   */
  cancelDuringStage?: string;
  cancelAfterMs?: number;
  cancelWhenOutput?: RegExp;

  /** Called before the final cleanup (the VM still exists, unless something destroyed it). */
  beforeCleanup?: (ctx: JobContext) => void | Promise<void>;
  /** Called after every call. */
  afterCall?: (call: CallResult, ctx: JobContext) => void | Promise<void>;
  /** Called with each piece of a call's output as it arrives (to react while a call runs). */
  onOutput?: (
    call: { kind: CallKind; stage: string },
    stream: "stdout" | "stderr",
    text: string,
  ) => void;
  /** Keep hook errors in `hookErrors` instead of re-throwing the first one. */
  collectHookErrors?: boolean;
  /** Keep the job's TMPDIRs (normally removed after cleanup, like the runner does). */
  keepTmp?: boolean;
  /** Parent of the TMPDIRs. Default `Deno.makeTempDir`'s. */
  tmpRoot?: string;
  /**
   * Owner (uid) of the TMPDIRs, as when the runner runs as that user and the executor as root
   * through `sudo -E` (needs root). Default: this process's user.
   */
  tmpUid?: number;
  /** Mode of the TMPDIRs. Default 0700 (the runner's). */
  tmpMode?: number;
  /** Echo every call's output live to stderr. Default: `SARDE_TEST_VERBOSE=1`. */
  verbose?: boolean;
}

// ---------------------------------------------------------------------------------------------
// script generation (GitLab's bash shell)

/**
 * Quotes a string as bash ANSI-C `$'…'`, the way gitlab-runner's shell writer does: backslash,
 * quote and control characters escaped, everything else verbatim.
 */
export function bashQuote(s: string): string {
  let out = "$'";
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    if (ch === "\\") out += "\\\\";
    else if (ch === "'") out += "\\'";
    else if (ch === "\n") out += "\\n";
    else if (ch === "\t") out += "\\t";
    else if (ch === "\r") out += "\\r";
    else if (c < 0x20 || c === 0x7f) out += "\\x" + c.toString(16).padStart(2, "0");
    else out += ch;
  }
  return out + "'";
}

/** `echo` of a green `$ command` line, as GitLab prints before each script line. */
function echoCommand(cmd: string): string {
  return `echo ${bashQuote(`\x1b[32;1m$ ${cmd}\x1b[0;m`)}`;
}

function echoInfo(text: string, colour = "32;1"): string {
  return `echo ${bashQuote(`\x1b[${colour}m${text}\x1b[0;m`)}`;
}

/**
 * A whole script as the runner writes it for the bash shell: shebang, TERM trap, errexit and
 * pipefail, and the body run by `eval` in a subshell whose stdin is empty (`: | eval $'…'`).
 */
export function bashScript(bodyLines: string[]): string {
  const body = bodyLines.join("\n") + "\n";
  return [
    "#!/usr/bin/env bash",
    "",
    "trap exit 1 TERM",
    "",
    "if set -o | grep pipefail > /dev/null; then set -o pipefail; fi; set -o errexit",
    "set +o noclobber",
    `: | eval ${bashQuote(body)}`,
    "exit 0",
    "",
  ].join("\n");
}

// ---------------------------------------------------------------------------------------------
// process handling

let jobCounter = 0;
const processToken = "st" + randomHex(3);
const jobIdBase = 100_000 + Math.floor(Math.random() * 800_000);

function randomHex(bytes: number): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(bytes)))
    .map((b) => b.toString(16).padStart(2, "0")).join("");
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

interface Terminator {
  /** Resolves with the reason once a termination was requested. */
  request(reason: "cancel" | "timeout"): void;
}

interface CallSpec {
  kind: CallKind;
  stage: string;
  attempt: number;
  args: string[];
  env: Record<string, string>;
  tmpDir: string;
  timeoutMs: number;
  gracefulKillTimeoutMs: number;
  forceKillTimeoutMs: number;
  outputDrainMs: number;
  cancel?: { afterMs: number; whenOutput?: RegExp };
  verbose: boolean;
  label: string;
  jobStart: number;
  scriptPath?: string;
  script?: string;
  onOutput?: (stream: "stdout" | "stderr", text: string) => void;
}

async function pump(
  stream: ReadableStream<Uint8Array>,
  onText: (text: string) => void,
  stop: Promise<void>,
): Promise<boolean> {
  const reader = stream.getReader();
  const dec = new TextDecoder();
  let stopped = false;
  const stopping = stop.then(() => {
    stopped = true;
    reader.cancel().catch(() => {});
  });
  try {
    while (true) {
      const r = await Promise.race([reader.read(), stopping.then(() => null)]);
      if (r === null || r.done) break;
      const text = dec.decode(r.value, { stream: true });
      if (text) onText(text);
    }
    const rest = dec.decode();
    if (rest) onText(rest);
  } catch { /* cancelled */ }
  return stopped;
}

async function execCall(spec: CallSpec): Promise<CallResult> {
  const start = performance.now();
  const startedAt = Math.round(start - spec.jobStart);
  let stdout = "";
  let stderr = "";
  let output = "";
  const lines: OutputLine[] = [];
  const partial = { stdout: "", stderr: "" };
  const enc = new TextEncoder();
  let cancelArmed = false;
  let terminated: "cancel" | "timeout" | undefined;
  let termAt: number | undefined;
  let killed = false;
  const timers: ReturnType<typeof setTimeout>[] = [];

  const child = new Deno.Command(spec.args[0], {
    args: spec.args.slice(1),
    cwd: spec.tmpDir,
    env: spec.env,
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    detached: true,
  }).spawn();
  const pgid = child.pid;

  const killGroup = (sig: Deno.Signal) => {
    try {
      Deno.kill(-pgid, sig);
    } catch { /* group gone */ }
  };
  let exited = false;
  const terminator: Terminator = {
    request(reason) {
      if (terminated || exited) return;
      terminated = reason;
      termAt = performance.now();
      killGroup("SIGTERM");
      timers.push(setTimeout(() => {
        if (exited) return;
        killed = true;
        killGroup("SIGKILL");
      }, spec.gracefulKillTimeoutMs));
    },
  };

  const onText = (stream: "stdout" | "stderr", text: string) => {
    if (stream === "stdout") stdout += text;
    else stderr += text;
    output += text;
    const t = Math.round(performance.now() - start);
    const parts = (partial[stream] + text).split("\n");
    partial[stream] = parts.pop()!;
    for (const p of parts) lines.push({ t, stream, text: p });
    if (spec.verbose) {
      const prefix = `[${spec.label}${stream === "stderr" ? " !" : ""}] `;
      const shown = text.replace(/\n(?!$)/g, `\n${prefix}`);
      Deno.stderr.writeSync(enc.encode(prefix + shown + (text.endsWith("\n") ? "" : "\n")));
    }
    spec.onOutput?.(stream, text);
    if (spec.cancel?.whenOutput && !cancelArmed && spec.cancel.whenOutput.test(output)) {
      cancelArmed = true;
      timers.push(setTimeout(() => terminator.request("cancel"), spec.cancel.afterMs));
    }
  };

  if (spec.cancel && !spec.cancel.whenOutput) {
    cancelArmed = true;
    timers.push(setTimeout(() => terminator.request("cancel"), spec.cancel.afterMs));
  }
  timers.push(setTimeout(() => terminator.request("timeout"), spec.timeoutMs));

  let drainStop!: () => void;
  const drainSignal = new Promise<void>((r) => (drainStop = r));
  const pumps = Promise.all([
    pump(child.stdout, (t) => onText("stdout", t), drainSignal),
    pump(child.stderr, (t) => onText("stderr", t), drainSignal),
  ]);

  // Wait for the exit; after SIGKILL give the process forceKillTimeoutMs, then abandon it.
  let abandoned = false;
  let status: Deno.CommandStatus | undefined;
  const statusP = child.status.then((s) => {
    exited = true;
    status = s;
  });
  while (!status) {
    await Promise.race([statusP, sleep(250)]);
    if (!status && killed && termAt !== undefined) {
      const since = performance.now() - termAt - spec.gracefulKillTimeoutMs;
      if (since > spec.forceKillTimeoutMs) {
        abandoned = true;
        break;
      }
    }
  }
  const end = performance.now();
  exited = true;
  for (const t of timers) clearTimeout(t);

  // Read what is left; something still holding the pipes open gets outputDrainMs.
  const drainTimer = setTimeout(drainStop, spec.outputDrainMs);
  const [a, b] = await pumps;
  clearTimeout(drainTimer);
  drainStop();
  for (const s of ["stdout", "stderr"] as const) {
    if (partial[s]) lines.push({ t: Math.round(end - start), stream: s, text: partial[s] });
  }
  if (abandoned) {
    try {
      child.kill("SIGKILL");
    } catch { /* gone */ }
  }

  const signal = status?.signal ?? null;
  const code = abandoned || signal !== null ? -1 : status!.code;
  return {
    kind: spec.kind,
    stage: spec.stage,
    attempt: spec.attempt,
    args: spec.args.slice(1),
    code,
    signal,
    stdout,
    stderr,
    output,
    lines,
    ms: Math.round(end - start),
    startedAt,
    terminated,
    exitAfterTermMs: termAt !== undefined ? Math.round(end - termAt) : undefined,
    killed: killed || undefined,
    abandoned: abandoned || undefined,
    outputLeftOpen: a || b || undefined,
    scriptPath: spec.scriptPath,
    script: spec.script,
    tmpDir: spec.tmpDir,
    env: spec.env,
  };
}

// ---------------------------------------------------------------------------------------------
// errors as the runner classifies them

interface StageError {
  kind: "build" | "system" | "config" | "canceled" | "timeout";
  message: string;
  exitCode?: number;
  retryable: boolean;
}

async function readBuildExitCodeFile(path: string): Promise<string | undefined> {
  try {
    return (await Deno.readTextFile(path)).split("\n")[0];
  } catch {
    return undefined;
  }
}

/** Maps a call's exit to the runner's error, or undefined for success. */
async function classify(
  call: CallResult,
  buildExitCodeFile: string,
): Promise<StageError | undefined> {
  if (call.terminated === "cancel") {
    return { kind: "canceled", message: "canceled", retryable: false };
  }
  if (call.terminated === "timeout") {
    return {
      kind: "timeout",
      message: `execution took longer than the timeout (${call.stage})`,
      retryable: false,
    };
  }
  if (call.code === 0) return undefined;
  if (call.code === BUILD_FAILURE_EXIT_CODE) {
    const line = await readBuildExitCodeFile(buildExitCodeFile);
    if (line === undefined) {
      return { kind: "build", message: "exit code 1", exitCode: 1, retryable: false };
    }
    if (!/^\s*-?\d+\s*$/.test(line)) {
      return {
        kind: "system",
        message: `unknown Custom executor build exit code ${JSON.stringify(line)}`,
        retryable: true,
      };
    }
    const n = parseInt(line, 10);
    return { kind: "build", message: `exit code ${n}`, exitCode: n, retryable: false };
  }
  if (call.code === SYSTEM_FAILURE_EXIT_CODE) {
    return { kind: "system", message: `exit status ${call.code}`, retryable: true };
  }
  return {
    kind: "system",
    message: `unknown Custom executor executable exit code ${call.code}`,
    retryable: true,
  };
}

/** Type-checks config output like the runner's JSON decoding into its struct. */
export function parseConfigOutput(stdout: string): ConfigOutput {
  if (stdout.trim() === "") return {};
  const v = JSON.parse(stdout);
  if (v === null || typeof v !== "object" || Array.isArray(v)) {
    throw new Error("not a JSON object");
  }
  const str = (k: string) => {
    if (v[k] !== undefined && v[k] !== null && typeof v[k] !== "string") {
      throw new Error(`${k}: expected a string, got ${JSON.stringify(v[k])}`);
    }
  };
  for (const k of ["builds_dir", "cache_dir", "hostname", "shell"]) str(k);
  if (
    v.builds_dir_is_shared !== undefined && v.builds_dir_is_shared !== null &&
    typeof v.builds_dir_is_shared !== "boolean"
  ) {
    throw new Error(`builds_dir_is_shared: expected a bool`);
  }
  if (v.driver !== undefined && v.driver !== null) {
    if (typeof v.driver !== "object" || Array.isArray(v.driver)) {
      throw new Error("driver: expected an object");
    }
    for (const k of ["name", "version"]) {
      if (v.driver[k] !== undefined && typeof v.driver[k] !== "string") {
        throw new Error(`driver.${k}: expected a string`);
      }
    }
  }
  if (v.job_env !== undefined && v.job_env !== null) {
    if (typeof v.job_env !== "object" || Array.isArray(v.job_env)) {
      throw new Error("job_env: expected an object");
    }
    for (const [k, val] of Object.entries(v.job_env)) {
      if (typeof val !== "string") throw new Error(`job_env.${k}: expected a string`);
    }
  }
  return v as ConfigOutput;
}

// ---------------------------------------------------------------------------------------------
// the job

/** Predefined + custom job variables (what becomes CUSTOM_ENV_* and the scripts' exports). */
function jobVariables(
  o: RunJobOptions,
  ids: { jobId: number; token: string; shortToken: string },
): Record<string, string> {
  const projectPath = o.projectPath ?? "sarde/ci-test";
  const [namespace, project] = [
    projectPath.split("/").slice(0, -1).join("/"),
    projectPath.split("/").at(-1)!,
  ];
  const server = "https://gitlab.example.com";
  const v: Record<string, string> = {
    CI: "true",
    GITLAB_CI: "true",
    CI_SERVER: "yes",
    CI_SERVER_URL: server,
    CI_SERVER_HOST: "gitlab.example.com",
    CI_JOB_ID: String(ids.jobId),
    CI_JOB_NAME: "test",
    CI_JOB_STAGE: "test",
    CI_JOB_URL: `${server}/${projectPath}/-/jobs/${ids.jobId}`,
    CI_JOB_TOKEN: ids.token,
    CI_JOB_TIMEOUT: String(Math.round((o.jobTimeoutMs ?? 3_600_000) / 1000)),
    CI_JOB_STATUS: "running",
    CI_PIPELINE_ID: "777",
    CI_PIPELINE_IID: "7",
    CI_COMMIT_SHA: "0123456789abcdef0123456789abcdef01234567",
    CI_COMMIT_REF_NAME: "main",
    CI_PROJECT_ID: "4711",
    CI_PROJECT_NAME: project,
    CI_PROJECT_NAMESPACE: namespace,
    CI_PROJECT_PATH: projectPath,
    CI_PROJECT_PATH_SLUG: projectPath.toLowerCase().replace(/[^a-z0-9]/g, "-"),
    CI_PROJECT_URL: `${server}/${projectPath}`,
    CI_REPOSITORY_URL: `https://gitlab-ci-token:${ids.token}@gitlab.example.com/${projectPath}.git`,
    CI_REGISTRY: "registry.example.com",
    CI_REGISTRY_USER: "gitlab-ci-token",
    CI_REGISTRY_PASSWORD: ids.token,
    CI_RUNNER_ID: String(o.runnerId ?? 4242),
    CI_RUNNER_SHORT_TOKEN: ids.shortToken,
    CI_RUNNER_DESCRIPTION: o.runnerName ?? "sarde-fake-runner",
    CI_RUNNER_TAGS: '["sarde"]',
    CI_CONCURRENT_ID: String(o.concurrentId ?? 0),
    CI_CONCURRENT_PROJECT_ID: String(o.concurrentId ?? 0),
    CI_SHARED_ENVIRONMENT: "true",
    CI_BUILDS_DIR: "",
    CI_PROJECT_DIR: "",
    GIT_STRATEGY: "none",
  };
  if (o.image !== undefined) v.CI_JOB_IMAGE = o.image;
  return { ...v, ...(o.variables ?? {}) };
}

function jobResponse(
  o: RunJobOptions,
  jobId: number,
  token: string,
  vars: Record<string, string>,
  masked: Set<string>,
) {
  const timeout = Math.round((o.jobTimeoutMs ?? 3_600_000) / 1000);
  const steps = [
    {
      name: "script",
      script: [...(o.beforeScript ?? []), ...(o.script ?? ["true"])],
      timeout,
      when: "on_success",
      allow_failure: false,
    },
    ...(o.steps ?? []).map((s) => ({
      name: s.name,
      script: s.script,
      timeout,
      when: "on_success",
      allow_failure: false,
    })),
  ];
  if (o.afterScript) {
    steps.push({
      name: "after_script",
      script: o.afterScript,
      timeout,
      when: "always",
      allow_failure: true,
    });
  }
  return {
    id: jobId,
    token,
    allow_git_fetch: true,
    job_info: {
      id: jobId,
      name: vars.CI_JOB_NAME,
      stage: vars.CI_JOB_STAGE,
      project_id: Number(vars.CI_PROJECT_ID),
      project_name: vars.CI_PROJECT_NAME,
    },
    git_info: {
      repo_url: vars.CI_REPOSITORY_URL,
      ref: vars.CI_COMMIT_REF_NAME,
      sha: vars.CI_COMMIT_SHA,
      before_sha: "0000000000000000000000000000000000000000",
      ref_type: "branch",
      refspecs: [],
      depth: 20,
    },
    runner_info: { timeout },
    variables: Object.entries(vars).map(([key, value]) => ({
      key,
      value,
      public: !masked.has(key),
      masked: masked.has(key),
    })),
    steps,
    image: o.image === undefined
      ? { name: "" }
      : { name: o.image, ...(o.pullPolicy ? { pull_policy: o.pullPolicy } : {}) },
    services: [],
    artifacts: o.artifacts
      ? [{ name: "", untracked: false, paths: ["out/"], when: "on_success" }]
      : [],
    cache: o.cache ? [{ key: "default", paths: ["cache/"], policy: "pull-push" }] : [],
    credentials: [],
    dependencies: [],
    features: {
      trace_sections: true,
      failure_reasons: ["script_failure", "runner_system_failure"],
    },
  };
}

/**
 * Runs one job against the executor like gitlab-runner would, and returns what happened.
 * Never throws for a failing job; throws only for broken options, or (after cleanup) the first
 * error a hook threw unless `collectHookErrors`.
 */
export async function runJob(opts: RunJobOptions = {}): Promise<JobResult> {
  const jobStart = performance.now();
  const exe = opts.executor ?? EXECUTOR;
  const jobId = opts.jobId ?? jobIdBase + ++jobCounter;
  const shortToken = opts.runnerShortToken ?? processToken;
  const token = opts.jobToken ?? `glcbt-sardefake_${randomHex(12)}`;
  const verbose = opts.verbose ?? Deno.env.get("SARDE_TEST_VERBOSE") === "1";
  const runnerName = opts.runnerName ?? "sarde-fake-runner";
  const masked = new Set(["CI_JOB_TOKEN", "CI_REGISTRY_PASSWORD", ...(opts.masked ?? [])]);
  const vars = jobVariables(opts, { jobId, token, shortToken });
  const maskValues = [...masked].map((k) => vars[k]).filter((v) => v && v.length >= 8);
  const mask = (s: string) => {
    let out = s;
    for (const v of maskValues) out = out.split(v).join("[MASKED]");
    return out;
  };
  let vmName = "";

  const calls: CallResult[] = [];
  const hookErrors: unknown[] = [];
  let log = "";
  let runnerLog = "";
  const logLine = (s: string) => (log += s.endsWith("\n") ? s : s + "\n");
  const runnerLine = (s: string) => (runnerLog += s.endsWith("\n") ? s : s + "\n");
  const timings: JobTimings = { stages: {}, totalMs: 0 };
  const graceful = opts.gracefulKillTimeoutMs ?? 600_000;
  const forceKill = opts.forceKillTimeoutMs ?? 10_000;
  const drain = opts.outputDrainMs ?? 5000;
  const tmpDirs: string[] = [];

  let tmpDir = "";
  let config: ConfigOutput | undefined;
  let configRaw: string | undefined;
  const ctx = (): JobContext => ({
    jobId,
    vmName,
    tmpDir,
    config,
    calls,
    elapsed: () => Math.round(performance.now() - jobStart),
  });

  const baseEnv = (): Record<string, string> => {
    const own = opts.cleanEnv
      ? Object.fromEntries(
        ["PATH", "HOME", "USER", "LANG"].flatMap((k) => {
          const v = Deno.env.get(k);
          return v === undefined ? [] : [[k, v]];
        }),
      )
      : Deno.env.toObject();
    return {
      ...own,
      ...(opts.env ?? {}),
      TMPDIR: tmpDir,
      BUILD_FAILURE_EXIT_CODE: String(BUILD_FAILURE_EXIT_CODE),
      SYSTEM_FAILURE_EXIT_CODE: String(SYSTEM_FAILURE_EXIT_CODE),
      BUILD_EXIT_CODE_FILE: join(tmpDir, "build_exit_code"),
      JOB_RESPONSE_FILE: join(tmpDir, "response.json"),
    };
  };
  const callEnv = (withJobEnv: boolean): Record<string, string> => {
    const env = baseEnv();
    if (withJobEnv) Object.assign(env, config?.job_env ?? {});
    for (const [k, v] of Object.entries(vars)) env[`CUSTOM_ENV_${k}`] = v;
    env.CUSTOM_ENV_CI_JOB_SERVICES = "";
    return env;
  };

  let cancelled = false;
  const call = async (
    kind: CallKind,
    stage: string,
    attempt: number,
    extra: { timeoutMs: number; scriptPath?: string; script?: string; addToLog?: boolean },
  ): Promise<CallResult> => {
    const prefix = {
      config: opts.configArgs,
      prepare: opts.prepareArgs,
      run: opts.runArgs,
      cleanup: opts.cleanupArgs,
    }[kind] ?? [];
    const args = [exe, ...prefix, kind];
    if (kind === "run") args.push(extra.scriptPath!, stage);
    const cancelHere = !cancelled && opts.cancelDuringStage === stage &&
      (opts.cancelAfterMs !== undefined || opts.cancelWhenOutput !== undefined);
    const res = await execCall({
      kind,
      stage,
      attempt,
      args,
      env: callEnv(kind !== "config"),
      tmpDir,
      timeoutMs: extra.timeoutMs,
      gracefulKillTimeoutMs: graceful,
      forceKillTimeoutMs: forceKill,
      outputDrainMs: drain,
      cancel: cancelHere
        ? { afterMs: opts.cancelAfterMs ?? 0, whenOutput: opts.cancelWhenOutput }
        : undefined,
      verbose,
      label: `job ${jobId} ${stage}${attempt > 1 ? ` #${attempt}` : ""}`,
      jobStart,
      scriptPath: extra.scriptPath,
      script: extra.script,
      onOutput: opts.onOutput && ((stream, text) => opts.onOutput!({ kind, stage }, stream, text)),
    });
    if (res.terminated === "cancel") cancelled = true;
    calls.push(res);
    if (kind === "cleanup") {
      if (res.stdout) runnerLine(res.stdout);
      if (res.stderr) runnerLine(res.stderr);
    } else if (kind === "config") {
      if (res.stderr) logLine(mask(res.stderr));
    } else if (extra.addToLog !== false) {
      if (res.output) logLine(mask(res.output));
    }
    if (res.outputLeftOpen) {
      runnerLine(`WARNING: ${stage}: output still open ${drain} ms after the process exited`);
    }
    if (opts.afterCall) {
      try {
        await opts.afterCall(res, ctx());
      } catch (e) {
        hookErrors.push(e);
      }
    }
    return res;
  };

  const newTmpDir = async () => {
    tmpDir = await Deno.makeTempDir({ dir: opts.tmpRoot, prefix: "custom-executor" });
    tmpDirs.push(tmpDir);
    await Deno.writeTextFile(
      join(tmpDir, "response.json"),
      JSON.stringify(jobResponse(opts, jobId, token, vars, masked)),
      { mode: 0o600 },
    );
    if (opts.tmpUid !== undefined) {
      await Deno.chown(tmpDir, opts.tmpUid, null);
      await Deno.chown(join(tmpDir, "response.json"), opts.tmpUid, null);
    }
    if (opts.tmpMode !== undefined) await Deno.chmod(tmpDir, opts.tmpMode);
  };
  const removeTmp = async () => {
    if (!opts.keepTmp) await Deno.remove(tmpDir, { recursive: true }).catch(() => {});
  };
  const cleanupCall = async (attempt: number) => {
    const c = await call("cleanup", "cleanup", attempt, {
      timeoutMs: opts.cleanupTimeoutMs ?? 3_600_000,
    });
    if (c.code !== 0) runnerLine(`WARNING: Cleanup script failed: exit code ${c.code}`);
    return c;
  };

  // ---- preparation attempts
  logLine(`Running with gitlab-runner 19.4.0-fake (sarde tests) on ${runnerName}`);
  logLine(`Preparing the "custom" executor`);
  const attempts = Math.max(1, opts.prepareAttempts ?? 1);
  let prepared = false;
  const st: { error?: StageError & { stage: string } } = {};
  // (a function, so that TypeScript does not narrow what the closures below change)
  const currentError = (): StageError | undefined => st.error;
  let attempt = 0;
  let lastCleanupCode: number | undefined;
  for (attempt = 1; attempt <= attempts; attempt++) {
    await newTmpDir();
    config = undefined;
    vars.CI_BUILDS_DIR = "";
    vars.CI_PROJECT_DIR = "";
    let err: (StageError & { stage: string }) | undefined;
    const cfgCall = await call("config", "config", attempt, {
      timeoutMs: opts.configTimeoutMs ?? 3_600_000,
    });
    configRaw = cfgCall.stdout;
    timings.configMs = cfgCall.ms;
    const cfgErr = await classify(cfgCall, join(tmpDir, "build_exit_code"));
    if (cfgErr) err = { ...cfgErr, stage: "config" };
    else {
      try {
        config = parseConfigOutput(cfgCall.stdout);
        vmName = config.hostname || vmName;
      } catch (e) {
        err = {
          kind: "system",
          message: `error while parsing JSON output: ${(e as Error).message}`,
          retryable: true,
          stage: "config",
        };
      }
    }
    if (!err) {
      const buildsDir = config?.builds_dir ?? opts.runnerBuildsDir;
      const cacheDir = config?.cache_dir ?? opts.runnerCacheDir;
      const shell = config?.shell ?? opts.runnerShell ?? "bash";
      if (!buildsDir) {
        err = {
          kind: "config",
          message: "the builds_dir is not configured",
          retryable: false,
          stage: "config",
        };
      } else if (!cacheDir) {
        err = {
          kind: "config",
          message: "the cache_dir is not configured",
          retryable: false,
          stage: "config",
        };
      } else if (shell !== "bash") {
        err = {
          kind: "system",
          message: `shell ${JSON.stringify(shell)} not supported by the fake runner (bash only)`,
          retryable: !["sh", "pwsh", "powershell"].includes(shell),
          stage: "config",
        };
      } else {
        const projectPath = vars.CI_PROJECT_PATH;
        vars.CI_BUILDS_DIR = buildsDir;
        vars.CI_PROJECT_DIR = config?.builds_dir_is_shared
          ? join(buildsDir, shortToken, vars.CI_CONCURRENT_PROJECT_ID, projectPath)
          : join(buildsDir, projectPath);
        if (config?.driver?.name) {
          logLine(
            `Using Custom executor with driver ${config.driver.name} ${
              config.driver.version ?? ""
            }...`,
          );
        } else logLine("Using Custom executor...");
      }
    }
    if (!err) {
      const prep = await call("prepare", "prepare", attempt, {
        timeoutMs: opts.prepareTimeoutMs ?? 3_600_000,
      });
      timings.prepareMs = prep.ms;
      const e = await classify(prep, join(tmpDir, "build_exit_code"));
      if (e) err = { ...e, stage: "prepare" };
    }
    if (!err) {
      prepared = true;
      break;
    }
    st.error = err;
    const c = await cleanupCall(attempt);
    lastCleanupCode = c.code;
    timings.cleanupMs = c.ms;
    await removeTmp();
    const retry = err.retryable && attempt < attempts && !cancelled;
    if (!retry) break;
    logLine(
      `WARNING: Preparation failed: ${err.message}\nWill be retried in ${
        (opts.prepareRetryIntervalMs ?? 3000) / 1000
      }s ...`,
    );
    await sleep(opts.prepareRetryIntervalMs ?? 3000);
  }
  timings.preparationTotalMs = Math.round(performance.now() - jobStart);

  // ---- run stages
  const projectDir = prepared ? vars.CI_PROJECT_DIR : undefined;
  let buildExitCodeFile: string | undefined;
  if (prepared) {
    st.error = undefined;
    const jobDeadline = performance.now() + (opts.jobTimeoutMs ?? 3_600_000);
    const exports = () => Object.entries(vars).map(([k, v]) => `export ${k}=${bashQuote(v)}`);
    const cdProject = () => `${bashQuote("cd")} ${JSON.stringify(projectDir)}`;

    const runStage = async (
      stage: string,
      body: string[],
      timeoutMs?: number,
    ): Promise<StageError | undefined> => {
      const dir = await Deno.makeTempDir({ dir: tmpDir, prefix: "script" });
      const scriptPath = join(dir, "script");
      const script = bashScript([...exports(), ...body]);
      await Deno.writeTextFile(scriptPath, script, { mode: 0o700 });
      await Deno.chmod(scriptPath, 0o700);
      const left = Math.max(1000, jobDeadline - performance.now());
      const res = await call("run", stage, 0, {
        timeoutMs: timeoutMs ?? left,
        scriptPath,
        script,
      });
      timings.stages[stage] = res.ms;
      return await classify(res, join(tmpDir, "build_exit_code"));
    };
    const attemptsOf = (name: string) =>
      Math.min(10, Math.max(1, parseInt(vars[name] ?? "1", 10) || 1));
    const retried = async (stage: string, body: string[], attemptsVar: string) => {
      let e: StageError | undefined;
      const n = attemptsOf(attemptsVar);
      for (let i = 1; i <= n; i++) {
        if (i > 1) {
          await sleep(opts.stageRetryDelayMs ?? 5000);
          if (stage === "get_sources") {
            await runStage("clear_worktree", [`rm -rf ${JSON.stringify(projectDir)}`]);
          }
        }
        e = await runStage(stage, body);
        if (!e || e.kind === "canceled" || e.kind === "timeout" || cancelled) break;
      }
      return e;
    };
    const fail = (stage: string, e: StageError | undefined) => {
      if (e && !st.error) st.error = { ...e, stage };
      return e;
    };

    logLine("Preparing environment");
    const prepScript = [
      `echo ${bashQuote("Running on ")}"$(hostname)"${bashQuote(` via ${runnerName}...`)}`,
    ];
    const prepErr = fail("prepare_script", await runStage("prepare_script", prepScript));
    if (!prepErr) {
      let userStagesReached = false;
      logLine("Getting source from Git repository");
      let e = fail(
        "get_sources",
        await retried(
          "get_sources",
          [
            echoInfo("Skipping Git repository setup"),
            `mkdir -p ${JSON.stringify(projectDir)}`,
            `mkdir -p ${JSON.stringify(projectDir + ".tmp")}`,
            cdProject(),
            ...(opts.getSources ?? []).flatMap((c) => [echoCommand(c), c]),
          ],
          "GET_SOURCES_ATTEMPTS",
        ),
      );
      if (!e && !cancelled && opts.cache) {
        logLine("Restoring cache");
        e = fail(
          "restore_cache",
          await retried(
            "restore_cache",
            [
              cdProject(),
              echoInfo("Checking cache for default..."),
              echoInfo(
                "WARNING: Missing gitlab-runner. Extracting cache is disabled.",
                "0;33",
              ),
            ],
            "RESTORE_CACHE_ATTEMPTS",
          ),
        );
      }
      if (!e && !cancelled && opts.downloadArtifacts) {
        logLine("Downloading artifacts");
        e = fail(
          "download_artifacts",
          await retried(
            "download_artifacts",
            [
              cdProject(),
              echoInfo(
                "WARNING: Missing gitlab-runner. Downloading artifacts is disabled.",
                "0;33",
              ),
            ],
            "ARTIFACT_DOWNLOAD_ATTEMPTS",
          ),
        );
      }
      if (!e && !cancelled) {
        userStagesReached = true;
        logLine(`Executing "step_script" stage of the job script`);
        const lines = [...(opts.beforeScript ?? []), ...(opts.script ?? ["true"])];
        e = fail(
          "build_script",
          await runStage("build_script", [
            cdProject(),
            ...lines.flatMap((c) => [echoCommand(c), c]),
          ]),
        );
        for (const step of opts.steps ?? []) {
          if (e || cancelled) break;
          logLine(`Executing "step_${step.name}" stage of the job script`);
          e = fail(
            `step_${step.name}`,
            await runStage(`step_${step.name}`, [
              cdProject(),
              ...step.script.flatMap((c) => [echoCommand(c), c]),
            ]),
          );
        }
      }
      // A cancel or timeout outside the user's script ends the run phase.
      const kind = currentError()?.kind;
      const abortedOutside = (cancelled || kind === "timeout") && !userStagesReached;
      if (userStagesReached && opts.afterScript) {
        vars.CI_JOB_STATUS = kind === undefined
          ? "success"
          : kind === "canceled"
          ? "canceled"
          : kind === "timeout"
          ? "timedout"
          : "failed";
        logLine("Running after_script");
        const ae = await runStage(
          "after_script",
          [
            cdProject(),
            echoInfo("Running after script..."),
            ...opts.afterScript.flatMap((c) => [echoCommand(c), c]),
          ],
          opts.afterScriptTimeoutMs ?? 300_000,
        );
        if (ae) {
          logLine(`WARNING: after_script failed, but job will continue unaffected: ${ae.message}`);
        }
      }
      if (!abortedOutside) {
        const ok = st.error === undefined;
        if (opts.cache) {
          const stage = ok ? "archive_cache" : "archive_cache_on_failure";
          logLine("Saving cache");
          fail(
            stage,
            await runStage(stage, [
              cdProject(),
              echoInfo("WARNING: Missing gitlab-runner. Creating cache is disabled.", "0;33"),
            ]),
          );
        }
        if (opts.artifacts) {
          const stage = ok ? "upload_artifacts_on_success" : "upload_artifacts_on_failure";
          logLine("Uploading artifacts for " + (ok ? "successful" : "failed") + " job");
          fail(
            stage,
            await runStage(stage, [
              cdProject(),
              echoInfo("WARNING: Missing gitlab-runner. Uploading artifacts is disabled.", "0;33"),
            ]),
          );
        }
        logLine("Cleaning up project directory and file based variables");
        const ce = await runStage("cleanup_file_variables", [
          `rm -rf ${JSON.stringify(projectDir + ".tmp")}`,
        ]);
        if (ce) runnerLine(`WARNING: cleanup_file_variables failed: ${ce.message}`);
      }
    }
    buildExitCodeFile = await readBuildExitCodeFile(join(tmpDir, "build_exit_code"));

    if (opts.beforeCleanup) {
      try {
        await opts.beforeCleanup(ctx());
      } catch (e) {
        hookErrors.push(e);
      }
    }
    const c = await cleanupCall(0);
    lastCleanupCode = c.code;
    timings.cleanupMs = c.ms;
    await removeTmp();
  } else if (opts.beforeCleanup) {
    // The cleanup after the failed attempt already ran; still give the hook a look.
    try {
      await opts.beforeCleanup(ctx());
    } catch (e) {
      hookErrors.push(e);
    }
  }

  // ---- outcome
  let outcome: JobOutcome = "success";
  let exitCode: number | undefined;
  const err = st.error as (StageError & { stage: string }) | undefined;
  if (err) {
    switch (err.kind) {
      case "build":
        outcome = "script_failure";
        exitCode = err.exitCode;
        break;
      case "canceled":
        outcome = "canceled";
        break;
      case "timeout":
        outcome = "timeout";
        break;
      default:
        outcome = "system_failure";
    }
  } else if (cancelled) outcome = "canceled";
  if (outcome === "success") logLine("Job succeeded");
  else if (outcome === "script_failure") logLine(`ERROR: Job failed: exit code ${exitCode}`);
  else if (outcome === "canceled") logLine("ERROR: Job failed: canceled");
  else if (outcome === "timeout") logLine(`ERROR: Job failed: ${err?.message ?? "timeout"}`);
  else {
    const where = err?.stage === "prepare" || err?.stage === "config"
      ? "prepare environment: "
      : "";
    logLine(`ERROR: Job failed (system failure): ${where}${err?.message}`);
  }
  timings.totalMs = Math.round(performance.now() - jobStart);

  const result: JobResult = {
    outcome,
    exitCode,
    failure: err?.message,
    failedStage: err?.stage,
    jobId,
    vmName,
    runnerShortToken: shortToken,
    jobToken: token,
    calls,
    log,
    runnerLog,
    config,
    configRaw,
    attempts: Math.min(attempt, attempts),
    prepared,
    projectDir,
    buildExitCodeFile,
    cleanupCode: lastCleanupCode,
    timings,
    hookErrors,
  };
  if (hookErrors.length && !opts.collectHookErrors) throw hookErrors[0];
  return result;
}

/** The calls of one stage (`config`, `prepare`, `cleanup` or a run stage name). */
export function callsOf(job: JobResult, stage: string): CallResult[] {
  return job.calls.filter((c) => c.stage === stage);
}

/** The last call of one stage; throws when there was none. */
export function callOf(job: JobResult, stage: string): CallResult {
  const c = callsOf(job, stage).at(-1);
  if (!c) {
    throw new Error(
      `job ${job.jobId} has no ${stage} call (calls: ${job.calls.map((c) => c.stage).join(", ")})`,
    );
  }
  return c;
}

/** A readable summary of a job, for assertion messages. */
export function describeJob(job: JobResult, maxOutput = 4000): string {
  const lines = [
    `job ${job.jobId} (${job.vmName}): ${job.outcome}${
      job.exitCode !== undefined ? ` (exit ${job.exitCode})` : ""
    }${job.failure ? ` — ${job.failedStage}: ${job.failure}` : ""}`,
  ];
  for (const c of job.calls) {
    lines.push(
      `--- ${c.kind}${c.kind === "run" ? ` ${c.stage}` : ""}${
        c.attempt > 1 ? ` #${c.attempt}` : ""
      }: code ${c.code}${c.signal ? ` (${c.signal})` : ""}${
        c.terminated ? ` [${c.terminated}]` : ""
      }, ${c.ms} ms`,
    );
    const out = c.output.length > maxOutput ? "…" + c.output.slice(-maxOutput) : c.output;
    if (out.trim()) lines.push(out.trimEnd());
  }
  return lines.join("\n");
}
