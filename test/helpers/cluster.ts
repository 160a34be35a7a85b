/**
 * Multi-process test cluster: N unisync agents (`node bin/unisync.js run ...`),
 * each beside its own instance folder under one temp root, sharing one store.
 * Every child process (agents and the Python apps) is tracked in one registry
 * so that killAllChildren() in afterAll — and, as a last resort, this process's
 * 'exit' handler — SIGKILLs whatever is still running, even after a failure.
 *
 * Agents log JSON lines (pino) straight into ROOT/<node>/agent.log: the child
 * writes to the file itself, so the log is complete even if it is killed -9.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import Database from "better-sqlite3";
import { compareDatabases } from "./checker.js";
import { afterAll, beforeAll } from "vitest";
import { S3RVER_ENV, s3StoreUrl, startS3rver, type S3rverHandle } from "./s3rver.js";
import { MOTO_ENV, startMoto, type MotoHandle } from "./moto.js";

export const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
/** The launcher under test; UNISYNC_TEST_CLI points the tests at another build (e.g. a patched copy). */
export const CLI = process.env.UNISYNC_TEST_CLI ?? join(REPO, "bin", "unisync.js");
export const APPS = join(REPO, "test", "apps");
/** Debian's interpreter: the one with python3-flask-sqlalchemy. */
export const PYTHON = "/usr/bin/python3";

/** Fast polling so tests do not wait on production intervals. */
export const FAST_ENV: Record<string, string> = {
  UNISYNC_CAPTURE_INTERVAL_MS: "20",
  UNISYNC_POLL_MIN_MS: "50",
  UNISYNC_POLL_MAX_MS: "300",
  UNISYNC_RESCAN_MS: "200",
  UNISYNC_HEARTBEAT_MS: "2000",
};

export function ensureBuilt(): void {
  const main = join(dirname(CLI), "..", "dist", "src", "cli", "main.js");
  if (!existsSync(main)) {
    throw new Error(`${main} is missing: the cluster tests run the built agent. Run "npm run build" first (npm test does it).`);
  }
}

// ---------------------------------------------------------------------------
// Child registry

const children = new Set<ChildProcess>();

function track(proc: ChildProcess): void {
  children.add(proc);
  proc.once("exit", () => children.delete(proc));
}

/** SIGKILLs every child this module started that is still running (for afterAll). */
export async function killAllChildren(): Promise<void> {
  const running = [...children];
  await Promise.all(
    running.map(
      (p) =>
        new Promise<void>((resolve) => {
          if (p.exitCode !== null || p.signalCode !== null) return resolve();
          p.once("exit", () => resolve());
          try {
            p.kill("SIGKILL");
          } catch {
            resolve();
          }
        }),
    ),
  );
}

process.on("exit", () => {
  for (const p of children) {
    try {
      p.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
});

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Polls `condition` (sync or async) until it returns true; throws after `timeoutMs`. */
export async function waitFor(
  condition: () => boolean | Promise<boolean>,
  timeoutMs: number,
  what = "condition",
  intervalMs = 100,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      if (await condition()) return;
      lastError = undefined;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastError ? `: ${(lastError as Error).message}` : ""}`);
    }
    await sleep(intervalMs);
  }
}

function tail(path: string, lines: number): string {
  if (!existsSync(path)) return "(no log)";
  const all = readFileSync(path, "utf8").split("\n");
  return all.slice(-lines - 1).join("\n");
}

// ---------------------------------------------------------------------------
// Python apps

export interface AppRun {
  proc: ChildProcess;
  /** Resolves when it exits (never rejects): exit code/signal and stderr. */
  done: Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>;
}

/** Starts test/apps/<script> with /usr/bin/python3; stdout+stderr also go to logFile if given. */
export function runApp(script: string, args: string[], logFile?: string): AppRun {
  const proc = spawn(PYTHON, [join(APPS, script), ...args], { stdio: ["ignore", "pipe", "pipe"] });
  track(proc);
  let stderr = "";
  let out = "";
  proc.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve) => {
    proc.once("close", (code, signal) => {
      if (logFile) {
        const fd = openSync(logFile, "a");
        writeSync(fd, `### ${script} ${args.join(" ")} exited code=${code} signal=${signal}\n${out}${stderr}\n`);
        closeSync(fd);
      }
      resolve({ code, signal, stderr });
    });
  });
  return { proc, done };
}

/** Waits for an app and throws (with its stderr) unless it exited 0. */
export async function appSucceeded(run: AppRun, name: string): Promise<string> {
  const r = await run.done;
  if (r.code !== 0) throw new Error(`${name} exited with code ${r.code} signal ${r.signal}:\n${r.stderr.slice(-3000)}`);
  return r.stderr;
}

