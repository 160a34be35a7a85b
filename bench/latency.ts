/**
 * Change-to-visible latency: two agents as processes (default settings), on a
 * local file store, s3rver and moto (moto also with LAN hints). The app on node
 * A inserts a row carrying its wall-clock time every 100-200 ms; a watcher
 * polls node B's database every 5 ms through a read-only connection and notes
 * when each row appears. Then the first change after a pair was idle 30 s (B
 * polls only every pollMaxMs by then), without and with LAN hints, on the file
 * store: several pairs side by side, in the background of the steady runs.
 * Baseline: a raw PUT of a small object to the same store (for S3 servers, also
 * their PUT throughput, which bounds how many segments per second they take).
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { ListObjectsV2Command, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import Database from "better-sqlite3";
import { FileStore } from "../src/store/file.js";
import { MOTO_ENV, startMoto } from "../test/helpers/moto.js";
import { agentStatus, createDb, freeUdpPort, percentile, result, s3Url, S3RVER_ENV, sleep, startAgent, startS3rverProcess, type Bench, type Ctx, type Result } from "./lib.js";

const PINGS = "CREATE TABLE pings(id INTEGER PRIMARY KEY, sent_ms INTEGER NOT NULL, note TEXT)";

/** The pair counts as idle this long after its last change (B's polls backed off to pollMaxMs well before). */
const IDLE_MS = 30_000;

const fmt = (xs: number[]) => `p50 ${percentile(xs, 50).toFixed(0)} ms p99 ${percentile(xs, 99).toFixed(0)} ms`;

/** One S3 server's raw PUT/LIST baseline and the pair's steady latency on it (rows into `results`); returns the baseline. */
async function s3Steady(
  ctx: Ctx,
  kind: string,
  server: { endpoint: string; bucket: string },
  env: { AWS_ACCESS_KEY_ID: string; AWS_SECRET_ACCESS_KEY: string },
  puts: number,
  samples: number,
  results: Result[],
): Promise<Baseline> {
  const b = await s3Baseline(server.endpoint, server.bucket, env, puts);
  ctx.log(`${kind}: PUT p50 ${b.putP50.toFixed(1)} ms p99 ${b.putP99.toFixed(1)} ms; LIST p50 ${b.listP50.toFixed(1)} ms; ${b.putsPerS.toFixed(0)} PUT/s at concurrency 8`);
  const r = await measure(ctx, kind, s3Url(server.endpoint, server.bucket, "latency"), { ...env }, samples);
  ctx.log(`latency ${kind}: ${fmt(r.latencies)}`);
  results.push(...s3Rows(kind, r, b, samples));
  return b;
}

/** Signs the LAN hints between the agents of a pair (>= 16 characters). */
const HINT_SECRET = "unisync-bench-hint-secret";

async function waitFor(what: string, cond: () => boolean, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(5);
  }
}

/** Two agents (A, B) on one store, an app on A and a watcher on B's database. */
interface Pair {
  /** The app on A inserts row `id`, noting when. */
  write(id: number): void;
  /** Waits until B holds row `id`; its change-to-visible latency in ms. */
  seen(id: number, timeoutMs: number): Promise<number>;
  errors(): string[];
  /** LAN hints node B accepted so far (its /status.json). */
  hintsReceived(): Promise<number>;
  stop(): Promise<void>;
}

