/**
 * The cluster index (src/log/index.ts) and what the pull loop makes of it
 * (src/agent/tailing.ts): pointers round-trip any names, a poll finds what is
 * new with one LIST, one far-off clock cannot hide everyone else's pointers,
 * segments named by pointers are fetched without listing, a pointer to a
 * missing segment falls back to the listing, and seq claims stop a second
 * writer under one node name before it forks the log.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { decodeHint, encodeHint, Hints } from "../src/agent/hints.js";
import { TailPlanner } from "../src/agent/tailing.js";
import { INDEX_PREFIX, parsePointerKey, pointerKey, publishPointer, SegmentIndex } from "../src/log/index.js";
import { claimKey, logHead, segmentKey } from "../src/log/keys.js";
import { LogForkError } from "../src/log/outbox.js";
import { sealSegment } from "../src/log/segment.js";
import { readAfter } from "../src/log/tail.js";
import { FileStore } from "../src/store/file.js";
import { listAll } from "../src/store/store.js";
import { appConnection, openSync } from "./helpers/node.js";

const root = mkdtempSync(join(tmpdir(), "unisync-index-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const freshStore = () => new FileStore(join(root, `store${n++}`));

/** Puts a valid segment of `origin` (no records) and returns its key and sha. */
async function putSegment(store: FileStore, origin: string, stream: string, seq: number): Promise<{ key: string; sha256: string }> {
  const { bytes, sha256 } = sealSegment({ origin, stream, seq, createdMs: Date.now(), records: [] });
  const key = segmentKey(origin, stream, seq, sha256);
  await store.put(key, bytes);
  return { key, sha256 };
}

describe("pointer keys", () => {
  it("round-trip names with commas, slashes, dots and non-ASCII, and sort by time", () => {
    const names: [string, string][] = [["n1", "app.db"], ["a,b", "sub/dir/x.db"], [".hidden", ".files"], ["nœud-é", "données.sqlite"]];
    for (const [origin, stream] of names) {
      const key = pointerKey(1_765_000_000_123, origin, stream, 42, "ab".repeat(32));
      const p = parsePointerKey(key)!;
      expect(p).toMatchObject({ ms: 1_765_000_000_123, origin, stream, seq: 42, segmentKey: segmentKey(origin, stream, 42, "ab".repeat(32)) });
      expect(key.startsWith(INDEX_PREFIX)).toBe(true);
      expect(key.split("/")).toHaveLength(3);
    }
    const early = pointerKey(1_765_000_000_000, "zz", "app.db", 9, "0".repeat(64));
    const late = pointerKey(1_765_000_000_001, "aa", "app.db", 1, "0".repeat(64));
    expect(early < late).toBe(true);
  });

  it("ignore junk under idx/", () => {
    for (const junk of ["idx/2026120523/readme.txt", "idx/x", "log/n1/app.db/1.seg", "idx/2026120523/1765000000000,n1,app.db,1,zz", "idx/2026120523/1765000000000,%E0%A4%A,app.db,00000000000000000001," + "0".repeat(64)]) {
      expect(parsePointerKey(junk)).toBeNull();
    }
  });
});

