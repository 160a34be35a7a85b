/**
 * Change detection for the instance folder: a metadata walk compared with the
 * index (path, size, mtime, inode, mode, sha256), so an unchanged folder costs
 * lstat calls and no reads. A changed file is read only once it is stable (its
 * mtime is older than `stableMs`), copied into `.unisync/staging/` while it is
 * hashed, and re-checked after the copy (size, mtime and inode unchanged), so
 * the bytes that go to the store are exactly the bytes that were hashed.
 *
 * Nothing here opens a file before the name rules (ignore.ts) have passed it,
 * and a file the agent holds open as a database is never opened at all.
 * Symlinks are never followed: a link that stays inside the folder is synced as
 * a link, any other is skipped.
 */
import { randomBytes } from "node:crypto";
import { closeSync, existsSync, openSync, readSync, statSync } from "node:fs";
import { lstat, open, readdir, readFile, readlink, rename, unlink } from "node:fs/promises";
import { dirname, join, relative, resolve, sep } from "node:path";
import { copyAndHash } from "../log/blobs.js";
import { exclusionByName, IGNORE_FILE, IgnoreRules, STATE_DIR } from "./ignore.js";
import { KIND_DELETE, KIND_SYMLINK, KIND_WRITE, type FileStateStore, type IndexEntry } from "./filestate.js";

const SQLITE_HEADER = Buffer.from("SQLite format 3\0", "latin1");

export interface DiskEntry {
  rel: string;
  isLink: boolean;
  size: number;
  mtimeMs: number;
  ino: number;
  mode: number;
  link: string;
}

export interface Excluded {
  path: string;
  reason: string;
}

/** What one look at a path found. */
export type Observation =
  | { type: "same" }
  | { type: "unstable"; rel: string; why: string }
  | { type: "excluded"; rel: string; reason: string }
  /** Disk holds known content (the winner's or the indexed one): refresh the index only. */
  | { type: "index"; entry: IndexEntry; matchesWinner: boolean }
  | { type: "dropIndex"; rel: string }
  | {
      type: "write";
      rel: string;
      kind: typeof KIND_WRITE | typeof KIND_SYMLINK;
      sha256: string;
      size: number;
      mode: number;
      mtimeMs: number;
      link: string;
      ino: number;
      mtimeExact: number;
      base: { hlc: number; origin: string };
    }
  | { type: "delete"; rel: string; base: { hlc: number; origin: string } };

const toRel = (root: string, abs: string) => relative(root, abs).split(sep).join("/");

/** Inside `root` (or root itself), comparing resolved paths. */
export function isInside(root: string, p: string): boolean {
  const r = resolve(root);
  const x = resolve(p);
  return x === r || x.startsWith(r.endsWith(sep) ? r : r + sep);
}

export interface ScannerOptions {
  root: string;
  state: FileStateStore;
  stagingDir: string;
  /** Absolute paths the agent holds open as databases: never opened here. */
  openDbs: () => ReadonlySet<string>;
  stableMs: number;
  /** Refuse to propagate deletes when at least this many indexed files vanish and they are most of them. */
  massDeleteMin: number;
}

export interface ScanResult {
  observations: Observation[];
  excluded: Excluded[];
  /** Set when deletes were held back (folder gone or suddenly emptied). */
  massDelete?: string;
  unstable: number;
  entries: number;
}

export class FolderScanner {
  rules = new IgnoreRules();
  private rulesStamp = "";
  /** Files found to be SQLite by header, with the stat they had (not reopened unless changed). */
  private readonly sqliteByHeader = new Map<string, string>();

  constructor(readonly o: ScannerOptions) {}

  /** Reloads .unisyncignore when it changed. */
  async loadRules(): Promise<void> {
    const f = join(this.o.root, IGNORE_FILE);
    let stamp = "";
    try {
      const st = await lstat(f);
      stamp = st.isFile() ? `${st.size}:${st.mtimeMs}:${st.ino}` : "";
    } catch {
      stamp = "";
    }
    if (stamp === this.rulesStamp) return;
    this.rulesStamp = stamp;
    this.rules = new IgnoreRules(stamp ? await readFile(f, "utf8") : "");
  }

  /** Why a path is not synced by name (never opens it). */
  exclusion(rel: string, isDir: boolean): string | null {
    const abs = join(this.o.root, rel);
    if (this.o.openDbs().has(abs)) return "SQLite database the agent syncs row by row";
    return exclusionByName(rel, isDir, this.rules);
  }

