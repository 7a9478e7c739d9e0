/**
 * Smoke tests of the `sarde` program as shipped. CI runs this file twice: on the sources and, with
 * SARDE_BUNDLE=1, on the `deno bundle` output (dist/sarde.js).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { makeImage, run, sarde, tempDir } from "./support/images.ts";
import { startRegistry } from "./support/registry.ts";
import { defineTestVm, ensureLibvirtd, TEST_URI, undefineVms } from "./support/vms.ts";

Deno.test("cli: --help and --version go to stdout and exit 0", async () => {
  const help = await sarde(["--help"]);
  assert.equal(help.code, 0);
  for (const cmd of ["login", "logout", "fetch", "push", "list", "getconfig"]) {
    assert.match(help.stdout, new RegExp(`\\b${cmd}\\b`));
  }
  const version = await sarde(["--version"]);
  assert.equal(version.code, 0);
  assert.match(version.stdout, /^\d+\.\d+\.\d+\n$/);
  const sub = await sarde(["push", "--help"]);
  assert.match(sub.stdout, /--chunk-size/);
});

Deno.test("cli: usage errors exit 2 with one line on stderr and nothing on stdout", async () => {
  for (
    const args of [["frobnicate"], ["fetch"], ["fetch", "Bad/Ref"], [
      "push",
      "--concurrency",
      "zero",
      "x",
    ], ["list", "--format", "xml"]]
  ) {
    const r = await sarde(args);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.equal(r.stdout, "", args.join(" "));
    assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
  }
});

Deno.test("cli: push, fetch, list and getconfig against a real registry", async () => {
  await using reg = await startRegistry("plain");
  const work = await tempDir("smoke");
  const ref = `${reg.host}/smoke/img:v1`;
  const img = await makeImage(join(work, "a"), ref, [{ size: 1 << 20 }]);
  assert.equal(
    (await sarde(["push", "-d", join(work, "a"), ref])).stdout.trim(),
    img.manifestDigest,
  );
  assert.equal(
    (await sarde(["fetch", "-q", "-d", join(work, "b"), ref])).stdout.trim(),
    img.manifestDigest,
  );
  const list = JSON.parse(
    (await sarde(["list", "-d", join(work, "b"), "--format", "json"])).stdout,
  );
  assert.equal(list[0].id, img.configDigest);
  const cfg = JSON.parse((await sarde(["getconfig", "-d", join(work, "b"), ref])).stdout);
  assert.equal(cfg.users[0].username, "root");
  const empty = await sarde(["list", "-d", join(work, "empty")]);
  assert.equal(empty.code, 0);
  assert.equal(empty.stdout.trim().split("\n").length, 1, "an empty store lists only the header");
  await Deno.remove(work, { recursive: true });
});

Deno.test("executor: --help explains, an unknown stage is a system failure", async () => {
  const bin = new URL("../bin/gitlab-sardinecake-executor", import.meta.url).pathname;
  const help = await run(bin, ["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /config\|prepare\|run <script> <stage>\|cleanup/);
  const bad = await run(bin, ["frobnicate"], { env: { SYSTEM_FAILURE_EXIT_CODE: "42" } });
  assert.equal(bad.code, 42);
  assert.match(bad.stderr, /unknown stage/);
});

Deno.test("cli: INI files give defaults; sections do not leak; the command line wins", async () => {
  const work = await tempDir("ini");
  const ref = "local/ini:v1";
  const img = await makeImage(join(work, "store"), ref, [{ size: 1 << 10 }]);
  const ini = join(work, "sarde.ini");
  await Deno.writeTextFile(
    ini,
    `[DEFAULT]\nocidir = ${
      join(work, "store")
    }\n\n[list]\nformat = json\n\n[getconfig]\nocidir = /nonexistent\n`,
  );
  const env = { SARDE_CONF_FILES: ini };
  const list = await sarde(["list"], { env });
  assert.equal(list.code, 0, list.stderr);
  assert.equal(
    JSON.parse(list.stdout)[0].id,
    img.configDigest,
    "[DEFAULT] ocidir and [list] format apply",
  );
  const text = await sarde(["list", "--format", "text"], { env });
  assert.match(text.stdout, /^SOURCE/, "the command line wins over the INI");
  const cfg = await sarde(["getconfig", ref], { env });
  assert.equal(cfg.code, 3, "[getconfig] ocidir applies to getconfig only");
  await Deno.writeTextFile(ini, "[list]\nthis line is broken\n");
  const broken = await sarde(["list"], { env });
  assert.equal(broken.code, 2);
  assert.match(broken.stderr, /sarde\.ini:2/);
  await Deno.remove(work, { recursive: true });
});

/** Runs sarde with `ini` as its only config file. */
async function withIni(work: string, ini: string, args: string[]) {
  const file = join(work, "sarde.ini");
  await Deno.writeTextFile(file, ini);
  return { file, ...await sarde(args, { env: { SARDE_CONF_FILES: file } }) };
}

