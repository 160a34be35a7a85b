/**
 * Crash safety of the agent, with real processes:
 *  - kill -9 of the agents at random moments while the apps write: afterwards
 *    nothing is lost (every journaled insert everywhere), nothing is duplicated
 *    (the nodes' tables are identical, including the keyless `logs` table whose
 *    copies would show a duplicate), and every origin's log in the store is
 *    dense: seqs 1..N with exactly one object per seq, although index pointers
 *    were deleted, delayed and duplicated at random meanwhile;
 *  - the store (s3rver) down for several seconds: capture goes on into the
 *    outbox, and once it is back every node catches up and converges.
 *
 * Reproduce with SEED=<printed seed>; KEEP_CLUSTER=1 keeps folders, logs and the store.
 */
import { afterAll, describe, expect, it } from "vitest";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
import { compareToJournal, readJournal, type JournalEntry } from "./helpers/checker.js";
import { appSucceeded, Cluster, integrityCheck, killAllChildren, runApp, waitFor, type AppRun } from "./helpers/cluster.js";
import { mulberry32 } from "./helpers/random.js";
import { S3RVER_ENV, s3StoreUrl, startS3rver, type S3rverHandle } from "./helpers/s3rver.js";
import { listAll, type ObjectStore } from "../src/store/store.js";
import { openStore } from "../src/store/url.js";
import { FileStore } from "../src/store/file.js";
import { startPointerChaos } from "./helpers/pointer-chaos.js";

const SEED = Number(process.env.SEED ?? Math.floor(Math.random() * 1_000_000));
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

const cleanups: (() => Promise<void> | void)[] = [];
let keep = !!process.env.KEEP_CLUSTER;

afterAll(async () => {
  await killAllChildren();
  for (const f of cleanups.reverse()) await f();
});

const SEGMENT = /^(\d{20})-([0-9a-f]{64})\.seg$/;

/** Segment file names per "origin/stream", from a listing of keys under log/. */
function groupSegments(keys: string[]): { logs: Map<string, string[]>; junk: string[] } {
  const logs = new Map<string, string[]>();
  const junk: string[] = [];
  for (const key of keys) {
    const parts = key.split("/");
    if (parts.length !== 4 || parts[0] !== "log" || !SEGMENT.test(parts[3])) {
      junk.push(key);
      continue;
    }
    const id = `${decodeURIComponent(parts[1])}/${decodeURIComponent(parts[2])}`;
    logs.set(id, [...(logs.get(id) ?? []), parts[3]]);
  }
  return { logs, junk };
}

function fileStoreKeys(root: string): string[] {
  const out: string[] = [];
  const walk = (dir: string, prefix: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      if (e.isDirectory()) walk(join(dir, e.name), `${prefix}${e.name}/`);
      else out.push(`${prefix}${e.name}`);
    }
  };
  walk(join(root, "log"), "log/");
  return out;
}

async function storeKeys(store: ObjectStore): Promise<string[]> {
  const out: string[] = [];
  for await (const o of listAll(store, "log/")) out.push(o.key);
  return out;
}

/**
 * Every origin/stream log must hold seqs 1..N, one object each, N being what
 * the origin says it wrote. Returns problems (empty when fine).
 */
function checkDenseLogs(logs: Map<string, string[]>, written: Map<string, number>): string[] {
  const problems: string[] = [];
  for (const [id, n] of written) if (n > 0 && !logs.has(id)) problems.push(`${id}: origin wrote ${n} segments, store has none`);
  for (const [id, names] of logs) {
    const seqs = names.map((f) => Number(SEGMENT.exec(f)![1])).sort((a, b) => a - b);
    const seen = new Map<number, number>();
    for (const s of seqs) seen.set(s, (seen.get(s) ?? 0) + 1);
    const dups = [...seen].filter(([, k]) => k > 1).map(([s, k]) => `seq ${s} ×${k}`);
    if (dups.length) problems.push(`${id}: more than one object per seq: ${dups.slice(0, 10).join(", ")}`);
    const max = seqs[seqs.length - 1] ?? 0;
    const missing: number[] = [];
    for (let s = 1; s <= max && missing.length < 10; s++) if (!seen.has(s)) missing.push(s);
    if (missing.length) problems.push(`${id}: seqs missing in 1..${max}: ${missing.join(", ")}`);
    const w = written.get(id);
    if (w !== undefined && w !== max) problems.push(`${id}: store ends at seq ${max} but the origin sealed ${w}`);
  }
  return problems;
}

