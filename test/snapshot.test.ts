/**
 * Snapshots, bootstrap and point-in-time state, end to end: three agent
 * processes on one s3rver store, Python writers and files on every node, in two
 * phases. After each phase the cluster is quiescent and its state is recorded
 * (n1's database copied, its files hashed) with the time T. Then:
 * - `unisync snapshot` asks the running agent for a snapshot;
 * - a 4th node with an empty folder joins during phase 2, starts from the
 *   newest snapshot and converges with the other three;
 * - `unisync replay --at T --into DIR` rebuilds exactly the recorded state at
 *   each T, also when the newest snapshot before T is corrupt (reported, the
 *   next older one used);
 * - `unisync restore --at T1` is refused while the agent runs, then (with
 *   --stop-agent) puts n2 back to the state at T1; once n2 runs again, every
 *   node returns to it.
 *
 * KEEP_CLUSTER=1 keeps the folders and logs.
 */
import { describe, expect, it } from "vitest";
import { mkdirSync, unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { compareDatabases } from "./helpers/checker.js";
import { appSucceeded, Cluster, clusterSuite, runApp, runCli, sleep, syncedFileHashes, waitFor } from "./helpers/cluster.js";
import { S3RVER_ENV } from "./helpers/s3rver.js";
import { listSnapshots, readManifest } from "../src/snapshot/format.js";
import { openStore } from "../src/store/url.js";

const SEED = Number(process.env.SEED ?? Math.floor(Math.random() * 1_000_000));
const NODES = ["n1", "n2", "n3"];

const suite = clusterSuite();

interface Recorded {
  at: string;
  db: string;
  files: Record<string, string>;
}

describe("snapshots, bootstrap, replay and restore", () => {
  it("a 4th node bootstraps mid-run; replay and restore at T equal the state recorded at T", async (ctx) => {
    console.log(`snapshot.test SEED=${SEED}`);
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    const store = suite.storeUrl(`snap-${SEED}`);
    const c = (suite.cluster = await Cluster.start({ nodes: NODES, store, env: { UNISYNC_SNAPSHOT_INTERVAL_MS: "4000" } }));

    const phase = async (seed: number, ops: number, nodes: string[], during?: () => Promise<void>) => {
      const apps = nodes.map((name, i) => ({
        name,
        run: runApp("random_writer.py", [c.instance(name, "data.db"), "--node", String(i + 1), "--seed", String(seed), "--ops", String(ops), "--sleep-ms", "15"], join(c.node(name).dir, "apps.log")),
      }));
      if (during) await during();
      for (const a of apps) await appSucceeded(a.run, `random_writer on ${a.name}`);
    };
    const allNodes = () => [...c.nodes.keys()];
    const quiet = async () => {
      await c.waitForQuiescence(["data.db"], 120_000);
      const names = allNodes();
      await waitFor(
        async () => {
          for (const n of names) {
            const f = (await c.status(n)).files;
            if (!f || f.pendingChanges || f.outboxSegments || f.parked) return false;
            for (const o of names) if (o !== n && (f.cursors[o] ?? 0) !== ((await c.status(o)).files?.nextSeq ?? 1) - 1) return false;
          }
          const ref = JSON.stringify(syncedFileHashes(c.instance(names[0])));
          return names.every((n) => JSON.stringify(syncedFileHashes(c.instance(n))) === ref);
        },
        60_000,
        "folders to converge",
        300,
      );
      await c.waitForConvergence(c.paths("data.db"), 30_000);
    };
    const record = (label: string): Promise<Recorded> => c.recordState("n1", "data.db", label);

    // Phase 1: rows on every node, files on every node.
    for (const [i, n] of NODES.entries()) {
      mkdirSync(c.instance(n, `docs/${n}`), { recursive: true });
      for (let k = 0; k < 4; k++) writeFileSync(c.instance(n, `docs/${n}/f${k}.txt`), `phase1 ${n} ${k} ${SEED}\n`.repeat(i + k + 1));
    }
    await phase(SEED, 60, NODES);
    await quiet();
    const s1 = await record("t1");

    // Snapshots on demand, taken by the running agents.
    expect((await runCli(["snapshot", c.instance("n1")])).code).toBe(0);
    const snap = await runCli(["snapshot", c.instance("n2")]);
    expect(snap.stderr).toBe("");
    expect(snap.code).toBe(0);
    expect(snap.stdout).toMatch(/taken by agent pid \d+/);

    // Phase 2: more rows, files edited and deleted; n4 joins (empty) while it runs.
    for (const n of NODES) {
      writeFileSync(c.instance(n, `docs/${n}/f0.txt`), `phase2 edit ${n}\n`);
      unlinkSync(c.instance(n, `docs/${n}/f1.txt`));
    }
    await phase(SEED + 1, 60, NODES, async () => {
      await sleep(300);
      expect((await runCli(["snapshot", c.instance("n3")])).code).toBe(0);
      await c.addNode("n4");
    });
    await quiet();
    expect(compareDatabases(c.paths("data.db"))).toEqual([]);
    const boot = c.logEntries("n4").find((e) => e.msg === "empty node: starting from the newest snapshot");
    expect(boot, "n4 started from a snapshot").toBeDefined();
    expect(c.logEntries("n4").some((e) => e.msg === "bootstrap done; capturing and syncing")).toBe(true);
    const s2 = await record("t2");

    // Replay at T1 and T2 into fresh folders equals what was recorded.
    for (const s of [s1, s2]) {
      const into = join(c.root, `replay-${s.at.replace(/[:.]/g, "")}`);
      const r = await runCli(["replay", "--at", s.at, "--into", into, "--store", store, "--json"]);
      expect(r.code, r.stderr).toBe(0);
      expect(compareDatabases([s.db, join(into, "data.db")])).toEqual([]);
      expect(syncedFileHashes(into)).toEqual(s.files);
    }

    // A corrupt snapshot is reported, and the next older one gives the same state. The agents
    // stop first: once quiet they still take snapshots whose clock (their newest record's) is
    // at or before T2, and one sorting before the corrupted one would be used instead.
    await c.stopAll();
    Object.assign(process.env, S3RVER_ENV);
    const s3store = openStore(store);
    const t2ms = Date.parse(s2.at);
    const newest = (await listSnapshots(s3store)).find((r) => r.hlc <= t2ms * 1024 + 1023);
    expect(newest).toBeDefined();
    const m = await readManifest(s3store, newest!);
    await s3store.put(`blobs/${m.databases[0].sha256}`, Buffer.from("not a database"));
    const into3 = join(c.root, "replay-corrupt");
    const r3 = await runCli(["replay", "--at", s2.at, "--into", into3, "--store", store]);
    expect(r3.code, r3.stderr).toBe(0);
    expect(r3.stderr).toContain(`snapshot ${newest!.key} is unusable`);
    expect(compareDatabases([s2.db, join(into3, "data.db")])).toEqual([]);
    expect(syncedFileHashes(into3)).toEqual(s2.files);

    // Bad input: one line, exit 2.
    const bad = await runCli(["replay", "--at", "yesterday", "--into", join(c.root, "x"), "--store", store]);
    expect(bad.code).toBe(2);
    expect(bad.stderr.trim().split("\n")).toHaveLength(1);
    const early = await runCli(["replay", "--at", "2001-01-01T00:00:00Z", "--into", join(c.root, "x"), "--store", store]);
    expect(early.code).toBe(2);
    expect(early.stderr).toContain("no usable snapshot");

    for (const n of c.nodes.keys()) await c.restart(n);

    // Restore n2 to T1: refused while its agent runs, then done with --stop-agent.
    const refused = await runCli(["restore", c.instance("n2"), "--at", s1.at, "--store", store]);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain("the agent runs");
    c.node("n2").expectingExit = true;
    const restored = await runCli(["restore", c.instance("n2"), "--at", s1.at, "--store", store, "--stop-agent"]);
    expect(restored.code, restored.stderr + restored.stdout).toBe(0);
    expect(compareDatabases([s1.db, c.instance("n2", "data.db")])).toEqual([]);
    expect(syncedFileHashes(c.instance("n2"))).toEqual(s1.files);

    // The restore is n2's newest change: once it runs again, every node is back at T1.
    await c.restart("n2");
    await quiet();
    expect(compareDatabases([s1.db, ...c.paths("data.db")])).toEqual([]);
    for (const n of c.nodes.keys()) expect(syncedFileHashes(c.instance(n))).toEqual(s1.files);

    expect(c.badLogLines().filter((l) => !l.includes("snapshot unusable"))).toEqual([]);
    await c.stopAll();
  }, 400_000);
});
