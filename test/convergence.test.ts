/**
 * Property test of invariants 1-3, 6, 10 and 11: three nodes write at random
 * (inserts with values of every storage class, inserts that let SQLite pick the
 * id and so collide across nodes, children pointing at them, updates of rows
 * other nodes made, deletes with ON DELETE CASCADE racing children written
 * elsewhere), exchange segments in random interleavings, with segments applied
 * twice; part way through a fourth node joins from an old copy of one node's
 * database (unisync's tables stripped, like a plain backup), sometimes edited
 * before it joins (a diverged copy). All must end with identical tables, every
 * row that no node deleted, every child on the row its node gave it (or on the
 * row that kept the values of a row set aside), no phantom copy, and every
 * foreign key satisfied. Half the pulls read through the cluster index, whose
 * pointers the store drops, delays and duplicates at random: none may be skipped.
 * Rerun a failure with SEED=<printed seed>.
 */
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import type { Readable } from "node:stream";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FileStore } from "../src/store/file.js";
import { parsePointerKey, pointerKey, SegmentIndex, type KnownSegments } from "../src/log/index.js";
import { decodeValues, type SqlValue } from "../src/log/value.js";
import { compareDatabases } from "./helpers/checker.js";
import { appConnection, openSync } from "./helpers/node.js";
import { mulberry32, randomValue } from "./helpers/random.js";

const root = mkdtempSync(join(tmpdir(), "unisync-conv-"));
// TRACE=1 prints every write and exchange and keeps the databases (path printed).
const trace = process.env.TRACE ? (...a: unknown[]) => console.log(...a) : () => {};
afterAll(() => (process.env.TRACE ? console.log(`kept ${root}`) : rmSync(root, { recursive: true, force: true })));

const SCHEMA = `
CREATE TABLE item(id INTEGER PRIMARY KEY, a, b REAL, c TEXT, d BLOB, e INTEGER, tag TEXT, u TEXT UNIQUE);
CREATE TABLE part(id INTEGER PRIMARY KEY, item_id INTEGER REFERENCES item(id) ON DELETE CASCADE, ptag TEXT, stale INTEGER);
CREATE TABLE doc(uid TEXT PRIMARY KEY, body, n, slug TEXT UNIQUE);
CREATE TABLE edge(src INTEGER, dst TEXT, w, PRIMARY KEY(src, dst)) WITHOUT ROWID;
CREATE TABLE note(who, what);
`;

/**
 * The store as a flaky bucket treats index pointers: each one is put, dropped,
 * held back until a later step (then put under its old key), or put twice.
 */
class ChaoticPointerStore extends FileStore {
  private readonly held: [string, Buffer][] = [];

  constructor(root: string, private readonly rand: () => number) {
    super(root);
  }

  override async put(key: string, body: Buffer | Readable, size?: number): Promise<void> {
    if (!key.startsWith("idx/") || !Buffer.isBuffer(body)) return super.put(key, body, size);
    const r = this.rand();
    if (r < 0.2) return; // lost
    if (r < 0.4) {
      this.held.push([key, body]);
      return;
    }
    await super.put(key, body, size);
    if (r < 0.6) {
      const p = parsePointerKey(key)!;
      await super.put(pointerKey(p.ms + 1 + Math.floor(this.rand() * 5000), p.origin, p.stream, p.seq, p.segmentKey.slice(-68, -4)), body);
    }
  }

  async releaseDelayed(): Promise<void> {
    for (const [k, b] of this.held.splice(0)) await super.put(k, b);
  }
}