/** Starts the pair; `envOf` adds per-node environment (LAN hints). Ready once B holds A's warm-up row. */
async function startPair(ctx: Ctx, kind: string, storeUrl: string, env: Record<string, string>, envOf: (n: "A" | "B") => Record<string, string> = () => ({})): Promise<Pair> {
  const dir = ctx.tmp(`latency-${kind}`);
  const inst = { A: join(dir, "a"), B: join(dir, "b") };
  for (const d of Object.values(inst)) {
    mkdirSync(d);
    createDb(join(d, "app.db"), PINGS);
  }
  const agents = (["A", "B"] as const).map((n) => startAgent(n, inst[n], storeUrl, join(dir, `${n}.log`), { ...env, ...envOf(n) }));
  const stopAgents = () => Promise.all(agents.map((a) => a.stop())).then(() => undefined);
  try {
    await Promise.race([Promise.all(agents.map((a) => a.ready)), sleep(30_000).then(() => Promise.reject(new Error("agents not ready after 30 s")))]);
  } catch (err) {
    await stopAgents();
    throw err;
  }
  const app = new Database(join(inst.A, "app.db"), { timeout: 5000 });
  const insert = app.prepare("INSERT INTO pings(id, sent_ms, note) VALUES (?, ?, ?)");
  const watcher = new Database(join(inst.B, "app.db"), { readonly: true });
  const newer = watcher.prepare("SELECT id FROM pings WHERE id > ? ORDER BY id").pluck();
  const sent = new Map<number, number>();
  const seenAt = new Map<number, number>();
  let last = 0;
  const poll = setInterval(() => {
    const ids = newer.all(last) as number[];
    const now = performance.now();
    for (const id of ids) seenAt.set(id, now);
    if (ids.length) last = ids[ids.length - 1];
  }, 5);
  const pair: Pair = {
    write(id) {
      sent.set(id, performance.now());
      insert.run(id, Date.now(), `sample ${id}`);
    },
    async seen(id, timeoutMs) {
      await waitFor(`row ${id} on node B`, () => seenAt.has(id), timeoutMs);
      return (seenAt.get(id) as number) - (sent.get(id) as number);
    },
    errors: () => agents.flatMap((a) => a.errors),
    hintsReceived: async () => (await agentStatus(agents[1]!)).tailing.hintsReceived,
    async stop() {
      clearInterval(poll);
      app.close();
      watcher.close();
      await stopAgents();
    },
  };
  // Warm-up: B learns of origin A from A's first index pointer.
  try {
    pair.write(1);
    await pair.seen(1, 30_000);
  } catch (err) {
    await pair.stop();
    throw err;
  }
  return pair;
}

/** A steady app: a row every 100-200 ms (the cluster is busy, polls at pollMinMs); latencies in ms. */
async function measure(ctx: Ctx, kind: string, storeUrl: string, env: Record<string, string>, samples: number, envOf?: (n: "A" | "B") => Record<string, string>) {
  const pair = await startPair(ctx, kind, storeUrl, env, envOf);
  try {
    for (let i = 0; i < samples; i++) {
      pair.write(i + 2);
      await sleep(100 + Math.random() * 100);
    }
    const latencies: number[] = [];
    for (let i = 0; i < samples; i++) latencies.push(await pair.seen(i + 2, 30_000));
    return { latencies, errors: pair.errors(), hintsReceived: await pair.hintsReceived() };
  } finally {
    await pair.stop();
  }
}

/**
 * The first change after a pair has been idle (B backed off to pollMaxMs):
 * starts `pairs` pairs side by side; `sample` then takes `perPair` samples on
 * each, one every idleMs + 0-2 s (latencies in ms). Stopped apart from
 * sampling, so that a run beside them is not disturbed by their shutdown.
 */
async function startIdleFirst(ctx: Ctx, kind: string, storeUrl: (i: number) => string, pairs: number, envOf?: () => Promise<(n: "A" | "B") => Record<string, string>>) {
  const started: Pair[] = [];
  const stop = () => Promise.all(started.map((p) => p.stop())).then(() => undefined);
  try {
    for (let i = 0; i < pairs; i++) started.push(await startPair(ctx, `${kind}-${i}`, storeUrl(i), {}, envOf ? await envOf() : undefined));
  } catch (err) {
    await stop();
    throw err;
  }
  const sample = async (perPair: number, idleMs: number) => {
    const done = await Promise.all(
      started.map(async (pair) => {
        const out: number[] = [];
        for (let s = 0; s < perPair; s++) {
          await sleep(idleMs + Math.random() * 2000);
          pair.write(s + 2);
          out.push(await pair.seen(s + 2, 30_000));
        }
        return { latencies: out, errors: pair.errors(), hintsReceived: await pair.hintsReceived() };
      }),
    );
    return { latencies: done.flatMap((d) => d.latencies), errors: done.flatMap((d) => d.errors), hintsReceived: done.reduce((n, d) => n + d.hintsReceived, 0) };
  };
  return { sample, stop };
}

/**
 * Both agents of a pair listen for LAN hints on their own UDP port and send
 * them to the other at `host` (127.0.0.1).
 */
