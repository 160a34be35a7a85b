/**
 * Rows that exist in a table but that no trigger has recorded: everything when
 * a database is enrolled, and whatever was written while a rebuilt table had no
 * triggers yet. They are recorded as enrolment inserts (values of unknown time,
 * merge.ts) so that other nodes receive them. Runs in short write transactions
 * after the triggers are in place, so the app keeps writing meanwhile.
 */
import type { Database } from "better-sqlite3";
import { rowIdentity, type SqlValue } from "../log/value.js";
import type { BagStore } from "../merge/bag.js";
import type { RowStateStore } from "../merge/state.js";
import { deadline } from "../db/writes.js";
import { quoteIdent, type TableShape } from "../db/schema.js";
import { CHANGE_INSERT, CHANGE_UPDATE, enrolmentMask, maskFor, type CaptureDef } from "./triggers.js";

const CHUNK = 2000;

/**
 * Records the table's rows that the merge state does not have, in short turns
 * (scanInTurns). `sealPending` runs first in each turn: rows are read only once
 * the merge state knows every change the triggers captured so far, in the same
 * snapshot. Without it a copy the app inserted into a keyless table just before
 * the turn would be recorded twice (a second copy everywhere).
 */
export function baselineTable(
  db: Database,
  def: CaptureDef,
  states: RowStateStore,
  bag: BagStore,
  /** Seals captured changes, within the time budget; true when none are left. */
  sealPending: () => boolean,
  write: Write,
  progress?: (rows: number) => void,
  /**
   * Also record rows the log has but with columns no record ever wrote: their
   * values are this database's own (a node's first enrolment, after the log was replayed in).
   */
  fillUnwritten = false,
): number {
  const { shape, capId } = def;
  const slots = shape.columns.map((_, i) => `v${i}`).join(", ");
  const record = db.prepare(
    `INSERT INTO _unisync_changes(cap, op, ms, mask, ${slots}) VALUES (?, ?, ?, ?, ${shape.columns.map(() => "?").join(", ")})`,
  );
  const keyIdx = shape.key.map((k) => shape.columns.indexOf(k));
  // Tables without a key may hold equal rows: record the copies beyond the counted ones.
  // (Held per scan; such tables are usually small.)
  const copiesSeen = new Map<string, number>();
  /** The copy number to record the row under, or 0 when the state has it already. */
  const unrecorded = (values: SqlValue[]): number => {
    if (shape.hasDeclaredKey) {
      const state = states.get(shape.name, rowIdentity(keyIdx.map((i) => values[i]), false));
      if (!state?.alive) return 1;
      return fillUnwritten && shape.columns.some((c) => !(c in state.cols)) ? 1 : 0;
    }
    const id = rowIdentity(values, true).toString("base64");
    const nth = (copiesSeen.get(id) ?? 0) + 1;
    copiesSeen.set(id, nth);
    return nth > bag.liveCopies(shape.name, values) ? nth : 0;
  };
  let recorded = 0;
  // The merge state must know every change captured so far before rows are read (a
  // copy the app just inserted into a keyless table would be recorded twice).
  scanInTurns(db, shape, null, write, sealPending, (values) => {
    const copy = unrecorded(values);
    if (!copy) return;
    record.run(capId, CHANGE_INSERT, Date.now(), enrolmentMask(copy), ...values);
    recorded++;
  }, () => progress?.(recorded));
  if (def.backfill.length) recorded += backfillColumns(db, def, write);
  db.prepare("UPDATE _unisync_capture SET baseline_done = 1 WHERE id = ?").run(capId);
  return recorded;
}

/**
 * Records every row of a table as a plain insert of this node, in the caller's
 * transaction: the one that installs the triggers of a database the app has
 * just created (DbSync rowsAreNew). Ahead of anything the triggers capture
 * from then on, so a row the app adds later finds its parent's lineage. The
 * table is young and small; one statement reads it.
 */
