/**
 * Follows one origin's stream in the store: lists the segments after a cursor,
 * fetches a bounded number ahead, verifies each against the hash in its key and
 * hands them over strictly in seq order. A missing seq is a gap: the tail stops
 * there and waits, because skipping it would be a silent, permanent loss.
 */
import type { ObjectStore } from "../store/store.js";
import { vaultOf } from "../keys/securestore.js";
import { readGcMarker } from "./collected.js";
import { parseSegmentKey, seqFloorKey, streamPrefix } from "./keys.js";
import type { KnownSegments } from "./index.js";
import { CorruptSegmentError, openSegment, SegmentRefusedError, type Segment } from "./segment.js";

export interface FetchedSegment {
  key: string;
  seq: number;
  segment: Segment;
}

export interface TailProblem {
  /** "collected": the missing segments were deleted by gc; they will never come. "refused": a secured cluster does not accept it. */
  kind: "gap" | "corrupt" | "refused" | "fork" | "collected";
  seq: number;
  key?: string;
  message: string;
}

export interface TailResult {
  /** The segments in seq order, each fetched ahead (bounded) but decoded only when reached. */
  segments: AsyncIterable<FetchedSegment>;
  /** Why the tail stopped before the end of the listing, if it did (final once `segments` is exhausted). */
  problem(): TailProblem | undefined;
}

/** A hole that gc made (its marker covers it): waiting is pointless, the node must start again from a snapshot. */
async function collectedProblem(store: ObjectStore, origin: string, stream: string, seq: number): Promise<TailProblem | null> {
  const m = await readGcMarker(store, origin, stream);
  if (!m || m.collectedThrough < seq) return null;
  return {
    kind: "collected",
    seq,
    message:
      `segments ${seq}..${m.collectedThrough} of origin "${origin}" (${stream}) were deleted by gc on ${new Date(m.atMs).toISOString()}: ` +
      `this node was offline longer than the retention window and cannot catch up from the log. It must start again from a snapshot: ` +
      `the agent does it by itself once none of its own changes waits to upload (what it holds is kept in .unisync/left-behind-<time>/; ` +
      `the agent's status "rejoin" says why it waits). By hand: once "unisync status" shows nothing waiting to upload, stop the agent, ` +
      `move the instance folder's databases, files and .unisync/ aside (in a secured cluster keep .unisync/node.key), and start the agent on the empty folder (it starts from the newest snapshot)`,
  };
}

/**
 * Hands over up to `maxSegments` segments after `afterSeq` in order. Their keys
 * come from `known` (the cluster index) when it names the next seq, so tailing
 * needs no LIST; otherwise from listing the stream. At most `prefetch`
 * compressed bodies are in memory or in flight, and only the segment in hand is
 * decoded, so memory stays flat with segment count.
 */
export async function readAfter(
  store: ObjectStore,
  origin: string,
  stream: string,
  afterSeq: number,
  maxSegments: number,
  prefetch = 4,
  known?: KnownSegments,
): Promise<TailResult> {
  const wanted: { key: string; seq: number; sha256: string }[] = [];
  let problem: TailProblem | undefined;
  const fromIndex = known?.has(afterSeq + 1) === true;
  if (fromIndex) {
    for (let seq = afterSeq + 1; wanted.length < maxSegments && known!.has(seq); seq++) {
      const key = known!.get(seq)!;
      wanted.push({ key, seq, sha256: parseSegmentKey(key)!.sha256 });
    }
  } else problem = await listWanted(store, origin, stream, afterSeq, maxSegments, wanted);

  async function* segments(): AsyncGenerator<FetchedSegment> {
    const bodies: (Promise<Buffer | null> | null)[] = [];
    for (let i = 0; i < wanted.length; i++) {
      while (bodies.length < Math.min(wanted.length, i + prefetch)) {
        const p = store.get(wanted[bodies.length].key);
        p.catch(() => undefined); // awaited below; never an unhandled rejection if we stop early
        bodies.push(p);
      }
      const w = wanted[i];
      const body = await bodies[i];
      bodies[i] = null;
      if (!body && fromIndex) {
        // A pointer named a segment the store does not hold (collected, or not
        // visible yet): the listing knows what is really there and why not.
        const rest = await readAfter(store, origin, stream, w.seq - 1, maxSegments - i, prefetch);
        yield* rest.segments;
        problem = rest.problem();
        return;
      }
      let segment: Segment;
      try {
        if (!body) throw new CorruptSegmentError("listed but no longer readable");
        segment = openSegment(body, w.sha256, vaultOf(store));
        if (segment.seq !== w.seq || segment.origin !== origin || segment.stream !== stream) {
          throw new CorruptSegmentError(`header says ${segment.origin}/${segment.stream}#${segment.seq}, key says ${origin}/${stream}#${w.seq}`);
        }
      } catch (err) {
        if (!(err instanceof CorruptSegmentError)) throw err;
        problem = { kind: err instanceof SegmentRefusedError ? "refused" : "corrupt", seq: w.seq, key: w.key, message: `segment ${w.key} is unusable: ${err.message}` };
        return;
      }
      yield { key: w.key, seq: w.seq, segment };
    }
  }
  return { segments: segments(), problem: () => problem };
}

