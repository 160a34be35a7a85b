/**
 * The FolderWatcher interface on chokidar (v5), for comparison with the
 * fs.watch watcher (capture/watch.ts); `folderWatcher: "chokidar"` selects it.
 *
 * chokidar watches the whole tree itself: its own crawl at start (ignoreInitial:
 * the scanner's walk reports what is there), then one fs.watch per folder and
 * per file. What it cannot be told not to do: on every event in a folder it
 * re-reads that folder and lstats every entry (readdirp with alwaysStat, at most
 * one re-read in flight per folder, another right after if events came in
 * meanwhile). Events are paths only; the scanner looks and decides, as with
 * the fs.watch watcher. Excluded names are never watched (`ignored`), symlinks
 * never followed, and neither its atomic-write rewriting (it hides `.*.swp`,
 * `~` names and delays unlinks) nor awaitWriteFinish (the scanner has stableMs)
 * is used. A folder made later is watched by chokidar when its parent is
 * re-read; it is also reported, so the scanner walks it. Missed events (a file
 * made between chokidar's read of a new folder and its watch on it) are left to
 * the periodic full scan, as with fs.watch.
 */
import { relative, sep } from "node:path";
import { watch, type FSWatcher } from "chokidar";
import type { PathWatcher } from "./watch.js";

export class ChokidarWatcher implements PathWatcher {
  /** Folders known to be watched (relative; "" is the root): the scanner's walks and chokidar's addDir. */
  private readonly dirs = new Set<string>();
  private w: FSWatcher | null = null;
  private closed = false;

  constructor(
    private readonly root: string,
    private readonly onChange: (rel: string | null) => void,
    private readonly onError: (err: Error) => void,
    /** Why a path is excluded (null: it is not); excluded paths are not watched. */
    private readonly exclusion: (rel: string, isDir: boolean) => string | null,
  ) {}

  private rel(abs: string): string {
    const r = relative(this.root, abs);
    return sep === "/" ? r : r.split(sep).join("/");
  }

  has(rel: string): boolean {
    return this.dirs.has(rel);
  }

  /** The root starts chokidar; other folders chokidar finds itself (this only records them). */
  add(rel: string): void {
    if (this.closed) return;
    this.dirs.add(rel);
    if (rel !== "" || this.w) return;
    this.w = watch(this.root, {
      persistent: false,
      ignoreInitial: true,
      followSymlinks: false,
      atomic: false,
      awaitWriteFinish: false,
      alwaysStat: false,
      usePolling: false,
      ignorePermissionErrors: true,
      ignored: (abs: string, stats?: { isDirectory(): boolean }) => {
        const r = this.rel(abs);
        if (r === "" || r.startsWith("..")) return false;
        // Without stats (chokidar asks before it has looked): excluded only if excluded either way.
        return stats ? this.exclusion(r, stats.isDirectory()) !== null : this.exclusion(r, false) !== null && this.exclusion(r, true) !== null;
      },
    });
    this.w.on("all", (event, abs) => {
      const r = this.rel(abs);
      if (event === "addDir") this.dirs.add(r);
      this.onChange(r);
    });
    this.w.on("error", (err) => this.onError(err instanceof Error ? err : new Error(String(err))));
  }

  remove(rel: string): void {
    this.dirs.delete(rel);
  }

  keepOnly(dirs: ReadonlySet<string>): void {
    for (const rel of [...this.dirs]) if (rel !== "" && !dirs.has(rel)) this.dirs.delete(rel);
  }

  close(): void {
    this.closed = true;
    this.dirs.clear();
    void this.w?.close();
    this.w = null;
  }
}
