/**
 * The core loop, end to end: three agents as separate processes, each beside
 * its own instance folder, sharing one s3rver store. On all three nodes at once
 * random_writer.py (data.db) and flask_app.py (app.db + audit.db) write, edit
 * each other's rows and migrate data.db at different moments. Afterwards every
 * node must hold the same rows, no committed insert may be missing, no agent
 * may have logged an error and every database must pass integrity_check.
 *
 * Reproduce a run with SEED=<printed seed>; KEEP_CLUSTER=1 keeps the folders and logs.
 */
import { describe, expect, it } from "vitest";
import { join } from "node:path";
import { compareDatabases, compareToJournal, readJournal, type JournalEntry } from "./helpers/checker.js";
import { appSucceeded, clusterSuite, integrityCheck, runApp, type AppRun } from "./helpers/cluster.js";

const SEED = Number(process.env.SEED ?? Math.floor(Math.random() * 1_000_000));
const NODES = ["n1", "n2", "n3"];
const DBS = ["data.db", "app.db", "audit.db"];
const RW_OPS = 300;
const FLASK_OPS = 150;
/** Each node migrates data.db at a different op, so schemas differ for a while. */
const MIGRATE_AT = [40, 140, 240];

const suite = clusterSuite();

describe("three agents, one s3 store", () => {
  it("converge to identical databases while all nodes write, edit each other's rows and migrate", async (ctx) => {
    console.log(`cluster.test SEED=${SEED}`);
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    const c = await suite.start(NODES, `cluster-${SEED}`);

    const apps: { name: string; run: AppRun }[] = [];
    NODES.forEach((name, i) => {
      const dir = c.node(name).dir;
      const appLog = join(dir, "apps.log");
      apps.push({
        name: `random_writer on ${name}`,
        run: runApp("random_writer.py", [
          c.instance(name, "data.db"), "--node", String(i + 1), "--seed", String(SEED), "--ops", String(RW_OPS),
          "--migrate-at", String(MIGRATE_AT[i]), "--sleep-ms", "40", "--journal-file", join(dir, "rw.jsonl"),
        ], appLog),
      });
      apps.push({
        name: `flask_app on ${name}`,
        run: runApp("flask_app.py", [
          c.instance(name), "--node", String(i + 1), "--seed", String(SEED), "--ops", String(FLASK_OPS),
          "--sleep-ms", "40", "--journal-file", join(dir, "flask.jsonl"),
        ], appLog),
      });
    });
    const t0 = Date.now();
    for (const a of apps) await appSucceeded(a.run, a.name);
    const tApps = Date.now();
    expect(c.unexpectedExits).toEqual([]);

    await c.waitForQuiescence(DBS, 90_000);
    for (const db of DBS) await c.waitForConvergence(c.paths(db), 30_000);
    console.log(`apps ran ${tApps - t0} ms; quiescent and converged ${Date.now() - tApps} ms later`);

    const journal: JournalEntry[] = NODES.flatMap((n) => [
      ...readJournal(join(c.node(n).dir, "rw.jsonl"), true),
      ...readJournal(join(c.node(n).dir, "flask.jsonl"), true),
    ]);
    // The run really exercised what it is meant to.
    expect(journal.filter((e) => e.op === "migrate")).toHaveLength(3);
    expect(journal.filter((e) => e.op === "update").length).toBeGreaterThan(100);
    for (const n of NODES) for (const db of DBS) expect(compareToJournal(c.instance(n, db), journal)).toEqual([]);
    // Rows were edited and deleted on nodes other than the one that created them, while it edited them too.
    const id = (e: JournalEntry) => `${e.db} ${e.table} ${JSON.stringify(e.key)}`;
    const insertedBy = new Map(journal.filter((e) => e.op === "insert").map((e) => [id(e), e.node]));
    const foreignEdits = journal.filter((e) => (e.op === "update" || e.op === "delete") && insertedBy.has(id(e)) && insertedBy.get(id(e)) !== e.node);
    console.log(`${journal.length} journaled ops, ${foreignEdits.length} edits of rows another node created`);
    expect(foreignEdits.length).toBeGreaterThan(20);

    // The migration reached every node through its own app (rows are synced, not schema).
    const data = compareDatabases(c.paths("data.db"));
    expect(data).toEqual([]);

    expect(c.badLogLines()).toEqual([]);

    await c.stopAll();
    for (const n of NODES) for (const db of DBS) expect(`${n}/${db}: ${integrityCheck(c.instance(n, db))}`).toBe(`${n}/${db}: ok`);
    // A clean stop changes nothing.
    for (const db of DBS) expect(compareDatabases(c.paths(db))).toEqual([]);
    expect(c.badLogLines()).toEqual([]);
    expect(c.unexpectedExits).toEqual([]);
  }, 180_000);
});
