/**
 * Folder sync, in process: ignore rules, path safety, the merge rule, and two or
 * three FolderSyncs sharing one FileStore (scan, upload, pull, write), including
 * crafted hostile segments that must be refused without writing anything.
 */
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { createHash, randomBytes } from "node:crypto";
import { chmodSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, unlinkSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import Database from "better-sqlite3";
import { compress } from "zstd-napi";
import { FolderSync } from "../src/stream/foldersync.js";
import { Metrics } from "../src/stream/metrics.js";
import { conflictName, decide, FileStateStore, KIND_DELETE, KIND_WRITE, MAX_CONFLICT_COPIES, type Version } from "../src/capture/filestate.js";
import { listExcluded } from "../src/capture/folder.js";
import { builtinExclusion, IgnoreRules, unsafePathReason } from "../src/capture/ignore.js";
import { blobKey, fetchBlobToFile, putBlobFromFile, uploadFile } from "../src/log/blobs.js";
import { queuedHasher } from "../src/log/hasher.js";
import { HybridClock } from "../src/log/hlc.js";
import { segmentKey } from "../src/log/keys.js";
import { sealSegment, type LogRecord } from "../src/log/segment.js";
import { FileStore } from "../src/store/file.js";
import type { ObjectStore } from "../src/store/store.js";

const log = pino({ level: "silent" });
const sha = (b: Buffer | string) => createHash("sha256").update(b).digest("hex");

describe("ignore rules (gitignore syntax)", () => {
  const cases: [string, string, boolean, boolean][] = [
    ["*.bak", "a/b/c.bak", false, true],
    ["*.bak", "c.bak", false, true],
    ["*.bak", "c.bak.txt", false, false],
    ["/top.txt", "top.txt", false, true],
    ["/top.txt", "sub/top.txt", false, false],
    ["build/", "build", true, true],
    ["build/", "build", false, false],
    ["build/", "x/build/y.txt", false, true],
    ["a/**/z", "a/z", false, true],
    ["a/**/z", "a/b/c/z", false, true],
    ["**/cache", "x/y/cache", true, true],
    ["docs/**", "docs/a/b.md", false, true],
    ["docs/**", "docs", true, false],
    ["f?o", "fao", false, true],
    ["f?o", "f/o", false, false],
    ["[abc].txt", "b.txt", false, true],
    ["[!abc].txt", "b.txt", false, false],
    ["[!abc].txt", "d.txt", false, true],
    ["[a-c]x", "bx", false, true],
    ["\\#hash", "#hash", false, true],
    ["a/*.txt", "a/b/c.txt", false, false],
  ];
  for (const [pattern, path, isDir, want] of cases) {
    it(`${pattern} ${want ? "matches" : "does not match"} ${path}${isDir ? "/" : ""}`, () => {
      expect(new IgnoreRules(pattern).ignores(path, isDir)).toBe(want);
    });
  }
  it("negation re-includes, but not inside an ignored folder; comments and blanks are skipped", () => {
    const r = new IgnoreRules("# comment\n\n*.json\n!keep.json\nsecret/\n!secret/open.json\n");
    expect(r.ignores("a/x.json", false)).toBe(true);
    expect(r.ignores("a/keep.json", false)).toBe(false);
    expect(r.ignores("secret/open.json", false)).toBe(true);
    expect(r.size).toBe(4);
  });
  it("built-in exclusions by name", () => {
    for (const p of ["app.db", "x/y.sqlite", "a.sqlite3", "app.db-wal", "app.db-shm", "app.db-journal", "data-wal", ".unisync/files.db", ".unisync/config.jsonc",
      "x/.unisync-tmp-123", "server.log", "logs/today.txt", "a.tmp", ".x.swp", "notes~", ".#lock", "desktop.ini", ".DS_Store", "Thumbs.db"]) {
      expect(builtinExclusion(p, false), p).not.toBeNull();
    }
    for (const p of ["a.json", "Seth Herod.json", "img/photo.JPG", "backup/x.bak", "dbnotes.txt"]) expect(builtinExclusion(p, false), p).toBeNull();
  });
});

describe("path safety", () => {
  it("refuses absolute, traversal, NUL, reserved and invalid names", () => {
    for (const p of ["/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "x\0y", "C:/x", "con", "a/NUL.txt", "COM1", "lpt9.log", "a<b", "a:b", "q?", "back\\slash", "dot.", "space ", ""]) {
      expect(unsafePathReason(p), JSON.stringify(p)).not.toBeNull();
    }
    for (const p of ["a/b c/d.txt", "Seth Herod.json", "seth herod.json", "ünï/cödé 🎉.txt", ".hidden", "console.txt", "icon.png"]) {
      expect(unsafePathReason(p), p).toBeNull();
    }
  });
});

describe("merge rule", () => {
  const v = (hlc: number, origin: string, kind: 1 | 2, base: [number, string], content = `${hlc}${origin}`): Version => ({
    path: "f.txt", hlc, origin, kind, baseHlc: base[0], baseOrigin: base[1], sha256: kind === KIND_WRITE ? sha(content) : "", size: 1, mode: 0o644, mtimeMs: 0, link: "", derived: false,
  });
  const perms = <T,>(xs: T[]): T[][] => (xs.length <= 1 ? [xs] : xs.flatMap((x, i) => perms([...xs.slice(0, i), ...xs.slice(i + 1)]).map((p) => [x, ...p])));

  it("concurrent edits: same winner and same losers in every order", () => {
    const base = v(100, "a", 1, [0, ""]);
    const e1 = v(200, "a", 1, [100, "a"]);
    const e2 = v(201, "b", 1, [100, "a"]);
    const e3 = v(202, "c", 1, [100, "a"]);
    const outcomes = new Set(perms([base, e1, e2, e3]).map((p) => {
      const d = decide(p);
      return `${d.winner?.origin}:${d.losers.map((l) => l.origin).sort().join(",")}`;
    }));
    expect([...outcomes]).toEqual(["c:a,b"]);
  });
  it("an edit that saw the previous version is not a conflict", () => {
    const d = decide([v(100, "a", 1, [0, ""]), v(200, "b", 1, [100, "a"]), v(300, "a", 1, [200, "b"])]);
    expect(d.winner?.hlc).toBe(300);
    expect(d.losers).toEqual([]);
  });
  it("edit vs delete keeps the edit, even when the delete is newer", () => {
    const d = decide([v(100, "a", 1, [0, ""]), v(200, "b", 1, [100, "a"]), v(300, "c", KIND_DELETE, [100, "a"])]);
    expect(d.winner?.origin).toBe("b");
    // A delete that saw the edit wins.
    expect(decide([v(100, "a", 1, [0, ""]), v(200, "b", 1, [100, "a"]), v(300, "c", KIND_DELETE, [200, "b"])]).winner?.kind).toBe(KIND_DELETE);
  });
  it("the same content written concurrently is no conflict", () => {
    const d = decide([v(100, "a", 1, [0, ""], "x"), v(101, "b", 1, [0, ""], "x")]);
    expect(d.losers).toEqual([]);
  });
  it("conflict copies are deduplicated by content and capped, identically in any arrival order", () => {
    // 16 concurrent edits from 16 nodes; two pairs share content.
    const edits = Array.from({ length: 16 }, (_, i) => v(1000 + i * 1024 * 1000, `n${String(i).padStart(2, "0")}`, 1, [0, ""], i === 3 ? "dup" : i === 9 ? "dup" : `c${i}`));
    const livePaths = (order: Version[]) => {
      const store = new FileStateStore(new Database(":memory:"));
      for (const e of order) {
        store.addVersion(e);
        store.recompute(e.path);
      }
      return (store.db.prepare("SELECT path FROM file_state WHERE kind <> ? AND path LIKE '%sync-conflict%' ORDER BY path").all(KIND_DELETE) as { path: string }[]).map((r) => r.path);
    };
    const forward = livePaths(edits);
    const backward = livePaths([...edits].reverse());
    expect(forward).toEqual(backward);
    expect(forward).toHaveLength(MAX_CONFLICT_COPIES);
    // The older of the two "dup" losers has no copy: the newer one stands for it.
    expect(forward.some((p) => p.includes("-n03"))).toBe(false);
  });

  it("two losing edits from one node in the same second get a copy each, identical in any arrival order", () => {
    // a writes f.txt twice within one second; b, which saw neither, writes it later and wins.
    const second = Date.UTC(2026, 11, 7, 11, 27, 13) * 1024;
    const a1 = v(second + 183 * 1024, "a", 1, [0, ""]);
    const a2 = v(second + 655 * 1024, "a", 1, [a1.hlc, "a"]);
    const b = v(second + 900 * 1024, "b", 1, [0, ""]);
    const outcomes = new Set(perms([a1, a2, b]).map((order) => {
      const store = new FileStateStore(new Database(":memory:"));
      for (const e of order) {
        store.addVersion(e);
        store.recompute(e.path);
      }
      const live = store.db.prepare("SELECT path, sha256 FROM file_state WHERE kind <> ? ORDER BY path").all(KIND_DELETE) as { path: string; sha256: string }[];
      return JSON.stringify(live);
    }));
    expect(outcomes.size).toBe(1);
    const live = JSON.parse([...outcomes][0]!) as { path: string; sha256: string }[];
    expect(live.map((f) => f.sha256).sort()).toEqual([a1, a2, b].map((x) => x.sha256).sort());
    expect(live.filter((f) => f.path.split(".sync-conflict-").length > 2)).toEqual([]); // no copy of a copy
  });

  it("conflict copy names are readable and deterministic", () => {
    const hlc = Date.UTC(2024, 0, 2, 3, 4, 5) * 1024 + 7;
    expect(conflictName("team/Seth Herod.json", hlc, "n2")).toBe("team/Seth Herod.sync-conflict-20240102-030405.000.7-n2.json");
    expect(conflictName("Makefile", hlc, "n1")).toBe("Makefile.sync-conflict-20240102-030405.000.7-n1");
    expect(conflictName(".env", hlc + 42 * 1024 - 7, "n1")).toBe(".env.sync-conflict-20240102-030405.042-n1");
  });
});

// ---------------------------------------------------------------------------

let root: string;
let store: FileStore;
const nodes: FolderSync[] = [];

function node(name: string, opts: { stableMs?: number; maxClockDriftMs?: number; watch?: boolean; watcher?: "fswatch" | "chokidar"; rescanMs?: number; enrolFirst?: boolean } = {}): FolderSync {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  const f = new FolderSync({
    instanceDir: dir, node: name, store, clock: new HybridClock(), log, metrics: new Metrics(), openDbs: () => new Set(),
    maxRecords: 1000, captureIntervalMs: 20, rescanMs: opts.rescanMs ?? 1000, stableMs: opts.stableMs ?? 0, watch: opts.watch ?? false,
    watcher: opts.watcher, maxClockDriftMs: opts.maxClockDriftMs, enrolFirst: opts.enrolFirst,
  });
  nodes.push(f);
  return f;
}

async function sync(all: FolderSync[], rounds = 3): Promise<void> {
  const names = all.map((f) => f.o_node);
  for (let r = 0; r < rounds; r++) {
    for (const f of all) {
      await f.scanOnce();
      await f.upload();
    }
    for (const f of all) for (const other of names) if (other !== f.o_node) await f.pull(other);
  }
}

/** Every synced file under dir: path → sha256 + mode (or link target). */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string, rel: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (r === ".unisync") continue;
      const p = join(d, e.name);
      if (e.isSymbolicLink()) out[r] = `link:${readlinkSync(p)}`;
      else if (e.isDirectory()) walk(p, r);
      else out[r] = `${sha(readFileSync(p))}:${(statSync(p).mode & 0o777).toString(8)}`;
    }
  };
  walk(dir, "");
  return out;
}

