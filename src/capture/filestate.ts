/**
 * Node-local state of the folder sync, in INSTANCE_DIR/.unisync/files.db (never
 * synced), and the merge rule for files.
 *
 * - `file_versions`: every change of every path this node knows (its own and
 *   every origin's), with the version its writer had seen (base). The winner of
 *   a path and its conflict copies are a pure function of this set, so every
 *   node that has seen the same records decides the same, in any order.
 * - `file_state`: the current winner per path, and whether the disk still has
 *   to be made to match it (`pending`).
 * - `file_index`: what this node's disk holds per path as last seen or written
 *   (size, mtime, inode, mode, sha256) and which version that content is. A
 *   rescan of an unchanged folder compares metadata only.
 * - `file_conflicts`: losers whose conflict copy was derived (once each).
 * - `file_blobs`: blobs a sealed segment needs in the store before it is uploaded.
 * - `file_refused`: remote records refused (unsafe path, excluded here), for status.
 * Plus the row side's `_unisync_meta`, `_unisync_outbox` and `_unisync_cursors`.
 */
import type { Database, Statement } from "better-sqlite3";
import { ensureInternalTables, statementCache } from "../db/internal.js";
import { compareStamp, hlcFromMs, hlcToMs } from "../log/hlc.js";

export const KIND_WRITE = 1;
export const KIND_DELETE = 2;
export const KIND_SYMLINK = 3;
export type FileKind = 1 | 2 | 3;

export const FILES_DDL = `
CREATE TABLE IF NOT EXISTS file_versions(
  path TEXT NOT NULL, hlc INTEGER NOT NULL, origin TEXT NOT NULL, kind INTEGER NOT NULL,
  base_hlc INTEGER NOT NULL, base_origin TEXT NOT NULL,
  sha256 TEXT, size INTEGER, mode INTEGER, mtime_ms INTEGER, link TEXT,
  derived INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(path, hlc, origin)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS file_state(
  path TEXT PRIMARY KEY, hlc INTEGER NOT NULL, origin TEXT NOT NULL, kind INTEGER NOT NULL,
  sha256 TEXT, size INTEGER, mode INTEGER, mtime_ms INTEGER, link TEXT,
  pending INTEGER NOT NULL, problem TEXT);
CREATE INDEX IF NOT EXISTS file_state_pending ON file_state(pending) WHERE pending = 1;
CREATE TABLE IF NOT EXISTS file_index(
  path TEXT PRIMARY KEY, size INTEGER, mtime_ms REAL, ino INTEGER, mode INTEGER,
  sha256 TEXT, link TEXT, hlc INTEGER NOT NULL, origin TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS file_conflicts(
  path TEXT NOT NULL, hlc INTEGER NOT NULL, origin TEXT NOT NULL, copy TEXT NOT NULL,
  PRIMARY KEY(path, hlc, origin)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS file_blobs(seq INTEGER NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY(seq, sha256));
CREATE TABLE IF NOT EXISTS file_refused(
  id INTEGER PRIMARY KEY, origin TEXT NOT NULL, seq INTEGER NOT NULL, path TEXT, reason TEXT NOT NULL, at_ms INTEGER);
`;

export function ensureFileTables(db: Database): void {
  ensureInternalTables(db);
  db.exec(FILES_DDL);
}

export interface Version {
  path: string;
  hlc: number;
  origin: string;
  kind: FileKind;
  baseHlc: number;
  baseOrigin: string;
  sha256: string;
  size: number;
  mode: number;
  mtimeMs: number;
  link: string;
  /** A conflict copy derived identically on every node, never logged. */
  derived: boolean;
}

export interface IndexEntry {
  path: string;
  size: number;
  mtimeMs: number;
  ino: number;
  mode: number;
  sha256: string;
  link: string;
  hlc: number;
  origin: string;
}

export interface StateEntry {
  path: string;
  hlc: number;
  origin: string;
  kind: FileKind;
  sha256: string;
  size: number;
  mode: number;
  mtimeMs: number;
  link: string;
  pending: boolean;
  problem: string | null;
}

