/**
 * Folder sync end to end: three agent processes, one s3rver store. On all nodes
 * at once: create, modify, rename and delete text and binary files in nested
 * folders with spaces, Unicode and case variants, edit one file concurrently on
 * all three, while a live SQLite database is written. Afterwards every node's
 * folder is identical (path, bytes, mode), excluded files never left their node,
 * the conflict copies are the same everywhere, the database was never copied as
 * a file and opens fine on every node.
 *
 * KEEP_CLUSTER=1 keeps the folders and logs.
 */
import { describe, expect, it } from "vitest";
import { createHash, randomBytes } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, statSync, unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { clusterSuite, integrityCheck, type Cluster } from "./helpers/cluster.js";

const NODES = ["n1", "n2", "n3"];
const sha = (b: Buffer | string) => createHash("sha256").update(b).digest("hex");
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

const suite = clusterSuite();

interface FilesStatus {
  nextSeq: number;
  pendingChanges: number;
  outboxSegments: number;
  parked: number;
  refused: number;
  conflicts: number;
  massDelete?: string;
  cursors: Record<string, number>;
  problems: Record<string, string>;
}

async function filesNotQuiet(c: Cluster): Promise<string | null> {
  const st = new Map<string, FilesStatus>();
  for (const n of NODES) {
    const s = (await c.status(n)) as unknown as { files?: FilesStatus; storeError?: string };
    if (s.storeError) return `${n}: store error ${s.storeError}`;
    if (!s.files) return `${n}: no folder sync`;
    st.set(n, s.files);
  }
  for (const [n, f] of st) {
    if (f.pendingChanges || f.outboxSegments) return `${n}: ${f.pendingChanges} pending, ${f.outboxSegments} in outbox`;
    if (f.parked) return `${n}: ${f.parked} files cannot be written`;
    if (Object.keys(f.problems).length) return `${n}: ${JSON.stringify(f.problems)}`;
    for (const [o, of] of st) {
      if (o !== n && (f.cursors[o] ?? 0) !== of.nextSeq - 1) return `${n}: applied ${o} through ${f.cursors[o] ?? 0} of ${of.nextSeq - 1}`;
    }
  }
  return null;
}

async function waitFilesQuiet(c: Cluster, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let why: string | null = "not checked";
  let quietOnce = false;
  while (Date.now() < deadline) {
    why = await filesNotQuiet(c);
    if (why === null && quietOnce) return;
    quietOnce = why === null;
    await sleep(why === null ? 700 : 200);
  }
  throw new Error(`files not quiescent: ${why}\n${c.logTails()}`);
}

const EXCLUDED = (rel: string) =>
  rel === ".unisync" || rel.startsWith(".unisync/") || /\.(db|sqlite)(-wal|-shm|-journal)?$/.test(rel) || /\.(log|tmp|bak)$/.test(rel) || rel.startsWith("secret/") || rel === "secret";

/** path → sha256:mode of every synced file. */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string, rel: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (EXCLUDED(r)) continue;
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p, r);
      else out[r] = `${sha(readFileSync(p)).slice(0, 16)}:${(statSync(p).mode & 0o777).toString(8)}`;
    }
  };
  walk(dir, "");
  return out;
}

function write(path: string, data: string | Buffer): void {
  mkdirSync(join(path, ".."), { recursive: true });
  writeFileSync(path, data);
}

