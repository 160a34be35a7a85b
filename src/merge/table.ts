/** Row-level access to one user table, by column name, with cached statements. */
import type { Database, Statement } from "better-sqlite3";
import { quoteIdent, type TableShape } from "../db/schema.js";
import type { SqlValue } from "../log/value.js";

export class TableAccess {
  private readonly statements = new Map<string, Statement>();
  private readonly t: string;

  constructor(
    private readonly db: Database,
    readonly shape: TableShape,
  ) {
    this.t = quoteIdent(shape.name);
    this.known = new Set(shape.columns);
  }

  private stmt(sql: string, reader = false): Statement {
    let s = this.statements.get(sql);
    if (!s) {
      s = this.db.prepare(sql);
      if (reader) s.safeIntegers(true);
      this.statements.set(sql, s);
    }
    return s;
  }

  /**
   * A WHERE clause matching one row by its key; IS also matches NULL key parts.
   * Without a declared key, rows that differ only in storage class (1 and 1.0)
   * are different rows, so the class must match too.
   */
  private where(key: string[]): string {
    if (this.shape.hasDeclaredKey) return key.map((c) => `${quoteIdent(c)} IS ?`).join(" AND ");
    // Named parameters let each value be used twice (see keyArgs).
    return key.map((c, i) => `${quoteIdent(c)} IS @k${i} AND typeof(${quoteIdent(c)}) = typeof(@k${i})`).join(" AND ");
  }

  /** Key values bound the way where() expects them. */
  private keyArgs(keyValues: SqlValue[]): SqlValue[] | [Record<string, SqlValue>] {
    if (this.shape.hasDeclaredKey) return keyValues;
    return [Object.fromEntries(keyValues.map((v, i) => [`k${i}`, v]))];
  }

  /** Rowid tables without a declared key can hold duplicates: touch exactly one of them. */
  private oneRow(key: string[]): string {
    return this.shape.hasDeclaredKey ? this.where(key) : `rowid = (SELECT rowid FROM ${this.t} WHERE ${this.where(key)} LIMIT 1)`;
  }

  find(key: string[], keyValues: SqlValue[]): Map<string, SqlValue> | null {
    const cols = this.shape.columns.map(quoteIdent).join(", ");
    const row = this.stmt(`SELECT ${cols} FROM ${this.t} WHERE ${this.where(key)} LIMIT 1`, true).raw(true).get(...this.keyArgs(keyValues)) as SqlValue[] | undefined;
    if (!row) return null;
    return new Map(this.shape.columns.map((c, i) => [c, row[i]]));
  }

  /** Rows whose `column` equals `value`, at most `limit` (children of a moved or deleted row; rare, so no index is assumed). */
  rowsWhere(column: string, value: SqlValue, limit = -1): Map<string, SqlValue>[] {
    const cols = this.shape.columns.map(quoteIdent).join(", ");
    const rows = this.stmt(`SELECT ${cols} FROM ${this.t} WHERE ${quoteIdent(column)} = ? LIMIT ?`, true).raw(true).all(value, limit) as SqlValue[][];
    return rows.map((row) => new Map(this.shape.columns.map((c, i) => [c, row[i]])));
  }

  /** Column lists of the table's UNIQUE constraints and indexes other than its key (read once). */
  private uniqueSets: string[][] | null = null;

  private uniqueColumns(): string[][] {
    if (!this.uniqueSets) {
      const indexes = this.db.prepare(`PRAGMA main.index_list(${this.t})`).all() as { name: string; unique: number; origin: string }[];
      this.uniqueSets = indexes
        .filter((i) => i.unique === 1 && i.origin !== "pk")
        .map((i) => (this.db.prepare(`PRAGMA main.index_info(${quoteIdent(i.name)})`).all() as { name: string | null }[]).map((c) => c.name))
        .filter((cols): cols is string[] => cols.length > 0 && cols.every((c) => c !== null && this.known.has(c)));
    }
    return this.uniqueSets;
  }

  /**
   * The key of another row that holds the same values as `row` in the columns
   * of a UNIQUE constraint (what made a write fail), or null.
   */
  uniqueClash(row: Map<string, SqlValue>, key: string[], keyValues: SqlValue[]): SqlValue[] | null {
    const keyCols = key.map(quoteIdent).join(", ");
    for (const cols of this.uniqueColumns()) {
      const vals = cols.map((c) => row.get(c) ?? null);
      if (vals.some((v) => v === null)) continue; // NULLs never clash in SQLite
      const found = this.stmt(`SELECT ${keyCols} FROM ${this.t} WHERE ${cols.map((c) => `${quoteIdent(c)} = ?`).join(" AND ")} AND NOT (${this.where(key)})`, true)
        .raw(true)
        .get(...vals, ...keyValues) as SqlValue[] | undefined;
      if (found) return found;
    }
    return null;
  }

