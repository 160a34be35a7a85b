/**
 * Capture with the app's own SQLite: Python's sqlite3 module (SQLite 3.40 here)
 * writes through unisync's generated triggers; every value must come out of the
 * log with its exact storage class and bits, and replay into a second node must
 * reproduce the tables exactly.
 */
import Database from "better-sqlite3";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { triggerSql } from "../src/capture/triggers.js";
import { discoverTables, undeclaredReferences } from "../src/db/schema.js";
import { decodeSegment, openSegment, type LogRecord } from "../src/log/segment.js";
import { parseSegmentKey } from "../src/log/keys.js";
import { FileStore } from "../src/store/file.js";
import { listAll } from "../src/store/store.js";
import { compareDatabases } from "./helpers/checker.js";
import { openSync } from "./helpers/node.js";

const root = mkdtempSync(join(tmpdir(), "unisync-capture-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const PY = "/usr/bin/python3";
const python = (db: string, code: string) => execFileSync(PY, ["-c", `import sqlite3\nc = sqlite3.connect(${JSON.stringify(db)})\n${code}\nc.commit()\nc.close()`], { encoding: "utf8" });

const SCHEMA = `
c.executescript('''
CREATE TABLE plain(id INTEGER PRIMARY KEY, i INTEGER, r REAL, t TEXT, b BLOB, u, n NUMERIC);
CREATE TABLE "we""ird name"("col with space" TEXT PRIMARY KEY, "select" INTEGER);
CREATE TABLE pair(a TEXT, b INTEGER, v, PRIMARY KEY(a, b)) WITHOUT ROWID;
CREATE TABLE bag(x, y);
CREATE TABLE gen(id INTEGER PRIMARY KEY, w REAL, twice REAL GENERATED ALWAYS AS (w * 2) VIRTUAL);
CREATE TABLE alembic_version(version_num TEXT PRIMARY KEY);
''')`;

const WRITES = `
vals = [None, 0, -1, -(2**63), 2**63 - 1, 2**53 + 1, 0.1 + 0.2, 5e-324, 1.7976931348623157e308, -1e-300, 1.0,
        '', 'emoji 😀', 'nul\\x00inside', 'e\\u0301', '中文', "quote ' and \\" and \\n", b'', b'\\x00\\xff' * 7]
for k, v in enumerate(vals):
    c.execute('INSERT INTO plain(id, i, r, t, b, u, n) VALUES (?, ?, ?, ?, ?, ?, ?)', (k + 1, v, v, v, v, v, v))
    c.execute('INSERT INTO "we""ird name" VALUES (?, ?)', ('k' + str(k), v))
    c.execute('INSERT INTO pair VALUES (?, ?, ?)', ('p', k, v))
    c.execute('INSERT INTO bag VALUES (?, ?)', (v, 1))
c.execute('INSERT INTO bag VALUES (1, 1)')
c.execute('INSERT INTO bag VALUES (1, 1)')
c.execute('INSERT INTO gen(id, w) VALUES (1, 2.5)')
c.execute('INSERT INTO alembic_version VALUES (?)', ('abc123',))
c.execute('UPDATE plain SET u = ? WHERE id = 3', (b'new',))
c.execute('UPDATE plain SET u = u WHERE id = 4')
c.execute('UPDATE plain SET id = 100 WHERE id = 5')
c.execute('UPDATE pair SET v = 42 WHERE a = ? AND b = 2', ('p',))
c.execute('DELETE FROM plain WHERE id = 6')
c.execute('DELETE FROM bag WHERE rowid = (SELECT max(rowid) FROM bag)')
c.execute('UPDATE bag SET y = 2 WHERE x = 0.1 + 0.2')
`;

async function segmentsOf(store: FileStore): Promise<LogRecord[]> {
  const records: LogRecord[] = [];
  for await (const o of listAll(store, "log/")) {
    const name = parseSegmentKey(o.key);
    if (name) records.push(...openSegment((await store.get(o.key)) as Buffer, name.sha256).records);
  }
  return records;
}

describe("capture through the app's SQLite", () => {
  const store = new FileStore(join(root, "store"));
  const src = join(root, "src.db");
  const dst = join(root, "dst.db");

  it("records every value exactly and replays to an identical table", async () => {
    python(src, SCHEMA);
    python(dst, SCHEMA);
    const a = openSync(src, "a", store);
    const b = openSync(dst, "b", store);
    python(src, WRITES);
    a.sealPending();
    await a.upload();
    const records = await segmentsOf(store);
    const tables = new Set(records.map((r) => r.row?.table));
    expect(tables).toEqual(new Set(["plain", 'we"ird name', "pair", "bag", "gen"])); // alembic_version is never synced
    // A no-op update is not a change; a key update is a delete plus an insert.
    const plainOps = records.filter((r) => r.row?.table === "plain").map((r) => r.row?.op);
    expect(plainOps.filter((op) => op === 2)).toHaveLength(1);
    expect(plainOps.filter((op) => op === 3)).toHaveLength(2);
    const update = records.find((r) => r.row?.table === "plain" && r.row.op === 2)?.row;
    expect(update?.changed.map((i) => update.columns[i])).toEqual(["u"]);
    // Generated columns are computed on every node, never shipped.
    expect(records.find((r) => r.row?.table === "gen")?.row?.columns).toEqual(["id", "w"]);
    // Clocks grow along the log.
    const clocks = records.map((r) => r.hlc);
    expect([...clocks].sort((x, y) => x - y)).toEqual(clocks);

    while ((await b.pull("a")) > 0);
    a.close();
    b.close();
    const diffs = compareDatabases([src, dst]).filter((d) => !d.includes("alembic_version"));
    expect(diffs).toEqual([]);
  });

  it("follows schema changes made while running", async () => {
    const a = openSync(src, "a", store);
    const b = openSync(dst, "b", store);
    python(src, "c.execute('ALTER TABLE plain ADD COLUMN extra TEXT')\nc.execute('CREATE TABLE later(k TEXT PRIMARY KEY, v)')\nc.execute(\"INSERT INTO later VALUES ('x', 1.5)\")\nc.execute(\"UPDATE plain SET extra = 'hi' WHERE id = 1\")");
    a.sealPending();
    await a.upload();
    await b.pull("a");
    // b has neither the column nor the table yet: kept, not lost.
    expect(b.parkedCount()).toBe(2);
    python(dst, "c.execute('ALTER TABLE plain ADD COLUMN extra TEXT')\nc.execute('CREATE TABLE later(k TEXT PRIMARY KEY, v)')");
    b.refreshSchema();
    expect(b.parkedCount()).toBe(0);
    a.close();
    b.close();
    expect(compareDatabases([src, dst]).filter((d) => !d.includes("alembic_version"))).toEqual([]);
  });

  it("generates trigger SQL that old SQLite versions understand", () => {
    const a = openSync(src, "a", store);
    for (const shape of discoverTables(a.db, [])) {
      for (const t of triggerSql(shape, 1)) {
        expect(t.sql).not.toMatch(/json_|RETURNING|ON CONFLICT|->>|UPSERT|iif\(|unixepoch|FILTER|OVER\s*\(/i);
      }
    }
    a.close();
  });

  it("decodeSegment refuses bytes that are not a segment", () => {
    expect(() => decodeSegment(Buffer.from([0xff, 0xff, 0xff, 0xff, 0x0f]))).toThrow();
  });
});

describe("wide tables", () => {
  it("captures updates of tables with more columns than an integer mask holds", async () => {
    const store = new FileStore(join(root, "wide-store"));
    const cols = Array.from({ length: 80 }, (_, i) => `c${i} TEXT`).join(", ");
    const paths = ["wa.db", "wb.db"].map((f) => join(root, f));
    for (const p of paths) python(p, `c.execute('CREATE TABLE wide(id INTEGER PRIMARY KEY, ${cols})')`);
    const a = openSync(paths[0], "a", store);
    const b = openSync(paths[1], "b", store);
    python(paths[0], "c.execute('INSERT INTO wide(id, c0, c79) VALUES (1, \\'first\\', \\'last\\')')\nc.execute('UPDATE wide SET c70 = \\'x\\' WHERE id = 1')");
    a.sealPending();
    await a.upload();
    await b.pull("a");
    // b changes another column concurrently-late: per-column merge keeps both edits.
    b.db.prepare("UPDATE wide SET c5 = 'from b' WHERE id = 1").run();
    b.sealPending();
    await b.upload();
    await a.pull("b");
    a.close();
    b.close();
    expect(compareDatabases(paths)).toEqual([]);
    const db = new Database(paths[0], { readonly: true });
    expect(db.prepare("SELECT c0, c5, c70, c79 FROM wide").get()).toEqual({ c0: "first", c5: "from b", c70: "x", c79: "last" });
    db.close();
  });
});

describe("schema discovery", () => {
  it("names columns that look like references but are not declared foreign keys", () => {
    const db = new Database(":memory:");
    db.exec(`
      CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT);
      CREATE TABLE category(id INTEGER PRIMARY KEY, label TEXT);
      CREATE TABLE code(id TEXT PRIMARY KEY);
      CREATE TABLE post(id INTEGER PRIMARY KEY, user_id INTEGER, category_id INTEGER REFERENCES category(id), code_id TEXT, other_id INTEGER);
      CREATE TABLE tagging(post_id INTEGER, user_id INTEGER REFERENCES users(id));
    `);
    const found = undeclaredReferences(discoverTables(db, []));
    // Declared ones, a parent whose ids cannot collide (TEXT key) and names without a table are left out.
    expect(found).toEqual([
      { table: "post", column: "user_id", parent: "users" },
      { table: "tagging", column: "post_id", parent: "post" },
    ]);
    db.close();
  });
});

describe("a table dropped and created again", () => {
  it("says loudly that rows went without a delete being recorded (they stay on other nodes)", async () => {
    const { default: pino } = await import("pino");
    const { mkdtempSync } = await import("node:fs");
    const lines: string[] = [];
    const log = pino({ level: "info" }, { write: (s: string) => lines.push(s) });
    const dir = mkdtempSync(join(tmpdir(), "unisync-wipe-"));
    const path = join(dir, "app.db");
    const app = new Database(path);
    app.exec("CREATE TABLE post(id INTEGER PRIMARY KEY, title TEXT); INSERT INTO post(title) VALUES ('one'), ('two'), ('three')");
    const sync = openSync(path, "n1", new FileStore(join(dir, "store")), undefined, { log });
    sync.sealPending();
    // A migration that rebuilds the table keeps its rows: nothing to say.
    app.exec("CREATE TABLE post_new(id INTEGER PRIMARY KEY, title TEXT); INSERT INTO post_new SELECT * FROM post; DROP TABLE post; ALTER TABLE post_new RENAME TO post");
    sync.sealPending();
    expect(lines.filter((l) => l.includes("lost rows"))).toEqual([]);
    // An "init-db" drops it and starts empty.
    app.exec("DROP TABLE post; CREATE TABLE post(id INTEGER PRIMARY KEY, title TEXT)");
    sync.sealPending();
    const said = lines.map((l) => JSON.parse(l) as { msg: string; table?: string; rowsHere?: number; rowsTheClusterHas?: number }).filter((l) => l.msg.includes("lost rows"));
    expect(said.map((l) => [l.table, l.rowsHere, l.rowsTheClusterHas])).toEqual([["post", 0, 3]]);
    sync.close();
    app.close();
  });
});
