/**
 * Ctrl-C and SIGTERM handling: an abort signal for work in flight, and cleanup actions (temp files)
 * that run before the process exits, so an interrupted command leaves nothing half-written.
 *
 * @module
 */

const actions = new Set<() => void | Promise<void>>();
const controller = new AbortController();
let installed = false;
let exiting: Promise<never> | undefined;

/** Aborted on SIGINT/SIGTERM once {@link installSignalHandlers} ran. */
export const interruptSignal: AbortSignal = controller.signal;

/** Registers an action to run if the process is interrupted; returns its unregister function. */
export function onInterrupt(action: () => void | Promise<void>): () => void {
  actions.add(action);
  return () => actions.delete(action);
}

/** Runs all registered actions (used on interrupt; exported for tests). */
export async function runInterruptActions(): Promise<void> {
  for (const action of [...actions].reverse()) {
    try {
      await action();
    } catch { /* best effort: keep cleaning */ }
  }
  actions.clear();
}

/** Installs SIGINT/SIGTERM handlers that abort work, clean up and exit with 130/143. */
export function installSignalHandlers(): void {
  if (installed) return;
  installed = true;
  const handle = (signal: Deno.Signal, code: number) => {
    Deno.addSignalListener(signal, () => {
      if (exiting) return;
      controller.abort(new Error("interrupted"));
      exiting = (async () => {
        await runInterruptActions();
        Deno.stderr.writeSync(
          new TextEncoder().encode(`\ninterrupted (${signal}); nothing half-written was kept\n`),
        );
        Deno.exit(code);
      })();
    });
  };
  handle("SIGINT", 130);
  handle("SIGTERM", 143);
}

/**
 * Waits for an interrupt in progress to finish its cleanup actions (the process then exits).
 * Main code that notices the interruption first calls this instead of exiting on its own, so a
 * cleanup action (destroying a job VM) is never cut short. Returns at once when not interrupted.
 */
export async function settleInterrupt(): Promise<void> {
  if (exiting) await exiting;
}
