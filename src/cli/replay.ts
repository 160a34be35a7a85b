/**
 * `unisync replay --at T --into DIR`: the state at T rebuilt into a fresh folder.
 * `unisync restore INSTANCE_DIR --at T`: the same, beside the node's files, then
 * verified and put in place as this node's newest changes (see snapshot/revert.ts).
 */
import { rmSync } from "node:fs";
import { join, resolve } from "node:path";
import pino from "pino";
import { loadConfig, openNodeStore, type Config } from "../agent/config.js";
import { findDatabases } from "../db/databases.js";
import { hlcFromMs, hlcToIso, LOGICAL_BITS } from "../log/hlc.js";
import { runningAgent } from "../snapshot/agentlink.js";
import { Progress, type ProgressLine } from "../stream/progress.js";
import { NoSnapshotError, NotEmptyError, rebuildAt, type RebuildResult } from "../snapshot/rebuild.js";
import { revertDatabase, revertFolder, type RevertReport } from "../snapshot/revert.js";
import { digestDatabase } from "./verify.js";
import { BadInputError, parseTime } from "./usage.js";

type Parse = (args: string[], options: Record<string, { type: "string" | "boolean" }>) => { values: Record<string, string | boolean | undefined>; positionals: string[] };

export const REPLAY_HELP = `Usage: unisync replay [INSTANCE_DIR] --at TIME --into DIR [--store URL] [--json]

Rebuilds every database and the folder as they were at TIME into DIR (missing or
empty), without touching any node: the newest snapshot at or before TIME, then
every origin's changes stamped at or before TIME. A corrupt snapshot is reported
and the next older one used.
  --at TIME     ISO 8601 time, e.g. 2026-11-25T14:00:00Z (state after every change up to that millisecond)
  --into DIR    where to write the databases and files
  --store URL   the store (default: from INSTANCE_DIR's config)
  --json        the result as JSON; progress as JSON lines on stderr`;

export const RESTORE_HELP = `Usage: unisync restore INSTANCE_DIR --at TIME [--store URL] [--stop-agent] [--keep] [--json]

Puts this node's databases and folder back to their state at TIME: rebuilds it
beside the node's files (INSTANCE_DIR/.unisync/restore-*), verifies it, then
changes the node's databases (one transaction each) and files to match. These
are recorded as this node's newest changes, so when the agent runs again every
node of the cluster returns to that state. To look at an old state without
changing anything, use "unisync replay --into".
Refused while the agent runs, unless --stop-agent (it is stopped with SIGTERM
and not restarted). Stop the app too: it should not write during the restore.
  --at TIME      ISO 8601 time
  --stop-agent   stop the running agent first
  --keep         keep the rebuilt copy after a successful restore
  --store URL    the store (default: from the config)`;

function progressSink(json: boolean): (l: ProgressLine) => void {
  return (l) => (json || !process.stderr.isTTY ? process.stderr.write(JSON.stringify(l) + "\n") : undefined);
}

async function settingsFor(config: Config, json: boolean) {
  return {
    store: await openNodeStore(config.store, config.instanceDir),
    log: pino({ level: "warn" }, pino.destination(2)),
    excludeTables: config.excludeTables,
    naturalKeyTables: config.naturalKeyTables,
    independentDatabases: config.independentDatabases,
    declaredOnDelete: config.declaredOnDelete,
    batchMaxRecords: config.batchMaxRecords,
    batchMaxBytes: config.batchMaxBytes,
    busyTimeoutMs: config.busyTimeoutMs,
    syncFiles: config.syncFiles,
    progress: progressSink(json),
    onCorrupt: (ref: { key: string }, message: string) => console.error(`unisync: snapshot ${ref.key} is unusable (${message}); using the next older one`),
  };
}

/** The clock of the last change included at `ms`: everything stamped in that millisecond counts. */
const untilHlcOf = (ms: number) => hlcFromMs(ms) + LOGICAL_BITS - 1;

function describe(r: RebuildResult, at: number): string {
  return [
    `state at ${new Date(at).toISOString()}: snapshot ${r.snapshot.key} (taken at ${hlcToIso(r.snapshot.hlc)} by ${r.snapshot.node})`,
    `  + ${r.records} records from ${r.segments} segments; ${r.databases.length} database(s), ${r.files} file(s)`,
    ...r.problems.map((p) => `  problem: ${p}`),
  ].join("\n");
}

async function rebuild(config: Config, atMs: number, into: string, json: boolean): Promise<RebuildResult> {
  try {
    return await rebuildAt(await settingsFor(config, json), untilHlcOf(atMs), into);
  } catch (err) {
    if (err instanceof NoSnapshotError) throw new BadInputError(err.message);
    throw err;
  }
}

function configFrom(instanceDir: string | undefined, store: string | undefined, command: string): Config {
  if (instanceDir) return loadConfig({ instanceDir, store }, undefined);
  if (!store) throw new BadInputError(`${command} needs --store URL or an INSTANCE_DIR whose config names the store`);
  return loadConfig({ instanceDir: ".", store, node: "replay" }, undefined, {});
}

