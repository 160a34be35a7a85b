/**
 * Foreign keys hold after replay (DESIGN invariant 11). One node deletes a
 * parent (its cascade removes the children it knows) while another, apart,
 * writes a child of that parent. Merged, the child points at nothing. Every
 * node repairs such a child the same way, as its own logged change:
 *  - by default the parent is kept: its delete is undone with its last values
 *    (a REVIVE record: it writes no column, it only says the row exists, so it
 *    never overrides a value). People's work is kept;
 *  - for a child table (or "table.column") listed in config declaredOnDelete,
 *    the declared ON DELETE action applies instead: CASCADE deletes the late
 *    child, SET NULL / SET DEFAULT change its reference (RESTRICT and NO ACTION
 *    keep the parent, as SQLite would have refused that delete).
 * A child of a row set aside by a unique clash (unique.ts: two nodes created
 * "alice") is moved to the row that kept those values: the two were meant to be
 * one entity.
 * A repair is a change with a clock newer than the delete (this node has seen
 * it), so every node ends the same once every repair is in the log; repairs made
 * by two nodes at once say the same thing. Each is logged, counted, and listed by
 * `unisync conflicts`.
 *
 * When to look: replay notes the parent keys it touched (a parent deleted, a
 * child written, a parent moved by an id collision) in _unisync_refcheck, and
 * they are checked once no origin's last segment stopped half way through one
 * of its app's transactions (Segment.continues), and once every origin's log is
 * applied as far as this node finds it (Applier.mayRepair). A half-applied
 * transaction (a cascade split over two segments) would otherwise look like a
 * violation and revive a parent nobody meant to keep; a repair made part way
 * through the log would outvote (newer clock) a delete further on in it.
 */
import type { Database, Statement } from "better-sqlite3";
import { recordAgentChange, silenced } from "../db/internal.js";
import type { ForeignKey } from "../db/schema.js";
import { CHANGE_DELETE, CHANGE_REVIVE, CHANGE_UPDATE, maskFor } from "../capture/triggers.js";
import { encodeValues, rowIdentity, sameValue, showValue, type SqlValue } from "../log/value.js";
import type { RowState } from "../merge/merge.js";
import type { RowStateStore } from "../merge/state.js";
import type { TableAccess } from "../merge/table.js";
import type { AsideRows } from "../merge/unique.js";

export type RepairAction = "kept parent" | "deleted child" | "cleared reference" | "set reference to default" | "moved to kept row";

export interface Repair {
  action: RepairAction;
  /** The parent row (table and key) whose delete met a live child. */
  table: string;
  key: SqlValue[];
  child: string;
  childKey: SqlValue[];
}

/** A foreign key seen from its parent: which child column points at which parent column. */
interface Edge {
  child: TableAccess;
  fk: ForeignKey;
  parentColumn: string;
}

/** The rows of each child table that point at one parent key. */
type Children = { edge: Edge; rows: Map<string, SqlValue>[] }[];

interface Pending {
  table: string;
  column: string;
  value: SqlValue;
}

/** Rounds of repairs in one check: a repair can expose another (a kept parent's own parent). */
const MAX_ROUNDS = 1000;
/** Parent keys checked in one write transaction. */
const CHECK_TURN = 2000;

export class ReferenceKeeper {
  private readonly touchStmt: Statement;
  private readonly waitingStmt: Statement;
  /** Foreign keys by parent table, and each foreign key's parent, rebuilt whenever the set of tables changes. */
  private edges = new Map<string, Edge[]>();
  private parents = new Map<ForeignKey, { access: TableAccess; column: string }>();
  private indexedTables: Map<string, TableAccess> | null = null;

