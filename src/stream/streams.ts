/**
 * The DbSyncs and FolderSync of one instance folder, opened without an agent:
 * for `unisync snapshot` when no agent runs, and for rebuilding a state in a
 * fresh folder. Each database gets exactly one connection (its DbSync's).
 */
import type { Logger } from "pino";
import { findDatabases } from "../db/databases.js";
import { DbSync } from "./dbsync.js";
import { FolderSync } from "./foldersync.js";
import { Metrics } from "./metrics.js";
import { HybridClock } from "../log/hlc.js";
import type { ObjectStore } from "../store/store.js";

export interface StreamSettings {
  instanceDir: string;
  node: string;
  store: ObjectStore;
  log: Logger;
  databases: string[];
  excludeTables: string[];
  naturalKeyTables?: string[];
  independentDatabases?: boolean;
  declaredOnDelete?: string[];
  batchMaxRecords: number;
  batchMaxBytes: number;
  busyTimeoutMs: number;
  syncFiles: boolean;
  /** Put databases in WAL mode (default true). */
  walMode?: boolean;
  /** The agent: a database met for the first time replays the log before it enrols its rows. */
  enrolAfterCatchUp?: boolean;
  /** The agent: the file appeared while it ran; its rows are the app's new rows (DbSyncOptions.rowsAreNew). */
  rowsAreNew?: boolean;
}

export interface OpenStreams {
  dbs: DbSync[];
  files: FolderSync | null;
  clock: HybridClock;
  close(): Promise<void>;
}

export function openDbSync(s: StreamSettings, path: string, stream: string, clock: HybridClock, metrics: Metrics): DbSync {
  const db = new DbSync({
    path,
    stream,
    node: s.node,
    store: s.store,
    clock,
    log: s.log,
    metrics,
    excludeTables: s.excludeTables,
    naturalKeyTables: s.naturalKeyTables,
    independentDatabases: s.independentDatabases,
    declaredOnDelete: s.declaredOnDelete,
    enrolAfterCatchUp: s.enrolAfterCatchUp,
    rowsAreNew: s.rowsAreNew,
    maxRecords: s.batchMaxRecords,
    maxBytes: s.batchMaxBytes,
    busyTimeoutMs: s.busyTimeoutMs,
    walMode: s.walMode ?? true,
  });
  try {
    db.refreshSchema();
  } catch (err) {
    db.close();
    throw err;
  }
  return db;
}

export function openFolderSync(s: StreamSettings, clock: HybridClock, metrics: Metrics, openDbs: () => ReadonlySet<string>): FolderSync {
  return new FolderSync({
    instanceDir: s.instanceDir,
    node: s.node,
    store: s.store,
    clock,
    log: s.log,
    metrics,
    openDbs,
    maxRecords: s.batchMaxRecords,
    captureIntervalMs: 50,
    rescanMs: 3600_000,
    watch: false,
  });
}

export function openStreams(s: StreamSettings): OpenStreams {
  const clock = new HybridClock();
  const metrics = new Metrics();
  const dbs: DbSync[] = [];
  let files: FolderSync | null = null;
  const close = async () => {
    if (files) {
      await files.stop();
      files.close();
    }
    for (const d of dbs) d.close();
  };
  try {
    for (const { path, stream } of findDatabases(s.instanceDir, s.databases).synced) dbs.push(openDbSync(s, path, stream, clock, metrics));
    if (s.syncFiles) files = openFolderSync(s, clock, metrics, () => new Set(dbs.map((d) => d.db.name)));
  } catch (err) {
    void close();
    throw err;
  }
  return { dbs, files, clock, close };
}
