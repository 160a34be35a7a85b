/**
 * Turns captured changes into stamped log records. Stamping folds each change
 * into the row's merge state in the same transaction, so that a remote record
 * applied afterwards is compared against this node's newest writes.
 */
import type { Database, Statement } from "better-sqlite3";
import { HybridClock } from "../log/hlc.js";
import { OP_DELETE, OP_INSERT, OP_UPDATE, type LogRecord, type RowChange } from "../log/segment.js";
import { encodeValues, rowIdentity, type SqlValue } from "../log/value.js";
import { ENROLMENT_INCARNATION, enrolmentStamp, mergeChange, type Lineage, type Stamp } from "../merge/merge.js";
import { enrolmentInstance, refsByColumn, type BagStore } from "../merge/bag.js";
import { enrolmentLineage, intKey, isEnrolled, sameLineage, type Relocator } from "../merge/relocate.js";
import type { AsideRows } from "../merge/unique.js";
import type { RowStateStore } from "../merge/state.js";
import type { TableShape } from "../db/schema.js";
import { silenced } from "../db/internal.js";
import { CHANGE_DELETE, CHANGE_INSERT, CHANGE_REVIVE, enrolmentCopy, maskHasColumn } from "./triggers.js";

interface CaptureGeneration {
  table: string;
  columns: string[];
  key: string[];
}

type ChangeRow = unknown[]; // id, cap, op, ms, mask, v0..vN (raw row)

/**
 * A row change as captured; keyless updates also carry the values before it,
 * and inserts recorded by enrolment their copy number (tables without a key).
 */
type CapturedChange = RowChange & { oldValues?: SqlValue[]; copy?: number };

export interface DrainedBatch {
  records: LogRecord[];
  /** Highest _unisync_changes id included; delete up to it once sealed. */
  lastId: number;
  /** Approximate encoded size of the records, for batch bounds. */
  bytes: number;
  /** The batch stopped at its size limit with changes left: an app transaction may go on in the next one. */
  continues: boolean;
}

function approxSize(v: SqlValue): number {
  if (v === null) return 1;
  if (typeof v === "string") return v.length * 3;
  if (Buffer.isBuffer(v)) return v.length;
  return 9;
}

export class ChangeDrain {
  private readonly generations = new Map<number, CaptureGeneration>();
  private readonly readBatch: Statement;
  private readonly readCap: Statement;
  private readonly readNote: Statement;
  private readonly anyNote: Statement;
  private readonly removeChanges: Statement;
  private readonly removeNotes: Statement;

  constructor(
    private readonly db: Database,
    private readonly origin: string,
    private readonly clock: HybridClock,
    private readonly states: RowStateStore,
    private readonly bag: BagStore,
    private readonly relocator: Relocator,
    private readonly aside: AsideRows,
    /** The current shape of a synced table. */
    private readonly shapeOf: (table: string) => TableShape | undefined,
    /** Config independentDatabases: rows enrolled under one id on two nodes are two rows (relocate.ts). */
    private readonly independent = false,
    /** Whether this database's own rows still wait to be enrolled (DbSync.enrolling). */
    private readonly enrolling: () => boolean = () => false,
  ) {
    this.readBatch = db.prepare("SELECT * FROM _unisync_changes WHERE id > ? ORDER BY id LIMIT ?").raw(true).safeIntegers(true);
    this.readCap = db.prepare("SELECT tbl, columns, key FROM _unisync_capture WHERE id = ?");
    this.readNote = db.prepare("SELECT note FROM _unisync_notes WHERE change_id = ?").pluck(true);
    this.anyNote = db.prepare("SELECT 1 FROM _unisync_notes LIMIT 1");
    this.removeChanges = db.prepare("DELETE FROM _unisync_changes WHERE id <= ?");
    this.removeNotes = db.prepare("DELETE FROM _unisync_notes WHERE change_id <= ?");
  }

  pendingCount(): number {
    return (this.db.prepare("SELECT count(*) AS n FROM _unisync_changes").get() as { n: number }).n;
  }

  private generation(capId: number): CaptureGeneration {
    let g = this.generations.get(capId);
    if (!g) {
      const row = this.readCap.get(capId) as { tbl: string; columns: string; key: string } | undefined;
      if (!row) throw new Error(`capture generation ${capId} is missing from _unisync_capture`);
      g = { table: row.tbl, columns: JSON.parse(row.columns) as string[], key: JSON.parse(row.key) as string[] };
      this.generations.set(capId, g);
    }
    return g;
  }

