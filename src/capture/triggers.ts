/**
 * Generated capture triggers. They run inside the app's own SQLite library
 * (often older than ours), so they use only SQL that SQLite 3.31 has: no JSON
 * functions (they round REAL and refuse BLOB), no RETURNING, no UPSERT.
 * Values are copied as-is into untyped columns, which keeps their exact class.
 */
import type { Database } from "better-sqlite3";
import { ensureChangeWidth, REPLAY_GUARD } from "../db/internal.js";
import { quoteIdent, type TableShape } from "../db/schema.js";

export const CHANGE_INSERT = 1;
export const CHANGE_UPDATE = 2;
export const CHANGE_DELETE = 3;
/**
 * Written by the agent, not a trigger: a deleted row brought back to keep a
 * foreign key satisfied (replay/references.ts). Logged as an UPDATE that writes
 * no column: it only says the row exists again, so it never overrides a value.
 */
export const CHANGE_REVIVE = 4;

/**
 * The mask of an insert recorded by the enrolment pass (baseline.ts), not by a
 * trigger: minus the copy number (tables without a key may hold equal rows,
 * each enrolled copy is named by its values and its number).
 */
export const enrolmentMask = (copy = 1): bigint => BigInt(-copy);

/** The copy number of an enrolment insert, or null for a trigger's change. */
export function enrolmentCopy(mask: unknown): number | null {
  const m = typeof mask === "bigint" ? mask : typeof mask === "number" ? BigInt(mask) : null;
  return m !== null && m < 0n ? Number(-m) : null;
}

/** Above this many columns the changed-column mask is a text of 0/1 instead of an integer. */
const MAX_INT_MASK_COLUMNS = 62;

/** Wall-clock milliseconds, computed by the app's SQLite at the time of its write. */
const NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

function changedMaskSql(shape: TableShape): string {
  const columns = shape.columns;
  const signed = new Set(shape.keepsSignedZero);
  // "IS NOT" alone treats 1 and 1.0 as equal; the typeof test keeps a class change visible.
  // No SQL tells -0.0 from 0.0, and a BLOB-affinity column keeps the sign: writing a zero
  // over a zero there counts as a change (at worst a needless write, never a divergence).
  const differs = (c: string) => {
    const o = `OLD.${quoteIdent(c)}`;
    const n = `NEW.${quoteIdent(c)}`;
    const zero = signed.has(c) ? ` OR (typeof(${o}) = 'real' AND typeof(${n}) = 'real' AND ${n} = 0)` : "";
    return `(${o} IS NOT ${n} OR typeof(${o}) <> typeof(${n})${zero})`;
  };
  if (columns.length <= MAX_INT_MASK_COLUMNS) {
    return columns.map((c, i) => `(CASE WHEN ${differs(c)} THEN ${(1n << BigInt(i)).toString()} ELSE 0 END)`).join(" + ");
  }
  return columns.map((c) => `(CASE WHEN ${differs(c)} THEN '1' ELSE '0' END)`).join(" || ");
}

/** The mask value a trigger would compute when exactly `changed` (indexes) differ. */
export function maskFor(columnCount: number, changed: number[]): bigint | string {
  if (columnCount <= MAX_INT_MASK_COLUMNS) return changed.reduce((m, i) => m | (1n << BigInt(i)), 0n);
  return Array.from({ length: columnCount }, (_, i) => (changed.includes(i) ? "1" : "0")).join("");
}

export function maskHasColumn(mask: unknown, index: number): boolean {
  if (typeof mask === "string") return mask[index] === "1";
  if (typeof mask === "bigint") return ((mask >> BigInt(index)) & 1n) === 1n;
  if (typeof mask === "number") return Math.floor(mask / 2 ** index) % 2 === 1;
  return true;
}

export function triggerNames(table: string): { insert: string; update: string; delete: string } {
  return { insert: `_unisync_ins_${table}`, update: `_unisync_upd_${table}`, delete: `_unisync_del_${table}` };
}