  /** How many rows hold exactly these values in these columns (for tables without a key). */
  copies(key: string[], keyValues: SqlValue[]): number {
    return Number(this.stmt(`SELECT count(*) FROM ${this.t} WHERE ${this.where(key)}`).pluck(true).get(...this.keyArgs(keyValues)));
  }

  private readonly known: Set<string>;
  private readonly defaults = new Map<string, SqlValue>();

  /** The value SQLite gives `column` when an INSERT leaves it out (its declared constant DEFAULT, or NULL). */
  defaultValue(column: string): SqlValue {
    if (!this.defaults.has(column)) {
      const expr = this.shape.defaults[column];
      let v: SqlValue = null;
      if (expr !== null && expr !== undefined) {
        try {
          v = (this.db.prepare(`SELECT (${expr})`).raw(true).safeIntegers(true).get() as SqlValue[])[0];
        } catch {
          v = null; // not a constant expression: nothing to reproduce here
        }
      }
      this.defaults.set(column, v);
    }
    return this.defaults.get(column) as SqlValue;
  }

  /** Whether the table has this column now. */
  has(column: string): boolean {
    return this.known.has(column);
  }
  /** INSERT statements by column list (joined names) and conflict clause, built once each. */
  private readonly inserts = new Map<string, { cols: string[]; stmt: Statement }>();

  /** The INSERT of these columns (those the table has) with a conflict clause `tail`. */
  private insertStatement(names: readonly string[], tail: string): { cols: string[]; stmt: Statement } {
    const id = `${names.join("\u0000")}\u0000${tail}`;
    let ins = this.inserts.get(id);
    if (!ins) {
      const cols = names.filter((c) => this.known.has(c));
      const stmt = this.db.prepare(`INSERT INTO ${this.t}(${cols.map(quoteIdent).join(", ")}) VALUES (${cols.map(() => "?").join(", ")})${tail}`);
      ins = { cols, stmt };
      this.inserts.set(id, ins);
    }
    return ins;
  }

  /** Runs an INSERT of `values` (`tail`: a conflict clause); returns the rows it wrote. */
  private runInsert(values: Map<string, SqlValue>, tail: string): number {
    const ins = this.insertStatement([...values.keys()], tail);
    return ins.stmt.run(...ins.cols.map((c) => values.get(c) as SqlValue)).changes;
  }

  /** insertNew's statements by a record's column list (segments share one list among their rows). */
  private readonly newInsertsByList = new WeakMap<readonly string[], Statement | null>();

  /**
   * insertNew for values in the order of `columns`, every one a column of the
   * table, bound as they are (no Map per row): replay's fresh inserts.
   */
  insertNewRow(columns: readonly string[], values: readonly SqlValue[]): boolean {
    let stmt = this.newInsertsByList.get(columns);
    if (stmt === undefined) {
      const ins = this.insertStatement(columns, " ON CONFLICT DO NOTHING");
      stmt = ins.cols.length === columns.length ? ins.stmt : null;
      this.newInsertsByList.set(columns, stmt);
    }
    if (stmt === null) return this.insertNew(new Map(columns.map((c, i) => [c, values[i]])));
    return stmt.run(...values).changes === 1;
  }

  insert(values: Map<string, SqlValue>): void {
    this.runInsert(values, "");
  }

  /**
   * Inserts a row unless it clashes with one there on its key or a UNIQUE
   * constraint: then nothing is written and it returns false. Other errors
   * (NOT NULL, CHECK, foreign keys) throw as insert's do.
   */
  private insertNew(values: Map<string, SqlValue>): boolean {
    return this.runInsert(values, " ON CONFLICT DO NOTHING") === 1;
  }

  /** Only for tables with a declared key (rows of the others never change in place). */
  update(key: string[], keyValues: SqlValue[], values: Map<string, SqlValue>): void {
    const cols = [...values.keys()].filter((c) => this.shape.columns.includes(c));
    if (cols.length === 0) return;
    const sql = `UPDATE ${this.t} SET ${cols.map((c) => `${quoteIdent(c)} = ?`).join(", ")} WHERE ${this.oneRow(key)}`;
    this.stmt(sql).run(...cols.map((c) => values.get(c) as SqlValue), ...keyValues);
  }

  /** Returns whether a row was there. */
  delete(key: string[], keyValues: SqlValue[]): boolean {
    return this.stmt(`DELETE FROM ${this.t} WHERE ${this.oneRow(key)}`).run(...this.keyArgs(keyValues)).changes > 0;
  }
}
