/**
 * Retention (`unisync gc`) with real agents on one s3rver store. Three nodes
 * write rows and files; n3 is stopped early (a laggard, silent for longer than
 * the window); snapshots are taken on demand. Then:
 * - a dry run reports what would go (n1's older snapshot, covered segments, the
 *   old snapshot's part blobs, an orphan blob) and deletes nothing;
 * - --apply keeps every segment n3 has not applied (n3 reported as a gone
 *   laggard), every blob a kept snapshot or a kept segment names, and a young
 *   orphan; the state before the window can no longer be rebuilt, the state
 *   inside it still equals the one recorded; n3 restarted catches up;
 * - restore inside the window still works;
 * - with --forget-node, n3's segments go; n3 started again meets the hole
 *   (collected, not a gap to wait at), starts again from the newest snapshot by
 *   itself (nothing of its own is unsent) and converges.
 */
import { describe, expect, it } from "vitest";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, readdirSync, unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { compareDatabases } from "./helpers/checker.js";
import { Cluster, clusterSuite, runCli, sleep, syncedFileHashes, waitFor } from "./helpers/cluster.js";
import { S3RVER_ENV } from "./helpers/s3rver.js";
import { listSnapshots, partBlobs, readManifest, type FileEntry } from "../src/snapshot/format.js";
import type { GcReport } from "../src/snapshot/gc.js";
import { fetchBlob } from "../src/log/blobs.js";
import { listOrigins, listStreams, parseSegmentKey, streamPrefix } from "../src/log/keys.js";
import { openSegment } from "../src/log/segment.js";
import { pointerKey } from "../src/log/index.js";
import { claimKey } from "../src/log/keys.js";
import { listAll, type ObjectStore } from "../src/store/store.js";
import { openStore } from "../src/store/url.js";

const SEED = Number(process.env.SEED ?? Math.floor(Math.random() * 1_000_000));
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

const suite = clusterSuite();

async function allKeys(store: ObjectStore): Promise<string[]> {
  const out: string[] = [];
  for await (const o of listAll(store, "")) if (!o.key.startsWith("nodes/")) out.push(o.key);
  return out;
}

/** Seqs of one origin's stream in the store. */
async function seqs(store: ObjectStore, origin: string, stream: string): Promise<number[]> {
  const out: number[] = [];
  for await (const o of listAll(store, streamPrefix(origin, stream))) {
    const n = parseSegmentKey(o.key);
    if (n) out.push(n.seq);
  }
  return out;
}

