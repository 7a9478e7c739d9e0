/**
 * Running commands in a guest over SSH with the OpenSSH client.
 *
 * Secrets stay off argv and disk: a password reaches `sshpass` through the `SSHPASS` environment
 * variable, scripts go through stdin. The guest's host key is accepted on first contact and
 * pinned in a per-job `known_hosts` for the rest of that job (a throw-away VM has a host key
 * nobody could have known beforehand, but it must not change while the job runs).
 *
 * Private to `lib/executor/`: other folders use what `lib/executor/mod.ts` offers.
 *
 * @module
 */

import { fail } from "../util/errors.ts";
import { debug } from "../util/log.ts";
import { sleep } from "../util/retry.ts";

/** Where and how to log in. */
export interface SshTarget {
  host: string;
  port: number;
  user: string;
  password?: string;
  identityFile?: string;
  /** The job's own known_hosts file. */
  knownHosts: string;
}

/** Result of a command run in the guest. */
export interface SshResult {
  /** Exit code of the remote command, or 255 when ssh itself failed. */
  code: number;
  stdout: string;
  stderr: string;
}

function sshCommand(
  target: SshTarget,
  remote: string[],
  firstContact: boolean,
  connectTimeout = 10,
): { cmd: string; args: string[]; env: Record<string, string> } {
  const options = [
    "-o",
    `UserKnownHostsFile=${target.knownHosts}`,
    "-o",
    `StrictHostKeyChecking=${firstContact ? "accept-new" : "yes"}`,
    "-o",
    "GlobalKnownHostsFile=/dev/null",
    "-o",
    `ConnectTimeout=${connectTimeout}`,
    "-o",
    "ServerAliveInterval=15",
    "-o",
    "ServerAliveCountMax=4",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "NumberOfPasswordPrompts=1",
    "-p",
    String(target.port),
  ];
  if (target.identityFile) options.push("-i", target.identityFile, "-o", "IdentitiesOnly=yes");
  const auth = target.password !== undefined
    ? (target.identityFile
      ? "publickey,password,keyboard-interactive"
      : "password,keyboard-interactive")
    : "publickey";
  options.push("-o", `PreferredAuthentications=${auth}`);
  if (target.password === undefined) options.push("-o", "BatchMode=yes");
  if (!/^[A-Za-z0-9_.][A-Za-z0-9_.@$-]*$/.test(target.user)) {
    throw fail("usage", `invalid SSH user name '${target.user}'`);
  }
  // "--" ends ssh's options: nothing taken from an image can be read as one.
  const ssh = ["ssh", ...options, "--", `${target.user}@${target.host}`, ...remote];
  if (target.password === undefined) return { cmd: ssh[0], args: ssh.slice(1), env: {} };
  return { cmd: "sshpass", args: ["-e", ...ssh], env: { SSHPASS: target.password } };
}

/** Options of {@link sshRun}. */
export interface SshRunOptions {
  /** Bytes for the remote command's stdin (a script). */
  stdin?: Uint8Array;
  /** Stream output to our stdout/stderr instead of capturing it. */
  inherit?: boolean;
  /** First contact: accept and record the host key. */
  firstContact?: boolean;
  /** Seconds for the TCP connect and banner (default 10). */
  connectTimeout?: number;
  signal?: AbortSignal;
  /** Called with the child process right after it starts (to kill it on SIGTERM). */
  onSpawn?: (child: Deno.ChildProcess) => void;
}

/** Runs `remote` (argv, joined by the remote shell) in the guest. */
export async function sshRun(
  target: SshTarget,
  remote: string[],
  options: SshRunOptions = {},
): Promise<SshResult> {
  const { cmd, args, env } = sshCommand(
    target,
    remote,
    options.firstContact === true,
    options.connectTimeout,
  );
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(cmd, {
      args,
      env,
      stdin: options.stdin ? "piped" : "null",
      stdout: options.inherit ? "inherit" : "piped",
      stderr: options.inherit ? "inherit" : "piped",
      signal: options.signal,
    }).spawn();
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw fail("external", `${cmd} is not installed`, "install openssh-client and sshpass");
    }
    throw err;
  }
  options.onSpawn?.(child);
  if (options.stdin) {
    const w = child.stdin.getWriter();
    try {
      await w.write(options.stdin);
      await w.close();
    } catch { /* the remote side closed stdin early; its exit status tells the rest */ }
  }
  const out = await child.output();
  const dec = new TextDecoder();
  return {
    code: out.code,
    stdout: options.inherit ? "" : dec.decode(out.stdout),
    stderr: options.inherit ? "" : dec.decode(out.stderr),
  };
}

/** Why a login attempt failed: the guest is not up yet, or it refused us for good. */
export function classifySshFailure(r: SshResult): "auth" | "hostkey" | "unreachable" {
  const text = r.stderr;
  // sshpass: 5 = wrong password, 6 = host key unknown/changed.
  if (
    /Permission denied|Authentication failed|Too many authentication failures/i.test(text) ||
    r.code === 5
  ) {
    return "auth";
  }
  if (
    /REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed/i.test(text) ||
    r.code === 6
  ) return "hostkey";
  return "unreachable";
}

/**
 * Waits until the guest accepts an SSH login, retrying while it boots. Gives up at once when the
 * guest refuses the credentials, and after `timeoutMs` otherwise, with a message on what to check.
 */
export async function waitForSsh(
  target: SshTarget,
  options: {
    timeoutMs: number;
    signal?: AbortSignal;
    onWait?: (elapsedMs: number, last: string) => void;
    alive?: () => Promise<boolean>;
  },
): Promise<number> {
  const start = Date.now();
  let last = "";
  let lastReport = 0;
  for (let attempt = 1;; attempt++) {
    // A short timeout: with user-mode networking the port forward accepts at once and the banner
    // only comes when sshd is up, so a long timeout just delays the next try.
    const r = await sshRun(target, ["true"], {
      firstContact: true,
      signal: options.signal,
      connectTimeout: 3,
    });
    if (options.signal?.aborted) throw fail("interrupted", "interrupted while waiting for SSH");
    if (r.code === 0) return Date.now() - start;
    last = r.stderr.trim().split("\n").at(-1) ?? `exit ${r.code}`;
    const kind = classifySshFailure(r);
    if (kind === "auth") {
      throw fail(
        "auth",
        `the guest at ${target.host}:${target.port} refused the login of '${target.user}' (${last})`,
        "check username/password/identity-file in the executor INI and the image's vmconfig",
      );
    }
    if (kind === "hostkey") {
      throw fail("auth", `the guest's SSH host key changed during the job (${last})`);
    }
    const elapsed = Date.now() - start;
    if (options.alive && !await options.alive()) {
      throw fail(
        "external",
        `the VM stopped while waiting for SSH (last: ${last})`,
        "check the VM's console log in its folder",
      );
    }
    if (elapsed >= options.timeoutMs) {
      throw fail(
        "network",
        `no SSH login on ${target.host}:${target.port} after ${
          Math.round(elapsed / 1000)
        } s (last: ${last})`,
        "is sshd running in the image on that port, and is the timeout long enough for it to boot?",
      );
    }
    if (elapsed - lastReport >= 10_000) {
      lastReport = elapsed;
      options.onWait?.(elapsed, last);
    }
    debug(`ssh attempt ${attempt}: ${last}`);
    await sleep(Math.min(1000, 250 * attempt), options.signal);
  }
}