  /** Row changes a captured change stands for (an update of the key is a delete plus an insert). */
  private toRowChanges(g: CaptureGeneration, op: number, mask: unknown, slots: SqlValue[]): CapturedChange[] {
    const n = g.columns.length;
    const values = slots.slice(0, n);
    const base = { table: g.table, columns: g.columns, key: g.key };
    if (op === CHANGE_INSERT) {
      const copy = enrolmentCopy(mask);
      return [copy === null ? { ...base, op: OP_INSERT, values, changed: [] } : { ...base, op: OP_INSERT, values, changed: [], enrolment: true, copy }];
    }
    if (op === CHANGE_DELETE) return [{ ...base, op: OP_DELETE, values, changed: [] }];
    if (op === CHANGE_REVIVE) return [{ ...base, op: OP_UPDATE, values, changed: [] }];
    const changed = g.columns.map((_, i) => i).filter((i) => maskHasColumn(mask, i));
    if (changed.length === 0) return [];
    const oldKey = slots.slice(n, n + g.key.length);
    // Without a declared key the "key" is every column: the copy changes in place.
    if (this.shapeOf(g.table)?.hasDeclaredKey === false) return [{ ...base, op: OP_UPDATE, values, changed, oldValues: oldKey }];
    const newKey = g.key.map((k) => values[g.columns.indexOf(k)]);
    if (rowIdentity(oldKey, false).equals(rowIdentity(newKey, false))) return [{ ...base, op: OP_UPDATE, values, changed }];
    const oldValues = values.slice();
    g.key.forEach((k, i) => (oldValues[g.columns.indexOf(k)] = oldKey[i]));
    return [
      { ...base, op: OP_DELETE, values: oldValues, changed: [] },
      { ...base, op: OP_INSERT, values, changed: [] },
    ];
  }

  /**
   * Reads, stamps and folds up to `maxRecords` changes (or about `maxBytes`, or
   * until `until` passes).
   * Must run inside a write transaction that also seals the records, so the
   * stamps and the merge state commit together with the segment.
   */
  drain(maxRecords: number, maxBytes: number, until?: { passed(): boolean }): DrainedBatch {
    const records: LogRecord[] = [];
    let lastId = 0;
    let bytes = 0;
    let after = 0;
    let full = false;
    // The agent's own changes (foreign-key repairs) carry a note saying why: rare, so looked up only when there are some.
    const notes = this.anyNote.get() !== undefined;
    while (!full) {
      const rows = this.readBatch.all(after, Math.min(1000, maxRecords - records.length)) as ChangeRow[];
      if (rows.length === 0) break;
      for (const row of rows) {
        const [id, cap, op, ms, mask] = row as [bigint, bigint, bigint, bigint | null, unknown];
        const slots = row.slice(5) as SqlValue[];
        const g = this.generation(Number(cap));
        after = Number(id);
        lastId = after;
        const note = notes ? (this.readNote.get(id) as string | undefined) : undefined;
        for (const change of this.toRowChanges(g, Number(op), mask, slots)) {
          const hlc = this.clock.tick(ms === null ? undefined : Number(ms));
          const { oldValues, copy, ...row } = change;
          if (note) row.note = note;
          if (this.fold(row, hlc, (r) => records.push(r), oldValues, copy)) records.push({ hlc, row });
          for (const v of change.values) bytes += approxSize(v);
        }
        // A batch also ends when its time is up, so the app gets its write lock soon.
        full = records.length >= maxRecords || bytes >= maxBytes || (until?.passed() ?? false);
        if (full) break;
      }
    }
    const continues = full && this.changesAfter(lastId);
    return { records, lastId, bytes, continues };
  }

  /**
   * Whether a captured row after `id` gives a record. Rows that write nothing (no-op
   * updates) give none: a batch followed only by them must not say the transaction goes
   * on, as no later segment would end it and every other node would put off its
   * reference checks (Applier.checkReferences) until this node next writes.
   */
  private changesAfter(id: number): boolean {
    for (let after = id; ; ) {
      const rows = this.readBatch.all(after, 1000) as ChangeRow[];
      if (rows.length === 0) return false;
      for (const row of rows) {
        const [rid, cap, op, , mask] = row as [bigint, bigint, bigint, bigint | null, unknown];
        after = Number(rid);
        if (this.toRowChanges(this.generation(Number(cap)), Number(op), mask, row.slice(5) as SqlValue[]).length > 0) return true;
      }
    }
  }

