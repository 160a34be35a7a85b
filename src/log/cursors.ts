/**
 * Where replay of each origin stands: the last segment applied, in
 * _unisync_cursors of the database (or files.db) it was applied to. Moved only
 * inside the transaction that applies the segment.
 */
import type { Database, Statement } from "better-sqlite3";

export interface Cursor {
  seq: number;
  key: string;
}

export class Cursors {
  private readonly getStmt: Statement;
  private readonly allStmt: Statement;
  private readonly putStmt: Statement;

  constructor(db: Database) {
    this.getStmt = db.prepare("SELECT seq, key FROM _unisync_cursors WHERE origin = ?");
    this.allStmt = db.prepare("SELECT origin, seq, key FROM _unisync_cursors");
    this.putStmt = db.prepare(
      "INSERT INTO _unisync_cursors(origin, seq, key, applied_ms, last_hlc) VALUES (?, ?, ?, ?, ?) " +
        "ON CONFLICT(origin) DO UPDATE SET seq = excluded.seq, key = excluded.key, applied_ms = excluded.applied_ms, last_hlc = excluded.last_hlc",
    );
  }

  get(origin: string): Cursor {
    const r = this.getStmt.get(origin) as { seq: number; key: string } | undefined;
    return r ? { seq: Number(r.seq), key: r.key } : { seq: 0, key: "" };
  }

  all(): Map<string, Cursor> {
    const rows = this.allStmt.all() as { origin: string; seq: number; key: string }[];
    return new Map(rows.map((r) => [r.origin, { seq: Number(r.seq), key: r.key }]));
  }

  /** Records segment `seq` (stored under `key`) of `origin` as applied; call inside the apply transaction. */
  set(origin: string, seq: number, key: string, lastHlc: number): void {
    this.putStmt.run(origin, seq, key, Date.now(), lastHlc);
  }
}
