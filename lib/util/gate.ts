/**
 * A priority gate: foreground work (a guest's demand read) holds it, background work (the
 * download that completes a lazy pull) waits at it between steps. Sharing a slow link, the
 * background would otherwise take most of the bandwidth from the reads a guest waits for.
 *
 * @module
 */

/** A gate: see the module doc. */
export interface PriorityGate {
  /**
   * Foreground work starts: {@link PriorityGate.wait} blocks until every hold is released and
   * `graceMs` have passed (reads come in bursts: a gap between two should not let the background
   * fill the link again). Call the returned function once done; it is idempotent.
   */
  hold(): () => void;
  /**
   * Resolves once background work may go on: at once when nothing holds the gate, else when it
   * opens, but never later than `maxWaitMs` after the call (a paused connection must not be
   * idle long enough to be cut, and the background must not starve).
   */
  wait(): Promise<void>;
  /** Holds not released yet. */
  readonly holds: number;
}

/** Options of {@link createPriorityGate}. */
export interface PriorityGateOptions {
  /** How long the gate stays closed after the last hold is released; default 250 ms. */
  graceMs?: number;
  /** The longest one {@link PriorityGate.wait} lasts; default 10 s. */
  maxWaitMs?: number;
}

/** Creates an open {@link PriorityGate}. */
export function createPriorityGate(options: PriorityGateOptions = {}): PriorityGate {
  const graceMs = options.graceMs ?? 250;
  const maxWaitMs = options.maxWaitMs ?? 10_000;
  let holds = 0;
  let openAt = 0;
  let reopen: ReturnType<typeof setTimeout> | undefined;
  const waiters = new Set<() => void>();
  const wakeAll = () => {
    for (const w of [...waiters]) w();
  };
  return {
    hold() {
      holds++;
      clearTimeout(reopen);
      let released = false;
      return () => {
        if (released) return;
        released = true;
        if (--holds > 0) return;
        openAt = performance.now() + graceMs;
        reopen = setTimeout(wakeAll, graceMs);
      };
    },
    wait() {
      if (holds === 0 && performance.now() >= openAt) return Promise.resolve();
      return new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          waiters.delete(done);
          resolve();
        };
        const timer = setTimeout(done, maxWaitMs);
        waiters.add(done);
      });
    },
    get holds() {
      return holds;
    },
  };
}
