/**
 * How much the shape of the SQL can win for replay's fresh rows, in SQLite alone
 * (no decoding, no merge logic, values made in advance): a row and a narrow state
 * row per record written one statement each, against the same written set-based,
 * once per batch, from a JSON array (json_each) or from a table-valued function
 * fed by JavaScript (better-sqlite3's db.table). Baseline: the rows alone, one
 * prepared statement each. Standalone, for issue 13's record in RESULTS.md:
 *   node dist/bench/sql-shapes.js [ROWS] [RUNS]
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import Database from "better-sqlite3";

const n = Number(process.argv[2] ?? 200_000);
const runs = Number(process.argv[3] ?? 3);
const BATCH = 2500; // about a segment's records
const dir = mkdtempSync(join(tmpdir(), "unisync-sql-shapes-"));
type Row = [number, string, number, number];
const rows: Row[] = Array.from({ length: n }, (_, i) => [i + 1, `name ${i} ${"x".repeat(20)}`, i * 3, i * 0.5]);

function fresh(name: string): Database.Database {
  const db = new Database(join(dir, `${name}.db`));
  db.pragma("journal_mode = WAL");
  db.exec("CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL)");
  db.exec("CREATE TABLE st(tbl TEXT NOT NULL, pk BLOB NOT NULL, hlc INTEGER NOT NULL, origin TEXT NOT NULL, PRIMARY KEY(tbl, pk)) WITHOUT ROWID");
  return db;
}

/** Runs `batch` once per BATCH rows, each in its own transaction; returns rows/s. */
function timed(db: Database.Database, batch: (from: number, to: number) => void): number {
  const t = performance.now();
  for (let i = 0; i < n; i += BATCH) db.transaction(() => batch(i, Math.min(n, i + BATCH)))();
  const rate = n / ((performance.now() - t) / 1000);
  db.close();
  return rate;
}

const shapes: Record<string, (run: number) => number> = {
  "rows alone, a statement each": (r) => {
    const db = fresh(`raw-${r}`);
    const ins = db.prepare("INSERT INTO item VALUES (?, ?, ?, ?)");
    return timed(db, (from, to) => { for (let j = from; j < to; j++) ins.run(rows[j]); });
  },
  "row + state, a statement each": (r) => {
    const db = fresh(`perrow-${r}`);
    const ins = db.prepare("INSERT INTO item VALUES (?, ?, ?, ?)");
    const state = db.prepare("INSERT INTO st VALUES ('item', ?, ?, 'origin-a')");
    return timed(db, (from, to) => {
      for (let j = from; j < to; j++) {
        state.run(Buffer.from(String(rows[j][0])), 12_345_678 + j);
        ins.run(rows[j]);
      }
    });
  },
  "row + state, set-based from JSON": (r) => {
    const db = fresh(`json-${r}`);
    const ins = db.prepare("INSERT INTO item SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?)");
    const state = db.prepare("INSERT INTO st SELECT 'item', CAST(value->>0 AS BLOB), 12345678 + key, 'origin-a' FROM json_each(?)");
    return timed(db, (from, to) => {
      const json = JSON.stringify(rows.slice(from, to));
      state.run(json);
      ins.run(json);
    });
  },
  "row + state, set-based from db.table": (r) => {
    const db = fresh(`vtab-${r}`);
    let batch: Row[] = [];
    db.table("batch4", { columns: ["c0", "c1", "c2", "c3"], *rows() { yield* batch; } });
    const ins = db.prepare("INSERT INTO item SELECT c0, c1, c2, c3 FROM batch4");
    const state = db.prepare("INSERT INTO st SELECT 'item', CAST(c0 AS BLOB), 12345678 + c0, 'origin-a' FROM batch4");
    return timed(db, (from, to) => {
      batch = rows.slice(from, to);
      state.run();
      ins.run();
    });
  },
};

try {
  for (let r = 0; r < runs; r++) {
    const rates = Object.entries(shapes).map(([name, shape]) => [name, shape(r)] as const);
    const base = rates[0][1];
    console.log(`run ${r + 1}: ` + rates.map(([name, rate]) => `${name} ${Math.round(rate).toLocaleString("en")} rows/s (${(rate / base).toFixed(2)}x)`).join("; "));
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