  constructor(
    private readonly db: Database,
    private readonly states: RowStateStore,
    private readonly tables: () => Map<string, TableAccess>,
    private readonly aside: AsideRows,
    /** The current capture generation of a table (repairs are recorded in its columns). */
    private readonly capOf: (table: string) => number | undefined,
    /** Whether a child's foreign key follows its declared ON DELETE action (config declaredOnDelete). */
    private readonly declared: (child: string, column: string) => boolean,
    private readonly onRepair: (r: Repair) => void,
    /** A repair that could not be made (e.g. the kept parent's unique values are taken now). */
    private readonly onProblem: (message: string) => void,
  ) {
    this.touchStmt = db.prepare("INSERT OR IGNORE INTO _unisync_refcheck(tbl, col, val) VALUES (?, ?, ?)");
    this.waitingStmt = db.prepare("SELECT 1 FROM _unisync_refcheck LIMIT 1");
  }

  /** Resolves every foreign key of the current tables to its parent table and column, once per set of tables. */
  private index(): void {
    const tables = this.tables();
    if (this.indexedTables === tables) return;
    const byLower = new Map([...tables.values()].map((t) => [t.shape.name.toLowerCase(), t]));
    this.edges = new Map();
    this.parents = new Map();
    for (const child of tables.values()) {
      for (const fk of child.shape.foreignKeys) {
        const p = byLower.get(fk.table.toLowerCase());
        // A reference to the primary key names no column; one to a composite key cannot be a single-column FK.
        const parentColumn = fk.to ?? (p?.shape.hasDeclaredKey && p.shape.key.length === 1 ? p.shape.key[0] : null);
        if (!p || !parentColumn) continue;
        this.parents.set(fk, { access: p, column: parentColumn });
        this.edges.set(p.shape.name, [...(this.edges.get(p.shape.name) ?? []), { child, fk, parentColumn }]);
      }
    }
    this.indexedTables = tables;
  }

  /** Foreign keys that point at `parent`, by the parent's table name. */
  private edgesInto(parent: string): Edge[] {
    this.index();
    return this.edges.get(parent) ?? [];
  }

  private parentOf(fk: ForeignKey): { access: TableAccess; column: string } | null {
    this.index();
    return this.parents.get(fk) ?? null;
  }

  /** Replay removed `row` from `access`'s table: rows that point at it get checked. */
  parentGone(access: TableAccess, row: Map<string, SqlValue>): void {
    for (const e of this.edgesInto(access.shape.name)) this.touch(access.shape.name, e.parentColumn, row.get(e.parentColumn) ?? null);
  }

  /**
   * An id collision moved a row of `table` to `key`, and the rows pointing at it followed.
   * The row may be out of the table there (set aside by a unique clash, or deleted): its
   * followers get checked at their new key.
   */
  parentMoved(table: string, key: SqlValue): void {
    const keyColumn = this.tables().get(table)?.shape.key[0];
    if (keyColumn !== undefined && this.edgesInto(table).some((e) => e.parentColumn === keyColumn)) this.touch(table, keyColumn, key);
  }

  /** Replay put `row` into `access`'s table (inserted, or changed `changed`): the rows it points at get checked. */
  childWritten(access: TableAccess, row: Map<string, SqlValue>, changed: ReadonlyMap<string, SqlValue> | null = null): void {
    for (const fk of access.shape.foreignKeys) {
      if (changed && !changed.has(fk.column)) continue;
      const parent = this.parentOf(fk);
      if (parent) this.touch(parent.access.shape.name, parent.column, row.get(fk.column) ?? null);
    }
  }

  /** Whether parent keys wait to be checked. */
  waiting(): boolean {
    return this.waitingStmt.get() !== undefined;
  }

  private touch(table: string, column: string, value: SqlValue): void {
    if (value !== null) this.touchStmt.run(table, column, value);
  }

