/**
 * What each node's enrolment brought (DESIGN invariant 10): rows that were in a
 * database before unisync met it are logged as enrolment records, values of
 * unknown time (merge.ts). Here, per origin and table, how many such rows this
 * node received and what they did: added a row the cluster lacked, matched
 * what was here, differed from another node's enrolled copy (diverged clones:
 * the differences are listed), or were older than a logged change or delete
 * (a stale copy: it changed nothing). `unisync status` and `conflicts` read it.
 */
import type { Database, Statement } from "better-sqlite3";
import { getMeta } from "../db/meta.js";
import { hlcFromMs, hlcToIso } from "../log/hlc.js";
import { encodeValues, sameValue, type SqlValue } from "../log/value.js";
import { clockOf, isEnrolmentStamp, type RowState, type Stamp } from "../merge/merge.js";

export type EnrolmentOutcome = "added" | "same" | "differed" | "older";

export interface EnrolmentSummary {
  origin: string;
  table: string;
  rows: number;
  added: number;
  same: number;
  differed: number;
  older: number;
  /** When the first and last of these rows were recorded at their origin. */
  from: string;
  to: string;
}

/** One column of a row that two nodes held with different values before enrolment. */
export interface EnrolmentDifference {
  table: string;
  key: Buffer;
  column: string;
  kept: { origin: string; value: SqlValue };
  other: { origin: string; value: SqlValue };
}

export class EnrolmentLedger {
  private readonly countStmt: Statement;
  private readonly diffStmt: Statement;

  constructor(private readonly db: Database) {
    this.countStmt = db.prepare(
      `INSERT INTO _unisync_enrolments(origin, tbl, rows, added, same, differed, older, first_hlc, last_hlc)
       VALUES (@origin, @tbl, @rows, @added, @same, @differed, @older, @hlc, @hlc)
       ON CONFLICT(origin, tbl) DO UPDATE SET rows = rows + @rows, added = added + @added, same = same + @same,
         differed = differed + @differed, older = older + @older, first_hlc = min(first_hlc, @hlc), last_hlc = max(last_hlc, @hlc)`,
    );
    this.diffStmt = db.prepare(
      "INSERT OR REPLACE INTO _unisync_enrol_diffs(tbl, row_key, col, kept_origin, kept_value, other_origin, other_value, detected_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    );
  }

  /** Counts rows of one origin's enrolment (this node's own: `rows` at once, outcome "added"). */
  count(origin: string, table: string, hlc: number, outcome: EnrolmentOutcome, rows = 1): void {
    const zero = { added: 0, same: 0, differed: 0, older: 0 };
    this.countStmt.run({ origin, tbl: table, rows, ...zero, [outcome]: rows, hlc });
  }

  /**
   * What an incoming enrolled row does against what this node holds (`held`:
   * the row's values here, `prior`: its merge state): records the columns it
   * holds differently from another node's enrolment, and says the outcome.
   */
  judge(table: string, key: Buffer, stamp: Stamp, columns: string[], values: SqlValue[], prior: RowState | null, held: Map<string, SqlValue> | null): EnrolmentOutcome {
    if (!prior && !held) return "added";
    if (!prior && held) return this.replaceUnrecorded(table, key, stamp.origin, true, columns, values, held) ? "differed" : "same";
    if (prior && !prior.alive) return "older";
    let outcome: EnrolmentOutcome = "same";
    columns.forEach((column, i) => {
      if (!held?.has(column)) return;
      const here = held.get(column) as SqlValue;
      if (sameValue(here, values[i])) return;
      const clock = prior ? clockOf(prior, column) : null;
      if (!clock || !isEnrolmentStamp(clock)) {
        // A logged write (or one never recorded) holds the column: the enrolled value is older.
        if (outcome === "same") outcome = "older";
        return;
      }
      if (clock.origin === stamp.origin) return;
      outcome = "differed";
      // The higher enrolment stamp (the earlier enrolment) keeps its value.
      const incomingWins = stamp.hlc > clock.hlc || (stamp.hlc === clock.hlc && stamp.origin > clock.origin);
      const kept = incomingWins ? { origin: stamp.origin, value: values[i] } : { origin: clock.origin, value: here };
      const other = incomingWins ? { origin: clock.origin, value: here } : { origin: stamp.origin, value: values[i] };
      this.diffStmt.run(table, key, column, kept.origin, encodeValues([kept.value]), other.origin, encodeValues([other.value]), Date.now());
    });
    return outcome;
  }

  /**
   * A record met a row this node held before it enrolled (no merge state yet:
   * the log is replayed into a new database before its own rows are enrolled).
   * The record's values win; this node's copy counts them as older, and an
   * enrolled record's differences from the copy are listed. Returns whether any
   * differed (a delete always does).
   */
  replaceUnrecorded(table: string, key: Buffer, origin: string, enrolment: boolean, columns: string[], values: SqlValue[], held: Map<string, SqlValue>, deleted = false): boolean {
    const local = String(getMeta(this.db, "node") ?? "");
    let differed = deleted;
    if (!deleted) columns.forEach((column, i) => {
      if (!held.has(column) || sameValue(held.get(column) as SqlValue, values[i])) return;
      differed = true;
      if (enrolment) this.diffStmt.run(table, key, column, origin, encodeValues([values[i]]), local, encodeValues([held.get(column) as SqlValue]), Date.now());
    });
    this.count(local, table, hlcFromMs(Date.now()), differed ? "older" : "same");
    return differed;
  }
}

/** Every enrolment this database received or made, oldest first (read-only use by the CLI). */
export function readEnrolments(db: Database): EnrolmentSummary[] {
  if (!db.prepare("SELECT 1 FROM sqlite_master WHERE name = '_unisync_enrolments'").get()) return [];
  const rows = db.prepare("SELECT origin, tbl, rows, added, same, differed, older, first_hlc, last_hlc FROM _unisync_enrolments ORDER BY first_hlc, origin, tbl").all() as {
    origin: string; tbl: string; rows: number | bigint; added: number | bigint; same: number | bigint; differed: number | bigint; older: number | bigint; first_hlc: number | bigint; last_hlc: number | bigint;
  }[];
  return rows.map((r) => ({
    origin: r.origin,
    table: r.tbl,
    rows: Number(r.rows),
    added: Number(r.added),
    same: Number(r.same),
    differed: Number(r.differed),
    older: Number(r.older),
    from: hlcToIso(Number(r.first_hlc)),
    to: hlcToIso(Number(r.last_hlc)),
  }));
}
