/**
 * Capture overhead: what unisync's triggers cost the app's own writes.
 * An app-like writer (one commit per operation) inserts N rows, then updates
 * each once, into two databases: one without triggers, one where DbSync
 * installed them (refreshSchema, then closed: the triggers stay, nothing
 * drains). Both are in WAL mode, the mode the agent puts them in. The two are
 * written in alternating blocks of 100 operations so that noise from the rest
 * of the machine falls on both alike.
 * Clients: Python's sqlite3 (a real app) and better-sqlite3, each with
 * synchronous=FULL (SQLite's default: an fsync per commit, what an app gets
 * out of the box) and synchronous=NORMAL (no fsync per commit: CPU-bound,
 * the harshest view of the triggers' cost).
 * Value: mean time of one operation (execute + commit) with triggers;
 * baseline: the same without. Medians are in the JSON detail.
 */
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import Database from "better-sqlite3";
import { FileStore } from "../src/store/file.js";
import { createDb, ITEMS_SCHEMA, itemRow, median, openDbSync, result, ROOT, type Bench, type Ctx, type Result } from "./lib.js";

type Client = "python" | "bsqlite";
type Sync = "FULL" | "NORMAL";
type Mode = "without" | "with";
type Op = "insert" | "update";
/** Per mode: insert_mean_us, insert_median_us, update_mean_us, update_median_us. */
type Timing = Record<Mode, Record<`${Op}_${"mean" | "median"}_us`, number>>;

const BLOCK = 100;

function runBetterSqlite<M extends string>(paths: Record<M, string>, n: number, sync: Sync): Record<M, Timing[Mode]> {
  const modes = Object.keys(paths) as M[];
  const conns = Object.fromEntries(
    modes.map((m) => {
      const db = new Database(paths[m], { timeout: 30_000 });
      db.pragma(`synchronous = ${sync}`);
      return [
        m,
        {
          db,
          insert: db.prepare("INSERT INTO items(name, email, score, visits, avatar, created_at) VALUES (?, ?, ?, ?, ?, ?)"),
          update: db.prepare("UPDATE items SET name = ?, score = ?, visits = visits + 1 WHERE id = ?"),
        },
      ];
    }),
  ) as Record<M, { db: Database.Database; insert: Database.Statement; update: Database.Statement }>;
  const params: Record<Op, unknown[][]> = {
    insert: Array.from({ length: n }, (_, k) => itemRow(k + 1).slice(1)),
    update: Array.from({ length: n }, (_, k) => [`renamed-${String(k + 1).padStart(7, "0")}`, ((k + 1) * 1.13) % 1000, k + 1]),
  };
  const times = Object.fromEntries(modes.map((m) => [m, { insert: [] as number[], update: [] as number[] }])) as Record<M, Record<Op, number[]>>;
  for (const op of ["insert", "update"] as Op[]) {
    for (let b = 0, start = 0; start < n; b++, start += BLOCK) {
      for (const m of b % 2 === 0 ? modes : [...modes].reverse()) {
        const stmt = conns[m][op];
        const out = times[m][op];
        for (const p of params[op].slice(start, start + BLOCK)) {
          const t = performance.now();
          stmt.run(p); // autocommit: one transaction per statement
          out.push(performance.now() - t);
        }
      }
    }
  }
  for (const m of modes) conns[m].db.close();
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  const summary = (m: M) => ({
    insert_mean_us: mean(times[m].insert) * 1000,
    insert_median_us: median(times[m].insert) * 1000,
    update_mean_us: mean(times[m].update) * 1000,
    update_median_us: median(times[m].update) * 1000,
  });
  return Object.fromEntries(modes.map((m) => [m, summary(m)])) as Record<M, Timing[Mode]>;
}

/**
 * The floor of any trigger-based capture: a trigger that writes one narrow row
 * into a side table, nothing else. What it costs over no trigger is the second
 * B-tree page each commit writes to the WAL, which unisync's triggers pay too.
 */
