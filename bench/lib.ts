/**
 * Shared pieces of the benchmarks: the result shape, the app-like table, tmp
 * folders, a DbSync built the way the agent builds one, agent processes and
 * /proc sampling.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createSocket } from "node:dgram";
import { createWriteStream, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import Database from "better-sqlite3";
import pino from "pino";
import { DEFAULTS } from "../src/agent/config.js";
import { DbSync } from "../src/stream/dbsync.js";
import { Metrics } from "../src/stream/metrics.js";
import { HybridClock } from "../src/log/hlc.js";
import { packageRoot } from "../src/log/paths.js";
import type { ObjectStore, RequestKind } from "../src/store/store.js";

export const ROOT = packageRoot();

export interface Target {
  /** Which number the target applies to. */
  on: "value" | "ratio";
  op: "<" | "<=" | ">" | ">=";
  limit: number;
}

export interface Result {
  name: string;
  value: number;
  unit: string;
  baseline?: number;
  /** What the baseline is (e.g. "no triggers", "raw insert"). */
  baselineLabel?: string;
  ratio?: number;
  target?: Target;
  pass?: boolean;
  detail?: Record<string, unknown>;
}

export interface Ctx {
  quick: boolean;
  full: boolean;
  keep: boolean;
  /** Progress lines (stderr), so stdout stays the table. */
  log: (msg: string) => void;
  /** A fresh temporary folder, removed at the end unless --keep. */
  tmp: (prefix: string) => string;
}

export interface Bench {
  name: string;
  title: string;
  run(ctx: Ctx): Promise<Result[]>;
}

/** Builds a result row; ratio = value / baseline; pass is decided by the target. */
export function result(r: Omit<Result, "ratio" | "pass">): Result {
  const ratio = r.baseline !== undefined && r.baseline !== 0 ? r.value / r.baseline : undefined;
  let pass: boolean | undefined;
  if (r.target) {
    const x = r.target.on === "ratio" ? ratio : r.value;
    if (x === undefined || !Number.isFinite(x)) pass = false;
    else {
      const { op, limit } = r.target;
      pass = op === "<" ? x < limit : op === "<=" ? x <= limit : op === ">" ? x > limit : x >= limit;
    }
  }
  return { ...r, ratio, pass };
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export function makeTmpFactory(keep: boolean): { tmp: (prefix: string) => string; cleanup: () => void } {
  const made: string[] = [];
  return {
    tmp(prefix) {
      const d = mkdtempSync(join(tmpdir(), `unisync-bench-${prefix}-`));
      made.push(d);
      return d;
    },
    cleanup() {
      if (keep) return;
      for (const d of made) rmSync(d, { recursive: true, force: true });
    },
  };
}

export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const idx = Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1));
  return s[idx];
}

export function median(values: number[]): number {
  return percentile(values, 50);
}

// ---------------------------------------------------------------------------
// The app-like table: 7 columns of mixed types (bench/capture_app.py has the same).

export const ITEMS_SCHEMA = `CREATE TABLE items(
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  email TEXT,
  score REAL,
  visits INTEGER NOT NULL DEFAULT 0,
  avatar BLOB,
  created_at TEXT NOT NULL
)`;

export const ITEMS_INSERT = "INSERT INTO items(id, name, email, score, visits, avatar, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)";

export type ItemRow = [number, string, string | null, number, number, Buffer | null, string];

/** Deterministic row i (1-based): ~110 bytes of mixed text, real, integer and a 24-byte blob. */
export function itemRow(i: number): ItemRow {
  const avatar = Buffer.allocUnsafe(24);
  let x = (i * 2654435761) >>> 0;
  for (let j = 0; j < 24; j++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    avatar[j] = x & 0xff;
  }
  return [
    i,
    `user-${String(i).padStart(7, "0")}`,
    i % 10 === 0 ? null : `user${i}@example.com`,
    (i * 0.37) % 1000,
    i % 1000,
    i % 7 === 0 ? null : avatar,
    new Date(1_700_000_000_000 + i * 1000).toISOString(),
  ];
}

/** An empty database in WAL mode (what the agent switches it to anyway) with the given schema. */
export function createDb(path: string, schema = ITEMS_SCHEMA): void {
  const db = new Database(path);
  db.pragma("journal_mode = WAL");
  db.exec(schema);
  db.close();
}

/** Inserts rows [from, to] in transactions of `batch`, with a prepared statement. */
export function insertItems(db: Database.Database, from: number, to: number, batch: number, rows?: ItemRow[]): void {
  const stmt = db.prepare(ITEMS_INSERT);
  const tx = db.transaction((a: number, b: number) => {
    for (let i = a; i <= b; i++) stmt.run(rows ? rows[i - from] : itemRow(i));
  });
  for (let a = from; a <= to; a += batch) tx(a, Math.min(to, a + batch - 1));
}

const silent = pino({ level: "silent" });

/** A DbSync configured like the agent's (default batch sizes, WAL, busy timeout). */
export function openDbSync(path: string, node: string, store: ObjectStore, stream = "app.db"): DbSync {
  return new DbSync({
    path,
    stream,
    node,
    store,
    clock: new HybridClock(),
    log: silent,
    metrics: new Metrics(),
    excludeTables: DEFAULTS.excludeTables,
    maxRecords: DEFAULTS.batchMaxRecords,
    maxBytes: DEFAULTS.batchMaxBytes,
    busyTimeoutMs: DEFAULTS.busyTimeoutMs,
    walMode: DEFAULTS.walMode,
  });
}