describe("SegmentIndex", () => {
  it("finds every new segment of every origin and stream with one LIST, and re-reads only its window", async () => {
    const store = freshStore();
    const t0 = Date.now();
    const index = new SegmentIndex(store, "me", 10_000, t0);
    for (const origin of ["a", "b", "c"]) for (const stream of ["app.db", "other.db", ".files"]) for (let seq = 1; seq <= 3; seq++) {
      const { sha256 } = await putSegment(store, origin, stream, seq);
      await publishPointer(store, t0 + seq, origin, stream, [{ seq: seq, sha256: sha256 }]);
    }
    await publishPointer(store, t0, "me", "app.db", [{ seq: 1, sha256: "0".repeat(64) }]); // our own: not ours to read
    const lists = store.requests.total.LIST;
    expect((await index.poll()).fresh).toBe(27);
    expect(store.requests.total.LIST - lists).toBe(1);
    expect(index.head("b", "other.db")).toBe(3);
    expect([...index.origins].sort()).toEqual(["a", "b", "c"]);
    expect(index.segments("me", "app.db").size).toBe(0);
    // Nothing new: nothing fresh. A late writer 5 s back is missed by the short polls,
    // seen by the next scan of the whole window (every third of it).
    expect((await index.poll()).fresh).toBe(0);
    await publishPointer(store, t0 - 5_000, "a", "app.db", [{ seq: 4, sha256: "1".repeat(64) }]);
    expect((await index.poll()).fresh).toBe(0);
    expect((await index.poll(Date.now() + 4_000)).fresh).toBe(1);
    // Older than the window: left to gap repair (the planner lists the stream).
    await publishPointer(store, t0 - 60_000, "a", "app.db", [{ seq: 5, sha256: "2".repeat(64) }]);
    expect((await index.poll(Date.now() + 8_000)).fresh).toBe(0);
    index.forget("a", "app.db", 3);
    expect([...index.segments("a", "app.db").keys()]).toEqual([4]);
    // Applied segments seen again by a window scan are nothing new (an idle reader stays idle).
    expect((await index.poll(Date.now() + 12_000)).fresh).toBe(0);
    expect([...index.segments("a", "app.db").keys()]).toEqual([4]);
  });

  it("reads a batch pointer's body for streams it holds, and counts only those as fresh", async () => {
    const store = freshStore();
    const index = new SegmentIndex(store, "me", 10_000);
    const sha = (n: number) => String(n).repeat(64);
    await publishPointer(store, Date.now(), "a", "app.db", [3, 1, 2].map((seq) => ({ seq, sha256: sha(seq) })));
    await publishPointer(store, Date.now(), "a", "other.db", [1, 2].map((seq) => ({ seq, sha256: sha(seq) })));
    const gets = store.requests.total.GET;
    expect((await index.poll(Date.now(), (_o, stream) => stream === "app.db")).fresh).toBe(3);
    expect(store.requests.total.GET - gets).toBe(1);
    expect([...index.segments("a", "app.db").entries()].sort()).toEqual([1, 2, 3].map((seq) => [seq, segmentKey("a", "app.db", seq, sha(seq))]));
    expect([...index.segments("a", "other.db").keys()]).toEqual([2]);
    // Seen again by later polls and window scans: no second GET of the body.
    await index.poll(Date.now());
    await index.poll(Date.now() + 12_000, (_o, stream) => stream === "app.db");
    expect(store.requests.total.GET - gets).toBe(1);
  });

  it("does not let one clock far ahead move the window past everyone else", async () => {
    const store = freshStore();
    const now = Date.now();
    const index = new SegmentIndex(store, "me", 10_000, now);
    await publishPointer(store, now + 3_600_000, "fast", "app.db", [{ seq: 1, sha256: "0".repeat(64) }]);
    expect((await index.poll(now)).fresh).toBe(1);
    await publishPointer(store, now + 1_000, "normal", "app.db", [{ seq: 1, sha256: "0".repeat(64) }]);
    expect((await index.poll(now + 1_000)).fresh).toBe(1);
  });
});

describe("TailPlanner", () => {
  it("lists everything in the first round, then fetches by key, lists a lasting gap once per grace period, and repairs every pair in turn", async () => {
    const store = freshStore();
    const index = new SegmentIndex(store, "me", 10_000);
    const planner = new TailPlanner(index, { repairEveryMs: 1000, gapGraceMs: 500 });
    const cursors = new Map<string, number>();
    const streams = ["x.db", "y.db"].map((stream) => ({ stream, cursor: (o: string) => cursors.get(`${o}/${stream}`) ?? 0, listAll: false }));
    const origins = ["a", "b"];
    expect(planner.plan(streams, origins, 0)).toHaveLength(4);
    planner.firstRoundDone();
    let t = Date.now();
    expect(planner.plan(streams, origins, t)).toEqual([]);
    index.add("a", "x.db", 1, "k1");
    expect(planner.plan(streams, origins, t)).toEqual([{ stream: "x.db", origin: "a", known: index.segments("a", "x.db") }]);
    // A later segment named, the next one not: wait out the grace period, then list once.
    cursors.set("a/x.db", 1);
    index.add("a", "x.db", 3, "k3");
    expect(planner.plan(streams, origins, t)).toEqual([]);
    expect(planner.plan(streams, origins, t + 600)).toEqual([{ stream: "x.db", origin: "a" }]);
    expect(planner.plan(streams, origins, t + 700)).toEqual([]);
    // Repair: one pair per repairEveryMs, every pair in turn.
    index.forget("a", "x.db", 3);
    const repaired = new Set<string>();
    for (let i = 1; i <= 4; i++) {
      t += 1000;
      const p = planner.plan(streams, origins, t);
      expect(p).toHaveLength(1);
      repaired.add(`${p[0]!.origin}/${p[0]!.stream}`);
    }
    expect(repaired.size).toBe(4);
    expect(planner.listings).toMatchObject({ first: 4, gap: 1, repair: 4 });
  });
});

