/**
 * Puts a rebuilt state (see rebuild.ts) in place of this node's data, as
 * ordinary writes: each database is changed in one transaction through one
 * connection (rows deleted, updated, inserted until every table equals the
 * rebuilt one), and files are written by temp file + rename or removed. The
 * capture triggers and the folder scan record these as this node's newest
 * changes, so when the agent runs again every node returns to that state.
 * (Swapping the files instead would leave the cursors and this node's own
 * log position behind the store: the agent would either fork its log or
 * replay the later changes straight back.)
 */
import { chmodSync, copyFileSync, existsSync, lstatSync, mkdirSync, readlinkSync, renameSync, symlinkSync, unlinkSync, utimesSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import Database from "better-sqlite3";
import { isSqliteFile } from "../db/databases.js";
import { FileStateStore } from "../capture/filestate.js";
import { FolderScanner, type DiskEntry } from "../capture/folder.js";
import { TEMP_PREFIX } from "../capture/ignore.js";
import { discoverTables, quoteIdent } from "../db/schema.js";
import { hashFile } from "../log/blobs.js";
import { encodeValues, type SqlValue } from "../log/value.js";

export interface RevertReport {
  rowsDeleted: number;
  rowsUpdated: number;
  rowsInserted: number;
  filesWritten: number;
  filesDeleted: number;
  notes: string[];
}

const q = quoteIdent;

/** Exact equality as the checker sees it: same storage class and same value. */
const same = (a: string, b: string) => `(${a} IS ${b} AND typeof(${a}) = typeof(${b}))`;

function revertKeyedTable(db: Database.Database, t: string, cols: string[], key: string[], r: RevertReport): void {
  const match = (x: string, y: string) => key.map((k) => `${x}.${q(k)} IS ${y}.${q(k)}`).join(" AND ");
  const list = cols.map(q).join(", ");
  r.rowsDeleted += db.prepare(`DELETE FROM main.${q(t)} WHERE NOT EXISTS (SELECT 1 FROM r.${q(t)} AS x WHERE ${match("x", q(t))})`).run().changes;
  const differs = cols.map((c) => `NOT ${same(`x.${q(c)}`, `${q(t)}.${q(c)}`)}`).join(" OR ");
  if (cols.length > key.length) {
    r.rowsUpdated += db
      .prepare(
        `UPDATE main.${q(t)} SET (${list}) = (SELECT ${cols.map((c) => `x.${q(c)}`).join(", ")} FROM r.${q(t)} AS x WHERE ${match("x", q(t))}) ` +
          `WHERE EXISTS (SELECT 1 FROM r.${q(t)} AS x WHERE ${match("x", q(t))} AND (${differs}))`,
      )
      .run().changes;
  }
  r.rowsInserted += db.prepare(`INSERT INTO main.${q(t)}(${list}) SELECT ${list} FROM r.${q(t)} AS x WHERE NOT EXISTS (SELECT 1 FROM main.${q(t)} AS y WHERE ${match("y", "x")})`).run().changes;
}

/** A table without a declared key is a multiset of rows: remove extra copies, add missing ones. */
function revertBagTable(db: Database.Database, t: string, cols: string[], r: RevertReport): void {
  const list = cols.map(q).join(", ");
  const want = new Map<string, { n: number; row: SqlValue[] }>();
  for (const row of db.prepare(`SELECT ${list} FROM r.${q(t)}`).raw(true).safeIntegers(true).iterate() as Iterable<SqlValue[]>) {
    const k = encodeValues(row).toString("base64");
    const e = want.get(k);
    if (e) e.n++;
    else want.set(k, { n: 1, row });
  }
  const del = db.prepare(`DELETE FROM main.${q(t)} WHERE rowid = ?`);
  const extra: bigint[] = [];
  for (const row of db.prepare(`SELECT rowid, ${list} FROM main.${q(t)}`).raw(true).safeIntegers(true).all() as SqlValue[][]) {
    const k = encodeValues(row.slice(1)).toString("base64");
    const e = want.get(k);
    if (e && e.n > 0) e.n--;
    else extra.push(row[0] as bigint);
  }
  for (const id of extra) r.rowsDeleted += del.run(id).changes;
  const ins = db.prepare(`INSERT INTO main.${q(t)}(${list}) VALUES (${cols.map(() => "?").join(", ")})`);
  for (const { n, row } of want.values()) for (let i = 0; i < n; i++) r.rowsInserted += ins.run(...row).changes;
}

/** Makes every table of `live` equal the same table of `rebuilt`, in one transaction. */
export function revertDatabase(live: string, rebuilt: string, excludeTables: string[], stream: string, r: RevertReport, busyTimeoutMs = 5000): void {
  const db = new Database(live, { fileMustExist: true, timeout: busyTimeoutMs });
  try {
    db.pragma("foreign_keys = OFF"); // rows come and go in table order, not in dependency order
    db.prepare("ATTACH ? AS r").run(rebuilt);
    const theirs = new Set((db.prepare("SELECT name FROM r.sqlite_master WHERE type = 'table'").all() as { name: string }[]).map((row) => row.name));
    db.transaction(() => {
      for (const shape of discoverTables(db, excludeTables)) {
        if (!theirs.has(shape.name)) {
          r.notes.push(`${stream}: table ${shape.name} did not exist at that time; left as it is`);
          continue;
        }
        const rcols = new Set((db.prepare(`PRAGMA r.table_info(${q(shape.name)})`).all() as { name: string }[]).map((c) => c.name));
        const cols = shape.columns.filter((c) => rcols.has(c));
        const missing = shape.columns.filter((c) => !rcols.has(c));
        if (missing.length) r.notes.push(`${stream}: column(s) ${missing.join(", ")} of ${shape.name} did not exist at that time; left as they are`);
        if (shape.hasDeclaredKey && shape.key.every((k) => rcols.has(k))) revertKeyedTable(db, shape.name, cols, shape.key, r);
        else revertBagTable(db, shape.name, cols, r);
      }
    }).immediate();
    db.exec("DETACH r");
  } finally {
    db.close();
  }
}

/** The synced files of a folder (excluded names and SQLite files left out), by relative path. */
async function syncedFiles(root: string): Promise<Map<string, DiskEntry>> {
  const mem = new Database(":memory:");
  try {
    const scanner = new FolderScanner({ root, state: new FileStateStore(mem), openDbs: () => new Set(), stableMs: 0, massDeleteMin: 1 });
    await scanner.loadRules();
    const { entries } = await scanner.walk();
    for (const [rel, e] of entries) if (!e.isLink && isSqliteFile(join(root, rel))) entries.delete(rel);
    return entries;
  } finally {
    mem.close();
  }
}

/** Makes the synced files of `live` equal those of `rebuilt` (content, mode, mtime, links). */
export async function revertFolder(live: string, rebuilt: string, r: RevertReport): Promise<void> {
  const want = await syncedFiles(rebuilt);
  const have = await syncedFiles(live);
  for (const [rel, w] of want) {
    const dest = join(live, rel);
    const h = have.get(rel);
    if (w.isLink) {
      if (h?.isLink && readlinkSync(dest) === readlinkSync(join(rebuilt, rel))) continue;
    } else if (h && !h.isLink && h.mode === w.mode && (await hashFile(dest)).sha256 === (await hashFile(join(rebuilt, rel))).sha256) continue;
    mkdirSync(dirname(dest), { recursive: true });
    const tmp = join(dirname(dest), `${TEMP_PREFIX}restore-${process.pid}`);
    if (w.isLink) symlinkSync(readlinkSync(join(rebuilt, rel)), tmp);
    else {
      copyFileSync(join(rebuilt, rel), tmp);
      chmodSync(tmp, w.mode & 0o777);
      utimesSync(tmp, new Date(), new Date(w.mtimeMs));
    }
    renameSync(tmp, dest);
    r.filesWritten++;
  }
  for (const rel of have.keys()) {
    if (want.has(rel)) continue;
    const p = join(live, rel);
    if (existsSync(p) || lstatSync(p, { throwIfNoEntry: false })) unlinkSync(p);
    r.filesDeleted++;
  }
  // The folder sync holds back a delete of many files as a suspected accident; this one is asked for.
  if (r.filesDeleted >= 3) writeFileSync(join(live, ".unisync", "allow-mass-delete"), "");
}
