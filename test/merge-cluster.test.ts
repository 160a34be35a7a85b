/**
 * Merge semantics end to end (issue 4): three agent processes on s3rver, and on
 * each node a Flask-SQLAlchemy app with plain integer ids (SQLite picks max + 1),
 * UNIQUE names, an association table, a nullable self-reference and ON DELETE
 * CASCADE. First the nodes write while their agents are stopped (so nearly every
 * new id collides and team names clash), then while they run. Afterwards:
 *  - every node holds identical tables;
 *  - every player that no node deleted exists exactly once, on the team its
 *    node gave it (or, if that team was set aside by a name clash, at its id).
 *    One race is allowed, because it is the app's: a node's app that loaded a row
 *    and deletes it by id just after replay moved that row away deletes the row
 *    that took the id. Such a loss is accepted only when some app deleted a
 *    player by exactly the id the lost player last had, and is printed;
 *  - integrity_check is clean and the only dangling references are to teams
 *    set aside or deleted;
 *  - `unisync conflicts` reports the same moves and set-aside rows on every node.
 *
 * KEEP_CLUSTER=1 keeps the folders and logs.
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { decodeValues } from "../src/log/value.js";
import { describe, expect, it } from "vitest";
import { appSucceeded, CLI, clusterSuite, integrityCheck, runApp, type Cluster } from "./helpers/cluster.js";

const NODES = ["n1", "n2", "n3"];
const DB = "league.db";
const suite = clusterSuite();

interface Entry {
  op: string;
  table: string;
  uid?: string;
  team?: string;
  cascade?: string[];
  /** The ids the app deleted by. */
  id?: number;
  cascade_ids?: number[];
}

async function writeEverywhere(c: Cluster, phase: number, ops: number): Promise<void> {
  const runs = NODES.map((n, i) => ({
    name: `${n} phase ${phase}`,
    run: runApp("flask_league.py", [c.instance(n), "--node", String(i + 1), "--seed", String(phase * 10 + i), "--ops", String(ops), "--journal-file", join(c.node(n).dir, "journal.jsonl")]),
  }));
  for (const r of runs) await appSucceeded(r.run, r.name);
}

const rows = (path: string, sql: string) => {
  const db = new Database(path, { readonly: true });
  try {
    return db.prepare(sql).all() as Record<string, unknown>[];
  } finally {
    db.close();
  }
};

