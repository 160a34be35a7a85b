/**
 * How far gc collected each origin's stream: gc/<origin>/<stream>.json, written
 * before it deletes anything. A reader that meets a hole in a log reads it to
 * tell "deleted by retention" (it will never come) from "not uploaded yet".
 */
import type { ObjectStore } from "../store/store.js";
import { encodeName } from "./keys.js";

export interface GcMarker {
  /** Every segment at or below this seq was (or is being) deleted. */
  collectedThrough: number;
  atMs: number;
}

export function gcMarkerKey(origin: string, stream: string): string {
  return `gc/${encodeName(origin)}/${encodeName(stream)}.json`;
}

/** The marker of a stream, or null when gc never collected it. */
export async function readGcMarker(store: ObjectStore, origin: string, stream: string): Promise<GcMarker | null> {
  const body = await store.get(gcMarkerKey(origin, stream));
  if (!body) return null;
  try {
    const m = JSON.parse(body.toString("utf8")) as Partial<GcMarker>;
    return typeof m.collectedThrough === "number" ? { collectedThrough: m.collectedThrough, atMs: Number(m.atMs ?? 0) } : null;
  } catch {
    return null;
  }
}
