/**
 * Unique clashes: two nodes create rows with the same values in a UNIQUE
 * column (both add user "alice"). Every node keeps the same one, the row
 * created first (lineage rank, or first insert clock), whatever order they
 * arrive in; the other is taken out of the table and kept, with its values,
 * in _unisync_conflicts ("set aside"). Its merge state stays, so later changes
 * to it still merge into the values kept here, and it comes back by itself once
 * nothing clashes with it (restore), or takes the place of a row created after it.
 *
 * Why not merge the two rows into one: a row deleted on one node before the
 * clash is seen there never clashes (its values are not in the table), while on
 * another node the same row was merged first and its delete then removes the
 * merged row. Setting aside gives the same tables whatever the order.
 */
import type { Database, Statement } from "better-sqlite3";
import { silenced } from "../db/internal.js";
import { compareStamp } from "../log/hlc.js";
import { decodeValues, encodeValues, rowIdentity, type SqlValue } from "../log/value.js";
import { ENROLMENT_INCARNATION, sameStamp, type RowState, type Stamp } from "./merge.js";
import { intKey, outranks } from "./relocate.js";
import type { RowStateStore } from "./state.js";
import type { TableAccess } from "./table.js";

export class AsideRows {
  private readonly getStmt: Statement;
  private readonly putStmt: Statement;
  private readonly deleteStmt: Statement;
  /** Whether any row is set aside (kept up to date): most databases never have one. */
  private any: boolean;

  constructor(
    private readonly db: Database,
    private readonly states: RowStateStore,
    private readonly tables: () => Map<string, TableAccess>,
    /** Told about every row set aside (for the log and metrics). */
    private readonly onSetAside: (table: string, key: SqlValue[], keptKey: SqlValue[]) => void,
  ) {
    this.getStmt = db.prepare("SELECT vals FROM _unisync_conflicts WHERE tbl = ? AND row_key = ?").pluck(true);
    this.putStmt = db.prepare("INSERT OR REPLACE INTO _unisync_conflicts(tbl, row_key, kept_key, vals, detected_ms) VALUES (?, ?, ?, ?, ?)");
    this.deleteStmt = db.prepare("DELETE FROM _unisync_conflicts WHERE tbl = ? AND row_key = ?");
    this.any = !!db.prepare("SELECT 1 FROM _unisync_conflicts LIMIT 1").get();
  }

  get anyAside(): boolean {
    return this.any;
  }

  /** The values of a row set aside, or null when it is not. */
  values(access: TableAccess, keyValues: SqlValue[]): Map<string, SqlValue> | null {
    if (!this.any) return null;
    const vals = this.getStmt.get(access.shape.name, encodeValues(keyValues)) as Buffer | undefined;
    if (!vals) return null;
    const flat = decodeValues(vals);
    const out = new Map<string, SqlValue>();
    for (let i = 0; i + 1 < flat.length; i += 2) if (access.has(flat[i] as string)) out.set(flat[i] as string, flat[i + 1]);
    return out;
  }

  /** The key of the row that kept the values a set-aside row clashed on, or null when it is not set aside. */
  keptKey(table: string, keyValues: SqlValue[]): SqlValue[] | null {
    if (!this.any) return null;
    const kept = this.db.prepare("SELECT kept_key FROM _unisync_conflicts WHERE tbl = ? AND row_key = ?").pluck(true).get(table, encodeValues(keyValues)) as Buffer | undefined;
    return kept ? decodeValues(kept) : null;
  }

  /** Whether the row with this key is set aside. */
  isAside(table: string, keyValues: SqlValue[]): boolean {
    return this.any && this.getStmt.get(table, encodeValues(keyValues)) !== undefined;
  }

  /**
   * An id collision moved a row (relocate.ts): if it is set aside, its entry and
   * the key in its values move with it; if it kept the values, entries name its new key.
   */
  rekey(table: string, keyCol: string, from: bigint, to: bigint): void {
    if (!this.any) return;
    const fromKey = encodeValues([from]);
    const toKey = encodeValues([to]);
    const vals = this.getStmt.get(table, fromKey) as Buffer | undefined;
    if (vals) {
      const flat = decodeValues(vals);
      for (let i = 0; i + 1 < flat.length; i += 2) if (flat[i] === keyCol) flat[i + 1] = to;
      this.db.prepare("UPDATE _unisync_conflicts SET row_key = ?, vals = ? WHERE tbl = ? AND row_key = ?").run(toKey, encodeValues(flat), table, fromKey);
    }
    this.db.prepare("UPDATE _unisync_conflicts SET kept_key = ? WHERE tbl = ? AND kept_key = ?").run(toKey, table, fromKey);
  }

  /**
   * A row that `column` of the set-aside rows of `access` may point at moved
   * (an id collision, relocate.ts): the rows whose merge state says the column
   * points at that lineage, and whose kept value is its old key, now hold its
   * new key, so they come back pointing at it, as a row in the table would
   * (the children in the table follow the move). Where the column is part of the
   * row's key, the entry and the merge state move to the new key (unless a state
   * is there already: the same row, written by a node that saw the move).
   */
  followMove(access: TableAccess, column: string, lineage: Stamp, from: bigint, to: bigint): void {
    if (!this.any) return;
    const table = access.shape.name;
    const rows = this.db.prepare("SELECT row_key, kept_key, vals FROM _unisync_conflicts WHERE tbl = ?").all(table) as { row_key: Buffer; kept_key: Buffer; vals: Buffer }[];
    for (const r of rows) {
      const keyValues = decodeValues(r.row_key);
      const pk = rowIdentity(keyValues, false);
      const state = this.states.get(table, pk);
      const ref = state?.refs?.[column];
      if (!state || !ref || !sameStamp(ref, lineage)) continue;
      const flat = decodeValues(r.vals);
      const at = flat.findIndex((v, i) => i % 2 === 0 && v === column);
      if (at < 0 || intKey(flat[at + 1]) !== from) continue;
      flat[at + 1] = to;
      const k = access.shape.key.indexOf(column);
      if (k < 0) {
        this.db.prepare("UPDATE _unisync_conflicts SET vals = ? WHERE tbl = ? AND row_key = ?").run(encodeValues(flat), table, r.row_key);
        continue;
      }
      const newKey = keyValues.slice();
      newKey[k] = to;
      const newPk = rowIdentity(newKey, false);
      this.deleteStmt.run(table, r.row_key);
      this.states.delete(table, pk);
      if (this.states.get(table, newPk)) continue;
      this.states.put(table, newPk, state);
      this.putStmt.run(table, encodeValues(newKey), r.kept_key, encodeValues(flat), Date.now());
    }
  }

