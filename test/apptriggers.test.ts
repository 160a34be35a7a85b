/**
 * The app's own triggers (capture/apptriggers.ts). A trigger that writes a synced
 * table (an audit row, an updated_at stamp) must not fire again when replay writes:
 * what it wrote at the origin arrives in the log. A trigger that keeps an FTS index
 * (not synced) must fire, or search on the other nodes misses replayed rows.
 */
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, describe, expect, it } from "vitest";
import { guardAppTriggers, guardedSql, tablesWritten } from "../src/capture/apptriggers.js";
import { INTERNAL_DDL } from "../src/db/internal.js";
import { forgetUnisync } from "../src/db/internal.js";
import { FileStore } from "../src/store/file.js";
import { appConnection, openSync } from "./helpers/node.js";

const root = mkdtempSync(join(tmpdir(), "unisync-apptriggers-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const SCHEMA = `
CREATE TABLE post(id INTEGER PRIMARY KEY, title TEXT, updated_at TEXT);
CREATE TABLE audit(id INTEGER PRIMARY KEY, what TEXT);
CREATE VIRTUAL TABLE post_fts USING fts5(title, content='post', content_rowid='id');
-- An audit trail and an updated_at stamp: both write synced tables.
CREATE TRIGGER post_audit AFTER INSERT ON post BEGIN INSERT INTO audit(what) VALUES ('added ' || NEW.title); END;
CREATE TRIGGER "post touch" AFTER UPDATE OF title ON post WHEN NEW.title IS NOT OLD.title
  BEGIN UPDATE post SET updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') || ' ' || random() WHERE id = NEW.id; END;
-- The FTS index kept by triggers, as SQLite's documentation shows: not synced.
CREATE TRIGGER post_ai AFTER INSERT ON post BEGIN INSERT INTO post_fts(rowid, title) VALUES (new.id, new.title); END;
CREATE TRIGGER post_ad AFTER DELETE ON post BEGIN INSERT INTO post_fts(post_fts, rowid, title) VALUES ('delete', old.id, old.title); END;
CREATE TRIGGER post_au AFTER UPDATE ON post BEGIN
  INSERT INTO post_fts(post_fts, rowid, title) VALUES ('delete', old.id, old.title);
  INSERT INTO post_fts(rowid, title) VALUES (new.id, new.title);
END;
`;

describe("the app's own triggers", () => {
  it("knows which tables a trigger writes, and adds the guard to its WHEN clause", () => {
    expect([...tablesWritten(`CREATE TRIGGER t AFTER UPDATE OF x ON a BEGIN
      -- INSERT INTO commented
      INSERT OR REPLACE INTO "Log Table"(v) VALUES ('UPDATE b SET x = 1');
      UPDATE OR IGNORE main.c SET x = 1;
      DELETE FROM [d] WHERE x IN (SELECT x FROM e);
      REPLACE INTO temp.f VALUES (1);
      INSERT INTO g(v) VALUES (replace('a', 'b', 'c')) ON CONFLICT(v) DO UPDATE SET v = 1;
    END`)].sort()).toEqual(["c", "d", "g", "log table"]);
    expect(guardedSql("CREATE TRIGGER t AFTER INSERT ON a BEGIN SELECT 1; END")).toBe(
      "CREATE TRIGGER t AFTER INSERT ON a WHEN NOT EXISTS (SELECT 1 FROM _unisync_applying) BEGIN SELECT 1; END",
    );
    expect(guardedSql("CREATE TRIGGER t AFTER INSERT ON a FOR EACH ROW WHEN new.x > 1 OR new.y BEGIN SELECT 1; END")).toBe(
      "CREATE TRIGGER t AFTER INSERT ON a FOR EACH ROW WHEN (new.x > 1 OR new.y) AND NOT EXISTS (SELECT 1 FROM _unisync_applying) BEGIN SELECT 1; END",
    );
  });

  it("leaves a trigger it cannot read as it was, and says so", () => {
    const db = new Database(":memory:");
    db.exec(INTERNAL_DDL);
    // A column named like the keyword BEGIN (SQLite allows it): the guard would land in the wrong place.
    db.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, begin TEXT); CREATE TABLE log(what TEXT)");
    const sql = "CREATE TRIGGER odd AFTER UPDATE OF begin ON t BEGIN INSERT INTO log VALUES (NEW.begin); END";
    db.exec(sql);
    const report = db.transaction(() => guardAppTriggers(db, new Set(["t", "log"])))();
    expect(report.guarded).toEqual([]);
    expect(report.failed.map((f) => f.trigger)).toEqual(["odd"]);
    expect(db.prepare("SELECT sql FROM sqlite_master WHERE name = 'odd'").pluck().get()).toBe(sql);
    db.exec("INSERT INTO t VALUES (1, 'a'); UPDATE t SET begin = 'b'");
    expect(db.prepare("SELECT what FROM log").pluck().all()).toEqual(["b"]);
  });

  it("an audit trigger and an updated_at trigger write once, on their origin; an FTS index stays up to date everywhere; forget restores them", async () => {
    const dir = join(root, "c1");
    mkdirSync(dir, { recursive: true });
    const store = new FileStore(join(dir, "store"));
    const nodes = ["a", "b"].map((name) => {
      const path = join(dir, `${name}.db`);
      const app = appConnection(path);
      app.exec(SCHEMA);
      return { name, path, app, sync: openSync(path, name, store) };
    });
    const [a, b] = nodes;
    const ship = async (x: (typeof nodes)[number]) => {
      x.sync.sealPending();
      await x.sync.upload();
    };
    const settle = async () => {
      for (let round = 0; round < 2; round++) {
        for (const x of nodes) await ship(x);
        for (const x of nodes) for (const o of nodes) if (o !== x) while ((await x.sync.pull(o.name, 50)) > 0);
      }
    };
    a.app.exec("INSERT INTO post(id, title) VALUES (1, 'apples'), (2, 'pears')");
    a.app.exec("UPDATE post SET title = 'green apples' WHERE id = 1");
    b.app.exec("INSERT INTO post(id, title) VALUES (1000, 'plums')");
    await settle();
    b.app.exec("UPDATE post SET title = 'ripe pears' WHERE id = 2");
    a.app.exec("DELETE FROM post WHERE id = 1000");
    await settle();
    const rows = (x: (typeof nodes)[number], sql: string) => x.app.prepare(sql).raw(true).all();
    for (const sql of ["SELECT id, title, updated_at FROM post ORDER BY id", "SELECT id, what FROM audit ORDER BY id"]) {
      expect(rows(b, sql), sql).toEqual(rows(a, sql));
    }
    // One audit row per post written, wherever it was written.
    expect(rows(a, "SELECT what FROM audit ORDER BY what").flat()).toEqual(["added apples", "added pears", "added plums"]);
    expect(rows(a, "SELECT count(*) FROM post WHERE updated_at IS NOT NULL").flat()).toEqual([2n]);
    for (const x of nodes) {
      expect(rows(x, "SELECT rowid FROM post_fts WHERE post_fts MATCH 'apples OR pears OR plums' ORDER BY rowid").flat(), x.name).toEqual([1n, 2n]);
      expect(rows(x, "SELECT rowid FROM post_fts WHERE post_fts MATCH 'ripe'").flat(), x.name).toEqual([2n]);
    }
    // The app still writes through its triggers, and forget gives them back as the app wrote them.
    const original = (name: string) => new Database(":memory:").exec(SCHEMA).prepare("SELECT sql FROM sqlite_master WHERE name = ?").pluck().get(name);
    const sqlOf = (x: (typeof nodes)[number], name: string) => x.app.prepare("SELECT sql FROM sqlite_master WHERE name = ?").pluck().get(name);
    expect(sqlOf(a, "post_audit")).not.toBe(original("post_audit"));
    expect(sqlOf(a, "post_ai")).toBe(original("post_ai"));
    for (const x of nodes) x.sync.close();
    forgetUnisync(a.app);
    for (const name of ["post_audit", "post touch", "post_ai", "post_au"]) expect(sqlOf(a, name), name).toBe(original(name));
    a.app.exec("INSERT INTO post(id, title) VALUES (3, 'figs')");
    expect(rows(a, "SELECT count(*) FROM audit WHERE what = 'added figs'").flat()).toEqual([1n]);
    for (const x of nodes) x.app.close();
  });
});
