/**
 * Property test on a Flask-like league schema: three in-process nodes write
 * teams, players (with a self-referencing mentor_id), tags and team tags at
 * random, often apart (partitions make them pick the same ids and the same
 * unique names), and exchange segments in random interleavings. At the end,
 * after every node has pulled everything, all nodes must hold the same rows,
 * nothing parked, and every foreign key must hold. What it exercises: id
 * collisions (lineages moved with their children, tombstones and set-aside
 * rows), unique clashes, reference repair, and a record whose own placement
 * moves the row its reference names (seed 19 of the scratch fuzzer). Beyond
 * agreement, every player and team note (a table without a key) must point at
 * the team it was written for: nodes that agree on a wrong parent fail it.
 * Rerun a failure with SEED=<printed seed> (STEPS= to change the length,
 * SEEDS=<first>:<count> for a range, REAL=1 for real clocks).
 */
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it, vi } from "vitest";

// Write-deadline chaos, the only mock: with `chaos` > 0 replay and sealing stop
// at random points as they would when the app holds the write lock (a loaded
// machine), which real time would make unrepeatable. Everything else is real.
let chaos = 0;
let chaosRand: () => number = Math.random;
vi.mock("../src/db/writes.js", async (importOriginal) => {
  const orig = (await importOriginal()) as Record<string, unknown>;
  return { ...orig, deadline: (ms?: number) => (chaos > 0 ? { passed: () => chaosRand() < chaos } : (orig.deadline as (m?: number) => unknown)(ms)) };
});

import { HybridClock } from "../src/log/hlc.js";
import { FileStore } from "../src/store/file.js";
import { compareDatabases } from "./helpers/checker.js";
import { appConnection, openSync } from "./helpers/node.js";
import { mulberry32 } from "./helpers/random.js";

const root = mkdtempSync(join(tmpdir(), "unisync-league-"));
afterAll(() => (process.env.KEEP ? console.log(`kept ${root}`) : rmSync(root, { recursive: true, force: true })));

const SCHEMA = `
CREATE TABLE team(id INTEGER PRIMARY KEY, uid TEXT NOT NULL, name TEXT NOT NULL UNIQUE);
CREATE TABLE player(id INTEGER PRIMARY KEY, uid TEXT NOT NULL, team_id INTEGER NOT NULL REFERENCES team(id) ON DELETE CASCADE, mentor_id INTEGER REFERENCES player(id), name TEXT NOT NULL, score REAL, team_name TEXT);
CREATE TABLE tag(id INTEGER PRIMARY KEY, label TEXT NOT NULL UNIQUE);
CREATE TABLE team_tag(team_id INTEGER REFERENCES team(id) ON DELETE CASCADE, tag_id INTEGER REFERENCES tag(id) ON DELETE CASCADE, PRIMARY KEY(team_id, tag_id));
-- No key: a bag of rows, whose references must follow their team's moves too.
CREATE TABLE team_note(team_id INTEGER REFERENCES team(id) ON DELETE CASCADE, team_name TEXT, body TEXT);
`;

type Db = ReturnType<typeof appConnection>;
const one = (db: Db, sql: string, ...p: unknown[]) => db.prepare(sql).get(...p) as Record<string, bigint | string | null> | undefined;