describe("merge semantics with a Flask-SQLAlchemy app", () => {
  it("keeps every row through id collisions, unique clashes and cascades", async () => {
    process.env.SQLALCHEMY_SILENCE_UBER_WARNING = "1";
    const c = await suite.start(NODES, "merge");
    try {
      for (const n of NODES) await appSucceeded(runApp("flask_league.py", [c.instance(n), "--init-only"]), `${n} init`);
      await c.waitForQuiescence([DB], 30_000);
      // Apart: every node picks ids 1, 2, 3... and the names team-0..11 on its own.
      for (const n of NODES) await c.stop(n);
      await writeEverywhere(c, 1, 60);
      for (const n of NODES) await c.restart(n);
      await c.waitForQuiescence([DB], 90_000);
      // Together: writes race the agents.
      await writeEverywhere(c, 2, 60);
      await c.waitForQuiescence([DB], 90_000);
      await c.waitForConvergence(c.paths(DB), 30_000);

      const journal: Entry[] = NODES.flatMap((n) =>
        readFileSync(join(c.node(n).dir, "journal.jsonl"), "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as Entry),
      );
      const deletedPlayers = new Set(journal.flatMap((e) => (e.table === "player" && e.op === "delete" ? [e.uid] : e.op === "delete" ? (e.cascade ?? []) : [])));
      const deletedTeams = new Set(journal.filter((e) => e.table === "team" && e.op === "delete").map((e) => e.uid));
      const insertedPlayers = journal.filter((e) => e.table === "player" && e.op === "insert");
      const deletedIds = new Set(journal.flatMap((e) => (e.id !== undefined ? [e.id] : (e.cascade_ids ?? []))).map(String));
      /** The id a player had when it was deleted, from the merge state's tombstone. */
      const lastId = (path: string, uid: string): string | null => {
        for (const r of rows(path, "SELECT dead FROM _unisync_rows WHERE tbl = 'player' AND dead IS NOT NULL")) {
          const flat = decodeValues(r.dead as Buffer);
          const at = new Map<unknown, unknown>(flat.flatMap((v, i) => (i % 2 === 0 ? [[v, flat[i + 1]]] : [])));
          if (at.get("uid") === uid) return String(at.get("id"));
        }
        return null;
      };

      const reports = NODES.map((n) => JSON.parse(execFileSync(process.execPath, [CLI, "conflicts", c.instance(n), "--json"]).toString()) as {
        databases: { moved: { table: string; from: string; to: string }[]; setAside: { table: string; key: string[]; values: Record<string, string> }[] }[];
      });
      const summary = reports.map((r) => ({
        moved: r.databases[0].moved.map((m) => `${m.table} ${m.from}->${m.to}`).sort(),
        setAside: r.databases[0].setAside.map((s) => `${s.table} ${s.key.join(",")}`).sort(),
      }));
      // Apart, the nodes certainly picked the same ids: moves happened, and the same everywhere.
      expect(summary[0].moved.length).toBeGreaterThan(0);
      for (const s of summary) expect(s).toEqual(summary[0]);
      // --limit cuts the lists, never the totals, and says so.
      const cut = JSON.parse(execFileSync(process.execPath, [CLI, "conflicts", c.instance(NODES[0]), "--json", "--limit", "1"]).toString()) as {
        databases: { moved: unknown[]; totals: { moved: number } }[];
      };
      expect(cut.databases[0].moved.length).toBe(1);
      expect(cut.databases[0].totals.moved).toBe(summary[0].moved.length);
      if (summary[0].moved.length > 1) expect(execFileSync(process.execPath, [CLI, "conflicts", c.instance(NODES[0]), "--limit", "1"]).toString()).toMatch(/--limit N lists more/);
      const asideTeamUids = new Set(reports[0].databases[0].setAside.filter((s) => s.table === "team").map((s) => JSON.parse(s.values.uid) as string));

      for (const n of NODES) {
        const path = c.instance(n, DB);
        expect(integrityCheck(path)).toBe("ok");
        const players = rows(path, "SELECT p.uid, p.team_id, t.uid AS team_uid FROM player p LEFT JOIN team t ON t.id = p.team_id");
        const byUid = new Map<string, Record<string, unknown>>();
        for (const p of players) {
          expect(byUid.has(String(p.uid)), `${n}: player ${String(p.uid)} twice`).toBe(false);
          byUid.set(String(p.uid), p);
        }
        const problems: string[] = [];
        for (const e of insertedPlayers) {
          const p = byUid.get(e.uid as string);
          if (!p) {
            if (deletedPlayers.has(e.uid) || deletedTeams.has(e.team)) continue;
            const id = lastId(path, e.uid as string);
            if (id !== null && deletedIds.has(id)) console.log(`${n}: player ${e.uid} was deleted by an app holding its id ${id} for another row (the stale-id race)`);
            else problems.push(`${n}: player ${e.uid} lost`);
            continue;
          }
          // The player is on the team its node gave it, unless that team is gone or set aside.
          if (p.team_uid !== e.team && !deletedTeams.has(e.team) && !asideTeamUids.has(e.team as string)) {
            problems.push(`${n}: player ${e.uid} is on team ${String(p.team_uid)}, not ${e.team}`);
          }
        }
        // A table without a key: each fan row points at the team its player joined.
        const teamOf = new Map(insertedPlayers.map((e) => [e.uid as string, e.team as string]));
        for (const f of rows(path, "SELECT f.fan, t.uid AS team_uid FROM team_fan f LEFT JOIN team t ON t.id = f.team_id")) {
          const want = teamOf.get(String(f.fan));
          if (want !== undefined && f.team_uid !== want && !deletedTeams.has(want) && !asideTeamUids.has(want)) {
            problems.push(`${n}: fan row of ${String(f.fan)} is on team ${String(f.team_uid)}, not ${want}`);
          }
        }
        expect(problems).toEqual([]);
      }
      expect(c.unexpectedExits).toEqual([]);
    } catch (err) {
      suite.keep = true;
      throw err;
    }
  }, 300_000);
});