/** Per "origin/stream": segments the origin sealed (nextSeq - 1), from the agents' status. */
async function sealedPerLog(c: Cluster): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for (const name of c.nodes.keys()) {
    for (const d of (await c.status(name)).databases) out.set(`${name}/${d.stream}`, d.nextSeq - 1);
  }
  return out;
}

/**
 * Creates data.db (WAL) and, with flask, app.db + audit.db on every node: each
 * node's app makes its own schema (unisync syncs rows, not files).
 */
async function createDatabases(c: Cluster, flask = false): Promise<void> {
  for (const name of c.nodes.keys()) {
    await appSucceeded(runApp("random_writer.py", [c.instance(name, "data.db"), "--node", "9", "--ops", "0", "--journal", "wal"]), "create data.db");
    if (flask) await appSucceeded(runApp("flask_app.py", [c.instance(name), "--init-only"]), "create app.db and audit.db");
  }
}

function startWriter(c: Cluster, name: string, nodeNo: number, sleepMs: number): AppRun {
  const dir = c.node(name).dir;
  return runApp("random_writer.py", [
    c.instance(name, "data.db"), "--node", String(nodeNo), "--seed", String(SEED), "--ops", "1000000",
    "--sleep-ms", String(sleepMs), "--journal-file", join(dir, "rw.jsonl"),
  ], join(dir, "apps.log"));
}

/**
 * Stops a writer that runs "forever". SIGTERM makes it finish and journal the
 * transaction in hand and exit 0 (random_writer.py StopOnTerm): dying of the
 * signal between a COMMIT and its journal line left committed deletes out of the
 * journal, which the final checks then reported as lost rows.
 */
async function stopWriter(run: AppRun): Promise<void> {
  run.proc.kill("SIGTERM");
  const r = await run.done;
  if (r.code !== 0) throw new Error(`writer exited with code ${r.code} signal ${r.signal} (not cleanly):\n${r.stderr.slice(-3000)}`);
}

function startFlask(c: Cluster, name: string, nodeNo: number, sleepMs: number): AppRun {
  const dir = c.node(name).dir;
  return runApp("flask_app.py", [
    c.instance(name), "--node", String(nodeNo), "--seed", String(SEED), "--ops", "1000000",
    "--sleep-ms", String(sleepMs), "--journal-file", join(dir, "flask.jsonl"),
  ], join(dir, "apps.log"));
}

/**
 * Writes files into an instance folder every ~40 ms: new ones, and rewrites of
 * earlier ones (atomically, as apps should). Returns the final content of each.
 */
function startFileWriter(instance: string, rand: () => number): { stop(): Promise<Map<string, string>> } {
  const expected = new Map<string, string>();
  let running = true;
  const loop = (async () => {
    for (let i = 0; running; i++) {
      const rel = i > 5 && rand() < 0.4 ? [...expected.keys()][Math.floor(rand() * expected.size)] : `docs/batch ${i % 7}/file-${i}.txt`;
      const content = `${rel} version ${i} ${"x".repeat(Math.floor(rand() * 3000))}`;
      mkdirSync(dirname(join(instance, rel)), { recursive: true });
      writeFileSync(join(instance, `${rel}.tmp`), content);
      renameSync(join(instance, `${rel}.tmp`), join(instance, rel));
      expected.set(rel, content);
      await sleep(40);
    }
  })();
  return {
    stop: async () => {
      running = false;
      await loop;
      return expected;
    },
  };
}

function journals(c: Cluster): JournalEntry[] {
  return [...c.nodes.values()].flatMap((n) =>
    ["rw.jsonl", "flask.jsonl"].flatMap((f) => (existsSync(join(n.dir, f)) ? readJournal(join(n.dir, f), true) : [])),
  );
}

