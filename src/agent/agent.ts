/**
 * The agent: one per node. It finds the app's databases, keeps a DbSync per
 * database, and runs three loops: capture (seal local changes), upload, and
 * pull (apply other origins). The store being down never stops capture: sealed
 * segments wait in each database's outbox until it is back.
 */
import { mkdirSync } from "node:fs";
import type { Logger } from "pino";
import { HybridClock } from "../log/hlc.js";
import { listOrigins } from "../log/keys.js";
import { LogForkError, type Outbox } from "../log/outbox.js";
import type { ObjectStore } from "../store/store.js";
import { stateDir, type Config } from "./config.js";
import { findDatabases } from "./databases.js";
import { DbSync, NodeIdentityError } from "./dbsync.js";
import { FolderSync } from "./foldersync.js";
import { Metrics } from "./metrics.js";
import { announceAgent, retireAgent } from "../snapshot/agentlink.js";
import { SnapshotScheduler } from "../snapshot/scheduler.js";
import { finishBootstrap, placeNewestSnapshot, type BootstrapSettings } from "../snapshot/bootstrap.js";
import { join } from "node:path";

/** Segments one database may seal per capture tick (the app's writes get the lock in between). */
const SEAL_TURN = 2;

/** Segments one database may upload before the next database gets its turn. */
const UPLOAD_TURN = 32;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export interface AgentStatus {
  node: string;
  store: string;
  startedMs: number;
  origins: string[];
  databases: {
    stream: string;
    path: string;
    nextSeq: number;
    pendingChanges: number;
    outboxSegments: number;
    parked: number;
    /** Rows moved by id collisions and set aside by unique clashes (unisync conflicts lists them). */
    moved: number;
    setAside: number;
    cursors: Record<string, number>;
    problems: Record<string, string>;
  }[];
  /** The instance folder's files (stream ".files"), when syncFiles is on. */
  files?: {
    stream: string;
    nextSeq: number;
    pendingChanges: number;
    outboxSegments: number;
    parked: number;
    refused: number;
    excluded: number;
    conflicts: number;
    massDelete?: string;
    cursors: Record<string, number>;
    problems: Record<string, string>;
  };
  storeError?: string;
  /** Databases not synced, with why. */
  notSynced: Record<string, string>;
}

/** What nodes/<node>.json holds. */
export interface Heartbeat extends AgentStatus {
  atMs: number;
}

export class Agent {
  readonly metrics = new Metrics();
  readonly clock = new HybridClock();
  private readonly dbs = new Map<string, DbSync>();
  /** The instance folder's files; null when syncFiles is off. */
  private files: FolderSync | null = null;
  /** Databases taken out of sync, with why (another node's file, a forked log): they need an operator, so they are not retried. */
  private readonly failed = new Map<string, string>();
  private origins: string[] = [];
  private stopping = false;
  private storeError: string | undefined;
  private readonly startedMs = Date.now();
  private readonly loops: Promise<void>[] = [];
  private wake: (() => void) | null = null;
  /** Databases whose log was checked against the store (see Outbox.checkStoreAgrees). */
  private readonly storeChecked = new Set<string>();
  readonly snapshots: SnapshotScheduler;

  constructor(
    readonly config: Config,
    readonly store: ObjectStore,
    private readonly log: Logger,
  ) {
    this.snapshots = new SnapshotScheduler({
      instanceDir: config.instanceDir,
      workDir: join(stateDir(config.instanceDir), "snapshot-work"),
      node: config.node,
      store,
      log,
      intervalMs: config.snapshotIntervalMs,
      sources: () => ({ dbs: [...this.dbs.values()], files: this.files }),
      stopping: () => this.stopping,
    });
  }

