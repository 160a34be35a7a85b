/**
 * The merge rule, as a pure function so that every node computes the same result
 * whatever order records arrive in (a state-based CRDT):
 *  - a row's existence belongs to its newest *incarnation* (the newest insert
 *    at its key, by (HLC, origin)); within it, existence is a last-writer-wins
 *    register over the updates (alive) and deletes (dead) that name it. A
 *    change that names an older incarnation does not touch existence: a delete
 *    by a node that never saw the row re-inserted does not remove it;
 *  - each column is a last-writer-wins register over the writes to it (an insert
 *    writes every column, an update the columns it changed);
 *  - values a record carries but did not write (an update's unchanged columns, a
 *    delete's old row) fill columns no write has reached, under the weakest
 *    clock (hlc 0, ranked by origin), so that any real write overrides them;
 *  - a deleted row keeps only what the log says of it (columns some record carried).
 * Applying a record twice changes nothing the second time: equal stamps never win.
 */
import { compareStamp, hlcToMs } from "../log/hlc.js";
import { OP_DELETE, OP_INSERT, type RowOp } from "../log/segment.js";
import { sameValue, type SqlValue } from "../log/value.js";

export interface Stamp {
  hlc: number;
  origin: string;
}

/**
 * A row's lineage (relocate.ts): the insert that created it, and its epoch, the
 * number of lineages its writer had seen at its key before it, plus one.
 */
export interface Lineage extends Stamp {
  epoch: number;
}

export interface RowState {
  /** Clock of the operation that decided existence. */
  exists: Stamp;
  alive: boolean;
  /** Clock shared by the columns that `cols` maps to null. */
  base: Stamp;
  /**
   * Every column this state has seen written: its own clock, or null for `base`.
   * A column missing here was never written (it may not have existed yet at
   * the origin), so any write to it wins: base never stands for future columns.
   */
  cols: Record<string, Stamp | null>;
  /** Values of a row while it is deleted (so a newer write can revive it). */
  dead: Map<string, SqlValue> | null;
  /**
   * Tables with an INTEGER PRIMARY KEY: the insert that first created a row at
   * this key (null for rows recorded before lineages existed). See relocate.ts.
   */
  lineage: Lineage | null;
  /** Foreign-key columns → the lineage of the row each points at. */
  refs: Record<string, Stamp> | null;
  /** The newest insert at this key (null: not known, for rows recorded before incarnations existed). */
  incarnation: Stamp | null;
}

/**
 * Values that no trigger saw (a row there when unisync first met the database,
 * or written while a table had no triggers) have an unknown time. They merge
 * under stamps below every logged clock (a logged HLC is wall ms * 1024, far
 * above 2^42 since 1970): so they lose to every logged write and delete of the
 * same row and column, and only fill in what the cluster lacks. Among
 * enrolments the earlier one ranks higher, so a node that joins later with an
 * old copy never overrides what the cluster held before it came.
 */
const ENROLMENT_TOP_MS = 2 ** 42;

export function enrolmentStamp(recordHlc: number, origin: string): Stamp {
  return { hlc: Math.max(1, ENROLMENT_TOP_MS - hlcToMs(recordHlc)), origin };
}

/** Whether a column clock is an enrolment's (not a logged write's, not "never"). */
export function isEnrolmentStamp(s: Stamp): boolean {
  return s.hlc > 0 && s.hlc <= ENROLMENT_TOP_MS;
}

/**
 * The incarnation every enrolled row belongs to, whichever node enrolled it:
 * older than any logged insert. A logged delete of an enrolled row names it, so
 * the same row enrolled again later (an old copy) stays deleted.
 */
export const ENROLMENT_INCARNATION: Stamp = { hlc: 0, origin: "#enrolment" };

export interface IncomingChange {
  op: RowOp;
  stamp: Stamp;
  columns: string[];
  values: SqlValue[];
  /** Indexes into columns written by an UPDATE. */
  changed: number[];
  lineage?: Lineage;
  /** UPDATE/DELETE: the incarnation the writer saw (undefined: not known). */
  incarnation?: Stamp;
  /** An INSERT recorded at enrolment (its stamp is an enrolmentStamp). */
  enrolment?: boolean;
}

export type TableWrite =
  | { kind: "none" }
  | { kind: "insert"; values: Map<string, SqlValue> }
  | { kind: "update"; values: Map<string, SqlValue> }
  | { kind: "delete" };

const NEVER: Stamp = { hlc: 0, origin: "" };

export const sameStamp = (a: Stamp, b: Stamp) => a.hlc === b.hlc && a.origin === b.origin;

function newer(a: Stamp, b: Stamp): boolean {
  return compareStamp(a.hlc, a.origin, b.hlc, b.origin) > 0;
}

