/**
 * Consistent local copies for a snapshot, taken through the connection the
 * agent already holds: `VACUUM INTO` reads one consistent snapshot of the file
 * (WAL included) and writes a new file. Never a second descriptor on a synced
 * database: closing it would drop the app's POSIX locks (see ARCHITECTURE.md).
 *
 * The copy keeps the merge state (`_unisync_rows`, `_unisync_bag`, capture
 * generations, parked records...) because records that arrive after the
 * snapshot merge against it, and drops what belongs to the node: its outbox,
 * pending captures, cursors (the vector replaces them) and identity.
 */
import { rmSync, writeFileSync } from "node:fs";
import Database from "better-sqlite3";
import type { Vector } from "./format.js";
import type { FileEntry } from "./format.js";

/** Tables and meta keys that describe one node, not the data: emptied in every copy. */
export const NODE_LOCAL_TABLES = ["_unisync_outbox", "_unisync_changes", "_unisync_notes", "_unisync_cursors", "_unisync_applying", "_unisync_enrol_touched", "_unisync_refcheck"];
export const NODE_LOCAL_META = ["node", "next_seq", "enrol_pending", "log_unknown", "own_through", "rows_are_new"];
/** The folder state's node-local tables: what this disk holds, blobs waiting for upload, refusals. */
export const FILES_NODE_LOCAL_TABLES = ["_unisync_outbox", "_unisync_cursors", "file_index", "file_blobs", "file_refused"];

/** The connection a DbSync or FolderSync already holds, and how to seal what is pending. */
export interface CopySource {
  readonly db: Database.Database;
  sealPending(): number;
}

export interface CopyResult {
  vector: Vector;
  /** The highest clock this copy's node had reached: at least every included record's. */
  hlc: number;
}

/** Every origin's last applied seq, and this node's last sealed seq. */
function readVector(copy: Database.Database, node: string): Vector {
  const vector: Vector = {};
  for (const r of copy.prepare("SELECT origin, seq FROM _unisync_cursors").all() as { origin: string; seq: number }[]) {
    if (Number(r.seq) > 0) vector[r.origin] = Number(r.seq);
  }
  const next = Number((copy.prepare("SELECT v FROM _unisync_meta WHERE k = 'next_seq'").get() as { v: number } | undefined)?.v ?? 1);
  if (next > 1) vector[node] = next - 1;
  return vector;
}

function strip(copy: Database.Database, tables: string[]): void {
  const have = new Set((copy.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").all() as { name: string }[]).map((r) => r.name));
  copy.transaction(() => {
    for (const t of tables) if (have.has(t)) copy.exec(`DELETE FROM "${t}"`);
    const del = copy.prepare("DELETE FROM _unisync_meta WHERE k = ?");
    for (const k of NODE_LOCAL_META) del.run(k);
  })();
  copy.exec("VACUUM"); // the outbox can hold megabytes of sealed segments
}

/**
 * Copies one database into `dest`. Pending captures are sealed first; if the app
 * committed between that seal and the copy's read snapshot, the copy holds a
 * change with no clock, so it is thrown away and taken again.
 */
export function copyDatabase(source: CopySource, node: string, dest: string, attempts = 50): CopyResult {
  for (let attempt = 1; ; attempt++) {
    source.sealPending();
    rmSync(dest, { force: true });
    source.db.prepare("VACUUM INTO ?").run(dest);
    const copy = new Database(dest);
    try {
      if (copy.prepare("SELECT 1 FROM _unisync_changes LIMIT 1").get()) {
        if (attempt < attempts) continue;
        throw new Error(`the app kept writing between sealing and copying ${source.db.name} (${attempts} attempts); try again`);
      }
      const vector = readVector(copy, node);
      const hlc = Number((copy.prepare("SELECT v FROM _unisync_meta WHERE k = 'hlc'").get() as { v: number } | undefined)?.v ?? 0);
      strip(copy, NODE_LOCAL_TABLES);
      return { vector, hlc };
    } finally {
      copy.close();
    }
  }
}

/**
 * Copies the folder state (files.db) into `dest` and writes the folder manifest
 * (every path whose winner is a file or a link) into `manifestDest`. Capture
 * seals in the transaction that records a change, so nothing is pending here.
 */
export function copyFolderState(db: Database.Database, node: string, dest: string, manifestDest: string): CopyResult & { count: number } {
  rmSync(dest, { force: true });
  db.prepare("VACUUM INTO ?").run(dest);
  const copy = new Database(dest);
  try {
    const vector = readVector(copy, node);
    const hlc = Number((copy.prepare("SELECT v FROM _unisync_meta WHERE k = 'hlc'").get() as { v: number } | undefined)?.v ?? 0);
    const rows = copy.prepare("SELECT path, kind, sha256, size, mode, mtime_ms, link FROM file_state WHERE kind != 2 ORDER BY path").all() as {
      path: string;
      kind: number;
      sha256: string | null;
      size: number | null;
      mode: number | null;
      mtime_ms: number | null;
      link: string | null;
    }[];
    const entries: FileEntry[] = rows.map((r) => ({
      path: r.path,
      kind: r.kind === 3 ? "symlink" : "file",
      sha256: r.sha256 ?? "",
      size: Number(r.size ?? 0),
      mode: Number(r.mode ?? 0),
      mtimeMs: Number(r.mtime_ms ?? 0),
      ...(r.link ? { link: r.link } : {}),
    }));
    writeFileSync(manifestDest, JSON.stringify(entries));
    strip(copy, FILES_NODE_LOCAL_TABLES);
    return { vector, hlc, count: entries.length };
  } finally {
    copy.close();
  }
}
