// Test helpers that compare SQLite databases exactly (by storage class and bits),
// used to assert that every node ended up with identical databases.
import Database from "better-sqlite3";
import { readFileSync } from "node:fs";
import { basename } from "node:path";

/** One cell as [storage class, exact value]. */
type Cell = [type: "null" | "integer" | "real" | "text" | "blob", value: string];

interface TableDump {
  /** Column descriptions (name, declared type, notnull, default, pk) in table order. */
  columns: string[];
  /** Indexes (into the row) of the primary key columns; empty when none is declared. */
  keyIndexes: number[];
  /** One JSON-rendered Cell[] per row, sorted. */
  rows: string[];
}

interface DbDump {
  tables: Map<string, TableDump>;
  /** Non-table schema objects ("index docs_title", "trigger t", ...). */
  others: Set<string>;
}

const quoteId = (name: string) => `"${name.replaceAll('"', '""')}"`;

/** Bit-exact REAL: hex of the IEEE-754 bytes; the decimal form is just for humans. */
function realToString(v: number): string {
  const buf = Buffer.alloc(8);
  buf.writeDoubleBE(v);
  return `${Object.is(v, -0) ? "-0" : String(v)}|${buf.toString("hex")}`;
}

function toCell(v: unknown): Cell {
  // With safeIntegers every INTEGER is a bigint, so a JS number is always a REAL.
  if (v === null) return ["null", ""];
  if (typeof v === "bigint") return ["integer", v.toString()];
  if (typeof v === "number") return ["real", realToString(v)];
  if (typeof v === "string") return ["text", v];
  if (Buffer.isBuffer(v)) return ["blob", v.toString("hex")];
  throw new Error(`unexpected SQLite value ${String(v)}`);
}

function openReadonly(path: string): Database.Database {
  const db = new Database(path, { readonly: true, fileMustExist: true });
  db.defaultSafeIntegers(true);
  return db;
}

// sqlite_* are SQLite's own tables, _unisync_* the agent's bookkeeping.
const isUserObject = (name: string) => !name.startsWith("sqlite_") && !name.startsWith("_unisync_");

function dump(path: string): DbDump {
  const db = openReadonly(path);
  try {
    const schema = db
      .prepare("SELECT type, name, tbl_name FROM sqlite_master ORDER BY type, name")
      .all() as { type: string; name: string; tbl_name: string }[];
    const tables = new Map<string, TableDump>();
    const others = new Set<string>();
    for (const { type, name, tbl_name } of schema) {
      if (!isUserObject(name) || !isUserObject(tbl_name)) continue;
      if (type !== "table") {
        others.add(`${type} ${name}`);
        continue;
      }
      const info = db.prepare(`PRAGMA table_info(${quoteId(name)})`).safeIntegers(false).all() as {
        name: string;
        type: string;
        notnull: number;
        dflt_value: string | null;
        pk: number;
      }[];
      const columns = info.map((c) => `${c.name}${c.type ? ` ${c.type}` : ""}${c.notnull ? " NOT NULL" : ""}` +
        `${c.dflt_value !== null ? ` DEFAULT ${c.dflt_value}` : ""}${c.pk ? ` PK${c.pk}` : ""}`);
      const keyIndexes = info
        .map((c, i) => ({ pk: c.pk, i }))
        .filter((c) => c.pk > 0)
        .sort((a, b) => a.pk - b.pk)
        .map((c) => c.i);
      // Explicit column list: never the rowid of a table without a declared key,
      // which legitimately differs between nodes.
      const cols = info.map((c) => quoteId(c.name)).join(", ");
      const raw = db.prepare(`SELECT ${cols} FROM ${quoteId(name)}`).raw(true).all() as unknown[][];
      // A documented limit (ARCHITECTURE.md): SQL cannot tell -0.0 from 0.0, so in a
      // table without a key two copies that differ only there are one copy, and either
      // sign may be what a node keeps.
      const unsign = (v: unknown) => (keyIndexes.length === 0 && typeof v === "number" && v === 0 ? 0 : v);
      const rows = raw.map((r) => JSON.stringify(r.map((v) => toCell(unsign(v))))).sort();
      tables.set(name, { columns, keyIndexes, rows });
    }
    return { tables, others };
  } finally {
    db.close();
  }
}

/**
 * Every user table (not sqlite_* / _unisync_*) → its rows, each a JSON array of
 * [storage class, exact value] per column, sorted.  REALs carry the hex of their
 * Float64 bytes, BLOBs are hex.  Two databases hold the same data iff the maps are equal
 * (column names/types are compared by compareDatabases, not here).
 */
export function dumpDatabase(path: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const [name, t] of dump(path).tables) out.set(name, t.rows);
  return out;
}

const MAX_PER_TABLE = 20; // keep failure messages readable

function showCell([type, value]: Cell): string {
  const v = value.length > 60 ? `${value.slice(0, 60)}…(${value.length} chars)` : value;
  return type === "null" ? "NULL" : `${type}:${JSON.stringify(v)}`;
}

function showKey(row: Cell[], keyIndexes: number[]): string {
  return keyIndexes.map((i) => showCell(row[i])).join(", ");
}