  /** Symlink target as stored (relative to the link's folder), or why it is skipped. */
  async linkTarget(rel: string): Promise<{ link: string } | { reason: string }> {
    const abs = join(this.o.root, rel);
    const target = await readlink(abs);
    const resolved = resolve(dirname(abs), target);
    if (!isInside(this.o.root, resolved) || resolved === resolve(this.o.root)) return { reason: "symlink pointing outside the folder (never followed)" };
    const relTarget = toRel(this.o.root, resolved);
    if (relTarget.split("/")[0] === STATE_DIR) return { reason: "symlink into .unisync/" };
    return { link: relative(dirname(abs), resolved).split(sep).join("/") };
  }

  /** The metadata walk: every entry that may be synced, plus what was excluded and why. */
  async walk(): Promise<{ entries: Map<string, DiskEntry>; excluded: Excluded[]; unreadable: string[] }> {
    const entries = new Map<string, DiskEntry>();
    const excluded: Excluded[] = [];
    const unreadable: string[] = [];
    const visit = async (dirRel: string): Promise<void> => {
      let dirents;
      try {
        dirents = await readdir(join(this.o.root, dirRel), { withFileTypes: true });
      } catch (err) {
        if (dirRel === "") throw err;
        unreadable.push(dirRel);
        return;
      }
      const subdirs: string[] = [];
      const files: { rel: string }[] = [];
      for (const d of dirents) {
        const rel = dirRel ? `${dirRel}/${d.name}` : d.name;
        const isDir = d.isDirectory();
        const why = this.exclusion(rel, isDir);
        if (why) {
          if (!(rel === STATE_DIR || rel.split("/").some((p) => p.startsWith(".unisync-tmp-")))) excluded.push({ path: rel, reason: why });
          continue;
        }
        if (isDir) subdirs.push(rel);
        else files.push({ rel });
      }
      const BATCH = 64;
      for (let i = 0; i < files.length; i += BATCH) {
        await Promise.all(
          files.slice(i, i + BATCH).map(async ({ rel }) => {
            let st;
            try {
              st = await lstat(join(this.o.root, rel));
            } catch {
              return; // vanished
            }
            if (st.isSymbolicLink()) {
              const t = await this.linkTarget(rel).catch((e: Error) => ({ reason: `unreadable symlink: ${e.message}` }));
              if ("reason" in t) excluded.push({ path: rel, reason: t.reason });
              else entries.set(rel, { rel, isLink: true, size: 0, mtimeMs: st.mtimeMs, ino: st.ino, mode: 0, link: t.link });
            } else if (st.isFile()) {
              const key = `${st.size}:${st.mtimeMs}:${st.ino}`;
              if (this.sqliteByHeader.get(rel) === key) excluded.push({ path: rel, reason: "SQLite database by header (synced row by row, never as a file)" });
              else entries.set(rel, { rel, isLink: false, size: st.size, mtimeMs: st.mtimeMs, ino: st.ino, mode: st.mode & 0o777, link: "" });
            } else if (!st.isDirectory()) {
              excluded.push({ path: rel, reason: "not a regular file (device, socket or pipe)" });
            }
          }),
        );
      }
      for (const s of subdirs) await visit(s);
    };
    await visit("");
    return { entries, excluded, unreadable };
  }

  private static sameStat(d: DiskEntry, i: IndexEntry): boolean {
    return d.size === i.size && d.mtimeMs === i.mtimeMs && d.ino === i.ino && d.mode === i.mode && d.link === i.link;
  }

  /**
   * Synchronous on purpose: the agent opens databases on the same thread, so no
   * DbSync can open this file between our open and close (closing a descriptor
   * would drop the agent's POSIX locks on it).
   */
  private isSqlite(abs: string): boolean {
    if (this.o.openDbs().has(abs)) return true;
    const fd = openSync(abs, "r");
    try {
      const head = Buffer.alloc(16);
      return readSync(fd, head, 0, 16, 0) === 16 && head.equals(SQLITE_HEADER);
    } finally {
      closeSync(fd);
    }
  }

  /** Moves a staged temp copy to staging/<sha256> (kept until its segment is uploaded). */
  private async keepStaged(tmp: string, sha256: string): Promise<void> {
    const final = join(this.o.stagingDir, sha256);
    if (existsSync(final)) await unlink(tmp);
    else await rename(tmp, final);
  }

