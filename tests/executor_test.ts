/**
 * End-to-end tests of `gitlab-sardinecake-executor`: real libvirtd (qemu:///system, TCG), a real
 * registry on 127.0.0.1, the tiny test guest as the job image, and a fake gitlab-runner
 * (`support/runner.ts`) that drives the executor through whole jobs the way the runner does.
 *
 * Every test writes its own INI (folders under /var/tmp/sarde-test-vms, `network = user`,
 * `network-restrict = true`, `domain-type = qemu`) and removes every VM and folder it made.
 * Timings (cold/warm prepare, per-stage overhead, cleanup) are printed with a `TIMING` prefix.
 *
 * Needs root, libvirtd (`bash tools/libvirtd.sh start`; started if needed), the registry and
 * guest build tools from tools/setup.sh. `SARDE_TEST_VERBOSE=1` streams every call's output.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ensureJobImage, GUEST_USER, type JobImages } from "./support/job_image.ts";
import { run, sarde, tempDir } from "./support/images.ts";
import { generateSigstoreKey } from "../lib/trust/keys.ts";
import {
  callOf,
  type CallResult,
  callsOf,
  describeJob,
  EXECUTOR,
  type JobContext,
  type JobResult,
  runJob,
  type RunJobOptions,
} from "./support/runner.ts";
import { startBlackHole, startFaultyProxy, startRegistry } from "./support/registry.ts";
import { ensureLibvirtd, makeVmDir, removeVmDir, shTry, TEST_URI } from "./support/vms.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };
const BUILDS_DIR = "/root/builds";
const CACHE_DIR = "/root/cache";

// ---------------------------------------------------------------------------------------------
// helpers

async function virsh(...args: string[]) {
  return await shTry("virsh", ["-c", TEST_URI, ...args]);
}

/** `running`, `shut off`, … or `gone` when libvirt does not know the domain. */
async function domState(name: string): Promise<string> {
  const r = await virsh("domstate", "--domain", name);
  return r.code === 0 ? r.stdout.trim() : "gone";
}

/** Field 22 of /proc/<pid>/stat: when the process started, in clock ticks after boot. */
async function procStartTime(pid: number): Promise<number> {
  const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[22 - 3]);
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch {
    return false;
  }
}

/** Files under `dirs` that contain `needle` (`grep -r -l -a -F`); [] when none or no dirs. */
async function filesContaining(needle: string, dirs: string[]): Promise<string[]> {
  if (!needle) throw new Error("filesContaining: empty needle");
  const present = [];
  for (const d of dirs) if (await exists(d)) present.push(d);
  if (!present.length) return [];
  const r = await run("grep", ["-r", "-l", "-a", "-F", "--", needle, ...present]);
  if (r.code > 1) throw new Error(`grep failed: ${r.stderr}`);
  return r.stdout.split("\n").filter(Boolean);
}

/** A test's own folders and INI, and the jobs run in them; `await using` cleans up. */
interface Workspace extends AsyncDisposable {
  root: string;
  ini: string;
  ocidir: string;
  vmdir: string;
  clonedir: string;
  /** Environment for runJob: the INI. */
  env: Record<string, string>;
  /** The job VM's folder. */
  jobDir(job: JobResult | string): string;
  /** Runs a job with this INI and {@link jobOptions}' limits; cleaned up with the workspace. */
  run(o: RunJobOptions): Promise<JobResult>;
  /** Destroys/undefines every VM of these folders and of the jobs run, removes the folders. */
  dispose(): Promise<void>;
}

/**
 * Writes an INI with `[DEFAULT]` (our folders, qemu:///system, user networking, restrict,
 * domain-type qemu, timeout 90s, guest builds/cache dirs, max-job-age 2h) plus `defaults`
 * (extra `key = value` lines for [DEFAULT]; `undefined` leaves a key out) and `sections`
 * (verbatim text appended).
 */
async function workspace(
  name: string,
  defaults: Record<string, string | undefined> = {},
  sections = "",
): Promise<Workspace> {
  await ensureLibvirtd();
  const root = await makeVmDir(`exec-${name}`);
  const ocidir = join(root, "oci");
  const vmdir = join(root, "vms");
  const clonedir = join(root, "jobs");
  const values: Record<string, string | undefined> = {
    connect: TEST_URI,
    ocidir,
    vmdir,
    clonedir,
    timeout: "90s",
    "domain-type": "qemu",
    network: "user",
    "network-restrict": "true",
    "guest-builds-dir": BUILDS_DIR,
    "guest-cache-dir": CACHE_DIR,
    "max-job-age": "2h",
    ...defaults,
  };
  const ini = join(root, "executor.ini");
  await Deno.writeTextFile(
    ini,
    "[DEFAULT]\n" +
      Object.entries(values).filter(([, v]) => v !== undefined).map(([k, v]) => `${k} = ${v}`)
        .join("\n") +
      "\n\n" + sections,
  );
  const jobDir = (job: JobResult | string) =>
    join(clonedir, typeof job === "string" ? job : job.vmName);
  const env = { GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES: ini };
  const jobs: JobResult[] = [];
  const dispose = async () => {
    const list = await virsh("list", "--all", "--name");
    const names = list.stdout.split("\n").map((s) => s.trim()).filter(Boolean);
    for (const n of names) {
      let ours = jobs.some((j) => j.vmName === n);
      if (!ours) {
        const xml = await virsh("dumpxml", "--domain", n, "--inactive");
        ours = xml.code === 0 && xml.stdout.includes(root + "/");
      }
      if (ours) {
        await virsh("destroy", "--domain", n);
        await virsh("undefine", "--domain", n, "--nvram");
        await virsh("undefine", "--domain", n);
      }
    }
    await removeVmDir(root);
  };
  return {
    root,
    ini,
    ocidir,
    vmdir,
    clonedir,
    env,
    jobDir,
    run: async (o) => {
      const job = await runJob(jobOptions(env, o));
      return job;
    },
    dispose,
    [Symbol.asyncDispose]: dispose,
  };
}

/** Sensible limits so that a hanging executor fails the test instead of hanging it. */
function jobOptions(env: Record<string, string>, o: RunJobOptions): RunJobOptions {
  return {
    configTimeoutMs: 60_000,
    prepareTimeoutMs: 300_000,
    cleanupTimeoutMs: 120_000,
    jobTimeoutMs: 300_000,
    afterScriptTimeoutMs: 120_000,
    gracefulKillTimeoutMs: 30_000,
    ...o,
    env: { ...env, ...(o.env ?? {}) },
  };
}

/** The job's VM is gone and so is its folder (after cleanup). */
async function assertNothingLeft(ws: Workspace, job: JobResult) {
  assert.equal(await domState(job.vmName), "gone", `VM ${job.vmName} still exists`);
  assert.ok(!(await exists(ws.jobDir(job))), `clone folder ${ws.jobDir(job)} still exists`);
  const leftovers = (await virsh("list", "--all", "--name")).stdout.split("\n")
    .filter((n) => n.startsWith(`sarde-job-${job.jobId}-`));
  assert.deepEqual(leftovers, [], `VMs of job ${job.jobId} left: ${leftovers.join(" ")}`);
}

function timing(label: string, ms: number | undefined) {
  console.log(`TIMING ${label}: ${ms === undefined ? "-" : `${(ms / 1000).toFixed(2)} s`}`);
}

/** Prints the prepare call's stderr lines with their offsets (the executor's own phases). */
function printPhases(label: string, job: JobResult) {
  const prep = callsOf(job, "prepare").at(-1);
  if (!prep) return;
  console.log(`TIMING ${label}: prepare ${prep.ms} ms; its output lines:`);
  for (const l of prep.lines) {
    if (l.text.trim()) console.log(`TIMING   +${String(l.t).padStart(6)} ms  ${l.text}`);
  }
}

