/**
 * Everything unisync does for the files of the instance folder, with the same
 * shape as DbSync so the agent drives both the same way. Its stream is ".files"
 * (log/<origin>/%2Efiles/...), its state INSTANCE_DIR/.unisync/files.db.
 *
 * Capture: a watcher (capture/watch.ts) reports paths; the scan loop looks at those (and
 * walks the whole folder at start, every rescanMs, and whenever something
 * vanished, because watchers miss events and deletes need the mass-delete
 * rule). A changed file's content goes to the store as it is read; only then
 * is its record sealed into the outbox, in the transaction that records it, so
 * a segment never names a blob the store lacks. Pull applies other origins'
 * segments (records and cursor in one transaction), then makes the disk match
 * every path whose winner moved, in batches (replay/folder.ts).
 */
import { vaultOf } from "../keys/securestore.js";
import { existsSync, mkdirSync, readdirSync, rmSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import type { Logger } from "pino";
import { FolderScanner, type DiskEntry, type Excluded, type Observation } from "../capture/folder.js";
import { FileStateStore, KIND_DELETE, KIND_WRITE, type FileKind } from "../capture/filestate.js";
import { IGNORE_FILE, STATE_DIR, TEMP_PREFIX } from "../capture/ignore.js";
import { FolderWatcher, type PathWatcher } from "../capture/watch.js";
import { ChokidarWatcher } from "../capture/watch-chokidar.js";
import { claimForNode } from "../db/internal.js";
import { getMeta, setMeta } from "../db/meta.js";
import { blobKey, putBlobFromFile } from "../log/blobs.js";
import { hlcToMs, type HybridClock } from "../log/hlc.js";
import { Cursors, type Cursor } from "../log/cursors.js";
import { Outbox } from "../log/outbox.js";
import { decodeSegment, encodeSegment, type LogRecord } from "../log/segment.js";
import type { KnownSegments } from "../log/index.js";
import { readAfter, TailProblems, type TailProblem } from "../log/tail.js";
import { LogEnds, type SyncStream } from "./stream.js";
import { Materializer, refuseReason } from "../replay/folder.js";
import { StoreUnavailableError, type ObjectStore } from "../store/store.js";
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
  /** Watch the folder (default true); the periodic rescan runs either way. */
  watch?: boolean;
  /** Which watcher: one fs.watch per folder (default) or chokidar. */
  watcher?: "fswatch" | "chokidar";
  /** Records stamped further ahead of this node's wall clock wait (parked) until it catches up. */
  maxClockDriftMs?: number;
  /** Called when segments were sealed (the uploader need not wait for its next turn). */
  onSealed?: () => void;
  /**
   * A folder met for the first time (a new files.db) holds its files back until the
   * cluster's folder log is in (the agent calls finishEnrolment), as a new database
   * does its rows: a file there may be a stale copy (a backup) of one the cluster has
   * changed or deleted since.
   */
  enrolFirst?: boolean;
}

/** Files read and uploaded, or fetched and written, at once: per-file store and fsync latency overlap. */
const PARALLEL = 16;
/** Changed files observed and sealed per segment, so upload and replay start while a big change is read. */
const CAPTURE_CHUNK = 1000;
/** Paths written per materializer batch: one folder fsync and one files.db commit each. */
const WRITE_BATCH = 512;
/** Paths written per call, so a long backlog does not hold off capture. */
const WRITE_TURN = 4096;

/** Runs `fn` over `items` with at most `limit` running at once; rejects with the first error. */
async function eachLimited<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

/** Splits paths into batches in which no two differ only in case (on a case-insensitive disk they are one file). */
function caseSafeBatches(paths: readonly string[], size: number): string[][] {
  const batches: { paths: string[]; lower: Set<string> }[] = [];
  for (const p of paths) {
    const l = p.toLowerCase();
    let b = batches.find((x) => x.paths.length < size && !x.lower.has(l));
    if (!b) batches.push((b = { paths: [], lower: new Set() }));
    b.paths.push(p);
    b.lower.add(l);
  }
  return batches.map((b) => b.paths);
}