export function recordRowsAsNew(db: Database, def: CaptureDef): number {
  const { shape, capId } = def;
  const slots = shape.columns.map((_, i) => `v${i}`).join(", ");
  const order = shape.withoutRowid ? shape.key.map(quoteIdent).join(", ") : "rowid";
  const n = db
    .prepare(`INSERT INTO _unisync_changes(cap, op, ms, mask, ${slots}) SELECT ?, ?, ?, NULL, ${shape.columns.map(quoteIdent).join(", ")} FROM ${quoteIdent(shape.name)} ORDER BY ${order}`)
    .run(capId, CHANGE_INSERT, Date.now()).changes;
  db.prepare("UPDATE _unisync_capture SET baseline_done = 1 WHERE id = ?").run(capId);
  return n;
}

/** Runs `fn` in one write transaction of the agent, timed (src/db/writes.ts). */
export type Write = <T>(what: string, fn: () => T) => T;

/**
 * Visits every row of a table (matching `where`, SQL over its columns) in key
 * order, in turns: each turn is one write transaction that first runs `first`
 * (which says whether to go on to rows in this turn), then visits rows until its
 * time budget or CHUNK rows, so the app gets its write lock between turns (and
 * the next turn resumes after the last row seen).
 */
function scanInTurns(db: Database, shape: TableShape, where: string | null, write: Write, first: () => boolean, visit: (values: SqlValue[]) => void, afterTurn: () => void): void {
  const t = quoteIdent(shape.name);
  const cols = shape.columns.map(quoteIdent).join(", ");
  // Rowid order for rowid tables, key order for WITHOUT ROWID ones.
  const order = shape.withoutRowid ? shape.key.map(quoteIdent) : ["rowid"];
  const orderSql = order.join(", ");
  const after = order.length === 1 ? `${order[0]} > ?` : `(${orderSql}) > (${order.map(() => "?").join(", ")})`;
  const filter = where ? ` AND (${where})` : "";
  const firstTurn = db.prepare(`SELECT ${orderSql}, ${cols} FROM ${t} WHERE 1${filter} ORDER BY ${orderSql} LIMIT ${CHUNK}`).raw(true).safeIntegers(true);
  const nextTurn = db.prepare(`SELECT ${orderSql}, ${cols} FROM ${t} WHERE ${after}${filter} ORDER BY ${orderSql} LIMIT ${CHUNK}`).raw(true).safeIntegers(true);
  let position: SqlValue[] | null = null;
  for (;;) {
    const more = write("recording existing rows", () => {
      const until = deadline();
      if (!first()) return true;
      const rows = (position ? nextTurn.all(...position) : firstTurn.all()) as SqlValue[][];
      for (const [i, row] of rows.entries()) {
        visit(row.slice(order.length));
        position = row.slice(0, order.length);
        // The next turn starts after `position` (rows read but not visited are read again).
        if (i % 64 === 63 && until.passed()) return true;
      }
      return rows.length === CHUNK;
    });
    afterTurn();
    if (!more) break;
  }
}

/**
 * A migration that adds a column and fills it in one transaction fires the old
 * triggers, which do not know the column: the values it set were never
 * recorded. Record them now as updates of the added columns, for every row
 * where one of them differs from its declared default.
 */
function backfillColumns(db: Database, def: CaptureDef, write: Write): number {
  const { shape, capId } = def;
  const added = def.backfill.filter((c) => shape.columns.includes(c));
  if (added.length === 0) return 0;
  const differs = added.map((c) => `${quoteIdent(c)} IS NOT (${shape.defaults[c] ?? "NULL"})`).join(" OR ");
  const n = shape.columns.length + shape.key.length;
  const record = db.prepare(
    `INSERT INTO _unisync_changes(cap, op, ms, mask, ${Array.from({ length: n }, (_, i) => `v${i}`).join(", ")}) VALUES (?, ?, ?, ?, ${Array.from({ length: n }, () => "?").join(", ")})`,
  );
  const mask = maskFor(shape.columns.length, added.map((c) => shape.columns.indexOf(c)));
  const keyIdx = shape.key.map((k) => shape.columns.indexOf(k));
  let recorded = 0;
  scanInTurns(db, shape, differs, write, () => true, (values) => {
    record.run(capId, CHANGE_UPDATE, Date.now(), mask, ...values, ...keyIdx.map((i) => values[i]));
    recorded++;
  }, () => undefined);
  return recorded;
}
