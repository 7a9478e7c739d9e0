/**
 * `gitlab-sardinecake-executor`: the GitLab Runner custom executor. A thin shell over
 * `lib/executor/stages.ts`: `config`, `prepare`, `run <script> <stage>`, `cleanup`.
 *
 * Settings come from `/etc/gitlab-runner/gitlab-sardinecake-executor.ini`,
 * `~/.config/gitlab-runner/gitlab-sardinecake-executor.ini` or
 * `$GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES`; see `examples/gitlab-sardinecake-executor.ini`.
 *
 * @module
 */

import {
  installSignalHandlers,
  interruptSignal,
  onInterrupt,
  settleInterrupt,
} from "./lib/util/cleanup.ts";
import {
  cleanupStage,
  configStage,
  destroyJobVm,
  exitCodes,
  isJobFault,
  prepareStage,
  reportFailure,
  runStage,
} from "./lib/executor/stages.ts";
import { error, setVerbosity } from "./lib/util/log.ts";
import { VERSION } from "./lib/util/version.ts";

const USAGE =
  `usage: gitlab-sardinecake-executor [-v|-q] config|prepare|run <script> <stage>|cleanup

GitLab Runner custom executor: runs every job in a fresh copy-on-write VM cloned from the
job's image (a sardinecake OCI image). Configure the runner with
  config_exec = "gitlab-sardinecake-executor"   config_args = ["config"]
  prepare_exec = "gitlab-sardinecake-executor"  prepare_args = ["prepare"]
  run_exec = "gitlab-sardinecake-executor"      run_args = ["run"]
  cleanup_exec = "gitlab-sardinecake-executor"  cleanup_args = ["cleanup"]
Settings: /etc/gitlab-runner/gitlab-sardinecake-executor.ini, ~/.config/gitlab-runner/…,
or $GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES.
`;

/** Destroys the job VM when the runner cancels the job (SIGTERM), so nothing keeps running. */
function destroyOnInterrupt(env: Record<string, string | undefined>): () => void {
  return onInterrupt(async () => {
    const vm = await destroyJobVm(env);
    if (vm) error(`job cancelled: destroyed the job VM ${vm}`);
  });
}

/** Runs one stage; returns the exit code for the runner. */
export async function main(
  args: string[],
  env: Record<string, string | undefined>,
): Promise<number> {
  let verbose = 0, quiet = 0;
  while (args[0]?.startsWith("-")) {
    const a = args.shift()!;
    if (a === "-v" || a === "--verbose") verbose++;
    else if (a === "-q" || a === "--quiet") quiet++;
    else if (a === "-V" || a === "--version") {
      console.log(VERSION);
      return 0;
    } else if (a === "-h" || a === "--help") {
      Deno.stdout.writeSync(new TextEncoder().encode(USAGE));
      return 0;
    } else {
      Deno.stderr.writeSync(new TextEncoder().encode(`unknown option ${a}\n${USAGE}`));
      return exitCodes(env).system;
    }
  }
  setVerbosity(verbose, quiet);
  const codes = exitCodes(env);
  const stage = args[0];
  try {
    switch (stage) {
      case "config":
        Deno.stdout.writeSync(
          new TextEncoder().encode(JSON.stringify(await configStage(env)) + "\n"),
        );
        return 0;
      case "prepare": {
        destroyOnInterrupt(env);
        try {
          await prepareStage(env, interruptSignal);
        } catch (err) {
          reportFailure(err);
          await cleanupStage(env).catch(() => {});
          // The job's own mistakes (image) fail the job at once; the runner retries the rest.
          return isJobFault(err) ? codes.build : codes.system;
        }
        return 0;
      }
      case "run": {
        if (args.length < 3) {
          error("run needs the script path and the stage name");
          return codes.system;
        }
        const [script, name] = args.slice(-2);
        let child: Deno.ChildProcess | undefined;
        const unregister = destroyOnInterrupt(env);
        onInterrupt(() => {
          try {
            child?.kill("SIGTERM");
          } catch { /* already gone */ }
        });
        const outcome = await runStage(env, script, name, { onSpawn: (c) => (child = c) });
        unregister();
        if (outcome.kind === "ok") return 0;
        if (outcome.kind === "system") {
          error(outcome.message);
          return codes.system;
        }
        const file = env.BUILD_EXIT_CODE_FILE;
        if (file) await Deno.writeTextFile(file, `${outcome.code}\n`);
        error(`${name} failed with exit code ${outcome.code}`);
        return codes.build;
      }
      case "cleanup":
        await cleanupStage(env);
        return 0;
      default:
        Deno.stderr.writeSync(new TextEncoder().encode(`unknown stage '${stage ?? ""}'\n${USAGE}`));
        return codes.system;
    }
  } catch (err) {
    reportFailure(err);
    return stage === "cleanup" ? 0 : codes.system;
  }
}

if (import.meta.main) {
  installSignalHandlers();
  const code = await main([...Deno.args], Deno.env.toObject());
  // When cancelled, the ssh child dies with us and main returns early: let the signal handler
  // finish destroying the VM before the process ends.
  await settleInterrupt();
  Deno.exit(code);
}