let images: JobImages | undefined;
async function jobImages(): Promise<JobImages> {
  images = await ensureJobImage();
  return images;
}

// ---------------------------------------------------------------------------------------------
// the fake runner itself, against a fake executor (no VMs): so that a failure further down can
// be told apart from a bug in the driver

const FAKE_EXECUTOR = `#!/usr/bin/env bash
# A "local" custom executor: runs the scripts on this host with bash, logs every call.
stage="$1"; shift
{
  printf 'call %s %s|tmp=%s|cwd=%s|job=%s|status=%s|pd=%s|je=%s|pgid=%s|bf=%s|sf=%s|resp=%s\\n' \\
    "$stage" "\${2:-}" "$TMPDIR" "$PWD" "$CUSTOM_ENV_CI_JOB_ID" "$CUSTOM_ENV_CI_JOB_STATUS" \\
    "$CUSTOM_ENV_CI_PROJECT_DIR" "\${FAKE_JOB_ENV:-}" "$(ps -o pgid= $$ | tr -d ' ')" \\
    "$BUILD_FAILURE_EXIT_CODE" "$SYSTEM_FAILURE_EXIT_CODE" "$JOB_RESPONSE_FILE"
} >>"$FAKE_LOG"
case "$stage" in
  config)
    printf '{"builds_dir":"%s","cache_dir":"/c","hostname":"fake","driver":{"name":"fake","version":"1"},"job_env":{"FAKE_JOB_ENV":"yes"},"shell":"bash"}\\n' "$FAKE_ROOT/builds" ;;
  prepare)
    echo preparing; [ -n "\${FAKE_PREP_EXIT:-}" ] && exit "$FAKE_PREP_EXIT"; exit 0 ;;
  run)
    bash "$1"; rc=$?
    if [ $rc -ne 0 ]; then echo $rc >"$BUILD_EXIT_CODE_FILE"; exit "$BUILD_FAILURE_EXIT_CODE"; fi ;;
  cleanup)
    echo cleaned ;;
esac
`;

