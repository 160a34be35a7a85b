/**
 * The app's own triggers. One that writes a synced table (an audit row, an
 * `updated_at` stamp, a counter) runs at its origin, where our triggers capture
 * what it writes like any other write, and other nodes get those writes as
 * records. Fired again there by replay, it would write them twice: one audit row
 * more, an `updated_at` of the receiver's time, never logged, so the nodes would
 * differ for good. Such a trigger gets our guard (`_unisync_applying`, the row
 * replay holds) added to its WHEN clause and stays quiet while replay writes.
 * A trigger that writes nothing synced (an FTS index kept by triggers, an
 * excluded table, a RAISE check) keeps firing: replay must keep those up to date
 * on every node.
 * The original text is kept in _unisync_app_triggers; `unisync forget` puts it back.
 */
import type { Database } from "better-sqlite3";
import { REPLAY_GUARD } from "../db/internal.js";
import { quoteIdent } from "../db/schema.js";

interface Token {
  text: string;
  /** Upper-cased word, or the name inside quotes for a quoted identifier; "" for other tokens. */
  word: string;
  start: number;
  end: number;
  quoted: boolean;
}

/** SQL tokens, without whitespace and comments. Strings are one token each (word ""). */
function tokenize(sql: string): Token[] {
  const out: Token[] = [];
  let i = 0;
  while (i < sql.length) {
    const c = sql[i];
    if (/\s/.test(c)) {
      i++;
    } else if (c === "-" && sql[i + 1] === "-") {
      while (i < sql.length && sql[i] !== "\n") i++;
    } else if (c === "/" && sql[i + 1] === "*") {
      const close = sql.indexOf("*/", i + 2);
      i = close < 0 ? sql.length : close + 2;
    } else if (c === "'" || c === '"' || c === "`" || c === "[") {
      const closer = c === "[" ? "]" : c;
      let j = i + 1;
      for (; j < sql.length; j++) {
        if (sql[j] !== closer) continue;
        if (closer !== "]" && sql[j + 1] === closer) j++; // a doubled quote stands for itself
        else break;
      }
      const inner = sql.slice(i + 1, j).split(closer + closer).join(closer);
      out.push({ text: sql.slice(i, j + 1), word: c === "'" ? "" : inner, start: i, end: j + 1, quoted: c !== "'" });
      i = j + 1;
    } else if (/[A-Za-z_\u0080-\uffff]/.test(c)) {
      let j = i + 1;
      while (j < sql.length && /[A-Za-z0-9_$\u0080-\uffff]/.test(sql[j])) j++;
      out.push({ text: sql.slice(i, j), word: sql.slice(i, j).toUpperCase(), start: i, end: j, quoted: false });
      i = j;
    } else {
      out.push({ text: c, word: "", start: i, end: i + 1, quoted: false });
      i++;
    }
  }
  return out;
}

/** Index of the trigger's BEGIN (the end of its header), or -1. */
function beginOf(tokens: Token[]): number {
  return tokens.findIndex((t) => !t.quoted && t.word === "BEGIN");
}

/** A table name at `i` (maybe `schema.name`): the name, lower-cased, and whether it is in main. */
function tableNameAt(tokens: Token[], i: number): { name: string; main: boolean } | null {
  const first = tokens[i];
  if (!first || !first.word) return null;
  if (tokens[i + 1]?.text === "." && tokens[i + 2]?.word) return { name: tokens[i + 2].word.toLowerCase(), main: first.word.toLowerCase() === "main" };
  return { name: first.word.toLowerCase(), main: true };
}

/**
 * The tables of the main schema a trigger's body writes (INSERT/REPLACE INTO,
 * UPDATE, DELETE FROM), lower-cased. An upsert's DO UPDATE writes the table of its insert.
 */
