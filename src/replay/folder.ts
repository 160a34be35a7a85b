/**
 * Makes this node's disk match the winner of a path (see capture/filestate.ts).
 *
 * Safety first: the path was already checked as a string (ignore.ts:
 * unsafePathReason + exclusions) before its record was accepted; here every
 * parent folder is checked on disk to be a real folder (never a symlink) inside
 * the instance folder, created one level at a time. Content is fetched into a
 * temp file beside the target, verified by sha256 and size, fsynced, given its
 * mode and mtime, and renamed into place, a batch of paths at a time: every
 * folder touched is fsynced once, and only then does one files.db transaction
 * record the whole batch as in place. A blob that fails verification, or that
 * turns out to be an SQLite database, is never renamed into place.
 *
 * Before touching a path, its disk entry is looked at again: a local edit that
 * the scanner has not captured yet is captured first (so it is merged, not
 * overwritten), and a file still being written is left for later.
 */
import { fsyncDir } from "../store/file.js";
import { randomBytes } from "node:crypto";
import type { Stats } from "node:fs";
import { lstat, mkdir, open, readdir, realpath, rename, rmdir, symlink, unlink } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import type { Logger } from "pino";
import { isInside, type FolderScanner, type Look, type Observation } from "../capture/folder.js";
import { KIND_DELETE, KIND_SYMLINK, KIND_WRITE, type FileStateStore, type IndexEntry, type StateEntry } from "../capture/filestate.js";
import { STATE_DIR, TEMP_PREFIX, unsafePathReason } from "../capture/ignore.js";
import { BlobIntegrityError, BlobMissingError, fetchBlob, fetchBlobToFile, SMALL_BLOB } from "../log/blobs.js";
import type { FileChange } from "../log/segment.js";
import type { ObjectStore } from "../store/store.js";

const SQLITE_HEADER = Buffer.from("SQLite format 3\0", "latin1");

/** A path that must not be written (it would leave the folder, or is not ours to write). */
export class UnsafePathError extends Error {
  override name = "UnsafePathError";
  constructor(
    message: string,
    /** Why: a parent folder is missing, is a symlink, is not a folder, or the path resolves outside the instance folder. */
    readonly code: "PARENT_MISSING" | "PARENT_SYMLINK" | "PARENT_NOT_FOLDER" | "OUTSIDE_FOLDER",
  ) {
    super(message);
  }
}

/** A symlink target is acceptable when it is relative and stays inside the folder (not in .unisync/). */
export function unsafeLinkReason(rel: string, target: string): string | null {
  if (!target || target.includes("\0")) return "empty symlink target or NUL in it";
  if (target.startsWith("/") || /^[A-Za-z]:/.test(target) || target.includes("\\")) return "absolute symlink target";
  const root = "/r";
  const resolved = resolve(dirname(join(root, rel)), target);
  if (!isInside(root, resolved) || resolved === root) return "symlink target leaves the folder";
  if (resolved.slice(root.length + 1).split("/")[0] === STATE_DIR) return "symlink target in .unisync/";
  return null;
}

/**
 * Why a record from the log must be refused (never written), or null. `exclusion`
 * is this node's name rules (databases, .unisync/, ignores...).
 */
export function refuseReason(f: FileChange, exclusion: (rel: string) => string | null): string | null {
  const unsafe = unsafePathReason(f.path);
  if (unsafe) return `unsafe path: ${unsafe}`;
  const excluded = exclusion(f.path);
  if (excluded) return `excluded on this node: ${excluded}`;
  if (f.kind === KIND_WRITE) {
    if (!/^[0-9a-f]{64}$/.test(f.sha256)) return "WRITE without a valid sha256";
    if (!Number.isSafeInteger(f.size) || f.size < 0) return "WRITE with an invalid size";
  } else if (f.kind === KIND_SYMLINK) {
    const bad = unsafeLinkReason(f.path, f.linkTarget ?? "");
    if (bad) return bad;
  } else if (f.kind !== KIND_DELETE) {
    return `unknown file change kind ${f.kind}`;
  }
  return null;
}