async function hintEnv(host = "127.0.0.1"): Promise<(n: "A" | "B") => Record<string, string>> {
  const port = { A: await freeUdpPort(), B: await freeUdpPort() };
  return (n) => ({
    UNISYNC_HINT_PORT: String(port[n]),
    UNISYNC_HINT_PEERS: `${host}:${port[n === "A" ? "B" : "A"]}`,
    UNISYNC_HINT_SECRET: HINT_SECRET,
  });
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

/** Raw request times of an S3 server (baseline): PUT and LIST one after the other, PUT throughput with 8 in flight. */
async function s3Baseline(endpoint: string, bucket: string, creds: { AWS_ACCESS_KEY_ID: string; AWS_SECRET_ACCESS_KEY: string }, throughputTotal: number) {
  const small = Buffer.alloc(1024, 7);
  const client = new S3Client({
    region: "us-east-1",
    endpoint,
    forcePathStyle: true,
    credentials: { accessKeyId: creds.AWS_ACCESS_KEY_ID, secretAccessKey: creds.AWS_SECRET_ACCESS_KEY },
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
  });
  try {
    const put = (key: string) => client.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: small }));
    await timeMany(10, (i) => put(`warmup/${i}.bin`));
    const puts = await timeMany(100, (i) => put(`baseline/${String(i).padStart(4, "0")}.bin`));
    const lists = await timeMany(50, () => client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: "baseline/", MaxKeys: 17 })));
    let next = 0;
    const t = performance.now();
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < throughputTotal) await put(`throughput/${next++}.bin`);
      }),
    );
    const putsPerS = throughputTotal / ((performance.now() - t) / 1000);
    return { putP50: percentile(puts, 50), putP99: percentile(puts, 99), listP50: percentile(lists, 50), listP99: percentile(lists, 99), putsPerS, throughputTotal };
  } finally {
    client.destroy();
  }
}

type Baseline = Awaited<ReturnType<typeof s3Baseline>>;

/** The rows of one S3 server's steady run (and its baseline). */
function s3Rows(name: string, r: { latencies: number[]; errors: string[] }, b: Baseline, samples: number, extra: Record<string, unknown> = {}): Result[] {
  const detail = { ...extra, samples, errors: r.errors, rawPutMs: { p50: b.putP50, p99: b.putP99 }, rawListMs: { p50: b.listP50, p99: b.listP99 }, putsPerS: b.putsPerS, latenciesMs: r.latencies };
  const server = name.split("-")[0];
  return [
    result({ name: `latency.${name}.p50`, value: percentile(r.latencies, 50), unit: "ms", baseline: b.putP50, baselineLabel: "raw S3 PUT p50", target: { on: "value", op: "<", limit: 500 }, detail }),
    result({ name: `latency.${name}.p99`, value: percentile(r.latencies, 99), unit: "ms", baseline: b.putP50, baselineLabel: "raw S3 PUT p50", target: { on: "value", op: "<", limit: 2000 } }),
    ...(name === server
      ? [
          result({ name: `${server}.raw_put.p50`, value: b.putP50, unit: "ms", detail: { p99: b.putP99 } }),
          result({ name: `${server}.raw_list.p50`, value: b.listP50, unit: "ms" }),
          result({ name: `${server}.put_throughput`, value: b.putsPerS, unit: "PUT/s", detail: { concurrency: 8, total: b.throughputTotal } }),
        ]
      : []),
  ];
}

