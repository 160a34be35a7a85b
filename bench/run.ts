/**
 * unisync benchmarks: `npm run bench [-- --quick | --full] [--only NAME[,NAME]] [--keep]`.
 * Prints a table (stdout; progress goes to stderr) and writes bench/last-run.json.
 *   --quick  small sizes, for a smoke run (folder: 1,000 small files, 32 MB large file)
 *   --full   1M rows for replay, catchup, rss and bootstrap (default 200k)
 *   --only   run only these benchmarks: capture, replay, catchup, collide, latency, tailing, rss, folder, bootstrap, secure
 *   --keep   keep the temporary folders (agent logs, databases)
 */
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import Database from "better-sqlite3";
import { bootstrap } from "./bootstrap.js";
import { capture } from "./capture.js";
import { collide } from "./collide.js";
import { folder } from "./folder.js";
import { latency } from "./latency.js";
import { makeTmpFactory, ROOT, type Bench, type Result, type Target } from "./lib.js";
import { replay } from "./replay.js";
import { catchup } from "./catchup.js";
import { rss } from "./rss.js";
import { secure } from "./secure.js";
import { tailing } from "./tailing.js";

const BENCHES: Bench[] = [capture, replay, catchup, collide, latency, tailing, rss, folder, bootstrap, secure];

function fmt(x: number | undefined): string {
  if (x === undefined) return "";
  if (!Number.isFinite(x)) return String(x);
  const a = Math.abs(x);
  if (a >= 1000) return Math.round(x).toLocaleString("en-US");
  if (a >= 100) return x.toFixed(0);
  if (a >= 10) return x.toFixed(1);
  return x.toFixed(2);
}

function fmtTarget(t: Target | undefined, unit: string): string {
  if (!t) return "";
  return t.on === "ratio" ? `ratio ${t.op} ${t.limit}` : `${t.op} ${t.limit} ${unit}`;
}

