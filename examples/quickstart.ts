/**
 * The quick start, end to end on this machine: a tiny Linux VM is built from Debian packages,
 * exported with `sarde export`, pushed to a throw-away registry on 127.0.0.1, pulled back into an
 * empty store (`sarde pull`), listed, and then a GitLab-style CI job runs in a fresh clone of it
 * through `gitlab-sardinecake-executor`. Run it through `examples/quickstart.sh`.
 */
import { join } from "node:path";
import { ensureGuest, GUEST_PASSWORD } from "../tests/support/guest.ts";
import { jobImageDomainXml } from "../tests/support/job_image.ts";
import { startRegistry } from "../tests/support/registry.ts";
import { describeJob, runJob } from "../tests/support/runner.ts";
import { ensureLibvirtd, makeVmDir, removeVmDir, TEST_URI } from "../tests/support/vms.ts";

const bin = (name: string) => new URL(`../bin/${name}`, import.meta.url).pathname;
const env = { LIBVIRT_DEFAULT_URI: TEST_URI };
const say = (text: string) => console.error(`\n== ${text}`);

async function sh(cmd: string, args: string[], show = true): Promise<string> {
  if (show) console.error(`$ ${cmd.split("/").at(-1)} ${args.join(" ")}`);
  const stderr = show ? "inherit" : "null";
  const out = await new Deno.Command(cmd, { args, env, stdout: "piped", stderr }).output();
  const stdout = new TextDecoder().decode(out.stdout);
  if (show) Deno.stdout.writeSync(out.stdout);
  if (!out.success) throw new Error(`${cmd} ${args[0]} failed with exit code ${out.code}`);
  return stdout.trim();
}
const sarde = (...args: string[]) => sh(bin("sarde"), args);
const virsh = (...args: string[]) => sh("virsh", ["-c", TEST_URI, ...args], false).catch(() => "");

await ensureLibvirtd();
const work = await makeVmDir("quickstart");
const vm = `sarde-quickstart-${Deno.pid}`;
let imported = "";
try {
  await using registry = await startRegistry("plain");
  say(`a registry on ${registry.url}; building a tiny Linux guest from Debian packages`);
  const guest = await ensureGuest();
  const disk = join(work, "root.qcow2");
  await Deno.copyFile(guest.rootfs, disk);
  await Deno.writeTextFile(
    join(work, "domain.xml"),
    jobImageDomainXml({
      name: vm,
      dir: work,
      rootDisk: disk,
      kernel: guest.kernel,
      initrd: guest.initrd,
    }),
  );
  await sh("virsh", ["-c", TEST_URI, "define", "--file", join(work, "domain.xml")]);
  await Deno.writeTextFile(
    join(work, "vm.json"),
    JSON.stringify({
      users: [{ username: "root", password: GUEST_PASSWORD }],
      services: [{ service: "ssh", port: 22, protocol: "tcp" }],
    }),
  );

  const image = `${registry.host}/sardines/quickstart:latest`;
  const store = join(work, "oci");
  say("export the VM (disk, kernel, initrd, domain XML, VM config) and push it");
  await sarde(
    "export",
    "--ocidir",
    join(work, "exported"),
    "--vmconfig",
    join(work, "vm.json"),
    vm,
    image,
  );
  await sarde("push", "--ocidir", join(work, "exported"), image);

  say("pull it into an empty store: fetch + atomic import as a libvirt VM");
  imported = await sarde("pull", "--ocidir", store, "--vmdir", join(work, "vms"), image);
  await sarde("list", "--ocidir", store);

  say("run a CI job in a fresh copy-on-write clone, as gitlab-runner would");
  const ini = join(work, "executor.ini");
  await Deno.writeTextFile(
    ini,
    [
      "[DEFAULT]",
      `connect = ${TEST_URI}`,
      `ocidir = ${store}`,
      `vmdir = ${join(work, "vms")}`,
      `clonedir = ${join(work, "jobs")}`,
      "timeout = 120s",
      "domain-type = qemu",
      "network = user",
      "network-restrict = true",
      "guest-builds-dir = /builds",
      "guest-cache-dir = /cache",
      `allowed-images = ${registry.host}/sardines/*`,
      "",
    ].join("\n"),
  );
  const job = await runJob({
    executor: bin("gitlab-sardinecake-executor"),
    env: { GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES: ini },
    image,
    script: ["echo hello from the job VM", "uname -srm", "grep -c processor /proc/cpuinfo"],
  });
  console.error(job.log);
  if (job.outcome !== "success") throw new Error(`the job failed:\n${describeJob(job)}`);
  say(`quick start OK: exported, pushed, pulled as VM ${imported}, and a job ran in a clone of it`);
} finally {
  for (const name of [vm, imported].filter(Boolean)) {
    await virsh("destroy", "--domain", name);
    await virsh("undefine", "--domain", name, "--nvram");
  }
  await removeVmDir(work);
}
