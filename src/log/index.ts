/**
 * The cluster-wide segment index. Beside each segment its writer puts an empty
 * pointer object whose key sorts by time:
 *   idx/<yyyymmddhh>/<ms:13>,<origin>,<stream>,<seq:20>,<sha256>
 * so one paged LIST after the last time a reader has seen tells it every new
 * segment of every origin and stream: tailing costs one LIST per poll however
 * many nodes and databases the cluster has. (',' never occurs in an encoded name.)
 * A writer uploads segments in batches and puts one pointer per batch: its key
 * names the batch's last segment, its body the others ("<seq> <sha256>" lines;
 * empty for a batch of one), so busy writers add far fewer than one PUT per
 * segment. A reader GETs a body only for streams it holds.
 *
 * Pointers are hints, never the truth: a reader re-lists a window of `overlapMs`
 * before the newest pointer time it has seen (late writers, clock skew), and the
 * agent still lists each origin's stream now and then (gap repair), so a lost
 * or late pointer delays a segment but never loses it. The segment itself is
 * verified against the hash in its key as always.
 */
import type { ObjectStore } from "../store/store.js";
import { decodeName, encodeName, parseSegmentKey, segmentKey } from "./keys.js";

export const INDEX_PREFIX = "idx/";
const MS_DIGITS = 13;

export interface Pointer {
  /** The writer's time when it published the segment (max of its wall clock and its HLC). */
  ms: number;
  origin: string;
  stream: string;
  seq: number;
  segmentKey: string;
}

/** The hour folder of a time: idx/2026120523/ (so gc can drop old hours by prefix). */
function hourFolder(ms: number): string {
  const d = new Date(ms);
  const p = (n: number, w = 2) => String(n).padStart(w, "0");
  return `${INDEX_PREFIX}${p(d.getUTCFullYear(), 4)}${p(d.getUTCMonth() + 1)}${p(d.getUTCDate())}${p(d.getUTCHours())}/`;
}

/** The listing position just before every pointer of time `ms` or later. */
export function indexFloorKey(ms: number): string {
  const t = Math.max(0, Math.floor(ms));
  return `${hourFolder(t)}${String(t).padStart(MS_DIGITS, "0")}`;
}

export function pointerKey(ms: number, origin: string, stream: string, seq: number, sha256: string): string {
  return `${indexFloorKey(ms)},${encodeName(origin)},${encodeName(stream)},${String(seq).padStart(20, "0")},${sha256}`;
}

const POINTER = /^(\d{13}),([^,/]+),([^,/]+),(\d{20}),([0-9a-f]{64})$/;

/** Null for anything that is not a pointer (junk under idx/ is ignored, never trusted). */
export function parsePointerKey(key: string): Pointer | null {
  const m = POINTER.exec(key.slice(key.lastIndexOf("/") + 1));
  if (!m || !key.startsWith(INDEX_PREFIX)) return null;
  try {
    const origin = decodeName(m[2]!);
    const stream = decodeName(m[3]!);
    const seq = Number(m[4]);
    const key2 = segmentKey(origin, stream, seq, m[5]!);
    return parseSegmentKey(key2) ? { ms: Number(m[1]), origin, stream, seq, segmentKey: key2 } : null;
  } catch {
    return null; // malformed %-escape
  }
}

/** Segments of one origin's stream that pointers named, by seq. */
export type KnownSegments = ReadonlyMap<number, string>;

/** Each poll re-reads this far behind the newest pointer time (writers publishing at nearly the same moment). */
const SHORT_LOOKBACK_MS = 2_000;

/** Above this many pointers of one stream nobody here reads, the oldest are dropped (memory stays bounded). */
const MAX_KNOWN_PER_STREAM = 10_000;

export interface IndexPollResult {
  /** Pointers to segments this reader did not know of yet. */
  fresh: number;
  /** Origins whose pointer times run more than half the overlap away from the store's clock (warned once each). */
  skewed: { origin: string; offsetMs: number }[];
}

/**
 * A reader's view of the index: the segments pointers named, per origin and
 * stream, from `startMs - overlapMs` on (what came before is found by listing
 * each stream once, as the agent does at start).
 */
export class SegmentIndex {
  /** The newest pointer time seen, capped at our own clock so that one far-ahead clock cannot move the window past everyone else. */
  private newestMs: number;
  private lastWindowScanMs = 0;
  private readonly known = new Map<string, Map<number, string>>();
  /** Per origin and stream, the seq through which segments were applied (forget). */
  private readonly applied = new Map<string, number>();
  private readonly warnedSkew = new Set<string>();
  readonly origins = new Set<string>();
  /** Every stream a pointer named, held here or not (a database this node lacks shows up here first). */
  readonly streams = new Set<string>();

  constructor(
    private readonly store: ObjectStore,
    private readonly self: string,
    readonly overlapMs = 30_000,
    startMs = Date.now(),
  ) {
    this.newestMs = startMs;
  }

