/**
 * Applies remote segments to one database. One segment is one transaction that
 * also moves the origin's cursor, so a crash applies it entirely or not at all,
 * and a segment seen again (cursor already past it) is skipped: idempotent.
 * While applying, _unisync_applying holds a row, which silences our triggers.
 */
import type { Database, Statement } from "better-sqlite3";
import { silenced } from "../db/internal.js";
import { compareStamp, hlcToMs, type HybridClock } from "../log/hlc.js";
import { encodeSegment, OP_DELETE, OP_INSERT, OP_UPDATE, type LogRecord, type RowChange, type Segment } from "../log/segment.js";
import { rowIdentity, type SqlValue } from "../log/value.js";
import { clockOf, enrolmentStamp, mergeChange, type RowState, type Stamp } from "../merge/merge.js";
import { EnrolmentLedger } from "./enrolments.js";
import type { ReferenceKeeper } from "./references.js";
import { intKey, lineageName, sameLineage, type Lineage, type Relocator } from "../merge/relocate.js";
import type { AsideRows } from "../merge/unique.js";
import { Cursors, type Cursor } from "../log/cursors.js";
import { refsByColumn, type BagStore } from "../merge/bag.js";
import type { RowStateStore } from "../merge/state.js";
import type { TableAccess } from "../merge/table.js";

export type { Cursor };

/** Reason prefix of records parked until the row they point at arrives (retried after each pull that applied something). */
export const WAITING_FOR_ROW = "waiting for the row";

/**
 * Why a record is parked, as code reads it (`_unisync_parked.kind`): a table or column
 * this node lacks (`schema`), a row it points at not arrived yet (`row`), its origin's
 * clock too far ahead (`clock`), a record that does not make sense (`malformed`), or a
 * write that failed (`write`). The reason text is for people.
 */
export type ParkKind = "schema" | "row" | "clock" | "malformed" | "write";

export interface ParkReason {
  kind: ParkKind;
  reason: string;
}

const wait = (kind: ParkKind, reason: string): ParkReason => ({ kind, reason });

export interface ApplyOutcome {
  applied: number;
  parked: number;
  skipped: boolean;
  /** False when the time ran out part way: call again (a new transaction) to go on. */
  done: boolean;
}

export interface ParkedRecord {
  origin: string;
  seq: number;
  idx: number;
  table: string;
  kind: ParkKind;
  reason: string;
}

/** Parked records as people read them (status, the console): oldest first, at most `limit`. */
export function listParked(db: Database, limit: number): { origin: string; seq: number; table: string | null; kind: ParkKind; reason: string; parkedAt: string | null }[] {
  const rows = db.prepare("SELECT origin, seq, tbl, kind, reason, parked_ms FROM _unisync_parked ORDER BY id LIMIT ?").all(limit) as {
    origin: string; seq: number | bigint; tbl: string | null; kind: ParkKind; reason: string; parked_ms: number | bigint | null;
  }[];
  return rows.map((p) => ({
    origin: p.origin, seq: Number(p.seq), table: p.tbl, kind: p.kind, reason: p.reason, parkedAt: p.parked_ms === null ? null : new Date(Number(p.parked_ms)).toISOString(),
  }));
}

/** A reference is this record's when the column's value is: the state keeps whose row it points at. */
function keepRefs(state: RowState, row: RowChange, stamp: Stamp): void {
  for (const ref of row.refs ?? []) {
    const c = clockOf(state, ref.column);
    if (c.origin === stamp.origin && (c.hlc === stamp.hlc || c.hlc === 0)) state.refs = { ...state.refs, [ref.column]: ref.lineage };
  }
}

/** The lineage a record's row was created in. Built field by field: an object spread is V8's slow path on replay's hottest line. */
function lineageOf(instance: Stamp, row: RowChange): Lineage {
  return { hlc: instance.hlc, origin: instance.origin, epoch: row.epoch ?? 1 };
}