// ---------------------------------------------------------------------------
// Agents

export type { AgentStatus } from "../../src/agent/agent.js";
import type { AgentStatus } from "../../src/agent/agent.js";

export interface AgentNode {
  name: string;
  dir: string;
  instanceDir: string;
  logFile: string;
  proc: ChildProcess | null;
  /** Byte offset of the log where the current run started (to find its status URL). */
  logStart: number;
  statusUrl: string | null;
  starts: number;
  /** Set by stop()/kill9() just before signalling, so that exit is expected. */
  expectingExit: boolean;
}

export interface ClusterOptions {
  nodes: string[];
  store: string;
  /** Extra environment for the agents (on top of process.env, S3RVER_ENV, FAST_ENV). */
  env?: Record<string, string>;
  logLevel?: string;
  /** Runs after the folders exist and before any agent starts (e.g. key files of a secured cluster). */
  prepare?: (c: Cluster) => Promise<void>;
}

export class Cluster {
  readonly root: string;
  readonly nodes = new Map<string, AgentNode>();
  /** Agents that exited without stop()/kill9() asking them to (crashes), e.g. "n2 signal=SIGBUS". */
  readonly unexpectedExits: string[] = [];

  private constructor(readonly options: ClusterOptions) {
    ensureBuilt();
    this.root = mkdtempSync(join(tmpdir(), "unisync-cluster-"));
    for (const name of options.nodes) {
      const dir = join(this.root, name);
      const instanceDir = join(dir, "instance");
      mkdirSync(instanceDir, { recursive: true });
      this.nodes.set(name, { name, dir, instanceDir, logFile: join(dir, "agent.log"), proc: null, logStart: 0, statusUrl: null, starts: 0, expectingExit: false });
    }
  }

  /** Creates the folders and starts every agent, waiting until each serves its status page. */
  static async start(options: ClusterOptions): Promise<Cluster> {
    const c = new Cluster(options);
    await options.prepare?.(c);
    for (const name of options.nodes) c.spawnAgent(name);
    await Promise.all(options.nodes.map((n) => c.waitReady(n)));
    return c;
  }

  /** Adds a node to the running cluster and starts its agent; `fill` puts files in its instance folder first (else empty). */
  async addNode(name: string, timeoutMs = 60_000, fill?: (instanceDir: string) => void | Promise<void>): Promise<void> {
    if (this.nodes.has(name)) throw new Error(`node ${name} exists`);
    const dir = join(this.root, name);
    const instanceDir = join(dir, "instance");
    mkdirSync(instanceDir, { recursive: true });
    await fill?.(instanceDir);
    this.nodes.set(name, { name, dir, instanceDir, logFile: join(dir, "agent.log"), proc: null, logStart: 0, statusUrl: null, starts: 0, expectingExit: false });
    this.spawnAgent(name);
    await this.waitReady(name, timeoutMs);
  }

  node(name: string): AgentNode {
    const n = this.nodes.get(name);
    if (!n) throw new Error(`no node ${name}`);
    return n;
  }

  instance(name: string, file = ""): string {
    return join(this.node(name).instanceDir, file);
  }

  /** The same file in every node's instance folder. */
  paths(file: string): string[] {
    return [...this.nodes.values()].map((n) => join(n.instanceDir, file));
  }

  running(name: string): boolean {
    const p = this.node(name).proc;
    return p !== null && p.exitCode === null && p.signalCode === null;
  }

  private spawnAgent(name: string): void {
    const n = this.node(name);
    if (this.running(name)) throw new Error(`agent ${name} is already running`);
    n.starts++;
    n.logStart = existsSync(n.logFile) ? statSync(n.logFile).size : 0;
    n.statusUrl = null;
    n.expectingExit = false;
    const fd = openSync(n.logFile, "a");
    writeSync(fd, `### start #${n.starts} of ${name} at ${new Date().toISOString()}\n`);
    const args = [CLI, "run", n.instanceDir, this.options.store, "--node", name, "--http-port", "0"];
    if (this.options.logLevel) args.push("--log-level", this.options.logLevel);
    const proc = spawn(process.execPath, args, {
      cwd: n.dir,
      env: { ...process.env, ...S3RVER_ENV, ...FAST_ENV, ...this.options.env },
      stdio: ["ignore", fd, fd],
    });
    closeSync(fd);
    track(proc);
    proc.once("exit", (code, signal) => {
      if (!n.expectingExit) this.unexpectedExits.push(`${name} (start #${n.starts}) exited code=${code} signal=${signal} at ${new Date().toISOString()}`);
      try {
        const fd2 = openSync(n.logFile, "a");
        writeSync(fd2, `### ${name} exited code=${code} signal=${signal} at ${new Date().toISOString()}\n`);
        closeSync(fd2);
      } catch {
        // temp root already removed
      }
    });
    n.proc = proc;
  }