beforeEach(() => {
  root = mkdtempSync(join(tmpdir(), "unisync-folder-"));
  store = new FileStore(join(root, "store"));
});

afterEach(async () => {
  for (const f of nodes.splice(0)) {
    await f.stop();
    f.close();
  }
  rmSync(root, { recursive: true, force: true });
});

// FolderSync keeps its options private; the tests need the node name.
declare module "../src/stream/foldersync.js" {
  interface FolderSync {
    readonly o_node: string;
  }
}
Object.defineProperty(FolderSync.prototype, "o_node", { get(this: { o: { node: string } }) { return this.o.node; } });

describe("folder sync between nodes (file store)", () => {
  it("a pull that fails part way does not count as read to the end (enrolment must not finish on it)", async () => {
    const a = node("a");
    writeFileSync(join(root, "a", "one.txt"), "one");
    await sync([a]);
    const b = node("b", { enrolFirst: true });
    await b.pull("a");
    expect(b.caughtUp(["a"])).toBe(true);
    writeFileSync(join(root, "a", "two.txt"), "two");
    await sync([a]);
    const list = store.list;
    store.list = () => Promise.reject(new Error("store unreachable"));
    try {
      await expect(b.pull("a")).rejects.toThrow("store unreachable");
    } finally {
      store.list = list;
    }
    expect(b.caughtUp(["a"])).toBe(false);
    await b.pull("a");
    expect(b.caughtUp(["a"])).toBe(true);
    expect(readFileSync(join(root, "b", "two.txt"), "utf8")).toBe("two");
  });

  it("a node that starts from a backup of the folder brings back nothing deleted or changed since, and sends its own new files", async () => {
    const a = node("a");
    const A = join(root, "a");
    const B = join(root, "b");
    mkdirSync(join(A, "docs"), { recursive: true });
    for (const f of ["docs/gone.txt", "docs/amended.txt", "docs/kept.txt"]) writeFileSync(join(A, f), `first ${f}`);
    writeFileSync(join(A, "big-gone.bin"), randomBytes(2_000_000)); // large: stored as it is read
    await sync([a]);
    // Last night's backup of a's folder becomes b's folder.
    mkdirSync(join(B, "docs"), { recursive: true });
    for (const f of ["docs/gone.txt", "docs/amended.txt", "docs/kept.txt", "big-gone.bin"]) writeFileSync(join(B, f), readFileSync(join(A, f)));
    writeFileSync(join(B, "docs/b-own.txt"), "written on b before unisync ran there");
    // Since the backup, a deleted two files and amended one.
    unlinkSync(join(A, "docs/gone.txt"));
    unlinkSync(join(A, "big-gone.bin"));
    writeFileSync(join(A, "docs/amended.txt"), "second");
    await sync([a]);
    const b = node("b", { enrolFirst: true });
    expect(b.enrolling).toBe(true);
    // Before the cluster's log is in, b sends none of its files (it cannot tell stale from new).
    await b.scanOnce();
    expect(b.outbox.nextSeq()).toBe(1);
    await b.pull("a");
    expect(b.caughtUp(["a"])).toBe(true);
    b.finishEnrolment();
    await sync([a, b]);
    for (const dir of [A, B]) {
      expect(existsSync(join(dir, "docs/gone.txt")), dir).toBe(false);
      expect(existsSync(join(dir, "big-gone.bin")), dir).toBe(false);
      expect(readFileSync(join(dir, "docs/amended.txt"), "utf8"), dir).toBe("second");
      expect(readFileSync(join(dir, "docs/kept.txt"), "utf8"), dir).toBe("first docs/kept.txt");
      expect(readFileSync(join(dir, "docs/b-own.txt"), "utf8"), dir).toBe("written on b before unisync ran there");
    }
    expect(snapshot(B)).toEqual(snapshot(A));
  });

  it("creates, modifies, renames and deletes nested, Unicode and case-variant files; no echo", async () => {
    const a = node("a");
    const b = node("b");
    const A = join(root, "a");
    const B = join(root, "b");
    mkdirSync(join(A, "teams/Blue Team/chat"), { recursive: true });
    writeFileSync(join(A, "teams/Blue Team/config.json"), '{"x":1}');
    writeFileSync(join(A, "teams/Blue Team/chat/Seth Herod.json"), "upper");
    writeFileSync(join(A, "teams/Blue Team/chat/seth herod.json"), "lower");
    writeFileSync(join(A, "ünï cödé 🎉.txt"), "unicode");
    const bin = randomBytes(300_000);
    writeFileSync(join(A, "photo.jpg"), bin);
    writeFileSync(join(A, "script.sh"), "#!/bin/sh\necho hi\n");
    chmodSync(join(A, "script.sh"), 0o755);
    writeFileSync(join(A, "big.txt"), "compressible ".repeat(100_000));
    utimesSync(join(A, "config-old.txt").replace("config-old.txt", "photo.jpg"), 1_600_000_000, 1_600_000_000);
    symlinkSync("teams/Blue Team/config.json", join(A, "current.json"));
    symlinkSync("/etc/passwd", join(A, "escape"));
    writeFileSync(join(A, "app.db"), "not even sqlite but named so");
    writeFileSync(join(A, "server.log"), "log");
    await sync([a, b]);
    const sa = snapshot(A);
    delete sa["escape"];
    delete sa["app.db"];
    delete sa["server.log"];
    expect(snapshot(B)).toEqual(sa);
    expect(statSync(join(B, "photo.jpg")).mtimeMs).toBe(1_600_000_000_000);
    expect(existsSync(join(B, "escape"))).toBe(false);
    expect(existsSync(join(B, "app.db"))).toBe(false);
    // The compressible blob is stored compressed, under its raw hash.
    const bigSha = sha(readFileSync(join(A, "big.txt")));
    expect((await store.head(blobKey(bigSha)))!.size).toBeLessThan(100_000);

    // No echo: a rescan on B seals nothing, and A applies nothing new.
    const seqB = b.outbox.nextSeq();
    await b.scanOnce();
    await b.scanOnce();
    expect(b.outbox.nextSeq()).toBe(seqB);
    expect(b.outbox.nextSeq()).toBe(1);

    // modify on B, rename and delete on A
    writeFileSync(join(B, "teams/Blue Team/config.json"), '{"x":2}');
    await new Promise((r) => setTimeout(r, 5));
    writeFileSync(join(A, "renamed 🎉.txt"), readFileSync(join(A, "ünï cödé 🎉.txt")));
    unlinkSync(join(A, "ünï cödé 🎉.txt"));
    rmSync(join(A, "teams/Blue Team/chat"), { recursive: true });
    await sync([a, b]);
    const sb = snapshot(B);
    expect(snapshot(A)["teams/Blue Team/config.json"]).toBe(sb["teams/Blue Team/config.json"]);
    expect(readFileSync(join(A, "teams/Blue Team/config.json"), "utf8")).toBe('{"x":2}');
    expect(existsSync(join(B, "teams/Blue Team/chat"))).toBe(false); // emptied folders go too
    expect(existsSync(join(B, "ünï cödé 🎉.txt"))).toBe(false);
    expect(readFileSync(join(B, "renamed 🎉.txt"), "utf8")).toBe("unicode");

    // Deletes do not come back: more scans and pulls change nothing.
    const before = [a.outbox.nextSeq(), b.outbox.nextSeq()];
    await sync([a, b]);
    expect([a.outbox.nextSeq(), b.outbox.nextSeq()]).toEqual(before);
    expect(existsSync(join(A, "teams/Blue Team/chat"))).toBe(false);
  });

  it("concurrent edits converge to one winner and identical conflict copies; edit beats delete", async () => {
    const [a, b, c] = [node("a"), node("b"), node("c")];
    const dirs = ["a", "b", "c"].map((n) => join(root, n));
    writeFileSync(join(dirs[0]!, "shared.txt"), "v0");
    writeFileSync(join(dirs[0]!, "doomed.txt"), "d0");
    await sync([a, b, c]);
    // All three edit shared.txt without seeing each other; b deletes doomed.txt while c edits it.
    writeFileSync(join(dirs[0]!, "shared.txt"), "from a");
    writeFileSync(join(dirs[1]!, "shared.txt"), "from b");
    writeFileSync(join(dirs[2]!, "shared.txt"), "from c");
    unlinkSync(join(dirs[1]!, "doomed.txt"));
    writeFileSync(join(dirs[2]!, "doomed.txt"), "edited by c");
    for (const f of [a, b, c]) {
      await f.scanOnce();
      await f.upload();
    }
    await sync([c, a, b]);
    const snaps = dirs.map(snapshot);
    expect(snaps[1]).toEqual(snaps[0]);
    expect(snaps[2]).toEqual(snaps[0]);
    const copies = Object.keys(snaps[0]!).filter((p) => p.includes(".sync-conflict-"));
    expect(copies).toHaveLength(2);
    const contents = [readFileSync(join(dirs[0]!, "shared.txt"), "utf8"), ...copies.map((p) => readFileSync(join(dirs[0]!, p), "utf8"))].sort();
    expect(contents).toEqual(["from a", "from b", "from c"]);
    expect(readFileSync(join(dirs[1]!, "doomed.txt"), "utf8")).toBe("edited by c");
    // Conflict copies are not logged by anyone, and stay put.
    const seqs = [a, b, c].map((f) => f.outbox.nextSeq());
    await sync([a, b, c]);
    expect([a, b, c].map((f) => f.outbox.nextSeq())).toEqual(seqs);
  });

  it("never reads an unstable file, never syncs SQLite files (by name or header)", async () => {
    const a = node("a", { stableMs: 400 });
    const b = node("b");
    const A = join(root, "a");
    const db = new Database(join(A, "hidden-database.bin"));
    db.exec("CREATE TABLE t(x); INSERT INTO t VALUES (1)");
    db.close();
    const live = new Database(join(A, "live.sqlite"));
    live.pragma("journal_mode = WAL");
    live.exec("CREATE TABLE t(x); INSERT INTO t VALUES (1)");
    writeFileSync(join(A, "fresh.txt"), "just written");
    await a.scanOnce();
    await a.upload();
    await b.pull("a");
    expect(a.outbox.nextSeq()).toBe(1); // fresh.txt is not stable yet
    await new Promise((r) => setTimeout(r, 450));
    await a.scanOnce();
    await a.upload();
    await b.pull("a");
    expect(readdirSync(join(root, "b")).filter((n) => n !== ".unisync")).toEqual(["fresh.txt"]);
    const excluded = await listExcluded(A);
    live.close();
    expect(excluded.map((e) => e.path).sort()).toEqual(["hidden-database.bin", "live.sqlite", "live.sqlite-shm", "live.sqlite-wal"]);
  });

  it("holds back mass deletes when the folder is suddenly emptied", async () => {
    const a = node("a");
    const b = node("b");
    const A = join(root, "a");
    for (let i = 0; i < 12; i++) writeFileSync(join(A, `f${i}.txt`), `${i}`);
    await sync([a, b]);
    for (let i = 0; i < 12; i++) unlinkSync(join(A, `f${i}.txt`));
    await sync([a, b]);
    expect(a.massDelete).toMatch(/vanished at once/);
    expect(readdirSync(join(root, "b")).filter((n) => n.endsWith(".txt"))).toHaveLength(12);
    // Deleting a few is fine.
    const b2 = join(root, "b");
    unlinkSync(join(b2, "f1.txt"));
    await sync([a, b]);
    expect(existsSync(join(b2, "f1.txt"))).toBe(false);
  });
});

