/**
 * A node left behind by retention starts again from a snapshot by itself.
 * n3 stops; while it is down, rows and a file are written on it (local changes
 * it has not sent), n1 and n2 go on, a snapshot is taken, and gc collects what
 * n3 had not applied (--forget-node n3). Then:
 * - n3 started with a store that refuses its uploads (an in-process agent on a
 *   store wrapper): it reports the collected hole, waits (status says why) and
 *   moves nothing: its unsent changes are not discarded;
 * - n3 started normally: it uploads its changes, then starts the stream again
 *   from the newest snapshot by itself (what it held kept in
 *   .unisync/left-behind-<time>/), and converges with n1 and n2, its offline
 *   row and file included.
 */
import { describe, expect, it } from "vitest";
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import pino from "pino";
import { Cluster, clusterSuite, FAST_ENV, runCli, sleep, waitFor } from "./helpers/cluster.js";
import { S3RVER_ENV } from "./helpers/s3rver.js";
import { Agent } from "../src/agent/agent.js";
import { loadConfig } from "../src/agent/config.js";
import { StoreUnavailableError, type ObjectStore } from "../src/store/store.js";
import { openStore } from "../src/store/url.js";

const SEED = Number(process.env.SEED ?? Math.floor(Math.random() * 1_000_000));

const suite = clusterSuite();

/** The store, except that this node's segments and blobs cannot be uploaded (the store "down" for writes). */
function refusingUploads(store: ObjectStore, node: string): ObjectStore {
  const refuse = (key: string) => key.startsWith(`log/${node}/`) || key.startsWith("blobs/");
  return {
    description: store.description,
    requests: store.requests,
    put: async (key, body, size) => {
      if (refuse(key)) throw new StoreUnavailableError(`test: uploads refused (${key})`);
      return store.put(key, body, size);
    },
    putIfAbsent: async (key, body) => {
      if (refuse(key)) throw new StoreUnavailableError(`test: uploads refused (${key})`);
      return store.putIfAbsent(key, body);
    },
    get: (k) => store.get(k),
    getStream: (k) => store.getStream(k),
    head: (k) => store.head(k),
    list: (p, o) => store.list(p, o),
    delete: (k) => store.delete(k),
  };
}

