/**
 * What the agent, catch-up and rejoin need of one synced stream, whichever it is:
 * a database (DbSync) or the instance folder (FolderSync). Both capture this node's
 * changes into an outbox, upload it, and pull other origins' segments after their
 * cursors.
 */
import type { Cursor } from "../log/cursors.js";
import type { KnownSegments } from "../log/index.js";
import type { Outbox } from "../log/outbox.js";
import type { TailProblem } from "../log/tail.js";

export interface SyncStream {
  /** The stream's name: a database's path relative to the instance folder, or ".files". */
  readonly stream: string;
  readonly outbox: Outbox;
  /** Per origin: why its stream is stopped (gap, corrupt or refused segment, fork, collected). */
  readonly problems: ReadonlyMap<string, TailProblem>;
  cursor(origin: string): Cursor;
  cursors(): Map<string, Cursor>;
  /** True while the stream may not seal or upload: a database new to this node does not know yet where its log goes on. */
  readonly logUnknown: boolean;
  /** True while every origin's whole log is replayed before this node's own rows are enrolled (a database met for the first time). */
  readonly enrolling: boolean;
  /** Whether this node's own earlier segments are still to be replayed into it (a restored or replaced database file). */
  replaysOwnLog(): boolean;
  /** Uploads up to `max` sealed segments; returns how many went up. */
  upload(max?: number): Promise<number>;
  /**
   * Applies up to `maxSegments` of `origin`'s segments after the cursor, records up to
   * `untilHlc` only; `stop` may end it between segments (a database's pull does; the
   * folder applies its turn whole). Returns the records applied.
   */
  pull(origin: string, maxSegments?: number, untilHlc?: number, stop?: () => boolean, known?: KnownSegments): Promise<number>;
  /** This node's own changes not sealed into the outbox yet (the folder: files waiting to be stable). */
  unsentChanges(): number;
  pendingChanges(): number;
  parkedCount(): number;
  close(): void;
}

/**
 * Per origin: whether the last pull read everything the store held (no gap, nothing
 * left). Only a listing knows where the log ends: what the index named may not be all of it.
 */
export class LogEnds {
  private readonly readToEnd = new Map<string, boolean>();
  /** Per origin: whether its last pull stopped for want of more (listed or named by the index), not at its limit or a stop. */
  private readonly ranOut = new Map<string, boolean>();

  /** A pull of `origin` is under way: not at the end until it says so. */
  reading(origin: string): void {
    this.readToEnd.set(origin, false);
    this.ranOut.set(origin, false);
  }

  /** A pull of `origin` read `seen` of at most `maxSegments` segments, from a listing (`known` undefined) or the index, and stopped at `problem` if any. */
  pulled(origin: string, known: KnownSegments | undefined, seen: number, maxSegments: number, problem: TailProblem | undefined): void {
    this.readToEnd.set(origin, known === undefined && seen < maxSegments && !problem);
    this.ranOut.set(origin, seen < maxSegments);
  }

  /** Whether the last pull of each of these origins read its log to the end. */
  caughtUp(origins: readonly string[]): boolean {
    return origins.every((o) => this.readToEnd.get(o) === true);
  }

  /**
   * Whether the last pull of each of these origins, and of every other origin pulled
   * so far, applied all this node could find of it. A stopped origin (a gap, a
   * corrupt segment) counts as applied: waiting would not bring its rest.
   */
  allApplied(origins: readonly string[]): boolean {
    return origins.every((o) => this.ranOut.get(o) === true) && [...this.ranOut.values()].every((v) => v);
  }
}
