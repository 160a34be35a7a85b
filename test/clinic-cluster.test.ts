/**
 * A second app none of the other tests know (test/apps/flask_clinic.py:
 * databases named *.sqlite, an association table whose primary key is an
 * integer reference and a text reference, ON DELETE CASCADE, unique emails
 * from a small pool, a bind, nested uploads that are amended and deleted). Unlike
 * shop-cluster.test.ts, the app writes on two nodes WHILE they sync, one short
 * transaction per request, as a web app does; the third node never runs it.
 * Every node must end with the same databases and files, and every appointment
 * must point at the patient it was written for (or at the row that kept that
 * patient's email after a unique clash). Then a node joins from last night's
 * backup of another (databases and uploads, unisync's tables forgotten as the
 * README says): no file the cluster deleted since may come back.
 */
import { describe, expect, it } from "vitest";
import Database from "better-sqlite3";
import { cpSync, existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { appSucceeded, clusterSuite, runApp, runCli, syncedFileHashes, waitFor, type Cluster } from "./helpers/cluster.js";

const suite = clusterSuite("moto");
const NODES = ["n1", "n2", "n3"];

/** Appointments whose patient row is not the one they were written for. */
function misplaced(path: string): string[] {
  const db = new Database(path, { readonly: true });
  try {
    const rows = db.prepare("SELECT a.id, a.patient_email, p.email FROM appointment a LEFT JOIN patient p ON p.id = a.patient_id WHERE p.email IS NOT a.patient_email").all() as { id: number; patient_email: string; email: string | null }[];
    return rows.map((r) => `appointment ${r.id} of ${r.patient_email} points at ${r.email ?? "nothing"}`);
  } finally {
    db.close();
  }
}

/** Whether every node's folder holds the same synced files now (read afresh: files may still be arriving). */
function filesAgree(c: Cluster, nodes: string[]): boolean {
  const want = JSON.stringify(syncedFileHashes(c.instance(nodes[0])));
  return nodes.every((n) => JSON.stringify(syncedFileHashes(c.instance(n))) === want);
}

/** Each appointment as its id, time and note (what a resurrected row would show). */
function appointments(path: string): Set<string> {
  const db = new Database(path, { readonly: true });
  try {
    return new Set(db.prepare("SELECT id || ' ' || at || ' ' || note FROM appointment").pluck().all() as string[]);
  } finally {
    db.close();
  }
}

describe("an unseen Flask app writing while it syncs", () => {
  it("two nodes write at once with sync running; all three end the same, every appointment on its patient", async (ctx) => {
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    process.env.SQLALCHEMY_SILENCE_UBER_WARNING = "1";
    const c = await suite.start(NODES, "clinic");
    const failed = await Promise.all([
      appSucceeded(runApp("flask_clinic.py", [c.instance("n1"), "n1", "1", "400"]), "flask_clinic on n1"),
      appSucceeded(runApp("flask_clinic.py", [c.instance("n2"), "n2", "2", "400"]), "flask_clinic on n2"),
    ]);
    // A request the app could not finish prints why. The app runs each request as one
    // BEGIN IMMEDIATE transaction (SQLAlchemy's pysqlite recipe, README), so a sync cannot
    // land between its reads and its writes. Before it did, the app's own read-then-write
    // races showed (as with two app workers on one file): a row read and then deleted or moved
    // by a sync (StaleDataError, a failed foreign key), a tag looked up and then inserted by
    // the other node (UNIQUE on tag.slug), and once an appointment written for the patient
    // that had just moved away. Those errors are still the app's, not unisync's.
    const appRaces = ["StaleDataError", "FOREIGN KEY constraint failed", "UNIQUE constraint failed: tag.slug"];
    const unexpected = (l: string) => l !== "" && !appRaces.some((race) => l.includes(race));
    expect(failed.flatMap((out) => out.split("\n")).filter(unexpected)).toEqual([]);
    await waitFor(() => existsSync(c.instance("n3", "clinic.sqlite")) && existsSync(c.instance("n3", "logs.sqlite")), 90_000, "n3 to get both databases", 500);
    await c.waitForQuiescence(["clinic.sqlite", "logs.sqlite"], 90_000);
    await c.waitForConvergence(c.paths("clinic.sqlite"), 30_000);
    await c.waitForConvergence(c.paths("logs.sqlite"), 30_000);
    await waitFor(() => filesAgree(c, NODES), 90_000, "uploads on every node", 500);
    expect(Object.keys(syncedFileHashes(c.instance("n1"))).length).toBeGreaterThan(100);
    const db = new Database(c.instance("n3", "clinic.sqlite"), { readonly: true });
    expect(db.prepare("SELECT count(*) FROM appointment").pluck().get()).toBeGreaterThan(100);
    expect(db.prepare("SELECT count(*) FROM appt_tag").pluck().get()).toBeGreaterThan(50);
    // The app's own triggers wrote once, where the app wrote (the databases agree, above),
    // and are quiet in replay: guarded on every node.
    expect(db.prepare("SELECT count(*) FROM history").pluck().get()).toBeGreaterThan(10);
    expect(db.prepare("SELECT count(*) FROM appointment WHERE edited_at IS NOT NULL").pluck().get()).toBeGreaterThan(5);
    expect(db.prepare("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN ('patient_registered', 'appointment_edited') AND sql LIKE '%_unisync_applying%'").pluck().get()).toBe(2);
    db.close();
    expect(NODES.flatMap((n) => misplaced(c.instance(n, "clinic.sqlite")).map((m) => `${n}: ${m}`))).toEqual([]);
    expect(c.badLogLines()).toEqual([]);
    expect(c.unexpectedExits).toEqual([]);
  }, 240_000);

  it("a third node joins from last night's backup (databases and uploads) while the others wrote on: no file or row deleted since comes back", async (ctx) => {
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    process.env.SQLALCHEMY_SILENCE_UBER_WARNING = "1";
    const c = await suite.start(["n1", "n2"], "clinic-backup");
    await Promise.all([
      appSucceeded(runApp("flask_clinic.py", [c.instance("n1"), "n1", "1", "200"]), "flask_clinic on n1"),
      appSucceeded(runApp("flask_clinic.py", [c.instance("n2"), "n2", "2", "200"]), "flask_clinic on n2"),
    ]);
    await c.waitForQuiescence(["clinic.sqlite", "logs.sqlite"], 90_000);
    await c.waitForConvergence(c.paths("clinic.sqlite"), 30_000);
    // Last night's backup of n1: databases with SQLite's online backup, the folder with cp.
    const backup = mkdtempSync(join(tmpdir(), "unisync-clinic-backup-"));
    for (const f of ["clinic.sqlite", "logs.sqlite"]) {
      const db = new Database(c.instance("n1", f), { readonly: true });
      await db.backup(join(backup, f));
      db.close();
    }
    cpSync(c.instance("n1", "files"), join(backup, "files"), { recursive: true });
    const inBackup = { files: Object.keys(syncedFileHashes(backup)), rows: appointments(join(backup, "clinic.sqlite")) };
    // The cluster goes on: more writes, deletes of patients, appointments and uploads.
    await Promise.all([
      appSucceeded(runApp("flask_clinic.py", [c.instance("n1"), "n1", "11", "200"]), "flask_clinic on n1, later"),
      appSucceeded(runApp("flask_clinic.py", [c.instance("n2"), "n2", "12", "200"]), "flask_clinic on n2, later"),
    ]);
    await c.waitForQuiescence(["clinic.sqlite", "logs.sqlite"], 90_000);
    await c.waitForConvergence(c.paths("clinic.sqlite"), 30_000);
    const filesBefore = syncedFileHashes(c.instance("n1"));
    const rowsBefore = appointments(c.instance("n1", "clinic.sqlite"));
    const goneFiles = inBackup.files.filter((f) => !(f in filesBefore));
    const goneRows = [...inBackup.rows].filter((r) => !rowsBefore.has(r));
    expect(goneFiles.length).toBeGreaterThan(5);
    expect(goneRows.length).toBeGreaterThan(5);
    // n3 starts from the backup as the README says: unisync's tables forgotten first.
    await c.addNode("n3", 60_000, async (inst) => {
      cpSync(backup, inst, { recursive: true });
      for (const f of ["clinic.sqlite", "logs.sqlite"]) expect((await runCli(["forget", inst, "--db", f])).code).toBe(0);
    });
    // As the README says: the app starts once the node's databases are enrolled (while the log
    // is replayed into them, ids move and the app could point a row at the wrong one).
    for (const db of ["clinic.sqlite", "logs.sqlite"]) {
      await waitFor(async () => (await c.status("n3")).databases.find((d) => d.stream === db)?.enrolling === false, 90_000, `n3 to enrol ${db}`, 500);
    }
    await appSucceeded(runApp("flask_clinic.py", [c.instance("n3"), "n3", "3", "100"]), "flask_clinic on n3");
    const nodes = ["n1", "n2", "n3"];
    await c.waitForQuiescence(["clinic.sqlite", "logs.sqlite"], 120_000);
    await c.waitForConvergence(c.paths("clinic.sqlite"), 60_000);
    await c.waitForConvergence(c.paths("logs.sqlite"), 60_000);
    await waitFor(() => filesAgree(c, nodes), 90_000, "uploads on every node", 500);
    const filesEnd = syncedFileHashes(c.instance("n1"));
    expect(goneFiles.filter((f) => f in filesEnd)).toEqual([]);
    // Nor a row: n3 repairs references (a child of a patient a unique clash set aside) only once
    // the log is applied, never with its newer clock ahead of a delete further on in the log.
    const back = appointments(c.instance("n1", "clinic.sqlite"));
    expect(goneRows.filter((r) => back.has(r))).toEqual([]);
    expect(nodes.flatMap((n) => misplaced(c.instance(n, "clinic.sqlite")).map((m) => `${n}: ${m}`))).toEqual([]);
    expect(c.badLogLines()).toEqual([]);
    expect(c.unexpectedExits).toEqual([]);
  }, 400_000);
});