  /** The row is back in the table, or deleted: no longer aside. */
  release(table: string, keyValues: SqlValue[]): void {
    this.deleteStmt.run(table, encodeValues(keyValues));
  }

  /**
   * A write of the incoming row failed on a UNIQUE constraint against the row
   * at `otherKey`: the one created later is set aside; `writeTable` retries the
   * incoming write when the incoming row stays.
   */
  settle(
    access: TableAccess,
    incoming: { keyValues: SqlValue[]; state: RowState; values: Map<string, SqlValue>; inTable: boolean },
    otherKey: SqlValue[],
    writeTable: () => void,
  ): void {
    const key = access.shape.key;
    const other = this.states.get(access.shape.name, rowIdentity(otherKey, false));
    if (createdFirst(access, { state: incoming.state, key: incoming.keyValues }, { state: other, key: otherKey })) {
      this.setAside(access, otherKey, access.find(key, otherKey) as Map<string, SqlValue>, incoming.keyValues);
      access.delete(key, otherKey);
      writeTable();
    } else {
      this.setAside(access, incoming.keyValues, incoming.values, otherKey);
      if (incoming.inTable) access.delete(key, incoming.keyValues);
    }
  }

  /**
   * Brings back the rows set aside (in `table`, or all) that nothing clashes
   * with any more, or that were created before the row in their way. Runs after
   * every write to such a table, replayed or local, so every node reaches the
   * same table.
   */
  restore(table?: string): void {
    if (!this.any) return;
    const rows = (
      table === undefined
        ? this.db.prepare("SELECT tbl, row_key FROM _unisync_conflicts").all()
        : this.db.prepare("SELECT tbl, row_key FROM _unisync_conflicts WHERE tbl = ?").all(table)
    ) as { tbl: string; row_key: Buffer }[];
    if (rows.length === 0) {
      this.any = !!this.db.prepare("SELECT 1 FROM _unisync_conflicts LIMIT 1").get();
      return;
    }
    silenced(this.db, () => {
      for (const r of rows) {
        const access = this.tables().get(r.tbl);
        if (!access) continue;
        const keyValues = decodeValues(r.row_key);
        const values = this.values(access, keyValues);
        const state = this.states.get(r.tbl, rowIdentity(keyValues, false));
        if (!values || !state) continue;
        if (!state.alive) {
          this.deleteStmt.run(r.tbl, r.row_key);
          continue;
        }
        const bringBack = () => {
          access.insert(values);
          this.deleteStmt.run(r.tbl, r.row_key);
        };
        try {
          this.db.transaction(bringBack)();
        } catch (err) {
          if ((err as { code?: string }).code !== "SQLITE_CONSTRAINT_UNIQUE") continue;
          const other = access.uniqueClash(values, access.shape.key, keyValues);
          if (other && createdFirst(access, { state, key: keyValues }, { state: this.states.get(r.tbl, rowIdentity(other, false)), key: other })) {
            this.db.transaction(() => this.settle(access, { keyValues, state, values, inTable: false }, other, bringBack))();
          }
        }
      }
    });
  }

  private setAside(access: TableAccess, keyValues: SqlValue[], values: Map<string, SqlValue>, keptKey: SqlValue[]): void {
    const flat: SqlValue[] = [];
    for (const [c, v] of values) flat.push(c, v);
    this.putStmt.run(access.shape.name, encodeValues(keyValues), encodeValues(keptKey), encodeValues(flat), Date.now());
    this.any = true;
    this.onSetAside(access.shape.name, keyValues, keptKey);
  }
}

/**
 * Whether row a was created before row b: a row whose creation is not known
 * (recorded before incarnations existed) first, then logged rows by lineage
 * rank or first insert clock, then rows there before unisync (enrolled), and
 * the keys break a tie (enrolled rows share one incarnation).
 */
function createdFirst(access: TableAccess, a: { state: RowState; key: SqlValue[] }, b: { state: RowState | null; key: SqlValue[] }): boolean {
  if (access.shape.autoId && a.state.lineage && b.state?.lineage) return outranks(a.state.lineage, b.state.lineage);
  const rank = (s: RowState | null) => {
    const inc = s?.incarnation ?? { hlc: 0, origin: "" };
    return { enrolled: sameStamp(inc, ENROLMENT_INCARNATION) ? 1 : 0, ...inc };
  };
  const ra = rank(a.state);
  const rb = rank(b.state);
  if (ra.enrolled !== rb.enrolled) return ra.enrolled < rb.enrolled;
  const byClock = compareStamp(ra.hlc, ra.origin, rb.hlc, rb.origin);
  if (byClock !== 0) return byClock < 0;
  return Buffer.compare(rowIdentity(a.key, false), rowIdentity(b.key, false)) < 0;
}
