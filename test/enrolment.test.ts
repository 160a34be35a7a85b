/**
 * Enrolment never rewinds (issue 9, DESIGN invariant 10): rows a database held
 * before unisync met it have an unknown time. A node that joins late with an old
 * copy converges to the cluster (its stale values and deleted rows lose, its new
 * rows spread); copies of one database edited apart merge into one row per id,
 * with the differences listed; independentDatabases keeps both.
 */
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, describe, expect, it } from "vitest";
import type { DbSync, DbSyncOptions } from "../src/stream/dbsync.js";
import { readEnrolments } from "../src/replay/enrolments.js";
import { FileStore } from "../src/store/file.js";
import { compareDatabases } from "./helpers/checker.js";
import { appConnection, openSync } from "./helpers/node.js";

const root = mkdtempSync(join(tmpdir(), "unisync-enrol-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const SCHEMA = `
CREATE TABLE kv(k TEXT PRIMARY KEY, v);
CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER);
CREATE TABLE tag(label TEXT, n);
CREATE TABLE part(id INTEGER PRIMARY KEY, item_id INTEGER REFERENCES item(id));
CREATE TABLE batch(id INTEGER PRIMARY KEY, item_id INTEGER REFERENCES item(id), note TEXT);
`;

let n = 0;
/** A folder with an "original" database that nodes start from as copies. */
function setup(fill: (db: Database.Database) => void) {
  const dir = join(root, `e${++n}`);
  mkdirSync(dir, { recursive: true });
  const original = join(dir, "original.db");
  const db = new Database(original);
  db.exec(SCHEMA);
  fill(db);
  db.close();
  const store = new FileStore(join(dir, "store"));
  const nodes = new Map<string, { name: string; path: string; app: Database.Database; sync: DbSync }>();
  /** A node whose database is a copy of `from` (the original), edited by `before` while no agent ran yet. */
  const join_ = (name: string, before?: (app: Database.Database) => void, extra: Partial<DbSyncOptions> = {}, from = original) => {
    const path = join(dir, `${name}.db`);
    copyFileSync(from, path);
    const app = appConnection(path);
    before?.(app);
    // As the agent does: the log is replayed into a new database before its rows are enrolled.
    const node = { name, path, app, sync: openSync(path, name, store, undefined, { enrolAfterCatchUp: true, ...extra }) };
    node.sync.continueLog(0); // a new node name: no log of its own yet
    nodes.set(name, node);
    return node;
  };
  const ship = async (x: { sync: DbSync }) => {
    x.sync.sealPending();
    await x.sync.upload();
  };
  const pullAll = async (x: { sync: DbSync; name: string }) => {
    for (const o of nodes.keys()) if (o !== x.name) while ((await x.sync.pull(o, 50)) > 0);
    x.sync.retryParked();
    if (x.sync.enrolling) x.sync.finishEnrolment();
  };
  const settle = async () => {
    for (let round = 0; round < 2; round++) {
      for (const x of nodes.values()) await ship(x);
      for (const x of nodes.values()) await pullAll(x);
    }
  };
  const rows = (x: { app: Database.Database } | Database.Database, sql: string) => ("app" in x ? x.app : x).prepare(sql).all() as Record<string, unknown>[];
  const converged = () => compareDatabases([...nodes.values()].map((x) => x.path));
  const close = () => [...nodes.values()].forEach((x) => (x.sync.close(), x.app.close()));
  return { join: join_, ship, pullAll, settle, rows, converged, close, nodes };
}

const fill = (db: Database.Database) => {
  db.exec("INSERT INTO kv VALUES ('a', '2025'), ('b', 'keep'), ('gone', 'x')");
  db.exec("INSERT INTO item(id, name, qty) VALUES (1, 'bolt', 10), (2, 'nut', 20), (3, 'gear', 30)");
  db.exec("INSERT INTO tag VALUES ('red', 1), ('red', 1), ('blue', 2)");
};

/** A copy of a node's database as a backup tool that knows nothing of unisync keeps it (its tables stripped). */
function strippedBackup(app: Database.Database, path: string): string {
  const backup = `${path}.backup`;
  app.exec(`VACUUM INTO '${backup}'`);
  const stripped = new Database(backup);
  for (const t of stripped.prepare("SELECT type, name FROM sqlite_master WHERE name LIKE '\\_unisync\\_%' ESCAPE '\\' AND type IN ('table', 'trigger')").all() as { type: string; name: string }[]) {
    stripped.exec(`DROP ${t.type} IF EXISTS "${t.name}"`);
  }
  stripped.close();
  return backup;
}

describe("enrolment", () => {
  it("a node that joins late from an old copy converges to the cluster and does not drag it back", async () => {
    const c = setup(fill);
    const a = c.join("a");
    const b = c.join("b");
    await c.settle();
    a.app.exec("UPDATE kv SET v = '2026new' WHERE k = 'a'; DELETE FROM kv WHERE k = 'gone'; UPDATE item SET qty = 11 WHERE id = 1; DELETE FROM item WHERE id = 3");
    a.app.exec("DELETE FROM tag WHERE rowid = (SELECT min(rowid) FROM tag WHERE label = 'red')");
    await c.settle();
    expect(c.rows(b, "SELECT v FROM kv WHERE k = 'a'")).toEqual([{ v: "2026new" }]);
    // c starts from the original copy (last night's backup), with one row of its own.
    const cc = c.join("c", (app) => app.exec("INSERT INTO kv VALUES ('c-only', 'new'); INSERT INTO item(id, name, qty) VALUES (4, 'spring', 40)"));
    await c.settle();
    expect(c.converged()).toEqual([]);
    for (const x of [a, b, cc]) {
      expect(c.rows(x, "SELECT k, v FROM kv ORDER BY k")).toEqual([
        { k: "a", v: "2026new" },
        { k: "b", v: "keep" },
        { k: "c-only", v: "new" },
      ]);
      expect(c.rows(x, "SELECT id, name, qty FROM item ORDER BY id")).toEqual([
        { id: 1n, name: "bolt", qty: 11n },
        { id: 2n, name: "nut", qty: 20n },
        { id: 4n, name: "spring", qty: 40n },
      ]);
      // The deleted copy of a keyless row does not come back, and equal copies do not double.
      expect(c.rows(x, "SELECT label, n FROM tag ORDER BY label")).toEqual([
        { label: "blue", n: 2n },
        { label: "red", n: 1n },
      ]);
      expect(c.rows(x.sync.db, "SELECT count(*) AS n FROM _unisync_moves")).toEqual([{ n: 0 }]);
    }
    // What c's enrolment did: c replayed the log first, which met the six rows of its copy
    // that the cluster had (kv a, b, gone; items 1-3); it enrolled only its two new rows.
    const sum = (db: Database.Database, k: "rows" | "added" | "same" | "older" | "differed") =>
      readEnrolments(db).filter((e) => e.origin === "c").reduce((t, e) => t + e[k], 0);
    expect(sum(cc.sync.db, "same") + sum(cc.sync.db, "older")).toBe(6);
    expect(sum(cc.sync.db, "added")).toBeGreaterThanOrEqual(2);
    expect(sum(a.sync.db, "added")).toBe(2);
    expect(sum(a.sync.db, "rows")).toBe(2);
    c.close();
  });

  it("copies edited apart before enrolment merge into one row per id; the differences are listed", async () => {
    const c = setup(fill);
    const a = c.join("a", (app) => app.exec("UPDATE item SET qty = 111 WHERE id = 1"));
    await c.ship(a);
    const b = c.join("b", (app) => app.exec("UPDATE item SET qty = 222 WHERE id = 1; UPDATE item SET name = 'nut2' WHERE id = 2"));
    await c.settle();
    expect(c.converged()).toEqual([]);
    for (const x of [a, b]) {
      // a enrolled first: where the copies differ, a's values are kept (nobody knows which is newer).
      expect(c.rows(x, "SELECT id, name, qty FROM item ORDER BY id")).toEqual([
        { id: 1n, name: "bolt", qty: 111n },
        { id: 2n, name: "nut", qty: 20n },
        { id: 3n, name: "gear", qty: 30n },
      ]);
      expect(c.rows(x.sync.db, "SELECT count(*) AS n FROM _unisync_moves")).toEqual([{ n: 0 }]);
    }
    const diffs = c.rows(b.sync.db, "SELECT tbl, col, kept_origin, other_origin FROM _unisync_enrol_diffs ORDER BY tbl, col");
    expect(diffs).toEqual([
      { tbl: "item", col: "name", kept_origin: "a", other_origin: "b" },
      { tbl: "item", col: "qty", kept_origin: "a", other_origin: "b" },
    ]);
    c.close();
  });

  it("independentDatabases keeps both rows that differ under one id", async () => {
    const c = setup(fill);
    const a = c.join("a", (app) => app.exec("UPDATE item SET qty = 111 WHERE id = 1"), { independentDatabases: true });
    const b = c.join("b", (app) => app.exec("UPDATE item SET qty = 222 WHERE id = 1"), { independentDatabases: true });
    await c.settle();
    expect(c.converged()).toEqual([]);
    for (const x of [a, b]) {
      expect(c.rows(x, "SELECT qty FROM item WHERE name = 'bolt' ORDER BY qty")).toEqual([{ qty: 111n }, { qty: 222n }]);
      expect(c.rows(x, "SELECT count(*) AS n FROM item")).toEqual([{ n: 4n }]);
    }
    c.close();
  });

  it("a database the app created while the agent ran holds new rows: rows written before the triggers were in are this node's inserts", async () => {
    // Both apps create their database and write before their agent installs triggers (the
    // agent meets the file at its next rescan): the rows are new, not copies of one database.
    const c = setup(() => undefined);
    const fresh = (name: string, rows: string) => {
      const path = join(root, `fresh-${n}-${name}.db`);
      const app = new Database(path);
      app.exec(SCHEMA);
      app.exec(rows);
      app.close();
      return c.join(name, undefined, { rowsAreNew: true }, path);
    };
    // batch rows point at items, and the name batch sorts before item.
    const a = fresh("a", "INSERT INTO item(name, qty) VALUES ('from a', 1), ('also a', 2); INSERT INTO kv VALUES ('theme', 'dark'); INSERT INTO tag VALUES ('x', 1); INSERT INTO batch(item_id, note) VALUES (1, 'of from a')");
    const b = fresh("b", "INSERT INTO item(name, qty) VALUES ('from b', 3); INSERT INTO kv VALUES ('theme', 'dark'); INSERT INTO tag VALUES ('x', 1); INSERT INTO batch(item_id, note) VALUES (1, 'of from b')");
    await c.settle();
    expect(c.converged()).toEqual([]);
    for (const x of [a, b]) {
      // Id 1 on both: two rows, one moved; nothing merged into another node's row.
      expect(c.rows(x, "SELECT name, qty FROM item ORDER BY qty")).toEqual([
        { name: "from a", qty: 1n },
        { name: "also a", qty: 2n },
        { name: "from b", qty: 3n },
      ]);
      expect(c.rows(x, "SELECT k, v FROM kv")).toEqual([{ k: "theme", v: "dark" }]);
      // Each child follows its own item, whichever moved.
      expect(c.rows(x, "SELECT b.note, i.name FROM batch b JOIN item i ON i.id = b.item_id ORDER BY b.note")).toEqual([
        { note: "of from a", name: "from a" },
        { note: "of from b", name: "from b" },
      ]);
      // Two inserts of an equal row into a table without a key are two rows, as with triggers in place.
      expect(c.rows(x, "SELECT count(*) AS n FROM tag")).toEqual([{ n: 2n }]);
      expect(readEnrolments(x.sync.db).filter((e) => e.table === "item")).toEqual([]);
    }
    c.close();
  });

  it("a row there before unisync under an id the cluster logged is that row: the logged values win", async () => {
    const c = setup(fill);
    const a = c.join("a");
    await c.ship(a);
    a.app.exec("INSERT INTO item(name, qty) VALUES ('logged', 5)"); // id 4, logged by a
    await c.ship(a);
    const b = c.join("b", (app) => app.exec("INSERT INTO item(id, name, qty) VALUES (4, 'before-unisync', 6)"));
    await c.settle();
    expect(c.converged()).toEqual([]);
    for (const x of [a, b]) {
      expect(c.rows(x, "SELECT id, name, qty FROM item WHERE id >= 4")).toEqual([{ id: 4n, name: "logged", qty: 5n }]);
      expect(c.rows(x.sync.db, "SELECT count(*) AS n FROM _unisync_moves")).toEqual([{ n: 0 }]);
    }
    // b replayed the log before enrolling: its copy of row 4 counts as older than the log.
    expect(readEnrolments(b.sync.db).find((e) => e.origin === "b" && e.table === "item")?.older).toBe(1);
    c.close();
  });

  it("a node started from a backup of a synced node (unisync's tables stripped) adds no phantom rows", async () => {
    const c = setup(fill);
    const a = c.join("a");
    const b = c.join("b");
    await c.settle();
    for (let i = 0; i < 5; i++) a.app.exec(`INSERT INTO item(name, qty) VALUES ('new${i}', ${i})`); // ids 4..8, logged
    await c.settle();
    const backup = strippedBackup(a.app, a.path); // last night's backup of a
    // Since the backup: a edits one new row, b deletes another and reuses nothing.
    a.app.exec("UPDATE item SET qty = 100 WHERE name = 'new0'");
    b.app.exec("DELETE FROM item WHERE name = 'new1'");
    await c.settle();
    const cc = c.join("c", undefined, {}, backup);
    await c.settle();
    expect(c.converged()).toEqual([]);
    for (const x of [a, b, cc]) {
      expect(c.rows(x, "SELECT name, qty FROM item WHERE name LIKE 'new%' ORDER BY name")).toEqual([
        { name: "new0", qty: 100n },
        { name: "new2", qty: 2n },
        { name: "new3", qty: 3n },
        { name: "new4", qty: 4n },
      ]);
      expect(c.rows(x, "SELECT count(*) AS n FROM item")).toEqual([{ n: 7n }]);
    }
    c.close();
  });

  it("a stale copy of a deleted row that an id collision's move lands on gives way to the logged row", async () => {
    const c = setup(() => {});
    const a = c.join("a");
    const b = c.join("b");
    await c.settle();
    // Both insert at id 1 apart: one of the two rows moves to a new id, on every node.
    a.app.exec("INSERT INTO item(id, name, qty) VALUES (1, 'from a', 1)");
    b.app.exec("INSERT INTO item(id, name, qty) VALUES (1, 'from b', 2)");
    await c.settle();
    const [moved] = c.rows(a, "SELECT id, name FROM item WHERE id != 1") as { id: bigint; name: string }[];
    const [owner, other] = moved.name === "from a" ? [a, b] : [b, a];
    const backup = strippedBackup(a.app, a.path);
    // Its node changes it and deletes it: the backup holds a stale copy.
    owner.app.exec(`UPDATE item SET qty = 99 WHERE id = ${moved.id}; DELETE FROM item WHERE id = ${moved.id}`);
    await c.ship(owner);
    // c joins from the backup and hears the owner first: it does not know of the collision
    // yet, so the deleted row's tombstone sits at id 1; the other origin's insert moves it
    // onto c's stale copy.
    const cc = c.join("c", undefined, {}, backup);
    while ((await cc.sync.pull(owner.name, 50)) > 0);
    while ((await cc.sync.pull(other.name, 50)) > 0);
    expect(cc.sync.enrolling).toBe(true);
    // c's app, before enrolment, changes its stale copy and gives it a child.
    cc.app.exec(`UPDATE item SET name = 'edited on c' WHERE id = ${moved.id}; INSERT INTO part(item_id) VALUES (${moved.id})`);
    await c.ship(cc);
    // The others keep the parent for the child (its logged values); c hears that while it still enrols.
    while ((await owner.sync.pull("c", 50)) > 0);
    await c.ship(owner);
    while ((await cc.sync.pull(owner.name, 50)) > 0);
    await c.settle();
    expect(c.converged()).toEqual([]);
    for (const x of [a, b, cc]) {
      expect(c.rows(x, `SELECT name, qty FROM item WHERE id = ${moved.id}`)).toEqual([{ name: moved.name, qty: 99n }]);
      expect(c.rows(x, "SELECT item_id FROM part")).toEqual([{ item_id: moved.id }]);
    }
    c.close();
  });

  it("counts references the app writes while enrolling to rows the log has not reached (they cannot follow a move)", async () => {
    const c = setup(fill);
    const a = c.join("a");
    await c.settle();
    const b = c.join("b");
    // b's app points at item 2 of its copy before the log is in: no lineage to follow.
    b.app.exec("INSERT INTO part(item_id) VALUES (2)");
    await c.ship(b);
    expect(b.sync.unplacedReferences).toBe(1);
    // Once the log placed item 3 here, a reference to it follows it wherever it moves.
    while ((await b.sync.pull("a", 50)) > 0);
    expect(b.sync.enrolling).toBe(true);
    b.app.exec("INSERT INTO part(item_id) VALUES (3)");
    await c.ship(b);
    expect(b.sync.unplacedReferences).toBe(1);
    await c.settle();
    expect(c.converged()).toEqual([]);
    expect(a.sync.unplacedReferences).toBe(0);
    c.close();
  });

  it("a record that does not carry a column leaves the local default (keyed and keyless tables)", async () => {
    const c = setup(() => undefined);
    const a = c.join("a");
    a.app.exec("INSERT INTO item(id, name, qty) VALUES (1, 'old', 1); INSERT INTO tag VALUES ('old', 1)");
    await c.ship(a);
    a.app.exec("ALTER TABLE item ADD COLUMN d DEFAULT 123; ALTER TABLE tag ADD COLUMN d DEFAULT 123");
    a.app.exec("INSERT INTO item(id, name, qty) VALUES (2, 'new', 2); INSERT INTO tag(label, n) VALUES ('new', 2)");
    await c.ship(a);
    // d's database gets the final schema straight away (create_all on a new node).
    const d = c.join("d", (app) => {
      app.exec("DROP TABLE item; DROP TABLE tag");
      app.exec("CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, d DEFAULT 123); CREATE TABLE tag(label TEXT, n, d DEFAULT 123)");
    });
    await c.settle();
    expect(c.rows(d, "SELECT id, d FROM item ORDER BY id")).toEqual([{ id: 1n, d: 123n }, { id: 2n, d: 123n }]);
    expect(c.rows(d, "SELECT label, d FROM tag ORDER BY label")).toEqual([{ label: "new", d: 123n }, { label: "old", d: 123n }]);
    expect(c.converged()).toEqual([]);
    c.close();
  });
});

describe("unisync forget", () => {
  it("enrols a file copied from another node afresh, and refuses to lose this node's unsent changes", async () => {
    const { runCli } = await import("./helpers/cluster.js");
    const { NodeIdentityError } = await import("../src/stream/dbsync.js");
    const dir = join(root, `forget-${++n}`);
    mkdirSync(dir, { recursive: true });
    const path = join(dir, "app.db");
    const app = appConnection(path);
    app.exec(SCHEMA);
    app.close();
    const store = new FileStore(join(root, `forget-store-${n}`));
    openSync(path, "other", store).close(); // enrolled by another node (a copy of its file)
    expect(() => openSync(path, "me", store)).toThrow(NodeIdentityError);
    mkdirSync(join(dir, ".unisync"));
    writeFileSync(join(dir, ".unisync", "config.jsonc"), JSON.stringify({ node: "me", store: "file:///unused" }));
    const ok = await runCli(["forget", dir, "--db", "app.db"]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toContain("enrolled by other");
    const mine = openSync(path, "me", store);
    const w = appConnection(path);
    w.exec("INSERT INTO kv VALUES ('unsent', 1)");
    w.close();
    mine.sealPending();
    mine.close();
    const refused = await runCli(["forget", dir, "--db", "app.db"]);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain("not in the store yet");
    const bad = await runCli(["forget", dir, "--db", "../elsewhere.db"]);
    expect(bad.code).toBe(2);
  });
});
