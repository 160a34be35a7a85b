/**
 * What the merge rules resolved in one database, for an operator to review
 * (`unisync conflicts`, `unisync status`, the console): rows moved by an id collision (two nodes created
 * different rows with the same id), rows set aside by a unique clash (two
 * nodes created rows with the same unique values), and records parked.
 */
import Database from "better-sqlite3";
import { hlcToIso } from "../log/hlc.js";
import { quoteIdent } from "../db/schema.js";
import { decodeValues, rowIdentity, showValue, type SqlValue } from "../log/value.js";

export interface MoveReport {
  table: string;
  from: string;
  to: string;
  /** The node and time that created the moved row. */
  createdBy: string;
  createdAt: string | null;
  /** The node whose row holds the old id now ("(a row there before unisync)" for enrolled rows). */
  keptBy: string;
  movedAt: string;
}

export interface SetAsideReport {
  table: string;
  key: string[];
  keptKey: string[];
  /** The row set aside (its values when it was set aside). */
  values: Record<string, string>;
  /** The row that kept the clashing values, as it is now (null: gone, or a table without a declared key). */
  kept: Record<string, string> | null;
  detectedAt: string;
}

/** A row by its declared primary key, every column shown; null when there is none. */
function rowByKey(db: Database.Database, table: string, key: SqlValue[]): Record<string, string> | null {
  const cols = (db.prepare(`PRAGMA table_info(${quoteIdent(table)})`).all() as { name: string; pk: number | bigint }[])
    .filter((c) => Number(c.pk) > 0)
    .sort((a, b) => Number(a.pk) - Number(b.pk))
    .map((c) => c.name);
  if (cols.length === 0 || cols.length !== key.length) return null;
  // Safe integers whatever the connection's default (the console reads through the agent's): 7 stays 7, not 7.0.
  const row = db
    .prepare(`SELECT * FROM ${quoteIdent(table)} WHERE ${cols.map((c) => `${quoteIdent(c)} IS ?`).join(" AND ")}`)
    .safeIntegers(true)
    .get(...key) as Record<string, SqlValue> | undefined;
  return row ? Object.fromEntries(Object.entries(row).map(([k, v]) => [k, showValue(v)])) : null;
}

export interface RepairReport {
  table: string;
  key: string[];
  action: string;
  child: string;
  childKey: string[];
  at: string;
}

export interface EnrolmentDifferenceReport {
  table: string;
  key: string[];
  column: string;
  kept: { node: string; value: string };
  other: { node: string; value: string };
}

export interface ConflictReport {
  stream: string;
  moved: MoveReport[];
  setAside: SetAsideReport[];
  repaired: RepairReport[];
  enrolmentDifferences: EnrolmentDifferenceReport[];
  parked: number;
  /** How many there are of each: the lists above stop at the limit. */
  totals: { moved: number; setAside: number; repaired: number; enrolmentDifferences: number };
}

const createdAt = (hlc: number) => (hlc > 0 ? hlcToIso(hlc) : null);
/** Lineages recorded at enrolment have hlc 0 and a content name: say so. */
const createdBy = (origin: string) => (origin.startsWith("#") ? "(a row there before unisync)" : origin);

const hasTable = (db: Database.Database, t: string) => !!db.prepare("SELECT 1 FROM sqlite_master WHERE name = ?").get(t);

/** How many rows were moved and are set aside in one enrolled database. */
export function conflictCounts(db: Database.Database): { moved: number; setAside: number } {
  const { totals } = readConflicts(db, "", 0);
  return { moved: totals.moved, setAside: totals.setAside };
}

