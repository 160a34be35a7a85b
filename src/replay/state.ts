/** Reads and writes the per-row merge state kept in _unisync_rows. */
import type { Database, Statement } from "better-sqlite3";
import { decodeValues, encodeValues, type SqlValue } from "../log/value.js";
import type { RowState, Stamp } from "./merge.js";

interface StateRow {
  hlc: number | bigint;
  origin: string;
  alive: number | bigint;
  base_hlc: number | bigint;
  base_origin: string;
  cols: string | null;
  dead: Buffer | null;
}

function encodeDead(values: Map<string, SqlValue>): Buffer {
  const flat: SqlValue[] = [];
  for (const [k, v] of values) flat.push(k, v);
  return encodeValues(flat);
}

function decodeDead(bytes: Buffer): Map<string, SqlValue> {
  const flat = decodeValues(bytes);
  const out = new Map<string, SqlValue>();
  for (let i = 0; i + 1 < flat.length; i += 2) out.set(flat[i] as string, flat[i + 1]);
  return out;
}

export class RowStateStore {
  private readonly getStmt: Statement;
  private readonly putStmt: Statement;

  constructor(db: Database) {
    this.getStmt = db.prepare("SELECT hlc, origin, alive, base_hlc, base_origin, cols, dead FROM _unisync_rows WHERE tbl = ? AND pk = ?");
    this.putStmt = db.prepare(
      "INSERT OR REPLACE INTO _unisync_rows(tbl, pk, hlc, origin, alive, base_hlc, base_origin, cols, dead) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    );
  }

  get(table: string, pk: Buffer): RowState | null {
    const r = this.getStmt.get(table, pk) as StateRow | undefined;
    if (!r) return null;
    // Stored as {column: 0} for "the base clock" or {column: [hlc, origin]}.
    const cols: Record<string, Stamp | null> = {};
    if (r.cols) {
      for (const [c, v] of Object.entries(JSON.parse(r.cols) as Record<string, [number, string] | 0>)) cols[c] = v === 0 ? null : { hlc: v[0], origin: v[1] };
    }
    return {
      exists: { hlc: Number(r.hlc), origin: r.origin },
      alive: Number(r.alive) === 1,
      base: { hlc: Number(r.base_hlc), origin: r.base_origin },
      cols,
      dead: r.dead ? decodeDead(r.dead) : null,
    };
  }

  put(table: string, pk: Buffer, s: RowState): void {
    const entries = Object.entries(s.cols);
    const cols = entries.length ? JSON.stringify(Object.fromEntries(entries.map(([c, st]) => [c, st ? [st.hlc, st.origin] : 0]))) : null;
    this.putStmt.run(table, pk, s.exists.hlc, s.exists.origin, s.alive ? 1 : 0, s.base.hlc, s.base.origin, cols, s.dead ? encodeDead(s.dead) : null);
  }
}

/**
 * Tables without a declared key are bags: equal rows may repeat. Each copy is an
 * instance named by the (clock, origin) of the insert that made it; a delete
 * removes one named instance. Visible copies = instances added and not removed
 * (an observed-remove set), so concurrent deletes of one copy remove it once,
 * and any order of arrival gives the same count. Records are idempotent too.
 */
export type Instance = [hlc: number, origin: string];

export interface CountedState {
  live: Instance[];
  gone: Instance[];
}

const same = (a: Instance, b: Instance) => a[0] === b[0] && a[1] === b[1];

export function visibleCopies(s: CountedState): Instance[] {
  return s.live.filter((i) => !s.gone.some((g) => same(g, i))).sort((a, b) => a[0] - b[0] || (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0));
}

export function addInstance(s: CountedState, i: Instance): void {
  if (!s.live.some((x) => same(x, i))) s.live.push(i);
}

export function removeInstance(s: CountedState, i: Instance): void {
  if (!s.gone.some((x) => same(x, i))) s.gone.push(i);
}

export class CountedStateStore {
  private readonly getStmt: Statement;
  private readonly putStmt: Statement;

  constructor(db: Database) {
    this.getStmt = db.prepare("SELECT cols FROM _unisync_rows WHERE tbl = ? AND pk = ?");
    this.putStmt = db.prepare(
      "INSERT OR REPLACE INTO _unisync_rows(tbl, pk, hlc, origin, alive, base_hlc, base_origin, cols, dead) VALUES (?, ?, ?, ?, ?, 0, '', ?, NULL)",
    );
  }

  get(table: string, pk: Buffer): CountedState {
    const r = this.getStmt.get(table, pk) as { cols: string | null } | undefined;
    const parsed = r?.cols ? (JSON.parse(r.cols) as Partial<CountedState>) : {};
    return { live: parsed.live ?? [], gone: parsed.gone ?? [] };
  }

  put(table: string, pk: Buffer, s: CountedState, hlc: number, origin: string): void {
    this.putStmt.run(table, pk, hlc, origin, visibleCopies(s).length, JSON.stringify(s));
  }
}
