/**
 * Retention (`unisync gc`). Keeps point-in-time restore possible back to
 * now - keepMs and removes what no kept state needs:
 * - snapshots: the newest usable one at or before the cutoff (K) and every
 *   later one are kept, and so is the newest of every node (not counted below:
 *   it is before the window); older ones go;
 * - segments: an origin's stream is collected up to the lowest seq that every
 *   snapshot from K on holding that stream includes (its vector), but never past
 *   the cursor any known node reports for it in its heartbeat: that node is a
 *   laggard and is reported instead. A node silent for longer than the window
 *   is reported as gone and still blocks, unless forgotten;
 * - blobs: those named by no kept snapshot (its parts, folder manifest and
 *   every version in its folder state) and no segment left in the store, and
 *   older than the grace period (a blob is uploaded before the segment or
 *   snapshot that names it).
 * The newest segment of every stream always stays, so a node left behind still
 * finds a later segment and sees the hole. Segments are deleted in ascending seq, after a marker gc/<origin>/<stream>.json
 * says how far the stream was collected, so an interrupted run leaves a log
 * that is still contiguous and a reader that finds a hole knows why.
 */
import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { FILES_STREAM } from "../stream/foldersync.js";
import { BlobIntegrityError, blobKey, fetchBlob, fetchBlobToFile } from "../log/blobs.js";
import { hlcFromMs, LOGICAL_BITS } from "../log/hlc.js";
import { gcMarkerKey, readGcMarker, type GcMarker } from "../log/collected.js";
import { INDEX_PREFIX, indexFloorKey } from "../log/index.js";
import { claimPrefix, listOrigins, listStreams, parseSegmentKey, seqFloorKey, streamPrefix } from "../log/keys.js";
import { CorruptSegmentError, openSegment } from "../log/segment.js";
import { storedName, vaultOf } from "../keys/securestore.js";
import { SealError } from "../keys/envelope.js";
import { listAll, type ObjectStore } from "../store/store.js";
import { CorruptSnapshotError, listSnapshots, partBlobs, readManifest, type FileEntry, type Manifest, type SnapshotRef } from "./format.js";

/**
 * Index pointers older than this go: readers look back only indexOverlapMs
 * (seconds), and a node that fell further behind lists its streams instead.
 */
const INDEX_KEEP_MS = 24 * 3600_000;

/**
 * Deletes (or only counts) the keys under `prefix`, in listing order, up to the
 * first one `keep` says stays; returns how many.
 */
async function collectUntil(store: ObjectStore, prefix: string, keep: (key: string) => boolean, apply: boolean): Promise<number> {
  let n = 0;
  let batch: string[] = [];
  for await (const obj of listAll(store, prefix)) {
    if (keep(obj.key)) break;
    n++;
    batch.push(obj.key);
    if (batch.length >= 256) {
      if (apply) await inBatches(batch, DELETE_PARALLEL, (k) => store.delete(k));
      batch = [];
    }
  }
  if (apply) await inBatches(batch, DELETE_PARALLEL, (k) => store.delete(k));
  return n;
}

export interface GcOptions {
  store: ObjectStore;
  keepMs: number;
  apply: boolean;
  /** Nodes whose cursors no longer block (gone for good). */
  forget: string[];
  /** Scratch folder for reading snapshots' folder states. */
  workDir: string;
  nowMs?: number;
  /** Unreferenced blobs younger than this stay (default: keepMs). */
  blobGraceMs?: number;
  progress?: (message: string, data?: Record<string, unknown>) => void;
}

export interface SnapshotDecision {
  key: string;
  node: string;
  hlc: number;
  action: "keep" | "delete";
  why: string;
}

export interface StreamDecision {
  origin: string;
  stream: string;
  /** What the kept snapshots allow collecting (0: nothing). */
  coveredThrough: number;
  /** Last seq collected: coveredThrough lowered by laggards, and never the stream's newest segment (0: none). */
  collectThrough: number;
  segments: number;
  bytes: number;
  why: string;
}

export interface NodeReport {
  node: string;
  lastSeenMs: number | null;
  state: "ok" | "gone" | "forgotten";
}