  /**
   * Checks up to `limit` parent keys touched since the last check (the oldest
   * first) and repairs what points at a deleted row. Call inside a write
   * transaction, once no origin is part way through an app transaction; a
   * catch-up touches many keys, so the caller checks them in turns and the app
   * writes in between. Returns the repairs made.
   */
  check(limit = CHECK_TURN): number {
    const rows = this.db.prepare("SELECT rowid, tbl, col, val FROM _unisync_refcheck ORDER BY rowid LIMIT ?").raw(true).safeIntegers(true).all(limit) as [bigint, string, string, SqlValue][];
    if (rows.length === 0) return 0;
    this.db.prepare("DELETE FROM _unisync_refcheck WHERE rowid <= ?").run(rows[rows.length - 1][0]);
    let pending: Pending[] = rows.map(([, table, column, value]) => ({ table, column, value }));
    let repairs = 0;
    silenced(this.db, () => {
      for (let round = 0; pending.length > 0 && round < MAX_ROUNDS; round++) {
        const next: Pending[] = [];
        for (const p of pending) {
          try {
            // A savepoint each: a repair that fails leaves nothing half done, and replay goes on.
            repairs += this.db.transaction(() => this.repair(p, next))();
          } catch (err) {
            this.onProblem(`references to ${p.table} ${describeKey([p.column], [p.value])}: ${(err as Error).message}`);
          }
        }
        pending = next;
      }
    });
    return repairs;
  }

  /** Repairs the references to one parent key, if its row is gone; queues what that touches in `next`. */
  private repair(p: Pending, next: Pending[]): number {
    const parent = this.tables().get(p.table);
    if (!parent || parent.rowsWhere(p.column, p.value, 1).length > 0) return 0;
    const children = this.edgesInto(p.table)
      .filter((e) => e.parentColumn === p.column)
      .map((e) => ({ edge: e, rows: e.child.rowsWhere(e.fk.column, p.value) }))
      .filter((c) => c.rows.length > 0);
    if (children.length === 0) return 0;
    // Only a parent this node holds as deleted is repaired: one not here yet may still arrive.
    const keyed = parent.shape.hasDeclaredKey && parent.shape.key.length === 1 && parent.shape.key[0] === p.column;
    const state = keyed ? this.states.get(p.table, rowIdentity([p.value], false)) : null;
    if (state?.alive) return this.followKeptRow(parent, p.value, children, next);
    if (!state || !state.dead) return 0;
    const keeps = (e: Edge) => !this.declared(e.child.shape.name, e.fk.column) || !["CASCADE", "SET NULL", "SET DEFAULT"].includes(e.fk.onDelete);
    const keeper = children.find((c) => keeps(c.edge));
    if (keeper) return this.keepParent(parent, p.value, state, children, keeper, next);
    let n = 0;
    for (const { edge, rows } of children) for (const row of rows) n += this.applyDeclared(parent, p.value, edge, row, next);
    return n;
  }

  /**
   * Brings the deleted parent back with its last values, as this node's change.
   * If another row holds its unique values now, the unique-clash rule decides
   * which stays (unique.ts), and a parent set aside hands its children on.
   */
  private keepParent(parent: TableAccess, key: SqlValue, state: RowState, children: Children, keeper: Children[number], next: Pending[]): number {
    const table = parent.shape.name;
    const keyCol = parent.shape.key[0];
    const dead = state.dead as Map<string, SqlValue>;
    const values = new Map(parent.shape.columns.map((c) => [c, dead.has(c) ? (dead.get(c) as SqlValue) : parent.defaultValue(c)]));
    values.set(keyCol, key);
    const child = keeper.edge.child;
    const childKey = child.shape.key.map((k) => keeper.rows[0].get(k) ?? null);
    const what = `${table} ${describeKey([keyCol], [key])}`;
    const note = `kept ${what}: ${child.shape.name} ${describeKey(child.shape.key, childKey)} refers to it, written while it was being deleted`;
    try {
      // A savepoint: a failed insert leaves nothing half done.
      this.db.transaction(() => {
        try {
          parent.insert(values);
        } catch (err) {
          const other = (err as { code?: string }).code === "SQLITE_CONSTRAINT_UNIQUE" ? parent.uniqueClash(values, parent.shape.key, [key]) : null;
          if (!other) throw err;
          this.aside.settle(parent, { keyValues: [key], state, values, inTable: false }, other, () => parent.insert(values));
        }
        this.record(parent, CHANGE_REVIVE, values, null, [], note);
      })();
    } catch (err) {
      this.onProblem(`could not keep ${what} that ${child.shape.name} ${describeKey(child.shape.key, childKey)} refers to: ${(err as Error).message}`);
      return 0;
    }
    this.report({ action: "kept parent", table, key: [key], child: child.shape.name, childKey });
    if (this.aside.isAside(table, [key])) return 1 + this.followKeptRow(parent, key, children, next);
    this.childrenOf(parent, values, next);
    return 1;
  }

