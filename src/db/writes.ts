/**
 * Every write transaction the agent holds on an app's database goes through
 * here, so that how long the app may wait for us is measured, not guessed.
 * SQLite has one writer: while we hold the write lock the app's writes wait
 * (busy_timeout) and an app without a timeout gets "database is locked". The
 * callers keep each transaction short (a time budget, WRITE_BUDGET_MS, checked
 * as they go) and the longest hold is reported in /metrics and status.
 *
 * Short is not enough: SQLite's busy handler polls (after 1, 2, 5, 10, 15, 20,
 * 25, 25 ms ...), so an app whose polls keep landing inside our back-to-back
 * turns times out anyway. So while the app writes (another connection committed
 * in the last APP_ACTIVE_MS: the caller says so, noteAppWrite), a turn that follows closely
 * on the last one first leaves the lock free for as long as the last one held
 * it: at most half the time is ours while we have bulk work, and a poll every
 * 25 ms always finds it free. With the app idle, bulk work runs at full speed.
 */
import { performance } from "node:perf_hooks";
import type { Database } from "better-sqlite3";

/** How long one agent write transaction should hold the lock: long work is cut into such turns. */
export const WRITE_BUDGET_MS = 25;

/** The app counts as writing this long after another connection last committed. */
const APP_ACTIVE_MS = 2000;

export class WriteTimer {
  /** Longest hold so far (ms), what held it, and totals. */
  longestMs = 0;
  longestWhat = "";
  count = 0;
  totalMs = 0;

  constructor(private readonly onHold: (ms: number, what: string) => void = () => undefined) {}

  private lastHoldMs = 0;
  private lastEnd = 0;
  private appActiveUntil = 0;

  /** Another connection (the app) committed just now: pace bulk work for a while. */
  noteAppWrite(): void {
    this.appActiveUntil = performance.now() + APP_ACTIVE_MS;
  }

  /**
   * Runs `fn` in one BEGIN IMMEDIATE transaction; times the hold from the lock
   * taken to the commit done. `alwaysPace`: bulk work with nothing between its
   * turns (the enrolment scan) leaves the gap even when no app write was seen.
   */
  run<T>(db: Database, what: string, fn: () => T, alwaysPace = false): T {
    const gap = this.lastHoldMs - (performance.now() - this.lastEnd);
    if (gap > 0 && (alwaysPace || performance.now() < this.appActiveUntil)) sleepSync(gap);
    let start = 0;
    try {
      return db
        .transaction(() => {
          start = performance.now();
          return fn();
        })
        .immediate();
    } finally {
      if (start > 0) {
        this.lastEnd = performance.now();
        const ms = this.lastEnd - start;
        this.lastHoldMs = Math.min(ms, 2 * WRITE_BUDGET_MS);
        this.count++;
        this.totalMs += ms;
        if (ms > this.longestMs) {
          this.longestMs = ms;
          this.longestWhat = what;
        }
        this.onHold(ms, what);
      }
    }
  }
}

const pause = new Int32Array(new SharedArrayBuffer(4));

/** Blocks this thread (not the app: another process) for `ms`. */
function sleepSync(ms: number): void {
  Atomics.wait(pause, 0, 0, ms);
}

/** A deadline `budgetMs` from now: `passed()` says whether to stop and let the app have the lock. */
export function deadline(budgetMs = WRITE_BUDGET_MS): { passed(): boolean } {
  const end = performance.now() + budgetMs;
  return { passed: () => performance.now() >= end };
}
