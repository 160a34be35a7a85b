/**
 * Change-to-visible latency: two agents as processes (default settings), on a
 * local file store and on s3rver. The app on node A inserts a row carrying its
 * wall-clock time every 100-200 ms; a watcher polls node B's database every
 * 5 ms through a read-only connection and notes when each row appears.
 * Baseline: a raw PUT of a small object to the same store (for s3rver, also
 * its PUT throughput, which bounds how many segments per second it can take).
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { ListObjectsV2Command, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import Database from "better-sqlite3";
import { FileStore } from "../src/store/file.js";
import { createDb, percentile, result, s3Url, S3RVER_ENV, sleep, startAgent, startS3rverProcess, type Bench, type Ctx, type Result } from "./lib.js";

const PINGS = "CREATE TABLE pings(id INTEGER PRIMARY KEY, sent_ms INTEGER NOT NULL, note TEXT)";

async function waitFor(what: string, cond: () => boolean, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(5);
  }
}

/** Runs the two agents and the app/watcher pair; returns latencies in ms. */
async function measure(ctx: Ctx, kind: string, storeUrl: string, env: Record<string, string>, samples: number) {
  const dir = ctx.tmp(`latency-${kind}`);
  const inst = { A: join(dir, "a"), B: join(dir, "b") };
  for (const d of Object.values(inst)) {
    mkdirSync(d);
    createDb(join(d, "app.db"), PINGS);
  }
  const agents = (["A", "B"] as const).map((n) => startAgent(n, inst[n], storeUrl, join(dir, `${n}.log`), env));
  try {
    await Promise.race([Promise.all(agents.map((a) => a.ready)), sleep(30_000).then(() => Promise.reject(new Error("agents not ready after 30 s")))]);
    const app = new Database(join(inst.A, "app.db"), { timeout: 5000 });
    const insert = app.prepare("INSERT INTO pings(id, sent_ms, note) VALUES (?, ?, ?)");
    const watcher = new Database(join(inst.B, "app.db"), { readonly: true });
    const newer = watcher.prepare("SELECT id FROM pings WHERE id > ? ORDER BY id").pluck();
    const sent = new Map<number, number>();
    const seen = new Map<number, number>();
    let last = 0;
    const poll = setInterval(() => {
      const ids = newer.all(last) as number[];
      const now = performance.now();
      for (const id of ids) seen.set(id, now);
      if (ids.length) last = ids[ids.length - 1];
    }, 5);
    const write = (id: number) => {
      sent.set(id, performance.now());
      insert.run(id, Date.now(), `sample ${id}`);
    };
    try {
      // Warm-up: node B finds origin A only after A's first upload and its next origin scan (every 2 s).
      write(1);
      await waitFor("the warm-up row on node B", () => seen.has(1), 30_000);
      for (let i = 0; i < samples; i++) {
        write(i + 2);
        await sleep(100 + Math.random() * 100);
      }
      await waitFor(`all ${samples} samples on node B`, () => seen.size === samples + 1, 30_000);
    } finally {
      clearInterval(poll);
      app.close();
      watcher.close();
    }
    const latencies = Array.from({ length: samples }, (_, i) => (seen.get(i + 2) as number) - (sent.get(i + 2) as number));
    return { latencies, errors: agents.flatMap((a) => a.errors) };
  } finally {
    await Promise.all(agents.map((a) => a.stop()));
  }
}

async function timeMany(n: number, op: (i: number) => Promise<unknown>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await op(i);
    out.push(performance.now() - t);
  }
  return out;
}