  /**
   * Records a local change in the merge state (the table already holds it),
   * and names in the record the row's lineage and those its references point at.
   * Returns false when there is nothing to log (a stale enrolled row, dropped here).
   */
  private fold(change: RowChange, hlc: number, emit: (r: LogRecord) => void, oldValues?: SqlValue[], copy = 1): boolean {
    const shape = this.shapeOf(change.table);
    const stamp = change.enrolment ? enrolmentStamp(hlc, this.origin) : { hlc, origin: this.origin };
    if (shape?.hasDeclaredKey === false) {
      // Copies are kept in the table's current columns (a change captured under an
      // older shape lacks a column added since: the row holds its default).
      const access = this.relocator.access(change.table);
      const local = (values: SqlValue[]) => shape.columns.map((c) => {
        const i = change.columns.indexOf(c);
        return i >= 0 ? values[i] : (access?.defaultValue(c) ?? null);
      });
      const values = local(change.values);
      // The record names the lineage each reference points at, and the copy keeps it (to follow a move).
      let refs: Record<string, Stamp> | undefined;
      if (change.op !== OP_DELETE) {
        this.addRefs(shape, change);
        refs = refsByColumn(change.refs ?? []);
      }
      if (change.op === OP_INSERT) {
        const instance = change.enrolment ? enrolmentInstance(change.values, copy) : stamp;
        if (change.enrolment) change.instance = instance;
        const affected = this.bag.record(change.table, instance, "insert", values, stamp, refs);
        // An enrolled copy the log deleted (or has): the table holds one copy too many.
        if (change.enrolment && !affected) this.matchBag(change.table, values);
      } else {
        // The app changed one of the equal copies: name the oldest live one.
        const instance = this.bag.pickInstance(change.table, local(oldValues ?? change.values));
        if (instance) {
          this.bag.record(change.table, instance, change.op === OP_DELETE ? "delete" : "update", values, stamp, refs);
          change.instance = instance;
        }
      }
      return true;
    }
    let keyValues = change.key.map((k) => change.values[change.columns.indexOf(k)]);
    let prior = this.states.get(change.table, rowIdentity(keyValues, false));
    if (change.op !== OP_INSERT && !prior?.alive && this.enrolling()) {
      // The app changed a row of its copy that the log has not reached yet, or one at a
      // key the log deleted (a stale copy): that is the copy as it is enrolled later
      // (DbSync.finishEnrolment, which drops a stale one), not a change.
      this.db.prepare("INSERT OR IGNORE INTO _unisync_enrol_touched(tbl, row_key) VALUES (?, ?)").run(change.table, encodeValues(keyValues));
      return false;
    }
    // A row this node held before it enrolled, at a key the log has deleted (the log was
    // replayed into the database first): a stale copy of that row, dropped here as
    // on every node. Unless the databases are independent: then it is a row of its own.
    if (change.enrolment && prior && !prior.alive && !(this.independent && shape?.autoId)) {
      this.dropEnrolled(change.table, change.key, keyValues);
      return false;
    }
    let lineage: Lineage | undefined;
    let values = change.values;
    const key = intKey(keyValues[0]);
    if (shape?.autoId && key !== null) {
      if (change.enrolment && prior?.alive && prior.lineage) {
        // A row the log has (the app changed it before the log reached it): its values
        // of unknown time merge into the row the log has at its id.
        lineage = prior.lineage;
      } else if (change.enrolment) {
        lineage = { ...enrolmentLineage(key, change.values, this.independent), epoch: 1 };
        // Independent databases: a row at an id the log holds another lineage at is a
        // row of its own; the two collide like any two rows and one moves (relocate.ts).
        if (prior?.lineage && !sameLineage(prior.lineage, lineage)) {
          const at = this.relocator.placeEnrolled(change.table, lineage, key);
          keyValues = [at];
          values = values.slice();
          values[change.columns.indexOf(change.key[0])] = at;
          prior = this.states.get(change.table, rowIdentity(keyValues, false));
        }
      } else if (change.op === OP_INSERT) {
        // Every insert starts a lineage, one epoch above whatever this node held
        // at the key (a row it deleted, or replaced), which moves away (relocate.ts).
        lineage = { ...stamp, epoch: (prior?.lineage?.epoch ?? 0) + 1 };
        if (prior?.lineage) {
          // A live row the table no longer shows was replaced, unless a unique clash set it aside.
          if (prior.alive && !this.aside.isAside(change.table, keyValues)) emit(this.replacedRow(change, prior));
          this.relocator.makeRoom(change.table, lineage, key);
          prior = null;
        }
      } else lineage = prior?.lineage ?? undefined;
      if (lineage && !isEnrolled(lineage)) change.bornKey = this.relocator.recordedBornKey(change.table, lineage, key);
      if (lineage) {
        change.instance = { hlc: lineage.hlc, origin: lineage.origin };
        change.epoch = lineage.epoch;
      }
    }
    const pk = rowIdentity(keyValues, false);
    if (change.op !== OP_INSERT && prior?.incarnation) change.incarnation = prior.incarnation;
    // A row no trigger has recorded yet (its database is not enrolled yet, or it was
    // written while its table had no triggers) belongs to the enrolled incarnation:
    // a delete of it does not remove a row the log inserted at its key since.
    else if (change.op !== OP_INSERT && !prior) change.incarnation = ENROLMENT_INCARNATION;
    // A fresh insert needs no current row to merge against (mergeChange's fast path).
    const asRow = prior === null && change.op === OP_INSERT ? null : new Map(change.columns.map((c, i) => [c, values[i]]));
    const { state } = mergeChange(prior, asRow, {
      op: change.op,
      stamp,
      columns: change.columns,
      values,
      changed: change.changed,
      lineage,
      incarnation: change.incarnation,
      enrolment: change.enrolment,
    });
    if (shape) this.addRefs(shape, change, state);
    this.states.put(change.table, pk, state);
    // An enrolled row the log deleted: this node drops it too (every other node does).
    if (change.enrolment && !state.alive) this.dropEnrolled(change.table, change.key, keyValues);
    return true;
  }

