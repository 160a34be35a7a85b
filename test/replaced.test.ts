/**
 * A database file replaced under a running agent (issue 9): an operator stops
 * the app and moves last night's backup into place. The agent notices the new
 * file (another inode), stops writing to the old one (its last captured
 * changes still go up), drops its own old state from the backup, replays the
 * log into it (its own segments included) and only then enrols what the log
 * lacks. Nothing the cluster logged since the backup is reverted, nothing is
 * lost, and the two nodes end identical.
 */
import { copyFileSync, renameSync, rmSync } from "node:fs";
import Database from "better-sqlite3";
import { describe, expect, it } from "vitest";
import { compareDatabases } from "./helpers/checker.js";
import { clusterSuite, integrityCheck, sleep, waitFor } from "./helpers/cluster.js";

const suite = clusterSuite();
const DB = "app.db";

function sql(path: string, text: string, ...params: unknown[]): Record<string, unknown>[] {
  const db = new Database(path);
  db.pragma("busy_timeout = 5000");
  try {
    const stmt = db.prepare(text);
    return stmt.reader ? (stmt.all(...params) as Record<string, unknown>[]) : (stmt.run(...params), []);
  } finally {
    db.close();
  }
}

describe("a database file replaced under the running agent", () => {
  it("is noticed, re-enrolled from the log, and drags nothing back", async () => {
    const c = await suite.start(["n1", "n2"], "replaced");
    const [a, b] = [c.instance("n1", DB), c.instance("n2", DB)];
    for (const p of [a, b]) {
      sql(p, "PRAGMA journal_mode = WAL");
      sql(p, "CREATE TABLE IF NOT EXISTS item(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER)");
    }
    for (let i = 1; i <= 20; i++) sql(a, "INSERT INTO item(name, qty) VALUES (?, ?)", `a${i}`, i);
    await c.waitForConvergence([a, b], 30_000);
    // Last night's backup of n1 (unisync's tables in it, behind the log from now on).
    // (Outside the instance folder: a SQLite file in it is a database to sync.)
    const backup = `${c.node("n1").dir}/backup.db`;
    sql(a, `VACUUM INTO '${backup}'`);
    // Since then: edits and deletes on both nodes.
    sql(a, "UPDATE item SET qty = 100 WHERE name = 'a1'");
    sql(a, "DELETE FROM item WHERE name = 'a2'");
    for (let i = 1; i <= 5; i++) sql(a, "INSERT INTO item(name, qty) VALUES (?, ?)", `late-a${i}`, i);
    sql(b, "UPDATE item SET qty = 200 WHERE name = 'a3'");
    await c.waitForConvergence([a, b], 30_000);
    // The operator restores the backup on n1 while its agent runs (the app is stopped).
    const incoming = `${a}.restoring`;
    copyFileSync(backup, incoming);
    rmSync(`${a}-wal`, { force: true });
    rmSync(`${a}-shm`, { force: true });
    renameSync(incoming, a);
    // The app starts again on the restored file and writes; n2 writes too.
    await sleep(1500);
    sql(a, "INSERT INTO item(name, qty) VALUES ('after-restore', 1)");
    sql(b, "INSERT INTO item(name, qty) VALUES ('b-after', 2)");
    await waitFor(async () => (await c.status("n1")).replaced.length > 0, 20_000, "n1 to notice the replaced file");
    await waitFor(async () => !(await c.status("n1")).databases.find((d) => d.stream === DB)?.enrolling, 30_000, "n1 to re-enrol the restored file");
    await c.waitForConvergence([a, b], 60_000);
    expect(compareDatabases([a, b])).toEqual([]);
    const names = sql(b, "SELECT name, qty FROM item ORDER BY name").map((r) => `${String(r.name)}=${String(r.qty)}`);
    // Nothing reverted: the edits and deletes made after the backup hold on both nodes.
    expect(names).toContain("a1=100");
    expect(names).toContain("a3=200");
    expect(names.some((n) => n.startsWith("a2="))).toBe(false);
    for (const n of ["late-a1=1", "late-a5=5", "after-restore=1", "b-after=2"]) expect(names).toContain(n);
    expect(names.filter((n) => n.startsWith("a1=")).length).toBe(1);
    expect(names.length).toBe(20 - 1 + 5 + 2);
    for (const p of [a, b]) expect(integrityCheck(p)).toBe("ok");
    const st = await c.status("n1");
    expect(st.replaced[0]).toMatchObject({ stream: DB });
    expect(st.notSynced).toEqual({});
  }, 180_000);
});