/** Lists the stream after `afterSeq` into `wanted` (dense seqs from afterSeq + 1); returns why it stopped early, if it did. */
async function listWanted(
  store: ObjectStore,
  origin: string,
  stream: string,
  afterSeq: number,
  maxSegments: number,
  wanted: { key: string; seq: number; sha256: string }[],
): Promise<TailProblem | undefined> {
  const page = await store.list(streamPrefix(origin, stream), {
    startAfter: `${seqFloorKey(origin, stream, afterSeq)}~`,
    limit: maxSegments + 1,
  });
  let problem: TailProblem | undefined;
  let expect = afterSeq + 1;
  for (const obj of page.objects) {
    const name = parseSegmentKey(obj.key);
    if (!name) continue;
    if (name.seq < expect) {
      // Same seq twice under different hashes: the origin's log forked.
      problem = { kind: "fork", seq: name.seq, key: obj.key, message: `two different segments claim seq ${name.seq} of origin "${origin}" (${obj.key})` };
      wanted.length = wanted.findIndex((w) => w.seq === name.seq);
      break;
    }
    if (name.seq > expect) {
      problem = await collectedProblem(store, origin, stream, expect) ?? { kind: "gap", seq: expect, message: `segment ${expect} of origin "${origin}" is missing; waiting for it before applying ${name.seq}` };
      break;
    }
    if (wanted.length >= maxSegments) break;
    wanted.push({ key: obj.key, seq: name.seq, sha256: name.sha256 });
    expect++;
  }
  return problem;
}

interface Logger {
  info(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
}

/**
 * Why each origin's stream is stopped, for status and the log. A gap is often
 * only segments uploaded out of order (uploads run in parallel), so it is
 * reported loudly only once it has lasted `gapPatienceMs`; a corrupt segment or
 * a fork is reported at once.
 */
export class TailProblems {
  readonly byOrigin = new Map<string, TailProblem & { sinceMs: number; loud: boolean }>();

  constructor(
    private readonly log: Logger,
    private readonly what: string,
    private readonly gapPatienceMs = 60_000,
  ) {}

  update(origin: string, problem: TailProblem | undefined, now = Date.now()): void {
    const previous = this.byOrigin.get(origin);
    if (!problem) {
      if (previous) {
        this.log.info({ origin }, `${this.what} of this origin resumed`);
        this.byOrigin.delete(origin);
      }
      return;
    }
    const same = previous?.message === problem.message;
    const entry = { ...problem, sinceMs: same && previous ? previous.sinceMs : now, loud: same && previous ? previous.loud : false };
    if (!entry.loud && (problem.kind !== "gap" || now - entry.sinceMs >= this.gapPatienceMs)) {
      this.log.error({ origin, ...problem }, `${this.what} of this origin is waiting`);
      entry.loud = true;
    } else if (!same) this.log.info({ origin, ...problem }, `${this.what} of this origin is waiting (segment not there yet)`);
    this.byOrigin.set(origin, entry);
  }
}