async function finalChecks(c: Cluster, streams: string[], written: () => Promise<Map<string, number>>, keys: () => Promise<string[]>): Promise<void> {
  await c.waitForQuiescence(streams, 90_000);
  const paths = streams.flatMap((s) => c.paths(s));
  for (const s of streams) await c.waitForConvergence(c.paths(s), 30_000);
  const journal = journals(c);
  for (const s of streams) expect(journal.filter((e) => e.op === "insert" && e.db === s).length, `inserts into ${s}`).toBeGreaterThan(50);
  for (const p of paths) expect(compareToJournal(p, journal)).toEqual([]);

  const { logs, junk } = groupSegments(await keys());
  const sealed = await written();
  console.log(`store: ${[...logs].map(([id, s]) => `${id}: ${s.length} segments`).join(", ")}; other keys under log/: ${junk.length}`);
  expect(checkDenseLogs(logs, sealed)).toEqual([]);
  // In-flight temp files of the file store (a kill during put) are allowed; nothing else.
  expect(junk.filter((k) => !k.split("/").pop()!.startsWith(".tmp-"))).toEqual([]);

  expect(c.badLogLines()).toEqual([]);
  await c.stopAll();
  for (const p of paths) expect(integrityCheck(p)).toBe("ok");
  expect(c.unexpectedExits).toEqual([]);
}

