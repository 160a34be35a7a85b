/**
 * The app keeps working (DESIGN invariant 4, issue 9): every write transaction
 * the agent holds is short, so an app with a short busy timeout never gets
 * "database is locked" while the agent installs its triggers, enrols thousands
 * of rows, seals them and applies a large backlog from another node. A Python
 * app writes one row per commit with a 150 ms timeout the whole time; the
 * longest hold the agent measured itself is checked too.
 */
import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FileStore } from "../src/store/file.js";
import { APPS, PYTHON } from "./helpers/cluster.js";
import { openSync } from "./helpers/node.js";

const root = mkdtempSync(join(tmpdir(), "unisync-locks-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const ROWS = 20_000;

function fill(path: string): void {
  execFileSync(PYTHON, ["-c", `
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, note TEXT)")
db.executemany("INSERT INTO item(name, qty, note) VALUES (?, ?, ?)", [("n%d" % i, i, "x" * 40) for i in range(${ROWS})])
db.commit()
`, path]);
}

/** Runs the busy app against `path` for `seconds` while `work` runs; returns what it saw. */
async function whileAppWrites(path: string, seconds: number, work: () => Promise<void>): Promise<{ ok: number; locked: number; worst_ms: number }> {
  const app = spawn(PYTHON, [join(APPS, "busy_writer.py"), path, String(seconds), "0.15"], { stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  app.stdout.on("data", (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((resolve) => app.on("exit", resolve));
  await new Promise((r) => setTimeout(r, 300)); // the app is writing before the agent starts
  await work();
  expect(await exited).toBe(0);
  return JSON.parse(out.trim().split("\n").pop() as string);
}

describe("the app keeps working while the agent writes", () => {
  it("enrolment of 20,000 rows and replay of them elsewhere never lock out an app with a 150 ms timeout", async () => {
    const dir = join(root, "a");
    mkdirSync(dir, { recursive: true });
    const store = new FileStore(join(dir, "store"));
    const aPath = join(dir, "a.db");
    const bPath = join(dir, "b.db");
    fill(aPath);
    execFileSync(PYTHON, ["-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.execute('PRAGMA journal_mode=WAL'); db.execute('CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, note TEXT)'); db.commit()", bPath]);
    let a: ReturnType<typeof openSync> | undefined;
    const seenA = await whileAppWrites(aPath, 6, async () => {
      a = openSync(aPath, "a", store, undefined, { maxRecords: 5000 }); // triggers + enrolment of every row
      for (let i = 0; i < 40 && a.pendingChanges() > 0; i++) {
        a.sealPending(1);
        await new Promise((r) => setTimeout(r, 5));
      }
      await a.upload(1000);
    });
    const b = openSync(bPath, "b", store, undefined, { maxRecords: 5000 });
    const seenB = await whileAppWrites(bPath, 6, async () => {
      while ((await b.pull("a", 4)) > 0) await new Promise((r) => setTimeout(r, 5));
    });
    console.log(`app beside a: ${JSON.stringify(seenA)}, longest agent hold ${a!.writes.longestMs.toFixed(1)} ms (${a!.writes.longestWhat})`);
    console.log(`app beside b: ${JSON.stringify(seenB)}, longest agent hold ${b.writes.longestMs.toFixed(1)} ms (${b.writes.longestWhat})`);
    expect(Number(b.db.prepare("SELECT count(*) FROM item").pluck().get())).toBe(ROWS);
    expect(seenA.ok).toBeGreaterThan(100);
    expect(seenA.locked, "the app beside the enrolling agent was locked out").toBe(0);
    expect(seenB.locked, "the app beside the replaying agent was locked out").toBe(0);
    expect(a!.writes.longestMs).toBeLessThan(150);
    expect(b.writes.longestMs).toBeLessThan(150);
    a!.close();
    b.close();
  }, 60_000);
});