/**
 * The folder that will hold `rel`, checked (and with `create`, made) one level
 * at a time: every level must be a real folder, not a symlink, and its real
 * path must stay inside the instance folder.
 */
export async function safeParent(root: string, rel: string, create: boolean): Promise<string> {
  const parts = rel.split("/").slice(0, -1);
  let dir = root;
  for (const p of parts) {
    dir = join(dir, p);
    let st;
    try {
      st = await lstat(dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT" || !create) throw new UnsafePathError(`${rel}: parent ${dir} is missing`, "PARENT_MISSING");
      try {
        await mkdir(dir, { mode: 0o755 });
        await fsyncDir(dirname(dir));
      } catch (e) {
        // Another write into the same new folder made it first: check what is there now.
        if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
      }
      st = await lstat(dir);
    }
    if (st.isSymbolicLink()) throw new UnsafePathError(`${rel}: parent ${dir} is a symlink (never followed)`, "PARENT_SYMLINK");
    if (!st.isDirectory()) throw new UnsafePathError(`${rel}: parent ${dir} is not a folder`, "PARENT_NOT_FOLDER");
  }
  const realRoot = await realpath(root);
  const realDir = await realpath(dir);
  if (!isInside(realRoot, realDir)) throw new UnsafePathError(`${rel}: resolves outside the instance folder`, "OUTSIDE_FOLDER");
  return dir;
}

/**
 * Something is at `name` in `dir`: on a case-insensitive file system it may be
 * another name of the same letters, which must not be overwritten: refuse.
 */
async function caseClash(dir: string, name: string): Promise<string | null> {
  const names = await readdir(dir);
  if (names.includes(name)) return null;
  const other = names.find((n) => n.toLowerCase() === name.toLowerCase());
  return other ? `"${name}" would overwrite "${other}" (case-insensitive file system)` : null;
}

export interface MaterializerOptions {
  root: string;
  state: FileStateStore;
  store: ObjectStore;
  scanner: FolderScanner;
  log: Logger;
  /** Captures local observations (uncaptured edits found just before a write). */
  commitLocal: (obs: Observation[]) => void;
  /** Runs fn in one files.db transaction. */
  tx: (fn: () => void) => void;
  /** Paths prepared at once (blob fetch, temp write, fsync). */
  parallel: number;
}

/** A path made ready in phase 1: a durable temp file (or nothing, for a delete) waiting for its rename. */
interface Staged {
  s: StateEntry;
  abs: string;
  parent: string;
  /** What the target was when looked at; it must still be that at the rename. */
  before: Stats | null;
  /** The temp file to rename into place; null for a delete. */
  tmp: string | null;
  /** The index entry once the rename is done (writes). */
  index: IndexEntry | null;
}

type Prepared = "done" | "later" | Staged;

/** Runs `fn` over `items` with at most `limit` running at once. */
async function eachLimited<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

export class Materializer {
  constructor(private readonly o: MaterializerOptions) {}

  private problem(rel: string, why: string, transient = false): "later" {
    const s = this.o.state.state(rel);
    if (s?.problem !== why) {
      if (transient) this.o.log.info({ path: rel, problem: why }, "file waits");
      else this.o.log.error({ path: rel, problem: why }, "file not applied");
    }
    this.o.state.setPending(rel, true, why);
    return "later";
  }

  /**
   * Brings a batch of paths on disk to their winners, with one fsync per
   * touched folder and one files.db transaction for the whole batch:
   * 1. each path (in parallel): look again, fetch and verify its blob into a
   *    temp file beside the target, set mode and mtime, fsync it;
   * 2. rename every temp file into place (or unlink, for deletes), each after
   *    checking that its target did not change since it was looked at;
   * 3. fsync every touched folder once;
   * 4. only then commit "in place" (index and pending = 0) for all of them.
   * A crash before 4 leaves the paths pending; the next pass finds the content
   * already there and only records it. Paths must not differ only in case.
   * Returns the number of paths written or deleted.
   */
  async materialize(paths: readonly string[]): Promise<number> {
    const staged: Staged[] = [];
    const parents = new Map<string, Promise<string>>();
    try {
      await eachLimited(paths, this.o.parallel, async (rel) => {
        try {
          const p = await this.prepare(rel, parents);
          if (typeof p !== "string") staged.push(p);
        } catch (err) {
          this.o.log.error({ path: rel, err: (err as Error).message }, "could not write file; will retry");
          this.o.state.setPending(rel, true, (err as Error).message);
        }
      });
      const placed: Staged[] = [];
      const dirs = new Set<string>();
      await eachLimited(staged, this.o.parallel, async (x) => {
        try {
          const now = await lstat(x.abs).catch(() => null);
          const b = x.before;
          if ((b === null) !== (now === null) || (b && now && (b.ino !== now.ino || b.mtimeMs !== now.mtimeMs || b.size !== now.size))) return; // changed: next pass
          if (x.tmp) await rename(x.tmp, x.abs);
          else if (now) await unlink(x.abs);
          x.tmp = null;
          placed.push(x);
          dirs.add(x.parent);
        } catch (err) {
          this.o.log.error({ path: x.s.path, err: (err as Error).message }, "could not write file; will retry");
          this.o.state.setPending(x.s.path, true, (err as Error).message);
        }
      });
      await Promise.all([...dirs].map((d) => fsyncDir(d)));
      this.o.tx(() => {
        for (const x of placed) {
          const cur = this.o.state.state(x.s.path);
          // A newer winner arrived meanwhile (a conflict copy derived in this batch): it stays pending.
          if (!cur || cur.hlc !== x.s.hlc || cur.origin !== x.s.origin) continue;
          if (x.index) this.o.state.setIndex(x.index);
          else this.o.state.dropIndex(x.s.path);
          this.o.state.setPending(x.s.path, false);
        }
      });
      for (const x of placed) if (!x.index) await this.pruneEmptyDirs(dirname(x.s.path));
      return placed.length;
    } finally {
      await Promise.all(staged.map((x) => (x.tmp ? unlink(x.tmp).catch(() => undefined) : undefined)));
    }
  }

  /** Phase 1 for one path: done already, wait, or a staged write or delete. */
  private async prepare(rel: string, parents: Map<string, Promise<string>>): Promise<Prepared> {
    const { state } = this.o;
    for (let round = 0; round < 4; round++) {
      const s = state.state(rel);
      if (!s || !s.pending) return "done";
      const unsafe = unsafePathReason(rel);
      if (unsafe) return this.problem(rel, `unsafe path: ${unsafe}`);
      let l: Look;
      let o: Observation;
      try {
        l = await this.o.scanner.look(rel);
        if (l.kind === "dir") return this.problem(rel, "cannot write: a folder is in the way");
        if (l.kind === "excluded") return this.problem(rel, `cannot write: ${l.reason}`);
        o = await this.o.scanner.observe(rel, l.kind === "entry" ? l.entry : undefined);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "ENOTDIR" || code === "ELOOP") return this.problem(rel, `cannot look at ${rel}: ${code}`);
        throw err;
      }
      if (o.type === "unstable") return "later";
      if (o.type === "excluded") return this.problem(rel, `cannot write: ${o.reason}`);
      if (o.type === "write" || o.type === "delete") {
        // A local change nobody captured yet: merge it instead of overwriting it.
        this.o.commitLocal([o]);
        continue;
      }
      if (o.type === "index") {
        this.o.tx(() => {
          state.setIndex(o.entry);
          if (o.matchesWinner) state.setPending(rel, false);
        });
        if (o.matchesWinner) return "done";
      }
      if (o.type === "dropIndex") this.o.tx(() => state.dropIndex(rel));
      return await this.stage(s, parents, l.kind === "entry" ? l.st : null);
    }
    return "later";
  }

  /** The folder of `rel`, checked (and made) once per batch. */
  private parentOf(rel: string, create: boolean, parents: Map<string, Promise<string>>): Promise<string> {
    const key = `${create ? "+" : "-"}${dirname(rel)}`;
    let p = parents.get(key);
    if (!p) {
      p = safeParent(this.o.root, rel, create);
      parents.set(key, p);
    }
    return p;
  }

  /** Phase 1 proper; `before` is what the target was when looked at (lstat), null when absent. */
  private async stage(s: StateEntry, parents: Map<string, Promise<string>>, before: Stats | null): Promise<Prepared> {
    const rel = s.path;
    const abs = join(this.o.root, rel);
    let parent: string;
    try {
      parent = await this.parentOf(rel, s.kind !== KIND_DELETE, parents);
    } catch (err) {
      if (err instanceof UnsafePathError) {
        if (s.kind === KIND_DELETE && err.code === "PARENT_MISSING") {
          this.o.tx(() => {
            this.o.state.dropIndex(rel);
            this.o.state.setPending(rel, false);
          });
          return "done";
        }
        return this.problem(rel, err.message);
      }
      throw err;
    }
    if (s.kind === KIND_DELETE) return { s, abs, parent, before, tmp: null, index: null };
    // Nothing there under any case (a case-insensitive disk would have found the other name): no clash.
    const clash = before ? await caseClash(parent, basename(abs)) : null;
    if (clash) return this.problem(rel, clash);
    const tmp = join(parent, `${TEMP_PREFIX}${randomBytes(6).toString("hex")}`);
    let ok = false;
    try {
      let st: Stats;
      if (s.kind === KIND_SYMLINK) {
        const bad = unsafeLinkReason(rel, s.link);
        if (bad) return this.problem(rel, bad);
        await symlink(s.link, tmp);
        st = await lstat(tmp);
      } else {
        const written = await this.writeContent(s, tmp);
        if ("why" in written) return this.problem(rel, written.why, written.transient);
        st = written;
      }
      ok = true;
      const index: IndexEntry = {
        path: rel,
        size: s.kind === KIND_SYMLINK ? 0 : st.size,
        mtimeMs: st.mtimeMs,
        ino: st.ino,
        mode: s.kind === KIND_SYMLINK ? 0 : st.mode & 0o777,
        sha256: s.kind === KIND_SYMLINK ? "" : s.sha256,
        link: s.kind === KIND_SYMLINK ? s.link : "",
        hlc: s.hlc,
        origin: s.origin,
      };
      return { s, abs, parent, before, tmp, index };
    } finally {
      if (!ok) await unlink(tmp).catch(() => undefined);
    }
  }

  /**
   * The winner's verified content in `tmp`, with its mode and mtime, fsynced.
   * Returns its stat, or why it cannot be used (transient: the blob is not uploaded yet).
   */
  private async writeContent(s: StateEntry, tmp: string): Promise<Stats | { why: string; transient: boolean }> {
    const small = s.size <= SMALL_BLOB;
    let bytes: Buffer | null = null;
    try {
      if (small) bytes = await fetchBlob(this.o.store, s.sha256, s.size);
      else await fetchBlobToFile(this.o.store, s.sha256, s.size, tmp);
    } catch (err) {
      if (err instanceof BlobIntegrityError) return { why: err.message, transient: err instanceof BlobMissingError };
      throw err;
    }
    const fh = await open(tmp, bytes ? "wx" : "r+", 0o600);
    try {
      if (bytes) {
        for (let off = 0; off < bytes.length; ) off += (await fh.write(bytes, off, bytes.length - off)).bytesWritten;
      }
      const head = bytes ? bytes.subarray(0, 16) : Buffer.alloc(16);
      const n = bytes ? head.length : (await fh.read(head, 0, 16, 0)).bytesRead;
      if (n === 16 && head.equals(SQLITE_HEADER)) return { why: "content is an SQLite database: never written as a file", transient: false };
      await fh.chmod((s.mode & 0o777) || 0o644);
      const t = s.mtimeMs / 1000;
      await fh.utimes(t, t);
      await fh.sync();
      return await fh.stat();
    } finally {
      await fh.close();
    }
  }
  /** Removes folders left empty by a delete, up to (never including) the instance folder. */
  private async pruneEmptyDirs(relDir: string): Promise<void> {
    for (let d = relDir; d !== "." && d !== "" && d !== "/"; d = dirname(d)) {
      try {
        await rmdir(join(this.o.root, d));
      } catch {
        return;
      }
    }
  }
}
