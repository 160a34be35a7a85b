/**
 * Everything unisync does for the files of the instance folder, with the same
 * shape as DbSync so the agent drives both the same way. Its stream is ".files"
 * (log/<origin>/%2Efiles/...), its state INSTANCE_DIR/.unisync/files.db.
 *
 * Capture: a chokidar watcher marks the folder dirty; a scan loop walks it
 * (also every rescanMs, because watchers miss events) and seals each batch of
 * changes into the outbox in the transaction that records them, with the blobs
 * they need listed beside the segment. Upload puts those blobs first, then the
 * segment. Pull applies other origins' segments (records and cursor in one
 * transaction), then makes the disk match every path whose winner moved.
 */
import { existsSync, mkdirSync, readdirSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { watch, type FSWatcher } from "chokidar";
import type { Logger } from "pino";
import { FolderScanner, type Excluded, type Observation } from "../capture/folder.js";
import { FileStateStore, KIND_DELETE, KIND_WRITE, type FileKind } from "../capture/filestate.js";
import { STATE_DIR, TEMP_PREFIX } from "../capture/ignore.js";
import { claimForNode, getMeta, setMeta } from "../capture/internal.js";
import { blobKey, putBlobFromFile } from "../log/blobs.js";
import type { HybridClock } from "../log/hlc.js";
import { Cursors, type Cursor } from "../log/cursors.js";
import { Outbox } from "../log/outbox.js";
import type { LogRecord } from "../log/segment.js";
import { readAfter, TailProblems, type TailProblem } from "../log/tail.js";
import { Materializer, refuseReason } from "../replay/folder.js";
import type { ObjectStore } from "../store/store.js";
import type { Metrics } from "./metrics.js";

export const FILES_STREAM = ".files";

export interface FolderSyncOptions {
  instanceDir: string;
  node: string;
  store: ObjectStore;
  clock: HybridClock;
  log: Logger;
  metrics: Metrics;
  /** Absolute paths the agent holds open as databases. */
  openDbs: () => ReadonlySet<string>;
  maxRecords: number;
  captureIntervalMs: number;
  rescanMs: number;
  /** A file is read once its mtime is this old (ms). */
  stableMs?: number;
  massDeleteMin?: number;
  /** Watch with chokidar (default true); the periodic rescan runs either way. */
  watch?: boolean;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Blob transfers and file writes in flight at once: per-file store and fsync latency overlap. */
const PARALLEL = 8;

/** Runs `fn` over `items` with at most `limit` running at once; rejects with the first error. */
async function eachLimited<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

export class FolderSync {
  readonly db: Database.Database;
  readonly state: FileStateStore;
  private readonly cursorStore: Cursors;
  readonly outbox: Outbox;
  readonly scanner: FolderScanner;
  private readonly materializer: Materializer;
  /** Per origin: why its file stream is stopped (gap, corrupt segment), for status. */
  private readonly tailProblems: TailProblems;

  /** Per origin: why its stream is stopped (gap, corrupt segment, fork), for status. */
  get problems(): ReadonlyMap<string, TailProblem> {
    return this.tailProblems.byOrigin;
  }

  private readonly log: Logger;
  private readonly stagingDir: string;
  private chain: Promise<unknown> = Promise.resolve();
  private watcher: FSWatcher | null = null;
  private loop: Promise<void> | null = null;
  private stopping = false;
  private dirty = true;
  private lastFullScan = 0;
  private sealedSinceAsked = 0;
  private unstable = 0;
  private firstScan = true;
  /** Why deletes are being held back, if they are. */
  massDelete: string | undefined;
  excluded: Excluded[] = [];

  constructor(private readonly o: FolderSyncOptions) {
    this.log = o.log.child({ files: FILES_STREAM });
    this.tailProblems = new TailProblems(this.log, "file replay");
    const dir = join(o.instanceDir, STATE_DIR);
    this.stagingDir = join(dir, "staging");
    mkdirSync(this.stagingDir, { recursive: true });
    this.db = new Database(join(dir, "files.db"));
    this.db.pragma("journal_mode = WAL");
    this.db.pragma("synchronous = FULL");
    this.db.pragma("busy_timeout = 5000");
    this.state = new FileStateStore(this.db);
    this.cursorStore = new Cursors(this.db);
    try {
      claimForNode(this.db, join(dir, "files.db"), o.node);
    } catch (err) {
      this.db.close();
      throw err;
    }
    o.clock.observe(Number(getMeta(this.db, "hlc") ?? 0));
    this.outbox = new Outbox(this.db, o.node, FILES_STREAM);
    this.scanner = new FolderScanner({
      root: o.instanceDir,
      state: this.state,
      stagingDir: this.stagingDir,
      openDbs: o.openDbs,
      stableMs: o.stableMs ?? 300,
      massDeleteMin: o.massDeleteMin ?? 10,
    });
    this.materializer = new Materializer({
      root: o.instanceDir,
      state: this.state,
      store: o.store,
      scanner: this.scanner,
      log: this.log,
      commitLocal: (obs) => this.commit(obs),
      tx: (fn) => this.db.transaction(fn).immediate(),
    });
    this.cleanStaging();
  }

  get stream(): string {
    return FILES_STREAM;
  }

  /** Staged copies no sealed segment needs any more, and half-written temp copies, go. */
  private cleanStaging(): void {
    const needed = new Set((this.state.sql("SELECT DISTINCT sha256 FROM file_blobs").all() as { sha256: string }[]).map((r) => r.sha256));
    for (const name of readdirSync(this.stagingDir)) {
      if (!needed.has(name)) unlinkSync(join(this.stagingDir, name));
    }
  }

  /** Runs fn after every other folder operation (scan, apply): one at a time. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(fn, fn);
    this.chain = run.catch(() => undefined);
    return run;
  }

  start(): void {
    if (this.o.watch !== false) {
      const root = this.o.instanceDir;
      this.watcher = watch(root, {
        ignoreInitial: true,
        followSymlinks: false,
        atomic: false,
        // Decided by name only: chokidar never gets to open a database or its companions.
        ignored: (p: string, stats?: { isDirectory(): boolean }) => {
          if (p === root) return false;
          const rel = p.slice(root.length + 1).split("\\").join("/");
          return this.scanner.exclusion(rel, stats?.isDirectory() ?? false) !== null && !rel.endsWith(".unisyncignore");
        },
      });
      this.watcher.on("all", () => {
        this.dirty = true;
      });
      this.watcher.on("error", (err) => this.log.warn({ err: (err as Error).message }, "folder watcher error; the periodic rescan covers it"));
    }
    this.loop = this.scanLoop();
  }

  private async scanLoop(): Promise<void> {
    while (!this.stopping) {
      if (this.dirty || this.unstable > 0 || Date.now() - this.lastFullScan >= this.o.rescanMs) {
        this.dirty = false;
        try {
          await this.scanOnce();
        } catch (err) {
          this.log.error({ err: (err as Error).message, stack: (err as Error).stack }, "folder scan failed; retrying");
        }
      }
      await sleep(this.o.captureIntervalMs);
    }
  }

  /** One full pass over the folder; seals what changed. Returns the records sealed. */
  scanOnce(): Promise<number> {
    return this.exclusive(async () => {
      const t0 = Date.now();
      const r = await this.scanner.scan();
      this.lastFullScan = Date.now();
      this.unstable = r.unstable;
      this.excluded = r.excluded;
      if (this.firstScan) {
        this.firstScan = false;
        this.removeOwnTemps();
        this.log.info({ files: r.entries, excluded: r.excluded.length, ms: Date.now() - t0 }, "initial folder scan");
      }
      if (r.massDelete !== this.massDelete) {
        if (r.massDelete) this.log.error({ problem: r.massDelete }, "mass delete held back");
        else if (this.massDelete) this.log.info("mass delete condition cleared");
        this.massDelete = r.massDelete;
      }
      const n = this.commit(r.observations);
      // Paths still waiting for a write (e.g. they were unstable) get another try.
      await this.materializePending();
      return n;
    });
  }

  /** Temp files of a replay that died half-way (only this agent writes them). */
  private removeOwnTemps(): void {
    for (const t of this.scannerTemps()) {
      try {
        unlinkSync(t);
      } catch {
        // gone
      }
    }
  }

  private scannerTemps(): string[] {
    const out: string[] = [];
    const walk = (dir: string, depth: number) => {
      if (depth > 32) return;
      let ents;
      try {
        ents = readdirSync(dir, { withFileTypes: true });
      } catch {
        return;
      }
      for (const e of ents) {
        if (e.name === STATE_DIR && dir === this.o.instanceDir) continue;
        const p = join(dir, e.name);
        if (e.name.startsWith(TEMP_PREFIX)) out.push(p);
        else if (e.isDirectory()) walk(p, depth + 1);
      }
    };
    walk(this.o.instanceDir, 0);
    return out;
  }

  /**
   * Records observations: index refreshes, and local writes and deletes as new
   * versions sealed into the outbox (one transaction per segment, with the
   * blobs the segment needs). Returns the records sealed.
   */
  commit(observations: Observation[]): number {
    const { state } = this;
    const changes = observations.filter((o) => o.type === "write" || o.type === "delete");
    const rest = observations.filter((o) => o.type === "index" || o.type === "dropIndex");
    if (rest.length) {
      this.db
        .transaction(() => {
          for (const o of rest) {
            if (o.type === "index") {
              state.setIndex(o.entry);
              if (o.matchesWinner && state.state(o.entry.path)?.pending) state.setPending(o.entry.path, false);
            } else if (o.type === "dropIndex") state.dropIndex(o.rel);
          }
        })
        .immediate();
    }
    let sealed = 0;
    for (let i = 0; i < changes.length; i += this.o.maxRecords) {
      const chunk = changes.slice(i, i + this.o.maxRecords);
      this.db
        .transaction(() => {
          const records: LogRecord[] = [];
          const blobs = new Map<string, number>();
          for (const o of chunk) {
            if (o.type !== "write" && o.type !== "delete") continue;
            const hlc = this.o.clock.tick();
            const kind: FileKind = o.type === "write" ? o.kind : KIND_DELETE;
            const w = o.type === "write" ? o : null;
            state.addVersion({
              path: o.rel,
              hlc,
              origin: this.o.node,
              kind,
              baseHlc: o.base.hlc,
              baseOrigin: o.base.origin,
              sha256: w?.sha256 ?? "",
              size: w?.size ?? 0,
              mode: w?.mode ?? 0,
              mtimeMs: w?.mtimeMs ?? 0,
              link: w?.link ?? "",
              derived: false,
            });
            state.recompute(o.rel);
            if (w) {
              state.setIndex({ path: o.rel, size: w.kind === KIND_WRITE ? w.size : 0, mtimeMs: w.mtimeExact, ino: w.ino, mode: w.mode, sha256: w.sha256, link: w.link, hlc, origin: this.o.node });
              if (w.kind === KIND_WRITE) blobs.set(w.sha256, w.size);
            } else state.dropIndex(o.rel);
            const s = state.state(o.rel);
            if (s && s.hlc === hlc && s.origin === this.o.node) state.setPending(o.rel, false);
            records.push({
              hlc,
              file: {
                path: o.rel,
                kind,
                size: w?.size ?? 0,
                mode: w?.mode ?? 0,
                mtimeMs: w?.mtimeMs ?? 0,
                sha256: w?.sha256 ?? "",
                linkTarget: w?.link || undefined,
                baseHlc: o.base.hlc,
                baseOrigin: o.base.origin,
              },
            });
          }
          const entry = this.outbox.seal(records, Date.now());
          const ins = this.state.sql("INSERT OR IGNORE INTO file_blobs(seq, sha256, size) VALUES (?, ?, ?)");
          for (const [sha, size] of blobs) ins.run(entry.seq, sha, size);
          setMeta(this.db, "hlc", this.o.clock.current);
          this.log.debug({ seq: entry.seq, records: records.length }, "sealed file changes");
        })
        .immediate();
      sealed += chunk.length;
    }
    if (sealed) {
      this.o.metrics.inc("unisync_file_changes_captured_total", sealed);
      this.sealedSinceAsked += sealed;
    }
    return sealed;
  }

  /** Records sealed since the last call (the scan loop seals by itself). */
  sealPending(): number {
    const n = this.sealedSinceAsked;
    this.sealedSinceAsked = 0;
    return n;
  }

  /** Uploads up to `max` sealed segments in seq order, each after the blobs it needs; returns segments uploaded. */
  async upload(max = Number.MAX_SAFE_INTEGER): Promise<number> {
    let n = 0;
    while (n < max) {
      const entry = this.outbox.oldest(1)[0];
      if (!entry) return n;
      const blobs = this.state.sql("SELECT sha256, size FROM file_blobs WHERE seq = ?").all(entry.seq) as { sha256: string; size: number }[];
      // Every blob before the segment that names it; blobs are content-addressed, so order among them does not matter.
      await eachLimited(blobs, PARALLEL, async (b) => {
        const staged = join(this.stagingDir, b.sha256);
        if (existsSync(staged)) {
          const r = await putBlobFromFile(this.o.store, staged, b.sha256, Number(b.size));
          if (r === "uploaded") {
            this.o.metrics.inc("unisync_blobs_uploaded_total");
            this.o.metrics.inc("unisync_blob_bytes_uploaded_total", Number(b.size));
          }
        } else if (!(await this.o.store.head(blobKey(b.sha256)))) {
          throw new Error(`blob ${b.sha256} of file segment ${entry.seq} is neither staged nor in the store`);
        }
      });
      await this.outbox.upload(this.o.store, entry);
      this.db.transaction(() => this.state.sql("DELETE FROM file_blobs WHERE seq = ?").run(entry.seq)).immediate();
      for (const b of blobs) {
        if (!this.state.sql("SELECT 1 FROM file_blobs WHERE sha256 = ?").get(b.sha256)) {
          try {
            unlinkSync(join(this.stagingDir, b.sha256));
          } catch {
            // already gone
          }
        }
      }
      n++;
      this.o.metrics.inc("unisync_segments_uploaded_total");
      this.o.metrics.inc("unisync_bytes_uploaded_total", entry.bytes.length);
    }
    return n;
  }

  cursor(origin: string): Cursor {
    return this.cursorStore.get(origin);
  }

  cursors(): Map<string, Cursor> {
    return this.cursorStore.all();
  }

  /**
   * Applies what the store holds from `origin` after our cursor, then writes the disk; returns records applied.
   * `untilHlc` (point-in-time replay): only records stamped at or before it (see DbSync.pull).
   */
  pull(origin: string, maxSegments = 16, untilHlc = Infinity): Promise<number> {
    return this.exclusive(async () => {
      const cursor = this.cursor(origin);
      const { segments, problem } = await readAfter(this.o.store, origin, FILES_STREAM, cursor.seq, maxSegments);
      let applied = 0;
      for await (const s of segments) {
        const records = s.segment.records.filter((r) => r.hlc <= untilHlc);
        if (records.length === 0) break;
        this.db
          .transaction(() => {
            if (this.cursor(origin).seq !== s.seq - 1) return;
            records.forEach((r, idx) => {
              this.o.clock.observe(r.hlc);
              const f = r.file;
              const why = f ? refuseReason(f, (rel) => this.scanner.exclusion(rel, false)) : "not a file record";
              if (why || !f) {
                this.state.refuse(origin, s.seq, f?.path ?? null, why ?? "not a file record");
                this.log.error({ origin, seq: s.seq, idx, path: f?.path, reason: why }, "file record refused; nothing written");
                this.o.metrics.inc("unisync_file_records_refused_total");
                return;
              }
              const added = this.state.addVersion({
                path: f.path,
                hlc: r.hlc,
                origin,
                kind: f.kind,
                baseHlc: f.baseHlc ?? 0,
                baseOrigin: f.baseOrigin ?? "",
                sha256: f.kind === KIND_WRITE ? f.sha256 : "",
                size: f.kind === KIND_WRITE ? f.size : 0,
                mode: f.mode & 0o777,
                mtimeMs: f.mtimeMs,
                link: f.linkTarget ?? "",
                derived: false,
              });
              if (added) this.state.recompute(f.path);
              applied++;
            });
            this.cursorStore.set(origin, s.seq, s.key, this.o.clock.current);
            setMeta(this.db, "hlc", this.o.clock.current);
          })
          .immediate();
        this.o.metrics.inc("unisync_segments_applied_total");
        if (records.length < s.segment.records.length) break;
      }
      if (applied) this.o.metrics.inc("unisync_file_records_applied_total", applied);
      this.tailProblems.update(origin, problem());
      await this.materializePending();
      return applied;
    });
  }

  /** Makes the disk match every pending winner (bounded per call). Caller holds the exclusive section. */
  private async materializePending(): Promise<void> {
    // Paths that differ only in case go to the same worker, one after the other, so
    // the case-clash check never races with itself on a case-insensitive file system.
    const lanes = new Map<string, string[]>();
    for (const rel of this.state.pendingPaths(1000)) {
      const lane = rel.toLowerCase();
      lanes.set(lane, [...(lanes.get(lane) ?? []), rel]);
    }
    await eachLimited([...lanes.values()], PARALLEL, async (paths) => {
      for (const rel of paths) {
        if (this.stopping) return;
        try {
          const r = await this.materializer.materialize(rel);
          if (r === "done") this.o.metrics.inc("unisync_files_written_total");
        } catch (err) {
          this.log.error({ path: rel, err: (err as Error).message }, "could not write file; will retry");
          this.state.setPending(rel, true, (err as Error).message);
        }
      }
    });
  }

  /** Paths whose disk does not match the winner yet, plus files waiting to be stable. */
  pendingChanges(): number {
    return this.state.pendingCount() + this.unstable;
  }

  /** Paths that cannot be written (refused or failing), like parked records. */
  parkedCount(): number {
    return this.state.problemCount();
  }

  refusedCount(): number {
    return this.state.refusedCount();
  }

  async stop(): Promise<void> {
    this.stopping = true;
    await this.watcher?.close();
    this.watcher = null;
    await this.loop;
    await this.chain;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