/** Conflict details of one enrolled database (opened read-only): at most `limit` of each kind, and how many there are. */
export function readConflicts(db: Database.Database, stream: string, limit = 1000): ConflictReport {
  const has = (t: string) => hasTable(db, t);
  const count = (t: string) => (has(t) ? Number((db.prepare(`SELECT count(*) AS n FROM ${t}`).get() as { n: number | bigint }).n) : 0);
  let movedTotal = 0;
  // A move is shown while its row exists: rows deleted since (or moved only as a
  // tombstone) are history, which \`unisync log\` shows.
  const moved: MoveReport[] = [];
  if (has("_unisync_moves")) {
    const moves = db.prepare("SELECT tbl, lin_hlc, lin_origin, from_key, key, moved_ms FROM _unisync_moves ORDER BY moved_ms").all() as {
      tbl: string; lin_hlc: number | bigint; lin_origin: string; from_key: SqlValue; key: SqlValue; moved_ms: number | bigint;
    }[];
    const occupant = db.prepare("SELECT lin_origin FROM _unisync_rows WHERE tbl = ? AND pk = ?").pluck(true);
    for (const m of moves) {
      if (!db.prepare(`SELECT 1 FROM ${quoteIdent(m.tbl)} WHERE rowid = ?`).get(m.key)) continue;
      if (++movedTotal > limit) continue;
      const keeper = occupant.get(m.tbl, rowIdentity([m.from_key], false)) as string | undefined;
      moved.push({
        table: m.tbl,
        from: showValue(m.from_key),
        to: showValue(m.key),
        createdBy: createdBy(m.lin_origin),
        createdAt: createdAt(Number(m.lin_hlc)),
        keptBy: keeper ? createdBy(keeper) : "(no row now)",
        movedAt: new Date(Number(m.moved_ms)).toISOString(),
      });
    }
  }
  const setAside = has("_unisync_conflicts")
    ? (
        db.prepare("SELECT tbl, row_key, kept_key, vals, detected_ms FROM _unisync_conflicts ORDER BY detected_ms LIMIT ?").all(limit) as {
          tbl: string;
          row_key: Buffer;
          kept_key: Buffer;
          vals: Buffer;
          detected_ms: number;
        }[]
      ).map((c) => {
        const flat = decodeValues(c.vals);
        const values: Record<string, string> = {};
        for (let i = 0; i + 1 < flat.length; i += 2) values[String(flat[i])] = showValue(flat[i + 1]);
        const keptKey = decodeValues(c.kept_key);
        return {
          table: c.tbl,
          key: decodeValues(c.row_key).map(showValue),
          keptKey: keptKey.map(showValue),
          values,
          kept: rowByKey(db, c.tbl, keptKey),
          detectedAt: new Date(Number(c.detected_ms)).toISOString(),
        };
      })
    : [];
  const repaired = has("_unisync_repairs")
    ? (
        db.prepare("SELECT tbl, row_key, action, child_tbl, child_key, detected_ms FROM _unisync_repairs ORDER BY id DESC LIMIT ?").all(limit) as {
          tbl: string; row_key: Buffer; action: string; child_tbl: string; child_key: Buffer; detected_ms: number | bigint;
        }[]
      ).map((r) => ({
        table: r.tbl,
        key: decodeValues(r.row_key).map(showValue),
        action: r.action,
        child: r.child_tbl,
        childKey: decodeValues(r.child_key).map(showValue),
        at: new Date(Number(r.detected_ms)).toISOString(),
      }))
    : [];
  const enrolmentDifferences = has("_unisync_enrol_diffs")
    ? (
        db.prepare("SELECT tbl, row_key, col, kept_origin, kept_value, other_origin, other_value FROM _unisync_enrol_diffs ORDER BY tbl, row_key, col LIMIT ?").all(limit) as {
          tbl: string; row_key: Buffer; col: string; kept_origin: string; kept_value: Buffer; other_origin: string; other_value: Buffer;
        }[]
      ).map((d) => ({
        table: d.tbl,
        key: decodeValues(d.row_key).map(showValue),
        column: d.col,
        kept: { node: d.kept_origin, value: showValue(decodeValues(d.kept_value)[0]) },
        other: { node: d.other_origin, value: showValue(decodeValues(d.other_value)[0]) },
      }))
    : [];
  const parked = count("_unisync_parked");
  const totals = { moved: movedTotal, setAside: count("_unisync_conflicts"), repaired: count("_unisync_repairs"), enrolmentDifferences: count("_unisync_enrol_diffs") };
  return { stream, moved, setAside, repaired, enrolmentDifferences, parked, totals };
}
