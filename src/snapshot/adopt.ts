/**
 * A database the cluster syncs but this node lacks, brought in while the agent
 * runs. The start-up bootstrap (bootstrap.ts) runs only on an empty node and
 * only if a snapshot exists then; a node that started before any snapshot, or
 * with files of its own in the folder, would otherwise never get the app's
 * databases until the app created them. Here the copy from the newest snapshot
 * that holds such a database is put in place, and the agent opens it like any
 * new database: it replays every origin's log after the copy's vector before
 * enrolling anything.
 *
 * Only where nothing can be lost or brought back by surprise:
 * - the file is missing here, and it is placed with link(), which never
 *   replaces a file the app created in the meantime;
 * - this node's own log holds nothing of it: a database this node once had and
 *   lost (or that was deleted on purpose) is left for the operator.
 */
import { existsSync, linkSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import type { Logger } from "pino";
import { STATE_DIR } from "../capture/ignore.js";
import { logHead } from "../log/keys.js";
import type { ObjectStore } from "../store/store.js";
import { CorruptSnapshotError, listSnapshots, readManifest, type Manifest, type SnapshotRef } from "./format.js";
import { stageSnapshot } from "./stage.js";

export interface AdoptSettings {
  instanceDir: string;
  node: string;
  store: ObjectStore;
  log: Logger;
}

export interface AdoptResult {
  placed: { stream: string; snapshot: string }[];
  /** Databases not placed, and why; `routine` when nothing needs doing (the app created the file meanwhile). */
  declined: { stream: string; why: string; routine?: boolean }[];
}

/** How many snapshots, newest first, are read looking for a database this node lacks. */
const MANIFESTS_READ = 10;
/** Every look costs a LIST of the snapshots: one soon after start, then this often... */
const LOOK_EVERY_MS = 300_000;
/** ...and sooner while the index names a database this node lacks: 10 s, doubling up to LOOK_EVERY_MS. */
const FIRST_RETRY_MS = 10_000;

export class DatabaseAdopter {
  /** Manifests never change under their key; null: unusable (an older snapshot is used). */
  private readonly manifests = new Map<string, Manifest | null>();
  private lastLookMs = 0;
  private retryMs = FIRST_RETRY_MS;

  constructor(private readonly s: AdoptSettings) {}

  /** Whether to look now; `hinted`: other nodes write a database this node lacks. */
  due(hinted: boolean, now = Date.now()): boolean {
    const since = now - this.lastLookMs;
    return since >= LOOK_EVERY_MS || (hinted && since >= this.retryMs);
  }

  /**
   * Places every database the newest snapshots hold that `lacks(stream)` says
   * this node would sync and does not have.
   */
  async adopt(lacks: (stream: string) => boolean): Promise<AdoptResult> {
    this.lastLookMs = Date.now();
    this.retryMs = Math.min(2 * this.retryMs, LOOK_EVERY_MS);
    const result: AdoptResult = { placed: [], declined: [] };
    const newestHolding = new Map<string, SnapshotRef>();
    for (const ref of (await listSnapshots(this.s.store)).slice(0, MANIFESTS_READ)) {
      for (const d of (await this.manifest(ref))?.databases ?? []) {
        if (!newestHolding.has(d.stream) && lacks(d.stream)) newestHolding.set(d.stream, ref);
      }
    }
    const bySnapshot = new Map<SnapshotRef, Set<string>>();
    for (const [stream, ref] of newestHolding) {
      const own = await logHead(this.s.store, this.s.node, stream);
      if (own > 0) {
        result.declined.push({ stream, why: `this node's own log already holds ${own} segment(s) of it: it had this database and lost it, or it was deleted on purpose` });
        continue;
      }
      bySnapshot.set(ref, (bySnapshot.get(ref) ?? new Set()).add(stream));
    }
    const dir = join(this.s.instanceDir, STATE_DIR, "adopt");
    for (const [ref, streams] of bySnapshot) {
      try {
        const staged = await stageSnapshot(this.s.store, ref, dir, streams);
        for (const d of staged.dbs) {
          const why = placeIfMissing(d.path, join(this.s.instanceDir, d.stream));
          if (why) result.declined.push({ stream: d.stream, why, routine: why === APP_CREATED });
          else result.placed.push({ stream: d.stream, snapshot: ref.key });
        }
      } catch (err) {
        if (!(err instanceof CorruptSnapshotError)) throw err;
        this.manifests.set(ref.key, null);
        this.s.log.error({ snapshot: ref.key, problem: err.message }, "snapshot unusable; the next look uses an older one");
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
    if (result.placed.length > 0) this.retryMs = FIRST_RETRY_MS;
    return result;
  }

  private async manifest(ref: SnapshotRef): Promise<Manifest | null> {
    if (!this.manifests.has(ref.key)) {
      const m = await readManifest(this.s.store, ref).catch((err: Error) => {
        if (!(err instanceof CorruptSnapshotError)) throw err;
        this.s.log.error({ snapshot: ref.key, problem: err.message }, "snapshot unusable; an older one is used");
        return null;
      });
      this.manifests.set(ref.key, m);
    }
    return this.manifests.get(ref.key) ?? null;
  }
}

const APP_CREATED = "the app created it meanwhile (it syncs as a database the app made)";

/**
 * Links a staged copy in at `target` unless a file is there (the app created it
 * meanwhile: it is enrolled as a new database instead). Returns why it was not
 * placed, or null.
 */
function placeIfMissing(staged: string, target: string): string | null {
  mkdirSync(dirname(target), { recursive: true });
  if (existsSync(target)) return APP_CREATED;
  // A companion file without its database would be read as part of the copy; it may
  // also be the app's, an instant after it created the file: never deleted here.
  const left = ["-wal", "-journal"].find((c) => existsSync(target + c));
  if (left) return `${target}${left} is there without its database: remove it if nothing uses it`;
  try {
    linkSync(staged, target);
    return null;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") return APP_CREATED;
    throw err;
  }
}
