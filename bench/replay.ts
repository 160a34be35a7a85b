/**
 * Replay throughput: N rows captured on a source database are sealed into
 * segments (DbSync's outbox, default batch size) and uploaded to a file store;
 * then DbSync.pull applies them into a fresh empty database with the same
 * schema. Baseline: the same rows inserted raw (prepared statement, one
 * transaction per segment-sized batch) into an empty database.
 * Also reported, without target: the sealing rate on the source and the
 * fetch+verify+decompress+decode rate alone (readAfter, no SQLite writes), so
 * the apply share of replay can be read off; and the "SQL floor": the two
 * statements replay runs per fresh row (insert its merge state, insert it, each
 * ON CONFLICT DO NOTHING), prepared, with every value computed before the clock
 * starts, so no merge logic, no decoding: what the design costs in SQLite alone. The measured phases run twice (once with --quick) and the
 * best time of each counts.
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
  const insert = db.prepare(`${ITEMS_INSERT} ON CONFLICT DO NOTHING`);
  const insertState = db.prepare(
    "INSERT INTO _unisync_rows(tbl, pk, hlc, origin, alive, base_hlc, base_origin, cols, dead, lin_hlc, lin_origin, lin_epoch, refs, inc_hlc, inc_origin) " +
      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
  );
  const pks = rows.map((r) => rowIdentity([BigInt(r[0])], false));
  // What replay writes for a fresh row: every column at the insert's clock, the row's lineage and incarnation.
  const cols = JSON.stringify({ id: 0, name: 0, email: 0, score: 0, visits: 0, avatar: 0, created_at: 0 });
  const hlc = Date.now() * 1024;
  const tx = db.transaction((from: number, to: number) => {
    db.prepare("INSERT INTO _unisync_applying(x) VALUES (1)").run(); // silences the triggers, as replay does
    for (let i = from; i < to; i++) {
      const h = hlc + i;
      insertState.run("items", pks[i], h, "A", 1, h, "A", cols, null, h, "A", 1, null, h, "A");
      insert.run(rows[i]);
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
    let segments = 0;
    for (let k; (k = await src.upload()) > 0; ) segments += k; // upload() sends a bounded number per call
    const uploadMs = performance.now() - t;
    src.close();
    if (sealed !== n) throw new Error(`sealed ${sealed} records, expected ${n}`);
    ctx.log(`replay: source insert ${(appInsertMs / 1000).toFixed(1)} s, seal ${(sealMs / 1000).toFixed(1)} s, upload ${segments} segments ${(uploadMs / 1000).toFixed(1)} s`);

    // Fetch + decode only (what pull does before touching SQLite).
    const fetchDecode = async () => {
      const t0 = performance.now();
      let decoded = 0;
      for (let after = 0; ; ) {
        const r = await readAfter(store, "A", STREAM, after, 16);
        const before = after;
        for await (const s of r.segments) {
          decoded += s.segment.records.length;
          after = s.seq;
        }
        const problem = r.problem();
        if (problem) throw new Error(problem.message);
        if (after === before) break;
      }
      if (decoded !== n) throw new Error(`decoded ${decoded} records, expected ${n}`);
      return performance.now() - t0;
    };

    // Replay into a fresh database.
    const pullAll = async (rep: number) => {
      const dstPath = join(dir, `replica-${rep}.db`);
      createDb(dstPath);
      const dst = openDbSync(dstPath, "B", store, STREAM);
      dst.refreshSchema();
      const t0 = performance.now();
      let applied = 0;
      for (;;) {
        const k = await dst.pull("A", 16);
        if (k === 0) break;
        applied += k;
      }
      const ms = performance.now() - t0;
      const count = (dst.db.prepare("SELECT count(*) AS n FROM items").get() as { n: number }).n;
      dst.close();
      if (applied !== n || count !== n) throw new Error(`replay applied ${applied} records, replica has ${count} rows, expected ${n}`);
      return ms;
    };

    // Baseline: raw batched insert of the same rows (generated before the clock starts).
    const rows: ItemRow[] = Array.from({ length: n }, (_, k) => itemRow(k + 1));
    const rawInsert = (rep: number) => {
      const rawPath = join(dir, `raw-${rep}.db`);
      createDb(rawPath);
      const raw = new Database(rawPath);
      const t0 = performance.now();
      insertItems(raw, 1, n, batch, rows);
      const ms = performance.now() - t0;
      raw.close();
      return ms;
    };

    // Best of `reps` for each phase: other work on a small machine only ever slows a run down.
    const reps = ctx.quick ? 1 : 2;
    const runs: { decodeMs: number; replayMs: number; rawMs: number; floorMs: number }[] = [];
    for (let rep = 0; rep < reps; rep++) {
      const r = { decodeMs: await fetchDecode(), replayMs: await pullAll(rep), rawMs: rawInsert(rep), floorMs: sqlFloor(join(dir, `floor-${rep}.db`), rows, batch) };
      runs.push(r);
      const rps = (ms: number) => Math.round(n / (ms / 1000));
      ctx.log(
        `replay #${rep + 1}: pull ${(r.replayMs / 1000).toFixed(1)} s (${rps(r.replayMs)} rows/s); fetch+decode alone ${(r.decodeMs / 1000).toFixed(1)} s (${rps(r.decodeMs)}); ` +
          `raw insert ${(r.rawMs / 1000).toFixed(2)} s (${rps(r.rawMs)}); SQL floor ${(r.floorMs / 1000).toFixed(1)} s (${rps(r.floorMs)})`,
      );
    }
    const best = (k: keyof (typeof runs)[number]) => Math.min(...runs.map((r) => r[k]));
    const [decodeMs, replayMs, rawMs, floorMs] = [best("decodeMs"), best("replayMs"), best("rawMs"), best("floorMs")];

    const rate = (ms: number) => n / (ms / 1000);
    const detail = { n, batch, segments, appInsertMs, sealMs, uploadMs, decodeMs, replayMs, rawMs, floorMs, runs };
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
      result({ name: "replay.fetch_decode_only", value: rate(decodeMs), unit: "rows/s", baseline: rate(rawMs), baselineLabel: "raw insert", }),
      result({ name: "replay.source_seal", value: rate(sealMs), unit: "rows/s", baseline: rate(rawMs), baselineLabel: "raw insert" }),
    ];
  },
};