/** Asserts a usage failure (exit 2, one line and a hint at most, nothing on stdout). */
function assertUsage(r: { code: number; stdout: string; stderr: string }, pattern: RegExp) {
  assert.equal(r.code, 2, r.stderr);
  assert.equal(r.stdout, "");
  assert.match(r.stderr, pattern);
  assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
  assert.ok(r.stderr.trim().split("\n").length <= 2, r.stderr);
}

Deno.test("cli: INI values get the options' checks; unknown keys are errors with file:line", async () => {
  const work = await tempDir("ini-checks");
  // Each failure comes before any work: the registry on port 1 is never contacted.
  const ref = "127.0.0.1:1/never/contacted:v1";
  const cases: [string, string[], RegExp][] = [
    // `[pull] concurrency = 0` used to hang `sarde pull` forever (-j 0 was refused).
    [
      "[pull]\nconcurrency = 0\n",
      ["pull", ref],
      /sarde\.ini:2: invalid \[pull\] concurrency '0' \(expected a whole number ≥ 1\)/,
    ],
    [
      "[DEFAULT]\nconcurrency = -3\n",
      ["fetch", ref],
      /sarde\.ini:2: invalid \[DEFAULT\] concurrency/,
    ],
    [
      "[export]\n\nzstd-level = 99\n",
      ["export", "no-such-vm"],
      /sarde\.ini:3: invalid \[export\] zstd-level '99' \(expected a whole number from 1 to 19\)/,
    ],
    [
      "[export]\nchunksize = 64\n",
      ["export", "no-such-vm"],
      /sarde\.ini:2: invalid \[export\] chunksize 64 bytes: the minimum for zstd chunks is 1MiB\nhint: 64 means 64 bytes; did you mean 64MiB\?/,
    ],
    [
      "[export]\ncompression = xz\n",
      ["export", "no-such-vm"],
      /sarde\.ini:2: invalid \[export\] compression 'xz'/,
    ],
    ["[list]\nformat = xml\n", ["list"], /sarde\.ini:2: invalid \[list\] format 'xml'/],
    [
      "[fetch]\nresponse-timeout = soon\n",
      ["fetch", ref],
      /sarde\.ini:2: invalid \[fetch\] response-timeout 'soon'/,
    ],
    [
      "[DEFAULT]\nretry-timeout = 2 parsecs\n",
      ["pull", ref],
      /sarde\.ini:2: invalid \[DEFAULT\] retry-timeout/,
    ],
    [
      "[push]\nchunk-size = 64\n",
      ["push", ref],
      /sarde\.ini:2: invalid \[push\] chunk-size 64 bytes/,
    ],
    ["[DEFAULT]\nverbose = lots\n", ["list"], /sarde\.ini:2: invalid \[DEFAULT\] verbose 'lots'/],
    // Misspelt keys and sections used to be ignored without a word.
    [
      "[pull]\nconcurency = 2\n",
      ["pull", ref],
      /sarde\.ini:2: unknown key 'concurency' in \[pull\]; did you mean 'concurrency'\?/,
    ],
    [
      "[DEFAULT]\n[exprot]\nforce = true\n",
      ["list"],
      /sarde\.ini:2: unknown section \[exprot\]; did you mean \[export\]\?/,
    ],
  ];
  for (const [ini, args, pattern] of cases) {
    const r = await withIni(work, ini, ["-q", ...args]);
    assertUsage(r, new RegExp(`^error: ${r.file}${pattern.source.replace(/^sarde\\.ini/, "")}`));
  }
  const missing = await sarde(["list"], { env: { SARDE_CONF_FILES: join(work, "missing.ini") } });
  assertUsage(missing, /config file .*missing\.ini \(named in \$SARDE_CONF_FILES\) does not exist/);
  // Valid values still work, [DEFAULT] takes any command's keys, and the command line wins.
  const ok = await withIni(
    work,
    `[DEFAULT]\nocidir = ${join(work, "store")}\nconcurrency = 8\nchunksize = 256MiB\n` +
      "retry-timeout = 0\n[list]\nformat = json\nverbose = 1\n",
    ["list", "-q", "--format", "text"],
  );
  assert.equal(ok.code, 0, ok.stderr);
  assert.match(ok.stdout, /^SOURCE/);
  await Deno.remove(work, { recursive: true });
});

Deno.test("cli: chunk sizes and deadlines are checked on the command line", async () => {
  const cases: [string[], RegExp][] = [
    [
      ["export", "--chunksize", "64", "vm"],
      /^error: invalid --chunksize 64 bytes: the minimum for zstd chunks is 1MiB\nhint: 64 means 64 bytes; did you mean 64MiB\?\n$/,
    ],
    [
      ["export", "--chunksize", "0", "vm"],
      /invalid --chunksize 0 bytes: .* 1MiB\nhint: leave it out/,
    ],
    [
      ["export", "--compression", "gzip", "--chunksize", "1KiB", "vm"],
      /invalid --chunksize 1KiB: the minimum for gzip pieces is 64KiB/,
    ],
    [["export", "--zstd-level", "20", "vm"], /invalid --zstd-level '20'/],
    [
      ["push", "--chunk-size", "512", "x"],
      /invalid --chunk-size 512 bytes: .* 64KiB\nhint: 512 means/,
    ],
    [
      ["fetch", "--response-timeout", "0", "x"],
      /invalid --response-timeout '0' \(must be longer than 0\)/,
    ],
    [["login", "--retry-timeout", "soon", "x"], /invalid --retry-timeout 'soon'/],
  ];
  for (const [args, pattern] of cases) assertUsage(await sarde(args), pattern);
});