export function table(results: Result[]): string {
  const head = ["name", "value", "unit", "baseline", "(baseline is)", "ratio", "target", "pass"];
  const rows = results.map((r) => [
    r.name,
    fmt(r.value),
    r.unit,
    fmt(r.baseline),
    r.baselineLabel ?? "",
    r.ratio === undefined ? "" : `${r.ratio.toFixed(2)}x`,
    fmtTarget(r.target, r.unit),
    r.pass === undefined ? "-" : r.pass ? "PASS" : "FAIL",
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const right = new Set([1, 3, 5]);
  const line = (cells: string[]) => cells.map((c, i) => (right.has(i) ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join("  ").trimEnd();
  return [line(head), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}

function environment() {
  const mem = new Database(":memory:");
  const bsqlite = mem.prepare("SELECT sqlite_version()").pluck().get() as string;
  mem.close();
  let python = "unknown";
  try {
    python = execFileSync("/usr/bin/python3", ["-c", "import sqlite3, sys; print(sys.version.split()[0], sqlite3.sqlite_version)"], { encoding: "utf8" }).trim();
  } catch {
    // no python
  }
  let commit = "unknown";
  try {
    commit = execFileSync("git", ["-C", ROOT, "rev-parse", "--short", "HEAD"], { encoding: "utf8" }).trim();
    const dirty = execFileSync("git", ["-C", ROOT, "status", "--porcelain", "--", "src"], { encoding: "utf8" }).trim();
    if (dirty) commit += " (src/ has uncommitted changes)";
  } catch {
    // not a git checkout
  }
  return {
    date: new Date().toISOString(),
    commit,
    nproc: os.availableParallelism(),
    cpu: os.cpus()[0]?.model ?? "unknown",
    memGb: Math.round(os.totalmem() / 2 ** 30),
    kernel: os.release(),
    node: process.version,
    betterSqlite3Sqlite: bsqlite,
    python: `python ${python.split(" ")[0]}, sqlite3 ${python.split(" ")[1] ?? "?"}`,
  };
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: { quick: { type: "boolean" }, full: { type: "boolean" }, only: { type: "string" }, keep: { type: "boolean" } },
    strict: true,
  });
  const only = values.only?.split(",").map((s) => s.trim()).filter(Boolean);
  const unknown = only?.filter((n) => !BENCHES.some((b) => b.name === n)) ?? [];
  if (unknown.length) {
    console.error(`unknown benchmark(s): ${unknown.join(", ")}; known: ${BENCHES.map((b) => b.name).join(", ")}`);
    return 2;
  }
  const selected = BENCHES.filter((b) => !only || only.includes(b.name));
  const env = environment();
  const mode = values.quick ? "quick" : values.full ? "full" : "default";
  const { tmp, cleanup } = makeTmpFactory(Boolean(values.keep));
  const ctx = {
    quick: Boolean(values.quick),
    full: Boolean(values.full),
    keep: Boolean(values.keep),
    log: (msg: string) => process.stderr.write(`  ${msg}\n`),
    tmp,
  };
  console.error(`unisync bench (${mode}) on ${env.nproc} CPU, node ${env.node}, SQLite ${env.betterSqlite3Sqlite} (better-sqlite3), ${env.python}`);
  if (os.loadavg()[0] > 1) {
    console.error(`note: 1-min load average is ${os.loadavg()[0].toFixed(2)} before starting; other work on this ${env.nproc}-CPU machine will skew the results`);
  }
  const results: Result[] = [];
  const timings: Record<string, number> = {};
  /** 1-minute load average before and after each benchmark: other work on the machine skews results. */
  const load: Record<string, [number, number]> = {};
  let crashed = 0;
  const started = performance.now();
  try {
    for (const b of selected) {
      console.error(`[${b.name}] ${b.title}`);
      const t = performance.now();
      const loadBefore = os.loadavg()[0];
      try {
        results.push(...(await b.run(ctx)));
      } catch (err) {
        crashed++;
        console.error(`[${b.name}] FAILED: ${(err as Error).stack ?? String(err)}`);
        results.push({ name: `${b.name}.error`, value: NaN, unit: "", pass: false, detail: { error: (err as Error).message } });
      }
      timings[b.name] = (performance.now() - t) / 1000;
      load[b.name] = [loadBefore, os.loadavg()[0]];
      console.error(`[${b.name}] done in ${timings[b.name].toFixed(1)} s (load ${load[b.name].map((x) => x.toFixed(2)).join(" -> ")})`);
    }
  } finally {
    cleanup();
  }
  const totalS = (performance.now() - started) / 1000;
  const withTarget = results.filter((r) => r.pass !== undefined);
  console.log(`unisync bench, ${mode} sizes, ${env.date}, commit ${env.commit}`);
  console.log(`machine: ${env.nproc} CPU (${env.cpu}), ${env.memGb} GB, Linux ${env.kernel}; node ${env.node}; SQLite ${env.betterSqlite3Sqlite} (better-sqlite3), ${env.python}`);
  console.log("");
  console.log(table(results));
  console.log("");
  console.log(`${withTarget.filter((r) => r.pass).length} of ${withTarget.length} targets met; ${totalS.toFixed(0)} s total (${Object.entries(timings).map(([k, v]) => `${k} ${v.toFixed(0)} s`).join(", ")})`);
  console.log(`1-min load average before -> after: ${Object.entries(load).map(([k, [a, b]]) => `${k} ${a.toFixed(2)} -> ${b.toFixed(2)}`).join(", ")}`);
  const out = join(ROOT, "bench", "last-run.json");
  writeFileSync(out, JSON.stringify({ mode, args: process.argv.slice(2), environment: env, totalSeconds: totalS, timings, loadAverage: load, results }, null, 2) + "\n");
  console.error(`wrote ${out}`);
  return crashed > 0 ? 1 : 0;
}

process.exitCode = await main();
