/**
 * Makes this node's disk match the winner of a path (see capture/filestate.ts).
 *
 * Safety first: the path was already checked as a string (ignore.ts:
 * unsafePathReason + exclusions) before its record was accepted; here every
 * parent folder is checked on disk to be a real folder (never a symlink) inside
 * the instance folder, created one level at a time. Content is fetched into a
 * temp file beside the target, verified by sha256 and size while streaming,
 * fsynced, given its mode and mtime, and renamed into place; then the folder is
 * fsynced. A blob that fails verification, or that turns out to be an SQLite
 * database, is never renamed into place.
 *
 * Before touching a path, its disk entry is looked at again: a local edit that
 * the scanner has not captured yet is captured first (so it is merged, not
 * overwritten), and a file still being written is left for later.
 */
import { fsyncDir } from "../store/file.js";
import { randomBytes } from "node:crypto";
import { lstat, mkdir, open, readdir, realpath, rename, rmdir, symlink, unlink, utimes, chmod } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import type { Logger } from "pino";
import { isInside, type FolderScanner, type Observation } from "../capture/folder.js";
import { KIND_DELETE, KIND_SYMLINK, KIND_WRITE, type FileStateStore, type StateEntry } from "../capture/filestate.js";
import { STATE_DIR, TEMP_PREFIX, unsafePathReason } from "../capture/ignore.js";
import { BlobIntegrityError, BlobMissingError, fetchBlobToFile } from "../log/blobs.js";
import type { FileChange } from "../log/segment.js";
import type { ObjectStore } from "../store/store.js";

const SQLITE_HEADER = Buffer.from("SQLite format 3\0", "latin1");

/** A path that must not be written (it would leave the folder, or is not ours to write). */
export class UnsafePathError extends Error {
  override name = "UnsafePathError";
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
      if ((err as NodeJS.ErrnoException).code !== "ENOENT" || !create) throw new UnsafePathError(`${rel}: parent ${dir} is missing`);
      try {
        await mkdir(dir, { mode: 0o755 });
        await fsyncDir(dirname(dir));
      } catch (e) {
        // Another write into the same new folder made it first: check what is there now.
        if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
      }
      st = await lstat(dir);
    }
    if (st.isSymbolicLink()) throw new UnsafePathError(`${rel}: parent ${dir} is a symlink (never followed)`);
    if (!st.isDirectory()) throw new UnsafePathError(`${rel}: parent ${dir} is not a folder`);
  }
  const realRoot = await realpath(root);
  const realDir = await realpath(dir);
  if (!isInside(realRoot, realDir)) throw new UnsafePathError(`${rel}: resolves outside the instance folder`);
  return dir;
}

/** On a case-insensitive file system, another name of the same letters would be overwritten: refuse. */
async function caseClash(dir: string, name: string): Promise<string | null> {
  try {
    await lstat(join(dir, name));
  } catch {
    return null; // nothing there under any case
  }
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
}

export type Outcome = "done" | "later";

export class Materializer {
  constructor(private readonly o: MaterializerOptions) {}

  private problem(rel: string, why: string, transient = false): Outcome {
    const s = this.o.state.state(rel);
    if (s?.problem !== why) {
      if (transient) this.o.log.info({ path: rel, problem: why }, "file waits");
      else this.o.log.error({ path: rel, problem: why }, "file not applied");
    }
    this.o.state.setPending(rel, true, why);
    return "later";
  }

  /** Brings `rel` on disk to its winner; "later" when it must wait (unstable, blob missing, refused). */
  async materialize(rel: string): Promise<Outcome> {
    const { state } = this.o;
    for (let round = 0; round < 4; round++) {
      const s = state.state(rel);
      if (!s || !s.pending) return "done";
      const unsafe = unsafePathReason(rel);
      if (unsafe) return this.problem(rel, `unsafe path: ${unsafe}`);
      let o: Observation;
      try {
        o = await this.o.scanner.observePath(rel);
      } catch (err) {
        if (err instanceof UnsafePathError) return this.problem(rel, err.message);
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
      return await this.apply(s);
    }
    return "later";
  }

  private async apply(s: StateEntry): Promise<Outcome> {
    const rel = s.path;
    const abs = join(this.o.root, rel);
    let parent: string;
    try {
      parent = await safeParent(this.o.root, rel, s.kind !== KIND_DELETE);
    } catch (err) {
      if (err instanceof UnsafePathError) {
        if (s.kind === KIND_DELETE && /is missing/.test(err.message)) {
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
    const before = await lstat(abs).catch(() => null);
    if (before?.isDirectory()) return this.problem(rel, "a folder is in the way");

    if (s.kind === KIND_DELETE) {
      if (before) {
        await unlink(abs);
        await fsyncDir(parent);
        await this.pruneEmptyDirs(dirname(rel));
      }
      this.o.tx(() => {
        this.o.state.dropIndex(rel);
        this.o.state.setPending(rel, false);
      });
      return "done";
    }

    const clash = await caseClash(parent, basename(abs));
    if (clash) return this.problem(rel, clash);
    const tmp = join(parent, `${TEMP_PREFIX}${randomBytes(6).toString("hex")}`);
    try {
      if (s.kind === KIND_SYMLINK) {
        const bad = unsafeLinkReason(rel, s.link);
        if (bad) return this.problem(rel, bad);
        await symlink(s.link, tmp);
      } else {
        try {
          await fetchBlobToFile(this.o.store, s.sha256, s.size, tmp);
        } catch (err) {
          if (err instanceof BlobIntegrityError) return this.problem(rel, err.message, err instanceof BlobMissingError);
          throw err;
        }
        const fh = await open(tmp, "r+");
        try {
          const head = Buffer.alloc(16);
          const { bytesRead } = await fh.read(head, 0, 16, 0);
          if (bytesRead === 16 && head.equals(SQLITE_HEADER)) return this.problem(rel, "content is an SQLite database: never written as a file");
          await fh.sync();
        } finally {
          await fh.close();
        }
        await chmod(tmp, (s.mode & 0o777) || 0o644);
        const t = s.mtimeMs / 1000;
        await utimes(tmp, t, t);
      }
      // The target must not have changed since it was looked at.
      const now = await lstat(abs).catch(() => null);
      if ((before === null) !== (now === null) || (before && now && (before.ino !== now.ino || before.mtimeMs !== now.mtimeMs || before.size !== now.size))) {
        return "later";
      }
      const st = await lstat(tmp);
      await rename(tmp, abs);
      await fsyncDir(parent);
      this.o.tx(() => {
        this.o.state.setIndex({
          path: rel,
          size: s.kind === KIND_SYMLINK ? 0 : st.size,
          mtimeMs: st.mtimeMs,
          ino: st.ino,
          mode: s.kind === KIND_SYMLINK ? 0 : st.mode & 0o777,
          sha256: s.kind === KIND_SYMLINK ? "" : s.sha256,
          link: s.kind === KIND_SYMLINK ? s.link : "",
          hlc: s.hlc,
          origin: s.origin,
        });
        this.o.state.setPending(rel, false);
      });
      return "done";
    } finally {
      await unlink(tmp).catch(() => undefined);
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
