/**
 * Takes and publishes one snapshot of a node: a copy of every synced database,
 * the folder state and manifest, and the version vector of each. Parts go up
 * as content-addressed blobs; the manifest goes last, and only once this node's
 * own segments up to the vector are in the store, so a published snapshot
 * never names a record (or a file blob) that other nodes cannot read.
 */
import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import type Database from "better-sqlite3";
import { hashFile, putBlobFromFile } from "../log/blobs.js";
import type { Outbox } from "../log/outbox.js";
import type { ObjectStore } from "../store/store.js";
import { copyDatabase, copyFolderState } from "./copy.js";
import { encodeManifest, snapshotKey, SNAPSHOT_FORMAT, type BlobRef, type DatabasePart, type Manifest } from "./format.js";

/** What a DbSync or FolderSync offers the snapshot (their existing public members). */
export interface StreamSource {
  readonly stream: string;
  readonly db: Database.Database;
  readonly outbox: Outbox;
  upload(max?: number): Promise<number>;
}

export interface DbSource extends StreamSource {
  sealPending(): number;
}

export interface SnapshotInput {
  node: string;
  store: ObjectStore;
  dbs: DbSource[];
  files: StreamSource | null;
  /** Scratch folder for the copies (inside .unisync/, never synced). */
  workDir: string;
  /**
   * "push": upload this node's outbox here (no agent runs). "wait": the agent's
   * upload loop does it; wait up to `waitMs` for it.
   */
  upload: "push" | "wait";
  waitMs?: number;
  /** "wait": give up when this says so (the agent is stopping: its upload loop will not send them). */
  abort?: () => boolean;
}

export interface SnapshotResult {
  key: string;
  manifest: Manifest;
  bytes: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Resolves once `src`'s outbox holds nothing at or below `seq`. */
async function uploadedThrough(src: StreamSource, seq: number, input: SnapshotInput): Promise<void> {
  const pending = () => {
    const oldest = src.outbox.oldest(1)[0];
    return oldest !== undefined && oldest.seq <= seq;
  };
  if (!pending()) return;
  if (input.upload === "push") {
    await src.outbox.checkStoreAgrees(input.store);
    while (pending()) if ((await src.upload(64)) === 0) break;
    if (pending()) throw new Error(`${src.stream}: sealed segments up to ${seq} could not be uploaded`);
    return;
  }
  const deadline = Date.now() + (input.waitMs ?? 120_000);
  while (pending()) {
    if (Date.now() > deadline) throw new Error(`${src.stream}: this node's segments up to ${seq} are not in the store yet (store unreachable?); snapshot not published`);
    if (input.abort?.()) throw new Error("the agent is stopping; snapshot not published");
    await sleep(200);
  }
}

async function putPart(store: ObjectStore, file: string): Promise<BlobRef> {
  const { sha256, size } = await hashFile(file);
  await putBlobFromFile(store, file, sha256, size);
  return { sha256, size };
}

export async function takeSnapshot(input: SnapshotInput): Promise<SnapshotResult> {
  const dir = join(input.workDir, `snap-${process.pid}-${Date.now()}`);
  mkdirSync(dir, { recursive: true });
  try {
    // All copies first (synchronous, each one consistent), then the slow uploads.
    let hlc = 0;
    const copies = input.dbs.map((src, i) => {
      const path = join(dir, `db-${i}.sqlite`);
      const r = copyDatabase(src, input.node, path);
      hlc = Math.max(hlc, r.hlc);
      return { src, path, ...r };
    });
    const files = input.files
      ? (() => {
          const state = join(dir, "files-state.sqlite");
          const manifest = join(dir, "files-manifest.json");
          const r = copyFolderState(input.files.db, input.node, state, manifest);
          hlc = Math.max(hlc, r.hlc);
          return { src: input.files, state, manifest, ...r };
        })()
      : null;
    let bytes = 0;
    const databases: DatabasePart[] = [];
    for (const c of copies) {
      await uploadedThrough(c.src, c.vector[input.node] ?? 0, input);
      const ref = await putPart(input.store, c.path);
      bytes += ref.size;
      databases.push({ stream: c.src.stream, ...ref, vector: c.vector });
    }
    let filesPart: Manifest["files"] = null;
    if (files) {
      await uploadedThrough(files.src, files.vector[input.node] ?? 0, input);
      const state = await putPart(input.store, files.state);
      const manifest = await putPart(input.store, files.manifest);
      bytes += state.size + manifest.size;
      filesPart = { state, manifest: { ...manifest, count: files.count }, vector: files.vector };
    }
    const manifest: Manifest = { format: SNAPSHOT_FORMAT, node: input.node, hlc, createdMs: Date.now(), databases, files: filesPart };
    const encoded = encodeManifest(manifest);
    const key = snapshotKey(input.node, hlc, encoded.sha256);
    await input.store.put(key, encoded.bytes);
    return { key, manifest, bytes: bytes + encoded.bytes.length };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
