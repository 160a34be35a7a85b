/**
 * Which SQLite files of the instance folder unisync syncs. Default: the files
 * directly in the folder whose 16-byte header says SQLite, plus those listed in
 * config. Deeper SQLite files (dated backups and the like) are left alone and
 * reported, so a user can opt them in.
 */
import { closeSync, openSync, readdirSync, readSync, statSync } from "node:fs";
import { join, relative, sep } from "node:path";

const SQLITE_HEADER = Buffer.from("SQLite format 3\0", "latin1");

export function isSqliteFile(path: string): boolean {
  let fd: number | undefined;
  try {
    fd = openSync(path, "r");
    const head = Buffer.alloc(16);
    return readSync(fd, head, 0, 16, 0) === 16 && head.equals(SQLITE_HEADER);
  } catch {
    return false;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

/** SQLite's own companion files. Never opened: see findDatabases. */
export function isSqliteCompanion(name: string): boolean {
  return /-(wal|shm|journal)$/i.test(name);
}

export interface FoundDatabases {
  /** Synced: path and stream name (path relative to the instance folder, '/'-separated). */
  synced: { path: string; stream: string }[];
  /** SQLite files deeper in the folder that are not synced. */
  notSynced: { path: string; reason: string }[];
}

const MAX_DEPTH = 6;

/**
 * `open` lists files this process already has open through SQLite: they are
 * never opened again here, because closing any other descriptor of a file drops
 * every POSIX lock the process holds on it. SQLite would then believe nobody
 * has the database open, and the app's next close would delete the live WAL.
 * The same holds for -wal/-shm/-journal files (the -shm is memory-mapped: a peer
 * that wrongly thinks it is alone re-initialises it and this process dies of
 * SIGBUS), so those are skipped by name before anything is opened.
 */
export function findDatabases(instanceDir: string, extra: readonly string[], lookDeeper = false, open: ReadonlySet<string> = new Set()): FoundDatabases {
  const synced = new Map<string, string>();
  const notSynced: { path: string; reason: string }[] = [];
  const streamOf = (p: string) => relative(instanceDir, p).split(sep).join("/");
  for (const name of readdirSync(instanceDir).sort()) {
    const p = join(instanceDir, name);
    if (name.startsWith(".") || isSqliteCompanion(name)) continue;
    try {
      if (open.has(p) || (statSync(p).isFile() && isSqliteFile(p))) synced.set(p, streamOf(p));
    } catch {
      // vanished while listing
    }
  }
  for (const rel of extra) {
    const p = join(instanceDir, rel);
    if (open.has(p) || (!isSqliteCompanion(rel) && isSqliteFile(p))) synced.set(p, streamOf(p));
    else notSynced.push({ path: p, reason: "listed in config but not an SQLite database (yet)" });
  }
  if (lookDeeper) {
    const walk = (dir: string, depth: number) => {
      if (depth > MAX_DEPTH) return;
      let entries;
      try {
        entries = readdirSync(dir, { withFileTypes: true });
      } catch {
        return;
      }
      for (const e of entries) {
        const p = join(dir, e.name);
        if (e.name === ".unisync" || isSqliteCompanion(e.name)) continue;
        if (e.isDirectory()) walk(p, depth + 1);
        else if (e.isFile() && depth > 0 && !synced.has(p) && isSqliteFile(p)) {
          notSynced.push({ path: p, reason: "in a subfolder: add it to \"databases\" in the config to sync it" });
        }
      }
    };
    walk(instanceDir, 0);
  }
  return { synced: [...synced].map(([path, stream]) => ({ path, stream })), notSynced };
}
