/**
 * Tables without a declared key are bags: equal rows may repeat, and nothing
 * in a row names it. unisync names each copy itself: an instance, identified
 * by the (clock, origin) of the insert that made it. Updates and deletes name
 * the instance they changed, and each instance is a last-writer-wins register
 * of (alive, values). So concurrent updates of one copy leave one copy, any
 * order of arrival gives the same bag, and a record applied twice is a no-op.
 * The table holds, for every distinct row value, as many copies as there are
 * live instances with that value.
 */
import { createHash } from "node:crypto";
import type { Database, Statement } from "better-sqlite3";
import { compareStamp } from "../log/hlc.js";
import { decodeValues, encodeValues, rowIdentity, type SqlValue } from "../log/value.js";
import type { RowRef } from "../log/segment.js";
import type { Stamp } from "./merge.js";
import { intKey } from "./relocate.js";
import type { TableAccess } from "./table.js";

export interface Instance {
  hlc: number;
  origin: string;
}

interface InstanceState {
  values: SqlValue[];
  hlc: number;
  origin: string;
  alive: boolean;
  /** The lineage each reference column's value points at (relocate.ts): the copy follows its parent's move. */
  refs: Record<string, Stamp> | null;
}

interface InstanceRow {
  inst: Buffer;
  vals: Buffer;
  hlc: number | bigint;
  origin: string;
  alive: number | bigint;
  refs: string | null;
}

const fromRow = (r: InstanceRow): InstanceState => ({
  values: decodeValues(r.vals),
  hlc: Number(r.hlc),
  origin: r.origin,
  alive: Number(r.alive) === 1,
  refs: r.refs ? (JSON.parse(r.refs) as Record<string, Stamp>) : null,
});

export const instanceKey = (i: Instance) => encodeValues([BigInt(i.hlc), i.origin]);

/** A record's references as a copy keeps them: the lineage each column points at. */
export const refsByColumn = (refs: readonly RowRef[]): Record<string, Stamp> => Object.fromEntries(refs.map((r) => [r.column, r.lineage]));

/**
 * The copies a table held when it was enrolled are named by their values and
 * their number (hlc 0): two nodes that enrol equal rows hold the same copies,
 * and a copy the log deleted stays deleted when an old copy enrols it again.
 */
export function enrolmentInstance(values: readonly SqlValue[], copy: number): Instance {
  return { hlc: 0, origin: `#${createHash("sha256").update(rowIdentity(values, true)).digest("hex").slice(0, 32)}/${copy}` };
}

export class BagStore {
  private readonly getStmt: Statement;
  private readonly putStmt: Statement;
  private readonly liveStmt: Statement;
  private readonly countStmt: Statement;
  private readonly referringStmt: Statement;

  constructor(private readonly db: Database) {
    this.getStmt = db.prepare("SELECT inst, vals, hlc, origin, alive, refs FROM _unisync_bag WHERE tbl = ? AND inst = ?");
    this.putStmt = db.prepare("INSERT OR REPLACE INTO _unisync_bag(tbl, inst, vid, vals, hlc, origin, alive, refs) VALUES (?, ?, ?, ?, ?, ?, ?, ?)");
    this.referringStmt = db.prepare(
      "SELECT inst, vals, hlc, origin, alive, refs FROM _unisync_bag WHERE tbl = ? AND refs IS NOT NULL AND instr(refs, ?) > 0 AND instr(refs, ?) > 0",
    );
    this.liveStmt = db.prepare("SELECT inst FROM _unisync_bag WHERE tbl = ? AND vid = ? AND alive = 1 ORDER BY inst LIMIT 1").pluck(true);
    this.countStmt = db.prepare("SELECT count(*) FROM _unisync_bag WHERE tbl = ? AND vid = ? AND alive = 1").pluck(true);
  }

  private get(table: string, inst: Buffer): InstanceState | null {
    const r = this.getStmt.get(table, inst) as InstanceRow | undefined;
    return r ? fromRow(r) : null;
  }

  private put(table: string, inst: Buffer, s: InstanceState): void {
    const refs = s.refs && Object.keys(s.refs).length > 0 ? JSON.stringify(s.refs) : null;
    this.putStmt.run(table, inst, rowIdentity(s.values, true), encodeValues(s.values), s.hlc, s.origin, s.alive ? 1 : 0, refs);
  }

