/** `unisync log`: the audit trail read back from the store, with its filters. */
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { audit, type AuditEntry } from "../src/report/audit.js";
import { FileStore } from "../src/store/file.js";
import { appConnection, openSync } from "./helpers/node.js";

const root = mkdtempSync(join(tmpdir(), "unisync-audit-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const collect = async (it: AsyncIterable<AuditEntry>) => {
  const out: AuditEntry[] = [];
  for await (const e of it) out.push(e);
  return out;
};

describe("audit log", () => {
  it("shows who changed which row when, filtered by table, key, origin and time", async () => {
    const store = new FileStore(join(root, "store"));
    const nodes = ["n1", "n2"].map((name) => {
      const path = join(root, `${name}.db`);
      const app = appConnection(path);
      app.exec("CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER); CREATE TABLE other(k TEXT PRIMARY KEY)");
      return { name, app, sync: openSync(path, name, store) };
    });
    const [a, b] = nodes;
    a.app.prepare("INSERT INTO item VALUES (1, 'apple', 3)").run();
    a.app.prepare("INSERT INTO other VALUES ('x')").run();
    a.sync.sealPending();
    await a.sync.upload();
    await b.sync.pull("n1");
    const between = Date.now();
    await new Promise((r) => setTimeout(r, 20));
    b.app.prepare("UPDATE item SET qty = 5 WHERE id = 1").run();
    b.app.prepare("DELETE FROM item WHERE id = 1").run();
    b.sync.sealPending();
    await b.sync.upload();

    const history = await collect(audit(store, { table: "item", key: "1" }));
    expect(history.map((e) => [e.origin, e.op])).toEqual([["n1", "insert"], ["n2", "update"], ["n2", "delete"]].sort((x, y) => x[0].localeCompare(y[0])));
    const update = history.find((e) => e.op === "update");
    expect(update?.values).toEqual({ qty: "5" });
    expect(update?.key).toEqual({ id: "1" });
    expect(await collect(audit(store, { origin: "n1" }))).toHaveLength(2);
    expect((await collect(audit(store, { sinceMs: between }))).map((e) => e.op)).toEqual(["update", "delete"]);
    expect(await collect(audit(store, { table: "item", key: "2" }))).toEqual([]);
    for (const n of nodes) {
      n.sync.close();
      n.app.close();
    }

    const cli = spawnSync("node", ["bin/unisync.js", "log", "--store", pathToFileURL(join(root, "store")).href, "--table", "item", "--json"], { encoding: "utf8" });
    expect(cli.status, cli.stderr).toBe(0);
    expect(cli.stdout.trim().split("\n").map((l) => JSON.parse(l).op).sort()).toEqual(["delete", "insert", "update"]);
    // One row's history: clock order across origins, with the values each change replaced.
    const one = spawnSync("node", ["bin/unisync.js", "log", "--store", pathToFileURL(join(root, "store")).href, "--table", "item", "--key", "1", "--json"], { encoding: "utf8" });
    expect(one.status, one.stderr).toBe(0);
    const rows = one.stdout.trim().split("\n").map((l) => JSON.parse(l) as AuditEntry);
    expect(rows.map((e) => e.op)).toEqual(["insert", "update", "delete"]);
    expect(rows[1].old).toEqual({ qty: "3" });
    expect(rows[2].old).toEqual({ id: "1", name: '"apple"', qty: "5" });
    const text = spawnSync("node", ["bin/unisync.js", "log", "--store", pathToFileURL(join(root, "store")).href, "--table", "item", "--key", "1"], { encoding: "utf8" });
    expect(text.stdout).toMatch(/update +app\.db:item\[id=1\] +qty: 3 -> 5/);
    const bad = spawnSync("node", ["bin/unisync.js", "log", "--store", "file:///x", "--since", "yesterday"], { encoding: "utf8" });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--since must be an ISO 8601 time/);
  });
});