  async start(): Promise<void> {
    mkdirSync(stateDir(this.config.instanceDir), { recursive: true });
    announceAgent(this.config.instanceDir, { pid: process.pid, node: this.config.node, startedMs: this.startedMs });
    // An empty node starts from the newest snapshot, placed before any stream is opened.
    const boot: BootstrapSettings = { ...this.config, store: this.store, log: this.log };
    const placed = this.config.bootstrap
      ? await placeNewestSnapshot(boot).catch((err: Error) => {
          this.log.error({ err: err.message }, "could not start from a snapshot; replaying the log from the start instead");
          return null;
        })
      : null;
    this.rescanDatabases();
    if (this.config.syncFiles) {
      this.files = new FolderSync({
        instanceDir: this.config.instanceDir,
        node: this.config.node,
        store: this.store,
        clock: this.clock,
        log: this.log,
        metrics: this.metrics,
        // Read at every look: a database the agent opens later is never opened as a file.
        openDbs: () => new Set([...this.dbs.values()].map((d) => d.db.name)),
        maxRecords: this.config.batchMaxRecords,
        captureIntervalMs: this.config.captureIntervalMs,
        rescanMs: this.config.rescanMs,
        watcher: this.config.folderWatcher as "fswatch" | "chokidar",
        onSealed: () => this.wake?.(),
      });
    }
    if (placed) {
      await finishBootstrap(boot, { dbs: [...this.dbs.values()], files: this.files }).catch((err: Error) =>
        this.log.error({ err: err.message }, "bootstrap replay stopped early; the pull loop carries on"),
      );
    }
    this.files?.start();
    await this.refreshOrigins().catch((err) => this.storeFailed(err, "listing origins"));
    this.loops.push(this.captureLoop(), this.uploadLoop(), this.pullLoop(), this.housekeepingLoop(), this.snapshots.run());
  }

  /** A stream whose log cannot be written without forking it is taken out of sync, loudly. */
  private async dropForked(s: DbSync | FolderSync, err: LogForkError): Promise<void> {
    if (s instanceof FolderSync) {
      this.log.error({ err: err.message }, "the instance folder's files will not be synced");
      await s.stop();
      s.close();
      this.files = null;
      return;
    }
    this.log.error({ db: s.stream, err: err.message }, "this database will not be synced");
    this.failed.set(s.stream, err.message);
    s.close();
    this.dbs.delete(s.stream);
  }

  /** Opens DbSyncs for databases that appeared (new bind, new file). */
  rescanDatabases(): void {
    const open = new Set([...this.dbs.values()].map((d) => d.db.name));
    const found = findDatabases(this.config.instanceDir, this.config.databases, false, open);
    for (const { path, stream } of found.synced) {
      if (this.dbs.has(stream) || this.failed.has(stream)) continue;
      let db: DbSync | undefined;
      try {
        db = new DbSync({
          path,
          stream,
          node: this.config.node,
          store: this.store,
          clock: this.clock,
          log: this.log,
          metrics: this.metrics,
          excludeTables: this.config.excludeTables,
          naturalKeyTables: this.config.naturalKeyTables,
          maxRecords: this.config.batchMaxRecords,
          maxBytes: this.config.batchMaxBytes,
          busyTimeoutMs: this.config.busyTimeoutMs,
          walMode: this.config.walMode,
        });
        db.refreshSchema();
        this.dbs.set(stream, db);
        this.log.info({ db: stream, path }, "syncing database");
      } catch (err) {
        db?.close();
        const message = (err as Error).message;
        if ((err as { code?: string }).code === "SQLITE_BUSY") {
          // The app holds its write lock (e.g. it is creating the file): next rescan.
          this.log.debug({ db: stream, path }, "database busy; will enrol it at the next rescan");
          continue;
        }
        if (err instanceof NodeIdentityError) this.failed.set(stream, message);
        this.log.error({ db: stream, path, err: message }, "cannot sync this database");
      }
    }
  }

  private storeFailed(err: unknown, doing: string): void {
    const message = (err as Error).message;
    if (this.storeError !== message) this.log.warn({ err: message, doing }, "store unreachable; local changes wait in the outbox and will be sent when it is back");
    this.storeError = message;
    this.metrics.set("unisync_store_up", 0);
  }

  private storeOk(): void {
    if (this.storeError) this.log.info("store reachable again");
    this.storeError = undefined;
    this.metrics.set("unisync_store_up", 1);
  }