describe("readAfter with the index", () => {
  it("fetches named segments without listing, and lists when a named segment is not in the store", async () => {
    const store = freshStore();
    const index = new SegmentIndex(store, "me", 10_000);
    for (let seq = 1; seq <= 5; seq++) index.add("a", "app.db", seq, (await putSegment(store, "a", "app.db", seq)).key);
    const lists = store.requests.total.LIST;
    const r = await readAfter(store, "a", "app.db", 0, 16, 4, index.segments("a", "app.db"));
    const seqs: number[] = [];
    for await (const s of r.segments) seqs.push(s.seq);
    expect(seqs).toEqual([1, 2, 3, 4, 5]);
    expect(store.requests.total.LIST).toBe(lists);
    // A pointer to a segment that is gone (a wrong pointer): the listing decides, here a gap at 6.
    index.add("a", "app.db", 6, segmentKey("a", "app.db", 6, "f".repeat(64)));
    await putSegment(store, "a", "app.db", 7);
    const r2 = await readAfter(store, "a", "app.db", 5, 16, 4, index.segments("a", "app.db"));
    for await (const s of r2.segments) seqs.push(s.seq);
    expect(seqs).toEqual([1, 2, 3, 4, 5]);
    expect(r2.problem()).toMatchObject({ kind: "gap", seq: 6 });
    expect(store.requests.total.LIST).toBe(lists + 1);
  });
});

describe("seq claims", () => {
  it("stop a second database writing under the same node name before its segment lands, and logHead counts claims", async () => {
    const store = freshStore();
    const dbs = ["one", "two"].map((name) => {
      const path = join(root, `${name}-${n++}.db`);
      const app = appConnection(path);
      app.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)");
      return { app, sync: openSync(path, "same-name", store) };
    });
    dbs[0]!.app.prepare("INSERT INTO t(v) VALUES ('from one')").run();
    dbs[0]!.sync.sealPending();
    await dbs[0]!.sync.upload();
    dbs[1]!.app.prepare("INSERT INTO t(v) VALUES ('from two')").run();
    dbs[1]!.sync.sealPending();
    const err = await dbs[1]!.sync.upload().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LogForkError);
    expect((err as Error).message).toMatch(/already claimed.*same-name/);
    const segments: string[] = [];
    for await (const o of listAll(store, "log/")) segments.push(o.key);
    expect(segments).toHaveLength(1);
    // A claim whose segment never landed still counts: its seq is never reused.
    await store.putIfAbsent(claimKey("same-name", "app.db", 9), Buffer.from("x"));
    expect(await logHead(store, "same-name", "app.db")).toBe(9);
    for (const d of dbs) {
      d.sync.close();
      d.app.close();
    }
  });
});

describe("LAN hints", () => {
  it("wake a peer with a signed, fresh notice and refuse forged, foreign or stale ones", async () => {
    const secret = "a-shared-cluster-secret";
    expect(decodeHint(secret, encodeHint(secret, "n1", Date.now()))).toEqual({ origin: "n1" });
    expect(decodeHint(secret, encodeHint("another-cluster-secret", "n1", Date.now()))).toMatchObject({ refused: expect.stringMatching(/signature/) });
    expect(decodeHint(secret, encodeHint(secret, "n1", Date.now() - 120_000))).toMatchObject({ refused: expect.stringMatching(/away from our clock/) });
    expect(decodeHint(secret, Buffer.from("hello"))).toMatchObject({ refused: expect.any(String) });
    const quiet = { warn: () => undefined, debug: () => undefined };
    const woken: string[] = [];
    const receiver = await Hints.start({ node: "n2", port: 0, peers: [], secret }, (o) => woken.push(o), quiet);
    const port = (receiver as unknown as { socket: { address(): { port: number } } }).socket.address().port;
    const sender = await Hints.start({ node: "n1", port: 0, peers: [`127.0.0.1:${port}`], secret }, () => undefined, quiet);
    const forger = await Hints.start({ node: "evil", port: 0, peers: [`127.0.0.1:${port}`], secret: "not-the-cluster-secret" }, () => undefined, quiet);
    sender.notify();
    forger.notify();
    for (let i = 0; i < 100 && (woken.length < 1 || receiver.refused < 1); i++) await new Promise((r) => setTimeout(r, 20));
    expect(woken).toEqual(["n1"]);
    expect(receiver.refused).toBe(1);
    for (const h of [receiver, sender, forger]) h.close();
  });
});
