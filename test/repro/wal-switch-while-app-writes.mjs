// Reproduction (run after `npm run build`): node test/repro/wal-switch-while-app-writes.mjs
//
// The agent finds a database still in rollback-journal mode while the app is in
// a write transaction. DbSync's constructor runs `PRAGMA journal_mode = WAL`,
// which SQLite fails at once with SQLITE_BUSY (the busy handler is not used for
// this lock), so the agent logs an ERROR "cannot sync this database: database
// is locked" (and leaks that connection); it only recovers at the next rescan.
// Seen in cluster.test.ts when flask_app.py creates audit.db beside a running agent.
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const cli = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "bin", "unisync.js");
const dir = mkdtempSync(join(tmpdir(), "wal-switch-"));
const inst = join(dir, "instance");
mkdirSync(inst);
const db = join(inst, "app.db");
// The app: creates app.db (rollback journal), then holds a write transaction for 3 s.
const app = spawn("/usr/bin/python3", ["-c", `
import sqlite3, time
c = sqlite3.connect('${db}', isolation_level=None)
c.execute('CREATE TABLE t(x)')
c.execute('BEGIN IMMEDIATE'); c.execute('INSERT INTO t VALUES (1)')
print('writing', flush=True); time.sleep(3); c.execute('COMMIT')`], { stdio: ["ignore", "pipe", "inherit"] });
await new Promise((r) => app.stdout.once("data", r));
const agent = spawn(process.execPath, [cli, "run", inst, pathToFileURL(join(dir, "store")).href, "--node", "n1", "--http-port", "off"], { stdio: ["ignore", "pipe", "inherit"] });
let out = "";
agent.stdout.on("data", (d) => (out += d));
await new Promise((r) => setTimeout(r, 2500));
agent.kill("SIGTERM");
await new Promise((r) => agent.once("exit", r));
const errors = out.split("\n").filter((l) => l.includes('"level":50'));
console.log(errors.join("\n") || "(no error lines)");
console.log(errors.length ? "BUG: an error for a transient lock the busy timeout should have waited out" : "OK");
process.exitCode = errors.length ? 1 : 0;
