/**
 * Rows that exist in a table but that no trigger has recorded: everything when
 * a database is enrolled, and whatever was written while a rebuilt table had no
 * triggers yet. They are recorded as inserts so that other nodes receive them.
 * Runs in small transactions after the triggers are in place, so the app keeps
 * writing meanwhile.
 */
import type { Database } from "better-sqlite3";
import { rowIdentity, type SqlValue } from "../log/value.js";
import type { BagStore } from "../replay/bag.js";
import type { RowStateStore } from "../replay/state.js";
import { quoteIdent } from "./schema.js";
import { CHANGE_INSERT, CHANGE_UPDATE, enrolmentMask, maskFor, type CaptureDef } from "./triggers.js";

const CHUNK = 2000;

/**
 * `sealPending` runs first inside each chunk's transaction: then the merge state
 * knows every change the triggers captured so far, and the chunk reads the table
 * in the same snapshot. Without it a copy the app inserted into a keyless table
 * just before the chunk would be recorded twice (a second copy everywhere).
 */
export function baselineTable(
  db: Database,
  def: CaptureDef,
  states: RowStateStore,
  bag: BagStore,
  sealPending: () => void,
  progress?: (rows: number) => void,
  /**
   * Also record rows the log has but with columns no record ever wrote: their
   * values are this database's own (a node's first enrolment, after the log was replayed in).
   */
  fillUnwritten = false,
): number {
  const { shape, capId } = def;
  const t = quoteIdent(shape.name);
  const cols = shape.columns.map(quoteIdent).join(", ");
  // Rowid order for rowid tables, key order for WITHOUT ROWID ones, so each chunk resumes after the last.
  const order = shape.withoutRowid ? shape.key.map(quoteIdent) : ["rowid"];
  const orderSql = order.join(", ");
  const after = order.length === 1 ? `${order[0]} > ?` : `(${orderSql}) > (${order.map(() => "?").join(", ")})`;
  const first = db.prepare(`SELECT ${orderSql}, ${cols} FROM ${t} ORDER BY ${orderSql} LIMIT ${CHUNK}`).raw(true).safeIntegers(true);
  const next = db.prepare(`SELECT ${orderSql}, ${cols} FROM ${t} WHERE ${after} ORDER BY ${orderSql} LIMIT ${CHUNK}`).raw(true).safeIntegers(true);
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
  let position: SqlValue[] | null = null;
  let recorded = 0;
  for (;;) {
    const chunk = db.transaction(() => {
      sealPending();
      const rows = (position ? next.all(...position) : first.all()) as SqlValue[][];
      for (const row of rows) {
        const values = row.slice(order.length);
        const copy = unrecorded(values);
        if (!copy) continue;
        record.run(capId, CHANGE_INSERT, Date.now(), enrolmentMask(copy), ...values);
        recorded++;
      }
      if (rows.length > 0) position = rows[rows.length - 1].slice(0, order.length);
      return rows.length;
    });
    const n = chunk.immediate();
    progress?.(recorded);
    if (n < CHUNK) break;
  }
  if (def.backfill.length) recorded += backfillColumns(db, def);
  db.prepare("UPDATE _unisync_capture SET baseline_done = 1 WHERE id = ?").run(capId);
  return recorded;
}

/**
 * A migration that adds a column and fills it in one transaction fires the old
 * triggers, which do not know the column: the values it set were never
 * recorded. Record them now as updates of the added columns, for every row
 * where one of them differs from its declared default.
 */
function backfillColumns(db: Database, def: CaptureDef): number {
  const { shape, capId } = def;
  const added = def.backfill.filter((c) => shape.columns.includes(c));
  if (added.length === 0) return 0;
  const differs = added.map((c) => `${quoteIdent(c)} IS NOT (${shape.defaults[c] ?? "NULL"})`).join(" OR ");
  const cols = shape.columns.map(quoteIdent).join(", ");
  const keys = shape.key.map(quoteIdent).join(", ");
  const n = shape.columns.length + shape.key.length;
  const record = db.prepare(
    `INSERT INTO _unisync_changes(cap, op, ms, mask, ${Array.from({ length: n }, (_, i) => `v${i}`).join(", ")}) ` +
      `SELECT ?, ?, ?, ?, ${cols}, ${keys} FROM ${quoteIdent(shape.name)} WHERE ${differs}`,
  );
  const mask = maskFor(shape.columns.length, added.map((c) => shape.columns.indexOf(c)));
  return db.transaction(() => record.run(capId, CHANGE_UPDATE, Date.now(), mask).changes).immediate();
}