describe("folder sync at volume and over time", () => {
  it("writes many files in batches, across folders, with no echo and nothing left pending", async () => {
    const a = node("a");
    const b = node("b");
    const A = join(root, "a");
    const want: Record<string, string> = {};
    for (let d = 0; d < 5; d++) {
      mkdirSync(join(A, `in box/d${d}/deep`), { recursive: true });
      for (let i = 0; i < 130; i++) {
        const rel = `in box/d${d}/${i % 3 ? "" : "deep/"}f${i}.json`;
        const body = randomBytes(100 + (i % 5) * 3000).toString("base64");
        writeFileSync(join(A, rel), body);
        want[rel] = sha(body);
      }
    }
    await sync([a, b], 2);
    const sb = snapshot(join(root, "b"));
    expect(Object.keys(sb).length).toBe(Object.keys(want).length);
    for (const [rel, h] of Object.entries(want)) expect(sb[rel]?.split(":")[0], rel).toBe(h);
    expect(b.pendingChanges()).toBe(0);
    expect(b.outbox.nextSeq()).toBe(1); // nothing it wrote was captured again
    expect(a.outbox.nextSeq()).toBe(2); // 650 records in one segment, not one per file
  });

  it("parks file records from a clock too far ahead until ours catches up", async () => {
    const b = node("b", { maxClockDriftMs: 200 });
    await store.put(blobKey(sha("later")), Buffer.from("later"));
    await store.put(blobKey(sha("now")), Buffer.from("now"));
    const file = (path: string, body: string, hlc: number): LogRecord => ({ hlc, file: { path, kind: 1, size: body.length, mode: 0o644, mtimeMs: Date.now(), sha256: sha(body) } });
    const { bytes, sha256 } = sealSegment({
      origin: "fast", stream: ".files", seq: 1, createdMs: Date.now(),
      records: [file("later.txt", "later", (Date.now() + 1500) * 1024), file("now.txt", "now", Date.now() * 1024)],
    });
    await store.put(segmentKey("fast", ".files", 1, sha256), bytes);
    await b.pull("fast");
    const B = join(root, "b");
    expect(readFileSync(join(B, "now.txt"), "utf8")).toBe("now");
    expect(existsSync(join(B, "later.txt"))).toBe(false);
    expect(b.parkedCount()).toBe(1);
    expect(b.cursor("fast").seq).toBe(1); // the stream goes on; only the record waits
    await new Promise((r) => setTimeout(r, 1400));
    await b.scanOnce();
    expect(readFileSync(join(B, "later.txt"), "utf8")).toBe("later");
    expect(b.parkedCount()).toBe(0);
  });

  it.each(["fswatch", "chokidar"] as const)("with the %s watcher: looks at reported paths only, including folders made right after start", async (watcher) => {
    const a = node("a", { watch: true, watcher, rescanMs: 60_000 });
    a.start();
    const A = join(root, "a");
    mkdirSync(join(A, "x/y/z"), { recursive: true });
    writeFileSync(join(A, "x/y/z/early.txt"), "early");
    const sealed = async (n: number) => {
      for (let t = 0; t < 150 && a.outbox.nextSeq() - 1 < n; t++) await new Promise((r) => setTimeout(r, 20));
      return a.outbox.nextSeq() - 1;
    };
    expect(await sealed(1)).toBeGreaterThanOrEqual(1);
    await new Promise((r) => setTimeout(r, 300));
    const before = a.outbox.nextSeq() - 1;
    writeFileSync(join(A, "x/y/z/early.txt"), "edited");
    expect(await sealed(before + 1)).toBe(before + 1); // well before the 60 s rescan
    // Excluded names are not captured; a folder made later is watched (a file in it, then an edit of it).
    writeFileSync(join(A, "x/y/z/scratch.tmp"), "ignored");
    mkdirSync(join(A, "later/deeper"), { recursive: true });
    writeFileSync(join(A, "later/deeper/new.txt"), "new");
    expect(await sealed(before + 2)).toBe(before + 2);
    await new Promise((r) => setTimeout(r, 300));
    writeFileSync(join(A, "later/deeper/new.txt"), "newer");
    expect(await sealed(before + 3)).toBe(before + 3);
    await new Promise((r) => setTimeout(r, 200));
    expect(a.outbox.nextSeq() - 1).toBe(before + 3); // scratch.tmp never sealed
  });
});