describe("folder sync: three agents, one s3 store", () => {
  it("converge to identical folders; exclusions stay home; conflicts copied identically; databases untouched", async (ctx) => {
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    const c = await suite.start(NODES, "files");
    const at = (n: string, rel = "") => c.instance(n, rel);

    // A live SQLite database on every node (synced row by row, never as a file).
    const dbs = NODES.map((n) => {
      const db = new Database(at(n, "app.db"));
      db.pragma("journal_mode = WAL");
      db.exec("CREATE TABLE IF NOT EXISTS notes(id TEXT PRIMARY KEY, body TEXT)");
      return db;
    });
    let writes = 0;
    const blobs = new Map<string, Buffer>();
    const writer = setInterval(() => {
      dbs.forEach((db, i) => db.prepare("INSERT INTO notes VALUES (?, ?)").run(`${NODES[i]}-${writes}`, "x".repeat(100)));
      writes++;
    }, 30);

    try {
      // Everyone ignores secret/ (identical .unisyncignore: concurrent, same content, no conflict).
      for (const n of NODES) write(at(n, ".unisyncignore"), "secret/\n*.bak\n");
      await sleep(600);

      // Phase 1: all nodes create at once.
      NODES.forEach((n, i) => {
        write(at(n, `teams/Team ${i}/config.json`), JSON.stringify({ team: i, node: n }));
        write(at(n, `uploads/photo ${n}.jpg`), (blobs.set(n, randomBytes(200_000 + i * 1000)), blobs.get(n)!));
        write(at(n, `plugins/ünï-cödé/🎉 ${n}.txt`), `unicode from ${n}\n`);
        write(at(n, `secret/${n}.key`), `secret of ${n}`);
        write(at(n, `server-${n}.log`), "a log line\n");
        write(at(n, `scratch-${n}.tmp`), "temp");
        write(at(n, `old-${n}.bak`), "backup");
      });
      write(at("n1", "chat/Seth Herod.json"), '{"who":"upper"}');
      write(at("n2", "chat/seth herod.json"), '{"who":"lower"}');
      write(at("n3", "shared/notes.md"), "# notes\nv0\n");
      write(at("n3", "shared/deep/er/folder/x.bin"), randomBytes(5000));
      await waitFilesQuiet(c, 60_000);

      // Phase 2: concurrent edit of one file on all three, plus modify / rename / delete / chmod.
      NODES.forEach((n) => write(at(n, "shared/notes.md"), `# notes\nedited on ${n}\n`));
      write(at("n1", "teams/Team 1/config.json"), JSON.stringify({ team: 1, edited: "n1" }));
      renameSync(at("n2", "uploads/photo n1.jpg"), at("n2", "uploads/renamed by n2.jpg"));
      unlinkSync(at("n3", "plugins/ünï-cödé/🎉 n2.txt"));
      unlinkSync(at("n3", "shared/deep/er/folder/x.bin"));
      chmodSync(at("n1", "teams/Team 0/config.json"), 0o600);
      await waitFilesQuiet(c, 60_000);
    } finally {
      clearInterval(writer);
    }
    await sleep(500);
    await waitFilesQuiet(c, 30_000);

    const snaps = NODES.map((n) => snapshot(at(n)));
    expect(snaps[1]).toEqual(snaps[0]);
    expect(snaps[2]).toEqual(snaps[0]);
    const s = snaps[0]!;
    expect(Object.keys(s)).toContain("chat/Seth Herod.json");
    expect(Object.keys(s)).toContain("chat/seth herod.json");
    expect(Object.keys(s)).toContain("uploads/renamed by n2.jpg");
    expect(Object.keys(s)).not.toContain("uploads/photo n1.jpg");
    expect(Object.keys(s)).not.toContain("plugins/ünï-cödé/🎉 n2.txt");
    expect(existsSync(at("n1", "shared/deep"))).toBe(false); // emptied folders removed
    expect(s["teams/Team 0/config.json"]!.endsWith(":600")).toBe(true);
    for (const n of NODES) expect(readFileSync(at(n, "uploads/renamed by n2.jpg")).equals(blobs.get("n1")!)).toBe(true);

    // One winner, two conflict copies, identical everywhere.
    const copies = Object.keys(s).filter((p) => p.startsWith("shared/notes.sync-conflict-"));
    expect(copies).toHaveLength(2);
    const versions = ["shared/notes.md", ...copies].map((p) => readFileSync(at("n1", p), "utf8")).sort();
    expect(versions).toEqual(NODES.map((n) => `# notes\nedited on ${n}\n`).sort());

    // Excluded files never left their node.
    for (const n of NODES) {
      for (const other of NODES.filter((o) => o !== n)) {
        for (const f of [`secret/${n}.key`, `server-${n}.log`, `scratch-${n}.tmp`, `old-${n}.bak`]) {
          expect(existsSync(at(other, f)), `${f} on ${other}`).toBe(false);
        }
      }
      expect(existsSync(at(n, `secret/${n}.key`))).toBe(true);
    }
    // The databases were synced row by row and open fine; never copied as files.
    for (const db of dbs) db.close();
    for (const n of NODES) {
      expect(integrityCheck(at(n, "app.db"))).toBe("ok");
      const statuses = (await c.status(n)) as unknown as { files: FilesStatus };
      expect(statuses.files.refused).toBe(0);
    }
    await c.waitForConvergence(NODES.map((n) => at(n, "app.db")), 60_000);
    expect(c.unexpectedExits).toEqual([]);
    expect(c.badLogLines()).toEqual([]);
  });
});