async function run(seed: number, steps: number): Promise<string[]> {
  const rand = mulberry32(seed);
  chaosRand = mulberry32(seed + 7777);
  chaos = process.env.CHAOS ? Number(process.env.CHAOS) : seed % 3 === 0 ? 0.05 : 0;
  const pick = <T>(a: T[]) => a[Math.floor(rand() * a.length)];
  const dir = join(root, `s${seed}`);
  mkdirSync(dir, { recursive: true });
  const store = new FileStore(join(dir, "store"));
  const names = ["n1", "n2", "n3"];
  // Fake wall clocks from a start fixed by the seed: the clocks name lineages, and
  // lineages decide where moved rows land, so the whole run repeats from the seed.
  let wall = 1_780_000_000_000 + (seed % 100_000) * 7_919_000;
  const nodes = names.map((name) => {
    const path = join(dir, `${name}.db`);
    const app = appConnection(path);
    app.exec(SCHEMA);
    app.pragma("foreign_keys = ON");
    // REAL=1: real clocks (not repeatable, for long searches).
    return { name, path, app, sync: openSync(path, name, store, process.env.REAL ? new HybridClock() : new HybridClock(0, () => wall)), counter: 0 };
  });
  const randRow = (db: Db, t: string) => {
    const c = Number(one(db, `SELECT count(*) AS n FROM ${t}`)!.n);
    return c ? one(db, `SELECT * FROM ${t} ORDER BY id LIMIT 1 OFFSET ?`, Math.floor(rand() * c)) : undefined;
  };
  // Often one of the highest ids: rows an id collision moved (their new ids are far above the app's).
  const movedOrAny = (db: Db) => (rand() < 0.5 ? one(db, "SELECT * FROM player ORDER BY id DESC LIMIT 1 OFFSET ?", Math.floor(rand() * 3)) : randRow(db, "player"));
  const write = (x: (typeof nodes)[number]) => {
    const db = x.app;
    const op = rand();
    db.exec("BEGIN");
    try {
      if (op < 0.15) {
        const name = `team-${Math.floor(rand() * 12)}`;
        if (!one(db, "SELECT 1 FROM team WHERE name = ?", name)) db.prepare("INSERT INTO team(uid, name) VALUES (?, ?)").run(`${x.name}-${++x.counter}`, name);
      } else if (op < 0.45) {
        const t = randRow(db, "team");
        const m = rand() < 0.5 ? movedOrAny(db) : undefined;
        if (t) {
          db.prepare("INSERT INTO player(uid, team_id, mentor_id, name, score, team_name) VALUES (?, ?, ?, ?, 0.0, ?)").run(`${x.name}-${++x.counter}`, t.id, m ? m.id : null, `p${x.counter}`, t.name);
          // No random draw here: seeds keep the runs they had before this table existed.
          db.prepare("INSERT INTO team_note VALUES (?, ?, ?)").run(t.id, t.name, `joined by p${x.counter}`);
        }
      } else if (op < 0.55) {
        const t = randRow(db, "team");
        const label = `tag-${Math.floor(rand() * 6)}`;
        if (t) {
          if (!one(db, "SELECT 1 FROM tag WHERE label = ?", label)) db.prepare("INSERT INTO tag(label) VALUES (?)").run(label);
          db.prepare("INSERT OR IGNORE INTO team_tag VALUES (?, (SELECT id FROM tag WHERE label = ?))").run(t.id, label);
        }
      } else if (op < 0.7) {
        const p = randRow(db, "player");
        if (p) db.prepare("UPDATE player SET score = ? WHERE id = ?").run(Math.round(rand() * 1e5) / 1000, p.id);
      } else if (op < 0.86) {
        // Sometimes the row that kept an id points at the row that lost it (read from
        // unisync's moves only to steer the choice): a third node's change of a row
        // whose placement moves the very row it points at.
        const pair = rand() < 0.6 ? one(db, "SELECT from_key AS p, key AS m FROM _unisync_moves WHERE tbl = 'player' AND live ORDER BY key LIMIT 1 OFFSET ?", Math.floor(rand() * 4)) : undefined;
        if (pair && one(db, "SELECT 1 FROM player WHERE id = ?", pair.p) && one(db, "SELECT 1 FROM player WHERE id = ?", pair.m)) db.prepare("UPDATE player SET mentor_id = ? WHERE id = ?").run(pair.m, pair.p);
        else {
          const p = randRow(db, "player");
          if (p) db.prepare("UPDATE player SET mentor_id = ? WHERE id = ?").run(movedOrAny(db)?.id ?? null, p.id);
        }
      } else if (op < 0.94) {
        const p = randRow(db, "player");
        if (p) {
          db.prepare("UPDATE player SET mentor_id = NULL WHERE mentor_id = ?").run(p.id);
          db.prepare("DELETE FROM player WHERE id = ?").run(p.id);
        }
      } else {
        const t = randRow(db, "team");
        if (t) {
          db.prepare("UPDATE player SET mentor_id = NULL WHERE mentor_id IN (SELECT id FROM player WHERE team_id = ?)").run(t.id);
          db.prepare("DELETE FROM team WHERE id = ?").run(t.id);
        }
      }
      db.exec("COMMIT");
    } catch {
      db.exec("ROLLBACK"); // a constraint the app would report to its user
    }
  };
  // Slow links: a node hears some origins rarely, so it hears a change of a row
  // (from a third node) before the row itself. Drawn again every 100 steps.
  let slow = new Set<string>();
  for (let s = 0; s < steps; s++) {
    if (s % 100 === 0) slow = new Set(names.flatMap((x) => names.filter((o) => o !== x && rand() < 0.4).map((o) => `${x}<${o}`)));
    wall += rand() < 0.6 ? 0 : rand() < 0.8 ? Math.floor(rand() * 5) : Math.floor(rand() * 200);
    const x = pick(nodes);
    // Partitions: the first 30 of every 100 steps only write, so ids and names collide.
    if (s % 100 < 30 || rand() < 0.5) write(x);
    else if (rand() < 0.4) {
      x.sync.sealPending();
      await x.sync.upload();
    } else {
      const o = pick(names.filter((o) => o !== x.name));
      if (!slow.has(`${x.name}<${o}`) || rand() < 0.1) await x.sync.pull(o, 1 + Math.floor(rand() * 3));
    }
  }
  chaos = 0;
  for (let round = 0; round < 4; round++) {
    for (const x of nodes) {
      x.sync.sealPending();
      await x.sync.upload();
    }
    for (const x of nodes) {
      for (const o of names) if (o !== x.name) while ((await x.sync.pull(o, 50)) > 0);
      x.sync.retryParked();
    }
  }
  const problems = compareDatabases(nodes.map((x) => x.path));
  for (const x of nodes) {
    if (x.sync.parkedCount() > 0) problems.push(`${x.name}: ${x.sync.parkedCount()} records parked`);
    // Nothing is left to seal, so no origin's log may end part way through a transaction
    // (that would put off reference repairs for good).
    for (const o of x.sync.db.prepare("SELECT origin FROM _unisync_cursors WHERE open = 1").pluck().all()) problems.push(`${x.name}: the log of ${o} ends part way through a transaction`);
    for (const f of x.app.prepare("PRAGMA foreign_key_check").all()) problems.push(`${x.name}: foreign key broken ${JSON.stringify(f, (_, v) => (typeof v === "bigint" ? String(v) : v))}`);
    // Every node may agree and still be wrong: a row must point at the team it was written for
    // (by name: a team set aside by a unique clash hands its rows to the team that kept the name).
    for (const t of ["player", "team_note"]) {
      const wrong = x.app.prepare(`SELECT count(*) FROM ${t} c JOIN team ON team.id = c.team_id WHERE c.team_name IS NOT team.name`).pluck().get();
      if (Number(wrong) > 0) problems.push(`${x.name}: ${wrong} ${t} row(s) point at another team than the one they were written for`);
    }
  }
  nodes.forEach((x) => (x.sync.close(), x.app.close()));
  return problems;
}

describe("league property", () => {
  // SEEDS=<first>:<count> runs a range (for long searches).
  const [first, count] = (process.env.SEEDS ?? "").split(":").map(Number);
  // Seed 26 once failed (a reference read before its row's placement moved the row it names).
  const seeds = process.env.SEED
    ? [Number(process.env.SEED)]
    : process.env.SEEDS
      ? Array.from({ length: count }, (_, i) => first + i)
      : [26, ...Array.from({ length: 6 }, (_, i) => (Date.now() % 100000) + 100 + i)];
  for (const seed of seeds) {
    it(`three nodes agree on the league (seed ${seed})`, async () => {
      const problems = await run(seed, Number(process.env.STEPS ?? 400));
      if (problems.length) console.error(`league property failed: rerun with SEED=${seed}`);
      expect(problems).toEqual([]);
    }, 60_000);
  }
});