Deno.test({
  name: "runner driver: stage order, environment, exit codes, retries, cancel (fake executor)",
  ...opts,
  fn: async () => {
    const dir = await tempDir("fake-executor");
    try {
      const exe = join(dir, "executor.sh");
      const logFile = join(dir, "calls.log");
      await Deno.writeTextFile(exe, FAKE_EXECUTOR, { mode: 0o755 });
      const env = { FAKE_LOG: logFile, FAKE_ROOT: dir };
      const calls = async () => {
        const text = await Deno.readTextFile(logFile).catch(() => "");
        await Deno.writeTextFile(logFile, "");
        return text.split("\n").filter(Boolean).map((l) => {
          const [head, ...kv] = l.split("|");
          return {
            stage: head.replace(/^call /, "").trim(),
            ...Object.fromEntries(kv.map((p) => [p.split("=")[0], p.slice(p.indexOf("=") + 1)])),
          } as Record<string, string>;
        });
      };

      // success: order, env, job_env only after config, dirs empty during config
      const ok = await runJob({
        executor: exe,
        env,
        image: "img",
        script: ["echo hello-$CI_JOB_ID"],
        afterScript: ["echo after-$CI_JOB_STATUS"],
        cache: true,
        artifacts: true,
      });
      assert.equal(ok.outcome, "success", describeJob(ok));
      const c1 = await calls();
      assert.deepEqual(c1.map((c) => c.stage), [
        "config",
        "prepare",
        "run prepare_script",
        "run get_sources",
        "run restore_cache",
        "run build_script",
        "run after_script",
        "run archive_cache",
        "run upload_artifacts_on_success",
        "run cleanup_file_variables",
        "cleanup",
      ]);
      assert.equal(c1[0].je, "", "job_env is not given to config");
      assert.equal(c1[0].pd, "", "CI_PROJECT_DIR is empty during config");
      for (const c of c1.slice(1)) {
        assert.equal(c.je, "yes", `job_env reaches ${c.stage}`);
        assert.equal(c.pd, join(dir, "builds/sarde/ci-test"));
      }
      for (const c of c1) {
        assert.equal(c.tmp, c.cwd);
        assert.equal(c.tmp, c1[0].tmp, "one TMPDIR per attempt");
        assert.equal(c.bf, "1");
        assert.equal(c.sf, "2");
        assert.equal(c.resp, join(c.tmp, "response.json"));
        assert.notEqual(c.pgid, String(Deno.pid), "own process group");
      }
      assert.equal(new Set(c1.map((c) => c.pgid)).size, c1.length, "a new group per call");
      assert.ok(!(await exists(c1[0].tmp)), "TMPDIR removed after cleanup");
      assert.match(callOf(ok, "build_script").stdout, new RegExp(`hello-${ok.jobId}`));
      assert.match(callOf(ok, "after_script").stdout, /after-success/);
      const script = callOf(ok, "build_script").script!;
      assert.match(script, /^#!\/usr\/bin\/env bash\n/);
      assert.match(script, /trap exit 1 TERM/);
      assert.match(script, /: \| eval \$'/);
      assert.ok(script.includes(ok.jobToken), "the script exports the job token, like GitLab's");
      assert.ok(!ok.log.includes(ok.jobToken), "the job log is masked");

      // script failure: exit code from BUILD_EXIT_CODE_FILE, after_script and on_failure stages
      const bad = await runJob({
        executor: exe,
        env,
        image: "img",
        script: ["exit 7", "echo not-reached"],
        afterScript: ["echo after-$CI_JOB_STATUS"],
        artifacts: true,
      });
      assert.equal(bad.outcome, "script_failure", describeJob(bad));
      assert.equal(bad.exitCode, 7);
      assert.equal(bad.buildExitCodeFile?.trim(), "7");
      assert.match(callOf(bad, "after_script").stdout, /after-failed/);
      assert.ok(!callOf(bad, "build_script").stdout.includes("not-reached"));
      assert.deepEqual((await calls()).map((c) => c.stage).slice(-4), [
        "run after_script",
        "run upload_artifacts_on_failure",
        "run cleanup_file_variables",
        "cleanup",
      ]);

      // system failure in prepare: retried, cleanup after every attempt, fresh TMPDIR each time
      const sys = await runJob({
        executor: exe,
        env: { ...env, FAKE_PREP_EXIT: "2" },
        image: "img",
        prepareAttempts: 3,
        prepareRetryIntervalMs: 50,
      });
      assert.equal(sys.outcome, "system_failure");
      assert.equal(sys.attempts, 3);
      const c3 = await calls();
      assert.deepEqual(
        c3.map((c) => c.stage),
        Array(3).fill(["config", "prepare", "cleanup"]).flat(),
      );
      assert.equal(new Set(c3.map((c) => c.tmp)).size, 3);

      // build failure in prepare: no retry
      const pb = await runJob({
        executor: exe,
        env: { ...env, FAKE_PREP_EXIT: "1" },
        image: "img",
        prepareAttempts: 3,
        prepareRetryIntervalMs: 50,
      });
      assert.equal(pb.outcome, "script_failure");
      assert.equal(pb.attempts, 1);
      assert.deepEqual((await calls()).map((c) => c.stage), ["config", "prepare", "cleanup"]);

      // cancel: SIGTERM to the group of the build_script call, then after_script, cleanup
      const cancelled = await runJob({
        executor: exe,
        env,
        image: "img",
        script: ["echo sleeping; sleep 600"],
        afterScript: ["echo after-$CI_JOB_STATUS"],
        cancelDuringStage: "build_script",
        cancelWhenOutput: /sleeping/,
        cancelAfterMs: 200,
        gracefulKillTimeoutMs: 5000,
      });
      assert.equal(cancelled.outcome, "canceled", describeJob(cancelled));
      const b = callOf(cancelled, "build_script");
      assert.equal(b.terminated, "cancel");
      assert.ok(b.exitAfterTermMs! < 2000, `${b.exitAfterTermMs} ms`);
      assert.match(callOf(cancelled, "after_script").stdout, /after-canceled/);
      assert.equal(callsOf(cancelled, "cleanup").length, 1);
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

// ---------------------------------------------------------------------------------------------
// the executor

Deno.test({
  name: "executor: config JSON; a passing job (cold, then warm); secrets stay out; nothing left",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    await using ws = await workspace("pass");
    const prepareScript = join(ws.root, "prepare.sh");
    await Deno.writeTextFile(
      prepareScript,
      "echo PREPARE-SCRIPT-RAN job=$CI_JOB_ID\necho prepared >/root/prepared-by-script\n",
    );
    await Deno.writeTextFile(ws.ini, `\n[${img.image}]\nprepare-script = ${prepareScript}\n`, {
      append: true,
    });

    const leaks: string[] = [];
    let stateWhileRunning = "";
    const jobToken = `glcbt-sardefake_${crypto.randomUUID().replaceAll("-", "")}`;
    const job = await ws.run({
      image: img.image,
      jobToken,
      script: [
        "echo JOB-MARKER-$CI_JOB_ID",
        "uname -a",
        "cat /proc/cmdline",
        "cat /root/prepared-by-script",
        'echo "token-length ${#CI_JOB_TOKEN}"',
        "pwd",
      ],
      afterScript: ["echo AFTER-MARKER $CI_JOB_STATUS"],
      beforeCleanup: async (ctx) => {
        stateWhileRunning = await domState(ctx.vmName);
        // The token is in every run script; it must not end up on the host's disks.
        for (const f of await filesContaining(jobToken, [ws.jobDir(ctx.vmName), ws.vmdir])) {
          leaks.push(f);
        }
        const xml = await virsh("dumpxml", "--domain", ctx.vmName);
        if (xml.stdout.includes(jobToken)) leaks.push(`domain XML of ${ctx.vmName}`);
      },
    });
    assert.equal(job.jobToken, jobToken);
    const info = describeJob(job);
    assert.equal(job.outcome, "success", info);

    // config
    const cfg = job.config!;
    assert.ok(cfg, info);
    assert.equal(cfg.builds_dir, BUILDS_DIR);
    assert.equal(cfg.cache_dir, CACHE_DIR);
    assert.equal(cfg.builds_dir_is_shared, false);
    assert.equal(typeof cfg.hostname, "string");
    assert.ok(cfg.hostname!.length > 0);
    assert.equal(cfg.driver?.name, "sarde");
    assert.match(cfg.driver?.version ?? "", /libvirt/i);
    assert.match(cfg.driver?.version ?? "", /qemu/i);
    assert.equal(cfg.shell, "bash");
    assert.deepEqual(JSON.parse(job.configRaw!), cfg, "stdout of config is only the JSON");

    // the job ran in the guest, output on stdout
    const build = callOf(job, "build_script");
    assert.match(build.stdout, new RegExp(`JOB-MARKER-${job.jobId}`), info);
    assert.match(build.stdout, /Linux sarde-tiny /, "uname -a of the guest");
    assert.match(build.stdout, /sarde\.root=\/dev\/vda/, "the guest's kernel command line");
    assert.match(build.stdout, /^prepared$/m, "prepare-script ran in the guest before the job");
    assert.match(build.stdout, new RegExp(`token-length ${jobToken.length}`));
    assert.match(build.stdout, new RegExp(`^${job.projectDir}$`, "m"), "cd into the project");
    assert.match(callOf(job, "prepare").output, /PREPARE-SCRIPT-RAN/);
    assert.match(callOf(job, "prepare_script").stdout, /Running on sarde-tiny via /);
    assert.match(callOf(job, "after_script").stdout, /AFTER-MARKER success/);
    assert.equal(stateWhileRunning, "running", "the VM ran until cleanup");

    // secrets
    for (const c of job.calls.filter((c) => c.kind !== "run")) {
      assert.ok(!c.stderr.includes(jobToken), `token in stderr of ${c.stage}:\n${c.stderr}`);
      assert.ok(!c.stdout.includes(jobToken), `token in stdout of ${c.stage}:\n${c.stdout}`);
    }
    assert.deepEqual(leaks, [], `the job token was written to: ${leaks.join(", ")}`);

    // nothing left
    assert.equal(job.cleanupCode, 0, info);
    await assertNothingLeft(ws, job);

    // warm: same image again, trivial stages
    const warm = await ws.run({ image: img.image, script: ["true"] });
    assert.equal(warm.outcome, "success", describeJob(warm));
    assert.doesNotMatch(callOf(warm, "prepare").stderr, /importing/);
    assert.doesNotMatch(callOf(warm, "prepare").stderr, /pulling/);
    await assertNothingLeft(ws, warm);

    timing("image build (guest + define + 3 exports + 3 pushes, once per process)", img.buildMs);
    timing("config (cold)", job.timings.configMs);
    timing(
      "prepare cold (pull + import + clone + boot + SSH + prepare-script)",
      job.timings.prepareMs,
    );
    printPhases("prepare cold", job);
    timing("config (warm)", warm.timings.configMs);
    timing("prepare warm (clone + boot + SSH)", warm.timings.prepareMs);
    printPhases("prepare warm", warm);
    for (const [stage, ms] of Object.entries(warm.timings.stages)) {
      timing(`run stage ${stage} (trivial)`, ms);
    }
    timing("cleanup (cold job)", job.timings.cleanupMs);
    timing("cleanup (warm job)", warm.timings.cleanupMs);
    timing("whole warm job", warm.timings.totalMs);
  },
});

Deno.test({
  name: "executor: a failing build_script (exit 7) → script failure, after_script still runs",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    await using ws = await workspace("fail");
    const job = await ws.run({
      image: img.image,
      script: ["echo BEFORE-FAIL", "exit 7", "echo NOT-REACHED"],
      afterScript: ["echo AFTER-MARKER $CI_JOB_STATUS"],
    });
    const info = describeJob(job);
    assert.equal(job.outcome, "script_failure", info);
    assert.equal(job.exitCode, 7, info);
    assert.equal(job.buildExitCodeFile?.trim(), "7", "BUILD_EXIT_CODE_FILE holds 7");
    const build = callOf(job, "build_script");
    assert.equal(build.code, 1, "BUILD_FAILURE_EXIT_CODE");
    assert.match(build.stdout, /BEFORE-FAIL/);
    assert.doesNotMatch(build.output, /NOT-REACHED/);
    const after = callOf(job, "after_script");
    assert.equal(after.code, 0, info);
    assert.match(after.stdout, /AFTER-MARKER failed/);
    await assertNothingLeft(ws, job);
  },
});

Deno.test({
  name: "executor: under a signed-only policy an unsigned image fails the job, a signed one runs",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    const host = img.registry.host;
    const dir = await tempDir("exec-trust");
    try {
      // The job image, signed by its publisher under another name.
      const pair = await generateSigstoreKey("publisher");
      const key = join(dir, "publisher.key");
      const pub = join(dir, "publisher.pub");
      const pass = join(dir, "publisher.pass");
      await Deno.writeTextFile(key, pair.privatePem, { mode: 0o600 });
      await Deno.writeTextFile(pub, pair.publicPem);
      await Deno.writeTextFile(pass, "publisher\n");
      const store = join(dir, "oci");
      const signed = `${host}/sardines/tiny-signed:latest`;
      const fetched = await sarde(["fetch", "-d", store, img.image]);
      assert.equal(fetched.code, 0, fetched.stderr);
      const push = await sarde([
        "push",
        "-d",
        store,
        "--sign-by-sigstore-private-key",
        key,
        "--sign-passphrase-file",
        pass,
        "--target",
        signed,
        img.image,
      ]);
      assert.equal(push.code, 0, push.stderr);
      const policy = join(dir, "policy.json");
      await Deno.writeTextFile(
        policy,
        JSON.stringify({
          default: [{ type: "reject" }],
          transports: { docker: { [host]: [{ type: "sigstoreSigned", keyPath: pub }] } },
        }),
      );
      const registriesD = join(dir, "registries.d");
      await Deno.mkdir(registriesD);
      await Deno.writeTextFile(
        join(registriesD, "runner.yaml"),
        `docker:\n  ${host}:\n    use-sigstore-attachments: true\n`,
      );
      await using ws = await workspace("trust", { policy, "registries.d": registriesD });

      const refused = await ws.run({
        image: img.image,
        prepareAttempts: 3,
        prepareRetryIntervalMs: 50,
      });
      let info = describeJob(refused);
      assert.equal(refused.outcome, "script_failure", info);
      assert.equal(callsOf(refused, "prepare").length, 1, `not retried: ${info}`);
      assert.equal(callOf(refused, "prepare").code, 1, `BUILD_FAILURE_EXIT_CODE: ${info}`);
      assert.match(callOf(refused, "prepare").stderr, /no signature/, info);
      assert.doesNotMatch(callOf(refused, "prepare").stderr, /\n\s+at /, info);
      await assertNothingLeft(ws, refused);

      const job = await ws.run({ image: signed, script: ["echo SIGNED-IMAGE-RAN"] });
      info = describeJob(job);
      assert.equal(job.outcome, "success", info);
      assert.match(callOf(job, "build_script").stdout, /SIGNED-IMAGE-RAN/, info);
      await assertNothingLeft(ws, job);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "executor: job-author errors → build failure at once (no retry, no VM); 5xx → system",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    const host = img.registry.host;
    const registriesConf = await Deno.makeTempFile({
      prefix: "sarde-registries-",
      suffix: ".conf",
    });
    await using _removeConf = { [Symbol.asyncDispose]: () => Deno.remove(registriesConf) };
    await Deno.writeTextFile(
      registriesConf,
      `[[registry]]\nlocation = "${host}/sardines/blocked"\nblocked = true\n`,
    );
    await using ws = await workspace("jobfault", {
      "allowed-images": "127.0.0.1:*/sardines/*",
      "pull-policy": "if-not-present, always",
      "retry-timeout": "3s",
      "registries-conf": registriesConf,
    });
    const cases: { what: string; o: RunJobOptions; message: RegExp }[] = [
      { what: "no image", o: {}, message: /names no image/ },
      {
        what: "an image outside allowed-images",
        o: { image: `${host}/other/tiny:latest` },
        message: /not allowed/,
      },
      { what: "an invalid reference", o: { image: "UPPER//x::y" }, message: /invalid image/ },
      {
        what: "an image of a registry that registries.conf blocks",
        o: { image: `${host}/sardines/blocked:latest` },
        message: /is blocked in/,
      },
      {
        what: "a pull policy the runner does not allow",
        o: { image: img.image, pullPolicy: ["never"] },
        message: /pull policy 'never'.*allows only/,
      },
      {
        what: "an image the registry does not have",
        o: { image: `${host}/sardines/tiny:no-such-tag` },
        message: /not found/,
      },
    ];
    for (const c of cases) {
      let seenDuringPrepare = "";
      const job = await ws.run({
        ...c.o,
        prepareAttempts: 3,
        prepareRetryIntervalMs: 50,
        afterCall: async (call, ctx) => {
          if (call.stage === "prepare") seenDuringPrepare = await domState(ctx.vmName);
        },
      });
      const info = `${c.what}:\n${describeJob(job)}`;
      assert.equal(job.outcome, "script_failure", info);
      assert.equal(job.failedStage, "prepare", info);
      assert.equal(callsOf(job, "prepare").length, 1, `prepare is not retried: ${info}`);
      const prep = callOf(job, "prepare");
      assert.equal(prep.code, 1, `BUILD_FAILURE_EXIT_CODE: ${info}`);
      assert.match(prep.stderr, c.message, info);
      assert.doesNotMatch(prep.stderr, /unexpected failure|\n\s+at /, info);
      assert.ok(job.log.includes(prep.stderr.trim().split("\n")[0]), "the message is in the log");
      assert.equal(seenDuringPrepare, "gone", `no VM was created: ${info}`);
      assert.equal(job.cleanupCode, 0, "cleanup is fine with nothing to clean");
      assert.doesNotMatch(job.runnerLog, /removed job VM/, `nothing was removed: ${info}`);
      await assertNothingLeft(ws, job);
    }
    assert.ok(
      !(await exists(join(ws.ocidir, host, "sardines", "tiny"))),
      "nothing was pulled for the job that asked for a policy it may not use",
    );

    // The registry's own failure is the runner's problem: a system failure, retried.
    await using proxy = await startFaultyProxy(
      { url: `http://${host}` },
      { kind: "status", status: 503, times: 1_000_000 },
    );
    const sys = await ws.run({
      image: `${proxy.host}/sardines/tiny:latest`,
      prepareAttempts: 2,
      prepareRetryIntervalMs: 50,
    });
    const info = describeJob(sys);
    assert.equal(sys.outcome, "system_failure", info);
    assert.equal(callsOf(sys, "prepare").length, 2, `a system failure is retried: ${info}`);
    assert.match(callOf(sys, "prepare").stderr, /503/, info);
    await assertNothingLeft(ws, sys);
  },
});

Deno.test({
  name:
    "executor: a job forging another's CI_JOB_ID and runner token, or the reaper, cannot hit it",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    // Every job is "old" at once: only whether its job is over may protect it from the reaper.
    await using ws = await workspace("forge", { "max-job-age": "1s" });
    // Job folders the reaper finds. The runner of the live ones is this process (the fake
    // runner); a dead runner is a process that has exited, a replaced one has our PID but
    // another start time (the PID was reused).
    const dead = new Deno.Command("true").spawn();
    await dead.status;
    const self = await procStartTime(Deno.pid);
    const liveRunner = { pid: Deno.pid, startTime: self };
    const jobFolders = {
      // The runner removed the TMPDIR: the job is over.
      tmpDirGone: { tmpDir: join(ws.root, "gone"), runner: liveRunner, reaped: true },
      // The runner and the TMPDIR are there: a long job, never touched.
      live: { tmpDir: ws.root, runner: liveRunner, reaped: false },
      // An earlier sarde recorded no runner: the TMPDIR alone decides.
      noRunner: { tmpDir: ws.root, runner: undefined, reaped: false },
      // A killed runner leaves its TMPDIR behind: the job is over all the same.
      runnerDead: {
        tmpDir: ws.root,
        runner: { pid: dead.pid, startTime: self },
        reaped: true,
      },
      runnerReplaced: {
        tmpDir: ws.root,
        runner: { pid: Deno.pid, startTime: self + 1 },
        reaped: true,
      },
    };
    const folders = Object.entries(jobFolders).map(([what, f], i) => ({
      what,
      ...f,
      dir: join(ws.clonedir, `sarde-job-${i + 1}-${String(i).padStart(16, "0")}`),
    }));
    for (const f of folders) {
      await Deno.mkdir(f.dir, { recursive: true });
      await Deno.writeTextFile(
        join(f.dir, "job.json"),
        JSON.stringify({ createdAt: 1, tmpDir: f.tmpDir, runner: f.runner }),
      );
    }
    // The runner each job's job.json names, read while the job runs.
    const recorded: Record<string, unknown> = {};
    const readRunner = (who: string) => async (c: CallResult, ctx: JobContext) => {
      if (c.stage !== "get_sources") return;
      const state = JSON.parse(await Deno.readTextFile(join(ws.jobDir(ctx.vmName), "job.json")));
      recorded[who] = state.runner;
    };
    // The victim's stages run through `timeout`, which stays their parent as `sudo -E` does:
    // the runner is the first ancestor that is no such launcher.
    const throughLauncher = ["600", EXECUTOR];
    const secret = `VICTIM-SECRET-${crypto.randomUUID()}`;
    let forger: JobResult | undefined;
    let victimVmAfterForger = "";
    const victim = await ws.run({
      image: img.image,
      runnerShortToken: "stvictim",
      executor: "timeout",
      configArgs: throughLauncher,
      prepareArgs: throughLauncher,
      runArgs: throughLauncher,
      cleanupArgs: throughLauncher,
      getSources: [`echo ${secret} >/root/victim-secret`],
      script: ["echo VICTIM-BUILD", "cat /root/victim-secret"],
      afterCall: async (c, ctx) => {
        await readRunner("victim")(c, ctx);
        if (c.stage !== "get_sources") return;
        // The victim's VM is up and between two stages: a whole job of the forger runs now,
        // posing as the victim through its variables (GitLab lets them shadow predefined ones).
        forger = await ws.run({
          image: img.image,
          runnerShortToken: "stforger",
          variables: { CI_JOB_ID: String(ctx.jobId), CI_RUNNER_SHORT_TOKEN: "stvictim" },
          script: ["echo FORGER-BUILD", "cat /root/victim-secret || echo NO-SECRET-HERE"],
          afterCall: readRunner("forger"),
        });
        victimVmAfterForger = await domState(ctx.vmName);
      },
    });
    const info = describeJob(victim);
    assert.ok(forger, `the forger never ran:\n${info}`);
    const forgerInfo = describeJob(forger);
    assert.equal(
      victimVmAfterForger,
      "running",
      `the forger's job hit the victim's VM:\n${forgerInfo}`,
    );
    assert.notEqual(forger.vmName, victim.vmName);
    assert.equal(victim.outcome, "success", info);
    const build = callOf(victim, "build_script");
    assert.match(build.stdout, /VICTIM-BUILD/, info);
    assert.ok(build.stdout.includes(secret), "the victim's VM is the one it prepared");
    assert.equal(forger.outcome, "success", forgerInfo);
    assert.match(callOf(forger, "build_script").stdout, /FORGER-BUILD[\s\S]*NO-SECRET-HERE/);
    for (const c of forger.calls) {
      assert.ok(!c.output.includes(secret), `the forger saw the victim's secret in ${c.stage}`);
    }
    assert.ok(!forger.runnerLog.includes(victim.vmName), forger.runnerLog);
    assert.ok(!victim.log.includes("FORGER-BUILD"), "no forger script ran in the victim's VM");
    for (const job of [victim, forger]) await assertNothingLeft(ws, job);
    for (const f of folders) {
      assert.equal(!(await exists(f.dir)), f.reaped, `reaped ${f.what}: ${f.reaped}`);
    }
    // The runner is this process: the executor's parent (bin/gitlab-sardinecake-executor
    // execs Deno), or the parent of the launcher in between.
    assert.deepEqual(recorded, { victim: liveRunner, forger: liveRunner }, "the runner process");
  },
});

Deno.test({
  name: "executor: without guest-builds-dir the runner's builds_dir/cache_dir apply (non-root)",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    await using ws = await workspace("userdirs", {
      "guest-builds-dir": undefined,
      "guest-cache-dir": undefined,
    });
    const job = await ws.run({
      image: img.userImage,
      runnerBuildsDir: `/home/${GUEST_USER}/builds`,
      runnerCacheDir: `/home/${GUEST_USER}/cache`,
      cache: true,
      script: ["id -un", "pwd", "touch made-by-the-job", "ls made-by-the-job"],
    });
    const info = describeJob(job);
    const raw = JSON.parse(job.configRaw ?? "{}");
    assert.ok(!("builds_dir" in raw) && !("cache_dir" in raw), `config printed ${job.configRaw}`);
    assert.equal(job.outcome, "success", info);
    const build = callOf(job, "build_script").stdout;
    assert.match(build, new RegExp(`^${GUEST_USER}$`, "m"), "the job runs as the image's user");
    assert.match(build, new RegExp(`^/home/${GUEST_USER}/builds/sarde/ci-test$`, "m"), info);
    assert.match(build, /^made-by-the-job$/m, info);
    await assertNothingLeft(ws, job);
  },
});

Deno.test({
  name: "executor: a registry that never answers fails prepare within its timeout (system failure)",
  ...opts,
  fn: async () => {
    await using hole = startBlackHole();
    // [slow] has a long timeout, but short response-timeout/retry-timeout: those bound it.
    await using ws = await workspace(
      "blackhole",
      { timeout: "8s" },
      `[${hole.host}/sardines/slow:*]\ntimeout = 5m\nresponse-timeout = 2s\nretry-timeout = 5s\n`,
    );
    for (
      const [repo, deadlineMs] of [["tiny", 8_000], ["slow", 5_000 + 2_000]] as const
    ) {
      const job = await ws.run({
        image: `${hole.host}/sardines/${repo}:latest`,
        prepareTimeoutMs: 100_000,
      });
      const info = describeJob(job);
      assert.equal(job.outcome, "system_failure", info);
      assert.equal(job.failedStage, "prepare", info);
      const prep = callOf(job, "prepare");
      assert.equal(prep.code, 2, info);
      assert.match(prep.stderr, /no answer/, info);
      // Generous: process start-up and the stage's own work come on top of the deadline.
      assert.ok(prep.ms < deadlineMs + 20_000, `prepare took ${prep.ms} ms:\n${info}`);
      await assertNothingLeft(ws, job);
      timing(`prepare against a black hole (${repo})`, prep.ms);
    }
  },
});

Deno.test({
  name: "executor: a cold prepare imports behind the download, not after it",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    // Blob downloads (but the small XML and config ones) stop half-way until released.
    const release = Promise.withResolvers<void>();
    await using proxy = await startFaultyProxy({ url: `http://${img.registry.host}` }, {
      kind: "pause-blob",
      afterBytes: 64 << 10,
      until: release.promise,
    });
    await using ws = await workspace("pipelined");
    const image = img.image.replace(img.registry.host, proxy.host);
    const index = join(ws.ocidir, image.replace(/:latest$/, ""), "index.json");
    // The old way (fetch, then import) would never import while the blobs are held: let go.
    let gaveUp = false;
    const fallback = setTimeout(() => {
      gaveUp = true;
      release.resolve();
    }, 60_000);
    let importingBeforeFetched: boolean | undefined;
    let seen = false;
    try {
      const job = await ws.run({
        image,
        script: ["echo PIPELINED-JOB"],
        onOutput: (call, _stream, text) => {
          if (call.stage !== "prepare" || seen || !/importing/.test(text)) return;
          seen = true;
          // The import may start before any blob reached the pause (under load): wait for the
          // proxy to hold one, which also keeps the fetch from finishing, then look.
          (async () => {
            const deadline = Date.now() + 20_000;
            while (proxy.faults() === 0 && Date.now() < deadline) {
              await new Promise((r) => setTimeout(r, 50));
            }
            // The fetch records the image in index.json last, once every blob is in.
            let fetched = false;
            try {
              fetched = JSON.parse(Deno.readTextFileSync(index)).manifests?.length > 0;
            } catch { /* not yet there */ }
            importingBeforeFetched = !fetched && !gaveUp && proxy.faults() > 0;
            release.resolve();
          })();
        },
      });
      const info = describeJob(job);
      assert.equal(job.outcome, "success", info);
      assert.match(callOf(job, "build_script").stdout, /PIPELINED-JOB/);
      assert.equal(
        importingBeforeFetched,
        true,
        `the import did not start while blobs were still downloading:\n${info}`,
      );
      await assertNothingLeft(ws, job);
      printPhases("prepare with held blobs", job);
    } finally {
      clearTimeout(fallback);
      release.resolve();
    }
  },
});

Deno.test({
  name: "executor: wrong SSH password → system failure within the timeout; right one works",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    await using ws = await workspace(
      "creds",
      { timeout: "40s" },
      `[${img.noUserImage}]\nusername = root\npassword = wrong\n`,
    );
    const job = await ws.run({ image: img.noUserImage, script: ["true"] });
    const info = describeJob(job);
    assert.equal(job.outcome, "system_failure", info);
    assert.equal(job.failedStage, "prepare", info);
    const prep = callOf(job, "prepare");
    assert.equal(prep.code, 2, info);
    assert.ok(prep.ms < 40_000 + 30_000, `prepare took ${prep.ms} ms with timeout = 40s`);
    await assertNothingLeft(ws, job);
    timing("prepare with a wrong password until failure (timeout = 40s)", prep.ms);

    // The same image with the right password from the INI: the failure was the password.
    await Deno.writeTextFile(
      ws.ini,
      (await Deno.readTextFile(ws.ini)).replace("password = wrong", `password = ${img.password}`),
    );
    const good = await ws.run({ image: img.noUserImage, script: ["id -un"] });
    assert.equal(good.outcome, "success", describeJob(good));
    assert.match(callOf(good, "build_script").stdout, /^root$/m);
    await assertNothingLeft(ws, good);
  },
});

