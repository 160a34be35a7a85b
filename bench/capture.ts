/**
 * Capture overhead: what unisync's triggers cost the app's own writes.
 * An app-like writer (one commit per operation) inserts N rows, then updates
 * each once, on a database without triggers and on one where DbSync installed
 * them (refreshSchema, then closed: the triggers stay, nothing drains). Both
 * databases are in WAL mode, the mode the agent puts them in.
 * Clients: Python's sqlite3 (a real app) and better-sqlite3, each with
 * synchronous=FULL (SQLite's default: one fsync per commit, what an app gets
 * out of the box) and synchronous=NORMAL (no fsync per commit: CPU-bound,
 * the harshest view of the triggers' cost).
 */
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import Database from "better-sqlite3";
import { FileStore } from "../src/store/file.js";
import { createDb, ITEMS_SCHEMA, itemRow, median, openDbSync, result, ROOT, type Bench, type Ctx, type Result } from "./lib.js";

type Client = "python" | "bsqlite";
type Sync = "FULL" | "NORMAL";
interface Timing {
  insert_s: number;
  update_s: number;
}

function runBetterSqlite(path: string, n: number, sync: Sync): Timing {
  const db = new Database(path, { timeout: 30_000 });
  db.pragma(`synchronous = ${sync}`);
  const ins = db.prepare("INSERT INTO items(name, email, score, visits, avatar, created_at) VALUES (?, ?, ?, ?, ?, ?)");
  const upd = db.prepare("UPDATE items SET name = ?, score = ?, visits = visits + 1 WHERE id = ?");
  const inserts = Array.from({ length: n }, (_, k) => itemRow(k + 1).slice(1));
  const updates = Array.from({ length: n }, (_, k) => [`renamed-${String(k + 1).padStart(7, "0")}`, ((k + 1) * 1.13) % 1000, k + 1]);
  const t0 = performance.now();
  for (const r of inserts) ins.run(r); // autocommit: one transaction per statement
  const t1 = performance.now();
  for (const u of updates) upd.run(u);
  const t2 = performance.now();
  db.close();
  return { insert_s: (t1 - t0) / 1000, update_s: (t2 - t1) / 1000 };
}

function runPython(path: string, n: number, sync: Sync): Timing {
  const out = execFileSync("/usr/bin/python3", [join(ROOT, "bench", "capture_app.py"), path, String(n), sync], { encoding: "utf8" });
  return JSON.parse(out) as Timing;
}

function prepare(dir: string, name: string, withTriggers: boolean): string {
  const path = join(dir, `${name}.db`);
  createDb(path, ITEMS_SCHEMA);
  if (withTriggers) {
    const sync = openDbSync(path, "bench", new FileStore(join(dir, "store")));
    sync.refreshSchema();
    sync.close();
  }
  return path;
}

function changesCaptured(path: string): number {
  const db = new Database(path, { readonly: true });
  const n = (db.prepare("SELECT count(*) AS n FROM _unisync_changes").get() as { n: number }).n;
  db.close();
  return n;
}

export const capture: Bench = {
  name: "capture",
  title: "capture overhead (app writes, one commit per op, without vs with triggers)",
  async run(ctx: Ctx): Promise<Result[]> {
    const n = ctx.quick ? 500 : 5000;
    const rounds = 3;
    const dir = ctx.tmp("capture");
    const results: Result[] = [];
    let k = 0;
    for (const client of ["python", "bsqlite"] as Client[]) {
      for (const sync of ["FULL", "NORMAL"] as Sync[]) {
        const times: Record<"without" | "with", Timing[]> = { without: [], with: [] };
        for (let r = 0; r < rounds; r++) {
          // Alternate the order so drift (page cache, CPU frequency) hits both sides.
          const order = r % 2 === 0 ? (["without", "with"] as const) : (["with", "without"] as const);
          for (const mode of order) {
            const path = prepare(dir, `${client}-${sync}-${mode}-${k++}`, mode === "with");
            const t = client === "python" ? runPython(path, n, sync) : runBetterSqlite(path, n, sync);
            if (mode === "with") {
              const captured = changesCaptured(path);
              if (captured !== 2 * n) throw new Error(`expected ${2 * n} captured changes, found ${captured}`);
            }
            times[mode].push(t);
          }
        }
        ctx.log(
          `capture ${client} sync=${sync}: ` +
            (["without", "with"] as const)
              .map((m) => `${m} ins ${times[m].map((t) => ((t.insert_s / n) * 1e6).toFixed(1)).join("/")} upd ${times[m].map((t) => ((t.update_s / n) * 1e6).toFixed(1)).join("/")} us/op`)
              .join("; "),
        );
        for (const op of ["insert", "update"] as const) {
          const us = (m: "without" | "with") => median(times[m].map((t) => (op === "insert" ? t.insert_s : t.update_s) / n)) * 1e6;
          results.push(
            result({
              name: `capture.${client}.${sync.toLowerCase()}.${op}`,
              value: us("with"),
              unit: "us/op",
              baseline: us("without"),
              baselineLabel: "no triggers",
              target: { on: "ratio", op: "<=", limit: 1.5 },
              detail: { n, rounds, client, synchronous: sync, op, samples: times },
            }),
          );
        }
      }
    }
    return results;
  },
};
