/**
 * The agent: one per node. It finds the app's databases, keeps a DbSync per
 * database and a FolderSync for the instance folder (each a SyncStream), and
 * runs five loops: capture (seal local changes), upload, pull (apply other
 * origins), housekeeping (rescan, gauges, heartbeat, rejoin) and the snapshot
 * scheduler. The store being down never stops capture: sealed segments wait in
 * each stream's outbox until it is back.
 */
import { vaultOf } from "../keys/securestore.js";
import { hlcToMs } from "../log/hlc.js";
import { Activity } from "./activity.js";
import type { TailProblem } from "../log/tail.js";
import type { ProgressLine } from "../stream/progress.js";
import { KeyConfigError, OPERATOR, TRUST_STREAM } from "../keys/trust.js";
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import Database from "better-sqlite3";
import { forgetUnisync } from "../db/internal.js";
import { getMeta } from "../db/meta.js";
import type { Logger } from "pino";
import { HybridClock } from "../log/hlc.js";
import { decodeName, encodeName, listOrigins, logHead, parseSegmentKey } from "../log/keys.js";
import { LogForkError } from "../log/outbox.js";
import { enforcesConditionalWrites, REQUEST_KINDS, StoreConfigError, StoreUnavailableError, type ObjectStore, type RequestKind } from "../store/store.js";
import { publishPointer, SegmentIndex } from "../log/index.js";
import { TailPlanner } from "./tailing.js";
import { Hints } from "./hints.js";
import { stateDir, type Config } from "./config.js";
import { findDatabases } from "../db/databases.js";
import { DbSync, NodeIdentityError } from "../stream/dbsync.js";
import { openDbSync } from "../stream/streams.js";
import { FILES_STREAM, FolderSync } from "../stream/foldersync.js";
import type { SyncStream } from "../stream/stream.js";
import { Metrics } from "../stream/metrics.js";
import { announceAgent, retireAgent } from "../snapshot/agentlink.js";
import { SnapshotScheduler } from "../snapshot/scheduler.js";
import { finishBootstrap, placeNewestSnapshot, type BootstrapSettings } from "../snapshot/bootstrap.js";
import { join } from "node:path";
import { renameSync, rmSync } from "node:fs";
import { placeDatabase } from "../snapshot/bootstrap.js";
import { stageNewest } from "../snapshot/stage.js";
import { DatabaseAdopter } from "../snapshot/adopt.js";
import {
  collectedGaps,
  copyAside,
  coverageProblem,
  leftBehindDir,
  moveFolderFiles,
  moveFolderState,
  unsentReason,
  writeRejoinNote,
  type RejoinStatus,
} from "../snapshot/rejoin.js";

/** Spools of replaced database files' last segments, in the state folder: replaced-<stream>-<ms>/ (Agent.retire). */
const SPOOL = "replaced-";

/** Segments one database may seal per capture tick (the app's writes get the lock in between). */
const SEAL_TURN = 2;

/** Segments one database may upload before the next database gets its turn. */
const UPLOAD_TURN = 32;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
/** A bound on a wait at stop: its timer does not keep the process alive once the agent has stopped. */
const atMost = (ms: number) => new Promise<void>((r) => setTimeout(r, ms).unref());

/** The store's origins (folders under log/) are listed this often; the index names new ones sooner. */
const ORIGINS_RELIST_MS = 300_000;

/** After this node's app wrote, the cluster counts as busy this long (others likely write too): polls stay at pollMinMs. */
const ACTIVE_HOLD_MS = 30_000;
/** On stop: how long sealed changes may take to go up, and then how long the batch in flight may take to finish. */
const STOP_UPLOAD_MS = 5_000;

/** An idle node writes its heartbeat this many heartbeat intervals apart (a changed one goes at the next interval). */
const IDLE_HEARTBEAT_FACTOR = 6;

/** Segments one pull may apply of one origin's stream before the round goes on to the next (it comes back at once). */
const PULL_TURN = 64;

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
    /** Its existing rows wait for the cluster's log to be replayed before they are enrolled. */
    enrolling: boolean;
    /** While a table's existing rows are enrolled: rows done of total and the ETA. */
    enrolmentProgress?: ProgressLine;
    /** The longest the agent held this database's write lock (ms) since it started, and doing what. */
    longestWriteLockMs: number;
    longestWriteLockFor: string;
    cursors: Record<string, number>;
    /** Per origin, the clock time (ms) of the last record applied: lag in seconds against that origin's lastSealedMs. */
    cursorMs: Record<string, number>;
    /** When this node last sealed a segment of this stream (ms, 0: never). */
    lastSealedMs: number;
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
    cursorMs: Record<string, number>;
    lastSealedMs: number;
    problems: Record<string, string>;
  };
  storeError?: string;
  /** Store requests per second by kind over the last minute, and whether the store enforces If-None-Match (seq claims). */
  storeRequests: { perSecond: Record<RequestKind, number>; total: Record<RequestKind, number>; conditionalWrites: "enforced" | "not enforced" | "unknown" };
  /** How the pull loop reads: index polls, stream listings by why, LAN hints received. */
  tailing: { indexPolls: number; pollIntervalMs: number; listings: Record<string, number>; hintsReceived: number; hintsRefused: number };
  /** A node left behind by retention: waiting to start again from a snapshot (and why), or done (what was kept where). */
  rejoin?: RejoinStatus;
  /** Sync paused from the console: capture goes on, uploads and pulls wait. */
  paused: boolean;
  /** A secured cluster: the trust list this node holds, and why it could not take a newer one. */
  trust?: { cluster: string; version: number; currentKey: number; members: string[]; removed: string[]; error?: string };
  /** Databases not synced, with why. */
  notSynced: Record<string, string>;
  /** Database files replaced under the running agent (and re-enrolled), with when and why. */
  replaced: { stream: string; at: string; why: string }[];
}