  /** Live copies the state holds of this row value. */
  liveCopies(table: string, values: SqlValue[]): number {
    return Number(this.countStmt.get(table, rowIdentity(values, true)));
  }

  /** The instance a local update or delete of a row with these values changed (the oldest live one). */
  pickInstance(table: string, values: SqlValue[]): Instance | null {
    const inst = this.liveStmt.get(table, rowIdentity(values, true)) as Buffer | undefined;
    if (!inst) return null;
    const [hlc, origin] = decodeValues(inst);
    return { hlc: Number(hlc), origin: origin as string };
  }

  /**
   * Records an operation on an instance if it is newer than what the state has.
   * `refs`: the lineages the values' references point at (undefined: a record
   * from before copies kept them). Returns the row values whose copy counts may
   * have changed, or null when the operation lost (or was seen before).
   */
  record(table: string, inst: Instance, op: "insert" | "update" | "delete", values: SqlValue[], stamp: Instance, refs?: Record<string, Stamp>): SqlValue[][] | null {
    const key = instanceKey(inst);
    const prior = this.get(table, key);
    if (prior && compareStamp(stamp.hlc, stamp.origin, prior.hlc, prior.origin) <= 0) return null;
    const next: InstanceState = {
      values: op === "delete" && prior ? prior.values : values,
      hlc: stamp.hlc,
      origin: stamp.origin,
      alive: op !== "delete",
      refs: op === "delete" && prior ? prior.refs : (refs ?? null),
    };
    this.put(table, key, next);
    return prior ? [prior.values, next.values] : [next.values];
  }

  /**
   * The table's columns changed (a column added or dropped, a rebuild): every
   * copy's values follow, a new column taking its default as SQLite gave the
   * rows already there, so copies still match the table's rows.
   */
  remap(table: string, before: readonly string[], after: readonly string[], defaultOf: (column: string) => SqlValue): void {
    const rows = this.db.prepare("SELECT inst, vals, hlc, origin, alive, refs FROM _unisync_bag WHERE tbl = ?").all(table) as InstanceRow[];
    const from = after.map((c) => before.indexOf(c));
    for (const r of rows) {
      const s = fromRow(r);
      const values = after.map((c, i) => (from[i] < 0 ? defaultOf(c) : s.values[from[i]]));
      this.put(table, r.inst, { ...s, values });
    }
  }

  /**
   * A parent lineage moved from key `from` to `to` (relocate.ts): every copy
   * whose `column` holds `from` as a reference to that lineage now holds `to`,
   * deleted copies included (an update may bring them back). Returns the row
   * values whose copy counts changed, for reconcile.
   */
  followMove(access: TableAccess, column: string, lineage: Stamp, from: bigint, to: bigint): SqlValue[][] {
    const table = access.shape.name;
    const i = access.shape.columns.indexOf(column);
    if (i < 0) return [];
    const affected: SqlValue[][] = [];
    for (const r of this.referringStmt.all(table, String(lineage.hlc), JSON.stringify(lineage.origin)) as InstanceRow[]) {
      const s = fromRow(r);
      const ref = s.refs?.[column];
      if (!ref || ref.hlc !== lineage.hlc || ref.origin !== lineage.origin || intKey(s.values[i]) !== from) continue;
      const values = s.values.slice();
      values[i] = to;
      this.put(table, r.inst, { ...s, values });
      if (s.alive) affected.push(s.values, values);
    }
    return affected;
  }

  /** Makes the table hold exactly as many copies of each row value as there are live instances. */
  reconcile(access: TableAccess, affected: SqlValue[][]): void {
    const seen = new Set<string>();
    const key = access.shape.columns;
    for (const values of affected) {
      const id = rowIdentity(values, true).toString("base64");
      if (seen.has(id)) continue;
      seen.add(id);
      const want = this.liveCopies(access.shape.name, values);
      let have = access.copies(key, values);
      const row = new Map(key.map((k, i) => [k, values[i]]));
      for (; have < want; have++) access.insert(row);
      for (; have > want; have--) access.delete(key, values);
    }
  }
}