/** Why a record cannot apply now; null when it can. */
function unfit(rec: LogRecord, tables: Map<string, TableAccess>): ParkReason | null {
  const row = rec.row;
  if (!row) return null; // file records belong to the folder sync
  if (![OP_INSERT, OP_UPDATE, OP_DELETE].includes(row.op)) return wait("malformed", `unknown operation ${row.op}`);
  if (row.columns.length !== row.values.length) return wait("malformed", "column and value counts differ");
  if (row.key.length === 0 || row.key.some((k) => !row.columns.includes(k))) return wait("malformed", "row key is not among the columns");
  const access = tables.get(row.table);
  if (!access) return wait("schema", `table "${row.table}" does not exist here (yet)`);
  const missing = row.columns.filter((c) => !access.has(c));
  if (missing.length) return wait("schema", `column(s) ${missing.map((c) => `"${c}"`).join(", ")} of "${row.table}" do not exist here (yet)`);
  return null;
}

export class Applier {
  private readonly cursorStore: Cursors;
  private readonly park: Statement;
  /** What each origin's enrolled rows did here (status, conflicts). */
  readonly enrolments: EnrolmentLedger;
  /** This database's own rows wait to be enrolled (DbSync.enrolling). */
  enrolling = false;
  /**
   * Whether references may be repaired now: the owner says no while some origin's log is
   * only part way applied. A repair is logged with this node's clock, newer than a delete
   * further on in the log it has not applied yet, and would bring that row back everywhere.
   */
  mayRepair: () => boolean = () => true;

