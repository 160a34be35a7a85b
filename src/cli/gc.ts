/**
 * `unisync gc`: retention of segments, snapshots and blobs (see snapshot/gc.ts).
 * Dry run unless --apply: it says what it would delete and why.
 */
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError, DEFAULTS, loadConfig, openNodeStore } from "../agent/config.js";
import { hlcToIso } from "../log/hlc.js";
import { collectGarbage, type GcReport } from "../snapshot/gc.js";
import { BadInputError } from "./usage.js";

type Parse = (args: string[], options: Record<string, { type: "string" | "boolean" }>) => { values: Record<string, string | boolean | undefined>; positionals: string[] };

export const GC_HELP = `Usage: unisync gc [INSTANCE_DIR] [--store URL] [--keep DURATION] [--apply] [--forget-node NAME[,NAME]] [--json]

Retention. Keeps point-in-time restore possible for the window (--keep, or the
config's retentionMs, default 7 days) and deletes what no kept state needs:
  - snapshots older than the newest snapshot at or before now - window (the
    newest snapshot of every node is always kept);
  - segments that every kept snapshot includes (its version vector), but never
    one that a node has not applied yet (cursors from nodes/<node>.json): such
    a node is reported as a laggard. A node silent for longer than the window
    is reported as gone; its cursors still hold segments back unless
    --forget-node NAME;
  - blobs (file contents, snapshot parts) named by no kept snapshot and no
    segment left, and older than the window.
Without --apply nothing is deleted: it prints what would go, and why.
  --keep DURATION      window, e.g. 7d, 36h, 90m, 45s (default: retentionMs)
  --apply              delete
  --forget-node NAMES  nodes gone for good whose cursors no longer count (comma-separated)
  --store URL          the store (default: from INSTANCE_DIR's config)
  --json               the report as JSON; progress as JSON lines on stderr`;

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 7 * 86_400_000 };

/** "7d", "36h", "90m", "45s", "500ms", "1w" → milliseconds. */
export function parseDuration(option: string, v: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)$/.exec(v.trim());
  const ms = m ? Math.round(Number(m[1]) * UNITS[m[2]]) : NaN;
  if (!Number.isFinite(ms) || ms < 1000) throw new BadInputError(`--${option} must be a duration of at least 1s such as 7d, 36h, 90m or 45s, got ${JSON.stringify(v)}`);
  return ms;
}

function mb(bytes: number): string {
  return bytes >= 1024 * 1024 ? `${(bytes / 1024 / 1024).toFixed(1)} MB` : `${(bytes / 1024).toFixed(1)} KB`;
}

function duration(ms: number): string {
  for (const [u, n] of [["d", 86_400_000], ["h", 3_600_000], ["m", 60_000]] as const) if (ms >= n && ms % n === 0) return `${ms / n}${u}`;
  return `${Math.round(ms / 1000)}s`;
}

