/**
 * unisync's own tables inside each synced database. They live in the app's file
 * so that capture, stamping, sealing and replay commit atomically with the app's
 * data. All are named _unisync_* and are never synced.
 */
import type { Database, Statement } from "better-sqlite3";
import { getMeta, setMeta } from "./meta.js";
import { quoteIdent } from "./schema.js";

export const INTERNAL_DDL = `
CREATE TABLE IF NOT EXISTS _unisync_meta(k TEXT PRIMARY KEY, v);
-- Holds one row while the agent applies remote changes: the triggers see it and
-- stay silent, so a replayed change is never captured again (no loops).
CREATE TABLE IF NOT EXISTS _unisync_applying(x);
-- The app's triggers that write synced tables, as the app wrote them: they were given
-- our guard so replay does not fire them again (capture/apptriggers.ts); forget restores them.
CREATE TABLE IF NOT EXISTS _unisync_app_triggers(name TEXT PRIMARY KEY, sql TEXT NOT NULL);
-- One row per generation of a table's triggers: the column list its changes use.
CREATE TABLE IF NOT EXISTS _unisync_capture(
  id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, columns TEXT NOT NULL, key TEXT NOT NULL,
  baseline_done INTEGER NOT NULL DEFAULT 0, created_ms INTEGER,
  -- Columns added since the previous generation (JSON), whose values a migration
  -- may have set before these triggers existed: recorded by the baseline pass.
  backfill TEXT);
-- Changes written by the triggers in the app's own transaction. Value columns
-- v0..vN are declared without a type so values keep their storage class and bits.
CREATE TABLE IF NOT EXISTS _unisync_changes(
  id INTEGER PRIMARY KEY, cap INTEGER NOT NULL, op INTEGER NOT NULL, ms INTEGER, mask);
-- Merge state per row: existence clock, clocks of columns written since the
-- last full write, the values of a deleted row (so a newer update can revive it),
-- the row's lineage and references (id collisions) and its incarnation (merge.ts).
CREATE TABLE IF NOT EXISTS _unisync_rows(
  tbl TEXT NOT NULL, pk BLOB NOT NULL, hlc INTEGER NOT NULL, origin TEXT NOT NULL,
  alive INTEGER NOT NULL, base_hlc INTEGER NOT NULL, base_origin TEXT NOT NULL,
  cols TEXT, dead BLOB, lin_hlc INTEGER, lin_origin TEXT, lin_epoch INTEGER, refs TEXT,
  inc_hlc INTEGER, inc_origin TEXT, PRIMARY KEY(tbl, pk)) WITHOUT ROWID;
-- Rows moved by an id collision (src/merge/relocate.ts): where each losing
-- lineage lives now, the key it was created at, and the lineage that kept it.
CREATE TABLE IF NOT EXISTS _unisync_moves(
  tbl TEXT NOT NULL, lin_hlc INTEGER NOT NULL, lin_origin TEXT NOT NULL, born_key NOT NULL, key NOT NULL,
  from_key NOT NULL, winner_hlc INTEGER NOT NULL, winner_origin TEXT NOT NULL, moved_ms INTEGER NOT NULL,
  -- 0 when only a deleted row's tombstone moved (an id reused after a delete).
  live INTEGER NOT NULL,
  -- 0 while the rows pointing at the moved one still wait to follow it.
  followed INTEGER NOT NULL,
  PRIMARY KEY(tbl, lin_hlc, lin_origin)) WITHOUT ROWID;
-- Rows of tables without a declared key: one entry per copy ("instance", named
-- by its insert's clock and origin) with its current values and their clock.
CREATE TABLE IF NOT EXISTS _unisync_bag(
  tbl TEXT NOT NULL, inst BLOB NOT NULL, vid BLOB NOT NULL, vals BLOB NOT NULL,
  hlc INTEGER NOT NULL, origin TEXT NOT NULL, alive INTEGER NOT NULL, refs TEXT, PRIMARY KEY(tbl, inst)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS _unisync_bag_vid ON _unisync_bag(tbl, vid, alive);
-- Rows set aside because they clash on a UNIQUE constraint with a row created
-- earlier (src/replay/apply.ts): every node keeps the same one; these wait here,
-- with their values, for an operator (\`unisync conflicts\`).
CREATE TABLE IF NOT EXISTS _unisync_conflicts(
  tbl TEXT NOT NULL, row_key BLOB NOT NULL, kept_key BLOB NOT NULL, vals BLOB NOT NULL, detected_ms INTEGER NOT NULL,
  PRIMARY KEY(tbl, row_key)) WITHOUT ROWID;
-- Rows enrolled by each origin (there before unisync: values of unknown time)
-- that this node received, per table, and what they did here (replay/enrolments.ts).
CREATE TABLE IF NOT EXISTS _unisync_enrolments(
  origin TEXT NOT NULL, tbl TEXT NOT NULL, rows INTEGER NOT NULL, added INTEGER NOT NULL, same INTEGER NOT NULL,
  differed INTEGER NOT NULL, older INTEGER NOT NULL, first_hlc INTEGER NOT NULL, last_hlc INTEGER NOT NULL,
  PRIMARY KEY(origin, tbl)) WITHOUT ROWID;
-- Columns two nodes held differently under one key before enrolment (diverged
-- copies), with the value kept (the earlier enrolment's) and the other one.
CREATE TABLE IF NOT EXISTS _unisync_enrol_diffs(
  tbl TEXT NOT NULL, row_key BLOB NOT NULL, col TEXT NOT NULL, kept_origin TEXT NOT NULL, kept_value BLOB,
  other_origin TEXT NOT NULL, other_value BLOB, detected_ms INTEGER NOT NULL,
  PRIMARY KEY(tbl, row_key, col, other_origin)) WITHOUT ROWID;
-- Rows the app changed while its database waited to be enrolled, before the log
-- reached them: enrolled as they are once the log is in (DbSync.finishEnrolment).
CREATE TABLE IF NOT EXISTS _unisync_enrol_touched(tbl TEXT NOT NULL, row_key BLOB NOT NULL, PRIMARY KEY(tbl, row_key)) WITHOUT ROWID;
-- Why the agent made a change itself (a foreign-key repair): logged with it.
CREATE TABLE IF NOT EXISTS _unisync_notes(change_id INTEGER PRIMARY KEY, note TEXT NOT NULL);
-- Parent keys whose references must be checked once every origin's last
-- applied segment ends a whole transaction (replay/references.ts): a parent
-- deleted, or a child written, by replay.
CREATE TABLE IF NOT EXISTS _unisync_refcheck(tbl TEXT NOT NULL, col TEXT NOT NULL, val, PRIMARY KEY(tbl, col, val));
-- Foreign keys the agent repaired: a parent kept alive for a child written
-- concurrently with its delete, or the child changed by the declared ON DELETE action.
CREATE TABLE IF NOT EXISTS _unisync_repairs(
  id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, row_key BLOB NOT NULL, action TEXT NOT NULL,
  child_tbl TEXT NOT NULL, child_key BLOB NOT NULL, detected_ms INTEGER NOT NULL);
-- Sealed segments waiting for upload. A retry uploads exactly these bytes.
CREATE TABLE IF NOT EXISTS _unisync_outbox(
  seq INTEGER PRIMARY KEY, key TEXT NOT NULL, bytes BLOB NOT NULL, records INTEGER NOT NULL, sealed_ms INTEGER);
-- Last segment applied from each origin; advanced in the transaction that applies it.
-- open = 1: that segment ended part way through an app transaction (it continues),
-- or the next one is applied up to record idx (long segments are applied in turns).
CREATE TABLE IF NOT EXISTS _unisync_cursors(
  origin TEXT PRIMARY KEY, seq INTEGER NOT NULL, key TEXT NOT NULL, applied_ms INTEGER, last_hlc INTEGER,
  open INTEGER NOT NULL DEFAULT 0, idx INTEGER NOT NULL DEFAULT 0);
-- Records that could not be applied yet (unknown table or column, constraint
-- failure); retried after every schema change. kind is why, as code reads it
-- (replay/apply.ts ParkKind: schema, row, clock, malformed, write); reason is for people.
CREATE TABLE IF NOT EXISTS _unisync_parked(
  id INTEGER PRIMARY KEY, origin TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL,
  tbl TEXT, reason TEXT NOT NULL, hlc INTEGER NOT NULL, record BLOB NOT NULL, parked_ms INTEGER,
  kind TEXT NOT NULL DEFAULT 'write',
  UNIQUE(origin, seq, idx));
`;

