// Reproduction (run after `npm run build`): node test/repro/upload-starves-other-databases.mjs
//
// Agent.uploadLoop calls DbSync.upload() for one database after the other, and
// upload() only returns once that database's outbox is EMPTY. When the store is
// slower than the app commits to one database (here: 30 ms per PUT, like a
// remote S3; one app commit every 10 ms to each of two databases), upload()
// never returns and the other database's segments are never uploaded at all.
// In crash.test.ts the same happened after an s3rver outage: b/app.db's outbox
// (430 segments) did not move for 20 s while b/audit.db was uploaded nonstop.
import Database from "better-sqlite3";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { Agent } from "../../dist/src/agent/agent.js";
import { loadConfig } from "../../dist/src/agent/config.js";
import { FileStore } from "../../dist/src/store/file.js";

const dir = mkdtempSync(join(tmpdir(), "upload-starve-"));
const inst = join(dir, "instance");
const { mkdirSync } = await import("node:fs");
mkdirSync(inst);
const apps = ["one.db", "two.db"].map((f) => {
  const db = new Database(join(inst, f));
  db.pragma("journal_mode = WAL");
  db.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v)");
  return db;
});
const files = new FileStore(join(dir, "store"));
const puts = new Map();
const slow = {
  description: "slow file store",
  requests: files.requests,
  putIfAbsent: (k, b) => files.putIfAbsent(k, b),
  async put(key, body, size) {
    await new Promise((r) => setTimeout(r, 30));
    if (key.startsWith("log/")) puts.set(key.split("/")[2], (puts.get(key.split("/")[2]) ?? 0) + 1);
    return files.put(key, body, size);
  },
  get: (k) => files.get(k), getStream: (k) => files.getStream(k), head: (k) => files.head(k),
  list: (p, o) => files.list(p, o), delete: (k) => files.delete(k),
};
const config = loadConfig({ instanceDir: inst, store: "file:///unused", node: "n1", httpPort: -1, captureIntervalMs: 20 }, undefined, {});
const agent = new Agent(config, slow, pino({ level: "silent" }));
await agent.start();
let i = 0;
const writer = setInterval(() => { i++; for (const db of apps) db.prepare("INSERT INTO t(v) VALUES (?)").run(i); }, 10);
await new Promise((r) => setTimeout(r, 8000));
clearInterval(writer);
const outbox = agent.status().databases.map((d) => `${d.stream}: ${d.outboxSegments} waiting`).join(", ");
console.log(`after 8 s: uploaded ${JSON.stringify(Object.fromEntries(puts))}; ${outbox}`);
const starved = ["one.db", "two.db"].some((s) => (puts.get(s) ?? 0) === 0);
console.log(starved ? "BUG: one database's outbox was never uploaded" : "OK: both databases uploaded");
await agent.stop();
process.exit(starved ? 1 : 0);
