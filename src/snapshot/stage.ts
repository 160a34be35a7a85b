/**
 * Brings a snapshot from the store into a staging folder: every part fetched
 * and verified (sha256 and size while streaming, then SQLite's integrity
 * check), and the cursors of each copy set to the snapshot's vector, so that
 * replay continues exactly after what the copy holds. Nothing is placed until
 * every part of the snapshot is good; a bad one is reported and the next older
 * snapshot is tried.
 */
import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { BlobIntegrityError, fetchBlobToFile } from "../log/blobs.js";
import { hlcToIso } from "../log/hlc.js";
import type { ObjectStore } from "../store/store.js";
import { CorruptSnapshotError, listSnapshots, readManifest, type Manifest, type SnapshotRef, type Vector } from "./format.js";

export interface StagedSnapshot {
  ref: SnapshotRef;
  manifest: Manifest;
  dir: string;
  /** Staged database copies by stream. */
  dbs: { stream: string; path: string }[];
  /** Staged folder state (files.db), when the snapshot has one. */
  filesState: string | null;
}

/** Sets `_unisync_cursors` to the vector: replay resumes right after the snapshot. */
function setCursors(db: Database.Database, vector: Vector): void {
  db.transaction(() => {
    db.exec("DELETE FROM _unisync_cursors");
    const put = db.prepare("INSERT INTO _unisync_cursors(origin, seq, key, applied_ms, last_hlc) VALUES (?, ?, '', ?, 0)");
    for (const [origin, seq] of Object.entries(vector)) put.run(origin, seq, Date.now());
  })();
}

function checkAndPrepare(path: string, what: string, prepare: (db: Database.Database) => void): void {
  const db = new Database(path);
  try {
    const check = (db.pragma("integrity_check") as { integrity_check: string }[]).map((r) => r.integrity_check).join("; ");
    if (check !== "ok") throw new CorruptSnapshotError(`${what} fails SQLite's integrity check: ${check}`);
    prepare(db);
  } finally {
    db.close();
  }
}

async function fetchPart(store: ObjectStore, sha256: string, size: number, dest: string, what: string): Promise<void> {
  try {
    await fetchBlobToFile(store, sha256, size, dest);
  } catch (err) {
    if (err instanceof BlobIntegrityError) throw new CorruptSnapshotError(`${what}: ${err.message}`);
    throw err;
  }
}

/**
 * Fetches and verifies every part of one snapshot into `dir` (emptied first);
 * with `only`, just those databases and no folder state.
 */
export async function stageSnapshot(store: ObjectStore, ref: SnapshotRef, dir: string, only?: ReadonlySet<string>): Promise<StagedSnapshot> {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const manifest = await readManifest(store, ref);
  const dbs: StagedSnapshot["dbs"] = [];
  for (const [i, part] of manifest.databases.entries()) {
    if (only && !only.has(part.stream)) continue;
    const path = join(dir, `db-${i}.sqlite`);
    await fetchPart(store, part.sha256, part.size, path, `database ${part.stream} of snapshot ${ref.key}`);
    checkAndPrepare(path, `database ${part.stream} of snapshot ${ref.key}`, (db) => setCursors(db, part.vector));
    dbs.push({ stream: part.stream, path });
  }
  let filesState: string | null = null;
  if (manifest.files && !only) {
    const files = manifest.files;
    filesState = join(dir, "files.db");
    await fetchPart(store, files.state.sha256, files.state.size, filesState, `folder state of snapshot ${ref.key}`);
    checkAndPrepare(filesState, `folder state of snapshot ${ref.key}`, (db) => {
      setCursors(db, files.vector);
      // This disk holds none of it yet: every winner is to be written.
      db.exec("DELETE FROM file_index; UPDATE file_state SET pending = 1, problem = NULL");
    });
  }
  return { ref, manifest, dir, dbs, filesState };
}

export interface ChooseOptions {
  /** Only snapshots whose clock is at or before this one (point in time). */
  untilHlc?: number;
  /** Called for each snapshot found unusable, with why; the next older is tried. */
  onCorrupt: (ref: SnapshotRef, message: string) => void;
}

/** The newest usable snapshot (at or before untilHlc), staged into `dir`; null when there is none. */
export async function stageNewest(store: ObjectStore, dir: string, o: ChooseOptions): Promise<StagedSnapshot | null> {
  const refs = (await listSnapshots(store)).filter((r) => o.untilHlc === undefined || r.hlc <= o.untilHlc);
  for (const ref of refs) {
    try {
      return await stageSnapshot(store, ref, dir);
    } catch (err) {
      if (!(err instanceof CorruptSnapshotError)) throw err;
      o.onCorrupt(ref, err.message);
    }
  }
  rmSync(dir, { recursive: true, force: true });
  return null;
}

/** Why no snapshot fits, for an error message. */
export async function noSnapshotReason(store: ObjectStore, untilHlc?: number): Promise<string> {
  const all = await listSnapshots(store);
  if (all.length === 0) return "the store holds no snapshot yet (an agent takes one within seconds of its first start; or run: unisync snapshot INSTANCE_DIR)";
  const oldest = all[all.length - 1];
  if (untilHlc !== undefined && oldest.hlc > untilHlc) return `the oldest snapshot is at ${hlcToIso(oldest.hlc)}, after the requested time`;
  return "every snapshot at or before that time is corrupt (see the messages above)";
}