describe("hostile segments are refused without writing anything", () => {
  async function plant(records: LogRecord[], seq = 1): Promise<void> {
    const { bytes, sha256 } = sealSegment({ origin: "evil", stream: ".files", seq, createdMs: Date.now(), records });
    await store.put(segmentKey("evil", ".files", seq, sha256), bytes);
  }
  const rec = (path: string, extra: Partial<LogRecord["file"] & object> = {}, hlc = Date.now() * 1024): LogRecord => ({
    hlc, file: { path, kind: 1, size: 5, mode: 0o644, mtimeMs: Date.now(), sha256: sha("hello"), ...extra },
  });

  it("traversal, absolute path, reserved names, symlink escapes, bad and truncated blobs", async () => {
    const outside = join(root, "outside");
    mkdirSync(outside);
    const b = node("b");
    const B = join(root, "b");
    symlinkSync(outside, join(B, "linkdir"));
    await store.put(blobKey(sha("hello")), Buffer.from("hello"));
    // Blob whose bytes do not match its name, and one that is truncated, and one compressed but corrupt.
    const lie = sha("the truth");
    await store.put(blobKey(lie), Buffer.from("a lie...."));
    const cut = sha("0123456789");
    await store.put(blobKey(cut), Buffer.from("01234"));
    const bomb = sha("x".repeat(10));
    await store.put(blobKey(bomb), compress(Buffer.from("y".repeat(1_000_000))));
    await plant([
      rec("../escaped.txt"),
      rec("a/../../escaped.txt"),
      rec("/tmp/abs.txt"),
      rec(join(outside, "abs2.txt")),
      rec("NUL.txt"),
      rec("nul\0byte"),
      rec("linkdir/through-symlink.txt"),
      rec("evil-link", { kind: 3, linkTarget: "../outside", sha256: "" }),
      rec("evil-link2", { kind: 3, linkTarget: "/etc", sha256: "" }),
      rec("mismatch.txt", { sha256: lie, size: 9 }),
      rec("truncated.txt", { sha256: cut, size: 10 }),
      rec("bomb.txt", { sha256: bomb, size: 10 }),
      rec("app.db"),
      rec("app.db-wal"),
      rec(".unisync/files.db"),
      rec("ok.txt"),
    ]);
    await b.pull("evil");
    expect(readdirSync(outside)).toEqual([]);
    expect(existsSync(join(root, "escaped.txt"))).toBe(false);
    expect(existsSync("/tmp/abs.txt")).toBe(false);
    const files = readdirSync(B).filter((n) => n !== ".unisync").sort();
    expect(files).toEqual(["linkdir", "ok.txt"]);
    expect(readFileSync(join(B, "ok.txt"), "utf8")).toBe("hello");
    expect(lstatSync(join(B, "linkdir")).isSymbolicLink()).toBe(true);
    expect(b.refusedCount()).toBe(11);
    expect(b.parkedCount()).toBe(4); // through-symlink, mismatch, truncated, bomb: reported, retried, never written
    expect(readdirSync(B, { recursive: true }).filter((n) => String(n).includes(".unisync-tmp-"))).toEqual([]);
  });

  it("a large file is hashed on its way into the store, once, on either kind of store", async () => {
    const f = join(root, "large.bin");
    const data = randomBytes(3 * 1024 * 1024);
    writeFileSync(f, data);
    expect(await uploadFile(store, f)).toMatchObject({ sha256: sha(data), size: data.length });
    const stored = await store.get(blobKey(sha(data)));
    expect(stored?.equals(data)).toBe(true);
    expect(readdirSync(join(root, "store", "blobs")).filter((n) => n.startsWith(".tmp-"))).toEqual([]);
    // A store that cannot name an object after writing it (S3) hashes first, then streams once.
    const text = Buffer.from("compressible ".repeat(300_000));
    writeFileSync(f, text);
    const plain: ObjectStore = {
      description: "no putThenName", requests: store.requests, put: store.put.bind(store), putIfAbsent: store.putIfAbsent.bind(store), get: store.get.bind(store), getStream: store.getStream.bind(store),
      head: store.head.bind(store), list: store.list.bind(store), delete: store.delete.bind(store),
    };
    expect(await uploadFile(plain, f)).toMatchObject({ sha256: sha(text), size: text.length });
    expect((await store.head(blobKey(sha(text))))!.size).toBeLessThan(text.length / 10);
    mkdirSync(join(root, "out"));
    await fetchBlobToFile(store, sha(text), text.length, join(root, "out", "t"));
    expect(readFileSync(join(root, "out", "t")).equals(text)).toBe(true);
  });

  it("hashing queued beside the copy names a blob by exactly its bytes, whatever the size and slicing", async () => {
    // More chunks than are read ahead and queued, and a size that is no multiple of a chunk or a slice.
    const f = join(root, "odd.bin");
    const data = randomBytes(9 * 1024 * 1024 + 12_345);
    writeFileSync(f, data);
    expect(await uploadFile(store, f)).toMatchObject({ sha256: sha(data), size: data.length });
    expect((await store.get(blobKey(sha(data))))?.equals(data)).toBe(true);
    // The compressed path (FileStore) too.
    const text = Buffer.from("compressible, and longer than one chunk ".repeat(200_000));
    writeFileSync(f, text);
    expect(await uploadFile(store, f)).toMatchObject({ sha256: sha(text), size: text.length });
    await fetchBlobToFile(store, sha(text), text.length, join(root, "odd.out"));
    expect(readFileSync(join(root, "odd.out")).equals(text)).toBe(true);
    for (const slice of [1, 1000, 1 << 20]) {
      const h = queuedHasher(slice);
      for (let off = 0; off < 5000; off += 1700) {
        await h.room();
        h.update(data.subarray(off, Math.min(off + 1700, 5000)));
      }
      expect(await h.digest()).toBe(sha(data.subarray(0, 5000)));
      await expect(h.digest()).rejects.toThrow(/ended/);
    }
    expect(readdirSync(join(root, "store", "blobs")).filter((n) => n.startsWith(".tmp-"))).toEqual([]);
  });

  it("blob helpers verify while streaming", async () => {
    const f = join(root, "src.bin");
    const data = randomBytes(3 * 1024 * 1024);
    writeFileSync(f, data);
    mkdirSync(join(root, "out"), { recursive: true });
    expect(await putBlobFromFile(store, f, sha(data), data.length)).toBe("uploaded");
    expect(await putBlobFromFile(store, f, sha(data), data.length)).toBe("exists");
    await fetchBlobToFile(store, sha(data), data.length, join(root, "out", "x"));
    expect(readFileSync(join(root, "out", "x")).equals(data)).toBe(true);
    await expect(putBlobFromFile(store, f, sha("other"), data.length)).rejects.toThrow(/hashes to/);
    expect(await store.head(blobKey(sha("other")))).toBeNull();
  });
});
