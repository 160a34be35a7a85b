/**
 * Change detection for the instance folder: a metadata walk compared with the
 * index (path, size, mtime, inode, mode, sha256), so an unchanged folder costs
 * lstat calls and no reads. A changed file is read only once it is stable (its
 * mtime is older than `stableMs`), and read once: a small file into memory,
 * where those very bytes are hashed and stored; a large one hashed on its way
 * into the store (log/blobs.ts uploadFile). Then it is re-checked (size, mtime
 * and inode unchanged), so a write observation always names content that is in
 * the store and that the file held from start to end of the read.
 *
 * Nothing here opens a file before the name rules (ignore.ts) have passed it,
 * and a file the agent holds open as a database is never opened at all.
 * Symlinks are never followed: a link that stays inside the folder is synced as
 * a link, any other is skipped.
 */
import { createHash } from "node:crypto";
import { closeSync, existsSync, fstatSync, openSync, readSync, statSync, type Stats } from "node:fs";
import { lstat, open, readdir, readFile, readlink, unlink } from "node:fs/promises";
import { dirname, join, relative, resolve, sep } from "node:path";
import { blobKey, putBlob, SMALL_BLOB, uploadFile } from "../log/blobs.js";
import type { ObjectStore } from "../store/store.js";
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
  /** A file this node never recorded, found when its folder enrolled: content the store has, where the log now holds other content or a delete. The winner replaces it. */
  | { type: "stale"; rel: string }
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
  /** Where observe() stores the content of every write it reports (not needed to walk). */
  store?: ObjectStore;
  /** Absolute paths the agent holds open as databases: never opened here. */
  openDbs: () => ReadonlySet<string>;
  stableMs: number;
  /** Refuse to propagate deletes when at least this many indexed files vanish and they are most of them. */
  massDeleteMin: number;
  /** Called for every folder the walk is about to list (the watcher starts watching it). */
  onFolder?: (rel: string) => void;
  /** While true, a file this node never recorded waits for the cluster's log (FolderSync.enrolling). */
  enrolling?: () => boolean;
}

export interface ScanResult {
  /** Entries whose metadata differs from the index: to be observed. */
  changed: DiskEntry[];
  /** Every folder walked. */
  dirs: Set<string>;
  /** Deletes and forgotten paths, after the mass-delete rule. */
  gone: Observation[];
  excluded: Excluded[];
  /** Set when deletes were held back (folder gone or suddenly emptied). */
  massDelete?: string;
  entries: number;
}

/** What is at a path now, by lstat only. */
export type Look =
  | { kind: "absent" }
  | { kind: "dir" }
  | { kind: "excluded"; reason: string }
  | { kind: "entry"; entry: DiskEntry; st: Stats };

/** Content read from a file: its hash, and the bytes themselves when it is small. */
interface Content {
  sha256: string;
  size: number;
  bytes: Buffer | null;
  /** Large files are stored as they are read: whether the store held the content before. */
  existed?: boolean;
}