const cmp = (a: { hlc: number; origin: string }, b: { hlc: number; origin: string }) => compareStamp(a.hlc, a.origin, b.hlc, b.origin);
/** Whether `w` was made without having seen `v` (its base is older than v). */
const unseen = (w: Version, v: Version) => compareStamp(w.baseHlc, w.baseOrigin, v.hlc, v.origin) < 0;

/**
 * The merge rule of one path, a pure function of its versions:
 * - A DELETE that did not see a newer-or-older-but-unseen edit is void: edit vs
 *   delete keeps the edit.
 * - The winner is the greatest (hlc, origin) among the versions not void.
 * - A write V is a conflict loser when some other write W > V was made without
 *   having seen V and holds different content. Each loser gets a conflict copy.
 * Both conditions are "there exists a version such that", so once true they
 * stay true: the outcome only depends on the set of versions, never on the order.
 */
export function decide(versions: readonly Version[]): { winner: Version | null; losers: Version[] } {
  const writes = versions.filter((v) => v.kind !== KIND_DELETE);
  let winner: Version | null = null;
  for (const v of versions) {
    if (v.kind === KIND_DELETE && writes.some((w) => cmp(w, v) < 0 && unseen(v, w))) continue;
    if (!winner || cmp(v, winner) > 0) winner = v;
  }
  const losers = versions.filter(
    (v) => v.kind === KIND_WRITE && writes.some((w) => cmp(w, v) > 0 && unseen(w, v) && (w.sha256 !== v.sha256 || w.kind !== v.kind)),
  );
  return { winner, losers };
}

/** At most this many conflict copies per path; the newest are kept. */
export const MAX_CONFLICT_COPIES = 10;

/**
 * The losers that keep a conflict copy: one per content (the newest loser with
 * that hash), and only the newest MAX_CONFLICT_COPIES of those. Both rules are
 * monotonic: a loser left out now is never wanted later, whatever arrives.
 */
export function keptConflicts(losers: readonly Version[]): Set<Version> {
  const newestPerHash = new Map<string, Version>();
  for (const l of losers) {
    const seen = newestPerHash.get(l.sha256);
    if (!seen || cmp(l, seen) > 0) newestPerHash.set(l.sha256, l);
  }
  return new Set([...newestPerHash.values()].sort((a, b) => cmp(b, a)).slice(0, MAX_CONFLICT_COPIES));
}

const pad = (n: number, w = 2) => String(n).padStart(w, "0");

/**
 * `dir/name.sync-conflict-<UTC yyyymmdd-hhmmss.mmm>-<origin>.ext`, from the losing
 * version's own clock and origin: the same on every node, and one name per version
 * (an origin's clocks never repeat; the clock's logical count follows the milliseconds
 * when it is not 0). Seconds alone gave two edits of one node in one second one name.
 */
export function conflictName(path: string, hlc: number, origin: string): string {
  const d = new Date(hlcToMs(hlc));
  const logical = hlc - hlcFromMs(hlcToMs(hlc));
  const stamp =
    `${d.getUTCFullYear()}${pad(d.getUTCMonth() + 1)}${pad(d.getUTCDate())}-${pad(d.getUTCHours())}${pad(d.getUTCMinutes())}${pad(d.getUTCSeconds())}` +
    `.${pad(d.getUTCMilliseconds(), 3)}${logical ? `.${logical}` : ""}`;
  const slash = path.lastIndexOf("/");
  const dir = path.slice(0, slash + 1);
  const base = path.slice(slash + 1);
  const dot = base.lastIndexOf(".");
  const [stem, ext] = dot > 0 ? [base.slice(0, dot), base.slice(dot)] : [base, ""];
  return `${dir}${stem}.sync-conflict-${stamp}-${origin}${ext}`;
}

