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
}

export const instanceKey = (i: Instance) => encodeValues([BigInt(i.hlc), i.origin]);

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

  constructor(private readonly db: Database) {
    this.getStmt = db.prepare("SELECT vals, hlc, origin, alive FROM _unisync_bag WHERE tbl = ? AND inst = ?");
    this.putStmt = db.prepare("INSERT OR REPLACE INTO _unisync_bag(tbl, inst, vid, vals, hlc, origin, alive) VALUES (?, ?, ?, ?, ?, ?, ?)");
    this.liveStmt = db.prepare("SELECT inst FROM _unisync_bag WHERE tbl = ? AND vid = ? AND alive = 1 ORDER BY inst LIMIT 1").pluck(true);
    this.countStmt = db.prepare("SELECT count(*) FROM _unisync_bag WHERE tbl = ? AND vid = ? AND alive = 1").pluck(true);
  }

  private get(table: string, inst: Buffer): InstanceState | null {
    const r = this.getStmt.get(table, inst) as { vals: Buffer; hlc: number | bigint; origin: string; alive: number | bigint } | undefined;
    return r ? { values: decodeValues(r.vals), hlc: Number(r.hlc), origin: r.origin, alive: Number(r.alive) === 1 } : null;
  }

  private put(table: string, inst: Buffer, s: InstanceState): void {
    this.putStmt.run(table, inst, rowIdentity(s.values, true), encodeValues(s.values), s.hlc, s.origin, s.alive ? 1 : 0);
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
   * Returns the row values whose copy counts may have changed, or null when
   * the operation lost (or was seen before).
   */
  record(table: string, inst: Instance, op: "insert" | "update" | "delete", values: SqlValue[], stamp: Instance): SqlValue[][] | null {
    const key = instanceKey(inst);
    const prior = this.get(table, key);
    if (prior && compareStamp(stamp.hlc, stamp.origin, prior.hlc, prior.origin) <= 0) return null;
    const next: InstanceState = {
      values: op === "delete" && prior ? prior.values : values,
      hlc: stamp.hlc,
      origin: stamp.origin,
      alive: op !== "delete",
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
    const rows = this.db.prepare("SELECT inst, vals, hlc, origin, alive FROM _unisync_bag WHERE tbl = ?").all(table) as {
      inst: Buffer; vals: Buffer; hlc: number | bigint; origin: string; alive: number | bigint;
    }[];
    const from = after.map((c) => before.indexOf(c));
    for (const r of rows) {
      const old = decodeValues(r.vals);
      const values = after.map((c, i) => (from[i] < 0 ? defaultOf(c) : old[from[i]]));
      this.put(table, r.inst, { values, hlc: Number(r.hlc), origin: r.origin, alive: Number(r.alive) === 1 });
    }
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
