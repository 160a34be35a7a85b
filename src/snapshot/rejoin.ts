/**
 * A node left behind by retention (gc deleted segments it had not applied: the
 * tail reports them "collected") starts again from a snapshot by itself, inside
 * the running agent, when that loses nothing:
 * - every local change is in the store (no pending capture, empty outbox, no
 *   file waiting to be stable, in every affected stream);
 * - the newest usable snapshot covers, for every origin gc collected in an
 *   affected stream (this node's own included), at least what gc collected.
 * Only the streams that meet a collected hole are started again; the others go
 * on as they are. What the node held is kept in .unisync/left-behind-<time>/:
 * a copy of each database taken through the agent's own connection (VACUUM
 * INTO), the folder state and the folder's files. The snapshot's copy is then
 * written into the live database file with SQLite's backup API (the app may
 * hold it open), exactly like a bootstrap into an empty database, and the
 * bootstrap replay runs.
 */
import { existsSync, mkdirSync, readdirSync, renameSync, rmdirSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import Database from "better-sqlite3";
import { builtinExclusion } from "../capture/ignore.js";
import { readGcMarker } from "../log/collected.js";
import { listOrigins } from "../log/keys.js";
import type { ObjectStore } from "../store/store.js";
import type { StagedSnapshot } from "./stage.js";

/** A stream stopped at a hole gc made. */
export interface CollectedGap {
  stream: string;
  origin: string;
  seq: number;
}

/** What the agent's streams expose to decide. */
export interface RejoinStream {
  readonly stream: string;
  readonly problems: ReadonlyMap<string, { kind: string; seq: number }>;
  readonly outbox: { size(): { segments: number } };
  pendingChanges(): number;
}

export interface RejoinStatus {
  /** "waiting": not safe yet (why in `reason`); "done": started again from a snapshot. */
  state: "waiting" | "done";
  atMs: number;
  reason: string;
  streams: string[];
  snapshot?: string;
  leftBehind?: string;
  databasesMoved?: number;
  filesMoved?: number;
}

export function collectedGaps(streams: RejoinStream[]): CollectedGap[] {
  const out: CollectedGap[] = [];
  for (const s of streams) for (const [origin, p] of s.problems) if (p.kind === "collected") out.push({ stream: s.stream, origin, seq: p.seq });
  return out;
}

/**
 * Why starting these streams again would lose a local change, or null.
 * `localPending` is the part of pendingChanges() that is this node's own
 * (for the folder: files waiting to be stable; for a database: every pending capture).
 */
export function unsentReason(streams: { stream: string; outboxSegments: number; localPending: number }[]): string | null {
  const why: string[] = [];
  for (const s of streams) {
    if (s.localPending > 0) why.push(`${s.stream}: ${s.localPending} local change(s) not sealed yet`);
    if (s.outboxSegments > 0) why.push(`${s.stream}: ${s.outboxSegments} segment(s) waiting to upload`);
  }
  return why.length ? why.join("; ") : null;
}

/** The vector of `stream` in a staged snapshot, or null when the snapshot does not hold it. */
export function snapshotVector(staged: StagedSnapshot, stream: string, filesStream: string): Record<string, number> | null {
  if (stream === filesStream) return staged.manifest.files && staged.filesState ? staged.manifest.files.vector : null;
  return staged.manifest.databases.find((d) => d.stream === stream)?.vector ?? null;
}

/**
 * Why the snapshot cannot replace these streams, or null: for every origin gc
 * collected (per its marker), the snapshot must include at least the collected
 * seqs, or the replay after it would meet the same hole.
 */
export async function coverageProblem(store: ObjectStore, staged: StagedSnapshot, streams: string[], filesStream: string): Promise<string | null> {
  const origins = await listOrigins(store);
  for (const stream of streams) {
    const vector = snapshotVector(staged, stream, filesStream);
    if (!vector) return `the newest usable snapshot (${staged.ref.key}) does not hold ${stream}`;
    for (const origin of origins) {
      const m = await readGcMarker(store, origin, stream);
      if (m && (vector[origin] ?? 0) < m.collectedThrough) {
        return `the newest usable snapshot (${staged.ref.key}) includes ${origin}/${stream} only through seq ${vector[origin] ?? 0}, but gc collected it through ${m.collectedThrough}`;
      }
    }
  }
  return null;
}

/** .unisync/left-behind-<time>: where what the node held goes. */
export function leftBehindDir(stateDir: string, now = new Date()): string {
  let dir = join(stateDir, `left-behind-${now.toISOString().replace(/[:.]/g, "-")}`);
  for (let i = 2; existsSync(dir); i++) dir = dir.replace(/(-\d+)?$/, `-${i}`);
  return dir;
}

/**
 * Copies a database through the connection the agent holds (never a second
 * descriptor), and checks the copy holds no unsent change of this node: the
 * app may have committed since the last look. Returns the unsent count (0 = good).
 */
export function copyAside(db: Database.Database, dest: string): number {
  mkdirSync(dirname(dest), { recursive: true });
  rmSync(dest, { force: true });
  db.prepare("VACUUM INTO ?").run(dest);
  const copy = new Database(dest, { readonly: true });
  try {
    const n = (sql: string) => Number((copy.prepare(sql).get() as { n: number }).n);
    return n("SELECT count(*) AS n FROM _unisync_changes") + n("SELECT count(*) AS n FROM _unisync_outbox");
  } finally {
    copy.close();
  }
}

/** Moves the folder state (files.db and its WAL) into `dest` (.unisync/ inside it). */
export function moveFolderState(stateDir: string, dest: string): void {
  mkdirSync(join(dest, ".unisync"), { recursive: true });
  for (const c of ["", "-wal", "-shm"]) {
    const p = join(stateDir, "files.db" + c);
    if (existsSync(p)) renameSync(p, join(dest, ".unisync", "files.db" + c));
  }
}

/**
 * Moves every synced file of the instance folder (not what the folder sync
 * excludes: databases, .unisync/, ignore rules) into `dest/files/`, keeping
 * paths. Returns how many files moved. Emptied folders are removed.
 */
export function moveFolderFiles(instanceDir: string, dest: string, excluded: (rel: string, isDir: boolean) => boolean): number {
  let moved = 0;
  const walk = (dir: string, rel: string): boolean => {
    let empty = true;
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (builtinExclusion(r, e.isDirectory()) || excluded(r, e.isDirectory())) {
        empty = false;
        continue;
      }
      if (e.isDirectory()) {
        if (walk(join(dir, e.name), r)) {
          try {
            rmdirSync(join(dir, e.name));
          } catch {
            empty = false; // something appeared meanwhile: left where it is
          }
        } else empty = false;
        continue;
      }
      const to = join(dest, "files", r);
      mkdirSync(dirname(to), { recursive: true });
      renameSync(join(dir, e.name), to);
      moved++;
    }
    return empty;
  };
  walk(instanceDir, "");
  return moved;
}

export function writeRejoinNote(dest: string, status: RejoinStatus): void {
  mkdirSync(dest, { recursive: true });
  writeFileSync(join(dest, "rejoin.json"), JSON.stringify(status, null, 2));
}