  /** The child's declared ON DELETE action, as this node's change. */
  private applyDeclared(parent: TableAccess, key: SqlValue, edge: Edge, row: Map<string, SqlValue>, next: Pending[]): number {
    const child = edge.child;
    const keyValues = child.shape.key.map((k) => row.get(k) ?? null);
    const parentKey = describeKey([edge.parentColumn], [key]);
    const base = { table: parent.shape.name, key: [key], child: child.shape.name, childKey: keyValues };
    if (edge.fk.onDelete === "CASCADE") {
      child.delete(child.shape.key, keyValues);
      this.record(child, CHANGE_DELETE, row, null, [], `deleted: ${parent.shape.name} ${parentKey} it refers to was deleted (ON DELETE CASCADE)`);
      // The deleted child may itself be a parent.
      for (const e of this.edgesInto(child.shape.name)) next.push({ table: child.shape.name, column: e.parentColumn, value: row.get(e.parentColumn) ?? null });
      this.report({ ...base, action: "deleted child" });
      return 1;
    }
    const value = edge.fk.onDelete === "SET NULL" ? null : child.defaultValue(edge.fk.column);
    const note = `${edge.fk.column} ${value === null ? "cleared" : "set to its default"}: ${parent.shape.name} ${parentKey} was deleted (ON DELETE ${edge.fk.onDelete})`;
    this.setReference(edge, row, value, note, next);
    this.report({ ...base, action: value === null ? "cleared reference" : "set reference to default" });
    return 1;
  }

  /**
   * The parent is alive but not in the table: a unique clash set it aside in
   * favour of an older row with the same unique values. Its children move to that row.
   */
  private followKeptRow(parent: TableAccess, key: SqlValue, children: Children, next: Pending[]): number {
    let keptKey = this.aside.keptKey(parent.shape.name, [key]);
    let kept = keptKey ? parent.find(parent.shape.key, keptKey) : null;
    if (keptKey && !kept) {
      // The row it was set aside for left the table since: set aside in turn for an
      // older row (A aside for B, B aside for C), or deleted while another row holds
      // the values. Its kept key still names it, so a child arriving now would be left
      // pointing at nothing on every node: it goes to the row that holds the values now.
      const values = this.aside.values(parent, [key]);
      keptKey = values ? parent.uniqueClash(values, parent.shape.key, [key]) : null;
      kept = keptKey ? parent.find(parent.shape.key, keptKey) : null;
    }
    if (!keptKey || !kept) return 0;
    let n = 0;
    for (const { edge, rows } of children) {
      const to = kept.get(edge.parentColumn) ?? null;
      for (const row of rows) {
        const note = `${edge.fk.column} moved to ${parent.shape.name} ${describeKey(parent.shape.key, keptKey)}: ${describeKey(parent.shape.key, [key])} it referred to clashed with it on a UNIQUE constraint and was set aside`;
        this.setReference(edge, row, to, note, next);
        this.report({ action: "moved to kept row", table: parent.shape.name, key: [key], child: edge.child.shape.name, childKey: edge.child.shape.key.map((k) => row.get(k) ?? null) });
        n++;
      }
    }
    return n;
  }