export function formatReport(r: GcReport): string {
  const out: string[] = [];
  const when = (ms: number | null) => (ms === null ? "unknown" : new Date(ms).toISOString());
  out.push(
    r.applied ? `gc: restore stays possible back to ${when(r.cutoffMs)} (window ${duration(r.keepMs)})` : `gc (dry run: nothing deleted; --apply deletes): restore stays possible back to ${when(r.cutoffMs)} (window ${duration(r.keepMs)})`,
  );
  out.push(r.oldestKept ? `oldest kept snapshot: ${r.oldestKept.key} (${r.oldestKept.node}, ${hlcToIso(r.oldestKept.hlc)})` : `no usable snapshot at or before ${when(r.cutoffMs)}: no segment and no snapshot can go (take snapshots, or wait)`);
  const verb = r.applied ? "deleted" : "to delete";
  const doomed = r.snapshots.filter((s) => s.action === "delete");
  out.push(`snapshots: ${r.snapshots.length - doomed.length} kept, ${doomed.length} ${verb}`);
  for (const s of r.snapshots) out.push(`  ${s.action === "delete" ? (r.applied ? "deleted" : "delete ") : "keep   "} ${s.key} (${hlcToIso(s.hlc)}): ${s.why}`);
  out.push(`segments:`);
  for (const s of r.streams) {
    const what = s.segments ? `${s.segments} ${verb} through seq ${s.collectThrough} (${mb(s.bytes)})` : "nothing to delete";
    out.push(`  log/${s.origin}/${s.stream}: ${what}: ${s.why}`);
  }
  if (r.laggards.length) {
    out.push(`laggards (segments kept for them):`);
    for (const l of r.laggards) {
      const n = r.nodes.find((x) => x.node === l.node);
      const seen = `last heartbeat ${when(n?.lastSeenMs ?? null)}`;
      const gone = l.gone ? `; GONE (silent for longer than the window): "--forget-node ${l.node}" lets gc collect anyway, and that node must then start again from a snapshot` : "";
      out.push(`  ${l.node} has applied ${l.origin}/${l.stream} only through seq ${l.cursor} (snapshots cover ${l.coveredThrough}); ${seen}${gone}`);
    }
  }
  for (const n of r.nodes) if (n.state === "forgotten") out.push(`forgotten node: ${n.node} (its cursors are ignored)`);
  const b = r.blobs;
  out.push(
    b.skipped
      ? `blobs: ${b.skipped}`
      : `blobs: ${b.referenced} referenced by kept snapshots or segments; ${b.delete} ${verb} (${mb(b.bytes)}); ${b.keptYoung} unreferenced but younger than the window, kept`,
  );
  for (const p of r.problems) out.push(`problem: ${p}`);
  const t = r.totals;
  out.push(`total: ${t.segments} segments (${mb(t.segmentBytes)}), ${t.snapshots} snapshots, ${t.blobs} blobs (${mb(t.blobBytes)}), ${t.claims} seq claims, ${t.pointers} index pointers ${r.applied ? "deleted" : "would be deleted"}`);
  return out.join("\n");
}

export async function gcCommand(args: string[], parse: Parse): Promise<number> {
  const { values, positionals } = parse(args, {
    store: { type: "string" },
    keep: { type: "string" },
    apply: { type: "boolean" },
    json: { type: "boolean" },
    "forget-node": { type: "string" },
  });
  if (values.help) {
    console.log(GC_HELP);
    return 0;
  }
  if (positionals.length > 1) throw new BadInputError(`gc takes at most one INSTANCE_DIR`);
  const storeArg = typeof values.store === "string" ? values.store : undefined;
  let url = storeArg;
  let keepMs = DEFAULTS.retentionMs;
  if (positionals[0]) {
    try {
      const config = loadConfig({ instanceDir: positionals[0], store: storeArg }, undefined);
      keepMs = config.retentionMs;
      url = config.store;
    } catch (err) {
      // A folder without a configured store is fine when --store names one.
      if (!(err instanceof ConfigError && err.setting === "store")) throw err;
    }
  }
  if (!url) throw new BadInputError(`gc needs --store URL or an INSTANCE_DIR whose config names the store`);
  if (typeof values.keep === "string") keepMs = parseDuration("keep", values.keep);
  const forget = typeof values["forget-node"] === "string" ? values["forget-node"].split(",").map((s) => s.trim()).filter(Boolean) : [];
  const json = values.json === true;
  const t0 = Date.now();
  const report = await collectGarbage({
    store: await openNodeStore(url, positionals[0]),
    keepMs,
    apply: values.apply === true,
    forget,
    workDir: join(tmpdir(), `unisync-gc-${process.pid}`),
    progress: (message, data) => {
      if (json || !process.stderr.isTTY) process.stderr.write(JSON.stringify({ progress: message, ...data, ms: Date.now() - t0 }) + "\n");
      else process.stderr.write(`${message}\n`);
    },
  });
  console.log(json ? JSON.stringify(report, null, 2) : formatReport(report));
  return 0;
}