export function clockOf(state: RowState, column: string): Stamp {
  if (!(column in state.cols)) return NEVER;
  return state.cols[column] ?? state.base;
}

/** Stores per-column clocks compactly: the most common clock becomes the base. */
function compact(state: RowState): void {
  const counts = new Map<string, { stamp: Stamp; n: number }>();
  const all = Object.keys(state.cols);
  for (const c of all) {
    const s = clockOf(state, c);
    const k = `${s.hlc}|${s.origin}`;
    const e = counts.get(k);
    if (e) e.n++;
    else counts.set(k, { stamp: s, n: 1 });
  }
  let best: Stamp = state.base;
  let bestN = -1;
  for (const { stamp, n } of counts.values()) {
    if (n > bestN) {
      best = stamp;
      bestN = n;
    }
  }
  const cols: Record<string, Stamp | null> = {};
  for (const c of all) {
    const s = clockOf(state, c);
    cols[c] = s.hlc === best.hlc && s.origin === best.origin ? null : s;
  }
  state.base = best;
  state.cols = cols;
}

/**
 * Merges one change into a row's state. `current` holds the row's values when it
 * exists in the table now. Returns the new state and what to do to the table.
 */
export function mergeChange(
  prior: RowState | null,
  current: Map<string, SqlValue> | null,
  change: IncomingChange,
): { state: RowState; write: TableWrite } {
  // The bulk of any log: an insert of a row this node has never seen. Every
  // rule below gives exactly this result for it, without the general work.
  if (prior === null && current === null && change.op === OP_INSERT) {
    const cols: Record<string, Stamp | null> = {};
    const values = new Map<string, SqlValue>();
    change.columns.forEach((c, i) => {
      cols[c] = null;
      values.set(c, change.values[i]);
    });
    const incarnation = change.enrolment ? ENROLMENT_INCARNATION : change.stamp;
    const state = { exists: change.stamp, alive: true, base: change.stamp, cols, dead: null, lineage: change.lineage ?? null, refs: null, incarnation };
    return { state, write: { kind: "insert", values } };
  }
  const state: RowState = prior
    ? { ...prior, cols: { ...prior.cols }, dead: prior.dead, lineage: prior.lineage ?? change.lineage ?? null }
    : { exists: NEVER, alive: false, base: NEVER, cols: {}, dead: null, lineage: change.lineage ?? null, refs: null, incarnation: null };
  // The table is the truth about whether the row is there now (a row the state
  // has not seen yet, such as one awaiting its baseline, is still updated in place).
  const wasAlive = current !== null;
  const values = new Map<string, SqlValue>(current ?? prior?.dead ?? []);
  const written = new Map<string, SqlValue>();
  const weak: Stamp = { hlc: 0, origin: change.stamp.origin };

  const offer = (column: string, value: SqlValue, stamp: Stamp) => {
    if (!newer(stamp, clockOf(state, column))) return;
    state.cols[column] = stamp;
    if (!values.has(column) || !sameValue(values.get(column) as SqlValue, value)) written.set(column, value);
    values.set(column, value);
  };

  const changed = new Set(change.changed);
  change.columns.forEach((column, i) => {
    const value = change.values[i];
    const writes = change.op === OP_INSERT || (change.op !== OP_DELETE && changed.has(i));
    if (writes) offer(column, value, change.stamp);
    // What a record carries but did not write fills a column no write has reached, under the
    // weakest clock: it beats a value of unknown time in this node's table (a row it had before
    // it enrolled, a write no trigger saw), and among such values the same one wins everywhere.
    else offer(column, value, weak);
  });

  const incarnation = change.enrolment ? ENROLMENT_INCARNATION : change.op === OP_INSERT ? change.stamp : change.incarnation;
  if (incarnation && (!state.incarnation || newer(incarnation, state.incarnation))) {
    // A newer incarnation starts existence afresh (a delete may name one before its insert arrives).
    state.incarnation = incarnation;
    state.exists = change.stamp;
    state.alive = change.op !== OP_DELETE;
  } else if ((!incarnation || !state.incarnation || !newer(state.incarnation, incarnation)) && newer(change.stamp, state.exists)) {
    state.exists = change.stamp;
    state.alive = change.op !== OP_DELETE;
  }
  compact(state);

  let write: TableWrite;
  if (state.alive) {
    state.dead = null;
    if (!wasAlive) write = { kind: "insert", values };
    else write = written.size > 0 ? { kind: "update", values: written } : { kind: "none" };
  } else {
    // A deleted row keeps what the log says of it: a column no record wrote (a value of unknown
    // time in this node's table) would come back here only, if a write revives the row.
    state.dead = new Map([...values].filter(([column]) => column in state.cols));
    write = wasAlive ? { kind: "delete" } : { kind: "none" };
  }
  return { state, write };
}