const SQLITE_BY_HEADER = "SQLite database by header (synced row by row, never as a file)";
const statKey = (d: { size: number; mtimeMs: number; ino: number }) => `${d.size}:${d.mtimeMs}:${d.ino}`;
const unchanged = (st: Stats, d: DiskEntry) => st.size === d.size && st.mtimeMs === d.mtimeMs && st.ino === d.ino;

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

  /** What is at `rel` now (lstat; a symlink is read, never followed). */
  async look(rel: string): Promise<Look> {
    const abs = join(this.o.root, rel);
    let st;
    try {
      st = await lstat(abs);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT" || code === "ENOTDIR") return { kind: "absent" };
      throw err;
    }
    if (st.isSymbolicLink()) {
      const t = await this.linkTarget(rel).catch((e: Error) => ({ reason: `unreadable symlink: ${e.message}` }));
      if ("reason" in t) return { kind: "excluded", reason: t.reason };
      return { kind: "entry", st, entry: { rel, isLink: true, size: 0, mtimeMs: st.mtimeMs, ino: st.ino, mode: 0, link: t.link } };
    }
    if (st.isFile()) {
      if (this.sqliteByHeader.get(rel) === statKey(st)) return { kind: "excluded", reason: SQLITE_BY_HEADER };
      return { kind: "entry", st, entry: { rel, isLink: false, size: st.size, mtimeMs: st.mtimeMs, ino: st.ino, mode: st.mode & 0o777, link: "" } };
    }
    if (st.isDirectory()) return { kind: "dir" };
    return { kind: "excluded", reason: "not a regular file (device, socket or pipe)" };
  }

  /**
   * The metadata walk of the folder, or of the subfolder `from`: every entry
   * that may be synced, plus what was excluded and why.
   */
  async walk(from = ""): Promise<{ entries: Map<string, DiskEntry>; excluded: Excluded[]; unreadable: string[]; dirs: Set<string> }> {
    const entries = new Map<string, DiskEntry>();
    const excluded: Excluded[] = [];
    const unreadable: string[] = [];
    const dirs = new Set<string>();
    const visit = async (dirRel: string): Promise<void> => {
      // Watched before it is listed: whatever appears meanwhile is listed or reported.
      this.o.onFolder?.(dirRel);
      dirs.add(dirRel);
      let dirents;
      try {
        dirents = await readdir(join(this.o.root, dirRel), { withFileTypes: true });
      } catch (err) {
        if (dirRel === "") throw err;
        unreadable.push(dirRel);
        return;
      }
      const subdirs: string[] = [];
      const files: string[] = [];
      for (const d of dirents) {
        const rel = dirRel ? `${dirRel}/${d.name}` : d.name;
        const isDir = d.isDirectory();
        const why = this.exclusion(rel, isDir);
        if (why) {
          if (!(rel === STATE_DIR || rel.split("/").some((p) => p.startsWith(".unisync-tmp-")))) excluded.push({ path: rel, reason: why });
          continue;
        }
        if (isDir) subdirs.push(rel);
        else files.push(rel);
      }
      const BATCH = 64;
      for (let i = 0; i < files.length; i += BATCH) {
        await Promise.all(
          files.slice(i, i + BATCH).map(async (rel) => {
            const l = await this.look(rel);
            if (l.kind === "entry") entries.set(rel, l.entry);
            else if (l.kind === "excluded") excluded.push({ path: rel, reason: l.reason });
          }),
        );
      }
      for (const s of subdirs) await visit(s);
    };
    await visit(from);
    return { entries, excluded, unreadable, dirs };
  }

  /** Whether `d` is what the index says the disk holds (nothing to read). */
  unchangedSinceIndexed(d: DiskEntry): boolean {
    const i = this.o.state.index(d.rel);
    return !!i && FolderScanner.sameStat(d, i);
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

  /**
   * Reads a small file whole, in one synchronous open/read/close (so no DbSync
   * can open it in between), checking that it did not change while read.
   */
  private readSmall(abs: string, d: DiskEntry): Content | "changed" | "sqlite" {
    const fd = openSync(abs, "r");
    let bytes: Buffer;
    try {
      if (!unchanged(fstatSync(fd), d)) return "changed";
      bytes = Buffer.allocUnsafe(d.size + 1);
      let n = 0;
      for (let r = 1; r > 0 && n <= d.size; n += r) r = readSync(fd, bytes, n, d.size + 1 - n, n);
      // One byte more than its size, or a newer mtime: it is being written.
      if (n !== d.size || !unchanged(fstatSync(fd), d)) return "changed";
    } finally {
      closeSync(fd);
    }
    bytes = bytes.subarray(0, d.size);
    if (bytes.length >= 16 && bytes.subarray(0, 16).equals(SQLITE_HEADER)) return "sqlite";
    return { sha256: createHash("sha256").update(bytes).digest("hex"), size: d.size, bytes };
  }

  /** Hashes a large file on its way into the store (one read), then checks it did not change. */
  private async readLarge(abs: string, d: DiskEntry, store: ObjectStore): Promise<Content | "changed" | "sqlite"> {
    if (this.isSqlite(abs)) return "sqlite";
    const up = await uploadFile(store, abs);
    if (up.head.length >= 16 && up.head.subarray(0, 16).equals(SQLITE_HEADER)) {
      // It became a database while read; nobody syncs those bytes, so the blob goes.
      await store.delete(blobKey(up.sha256)).catch(() => undefined);
      return "sqlite";
    }
    // What was stored hashes to its name either way; a changed file only orphans it.
    if (!unchanged(await lstat(abs), d) || up.size !== d.size) return "changed";
    return { sha256: up.sha256, size: up.size, bytes: null, existed: up.existed };
  }

  /**
   * Looks at one path whose disk entry is `d` (undefined: absent) and decides
   * what it means against the index and the current winner. The content of a
   * write observation is in the store when it is returned.
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
    let content: Content | null = null;
    const kind: typeof KIND_WRITE | typeof KIND_SYMLINK = d.isLink ? KIND_SYMLINK : KIND_WRITE;
    if (!d.isLink) {
      if (now - d.mtimeMs < this.o.stableMs) return { type: "unstable", rel, why: "modified less than the stable window ago" };
      if (this.o.openDbs().has(abs)) return { type: "excluded", rel, reason: "SQLite database the agent syncs row by row" };
      // Met when the folder is first enrolled, at a path the log has said nothing of yet: not read until it is in.
      if (!i && !s && this.o.enrolling?.()) return { type: "unstable", rel, why: "found when this folder was first enrolled: waits until the cluster's folder log is in" };
      const { store } = this.o;
      if (!store) throw new Error("FolderScanner: observing content needs a store");
      let r: Content | "changed" | "sqlite";
      try {
        r = d.size <= SMALL_BLOB ? this.readSmall(abs, d) : await this.readLarge(abs, d, store);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "ENOENT" || code === "ENOTDIR") return { type: "unstable", rel, why: "vanished while it was read" };
        throw err;
      }
      if (r === "changed") return { type: "unstable", rel, why: "changed while it was read" };
      if (r === "sqlite") {
        this.sqliteByHeader.set(rel, statKey(d));
        return { type: "excluded", rel, reason: SQLITE_BY_HEADER };
      }
      content = r;
    }
    const sha256 = content?.sha256 ?? "";
    const sameContent = (x: { sha256: string; link: string; mode: number }, k: number) =>
      k === kind && (kind === KIND_SYMLINK ? x.link === d.link : x.sha256 === sha256 && (x.mode & 0o777) === d.mode);
    const entry = { path: rel, size: d.size, mtimeMs: d.mtimeMs, ino: d.ino, mode: d.mode, sha256, link: d.link };
    if (s && sameContent(s, s.kind)) return { type: "index", matchesWinner: true, entry: { ...entry, hlc: s.hlc, origin: s.origin } };
    if (i && sameContent(i, i.link ? KIND_SYMLINK : KIND_WRITE)) return { type: "index", matchesWinner: false, entry: { ...entry, hlc: i.hlc, origin: i.origin } };
    if (!i && content && this.o.enrolling?.()) {
      // The folder is met for the first time: what the cluster did to this path since
      // the copy was made decides, once its log is in. A file whose content the store
      // has is a copy of something logged (a backup): where the log now holds other
      // content or a delete, it is stale and the winner replaces it. Content the store
      // never had is this node's own work, and goes out as a write.
      const known = content.existed ?? (this.o.store ? (await this.o.store.head(blobKey(content.sha256))) !== null : false);
      if (known) return { type: "stale", rel };
    }
    if (content?.bytes && this.o.store) await putBlob(this.o.store, content.bytes, content.sha256);
    return {
      type: "write",
      rel,
      kind,
      sha256,
      size: content?.size ?? 0,
      mode: d.mode,
      mtimeMs: Math.floor(d.mtimeMs),
      mtimeExact: d.mtimeMs,
      ino: d.ino,
      link: d.link,
      base: i ? { hlc: i.hlc, origin: i.origin } : { hlc: 0, origin: "" },
    };
  }

  /**
   * A full pass: walk, and compare every entry and every indexed path with the
   * index. Deletes are held back (and the reason returned) when the folder is
   * gone or a large part of it vanished at once, e.g. an unmounted disk.
   */
  async scan(): Promise<ScanResult> {
    if (!existsSync(this.o.root) || !statSync(this.o.root).isDirectory()) {
      return { changed: [], dirs: new Set(), gone: [], excluded: [], massDelete: `the instance folder ${this.o.root} is gone; not propagating any delete`, entries: 0 };
    }
    await this.loadRules();
    const { entries, excluded, unreadable, dirs } = await this.walk();
    const changed = [...entries.values()].filter((d) => !this.unchangedSinceIndexed(d));
    const excludedNow = new Set(excluded.map((e) => e.path));
    const gone: Observation[] = [];
    const deletes: Observation[] = [];
    let indexed = 0;
    for (const i of this.o.state.allIndex()) {
      indexed++;
      if (entries.has(i.path)) continue;
      if (excludedNow.has(i.path) || this.exclusion(i.path, false) || unreadable.some((u) => i.path.startsWith(`${u}/`))) {
        // Newly ignored or unreadable: forget it here, never delete it everywhere.
        gone.push({ type: "dropIndex", rel: i.path });
        continue;
      }
      const o = await this.observe(i.path, undefined);
      if (o.type === "delete") deletes.push(o);
      else if (o.type !== "same") gone.push(o);
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
        gone.push(...deletes);
        if (emptied || most) await unlink(allow).catch(() => undefined);
      }
    }
    return { changed, dirs, gone, excluded, massDelete, entries: entries.size };
  }
}

/** Every file of the folder that is not synced, and why (for `unisync status --files`). */
export async function listExcluded(root: string, openDbs: ReadonlySet<string> = new Set()): Promise<Excluded[]> {
  const { FileStateStore } = await import("./filestate.js");
  const Database = (await import("better-sqlite3")).default;
  const db = new Database(":memory:");
  try {
    const scanner = new FolderScanner({ root, state: new FileStateStore(db), openDbs: () => openDbs, stableMs: 0, massDeleteMin: 1 });
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
        if (bytesRead === 16 && head.equals(SQLITE_HEADER)) excluded.push({ path: d.rel, reason: SQLITE_BY_HEADER });
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