export const latency: Bench = {
  name: "latency",
  title: "change-to-visible latency (two agent processes, app on A, watcher on B)",
  async run(ctx: Ctx): Promise<Result[]> {
    const samples = ctx.quick ? 20 : 100;
    const results: Result[] = [];
    const small = Buffer.alloc(1024, 7);

    // File store.
    const fileRoot = ctx.tmp("latency-store");
    const fs = new FileStore(fileRoot);
    const filePut = await timeMany(50, (i) => fs.put(`baseline/${i}.bin`, small));
    const file = await measure(ctx, "file", `file://${fileRoot}`, {}, samples);
    const filePutP50 = percentile(filePut, 50);
    const fileDetail = { samples, errors: file.errors, rawPutMs: { p50: filePutP50, p99: percentile(filePut, 99) }, latenciesMs: file.latencies };
    ctx.log(`latency file: p50 ${percentile(file.latencies, 50).toFixed(0)} ms p99 ${percentile(file.latencies, 99).toFixed(0)} ms; raw put p50 ${filePutP50.toFixed(2)} ms`);
    results.push(
      result({ name: "latency.file.p50", value: percentile(file.latencies, 50), unit: "ms", baseline: filePutP50, baselineLabel: "raw file put p50", target: { on: "value", op: "<", limit: 500 }, detail: fileDetail }),
      result({ name: "latency.file.p99", value: percentile(file.latencies, 99), unit: "ms", baseline: filePutP50, baselineLabel: "raw file put p50", target: { on: "value", op: "<", limit: 2000 } }),
    );

    // s3rver.
    const s3 = await startS3rverProcess();
    try {
      const client = new S3Client({
        region: "us-east-1",
        endpoint: s3.endpoint,
        forcePathStyle: true,
        credentials: { accessKeyId: S3RVER_ENV.AWS_ACCESS_KEY_ID, secretAccessKey: S3RVER_ENV.AWS_SECRET_ACCESS_KEY },
        requestChecksumCalculation: "WHEN_REQUIRED",
        responseChecksumValidation: "WHEN_REQUIRED",
      });
      const put = (key: string) => client.send(new PutObjectCommand({ Bucket: s3.bucket, Key: key, Body: small }));
      await timeMany(10, (i) => put(`warmup/${i}.bin`));
      const s3Put = await timeMany(100, (i) => put(`baseline/${String(i).padStart(4, "0")}.bin`));
      const s3List = await timeMany(50, () => client.send(new ListObjectsV2Command({ Bucket: s3.bucket, Prefix: "baseline/", MaxKeys: 17 })));
      // Throughput with 8 PUTs in flight.
      const total = ctx.quick ? 200 : 800;
      let next = 0;
      const t = performance.now();
      await Promise.all(
        Array.from({ length: 8 }, async () => {
          while (next < total) await put(`throughput/${next++}.bin`);
        }),
      );
      const putsPerS = total / ((performance.now() - t) / 1000);
      client.destroy();
      const s3PutP50 = percentile(s3Put, 50);
      ctx.log(`s3rver: PUT p50 ${s3PutP50.toFixed(1)} ms p99 ${percentile(s3Put, 99).toFixed(1)} ms; LIST p50 ${percentile(s3List, 50).toFixed(1)} ms; ${putsPerS.toFixed(0)} PUT/s at concurrency 8`);

      const r = await measure(ctx, "s3", s3Url(s3.endpoint, s3.bucket, "latency"), { ...S3RVER_ENV }, samples);
      ctx.log(`latency s3: p50 ${percentile(r.latencies, 50).toFixed(0)} ms p99 ${percentile(r.latencies, 99).toFixed(0)} ms`);
      const detail = {
        samples,
        errors: r.errors,
        rawPutMs: { p50: s3PutP50, p99: percentile(s3Put, 99) },
        rawListMs: { p50: percentile(s3List, 50), p99: percentile(s3List, 99) },
        putsPerS,
        latenciesMs: r.latencies,
      };
      results.push(
        result({ name: "latency.s3rver.p50", value: percentile(r.latencies, 50), unit: "ms", baseline: s3PutP50, baselineLabel: "raw S3 PUT p50", target: { on: "value", op: "<", limit: 500 }, detail }),
        result({ name: "latency.s3rver.p99", value: percentile(r.latencies, 99), unit: "ms", baseline: s3PutP50, baselineLabel: "raw S3 PUT p50", target: { on: "value", op: "<", limit: 2000 } }),
        result({ name: "s3rver.raw_put.p50", value: s3PutP50, unit: "ms", detail: { p99: percentile(s3Put, 99) } }),
        result({ name: "s3rver.raw_list.p50", value: percentile(s3List, 50), unit: "ms" }),
        result({ name: "s3rver.put_throughput", value: putsPerS, unit: "PUT/s", detail: { concurrency: 8, total } }),
      );
    } finally {
      await s3.stop();
    }
    return results;
  },
};