  /** Waits until the current run of the agent logged its status page URL. */
  async waitReady(name: string, timeoutMs = 20_000): Promise<void> {
    const n = this.node(name);
    await waitFor(
      () => {
        if (!this.running(name)) throw new Error(`agent ${name} exited during start-up:\n${tail(n.logFile, 30)}`);
        const text = readFileSync(n.logFile).subarray(n.logStart).toString("utf8");
        const m = /"url":"(http:\/\/[^"]+)"/.exec(text);
        if (m) n.statusUrl = m[1];
        return n.statusUrl !== null;
      },
      timeoutMs,
      `agent ${name} to start`,
      50,
    );
  }

  private async exited(proc: ChildProcess, timeoutMs: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (proc.exitCode !== null || proc.signalCode !== null) return { code: proc.exitCode, signal: proc.signalCode };
    return await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`process ${proc.pid} did not exit within ${timeoutMs} ms`)), timeoutMs);
      proc.once("exit", (code, signal) => {
        clearTimeout(t);
        resolve({ code, signal });
      });
    });
  }

  /** SIGTERM and wait for a clean exit; throws unless it exits with code 0. */
  async stop(name: string, timeoutMs = 20_000): Promise<void> {
    const n = this.node(name);
    const p = n.proc;
    if (!p || !this.running(name)) return;
    n.expectingExit = true;
    p.kill("SIGTERM");
    const r = await this.exited(p, timeoutMs).catch(async (err) => {
      p.kill("SIGKILL");
      throw new Error(`${(err as Error).message} after SIGTERM (killed it):\n${tail(n.logFile, 30)}`);
    });
    if (r.code !== 0) throw new Error(`agent ${name} exited with code ${r.code} signal ${r.signal} after SIGTERM:\n${tail(n.logFile, 30)}`);
  }

  /** kill -9, waiting until the process is gone. */
  async kill9(name: string): Promise<void> {
    const n = this.node(name);
    const p = n.proc;
    if (!p || !this.running(name)) return;
    n.expectingExit = true;
    p.kill("SIGKILL");
    await this.exited(p, 10_000);
  }

  /** Starts the agent again (stopping it first with SIGTERM if it still runs). */
  async restart(name: string): Promise<void> {
    if (this.running(name)) await this.stop(name);
    this.spawnAgent(name);
    await this.waitReady(name);
  }

  async stopAll(): Promise<void> {
    await Promise.all([...this.nodes.keys()].map((n) => this.stop(n)));
  }

  /** The agent's /status.json. */
  async status(name: string): Promise<AgentStatus> {
    const n = this.node(name);
    if (!n.statusUrl || !this.running(name)) throw new Error(`agent ${name} is not running`);
    const res = await fetch(`${n.statusUrl}status.json`, { signal: AbortSignal.timeout(5000) });
    if (!res.ok) throw new Error(`status of ${name}: HTTP ${res.status}`);
    return (await res.json()) as AgentStatus;
  }

  /** Runs random_writer.py on `nodes` at once (`ops` transactions each) and waits for them. */
  async writeRandom(nodes: string[], seed: number, ops: number, db = "data.db"): Promise<void> {
    const apps = nodes.map((name) => ({
      name,
      run: runApp("random_writer.py", [this.instance(name, db), "--node", name.slice(1), "--seed", String(seed), "--ops", String(ops), "--sleep-ms", "10"], join(this.node(name).dir, "apps.log")),
    }));
    for (const a of apps) await appSucceeded(a.run, `random_writer on ${a.name}`);
  }

  /**
   * Waits until the running nodes `names` have sent and applied everything of each
   * other for database `db` and the folder, and hold the same rows and files.
   * `noProblems` also requires that none reports a stopped stream.
   */
  async waitForAgreement(names: string[], db: string, timeoutMs: number, noProblems = false): Promise<void> {
    await waitFor(
      async () => {
        const st = await Promise.all(names.map((n) => this.status(n)));
        for (const [i, s] of st.entries()) {
          const d = s.databases.find((x) => x.stream === db);
          const f = s.files;
          if (!d || !f || d.pendingChanges || d.outboxSegments || d.parked || f.pendingChanges || f.outboxSegments || f.parked) return false;
          if (noProblems && (Object.keys(d.problems).length || Object.keys(f.problems).length)) return false;
          for (const [j, o] of st.entries()) {
            if (i === j) continue;
            if ((d.cursors[names[j]] ?? 0) !== (o.databases.find((x) => x.stream === db)?.nextSeq ?? 1) - 1) return false;
            if ((f.cursors[names[j]] ?? 0) !== (o.files?.nextSeq ?? 1) - 1) return false;
          }
        }
        const ref = JSON.stringify(syncedFileHashes(this.instance(names[0])));
        return names.every((n) => JSON.stringify(syncedFileHashes(this.instance(n))) === ref) && compareDatabases(names.map((n) => this.instance(n, db))).length === 0;
      },
      timeoutMs,
      `${names.join(",")} to converge`,
      300,
    );
  }

  /** A copy of `node`'s database `db` and its files' hashes, with the time just between them. */
  async recordState(node: string, db: string, label: string): Promise<{ at: string; db: string; files: Record<string, string> }> {
    const dir = join(this.root, "states");
    mkdirSync(dir, { recursive: true });
    await sleep(30);
    const copy = join(dir, `${label}.db`);
    const src = new Database(this.instance(node, db), { readonly: true });
    await src.backup(copy);
    src.close();
    const at = new Date().toISOString();
    await sleep(30);
    return { at, db: copy, files: syncedFileHashes(this.instance(node)) };
  }

  /**
   * Why the cluster is not quiescent yet (null when it is): every agent runs,
   * has nothing pending or in its outbox, parks nothing, reports no problem,
   * and has applied every other node's segments of every stream in `streams`.
   */
  async notQuiescent(streams: string[]): Promise<string | null> {
    const statuses = new Map<string, AgentStatus>();
    for (const name of this.nodes.keys()) {
      try {
        statuses.set(name, await this.status(name));
      } catch (err) {
        return `${name}: ${(err as Error).message}`;
      }
    }
    const dbOf = (s: AgentStatus, stream: string) => s.databases.find((d) => d.stream === stream);
    for (const [name, s] of statuses) {
      if (s.storeError) return `${name}: store error ${s.storeError}`;
      for (const stream of streams) {
        const d = dbOf(s, stream);
        if (!d) return `${name}: not syncing ${stream} yet`;
        if (d.pendingChanges || d.outboxSegments) return `${name}/${stream}: ${d.pendingChanges} pending, ${d.outboxSegments} in outbox`;
        if (d.parked) return `${name}/${stream}: ${d.parked} parked`;
        if (Object.keys(d.problems).length) return `${name}/${stream}: problems ${JSON.stringify(d.problems)}`;
        for (const [other, os] of statuses) {
          if (other === name) continue;
          const written = (dbOf(os, stream)?.nextSeq ?? 1) - 1;
          const applied = d.cursors[other] ?? 0;
          if (applied !== written) return `${name}/${stream}: applied ${other} through ${applied} of ${written}`;
        }
      }
    }
    return null;
  }

  /** Waits until notQuiescent() is null twice in a row (a short pause apart). */
  async waitForQuiescence(streams: string[], timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let why: string | null = "not checked";
    let quietOnce = false;
    while (Date.now() < deadline) {
      if (this.unexpectedExits.length) break;
      why = await this.notQuiescent(streams);
      if (why === null && quietOnce) return;
      quietOnce = why === null;
      await sleep(why === null ? 500 : 200);
    }
    const crashed = this.unexpectedExits.length ? ` (agents crashed: ${this.unexpectedExits.join("; ")})` : "";
    throw new Error(`cluster not quiescent after ${timeoutMs} ms: ${why}${crashed}\n${this.logTails()}`);
  }

  /** Polls compareDatabases(paths) until it reports no difference; throws with the differences and log tails. */
  async waitForConvergence(paths: string[], timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let diffs: string[] = [];
    for (;;) {
      try {
        diffs = compareDatabases(paths);
      } catch (err) {
        diffs = [`compareDatabases failed: ${(err as Error).message}`];
      }
      if (diffs.length === 0) return;
      if (Date.now() > deadline) break;
      await sleep(250);
    }
    throw new Error(
      `databases did not converge within ${timeoutMs} ms (${diffs.length} differences):\n` +
        `${diffs.slice(0, 40).join("\n")}\n${this.logTails()}`,
    );
  }

  logTails(lines = 25): string {
    return [...this.nodes.values()].map((n) => `--- tail of ${n.logFile}\n${tail(n.logFile, lines)}`).join("\n");
  }

  /** Log lines at level error or worse (pino level >= 50), and non-JSON output (crashes). */
  badLogLines(name?: string): string[] {
    const out: string[] = [];
    for (const n of this.nodes.values()) {
      if (name && n.name !== name) continue;
      if (!existsSync(n.logFile)) continue;
      for (const line of readFileSync(n.logFile, "utf8").split("\n")) {
        if (line.trim() === "" || line.startsWith("### ")) continue;
        let level: unknown;
        try {
          level = (JSON.parse(line) as { level?: unknown }).level;
        } catch {
          // stderr: Node warnings are fine (the AWS SDK warns about Node 20); crashes and stack traces are not.
          if (/\b(Error|error|FATAL|Aborted|Segmentation)\b|^\s+at /.test(line)) out.push(`${n.name}: (stderr) ${line}`);
          continue;
        }
        if (typeof level === "number" && level >= 50) out.push(`${n.name}: ${line}`);
      }
    }
    return out;
  }

  /** Parsed JSON log lines of one node (all runs). */
  logEntries(name: string): Record<string, unknown>[] {
    const n = this.node(name);
    if (!existsSync(n.logFile)) return [];
    return readFileSync(n.logFile, "utf8")
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .flatMap((l) => {
        try {
          return [JSON.parse(l) as Record<string, unknown>];
        } catch {
          return [];
        }
      });
  }

  /** Kills everything still running; removes the temp root unless KEEP_CLUSTER is set or keep is true. */
  async destroy(keep = !!process.env.KEEP_CLUSTER): Promise<void> {
    await killAllChildren();
    if (keep) console.log(`cluster files kept in ${this.root}`);
    else rmSync(this.root, { recursive: true, force: true });
  }
}

