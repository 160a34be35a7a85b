/**
 * Where replay of each origin stands: the last segment applied, in
 * _unisync_cursors of the database (or files.db) it was applied to. Moved only
 * inside the transaction that applies the segment.
 */
import type { Database, Statement } from "better-sqlite3";

export interface Cursor {
  seq: number;
  key: string;
  /** Records of segment seq + 1 already applied (it is applied in turns), and their last clock. */
  idx: number;
  lastHlc: number;
}

interface Row {
  seq: number | bigint;
  key: string;
  idx: number | bigint | null;
  last_hlc: number | bigint | null;
}

const toCursor = (r: Row): Cursor => ({ seq: Number(r.seq), key: r.key, idx: Number(r.idx ?? 0), lastHlc: Number(r.last_hlc ?? 0) });

export class Cursors {
  private readonly getStmt: Statement;
  private readonly allStmt: Statement;
  private readonly putStmt: Statement;
  private readonly openStmt: Statement;
  private readonly partialStmt: Statement;

  constructor(db: Database) {
    this.getStmt = db.prepare("SELECT seq, key, idx, last_hlc FROM _unisync_cursors WHERE origin = ?");
    this.allStmt = db.prepare("SELECT origin, seq, key, idx, last_hlc FROM _unisync_cursors");
    this.putStmt = db.prepare(
      "INSERT INTO _unisync_cursors(origin, seq, key, applied_ms, last_hlc, open, idx) VALUES (?, ?, ?, ?, ?, ?, 0) " +
        "ON CONFLICT(origin) DO UPDATE SET seq = excluded.seq, key = excluded.key, applied_ms = excluded.applied_ms, last_hlc = excluded.last_hlc, open = excluded.open, idx = 0",
    );
    this.partialStmt = db.prepare(
      "INSERT INTO _unisync_cursors(origin, seq, key, applied_ms, last_hlc, open, idx) VALUES (?, 0, '', ?, ?, 1, ?) " +
        "ON CONFLICT(origin) DO UPDATE SET applied_ms = excluded.applied_ms, last_hlc = excluded.last_hlc, open = 1, idx = excluded.idx",
    );
    this.openStmt = db.prepare("SELECT 1 FROM _unisync_cursors WHERE open = 1 LIMIT 1");
  }

  get(origin: string): Cursor {
    const r = this.getStmt.get(origin) as Row | undefined;
    return r ? toCursor(r) : { seq: 0, key: "", idx: 0, lastHlc: 0 };
  }

  all(): Map<string, Cursor> {
    const rows = this.allStmt.all() as (Row & { origin: string })[];
    return new Map(rows.map((r) => [r.origin, toCursor(r)]));
  }

  /** The next segment of `origin` is applied up to record `idx` (exclusive); call inside the apply transaction. */
  setPartial(origin: string, idx: number, lastHlc: number): void {
    this.partialStmt.run(origin, Date.now(), lastHlc, idx);
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