describe("crash safety", () => {
  it("kill -9 of the agents while the apps write loses and duplicates nothing (file store)", async (ctx) => {
    console.log(`crash.test kill -9 SEED=${SEED}`);
    ctx.onTestFailed(() => {
      keep = true;
    });
    const rand = mulberry32(SEED);
    const storeDir = mkdtempSync(join(tmpdir(), "unisync-store-"));
    cleanups.push(() => (keep ? console.log(`store kept in ${storeDir}`) : rmSync(storeDir, { recursive: true, force: true })));
    const c = await Cluster.start({ nodes: ["a", "b"], store: pathToFileURL(storeDir).href, env: { UNISYNC_REPAIR_EVERY_MS: "300" } });
    cleanups.push(() => c.destroy(keep));
    await createDatabases(c);
    // Index pointers are also deleted, delayed and duplicated at random meanwhile: none of that may lose a segment.
    const chaos = startPointerChaos(new FileStore(storeDir), SEED, { drop: 0.2, delay: 0.2, duplicate: 0.2, maxDelayMs: 3000 });

    // A writes fast; B slower, so A also applies B's segments while it gets killed.
    const writerA = startWriter(c, "a", 1, 10);
    const writerB = startWriter(c, "b", 2, 80);
    // Files too: A's folder changes all the time while A is killed.
    const files = startFileWriter(c.instance("a"), rand);

    // Kill -9 schedule over ~20 s: A four times, B once, at random moments.
    const events = [
      ...Array.from({ length: 4 }, () => ({ node: "a", at: 1500 + rand() * 18000 })),
      { node: "b", at: 1500 + rand() * 18000 },
    ].sort((x, y) => x.at - y.at);
    const t0 = Date.now();
    for (const e of events) {
      await sleep(Math.max(0, t0 + e.at - Date.now()));
      await c.kill9(e.node);
      const down = 100 + Math.floor(rand() * 900);
      console.log(`t=${Date.now() - t0} ms: kill -9 ${e.node}, restart in ${down} ms`);
      await sleep(down);
      await c.restart(e.node);
    }
    await sleep(2000);
    await stopWriter(writerA);
    await stopWriter(writerB);
    const expected = await files.stop();
    const chaosCounts = await chaos.stop();
    console.log(`pointer chaos: ${JSON.stringify(chaosCounts)}`);
    expect(chaosCounts.dropped).toBeGreaterThan(0);
    expect(c.unexpectedExits).toEqual([]);
    expect(c.node("a").starts).toBe(5);
    expect(c.node("b").starts).toBe(2);

    // Every file A wrote reaches B with its last content, and nothing else appears.
    const onB = (rel: string) => {
      try {
        return readFileSync(c.instance("b", rel), "utf8");
      } catch {
        return null;
      }
    };
    await waitFor(() => [...expected].every(([rel, content]) => onB(rel) === content), 60_000).catch(() => undefined);
    const wrong = [...expected].filter(([rel, content]) => onB(rel) !== content).map(([rel]) => rel);
    expect(wrong, `files not (or not finally) on b`).toEqual([]);
    expect(readdirSync(c.instance("b", "docs"), { recursive: true }).filter((f) => String(f).endsWith(".tmp"))).toEqual([]);

    await finalChecks(c, ["data.db"], () => sealedPerLog(c), async () => fileStoreKeys(storeDir));
  }, 150_000);

  it("keeps capturing while the s3 store is down and catches up when it is back", async (ctx) => {
    console.log(`crash.test store outage SEED=${SEED}`);
    ctx.onTestFailed(() => {
      keep = true;
    });
    let s3: S3rverHandle = await startS3rver("unisync-outage");
    const { port, directory, bucket } = s3;
    cleanups.push(async () => {
      await s3.stop({ keepData: true }).catch(() => undefined);
      if (keep) console.log(`s3rver data kept in ${directory}`);
      else rmSync(directory, { recursive: true, force: true });
    });
    const url = s3StoreUrl(s3.endpoint, bucket, `outage-${SEED}`);
    const c = await Cluster.start({ nodes: ["a", "b"], store: url });
    cleanups.push(() => c.destroy(keep));
    await createDatabases(c, true);
    // Both nodes write (different databases, so no keyless row is edited on both).
    const writerA = startWriter(c, "a", 1, 30);
    const writerB = startFlask(c, "b", 2, 30);
    await sleep(3000);

    // The store goes away (connections dropped, port closed) for ~6 s.
    const outbox = async (n: string) => (await c.status(n)).databases.reduce((sum, d) => sum + d.outboxSegments, 0);
    const before = { a: await outbox("a"), b: await outbox("b") };
    await s3.stop({ keepData: true });
    const downAt = Date.now();
    // From 1.5 s on, each agent's status should say the store is unreachable.
    await sleep(1500);
    const saidDown = { a: 0, b: 0 };
    let samples = 0;
    while (Date.now() - downAt < 6000) {
      samples++;
      for (const n of ["a", "b"] as const) if ((await c.status(n)).storeError) saidDown[n]++;
      await sleep(100);
    }
    const during = { a: await outbox("a"), b: await outbox("b") };
    console.log(`outbox while the store was down: ${JSON.stringify(before)} -> ${JSON.stringify(during)}; ` +
      `status said "unreachable" in ${saidDown.a}/${samples} (a) and ${saidDown.b}/${samples} (b) samples`);
    // Capture went on: sealed segments piled up in the outboxes.
    expect(during.a).toBeGreaterThan(before.a);
    expect(during.b).toBeGreaterThan(before.b);
    expect(c.running("a") && c.running("b")).toBe(true);
    // Soft: a status that says "reachable" during an outage is wrong, but the
    // catch-up checks below matter more (test/repro/store-down-status-flaps.mjs).
    expect.soft(saidDown.a / samples, "share of status samples of a reporting the store down").toBeGreaterThan(0.8);
    expect.soft(saidDown.b / samples, "share of status samples of b reporting the store down").toBeGreaterThan(0.8);

    s3 = await startS3rver(bucket, { port, directory });
    const upAt = Date.now();
    // The apps go on writing: the agents must catch up under load.
    await waitFor(async () => (await outbox("a")) < 5 && (await outbox("b")) < 5, 60_000, "outboxes to drain after the store came back", 250);
    console.log(`outboxes caught up ${Date.now() - upAt} ms after the store came back (apps still writing)`);
    await stopWriter(writerA);
    await stopWriter(writerB);

    const store = openStore(url, { ...process.env, ...S3RVER_ENV });
    await finalChecks(c, ["data.db", "app.db", "audit.db"], () => sealedPerLog(c), () => storeKeys(store));
  }, 150_000);
});