type Row = Record<string, unknown>;
const toVersion = (r: Row): Version => ({
  path: r.path as string,
  hlc: Number(r.hlc),
  origin: r.origin as string,
  kind: Number(r.kind) as FileKind,
  baseHlc: Number(r.base_hlc),
  baseOrigin: r.base_origin as string,
  sha256: (r.sha256 as string | null) ?? "",
  size: Number(r.size ?? 0),
  mode: Number(r.mode ?? 0),
  mtimeMs: Number(r.mtime_ms ?? 0),
  link: (r.link as string | null) ?? "",
  derived: Number(r.derived) === 1,
});

/** Typed access to files.db; every method is synchronous and may run inside a caller's transaction. */
export class FileStateStore {
  /** Cached statements on this store's connection (also used by FolderSync). */
  readonly sql: (sql: string) => Statement;

  constructor(readonly db: Database) {
    ensureFileTables(db);
    this.sql = statementCache(db);
  }

  versions(path: string): Version[] {
    return (this.sql("SELECT * FROM file_versions WHERE path = ?").all(path) as Row[]).map(toVersion);
  }

  /** Adds a version; false when it was already known (idempotent replay). */
  addVersion(v: Version): boolean {
    const r = this.sql(
      "INSERT OR IGNORE INTO file_versions(path, hlc, origin, kind, base_hlc, base_origin, sha256, size, mode, mtime_ms, link, derived) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
    ).run(v.path, v.hlc, v.origin, v.kind, v.baseHlc, v.baseOrigin, v.sha256 || null, v.size, v.mode, v.mtimeMs, v.link || null, v.derived ? 1 : 0);
    return r.changes > 0;
  }

  state(path: string): StateEntry | null {
    const r = this.sql("SELECT * FROM file_state WHERE path = ?").get(path) as Row | undefined;
    if (!r) return null;
    return {
      path: r.path as string,
      hlc: Number(r.hlc),
      origin: r.origin as string,
      kind: Number(r.kind) as FileKind,
      sha256: (r.sha256 as string | null) ?? "",
      size: Number(r.size ?? 0),
      mode: Number(r.mode ?? 0),
      mtimeMs: Number(r.mtime_ms ?? 0),
      link: (r.link as string | null) ?? "",
      pending: Number(r.pending) === 1,
      problem: (r.problem as string | null) ?? null,
    };
  }

  setPending(path: string, pending: boolean, problem: string | null = null): void {
    this.sql("UPDATE file_state SET pending = ?, problem = ? WHERE path = ?").run(pending ? 1 : 0, problem, path);
  }

  /** Paths whose disk must still be made to match; `withProblems`: also those that failed before. */
  pendingPaths(limit = 1000, withProblems = true): string[] {
    const sql = withProblems
      ? "SELECT path FROM file_state WHERE pending = 1 ORDER BY path LIMIT ?"
      : "SELECT path FROM file_state WHERE pending = 1 AND problem IS NULL ORDER BY path LIMIT ?";
    return (this.sql(sql).all(limit) as { path: string }[]).map((r) => r.path);
  }

  pendingCount(): number {
    return Number((this.sql("SELECT count(*) AS n FROM file_state WHERE pending = 1").get() as { n: number }).n);
  }

  problemCount(): number {
    return Number((this.sql("SELECT count(*) AS n FROM file_state WHERE pending = 1 AND problem IS NOT NULL").get() as { n: number }).n);
  }

  index(path: string): IndexEntry | null {
    const r = this.sql("SELECT * FROM file_index WHERE path = ?").get(path) as Row | undefined;
    return r ? toIndex(r) : null;
  }

  allIndex(): IndexEntry[] {
    return (this.sql("SELECT * FROM file_index ORDER BY path").all() as Row[]).map(toIndex);
  }

  setIndex(e: IndexEntry): void {
    this.sql(
      "INSERT INTO file_index(path, size, mtime_ms, ino, mode, sha256, link, hlc, origin) VALUES (?,?,?,?,?,?,?,?,?) " +
        "ON CONFLICT(path) DO UPDATE SET size=excluded.size, mtime_ms=excluded.mtime_ms, ino=excluded.ino, mode=excluded.mode, " +
        "sha256=excluded.sha256, link=excluded.link, hlc=excluded.hlc, origin=excluded.origin",
    ).run(e.path, e.size, e.mtimeMs, e.ino, e.mode, e.sha256 || null, e.link || null, e.hlc, e.origin);
  }