  /**
   * One paged LIST of what is new: usually the last 2 s before the newest
   * pointer seen, the whole overlap window every third of it (late writers,
   * skewed clocks). `holds`: streams this reader applies; only their pointers
   * count as fresh and only their batch bodies are read.
   */
  async poll(now = Date.now(), holds: (origin: string, stream: string) => boolean = () => true): Promise<IndexPollResult> {
    const whole = now - this.lastWindowScanMs >= this.overlapMs / 3;
    if (whole) this.lastWindowScanMs = now;
    let after: string | undefined = indexFloorKey(this.newestMs - (whole ? this.overlapMs : SHORT_LOOKBACK_MS));
    let fresh = 0;
    const skewed: IndexPollResult["skewed"] = [];
    let newest = this.newestMs;
    for (;;) {
      const page = await this.store.list(INDEX_PREFIX, { startAfter: after, limit: 1000 });
      for (const o of page.objects) {
        const p = parsePointerKey(o.key);
        if (!p || p.origin === this.self) continue;
        // Names starting with '#' are no node's: "#operator" announces a new trust list (src/cli/keys.ts).
        if (!p.origin.startsWith("#")) this.origins.add(p.origin);
        const held = holds(p.origin, p.stream);
        // A pointer seen before (windows overlap) was read then: its body is not fetched again.
        if (this.add(p.origin, p.stream, p.seq, p.segmentKey) && held) {
          fresh++;
          if (o.size > 0) for (const [seq, key] of await this.batchOf(o.key, p)) if (this.add(p.origin, p.stream, seq, key)) fresh++;
        }
        newest = Math.max(newest, Math.min(p.ms, now));
        // The store's clock stamps the pointer; a writer far off it may publish behind the window.
        if (o.modifiedMs !== undefined && Math.abs(p.ms - o.modifiedMs) > this.overlapMs / 2 && !this.warnedSkew.has(p.origin)) {
          this.warnedSkew.add(p.origin);
          skewed.push({ origin: p.origin, offsetMs: Math.round(p.ms - o.modifiedMs) });
        }
      }
      if (!page.next) break;
      after = page.next;
    }
    this.newestMs = newest;
    return { fresh, skewed };
  }

  /** The other segments a batch pointer names (junk lines are ignored: pointers are hints). */
  private async batchOf(pointer: string, p: Pointer): Promise<[number, string][]> {
    const body = await this.store.get(pointer);
    const out: [number, string][] = [];
    for (const line of body?.toString("utf8").split("\n") ?? []) {
      const m = /^(\d{1,20}) ([0-9a-f]{64})$/.exec(line);
      if (m) out.push([Number(m[1]), segmentKey(p.origin, p.stream, Number(m[1]), m[2]!)]);
    }
    return out;
  }

  /** Records a segment key (from a pointer or a listing); false if it was known. */
  add(origin: string, stream: string, seq: number, key: string): boolean {
    this.streams.add(stream);
    const id = `${origin}\n${stream}`;
    // Applied and forgotten: a window scan that sees its pointer again brings nothing new.
    if (seq <= (this.applied.get(id) ?? 0)) return false;
    let m = this.known.get(id);
    if (!m) this.known.set(id, (m = new Map()));
    if (m.has(seq)) return false;
    m.set(seq, key);
    if (m.size > MAX_KNOWN_PER_STREAM) m.delete(Math.min(...m.keys()));
    return true;
  }

  segments(origin: string, stream: string): KnownSegments {
    return this.known.get(`${origin}\n${stream}`) ?? EMPTY;
  }

  /** The highest seq a pointer named (0: none). */
  head(origin: string, stream: string): number {
    let h = 0;
    for (const s of this.segments(origin, stream).keys()) h = Math.max(h, s);
    return h;
  }

  /** Forgets segments at or below `seq` (applied): pointers to them, seen again, are nothing new. */
  forget(origin: string, stream: string, seq: number): void {
    const id = `${origin}\n${stream}`;
    this.applied.set(id, Math.max(seq, this.applied.get(id) ?? 0));
    const m = this.known.get(id);
    if (m) for (const s of m.keys()) if (s <= seq) m.delete(s);
  }

}

const EMPTY: KnownSegments = new Map();

/** Puts the pointer of segments just uploaded: the key names the last, the body the others. */
export async function publishPointer(store: ObjectStore, ms: number, origin: string, stream: string, segments: { seq: number; sha256: string }[]): Promise<void> {
  const sorted = [...segments].sort((a, b) => a.seq - b.seq);
  const last = sorted.pop();
  if (!last) return;
  const body = sorted.map((s) => `${s.seq} ${s.sha256}\n`).join("");
  await store.put(pointerKey(ms, origin, stream, last.seq, last.sha256), Buffer.from(body));
}
