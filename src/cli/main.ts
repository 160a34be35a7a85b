/**
 * The one command line: unisync init | run | status. Every command has --help;
 * bad input ends with one clear line on stderr and exit code 2, never a bare stack.
 */
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { parseArgs } from "node:util";
import pino from "pino";
import { Agent } from "../agent/agent.js";
import { ConfigError, defaultConfigPath, loadConfig, openNodeStore, rememberRun, renderConfigFile, type Config } from "../agent/config.js";
import { StoreConfigError } from "../store/store.js";
import { openStore, redactUrl } from "../store/url.js";
import { startStatusServer } from "../web/server.js";
import { agentBackend } from "../web/backend.js";
import { statusCommand } from "./status.js";
import { compareInstances } from "./verify.js";
import { audit, formatEntry, withOldValues, type AuditEntry } from "../report/audit.js";
import { snapshotCommand, SNAPSHOT_HELP } from "./snapshot.js";
import { replayCommand, restoreCommand, REPLAY_HELP, RESTORE_HELP } from "./replay.js";
import { BadInputError } from "./usage.js";
import { conflictsCommand, CONFLICTS_HELP } from "./conflicts.js";
import { gcCommand, GC_HELP } from "./gc.js";
import { forgetCommand, FORGET_HELP } from "./forget.js";
import { keysCommand, KEYS_HELP } from "./keys.js";
import { KeyConfigError } from "../keys/trust.js";

const HELP: Record<string, string> = {
  main: `unisync — keep an app's SQLite databases identical on several servers.

Usage: unisync <command> [options]

Commands:
  init INSTANCE_DIR STORE_URL   write a commented config file for this node
  run INSTANCE_DIR [STORE_URL]  run the agent beside the app (Ctrl-C / SIGTERM stops it cleanly)
  status INSTANCE_DIR           databases, origins, cursors, lag, pending and parked changes
  verify INSTANCE_DIR OTHER_DIR compare this node's databases with another node's, table by table
  conflicts INSTANCE_DIR        rows moved by id collisions, set aside by unique clashes, parked
  log [INSTANCE_DIR] [filters]  audit: who changed which row or file, when (read from the store)
  snapshot INSTANCE_DIR         take a snapshot now (--list: the store's snapshots)
  replay --at TIME --into DIR   rebuild databases and folder as they were at TIME into DIR
  restore INSTANCE_DIR --at TIME  put this node (and, through it, the cluster) back to TIME
  gc [INSTANCE_DIR] [--apply]   retention: what snapshots, segments and blobs can go (dry run unless --apply)
  forget INSTANCE_DIR --db FILE remove unisync's tables from a database (a copy from another node) to enrol it afresh
  keys init|node|add|remove|rotate|show   a secured cluster: signed, encrypted, members only

STORE_URL: file:///path (a local or shared directory) or s3://bucket/prefix?endpoint=http://host:9000
S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (never from the URL).
Run "unisync <command> --help" for the options of a command.`,
  init: `Usage: unisync init INSTANCE_DIR STORE_URL [--node NAME] [--config FILE] [--force]

Writes a commented config file (default INSTANCE_DIR/.unisync/config.jsonc) that
"unisync run INSTANCE_DIR" then reads by itself.
  --node NAME     this node's name, unique in the cluster (default: host name)
  --config FILE   where to write the file
  --force         overwrite an existing file`,
  run: `Usage: unisync run INSTANCE_DIR [STORE_URL] [options]

Runs the agent: syncs every SQLite database directly in INSTANCE_DIR (found by
their header) plus those listed in the config. Needs no config file: STORE_URL
and --node are enough. Node-local state lives in INSTANCE_DIR/.unisync/.
  --node NAME         this node's name (default: host name; UNISYNC_NODE)
  --config FILE       config file (default INSTANCE_DIR/.unisync/config.jsonc if present)
  --http-port N       console (status page), /status.json and /metrics port on 127.0.0.1 (0 = any free port, off = none; default 7717)
  --log-level LEVEL   fatal|error|warn|info|debug|trace (default info)
Every config key can also be set as UNISYNC_<KEY> (e.g. UNISYNC_POLL_MAX_MS=1000).
Logs are JSON lines (pino) on stdout.`,
  status: `Usage: unisync status INSTANCE_DIR [--store URL] [--json] [--files]

Shows, per synced database: the node it belongs to, segments written, changes
pending upload, parked records and why, and for every other origin the last
segment applied and how many are waiting in the store (lag). Also lists SQLite
files deeper in the folder that are not synced.
  --store URL   the store to measure lag against (default: from the config, else the
                store the agent last ran with in this folder)
  --json        machine-readable output
  --files       also list every file of the folder that is not synced, and why`,
};

HELP.verify = `Usage: unisync verify INSTANCE_DIR OTHER_INSTANCE_DIR [--json]

Compares every synced database of INSTANCE_DIR with the database of the same name
in OTHER_INSTANCE_DIR (another node's folder, e.g. on a shared mount or a copy),
table by table, by digests of the exact values (storage class and bits). Run it
when both nodes are quiet. Exit code 0 when identical, 1 when not.`;

