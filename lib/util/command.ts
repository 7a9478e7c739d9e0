/**
 * Running an external program (virsh, qemu-img) with captured output, in the C locale so its
 * messages can be parsed, and stdin closed so it can never wait for input.
 *
 * @module
 */

import { fail } from "./errors.ts";
import { debug } from "./log.ts";

/** What a program printed and how it exited. */
export interface ProgramResult {
  code: number;
  stdout: string;
  stderr: string;
}

const decoder = new TextDecoder();

/**
 * Runs `program` with `args` and returns its result whatever the exit code. Only a program that
 * cannot be started throws (`external`, with `installHint` when it is missing). `signal` kills it.
 */
export async function runProgram(
  program: string,
  args: string[],
  installHint: string,
  signal?: AbortSignal,
): Promise<ProgramResult> {
  debug(`run: ${program} ${args.join(" ")}`);
  let out: Deno.CommandOutput;
  try {
    out = await new Deno.Command(program, {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { LC_ALL: "C" },
      signal,
    }).output();
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw fail("external", `${program} not found in PATH`, installHint);
    }
    throw fail("external", `cannot run ${program}: ${(err as Error).message}`);
  }
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}
