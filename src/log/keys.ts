/**
 * Store key layout. Each origin writes only under log/<origin>/, so no two
 * writers race for a key, and the zero-padded seq makes the listing sorted.
 *   log/<origin>/<stream>/<seq:20>-<sha256>.seg
 */
import { listAll, listFolders, type ObjectStore } from "../store/store.js";

const SEQ_DIGITS = 20;

/** Stream and origin names become one key segment each: no '/', nothing unsafe. */
export function encodeName(name: string): string {
  return encodeURIComponent(name).replace(/\*/g, "%2A").replace(/^\./, "%2E");
}

export function decodeName(encoded: string): string {
  return decodeURIComponent(encoded);
}

export function streamPrefix(origin: string, stream: string): string {
  return `log/${encodeName(origin)}/${encodeName(stream)}/`;
}

export function segmentKey(origin: string, stream: string, seq: number, sha256: string): string {
  return `${streamPrefix(origin, stream)}${String(seq).padStart(SEQ_DIGITS, "0")}-${sha256}.seg`;
}

/** The listing position just before segment `seq` (use as startAfter to list seq and later). */
export function seqFloorKey(origin: string, stream: string, seq: number): string {
  return `${streamPrefix(origin, stream)}${String(seq).padStart(SEQ_DIGITS, "0")}`;
}

/**
 * Where the store enforces If-None-Match, a writer claims each seq before it
 * uploads the segment: claims/<origin>/<stream>/<seq:20>, holding the segment's
 * key. A second agent under the same node name fails to claim instead of forking the log.
 */
export function claimKey(origin: string, stream: string, seq: number): string {
  return `${claimPrefix(origin, stream)}${String(seq).padStart(SEQ_DIGITS, "0")}`;
}

/** The folder of one stream's claims (the key's last part is the seq). */
export function claimPrefix(origin: string, stream: string): string {
  return `claims/${encodeName(origin)}/${encodeName(stream)}/`;
}

export interface SegmentName {
  seq: number;
  sha256: string;
}

const SEGMENT_FILE = /^(\d{20})-([0-9a-f]{64})\.seg$/;

/** Parses the last path part of a segment key; null for anything else (temp files, junk). */
export function parseSegmentKey(key: string): SegmentName | null {
  const name = key.slice(key.lastIndexOf("/") + 1);
  const m = SEGMENT_FILE.exec(name);
  if (!m) return null;
  return { seq: Number(m[1]), sha256: m[2] };
}

/** Every origin that has written to the store (the folders under log/). */
export async function listOrigins(store: ObjectStore): Promise<string[]> {
  return (await listFolders(store, "log/")).map(decodeName);
}

/** Every stream one origin has written (its folders under log/<origin>/). */
export async function listStreams(store: ObjectStore, origin: string): Promise<string[]> {
  return (await listFolders(store, `log/${encodeName(origin)}/`)).map(decodeName);
}

/**
 * The highest seq `origin` has in the store for `stream` (0: none), claims
 * included: a seq claimed by an upload that never finished is not reused.
 */
export async function logHead(store: ObjectStore, origin: string, stream: string): Promise<number> {
  let head = 0;
  for await (const o of listAll(store, streamPrefix(origin, stream))) head = Math.max(head, parseSegmentKey(o.key)?.seq ?? 0);
  const claims = claimPrefix(origin, stream);
  for await (const o of listAll(store, claims)) head = Math.max(head, Number(o.key.slice(claims.length)) || 0);
  return head;
}
