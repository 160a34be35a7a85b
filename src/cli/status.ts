/** `unisync status`: what this node holds, what it waits for, and how far behind it is. */
import Database from "better-sqlite3";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { Heartbeat } from "../agent/agent.js";
import { loadConfig, openNodeStore } from "../agent/config.js";
import { findDatabases } from "../db/databases.js";
import { listExcluded } from "../capture/folder.js";
import { listOrigins, seqFloorKey, streamPrefix, parseSegmentKey } from "../log/keys.js";
import { listAll, type ObjectStore } from "../store/store.js";
import { readEnrolments, type EnrolmentSummary } from "../replay/enrolments.js";
import { listParked } from "../replay/apply.js";
import { conflictCounts } from "../report/conflicts.js";
import { BadInputError } from "./usage.js";

type Parse = (args: string[], options: Record<string, { type: "string" | "boolean" }>) => { values: Record<string, string | boolean | undefined>; positionals: string[] };

interface DbReport {
  stream: string;
  path: string;
  enrolled: boolean;
  node?: string;
  segmentsWritten?: number;
  pendingChanges?: number;
  outboxSegments?: number;
  parked?: ReturnType<typeof listParked>;
  origins?: { origin: string; appliedSeq: number; appliedAt: string | null; waitingInStore?: number }[];
  /** Rows moved by id collisions and set aside by unique clashes (details: unisync conflicts). */
  moved?: number;
  setAside?: number;
  /** Its own rows wait for the cluster's log to be replayed into it before they are enrolled. */
  enrolling?: boolean;
  /** Which node enrolled rows (there before unisync) when, how many, and what they did here. */
  enrolments?: EnrolmentSummary[];
}

async function countAfter(store: ObjectStore, origin: string, stream: string, seq: number): Promise<number> {
  let n = 0;
  for await (const o of listAll(store, streamPrefix(origin, stream), `${seqFloorKey(origin, stream, seq)}~`)) if (parseSegmentKey(o.key)) n++;
  return n;
}

/** Times this node started again from a snapshot after gc collected what it needed (.unisync/left-behind-*\/rejoin.json). */
function startedAgain(instanceDir: string): { atMs: number; reason: string; streams: string[]; snapshot?: string; leftBehind?: string; databasesMoved?: number; filesMoved?: number }[] {
  const dir = join(instanceDir, ".unisync");
  if (!existsSync(dir)) return [];
  const out = [];
  for (const name of readdirSync(dir).filter((n) => n.startsWith("left-behind-")).sort()) {
    try {
      out.push({ leftBehind: join(dir, name), ...JSON.parse(readFileSync(join(dir, name, "rejoin.json"), "utf8")) });
    } catch {
      // not written (interrupted): the folder is still listed by the operator's ls
    }
  }
  return out;
}

/**
 * One line per node that enrolled rows (there before unisync), over every table:
 * when, how many rows, and what they did here (rows the cluster lacked, rows it
 * had the same, rows that differed from another copy, rows older than the log).
 */
export function summarizeEnrolments(enrolments: EnrolmentSummary[]): string[] {
  const byOrigin = new Map<string, EnrolmentSummary[]>();
  for (const e of enrolments) byOrigin.set(e.origin, [...(byOrigin.get(e.origin) ?? []), e]);
  return [...byOrigin].map(([origin, es]) => {
    const sum = (k: "rows" | "added" | "same" | "differed" | "older") => es.reduce((t, e) => t + e[k], 0);
    const from = es.map((e) => e.from).sort()[0];
    const parts = [`${sum("added")} new to the cluster`, `${sum("same")} the cluster had the same`];
    if (sum("differed")) parts.push(`${sum("differed")} differed from another copy (unisync conflicts lists them)`);
    if (sum("older")) parts.push(`${sum("older")} older than the log (the logged values were kept)`);
    return `enrolled by ${origin} at ${from}: ${sum("rows")} row(s) that were there before unisync — ${parts.join(", ")}`;
  });
}

