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
  lin_hlc: number | bigint | null;
  lin_origin: string | null;
  lin_epoch: number | bigint | null;
  refs: string | null;
  inc_hlc: number | bigint | null;
  inc_origin: string | null;
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

function decodeState(r: StateRow): RowState {
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
    lineage: r.lin_origin === null ? null : { hlc: Number(r.lin_hlc), origin: r.lin_origin, epoch: Number(r.lin_epoch ?? 1) },
    refs: r.refs ? (JSON.parse(r.refs) as Record<string, Stamp>) : null,
    incarnation: r.inc_origin === null ? null : { hlc: Number(r.inc_hlc), origin: r.inc_origin },
  };
}

export class RowStateStore {
  private readonly getStmt: Statement;
  private readonly putStmt: Statement;
  private readonly deleteStmt: Statement;
  private readonly insertNewStmt: Statement;
  private readonly deadReferringStmt: Statement;

  constructor(db: Database) {
    this.getStmt = db.prepare(
      "SELECT hlc, origin, alive, base_hlc, base_origin, cols, dead, lin_hlc, lin_origin, lin_epoch, refs, inc_hlc, inc_origin FROM _unisync_rows WHERE tbl = ? AND pk = ?",
    );
    this.putStmt = db.prepare(
      "INSERT OR REPLACE INTO _unisync_rows(tbl, pk, hlc, origin, alive, base_hlc, base_origin, cols, dead, lin_hlc, lin_origin, lin_epoch, refs, inc_hlc, inc_origin) " +
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    );
    this.deleteStmt = db.prepare("DELETE FROM _unisync_rows WHERE tbl = ? AND pk = ?");
    this.insertNewStmt = db.prepare(
      "INSERT INTO _unisync_rows(tbl, pk, hlc, origin, alive, base_hlc, base_origin, cols, dead, lin_hlc, lin_origin, lin_epoch, refs, inc_hlc, inc_origin) " +
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    );
    this.deadReferringStmt = db.prepare(
      "SELECT pk, hlc, origin, alive, base_hlc, base_origin, cols, dead, lin_hlc, lin_origin, lin_epoch, refs, inc_hlc, inc_origin FROM _unisync_rows " +
        "WHERE tbl = ? AND alive = 0 AND dead IS NOT NULL AND refs IS NOT NULL AND instr(refs, ?) > 0 AND instr(refs, ?) > 0",
    );
  }

  delete(table: string, pk: Buffer): void {
    this.deleteStmt.run(table, pk);
  }

  get(table: string, pk: Buffer): RowState | null {
    const r = this.getStmt.get(table, pk) as StateRow | undefined;
    return r ? decodeState(r) : null;
  }

  /**
   * Deleted rows of `table` whose kept references name `lineage` in some
   * column (the caller checks which, and the value kept). A lineage's move
   * (relocate.ts) asks, so that tombstones follow it as table rows do: a scan of
   * the table's states, prefiltered on the lineage's clock and origin in the stored text.
   */
  deadReferring(table: string, lineage: Stamp): { pk: Buffer; state: RowState }[] {
    const rows = this.deadReferringStmt.all(table, String(lineage.hlc), JSON.stringify(lineage.origin)) as (StateRow & { pk: Buffer })[];
    const out: { pk: Buffer; state: RowState }[] = [];
    for (const r of rows) {
      const state = decodeState(r);
      if (Object.values(state.refs ?? {}).some((ref) => ref.hlc === lineage.hlc && ref.origin === lineage.origin)) out.push({ pk: r.pk, state });
    }
    return out;
  }

  /** Serialised clocks of rows whose columns all share the base clock, by column list (the common case). */
  private readonly allBase = new Map<string, string>();

  put(table: string, pk: Buffer, s: RowState): void {
    this.putStmt.run(...this.columns(table, pk, s));
  }

  /**
   * Writes the state of a row that has none yet; false (nothing written) when it
   * has one. `allBase`: the caller knows s.cols holds these columns, all at the
   * base clock (a fresh insert), which spares reading them back out of s.cols.
   */
  insertNew(table: string, pk: Buffer, s: RowState, allBase?: readonly string[]): boolean {
    return this.insertNewStmt.run(...this.columns(table, pk, s, allBase)).changes === 1;
  }

  /** Serialised clocks of rows whose columns all share the base clock, by the record's column list. */
  private readonly allBaseByList = new WeakMap<readonly string[], string>();

  /** The _unisync_rows columns of a state, in the order put and insertNew bind them. */
  private columns(table: string, pk: Buffer, s: RowState, allBase?: readonly string[]): unknown[] {
    const entries = allBase ? [] : Object.entries(s.cols);
    let cols: string | null = null;
    if (allBase?.length) {
      cols = this.allBaseByList.get(allBase) ?? null;
      if (cols === null) {
        cols = JSON.stringify(Object.fromEntries(allBase.map((c) => [c, 0])));
        this.allBaseByList.set(allBase, cols);
      }
    } else if (entries.length > 0 && entries.every(([, st]) => st === null)) {
      const names = entries.map(([c]) => c).join("\u0000");
      cols = this.allBase.get(names) ?? null;
      if (cols === null) {
        cols = JSON.stringify(Object.fromEntries(entries.map(([c]) => [c, 0])));
        if (this.allBase.size < 1000) this.allBase.set(names, cols);
      }
    } else if (entries.length) cols = JSON.stringify(Object.fromEntries(entries.map(([c, st]) => [c, st ? [st.hlc, st.origin] : 0])));
    const refs = s.refs && Object.keys(s.refs).length ? JSON.stringify(s.refs) : null;
    return [
      table, pk, s.exists.hlc, s.exists.origin, s.alive ? 1 : 0, s.base.hlc, s.base.origin, cols,
      s.dead ? encodeDead(s.dead) : null, s.lineage?.hlc ?? null, s.lineage?.origin ?? null, s.lineage?.epoch ?? null, refs,
      s.incarnation?.hlc ?? null, s.incarnation?.origin ?? null,
    ];
  }
}
