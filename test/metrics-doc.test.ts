/**
 * deploy/METRICS.md documents every Prometheus metric the agent sets, with the
 * type it is rendered as, and the shipped alert rules and Grafana dashboard use
 * only metrics that exist.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";

const root = join(import.meta.dirname, "..");
const read = (rel: string) => readFileSync(join(root, rel), "utf8");

function sourceFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = join(dir, e.name);
    if (e.isDirectory()) return sourceFiles(p);
    return e.name.endsWith(".ts") ? [p] : [];
  });
}

/**
 * Metric names in src: string literals that are exactly `unisync_...` (SQL
 * mentions of the `_unisync_*` tables sit inside longer strings, so they do not match).
 * Type: `inc` and `setTotal` render as counters, `set` as gauges.
 */
function metricsInSource(): Map<string, Set<"counter" | "gauge">> {
  const found = new Map<string, Set<"counter" | "gauge">>();
  for (const file of sourceFiles(join(root, "src"))) {
    const text = readFileSync(file, "utf8");
    for (const m of text.matchAll(/["'`](unisync_[a-z_]+)["'`]/g)) if (!found.has(m[1])) found.set(m[1], new Set());
    for (const m of text.matchAll(/\.(inc|setTotal|set)\(\s*["'`](unisync_[a-z_]+)["'`]/g)) {
      found.get(m[2])!.add(m[1] === "set" ? "gauge" : "counter");
    }
  }
  return found;
}

/** `unisync_...` names a text uses (not `_unisync_*` table names). */
function namesIn(text: string): Set<string> {
  return new Set([...text.matchAll(/(?<![A-Za-z0-9_])unisync_[a-z_]+/g)].map((m) => m[0]));
}

const exact = (name: string) => new RegExp(`(?<![A-Za-z0-9_])${name}(?![A-Za-z0-9_])`);

describe("metrics documentation", () => {
  const metrics = metricsInSource();

  it("finds the agent's metrics in src", () => {
    // Guards the scan itself: a broken regex must not make the checks below pass vacuously.
    expect(metrics.size).toBeGreaterThanOrEqual(20);
    for (const name of ["unisync_store_up", "unisync_store_requests_total", "unisync_parked_records"]) expect(metrics.has(name)).toBe(true);
  });

  it("every metric has a row in deploy/METRICS.md with its type", () => {
    const rows = read("deploy/METRICS.md")
      .split("\n")
      .filter((l) => l.trimStart().startsWith("|"));
    const problems: string[] = [];
    for (const [name, types] of metrics) {
      const row = rows.find((r) => exact(name).test(r.split("|")[1] ?? ""));
      if (!row) {
        problems.push(`${name}: no table row`);
        continue;
      }
      if (types.size > 1) problems.push(`${name}: set both as a counter and as a gauge in src`);
      const type = row.split("|")[2]?.trim();
      for (const t of types) if (type !== t) problems.push(`${name}: documented as ${type}, rendered as ${t}`);
    }
    expect(problems).toEqual([]);
  });

  it.each(["deploy/prometheus/alerts.yml", "deploy/grafana/unisync-dashboard.json"])("%s uses only metrics that exist", (file) => {
    const used = namesIn(read(file));
    expect(used.size).toBeGreaterThan(0);
    expect([...used].filter((n) => !metrics.has(n))).toEqual([]);
  });

  it("the dashboard is JSON with a Prometheus data source input", () => {
    const dash = JSON.parse(read("deploy/grafana/unisync-dashboard.json")) as { __inputs: { name: string }[]; panels: unknown[] };
    expect(dash.__inputs.map((i) => i.name)).toContain("DS_PROMETHEUS");
    expect(dash.panels.length).toBeGreaterThan(0);
  });
});
