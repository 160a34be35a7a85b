/**
 * Works against the real store beside running agents, as a hostile or flaky
 * bucket would: every index pointer the agents publish is, at random, deleted
 * for good, deleted and put back later under its old key (a late writer), or
 * copied under a newer time (a duplicate). Readers must still apply every
 * segment exactly once, in order: pointers are hints, never the truth.
 */
import { INDEX_PREFIX, indexFloorKey, parsePointerKey, pointerKey } from "../../src/log/index.js";
import { parseSegmentKey } from "../../src/log/keys.js";
import type { ObjectStore } from "../../src/store/store.js";
import { mulberry32 } from "./random.js";

export interface ChaosOdds {
  drop: number;
  delay: number;
  duplicate: number;
  /** Longest delay of a delayed pointer (ms). */
  maxDelayMs: number;
}

export interface ChaosCounts {
  seen: number;
  dropped: number;
  delayed: number;
  duplicated: number;
}

export function startPointerChaos(store: ObjectStore, seed: number, odds: ChaosOdds): { stop(): Promise<ChaosCounts> } {
  const rand = mulberry32(seed);
  const counts: ChaosCounts = { seen: 0, dropped: 0, delayed: 0, duplicated: 0 };
  const handled = new Set<string>();
  const late: Promise<void>[] = [];
  let running = true;
  const loop = (async () => {
    while (running) {
      try {
        // Pointers are young: look back a minute (the agents' clocks are ours).
        let after: string | undefined = indexFloorKey(Date.now() - 60_000);
        for (;;) {
          const page = await store.list(INDEX_PREFIX, { startAfter: after, limit: 1000 });
          for (const o of page.objects) {
            if (handled.has(o.key)) continue;
            handled.add(o.key);
            const p = parsePointerKey(o.key);
            if (!p) continue;
            counts.seen++;
            // The first three pointers get one of each fault, so every run has all three; then at random.
            const forced = [0, odds.drop, odds.drop + odds.delay][counts.seen - 1];
            const r = forced ?? rand();
            if (r < odds.drop) {
              counts.dropped++;
              await store.delete(o.key);
            } else if (r < odds.drop + odds.delay) {
              counts.delayed++;
              const body = (await store.get(o.key)) ?? Buffer.alloc(0);
              await store.delete(o.key);
              const wait = rand() * odds.maxDelayMs;
              late.push(new Promise<void>((res) => setTimeout(res, wait)).then(() => store.put(o.key, body)));
            } else if (r < odds.drop + odds.delay + odds.duplicate) {
              counts.duplicated++;
              const copy = pointerKey(Date.now() + Math.floor(rand() * 2000), p.origin, p.stream, p.seq, parseSegmentKey(p.segmentKey)!.sha256);
              handled.add(copy);
              await store.put(copy, (await store.get(o.key)) ?? Buffer.alloc(0));
            }
          }
          if (!page.next) break;
          after = page.next;
        }
      } catch {
        // the store may be down in a test; try again
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      await Promise.allSettled(late);
      return counts;
    },
  };
}
