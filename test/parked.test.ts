/**
 * Parked records carry a kind (why they wait, as code reads it): retries select
 * by kind, never by the reason text, and databases parked in before kinds existed
 * get theirs from the old reason text once.
 */
import Database from "better-sqlite3";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ensureInternalTables } from "../src/db/internal.js";
import { listParked } from "../src/replay/apply.js";
import { segmentKey } from "../src/log/keys.js";
import { sealSegment, type Segment } from "../src/log/segment.js";
import { FileStore } from "../src/store/file.js";
import { appConnection, openSync } from "./helpers/node.js";

const root = mkdtempSync(join(tmpdir(), "unisync-parked-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

type Rec = Segment["records"][0];
const row = (hlc: number, table: string, id: number, v: string): Rec => ({ hlc, row: { table, op: 1, columns: ["id", "v"], values: [BigInt(id), v], key: ["id"], changed: [] } });

describe("parked records", () => {
  it("are parked with a kind, and a retry of one kind leaves the others waiting", async () => {
    const dir = join(root, "kinds");
    mkdirSync(dir);
    const store = new FileStore(join(dir, "store"));
    const path = join(dir, "app.db");
    const app = appConnection(path);
    app.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v)");
    const node = openSync(path, "local", store, undefined, { maxClockDriftMs: 1000 });
    const now = Date.now() * 1024;
    const records: Rec[] = [
      row((Date.now() + 2500) * 1024, "t", 1, "from the future"),
      row(now, "later", 1, "a table this node has not yet"),
      { hlc: now + 1, row: { table: "t", op: 1, columns: ["id", "v"], values: [3n], key: ["id"], changed: [] } },
      row(now + 2, "t", 2, "applies"),
    ];
    const { bytes, sha256 } = sealSegment({ origin: "remote", stream: "app.db", seq: 1, createdMs: 0, records });
    await store.put(segmentKey("remote", "app.db", 1, sha256), bytes);
    await node.pull("remote");

    const kinds = () => node.db.prepare("SELECT kind FROM _unisync_parked ORDER BY id").pluck().all();
    const ids = () => node.db.prepare("SELECT id FROM t ORDER BY id").pluck().all().map(Number);
    expect(kinds()).toEqual(["clock", "schema", "malformed"]);
    expect(ids()).toEqual([2]);

    await new Promise((r) => setTimeout(r, 2000));
    expect(node.retryParked("row")).toBe(0); // the clock record's time has come, but it is not of this kind
    expect(ids()).toEqual([2]);
    expect(node.retryParked("clock")).toBe(1);
    expect(ids()).toEqual([1, 2]);
    expect(kinds()).toEqual(["schema", "malformed"]);

    app.exec("CREATE TABLE later(id INTEGER PRIMARY KEY, v)");
    node.refreshSchema(); // a schema change retries every kind
    expect(app.prepare("SELECT v FROM later").pluck().all()).toEqual(["a table this node has not yet"]);
    expect(kinds()).toEqual(["malformed"]);
    app.close();
    node.close();
  });

  it("parked before kinds existed: the kind is derived from the reason text once", () => {
    const db = new Database(join(root, "old.db"));
    db.exec(`CREATE TABLE _unisync_parked(
      id INTEGER PRIMARY KEY, origin TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL,
      tbl TEXT, reason TEXT NOT NULL, hlc INTEGER NOT NULL, record BLOB NOT NULL, parked_ms INTEGER,
      UNIQUE(origin, seq, idx))`);
    const reasons: [string, string][] = [
      ['waiting for the row of "parent" that "pid" points at (n1@123), which has not arrived yet', "row"],
      ['clock of origin "n2" is 400 s ahead of ours (limit 300 s): waiting', "clock"],
      ['table "later" does not exist here (yet)', "schema"],
      ['column(s) "a", "b" of "t" do not exist here (yet)', "schema"],
      ["column and value counts differ", "malformed"],
      ["row key is not among the columns", "malformed"],
      ["unknown operation 9", "malformed"],
      ['key "id" of "t" is not an integer', "malformed"],
      ["UNIQUE constraint failed: t.v", "write"],
      ["moving a row after an id collision failed: disk I/O error", "write"],
    ];
    const add = db.prepare("INSERT INTO _unisync_parked(origin, seq, idx, tbl, reason, hlc, record) VALUES ('n2', ?, 0, 't', ?, 1, x'00')");
    reasons.forEach(([reason], i) => add.run(i + 1, reason));
    ensureInternalTables(db);
    const kinds = () => db.prepare("SELECT kind FROM _unisync_parked ORDER BY seq").pluck().all();
    expect(kinds()).toEqual(reasons.map(([, kind]) => kind));
    // Once: the reason text is not read again (a later reason does not change the kind).
    db.prepare("UPDATE _unisync_parked SET reason = 'column and value counts differ' WHERE seq = 1").run();
    ensureInternalTables(db);
    expect(kinds()[0]).toBe("row");
    db.close();
  });

  it("a fresh insert the table refuses (NOT NULL, CHECK) is parked as a write, and the rest of the segment applies", async () => {
    const dir = join(root, "refused");
    mkdirSync(dir);
    const store = new FileStore(join(dir, "store"));
    const path = join(dir, "app.db");
    const app = appConnection(path);
    app.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL CHECK (length(v) < 10))");
    const node = openSync(path, "local", store);
    const now = Date.now() * 1024;
    const records: Rec[] = [
      { hlc: now, row: { table: "t", op: 1, columns: ["id", "v"], values: [1n, null], key: ["id"], changed: [] } },
      row(now + 1, "t", 2, "far too long for the check"),
      row(now + 2, "t", 3, "fits"),
    ];
    const { bytes, sha256 } = sealSegment({ origin: "remote", stream: "app.db", seq: 1, createdMs: 0, records });
    await store.put(segmentKey("remote", "app.db", 1, sha256), bytes);
    expect(await node.pull("remote")).toBe(1);
    expect(node.db.prepare("SELECT kind, reason FROM _unisync_parked ORDER BY id").all()).toEqual([
      { kind: "write", reason: expect.stringMatching(/NOT NULL/) },
      { kind: "write", reason: expect.stringMatching(/CHECK/) },
    ]);
    expect(app.prepare("SELECT id FROM t").pluck().all().map(Number)).toEqual([3]);
    expect(listParked(node.db, 10).map((p) => [p.table, p.kind])).toEqual([["t", "write"], ["t", "write"]]); // as status and the console show them
    // Neither left a merge state behind: a later valid insert of the same rows is fresh.
    expect(node.db.prepare("SELECT count(*) FROM _unisync_rows WHERE tbl = 't'").pluck().get()).toBe(1);
    app.close();
    node.close();
  });
});