export async function statusCommand(args: string[], parse: Parse, help: string): Promise<void> {
  const { values, positionals } = parse(args, { store: { type: "string" }, json: { type: "boolean" }, files: { type: "boolean" } });
  if (values.help) return console.log(help);
  if (positionals.length !== 1) throw new BadInputError(`status needs INSTANCE_DIR\n\n${help}`);
  const config = loadConfig({ instanceDir: positionals[0], store: values.store as string | undefined }, undefined);
  const store = config.store ? await openNodeStore(config.store, config.instanceDir) : null;
  let storeOrigins: string[] = [];
  let storeError: string | undefined;
  if (store) storeOrigins = await listOrigins(store).catch((err: Error) => ((storeError = err.message), []));
  const found = findDatabases(config.instanceDir, config.databases, true);
  const reports: DbReport[] = [];
  for (const { path, stream } of found.synced) {
    if (!existsSync(path)) continue;
    const db = new Database(path, { readonly: true, fileMustExist: true });
    try {
      const enrolled = !!db.prepare("SELECT 1 FROM sqlite_master WHERE name = '_unisync_meta'").get();
      if (!enrolled) {
        reports.push({ stream, path, enrolled });
        continue;
      }
      const one = <T>(sql: string) => db.prepare(sql).get() as T;
      const node = (one<{ v: string } | undefined>("SELECT v FROM _unisync_meta WHERE k = 'node'"))?.v;
      const nextSeq = Number(one<{ v: number } | undefined>("SELECT v FROM _unisync_meta WHERE k = 'next_seq'")?.v ?? 1);
      const cursors = db.prepare("SELECT origin, seq, applied_ms FROM _unisync_cursors ORDER BY origin").all() as { origin: string; seq: number; applied_ms: number | null }[];
      const known = new Map(cursors.map((c) => [c.origin, c]));
      const origins = [...new Set([...cursors.map((c) => c.origin), ...storeOrigins.filter((o) => o !== node)])].sort();
      const originReports = [];
      for (const origin of origins) {
        const c = known.get(origin);
        const appliedSeq = Number(c?.seq ?? 0);
        const waitingInStore = store && !storeError ? await countAfter(store, origin, stream, appliedSeq).catch(() => undefined) : undefined;
        originReports.push({ origin, appliedSeq, appliedAt: c?.applied_ms ? new Date(Number(c.applied_ms)).toISOString() : null, waitingInStore });
      }
      reports.push({
        stream,
        path,
        enrolled,
        node,
        segmentsWritten: nextSeq - 1,
        pendingChanges: one<{ n: number }>("SELECT count(*) AS n FROM _unisync_changes").n,
        outboxSegments: one<{ n: number }>("SELECT count(*) AS n FROM _unisync_outbox").n,
        parked: listParked(db, 50),
        origins: originReports,
        ...conflictCounts(db),
        enrolling: Number(one<{ v: number } | undefined>("SELECT v FROM _unisync_meta WHERE k = 'enrol_pending'")?.v ?? 0) === 1,
        enrolments: readEnrolments(db),
      });
    } finally {
      db.close();
    }
  }
  // The running agent's own view (its last heartbeat): store requests per second and write protection.
  const node = reports.find((r) => r.node)?.node ?? config.node;
  const heartbeat = store && !storeError ? await readHeartbeat(store, node) : undefined;
  const excludedFiles = values.files ? await listExcluded(config.instanceDir, new Set(found.synced.map((d) => d.path))) : undefined;
  const result = { instanceDir: config.instanceDir, node: config.node, store: store?.description ?? null, storeError, agent: heartbeat, databases: reports, notSynced: found.notSynced, excludedFiles, startedAgain: startedAgain(config.instanceDir) };
  if (values.json) return console.log(JSON.stringify(result, null, 2));
  console.log(`instance folder: ${config.instanceDir}`);
  console.log(`store: ${store ? store.description : "(none given: pass --store or set it in the config)"}${storeError ? `  UNREACHABLE: ${storeError}` : ""}`);
  if (heartbeat) for (const line of describeAgent(heartbeat)) console.log(line);
  for (const r of reports) {
    console.log(`\ndatabase ${r.stream}${r.enrolled ? ` (node ${r.node})` : " — not enrolled yet (start the agent)"}`);
    if (!r.enrolled) continue;
    console.log(`  segments written: ${r.segmentsWritten}   pending changes: ${r.pendingChanges}   outbox (sealed, not uploaded): ${r.outboxSegments}`);
    if (r.enrolling) console.log("  enrolling: the cluster's log is replayed into this database first; its own rows are enrolled once that is done");
    for (const e of summarizeEnrolments(r.enrolments ?? [])) console.log(`  ${e}`);
    for (const o of r.origins ?? []) {
      const lag = o.waitingInStore === undefined ? "" : o.waitingInStore === 0 ? "  up to date" : `  ${o.waitingInStore} segment(s) waiting`;
      console.log(`  from ${o.origin}: applied through seq ${o.appliedSeq}${o.appliedAt ? ` at ${o.appliedAt}` : ""}${lag}`);
    }
    if (r.moved || r.setAside) {
      console.log(`  merged: ${r.moved} row(s) moved by id collisions, ${r.setAside} set aside by unique clashes (unisync conflicts shows them)`);
    }
    if (r.parked?.length) {
      console.log(`  parked records (${r.parked.length}${r.parked.length === 50 ? "+" : ""}): kept and retried after each schema change`);
      for (const p of r.parked.slice(0, 10)) console.log(`    ${p.origin}#${p.seq} ${p.table ?? ""} [${p.kind}]: ${p.reason}`);
    }
  }
  if (excludedFiles) {
    console.log(`\nfiles not synced (${excludedFiles.length}):`);
    for (const e of excludedFiles) console.log(`  ${e.path}: ${e.reason}`);
  }
  for (const r of result.startedAgain) {
    console.log(`\nstarted again from snapshot ${r.snapshot} at ${new Date(r.atMs).toISOString()} (${r.streams.join(", ")}): ${r.reason}`);
    console.log(`  what this node held then (${r.databasesMoved} database(s), ${r.filesMoved} file(s)) is kept in ${r.leftBehind}`);
  }
  if (found.notSynced.length) {
    console.log("\nSQLite files not synced:");
    for (const n of found.notSynced) console.log(`  ${n.path}: ${n.reason}`);
  }
}

