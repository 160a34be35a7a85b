/**
 * Foreign keys hold after replay (issue 9, DESIGN invariant 11): a child written
 * on one node while another deleted its parent keeps the parent alive (the
 * delete is undone, the same on every node, and reported), or follows the
 * declared ON DELETE action for tables listed in declaredOnDelete. A cascade
 * split over several segments is never mistaken for such a race.
 */
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type Database from "better-sqlite3";
import { afterAll, describe, expect, it } from "vitest";
import type { DbSync, DbSyncOptions } from "../src/stream/dbsync.js";
import { FileStore } from "../src/store/file.js";
import { compareDatabases } from "./helpers/checker.js";
import { appConnection, openSync } from "./helpers/node.js";

const root = mkdtempSync(join(tmpdir(), "unisync-refs-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const SCHEMA = `
CREATE TABLE event(id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE match(id INTEGER PRIMARY KEY, event_id INTEGER REFERENCES event(id) ON DELETE CASCADE, name TEXT);
CREATE TABLE scouting(id INTEGER PRIMARY KEY, match_id INTEGER REFERENCES match(id) ON DELETE CASCADE, team TEXT, score INTEGER);
CREATE TABLE note(match_id INTEGER REFERENCES match(id) ON DELETE SET NULL, body TEXT);
CREATE TABLE team(id INTEGER PRIMARY KEY, name TEXT UNIQUE);
CREATE TABLE player(id INTEGER PRIMARY KEY, team_id INTEGER REFERENCES team(id), name TEXT);
CREATE TABLE team_tag(team_id INTEGER REFERENCES team(id), tag TEXT, PRIMARY KEY(team_id, tag)) WITHOUT ROWID;
`;

let n = 0;
function cluster(names: string[], extra: Partial<DbSyncOptions> = {}) {
  const dir = join(root, `r${++n}`);
  mkdirSync(dir, { recursive: true });
  const store = new FileStore(join(dir, "store"));
  const nodes = names.map((name) => {
    const path = join(dir, `${name}.db`);
    const app = appConnection(path);
    app.pragma("foreign_keys = ON");
    app.exec(SCHEMA);
    return { name, path, app, sync: openSync(path, name, store, undefined, extra) };
  });
  const ship = async (x: { sync: DbSync }) => {
    x.sync.sealPending();
    await x.sync.upload();
  };
  const pull = async (x: { sync: DbSync }, from: string, segments = 50) => {
    while ((await x.sync.pull(from, segments)) > 0 && segments === 50);
  };
  const settle = async () => {
    for (let round = 0; round < 3; round++) {
      for (const x of nodes) await ship(x);
      for (const x of nodes) for (const o of names) if (o !== x.name) await pull(x, o);
    }
  };
  const all = (db: Database.Database, sql: string) => db.prepare(sql).all() as Record<string, unknown>[];
  const check = () => {
    expect(compareDatabases(nodes.map((x) => x.path))).toEqual([]);
    for (const x of nodes) {
      expect(all(x.app, "PRAGMA foreign_key_check"), `${x.name}: foreign_key_check`).toEqual([]);
      expect(x.sync.parkedCount(), `${x.name}: parked`).toBe(0);
    }
  };
  const close = () => nodes.forEach((x) => (x.sync.close(), x.app.close()));
  return { nodes, ship, pull, settle, all, check, close };
}

/**
 * Apart, three "red" teams, created in the order c (30), b (20), a (10): c's keeps
 * the name everywhere. b has pulled a's and c's: it set a's aside for its own, then
 * its own aside for c's (10 -> 20 -> 30).
 */
async function threeRedTeams() {
  const c = cluster(["a", "b", "c"]);
  const [a, b, cc] = c.nodes;
  const pause = () => new Promise<void>((r) => setTimeout(r, 5));
  cc.app.exec("INSERT INTO team(id, name) VALUES (30, 'red')");
  await c.ship(cc);
  await pause();
  b.app.exec("INSERT INTO team(id, name) VALUES (20, 'red')");
  await c.ship(b);
  await pause();
  a.app.exec("INSERT INTO team(id, name) VALUES (10, 'red')");
  await c.ship(a);
  await c.pull(b, "a");
  await c.pull(b, "c");
  return { c, a, b };
}

/** a's player ann (id 1) is on team 30 at b already, then on every node with only team 30 in the table. */
async function annOnTeam30(c: Awaited<ReturnType<typeof threeRedTeams>>["c"], b: Awaited<ReturnType<typeof threeRedTeams>>["b"]) {
  expect(c.all(b.app, "SELECT id, team_id FROM player")).toEqual([{ id: 1n, team_id: 30n }]);
  expect(c.all(b.app, "PRAGMA foreign_key_check")).toEqual([]);
  await c.settle();
  c.check();
  for (const x of c.nodes) {
    expect(c.all(x.app, "SELECT id, name FROM team")).toEqual([{ id: 30n, name: "red" }]);
    expect(c.all(x.app, "SELECT id, team_id FROM player")).toEqual([{ id: 1n, team_id: 30n }]);
  }
  c.close();
}

describe("references after replay", () => {
  it("a child written while its parent was deleted keeps the parent, with its last values, on every node", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b, cc] = c.nodes;
    a.app.exec("INSERT INTO event(id, name) VALUES (1, 'regional'); INSERT INTO match(id, event_id, name) VALUES (7, 1, 'q7'); INSERT INTO scouting(id, match_id, team, score) VALUES (1, 7, 'red', 10), (2, 7, 'blue', 5)");
    await c.settle();
    // Apart: a renames then deletes match 7 (its scouting rows cascade); b adds a scouting row for it and edits one.
    a.app.exec("UPDATE match SET name = 'q7-final' WHERE id = 7");
    a.app.exec("DELETE FROM match WHERE id = 7");
    b.app.exec("INSERT INTO scouting(id, match_id, team, score) VALUES (100, 7, 'green', 3)");
    await c.ship(a);
    await c.ship(b);
    // c hears a's delete first, then b's child: it keeps the parent itself.
    await c.pull(cc, "a");
    expect(c.all(cc.app, "SELECT id FROM match")).toEqual([]);
    await c.pull(cc, "b");
    expect(c.all(cc.app, "SELECT id, name FROM match")).toEqual([{ id: 7n, name: "q7-final" }]);
    await c.settle();
    c.check();
    for (const x of c.nodes) {
      expect(c.all(x.app, "SELECT id, event_id, name FROM match")).toEqual([{ id: 7n, event_id: 1n, name: "q7-final" }]);
      // The rows a's cascade deleted stay deleted; b's new row stays.
      expect(c.all(x.app, "SELECT id, team FROM scouting ORDER BY id")).toEqual([{ id: 100n, team: "green" }]);
      expect(c.all(x.sync.db, "SELECT DISTINCT tbl, action, child_tbl FROM _unisync_repairs")).toEqual([{ tbl: "match", action: "kept parent", child_tbl: "scouting" }]);
    }
    c.close();
  });

  it("a kept parent keeps its own parent too, and an edit newer than the cascade keeps its row", async () => {
    const c = cluster(["a", "b"]);
    const [a, b] = c.nodes;
    a.app.exec("INSERT INTO event(id, name) VALUES (1, 'regional'); INSERT INTO match(id, event_id, name) VALUES (7, 1, 'q7'); INSERT INTO scouting(id, match_id, team, score) VALUES (1, 7, 'red', 10)");
    await c.settle();
    a.app.exec("DELETE FROM event WHERE id = 1"); // cascades to match 7 and scouting 1
    b.app.exec("UPDATE scouting SET score = 11 WHERE id = 1"); // later than a's cascade
    await c.settle();
    c.check();
    for (const x of c.nodes) {
      expect(c.all(x.app, "SELECT id FROM event")).toEqual([{ id: 1n }]);
      expect(c.all(x.app, "SELECT id FROM match")).toEqual([{ id: 7n }]);
      expect(c.all(x.app, "SELECT id, score FROM scouting")).toEqual([{ id: 1n, score: 11n }]);
    }
    c.close();
  });

  it("declaredOnDelete: the late child follows ON DELETE CASCADE / SET NULL instead", async () => {
    const c = cluster(["a", "b"], { declaredOnDelete: ["scouting", "note.match_id"] });
    const [a, b] = c.nodes;
    a.app.exec("INSERT INTO event(id, name) VALUES (1, 'regional'); INSERT INTO match(id, event_id, name) VALUES (7, 1, 'q7')");
    await c.settle();
    a.app.exec("DELETE FROM match WHERE id = 7");
    b.app.exec("INSERT INTO scouting(id, match_id, team, score) VALUES (100, 7, 'green', 3); INSERT INTO note VALUES (7, 'windy')");
    await c.settle();
    c.check();
    for (const x of c.nodes) {
      expect(c.all(x.app, "SELECT id FROM match")).toEqual([]);
      expect(c.all(x.app, "SELECT id FROM scouting")).toEqual([]);
      expect(c.all(x.app, "SELECT match_id, body FROM note")).toEqual([{ match_id: null, body: "windy" }]);
    }
    expect(c.all(a.sync.db, "SELECT action, child_tbl FROM _unisync_repairs ORDER BY child_tbl").map((r) => r.action).sort()).toEqual(["cleared reference", "deleted child"]);
    c.close();
  });

  it("children of a row set aside by a unique clash move to the row that kept the values", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b] = c.nodes;
    // Apart, a and b both create team "red" (ids collide too) and add players to it.
    a.app.exec("INSERT INTO team(name) VALUES ('red'); INSERT INTO player(team_id, name) VALUES (1, 'ann'); INSERT INTO team_tag VALUES (1, 'fast'), (1, 'tall')");
    b.app.exec("INSERT INTO team(name) VALUES ('blue'); INSERT INTO team(name) VALUES ('red'); INSERT INTO player(team_id, name) VALUES (2, 'bob'); INSERT INTO team_tag VALUES (2, 'fast')");
    await c.settle();
    c.check();
    for (const x of c.nodes) {
      const red = c.all(x.app, "SELECT id FROM team WHERE name = 'red'");
      expect(red).toHaveLength(1);
      expect(c.all(x.app, "SELECT p.name FROM player p JOIN team t ON t.id = p.team_id WHERE t.name = 'red' ORDER BY p.name")).toEqual([{ name: "ann" }, { name: "bob" }]);
      // Both had the association red-fast: it is there once.
      expect(c.all(x.app, "SELECT tt.tag FROM team_tag tt JOIN team t ON t.id = tt.team_id WHERE t.name = 'red' ORDER BY tt.tag")).toEqual([{ tag: "fast" }, { tag: "tall" }]);
    }
    c.close();
  });

  // A repair is logged with this node's clock, newer than a delete further on in the log:
  // made part way through the log, it would bring the row back everywhere. So it waits
  // until every origin's log is applied as far as it goes (Applier.mayRepair).
  it("a repair made by a node still replaying the log never brings back a row deleted further on in it", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b, cc] = c.nodes;
    const pause = () => new Promise<void>((r) => setTimeout(r, 5));
    // a's "red" comes first; b's, made apart, is set aside and b's player bob moves to a's team.
    a.app.exec("INSERT INTO team(id, name) VALUES (10, 'red')");
    await c.ship(a);
    await pause();
    b.app.exec("INSERT INTO team(id, name) VALUES (20, 'red'); INSERT INTO player(id, team_id, name) VALUES (5, 20, 'bob')");
    await c.ship(b);
    await c.pull(a, "b");
    expect(c.all(a.app, "SELECT team_id FROM player WHERE id = 5")).toEqual([{ team_id: 10n }]);
    // Then a deletes bob.
    a.app.exec("DELETE FROM player WHERE id = 5");
    await c.ship(a);
    // c replays: b's log, then a's first segment only. Here bob points at a team set aside:
    // c repairs him (later than a's delete), and only then reads the delete.
    await c.pull(cc, "b");
    await c.pull(cc, "a", 1);
    await c.ship(cc);
    await c.pull(cc, "a");
    await c.settle();
    c.check();
    for (const x of c.nodes) expect(c.all(x.app, "SELECT id FROM player"), x.name).toEqual([]);
    c.close();
  });

  it("a child that follows its set-aside parent to a new id (an id collision) still moves to the row that kept the values", async () => {
    const c = cluster(["a", "b", "c", "d"]);
    const [a, b, cc, d] = c.nodes;
    const pause = () => new Promise<void>((r) => setTimeout(r, 5));
    // Apart, in this order: c's blue team takes id 20 first, a's red 10 takes the name first;
    // b's red 20 then collides on both, and its player bob points at it.
    cc.app.exec("INSERT INTO team(id, name) VALUES (20, 'blue')");
    await c.ship(cc);
    await pause();
    a.app.exec("INSERT INTO team(id, name) VALUES (10, 'red')");
    await c.ship(a);
    await pause();
    b.app.exec("INSERT INTO team(id, name) VALUES (20, 'red'); INSERT INTO player(id, team_id, name) VALUES (5, 20, 'bob')");
    await c.ship(b);
    b.app.exec("INSERT INTO team(id, name) VALUES (40, 'green')");
    await c.ship(b);
    // d reads a, then only b's first segment (so it repairs nothing yet: b's log goes on), then c:
    // b's red moves to a new id, set aside, and bob follows it there.
    await c.pull(d, "a");
    await c.pull(d, "b", 1);
    await c.pull(d, "c");
    await c.pull(d, "b");
    expect(c.all(d.app, "SELECT team_id FROM player WHERE id = 5")).toEqual([{ team_id: 10n }]);
    await c.settle();
    c.check();
    for (const x of c.nodes) expect(c.all(x.app, "SELECT team_id FROM player WHERE id = 5"), x.name).toEqual([{ team_id: 10n }]);
    c.close();
  });

  it("a child arriving for a row set aside for a row that was set aside in turn moves to the row in the table", async () => {
    // b sets a's team aside for its own, then its own aside for c's: 10 -> 20 -> 30.
    const { c, a, b } = await threeRedTeams();
    expect(c.all(b.app, "SELECT id FROM team")).toEqual([{ id: 30n }]);
    expect(c.all(b.sync.db, "SELECT count(*) AS n FROM _unisync_conflicts WHERE tbl = 'team'")).toEqual([{ n: 2 }]);
    // a, not knowing, adds a player to its team: on b it goes to the row in the table.
    a.app.exec("INSERT INTO player(id, team_id, name) VALUES (1, 10, 'ann')");
    await c.ship(a);
    await c.pull(b, "a");
    await annOnTeam30(c, b);
  });

  it("a child arriving for a row set aside for a row deleted since moves to the row that holds the values", async () => {
    const { c, a, b } = await threeRedTeams();
    // a sets its team aside for b's, deletes b's (its own comes back) and adds a player to its own.
    await c.pull(a, "b");
    a.app.exec("DELETE FROM team WHERE id = 20");
    await c.ship(a);
    expect(c.all(a.app, "SELECT id FROM team")).toEqual([{ id: 10n }]);
    a.app.exec("INSERT INTO player(id, team_id, name) VALUES (1, 10, 'ann')");
    await c.ship(a);
    // On b, 10 stays aside (c's 30 holds "red") still naming 20, which is gone.
    await c.pull(b, "a");
    expect(c.all(b.sync.db, "SELECT count(*) AS n FROM _unisync_conflicts WHERE tbl = 'team'")).toEqual([{ n: 1 }]);
    await annOnTeam30(c, b);
  });

  it("a deleted parent kept for a late child points at where its own parent moved meanwhile", async () => {
    const c = cluster(["a", "b", "c"]);
    const [a, b, cc] = c.nodes;
    const pause = () => new Promise<void>((r) => setTimeout(r, 5));
    a.app.exec("INSERT INTO event(name) VALUES ('regional')"); // the first insert at id 1: it keeps the id
    await c.ship(a);
    await pause();
    b.app.exec("INSERT INTO event(name) VALUES ('district'); INSERT INTO match(id, event_id, name) VALUES (7, 1, 'q7')");
    await c.ship(b);
    await c.pull(cc, "b");
    // c deletes match 7 before it hears of a's event: its tombstone says event 1. Then district moves away from 1.
    cc.app.exec("DELETE FROM match WHERE id = 7");
    await c.ship(cc);
    await c.pull(cc, "a");
    // b has not seen the delete and adds a scouting row to match 7: every node keeps the match.
    b.app.exec("INSERT INTO scouting(id, match_id, team, score) VALUES (100, 7, 'green', 3)");
    await c.settle();
    c.check();
    for (const x of c.nodes) {
      const district = c.all(x.app, "SELECT id FROM event WHERE name = 'district'")[0].id;
      expect(district).not.toBe(1n);
      expect(c.all(x.app, "SELECT id, event_id, name FROM match")).toEqual([{ id: 7n, event_id: district, name: "q7" }]);
      expect(c.all(x.app, "SELECT id, match_id FROM scouting")).toEqual([{ id: 100n, match_id: 7n }]);
    }
    c.close();
  });

  it("a cascade split over several segments is not taken for a late child", async () => {
    const c = cluster(["a", "b"], { maxRecords: 3 });
    const [a, b] = c.nodes;
    a.app.exec("INSERT INTO event(id, name) VALUES (1, 'regional'); INSERT INTO match(id, event_id, name) VALUES (7, 1, 'q7')");
    for (let i = 1; i <= 10; i++) a.app.exec(`INSERT INTO scouting(match_id, team, score) VALUES (7, 't${i}', ${i})`);
    await c.settle();
    // One app transaction of 11 deletes (4 segments), the parent first: an app without
    // foreign-key enforcement (SQLite's default) deletes in whatever order it likes.
    a.app.pragma("foreign_keys = OFF");
    a.app.exec("BEGIN; DELETE FROM match WHERE id = 7; DELETE FROM scouting WHERE match_id = 7; COMMIT");
    await c.ship(a);
    // b applies them one segment at a time: never a row kept.
    for (let i = 0; i < 6; i++) {
      await c.pull(b, "a", 1);
      expect(c.all(b.sync.db, "SELECT count(*) AS n FROM _unisync_repairs")).toEqual([{ n: 0 }]);
    }
    await c.settle();
    c.check();
    expect(c.all(b.app, "SELECT count(*) AS n FROM scouting")).toEqual([{ n: 0n }]);
    expect(c.all(b.app, "SELECT count(*) AS n FROM match")).toEqual([{ n: 0n }]);
    c.close();
  });
  it("a batch that ends just before a no-op update does not leave its origin's transaction open on the other nodes", async () => {
    const c = cluster(["a", "b"], { maxRecords: 1 });
    const [a, b] = c.nodes;
    a.app.exec("INSERT INTO team(id, name) VALUES (1, 'reds'), (2, 'blues')");
    await c.settle();
    // Apart, each in one transaction whose last captured change writes nothing (a no-op
    // update): the batch limit ends the segment before it, marked as continuing.
    a.app.exec("BEGIN; INSERT INTO team_tag VALUES (1, 'x'); UPDATE team SET name = name WHERE id = 2; COMMIT");
    b.app.exec("BEGIN; DELETE FROM team WHERE id = 1; UPDATE team SET name = name WHERE id = 2; COMMIT");
    await c.settle();
    c.check();
    for (const x of c.nodes) expect(c.all(x.app, "SELECT id FROM team ORDER BY id")).toEqual([{ id: 1n }, { id: 2n }]);
    c.close();
  });
});
