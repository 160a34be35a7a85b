/**
 * A node that starts with empty or missing databases and an empty folder starts
 * from the newest usable snapshot instead of replaying every log from seq 1:
 * 1. before the agent opens anything, the snapshot is staged (verified) and its
 *    database copies are put in place: renamed in when the file is missing,
 *    written with SQLite's backup API into an empty database the app created;
 *    the folder state becomes .unisync/files.db;
 * 2. once the agent has opened its streams (cursors = the snapshot's vector),
 *    every origin's segments after the vector are replayed and the files
 *    written, with progress; only then do the agent's loops start.
 * This module only runs before the agent holds a connection to these files, so
 * opening them here never adds a second descriptor in a process that has one.
 */
import { existsSync, readdirSync, renameSync, rmSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { findDatabases } from "../db/databases.js";
import { discoverTables, quoteIdent } from "../db/schema.js";
import { builtinExclusion } from "../capture/ignore.js";
import { getMeta, setMeta } from "../db/meta.js";
import { listOrigins } from "../log/keys.js";
import { catchUp, writeFiles, type Materializing, type Pullable } from "./catchup.js";
import { Progress } from "../stream/progress.js";
import type { StreamSettings } from "../stream/streams.js";
import { stageNewest, type StagedSnapshot } from "./stage.js";

export type BootstrapSettings = Pick<StreamSettings, "instanceDir" | "node" | "store" | "log" | "databases" | "excludeTables" | "syncFiles">;

/** Why this node is not empty (so it must not be overwritten), or null when it is. */
export function notEmptyReason(s: BootstrapSettings): string | null {
  const filesDb = join(s.instanceDir, ".unisync", "files.db");
  if (existsSync(filesDb)) {
    const db = new Database(filesDb, { readonly: true });
    try {
      const has = db.prepare("SELECT name FROM sqlite_master WHERE name = 'file_versions'").get() && db.prepare("SELECT 1 FROM file_versions LIMIT 1").get();
      if (has) return "the folder sync already has state (.unisync/files.db)";
    } finally {
      db.close();
    }
  }
  for (const { path, stream } of findDatabases(s.instanceDir, s.databases).synced) {
    const db = new Database(path, { readonly: true, fileMustExist: true });
    try {
      const enrolled = db.prepare("SELECT 1 FROM sqlite_master WHERE name = '_unisync_meta'").get();
      if (enrolled) {
        const next = Number(getMeta(db, "next_seq") ?? 1);
        if (next > 1 || db.prepare("SELECT 1 FROM _unisync_cursors LIMIT 1").get()) return `${stream} is already synced by this node`;
      }
      for (const t of discoverTables(db, s.excludeTables)) {
        if (db.prepare(`SELECT 1 FROM ${quoteIdent(t.name)} LIMIT 1`).get()) return `${stream} holds rows (table ${t.name})`;
      }
    } finally {
      db.close();
    }
  }
  if (s.syncFiles) {
    const walk = (dir: string, rel: string): string | null => {
      for (const e of readdirSync(dir, { withFileTypes: true })) {
        const r = rel ? `${rel}/${e.name}` : e.name;
        if (builtinExclusion(r, e.isDirectory())) continue;
        if (e.isDirectory()) {
          const found = walk(join(dir, e.name), r);
          if (found) return found;
        } else if (!findDatabases(s.instanceDir, []).synced.some((d) => d.stream === r)) return r;
      }
      return null;
    };
    const file = walk(s.instanceDir, "");
    if (file) return `the folder holds files (${file})`;
  }
  return null;
}

/** Puts a staged database copy at `target`: rename when missing, backup API into an empty database. */
export async function placeDatabase(staged: string, target: string): Promise<void> {
  if (!existsSync(target)) {
    renameSync(staged, target);
    return;
  }
  const src = new Database(staged, { readonly: true });
  try {
    // The app may hold the empty file open: the backup writes through SQLite's locks, never around them.
    await src.backup(target);
  } finally {
    src.close();
  }
}

/**
 * Step 1: when the node is empty and the store has a usable snapshot, puts its
 * parts in place. Returns the snapshot placed, or null (normal start).
 */
export async function placeNewestSnapshot(s: BootstrapSettings): Promise<StagedSnapshot | null> {
  const why = notEmptyReason(s);
  if (why) {
    s.log.debug({ why }, "not bootstrapping: this node is not empty");
    return null;
  }
  const dir = join(s.instanceDir, ".unisync", "bootstrap");
  const staged = await stageNewest(s.store, dir, {
    onCorrupt: (ref, message) => s.log.error({ snapshot: ref.key, problem: message }, "snapshot unusable; trying the next older one"),
  });
  if (!staged) {
    s.log.info("empty node and no snapshot in the store: replaying every origin's log from the start");
    return null;
  }
  s.log.info({ snapshot: staged.ref.key, from: staged.ref.node, databases: staged.dbs.length }, "empty node: starting from the newest snapshot");
  for (const d of staged.dbs) {
    const target = join(s.instanceDir, d.stream);
    for (const c of ["-wal", "-shm"]) if (!existsSync(target)) rmSync(target + c, { force: true });
    await placeDatabase(d.path, target);
  }
  if (staged.filesState && s.syncFiles) {
    const target = join(s.instanceDir, ".unisync", "files.db");
    for (const c of ["", "-wal", "-shm"]) rmSync(target + c, { force: true });
    renameSync(staged.filesState, target);
  }
  rmSync(dir, { recursive: true, force: true });
  return staged;
}

/** The streams the agent opened, seen by the bootstrap. */
export interface OpenedStreams {
  dbs: (Pullable & { readonly db: Database.Database })[];
  files: (Pullable & Materializing & { readonly db: Database.Database }) | null;
}

/**
 * Step 2: replays every origin after the snapshot's vector, then writes the
 * files. If the snapshot was this node's own (same name, e.g. a rebuilt disk),
 * its own segments are replayed too and its log continues after the last one.
 */
export async function finishBootstrap(s: BootstrapSettings, streams: OpenedStreams): Promise<void> {
  const t0 = Date.now();
  const origins = await listOrigins(s.store);
  const json = (line: object) => s.log.info(line, "bootstrap progress");
  const all: Pullable[] = [...streams.dbs, ...(streams.files ? [streams.files] : [])];
  const r = await catchUp(s.store, all, origins, new Progress("replaying segments after the snapshot", 0, json));
  for (const p of r.problems) s.log.error({ problem: p }, "bootstrap: a stream stopped before the end of the log (the agent keeps retrying)");
  for (const st of [...streams.dbs, ...(streams.files ? [streams.files] : [])]) {
    const own = st.cursors().get(s.node)?.seq ?? 0;
    if (own > 0 && Number(getMeta(st.db, "next_seq") ?? 1) <= own) setMeta(st.db, "next_seq", own + 1);
  }
  let left = 0;
  if (streams.files) left = await writeFiles(streams.files, new Progress("writing files", 0, json));
  s.log.info({ segments: r.segments, records: r.records, filesLeft: left, ms: Date.now() - t0 }, "bootstrap done; capturing and syncing");
}