Deno.test({
  name: "executor: a guest that never answers SSH → system failure after timeout, no VM left",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    await using ws = await workspace("deaf", { timeout: "20s" });
    const job = await ws.run({ image: img.badPortImage, script: ["true"] });
    const info = describeJob(job);
    assert.equal(job.outcome, "system_failure", info);
    assert.equal(job.failedStage, "prepare", info);
    const prep = callOf(job, "prepare");
    assert.equal(prep.code, 2, info);
    assert.ok(prep.ms < 60_000, `prepare took ${prep.ms} ms with timeout = 20s`);
    await assertNothingLeft(ws, job);
    timing("prepare of a deaf guest until failure (timeout = 20s)", prep.ms);
    printPhases("prepare of a deaf guest", job);
  },
});

Deno.test({
  name: "executor: two jobs on one image at once → both pass, the image is imported once",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    await using ws = await workspace("two");
    const both = await Promise.all([0, 1].map((i) =>
      ws.run({
        image: img.image,
        concurrentId: i,
        script: [`echo CONCURRENT-${i}-$CI_JOB_ID`],
      })
    ));
    for (const [i, job] of both.entries()) {
      assert.equal(job.outcome, "success", describeJob(job));
      assert.match(
        callOf(job, "build_script").stdout,
        new RegExp(`CONCURRENT-${i}-${job.jobId}`),
      );
    }
    assert.notEqual(both[0].vmName, both[1].vmName);
    const importing = both.filter((j) => /importing/.test(callOf(j, "prepare").stderr));
    assert.equal(
      importing.length,
      1,
      `prepare stderr with 'importing':\n${
        both.map((j) => `--- ${j.vmName}\n${callOf(j, "prepare").stderr}`).join("\n")
      }`,
    );
    for (const job of both) await assertNothingLeft(ws, job);
    both.forEach((j, i) => timing(`prepare of concurrent job ${i}`, j.timings.prepareMs));
  },
});