export function ensureInternalTables(db: Database): void {
  db.exec(INTERNAL_DDL);
  // Databases enrolled before lineages existed get the columns (NULL: no lineage).
  const rowCols = new Set((db.prepare("PRAGMA main.table_info(_unisync_rows)").all() as { name: string }[]).map((c) => c.name));
  for (const [c, type] of [["lin_hlc", "INTEGER"], ["lin_origin", "TEXT"], ["lin_epoch", "INTEGER"], ["refs", "TEXT"], ["inc_hlc", "INTEGER"], ["inc_origin", "TEXT"]]) {
    if (!rowCols.has(c)) db.exec(`ALTER TABLE _unisync_rows ADD COLUMN ${c} ${type}`);
  }
  const bagCols = new Set((db.prepare("PRAGMA main.table_info(_unisync_bag)").all() as { name: string }[]).map((c) => c.name));
  // Copies recorded before they kept references: NULL (they do not follow a move).
  if (!bagCols.has("refs")) db.exec("ALTER TABLE _unisync_bag ADD COLUMN refs TEXT");
  const cursorCols = new Set((db.prepare("PRAGMA main.table_info(_unisync_cursors)").all() as { name: string }[]).map((c) => c.name));
  if (!cursorCols.has("open")) db.exec("ALTER TABLE _unisync_cursors ADD COLUMN open INTEGER NOT NULL DEFAULT 0");
  if (!cursorCols.has("idx")) db.exec("ALTER TABLE _unisync_cursors ADD COLUMN idx INTEGER NOT NULL DEFAULT 0");
  const parkedCols = new Set((db.prepare("PRAGMA main.table_info(_unisync_parked)").all() as { name: string }[]).map((c) => c.name));
  if (!parkedCols.has("kind")) {
    // Records parked before kinds existed: the kind is read once from the reason they were parked with.
    db.transaction(() => {
      db.exec("ALTER TABLE _unisync_parked ADD COLUMN kind TEXT NOT NULL DEFAULT 'write'");
      db.exec(`UPDATE _unisync_parked SET kind = CASE
        WHEN reason LIKE 'waiting for the row%' THEN 'row'
        WHEN reason LIKE 'clock of origin % ahead of ours%' THEN 'clock'
        WHEN reason LIKE 'table % does not exist here (yet)' OR reason LIKE 'column(s) % do not exist here (yet)' THEN 'schema'
        WHEN reason LIKE 'unknown operation %' OR reason IN ('column and value counts differ', 'row key is not among the columns')
          OR reason LIKE 'key % of % is not an integer' THEN 'malformed'
        ELSE 'write' END`);
    })();
  }
}