export interface Laggard {
  node: string;
  origin: string;
  stream: string;
  /** Last seq the node has applied. */
  cursor: number;
  /** What gc would collect without it. */
  coveredThrough: number;
  gone: boolean;
}

export interface GcReport {
  applied: boolean;
  nowMs: number;
  keepMs: number;
  cutoffMs: number;
  oldestKept: SnapshotDecision | null;
  snapshots: SnapshotDecision[];
  streams: StreamDecision[];
  nodes: NodeReport[];
  laggards: Laggard[];
  blobs: { referenced: number; delete: number; bytes: number; keptYoung: number; skipped?: string };
  totals: { segments: number; segmentBytes: number; snapshots: number; blobs: number; blobBytes: number; claims: number; pointers: number };
  problems: string[];
}

const DELETE_PARALLEL = 16;
const FETCH_PARALLEL = 8;

async function inBatches<T>(items: T[], size: number, fn: (t: T) => Promise<void>): Promise<void> {
  for (let i = 0; i < items.length; i += size) await Promise.all(items.slice(i, i + size).map(fn));
}

/**
 * What gc reads of a node's heartbeat (nodes/<node>.json, which the agent writes as its
 * status): who, when, and each stream's cursor per origin.
 */
export interface HeartbeatCursors {
  node: string;
  atMs: number;
  databases: { stream: string; cursors: Record<string, number> }[];
  files?: { stream: string; cursors: Record<string, number> };
}

/** Every node's last heartbeat (nodes/<node>.json); unreadable ones are problems (gc, the console). */
export async function readHeartbeats(store: ObjectStore, problems: string[]): Promise<Partial<HeartbeatCursors>[]> {
  const out: Partial<HeartbeatCursors>[] = [];
  for await (const o of listAll(store, "nodes/")) {
    if (!o.key.endsWith(".json")) continue;
    // A secured store refuses a heartbeat that is forged or from a removed node: ignored, like a missing one.
    const body = await store.get(o.key).catch((err) => {
      if (!(err instanceof SealError)) throw err;
      problems.push(`${o.key} refused (${err.message}); ignored`);
      return null;
    });
    if (!body) continue;
    try {
      const h = JSON.parse(body.toString("utf8")) as Partial<HeartbeatCursors>;
      if (typeof h.node === "string") out.push(h);
      else problems.push(`${o.key} names no node; ignored`);
    } catch {
      problems.push(`${o.key} is not JSON; ignored`);
    }
  }
  return out;
}

/** Every stream the node replays, with its cursor per origin. */
function streamCursors(h: Partial<HeartbeatCursors>): Map<string, Record<string, number>> {
  const out = new Map<string, Record<string, number>>();
  for (const d of h.databases ?? []) out.set(d.stream, d.cursors ?? {});
  if (h.files) out.set(h.files.stream, h.files.cursors ?? {});
  return out;
}

/** A manifest whose parts are all in the store with the size it names (a cheap check: no download). */
async function usableManifest(store: ObjectStore, ref: SnapshotRef): Promise<Manifest> {
  const m = await readManifest(store, ref);
  for (const p of partBlobs(m)) {
    const h = await store.head(blobKey(p.sha256));
    if (!h) throw new CorruptSnapshotError(`snapshot ${ref.key}: part blobs/${p.sha256} is missing`);
  }
  return m;
}

/** Adds every blob a kept snapshot needs: its parts, its folder manifest's contents and every version in its folder state. */
async function snapshotBlobs(store: ObjectStore, m: Manifest, workDir: string, into: Set<string>): Promise<void> {
  for (const p of partBlobs(m)) into.add(p.sha256);
  if (!m.files) return;
  const entries = JSON.parse((await fetchBlob(store, m.files.manifest.sha256, m.files.manifest.size)).toString("utf8")) as FileEntry[];
  for (const e of entries) if (e.sha256) into.add(e.sha256);
  // Any version in the state may still become a conflict loser whose copy is written after T.
  const dest = join(workDir, `state-${m.files.state.sha256}.db`);
  rmSync(dest, { force: true });
  await fetchBlobToFile(store, m.files.state.sha256, m.files.state.size, dest);
  const db = new Database(dest, { readonly: true });
  try {
    for (const r of db.prepare("SELECT DISTINCT sha256 FROM file_versions WHERE sha256 IS NOT NULL AND sha256 <> ''").iterate() as IterableIterator<{ sha256: string }>) into.add(r.sha256);
  } finally {
    db.close();
    rmSync(dest, { force: true });
  }
}