Deno.test({
  name: "executor: cancel (SIGTERM) during build_script → run ends, VM destroyed before cleanup",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    await using ws = await workspace("cancel");
    let stateAfterCancel = "";
    let settled = "";
    const job = await ws.run({
      image: img.image,
      script: ["echo SLEEPING-NOW", "sleep 600"],
      afterScript: ["echo AFTER-MARKER $CI_JOB_STATUS"],
      cancelDuringStage: "build_script",
      cancelWhenOutput: /SLEEPING-NOW/,
      cancelAfterMs: 1000,
      afterCall: async (c, ctx) => {
        if (c.stage !== "build_script") return;
        stateAfterCancel = await domState(ctx.vmName);
        // A destroy still in progress shows as "in shutdown"; give it a moment to finish.
        const until = performance.now() + 10_000;
        settled = stateAfterCancel;
        while (settled === "in shutdown" && performance.now() < until) {
          await new Promise((r) => setTimeout(r, 200));
          settled = await domState(ctx.vmName);
        }
      },
    });
    const info = describeJob(job);
    assert.equal(job.outcome, "canceled", info);
    const build = callOf(job, "build_script");
    assert.equal(build.terminated, "cancel", info);
    assert.notEqual(build.code, 0);
    assert.ok(!build.killed, `the executor needed SIGKILL:\n${info}`);
    assert.ok(build.exitAfterTermMs! < 10_000, `run took ${build.exitAfterTermMs} ms to end`);
    console.log(`VM state right after the cancelled run call: ${stateAfterCancel}`);
    assert.ok(
      ["gone", "shut off", "in shutdown"].includes(stateAfterCancel),
      `VM state right after the cancelled run call: ${stateAfterCancel}\n${info}`,
    );
    assert.ok(
      settled === "gone" || settled === "shut off",
      `VM state 10 s after the cancelled run call: ${settled}`,
    );
    // after_script is still called (GitLab does), on a VM that is gone: a quick system failure.
    const after = callOf(job, "after_script");
    assert.equal(after.code, 2, `after_script on a destroyed VM:\n${info}`);
    assert.ok(after.ms < 60_000, `after_script took ${after.ms} ms`);
    assert.equal(callsOf(job, "cleanup").length, 1);
    await assertNothingLeft(ws, job);
    timing("run call: SIGTERM → exit", build.exitAfterTermMs);
    timing("after_script on the destroyed VM", after.ms);
    timing("cleanup after cancel", job.timings.cleanupMs);
  },
});

