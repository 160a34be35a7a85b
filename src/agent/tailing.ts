/**
 * What the pull loop reads each round, so that its store requests do not grow
 * with the cluster: one LIST of the cluster index (log/index.ts) tells which
 * origin's stream has new segments, and those are fetched by key. A stream is
 * listed only
 *  - in the first round (segments from before the index window),
 *  - while a database enrols (it must read each origin to the end),
 *  - when the index names a later segment but not the next one for `gapGraceMs`
 *    (a lost or late pointer, or parallel uploads landing out of order),
 *  - and as gap repair: one stream of one origin every `repairEveryMs`, in turn,
 *    so a lost pointer of an origin's last segment is found within
 *    pairs x repairEveryMs whatever else happens.
 */
import type { KnownSegments, SegmentIndex } from "../log/index.js";

export interface TailSettings {
  repairEveryMs: number;
  gapGraceMs: number;
}

/** One pull to make: `known` set means fetch by the index's keys, unset means list the stream. */
export interface PlannedPull {
  stream: string;
  origin: string;
  known?: KnownSegments;
}

export interface StreamCursors {
  stream: string;
  cursor(origin: string): number;
  /** Read every origin by listing (an enrolling database must know it reached the end). */
  listAll: boolean;
}

export class TailPlanner {
  private firstRound = true;
  private rota = 0;
  private lastRepairMs = 0;
  /** When the index first named a later segment of a stream but not its next one. */
  private readonly gapSince = new Map<string, number>();
  /** Store LISTs asked for by this planner, by why (status and benchmarks). */
  readonly listings = { first: 0, enrolling: 0, gap: 0, repair: 0 };

  constructor(
    private readonly index: SegmentIndex,
    private readonly settings: TailSettings,
  ) {}

  plan(streams: StreamCursors[], origins: readonly string[], now = Date.now()): PlannedPull[] {
    const out: PlannedPull[] = [];
    const pairs = streams.length * origins.length;
    let repair = -1;
    if (!this.firstRound && pairs > 0 && now - this.lastRepairMs >= this.settings.repairEveryMs) {
      repair = this.rota++ % pairs;
      this.lastRepairMs = now;
    }
    let i = 0;
    for (const s of streams) {
      for (const origin of origins) {
        const pair = i++;
        const id = `${origin}\n${s.stream}`;
        const cursor = s.cursor(origin);
        const known = this.index.segments(origin, s.stream);
        if (this.firstRound || s.listAll) {
          this.listings[this.firstRound ? "first" : "enrolling"]++;
          out.push({ stream: s.stream, origin });
        } else if (known.has(cursor + 1)) {
          this.gapSince.delete(id);
          out.push({ stream: s.stream, origin, known });
        } else if (this.index.head(origin, s.stream) > cursor) {
          const since = this.gapSince.get(id) ?? now;
          if (now - since >= this.settings.gapGraceMs) {
            this.listings.gap++;
            this.gapSince.set(id, now); // at most one listing per grace period while the gap lasts
            out.push({ stream: s.stream, origin });
          } else this.gapSince.set(id, since);
        } else if (pair === repair) {
          this.listings.repair++;
          out.push({ stream: s.stream, origin });
        }
      }
    }
    return out;
  }

  /** The first round's listings all went through: from now on the index leads. */
  firstRoundDone(): void {
    if (!this.firstRound) return;
    this.firstRound = false;
    this.lastRepairMs = Date.now();
  }
}