  /** Points a child's foreign key at `value`, as this node's change. */
  private setReference(edge: Edge, row: Map<string, SqlValue>, value: SqlValue, note: string, next: Pending[]): void {
    const child = edge.child;
    const keyValues = child.shape.key.map((k) => row.get(k) ?? null);
    const changed = new Map(row);
    changed.set(edge.fk.column, value);
    try {
      if (child.shape.hasDeclaredKey && !child.shape.key.includes(edge.fk.column)) child.update(child.shape.key, keyValues, new Map([[edge.fk.column, value]]));
      else {
        // The reference is part of what identifies the row: the row changes identity.
        child.delete(child.shape.key, keyValues);
        child.insert(changed);
      }
    } catch (err) {
      // The row it would become is there already (an association both rows had): this one goes.
      const code = (err as { code?: string }).code;
      const there = code === "SQLITE_CONSTRAINT_UNIQUE" || code === "SQLITE_CONSTRAINT_PRIMARYKEY" ? this.rowInTheWay(child, changed) : null;
      if (!there || child.shape.columns.some((c) => !sameValue(there.get(c) ?? null, changed.get(c) ?? null))) throw err;
      child.delete(child.shape.key, keyValues);
      this.record(child, CHANGE_DELETE, row, null, [], `${note}; the same row is there already`);
      return;
    }
    const mask = maskFor(child.shape.columns.length, [child.shape.columns.indexOf(edge.fk.column)]);
    this.record(child, CHANGE_UPDATE, changed, mask, keyValues, note);
    if (value !== null) {
      const p = this.parentOf(edge.fk);
      if (p) next.push({ table: p.access.shape.name, column: p.column, value });
    }
  }

  /** The row that holds `row`'s key or unique values now, if any. */
  private rowInTheWay(access: TableAccess, row: Map<string, SqlValue>): Map<string, SqlValue> | null {
    const key = access.shape.key.map((k) => row.get(k) ?? null);
    const atKey = access.find(access.shape.key, key);
    if (atKey) return atKey;
    const other = access.uniqueClash(row, access.shape.key, key);
    return other ? access.find(access.shape.key, other) : null;
  }

  /** The rows a kept parent points at must exist too. */
  private childrenOf(access: TableAccess, row: Map<string, SqlValue>, next: Pending[]): void {
    for (const fk of access.shape.foreignKeys) {
      const p = this.parentOf(fk);
      const value = row.get(fk.column) ?? null;
      if (p && value !== null) next.push({ table: p.access.shape.name, column: p.column, value });
    }
  }

  private record(access: TableAccess, op: number, row: Map<string, SqlValue>, mask: unknown, oldKey: SqlValue[], note: string): void {
    const capId = this.capOf(access.shape.name);
    if (capId === undefined) throw new Error(`no capture generation for ${access.shape.name}`);
    recordAgentChange(this.db, capId, op, access.shape.columns.map((c) => row.get(c) ?? null), mask, oldKey, note);
  }

  private report(r: Repair): void {
    this.db
      .prepare("INSERT INTO _unisync_repairs(tbl, row_key, action, child_tbl, child_key, detected_ms) VALUES (?, ?, ?, ?, ?, ?)")
      .run(r.table, encodeValues(r.key), r.action, r.child, encodeValues(r.childKey), Date.now());
    this.onRepair(r);
  }
}

export function describeKey(columns: string[], values: SqlValue[]): string {
  return columns.map((c, i) => `${c}=${showValue(values[i])}`).join(",");
}

/** Config declaredOnDelete: entries "*", "table" or "table.column", case-insensitive. */
export function declaredRule(entries: readonly string[]): (child: string, column: string) => boolean {
  const set = new Set(entries.map((e) => e.toLowerCase()));
  return (child, column) => set.has("*") || set.has(child.toLowerCase()) || set.has(`${child}.${column}`.toLowerCase());
}
