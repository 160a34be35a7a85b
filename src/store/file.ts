/**
 * ObjectStore over a local (or shared, e.g. NFS) directory. Key segments map to
 * directories; writes go to a `.tmp-*` sibling and are renamed into place so
 * readers never see a partial object, even from another host.
 */
import { randomBytes } from "node:crypto";
import type { Dirent } from "node:fs";
import { link, mkdir, open, readdir, readFile, rename, rmdir, stat, unlink } from "node:fs/promises";
import path from "node:path";
import type { Readable } from "node:stream";
import {
  RequestCounts,
  StoreConfigError,
  StoreUnavailableError,
  type ListOptions,
  type PutIfAbsentResult,
  type ListPage,
  type ObjectInfo,
  type ObjectStore,
} from "./store.js";

/** Names with this prefix are in-flight writes; they are never objects. */
const TMP_PREFIX = ".tmp-";
const DEFAULT_LIMIT = 1000;

/** Unique among processes (random per process) and within one (a counter), without a random draw per put. */
const TMP_ID = randomBytes(6).toString("hex");
let tmpCounter = 0;
const tempName = () => `${TMP_PREFIX}${TMP_ID}-${(tmpCounter++).toString(36)}`;

/**
 * Bytewise (UTF-8) order of two strings. JS `<` compares UTF-16 code units, which
 * disagrees with UTF-8 only for astral characters versus U+E000..U+FFFF, so map
 * the code units into code point order before comparing.
 */
export function compareKeys(a: string, b: string): number {
  if (a === b) return 0;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    let x = a.charCodeAt(i);
    let y = b.charCodeAt(i);
    if (x === y) continue;
    if (x >= 0xd800 && y >= 0xd800) {
      x = x >= 0xe000 ? x - 0x800 : x + 0x2000;
      y = y >= 0xe000 ? y - 0x800 : y + 0x2000;
    }
    return x - y;
  }
  return a.length - b.length;
}

/** Throws unless `key` is a relative '/'-separated key that is safe as a file path. */
export function validateKey(key: string): void {
  const bad = (why: string): never => {
    throw new Error(`invalid object key ${JSON.stringify(key)}: ${why}`);
  };
  if (typeof key !== "string" || key === "") bad("key is empty");
  if (key.includes("\0")) bad("contains a NUL character");
  if (key.includes("\\")) bad("contains a backslash");
  if (key.startsWith("/")) bad("must not be absolute (starts with '/')");
  for (const segment of key.split("/")) {
    if (segment === "") bad("contains an empty segment ('//' or trailing '/')");
    if (segment === "." || segment === "..") bad(`contains a '${segment}' segment`);
    if (segment.startsWith(TMP_PREFIX)) bad(`segments starting with '${TMP_PREFIX}' are reserved`);
  }
}

type Entry = { kind: "object"; key: string } | { kind: "prefix"; prefix: string };

function entryName(e: Entry): string {
  return e.kind === "object" ? e.key : e.prefix;
}

function errCode(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException | null)?.code;
}

/** Transient I/O problems (typical of shared mounts) are worth a retry; permissions are not. */
function mapFsError(err: unknown, what: string): unknown {
  const code = errCode(err);
  if (code === undefined) return err;
  if (["EACCES", "EPERM", "EROFS"].includes(code)) {
    return new StoreConfigError(`file store: ${what}: permission denied (${code})`, { cause: err });
  }
  if (["EIO", "ENOSPC", "ESTALE", "ETIMEDOUT", "EAGAIN", "EMFILE", "ENFILE", "EBUSY"].includes(code)) {
    return new StoreUnavailableError(`file store: ${what}: ${code}`, { cause: err });
  }
  return err;
}

export class FileStore implements ObjectStore {
  readonly root: string;
  readonly description: string;
  readonly requests = new RequestCounts();

  constructor(root: string) {
    this.root = path.resolve(root);
    this.description = `file://${this.root}`;
  }

  private pathOf(key: string): string {
    validateKey(key);
    return path.join(this.root, ...key.split("/"));
  }

  async put(key: string, body: Buffer | Readable, size?: number): Promise<void> {
    this.requests.count("PUT");
    const file = this.pathOf(key);
    const dir = path.dirname(file);
    const tmp = await this.writeTemp(dir, key, body, size);
    try {
      await this.moveIntoPlace(tmp, file, key);
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw mapFsError(err, `put ${key}`);
    }
  }

