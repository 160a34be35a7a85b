/**
 * Bad input never applies and never loses anything: corrupt, truncated or
 * mislabelled segments, gaps and forks in an origin's log, an unreachable
 * store, and bad configuration each get a clear report.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { createServer } from "node:net";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeEach, describe, expect, it } from "vitest";
import Database from "better-sqlite3";
import { loadConfig } from "../src/agent/config.js";
import { segmentKey } from "../src/log/keys.js";
import { sealSegment, sha256Hex, type Segment } from "../src/log/segment.js";
import { FileStore } from "../src/store/file.js";
import { S3Store } from "../src/store/s3.js";
import { compress } from "zstd-napi";
import { appConnection, openSync } from "./helpers/node.js";
import { CorruptSnapshotError, encodeManifest, readManifest, snapshotKey, SNAPSHOT_FORMAT, type SnapshotRef } from "../src/snapshot/format.js";

const root = mkdtempSync(join(tmpdir(), "unisync-bad-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

let dir = "";
let store: FileStore;
let n = 0;
beforeEach(() => {
  dir = join(root, `case${++n}`);
  mkdirSync(dir, { recursive: true });
  store = new FileStore(join(dir, "store"));
});

function freshNode(name = "local") {
  const path = join(dir, `${name}.db`);
  const app = appConnection(path);
  app.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v)");
  app.close();
  return openSync(path, name, store);
}

const insert = (id: number, v: string): Segment["records"][0] => ({ hlc: 1000 * 1024 + id, row: { table: "t", op: 1, columns: ["id", "v"], values: [BigInt(id), v], key: ["id"], changed: [] } });

function segment(seq: number, records = [insert(seq, `row ${seq}`)], origin = "remote"): { key: string; bytes: Buffer } {
  const { bytes, sha256 } = sealSegment({ origin, stream: "app.db", seq, createdMs: 0, records });
  return { key: segmentKey(origin, "app.db", seq, sha256), bytes };
}

const rows = (node: ReturnType<typeof freshNode>) => node.db.prepare("SELECT id FROM t ORDER BY id").pluck().all().map(Number);

describe("corrupt objects are reported and never applied", () => {
  const cases: [string, (s: { key: string; bytes: Buffer }) => { key: string; bytes: Buffer }][] = [
    ["wrong hash", (s) => ({ key: s.key.replace(/-[0-9a-f]{64}/, `-${"0".repeat(64)}`), bytes: s.bytes })],
    ["truncated", (s) => { const b = s.bytes.subarray(0, s.bytes.length - 5); return { key: s.key.replace(/-[0-9a-f]{64}/, `-${sha256Hex(b)}`), bytes: b }; }],
    ["flipped byte", (s) => { const b = Buffer.from(s.bytes); b[b.length >> 1] ^= 0xff; return { key: s.key, bytes: b }; }],
    ["garbage protobuf", (s) => { const b = compress(Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01])); return { key: s.key.replace(/-[0-9a-f]{64}/, `-${sha256Hex(b)}`), bytes: b }; }],
    ["header names another origin", (s) => { const other = segment(1, undefined, "someone-else"); return { key: s.key.replace(/-[0-9a-f]{64}/, `-${sha256Hex(other.bytes)}`), bytes: other.bytes }; }],
  ];
  for (const [name, spoil] of cases) {
    it(name, async () => {
      const node = freshNode();
      const bad = spoil(segment(1));
      await store.put(bad.key, bad.bytes);
      const good2 = segment(2);
      await store.put(good2.key, good2.bytes);
      expect(await node.pull("remote")).toBe(0);
      expect(node.problems.get("remote")?.kind).toBe("corrupt");
      expect(node.problems.get("remote")?.message).toContain(bad.key);
      expect(node.cursors().get("remote")).toBeUndefined();
      expect(rows(node)).toEqual([]); // segment 2 waits behind the corrupt 1: never skip
      // The origin's real segment 1 appears (e.g. the object is repaired): everything applies.
      await store.delete(bad.key);
      const good1 = segment(1);
      await store.put(good1.key, good1.bytes);
      await node.pull("remote");
      expect(rows(node)).toEqual([1, 2]);
      expect(node.problems.size).toBe(0);
      node.close();
    });
  }
});

describe("snapshot manifests", () => {
  // A copy is placed at join(instanceDir, stream): a manifest written into the bucket must not aim it elsewhere.
  for (const stream of ["../outside.db", "/etc/passwd", "a/../../x.db", ".unisync/files.db", "data.db-wal", ""]) {
    it(`refuses a database named ${JSON.stringify(stream)}`, async () => {
      const m = { format: SNAPSHOT_FORMAT, node: "evil", hlc: 5, createdMs: 0, databases: [{ stream, sha256: "0".repeat(64), size: 1, vector: {} }], files: null };
      const { bytes, sha256 } = encodeManifest(m);
      const ref: SnapshotRef = { key: snapshotKey("evil", 5, sha256), node: "evil", hlc: 5, sha256 };
      await store.put(ref.key, bytes);
      await expect(readManifest(store, ref)).rejects.toThrow(CorruptSnapshotError);
      await expect(readManifest(store, ref)).rejects.toThrow(/names a database at/);
    });
  }
});

describe("log order", () => {
  it("waits at a gap and resumes when the missing segment arrives", async () => {
    const node = freshNode();
    for (const s of [segment(1), segment(3)]) await store.put(s.key, s.bytes);
    await node.pull("remote");
    expect(rows(node)).toEqual([1]);
    expect(node.problems.get("remote")?.kind).toBe("gap");
    const s2 = segment(2);
    await store.put(s2.key, s2.bytes);
    await node.pull("remote");
    expect(rows(node)).toEqual([1, 2, 3]);
    node.close();
  });

  it("stops at a fork (two different segments with one seq)", async () => {
    const node = freshNode();
    const a = segment(1, [insert(1, "a")]);
    const b = segment(1, [insert(1, "b")]);
    await store.put(a.key, a.bytes);
    await store.put(b.key, b.bytes);
    await node.pull("remote");
    expect(node.problems.get("remote")?.kind).toBe("fork");
    expect(rows(node)).toEqual([]);
    node.close();
  });

  it("steps over a segment with no records (it moves the cursor; the log goes on after it)", async () => {
    const node = freshNode();
    for (const s of [segment(1), segment(2, []), segment(3)]) await store.put(s.key, s.bytes);
    await node.pull("remote");
    expect(rows(node)).toEqual([1, 3]);
    expect(node.cursors().get("remote")?.seq).toBe(3);
    node.close();
  });

  it("applies a segment once however often it is fetched", async () => {
    const node = freshNode();
    const s = segment(1);
    await store.put(s.key, s.bytes);
    await node.pull("remote");
    node.db.prepare("UPDATE t SET v = 'local edit' WHERE id = 1").run();
    node.sealPending();
    await node.pull("remote");
    expect(node.db.prepare("SELECT v FROM t").pluck().get()).toBe("local edit");
    node.close();
  });

  it("parks a record it cannot apply and keeps going", async () => {
    const node = freshNode();
    const weird = { hlc: 5, row: { table: "t", op: 1 as const, columns: ["id", "v", "nope"], values: [7n, "x", 1n], key: ["id"], changed: [] } };
    const s = segment(1, [weird, insert(8, "fine"), { hlc: 9, row: { table: "missing", op: 1, columns: ["a"], values: [1n], key: ["a"], changed: [] } }]);
    await store.put(s.key, s.bytes);
    await node.pull("remote");
    expect(rows(node)).toEqual([8]);
    expect(node.parkedCount()).toBe(2);
    node.close();
  });

  it("refuses to fork its own log when the store has segments it did not write", async () => {
    const node = freshNode("remote");
    const foreign = segment(1, [insert(1, "x")], "remote");
    await store.put(foreign.key, foreign.bytes);
    await expect(node.outbox.checkStoreAgrees(store)).rejects.toThrow(/two nodes use the name "remote"/);
    node.close();
  });
});

describe("store unreachable", () => {
  it("keeps capturing while the store is down and ships everything once it is back", async () => {
    const down = new S3Store({ bucket: "b", endpoint: "http://127.0.0.1:9", forcePathStyle: true, maxAttempts: 1, credentials: { accessKeyId: "x", secretAccessKey: "y" } });
    const path = join(dir, "app.db");
    const app = appConnection(path);
    app.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v)");
    const node = openSync(path, "n1", down);
    app.prepare("INSERT INTO t VALUES (1, 'while down')").run();
    node.sealPending();
    await expect(node.upload()).rejects.toThrow(/127\.0\.0\.1:9/);
    await expect(node.pull("other")).rejects.toMatchObject({ name: "StoreUnavailableError" });
    expect(node.outbox.size().segments).toBe(1);
    node.close();
    // Back: the same sealed bytes go up.
    const again = openSync(path, "n1", store);
    await again.upload();
    expect(again.outbox.size().segments).toBe(0);
    const peer = freshNode("peer");
    await peer.pull("n1");
    expect(rows(peer)).toEqual([1]);
    again.close();
    peer.close();
    app.close();
  });
});

describe("store that hangs", () => {
  it("a store that accepts the connection and never answers fails the request (no hang)", async () => {
    const sockets: import("node:net").Socket[] = [];
    const silent = createServer((socket) => void sockets.push(socket)); // reads nothing, says nothing
    await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
    const port = (silent.address() as import("node:net").AddressInfo).port;
    const hung = new S3Store({ bucket: "b", endpoint: `http://127.0.0.1:${port}`, forcePathStyle: true, maxAttempts: 1, idleTimeoutMs: 300, credentials: { accessKeyId: "x", secretAccessKey: "y" } });
    try {
      const t0 = Date.now();
      await expect(hung.get("log/x")).rejects.toMatchObject({ name: "StoreUnavailableError" });
      expect(Date.now() - t0).toBeLessThan(5_000);
    } finally {
      for (const s of sockets) s.destroy();
      silent.close();
    }
  }, 20_000);
});

describe("configuration", () => {
  it("names the bad key", () => {
    const inst = join(dir, "inst");
    mkdirSync(inst);
    expect(() => loadConfig({ instanceDir: inst, store: "file:///x" }, undefined, { UNISYNC_POLL_MIN_MS: "soon" })).toThrow(/pollMinMs/);
    expect(() => loadConfig({ instanceDir: inst, store: "file:///x", node: "bad name!" }, undefined, {})).toThrow(/"node"/);
    writeFileSync(join(dir, "c.jsonc"), '{ "pollMaxMs": 10, "pollMinMs": 100 }');
    expect(() => loadConfig({ instanceDir: inst, store: "file:///x", node: "a" }, join(dir, "c.jsonc"), {})).toThrow(/pollMaxMs/);
    writeFileSync(join(dir, "d.jsonc"), '{ "pollMaxMS": 10 }');
    expect(() => loadConfig({ instanceDir: inst, store: "file:///x", node: "a" }, join(dir, "d.jsonc"), {})).toThrow(/unknown setting "pollMaxMS"/);
    writeFileSync(join(dir, "e.jsonc"), "{ not json");
    expect(() => loadConfig({ instanceDir: inst, store: "file:///x", node: "a" }, join(dir, "e.jsonc"), {})).toThrow(/not valid JSON/);
  });

  it("the CLI answers bad input with one clear line and exit code 2", () => {
    const cli = (...args: string[]) => spawnSync("node", ["bin/unisync.js", ...args], { encoding: "utf8", env: { ...process.env, UNISYNC_NODE: "t1" } });
    const inst = join(dir, "inst2");
    mkdirSync(inst);
    for (const args of [["run"], ["frobnicate"], ["run", inst, "ftp://nope"], ["run", inst, "file:///x", "--http-port", "many"], ["run", join(dir, "absent"), "file:///x"], ["status"], ["conflicts"], ["conflicts", join(dir, "absent")], ["verify", inst, join(dir, "absent")]]) {
      const r = cli(...args);
      expect(r.status, args.join(" ")).toBe(2);
      expect(r.stderr).toMatch(/^unisync: /);
      expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
    }
    // verify looks both ways: a database only in the other folder is a difference.
    const other = join(dir, "inst3");
    mkdirSync(other);
    expect(cli("verify", inst, other).stdout).toContain("neither folder holds a synced database");
    const made = new Database(join(other, "app.db"));
    made.exec("CREATE TABLE t(id INTEGER PRIMARY KEY)");
    made.close();
    const oneSided = cli("verify", inst, other);
    expect(oneSided.status).toBe(1);
    expect(oneSided.stdout).toContain(`app.db: missing in ${inst}`);
    expect(cli("run", "--help").stdout).toContain("Usage: unisync run");
    expect(execFileSync("node", ["bin/unisync.js", "--help"], { encoding: "utf8" })).toContain("Commands:");
  });

  it("refuses a database enrolled under another node name", () => {
    const node = freshNode("first");
    node.close();
    expect(() => openSync(join(dir, "first.db"), "second", store)).toThrow(/belongs to node "first"/);
  });
});

describe("clock drift", () => {
  it("holds back records from a node whose clock runs ahead until ours catches up", async () => {
    const path = join(dir, "drift.db");
    const app = appConnection(path);
    app.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v)");
    app.close();
    const node = openSync(path, "local", store, undefined, { maxClockDriftMs: 1000 });
    const ahead = (Date.now() + 2500) * 1024;
    const s = segment(1, [{ hlc: ahead, row: { table: "t", op: 1, columns: ["id", "v"], values: [1n, "from the future"], key: ["id"], changed: [] } }, insert(2, "now")]);
    await store.put(s.key, s.bytes);
    await node.pull("remote");
    expect(rows(node)).toEqual([2]);
    expect(node.parkedCount()).toBe(1);
    expect(node.cursors().get("remote")?.seq).toBe(1); // the log moves on; the record waits
    await new Promise((r) => setTimeout(r, 2000));
    node.retryParked();
    expect(rows(node)).toEqual([1, 2]);
    node.close();
  });
});