export async function replayCommand(args: string[], parse: Parse): Promise<number> {
  const { values, positionals } = parse(args, { at: { type: "string" }, into: { type: "string" }, store: { type: "string" }, json: { type: "boolean" } });
  if (values.help) return (console.log(REPLAY_HELP), 0);
  if (positionals.length > 1) throw new BadInputError(`replay takes at most one INSTANCE_DIR\n\n${REPLAY_HELP}`);
  if (typeof values.at !== "string") throw new BadInputError(`replay needs --at TIME\n\n${REPLAY_HELP}`);
  if (typeof values.into !== "string") throw new BadInputError(`replay needs --into DIR\n\n${REPLAY_HELP}`);
  const atMs = parseTime("at", values.at);
  const config = configFrom(positionals[0], typeof values.store === "string" ? values.store : undefined, "replay");
  const into = resolve(values.into);
  if (positionals[0] && into.startsWith(resolve(positionals[0]) + "/")) throw new BadInputError(`--into must be outside the instance folder (the agent would sync it)`);
  const r = await rebuild(config, atMs, into, !!values.json).catch((err: Error) => {
    if (err instanceof NotEmptyError) throw new BadInputError(`--into ${err.message}`);
    throw err;
  });
  console.log(values.json ? JSON.stringify({ at: new Date(atMs).toISOString(), into, ...r }) : `${describe(r, atMs)}\nwritten to ${into}`);
  return r.problems.length ? 1 : 0;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** SIGTERM, then wait until the process is gone (its connections closed), not just its pid file. */
async function stopAgent(pid: number): Promise<void> {
  process.kill(pid, "SIGTERM");
  const deadline = Date.now() + 60_000;
  while (alive(pid)) {
    if (Date.now() > deadline) throw new Error(`the agent (pid ${pid}) did not stop within 60 s`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

export async function restoreCommand(args: string[], parse: Parse): Promise<number> {
  const { values, positionals } = parse(args, { at: { type: "string" }, store: { type: "string" }, "stop-agent": { type: "boolean" }, keep: { type: "boolean" }, json: { type: "boolean" } });
  if (values.help) return (console.log(RESTORE_HELP), 0);
  if (positionals.length !== 1) throw new BadInputError(`restore needs INSTANCE_DIR\n\n${RESTORE_HELP}`);
  if (typeof values.at !== "string") throw new BadInputError(`restore needs --at TIME\n\n${RESTORE_HELP}`);
  const atMs = parseTime("at", values.at);
  const config = loadConfig({ instanceDir: positionals[0], store: typeof values.store === "string" ? values.store : undefined }, undefined);
  const agent = runningAgent(config.instanceDir);
  if (agent) {
    if (!values["stop-agent"]) throw new BadInputError(`the agent runs beside ${config.instanceDir} (pid ${agent.pid}); stop it first or pass --stop-agent`);
    await stopAgent(agent.pid);
  }
  const aside = join(config.instanceDir, ".unisync", `restore-${Date.now()}`);
  const r = await rebuild(config, atMs, aside, !!values.json);
  if (r.problems.length) {
    console.error(describe(r, atMs));
    throw new Error(`the rebuilt state has problems (listed above); nothing was changed. It is kept in ${aside}`);
  }
  const report: RevertReport = { rowsDeleted: 0, rowsUpdated: 0, rowsInserted: 0, filesWritten: 0, filesDeleted: 0, notes: [] };
  const live = new Map(findDatabases(config.instanceDir, config.databases).synced.map((d) => [d.stream, d.path]));
  const progress = new Progress("restoring databases", r.databases.length, progressSink(!!values.json));
  for (const stream of r.databases) {
    const path = live.get(stream);
    if (!path) report.notes.push(`${stream}: not on this node; left out (start the app so it creates it, then restore again)`);
    else revertDatabase(path, join(aside, stream), config.excludeTables, stream, report, config.busyTimeoutMs);
    progress.add(1);
  }
  progress.finish();
  if (config.syncFiles) await revertFolder(config.instanceDir, aside, report);
  // Verify: every table the rebuilt state has now holds exactly its rows here.
  const mismatches: string[] = [];
  for (const stream of r.databases) {
    const path = live.get(stream);
    if (!path) continue;
    const want = digestDatabase(join(aside, stream), config.excludeTables);
    const have = digestDatabase(path, config.excludeTables);
    for (const [t, d] of want) if (have.get(t) && have.get(t)?.digest !== d.digest) mismatches.push(`${stream} table ${t}: differs after the restore`);
  }
  if (mismatches.length) throw new Error(`restore did not reach the state (kept in ${aside}):\n${mismatches.join("\n")}`);
  if (!values.keep) rmSync(aside, { recursive: true, force: true });
  const summary = { at: new Date(atMs).toISOString(), snapshot: r.snapshot.key, ...report, stoppedAgent: agent?.pid ?? null };
  if (values.json) console.log(JSON.stringify(summary));
  else {
    console.log(describe(r, atMs));
    console.log(`restored: ${report.rowsDeleted} rows deleted, ${report.rowsUpdated} updated, ${report.rowsInserted} inserted; ${report.filesWritten} files written, ${report.filesDeleted} removed`);
    for (const n of report.notes) console.log(`  note: ${n}`);
    console.log(`start the agent to send these changes to the other nodes${agent ? " (it was stopped)" : ""}`);
  }
  return 0;
}
