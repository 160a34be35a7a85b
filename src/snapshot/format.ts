/**
 * What a snapshot is in the store. Parts are content-addressed blobs (the same
 * `blobs/<sha256>` objects as file contents, stored once, verified on read);
 * the manifest names them and is itself named by its own hash:
 *   snapshots/<node>/<hlc:16>-<sha256 of the manifest bytes>.json
 * The listing sorted by key is therefore sorted by node, then by clock.
 */
import { createHash } from "node:crypto";
import { encodeName, decodeName } from "../log/keys.js";
import { listAll, type ObjectStore } from "../store/store.js";
import { SealError } from "../keys/envelope.js";
import { STATE_DIR, unsafePathReason } from "../capture/ignore.js";
import { isSqliteCompanion } from "../db/databases.js";

export const SNAPSHOT_FORMAT = 1;
export const SNAPSHOT_PREFIX = "snapshots/";

/** Last seq included, per origin (the snapshot's own node included). */
export type Vector = Record<string, number>;

export interface BlobRef {
  sha256: string;
  size: number;
}

export interface DatabasePart extends BlobRef {
  /** The database's stream: its path relative to the instance folder. */
  stream: string;
  vector: Vector;
}

/** One file of the folder manifest (only paths whose winner is a file or a link). */
export interface FileEntry {
  path: string;
  kind: "file" | "symlink";
  sha256: string;
  size: number;
  mode: number;
  mtimeMs: number;
  link?: string;
}

export interface FilesPart {
  /** Copy of files.db without node-local tables: the merge state of every path. */
  state: BlobRef;
  /** JSON array of FileEntry: what the folder holds. */
  manifest: BlobRef & { count: number };
  vector: Vector;
}

export interface Manifest {
  format: number;
  node: string;
  /** At least the clock of every record the snapshot includes. */
  hlc: number;
  createdMs: number;
  databases: DatabasePart[];
  files: FilesPart | null;
}

export interface SnapshotRef {
  key: string;
  node: string;
  hlc: number;
  sha256: string;
}

/** A snapshot object that is missing, does not match its hash, or does not parse. */
export class CorruptSnapshotError extends Error {
  override name = "CorruptSnapshotError";
  readonly code = "CORRUPT_SNAPSHOT";
}

const KEY = /^snapshots\/([^/]+)\/(\d{16})-([0-9a-f]{64})\.json$/;

export function snapshotKey(node: string, hlc: number, sha256: string): string {
  return `${SNAPSHOT_PREFIX}${encodeName(node)}/${String(hlc).padStart(16, "0")}-${sha256}.json`;
}

export function parseSnapshotKey(key: string): SnapshotRef | null {
  const m = KEY.exec(key);
  return m ? { key, node: decodeName(m[1]), hlc: Number(m[2]), sha256: m[3] } : null;
}

export function encodeManifest(m: Manifest): { bytes: Buffer; sha256: string } {
  const bytes = Buffer.from(JSON.stringify(m));
  return { bytes, sha256: createHash("sha256").update(bytes).digest("hex") };
}

/** Reads and verifies a manifest: hash of the bytes, format, and the fields used. */
export async function readManifest(store: ObjectStore, ref: SnapshotRef): Promise<Manifest> {
  // A secured store refuses a manifest that is forged or signed by a non-member: to readers, a corrupt snapshot (an older one is used).
  const bytes = await store.get(ref.key).catch((err) => {
    throw err instanceof SealError ? new CorruptSnapshotError(`snapshot ${ref.key} is refused: ${err.message}`) : err;
  });
  if (!bytes) throw new CorruptSnapshotError(`snapshot ${ref.key} is listed but cannot be read`);
  const actual = createHash("sha256").update(bytes).digest("hex");
  if (actual !== ref.sha256) throw new CorruptSnapshotError(`snapshot ${ref.key} hashes to ${actual}: corrupt or truncated`);
  let m: Manifest;
  try {
    m = JSON.parse(bytes.toString("utf8")) as Manifest;
  } catch (err) {
    throw new CorruptSnapshotError(`snapshot ${ref.key} is not JSON: ${(err as Error).message}`);
  }
  if (m.format !== SNAPSHOT_FORMAT) throw new CorruptSnapshotError(`snapshot ${ref.key} has format ${m.format}; this unisync reads ${SNAPSHOT_FORMAT}`);
  if (m.hlc !== ref.hlc || m.node !== ref.node || !Array.isArray(m.databases)) throw new CorruptSnapshotError(`snapshot ${ref.key} does not match its key`);
  // A stream names where a database copy is placed: never outside the instance folder or on unisync's own state.
  for (const d of m.databases) {
    const why = typeof d?.stream !== "string" ? "no stream name" : unsafePathReason(d.stream) ?? (d.stream.split("/")[0] === STATE_DIR ? "unisync's own state" : isSqliteCompanion(d.stream) ? "an SQLite companion file" : null);
    if (why) throw new CorruptSnapshotError(`snapshot ${ref.key} names a database at ${JSON.stringify(d?.stream)}: ${why}`);
  }
  return m;
}

/** Every snapshot in the store, newest clock first (paged listing). */
export async function listSnapshots(store: ObjectStore): Promise<SnapshotRef[]> {
  const out: SnapshotRef[] = [];
  for await (const o of listAll(store, SNAPSHOT_PREFIX)) {
    const ref = parseSnapshotKey(o.key);
    if (ref) out.push(ref);
  }
  return out.sort((a, b) => b.hlc - a.hlc || (a.node < b.node ? 1 : -1));
}

/** Every blob a snapshot needs (database copies, files state, manifest, file contents are listed separately). */
export function partBlobs(m: Manifest): BlobRef[] {
  const out: BlobRef[] = m.databases.map((d) => ({ sha256: d.sha256, size: d.size }));
  if (m.files) out.push(m.files.state, m.files.manifest);
  return out;
}