export function tablesWritten(sql: string): Set<string> {
  const tokens = tokenize(sql);
  const out = new Set<string>();
  for (let i = Math.max(0, beginOf(tokens)) + 1; i < tokens.length; i++) {
    const t = tokens[i];
    if (t.quoted) continue;
    let at = -1;
    if (t.word === "INSERT" || t.word === "UPDATE") {
      at = i + 1;
      if (tokens[at]?.word === "OR") at += 2; // INSERT OR REPLACE, UPDATE OR IGNORE
      if (t.word === "INSERT") at = tokens[at]?.word === "INTO" ? at + 1 : -1;
      else if (tokens[at]?.word === "SET") at = -1; // ON CONFLICT ... DO UPDATE SET
    } else if (t.word === "REPLACE" && tokens[i + 1]?.word === "INTO") at = i + 2;
    else if (t.word === "DELETE" && tokens[i + 1]?.word === "FROM") at = i + 2;
    if (at < 0) continue;
    const name = tableNameAt(tokens, at);
    if (name?.main) out.add(name.name);
  }
  return out;
}

/** The trigger's text with our guard ANDed into its WHEN clause (added if it has none), or null if it has no BEGIN. */
export function guardedSql(sql: string): string | null {
  const tokens = tokenize(sql);
  const b = beginOf(tokens);
  if (b < 0) return null;
  const begin = tokens[b].start;
  const when = tokens.slice(0, b).findIndex((t) => !t.quoted && t.word === "WHEN");
  if (when < 0) return `${sql.slice(0, begin)}WHEN ${REPLAY_GUARD} ${sql.slice(begin)}`;
  const w = tokens[when];
  return `${sql.slice(0, w.end)} (${sql.slice(w.end, begin).trim()}) AND ${REPLAY_GUARD} ${sql.slice(begin)}`;
}

export interface AppTriggerReport {
  /** Triggers guarded now (they write a synced table). */
  guarded: string[];
  /** Guarded triggers that also write tables that are not synced: those miss replayed changes. */
  mixed: { trigger: string; unsynced: string[] }[];
  /** Triggers that write synced tables but could not be guarded (their text defeated the reader): left as they are. */
  failed: { trigger: string; error: string }[];
}

/**
 * Guards every app trigger that writes a synced table (`synced`: the synced
 * tables' names) and forgets originals of triggers that are gone. Must run
 * inside a write transaction.
 */
export function guardAppTriggers(db: Database, synced: ReadonlySet<string>): AppTriggerReport {
  const report: AppTriggerReport = { guarded: [], mixed: [], failed: [] };
  const syncedLower = new Set([...synced].map((s) => s.toLowerCase()));
  const triggers = db
    .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name NOT LIKE '\\_unisync\\_%' ESCAPE '\\' AND sql IS NOT NULL")
    .all() as { name: string; sql: string }[];
  db.prepare(`DELETE FROM _unisync_app_triggers WHERE name NOT IN (SELECT name FROM sqlite_master WHERE type = 'trigger')`).run();
  for (const t of triggers) {
    if (t.sql.includes("_unisync_applying")) continue; // guarded already
    const written = [...tablesWritten(t.sql)];
    if (!written.some((w) => syncedLower.has(w))) continue;
    const guarded = guardedSql(t.sql);
    if (!guarded) continue;
    try {
      // A savepoint: a text the reader got wrong fails to parse, and the trigger stays as it was.
      db.transaction(() => {
        db.prepare("INSERT OR REPLACE INTO _unisync_app_triggers(name, sql) VALUES (?, ?)").run(t.name, t.sql);
        db.exec(`DROP TRIGGER ${quoteIdent(t.name)}`);
        db.exec(guarded);
      })();
    } catch (err) {
      report.failed.push({ trigger: t.name, error: (err as Error).message });
      continue;
    }
    report.guarded.push(t.name);
    const unsynced = written.filter((w) => !syncedLower.has(w));
    if (unsynced.length > 0) report.mixed.push({ trigger: t.name, unsynced });
  }
  return report;
}