/** What status reads of a heartbeat; an older agent's lacks the request figures. */
type AgentHeartbeat = Pick<Heartbeat, "atMs"> & Partial<Pick<Heartbeat, "storeRequests" | "tailing" | "trust">>;

/** This node's last heartbeat (nodes/<node>.json), if the store has one. */
async function readHeartbeat(store: ObjectStore, node: string): Promise<AgentHeartbeat | undefined> {
  const body = await store.get(`nodes/${encodeURIComponent(node)}.json`).catch(() => null);
  if (!body) return undefined;
  try {
    return JSON.parse(body.toString()) as AgentHeartbeat;
  } catch {
    return undefined;
  }
}

export function describeAgent(h: AgentHeartbeat): string[] {
  const out = [`agent's last heartbeat: ${new Date(h.atMs).toISOString()}`];
  const r = h.storeRequests;
  if (r) {
    const rates = Object.entries(r.perSecond).map(([k, v]) => `${k} ${v}`).join(", ");
    const total = Object.values(r.perSecond).reduce((a, b) => a + b, 0);
    out.push(`  store requests per second (last minute): ${Math.round(total * 1000) / 1000} (${rates})`);
    out.push(`  conditional writes (If-None-Match): ${r.conditionalWrites}${r.conditionalWrites === "enforced" ? " — each seq is claimed, so two agents under one node name cannot fork the log" : r.conditionalWrites === "not enforced" ? " — this store ignores them; a second agent under this node name is caught only when it starts" : ""}`);
  }
  const t = h.tailing;
  if (t) {
    const listed = Object.entries(t.listings).map(([k, v]) => `${k} ${v}`).join(", ");
    out.push(`  index polls: ${t.indexPolls} (every ${t.pollIntervalMs} ms now); stream listings: ${listed}; LAN hints received: ${t.hintsReceived}`);
  }
  const k = h.trust;
  if (k) {
    out.push(`  secured cluster: trust list version ${k.version}, writing under data key ${k.currentKey}; members ${k.members.join(", ")}${k.removed.length ? `; removed ${k.removed.join(", ")}` : ""}`);
    if (k.error) out.push(`  TRUST LIST NOT ACCEPTED: ${k.error}`);
  }
  return out;
}
