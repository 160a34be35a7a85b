/**
 * A second app none of the other tests know (test/apps/flask_clinic.py:
 * databases named *.sqlite, an association table whose primary key is an
 * integer reference and a text reference, ON DELETE CASCADE, unique emails
 * from a small pool, a bind, nested uploads that are amended and deleted). Unlike
 * shop-cluster.test.ts, the app writes on two nodes WHILE they sync, one short
 * transaction per request, as a web app does; the third node never runs it.
 * Every node must end with the same databases and files, and every appointment
 * must point at the patient it was written for (or at the row that kept that
 * patient's email after a unique clash).
 */
import { describe, expect, it } from "vitest";
import Database from "better-sqlite3";
import { existsSync } from "node:fs";
import { appSucceeded, clusterSuite, runApp, syncedFileHashes, waitFor } from "./helpers/cluster.js";

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
    // A request the app could not finish (its write lock, a constraint) prints why.
    expect(failed).toEqual(["", ""]);
    await waitFor(() => existsSync(c.instance("n3", "clinic.sqlite")) && existsSync(c.instance("n3", "logs.sqlite")), 90_000, "n3 to get both databases", 500);
    await c.waitForQuiescence(["clinic.sqlite", "logs.sqlite"], 90_000);
    await c.waitForConvergence(c.paths("clinic.sqlite"), 30_000);
    await c.waitForConvergence(c.paths("logs.sqlite"), 30_000);
    const files = JSON.stringify(syncedFileHashes(c.instance("n1")));
    await waitFor(() => NODES.every((n) => JSON.stringify(syncedFileHashes(c.instance(n))) === files), 60_000, "uploads on every node", 500);
    expect(Object.keys(JSON.parse(files) as object).length).toBeGreaterThan(100);
    const db = new Database(c.instance("n3", "clinic.sqlite"), { readonly: true });
    expect(db.prepare("SELECT count(*) FROM appointment").pluck().get()).toBeGreaterThan(100);
    expect(db.prepare("SELECT count(*) FROM appt_tag").pluck().get()).toBeGreaterThan(50);
    db.close();
    expect(NODES.flatMap((n) => misplaced(c.instance(n, "clinic.sqlite")).map((m) => `${n}: ${m}`))).toEqual([]);
    expect(c.badLogLines()).toEqual([]);
    expect(c.unexpectedExits).toEqual([]);
  }, 240_000);
});
