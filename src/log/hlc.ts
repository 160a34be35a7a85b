/**
 * Hybrid logical clock packed into one safe JS integer: wall milliseconds * 1024
 * plus a logical counter. 1024 ticks per millisecond keep the value below 2^53
 * until the year 2255, so it round-trips through SQLite INTEGER and JSON exactly.
 */
export const LOGICAL_BITS = 1024;

export type Hlc = number;

export function hlcFromMs(ms: number): Hlc {
  return Math.floor(ms) * LOGICAL_BITS;
}

export function hlcToMs(hlc: Hlc): number {
  return Math.floor(hlc / LOGICAL_BITS);
}

/** A clock that never goes backwards and moves past every remote clock it sees. */
export class HybridClock {
  private last: Hlc;

  constructor(
    last: Hlc = 0,
    private readonly now: () => number = Date.now,
  ) {
    this.last = last;
  }

  /** The next local timestamp; `atMs` is the wall time at which the app made the change. */
  tick(atMs?: number): Hlc {
    const wall = hlcFromMs(Math.min(atMs ?? this.now(), this.now()));
    this.last = Math.max(this.last + 1, wall);
    return this.last;
  }

  /** Moves past a clock seen in a remote record so later local changes order after it. */
  observe(remote: Hlc): void {
    if (remote > this.last) this.last = remote;
  }

  get current(): Hlc {
    return this.last;
  }
}

/** Total order of (clock, origin) pairs: the rule every node applies the same way. */
export function compareStamp(aHlc: Hlc, aOrigin: string, bHlc: Hlc, bOrigin: string): number {
  if (aHlc !== bHlc) return aHlc < bHlc ? -1 : 1;
  if (aOrigin === bOrigin) return 0;
  return aOrigin < bOrigin ? -1 : 1;
}

export function hlcToIso(hlc: Hlc): string {
  return new Date(hlcToMs(hlc)).toISOString();
}
