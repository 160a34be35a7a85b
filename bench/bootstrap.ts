/**
 * Bootstrap of a new node: node A holds a database of N rows (items table) and
 * a folder of small files, syncs them to an S3 store (s3rver in its own
 * process) and takes a snapshot; then node B starts with an empty folder and
 * starts from that snapshot. Measured: B's bootstrap time (from the agent's
 * "starting" log line to "bootstrap done", both stamped by the agent), its
 * peak RSS (VmHWM), and as the baseline the raw download of the same objects
 * (manifest, database copy, folder state and manifest, every file blob, any
 * segment after the vector) from the same store, 16 GETs in flight.
 * Sizes: N = 200k rows by default, 1M with --full, 20k with --quick; 10,000
 * files of ~1 KB (1,000 with --quick).
 */
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import Database from "better-sqlite3";
import { listOrigins, listStreams, parseSegmentKey, seqFloorKey, streamPrefix } from "../src/log/keys.js";
import { listSnapshots, partBlobs, readManifest, type FileEntry } from "../src/snapshot/format.js";
import { fetchBlob } from "../src/log/blobs.js";
import { listAll } from "../src/store/store.js";
import { openStore } from "../src/store/url.js";
import { createDb, insertItems, procMemory, result, ROOT, S3RVER_ENV, s3Url, sleep, startAgent, startS3rverProcess, type Bench, type Ctx, type Result } from "./lib.js";

const run = promisify(execFile);

/** The agent's status page URL, from its log. */
async function statusUrl(logFile: string): Promise<string> {
  for (let i = 0; i < 200; i++) {
    const m = /"url":"(http:\/\/[^"]+)"/.exec(existsSync(logFile) ? readFileSync(logFile, "utf8") : "");
    if (m) return m[1];
    await sleep(50);
  }
  throw new Error(`no status URL in ${logFile}`);
}

interface Status {
  databases: { nextSeq: number; pendingChanges: number; outboxSegments: number }[];
  files?: { nextSeq: number; pendingChanges: number; outboxSegments: number };
}

/** Waits until A has sealed and uploaded everything (baseline and every file) and nothing moved for 2 s. */
async function waitUploaded(url: string, ctx: Ctx, timeoutMs: number, fileSegments: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  let stableSince = Date.now();
  for (;;) {
    const s = (await (await fetch(`${url}status.json`)).json()) as Status;
    const all = [...s.databases, ...(s.files ? [s.files] : [])];
    const key = JSON.stringify(all.map((x) => x.nextSeq));
    const idle = all.every((x) => x.pendingChanges === 0 && x.outboxSegments === 0) && (s.files?.nextSeq ?? 1) > fileSegments;
    if (key !== last || !idle) {
      last = key;
      stableSince = Date.now();
    } else if (Date.now() - stableSince > 2000) return;
    if (Date.now() > deadline) throw new Error(`node A still uploading after ${timeoutMs} ms: ${JSON.stringify(s)}`);
    ctx.log(`bootstrap: node A uploading (segments ${key})`);
    await sleep(1000);
  }
}

function countFiles(dir: string): number {
  let n = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (e.name === ".unisync" || e.name.startsWith("app.db")) continue;
    n += e.isDirectory() ? countFiles(join(dir, e.name)) : 1;
  }
  return n;
}

/** Resolves with the pino `time` of the first log line whose msg matches. */
async function logTime(logFile: string, msg: string, timeoutMs: number, onWait: () => void): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = existsSync(logFile) ? readFileSync(logFile, "utf8") : "";
    for (const line of text.split("\n")) {
      if (!line.includes(msg)) continue;
      try {
        const j = JSON.parse(line) as { msg?: string; time?: number };
        if (j.msg === msg && typeof j.time === "number") return j.time;
      } catch {
        // partial line
      }
    }
    if (Date.now() > deadline) throw new Error(`"${msg}" not logged within ${timeoutMs} ms; see ${logFile}`);
    onWait();
    await sleep(100);
  }
}

