/**
 * The one interface between unisync and object storage. Every backend (local
 * directory, S3) implements it and passes test/store.contract.test.ts.
 *
 * Keys are '/'-separated, never start with '/', and sort bytewise; a listing is
 * always returned in ascending key order so that the listing itself is the
 * segment index.
 */
import type { Readable } from "node:stream";

export interface ObjectInfo {
  key: string;
  size: number;
  /** Last write time, where the listing gives it (gc keeps young blobs: they may belong to a segment being sealed). */
  modifiedMs?: number;
}

export interface ListPage {
  objects: ObjectInfo[];
  /** Common prefixes ("directories") when a delimiter was given, ascending. */
  prefixes: string[];
  /** Pass as `startAfter` to get the next page; undefined when this was the last page. */
  next?: string;
}

export interface ListOptions {
  /** Only keys strictly greater than this one (bytewise). */
  startAfter?: string;
  /** Roll up keys at the first delimiter after the prefix into `prefixes`. */
  delimiter?: string;
  /** Upper bound on objects + prefixes in one page (backends may return fewer). */
  limit?: number;
}

/** The kinds of request a store makes, as S3 bills them. */
export const REQUEST_KINDS = ["LIST", "GET", "PUT", "HEAD", "DELETE"] as const;
export type RequestKind = (typeof REQUEST_KINDS)[number];

/** Requests a store really made (one per HTTP request for S3, one per call for a directory). */
export class RequestCounts {
  readonly total: Record<RequestKind, number> = { LIST: 0, GET: 0, PUT: 0, HEAD: 0, DELETE: 0 };

  count(kind: RequestKind): void {
    this.total[kind]++;
  }

  snapshot(): Record<RequestKind, number> {
    return { ...this.total };
  }

  private readonly samples: { ms: number; total: Record<RequestKind, number> }[] = [];

  /** Requests per second by kind over the last `windowMs`; call it every second or so (each call is a sample). */
  perSecond(now = Date.now(), windowMs = 60_000): Record<RequestKind, number> {
    this.samples.push({ ms: now, total: this.snapshot() });
    while (this.samples.length > 2 && this.samples[1]!.ms <= now - windowMs) this.samples.shift();
    const first = this.samples[0]!;
    const seconds = (now - first.ms) / 1000;
    const rate = (k: RequestKind) => (seconds > 0 ? Math.round(((this.total[k] - first.total[k]) / seconds) * 1000) / 1000 : 0);
    return { LIST: rate("LIST"), GET: rate("GET"), PUT: rate("PUT"), HEAD: rate("HEAD"), DELETE: rate("DELETE") };
  }
}

export type PutIfAbsentResult = "created" | "exists";

export interface ObjectStore {
  /** Human-readable location for logs, never containing credentials. */
  readonly description: string;
  /** What this store has asked of its backend so far (metrics, status, benchmarks). */
  readonly requests: RequestCounts;
  /** Writes the whole object atomically: readers see either nothing or all of it. */
  put(key: string, body: Buffer | Readable, size?: number): Promise<void>;
  /**
   * Optional, only where naming an object after writing it is free (FileStore's
   * rename): writes `body` into folder `dir` and then stores it under the key
   * `keyFor()` gives once the body has ended (null: drop it). Returns that key.
   */
  putThenName?(dir: string, body: Readable, keyFor: () => Promise<string | null>): Promise<string | null>;
  /**
   * Writes `body` only if no object has the key ("If-None-Match: *"): "exists"
   * means nothing was written. A server that ignores the condition (s3rver)
   * overwrites and answers "created"; probeConditionalWrites tells them apart.
   */
  putIfAbsent(key: string, body: Buffer): Promise<PutIfAbsentResult>;
  /** The whole object, or null when it does not exist. */
  get(key: string): Promise<Buffer | null>;
  /** A stream of the object's bytes, or null when it does not exist. */
  getStream(key: string): Promise<Readable | null>;
  /** Size of the object, or null when it does not exist. */
  head(key: string): Promise<ObjectInfo | null>;
  /** One page of keys under `prefix`, ascending. */
  list(prefix: string, options?: ListOptions): Promise<ListPage>;
  /** Removes the object; deleting a missing key is not an error. */
  delete(key: string): Promise<void>;
}

/** Raised for failures a caller may retry (network, 5xx, timeouts). */
export class StoreUnavailableError extends Error {
  readonly code = "STORE_UNAVAILABLE";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "StoreUnavailableError";
  }
}

/** Raised for store configuration that can never work (bad URL, missing bucket, denied). */
export class StoreConfigError extends Error {
  readonly code = "STORE_CONFIG";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "StoreConfigError";
  }
}

/** Every key of a prefix, page by page, without holding the whole listing. */
export async function* listAll(store: ObjectStore, prefix: string, startAfter?: string): AsyncGenerator<ObjectInfo> {
  let after = startAfter;
  for (;;) {
    const page = await store.list(prefix, { startAfter: after, limit: 1000 });
    yield* page.objects;
    if (!page.next) return;
    after = page.next;
  }
}

/** The folder names (common prefixes, without `prefix` and the trailing '/') under `prefix`, page by page. */
export async function listFolders(store: ObjectStore, prefix: string): Promise<string[]> {
  const out: string[] = [];
  let after: string | undefined;
  for (;;) {
    const page = await store.list(prefix, { delimiter: "/", startAfter: after, limit: 1000 });
    out.push(...page.prefixes.map((p) => p.slice(prefix.length, -1)));
    if (!page.next) return out;
    after = page.next;
  }
}

/**
 * Whether the store refuses to overwrite an object on putIfAbsent: writes a
 * probe object twice under a fresh key and removes it (three requests, once per agent).
 */
export async function probeConditionalWrites(store: ObjectStore, probeKey: string): Promise<boolean> {
  try {
    await store.putIfAbsent(probeKey, Buffer.from("1"));
    return (await store.putIfAbsent(probeKey, Buffer.from("2"))) === "exists";
  } finally {
    await store.delete(probeKey).catch(() => undefined);
  }
}

const conditionalWrites = new WeakMap<ObjectStore, Promise<boolean>>();

/** probeConditionalWrites once per store object (a failed probe, e.g. store down, is tried again next time). */
export function enforcesConditionalWrites(store: ObjectStore): Promise<boolean> {
  let known = conditionalWrites.get(store);
  if (!known) {
    known = probeConditionalWrites(store, `probe/${Date.now()}-${Math.random().toString(36).slice(2)}`);
    conditionalWrites.set(store, known);
    known.catch(() => conditionalWrites.delete(store));
  }
  return known;
}