// ---------------------------------------------------------------------------
// Processes.

export const S3RVER_ENV = { AWS_ACCESS_KEY_ID: "S3RVER", AWS_SECRET_ACCESS_KEY: "S3RVER" } as const;

export interface AgentProcess {
  name: string;
  pid: number;
  child: ChildProcess;
  /** Resolves when the agent logged that it is running (triggers installed, loops started). */
  ready: Promise<void>;
  /** Error-level log lines seen so far. */
  errors: string[];
  /** The status page's base URL ("http://127.0.0.1:PORT/"), once the agent logged it. */
  readonly statusUrl: string | undefined;
  stop(): Promise<number | null>;
}

/** Starts `unisync run DIR STORE --node NAME --http-port 0`; logs go to DIR/../NAME.log. */
export function startAgent(name: string, instanceDir: string, storeUrl: string, logFile: string, env: Record<string, string> = {}): AgentProcess {
  const child = spawn(process.execPath, [join(ROOT, "bin", "unisync.js"), "run", instanceDir, storeUrl, "--node", name, "--http-port", "0"], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const out = createWriteStream(logFile);
  const errors: string[] = [];
  let statusUrl: string | undefined;
  let exited = false;
  const exit = new Promise<number | null>((resolve) => child.once("exit", (code) => ((exited = true), resolve(code))));
  const ready = new Promise<void>((resolve, reject) => {
    let buf = "";
    child.stdout!.on("data", (chunk: Buffer) => {
      out.write(chunk);
      buf += chunk.toString();
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        try {
          const j = JSON.parse(line) as { level?: number; msg?: string; url?: unknown };
          if (typeof j.url === "string") statusUrl = j.url;
          if (typeof j.url === "string" || j.msg?.startsWith("status page not started")) resolve();
          if ((j.level ?? 0) >= 50) errors.push(line);
        } catch {
          // not JSON
        }
      }
    });
    child.stderr!.on("data", (chunk: Buffer) => out.write(chunk));
    void exit.then((code) => reject(new Error(`agent ${name} exited with ${code} before it was ready; see ${logFile}`)));
  });
  ready.catch(() => undefined);
  return {
    name,
    pid: child.pid as number,
    child,
    ready,
    errors,
    get statusUrl() {
      return statusUrl;
    },
    async stop() {
      if (!exited) child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 20_000);
      const code = await exit;
      clearTimeout(t);
      out.end();
      return code;
    },
  };
}

/** The parts of an agent's /status.json the benchmarks read (src/agent/agent.ts AgentStatus). */
export interface AgentStatusJson {
  databases: { stream: string; nextSeq: number; pendingChanges: number; outboxSegments: number; enrolling: boolean }[];
  files?: { nextSeq: number; pendingChanges: number; outboxSegments: number };
  storeRequests: { total: Record<RequestKind, number>; conditionalWrites: string };
  tailing: { indexPolls: number; pollIntervalMs: number; listings: Record<string, number>; hintsReceived: number };
}

/** An agent's /status.json (it needs --http-port 0, as startAgent passes). */
export async function agentStatus(a: AgentProcess): Promise<AgentStatusJson> {
  if (!a.statusUrl) throw new Error(`agent ${a.name} has not logged its status page URL`);
  const res = await fetch(`${a.statusUrl}status.json`, { signal: AbortSignal.timeout(10_000) });
  if (!res.ok) throw new Error(`agent ${a.name}: status.json answered ${res.status}`);
  return (await res.json()) as AgentStatusJson;
}

/** A UDP port free on 127.0.0.1 right now (for LAN hints between agents). */
export async function freeUdpPort(): Promise<number> {
  const sock = createSocket("udp4");
  await new Promise<void>((resolve) => sock.bind(0, "127.0.0.1", resolve));
  const { port } = sock.address();
  await new Promise<void>((resolve) => sock.close(() => resolve()));
  return port;
}

/** VmRSS and VmHWM (peak RSS) of a process, in MB; null when it is gone. */
export function procMemory(pid: number): { rssMb: number; hwmMb: number } | null {
  try {
    const text = readFileSync(`/proc/${pid}/status`, "utf8");
    const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? NaN);
    return { rssMb: kb("VmRSS") / 1024, hwmMb: kb("VmHWM") / 1024 };
  } catch {
    return null;
  }
}

/** Starts s3rver in a child process (so its request handling does not share our event loop). */
export async function startS3rverProcess(): Promise<{ endpoint: string; bucket: string; pid: number; stop(): Promise<void> }> {
  const child = spawn(process.execPath, [join(ROOT, "dist", "bench", "s3rver-server.js")], { stdio: ["ignore", "pipe", "inherit"] });
  const exit = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const info = await new Promise<{ endpoint: string; bucket: string }>((resolve, reject) => {
    let buf = "";
    child.stdout!.on("data", (c: Buffer) => {
      buf += c.toString();
      const nl = buf.indexOf("\n");
      if (nl >= 0) resolve(JSON.parse(buf.slice(0, nl)) as { endpoint: string; bucket: string });
    });
    void exit.then(() => reject(new Error("s3rver exited before it was ready")));
  });
  return {
    ...info,
    pid: child.pid as number,
    async stop() {
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 10_000);
      await exit;
      clearTimeout(t);
    },
  };
}

export function s3Url(endpoint: string, bucket: string, prefix: string): string {
  return `s3://${bucket}/${prefix}?endpoint=${encodeURIComponent(endpoint)}&path_style=true`;
}