function prepareBare(dir: string, name: string): string {
  const path = join(dir, `${name}.db`);
  createDb(path, ITEMS_SCHEMA);
  const db = new Database(path);
  db.exec(
    "CREATE TABLE side(id INTEGER PRIMARY KEY, v); " +
      "CREATE TRIGGER side_ins AFTER INSERT ON items BEGIN INSERT INTO side(v) VALUES (NEW.id); END; " +
      "CREATE TRIGGER side_upd AFTER UPDATE ON items BEGIN INSERT INTO side(v) VALUES (NEW.id); END",
  );
  db.close();
  return path;
}

function runPython(paths: Record<Mode, string>, n: number, sync: Sync): Timing {
  const out = execFileSync("/usr/bin/python3", [join(ROOT, "bench", "capture_app.py"), paths.without, paths.with, String(n), sync, String(BLOCK)], {
    encoding: "utf8",
  });
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
    const rounds = ctx.quick ? 1 : 3;
    const dir = ctx.tmp("capture");
    const results: Result[] = [];
    let k = 0;
    for (const client of ["python", "bsqlite"] as Client[]) {
      for (const sync of ["FULL", "NORMAL"] as Sync[]) {
        const runs: Timing[] = [];
        for (let r = 0; r < rounds; r++) {
          const paths = { without: prepare(dir, `${k}-without`, false), with: prepare(dir, `${k}-with`, true) };
          k++;
          runs.push(client === "python" ? runPython(paths, n, sync) : runBetterSqlite(paths, n, sync));
          const captured = changesCaptured(paths.with);
          if (captured !== 2 * n) throw new Error(`expected ${2 * n} captured changes, found ${captured}`);
        }
        const agg = (m: Mode, op: Op, stat: "mean" | "median") => {
          const xs = runs.map((t) => t[m][`${op}_${stat}_us`]);
          return stat === "mean" ? xs.reduce((a, b) => a + b, 0) / xs.length : median(xs);
        };
        ctx.log(
          `capture ${client} sync=${sync}: ` +
            (["insert", "update"] as Op[])
              .map((op) => `${op} mean ${agg("without", op, "mean").toFixed(1)} -> ${agg("with", op, "mean").toFixed(1)} us, median ${agg("without", op, "median").toFixed(1)} -> ${agg("with", op, "median").toFixed(1)} us`)
              .join("; "),
        );
        for (const op of ["insert", "update"] as Op[]) {
          results.push(
            result({
              name: `capture.${client}.${sync.toLowerCase()}.${op}`,
              value: agg("with", op, "mean"),
              unit: "us/op",
              baseline: agg("without", op, "mean"),
              baselineLabel: "no triggers",
              target: { on: "ratio", op: "<=", limit: 1.5 },
              detail: {
                n,
                rounds,
                block: BLOCK,
                medianWithUs: agg("with", op, "median"),
                medianWithoutUs: agg("without", op, "median"),
                medianRatio: agg("with", op, "median") / agg("without", op, "median"),
                runs,
              },
            }),
          );
        }
      }
    }
    // The floor: no-trigger, unisync's triggers and a bare one-row trigger, side by side.
    const floors: Record<"without" | "with" | "bare", Timing[Mode]>[] = [];
    for (let r = 0; r < rounds; r++, k++) {
      floors.push(runBetterSqlite({ without: prepare(dir, `${k}-fw`, false), with: prepare(dir, `${k}-fu`, true), bare: prepareBare(dir, `${k}-fb`) }, n, "NORMAL"));
    }
    for (const op of ["insert", "update"] as Op[]) {
      const mean = (m: "without" | "with" | "bare") => floors.reduce((a, f) => a + f[m][`${op}_mean_us`], 0) / floors.length;
      ctx.log(`capture floor bsqlite sync=NORMAL ${op}: none ${mean("without").toFixed(1)}, bare trigger ${mean("bare").toFixed(1)}, unisync ${mean("with").toFixed(1)} us`);
      results.push(
        result({
          name: `capture.floor.normal.${op}`,
          value: mean("bare"),
          unit: "us/op",
          baseline: mean("without"),
          baselineLabel: "no triggers",
          detail: { n, rounds, unisyncUs: mean("with"), unisyncOverBare: mean("with") / mean("bare"), floors },
        }),
      );
    }
    return results;
  },
};