/** Adds the blobs named by the `.files` segments of `origin` after `afterSeq`. Corrupt segments are thrown. */
async function segmentBlobs(store: ObjectStore, origin: string, afterSeq: number, into: Set<string>): Promise<number> {
  let n = 0;
  let page: { key: string; seq: number; sha256: string }[] = [];
  const flush = async () => {
    await inBatches(page, FETCH_PARALLEL, async (w) => {
      const body = await store.get(w.key);
      if (!body) return; // deleted meanwhile (another gc): names nothing we keep
      const seg = openSegment(body, w.sha256, vaultOf(store));
      for (const r of seg.records) if (r.file?.sha256) into.add(r.file.sha256);
    });
    n += page.length;
    page = [];
  };
  for await (const o of listAll(store, streamPrefix(origin, FILES_STREAM), `${seqFloorKey(origin, FILES_STREAM, afterSeq)}~`)) {
    const name = parseSegmentKey(o.key);
    if (!name) continue;
    page.push({ key: o.key, seq: name.seq, sha256: name.sha256 });
    if (page.length >= 256) await flush();
  }
  await flush();
  return n;
}

export async function collectGarbage(o: GcOptions): Promise<GcReport> {
  const store = o.store;
  const nowMs = o.nowMs ?? Date.now();
  const cutoffMs = nowMs - o.keepMs;
  const cutoffHlc = hlcFromMs(cutoffMs) + LOGICAL_BITS - 1;
  const graceMs = o.blobGraceMs ?? o.keepMs;
  const say = o.progress ?? (() => undefined);
  const problems: string[] = [];
  const forget = new Set(o.forget);

  // 1. Nodes and their cursors.
  say("reading node heartbeats");
  const beats = await readHeartbeats(store, problems);
  const nodes: NodeReport[] = beats.map((h) => {
    const lastSeenMs = typeof h.atMs === "number" ? h.atMs : null;
    const state = forget.has(h.node!) ? "forgotten" : lastSeenMs !== null && lastSeenMs < cutoffMs ? "gone" : "ok";
    return { node: h.node!, lastSeenMs, state };
  });
  for (const f of forget) if (!nodes.some((n) => n.node === f)) problems.push(`--forget-node ${f}: no heartbeat of that node in the store`);

  // 2. Snapshots: the oldest kept one (K) is the newest usable one at or before the cutoff.
  say("listing snapshots");
  const refs = await listSnapshots(store); // newest first
  const manifests = new Map<string, Manifest>();
  let oldest: SnapshotRef | null = null;
  for (const ref of refs) {
    if (ref.hlc > cutoffHlc) continue;
    try {
      manifests.set(ref.key, await usableManifest(store, ref));
      oldest = ref;
      break;
    } catch (err) {
      if (!(err instanceof CorruptSnapshotError)) throw err;
      problems.push(`${err.message}; the next older snapshot is used as the oldest kept one`);
    }
  }
  const newestOfNode = new Map<string, string>();
  for (const r of refs) if (!newestOfNode.has(r.node)) newestOfNode.set(r.node, r.key);
  const snapshots: SnapshotDecision[] = refs.map((r) => {
    const d = (action: "keep" | "delete", why: string): SnapshotDecision => ({ key: r.key, node: r.node, hlc: r.hlc, action, why });
    if (!oldest) return d("keep", "no usable snapshot at or before the cutoff: every snapshot is kept");
    if (r.key === oldest.key) return d("keep", "oldest kept: restore at the start of the window starts here");
    if (r.hlc >= oldest.hlc) return d("keep", "inside the window");
    if (newestOfNode.get(r.node) === r.key) return d("keep", `newest snapshot of node ${r.node} (kept, but before the window: segments after it may go)`);
    return d("delete", "older than the oldest kept snapshot");
  });
  const kept = refs.filter((r, i) => snapshots[i].action === "keep");
  for (const r of kept) {
    if (manifests.has(r.key)) continue;
    try {
      manifests.set(r.key, await readManifest(store, r));
    } catch (err) {
      if (!(err instanceof CorruptSnapshotError)) throw err;
      problems.push(`kept snapshot unusable (left in place): ${err.message}`);
    }
  }

  // 3. What the kept snapshots cover: per stream and origin, the lowest seq every kept snapshot holding that stream includes.
  const covered = new Map<string, Map<string, number>>();
  if (oldest) {
    const cover = (stream: string, vector: Record<string, number>) => {
      const first = !covered.has(stream);
      const cur = covered.get(stream) ?? new Map<string, number>();
      covered.set(stream, cur);
      if (first) {
        for (const [origin, seq] of Object.entries(vector)) cur.set(origin, seq);
        return;
      }
      // An origin missing from this vector: this snapshot needs its whole log.
      for (const [origin, seq] of cur) cur.set(origin, Math.min(seq, vector[origin] ?? 0));
    };
    // Only snapshots from K on: an older one kept as its node's newest is not promised for restore.
    for (const m of manifests.values()) {
      if (m.hlc < oldest.hlc) continue;
      for (const d of m.databases) cover(d.stream, d.vector);
      if (m.files) cover(FILES_STREAM, m.files.vector);
    }
  }

  // 4. Segments: covered, lowered to every known node's cursor.
  const laggards: Laggard[] = [];
  const streams: StreamDecision[] = [];
  say("listing origins and streams");
  const origins = await listOrigins(store);
  for (const origin of origins) {
    for (const stream of await listStreams(store, origin)) {
      const coveredThrough = covered.get(stream)?.get(origin) ?? 0;
      let limit = coveredThrough;
      const blockers: string[] = [];
      for (const h of beats) {
        const node = h.node!;
        if (node === origin || forget.has(node)) continue;
        const cursors = streamCursors(h).get(stream);
        if (!cursors) continue; // the node does not sync this stream
        const cursor = cursors[origin] ?? 0;
        if (cursor < coveredThrough) {
          const gone = nodes.find((n) => n.node === node)?.state === "gone";
          laggards.push({ node, origin, stream, cursor, coveredThrough, gone });
          blockers.push(`${node} has applied only through ${cursor}`);
          limit = Math.min(limit, cursor);
        }
      }
      const why =
        coveredThrough === 0
          ? oldest
            ? "no kept snapshot includes any of it"
            : "no usable snapshot at or before the cutoff"
          : blockers.length
            ? `kept snapshots include 1..${coveredThrough}, but ${blockers.join(", ")}`
            : `every kept snapshot includes it and every node has applied it`;
      streams.push({ origin, stream, coveredThrough, collectThrough: limit, segments: 0, bytes: 0, why });
    }
  }

  // Count (and with --apply delete) each stream's segments up to its limit, in ascending seq.
  // The newest segment of a stream always stays: a node left behind then still finds a
  // later segment, so it sees the hole (and the marker) instead of believing it is current.
  for (const s of streams) {
    const limit = s.collectThrough;
    s.collectThrough = 0;
    if (limit <= 0) continue;
    let batch: string[] = [];
    let marked = false;
    const flush = async () => {
      if (o.apply && batch.length) {
        if (!marked) {
          const prev = await readGcMarker(store, s.origin, s.stream);
          if (!prev || prev.collectedThrough < limit) {
            const marker: GcMarker = { collectedThrough: limit, atMs: nowMs };
            await store.put(gcMarkerKey(s.origin, s.stream), Buffer.from(JSON.stringify(marker)));
          }
          marked = true;
        }
        await inBatches(batch, DELETE_PARALLEL, (k) => store.delete(k));
      }
      batch = [];
    };
    let pending: { key: string; seq: number; size: number } | null = null;
    for await (const obj of listAll(store, streamPrefix(s.origin, s.stream))) {
      const name = parseSegmentKey(obj.key);
      if (!name) continue;
      if (pending) {
        s.segments++;
        s.bytes += pending.size;
        s.collectThrough = pending.seq;
        batch.push(pending.key);
        pending = null;
      }
      if (name.seq > limit) break;
      pending = { key: obj.key, seq: name.seq, size: obj.size };
      if (batch.length >= 256) {
        await flush();
        say(`${o.apply ? "deleted" : "would delete"} ${s.segments} segments of ${s.origin}/${s.stream}`);
      }
    }
    await flush();
    if (s.segments) say(`${o.apply ? "deleted" : "would delete"} ${s.segments} segments of ${s.origin}/${s.stream} (through seq ${s.collectThrough})`);
  }

  // Seq claims of collected segments, and index pointers older than any reader looks back.
  let claims = 0;
  for (const s of streams) {
    if (s.collectThrough <= 0) continue;
    const prefix = claimPrefix(s.origin, s.stream);
    claims += await collectUntil(store, prefix, (k) => Number(k.slice(prefix.length)) > s.collectThrough, o.apply);
  }
  const firstKeptPointer = indexFloorKey(nowMs - INDEX_KEEP_MS);
  const pointers = await collectUntil(store, INDEX_PREFIX, (k) => k >= firstKeptPointer, o.apply);
  if (claims || pointers) say(`${o.apply ? "deleted" : "would delete"} ${claims} seq claims of collected segments and ${pointers} index pointers older than ${INDEX_KEEP_MS / 3600_000} h`);

  // 5. Snapshots older than the oldest kept one.
  const doomed = snapshots.filter((s) => s.action === "delete");
  if (o.apply) await inBatches(doomed, DELETE_PARALLEL, (s) => store.delete(s.key));

  // 6. Blobs: named by a kept snapshot or by a segment left in the store, or young.
  const referenced = new Set<string>();
  const blobs: GcReport["blobs"] = { referenced: 0, delete: 0, bytes: 0, keptYoung: 0 };
  try {
    mkdirSync(o.workDir, { recursive: true });
    say("reading kept snapshots' blob references", { snapshots: manifests.size });
    for (const m of manifests.values()) await snapshotBlobs(store, m, o.workDir, referenced);
    for (const origin of origins) {
      const left = streams.find((s) => s.origin === origin && s.stream === FILES_STREAM);
      if (!left) continue;
      const n = await segmentBlobs(store, origin, left.collectThrough, referenced);
      say(`read ${n} file segments of ${origin} for blob references`);
    }
  } catch (err) {
    if (!(err instanceof BlobIntegrityError || err instanceof CorruptSegmentError || err instanceof CorruptSnapshotError || err instanceof SyntaxError)) throw err;
    blobs.skipped = `not collecting blobs: could not read every reference (${err.message})`;
    problems.push(blobs.skipped);
  } finally {
    rmSync(o.workDir, { recursive: true, force: true });
  }
  blobs.referenced = referenced.size;
  if (!blobs.skipped) {
    say("listing blobs");
    let batch: string[] = [];
    let seen = 0;
    // A secured store names blobs by an HMAC of their hash: compare stored names.
    const referencedNames = new Set([...referenced].map((sha) => storedName(store, blobKey(sha))));
    for await (const obj of listAll(store, "blobs/")) {
      if (++seen % 10_000 === 0) say(`looked at ${seen} blobs`, { delete: blobs.delete });
      if (referencedNames.has(obj.key)) continue;
      // No write time (a backend that does not say) counts as young: kept.
      if (obj.modifiedMs === undefined || obj.modifiedMs > nowMs - graceMs) {
        blobs.keptYoung++;
        continue;
      }
      blobs.delete++;
      blobs.bytes += obj.size;
      batch.push(obj.key);
      if (batch.length >= 256) {
        if (o.apply) await inBatches(batch, DELETE_PARALLEL, (k) => store.delete(k));
        batch = [];
      }
    }
    if (o.apply) await inBatches(batch, DELETE_PARALLEL, (k) => store.delete(k));
  }

  const segs = streams.reduce((a, s) => a + s.segments, 0);
  const segBytes = streams.reduce((a, s) => a + s.bytes, 0);
  return {
    applied: o.apply,
    nowMs,
    keepMs: o.keepMs,
    cutoffMs,
    oldestKept: snapshots.find((s) => s.key === oldest?.key) ?? null,
    snapshots,
    streams,
    nodes,
    laggards,
    blobs,
    totals: { segments: segs, segmentBytes: segBytes, snapshots: doomed.length, blobs: blobs.delete, blobBytes: blobs.bytes, claims, pointers },
    problems,
  };
}