  /**
   * Looks at one path whose disk entry is `d` (undefined: absent) and decides
   * what it means against the index and the current winner. A write observation
   * leaves the content staged under staging/<sha256>.
   */
  async observe(rel: string, d: DiskEntry | undefined, now = Date.now()): Promise<Observation> {
    const { state } = this.o;
    const i = state.index(rel);
    const s = state.state(rel);
    if (!d) {
      if (!i) return { type: "same" };
      if (!s || s.kind === KIND_DELETE) return { type: "dropIndex", rel };
      return { type: "delete", rel, base: { hlc: i.hlc, origin: i.origin } };
    }
    if (i && FolderScanner.sameStat(d, i)) return { type: "same" };
    const abs = join(this.o.root, rel);
    let sha256 = "";
    let size = 0;
    let staged: string | null = null;
    let kind: typeof KIND_WRITE | typeof KIND_SYMLINK = KIND_WRITE;
    if (d.isLink) {
      kind = KIND_SYMLINK;
    } else {
      if (now - d.mtimeMs < this.o.stableMs) return { type: "unstable", rel, why: "modified less than the stable window ago" };
      if (this.o.openDbs().has(abs)) return { type: "excluded", rel, reason: "SQLite database the agent syncs row by row" };
      try {
        if (this.isSqlite(abs)) {
          this.sqliteByHeader.set(rel, `${d.size}:${d.mtimeMs}:${d.ino}`);
          return { type: "excluded", rel, reason: "SQLite database by header (synced row by row, never as a file)" };
        }
        staged = join(this.o.stagingDir, `tmp-${randomBytes(8).toString("hex")}`);
        const copied = await copyAndHash(abs, staged);
        const after = await lstat(abs);
        if (after.size !== d.size || after.mtimeMs !== d.mtimeMs || after.ino !== d.ino || copied.size !== d.size) {
          await unlink(staged).catch(() => undefined);
          return { type: "unstable", rel, why: "changed while it was read" };
        }
        if (copied.head.equals(SQLITE_HEADER)) {
          await unlink(staged).catch(() => undefined);
          this.sqliteByHeader.set(rel, `${d.size}:${d.mtimeMs}:${d.ino}`);
          return { type: "excluded", rel, reason: "SQLite database by header (synced row by row, never as a file)" };
        }
        sha256 = copied.sha256;
        size = copied.size;
      } catch (err) {
        if (staged) await unlink(staged).catch(() => undefined);
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "ENOENT") return { type: "unstable", rel, why: "vanished while it was read" };
        throw err;
      }
    }
    const sameContent = (x: { sha256: string; link: string; mode: number }, k: number) =>
      k === kind && (kind === KIND_SYMLINK ? x.link === d.link : x.sha256 === sha256 && (x.mode & 0o777) === d.mode);
    const discard = async () => {
      if (staged) await unlink(staged).catch(() => undefined);
    };
    if (s && sameContent(s, s.kind)) {
      await discard();
      return { type: "index", matchesWinner: true, entry: { path: rel, size: d.size, mtimeMs: d.mtimeMs, ino: d.ino, mode: d.mode, sha256, link: d.link, hlc: s.hlc, origin: s.origin } };
    }
    if (i && sameContent(i, i.link ? KIND_SYMLINK : KIND_WRITE)) {
      await discard();
      return { type: "index", matchesWinner: false, entry: { path: rel, size: d.size, mtimeMs: d.mtimeMs, ino: d.ino, mode: d.mode, sha256, link: d.link, hlc: i.hlc, origin: i.origin } };
    }
    if (staged) await this.keepStaged(staged, sha256);
    return {
      type: "write",
      rel,
      kind,
      sha256,
      size,
      mode: d.mode,
      mtimeMs: Math.floor(d.mtimeMs),
      mtimeExact: d.mtimeMs,
      ino: d.ino,
      link: d.link,
      base: i ? { hlc: i.hlc, origin: i.origin } : { hlc: 0, origin: "" },
    };
  }

  /** Looks at one path now (used before replay touches it). */
  async observePath(rel: string): Promise<Observation> {
    const abs = join(this.o.root, rel);
    let d: DiskEntry | undefined;
    try {
      const st = await lstat(abs);
      if (st.isSymbolicLink()) {
        const t = await this.linkTarget(rel);
        if ("reason" in t) return { type: "excluded", rel, reason: t.reason };
        d = { rel, isLink: true, size: 0, mtimeMs: st.mtimeMs, ino: st.ino, mode: 0, link: t.link };
      } else if (st.isFile()) {
        d = { rel, isLink: false, size: st.size, mtimeMs: st.mtimeMs, ino: st.ino, mode: st.mode & 0o777, link: "" };
      } else if (st.isDirectory()) {
        return { type: "excluded", rel, reason: "a folder is in the way" };
      } else {
        return { type: "excluded", rel, reason: "not a regular file" };
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT" && (err as NodeJS.ErrnoException).code !== "ENOTDIR") throw err;
    }
    return this.observe(rel, d);
  }

  /**
   * A full pass: walk, compare every entry and every indexed path. Deletes are
   * held back (and the reason returned) when the folder is gone or a large part
   * of it vanished at once, e.g. an unmounted disk.
   */
  async scan(): Promise<ScanResult> {
    if (!existsSync(this.o.root) || !statSync(this.o.root).isDirectory()) {
      return { observations: [], excluded: [], massDelete: `the instance folder ${this.o.root} is gone; not propagating any delete`, unstable: 0, entries: 0 };
    }
    await this.loadRules();
    const { entries, excluded, unreadable } = await this.walk();
    const observations: Observation[] = [];
    let unstable = 0;
    const now = Date.now();
    for (const d of entries.values()) {
      const o = await this.observe(d.rel, d, now);
      if (o.type === "unstable") unstable++;
      if (o.type !== "same") observations.push(o);
    }
    const excludedNow = new Set(excluded.map((e) => e.path));
    const deletes: Observation[] = [];
    let indexed = 0;
    for (const i of this.o.state.allIndex()) {
      indexed++;
      if (entries.has(i.path)) continue;
      if (excludedNow.has(i.path) || this.exclusion(i.path, false) || unreadable.some((u) => i.path.startsWith(`${u}/`))) {
        // Newly ignored or unreadable: forget it here, never delete it everywhere.
        observations.push({ type: "dropIndex", rel: i.path });
        continue;
      }
      const o = await this.observe(i.path, undefined);
      if (o.type === "delete") deletes.push(o);
      else if (o.type !== "same") observations.push(o);
    }
    let massDelete: string | undefined;
    const allow = join(this.o.root, STATE_DIR, "allow-mass-delete");
    if (deletes.length > 0) {
      const emptied = entries.size === 0 && indexed >= 3;
      const most = deletes.length >= this.o.massDeleteMin && deletes.length * 2 > indexed;
      if ((emptied || most) && !existsSync(allow)) {
        massDelete =
          `${deletes.length} of ${indexed} synced files vanished at once${emptied ? " (the folder is empty)" : ""}; ` +
          `not propagating these deletes (unmounted disk?). If they are meant, create ${allow} and they go out on the next scan.`;
      } else {
        observations.push(...deletes);
        if (emptied || most) await unlink(allow).catch(() => undefined);
      }
    }
    return { observations, excluded, massDelete, unstable, entries: entries.size };
  }
}