/** True outside the agent's apply transactions: the WHEN of our triggers, and of the app's that replay must not fire (capture/apptriggers.ts). */
export const REPLAY_GUARD = "NOT EXISTS (SELECT 1 FROM _unisync_applying)";

/**
 * Runs `fn` with our triggers silenced (a row in _unisync_applying), so that what
 * it writes to the app's tables is not captured again: replay, and the moves and
 * restores the merge rules make. Nests: an inner call inside a silenced one just runs.
 */
export function silenced<T>(db: Database, fn: () => T): T {
  if (db.prepare("SELECT 1 FROM _unisync_applying").get()) return fn();
  db.prepare("INSERT INTO _unisync_applying(x) VALUES (1)").run();
  try {
    return fn();
  } finally {
    db.prepare("DELETE FROM _unisync_applying").run();
  }
}

/**
 * Records a change the agent made itself (inside a silenced write, so no
 * trigger saw it), to be drained and logged like the app's: `values` in the
 * columns of capture generation `capId`, `oldKey` for an UPDATE, and why.
 */
export function recordAgentChange(db: Database, capId: number, op: number, values: unknown[], mask: unknown, oldKey: unknown[], note: string): void {
  const slots = [...values, ...oldKey];
  const names = slots.map((_, i) => `v${i}`).join(", ");
  const id = db
    .prepare(`INSERT INTO _unisync_changes(cap, op, ms, mask${slots.length ? `, ${names}` : ""}) VALUES (?, ?, ?, ?${slots.map(() => ", ?").join("")})`)
    .run(capId, op, Date.now(), mask, ...slots).lastInsertRowid;
  db.prepare("INSERT INTO _unisync_notes(change_id, note) VALUES (?, ?)").run(id, note);
}

