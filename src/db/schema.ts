/**
 * Reads the shape of an app's database at run time: which tables to sync, their
 * columns and the columns that identify a row. No table or column name of any
 * app appears in unisync's code.
 */
import type { Database } from "better-sqlite3";

export interface TableShape {
  name: string;
  /** Stored (non-generated) columns in declaration order. */
  columns: string[];
  /** Columns that identify a row: the declared primary key, or every column when none is declared. */
  key: string[];
  /** False for tables without a declared primary key (rows are identified by all their values). */
  hasDeclaredKey: boolean;
  withoutRowid: boolean;
  /** Declared DEFAULT of each column as SQL text, or null. */
  defaults: Record<string, string | null>;
  /** Columns with BLOB affinity (no declared type, or BLOB): the only ones that keep -0.0. */
  keepsSignedZero: string[];
  /**
   * The key is an INTEGER PRIMARY KEY of a rowid table: an id the app usually
   * lets SQLite pick (max + 1), which two offline nodes pick alike. Such rows
   * carry lineages and move on an id collision (src/merge/relocate.ts).
   */
  autoId: boolean;
  /** Single-column foreign keys: column → referenced table and column (null: its primary key). */
  foreignKeys: ForeignKey[];
}

export interface ForeignKey {
  column: string;
  table: string;
  to: string | null;
  /** The declared ON DELETE action: "NO ACTION", "RESTRICT", "CASCADE", "SET NULL" or "SET DEFAULT". */
  onDelete: string;
}

/**
 * `items` with every table after the tables its foreign keys point at (a table's
 * references to itself, and tables outside `items`, do not count; a cycle is
 * broken in the given order). Rows recorded in this order find their parents'
 * lineages already recorded (drain.ts addRefs).
 */
export function parentsFirst<T>(items: readonly T[], shapeOf: (item: T) => TableShape): T[] {
  const names = new Set(items.map((t) => shapeOf(t).name.toLowerCase()));
  const left = [...items];
  const done = new Set<string>();
  const out: T[] = [];
  while (left.length > 0) {
    const ready = (t: T) => {
      const own = shapeOf(t).name.toLowerCase();
      return shapeOf(t).foreignKeys.every((fk) => {
        const parent = fk.table.toLowerCase();
        return parent === own || !names.has(parent) || done.has(parent);
      });
    };
    const i = Math.max(0, left.findIndex(ready));
    const [next] = left.splice(i, 1);
    done.add(shapeOf(next).name.toLowerCase());
    out.push(next);
  }
  return out;
}

/** SQLite's affinity rule 3: a type naming no INT/CHAR/CLOB/TEXT but BLOB, or no type at all. */
function hasBlobAffinity(declType: string): boolean {
  const t = declType.toUpperCase();
  return !/INT|CHAR|CLOB|TEXT/.test(t) && (t.includes("BLOB") || t.trim() === "");
}

/** Tables never synced whatever the config says: SQLite's and our own. */
export function isInternalTable(name: string): boolean {
  const lower = name.toLowerCase();
  return lower.startsWith("sqlite_") || lower.startsWith("_unisync_");
}

/**
 * Tables that look like data but describe the local schema: syncing them would
 * tell a node it was migrated when it was not (Alembic's version table).
 */
export const DEFAULT_EXCLUDED_TABLES = ["alembic_version"];

export function quoteIdent(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

interface TableListRow {
  schema: string;
  name: string;
  type: string;
  wr: number;
}

interface ForeignKeyRow {
  id: number;
  table: string;
  from: string;
  to: string | null;
  on_delete: string;
}

interface ColumnRow {
  name: string;
  type: string;
  pk: number;
  hidden: number;
  dflt_value: string | null;
}

export function readTableShape(db: Database, name: string, withoutRowid: boolean): TableShape {
  // table_xinfo also lists generated columns (hidden 2 and 3), which cannot be written.
  const cols = db.prepare(`PRAGMA main.table_xinfo(${quoteIdent(name)})`).all() as ColumnRow[];
  const stored = cols.filter((c) => c.hidden === 0);
  const keyCols = stored.filter((c) => c.pk > 0).sort((a, b) => a.pk - b.pk);
  const columns = stored.map((c) => c.name);
  const fkRows = db.prepare(`PRAGMA main.foreign_key_list(${quoteIdent(name)})`).all() as ForeignKeyRow[];
  const fkParts = new Map<number, ForeignKeyRow[]>();
  for (const r of fkRows) fkParts.set(r.id, [...(fkParts.get(r.id) ?? []), r]);
  const foreignKeys = [...fkParts.values()]
    .filter((parts) => parts.length === 1)
    .map(([r]) => ({ column: r.from, table: r.table, to: r.to, onDelete: (r.on_delete ?? "NO ACTION").toUpperCase() }));
  return {
    name,
    columns,
    key: keyCols.length > 0 ? keyCols.map((c) => c.name) : columns,
    hasDeclaredKey: keyCols.length > 0,
    withoutRowid,
    defaults: Object.fromEntries(stored.map((c) => [c.name, c.dflt_value])),
    keepsSignedZero: stored.filter((c) => hasBlobAffinity(c.type ?? "")).map((c) => c.name),
    // Only the exact type name INTEGER makes a column the rowid (SQLite's rule).
    autoId: !withoutRowid && keyCols.length === 1 && (keyCols[0].type ?? "").trim().toUpperCase() === "INTEGER",
    foreignKeys,
  };
}

/** Every ordinary table of the main schema that unisync should sync, sorted by name. */
export function discoverTables(db: Database, excluded: readonly string[]): TableShape[] {
  const excludedLower = new Set(excluded.map((t) => t.toLowerCase()));
  // table_list (SQLite 3.37+, our own library) tells real tables from virtual and shadow ones.
  const rows = db.prepare("PRAGMA main.table_list").all() as TableListRow[];
  return rows
    .filter((r) => r.schema === "main" && r.type === "table")
    .filter((r) => !isInternalTable(r.name) && !excludedLower.has(r.name.toLowerCase()))
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
    .map((r) => readTableShape(db, r.name, r.wr === 1))
    .filter((t) => t.columns.length > 0);
}

export function schemaVersion(db: Database): number {
  return db.pragma("schema_version", { simple: true }) as number;
}

/**
 * Columns that look like references to a table whose ids can collide (`user_id`
 * beside a table `user` or `users` with an INTEGER PRIMARY KEY) but are not
 * declared foreign keys: they keep the old id when that row moves (relocate.ts),
 * so the operator is told. A guess by name only; it never changes what is synced.
 */
export function undeclaredReferences(shapes: readonly TableShape[]): { table: string; column: string; parent: string }[] {
  const autoIds = new Map(shapes.filter((s) => s.autoId).map((s) => [s.name.toLowerCase(), s.name]));
  const out: { table: string; column: string; parent: string }[] = [];
  for (const s of shapes) {
    const declared = new Set(s.foreignKeys.map((f) => f.column.toLowerCase()));
    for (const c of s.columns) {
      const m = /^(.+)_id$/i.exec(c);
      if (!m || declared.has(c.toLowerCase()) || (s.key.length === 1 && s.key[0] === c)) continue;
      const stem = m[1].toLowerCase();
      const parent = autoIds.get(stem) ?? autoIds.get(`${stem}s`) ?? autoIds.get(`${stem}es`);
      if (parent) out.push({ table: s.name, column: c, parent });
    }
  }
  return out;
}