  /** Origins are the folders under log/ in the store, except our own. */
  private async refreshOrigins(): Promise<void> {
    this.origins = (await listOrigins(this.store)).filter((o) => o !== this.config.node);
    this.storeOk();
  }

  private async captureLoop(): Promise<void> {
    while (!this.stopping) {
      let sealed = 0;
      for (const db of this.dbs.values()) {
        try {
          if (db.appCommitted() || db.hasPending()) sealed += db.sealPending(SEAL_TURN);
        } catch (err) {
          this.log.error({ db: db.stream, err: (err as Error).message }, "capture failed; retrying");
        }
      }
      if (this.files) sealed += this.files.sealPending();
      if (sealed > 0) this.wake?.();
      await sleep(this.config.captureIntervalMs);
    }
  }

  /**
   * One upload turn of one stream (a database or the folder). Returns whether a
   * full turn went up (more is waiting). Store health is only judged from calls
   * that were really made, so an idle stream cannot report "up" while the store is down.
   */
  private async uploadTurn(s: { stream: string; outbox: Outbox; upload(max: number): Promise<number> }): Promise<boolean> {
    let called = false;
    // Once per stream, before its first upload, even if the store was down at start.
    if (!this.storeChecked.has(s.stream)) {
      await s.outbox.checkStoreAgrees(this.store);
      this.storeChecked.add(s.stream);
      called = true;
    }
    const n = await s.upload(UPLOAD_TURN);
    if (called || n > 0) this.storeOk();
    return n === UPLOAD_TURN;
  }