Deno.test({
  name: "executor: cancel (SIGTERM) during prepare → prepare ends, no run stage, nothing left",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    await using ws = await workspace("cancelprep");
    let stateAfterCancel = "";
    // 6 s into a cold prepare: pulling/importing is over, the VM is booting or being cloned.
    const job = await ws.run({
      image: img.image,
      script: ["echo SHOULD-NOT-RUN"],
      cancelDuringStage: "prepare",
      cancelAfterMs: 6000,
      afterCall: async (c, ctx) => {
        if (c.stage === "prepare") stateAfterCancel = await domState(ctx.vmName);
      },
    });
    const info = describeJob(job);
    assert.equal(job.outcome, "canceled", info);
    const prep = callOf(job, "prepare");
    assert.equal(prep.terminated, "cancel", info);
    assert.ok(!prep.killed, `the executor needed SIGKILL:\n${info}`);
    assert.ok(prep.exitAfterTermMs! < 10_000, `prepare took ${prep.exitAfterTermMs} ms to end`);
    assert.equal(job.calls.filter((c) => c.kind === "run").length, 0, info);
    assert.equal(callsOf(job, "cleanup").length, 1);
    console.log(`VM state right after the cancelled prepare call: ${stateAfterCancel}`);
    await assertNothingLeft(ws, job);
    timing("prepare call: SIGTERM → exit", prep.exitAfterTermMs);
    timing("cleanup after a cancelled prepare", job.timings.cleanupMs);
  },
});

