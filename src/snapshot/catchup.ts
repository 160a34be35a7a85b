/**
 * Replays every origin's segments after each stream's cursors (set from a
 * snapshot's vector), optionally only records up to a clock, with progress;
 * then writes the folder's files. Uses the streams' own pull, so replay here is
 * exactly the agent's replay (verification, gaps, merge, parking).
 */
import { countAfter } from "./count.js";
import type { ObjectStore } from "../store/store.js";
import type { Progress } from "../stream/progress.js";

/** What DbSync and FolderSync offer for replay. */
export interface Pullable {
  readonly stream: string;
  pull(origin: string, maxSegments?: number, untilHlc?: number): Promise<number>;
  cursors(): Map<string, { seq: number }>;
  readonly problems: ReadonlyMap<string, { message: string }>;
  /** A database repairs references only once each of these origins is applied (DbSync.expectOrigins). */
  expectOrigins?(origins: readonly string[]): void;
}

export interface CatchUpResult {
  segments: number;
  records: number;
  /** Streams that stopped before the end of an origin's log, with why. */
  problems: string[];
}

/** Replays `origins` into `streams` until each stops moving; counts segments for the progress. */
export async function catchUp(store: ObjectStore, streams: Pullable[], origins: string[], progress: Progress, untilHlc = Infinity): Promise<CatchUpResult> {
  let total = 0;
  for (const s of streams) for (const o of origins) total += await countAfter(store, o, s.stream, s.cursors().get(o)?.seq ?? 0);
  progress.grow(total);
  const out: CatchUpResult = { segments: 0, records: 0, problems: [] };
  for (const s of streams) {
    s.expectOrigins?.(origins);
    for (const o of origins) {
      for (;;) {
        const before = s.cursors().get(o)?.seq ?? 0;
        out.records += await s.pull(o, 16, untilHlc);
        const moved = (s.cursors().get(o)?.seq ?? 0) - before;
        if (moved <= 0) break;
        out.segments += moved;
        progress.add(moved);
      }
      const p = s.problems.get(o);
      if (p) out.problems.push(`${s.stream} from ${o}: ${p.message}`);
    }
  }
  progress.finish();
  return out;
}

/** What FolderSync offers for writing the files a replay decided. */
export interface Materializing {
  scanOnce(): Promise<number>;
  readonly state: { pendingCount(): number };
}

/** Writes every pending file (each scan pass writes a bounded batch); returns how many are still pending. */
export async function writeFiles(files: Materializing, progress: Progress): Promise<number> {
  let left = files.state.pendingCount();
  progress.grow(left);
  for (;;) {
    await files.scanOnce();
    const now = files.state.pendingCount();
    if (now >= left) break; // no progress: missing blobs or refused paths, reported by the folder sync
    progress.add(left - now);
    left = now;
    if (left === 0) break;
  }
  progress.finish();
  return left;
}
