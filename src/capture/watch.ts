/**
 * Change notification for the instance folder: one fs.watch (inotify) per
 * folder, reporting the path of whatever changed in it. It only says where to
 * look; the scanner looks (lstat) and decides. Nothing here opens a file.
 *
 * Why not chokidar: on every event in a folder it re-lists the folder and
 * stats every entry, and it watches each file on its own. Replay writing 100
 * files into a folder cost 100 x 100 stats, and folders made during its first
 * crawl could go unwatched. Measured with the same interface on chokidar
 * (watch-chokidar.ts): 585 vs 1,110 files/s, 14.6 vs 5.4 s of receiver CPU for
 * 10,000 small files (README, "Choices, measured").
 *
 * A folder is watched before it is listed (FolderScanner.walk calls `add`
 * first), so a file made in it meanwhile is either listed or reported. Events
 * can still be lost (inotify queue overflow, watch limits, network mounts):
 * errors are reported, and the periodic full scan covers them.
 */
import { watch, type FSWatcher } from "node:fs";
import { join } from "node:path";

/** What FolderSync needs of a watcher (this one, or capture/watch-chokidar.ts). */
export interface PathWatcher {
  /** Whether folder `rel` is watched. */
  has(rel: string): boolean;
  /** Watch folder `rel` (called by the walk before it lists the folder; "" first). */
  add(rel: string): void;
  remove(rel: string): void;
  /** After a full walk: forget folders that are no longer there. */
  keepOnly(dirs: ReadonlySet<string>): void;
  close(): void;
}

export class FolderWatcher implements PathWatcher {
  /** Watched folders by path relative to the root ("" is the root). */
  private readonly watchers = new Map<string, FSWatcher>();
  private closed = false;

  constructor(
    private readonly root: string,
    /** A path (relative, '/'-separated) where something changed; null: unknown, look everywhere. */
    private readonly onChange: (rel: string | null) => void,
    private readonly onError: (err: Error) => void,
  ) {}

  has(rel: string): boolean {
    return this.watchers.has(rel);
  }

  /** Starts watching folder `rel` (once). */
  add(rel: string): void {
    if (this.closed || this.watchers.has(rel)) return;
    try {
      const w = watch(rel ? join(this.root, rel) : this.root, { persistent: false }, (_event, name) => {
        if (name === null) this.onChange(null);
        else this.onChange(rel ? `${rel}/${name}` : name);
      });
      w.on("error", (err) => {
        this.remove(rel);
        this.onError(err);
      });
      this.watchers.set(rel, w);
    } catch (err) {
      // Vanished meanwhile (the next look finds out), or out of inotify watches.
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") this.onError(err as Error);
    }
  }

  remove(rel: string): void {
    this.watchers.get(rel)?.close();
    this.watchers.delete(rel);
  }

  /** After a full walk: stop watching folders that are no longer there (the walk added the others). */
  keepOnly(dirs: ReadonlySet<string>): void {
    for (const rel of [...this.watchers.keys()]) if (rel !== "" && !dirs.has(rel)) this.remove(rel);
  }

  close(): void {
    this.closed = true;
    for (const w of this.watchers.values()) w.close();
    this.watchers.clear();
  }
}
