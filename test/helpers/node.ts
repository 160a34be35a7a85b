/** In-process nodes for tests: a DbSync per database on a shared store, driven step by step. */
import Database from "better-sqlite3";
import pino from "pino";
import { DbSync, type DbSyncOptions } from "../../src/stream/dbsync.js";
import { Metrics } from "../../src/stream/metrics.js";
import { HybridClock } from "../../src/log/hlc.js";
import type { ObjectStore } from "../../src/store/store.js";

export const silent = pino({ level: "silent" });

export function openSync(path: string, node: string, store: ObjectStore, clock = new HybridClock(), extra: Partial<DbSyncOptions> = {}): DbSync {
  const sync = new DbSync({
    path,
    stream: "app.db",
    node,
    store,
    clock,
    log: silent,
    metrics: new Metrics(),
    excludeTables: ["alembic_version"],
    maxRecords: 50,
    maxBytes: 1 << 20,
    busyTimeoutMs: 2000,
    walMode: true,
    ...extra,
  });
  sync.refreshSchema();
  return sync;
}

/** A plain connection standing for the app. */
export function appConnection(path: string): Database.Database {
  const db = new Database(path);
  db.pragma("busy_timeout = 2000");
  db.defaultSafeIntegers(true);
  return db;
}