/** PRAGMA integrity_check of a database file ("ok" when fine). */
export function integrityCheck(path: string): string {
  const db = new Database(path, { readonly: true, fileMustExist: true });
  try {
    return (db.pragma("integrity_check") as { integrity_check: string }[]).map((r) => r.integrity_check).join("; ");
  } finally {
    db.close();
  }
}

/**
 * Set-up shared by the multi-agent test files: one S3 server for the file (s3rver,
 * or moto's, which enforces If-None-Match and lists correctly), started
 * before its tests. Afterwards every child is killed and the cluster's folders and
 * the store's data are removed, or kept (paths printed) with KEEP_CLUSTER=1 or when
 * a test sets `suite.keep = true` on failure.
 */
export function clusterSuite(server: "s3rver" | "moto" = "s3rver") {
  let s3: S3rverHandle | undefined;
  let moto: MotoHandle | undefined;
  const suite = {
    keep: !!process.env.KEEP_CLUSTER,
    cluster: undefined as Cluster | undefined,
    /** The credentials the suite's S3 server takes (the test's own store clients and CLI runs). */
    env: (server === "moto" ? MOTO_ENV : S3RVER_ENV) as Record<string, string>,
    /** A fresh prefix of the suite's bucket as a store URL. */
    storeUrl(prefix: string): string {
      const s = s3 ?? moto;
      if (!s) throw new Error(`${server} is not running (clusterSuite's beforeAll did not run)`);
      return s3StoreUrl(s.endpoint, s.bucket, `${prefix}-${Date.now()}`);
    },
    /** Starts agents for `nodes` on a fresh prefix; destroyed after the file's tests. */
    async start(nodes: string[], prefix: string, options: Partial<ClusterOptions> = {}): Promise<Cluster> {
      suite.cluster = await Cluster.start({ ...options, nodes, store: suite.storeUrl(prefix), env: { ...suite.env, ...options.env } });
      return suite.cluster;
    },
  };
  beforeAll(async () => {
    ensureBuilt();
    if (server === "moto") moto = await startMoto();
    else s3 = await startS3rver();
  });
  afterAll(async () => {
    await killAllChildren();
    await suite.cluster?.destroy(suite.keep);
    await s3?.stop({ keepData: suite.keep });
    await moto?.stop();
    if (suite.keep && s3) console.log(`s3rver data kept in ${s3.directory}`);
  });
  return suite;
}

/** Every synced file of an instance folder → sha256 (databases, .unisync/ and logs left out). */
export function syncedFileHashes(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string, rel: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.name === ".unisync" || /\.(db|db3|sqlite|sqlite3)(-wal|-shm|-journal)?$/i.test(e.name) || e.name.endsWith(".log")) continue;
      if (e.isDirectory()) walk(join(d, e.name), r);
      else out[r] = createHash("sha256").update(readFileSync(join(d, e.name))).digest("hex");
    }
  };
  walk(dir, "");
  return out;
}

/** Runs the CLI without blocking this process (s3rver may run in it). */
export function runCli(args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...S3RVER_ENV, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
    p.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    p.once("close", (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}