  /**
   * Writes `body` into folder `dir` of the store and names it only once it has
   * ended and is durable: `keyFor()` then gives its key (inside `dir`), or null
   * to drop it. A rename costs nothing here, so a caller can name an object
   * after the hash of its content while reading that content only once.
   */
  async putThenName(dir: string, body: Readable, keyFor: () => Promise<string | null>): Promise<string | null> {
    this.requests.count("PUT");
    const folder = this.pathOf(dir);
    const tmp = await this.writeTemp(folder, `${dir}/(unnamed)`, body);
    try {
      const key = await keyFor();
      if (key === null) return null;
      const file = this.pathOf(key);
      if (path.dirname(file) !== folder) throw new Error(`putThenName: key ${key} is not in ${dir}/`);
      await this.moveIntoPlace(tmp, file, key);
      return key;
    } catch (err) {
      throw mapFsError(err, `put into ${dir}/`);
    } finally {
      await unlink(tmp).catch(() => undefined);
    }
  }

  /**
   * A hard link never replaces an existing name, so it is the directory's
   * If-None-Match. Filesystems without hard links (some network mounts) fall
   * back to check-then-rename, which two hosts can race.
   */
  async putIfAbsent(key: string, body: Buffer): Promise<PutIfAbsentResult> {
    this.requests.count("PUT");
    const file = this.pathOf(key);
    const tmp = await this.writeTemp(path.dirname(file), key, body);
    try {
      await link(tmp, file);
      await fsyncDir(path.dirname(file));
      return "created";
    } catch (err) {
      if (errCode(err) === "EEXIST") return "exists";
      if (!["EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS"].includes(errCode(err) ?? "")) throw mapFsError(err, `put ${key}`);
      if (await this.head(key)) return "exists";
      await this.moveIntoPlace(tmp, file, key);
      return "created";
    } finally {
      await unlink(tmp).catch(() => undefined);
    }
  }

  /** Streams `body` into a new temp file in `dir` and fsyncs it; returns its path. */
  private async writeTemp(dir: string, key: string, body: Buffer | Readable, size?: number): Promise<string> {
    const tmp = path.join(dir, tempName());
    try {
      const fh = await this.createTemp(dir, tmp, key);
      let written = 0;
      try {
        const chunks: AsyncIterable<Buffer | string> | Buffer[] = Buffer.isBuffer(body) ? [body] : body;
        for await (const chunk of chunks) {
          const buf = typeof chunk === "string" ? Buffer.from(chunk) : chunk;
          for (let off = 0; off < buf.length; ) {
            const { bytesWritten } = await fh.write(buf, off, buf.length - off);
            off += bytesWritten;
          }
          written += buf.length;
        }
        if (size !== undefined && size !== written) {
          throw new Error(`put ${key}: expected ${size} bytes but the body had ${written}`);
        }
        await fh.sync();
      } finally {
        await fh.close();
      }
      return tmp;
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw mapFsError(err, `put ${key}`);
    }
  }

  /** Moves a durable temp file to its key's name and makes the rename durable. */
  private async moveIntoPlace(tmp: string, file: string, key: string): Promise<void> {
    await rename(tmp, file).catch((err: unknown) => {
      if (errCode(err) === "EISDIR" || errCode(err) === "ENOTEMPTY" || errCode(err) === "EEXIST") {
        throw new Error(`put ${key}: a directory of other keys already exists at ${file}`, { cause: err });
      }
      throw err;
    });
    await fsyncDir(path.dirname(file));
  }

  /** Opens the temp file, first making its parent directories (fsyncing any it created) when they are missing. */
  private async createTemp(dir: string, tmp: string, key: string) {
    // A concurrent delete may remove a directory we just made while tidying; retry.
    for (let attempt = 0; ; attempt++) {
      try {
        return await open(tmp, "wx");
      } catch (err) {
        if (errCode(err) === "ENOTDIR") throw new Error(`put ${key}: a parent segment of the key is an existing object`, { cause: err });
        if (errCode(err) !== "ENOENT" || attempt >= 5) throw err;
      }
      let first: string | undefined;
      try {
        first = await mkdir(dir, { recursive: true });
      } catch (err) {
        if (errCode(err) === "ENOTDIR" || errCode(err) === "EEXIST") {
          throw new Error(`put ${key}: a parent segment of the key is an existing object`, { cause: err });
        }
        throw err;
      }
      if (first !== undefined) {
        // New directory entries are only durable once their parents are fsynced.
        for (let d = dir; ; d = path.dirname(d)) {
          await fsyncDir(path.dirname(d));
          if (d === first || d.length <= this.root.length) break;
        }
      }
    }
  }