describe("gc", () => {
  it("keeps what the window and a lagging node need, collects the rest, and a node left behind starts again from a snapshot by itself", async (ctx) => {
    console.log(`gc.test SEED=${SEED}`);
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    const url = suite.storeUrl(`gc-${SEED}`);
    Object.assign(process.env, S3RVER_ENV);
    const store = openStore(url);
    // An orphan blob written before anything else: nothing names it.
    const orphan = randomBytes(64);
    await store.put(`blobs/${sha(orphan)}`, orphan);

    const c = (suite.cluster = await Cluster.start({ nodes: ["n1", "n2", "n3"], store: url, env: { UNISYNC_SNAPSHOT_INTERVAL_MS: "0" } }));

    const write = (seed: number, ops: number, nodes: string[]) => c.writeRandom(nodes, seed, ops);
    /** The running nodes among `names` have sent and applied everything of each other, and agree. */
    const quiet = (names: string[]) => c.waitForAgreement(names, "data.db", 90_000);
    const record = (label: string) => c.recordState("n1", "data.db", label);
    const snapshot = async (node: string) => {
      const r = await runCli(["snapshot", c.instance(node), "--json"]);
      expect(r.code, r.stderr).toBe(0);
      return JSON.parse(r.stdout) as { key: string; hlc: number };
    };
    const gc = async (args: string[]) => {
      const r = await runCli(["gc", "--store", url, "--json", ...args]);
      expect(r.code, r.stderr).toBe(0);
      return JSON.parse(r.stdout) as GcReport;
    };

    // A: every node writes rows and files; snapshot S1; n3 stops (it will lag).
    for (const n of ["n1", "n2", "n3"]) {
      mkdirSync(c.instance(n, `docs/${n}`), { recursive: true });
      for (let k = 0; k < 3; k++) writeFileSync(c.instance(n, `docs/${n}/f${k}.txt`), `A ${n} ${k} ${SEED}\n`.repeat(k + 1));
    }
    await write(SEED, 40, ["n1", "n2", "n3"]);
    await quiet(["n1", "n2", "n3"]);
    // n3 writes again after everything is sealed, so it has at least two segments:
    // gc collects all but its newest, and the claim of its seq 1 (below) with it.
    await write(SEED + 100, 5, ["n3"]);
    await quiet(["n1", "n2", "n3"]);
    const sA = await record("A");
    const s1 = await snapshot("n1");
    await c.stop("n3");

    // B: n1 and n2 write and edit files; snapshot S2 (by n2); the window will start after it.
    writeFileSync(c.instance("n1", "docs/n1/f0.txt"), `B edit ${SEED}\n`);
    unlinkSync(c.instance("n2", "docs/n2/f1.txt"));
    await write(SEED + 1, 40, ["n1", "n2"]);
    await quiet(["n1", "n2"]);
    const s2 = await snapshot("n2");
    await sleep(2500);
    const windowStart = Date.now();
    await sleep(1000);

    // C: inside the window.
    writeFileSync(c.instance("n2", "docs/n2/c.txt"), `C ${SEED}\n`);
    await write(SEED + 2, 30, ["n1", "n2"]);
    await quiet(["n1", "n2"]);
    const sC = await record("C");
    const sInside = await snapshot("n1"); // inside the window; S1 is no longer n1's newest
    const young = randomBytes(80);
    await store.put(`blobs/${sha(young)}`, young);
    const keepArg = () => `${Math.ceil((Date.now() - windowStart) / 1000)}s`;

    // An index pointer from two days ago goes; a claim of a collected seq goes with its segment.
    const oldPointer = pointerKey(Date.now() - 48 * 3600_000, "n1", "data.db", 1, "0".repeat(64));
    await store.put(oldPointer, Buffer.alloc(0));
    await store.put(claimKey("n3", "data.db", 1), Buffer.from("claimed"));

    // Dry run: reports, deletes nothing.
    const before = await allKeys(store);
    const dry = await gc(["--keep", keepArg()]);
    expect(dry.applied).toBe(false);
    expect(dry.oldestKept?.key).toBe(s2.key);
    expect(dry.snapshots.find((s) => s.key === s1.key)?.action).toBe("delete");
    expect(dry.totals.segments).toBeGreaterThan(0);
    expect(dry.totals.blobs).toBeGreaterThan(0);
    expect(dry.totals.pointers).toBe(1);
    expect(dry.totals.claims).toBe(1);
    expect(dry.laggards.some((l) => l.node === "n3" && l.origin === "n1" && l.stream === "data.db" && l.gone)).toBe(true);
    expect(await allKeys(store)).toEqual(before);
    const human = await runCli(["gc", "--store", url, "--keep", keepArg()]);
    expect(human.code, human.stderr).toBe(0);
    expect(human.stdout).toContain("dry run");
    expect(human.stdout).toMatch(/n3 has applied n1\/data\.db only through seq \d+/);
    const bad = await runCli(["gc", "--store", url, "--keep", "soon"]);
    expect(bad.code).toBe(2);
    expect(bad.stderr.trim().split("\n")).toHaveLength(1);

    // Apply, with n3 still stopped.
    const s1Manifest = await readManifest(store, (await listSnapshots(store)).find((r) => r.key === s1.key)!);
    const done = await gc(["--keep", keepArg(), "--apply"]);
    expect(done.applied).toBe(true);
    expect(done.totals.segments).toBeGreaterThan(0);
    expect(await store.head(oldPointer)).toBeNull();
    expect(await store.head(claimKey("n3", "data.db", 1))).toBeNull();
    let pointersLeft = 0;
    for await (const _ of listAll(store, "idx/")) pointersLeft++;
    expect(pointersLeft, "the young pointers stay").toBeGreaterThan(0);
    const refs = await listSnapshots(store);
    expect(refs.map((r) => r.key)).not.toContain(s1.key);
    expect(refs.map((r) => r.key)).toContain(s2.key);
    expect(refs.map((r) => r.key)).toContain(sInside.key);
    expect(await store.head(`blobs/${sha(orphan)}`)).toBeNull();
    expect(await store.head(`blobs/${sha(young)}`)).not.toBeNull();
    expect(await store.head(`blobs/${s1Manifest.databases[0].sha256}`), "S1's database copy is collected").toBeNull();

    // What n3 needs is still there: every origin's segments after n3's cursors, contiguous.
    const hb = JSON.parse((await store.get("nodes/n3.json"))!.toString()) as { databases: { stream: string; cursors: Record<string, number> }[]; files: { stream: string; cursors: Record<string, number> } };
    for (const origin of ["n1", "n2"]) {
      for (const [stream, cursor] of [["data.db", hb.databases.find((d) => d.stream === "data.db")!.cursors[origin]], [".files", hb.files.cursors[origin]]] as const) {
        const left = await seqs(store, origin, stream);
        expect(left[0], `${origin}/${stream} starts right after n3's cursor`).toBe(cursor + 1);
        expect(left.every((s, i) => s === left[0] + i)).toBe(true);
      }
    }
    // n3's own segments are covered by S2 and applied by n1 and n2: collected, except the newest.
    expect((await seqs(store, "n3", "data.db")).length).toBe(1);

    // Every blob a kept snapshot or a kept segment names is there.
    for (const ref of refs) {
      const m = await readManifest(store, ref);
      for (const p of partBlobs(m)) expect(await store.head(`blobs/${p.sha256}`), `part of ${ref.key}`).not.toBeNull();
      const entries = JSON.parse((await fetchBlob(store, m.files!.manifest.sha256, m.files!.manifest.size)).toString()) as FileEntry[];
      for (const e of entries) expect(await store.head(`blobs/${e.sha256}`), `${e.path} in ${ref.key}`).not.toBeNull();
    }
    for (const origin of await listOrigins(store)) {
      if (!(await listStreams(store, origin)).includes(".files")) continue;
      for await (const o of listAll(store, streamPrefix(origin, ".files"))) {
        const n = parseSegmentKey(o.key)!;
        for (const r of openSegment((await store.get(o.key))!, n.sha256).records) {
          if (r.file?.sha256) expect(await store.head(`blobs/${r.file.sha256}`), `${r.file.path} in ${o.key}`).not.toBeNull();
        }
      }
    }

    // Before the window: gone. Inside it: the recorded state.
    const early = await runCli(["replay", "--at", sA.at, "--into", join(c.root, "replay-A"), "--store", url]);
    expect(early.code).toBe(2);
    expect(early.stderr).toContain("no usable snapshot");
    const intoC = join(c.root, "replay-C");
    const rc = await runCli(["replay", "--at", sC.at, "--into", intoC, "--store", url]);
    expect(rc.code, rc.stderr).toBe(0);
    expect(compareDatabases([sC.db, join(intoC, "data.db")])).toEqual([]);
    expect(syncedFileHashes(intoC)).toEqual(sC.files);

    // The laggard catches up from what was kept.
    await c.restart("n3");
    await quiet(["n1", "n2", "n3"]);

    // D: more writes, then restore n2 to C (inside the window).
    writeFileSync(c.instance("n3", "docs/n3/f0.txt"), `D ${SEED}\n`);
    await write(SEED + 3, 20, ["n1", "n2", "n3"]);
    await quiet(["n1", "n2", "n3"]);
    c.node("n2").expectingExit = true;
    const restored = await runCli(["restore", c.instance("n2"), "--at", sC.at, "--store", url, "--stop-agent"]);
    expect(restored.code, restored.stderr + restored.stdout).toBe(0);
    expect(compareDatabases([sC.db, c.instance("n2", "data.db")])).toEqual([]);
    expect(syncedFileHashes(c.instance("n2"))).toEqual(sC.files);
    await c.restart("n2");
    await quiet(["n1", "n2", "n3"]);

    // E: n3 stops again and is forgotten; its cursors no longer hold anything back.
    await c.stop("n3");
    // Separate rounds: several segments per origin that n3 has not applied.
    for (let i = 0; i < 3; i++) {
      await write(SEED + 4 + i, 10, ["n1", "n2"]);
      await quiet(["n1", "n2"]);
    }
    await snapshot("n1");
    await sleep(2000);
    const n3Cursor = (JSON.parse((await store.get("nodes/n3.json"))!.toString()) as { databases: { stream: string; cursors: Record<string, number> }[] }).databases.find((d) => d.stream === "data.db")!.cursors.n1;
    const forgot = await gc(["--keep", "1s", "--apply", "--forget-node", "n3"]);
    expect(forgot.nodes.find((n) => n.node === "n3")?.state).toBe("forgotten");
    expect(forgot.laggards.filter((l) => l.node === "n3")).toEqual([]);
    expect(forgot.streams.find((st) => st.origin === "n1" && st.stream === "data.db")!.collectThrough).toBeGreaterThan(n3Cursor + 1);

    // n3 started again meets the hole gc made (collected, not a gap to wait at); with
    // nothing of its own unsent, it starts those streams again from the newest snapshot
    // by itself, keeps what it held aside, and converges.
    await c.restart("n3");
    await waitFor(async () => (await c.status("n3")).rejoin?.state === "done", 60_000, "n3 to start again from a snapshot by itself", 300);
    await quiet(["n1", "n2", "n3"]);
    expect(c.logEntries("n3").some((e) => typeof e.message === "string" && e.message.includes("deleted by gc"))).toBe(true);
    const rejoined = (await c.status("n3")).rejoin!;
    expect(rejoined.streams).toContain("data.db");
    expect(readdirSync(rejoined.leftBehind!)).toContain("data.db");

    expect(c.badLogLines().filter((l) => !l.includes("deleted by gc"))).toEqual([]);
    await c.stopAll();
  }, 400_000);
});