export const latency: Bench = {
  name: "latency",
  title: "change-to-visible latency (two agent processes, app on A, watcher on B; file store, s3rver, moto, LAN hints, first change after idle)",
  async run(ctx: Ctx): Promise<Result[]> {
    const samples = ctx.quick ? 20 : 100;
    const results: Result[] = [];

    // First change after idle: several pairs side by side, each waiting IDLE_MS
    // between samples, in the background while the steady runs go one by one
    // (idle agents cost next to no CPU). Started (and warmed up) before and
    // stopped after the steady runs, so that 18 agents starting or stopping
    // never overlap a steady run. Without hints, and with hints to "127.0.0.1:port".
    const idlePairs = ctx.quick ? 1 : 3;
    const idlePerPair = ctx.quick ? 1 : 4;
    const idleStore = (label: string) => (i: number) => `file://${ctx.tmp(`latency-${label}-${i}-store`)}`;
    const idleRuns: { name: string; pairs: Awaited<ReturnType<typeof startIdleFirst>> }[] = [];
    const idleSampling: Promise<{ latencies: number[]; errors: string[]; hintsReceived: number }>[] = [];
    try {
      idleRuns.push({ name: "idle_first.file", pairs: await startIdleFirst(ctx, "idle", idleStore("idle"), idlePairs) });
      idleRuns.push({ name: "idle_first.file-hints", pairs: await startIdleFirst(ctx, "idle-hints", idleStore("idle-hints"), idlePairs, () => hintEnv()) });
      for (const x of idleRuns) idleSampling.push(x.pairs.sample(idlePerPair, IDLE_MS));
      for (const p of idleSampling) p.catch(() => undefined); // awaited below; no unhandled rejection meanwhile
      results.push(...(await steadyRuns(ctx, samples)));
      for (const [i, x] of idleRuns.entries()) {
        const r = await idleSampling[i]!;
        ctx.log(`latency ${x.name} (first change after >= ${IDLE_MS / 1000} s idle, ${r.latencies.length} samples): ${fmt(r.latencies)}; B accepted ${r.hintsReceived} hints`);
        const detail = { samples: r.latencies.length, pairs: idlePairs, idleMs: IDLE_MS, hintsReceived: r.hintsReceived, errors: r.errors, latenciesMs: r.latencies };
        results.push(
          result({ name: `latency.${x.name}.p50`, value: percentile(r.latencies, 50), unit: "ms", target: { on: "value", op: "<", limit: 500 }, detail }),
          result({ name: `latency.${x.name}.p99`, value: percentile(r.latencies, 99), unit: "ms", target: { on: "value", op: "<", limit: 2000 } }),
        );
      }
    } finally {
      await Promise.allSettled(idleSampling);
      await Promise.all(idleRuns.map((x) => x.pairs.stop()));
    }
    return results;
  },
};

/** The steady runs, one after the other: file store, s3rver, moto, moto with LAN hints. */
async function steadyRuns(ctx: Ctx, samples: number): Promise<Result[]> {
  const results: Result[] = [];

  // File store.
  const fileRoot = ctx.tmp("latency-store");
  const fs = new FileStore(fileRoot);
  const small = Buffer.alloc(1024, 7);
  const filePut = await timeMany(50, (i) => fs.put(`baseline/${i}.bin`, small));
  const file = await measure(ctx, "file", `file://${fileRoot}`, {}, samples);
  const filePutP50 = percentile(filePut, 50);
  const fileDetail = { samples, errors: file.errors, rawPutMs: { p50: filePutP50, p99: percentile(filePut, 99) }, latenciesMs: file.latencies };
  ctx.log(`latency file: ${fmt(file.latencies)}; raw put p50 ${filePutP50.toFixed(2)} ms`);
  results.push(
    result({ name: "latency.file.p50", value: percentile(file.latencies, 50), unit: "ms", baseline: filePutP50, baselineLabel: "raw file put p50", target: { on: "value", op: "<", limit: 500 }, detail: fileDetail }),
    result({ name: "latency.file.p99", value: percentile(file.latencies, 99), unit: "ms", baseline: filePutP50, baselineLabel: "raw file put p50", target: { on: "value", op: "<", limit: 2000 } }),
  );

  // s3rver (ignores If-None-Match: no seq claims).
  const s3 = await startS3rverProcess();
  try {
    await s3Steady(ctx, "s3rver", s3, S3RVER_ENV, ctx.quick ? 200 : 800, samples, results);
  } finally {
    await s3.stop();
  }

  // moto (enforces If-None-Match: each segment is claimed first), without and with LAN hints.
  const moto = await startMoto("unisync-bench");
  try {
    const b = await s3Steady(ctx, "moto", moto, MOTO_ENV, ctx.quick ? 100 : 400, samples, results);
    // A busy cluster polls every pollMinMs anyway: hints can only help between polls further apart.
    const h = await measure(ctx, "moto-hints", s3Url(moto.endpoint, moto.bucket, "latency-hints"), { ...MOTO_ENV }, samples, await hintEnv());
    ctx.log(`latency moto with LAN hints: ${fmt(h.latencies)}; B accepted ${h.hintsReceived} hints`);
    results.push(...s3Rows("moto-hints", h, b, samples, { hintsReceived: h.hintsReceived }));
  } finally {
    await moto.stop();
  }
  return results;
}