HELP.snapshot = SNAPSHOT_HELP;
HELP.conflicts = CONFLICTS_HELP;
HELP.replay = REPLAY_HELP;
HELP.restore = RESTORE_HELP;
HELP.gc = GC_HELP;
HELP.forget = FORGET_HELP;
HELP.keys = KEYS_HELP;

HELP.log = `Usage: unisync log [INSTANCE_DIR] [--store URL] [filters] [--json] [--limit N]

The audit trail, read from the store's log (every origin, page by page):
time (from the change's clock), origin, operation, and the row or file.
For rows: the key and the values written (all columns for an insert or
delete, the changed ones for an update). For files: size and sha256.
With --key or --path (one row or file) the history is in clock order across
origins and shows old -> new for each value an update replaced, and the
whole row a delete removed. An id that an id collision moved holds two
rows' histories: see \`unisync conflicts\`.
Filters:
  --db NAME        one database (its file name in the instance folder)
  --table NAME     one table;  --key VALUE  one row ("57", or "a=1,b=x" for a composite key)
  --path PATH      one file of the instance folder (relative path)
  --origin NODE    changes made on one node
  --since TIME, --until TIME   ISO 8601 times (e.g. 2026-11-25T14:00:00Z)
The store comes from --store, or from INSTANCE_DIR's config.`;

class UsageError extends Error {}

type Values = Record<string, string | boolean | undefined>;