/** Every file of the folder that is not synced, and why (for `unisync status --files`). */
export async function listExcluded(root: string, openDbs: ReadonlySet<string> = new Set()): Promise<Excluded[]> {
  const { FileStateStore } = await import("./filestate.js");
  const Database = (await import("better-sqlite3")).default;
  const db = new Database(":memory:");
  try {
    const scanner = new FolderScanner({ root, state: new FileStateStore(db), stagingDir: "", openDbs: () => openDbs, stableMs: 0, massDeleteMin: 1 });
    await scanner.loadRules();
    const { entries, excluded } = await scanner.walk();
    for (const d of entries.values()) {
      if (d.isLink) continue;
      const abs = join(root, d.rel);
      if (isSqliteCompanionName(abs)) continue;
      try {
        const fh = await open(abs, "r");
        const head = Buffer.alloc(16);
        const { bytesRead } = await fh.read(head, 0, 16, 0);
        await fh.close();
        if (bytesRead === 16 && head.equals(SQLITE_HEADER)) excluded.push({ path: d.rel, reason: "SQLite database by header (synced row by row, never as a file)" });
      } catch {
        // vanished
      }
    }
    return excluded.sort((a, b) => (a.path < b.path ? -1 : 1));
  } finally {
    db.close();
  }
}

const isSqliteCompanionName = (p: string) => /-(wal|shm|journal)$/i.test(p);