Deno.test({
  name:
    "executor: bad INI values (0 timeouts, unknown pull-policy or network) fail config at file:line",
  ...opts,
  fn: async () => {
    const cases: [string, string, RegExp][] = [
      ["timeout", "0", /invalid \[DEFAULT\] timeout '0' \(must be longer than 0\)/],
      ["response-timeout", "0s", /invalid \[DEFAULT\] response-timeout '0s' \(must be longer/],
      ["max-job-age", "0m", /invalid \[DEFAULT\] max-job-age '0m' \(must be longer than 0\)/],
      ["timeout", "soon", /invalid \[DEFAULT\] timeout 'soon'/],
      ["pull-policy", "always, sometimes", /invalid \[DEFAULT\] pull-policy 'sometimes'/],
      ["network", "bridge", /invalid \[DEFAULT\] network 'bridge'/],
    ];
    for (const [key, value, message] of cases) {
      await using ws = await workspace("badini", { [key]: value });
      const line = (await Deno.readTextFile(ws.ini)).split("\n")
        .findIndex((l) => l.startsWith(`${key} = `)) + 1;
      const job = await ws.run({ image: "127.0.0.1:1/sardines/tiny:latest" });
      const info = `${key} = ${value}:\n${describeJob(job)}`;
      assert.equal(job.outcome, "system_failure", info);
      assert.equal(job.failedStage, "config", info);
      const config = callOf(job, "config");
      assert.equal(config.code, 2, info);
      assert.ok(config.stderr.includes(`${ws.ini}:${line}: `), `file:line in ${info}`);
      assert.match(config.stderr, message, info);
      assert.doesNotMatch(config.stderr, /\n\s+at /, info);
    }
    // retry-timeout = 0 means "no retries": config accepts it (prepare fails on the missing image).
    await using ws = await workspace("badini", { "retry-timeout": "0" });
    const job = await ws.run({});
    assert.equal(job.outcome, "script_failure", describeJob(job));
    assert.match(callOf(job, "prepare").stderr, /names no image/);
  },
});

Deno.test({
  name: "executor: a registry that refuses the job's image (401, no credentials) → build failure",
  ...opts,
  fn: async () => {
    // Docker Hub, GHCR and anonymous Harbor answer 401/403 for repositories that do not exist.
    await using reg = await startRegistry("htpasswd-tls");
    await using ws = await workspace("denied", {
      "cert-dir": reg.certDir,
      authfile: "/nonexistent/auth.json",
    });
    const job = await ws.run({
      image: `${reg.host}/sardines/no-such-image:latest`,
      prepareAttempts: 3,
      prepareRetryIntervalMs: 50,
      env: { SARDE_REGISTRY_HOST: "", SARDE_REGISTRY_USERNAME: "", SARDE_REGISTRY_PASSWORD: "" },
    });
    const info = describeJob(job);
    assert.equal(job.outcome, "script_failure", info);
    assert.equal(job.failedStage, "prepare", info);
    assert.equal(callsOf(job, "prepare").length, 1, `not retried: ${info}`);
    const prep = callOf(job, "prepare");
    assert.equal(prep.code, 1, info);
    assert.match(prep.stderr, /requires authentication|access denied/, info);
    assert.match(prep.stderr, /hint: does the image exist, and may this runner pull it\?/, info);
    assert.ok(job.log.includes("does the image exist"), "the hint is in the job log");
    await assertNothingLeft(ws, job);
  },
});

Deno.test({
  name: "executor: as root through sudo -E, the TMPDIR of SUDO_UID's user is accepted",
  ...opts,
  fn: async () => {
    assert.equal(Deno.uid(), 0, "needs root");
    await using ws = await workspace("sudo");
    const other = 65534;
    // The runner runs as `other`, the executor as root; no image, so prepare fails at once.
    const cases: { what: string; o: RunJobOptions; accepted: boolean }[] = [
      { what: "another user's TMPDIR", o: { env: { SUDO_UID: "" } }, accepted: false },
      { what: "SUDO_UID of a third user", o: { env: { SUDO_UID: "1000" } }, accepted: false },
      {
        what: "SUDO_UID forged by a job variable",
        o: { env: { SUDO_UID: "" }, variables: { SUDO_UID: String(other) } },
        accepted: false,
      },
      {
        what: "a group-writable TMPDIR of SUDO_UID's user",
        o: { env: { SUDO_UID: String(other) }, tmpMode: 0o770 },
        accepted: false,
      },
      { what: "SUDO_UID's TMPDIR", o: { env: { SUDO_UID: String(other) } }, accepted: true },
    ];
    for (const c of cases) {
      const job = await ws.run({ ...c.o, tmpUid: other });
      const info = `${c.what}:\n${describeJob(job)}`;
      if (c.accepted) {
        assert.equal(job.outcome, "script_failure", info);
        assert.equal(callOf(job, "config").code, 0, info);
        assert.match(callOf(job, "prepare").stderr, /names no image/, info);
      } else {
        assert.equal(job.outcome, "system_failure", info);
        assert.equal(job.failedStage, "config", info);
        assert.match(
          callOf(job, "config").stderr,
          /TMPDIR .* is not a folder only this user/,
          info,
        );
      }
    }
  },
});

/** The job VM's `<vcpu>` count and `<memory>` in KiB, from its live XML. */
async function vmSize(name: string): Promise<{ vcpus: number; memoryKiB: number }> {
  const xml = (await virsh("dumpxml", "--domain", name)).stdout;
  const vcpu = /<vcpu\b[^>]*>(\d+)<\/vcpu>/.exec(xml);
  const mem = /<memory unit='KiB'>(\d+)<\/memory>/.exec(xml);
  if (!vcpu || !mem) {
    throw new Error(`no <vcpu>/<memory unit='KiB'> in the XML of ${name}:\n${xml}`);
  }
  return { vcpus: Number(vcpu[1]), memoryKiB: Number(mem[1]) };
}

/** A job that asks for something it may not have: build failure in prepare, no VM, no pull. */
async function assertRefusedSize(
  ws: Workspace,
  image: string,
  asks: Record<string, string>,
  message: RegExp,
) {
  let seenDuringPrepare = "";
  const job = await ws.run({
    image,
    variables: asks,
    prepareAttempts: 3,
    prepareRetryIntervalMs: 50,
    afterCall: async (call, ctx) => {
      if (call.stage === "prepare") seenDuringPrepare = await domState(ctx.vmName);
    },
  });
  const info = `${JSON.stringify(asks)}:\n${describeJob(job)}`;
  assert.equal(job.outcome, "script_failure", info);
  assert.equal(job.failedStage, "prepare", info);
  assert.equal(callsOf(job, "prepare").length, 1, `prepare is not retried: ${info}`);
  const prep = callOf(job, "prepare");
  assert.match(prep.stderr, message, info);
  assert.doesNotMatch(prep.stderr, /unexpected failure|\n\s+at |pulling/, info);
  assert.equal(seenDuringPrepare, "gone", `no VM was created: ${info}`);
  await assertNothingLeft(ws, job);
}

Deno.test({
  name: "executor: job sizes: INI vcpus/memory and SARDE_VCPUS/SARDE_MEMORY within max-* reach " +
    "the job VM; above max-*, or without max-*, a request is a build failure with no VM",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    // The image's own size is 1 vCPU and 256 MiB: every value below differs from it.
    await using ws = await workspace("sizes", {
      vcpus: "2",
      memory: "320M",
      "max-vcpus": "3",
      "max-memory": "384MiB",
    });
    await using noMax = await workspace("sizes-nomax", { vcpus: "2", memory: "320M" });

    // Refused at once, before any pull or VM.
    await assertRefusedSize(
      ws,
      img.image,
      { SARDE_VCPUS: "4" },
      /SARDE_VCPUS=4, above this runner's max-vcpus of 3/,
    );
    await assertRefusedSize(
      ws,
      img.image,
      { SARDE_VCPUS: "2", SARDE_MEMORY: "1G" },
      /SARDE_MEMORY=1G, above this runner's max-memory of 384MiB/,
    );
    await assertRefusedSize(
      noMax,
      img.image,
      { SARDE_VCPUS: "1" },
      /SARDE_VCPUS=1, but this runner does not let jobs choose[\s\S]*max-vcpus/,
    );
    await assertRefusedSize(
      noMax,
      img.image,
      { SARDE_MEMORY: "256M" },
      /SARDE_MEMORY=256M, but this runner does not let jobs choose[\s\S]*max-memory/,
    );
    for (const w of [ws, noMax]) {
      assert.ok(!(await exists(join(w.ocidir, img.registry.host))), "nothing was pulled");
    }

    // Two boots cover the four sources: INI vcpus + asked memory, then asked vcpus + INI memory.
    const cases: { asks: Record<string, string>; vcpus: number; memoryMiB: number }[] = [
      { asks: { SARDE_MEMORY: "384M" }, vcpus: 2, memoryMiB: 384 },
      { asks: { SARDE_VCPUS: "3" }, vcpus: 3, memoryMiB: 320 },
    ];
    for (const c of cases) {
      let size: { vcpus: number; memoryKiB: number } | undefined;
      const job = await ws.run({
        image: img.image,
        variables: c.asks,
        script: [
          'echo "CPUS=$(grep -c ^processor /proc/cpuinfo)"',
          "grep MemTotal /proc/meminfo",
        ],
        beforeCleanup: async (ctx) => {
          size = await vmSize(ctx.vmName);
        },
      });
      const info = `${JSON.stringify(c.asks)}:\n${describeJob(job)}`;
      assert.equal(job.outcome, "success", info);
      assert.deepEqual(size, { vcpus: c.vcpus, memoryKiB: c.memoryMiB * 1024 }, info);
      const out = callOf(job, "build_script").stdout;
      assert.match(out, new RegExp(`^CPUS=${c.vcpus}$`, "m"), `the guest sees the CPUs: ${info}`);
      const total = Number(/^MemTotal:\s+(\d+) kB$/m.exec(out)?.[1]);
      // The kernel keeps some for itself: what it reports is a little below what the VM has.
      assert.ok(
        total <= c.memoryMiB * 1024 && total > c.memoryMiB * 1024 * 0.8,
        `MemTotal ${total} kB for ${c.memoryMiB} MiB: ${info}`,
      );
      await assertNothingLeft(ws, job);
    }
  },
});

