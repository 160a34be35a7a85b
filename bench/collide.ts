/**
 * Replay under id collisions (issue 4). Node A inserts M rows with ids 1..M;
 * node B inserts M rows of which every tenth takes an id A also used (SQLite's
 * max + 1 on two nodes apart), the rest ids A never used. A replica that holds
 * A's rows then replays B's stream: 10% of B's inserts collide and move, with
 * their lineage, to a fresh id. Baseline: the same replica replaying node C's
 * stream, M rows with no id in common with A, measured in the same run.
 * Target: the colliding replay runs at >= 0.7x the collision-free one.
 */
import { join } from "node:path";
import Database from "better-sqlite3";
import { FileStore } from "../src/store/file.js";
import { createDb, ITEMS_INSERT, itemRow, openDbSync, result, type Bench, type Ctx, type Result } from "./lib.js";

const STREAM = "app.db";

/** Inserts rows with the given ids on a new source node and ships them; returns the count. */
async function source(dir: string, store: FileStore, node: string, ids: number[]): Promise<void> {
  const path = join(dir, `${node}.db`);
  createDb(path);
  const sync = openDbSync(path, node, store, STREAM);
  sync.refreshSchema();
  const app = new Database(path, { timeout: 30_000 });
  const stmt = app.prepare(ITEMS_INSERT);
  const tx = app.transaction((from: number, to: number) => {
    for (let i = from; i < to; i++) {
      const row = itemRow(ids[i]);
      row[0] = ids[i];
      stmt.run(row);
    }
  });
  for (let a = 0; a < ids.length; a += 10_000) tx(a, Math.min(ids.length, a + 10_000));
  app.close();
  sync.sealPending();
  while ((await sync.upload()) > 0);
  sync.close();
}

/** A replica holding A's rows; returns the ms to replay `origin` on top, and the row count after. */
async function replayOnTopOfA(dir: string, store: FileStore, origin: string, rep: number): Promise<{ ms: number; rows: number; moved: number }> {
  const path = join(dir, `replica-${origin}-${rep}.db`);
  createDb(path);
  const dst = openDbSync(path, "R", store, STREAM);
  dst.refreshSchema();
  while ((await dst.pull("A", 16)) > 0);
  const t = performance.now();
  while ((await dst.pull(origin, 16)) > 0);
  const ms = performance.now() - t;
  const rows = Number((dst.db.prepare("SELECT count(*) AS n FROM items").get() as { n: number }).n);
  const moved = Number((dst.db.prepare("SELECT count(*) AS n FROM _unisync_moves").get() as { n: number }).n);
  dst.close();
  return { ms, rows, moved };
}

export const collide: Bench = {
  name: "collide",
  title: "replay with 10% colliding ids, against collision-free replay",
  async run(ctx: Ctx): Promise<Result[]> {
    const m = ctx.quick ? 10_000 : ctx.full ? 250_000 : 50_000;
    const dir = ctx.tmp("collide");
    const store = new FileStore(join(dir, "store"));
    const range = (from: number, count: number) => Array.from({ length: count }, (_, k) => from + k);
    await source(dir, store, "A", range(1, m));
    // B: every tenth id is one A used; C: none is.
    await source(dir, store, "B", range(1, m).map((k) => (k % 10 === 0 ? k : m + k)));
    await source(dir, store, "C", range(m + 1, m));
    const reps = ctx.quick ? 1 : 2;
    let best = { collide: Infinity, free: Infinity };
    let moved = 0;
    for (let rep = 0; rep < reps; rep++) {
      const b = await replayOnTopOfA(dir, store, "B", rep);
      const c = await replayOnTopOfA(dir, store, "C", rep);
      // Every row survives: A's M plus B's M (10% of them moved), A's M plus C's M.
      if (b.rows !== 2 * m || c.rows !== 2 * m) throw new Error(`rows after replay: with collisions ${b.rows}, without ${c.rows}, expected ${2 * m}`);
      if (b.moved !== m / 10) throw new Error(`${b.moved} rows moved, expected ${m / 10}`);
      moved = b.moved;
      best = { collide: Math.min(best.collide, b.ms), free: Math.min(best.free, c.ms) };
      ctx.log(`collide #${rep + 1}: ${m} rows with 10% collisions ${(b.ms / 1000).toFixed(2)} s, without ${(c.ms / 1000).toFixed(2)} s`);
    }
    const rate = (ms: number) => m / (ms / 1000);
    return [
      result({
        name: "collide.replay",
        value: rate(best.collide),
        unit: "rows/s",
        baseline: rate(best.free),
        baselineLabel: "same replay, no collisions",
        target: { on: "ratio", op: ">=", limit: 0.7 },
        detail: { rows: m, moved, collideMs: best.collide, freeMs: best.free },
      }),
    ];
  },
};