export const bootstrap: Bench = {
  name: "bootstrap",
  title: "new node starting from a snapshot: N rows + small files, vs raw download of the same bytes (s3rver)",
  async run(ctx: Ctx): Promise<Result[]> {
    const n = ctx.quick ? 20_000 : ctx.full ? 1_000_000 : 200_000;
    const nFiles = ctx.quick ? 1_000 : 10_000;
    const dir = ctx.tmp("bootstrap");
    const s3 = await startS3rverProcess();
    const url = s3Url(s3.endpoint, s3.bucket, "boot");
    Object.assign(process.env, S3RVER_ENV);
    const env = { ...S3RVER_ENV, UNISYNC_SNAPSHOT_INTERVAL_MS: "0" };
    const a = join(dir, "a");
    const b = join(dir, "b");
    mkdirSync(a);
    mkdirSync(b);
    try {
      // Node A: rows and files exist before unisync (enrolment records them as a baseline).
      createDb(join(a, "app.db"));
      const db = new Database(join(a, "app.db"));
      insertItems(db, 1, n, 10_000);
      db.close();
      for (let i = 0; i < nFiles; i++) {
        const sub = join(a, `docs/d${String(i % 100).padStart(2, "0")}`);
        if (i < 100) mkdirSync(sub, { recursive: true });
        writeFileSync(join(sub, `f${i}.txt`), `file ${i}\n`.repeat(100 + (i % 20)));
      }
      ctx.log(`bootstrap: node A has ${n} rows and ${nFiles} files; syncing them to s3rver`);
      const agentA = startAgent("A", a, url, join(dir, "A.log"), env);
      let snapshotKey: string;
      try {
        await agentA.ready;
        await waitUploaded(await statusUrl(join(dir, "A.log")), ctx, ctx.full ? 1800_000 : 600_000, Math.ceil(nFiles / 1000));
        const snap = await run(process.execPath, [join(ROOT, "bin", "unisync.js"), "snapshot", a, "--json"], { env: { ...process.env, ...env } });
        snapshotKey = (JSON.parse(snap.stdout) as { key: string }).key;
        ctx.log(`bootstrap: snapshot ${snapshotKey}`);
      } finally {
        await agentA.stop();
      }
      await sleep(1000);

      // Node B: empty folder, starts from the snapshot.
      const t0 = performance.now();
      const agentB = startAgent("B", b, url, join(dir, "B.log"), env);
      let peakSampled = 0;
      let bootMs: number;
      let wallMs: number;
      let hwm: number;
      try {
        const sample = () => (peakSampled = Math.max(peakSampled, procMemory(agentB.pid)?.rssMb ?? 0));
        let lastLog = Date.now();
        const done = await logTime(join(dir, "B.log"), "bootstrap done; capturing and syncing", ctx.full ? 1800_000 : 600_000, () => {
          sample();
          if (Date.now() - lastLog > 10_000) {
            lastLog = Date.now();
            ctx.log(`bootstrap: node B bootstrapping, ${((performance.now() - t0) / 1000).toFixed(0)} s, RSS ${peakSampled.toFixed(0)} MB so far`);
          }
        });
        wallMs = performance.now() - t0;
        const started = await logTime(join(dir, "B.log"), "starting unisync agent", 1000, () => undefined);
        bootMs = done - started;
        hwm = procMemory(agentB.pid)?.hwmMb ?? NaN;
      } finally {
        await agentB.stop();
      }
      const replica = new Database(join(b, "app.db"), { readonly: true });
      const rows = replica.prepare("SELECT count(*) FROM items").pluck().get() as number;
      replica.close();
      const files = countFiles(b);
      if (rows !== n || files !== nFiles) throw new Error(`node B has ${rows} rows and ${files} files after bootstrap, expected ${n} and ${nFiles}`);

      // Baseline: GET the same objects, 16 in flight, bytes discarded.
      const store = openStore(url);
      const ref = (await listSnapshots(store)).find((r) => r.key === snapshotKey)!;
      const m = await readManifest(store, ref);
      const keys = [ref.key, ...partBlobs(m).map((p) => `blobs/${p.sha256}`)];
      const entries = JSON.parse((await fetchBlob(store, m.files!.manifest.sha256, m.files!.manifest.size)).toString("utf8")) as FileEntry[];
      for (const e of new Set(entries.map((x) => x.sha256))) keys.push(`blobs/${e}`);
      const vectors = new Map<string, Record<string, number>>([...m.databases.map((d) => [d.stream, d.vector] as const), ...(m.files ? [[".files", m.files.vector] as const] : [])]);
      for (const origin of await listOrigins(store)) {
        for (const stream of await listStreams(store, origin)) {
          const after = vectors.get(stream)?.[origin] ?? 0;
          for await (const o of listAll(store, streamPrefix(origin, stream), `${seqFloorKey(origin, stream, after)}~`)) if (parseSegmentKey(o.key)) keys.push(o.key);
        }
      }
      let bytes = 0;
      const tr = performance.now();
      for (let i = 0; i < keys.length; i += 16) {
        await Promise.all(
          keys.slice(i, i + 16).map(async (k) => {
            bytes += (await store.get(k))?.length ?? 0;
          }),
        );
      }
      const rawMs = performance.now() - tr;
      ctx.log(
        `bootstrap: ${n} rows + ${nFiles} files: bootstrap ${(bootMs / 1000).toFixed(2)} s (process start to done ${(wallMs / 1000).toFixed(2)} s), ` +
          `raw download of the same ${keys.length} objects (${(bytes / 2 ** 20).toFixed(1)} MB) ${(rawMs / 1000).toFixed(2)} s; B peak RSS ${hwm.toFixed(0)} MB`,
      );
      return [
        result({
          name: "bootstrap.time",
          value: bootMs / 1000,
          unit: "s",
          baseline: rawMs / 1000,
          baselineLabel: "raw GET of same objects",
          target: { on: "ratio", op: "<=", limit: 2 },
          detail: { rows: n, files: nFiles, objects: keys.length, bytes, wallMs, rawMs, bootMs, errors: agentB.errors },
        }),
        result({
          name: "bootstrap.agent_peak_rss",
          value: hwm,
          unit: "MB",
          target: { on: "value", op: "<", limit: 300 },
          detail: { maxSampledMb: peakSampled },
        }),
      ];
    } finally {
      await s3.stop();
    }
  },
};
