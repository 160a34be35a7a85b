/**
 * Id collisions (issue 4, DESIGN.md invariant 6): nodes that insert offline
 * pick the same INTEGER PRIMARY KEY for different rows. Every node must end
 * with every row, at the same ids, and children must follow a moved parent,
 * whatever order the segments arrive in.
 */
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import type { DbSync } from "../src/stream/dbsync.js";
import { FileStore } from "../src/store/file.js";
import { compareDatabases } from "./helpers/checker.js";
import { appConnection, openSync } from "./helpers/node.js";

const root = mkdtempSync(join(tmpdir(), "unisync-coll-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const SCHEMA = `
CREATE TABLE team(id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE player(id INTEGER PRIMARY KEY, team_id INTEGER REFERENCES team(id) ON DELETE CASCADE, name TEXT);
CREATE TABLE membership(team_id INTEGER REFERENCES team(id), tag TEXT, PRIMARY KEY(team_id, tag)) WITHOUT ROWID;
CREATE TABLE account(id INTEGER PRIMARY KEY, name TEXT UNIQUE, email TEXT);
CREATE TABLE code(code TEXT PRIMARY KEY, label TEXT UNIQUE);
CREATE TABLE badge(id INTEGER PRIMARY KEY, team_id INTEGER REFERENCES team(id), label TEXT UNIQUE);
CREATE TABLE person(id INTEGER PRIMARY KEY, mentor_id INTEGER REFERENCES person(id), name TEXT);
CREATE TABLE team_tag(team_id INTEGER REFERENCES team(id) ON DELETE CASCADE, tag TEXT);
`;

let n = 0;
function cluster(names: string[], extra: Parameters<typeof openSync>[4] = {}) {
  const dir = join(root, `c${++n}`);
  mkdirSync(dir, { recursive: true });
  const store = new FileStore(join(dir, "store"));
  const nodes = names.map((name) => {
    const path = join(dir, `${name}.db`);
    const app = appConnection(path);
    app.exec(SCHEMA);
    return { name, path, app, sync: openSync(path, name, store, undefined, extra) };
  });
  const ship = async (node: { sync: DbSync }) => {
    node.sync.sealPending();
    await node.sync.upload();
  };
  const pullAll = async (node: { sync: DbSync; name: string }, from = names) => {
    for (const o of from) if (o !== node.name) while ((await node.sync.pull(o, 50)) > 0);
    node.sync.retryParked();
  };
  const settle = async () => {
    for (let round = 0; round < 2; round++) {
      for (const x of nodes) await ship(x);
      for (const x of nodes) await pullAll(x);
    }
  };
  /** The first two ship what they wrote apart; the third hears the second first (the opposite order from theirs); all settle and agree. */
  type Node = (typeof nodes)[number];
  const crossAndSettle = async (first: Node, second: Node, third: Node) => {
    await ship(first);
    await ship(second);
    await pullAll(third, [second.name]);
    await pullAll(third, [first.name]);
    await settle();
    expect(compareDatabases(nodes.map((x) => x.path))).toEqual([]);
  };
  const close = () => nodes.forEach((x) => (x.sync.close(), x.app.close()));
  return { nodes, ship, pullAll, settle, crossAndSettle, close };
}

const all = (db: ReturnType<typeof appConnection>, sql: string) => db.prepare(sql).all() as Record<string, unknown>[];
/** Clocks are stamped when a node seals: a pause between two nodes' seals orders them. */
const pause = () => new Promise<void>((r) => setTimeout(r, 5));

describe("id collisions", () => {
  it("two nodes insert id 1 offline: both rows survive at the same ids everywhere, children follow", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b, cc] = c.nodes;
    a.app.exec("INSERT INTO team(name) VALUES ('reds'); INSERT INTO player(team_id, name) VALUES (1, 'ann')");
    b.app.exec("INSERT INTO team(name) VALUES ('blues'); INSERT INTO player(team_id, name) VALUES (1, 'bob'); INSERT INTO membership VALUES (1, 'x')");
    // c hears b first, then a: the opposite order from a's and b's own.
    await c.crossAndSettle(a, b, cc);
    for (const x of c.nodes) {
      const teams = all(x.app, "SELECT id, name FROM team ORDER BY name");
      expect(teams.map((t) => t.name)).toEqual(["blues", "reds"]);
      const byName = new Map(teams.map((t) => [t.name, t.id]));
      // Each player still belongs to the team its node gave it.
      const players = all(x.app, "SELECT team_id, name FROM player ORDER BY name");
      expect(players).toEqual([
        { team_id: byName.get("reds"), name: "ann" },
        { team_id: byName.get("blues"), name: "bob" },
      ]);
      expect(all(x.app, "SELECT team_id, tag FROM membership")).toEqual([{ team_id: byName.get("blues"), tag: "x" }]);
      expect(all(x.app, "PRAGMA foreign_key_check")).toEqual([]);
      expect(x.sync.parkedCount()).toBe(0);
    }
    // The earlier insert kept id 1; the moves are recorded.
    const moves = all(a.app, "SELECT tbl, from_key, key FROM _unisync_moves ORDER BY tbl");
    expect(moves.map((m) => m.tbl)).toEqual(["player", "team"]);
    c.close();
  });

  it("rows of a table without a key follow their parent's move (an association table with no primary key)", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b, cc] = c.nodes;
    a.app.exec("INSERT INTO team(name) VALUES ('reds'); INSERT INTO team_tag VALUES (1, 'warm'), (1, 'warm')");
    await pause();
    b.app.exec("INSERT INTO team(name) VALUES ('blues'); INSERT INTO team_tag VALUES (1, 'cold'), (1, 'warm')");
    await c.crossAndSettle(a, b, cc);
    for (const x of c.nodes) {
      const byName = new Map(all(x.app, "SELECT id, name FROM team").map((t) => [t.name, t.id]));
      expect(all(x.app, "SELECT team_id, tag FROM team_tag ORDER BY team_id, tag")).toEqual(
        [
          { team_id: byName.get("reds"), tag: "warm" },
          { team_id: byName.get("reds"), tag: "warm" },
          { team_id: byName.get("blues"), tag: "cold" },
          { team_id: byName.get("blues"), tag: "warm" },
        ].sort((p, q) => Number(p.team_id) - Number(q.team_id) || String(p.tag).localeCompare(String(q.tag))),
      );
    }
    // Later changes name the copies where they are now: b drops its warm tag, a deletes the reds.
    b.app.exec("DELETE FROM team_tag WHERE tag = 'warm' AND team_id = (SELECT id FROM team WHERE name = 'blues')");
    a.app.exec("PRAGMA foreign_keys = ON; DELETE FROM team WHERE name = 'reds'");
    await c.settle();
    expect(compareDatabases(c.nodes.map((x) => x.path))).toEqual([]);
    for (const x of c.nodes) {
      const blues = all(x.app, "SELECT id FROM team WHERE name = 'blues'")[0]?.id;
      expect(all(x.app, "SELECT team_id, tag FROM team_tag")).toEqual([{ team_id: blues, tag: "cold" }]);
      expect(x.sync.parkedCount()).toBe(0);
    }
    c.close();
  });

  it("a delete of an association row made before the move finds the row where it moved", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b, cc] = c.nodes;
    a.app.exec("INSERT INTO team(name) VALUES ('reds')");
    await c.ship(a);
    await c.pullAll(cc, ["a"]);
    b.app.exec("INSERT INTO team(name) VALUES ('blues'); INSERT INTO membership VALUES (1, 'x'); INSERT INTO membership VALUES (1, 'y')");
    await c.ship(b);
    await c.pullAll(cc, ["b"]); // c moves b's team and its memberships
    b.app.exec("DELETE FROM membership WHERE tag = 'x'"); // b has not heard of a yet
    await c.ship(b);
    await c.settle();
    expect(compareDatabases(c.nodes.map((x) => x.path))).toEqual([]);
    for (const x of c.nodes) {
      const blues = all(x.app, "SELECT id FROM team WHERE name = 'blues'")[0].id;
      expect(all(x.app, "SELECT team_id, tag FROM membership")).toEqual([{ team_id: blues, tag: "y" }]);
    }
    c.close();
  });

  it("a child written by a third node that saw only the losing parent follows it", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b, cc] = c.nodes;
    b.app.exec("INSERT INTO team(name) VALUES ('blues')");
    await c.ship(b);
    await c.pullAll(cc, ["b"]);
    // c adds a player to b's team 1; a (earlier clock? no: later) also made team 1.
    cc.app.exec("INSERT INTO player(id, team_id, name) VALUES (100, 1, 'cid')");
    await c.ship(cc);
    a.app.exec("INSERT INTO team(id, name) VALUES (1, 'reds')");
    await c.ship(a);
    // a hears c's child before b's team: the child waits for its parent.
    await c.pullAll(a, ["c"]);
    expect(a.sync.parkedCount()).toBe(1);
    await c.settle();
    expect(compareDatabases(c.nodes.map((x) => x.path))).toEqual([]);
    for (const x of c.nodes) {
      const blues = all(x.app, "SELECT id FROM team WHERE name = 'blues'")[0].id;
      expect(all(x.app, "SELECT team_id FROM player WHERE name = 'cid'")).toEqual([{ team_id: blues }]);
      expect(x.sync.parkedCount()).toBe(0);
    }
    c.close();
  });

  it("a deleted child follows its parent's move: an update that revives it points at the moved parent everywhere", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b, cc] = c.nodes;
    a.app.exec("INSERT INTO team(name) VALUES ('reds')"); // the first insert at id 1: it keeps the id
    await c.ship(a);
    await pause();
    b.app.exec("INSERT INTO team(name) VALUES ('blues'); INSERT INTO player(team_id, name) VALUES (1, 'bob')");
    await c.ship(b);
    await c.pullAll(cc, ["b"]);
    // c deletes bob before it hears of a's team: its tombstone says team 1. Then blues moves away from 1.
    cc.app.exec("DELETE FROM player WHERE name = 'bob'");
    await c.ship(cc);
    await c.pullAll(cc, ["a"]);
    await pause();
    // b has not seen the delete: its later update revives bob, on the team b gave him.
    b.app.exec("UPDATE player SET name = 'bobby' WHERE name = 'bob'");
    await c.ship(b);
    await c.settle();
    expect(compareDatabases(c.nodes.map((x) => x.path))).toEqual([]);
    for (const x of c.nodes) {
      const blues = all(x.app, "SELECT id FROM team WHERE name = 'blues'")[0].id;
      expect(blues).not.toBe(1n);
      expect(all(x.app, "SELECT team_id, name FROM player")).toEqual([{ team_id: blues, name: "bobby" }]);
      expect(x.sync.parkedCount()).toBe(0);
    }
    c.close();
  });

  it("a row set aside by a unique clash follows its parent's move, and comes back pointing at it", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b, cc] = c.nodes;
    cc.app.exec("INSERT INTO badge(id, label) VALUES (20, 'star')"); // created first: keeps the label
    await c.ship(cc);
    await pause();
    a.app.exec("INSERT INTO team(name) VALUES ('reds')"); // keeps id 1
    await c.ship(a);
    await pause();
    b.app.exec("INSERT INTO team(name) VALUES ('blues'); INSERT INTO badge(id, team_id, label) VALUES (10, 1, 'star')");
    await c.ship(b);
    // c hears b before a: b's badge is set aside pointing at team 1, then blues moves away from 1.
    await c.pullAll(cc, ["b"]);
    expect(all(cc.sync.db, "SELECT tbl FROM _unisync_conflicts")).toEqual([{ tbl: "badge" }]);
    await c.pullAll(cc, ["a"]);
    await c.settle();
    // The clash ends: the set-aside badge comes back on every node.
    cc.app.exec("DELETE FROM badge WHERE id = 20");
    await c.settle();
    expect(compareDatabases(c.nodes.map((x) => x.path))).toEqual([]);
    for (const x of c.nodes) {
      const blues = all(x.app, "SELECT id FROM team WHERE name = 'blues'")[0].id;
      expect(blues).not.toBe(1n);
      expect(all(x.app, "SELECT id, team_id, label FROM badge")).toEqual([{ id: 10n, team_id: blues, label: "star" }]);
      expect(all(x.sync.db, "SELECT tbl FROM _unisync_conflicts")).toEqual([]);
    }
    c.close();
  });

  it("re-inserting an id after deleting it is the same row, not a collision", async () => {
    const c = cluster(["a", "b"]);
    const [a, b] = c.nodes;
    a.app.exec("INSERT INTO team(name) VALUES ('one')");
    await c.settle();
    b.app.exec("DELETE FROM team WHERE id = 1");
    await c.settle();
    a.app.exec("INSERT INTO team(name) VALUES ('two')"); // SQLite reuses id 1
    await c.settle();
    for (const x of c.nodes) expect(all(x.app, "SELECT id, name FROM team")).toEqual([{ id: 1n, name: "two" }]);
    // Only the deleted row's tombstone moved (so a late update cannot revive it over "two").
    expect(all(a.app, "SELECT live FROM _unisync_moves")).toEqual([{ live: 0n }]);
    c.close();
  });

  it("two nodes create the same unique name: every node keeps the first, the other is set aside, nothing wedges", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b] = c.nodes;
    a.app.exec("INSERT INTO account(id, name, email) VALUES (10, 'alice', 'a@a'); INSERT INTO code VALUES ('x', 'same')");
    b.app.exec("INSERT INTO account(id, name, email) VALUES (20, 'alice', 'b@b'); INSERT INTO code VALUES ('y', 'same')");
    await c.settle();
    expect(compareDatabases(c.nodes.map((x) => x.path))).toEqual([]);
    for (const x of c.nodes) {
      expect(all(x.app, "SELECT name FROM account")).toEqual([{ name: "alice" }]);
      expect(all(x.app, "SELECT count(*) AS n FROM code")).toEqual([{ n: 1n }]);
      expect(all(x.app, "SELECT tbl FROM _unisync_conflicts ORDER BY tbl")).toEqual([{ tbl: "account" }, { tbl: "code" }]);
      expect(x.sync.parkedCount()).toBe(0);
    }
    // The set-aside row comes back when a change ends the clash.
    const aside = all(a.app, "SELECT id FROM account")[0].id === 10n ? b : a;
    const asideId = aside === a ? 10 : 20;
    aside.sync.db.prepare("DELETE FROM _unisync_applying").run();
    // Its origin no longer has it in the table; the app renames it through a fresh insert of the same id.
    aside.app.prepare("INSERT INTO account(id, name, email) VALUES (?, 'alice2', 'x@x')").run(asideId);
    await c.settle();
    expect(compareDatabases(c.nodes.map((x) => x.path))).toEqual([]);
    for (const x of c.nodes) expect(all(x.app, "SELECT name FROM account ORDER BY name").map((r) => r.name)).toEqual(["alice", "alice2"]);
    c.close();
  });

  it("INSERT OR REPLACE over a live row replaces it everywhere (its delete fires no trigger)", async () => {
    const c = cluster(["a", "b"]);
    const [a] = c.nodes;
    a.app.exec("INSERT INTO team(id, name) VALUES (1, 'old')");
    await c.settle();
    a.app.exec("INSERT OR REPLACE INTO team(id, name) VALUES (1, 'new')");
    await c.settle();
    expect(compareDatabases(c.nodes.map((x) => x.path))).toEqual([]);
    for (const x of c.nodes) expect(all(x.app, "SELECT id, name FROM team")).toEqual([{ id: 1n, name: "new" }]);
    c.close();
  });

  it("tables listed in naturalKeyTables merge by key instead", async () => {
    const c = cluster(["a", "b"], { naturalKeyTables: ["team"] });
    const [a, b] = c.nodes;
    a.app.exec("INSERT INTO team(id, name) VALUES (7, 'reds')");
    b.app.exec("INSERT INTO team(id, name) VALUES (7, 'blues')");
    await c.settle();
    expect(compareDatabases(c.nodes.map((x) => x.path))).toEqual([]);
    expect(all(a.app, "SELECT id FROM team")).toEqual([{ id: 7n }]);
    c.close();
  });

  it("the loser's origin never comes back: its row still reaches every node", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b, cc] = c.nodes;
    a.app.exec("INSERT INTO team(name) VALUES ('reds')");
    b.app.exec("INSERT INTO team(name) VALUES ('blues')");
    await c.ship(a);
    await c.ship(b);
    b.sync.close(); // b is gone for good
    for (const x of [a, cc]) await c.pullAll(x);
    for (const x of [a, cc]) {
      expect(all(x.app, "SELECT name FROM team ORDER BY name").map((r) => r.name)).toEqual(["blues", "reds"]);
    }
    expect(compareDatabases([a.path, cc.path])).toEqual([]);
    a.sync.close();
    cc.sync.close();
    for (const x of c.nodes) x.app.close();
  });
  it("a record whose own placement moves the row its reference names points at where that row moved, not at the key it took", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b, cc] = c.nodes;
    b.app.exec("INSERT INTO person(name) VALUES ('rob')");
    await c.ship(b);
    await pause();
    cc.app.exec("INSERT INTO person(name) VALUES ('mia')"); // id 1 too, later: mia moves
    await c.ship(cc);
    await c.pullAll(a);
    a.app.exec("UPDATE person SET mentor_id = (SELECT id FROM person WHERE name = 'mia') WHERE name = 'rob'");
    await c.ship(a);
    // c hears a's update of rob (mentor: mia's lineage, born at 1) before b's insert of rob:
    // placing rob at 1 moves mia away, so the reference, read at 1 before that, must be read again.
    await c.pullAll(cc, ["a"]);
    await c.settle();
    expect(compareDatabases(c.nodes.map((x) => x.path))).toEqual([]);
    for (const x of c.nodes) {
      const mia = all(x.app, "SELECT id FROM person WHERE name = 'mia'")[0].id;
      expect(mia).not.toBe(1n);
      expect(all(x.app, "SELECT id, mentor_id FROM person WHERE name = 'rob'")).toEqual([{ id: 1n, mentor_id: mia }]);
    }
    c.close();
  });
});
