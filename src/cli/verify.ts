/**
 * `unisync verify`: compares this node's synced databases with another node's
 * (a folder reachable from here), table by table, by exact value digests.
 */
import Database from "better-sqlite3";
import { createHash } from "node:crypto";
import { join, resolve } from "node:path";
import { findDatabases } from "../db/databases.js";
import { discoverTables, quoteIdent } from "../db/schema.js";
import { encodeValues, type SqlValue } from "../log/value.js";

export interface TableDigest {
  rows: number;
  digest: string;
}

/** Digest of every synced table: sorted row encodings, so row order does not matter. */
export function digestDatabase(path: string, excluded: string[]): Map<string, TableDigest> {
  const db = new Database(path, { readonly: true, fileMustExist: true });
  try {
    const out = new Map<string, TableDigest>();
    for (const shape of discoverTables(db, excluded)) {
      const stmt = db.prepare(`SELECT ${shape.columns.map(quoteIdent).join(", ")} FROM ${quoteIdent(shape.name)}`).raw(true).safeIntegers(true);
      const rows: string[] = [];
      for (const row of stmt.iterate() as Iterable<SqlValue[]>) rows.push(encodeValues(row).toString("base64"));
      rows.sort();
      const h = createHash("sha256");
      h.update(JSON.stringify(shape.columns));
      for (const r of rows) h.update(r).update("\n");
      out.set(shape.name, { rows: rows.length, digest: h.digest("hex").slice(0, 16) });
    }
    return out;
  } finally {
    db.close();
  }
}

/**
 * Differences between the synced databases of two instance folders, each way (none when
 * identical), and how many databases the two hold together (verify says when there are none).
 */
export function compareInstances(here: string, there: string, extra: string[], excluded: string[]): { problems: string[]; databases: number } {
  const problems: string[] = [];
  const streams = (dir: string) => new Map(findDatabases(resolve(dir), extra).synced.map((d) => [d.stream, d.path] as const));
  const mine = streams(here);
  const theirs = streams(there);
  const all = new Set([...mine.keys(), ...theirs.keys()]);
  for (const stream of all) {
    const path = mine.get(stream);
    const other = theirs.get(stream);
    if (!path || !other) {
      problems.push(`${stream}: missing in ${path ? there : here}`);
      continue;
    }
    const a = digestDatabase(path, excluded);
    const b = digestDatabase(other, excluded);
    for (const name of new Set([...a.keys(), ...b.keys()])) {
      const x = a.get(name);
      const y = b.get(name);
      if (!x || !y) problems.push(`${stream} table ${name}: only in ${x ? here : there}`);
      else if (x.digest !== y.digest) problems.push(`${stream} table ${name}: differs (${x.rows} rows here, ${y.rows} there)`);
    }
  }
  return { problems, databases: all.size };
}
