/**
 * The cluster index against moto's S3 server (unpatched: real delimiter
 * listings, enforced If-None-Match), with three agent processes:
 *  - every node writes rows and files while a chaos loop deletes, delays and
 *    duplicates the index pointers at random: every node still ends with every
 *    row and file, each segment applied once and in order;
 *  - the agents see that the store enforces conditional writes, and a second
 *    agent started under an existing node name cannot fork that node's log:
 *    one of the two stops writing, and the store never holds two segments for one seq.
 * Reproduce with SEED=<printed seed>; KEEP_CLUSTER=1 keeps folders and logs.
 */
import { spawn } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { compareDatabases, compareToJournal, readJournal } from "./helpers/checker.js";
import { appSucceeded, CLI, clusterSuite, runApp, sleep, syncedFileHashes, waitFor } from "./helpers/cluster.js";
import { MOTO_ENV } from "./helpers/moto.js";
import { startPointerChaos } from "./helpers/pointer-chaos.js";
import { listAll } from "../src/store/store.js";
import { parseSegmentKey } from "../src/log/keys.js";
import { openStore } from "../src/store/url.js";

const SEED = Number(process.env.SEED ?? Math.floor(Math.random() * 1_000_000));
const NODES = ["n1", "n2", "n3"];

const suite = clusterSuite("moto");

describe("cluster index on moto's S3 server", () => {
  it("loses no segment when pointers are deleted, late or duplicated, and claims stop a second agent under one name", async (ctx) => {
    console.log(`index-cluster.test SEED=${SEED}`);
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    // Gap repair every 300 ms so a dropped last pointer costs seconds here, not minutes.
    const c = await suite.start(NODES, `index-${SEED}`, { env: { UNISYNC_REPAIR_EVERY_MS: "300" } });
    const url = c.options.store;
    const store = openStore(url, { ...MOTO_ENV });
    for (const [i, name] of NODES.entries()) {
      await appSucceeded(runApp("random_writer.py", [c.instance(name, "data.db"), "--node", String(i + 1), "--ops", "0", "--journal", "wal"]), "create data.db");
    }
    const chaos = startPointerChaos(store, SEED, { drop: 0.25, delay: 0.25, duplicate: 0.2, maxDelayMs: 3000 });
    const apps = NODES.map((name, i) =>
      runApp("random_writer.py", [
        c.instance(name, "data.db"), "--node", String(i + 1), "--seed", String(SEED), "--ops", "150",
        "--sleep-ms", "25", "--journal-file", join(c.node(name).dir, "rw.jsonl"),
      ], join(c.node(name).dir, "apps.log")),
    );
    for (let k = 0; k < 8; k++) {
      for (const name of NODES) {
        mkdirSync(c.instance(name, `docs/${name}`), { recursive: true });
        writeFileSync(c.instance(name, `docs/${name}/f${k}.txt`), `${name} ${k} ${SEED}\n`);
      }
      await sleep(300);
    }
    for (const [i, a] of apps.entries()) await appSucceeded(a, `random_writer on n${i + 1}`);
    await sleep(1000);
    const counts = await chaos.stop();
    console.log(`pointer chaos: ${JSON.stringify(counts)}`);
    expect(counts.dropped).toBeGreaterThan(0);
    expect(counts.delayed).toBeGreaterThan(0);
    expect(counts.duplicated).toBeGreaterThan(0);

    await c.waitForQuiescence(["data.db"], 90_000);
    await c.waitForConvergence(c.paths("data.db"), 30_000);
    await waitFor(() => NODES.every((n) => JSON.stringify(syncedFileHashes(c.instance(n))) === JSON.stringify(syncedFileHashes(c.instance("n1")))), 30_000, "files to agree");
    expect(Object.keys(syncedFileHashes(c.instance("n1"))).filter((p) => p.startsWith("docs/"))).toHaveLength(24);
    const journal = NODES.flatMap((n) => readJournal(join(c.node(n).dir, "rw.jsonl"), true));
    for (const n of NODES) expect(compareToJournal(c.instance(n, "data.db"), journal)).toEqual([]);
    expect(compareDatabases(c.paths("data.db"))).toEqual([]);

    const statuses = await Promise.all(NODES.map((n) => c.status(n)));
    for (const s of statuses) {
      expect(s.storeRequests.conditionalWrites).toBe("enforced");
      expect(s.tailing.indexPolls).toBeGreaterThan(0);
    }
    // Lost pointers were made up for by listing the streams (gap or repair).
    expect(statuses.reduce((t, s) => t + s.tailing.listings.gap + s.tailing.listings.repair, 0)).toBeGreaterThan(0);
    expect(c.badLogLines()).toEqual([]);

    // A second agent under the name n1, on its own folder, while the real n1's app writes.
    const impostorDir = join(c.root, "impostor");
    mkdirSync(join(impostorDir, "instance"), { recursive: true });
    await appSucceeded(runApp("random_writer.py", [join(impostorDir, "instance", "data.db"), "--node", "7", "--ops", "0", "--journal", "wal"]), "create impostor data.db");
    const impostorLog = join(impostorDir, "agent.log");
    const impostor = spawn(process.execPath, [CLI, "run", join(impostorDir, "instance"), url, "--node", "n1", "--http-port=-1"], {
      env: { ...process.env, ...MOTO_ENV, UNISYNC_CAPTURE_INTERVAL_MS: "20", UNISYNC_POLL_MIN_MS: "50", UNISYNC_POLL_MAX_MS: "300" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let impostorOut = "";
    impostor.stdout.on("data", (d: Buffer) => (impostorOut += d.toString()));
    impostor.stderr.on("data", (d: Buffer) => (impostorOut += d.toString()));
    const writers = [
      runApp("random_writer.py", [c.instance("n1", "data.db"), "--node", "1", "--seed", String(SEED + 1), "--ops", "60", "--sleep-ms", "30"]),
      runApp("random_writer.py", [join(impostorDir, "instance", "data.db"), "--node", "7", "--seed", String(SEED + 2), "--ops", "60", "--sleep-ms", "30"]),
    ];
    for (const w of writers) await appSucceeded(w, "writer beside two agents named n1");
    const refusal = /will not be synced|already claimed|did not write/;
    await waitFor(async () => refusal.test(impostorOut) || c.badLogLines("n1").some((l) => refusal.test(l)), 60_000, "one of the two n1 agents to stop writing data.db");
    impostor.kill("SIGKILL");
    writeFileSync(impostorLog, impostorOut);
    const seqs = new Map<number, string>();
    for await (const o of listAll(store, "log/n1/data.db/")) {
      const name = parseSegmentKey(o.key);
      if (!name) continue;
      expect(seqs.get(name.seq), `two segments claim seq ${name.seq} of n1/data.db`).toBeUndefined();
      seqs.set(name.seq, o.key);
    }
    expect(seqs.size).toBeGreaterThan(0);
  }, 240_000);
});