  constructor(
    private readonly db: Database,
    private readonly clock: HybridClock,
    private readonly states: RowStateStore,
    private readonly bag: BagStore,
    /** Current local tables by name; replaced by the owner when the schema changes. */
    private readonly tables: () => Map<string, TableAccess>,
    private readonly relocator: Relocator,
    /** Rows set aside by unique clashes (unique.ts). */
    readonly aside: AsideRows,
    private readonly onParked: (p: ParkedRecord) => void,
    /** Foreign keys: what replay touched, checked at the end of whole transactions. */
    private readonly references: ReferenceKeeper,
    /** Records stamped further ahead of this node's wall clock wait (parked) until it catches up. */
    private readonly maxDriftMs: number = 5 * 60_000,
    private readonly now: () => number = Date.now,
  ) {
    this.cursorStore = new Cursors(db);
    this.enrolments = new EnrolmentLedger(db);
    this.park = db.prepare(
      "INSERT OR IGNORE INTO _unisync_parked(origin, seq, idx, tbl, kind, reason, hlc, record, parked_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    );
  }

  cursor(origin: string): Cursor {
    return this.cursorStore.get(origin);
  }

  cursors(): Map<string, Cursor> {
    return this.cursorStore.all();
  }

  /**
   * Applies one segment. Must be called inside a write transaction (the caller
   * folds pending local captures into the merge state first, in the same one).
   */
  applySegment(segment: Segment, key: string, until?: { passed(): boolean }): ApplyOutcome {
    const cur = this.cursor(segment.origin);
    if (segment.seq <= cur.seq) return { applied: 0, parked: 0, skipped: true, done: true };
    if (segment.seq !== cur.seq + 1) throw new Error(`segment ${segment.seq} of "${segment.origin}" is not next (cursor at ${cur.seq})`);
    if (cur.idx > segment.records.length) throw new Error(`segment ${segment.seq} of "${segment.origin}" has ${segment.records.length} records, ${cur.idx} were applied already`);
    let applied = 0;
    let parked = 0;
    let lastHlc = cur.idx > 0 ? cur.lastHlc : 0;
    let done = true;
    silenced(this.db, () => {
      for (let idx = cur.idx; idx < segment.records.length; idx++) {
        const rec = segment.records[idx];
        lastHlc = Math.max(lastHlc, rec.hlc);
        const reason = this.applyRecord(segment.origin, rec);
        if (reason === null) applied++;
        else {
          parked++;
          this.parkRecord(segment.origin, segment.seq, idx, rec, reason);
        }
        // A long segment is applied in turns, so the app gets its write lock in between:
        // the cursor says how far, and the segment counts as part way through a transaction.
        if (until && idx + 1 < segment.records.length && idx % 32 === 31 && until.passed()) {
          this.cursorStore.setPartial(segment.origin, idx + 1, lastHlc);
          done = false;
          return;
        }
      }
      this.cursorStore.set(segment.origin, segment.seq, key, lastHlc, segment.continues);
    });
    return { applied, parked, skipped: false, done };
  }

  /**
   * Repairs foreign keys that replay broke (references.ts), unless some
   * origin's last applied segment ended part way through an app transaction,
   * or its log is only part way applied (mayRepair): then the rest of it comes
   * first. Call inside the apply transaction.
   */
  checkReferences(): number {
    return this.referencesDue() ? this.references.check() : 0;
  }

  /** Whether references wait to be checked and may be now (read only: no write lock needed to ask). */
  referencesDue(): boolean {
    return !this.cursorStore.anyOpen() && this.mayRepair() && this.references.waiting();
  }

  /** Applies one record; returns null on success or the reason it must wait. */
  applyRecord(origin: string, rec: LogRecord): ParkReason | null {
    const reason = unfit(rec, this.tables());
    if (reason) return reason;
    // A node whose clock runs far ahead would win every conflict for as long as
    // it stays ahead; its records wait until our clock reaches theirs.
    const aheadMs = hlcToMs(rec.hlc) - this.now();
    if (aheadMs > this.maxDriftMs) return wait("clock", `clock of origin "${origin}" is ${Math.round(aheadMs / 1000)} s ahead of ours (limit ${Math.round(this.maxDriftMs / 1000)} s): waiting`);
    this.clock.observe(rec.hlc);
    const row = rec.row;
    if (!row) return null;
    const access = this.tables().get(row.table) as TableAccess;
    if (!access.shape.hasDeclaredKey) return this.applyToBag(origin, rec, access);
    if (row.op === OP_INSERT && !row.enrolment) {
      const fresh = this.insertFresh(origin, rec, row, access);
      if (fresh !== undefined) return fresh;
    }
    let values = row.values;
    try {
      const placed = this.placeRow(row, access);
      if (!Array.isArray(placed)) return placed;
      values = placed;
    } catch (err) {
      return wait("write", `moving a row after an id collision failed: ${(err as Error).message}`);
    }
    const keyValues = row.key.map((k) => values[row.columns.indexOf(k)]);
    const pk = rowIdentity(keyValues, false);
    let current = access.find(row.key, keyValues);
    if (current === null && row.refs?.length) this.moveMisplacedTombstone(access, row, keyValues, pk);
    // A row set aside after a unique clash is not in the table: its values are kept aside.
    const aside = current === null ? this.aside.values(access, keyValues) : null;
    const prior = this.states.get(row.table, pk);
    if (current && prior && !prior.alive) {
      // The log deleted the row at this key, yet the table holds one that no trigger recorded:
      // this node's copy from before it enrolled, which a moved tombstone landed on. The record
      // merges with the tombstone, as on every other node, and the copy gives way (its children
      // stay: foreign keys are off here, and they are checked below).
      this.enrolments.replaceUnrecorded(row.table, pk, origin, false, row.columns, values, current, true);
      access.delete(row.key, keyValues);
      this.references.parentGone(access, current);
      current = null;
    }
    // A row enrolled at its origin has values of unknown time (merge.ts).
    const stamp = row.enrolment ? enrolmentStamp(rec.hlc, origin) : { hlc: rec.hlc, origin };
    if (row.enrolment && row.op === OP_INSERT) {
      const outcome = this.enrolments.judge(row.table, pk, stamp, row.columns, values, prior, current ?? aside);
      this.enrolments.count(origin, row.table, rec.hlc, outcome);
    } else if (!prior && current) this.enrolments.replaceUnrecorded(row.table, pk, origin, false, row.columns, values, current, row.op === OP_DELETE);
    const { state, write } = mergeChange(prior, current ?? aside, {
      op: row.op,
      stamp,
      columns: row.columns,
      values,
      changed: row.changed,
      lineage: access.shape.autoId && row.instance ? lineageOf(row.instance, row) : undefined,
      incarnation: row.incarnation,
      enrolment: row.enrolment,
    });
    keepRefs(state, row, stamp);
    const written = write.kind === "insert" || write.kind === "update" ? write.values : new Map<string, SqlValue>();
    const full = new Map([...(current ?? aside ?? []), ...written]);
    const writeTable = () => {
      if (aside) {
        // The row is not in the table: a write tries to bring it back whole, a delete ends it.
        if (write.kind === "none") return;
        if (write.kind !== "delete") access.insert(full);
        this.aside.release(row.table, keyValues);
      } else if (write.kind === "insert") access.insert(write.values);
      else if (write.kind === "update") access.update(row.key, keyValues, write.values);
      else if (write.kind === "delete") access.delete(row.key, keyValues);
    };
    try {
      writeTable();
      if (write.kind === "delete" && current) this.references.parentGone(access, current);
      else if (write.kind === "insert" || (write.kind === "update" && aside)) this.references.childWritten(access, full);
      else if (write.kind === "update") this.references.childWritten(access, full, write.values);
    } catch (err) {
      const clash = write.kind === "insert" || write.kind === "update" ? (err as { code?: string }).code === "SQLITE_CONSTRAINT_UNIQUE" : false;
      const other = clash ? access.uniqueClash(full, row.key, keyValues) : null;
      // A failed statement changes nothing, so the state is not written either.
      if (!other) return wait("write", `${(err as Error).message}`);
      try {
        const there = this.states.get(row.table, rowIdentity(other, false));
        if (!there && this.enrolling && !this.aside.isAside(row.table, other)) {
          // The row in the way is this node's own copy, not enrolled yet (the log is replayed
          // into a new database first): a stale copy of a row the log has, which gives way.
          const stale = access.find(row.key, other) as Map<string, SqlValue>;
          access.delete(row.key, other);
          this.enrolments.replaceUnrecorded(row.table, rowIdentity(other, false), origin, false, row.columns, values, stale, true);
          writeTable();
        } else this.aside.settle(access, { keyValues, state, values: full, inTable: current !== null }, other, writeTable);
      } catch (err2) {
        return wait("write", `${(err2 as Error).message}`);
      }
      this.references.childWritten(access, full);
    }
    this.states.put(row.table, pk, state);
    this.aside.restore(row.table);
    return null;
  }

  /**
   * The common case of replay, a logged insert of a row this node knows nothing
   * of, in two statements: its merge state and the row are each inserted only
   * if nothing is there, which replaces looking up the row, its state and the
   * row at its key. Returns undefined, with nothing written, when something is
   * there (or the row moved, or rows are set aside): applyRecord then takes the
   * general path, which gives the same result for a fresh row.
   */
  private insertFresh(origin: string, rec: LogRecord, row: RowChange, access: TableAccess): ParkReason | null | undefined {
    if (this.aside.anyAside) return undefined;
    const values = this.placeRefs(row, access);
    if (!Array.isArray(values)) return values;
    let lineage: Lineage | undefined;
    if (access.shape.autoId && row.instance) {
      lineage = lineageOf(row.instance, row);
      const key = intKey(values[row.columns.indexOf(row.key[0])]);
      if (key === null || (row.bornKey !== undefined && intKey(row.bornKey) !== key) || this.relocator.movedTo(row.table, lineage) !== null) return undefined;
    }
    const keyValues = row.key.map((k) => values[row.columns.indexOf(k)]);
    if (keyValues.some((v) => v === null)) return undefined; // NULL keys match by IS, not by the key constraint
    const stamp = { hlc: rec.hlc, origin };
    const { state, write } = mergeChange(null, null, {
      op: row.op, stamp, columns: row.columns, values, changed: row.changed, lineage, incarnation: row.incarnation,
    });
    if (write.kind !== "insert") return undefined;
    keepRefs(state, row, stamp);
    const pk = rowIdentity(keyValues, false);
    if (!this.states.insertNew(row.table, pk, state, row.columns)) return undefined;
    let inserted = false;
    try {
      inserted = access.insertNewRow(row.columns, values);
    } catch {
      // NOT NULL, CHECK, ...: the general path meets it again and says why
    }
    if (!inserted) {
      this.states.delete(row.table, pk);
      return undefined;
    }
    this.references.childWritten(access, write.values);
    return null;
  }

  /**
   * A deleted row whose key holds a reference (an association row) stays where
   * it was when the row it pointed at moved (only rows in the table follow a
   * move). A record for another row at that key, pointing at another lineage,
   * finds it there: it belongs at its parent's new key, so it goes there first.
   */
  private moveMisplacedTombstone(access: TableAccess, row: RowChange, keyValues: SqlValue[], pk: Buffer): void {
    const prior = this.states.get(row.table, pk);
    if (!prior || prior.alive || !prior.refs) return;
    const newKey = keyValues.slice();
    let misplaced = false;
    for (const [i, k] of access.shape.key.entries()) {
      const theirs = prior.refs[k];
      const ours = row.refs?.find((r) => r.column === k)?.lineage;
      const fk = access.shape.foreignKeys.find((f) => f.column === k);
      if (!theirs || !ours || !fk || sameLineage(theirs, ours)) continue;
      const to = this.relocator.movedTo(fk.table, theirs);
      if (to === null) continue;
      newKey[i] = to;
      misplaced = true;
    }
    if (!misplaced) return;
    this.states.delete(row.table, pk);
    const newPk = rowIdentity(newKey, false);
    const there = this.states.get(row.table, newPk);
    if (there && compareStamp(there.exists.hlc, there.exists.origin, prior.exists.hlc, prior.exists.origin) >= 0) return;
    for (const [i, k] of access.shape.key.entries()) prior.dead?.set(k, newKey[i]);
    this.states.put(row.table, newPk, prior);
  }

  /**
   * The record's values with its references pointed at where their rows live
   * here, and its key at where its lineage lives (resolving an id collision).
   * Returns a reason to wait when a referenced row has not arrived yet.
   */
  private placeRow(row: RowChange, access: TableAccess): SqlValue[] | ParkReason {
    const placed = this.placeRefs(row, access);
    if (!Array.isArray(placed)) return placed;
    let values = placed;
    if (access.shape.autoId && row.instance) {
      const i = row.columns.indexOf(row.key[0]);
      const key = intKey(values[i]);
      const born = row.bornKey === undefined ? key : intKey(row.bornKey);
      if (key === null || born === null) return wait("malformed", `key "${row.key[0]}" of "${row.table}" is not an integer`);
      const moves = this.relocator.moveCount;
      const at = this.relocator.place(access, lineageOf(row.instance, row), born);
      // Placing the row can move the lineage that held its key, and a reference may name that
      // lineage (read above at its old key, now this row's): read the references again, or the
      // row would point at itself here and at the moved row on nodes that saw the move first.
      if (this.relocator.moveCount !== moves && row.refs?.length) {
        const again = this.placeRefs(row, access);
        if (!Array.isArray(again)) return again;
        values = again;
      }
      if (at !== key) {
        if (values === row.values) values = row.values.slice();
        values[i] = at;
      }
    }
    return values;
  }

  /** The record's values with its references pointed at where their rows live here (see placeRow). */
  private placeRefs(row: RowChange, access: TableAccess): SqlValue[] | ParkReason {
    let values = row.values;
    const tables = this.tables();
    for (const ref of row.refs ?? []) {
      const i = row.columns.indexOf(ref.column);
      const fk = access.shape.foreignKeys.find((f) => f.column === ref.column);
      const parent = fk ? tables.get(fk.table) : undefined;
      const value = i < 0 ? null : intKey(values[i]);
      const born = ref.bornKey === undefined ? value : intKey(ref.bornKey);
      // A parent without lineages here (or a changed schema) leaves the value as it is.
      if (!fk || !parent?.shape.autoId || value === null || born === null) continue;
      const at = this.relocator.locate(parent.shape.name, ref.lineage, born);
      if (at === null) return wait("row", `${WAITING_FOR_ROW} of "${fk.table}" that "${ref.column}" points at (${lineageName(ref.lineage)}), which has not arrived yet`);
      if (at !== value) {
        if (values === row.values) values = row.values.slice();
        values[i] = at;
      }
    }
    return values;
  }

  /** Tables without a key: merge into the named copy, then match the table's copies to the bag. */
  private applyToBag(origin: string, rec: LogRecord, access: TableAccess): ParkReason | null {
    const row = rec.row as RowChange;
    const op = row.op === OP_INSERT ? "insert" : row.op === OP_DELETE ? "delete" : "update";
    // References point at where their rows live here (a parent that moved); a delete names
    // its copy, whose values this node holds already, so it never waits for a parent.
    const placed = this.placeRefs(row, access);
    if (!Array.isArray(placed) && op !== "delete") return placed;
    const rowValues = Array.isArray(placed) ? placed : row.values;
    // Values in local column order; a local column the origin lacks (it was added
    // here first, or the origin's record predates it) takes its declared default.
    const values = access.shape.columns.map((c) => {
      const i = row.columns.indexOf(c);
      return i < 0 ? access.defaultValue(c) : rowValues[i];
    });
    const refs = row.refs && op !== "delete" ? refsByColumn(row.refs) : undefined;
    const stamp = row.enrolment ? enrolmentStamp(rec.hlc, origin) : { hlc: rec.hlc, origin };
    // An insert makes a copy named by its stamp (an enrolled copy: by its values,
    // bag.ts); an update or delete that names no copy changed a row its origin never recorded.
    const instance = op === "insert" ? (row.enrolment && row.instance ? row.instance : stamp) : row.instance;
    if (!instance) return null;
    const affected = this.bag.record(access.shape.name, instance, op, values, stamp, refs);
    if (!affected) return null;
    try {
      this.bag.reconcile(access, affected);
    } catch (err) {
      return wait("write", (err as Error).message);
    }
    if (op !== "delete") this.references.childWritten(access, new Map(access.shape.columns.map((c, i) => [c, values[i]])));
    return null;
  }

  private parkRecord(origin: string, seq: number, idx: number, rec: LogRecord, { kind, reason }: ParkReason): void {
    const bytes = encodeSegment({ origin, stream: "", seq, createdMs: 0, records: [rec] });
    this.park.run(origin, seq, idx, rec.row?.table ?? null, kind, reason, rec.hlc, bytes, Date.now());
    this.onParked({ origin, seq, idx, table: rec.row?.table ?? "", kind, reason });
  }
}

/**
 * Retries parked records (of one kind, or all); returns how many applied now. `turn` runs
 * each in its own write transaction (the caller folds pending local captures first).
 */
export function retryParked(db: Database, applier: Applier, decode: (bytes: Buffer) => Segment, turn: (fn: () => void) => void, kind?: ParkKind): number {
  const rows = db
    .prepare("SELECT id, origin, record FROM _unisync_parked WHERE ? IS NULL OR kind = ? ORDER BY id")
    .all(kind ?? null, kind ?? null) as { id: number; origin: string; record: Buffer }[];
  let done = 0;
  for (const r of rows) {
    const rec = decode(r.record).records[0];
    turn(() =>
      silenced(db, () => {
        const why = rec ? applier.applyRecord(r.origin, rec) : null;
        if (why === null) {
          db.prepare("DELETE FROM _unisync_parked WHERE id = ?").run(r.id);
          applier.checkReferences();
          done++;
        } else db.prepare("UPDATE _unisync_parked SET kind = ?, reason = ? WHERE id = ?").run(why.kind, why.reason, r.id);
      }),
    );
  }
  return done;
}
