/**
 * `gitlab-sardinecake-executor`: the GitLab Runner custom executor (stages `config`, `prepare`,
 * `run`, `cleanup`). Not implemented yet: it says so and fails as a system failure, so a runner
 * configured with it never reports a job as passed.
 *
 * @module
 */

if (import.meta.main) {
  const code = Number(Deno.env.get("SYSTEM_FAILURE_EXIT_CODE") ?? "2") || 2;
  Deno.stderr.writeSync(
    new TextEncoder().encode(
      "gitlab-sardinecake-executor: not implemented yet in this version of sarde (stages config/prepare/run/cleanup)\n",
    ),
  );
  Deno.exit(code);
}