/** Number of value columns (v0..vN-1) the changes table has now. */
export function changeWidth(db: Database): number {
  const cols = db.prepare("PRAGMA main.table_info(_unisync_changes)").all() as { name: string }[];
  return cols.filter((c) => /^v\d+$/.test(c.name)).length;
}

/** Widens the changes table so a trigger can write `needed` values. */
export function ensureChangeWidth(db: Database, needed: number): void {
  for (let i = changeWidth(db); i < needed; i++) db.exec(`ALTER TABLE _unisync_changes ADD COLUMN v${i}`);
}

/**
 * A prepared statement per SQL text, made once: preparing is far dearer than
 * running, and per-file bookkeeping runs the same few statements thousands of times.
 */
export function statementCache(db: Database): (sql: string) => Statement {
  const cache = new Map<string, Statement>();
  return (sql) => {
    let s = cache.get(sql);
    if (!s) {
      s = db.prepare(sql);
      cache.set(sql, s);
    }
    return s;
  };
}

/**
 * Removes everything unisync keeps in a database (its `_unisync_*` tables and
 * triggers), leaving the app's tables as they are: the file is then a plain
 * copy, enrolled afresh by the next agent that meets it.
 */
export function forgetUnisync(db: Database): number {
  const ours = db.prepare("SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'table') AND name LIKE '\\_unisync\\_%' ESCAPE '\\' ORDER BY type = 'table'").all() as { type: string; name: string }[];
  db.transaction(() => {
    // The app's own triggers as it wrote them: the guard we added names a table dropped below.
    const guarded = db.prepare("SELECT 1 FROM sqlite_master WHERE name = '_unisync_app_triggers'").get()
      ? (db.prepare("SELECT t.name, t.sql FROM _unisync_app_triggers t JOIN sqlite_master m ON m.type = 'trigger' AND m.name = t.name AND m.sql LIKE '%\\_unisync\\_applying%' ESCAPE '\\'").all() as { name: string; sql: string }[])
      : [];
    for (const t of guarded) {
      db.exec(`DROP TRIGGER ${quoteIdent(t.name)}`);
      db.exec(t.sql);
    }
    for (const o of ours) db.exec(`DROP ${o.type.toUpperCase()} IF EXISTS ${quoteIdent(o.name)}`);
  }).immediate();
  return ours.length;
}

/** A state file enrolled under another node name than this agent's. */
export class NodeIdentityError extends Error {
  readonly code = "NODE_IDENTITY";
}

/**
 * Enrols `db` (whose file is `path`) under `node` the first time, and refuses it
 * afterwards for any other node name: its seqs and clocks belong to that node.
 * Returns true the first time.
 */
export function claimForNode(db: Database, path: string, node: string): boolean {
  const enrolledAs = getMeta(db, "node");
  if (enrolledAs === undefined) {
    setMeta(db, "node", node);
    return true;
  }
  if (enrolledAs === node) return false;
  throw new NodeIdentityError(
    `${path} belongs to node "${String(enrolledAs)}" but this agent runs as "${node}". ` +
      `Run with --node ${String(enrolledAs)}, or, if this file was copied from another node, stop the agent and run ` +
      `"unisync forget INSTANCE_DIR --db FILE" to enrol it afresh as a copy (the cluster's log is replayed into it first).`,
  );
}
