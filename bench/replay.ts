/**
 * Replay throughput: N rows captured on a source database are sealed into
 * segments (DbSync's outbox, default batch size) and uploaded to a file store;
 * then DbSync.pull applies them into a fresh empty database with the same
 * schema. Baseline: the same rows inserted raw (prepared statement, one
 * transaction per segment-sized batch) into an empty database.
 * Also reported, without target: the sealing rate on the source and the
 * fetch+verify+decompress+decode rate alone (readAfter, no SQLite writes), so
 * the apply share of replay can be read off; and the "SQL floor": the four
 * statements replay runs per row (look the row up, read its merge state,
 * insert it, write its state), prepared, with every value computed before the
 * clock starts, so no merge logic, no decoding: what the design costs in
 * SQLite alone.
 */
import { join } from "node:path";
import Database from "better-sqlite3";
import { DEFAULTS } from "../src/agent/config.js";
import { readAfter } from "../src/log/tail.js";
import { rowIdentity } from "../src/log/value.js";
import { FileStore } from "../src/store/file.js";
import { createDb, ITEMS_INSERT, insertItems, itemRow, openDbSync, result, type Bench, type Ctx, type ItemRow, type Result } from "./lib.js";

const STREAM = "app.db";

/** Runs replay's per-row statements for `rows` on a fresh synced db; returns ms. */
function sqlFloor(path: string, rows: ItemRow[], batch: number): number {
  createDb(path);
  const setup = openDbSync(path, "C", new FileStore(`${path}.store`), STREAM);
  setup.refreshSchema(); // internal tables and triggers, as on a replica
  setup.close();
  const db = new Database(path);
  const find = db.prepare("SELECT id, name, email, score, visits, avatar, created_at FROM items WHERE id IS ? LIMIT 1").raw(true).safeIntegers(true);
  const getState = db.prepare("SELECT hlc, origin, alive, base_hlc, base_origin, cols, dead FROM _unisync_rows WHERE tbl = ? AND pk = ?");
  const insert = db.prepare(ITEMS_INSERT);
  const putState = db.prepare(
    "INSERT OR REPLACE INTO _unisync_rows(tbl, pk, hlc, origin, alive, base_hlc, base_origin, cols, dead) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
  );
  const pks = rows.map((r) => rowIdentity([BigInt(r[0])], false));
  const hlc = Date.now() * 1024;
  const tx = db.transaction((from: number, to: number) => {
    db.prepare("INSERT INTO _unisync_applying(x) VALUES (1)").run(); // silences the triggers, as replay does
    for (let i = from; i < to; i++) {
      find.get(rows[i][0]);
      getState.get("items", pks[i]);
      insert.run(rows[i]);
      putState.run("items", pks[i], hlc + i, "A", 1, hlc + i, "A", null, null);
    }
    db.prepare("DELETE FROM _unisync_applying").run();
  });
  const t = performance.now();
  for (let a = 0; a < rows.length; a += batch) tx(a, Math.min(rows.length, a + batch));
  const ms = performance.now() - t;
  db.close();
  return ms;
}

export const replay: Bench = {
  name: "replay",
  title: "replay throughput (DbSync.pull from a file store into an empty db)",
  async run(ctx: Ctx): Promise<Result[]> {
    const n = ctx.quick ? 20_000 : ctx.full ? 1_000_000 : 200_000;
    const batch = DEFAULTS.batchMaxRecords;
    const dir = ctx.tmp("replay");
    const store = new FileStore(join(dir, "store"));

    // Source: triggers in place, the app inserts, DbSync seals and uploads.
    const srcPath = join(dir, "source.db");
    createDb(srcPath);
    const src = openDbSync(srcPath, "A", store, STREAM);
    src.refreshSchema();
    const app = new Database(srcPath, { timeout: 30_000 });
    let t = performance.now();
    insertItems(app, 1, n, 10_000);
    const appInsertMs = performance.now() - t;
    app.close();
    t = performance.now();
    const sealed = src.sealPending();
    const sealMs = performance.now() - t;
    t = performance.now();
    const segments = await src.upload();
    const uploadMs = performance.now() - t;
    src.close();
    if (sealed !== n) throw new Error(`sealed ${sealed} records, expected ${n}`);
    ctx.log(`replay: source insert ${(appInsertMs / 1000).toFixed(1)} s, seal ${(sealMs / 1000).toFixed(1)} s, upload ${segments} segments ${(uploadMs / 1000).toFixed(1)} s`);

    // Fetch + decode only (what pull does before touching SQLite).
    t = performance.now();
    let decoded = 0;
    for (let after = 0; ; ) {
      const r = await readAfter(store, "A", STREAM, after, 16);
      if (r.problem) throw new Error(r.problem.message);
      if (r.segments.length === 0) break;
      for (const s of r.segments) decoded += s.segment.records.length;
      after = r.segments[r.segments.length - 1].seq;
    }
    const decodeMs = performance.now() - t;

    // Replay into a fresh database.
    const dstPath = join(dir, "replica.db");
    createDb(dstPath);
    const dst = openDbSync(dstPath, "B", store, STREAM);
    dst.refreshSchema();
    t = performance.now();
    let applied = 0;
    for (;;) {
      const k = await dst.pull("A", 16);
      if (k === 0) break;
      applied += k;
    }
    const replayMs = performance.now() - t;
    const count = (dst.db.prepare("SELECT count(*) AS n FROM items").get() as { n: number }).n;
    dst.close();
    if (applied !== n || count !== n) throw new Error(`replay applied ${applied} records, replica has ${count} rows, expected ${n}`);
    ctx.log(`replay: pull ${(replayMs / 1000).toFixed(1)} s (${Math.round(n / (replayMs / 1000))} rows/s); fetch+decode alone ${(decodeMs / 1000).toFixed(1)} s`);

    // Baseline: raw batched insert of the same rows (generated before the clock starts).
    const rawPath = join(dir, "raw.db");
    createDb(rawPath);
    const rows: ItemRow[] = Array.from({ length: n }, (_, k) => itemRow(k + 1));
    const raw = new Database(rawPath);
    t = performance.now();
    insertItems(raw, 1, n, batch, rows);
    const rawMs = performance.now() - t;
    raw.close();
    ctx.log(`replay: raw insert ${(rawMs / 1000).toFixed(1)} s (${Math.round(n / (rawMs / 1000))} rows/s)`);
    const floorMs = sqlFloor(join(dir, "floor.db"), rows, batch);
    ctx.log(`replay: SQL floor ${(floorMs / 1000).toFixed(1)} s (${Math.round(n / (floorMs / 1000))} rows/s)`);

    const rate = (ms: number) => n / (ms / 1000);
    const detail = { n, batch, segments, appInsertMs, sealMs, uploadMs, decodeMs, replayMs, rawMs, floorMs };
    return [
      result({
        name: "replay.apply",
        value: rate(replayMs),
        unit: "rows/s",
        baseline: rate(rawMs),
        baselineLabel: `raw insert, ${batch}/txn`,
        target: { on: "ratio", op: ">=", limit: 0.5 },
        detail,
      }),
      result({ name: "replay.sql_floor", value: rate(floorMs), unit: "rows/s", baseline: rate(rawMs), baselineLabel: "raw insert" }),
      result({ name: "replay.fetch_decode_only", value: rate(decodeMs), unit: "rows/s", baseline: rate(rawMs), baselineLabel: "raw insert", detail: { decoded } }),
      result({ name: "replay.source_seal", value: rate(sealMs), unit: "rows/s", baseline: rate(rawMs), baselineLabel: "raw insert" }),
    ];
  },
};
