/**
 * A new user's first run, with an app the other tests do not know
 * (test/apps/flask_shop.py: UUID keys, an association table without any key, a
 * self-referencing category, a second database, uploads). Three agents start
 * on empty folders on moto; then the app runs on two of them at once, creating
 * its databases under the running agents and writing right away. The third
 * node never runs the app. The two write apart (sync paused), then sync. Every
 * node must end with the same databases and
 * files, and every item must still be in the categories it was written with
 * (nodes that agree on a wrong category fail this).
 */
import { describe, expect, it } from "vitest";
import Database from "better-sqlite3";
import { existsSync } from "node:fs";
import { appSucceeded, clusterSuite, runApp, syncedFileHashes, waitFor } from "./helpers/cluster.js";

const suite = clusterSuite("moto");
const NODES = ["n1", "n2", "n3"];

function wrongCategories(path: string): string[] {
  const db = new Database(path, { readonly: true });
  try {
    const out: string[] = [];
    for (const it of db.prepare("SELECT id, cat_names FROM item").all() as { id: string; cat_names: string | null }[]) {
      const got = (db.prepare("SELECT c.name FROM item_category ic JOIN category c ON c.id = ic.category_id WHERE ic.item_id = ?").pluck().all(it.id) as string[]).sort().join(",");
      if (got !== (it.cat_names ?? "")) out.push(`item ${it.id} is in [${got}], written with [${it.cat_names ?? ""}]`);
    }
    return out;
  } finally {
    db.close();
  }
}

describe("an unseen Flask app on a fresh cluster", () => {
  it("creates its databases under running agents on two nodes; all three end the same, every item in its own categories", async (ctx) => {
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    process.env.SQLALCHEMY_SILENCE_UBER_WARNING = "1";
    const c = await suite.start(NODES, "shop");
    // n1 and n2 write apart (sync paused from their consoles: capture goes on), so ids and
    // names collide, but no row moves under an app that is writing (the stale-id race the
    // README describes, which would blur what this test checks).
    const act = async (n: string, action: "pause" | "resume") => {
      const res = await fetch(`${c.node(n).statusUrl}api/${action}`, { method: "POST", headers: { "x-unisync": "1" } });
      expect(res.status).toBe(200);
    };
    for (const n of ["n1", "n2"]) await act(n, "pause");
    await Promise.all([
      appSucceeded(runApp("flask_shop.py", [c.instance("n1"), "n1", "1", "150"]), "flask_shop on n1"),
      appSucceeded(runApp("flask_shop.py", [c.instance("n2"), "n2", "2", "150"]), "flask_shop on n2"),
    ]);
    for (const n of ["n1", "n2"]) await act(n, "resume");
    // n3 never ran the app: it gets both databases from the first snapshot that holds them.
    await waitFor(() => existsSync(c.instance("n3", "shop.db")) && existsSync(c.instance("n3", "stats.db")), 90_000, "n3 to get both databases", 500);
    await c.waitForQuiescence(["shop.db", "stats.db"], 90_000);
    await c.waitForConvergence(c.paths("shop.db"), 30_000);
    await c.waitForConvergence(c.paths("stats.db"), 30_000);
    const files = JSON.stringify(syncedFileHashes(c.instance("n1")));
    await waitFor(() => NODES.every((n) => JSON.stringify(syncedFileHashes(c.instance(n))) === files), 60_000, "uploads on every node", 500);
    expect(Object.keys(JSON.parse(files) as object).length).toBeGreaterThan(50);
    expect(NODES.flatMap((n) => wrongCategories(c.instance(n, "shop.db")).map((w) => `${n}: ${w}`))).toEqual([]);
    expect(c.badLogLines()).toEqual([]);
    expect(c.unexpectedExits).toEqual([]);
  }, 240_000);
});
