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
  private readonly openStmt: Statement;

  constructor(db: Database) {
    this.getStmt = db.prepare("SELECT seq, key FROM _unisync_cursors WHERE origin = ?");
    this.allStmt = db.prepare("SELECT origin, seq, key FROM _unisync_cursors");
    this.putStmt = db.prepare(
      "INSERT INTO _unisync_cursors(origin, seq, key, applied_ms, last_hlc, open) VALUES (?, ?, ?, ?, ?, ?) " +
        "ON CONFLICT(origin) DO UPDATE SET seq = excluded.seq, key = excluded.key, applied_ms = excluded.applied_ms, last_hlc = excluded.last_hlc, open = excluded.open",
    );
    this.openStmt = db.prepare("SELECT 1 FROM _unisync_cursors WHERE open = 1 LIMIT 1");
  }

  get(origin: string): Cursor {
    const r = this.getStmt.get(origin) as { seq: number; key: string } | undefined;
    return r ? { seq: Number(r.seq), key: r.key } : { seq: 0, key: "" };
  }

  all(): Map<string, Cursor> {
    const rows = this.allStmt.all() as { origin: string; seq: number; key: string }[];
    return new Map(rows.map((r) => [r.origin, { seq: Number(r.seq), key: r.key }]));
  }

  /**
   * Records segment `seq` (stored under `key`) of `origin` as applied; call inside
   * the apply transaction. `open`: the origin's app transaction goes on in the next segment.
   */
  set(origin: string, seq: number, key: string, lastHlc: number, open = false): void {
    this.putStmt.run(origin, seq, key, Date.now(), lastHlc, open ? 1 : 0);
  }

  /** Whether some origin's last applied segment ended part way through an app transaction. */
  anyOpen(): boolean {
    return this.openStmt.get() !== undefined;
  }
}