export class FolderSync implements SyncStream {
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
  /** Only segments sealed by versions that staged blobs need this (see upload()). */
  private readonly stagingDir: string;
  private readonly maxDriftMs: number;
  private chain: Promise<unknown> = Promise.resolve();
  private watcher: PathWatcher | null = null;
  private loop: Promise<void> | null = null;
  private stopping = false;
  /**
   * Paths the watcher reported (files or folders), with when to look at them:
   * at once, or when a file being written will have been still for stableMs.
   */
  private readonly dirty = new Map<string, number>();
  /** Ends the scan loop's sleep early (a watcher event). */
  private wakeLoop: (() => void) | null = null;
  /** Something vanished, the rules changed or the watcher failed: walk everything. */
  private fullScanDue = true;
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
    this.maxDriftMs = o.maxClockDriftMs ?? 5 * 60_000;
    const dir = join(o.instanceDir, STATE_DIR);
    mkdirSync(dir, { recursive: true });
    this.stagingDir = join(dir, "staging");
    const fresh = !existsSync(join(dir, "files.db"));
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
    if (fresh && o.enrolFirst) setMeta(this.db, "enrol_pending", 1);
    this.enrolling = Number(getMeta(this.db, "enrol_pending") ?? 0) === 1;
    this.outbox = new Outbox(this.db, o.node, FILES_STREAM, o.clock, vaultOf(o.store));
    this.scanner = new FolderScanner({
      root: o.instanceDir,
      state: this.state,
      store: o.store,
      openDbs: o.openDbs,
      stableMs: o.stableMs ?? 300,
      massDeleteMin: o.massDeleteMin ?? 10,
      enrolling: () => this.enrolling,
      onFolder: (rel) => this.watcher?.add(rel),
    });
    this.materializer = new Materializer({
      root: o.instanceDir,
      state: this.state,
      store: o.store,
      scanner: this.scanner,
      log: this.log,
      commitLocal: (obs) => this.commit(obs),
      tx: (fn) => this.db.transaction(fn).immediate(),
      parallel: PARALLEL,
    });
    this.cleanStaging();
  }

  get stream(): string {
    return FILES_STREAM;
  }

  /** Blobs used to be staged here until their segment went up; what no sealed segment needs goes. */
  private cleanStaging(): void {
    if (!existsSync(this.stagingDir)) return;
    const needed = new Set((this.state.sql("SELECT DISTINCT sha256 FROM file_blobs").all() as { sha256: string }[]).map((r) => r.sha256));
    if (needed.size === 0) {
      rmSync(this.stagingDir, { recursive: true, force: true });
      return;
    }
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
      const onChange = (rel: string | null) => this.reported(rel);
      const onError = (err: Error) => {
        this.fullScanDue = true;
        this.log.warn({ err: err.message }, "folder watcher error; the periodic rescan covers it");
      };
      this.watcher =
        this.o.watcher === "chokidar"
          ? new ChokidarWatcher(this.o.instanceDir, onChange, onError, (rel, isDir) => this.scanner.exclusion(rel, isDir))
          : new FolderWatcher(this.o.instanceDir, onChange, onError);
      this.watcher.add("");
    }
    this.loop = this.scanLoop();
  }

  /** The watcher saw something change at `rel` (null: somewhere). */
  private reported(rel: string | null): void {
    if (rel === null || rel === IGNORE_FILE) this.fullScanDue = true; // rules changed: every path is affected
    else if (!(this.scanner.exclusion(rel, false) && this.scanner.exclusion(rel, true))) this.dirty.set(rel, Date.now());
    else return;
    this.wakeLoop?.();
  }

  private async scanLoop(): Promise<void> {
    let backoff = 0;
    while (!this.stopping) {
      try {
        if (this.fullScanDue || Date.now() - this.lastFullScan >= this.o.rescanMs) await this.scanOnce();
        else if (this.nextDirty() <= Date.now()) await this.captureDirty();
        else if (this.state.pendingCount() > this.state.problemCount()) await this.exclusive(() => this.materializePending(false));
        backoff = 0;
      } catch (err) {
        backoff = Math.min(Math.max(backoff * 2, 250), 10_000);
        if (err instanceof StoreUnavailableError) this.log.warn({ err: (err as Error).message }, "store unreachable; folder changes wait on disk");
        else this.log.error({ err: (err as Error).message, stack: (err as Error).stack }, "folder scan failed; retrying");
      }
      // Until the next dirty path is due, or a watcher event, but at least every captureIntervalMs.
      const wait = backoff || Math.min(this.o.captureIntervalMs, Math.max(0, this.nextDirty() - Date.now()));
      if (wait > 0 || backoff) {
        await new Promise<void>((resolve) => {
          const t = setTimeout(resolve, wait);
          this.wakeLoop = backoff
            ? null
            : () => {
                clearTimeout(t);
                resolve();
              };
        });
      }
      this.wakeLoop = null;
    }
  }

  /** When the earliest dirty path is due (Infinity: none). */
  private nextDirty(): number {
    let t = Infinity;
    for (const due of this.dirty.values()) if (due < t) t = due;
    return t;
  }

  /** One full pass over the folder; seals what changed. Returns the records sealed. */
  scanOnce(): Promise<number> {
    return this.exclusive(async () => {
      const t0 = Date.now();
      // Everything is looked at now; events from here on are new.
      this.fullScanDue = false;
      this.dirty.clear();
      const r = await this.scanner.scan();
      this.watcher?.keepOnly(r.dirs);
      this.lastFullScan = Date.now();
      this.excluded = r.excluded;
      if (this.firstScan) {
        this.firstScan = false;
        this.removeOwnTemps();
        this.log.info({ entries: r.entries, excluded: r.excluded.length, ms: Date.now() - t0 }, "initial folder scan");
      }
      if (r.massDelete !== this.massDelete) {
        if (r.massDelete) this.log.error({ problem: r.massDelete }, "mass delete held back");
        else if (this.massDelete) this.log.info("mass delete condition cleared");
        this.massDelete = r.massDelete;
      }
      let n = await this.capture(r.changed);
      n += this.commit(r.gone);
      this.retryParked();
      // Paths still waiting for a write (e.g. they were unstable, or their blob was missing) get another try.
      await this.materializePending(true);
      return n;
    });
  }

  /** Looks at the paths the watcher reported that are due (a folder: everything under it). */
  private captureDirty(): Promise<number> {
    return this.exclusive(async () => {
      const now = Date.now();
      const paths: string[] = [];
      for (const [rel, due] of this.dirty) {
        if (due > now) continue;
        paths.push(rel);
        this.dirty.delete(rel);
      }
      const changed: DiskEntry[] = [];
      await eachLimited(paths, 64, async (rel) => {
        const l = await this.scanner.look(rel);
        if (l.kind === "absent") {
          // Deletes go through the full scan's mass-delete rule.
          if (this.state.index(rel) || this.watcher?.has(rel)) this.fullScanDue = true;
        } else if (l.kind === "dir") {
          if (this.scanner.exclusion(rel, true)) return;
          const { entries } = await this.scanner.walk(rel);
          for (const d of entries.values()) if (!this.scanner.unchangedSinceIndexed(d)) changed.push(d);
        } else if (l.kind === "entry" && !this.scanner.unchangedSinceIndexed(l.entry) && !this.scanner.exclusion(rel, false)) {
          changed.push(l.entry);
        }
      });
      const t0 = Date.now();
      const n = await this.capture(changed);
      this.log.debug({ reported: paths.length, changed: changed.length, sealed: n, ms: Date.now() - t0, waitedMs: t0 - now }, "looked at reported paths");
      return n;
    });
  }

  /**
   * Observes changed entries (reading and storing their content) and seals
   * them, a segment per CAPTURE_CHUNK. A file not stable yet stays dirty for the
   * next look. Caller holds the exclusive section. Returns the records sealed.
   */
  private async capture(entries: DiskEntry[]): Promise<number> {
    let sealed = 0;
    let failure: unknown = null;
    const now = Date.now();
    // Looked at again when it will have been still for stableMs, or after a tick.
    const later = (d: DiskEntry) => this.dirty.set(d.rel, Math.max(d.mtimeMs + this.scanner.o.stableMs, Date.now() + this.o.captureIntervalMs));
    let i = 0;
    for (; i < entries.length && !this.stopping && !failure; i += CAPTURE_CHUNK) {
      const observations: Observation[] = [];
      await eachLimited(entries.slice(i, i + CAPTURE_CHUNK), PARALLEL, async (d) => {
        if (failure) {
          later(d);
          return;
        }
        try {
          const o = await this.scanner.observe(d.rel, d, now);
          if (o.type === "unstable") later(d);
          else if (o.type !== "same") observations.push(o);
        } catch (err) {
          // Most likely the store is down: the file is looked at again later.
          failure ??= err;
          later(d);
        }
      });
      sealed += this.commit(observations);
    }
    // Not looked at (stopping, or the store failed): next time.
    for (; i < entries.length; i++) later(entries[i]!);
    this.unstable = [...this.dirty.values()].filter((due) => due > Date.now()).length;
    if (failure) throw failure;
    return sealed;
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
   * versions sealed into the outbox (one transaction per segment). Their blobs
   * are in the store already. Returns the records sealed.
   */
  commit(observations: Observation[]): number {
    const { state } = this;
    const changes = observations.filter((o) => o.type === "write" || o.type === "delete");
    const rest = observations.filter((o) => o.type === "index" || o.type === "dropIndex" || o.type === "stale");
    if (rest.length) {
      this.db
        .transaction(() => {
          for (const o of rest) {
            if (o.type === "index") {
              state.setIndex(o.entry);
              if (o.matchesWinner && state.state(o.entry.path)?.pending) state.setPending(o.entry.path, false);
            } else if (o.type === "dropIndex") state.dropIndex(o.rel);
            else if (o.type === "stale") state.setPending(o.rel, true); // the materializer puts the winner there
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
            if (w) state.setIndex({ path: o.rel, size: w.kind === KIND_WRITE ? w.size : 0, mtimeMs: w.mtimeExact, ino: w.ino, mode: w.mode, sha256: w.sha256, link: w.link, hlc, origin: this.o.node });
            else state.dropIndex(o.rel);
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
          setMeta(this.db, "hlc", this.o.clock.current);
          this.log.debug({ seq: entry.seq, records: records.length }, "sealed file changes");
        })
        .immediate();
      sealed += chunk.length;
    }
    if (sealed) {
      this.o.metrics.inc("unisync_file_changes_captured_total", sealed);
      this.sealedSinceAsked += sealed;
      this.o.onSealed?.();
    }
    return sealed;
  }

  /** Records sealed since the last call (the scan loop seals by itself). */
  sealPending(): number {
    const n = this.sealedSinceAsked;
    this.sealedSinceAsked = 0;
    return n;
  }

  /** Uploads up to `max` sealed segments in seq order; returns segments uploaded. */
  async upload(max = Number.MAX_SAFE_INTEGER, stop: () => boolean = () => false): Promise<number> {
    let n = 0;
    while (n < max && !stop()) {
      const entry = this.outbox.oldest(1)[0];
      if (!entry) return n;
      await this.uploadStagedBlobs(entry.seq);
      await this.outbox.upload(this.o.store, [entry]);
      n++;
      this.o.metrics.inc("unisync_segments_uploaded_total");
      this.o.metrics.inc("unisync_bytes_uploaded_total", entry.bytes.length);
    }
    return n;
  }

  /**
   * Segments sealed by an earlier version of unisync name blobs it had staged
   * (file_blobs) instead of storing them at capture: those go up first.
   */
  private async uploadStagedBlobs(seq: number): Promise<void> {
    const blobs = this.state.sql("SELECT sha256, size FROM file_blobs WHERE seq = ?").all(seq) as { sha256: string; size: number }[];
    if (blobs.length === 0) return;
    await eachLimited(blobs, PARALLEL, async (b) => {
      const staged = join(this.stagingDir, b.sha256);
      if (existsSync(staged)) await putBlobFromFile(this.o.store, staged, b.sha256, Number(b.size));
      else if (!(await this.o.store.head(blobKey(b.sha256)))) throw new Error(`blob ${b.sha256} of file segment ${seq} is neither staged nor in the store`);
    });
    this.db.transaction(() => this.state.sql("DELETE FROM file_blobs WHERE seq = ?").run(seq)).immediate();
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
  pull(origin: string, maxSegments = 16, untilHlc = Infinity, _stop?: () => boolean, known?: KnownSegments): Promise<number> {
    return this.exclusive(async () => {
      this.logEnds.reading(origin); // a pull that throws part way must not keep the last pull's "read to the end"
      const cursor = this.cursor(origin);
      const { segments, problem } = await readAfter(this.o.store, origin, FILES_STREAM, cursor.seq, maxSegments, 4, known);
      let applied = 0;
      let seen = 0;
      for await (const s of segments) {
        seen++;
        const records = s.segment.records.filter((r) => r.hlc <= untilHlc);
        if (records.length === 0 && s.segment.records.length > 0) break; // as DbSync.pull: an empty segment moves the cursor
        this.db
          .transaction(() => {
            if (this.cursor(origin).seq !== s.seq - 1) return;
            let lastHlc = 0;
            records.forEach((r, idx) => {
              lastHlc = Math.max(lastHlc, r.hlc);
              if (this.applyRecord(origin, s.seq, idx, r)) applied++;
            });
            this.cursorStore.set(origin, s.seq, s.key, lastHlc);
            setMeta(this.db, "hlc", this.o.clock.current);
          })
          .immediate();
        this.o.metrics.inc("unisync_segments_applied_total");
        if (records.length < s.segment.records.length) break;
      }
      if (applied) this.o.metrics.inc("unisync_file_records_applied_total", applied);
      this.tailProblems.update(origin, problem());
      this.logEnds.pulled(origin, known, seen, maxSegments, problem());
      this.retryParked();
      await this.materializePending(true);
      return applied;
    });
  }

  /**
   * One remote record into the versions (inside the caller's transaction).
   * Unsafe records are refused for good; records from a clock too far ahead
   * wait in _unisync_parked, as rows do. Returns whether it was applied.
   */
  private applyRecord(origin: string, seq: number, idx: number, r: LogRecord, parked = false): boolean {
    const f = r.file;
    const why = f ? refuseReason(f, (rel) => this.scanner.exclusion(rel, false)) : "not a file record";
    if (why || !f) {
      this.state.refuse(origin, seq, f?.path ?? null, why ?? "not a file record");
      this.log.error({ origin, seq, idx, path: f?.path, reason: why }, "file record refused; nothing written");
      this.o.metrics.inc("unisync_file_records_refused_total");
      return false;
    }
    // A node whose clock runs far ahead would win every conflict while it stays ahead.
    const aheadMs = hlcToMs(r.hlc) - Date.now();
    if (aheadMs > this.maxDriftMs) {
      if (!parked) {
        const reason = `clock of origin "${origin}" is ${Math.round(aheadMs / 1000)} s ahead of ours (limit ${Math.round(this.maxDriftMs / 1000)} s): waiting`;
        const bytes = encodeSegment({ origin, stream: FILES_STREAM, seq, createdMs: 0, records: [r] });
        this.state
          .sql("INSERT OR IGNORE INTO _unisync_parked(origin, seq, idx, tbl, kind, reason, hlc, record, parked_ms) VALUES (?, ?, ?, ?, 'clock', ?, ?, ?, ?)")
          .run(origin, seq, idx, FILES_STREAM, reason, r.hlc, bytes, Date.now());
        this.log.warn({ origin, seq, idx, path: f.path, reason }, "file record parked");
        this.o.metrics.inc("unisync_clock_drift_records_total");
      }
      return false;
    }
    this.o.clock.observe(r.hlc);
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
    return true;
  }

  /** Parked records whose time has come (our clock caught up) are applied. Caller holds the exclusive section. */
  private retryParked(): void {
    const due = (Date.now() + this.maxDriftMs) * 1024;
    const rows = this.state.sql("SELECT id, origin, seq, idx, record FROM _unisync_parked WHERE hlc <= ? ORDER BY id").all(due) as {
      id: number;
      origin: string;
      seq: number;
      idx: number;
      record: Buffer;
    }[];
    if (rows.length === 0) return;
    this.db
      .transaction(() => {
        for (const p of rows) {
          const r = decodeSegment(p.record).records[0];
          if (!r || this.applyRecord(p.origin, Number(p.seq), Number(p.idx), r, true) || !r.file) {
            this.state.sql("DELETE FROM _unisync_parked WHERE id = ?").run(p.id);
          }
        }
        setMeta(this.db, "hlc", this.o.clock.current);
      })
      .immediate();
  }

  /**
   * Makes the disk match pending winners, a batch at a time, up to WRITE_TURN
   * paths. `withProblems`: also paths that failed before (a blob not uploaded
   * yet...). Caller holds the exclusive section.
   */
  private async materializePending(withProblems: boolean): Promise<void> {
    const paths = this.state.pendingPaths(WRITE_TURN, withProblems);
    for (const batch of caseSafeBatches(paths, WRITE_BATCH)) {
      if (this.stopping) return;
      const n = await this.materializer.materialize(batch);
      if (n) this.o.metrics.inc("unisync_files_written_total", n);
    }
  }

  /** The folder's log always knows where it goes on (SyncStream: a database new to this node may not). */
  readonly logUnknown = false;
  /** While true, files this node never recorded wait for the cluster's log (FolderSyncOptions.enrolFirst). */
  enrolling: boolean;
  private readonly logEnds = new LogEnds();

  /** Whether the last pull of each of `origins` read its log to the end. */
  caughtUp(origins: readonly string[]): boolean {
    return this.logEnds.caughtUp(origins);
  }

  /** The cluster's log is in: the files held back are looked at again, against it. */
  finishEnrolment(): void {
    if (!this.enrolling) return;
    setMeta(this.db, "enrol_pending", 0);
    this.enrolling = false;
    this.fullScanDue = true;
    this.wakeLoop?.();
  }

  /** The folder replays its own earlier segments only in a bootstrap or rejoin (SyncStream). */
  replaysOwnLog(): boolean {
    return false;
  }

  /** Files changed here and waiting to be stable before they are sealed (SyncStream). */
  unsentChanges(): number {
    return this.unstable;
  }

  /** Paths whose disk does not match the winner yet, plus files waiting to be stable. */
  pendingChanges(): number {
    return this.state.pendingCount() + this.unstable;
  }

  /** Paths that cannot be written (refused or failing) and records waiting for our clock, like parked records. */
  parkedCount(): number {
    return this.state.problemCount() + Number((this.state.sql("SELECT count(*) AS n FROM _unisync_parked").get() as { n: number }).n);
  }

  refusedCount(): number {
    return this.state.refusedCount();
  }

  async stop(): Promise<void> {
    this.stopping = true;
    this.watcher?.close();
    this.watcher = null;
    await this.loop;
    await this.chain;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