/** The three CREATE TRIGGER statements for one generation (capId) of a table's shape. */
export function triggerSql(shape: TableShape, capId: number): { name: string; sql: string }[] {
  const t = quoteIdent(shape.name);
  const names = triggerNames(shape.name);
  const guard = `WHEN ${REPLAY_GUARD}`;
  const slots = (n: number) => Array.from({ length: n }, (_, i) => `v${i}`).join(", ");
  const refs = (prefix: string, cols: string[]) => cols.map((c) => `${prefix}.${quoteIdent(c)}`).join(", ");
  const n = shape.columns.length;
  const make = (name: string, event: string, op: number, mask: string, values: string, width: number) => ({
    name,
    sql:
      `CREATE TRIGGER ${quoteIdent(name)} AFTER ${event} ON ${t} ${guard} BEGIN ` +
      `INSERT INTO _unisync_changes(cap, op, ms, mask, ${slots(width)}) ` +
      `VALUES (${capId}, ${op}, ${NOW_MS}, ${mask}, ${values}); END`,
  });
  return [
    make(names.insert, "INSERT", CHANGE_INSERT, "NULL", refs("NEW", shape.columns), n),
    make(
      names.update,
      "UPDATE",
      CHANGE_UPDATE,
      changedMaskSql(shape),
      `${refs("NEW", shape.columns)}, ${refs("OLD", shape.key)}`,
      n + shape.key.length,
    ),
    make(names.delete, "DELETE", CHANGE_DELETE, "NULL", refs("OLD", shape.columns), n),
  ];
}

export interface CaptureDef {
  capId: number;
  shape: TableShape;
  /** True when the triggers were missing (new table, rebuilt table, first run): rows need a baseline. */
  needsBaseline: boolean;
  /** Columns added since the previous generation, to record where a migration set them. */
  backfill: string[];
  /** The previous generation's columns, when this call made a new generation over one. */
  previousColumns: string[] | null;
}

interface CaptureRow {
  id: number;
  columns: string;
  key: string;
  baseline_done: number;
  backfill: string | null;
}

/**
 * Makes the triggers of every table match its current shape. Must run inside a
 * write transaction. Returns the capture generation of every table.
 */
export function installTriggers(db: Database, shapes: TableShape[], nowMs: number): CaptureDef[] {
  const defs: CaptureDef[] = [];
  const existing = new Map(
    (db.prepare("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE '\\_unisync\\_%' ESCAPE '\\'").all() as { name: string; sql: string }[]).map(
      (r) => [r.name, r.sql],
    ),
  );
  for (const shape of shapes) {
    const columns = JSON.stringify(shape.columns);
    const key = JSON.stringify(shape.key);
    let cap = db
      .prepare("SELECT id, columns, key, baseline_done, backfill FROM _unisync_capture WHERE tbl = ? ORDER BY id DESC LIMIT 1")
      .get(shape.name) as CaptureRow | undefined;
    let previousColumns: string[] | null = null;
    if (!cap || cap.columns !== columns || cap.key !== key) {
      const before = cap ? (JSON.parse(cap.columns) as string[]) : null;
      previousColumns = before;
      const added = before ? shape.columns.filter((c) => !before.includes(c)) : [];
      const backfill = added.length ? JSON.stringify(added) : null;
      const id = Number(
        db
          .prepare("INSERT INTO _unisync_capture(tbl, columns, key, baseline_done, created_ms, backfill) VALUES (?, ?, ?, 0, ?, ?)")
          .run(shape.name, columns, key, nowMs, backfill).lastInsertRowid,
      );
      cap = { id, columns, key, baseline_done: 0, backfill };
    }
    const wanted = triggerSql(shape, cap.id);
    const anyMissing = wanted.some((w) => !existing.has(w.name));
    if (anyMissing && cap.baseline_done) {
      // The triggers vanished under an unchanged shape: the table was rebuilt or
      // recreated, so writes may have happened that no trigger saw.
      db.prepare("UPDATE _unisync_capture SET baseline_done = 0 WHERE id = ?").run(cap.id);
      cap.baseline_done = 0;
    }
    ensureChangeWidth(db, shape.columns.length + shape.key.length);
    for (const w of wanted) {
      if (existing.get(w.name) === w.sql) continue;
      db.exec(`DROP TRIGGER IF EXISTS ${quoteIdent(w.name)}`);
      db.exec(w.sql);
    }
    defs.push({ capId: cap.id, shape, needsBaseline: cap.baseline_done === 0, backfill: cap.backfill ? (JSON.parse(cap.backfill) as string[]) : [], previousColumns });
  }
  return defs;
}