/** Differences of `other` against `ref` for one table, in human-readable form. */
function diffTable(table: string, ref: TableDump, refName: string, other: TableDump, otherName: string): string[] {
  if (ref.columns.join() !== other.columns.join()) {
    return [`table ${table}: columns differ: ${refName} has (${ref.columns.join(", ")}), ` +
      `${otherName} has (${other.columns.join(", ")})`];
  }
  const out: string[] = [];
  if (ref.keyIndexes.length > 0) {
    const byKey = (rows: string[]) => {
      const m = new Map<string, Cell[]>();
      for (const s of rows) {
        const row = JSON.parse(s) as Cell[];
        m.set(JSON.stringify(ref.keyIndexes.map((i) => row[i])), row);
      }
      return m;
    };
    const a = byKey(ref.rows);
    const b = byKey(other.rows);
    for (const [k, row] of a) {
      const o = b.get(k);
      if (!o) {
        out.push(`table ${table}: row (${showKey(row, ref.keyIndexes)}) only in ${refName}`);
      } else if (JSON.stringify(o) !== JSON.stringify(row)) {
        const cols = row
          .map((c, i) => (JSON.stringify(c) === JSON.stringify(o[i])
            ? null
            : `${ref.columns[i].split(" ")[0]}: ${showCell(c)} vs ${showCell(o[i])}`))
          .filter((x) => x !== null);
        out.push(`table ${table}: row (${showKey(row, ref.keyIndexes)}) differs ` +
          `(${refName} vs ${otherName}): ${cols.join("; ")}`);
      }
    }
    for (const [k, row] of b) {
      if (!a.has(k)) out.push(`table ${table}: row (${showKey(row, ref.keyIndexes)}) only in ${otherName}`);
    }
  } else {
    // No declared key: compare as multisets of whole rows.
    const counts = new Map<string, number>();
    for (const r of ref.rows) counts.set(r, (counts.get(r) ?? 0) + 1);
    for (const r of other.rows) counts.set(r, (counts.get(r) ?? 0) - 1);
    for (const [r, n] of counts) {
      if (n === 0) continue;
      const row = (JSON.parse(r) as Cell[]).map(showCell).join(", ");
      out.push(`table ${table}: row (${row}) ×${Math.abs(n)} only in ${n > 0 ? refName : otherName}`);
    }
  }
  if (out.length > MAX_PER_TABLE) {
    return [...out.slice(0, MAX_PER_TABLE), `table ${table}: … and ${out.length - MAX_PER_TABLE} more differences`];
  }
  return out;
}

/**
 * Compares every database with the first one.  Returns human-readable differences
 * (missing tables/indexes, column definitions, rows only on one side, differing
 * values); an empty array means all databases are identical.
 */
export function compareDatabases(paths: string[]): string[] {
  if (paths.length < 2) return [];
  const [refPath, ...rest] = paths;
  const ref = dump(refPath);
  const out: string[] = [];
  for (const path of rest) {
    const other = dump(path);
    for (const name of new Set([...ref.tables.keys(), ...other.tables.keys()])) {
      const a = ref.tables.get(name);
      const b = other.tables.get(name);
      if (!a) out.push(`table ${name} missing in ${refPath}`);
      else if (!b) out.push(`table ${name} missing in ${path}`);
      else out.push(...diffTable(name, a, refPath, b, path));
    }
    for (const o of ref.others) if (!other.others.has(o)) out.push(`${o} missing in ${path}`);
    for (const o of other.others) if (!ref.others.has(o)) out.push(`${o} missing in ${refPath}`);
  }
  return out;
}

/** One line of the op journal written by test/apps/random_writer.py and flask_app.py. */
export interface JournalEntry {
  node: number;
  txn: number;
  /** Basename of the database file, e.g. "app.db". */
  db: string;
  table: string;
  op: "insert" | "update" | "delete" | "migrate";
  /** Key column → value ({} for "migrate"). */
  key: Record<string, string | number>;
}

/** Parses journal text (or a file when `fromFile` is set), one JSON object per line. */
export function readJournal(textOrPath: string, fromFile = false): JournalEntry[] {
  const text = fromFile ? readFileSync(textOrPath, "utf8") : textOrPath;
  return text
    .split("\n")
    .filter((l) => l.trim() !== "")
    .map((l) => JSON.parse(l) as JournalEntry);
}

/**
 * Checks that no committed insert got lost: every key that some node inserted
 * and NO node deleted must exist in the database at `dbPath`.  Pass the journals
 * of all nodes; entries for other database files (by basename) are ignored.
 * Rows that any node deleted are not checked (a concurrent update may or may not
 * win against the delete, depending on the conflict policy).  Returns
 * human-readable problems; empty means fine.
 */
export function compareToJournal(dbPath: string, entries: JournalEntry[]): string[] {
  const name = basename(dbPath);
  const mine = entries.filter((e) => e.db === name && e.op !== "migrate");
  const id = (e: JournalEntry) => `${e.table} ${JSON.stringify(e.key)}`;
  const deleted = new Set(mine.filter((e) => e.op === "delete").map(id));
  const expected = new Map<string, JournalEntry>();
  for (const e of mine) if (e.op === "insert" && !deleted.has(id(e))) expected.set(id(e), e);

  const db = openReadonly(dbPath);
  try {
    const tables = new Set(
      (db.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").all() as { name: string }[]).map((r) => r.name),
    );
    const out: string[] = [];
    for (const [k, e] of expected) {
      if (!tables.has(e.table)) {
        out.push(`${name}: table ${e.table} missing (needed for ${k})`);
        continue;
      }
      const cols = Object.keys(e.key);
      const where = cols.map((c) => `${quoteId(c)} = ?`).join(" AND ");
      // Integer keys bound as BigInt so they are bound as INTEGER, not REAL.
      const params = cols.map((c) => (typeof e.key[c] === "number" && Number.isInteger(e.key[c]) ? BigInt(e.key[c]) : e.key[c]));
      const found = db.prepare(`SELECT 1 FROM ${quoteId(e.table)} WHERE ${where} LIMIT 1`).get(...params);
      if (!found) out.push(`${name}: row ${k} inserted by node ${e.node} (txn ${e.txn}) is missing`);
    }
    return out;
  } finally {
    db.close();
  }
}