  /** The table holds exactly the live copies of an enrolled row value (tables without a key). */
  private matchBag(table: string, values: SqlValue[]): void {
    const access = this.relocator.access(table);
    if (access) silenced(this.db, () => this.bag.reconcile(access, [values]));
  }

  private dropEnrolled(table: string, key: string[], keyValues: SqlValue[]): void {
    const access = this.relocator.access(table);
    if (access) silenced(this.db, () => access.delete(key, keyValues));
  }

  /**
   * An insert over a live row (INSERT OR REPLACE, whose delete fires no
   * trigger) removed that row: say so with a delete, folded here, so other
   * nodes do not keep it at the key the old lineage moves to.
   */
  private replacedRow(insert: RowChange, prior: NonNullable<ReturnType<RowStateStore["get"]>>): LogRecord {
    const hlc = this.clock.tick();
    const lineage = prior.lineage as Lineage;
    const row: RowChange = {
      ...insert,
      op: OP_DELETE,
      changed: [],
      instance: { hlc: lineage.hlc, origin: lineage.origin },
      epoch: lineage.epoch,
      incarnation: prior.incarnation ?? undefined,
    };
    const keyValues = insert.key.map((k) => insert.values[insert.columns.indexOf(k)]);
    row.bornKey = this.relocator.recordedBornKey(insert.table, lineage, intKey(keyValues[0]) as bigint);
    const pk = rowIdentity(keyValues, false);
    const stamp = { hlc, origin: this.origin };
    const { state } = mergeChange(prior, null, { op: OP_DELETE, stamp, columns: row.columns, values: row.values, changed: [], incarnation: row.incarnation });
    this.states.put(insert.table, pk, state);
    return { hlc, row };
  }

  /**
   * Names the lineage of the row each foreign key of the change points at. The
   * record carries every one (a receiver may need them to find the row, when a
   * key column is a reference); the state (of a row with a key) keeps those the change wrote.
   */
  private addRefs(shape: TableShape, change: RowChange, state?: { refs: Record<string, Stamp> | null }): void {
    for (const fk of shape.foreignKeys) {
      const parent = this.shapeOf(fk.table);
      const i = change.columns.indexOf(fk.column);
      const value = i < 0 ? null : intKey(change.values[i]);
      if (!parent?.autoId || value === null) continue;
      const at = this.states.get(parent.name, rowIdentity([value], false))?.lineage;
      if (!at) {
        // The app pointed at a row of its copy that the log has not reached yet: if the log
        // later moves the row it becomes (an id collision), this reference stays behind.
        if (this.enrolling()) {
          this.unplaced.count++;
          this.unplaced.first ??= `${shape.name}.${fk.column} = ${value} (a row of ${parent.name})`;
        }
        continue;
      }
      const lineage = { hlc: at.hlc, origin: at.origin };
      (change.refs ??= []).push({ column: fk.column, lineage, bornKey: this.relocator.recordedBornKey(parent.name, lineage, value) });
      const wrote = change.op === OP_INSERT || (change.op === OP_UPDATE && change.changed.includes(i));
      if (wrote && state) state.refs = { ...state.refs, [fk.column]: lineage };
    }
  }

  /**
   * References the app wrote while this database enrolled, to rows of its copy the
   * log had not reached: they carry no lineage, so they do not follow that row if it
   * moves later (README, "Joining with data"). Counted so the operator is told.
   */
  readonly unplaced: { count: number; first: string | null } = { count: 0, first: null };

  removeThrough(lastId: number): void {
    this.removeChanges.run(lastId);
    this.removeNotes.run(lastId);
  }
}
