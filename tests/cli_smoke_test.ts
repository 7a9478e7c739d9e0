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
