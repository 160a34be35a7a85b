/**
 * Catch-up after a day offline: node A writes N rows (1M with --full) while B
 * is away; B then pulls them from S3 (s3rver in its own process, over HTTP).
 * Baseline: the raw download of the same segment objects, GETs with as many in
 * flight as pull keeps (4), bodies dropped. Target (issue 13): catch-up within
 * 2x the raw download time.
 */
import { join } from "node:path";
import Database from "better-sqlite3";
import { DEFAULTS } from "../src/agent/config.js";
import { streamPrefix } from "../src/log/keys.js";
import { openStore } from "../src/store/url.js";
import { listAll, type ObjectStore } from "../src/store/store.js";
import { createDb, insertItems, openDbSync, result, s3Url, S3RVER_ENV, startS3rverProcess, type Bench, type Ctx, type Result } from "./lib.js";

const STREAM = "app.db";
const IN_FLIGHT = 4;

/** GETs every key, IN_FLIGHT at a time; returns ms and bytes. */
async function download(store: ObjectStore, keys: string[]): Promise<{ ms: number; bytes: number }> {
  const t = performance.now();
  let bytes = 0;
  let next = 0;
  const worker = async () => {
    while (next < keys.length) {
      const body = await store.get(keys[next++]);
      bytes += body?.length ?? 0;
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  return { ms: performance.now() - t, bytes };
}

export const catchup: Bench = {
  name: "catchup",
  title: "catch-up after a day offline (DbSync.pull of N rows from s3rver against the raw download of the same segments)",
  async run(ctx: Ctx): Promise<Result[]> {
    const n = ctx.quick ? 20_000 : ctx.full ? 1_000_000 : 200_000;
    const dir = ctx.tmp("catchup");
    const s3 = await startS3rverProcess();
    try {
      const store = openStore(s3Url(s3.endpoint, s3.bucket, "catchup"), { ...process.env, ...S3RVER_ENV });
      const srcPath = join(dir, "a.db");
      createDb(srcPath);
      const src = openDbSync(srcPath, "A", store, STREAM);
      src.refreshSchema();
      const app = new Database(srcPath, { timeout: 30_000 });
      insertItems(app, 1, n, 10_000);
      app.close();
      src.sealPending();
      while ((await src.upload()) > 0);
      src.close();

      const keys: string[] = [];
      for await (const o of listAll(store, streamPrefix("A", STREAM))) if (o.key.endsWith(".seg")) keys.push(o.key);
      // Best of two for each (other work on a small machine only ever slows a run down).
      const downloads = [await download(store, keys), await download(store, keys)];
      const pulls: number[] = [];
      for (let rep = 0; rep < 2; rep++) {
        const path = join(dir, `b-${rep}.db`);
        createDb(path);
        const b = openDbSync(path, "B", store, STREAM);
        b.refreshSchema();
        const t = performance.now();
        let applied = 0;
        for (let k; (k = await b.pull("A", 16)) > 0; ) applied += k;
        pulls.push(performance.now() - t);
        b.close();
        if (applied !== n) throw new Error(`catch-up applied ${applied} of ${n} rows`);
      }
      const downloadMs = Math.min(...downloads.map((d) => d.ms));
      const pullMs = Math.min(...pulls);
      const mb = downloads[0].bytes / 1e6;
      ctx.log(`catchup: ${keys.length} segments, ${mb.toFixed(1)} MB; raw download ${(downloadMs / 1000).toFixed(2)} s, catch-up ${(pullMs / 1000).toFixed(1)} s (${Math.round(n / (pullMs / 1000))} rows/s)`);
      return [
        result({
          name: "catchup.pull",
          value: pullMs / downloadMs,
          unit: "x download",
          baseline: 1,
          baselineLabel: `raw GET of ${keys.length} segments (${mb.toFixed(0)} MB)`,
          target: { on: "value", op: "<=", limit: 2 },
          detail: { n, batch: DEFAULTS.batchMaxRecords, segments: keys.length, bytes: downloads[0].bytes, downloads, pulls },
        }),
      ];
    } finally {
      await s3.stop();
    }
  },
};