  private async uploadLoop(): Promise<void> {
    let backoff = 0;
    while (!this.stopping) {
      let failed = false;
      let more = false;
      const streams: (DbSync | FolderSync)[] = [...this.dbs.values()];
      if (this.files) streams.push(this.files);
      for (const s of streams) {
        try {
          // A full turn means more is waiting: go round again without sleeping.
          if (await this.uploadTurn(s)) more = true;
        } catch (err) {
          if (err instanceof LogForkError) await this.dropForked(s, err);
          else {
            failed = true;
            this.storeFailed(err, `uploading ${s.stream}`);
            break; // the store is down: the other streams wait for the next round
          }
        }
      }
      backoff = failed ? Math.min(Math.max(backoff * 2, 250), 10000) : 0;
      if (more && !failed) continue;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, backoff || 1000);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = null;
    }
  }

  private async pullLoop(): Promise<void> {
    let interval = this.config.pollMinMs;
    let lastOriginScan = 0;
    while (!this.stopping) {
      let applied = 0;
      let failed = false;
      try {
        if (Date.now() - lastOriginScan > 2000) {
          await this.refreshOrigins();
          lastOriginScan = Date.now();
        }
        const streams: (DbSync | FolderSync)[] = [...this.dbs.values()];
        if (this.files) streams.push(this.files);
        for (const s of streams) {
          for (const origin of this.origins) {
            if (this.stopping) break;
            applied += await s.pull(origin);
            this.storeOk(); // judged only from calls really made (pull lists the store)
          }
        }
      } catch (err) {
        if ((err as Error).name === "StoreUnavailableError" || (err as Error).name === "StoreConfigError") this.storeFailed(err, "pulling");
        else this.log.error({ err: (err as Error).message, stack: (err as Error).stack }, "replay failed; retrying");
        failed = true;
      }
      if (failed) interval = Math.min(interval * 2, 10000);
      else interval = applied > 0 ? this.config.pollMinMs : Math.min(interval * 2, this.config.pollMaxMs);
      await sleep(interval);
    }
  }

  private async housekeepingLoop(): Promise<void> {
    let lastHeartbeat = 0;
    while (!this.stopping) {
      await sleep(Math.min(this.config.rescanMs, 1000));
      if (this.stopping) break;
      this.rescanDatabases();
      this.updateGauges();
      if (Date.now() - lastHeartbeat >= this.config.heartbeatMs) {
        lastHeartbeat = Date.now();
        await this.heartbeat().catch((err) => this.storeFailed(err, "writing heartbeat"));
      }
    }
  }

  /**
   * nodes/<node>.json: this node's status with the time it was written. gc reads
   * every node's cursors from it (per stream, per origin) and never collects a
   * segment a node has not applied yet.
   */
  private async heartbeat(body: Heartbeat = { ...this.status(), atMs: Date.now() }): Promise<void> {
    await this.store.put(`nodes/${encodeURIComponent(this.config.node)}.json`, Buffer.from(JSON.stringify(body)));
  }

  private updateGauges(): void {
    for (const db of this.dbs.values()) {
      const labels = { db: db.stream };
      this.metrics.set("unisync_pending_changes", db.pendingChanges(), labels);
      this.metrics.set("unisync_outbox_segments", db.outbox.size().segments, labels);
      this.metrics.set("unisync_parked_records", db.parkedCount(), labels);
      const { setAside } = db.conflictCounts();
      this.metrics.set("unisync_rows_set_aside", setAside, labels);
    }
  }

  status(): AgentStatus {
    return {
      node: this.config.node,
      store: this.store.description,
      startedMs: this.startedMs,
      origins: this.origins,
      databases: [...this.dbs.values()].map((db) => ({
        stream: db.stream,
        path: db.db.name,
        nextSeq: db.outbox.nextSeq(),
        pendingChanges: db.pendingChanges(),
        outboxSegments: db.outbox.size().segments,
        parked: db.parkedCount(),
        ...db.conflictCounts(),
        cursors: Object.fromEntries([...db.cursors()].map(([o, c]) => [o, c.seq])),
        problems: Object.fromEntries([...db.problems].map(([o, p]) => [o, p.message])),
      })),
      files: this.files ? this.filesStatus(this.files) : undefined,
      storeError: this.storeError,
      notSynced: Object.fromEntries(this.failed),
    };
  }

  private filesStatus(f: FolderSync): NonNullable<AgentStatus["files"]> {
    return {
      stream: f.stream,
      nextSeq: f.outbox.nextSeq(),
      pendingChanges: f.pendingChanges(),
      outboxSegments: f.outbox.size().segments,
      parked: f.parkedCount(),
      refused: f.refusedCount(),
      excluded: f.excluded.length,
      conflicts: f.state.conflictCount(),
      massDelete: f.massDelete,
      cursors: Object.fromEntries([...f.cursors()].map(([o, c]) => [o, c.seq])),
      problems: Object.fromEntries([...f.problems].map(([o, p]) => [o, p.message])),
    };
  }

  /** Finishes the work in hand, seals and tries once more to upload, then closes. */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    this.wake?.();
    await Promise.allSettled(this.loops);
    // Cursors no longer move once the loops are done; read them before the streams close.
    let last: Heartbeat | undefined;
    try {
      last = { ...this.status(), atMs: Date.now() };
    } catch {
      last = undefined;
    }
    if (this.files) {
      const files = this.files;
      try {
        await files.stop();
        const upload = files.upload().catch((err: Error) => this.log.warn({ err: err.message }, "file upload interrupted by stop"));
        await Promise.race([upload, sleep(5000)]);
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, "could not upload every file change before stopping; it stays in the outbox");
      }
      files.close();
    }
    for (const db of this.dbs.values()) {
      try {
        db.sealPending();
        const upload = db.upload(Number.MAX_SAFE_INTEGER).catch((err: Error) => this.log.warn({ db: db.stream, err: err.message }, "upload interrupted by stop"));
        await Promise.race([upload, sleep(5000)]);
      } catch (err) {
        this.log.warn({ db: db.stream, err: (err as Error).message }, "could not upload everything before stopping; it stays in the outbox");
      }
      db.close();
    }
    // A last heartbeat, so gc sees the cursors this node stopped at.
    if (last) await Promise.race([this.heartbeat(last).catch(() => undefined), sleep(3000)]);
    retireAgent(this.config.instanceDir);
    this.log.info("stopped");
  }
}