  dropIndex(path: string): void {
    this.sql("DELETE FROM file_index WHERE path = ?").run(path);
  }

  /**
   * Recomputes the winner of `path` after its versions changed; marks the disk
   * pending when the winner moved, and derives the conflict copy of every new
   * loser (recursively). Returns the paths whose winner changed.
   */
  recompute(path: string, changed: string[] = []): string[] {
    const { winner, losers } = decide(this.versions(path));
    const cur = this.state(path);
    if (winner && (!cur || cur.hlc !== winner.hlc || cur.origin !== winner.origin)) {
      this.sql(
        "INSERT INTO file_state(path, hlc, origin, kind, sha256, size, mode, mtime_ms, link, pending, problem) VALUES (?,?,?,?,?,?,?,?,?,1,NULL) " +
          "ON CONFLICT(path) DO UPDATE SET hlc=excluded.hlc, origin=excluded.origin, kind=excluded.kind, sha256=excluded.sha256, size=excluded.size, " +
          "mode=excluded.mode, mtime_ms=excluded.mtime_ms, link=excluded.link, pending=1, problem=NULL",
      ).run(path, winner.hlc, winner.origin, winner.kind, winner.sha256 || null, winner.size, winner.mode, winner.mtimeMs, winner.link || null);
      changed.push(path);
    }
    const kept = keptConflicts(losers);
    for (const l of losers) {
      // A copy made before is removed under the name it was made with.
      const made = this.sql("SELECT copy FROM file_conflicts WHERE path = ? AND hlc = ? AND origin = ?").pluck().get(path, l.hlc, l.origin) as string | undefined;
      const copy = made ?? conflictName(path, l.hlc, l.origin);
      if (kept.has(l)) {
        if (made !== undefined) continue;
        this.sql("INSERT INTO file_conflicts(path, hlc, origin, copy) VALUES (?,?,?,?)").run(path, l.hlc, l.origin, copy);
        if (this.addVersion({ ...l, path: copy, baseHlc: 0, baseOrigin: "", derived: true })) this.recompute(copy, changed);
      } else if (made !== undefined) {
        // Superseded (same content as a newer loser, or over the cap): every node
        // that made this copy removes it with the same derived delete.
        const removal: Version = { ...l, path: copy, hlc: l.hlc + 1, kind: KIND_DELETE, baseHlc: l.hlc, baseOrigin: l.origin, derived: true };
        if (this.addVersion(removal)) this.recompute(copy, changed);
      }
    }
    return changed;
  }

  conflictCount(): number {
    return Number((this.sql("SELECT count(*) AS n FROM file_conflicts").get() as { n: number }).n);
  }

  refuse(origin: string, seq: number, path: string | null, reason: string): void {
    this.sql("INSERT INTO file_refused(origin, seq, path, reason, at_ms) VALUES (?,?,?,?,?)").run(origin, seq, path, reason, Date.now());
  }

  refused(limit = 50): { origin: string; seq: number; path: string | null; reason: string }[] {
    return this.sql("SELECT origin, seq, path, reason FROM file_refused ORDER BY id DESC LIMIT ?").all(limit) as {
      origin: string;
      seq: number;
      path: string | null;
      reason: string;
    }[];
  }

  refusedCount(): number {
    return Number((this.sql("SELECT count(*) AS n FROM file_refused").get() as { n: number }).n);
  }
}

function toIndex(r: Row): IndexEntry {
  return {
    path: r.path as string,
    size: Number(r.size ?? 0),
    mtimeMs: Number(r.mtime_ms ?? 0),
    ino: Number(r.ino ?? 0),
    mode: Number(r.mode ?? 0),
    sha256: (r.sha256 as string | null) ?? "",
    link: (r.link as string | null) ?? "",
    hlc: Number(r.hlc),
    origin: r.origin as string,
  };
}