  async get(key: string): Promise<Buffer | null> {
    this.requests.count("GET");
    try {
      return await readFile(this.pathOf(key));
    } catch (err) {
      if (isMissing(err)) return null;
      throw mapFsError(err, `get ${key}`);
    }
  }

  async getStream(key: string): Promise<Readable | null> {
    this.requests.count("GET");
    const file = this.pathOf(key);
    try {
      // Open first so a missing key is a null rather than a stream error.
      const fh = await open(file, "r");
      const st = await fh.stat();
      if (!st.isFile()) {
        await fh.close();
        return null;
      }
      return fh.createReadStream();
    } catch (err) {
      if (isMissing(err)) return null;
      throw mapFsError(err, `getStream ${key}`);
    }
  }

  async head(key: string): Promise<ObjectInfo | null> {
    this.requests.count("HEAD");
    try {
      const st = await stat(this.pathOf(key));
      return st.isFile() ? { key, size: st.size } : null;
    } catch (err) {
      if (isMissing(err)) return null;
      throw mapFsError(err, `head ${key}`);
    }
  }

  async delete(key: string): Promise<void> {
    this.requests.count("DELETE");
    const file = this.pathOf(key);
    try {
      await unlink(file);
    } catch (err) {
      if (isMissing(err)) return;
      throw mapFsError(err, `delete ${key}`);
    }
    // Best effort: remove now-empty parents; stops at the first non-empty one.
    for (let dir = path.dirname(file); dir.length > this.root.length && dir.startsWith(this.root); dir = path.dirname(dir)) {
      try {
        await rmdir(dir);
      } catch {
        break;
      }
    }
  }

  async list(prefix: string, options: ListOptions = {}): Promise<ListPage> {
    this.requests.count("LIST");
    const limit = Math.max(1, options.limit ?? DEFAULT_LIMIT);
    const startAfter = options.startAfter ?? "";
    const delimiter = options.delimiter || undefined;
    // Collect one entry past the limit to learn whether another page exists.
    const entries: Entry[] = [];
    try {
      for await (const e of this.entries(prefix, startAfter, delimiter)) {
        entries.push(e);
        if (entries.length > limit) break;
      }
    } catch (err) {
      throw mapFsError(err, `list ${prefix}`);
    }
    const more = entries.length > limit;
    if (more) entries.length = limit;

    const objects: ObjectInfo[] = [];
    const prefixes: string[] = [];
    const stats = await this.sizes(entries.flatMap((e) => (e.kind === "object" ? [e.key] : [])));
    for (const e of entries) {
      if (e.kind === "prefix") prefixes.push(e.prefix);
      else {
        const st = stats.get(e.key);
        // Deleted between readdir and stat: simply absent from this page.
        if (st !== undefined) objects.push({ key: e.key, size: st.size, modifiedMs: st.mtimeMs });
      }
    }
    const page: ListPage = { objects, prefixes };
    if (more) page.next = entryName(entries[entries.length - 1]!);
    return page;
  }

  private async sizes(keys: string[]): Promise<Map<string, { size: number; mtimeMs: number }>> {
    const out = new Map<string, { size: number; mtimeMs: number }>();
    const batch = 64; // bounded parallelism helps on network mounts
    for (let i = 0; i < keys.length; i += batch) {
      await Promise.all(
        keys.slice(i, i + batch).map(async (key) => {
          try {
            const st = await stat(path.join(this.root, ...key.split("/")));
            if (st.isFile()) out.set(key, { size: st.size, mtimeMs: st.mtimeMs });
          } catch (err) {
            if (!isMissing(err)) throw mapFsError(err, `list (stat ${key})`);
          }
        }),
      );
    }
    return out;
  }

  /**
   * The listing as one ascending stream of objects and rolled-up prefixes. A
   * prefix is an entry at its own position in the order (so `next` may be a
   * prefix and the following page resumes after every key under it).
   */
  private async *entries(prefix: string, startAfter: string, delimiter: string | undefined): AsyncGenerator<Entry> {
    const cut = prefix.lastIndexOf("/") + 1;
    const dirPart = prefix.slice(0, cut);
    const namePrefix = prefix.slice(cut);
    // No valid key lies under a prefix like "../" or "a//", and walking it could leave the root.
    if (dirPart !== "") {
      try {
        validateKey(dirPart.slice(0, -1));
      } catch {
        return;
      }
    }
    // Only '/' can be rolled up by not descending; other delimiters roll up the key stream.
    const keys = this.walk(dirPart, namePrefix, startAfter, delimiter === "/");
    if (delimiter === undefined || delimiter === "/") {
      yield* keys;
      return;
    }
    let last: string | undefined;
    for await (const e of keys) {
      if (e.kind !== "object") continue;
      const i = e.key.indexOf(delimiter, prefix.length);
      if (i < 0) {
        yield e;
        continue;
      }
      const rolled = e.key.slice(0, i + delimiter.length);
      if (rolled === last) continue;
      last = rolled;
      if (compareKeys(rolled, startAfter) > 0) yield { kind: "prefix", prefix: rolled };
    }
  }