async function run(seed: number, steps: number) {
  const rand = mulberry32(seed);
  const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)];
  const dir = join(root, `s${seed}`);
  mkdirSync(dir, { recursive: true });
  const store = new ChaoticPointerStore(join(dir, "store"), rand);
  const names = ["n1", "n2", "n3"];
  // Each node also reads through the cluster index, whose pointers the store drops, delays and duplicates.
  const indexes = new Map(names.concat("n4").map((name) => [name, new SegmentIndex(store, name, 30_000, 0)]));
  const open = (name: string, schema = true, extra: Parameters<typeof openSync>[4] = {}) => {
    const path = join(dir, `${name}.db`);
    const app = appConnection(path);
    app.pragma("foreign_keys = ON"); // the app's cascades really happen
    if (schema) app.exec(SCHEMA);
    return { name, path, app, sync: openSync(path, name, store, undefined, extra) };
  };
  /** The agent enrols a new database's rows once every origin is replayed into it. */
  const enrolIfCaughtUp = (n: (typeof nodes)[0]) => {
    if (n.sync.enrolling && n.sync.caughtUp(names.filter((o) => o !== n.name))) n.sync.finishEnrolment();
  };
  const nodes = names.map((name) => open(name));
  // A fourth node joins at `joinAt` from a copy of a node's database taken at `copyAt`.
  const copyAt = Math.floor(rand() * steps * 0.4);
  const joinAt = process.env.NOLATE ? Infinity : copyAt + Math.floor(rand() * steps * 0.4);
  const late = { name: "n4", from: pick(nodes), diverged: rand() < 0.5 };
  const backup = join(dir, "backup.db");
  let counter = 0;
  // Tags name rows across nodes (ids may move): every tag inserted and never deleted must survive.
  const insertedTags = new Set<string>();
  const deletedTags = new Set<string>();
  /** The unique value each item was inserted with (never changed afterwards). */
  const uOfTag = new Map<string, string | null>();
  const value = () => randomValue(rand);
  // In a table without a key, rows that differ only in the sign of a zero are equal
  // copies to SQL (nothing can select one of them), so those values stay unsigned.
  const bagValue = () => randomValue(rand, false);
  const rows = (app: (typeof nodes)[0]["app"], sql: string) => app.prepare(sql).raw(true).all() as SqlValue[][];
  const hasZ = (app: (typeof nodes)[0]["app"]) => rows(app, "PRAGMA table_info(item)").some((c) => c[1] === "z");

  // Each node's app migrates (ADD COLUMN z) at its own moment: schemas differ for a while.
  const migrateAt = new Map(nodes.map((n) => [n.name, Math.floor(rand() * steps)]));
  const migrated = new Set<string>();
  for (let step = 0; step < steps; step++) {
    if (step === copyAt) {
      late.from.app.exec(`VACUUM INTO '${backup}'`);
      stripUnisync(backup);
    }
    if (step === joinAt) {
      copyFileSync(backup, join(dir, "n4.db"));
      const pre = appConnection(join(dir, "n4.db"));
      // Edited apart before unisync came (updates only: rows inserted then are merged by id by design).
      if (late.diverged) for (const [id] of pre.prepare("SELECT id FROM item").raw(true).all() as SqlValue[][]) if (rand() < 0.3) pre.prepare("UPDATE item SET a = ?, e = ? WHERE id = ?").run(value(), value(), id);
      pre.close();
      // As the agent does: n4 replays the log before it enrols its own rows.
      nodes.push(open("n4", false, { enrolAfterCatchUp: true }));
      nodes[3].sync.continueLog(0);
      names.push("n4");
      trace("n4 joins from a copy of", late.from.name, "taken at step", copyAt, late.diverged ? "(diverged)" : "");
    }
    const n = pick(nodes);
    const r = rand();
    if (!migrated.has(n.name) && step >= (migrateAt.get(n.name) ?? 0)) {
      // n4's copy may have it already.
      if (!hasZ(n.app)) n.app.exec("ALTER TABLE item ADD COLUMN z");
      migrated.add(n.name);
    }
    if (migrated.has(n.name) && rand() < 0.2) {
      const ids = rows(n.app, "SELECT id FROM item");
      if (ids.length) n.app.prepare("UPDATE item SET z = ? WHERE id = ?").run(value(), pick(ids)[0]);
    }
    if (r < 0.55) {
      // a small app transaction
      n.app.transaction(() => {
        for (let k = 0; k < 1 + Math.floor(rand() * 3); k++) {
          const op = rand();
          const id = BigInt(nodes.indexOf(n) + 1) * 1_000_000n + BigInt(++counter);
          const tag = `${n.name}-${counter}`;
          if (op < 0.2) {
            n.app.prepare("INSERT INTO item(id, a, b, c, d, e, tag) VALUES (?, ?, ?, ?, ?, ?, ?)").run(id, value(), rand() * 1e6, `t${counter}`, Buffer.from([counter % 256]), value(), tag);
            trace(n.name, "insert item", id, tag);
            insertedTags.add(tag);
          } else if (op < 0.4) {
            // The id SQLite picks (max + 1): nodes that have not heard each other pick the same.
            // Some carry a value from a small pool in a UNIQUE column: id collisions and unique clashes at once.
            const u = rand() < 0.3 ? pick(["u1", "u2", "u3"]) : null;
            uOfTag.set(tag, u);
            if (u !== null && rows(n.app, `SELECT 1 FROM item WHERE u = '${u}'`).length) continue;
            const ins = n.app.prepare("INSERT INTO item(a, b, c, tag, u) VALUES (?, ?, ?, ?, ?)").run(value(), rand(), `t${counter}`, tag, u);
            trace(n.name, "insert item", ins.lastInsertRowid, tag);
            insertedTags.add(tag);
            const items = rows(n.app, "SELECT id, tag FROM item");
            if (items.length && rand() < 0.6) {
              const [itemId, itemTag] = pick(items);
              // A part n4's app adds to a row of its old copy before the log is in it may mean a row
              // that another has at that id now (the app's stale id, like after a move): marked.
              const p = n.app.prepare("INSERT INTO part(item_id, ptag, stale) VALUES (?, ?, ?)").run(itemId, itemTag, n.sync.enrolling ? 1 : null);
              trace(n.name, "insert part", p.lastInsertRowid, "->", itemId, itemTag);
            }
          }
          // Slugs from a small set clash across nodes on the UNIQUE constraint.
          else if (op < 0.5) n.app.prepare("INSERT OR IGNORE INTO doc VALUES (?, ?, ?, ?)").run(`${n.name}-${counter}`, value(), value(), rand() < 0.7 ? pick(["s1", "s2", "s3", "s4", "s5", "s6"]) : null);
          else if (op < 0.55) n.app.prepare("INSERT OR IGNORE INTO edge VALUES (?, ?, ?)").run(BigInt(Math.floor(rand() * 5)), pick(["x", "y", "z"]), value());
          else if (op < 0.6) n.app.prepare("INSERT INTO note VALUES (?, ?)").run(n.name, bagValue());
          else if (op < 0.85) {
            const ids = rows(n.app, "SELECT id FROM item");
            if (ids.length && rand() < 0.5) n.app.prepare(`UPDATE item SET ${pick(["a", "b", "c", "e"])} = ? WHERE id = ?`).run(value(), pick(ids)[0]);
            else if (ids.length) n.app.prepare("UPDATE item SET a = ?, b = ?, c = ?, e = ? WHERE id = ?").run(value(), rand(), `u${counter}`, value(), pick(ids)[0]);
            const uids = rows(n.app, "SELECT uid FROM doc");
            if (uids.length) n.app.prepare("UPDATE doc SET n = ? WHERE uid = ?").run(value(), pick(uids)[0]);
            if (uids.length && rand() < 0.3) n.app.prepare("UPDATE OR IGNORE doc SET slug = ? WHERE uid = ?").run(pick(["s1", "s2", "s7", null]), pick(uids)[0]);
          } else {
            const items = rows(n.app, "SELECT id, tag FROM item");
            if (items.length) {
              const [itemId, itemTag] = pick(items);
              n.app.prepare("DELETE FROM item WHERE id = ?").run(itemId);
              trace(n.name, "delete item", itemId, itemTag);
              deletedTags.add(String(itemTag));
            }
            const edges = rows(n.app, "SELECT src, dst FROM edge");
            if (edges.length && rand() < 0.3) n.app.prepare("DELETE FROM edge WHERE src = ? AND dst = ?").run(...pick(edges));
            const edges2 = rows(n.app, "SELECT src, dst FROM edge");
            if (edges2.length && rand() < 0.5) n.app.prepare("UPDATE edge SET w = ? WHERE src = ? AND dst = ?").run(value(), ...pick(edges2));
            if (rand() < 0.3) n.app.prepare("DELETE FROM note WHERE rowid = (SELECT min(rowid) FROM note)").run();
            // Rows of a keyless table edited in place, concurrently on several nodes.
            if (rand() < 0.5) n.app.prepare("UPDATE note SET what = ? WHERE rowid = (SELECT max(rowid) FROM note)").run(bagValue());
          }
        }
      })();
    } else if (r < 0.75) {
      n.sync.sealPending();
      await n.sync.upload();
      trace(n.name, "shipped");
    } else if (r < 0.95) {
      const from = pick(names.filter((x) => x !== n.name));
      // Half the pulls fetch what the index names (as the agent does), the rest list the stream (start, gap repair).
      let known: KnownSegments | undefined;
      if (rand() < 0.5) {
        const index = indexes.get(n.name)!;
        await index.poll();
        known = index.segments(from, "app.db");
      }
      const applied = await n.sync.pull(from, 1 + Math.floor(rand() * 3), Infinity, () => false, known);
      trace(n.name, "pulled", applied, "records from", from, known ? `(index names ${[...known.keys()].join(",")})` : "(listed)");
      if (rand() < 0.2) await store.releaseDelayed();
      enrolIfCaughtUp(n);
    } else {
      // Forget the last applied segment: it is applied again, and must change nothing.
      n.sync.db.prepare("UPDATE _unisync_cursors SET seq = seq - 1 WHERE seq > 0").run();
    }
  }
  for (const n of nodes) if (!hasZ(n.app)) n.app.exec("ALTER TABLE item ADD COLUMN z");
  // Quiesce: everyone ships everything, then everyone applies everything, until
  // nothing is left to send (a node that finishes enrolling has new records).
  for (let round = 0; round < 3 || nodes.some((n) => n.sync.enrolling || n.sync.pendingChanges() > 0 || n.sync.outbox.size().segments > 0); round++) {
    if (round > 10) throw new Error("no quiescence after 10 rounds");
    for (const n of nodes) {
      n.sync.sealPending();
      await n.sync.upload();
    }
    for (const n of nodes) {
      n.sync.refreshSchema();
      for (const o of names) if (o !== n.name) while ((await n.sync.pull(o, 50)) > 0);
      enrolIfCaughtUp(n);
    }
  }
  const lost: string[] = [];
  // Rows set aside by unique clashes are the same on every node.
  const aside = nodes.map((n) => JSON.stringify(rows(n.sync.db, "SELECT tbl, hex(row_key) FROM _unisync_conflicts ORDER BY 1, 2")));
  for (const [i, a] of aside.entries()) if (a !== aside[0]) lost.push(`${nodes[i].name} set aside ${a}, ${nodes[0].name} ${aside[0]}`);
  for (const n of nodes) {
    expect(n.sync.problems.size).toBe(0);
    expect(n.sync.db.prepare("SELECT tbl, reason FROM _unisync_parked").all(), n.name).toEqual([]);
    const tags = rows(n.app, "SELECT tag FROM item WHERE tag IS NOT NULL").map((r) => String(r[0]));
    expect(tags.length, `${n.name}: a tag appears twice`).toBe(new Set(tags).size);
    const present = new Set(tags);
    // A row set aside by a unique clash is kept, out of the table, with its values.
    for (const [vals] of rows(n.sync.db, "SELECT vals FROM _unisync_conflicts WHERE tbl = 'item'")) {
      const flat = decodeValues(vals as Buffer);
      for (let i = 0; i + 1 < flat.length; i += 2) if (flat[i] === "tag") present.add(String(flat[i + 1]));
    }
    for (const t of insertedTags) if (!deletedTags.has(t) && !present.has(t)) lost.push(`${n.name} lost row ${t}`);
    // Every foreign key holds: a part written while its item was deleted kept the item.
    for (const v of rows(n.app, "PRAGMA foreign_key_check")) lost.push(`${n.name}: foreign key broken ${JSON.stringify(v.map(String))}`);
    // A child points at the row its node gave it, or, if that row was set aside by a
    // unique clash at some point, at the row that kept its unique value (a move that stays).
    for (const [partId, itemId, ptag] of rows(n.app, "SELECT part.id, part.item_id, part.ptag FROM part WHERE stale IS NULL")) {
      const at = rows(n.app, `SELECT tag, u FROM item WHERE id = ${String(itemId)}`)[0];
      const u = uOfTag.get(String(ptag));
      const followed = at && u !== undefined && u !== null && at[1] === u;
      if (!at || (at[0] !== ptag && !followed)) lost.push(`${n.name}: part ${String(partId)} of ${String(ptag)} points at ${at ? String(at[0]) : "nothing"}`);
    }
    n.sync.close();
    n.app.close();
  }
  return [...lost, ...compareDatabases(nodes.map((n) => n.path))];
}

/** A plain copy of an app database, as a backup tool that knows nothing of unisync keeps it. */
function stripUnisync(path: string): void {
  const db = appConnection(path);
  for (const [type, name] of db.prepare("SELECT type, name FROM sqlite_master WHERE name LIKE '\\_unisync\\_%' ESCAPE '\\' AND type IN ('trigger', 'table')").raw(true).all() as string[][]) {
    db.exec(`DROP ${type} IF EXISTS "${name}"`);
  }
  db.close();
}

describe("convergence", () => {
  const seeds = process.env.SEED ? [Number(process.env.SEED)] : Array.from({ length: 6 }, (_, i) => (Date.now() % 100000) + i);
  for (const seed of seeds) {
    it(`three nodes converge (seed ${seed})`, async () => {
      const diffs = await run(seed, 400);
      expect(diffs, `seed ${seed}`).toEqual([]);
    });
  }
});
