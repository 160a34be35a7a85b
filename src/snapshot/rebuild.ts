/**
 * The state at a point in time, rebuilt into a fresh folder: the newest usable
 * snapshot whose clock is at or before T, then every origin's records after the
 * snapshot's vector whose clock is at or before T (state at T = the merge of
 * every record with HLC <= T). Replay goes through the same DbSync/FolderSync
 * code as the agent, so the result is what a node that had seen exactly those
 * records would hold. The node itself is never touched.
 */
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import Database from "better-sqlite3";
import type { DbSync } from "../stream/dbsync.js";
import type { FolderSync } from "../stream/foldersync.js";
import { Metrics } from "../stream/metrics.js";
import { FileStateStore, KIND_WRITE } from "../capture/filestate.js";
import { hashFile } from "../log/blobs.js";
import { HybridClock } from "../log/hlc.js";
import { listOrigins } from "../log/keys.js";
import { catchUp, writeFiles, type Pullable } from "./catchup.js";
import { NODE_LOCAL_META } from "./copy.js";
import type { SnapshotRef } from "./format.js";
import { Progress, type ProgressLine } from "../stream/progress.js";
import { noSnapshotReason, stageNewest } from "./stage.js";
import { openDbSync, openFolderSync, type StreamSettings } from "../stream/streams.js";

/** The name the replay runs under: not a valid node name, so never an origin's. */
export const REPLAY_NODE = ".replay";

export class NoSnapshotError extends Error {
  override name = "NoSnapshotError";
  readonly code = "NO_SNAPSHOT";
}

/** The folder to rebuild into holds something already (it must be missing or empty). */
export class NotEmptyError extends Error {
  override name = "NotEmptyError";
  readonly code = "NOT_EMPTY";
}

export interface RebuildSettings extends Omit<StreamSettings, "instanceDir" | "node" | "databases"> {
  progress: (line: ProgressLine) => void;
  /** Told about each snapshot found corrupt (the next older is used). */
  onCorrupt: (ref: SnapshotRef, message: string) => void;
}

export interface RebuildResult {
  snapshot: SnapshotRef;
  databases: string[];
  segments: number;
  records: number;
  files: number;
  /** What could not be rebuilt exactly (a gap in a log, a parked record, a file not written). */
  problems: string[];
}

/** Removes the replay's own identity and leftovers: the folder is a plain copy of the state. */
function finishDatabase(path: string, problems: string[], stream: string): void {
  const db = new Database(path);
  try {
    const parked = db.prepare("SELECT origin, seq, tbl, reason FROM _unisync_parked").all() as { origin: string; seq: number; tbl: string | null; reason: string }[];
    for (const p of parked) problems.push(`${stream}: record ${p.origin}#${p.seq} (${p.tbl ?? "?"}) not applied: ${p.reason}`);
    db.transaction(() => {
      db.exec("DELETE FROM _unisync_outbox; DELETE FROM _unisync_changes");
      const del = db.prepare("DELETE FROM _unisync_meta WHERE k = ?");
      for (const k of NODE_LOCAL_META) del.run(k);
    })();
    db.pragma("wal_checkpoint(TRUNCATE)");
    const check = (db.pragma("integrity_check") as { integrity_check: string }[]).map((r) => r.integrity_check).join("; ");
    if (check !== "ok") problems.push(`${stream}: integrity check: ${check}`);
  } finally {
    db.close();
  }
}

/** Every written file must hash to its winner's content. */
async function verifyFiles(dir: string, problems: string[]): Promise<number> {
  const db = new Database(join(dir, ".unisync", "files.db"));
  try {
    const state = new FileStateStore(db);
    let n = 0;
    for (const r of db.prepare("SELECT path, kind, sha256 FROM file_state WHERE kind = ?").all(KIND_WRITE) as { path: string; sha256: string }[]) {
      n++;
      const p = join(dir, r.path);
      if (!existsSync(p)) problems.push(`file ${r.path}: not written (${state.state(r.path)?.problem ?? "pending"})`);
      else if ((await hashFile(p)).sha256 !== r.sha256) problems.push(`file ${r.path}: content does not match its sha256`);
    }
    db.exec("DELETE FROM _unisync_outbox; DELETE FROM file_blobs");
    const del = db.prepare("DELETE FROM _unisync_meta WHERE k = ?");
    for (const k of NODE_LOCAL_META) del.run(k);
    return n;
  } finally {
    db.close();
  }
}

/** Rebuilds the state at `untilHlc` into `dir`, which must be missing or empty. */
export async function rebuildAt(s: RebuildSettings, untilHlc: number, dir: string): Promise<RebuildResult> {
  if (existsSync(dir) && readdirSync(dir).length > 0) throw new NotEmptyError(`${dir} is not empty`);
  const existed = existsSync(dir);
  const stageDir = join(dir, ".unisync", "stage");
  const staged = await stageNewest(s.store, stageDir, { untilHlc, onCorrupt: s.onCorrupt }).catch((err: Error) => {
    if (!existed) rmSync(dir, { recursive: true, force: true });
    throw err;
  });
  if (!staged) {
    if (!existed) rmSync(dir, { recursive: true, force: true });
    throw new NoSnapshotError(`no usable snapshot at or before that time: ${await noSnapshotReason(s.store, untilHlc)}`);
  }
  const problems: string[] = [];
  const settings: StreamSettings = { ...s, instanceDir: dir, node: REPLAY_NODE, databases: [] };
  const clock = new HybridClock();
  const metrics = new Metrics();
  const dbs: DbSync[] = [];
  for (const d of staged.dbs) {
    const target = join(dir, d.stream);
    mkdirSync(dirname(target), { recursive: true });
    renameSync(d.path, target);
    dbs.push(openDbSync(settings, target, d.stream, clock, metrics));
  }
  let files: FolderSync | null = null;
  if (staged.filesState && s.syncFiles) {
    renameSync(staged.filesState, join(dir, ".unisync", "files.db"));
    files = openFolderSync(settings, clock, metrics, () => new Set(dbs.map((d) => d.db.name)));
  }
  rmSync(stageDir, { recursive: true, force: true });
  let replay;
  try {
    const origins = await listOrigins(s.store);
    const streams: Pullable[] = [...dbs, ...(files ? [files] : [])];
    replay = await catchUp(s.store, streams, origins, new Progress("replaying segments", 0, s.progress), untilHlc);
    problems.push(...replay.problems);
    if (files) await writeFiles(files, new Progress("writing files", 0, s.progress));
  } finally {
    if (files) {
      await files.stop();
      files.close();
    }
    for (const d of dbs) d.close();
  }
  for (const d of staged.dbs) finishDatabase(join(dir, d.stream), problems, d.stream);
  const nFiles = files ? await verifyFiles(dir, problems) : 0;
  rmSync(join(dir, ".unisync", "staging"), { recursive: true, force: true });
  return { snapshot: staged.ref, databases: staged.dbs.map((d) => d.stream), segments: replay.segments, records: replay.records, files: nFiles, problems };
}