describe("a node left behind by retention", () => {
  it("starts again from a snapshot by itself once its local changes are in the store, and converges", async (ctx) => {
    console.log(`rejoin.test SEED=${SEED}`);
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    const url = suite.storeUrl(`rejoin-${SEED}`);
    Object.assign(process.env, S3RVER_ENV);
    const c = (suite.cluster = await Cluster.start({ nodes: ["n1", "n2", "n3"], store: url, env: { UNISYNC_SNAPSHOT_INTERVAL_MS: "0" } }));

    const write = (seed: number, ops: number, nodes: string[]) => c.writeRandom(nodes, seed, ops);
    const quiet = (names: string[]) => c.waitForAgreement(names, "data.db", 120_000, true);

    // Every node writes rows and files; then n3 stops.
    for (const n of ["n1", "n2", "n3"]) {
      mkdirSync(c.instance(n, `docs/${n}`), { recursive: true });
      for (let k = 0; k < 3; k++) writeFileSync(c.instance(n, `docs/${n}/f${k}.txt`), `A ${n} ${k} ${SEED}\n`.repeat(k + 1));
    }
    await write(SEED, 30, ["n1", "n2", "n3"]);
    await quiet(["n1", "n2", "n3"]);
    await c.stop("n3");

    // n3, agent down: a row and a file (captured at its next start, never sent yet).
    const marker = `offline-${SEED}`;
    const db3 = new Database(c.instance("n3", "data.db"));
    db3.prepare("INSERT INTO docs(id, title, body) VALUES (?, 'offline', 'written on n3 while its agent was down')").run(marker);
    db3.close();
    writeFileSync(c.instance("n3", "docs/n3/offline.txt"), `offline ${SEED}\n`);

    // n1 and n2 go on (rows and files, several segments), a snapshot, then gc forgets n3.
    for (let i = 0; i < 3; i++) {
      writeFileSync(c.instance("n1", `docs/n1/b${i}.txt`), `B ${i} ${SEED}\n`);
      await write(SEED + 1 + i, 10, ["n1", "n2"]);
      await quiet(["n1", "n2"]);
    }
    const snap = await runCli(["snapshot", c.instance("n1"), "--json"]);
    expect(snap.code, snap.stderr).toBe(0);
    await sleep(2000);
    const gc = await runCli(["gc", "--store", url, "--json", "--keep", "1s", "--apply", "--forget-node", "n3"]);
    expect(gc.code, gc.stderr).toBe(0);

    // n3 with its uploads refused: it meets the hole, waits, and moves nothing.
    const logFile = join(c.node("n3").dir, "inprocess.log");
    const log = pino({ level: "info", base: { node: "n3" } }, pino.destination({ dest: logFile, sync: true }));
    const config = loadConfig({ instanceDir: c.instance("n3"), store: url, node: "n3", httpPort: -1 }, undefined, { ...process.env, ...FAST_ENV, UNISYNC_SNAPSHOT_INTERVAL_MS: "0" });
    const agent = new Agent(config, refusingUploads(openStore(url), "n3"), log);
    await agent.start();
    try {
      await waitFor(() => agent.status().rejoin?.state === "waiting", 60_000, "n3 to wait before starting again from a snapshot", 200);
      const st = agent.status();
      expect(st.rejoin!.reason).toMatch(/local changes are not in the store yet/);
      expect(Object.values(st.databases.find((d) => d.stream === "data.db")!.problems).some((p) => p.includes("deleted by gc"))).toBe(true);
      await sleep(1500); // a few more housekeeping ticks: still waiting
      expect(agent.status().rejoin?.state).toBe("waiting");
      expect(readdirSync(join(c.instance("n3"), ".unisync")).filter((n) => n.startsWith("left-behind-"))).toEqual([]);
    } finally {
      await agent.stop();
    }
    const kept = new Database(c.instance("n3", "data.db"), { readonly: true });
    expect(kept.prepare("SELECT id FROM docs WHERE id = ?").get(marker), "the offline row is still on n3").toBeTruthy();
    kept.close();
    expect(existsSync(c.instance("n3", "docs/n3/offline.txt"))).toBe(true);
    expect(readFileSync(logFile, "utf8")).toContain("not starting again from a snapshot while local changes are unsent");

    // n3 started normally: sends its changes, starts again from the snapshot by itself, converges.
    await c.restart("n3");
    await waitFor(async () => (await c.status("n3")).rejoin?.state === "done", 120_000, "n3 to start again from a snapshot", 300);
    await quiet(["n1", "n2", "n3"]);
    const st = await c.status("n3");
    expect(st.rejoin!.streams).toContain("data.db");
    const warn = c.logEntries("n3").find((e) => typeof e.msg === "string" && e.msg.includes("offline longer than the retention window"));
    expect(warn, "one warn line says what happened").toBeTruthy();
    expect(warn!.level).toBe(40);
    const left = st.rejoin!.leftBehind!;
    expect(existsSync(join(left, "data.db")), "n3's database before the rejoin is kept").toBe(true);
    expect(existsSync(join(left, "rejoin.json"))).toBe(true);
    const cliStatus = await runCli(["status", c.instance("n3"), "--store", url, "--json"]);
    expect(cliStatus.code, cliStatus.stderr).toBe(0);
    expect((JSON.parse(cliStatus.stdout) as { startedAgain: { snapshot: string }[] }).startedAgain.map((r) => r.snapshot)).toEqual([st.rejoin!.snapshot]);
    // What n3 wrote offline reached everyone.
    for (const n of ["n1", "n2", "n3"]) {
      const db = new Database(c.instance(n, "data.db"), { readonly: true });
      expect(db.prepare("SELECT title FROM docs WHERE id = ?").get(marker), `offline row on ${n}`).toEqual({ title: "offline" });
      db.close();
      expect(readFileSync(c.instance(n, "docs/n3/offline.txt"), "utf8")).toBe(`offline ${SEED}\n`);
    }

    // It goes on syncing both ways.
    writeFileSync(c.instance("n3", "docs/n3/after.txt"), `after ${SEED}\n`);
    await write(SEED + 10, 10, ["n1", "n2", "n3"]);
    await quiet(["n1", "n2", "n3"]);

    // Only the hole itself and the wait for n3's uploads are reported as errors.
    expect(c.badLogLines().filter((l) => !l.includes("deleted by gc") && !l.includes("collected by gc"))).toEqual([]);
    expect(c.unexpectedExits).toEqual([]);
    await c.stopAll();
  }, 400_000);
});