Deno.test({
  name: "executor: cache-budget: the least recently used unused image goes before the job's " +
    "pull (logged); a budget below the job's image alone → system failure with numbers, nothing removed",
  ...opts,
  fn: async () => {
    const img = await jobImages();
    const host = img.registry.host;
    await using ws = await workspace("budget", { "cache-budget": "1MiB" });
    const setBudget = async (value: string) => {
      const text = await Deno.readTextFile(ws.ini);
      await Deno.writeTextFile(
        ws.ini,
        text.replace(/^cache-budget = .*$/m, `cache-budget = ${value}`),
      );
    };
    const layout = (repo: string) => join(ws.ocidir, host, "sardines", repo);
    const repos = async () => {
      const dir = join(ws.ocidir, host, "sardines");
      if (!await exists(dir)) return [];
      return (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort();
    };
    /** Bytes the layout takes on disk (what makeRoom counts). */
    const usage = async (repo: string) =>
      Number((await run("du", ["-s", "-B1", layout(repo)], { check: true })).stdout.split("\t")[0]);

    // Two other images in the store, used 6 and 2 days ago.
    for (const [ref, age] of [[img.noUserImage, 6], [img.badPortImage, 2]] as const) {
      const r = await sarde(["fetch", "-d", ws.ocidir, ref]);
      assert.equal(r.code, 0, r.stderr);
      const repo = ref.split("/").at(-1)!.split(":")[0];
      await run("touch", ["-d", `${age} days ago`, join(layout(repo), "index.json")], {
        check: true,
      });
    }
    assert.deepEqual(await repos(), ["tiny-deaf", "tiny-nouser"]);
    const oldBytes = await usage("tiny-nouser");
    const newerBytes = await usage("tiny-deaf");

    // The job's image alone is more than the budget: nothing goes, the numbers are in the error.
    const tooBig = await ws.run({ image: img.image });
    let info = describeJob(tooBig);
    assert.equal(tooBig.outcome, "system_failure", info);
    assert.equal(tooBig.failedStage, "prepare", info);
    const prep = callOf(tooBig, "prepare");
    const m = new RegExp(
      `no room for ${host.replaceAll(".", "\\.")}/sardines/tiny:latest within cache-budget ` +
        `1\\.0 MiB: it needs (\\d+\\.\\d) MiB`,
    ).exec(prep.stderr);
    assert.ok(m, info);
    assert.match(prep.stderr, /raise cache-budget/, info);
    assert.doesNotMatch(prep.stderr, /removed|\n\s+at /, info);
    assert.ok(tooBig.log.includes(m[0]), "the numbers are in the job log");
    assert.deepEqual(
      (await repos()).filter((r) => r !== "tiny"),
      ["tiny-deaf", "tiny-nouser"],
      "nothing removed",
    );
    // The fetch had opened the job image's layout before the budget said no: it may stay, but
    // empty (no tag, no blob), so that nothing half-written is taken for an image.
    if (await exists(layout("tiny"))) {
      const index = JSON.parse(await Deno.readTextFile(join(layout("tiny"), "index.json")));
      assert.deepEqual(index.manifests, [], "no tag in the job image's layout");
      const blobs = await Array.fromAsync(Deno.readDir(join(layout("tiny"), "blobs", "sha256")));
      assert.deepEqual(blobs.map((e) => e.name), [], "no blob in the job image's layout");
    }
    await assertNothingLeft(ws, tooBig);

    // Room for the job's image and the newer image, not for the older one as well.
    const needBytes = Number(m[1]) * 1024 * 1024;
    await setBudget(String(Math.round(needBytes + newerBytes + oldBytes / 2)));
    const job = await ws.run({ image: img.image, script: ["echo BUDGET-JOB-RAN"] });
    info = describeJob(job);
    assert.equal(job.outcome, "success", info);
    assert.match(callOf(job, "build_script").stdout, /BUDGET-JOB-RAN/, info);
    const stderr = callOf(job, "prepare").stderr;
    const removedLine = new RegExp(
      `cache-budget: removed cached image ${host.replaceAll(".", "\\.")}/sardines/tiny-nouser \\(`,
    );
    assert.match(stderr, removedLine, info);
    assert.match(stderr, /cache-budget: freed \d+\.\d MiB for .*\/sardines\/tiny:latest/, info);
    assert.doesNotMatch(stderr, /removed cached image .*tiny-deaf/, info);
    assert.ok(
      stderr.search(removedLine) < stderr.search(/importing|started job VM/),
      `room is made before the download and import: ${info}`,
    );
    assert.match(job.log, removedLine, "the removal is in the job log");
    assert.deepEqual(await repos(), ["tiny", "tiny-deaf"], "only the least recently used went");
    await assertNothingLeft(ws, job);
  },
});

Deno.test({
  name: "executor: (teardown) stop the job images' registry",
  ...opts,
  fn: async () => {
    await images?.dispose();
  },
});