/** Where a stream is: last segment applied per origin and its clock time, and when this node last wrote to it. */
function cursorFields(s: SyncStream): { cursors: Record<string, number>; cursorMs: Record<string, number>; lastSealedMs: number } {
  const all = [...s.cursors()];
  return {
    cursors: Object.fromEntries(all.map(([o, c]) => [o, c.seq])),
    cursorMs: Object.fromEntries(all.map(([o, c]) => [o, hlcToMs(c.lastHlc)])),
    lastSealedMs: s.outbox.lastSealedMs(),
  };
}

/** A secured node looks for a newer trust list this often (and at once when a segment is refused). */
const TRUST_CHECK_MS = 60_000;

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
  /** Loops end while the node starts again from a snapshot (rejoin), then run again. */
  private pausing = false;
  private rejoining: Promise<void> | null = null;
  /** Brings in databases of the cluster that this node lacks (snapshot/adopt.ts); what it last said of each. */
  private readonly adopter: DatabaseAdopter;
  private adopting: Promise<void> | null = null;
  private readonly adoptSaid = new Map<string, string>();
  private rejoinStatus: RejoinStatus | undefined;
  /** Last time a snapshot was staged for a rejoin that did not happen (not covering): not every tick. */
  private lastRejoinTry = 0;
  private rejoins = 0;
  /** Pull rounds completed, and the round in which collected holes were first seen (rejoinWanted). */
  private pullRounds = 0;
  private gapsSeenInRound: number | undefined;
  private storeError: string | undefined;
  private readonly startedMs = Date.now();
  private readonly loops: Promise<void>[] = [];
  private wake: (() => void) | null = null;
  /** Databases whose log was checked against the store (see Outbox.checkStoreAgrees). */
  private readonly storeChecked = new Set<string>();
  /** The cluster index and what the pull loop reads each round (tailing.ts). */
  private readonly index: SegmentIndex;
  private readonly planner: TailPlanner;
  private hints: Hints | null = null;
  private indexPolls = 0;
  private pollIntervalMs: number;
  private lastLocalActivityMs = 0;
  /** Ends the pull loop's sleep early: at once (stopping), or not before pollMinMs after its last poll (a LAN hint). */
  private wakePull: ((now?: boolean) => void) | null = null;
  private conditionalWrites: boolean | undefined;
  private requestRates: Record<RequestKind, number> = { LIST: 0, GET: 0, PUT: 0, HEAD: 0, DELETE: 0 };
  readonly snapshots: SnapshotScheduler;

  constructor(
    readonly config: Config,
    readonly store: ObjectStore,
    private readonly log: Logger,
  ) {
    this.index = new SegmentIndex(store, config.node, config.indexOverlapMs);
    this.planner = new TailPlanner(this.index, { repairEveryMs: config.repairEveryMs, gapGraceMs: Math.max(1000, 2 * config.pollMinMs) });
    this.pollIntervalMs = config.pollMinMs;
    this.adopter = new DatabaseAdopter({ instanceDir: config.instanceDir, node: config.node, store, log });
    this.snapshots = new SnapshotScheduler({
      instanceDir: config.instanceDir,
      workDir: join(stateDir(config.instanceDir), "snapshot-work"),
      node: config.node,
      store,
      log,
      intervalMs: config.snapshotIntervalMs,
      // A database whose own rows are not enrolled yet holds rows the log does not have: not in a snapshot.
      sources: () => ({ dbs: [...this.dbs.values()].filter((d) => !d.enrolling && !d.logUnknown), files: this.files }),
      stopping: () => this.halted(),
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
    await this.placeLogs().catch((err) => this.storeFailed(err, "looking up this node's log"));
    if (this.config.syncFiles) this.files = this.openFolder();
    if (placed) {
      await finishBootstrap(boot, { dbs: [...this.dbs.values()], files: this.files }).catch((err: Error) =>
        this.log.error({ err: err.message }, "bootstrap replay stopped early; the pull loop carries on"),
      );
    }
    this.files?.start();
    await this.refreshOrigins().catch((err) => this.storeFailed(err, "listing origins"));
    this.conditionalWrites = await enforcesConditionalWrites(this.store).catch(() => undefined);
    if (this.conditionalWrites === false) this.log.warn({ store: this.store.description }, "the store ignores If-None-Match (conditional writes): two agents started under one node name are caught at start only, not at every write");
    if (this.config.hintPort > 0 || this.config.hintPeers.length > 0) {
      const settings = { node: this.config.node, port: this.config.hintPort, peers: this.config.hintPeers, secret: this.config.hintSecret };
      this.hints = await Hints.start(settings, () => this.wakePull?.(), this.log).catch((err: Error) => {
        this.log.warn({ err: err.message, port: this.config.hintPort }, "LAN hints unavailable; polling goes on without them");
        return null;
      });
    }
    this.loops.push(this.captureLoop(), this.uploadLoop(), this.pullLoop(), this.housekeepingLoop(), this.snapshots.run());
  }

  private openFolder(): FolderSync {
    return new FolderSync({
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
      enrolFirst: true,
    });
  }

  private halted(): boolean {
    return this.stopping || this.pausing;
  }

  /** The databases this node syncs now (the console reads their conflicts and parked records). */
  databases(): DbSync[] {
    return [...this.dbs.values()];
  }

  private streams(): SyncStream[] {
    return this.files ? [...this.dbs.values(), this.files] : [...this.dbs.values()];
  }

  /** This node's own changes not in the store yet, per stream (folder: files waiting to be stable). */
  private unsent(streams: SyncStream[]): string | null {
    return unsentReason(
      streams.map((s) => ({
        stream: s.stream,
        outboxSegments: s.outbox.size().segments,
        localPending: s.unsentChanges(),
      })),
    );
  }

  private setRejoinStatus(st: RejoinStatus, level: "error" | "warn", msg: string, extra: object = {}): void {
    const same = this.rejoinStatus?.state === st.state && this.rejoinStatus.reason === st.reason;
    this.rejoinStatus = st;
    if (!same) this.log[level]({ ...extra, streams: st.streams, reason: st.reason }, msg);
  }

  /**
   * A stream met a hole gc made (it will never be filled): whether to start the
   * affected streams again from a snapshot now. Cheap checks every tick; the
   * snapshot is fetched at most once a minute. Once per process at most.
   */
  private rejoinWanted(): boolean {
    if (!this.config.bootstrap || this.rejoining || this.adopting) return false;
    const gaps = collectedGaps(this.streams());
    if (gaps.length === 0) {
      this.gapsSeenInRound = undefined;
      return false;
    }
    // Every stream reports its holes in a whole pull round first: a rejoin covers them all at once.
    this.gapsSeenInRound ??= this.pullRounds;
    if (this.pullRounds <= this.gapsSeenInRound) return false;
    const affected = [...new Set(gaps.map((g) => g.stream))];
    const advice = "start the node again from a snapshot by hand (see the collected message)";
    if (this.rejoins > 0) {
      this.setRejoinStatus({ state: "waiting", atMs: Date.now(), streams: affected, reason: `already started again from a snapshot once in this run; ${advice}` }, "error", "segments this node needs were collected by gc again");
      return false;
    }
    const unsent = this.unsent(this.streams().filter((s) => affected.includes(s.stream)));
    if (unsent) {
      this.setRejoinStatus(
        { state: "waiting", atMs: Date.now(), streams: affected, reason: `local changes are not in the store yet (${unsent}); they keep uploading, and the node starts again from a snapshot once they are` },
        "error",
        "segments this node needs were collected by gc; not starting again from a snapshot while local changes are unsent",
      );
      return false;
    }
    return Date.now() - this.lastRejoinTry >= 60_000;
  }

  /**
   * Starts the streams that met a collected hole again from the newest snapshot
   * that covers it (see snapshot/rejoin.ts): stage and check it, pause every
   * loop, check again that nothing local is unsent, keep what the node held in
   * .unisync/left-behind-<time>/, write the snapshot in (backup API into the
   * live database), replay after its vector, resume. Anything going wrong before
   * the first file is touched resumes as before.
   */
  private async rejoin(): Promise<void> {
    this.lastRejoinTry = Date.now();
    const gaps = collectedGaps(this.streams());
    const affected = [...new Set(gaps.map((g) => g.stream))];
    const sd = stateDir(this.config.instanceDir);
    const stageDir = join(sd, "rejoin-stage");
    this.pausing = true;
    this.wake?.();
    this.wakePull?.(true);
    await Promise.allSettled(this.loops);
    this.loops.length = 0;
    let folderStopped = false;
    let touched = false;
    const folder = affected.includes(FILES_STREAM) ? this.files : null;
    try {
      const staged = await stageNewest(this.store, stageDir, {
        onCorrupt: (ref, message) => this.log.error({ snapshot: ref.key, problem: message }, "snapshot unusable; trying the next older one"),
      });
      const notCovered = staged ? await coverageProblem(this.store, staged, affected, FILES_STREAM) : "the store holds no usable snapshot";
      if (!staged || notCovered) {
        this.setRejoinStatus(
          { state: "waiting", atMs: Date.now(), streams: affected, reason: `${notCovered}; tried again every minute (a newer snapshot from another node fixes it)` },
          "error",
          "segments this node needs were collected by gc, and no snapshot can replace them yet",
        );
        return;
      }
      if (folder) {
        await folder.stop();
        folderStopped = true;
      }
      const unsent = this.unsent(this.streams().filter((s) => affected.includes(s.stream)));
      if (unsent) {
        this.rejoinStatus = undefined; // reported at the next tick
        return;
      }
      const dbs = [...this.dbs.values()].filter((d) => affected.includes(d.stream));
      const dest = leftBehindDir(sd);
      for (const d of dbs) {
        if (copyAside(d.db, join(dest, d.stream)) > 0) {
          this.log.info({ db: d.stream }, "the app wrote while this node was about to start again from a snapshot; trying again later");
          rmSync(dest, { recursive: true, force: true });
          this.lastRejoinTry = 0;
          return;
        }
      }
      // From here on, files move: no way back but forward.
      touched = true;
      for (const d of dbs) {
        d.close();
        this.dbs.delete(d.stream);
      }
      for (const st of affected) this.storeChecked.delete(st); // its log is checked against the store again before the next upload
      let filesMoved = 0;
      if (folder) {
        folder.close();
        this.files = null;
        moveFolderState(sd, dest);
        const synced = new Set(findDatabases(this.config.instanceDir, this.config.databases).synced.map((x) => x.stream));
        filesMoved = moveFolderFiles(this.config.instanceDir, dest, (rel, isDir) => synced.has(rel) || folder.scanner.exclusion(rel, isDir) !== null);
      }
      for (const d of dbs) {
        const part = staged.dbs.find((p) => p.stream === d.stream)!;
        await placeDatabase(part.path, join(this.config.instanceDir, d.stream));
      }
      if (folder) renameSync(staged.filesState!, join(sd, "files.db"));
      rmSync(stageDir, { recursive: true, force: true });
      const status: RejoinStatus = {
        state: "done",
        atMs: Date.now(),
        reason: gaps.map((g) => `${g.origin}/${g.stream} from seq ${g.seq} was collected by gc`).join("; "),
        streams: affected,
        snapshot: staged.ref.key,
        leftBehind: dest,
        databasesMoved: dbs.length,
        filesMoved,
      };
      writeRejoinNote(dest, status);
      this.rejoins++;
      this.rejoinStatus = status;
      this.log.warn(
        { streams: affected, gaps: gaps.length, snapshot: staged.ref.key, databasesMoved: dbs.length, filesMoved, leftBehind: dest, reason: status.reason },
        `this node was offline longer than the retention window: started ${affected.length} stream(s) again from the newest snapshot; what it held (${dbs.length} database(s), ${filesMoved} file(s)) is kept in ${dest}`,
      );
      // Reopen what was replaced, then the bootstrap replay, as at start.
      this.rescanDatabases();
      const reopened = [...this.dbs.values()].filter((d) => affected.includes(d.stream));
      await this.placeLogs();
      if (folder) this.files = this.openFolder();
      const boot: BootstrapSettings = { ...this.config, store: this.store, log: this.log };
      await finishBootstrap(boot, { dbs: reopened, files: folder ? this.files : null }).catch((err: Error) =>
        this.log.error({ err: err.message }, "bootstrap replay stopped early; the pull loop carries on"),
      );
      if (folder) {
        this.files?.start();
        folderStopped = false;
      }
    } catch (err) {
      this.log.error({ err: (err as Error).message, touched }, touched ? "starting again from a snapshot failed halfway; what the node held is in .unisync/left-behind-*" : "could not start again from a snapshot; carrying on as before");
      if (touched) this.rescanDatabases();
    } finally {
      rmSync(stageDir, { recursive: true, force: true });
      if (folderStopped) {
        // A stopped FolderSync does not start again: a new one on the same (or the snapshot's) state.
        this.files?.close();
        try {
          this.files = this.openFolder();
          this.files.start();
        } catch (err) {
          this.files = null;
          this.log.error({ err: (err as Error).message }, "the instance folder's files will not be synced");
        }
      }
      this.pausing = false;
      if (!this.stopping) this.loops.push(this.captureLoop(), this.uploadLoop(), this.pullLoop(), this.housekeepingLoop(), this.snapshots.run());
    }
  }

  /**
   * The file at a database's path is not the one the agent has open (an
   * operator moved a restored backup into place, or removed it). Nothing more is
   * applied to or captured from the old file; what it had captured still goes up
   * (the log goes on from there), then it is closed. The new file is opened at
   * the next rescan as a database new to this node: it replays the log (this
   * node's own included) before its rows are enrolled, so a restored backup never
   * drags the cluster back and gets everything logged since it was taken. If it
   * is a backup of this node's own file, unisync's old state in it (behind the
   * log) is dropped first.
   */
  private async retire(db: DbSync, why: string): Promise<void> {
    const stream = db.stream;
    this.dbs.delete(stream);
    this.storeChecked.delete(stream);
    this.replacements.push({ stream, atMs: Date.now(), why });
    this.log.warn({ db: stream, why }, "the database file is not the one unisync had open: it stops syncing the old one and enrols the new one as a copy (its rows never override newer logged changes)");
    // What the old file captured goes up (its log goes on in the new file), from a
    // spool: the old connection is closed at once, so that its -wal and -shm are
    // gone before the app opens the new file.
    const spool = join(stateDir(this.config.instanceDir), `${SPOOL}${encodeName(stream)}-${Date.now()}`);
    try {
      db.sealPending();
      mkdirSync(spool, { recursive: true });
      for (const e of db.outbox.oldest(Number.MAX_SAFE_INTEGER)) writeFileSync(join(spool, encodeURIComponent(e.key)), e.bytes);
    } catch (err) {
      this.log.error({ db: stream, err: (err as Error).message }, "could not keep the old file's last changes");
    }
    db.close();
    if (!existsSync(db.db.name)) return;
    const copy = new Database(db.db.name, { fileMustExist: true, timeout: this.config.busyTimeoutMs });
    try {
      const owner = copy.prepare("SELECT 1 FROM sqlite_master WHERE name = '_unisync_meta'").get() ? getMeta(copy, "node") : undefined;
      if (owner === this.config.node) {
        const n = forgetUnisync(copy);
        this.log.warn({ db: stream, objects: n }, "the new file is an older copy of this node's own: dropped unisync's state in it (the log is ahead of it)");
      }
    } finally {
      copy.close();
    }
    await this.uploadSpools().catch((err) => this.storeFailed(err, "uploading what a replaced file held"));
  }

  /** Streams whose replaced file's last segments wait in a spool (.unisync/replaced-*): not reopened before they are up. */
  private spooledStreams(): Set<string> {
    const dir = stateDir(this.config.instanceDir);
    if (!existsSync(dir)) return new Set();
    return new Set(readdirSync(dir).filter((n) => n.startsWith(SPOOL)).map((n) => decodeName(n.slice(SPOOL.length).replace(/-\d+$/, ""))));
  }

  /** Uploads the spooled segments of replaced files (idempotent puts: fixed keys and bytes), then drops the spool. */
  private async uploadSpools(): Promise<void> {
    const dir = stateDir(this.config.instanceDir);
    for (const name of existsSync(dir) ? readdirSync(dir).filter((n) => n.startsWith(SPOOL)) : []) {
      const spool = join(dir, name);
      const stream = decodeName(name.slice(SPOOL.length).replace(/-\d+$/, ""));
      for (const f of readdirSync(spool)) {
        const key = decodeURIComponent(f);
        await this.store.put(key, readFileSync(join(spool, f)));
        const seg = parseSegmentKey(key);
        if (seg) await publishPointer(this.store, Date.now(), this.config.node, stream, [seg]);
        rmSync(join(spool, f));
      }
      rmSync(spool, { recursive: true, force: true });
    }
  }

  /** Every file replacement seen in this run (status). */
  private readonly replacements: { stream: string; atMs: number; why: string }[] = [];

  /** Whether the file of this stream was replaced or removed under this agent (retire). */
  private retiredThisRun(stream: string): boolean {
    return this.replacements.some((r) => r.stream === stream);
  }

  /** A stream whose log cannot be written without forking it is taken out of sync, loudly. */
  private async dropForked(s: SyncStream, err: LogForkError): Promise<void> {
    if (s === this.files) {
      this.log.error({ err: err.message }, "the instance folder's files will not be synced");
      await this.files.stop();
      s.close();
      this.files = null;
      return;
    }
    this.log.error({ db: s.stream, err: err.message }, "this database will not be synced");
    this.failed.set(s.stream, err.message);
    s.close();
    this.dbs.delete(s.stream);
  }

  /** Database streams found in the folder by the start-up scan (plus a marker, so the set is never empty after it). */
  private readonly startScanned = new Set<string>();

  /** Opens DbSyncs for databases that appeared (new bind, new file). */
  rescanDatabases(): void {
    const open = new Set([...this.dbs.values()].map((d) => d.db.name));
    const found = findDatabases(this.config.instanceDir, this.config.databases, false, open);
    if (this.startScanned.size === 0) {
      this.startScanned.add("\u0000start");
      for (const f of found.synced) this.startScanned.add(f.stream);
    }
    const spooled = this.spooledStreams();
    for (const { path, stream } of found.synced) {
      if (this.dbs.has(stream) || this.failed.has(stream) || spooled.has(stream)) continue;
      let db: DbSync | undefined;
      try {
        // A file that was not there when the agent started (nor replaced one it had open) is
        // the app's new database: rows in it were written a moment ago, before the triggers.
        const rowsAreNew = this.startScanned.size > 0 && !this.startScanned.has(stream) && !this.retiredThisRun(stream);
        db = openDbSync({ ...this.config, store: this.store, log: this.log, enrolAfterCatchUp: true, rowsAreNew }, path, stream, this.clock, this.metrics);
        if (db.enrolling) this.log.info({ db: stream }, "new database: replaying the cluster's log into it before enrolling its existing rows");
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

  /** Whether this node would sync a database of the cluster and does not have it (see snapshot/adopt.ts). */
  private lacks(stream: string): boolean {
    if (stream === FILES_STREAM || stream.startsWith(".") || this.dbs.has(stream) || this.failed.has(stream)) return false;
    // A file that went away under this agent (retire) is the operator's doing: not brought back.
    if (this.retiredThisRun(stream)) return false;
    // Found in the folder: top-level files, and deeper ones named in the config.
    if (stream.includes("/") && !this.config.databases.includes(stream)) return false;
    return !existsSync(join(this.config.instanceDir, stream)) && !this.spooledStreams().has(stream);
  }

  /**
   * A node that started before any snapshot existed, or with files of its own,
   * did not bootstrap: the databases other nodes sync are brought in from a
   * snapshot once one holds them. Runs beside the housekeeping loop.
   */
  private lookForMissingDatabases(): void {
    if (!this.config.bootstrap || this.adopting || this.halted()) return;
    const hinted = [...this.index.streams].filter((s) => this.lacks(s));
    if (!this.adopter.due(hinted.length > 0)) return;
    this.adopting = (async () => {
      const r = await this.adopter.adopt((s) => this.lacks(s));
      const say = (stream: string, why: string, level: "info" | "warn", msg: string) => {
        if (this.adoptSaid.get(stream) === why) return;
        this.adoptSaid.set(stream, why);
        this.log[level]({ db: stream, why }, msg);
      };
      for (const p of r.placed) {
        this.adoptSaid.delete(p.stream);
        this.log.info({ db: p.stream, snapshot: p.snapshot }, "a database of the cluster was missing here: placed its copy from the newest snapshot that holds it; the log after it is replayed before this node writes to it");
        this.activity.add({ kind: "control", stream: p.stream, text: `database brought in from snapshot ${p.snapshot}` });
      }
      for (const d of r.declined) say(d.stream, d.why, d.routine ? "info" : "warn", "a database of the cluster is missing here and was not brought in");
      const handled = new Set([...r.placed, ...r.declined].map((x) => x.stream));
      for (const stream of hinted) if (!handled.has(stream)) say(stream, "no snapshot holds it yet", "info", "other nodes sync a database this node lacks: it is brought in from the first snapshot that holds it");
      if (r.placed.length > 0) this.rescanDatabases();
    })()
      .catch((err: Error) => {
        if (err instanceof StoreUnavailableError) this.storeFailed(err, "looking for databases this node lacks");
        else this.log.error({ err: err.message }, "could not bring in a database this node lacks; trying again later");
      })
      .finally(() => (this.adopting = null));
  }

  private storeFailed(err: unknown, doing: string): void {
    const message = (err as Error).message;
    if (this.storeError !== message) this.log.warn({ err: message, doing }, "store unreachable; local changes wait in the outbox and will be sent when it is back");
    this.storeError = message;
    this.storeFailedMs = Date.now();
    this.metrics.set("unisync_store_up", 0);
  }

  private storeFailedMs = 0;

  /** Calls that began at `sinceMs` succeeded; one begun before the last failure proves nothing (it may have been in flight). */
  private storeOk(sinceMs = Date.now()): void {
    if (sinceMs < this.storeFailedMs) return;
    if (this.storeError) this.log.info("store reachable again");
    this.storeError = undefined;
    this.metrics.set("unisync_store_up", 1);
  }

  /** Origins are the folders under log/ in the store, except our own. */
  private async refreshOrigins(): Promise<void> {
    const since = Date.now();
    this.origins = (await listOrigins(this.store)).filter((o) => o !== this.config.node);
    this.originsListed = true;
    this.storeOk(since);
  }

  /**
   * A database new to this node: its log goes on after whatever this node's log
   * already holds for it (a restored or replaced file), learnt from the store
   * before anything is sealed (DbSync.continueLog).
   */
  private async placeLogs(): Promise<void> {
    for (const db of this.dbs.values()) if (db.logUnknown) db.continueLog(await logHead(this.store, this.config.node, db.stream));
  }

  /** Whether the store's origins were listed at least once (a new database enrols only after replaying them all). */
  private originsListed = false;

  private async captureLoop(): Promise<void> {
    while (!this.halted()) {
      let sealed = 0;
      for (const db of this.dbs.values()) {
        try {
          if (db.appCommitted() || db.hasPending()) sealed += db.sealPending(SEAL_TURN);
        } catch (err) {
          this.log.error({ db: db.stream, err: (err as Error).message }, "capture failed; retrying");
        }
      }
      if (this.files) sealed += this.files.sealPending();
      if (sealed > 0) {
        this.lastLocalActivityMs = Date.now();
        this.wake?.();
      }
      await sleep(this.config.captureIntervalMs);
    }
  }

  /**
   * One upload turn of one stream (a database or the folder). Returns whether a
   * full turn went up (more is waiting). Store health is only judged from calls
   * that were really made, so an idle stream cannot report "up" while the store is down.
   */
  private async uploadTurn(s: SyncStream): Promise<boolean> {
    const since = Date.now();
    let called = false;
    // A database new to this node seals nothing before it knows where its log goes on (placeLogs).
    if (s.logUnknown) return false;
    // Once per stream, before its first upload, even if the store was down at start.
    if (!this.storeChecked.has(s.stream)) {
      await s.outbox.checkStoreAgrees(this.store);
      this.storeChecked.add(s.stream);
      called = true;
    }
    const n = await s.upload(UPLOAD_TURN);
    if (n > 0) {
      this.hints?.notify();
      this.activity.add({ kind: "uploaded", stream: s.stream, text: `sent ${n} segment${n === 1 ? "" : "s"} of ${s.stream} (through seq ${s.outbox.nextSeq() - 1 - s.outbox.size().segments})` });
    }
    if (called || n > 0) this.storeOk(since);
    return n === UPLOAD_TURN;
  }

  private async uploadLoop(): Promise<void> {
    let backoff = 0;
    while (!this.halted()) {
      if (this.paused) await this.whilePaused();
      let failed = false;
      let more = false;
      for (const s of this.streams()) {
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
      await this.uploadSpools().catch((err) => {
        failed = true;
        this.storeFailed(err, "uploading what a replaced file held");
      });
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

  /**
   * Each round: one LIST of the cluster index, then only the pulls the planner
   * asks for (tailing.ts), fetched by key where the index named them. Polls
   * every pollMinMs while anything moves (here or anywhere), backing off to
   * pollMaxMs when idle; a LAN hint ends an idle wait early.
   */
  private async pullLoop(): Promise<void> {
    let lastOriginScan = Date.now();
    while (!this.halted()) {
      if (this.paused) await this.whilePaused();
      const roundMs = Date.now();
      let applied = 0;
      let fresh = 0;
      let more = false;
      let failed = false;
      try {
        if (roundMs - lastOriginScan > ORIGINS_RELIST_MS || !this.originsListed) {
          await this.refreshOrigins();
          lastOriginScan = roundMs;
        }
        // Only pointers of streams this node applies make it poll fast again.
        const polled = await this.index.poll(Date.now(), (_origin, stream) => this.dbs.has(stream) || (stream === FILES_STREAM && this.files !== null));
        this.indexPolls++;
        const vault = vaultOf(this.store);
        if (vault && this.index.head(OPERATOR, TRUST_STREAM) > vault.trust.version) await this.refreshTrust(true);
        this.storeOk(roundMs);
        fresh = polled.fresh;
        for (const k of polled.skewed) {
          this.log.warn({ origin: k.origin, offsetMs: k.offsetMs }, "this origin's clock is far from the store's: its index entries may land behind readers' window (gap repair still finds its segments, later); fix its clock (NTP)");
        }
        await this.placeLogs();
        const streams = this.streams();
        const dbs = this.databases();
        const byName = new Map(streams.map((s) => [s.stream, s]));
        const origins = [...new Set([...this.origins, ...this.index.origins])].filter((o) => o !== this.config.node);
        const cursorsOf = new Map(streams.map((s) => [s.stream, s.cursors()]));
        const cursor = (stream: string, origin: string) => cursorsOf.get(stream)?.get(origin)?.seq ?? 0;
        const plan = this.planner.plan(
          streams.map((s) => ({ stream: s.stream, cursor: (o: string) => cursor(s.stream, o), listAll: s.enrolling })),
          origins,
        );
        // A database new to this node first replays this node's own earlier log (Agent.placeLogs).
        for (const s of streams) if (s.replaysOwnLog()) plan.push({ stream: s.stream, origin: this.config.node });
        // A database repairs references only once what this round reads of its log is applied.
        for (const s of dbs) s.expectOrigins(plan.filter((p) => p.stream === s.stream).map((p) => p.origin));
        for (const p of plan) {
          if (this.paused) break; // paused mid-round: nothing more is applied from now on
          const s = byName.get(p.stream)!;
          const start = cursor(p.stream, p.origin);
          let before = start;
          let records = 0;
          for (let pulled = 0; pulled < PULL_TURN && !this.halted(); pulled += 16) {
            const n = await s.pull(p.origin, 16, Infinity, () => this.halted(), p.known);
            applied += n;
            records += n;
            const after = s.cursor(p.origin).seq;
            this.index.forget(p.origin, p.stream, after);
            // Go on while the last pull was a full turn, or the index names the next segment already.
            const again = after - before >= 16 || (after > before && p.known?.has(after + 1) === true);
            if (!again) break;
            if (pulled + 16 >= PULL_TURN) more = true;
            before = after;
          }
          const reached = s.cursor(p.origin).seq;
          if (reached > start) {
            this.activity.add({ kind: "applied", stream: p.stream, origin: p.origin, text: `applied ${records} record${records === 1 ? "" : "s"} of ${p.origin} to ${p.stream} (segments ${start + 1}..${reached})` });
          }
          this.storeOk(roundMs); // judged only from calls really made
        }
        for (const s of dbs) {
          s.maintain();
          // A new database enrols its own rows once the cluster's log is in it.
          const own = s.replaysOwnLog() ? [this.config.node] : [];
          if (s.enrolling && this.originsListed && !this.halted() && s.caughtUp([...origins, ...own])) {
            s.finishEnrolment();
            this.log.info({ db: s.stream }, "replayed the cluster's log; enrolled this database's existing rows");
          }
        }
        // The same for a folder met for the first time: its files are judged against the cluster's log.
        const files = this.files;
        if (files?.enrolling && this.originsListed && !this.halted() && files.caughtUp(origins)) {
          files.finishEnrolment();
          this.log.info("replayed the cluster's folder log; looking at the files this folder had before");
        }
        if (!this.halted()) {
          this.planner.firstRoundDone();
          this.pullRounds++;
        }
      } catch (err) {
        if (err instanceof StoreUnavailableError || err instanceof StoreConfigError) this.storeFailed(err, "pulling");
        else this.log.error({ err: (err as Error).message, stack: (err as Error).stack }, "replay failed; retrying");
        failed = true;
      }
      const busy = applied > 0 || fresh > 0 || Date.now() - this.lastLocalActivityMs < ACTIVE_HOLD_MS;
      if (failed) this.pollIntervalMs = Math.min(Math.max(this.pollIntervalMs * 2, this.config.pollMinMs), 10_000);
      else if (more) this.pollIntervalMs = 0;
      else this.pollIntervalMs = busy ? this.config.pollMinMs : Math.min(this.pollIntervalMs * 2, this.config.pollMaxMs);
      await this.sleepPull(roundMs);
    }
  }

  /** Waits out the poll interval from the round's start; a LAN hint shortens it, never below pollMinMs. */
  private async sleepPull(roundMs: number): Promise<void> {
    const until = roundMs + this.pollIntervalMs;
    const floor = roundMs + Math.min(this.pollIntervalMs, this.config.pollMinMs);
    await new Promise<void>((resolve) => {
      let t = setTimeout(resolve, Math.max(0, until - Date.now()));
      this.wakePull = (now = false) => {
        clearTimeout(t);
        t = setTimeout(resolve, now ? 0 : Math.max(0, floor - Date.now()));
        this.wakePull = null;
      };
    });
    this.wakePull = null;
  }

  private async housekeepingLoop(): Promise<void> {
    let lastHeartbeat = 0;
    let lastSaid = "";
    while (!this.halted()) {
      await sleep(Math.min(this.config.rescanMs, 1000));
      if (this.halted()) break;
      for (const db of [...this.dbs.values()]) {
        const why = db.fileReplaced();
        if (why) await this.retire(db, why);
      }
      this.rescanDatabases();
      this.lookForMissingDatabases();
      this.updateGauges();
      this.noteProblems();
      if (this.rejoinWanted()) {
        // Runs beside the loops it pauses (this one included): not awaited here.
        this.rejoining = this.rejoin().finally(() => (this.rejoining = null));
        break;
      }
      // A heartbeat that says nothing new waits longer: an idle cluster's requests stay few.
      const since = Date.now() - lastHeartbeat;
      if (since >= this.config.heartbeatMs) {
        const body = this.status();
        await this.refreshTrust(this.streams().some((s) => [...s.problems.values()].some((p) => p.kind === "refused")));
        const said = JSON.stringify({ ...body, storeRequests: undefined, tailing: undefined });
        if (said !== lastSaid || since >= IDLE_HEARTBEAT_FACTOR * this.config.heartbeatMs) {
          lastHeartbeat = Date.now();
          lastSaid = said;
          await this.heartbeat({ ...body, atMs: lastHeartbeat }).catch((err) => this.storeFailed(err, "writing heartbeat"));
        }
      }
    }
  }

  /** The console's live feed. */
  readonly activity = new Activity();
  private paused = false;
  private resumed: (() => void) | null = null;

  private problemsSeen = new Map<string, string>();

  /** A stream that starts waiting (gap, refused or corrupt segment, fork) goes to the activity feed once. */
  private noteProblems(): void {
    const now = new Map<string, string>();
    for (const s of this.streams()) for (const [origin, p] of s.problems) now.set(`${s.stream}\n${origin}`, p.message);
    for (const [k, message] of now) {
      if (this.problemsSeen.get(k) === message) continue;
      const [stream, origin] = k.split("\n");
      this.activity.add({ kind: "problem", stream, origin, text: message });
    }
    this.problemsSeen = now;
  }

  /** Stops uploading and pulling (capture goes on: the app's writes wait in the outbox) until resume(). */
  pause(): void {
    if (this.paused) return;
    this.paused = true;
    this.activity.add({ kind: "control", text: "sync paused: changes are captured and wait; nothing is sent or applied" });
    this.log.info("sync paused");
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.activity.add({ kind: "control", text: "sync resumed" });
    this.log.info("sync resumed");
    this.resumed?.();
    this.syncNow();
  }

  /** Ends the loops' waits: upload and poll at once. */
  syncNow(): void {
    this.wake?.();
    this.wakePull?.(true);
  }

  /** While paused, a loop waits here (and still ends when the agent stops). */
  private async whilePaused(): Promise<void> {
    while (this.paused && !this.halted()) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 1000);
        this.resumed = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
  }

  private trustCheckedMs = 0;
  private trustError: string | undefined;

  /**
   * Reads a newer trust list (secured clusters): at once when the index
   * announces one (before this round applies anything) or a segment was refused
   * (a data key or member this node has not seen yet), else once a minute.
   */
  private async refreshTrust(force: boolean): Promise<void> {
    const vault = vaultOf(this.store);
    if (!vault) return;
    // Forced checks too are spaced out: a forged announcement must not turn every poll into three requests.
    if (Date.now() - this.trustCheckedMs < (force ? 2000 : TRUST_CHECK_MS)) return;
    this.trustCheckedMs = Date.now();
    try {
      if (await vault.refresh(this.store)) {
        this.log.info({ version: vault.trust.version, currentKey: vault.trust.currentKey, members: vault.trust.members.map((m) => m.name) }, "accepted a new trust list");
        this.wakePull?.();
      }
      this.trustError = undefined;
    } catch (err) {
      if (!(err instanceof KeyConfigError)) return this.storeFailed(err, "reading the trust list");
      if (this.trustError !== err.message) this.log.error({ err: err.message }, "the cluster's trust list was not accepted");
      this.trustError = err.message;
    }
  }

  private trustStatus(): AgentStatus["trust"] {
    const t = vaultOf(this.store)?.trust;
    if (!t) return undefined;
    return { cluster: t.cluster, version: t.version, currentKey: t.currentKey, members: t.members.map((m) => m.name), removed: t.removed.map((r) => r.name), error: this.trustError };
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
    this.requestRates = this.store.requests.perSecond();
    for (const kind of REQUEST_KINDS) this.metrics.setTotal("unisync_store_requests_total", this.store.requests.total[kind], { kind });
    this.metrics.setTotal("unisync_index_polls_total", this.indexPolls);
    for (const [why, n] of Object.entries(this.planner.listings)) this.metrics.setTotal("unisync_stream_listings_total", n, { why });
    this.metrics.set("unisync_poll_interval_seconds", this.pollIntervalMs / 1000);
    for (const db of this.dbs.values()) {
      const labels = { db: db.stream };
      this.metrics.set("unisync_pending_changes", db.pendingChanges(), labels);
      this.metrics.set("unisync_outbox_segments", db.outbox.size().segments, labels);
      this.metrics.set("unisync_parked_records", db.parkedCount(), labels);
      const { setAside } = db.conflictCounts();
      this.metrics.set("unisync_rows_set_aside", setAside, labels);
    }
    for (const s of this.streams()) {
      const labels = { db: s.stream };
      // Segments the index has named (or a listing found) past this node's cursors: incoming lag.
      const cursors = s.cursors();
      let lag = 0;
      for (const origin of new Set([...cursors.keys(), ...this.index.origins])) lag += Math.max(0, this.index.head(origin, s.stream) - (cursors.get(origin)?.seq ?? 0));
      this.metrics.set("unisync_lag_segments", lag, labels);
      // Streams of other origins that wait (gap, corrupt or refused segment, fork, collected), by kind.
      const waiting: Record<TailProblem["kind"], number> = { gap: 0, corrupt: 0, refused: 0, fork: 0, collected: 0 };
      for (const p of s.problems.values()) waiting[p.kind]++;
      for (const [kind, n] of Object.entries(waiting)) this.metrics.set("unisync_streams_waiting", n, { ...labels, kind });
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
        enrolling: db.enrolling,
        enrolmentProgress: db.enrolProgress,
        longestWriteLockMs: Math.round(db.writes.longestMs),
        longestWriteLockFor: db.writes.longestWhat,
        ...cursorFields(db),
        problems: Object.fromEntries([...db.problems].map(([o, p]) => [o, p.message])),
      })),
      files: this.files ? this.filesStatus(this.files) : undefined,
      storeError: this.storeError,
      paused: this.paused,
      trust: this.trustStatus(),
      storeRequests: {
        perSecond: this.requestRates,
        total: this.store.requests.snapshot(),
        conditionalWrites: this.conditionalWrites === undefined ? "unknown" : this.conditionalWrites ? "enforced" : "not enforced",
      },
      tailing: {
        indexPolls: this.indexPolls,
        pollIntervalMs: this.pollIntervalMs,
        listings: { ...this.planner.listings },
        hintsReceived: this.hints?.received ?? 0,
        hintsRefused: this.hints?.refused ?? 0,
      },
      rejoin: this.rejoinStatus,
      notSynced: Object.fromEntries(this.failed),
      replaced: this.replacements.map((r) => ({ stream: r.stream, at: new Date(r.atMs).toISOString(), why: r.why })),
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
      ...cursorFields(f),
      problems: Object.fromEntries([...f.problems].map(([o, p]) => [o, p.message])),
    };
  }

  /** Finishes the work in hand, seals and tries once more to upload, then closes. */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    this.wake?.();
    this.wakePull?.(true);
    this.hints?.close();
    await this.rejoining;
    await this.adopting;
    await Promise.allSettled(this.loops);
    // Cursors no longer move once the loops are done; read them before the streams close.
    let last: Heartbeat | undefined;
    try {
      last = { ...this.status(), atMs: Date.now() };
    } catch {
      last = undefined;
    }
    // What is sealed goes up within one shared budget; a stream is closed only once its
    // upload has returned (what did not go up stays in its outbox for the next start).
    const uploadUntil = Date.now() + STOP_UPLOAD_MS;
    if (this.files) {
      const files = this.files;
      try {
        await files.stop();
        await this.uploadBeforeStop(undefined, (stop) => files.upload(Number.MAX_SAFE_INTEGER, stop), uploadUntil);
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, "could not upload every file change before stopping; it stays in the outbox");
      }
      files.close();
    }
    for (const db of this.dbs.values()) {
      try {
        db.sealPending();
        await this.uploadBeforeStop(db.stream, (stop) => db.upload(Number.MAX_SAFE_INTEGER, 16, stop), uploadUntil);
      } catch (err) {
        this.log.warn({ db: db.stream, err: (err as Error).message }, "could not upload everything before stopping; it stays in the outbox");
      }
      db.close();
    }
    // A last heartbeat, so gc sees the cursors this node stopped at.
    if (last) await Promise.race([this.heartbeat(last).catch(() => undefined), atMost(3000)]);
    retireAgent(this.config.instanceDir);
    this.log.info("stopped");
  }

  /**
   * Runs a stream's last upload until `untilMs`, then asks it to stop after the batch in
   * flight and waits for that (up to STOP_UPLOAD_MS more), so the stream is never closed
   * under its own upload. Gives up waiting only on a store that does not answer.
   */
  private async uploadBeforeStop(stream: string | undefined, upload: (stop: () => boolean) => Promise<number>, untilMs: number): Promise<void> {
    let stopping = false;
    let done = false;
    const running = upload(() => stopping).then(
      () => void (done = true),
      (err: Error) => {
        done = true;
        throw err;
      },
    );
    await Promise.race([running.catch(() => undefined), atMost(Math.max(0, untilMs - Date.now()))]);
    if (done) return running;
    stopping = true;
    this.log.info({ ...(stream ? { db: stream } : { files: FILES_STREAM }) }, "stopping: the rest of the upload stays in the outbox for the next start");
    await Promise.race([running, atMost(STOP_UPLOAD_MS)]);
    if (!done) throw new Error("the store did not answer the upload in flight");
  }
}