function parse(command: string, args: string[], options: Record<string, { type: "string" | "boolean" }>): { values: Values; positionals: string[] } {
  try {
    const r = parseArgs({ args, options: { ...options, help: { type: "boolean", short: "h" } }, allowPositionals: true, strict: true });
    return { values: r.values as Values, positionals: r.positionals };
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n\n${HELP[command]}`);
  }
}

const str = (v: string | boolean | undefined): string | undefined => (typeof v === "string" ? v : undefined);

function intOption(name: string, v: string | boolean | undefined): number | undefined {
  if (v === undefined) return undefined;
  if (v === "off") return -1;
  const n = Number(v);
  if (typeof v !== "string" || !Number.isInteger(n)) throw new UsageError(`--${name} must be a whole number, got ${JSON.stringify(v)}`);
  return n;
}

async function init(args: string[]): Promise<void> {
  const { values, positionals } = parse("init", args, { node: { type: "string" }, config: { type: "string" }, force: { type: "boolean" } });
  if (values.help) return console.log(HELP.init);
  if (positionals.length !== 2) throw new UsageError(`init needs INSTANCE_DIR and STORE_URL\n\n${HELP.init}`);
  const [instanceDir, store] = positionals;
  openStore(store); // validates the URL now rather than at the first run
  const config = loadConfig({ instanceDir, store, node: str(values.node) }, undefined, {});
  const path = str(values.config) ?? defaultConfigPath(config.instanceDir);
  if (existsSync(path) && !values.force) throw new UsageError(`${path} already exists (use --force to overwrite)`);
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, renderConfigFile(config));
  console.log(`wrote ${path}\nstart the agent with: unisync run ${instanceDir}`);
}

async function run(args: string[]): Promise<void> {
  const { values, positionals } = parse("run", args, {
    node: { type: "string" },
    config: { type: "string" },
    "http-port": { type: "string" },
    "log-level": { type: "string" },
  });
  if (values.help) return console.log(HELP.run);
  if (positionals.length < 1 || positionals.length > 2) throw new UsageError(`run needs INSTANCE_DIR and optionally STORE_URL\n\n${HELP.run}`);
  const cli: Partial<Config> & { instanceDir: string } = {
    instanceDir: positionals[0],
    store: positionals[1],
    node: str(values.node),
    httpPort: intOption("http-port", values["http-port"]),
    logLevel: str(values["log-level"]),
  };
  const config = loadConfig(cli, str(values.config));
  const log = pino({ level: config.logLevel, base: { node: config.node } });
  const store = await openNodeStore(config.store, config.instanceDir);
  const agent = new Agent(config, store, log);
  log.info({ instanceDir: config.instanceDir, store: redactUrl(config.store) }, "starting unisync agent");
  await agent.start();
  rememberRun(config); // status, conflicts, log... given only INSTANCE_DIR use this store and node name
  let server: Awaited<ReturnType<typeof startStatusServer>>["server"] | undefined;
  if (config.httpPort >= 0) {
    try {
      const started = await startStatusServer(config.httpHost, config.httpPort, agentBackend(agent), agent.metrics, config.httpToken);
      server = started.server;
      log.info({ url: started.url }, "console (status page), /status.json and /metrics");
    } catch (err) {
      log.warn({ err: (err as Error).message }, "status page not started (port in use?); syncing goes on without it");
    }
  }
  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      log.info({ signal }, "stopping: finishing the batch in hand");
      resolve();
    };
    process.once("SIGTERM", () => stop("SIGTERM"));
    process.once("SIGINT", () => stop("SIGINT"));
  });
  server?.close();
  await agent.stop();
}

function timeOption(name: string, v: string | boolean | undefined): number | undefined {
  if (typeof v !== "string") return undefined;
  const ms = Date.parse(v);
  if (Number.isNaN(ms)) throw new UsageError(`--${name} must be an ISO 8601 time such as 2026-11-25T14:00:00Z, got ${JSON.stringify(v)}`);
  return ms;
}

async function auditLog(args: string[]): Promise<void> {
  const opts = ["store", "db", "table", "key", "path", "origin", "since", "until", "limit"] as const;
  const { values, positionals } = parse("log", args, { ...Object.fromEntries(opts.map((o) => [o, { type: "string" as const }])), json: { type: "boolean" } });
  if (values.help) return console.log(HELP.log);
  if (positionals.length > 1) throw new UsageError(`log takes at most one INSTANCE_DIR\n\n${HELP.log}`);
  let storeUrl = str(values.store);
  if (!storeUrl && positionals[0]) {
    try {
      storeUrl = loadConfig({ instanceDir: positionals[0] }, undefined).store;
    } catch (err) {
      if (!(err instanceof ConfigError && err.setting === "store")) throw err;
    }
  }
  if (!storeUrl) throw new UsageError(`log needs --store URL (or an INSTANCE_DIR whose config names the store)\n\n${HELP.log}`);
  const limit = intOption("limit", values.limit) ?? Infinity;
  const filter = {
    db: str(values.db),
    table: str(values.table),
    key: str(values.key),
    path: str(values.path),
    origin: str(values.origin),
    sinceMs: timeOption("since", values.since),
    untilMs: timeOption("until", values.until),
  };
  let n = 0;
  const show = (e: AuditEntry) => console.log(values.json ? JSON.stringify(e) : formatEntry(e));
  if (filter.key !== undefined || filter.path !== undefined) {
    // One row or file: its whole history, in clock order, with the values each change replaced.
    const all: AuditEntry[] = [];
    for await (const e of audit(await openNodeStore(storeUrl, positionals[0]), filter, (why) => console.error(`unisync: skipped ${why}`))) all.push(e);
    for (const e of withOldValues(all).slice(0, limit)) (show(e), n++);
  } else {
    for await (const e of audit(await openNodeStore(storeUrl, positionals[0]), filter, (why) => console.error(`unisync: skipped ${why}`))) {
      show(e);
      if (++n >= limit) break;
    }
  }
  if (!values.json && n === 0) console.error("no change matches");
}

async function verify(args: string[]): Promise<number> {
  const { values, positionals } = parse("verify", args, { json: { type: "boolean" } });
  if (values.help) {
    console.log(HELP.verify);
    return 0;
  }
  if (positionals.length !== 2) throw new UsageError(`verify needs INSTANCE_DIR and OTHER_INSTANCE_DIR\n\n${HELP.verify}`);
  const config = loadConfig({ instanceDir: positionals[0], store: "unused" }, undefined);
  if (!existsSync(positionals[1])) throw new UsageError(`instance folder ${resolve(positionals[1])} does not exist`);
  const { problems, databases } = compareInstances(positionals[0], positionals[1], config.databases, config.excludeTables);
  if (values.json) console.log(JSON.stringify({ identical: problems.length === 0, databases, problems }, null, 2));
  else console.log(problems.length ? problems.join("\n") : databases === 0 ? "identical, but neither folder holds a synced database" : "identical: every synced table holds the same rows");
  return problems.length ? 1 : 0;
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    if (!command || command === "--help" || command === "-h" || command === "help") {
      console.log(HELP.main);
      return command ? 0 : 2;
    }
    if (command === "init") await init(rest);
    else if (command === "run") await run(rest);
    else if (command === "status") await statusCommand(rest, (a, o) => parse("status", a, o), HELP.status);
    else if (command === "verify") return await verify(rest);
    else if (command === "log") await auditLog(rest);
    else if (command === "conflicts") await conflictsCommand(rest, (a, o) => parse("conflicts", a, o));
    else if (command === "snapshot") await snapshotCommand(rest, (a, o) => parse("snapshot", a, o));
    else if (command === "replay") return await replayCommand(rest, (a, o) => parse("replay", a, o));
    else if (command === "restore") return await restoreCommand(rest, (a, o) => parse("restore", a, o));
    else if (command === "gc") return await gcCommand(rest, (a, o) => parse("gc", a, o));
    else if (command === "keys") await keysCommand(rest, (a, o) => parse("keys", a, o));
    else if (command === "forget") await forgetCommand(rest, (a, o) => parse("forget", a, o));
    else throw new UsageError(`unknown command "${command}"\n\n${HELP.main}`);
    return 0;
  } catch (err) {
    if (err instanceof UsageError || err instanceof BadInputError || err instanceof ConfigError || err instanceof StoreConfigError || err instanceof KeyConfigError) {
      console.error(`unisync: ${err.message}`);
      return 2;
    }
    console.error(`unisync: ${(err as Error).message}`);
    if (process.env.UNISYNC_DEBUG) console.error((err as Error).stack);
    return 1;
  }
}