Deno.test("cli: an export whose manifest would pass 4 MiB is refused before any work", async () => {
  const work = await tempDir("manifest-cap");
  // 8 GiB of holes: 8,192 chunks of 1 MiB, about 7 MiB of manifest as estimated before the
  // export (every chunk counted with a frame-table annotation).
  const disk = join(work, "big.img");
  using f = await Deno.create(disk);
  await f.truncate(8 * 2 ** 30);
  const xml = join(work, "big.xml");
  await Deno.writeTextFile(
    xml,
    "<domain type='kvm'><name>big</name><memory unit='MiB'>64</memory>" +
      "<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>" +
      `<driver name='qemu' type='raw'/><source file='${disk}'/><target dev='vda'/>` +
      "</disk></devices></domain>",
  );
  const store = join(work, "store");
  const r = await sarde([
    "export",
    "-d",
    store,
    "--libvirtconfig",
    xml,
    "--chunksize",
    "1MiB",
    "big",
    "local/big:v1",
  ]);
  assertUsage(
    r,
    /^error: the image would have 8192 layers and a manifest of about [\d.]+ MiB, more than the 4\.0 MiB registries and sarde accept\nhint: use larger chunks, e\.g\. --chunksize 4MiB\n$/,
  );
  const written = await Array.fromAsync(Deno.readDir(store)).catch(() => []);
  assert.deepEqual(written, [], "nothing was written");
  await Deno.remove(work, { recursive: true });
});

Deno.test("executor: an unknown INI key fails the job at config, with file:line and the closest key", async () => {
  const work = await tempDir("executor-ini");
  const ini = join(work, "executor.ini");
  // The typo turned the allow-list off: every image was allowed.
  await Deno.writeTextFile(ini, "[DEFAULT]\ntimeout = 60s\nallowed-image = 127.0.0.1:1/ok/*\n");
  const job = join(work, "job.json");
  await Deno.writeTextFile(job, JSON.stringify({ id: 7, image: { name: "elsewhere/evil:1" } }));
  const bin = new URL("../bin/gitlab-sardinecake-executor", import.meta.url).pathname;
  const r = await run(bin, ["config"], {
    env: {
      GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES: ini,
      JOB_RESPONSE_FILE: job,
      CUSTOM_ENV_CI_JOB_ID: "7",
      SYSTEM_FAILURE_EXIT_CODE: "2",
      BUILD_FAILURE_EXIT_CODE: "1",
    },
  });
  assert.equal(r.code, 2, r.stderr);
  assert.equal(r.stdout, "", "no config JSON for the runner");
  assert.match(
    r.stderr,
    new RegExp(
      `${ini}:3: unknown key 'allowed-image' in \\[DEFAULT\\]; did you mean 'allowed-images'\\?`,
    ),
  );
  await Deno.remove(work, { recursive: true });
});

Deno.test({
  name: "cli: a VM goes out with export --push and comes back with pull (codec workers, FFI)",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    // Also run on the bundle in CI (SARDE_BUNDLE=1): the workers start from a blob URL and
    // load libzstd and libc there too.
    await ensureLibvirtd();
    await using vm = await defineTestVm({ rawDisk: true });
    await using reg = await startRegistry("plain");
    const work = await tempDir("cli-vm");
    const vmdir = join("/var/tmp/sarde-test-vms", `cli-vm-${Deno.pid}`);
    const ref = `${reg.host}/cli/vm:v1`;
    const env = { LIBVIRT_DEFAULT_URI: TEST_URI };
    let name = "";
    try {
      const ex = await sarde(
        ["export", "--push", "-d", join(work, "src"), "--chunksize", "1MiB", vm.name, ref],
        { env },
      );
      assert.equal(ex.code, 0, ex.stderr);
      assert.match(ex.stdout, /^[0-9a-f]{64}\n$/, "the image ID on stdout");
      const p = await sarde(["pull", "-d", join(work, "dst"), "--vmdir", vmdir, ref], { env });
      assert.equal(p.code, 0, p.stderr);
      name = p.stdout.trim();
      assert.equal(name, `sha256:${ex.stdout.trim()}`);
      for (const d of vm.disks) {
        const copy = join(vmdir, name, d.disk.path.split("/").at(-1)!);
        const f = d.disk.format;
        const cmp = await run("qemu-img", ["compare", "-f", f, "-F", f, d.disk.path, copy]);
        assert.equal(cmp.code, 0, `${d.disk.path}: ${cmp.stdout}${cmp.stderr}`);
      }
    } finally {
      await undefineVms([name]);
      await Deno.remove(vmdir, { recursive: true }).catch(() => {});
      await Deno.remove(work, { recursive: true });
    }
  },
});
