/** How many segments of an origin's stream the store holds after a seq (paged listing). */
import { parseSegmentKey, seqFloorKey, streamPrefix } from "../log/keys.js";
import { listAll, type ObjectStore } from "../store/store.js";

export async function countAfter(store: ObjectStore, origin: string, stream: string, seq: number): Promise<number> {
  let n = 0;
  for await (const o of listAll(store, streamPrefix(origin, stream), `${seqFloorKey(origin, stream, seq)}~`)) if (parseSegmentKey(o.key)) n++;
  return n;
}