  /**
   * Keys under directory `rel` (ending in '/' or empty) in bytewise order, only
   * visiting names starting with `namePrefix` and skipping subtrees wholly at or
   * before `startAfter`. With `rollUp`, directories are returned as prefixes
   * instead of being entered.
   */
  private async *walk(rel: string, namePrefix: string, startAfter: string, rollUp: boolean): AsyncGenerator<Entry> {
    let dirents: Dirent[];
    try {
      dirents = await readdir(path.join(this.root, ...rel.split("/")), { withFileTypes: true });
    } catch (err) {
      if (isMissing(err)) return;
      throw err;
    }
    // Sort directories as "name/" so each subtree lands where its keys belong.
    const items: { sortKey: string; dir: boolean }[] = [];
    for (const d of dirents) {
      if (!d.name.startsWith(namePrefix) || d.name.startsWith(TMP_PREFIX) || d.name.includes("\\")) continue;
      if (d.isDirectory()) items.push({ sortKey: `${rel}${d.name}/`, dir: true });
      else if (d.isFile()) items.push({ sortKey: `${rel}${d.name}`, dir: false });
    }
    items.sort((a, b) => compareKeys(a.sortKey, b.sortKey));

    for (const { sortKey, dir } of items) {
      if (!dir) {
        if (compareKeys(sortKey, startAfter) > 0) yield { kind: "object", key: sortKey };
      } else if (rollUp) {
        if (compareKeys(sortKey, startAfter) > 0 && (await this.hasObjects(sortKey))) {
          yield { kind: "prefix", prefix: sortKey };
        }
      } else if (compareKeys(sortKey, startAfter) > 0 || startAfter.startsWith(sortKey)) {
        yield* this.walk(sortKey, "", startAfter, false);
      }
    }
  }

  /** Whether a directory holds any object (stale empty directories are not prefixes). */
  private async hasObjects(rel: string): Promise<boolean> {
    let dirents: Dirent[];
    try {
      dirents = await readdir(path.join(this.root, ...rel.split("/")), { withFileTypes: true });
    } catch (err) {
      if (isMissing(err)) return false;
      throw err;
    }
    if (dirents.some((d) => d.isFile() && !d.name.startsWith(TMP_PREFIX))) return true;
    for (const d of dirents) {
      if (d.isDirectory() && !d.name.startsWith(TMP_PREFIX) && (await this.hasObjects(`${rel}${d.name}/`))) return true;
    }
    return false;
  }
}

function isMissing(err: unknown): boolean {
  const code = errCode(err);
  // ENOTDIR: a parent segment is a file; EISDIR: the key names a directory of other keys.
  return code === "ENOENT" || code === "ENOTDIR" || code === "EISDIR";
}

/** Per directory: the fsync running now, and the one queued to start after it. */
const dirSyncs = new Map<string, { running: Promise<void>; next: Promise<void> | null }>();

function startDirSync(dir: string): Promise<void> {
  const entry = { running: syncDirNow(dir), next: null as Promise<void> | null };
  dirSyncs.set(dir, entry);
  const done = () => {
    if (dirSyncs.get(dir) === entry && entry.next === null) dirSyncs.delete(dir);
  };
  entry.running.then(done, done);
  return entry.running;
}

/**
 * Makes a rename or new entry in `dir` durable; some filesystems cannot fsync
 * directories. Calls for one directory share fsyncs: a caller joins the next
 * fsync to start (one already running may have begun before its entry was
 * made), so many concurrent renames into one folder cost two fsyncs, not one each.
 */
export function fsyncDir(dir: string): Promise<void> {
  const cur = dirSyncs.get(dir);
  if (!cur) return startDirSync(dir);
  cur.next ??= cur.running.catch(() => undefined).then(() => startDirSync(dir));
  return cur.next;
}

async function syncDirNow(dir: string): Promise<void> {
  let fh;
  try {
    fh = await open(dir, "r");
    await fh.sync();
  } catch (err) {
    if (!["EINVAL", "ENOTSUP", "EISDIR", "EBADF", "EPERM"].includes(errCode(err) ?? "")) throw err;
  } finally {
    await fh?.close();
  }
}
