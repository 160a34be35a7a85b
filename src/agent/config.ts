/**
 * Agent settings: defaults < config file < UNISYNC_* environment < command line.
 * Every value is validated at start with a message that names the bad key.
 */
import { secureStore } from "../keys/open.js";
import type { ObjectStore } from "../store/store.js";
import { openStore } from "../store/url.js";
import { writeAtomic } from "../snapshot/agentlink.js";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { hostname } from "node:os";
import { join, resolve } from "node:path";
import { DEFAULT_EXCLUDED_TABLES } from "../db/schema.js";

export interface Config {
  instanceDir: string;
  store: string;
  node: string;
  /** Extra databases (paths relative to the instance folder) besides the ones found in it. */
  databases: string[];
  excludeTables: string[];
  /**
   * Tables whose INTEGER PRIMARY KEY is a natural identity (the same number means the
   * same thing on every node): concurrent inserts of one key merge instead of both
   * being kept (id collisions, ARCHITECTURE.md). Must be the same on every node.
   */
  naturalKeyTables: string[];
  /**
   * The nodes' databases never shared a copy: rows they held under the same
   * INTEGER PRIMARY KEY before enrolment are different rows (both kept, one
   * moves) unless equal. Default false: such rows are the same row, merged
   * column by column. Must be the same on every node.
   */
  independentDatabases: boolean;
  /**
   * A child written on one node while another deleted its parent keeps the parent
   * alive by default (its delete is undone). Child tables listed here ("table", or
   * "table.column" for one foreign key, "*" for all) follow their declared ON DELETE
   * action instead: CASCADE deletes the late child, SET NULL / SET DEFAULT change its
   * reference. Must be the same on every node.
   */
  declaredOnDelete: string[];
  captureIntervalMs: number;
  /** The pull loop's poll of the cluster index: every pollMinMs while the cluster is busy, backing off to pollMaxMs when idle. */
  pollMinMs: number;
  pollMaxMs: number;
  /** Readers re-read the index this far behind the newest pointer (late writers, clock skew). */
  indexOverlapMs: number;
  /** Gap repair: one origin's stream is listed every repairEveryMs, in turn (a lost pointer delays, never loses). */
  repairEveryMs: number;
  /** LAN hints: UDP port to listen on (0: off), peers as host:port, and the shared secret that signs them. */
  hintPort: number;
  hintPeers: string[];
  hintSecret: string;
  batchMaxRecords: number;
  batchMaxBytes: number;
  busyTimeoutMs: number;
  walMode: boolean;
  httpHost: string;
  /** Required (16+ characters) when httpHost is not loopback: requests must carry it (Bearer header or ?token=). */
  httpToken: string;
  /** 0 picks a free port; -1 turns the status server off. */
  httpPort: number;
  heartbeatMs: number;
  rescanMs: number;
  logLevel: string;
  /** Sync the files of the instance folder too (stream ".files"). */
  syncFiles: boolean;
  /** The instance folder's watcher: "fswatch" (one fs.watch per folder) or "chokidar". */
  folderWatcher: string;
  /** Take a snapshot this often (ms); 0 turns automatic snapshots off. */
  snapshotIntervalMs: number;
  /** Restore the newest snapshot when the databases and folder are empty. */
  bootstrap: boolean;
  /** gc keeps point-in-time restore possible this far back (ms). */
  retentionMs: number;
}

/** A configuration that cannot work; `setting` names the setting whose value is wrong or missing, when it is one. */
export class ConfigError extends Error {
  readonly code = "CONFIG";
  constructor(
    message: string,
    readonly setting?: string,
  ) {
    super(message);
  }
}

export const DEFAULTS: Omit<Config, "instanceDir" | "store" | "node"> = {
  databases: [],
  excludeTables: DEFAULT_EXCLUDED_TABLES,
  naturalKeyTables: [],
  independentDatabases: false,
  declaredOnDelete: [],
  captureIntervalMs: 50,
  pollMinMs: 600,
  pollMaxMs: 5000,
  indexOverlapMs: 30_000,
  repairEveryMs: 15_000,
  hintPort: 0,
  hintPeers: [],
  hintSecret: "",
  batchMaxRecords: 5000,
  batchMaxBytes: 4 * 1024 * 1024,
  busyTimeoutMs: 5000,
  walMode: true,
  httpHost: "127.0.0.1",
  httpToken: "",
  httpPort: 7717,
  heartbeatMs: 10000,
  rescanMs: 5000,
  logLevel: "info",
  syncFiles: true,
  folderWatcher: "fswatch",
  snapshotIntervalMs: 6 * 3600_000,
  bootstrap: true,
  retentionMs: 7 * 24 * 3600_000,
};

type Kind = "string" | "number" | "boolean" | "string[]";
const KINDS: Record<keyof Config, Kind> = {
  instanceDir: "string",
  store: "string",
  node: "string",
  databases: "string[]",
  excludeTables: "string[]",
  naturalKeyTables: "string[]",
  independentDatabases: "boolean",
  declaredOnDelete: "string[]",
  captureIntervalMs: "number",
  pollMinMs: "number",
  pollMaxMs: "number",
  indexOverlapMs: "number",
  repairEveryMs: "number",
  hintPort: "number",
  hintPeers: "string[]",
  hintSecret: "string",
  batchMaxRecords: "number",
  batchMaxBytes: "number",
  busyTimeoutMs: "number",
  walMode: "boolean",
  httpHost: "string",
  httpToken: "string",
  httpPort: "number",
  heartbeatMs: "number",
  rescanMs: "number",
  logLevel: "string",
  syncFiles: "boolean",
  folderWatcher: "string",
  snapshotIntervalMs: "number",
  bootstrap: "boolean",
  retentionMs: "number",
};

/** 127.0.0.0/8, ::1 and localhost: reachable from this machine only. */
export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

export function stateDir(instanceDir: string): string {
  return join(instanceDir, ".unisync");
}

/**
 * The store as this node uses it: secured (sealed and signed) when the cluster
 * is, plain otherwise; a mix is refused with a KeyConfigError (src/keys/open.ts).
 * Without an instance folder (a CLI given only --store), the key file comes from
 * UNISYNC_KEY_FILE.
 */
export function openNodeStore(url: string, instanceDir?: string): Promise<ObjectStore> {
  return secureStore(openStore(url), instanceDir ? nodeKeyPaths(instanceDir) : {});
}

/** A secured cluster's node: its key file and the trust list it accepted (see src/keys/). */
export function nodeKeyPaths(instanceDir: string): { keyFile: string; trustCache: string } {
  return { keyFile: join(stateDir(instanceDir), "node.key"), trustCache: join(stateDir(instanceDir), "trust.json") };
}

/** The store and node name the agent last ran with here, for commands given neither (`unisync status DIR` after `run DIR URL --node x`). */
const lastRunPath = (instanceDir: string) => join(stateDir(instanceDir), "last-run.json");

export function rememberRun(c: Pick<Config, "instanceDir" | "store" | "node">): void {
  const path = lastRunPath(c.instanceDir);
  mkdirSync(stateDir(c.instanceDir), { recursive: true });
  writeAtomic(path, JSON.stringify({ store: c.store, node: c.node }));
}

function lastRun(instanceDir: string): { store?: unknown; node?: unknown } {
  try {
    return JSON.parse(readFileSync(lastRunPath(instanceDir), "utf8")) as { store?: unknown; node?: unknown };
  } catch {
    return {}; // never ran here, or unreadable: as if never ran
  }
}

export function defaultConfigPath(instanceDir: string): string {
  return join(stateDir(instanceDir), "config.jsonc");
}

/** JSON with // comment lines, as `unisync init` writes it. */
export function parseJsonc(text: string, source: string): Record<string, unknown> {
  const stripped = text
    .split("\n")
    .map((line) => (/^\s*\/\//.test(line) ? "" : line))
    .join("\n");
  try {
    const v = JSON.parse(stripped) as unknown;
    if (typeof v !== "object" || v === null || Array.isArray(v)) throw new Error("the top level must be an object");
    return v as Record<string, unknown>;
  } catch (err) {
    throw new ConfigError(`${source}: not valid JSON: ${(err as Error).message}`);
  }
}

function envName(key: string): string {
  return "UNISYNC_" + key.replace(/[A-Z]/g, (c) => "_" + c).toUpperCase();
}

function coerce(key: keyof Config, raw: unknown, source: string): unknown {
  const kind = KINDS[key];
  const bad = (want: string) => new ConfigError(`${source}: "${key}" must be ${want}, got ${JSON.stringify(raw)}`);
  if (kind === "number") {
    const n = typeof raw === "string" && raw.trim() !== "" ? Number(raw) : raw;
    if (typeof n !== "number" || !Number.isFinite(n) || !Number.isInteger(n)) throw bad("a whole number");
    return n;
  }
  if (kind === "boolean") {
    if (typeof raw === "boolean") return raw;
    if (raw === "true" || raw === "1") return true;
    if (raw === "false" || raw === "0") return false;
    throw bad("true or false");
  }
  if (kind === "string[]") {
    if (typeof raw === "string") return raw.split(",").map((s) => s.trim()).filter(Boolean);
    if (!Array.isArray(raw) || raw.some((s) => typeof s !== "string")) throw bad("a list of strings");
    return raw;
  }
  if (typeof raw !== "string") throw bad("a string");
  return raw;
}

function validate(c: Config): void {
  const need = (cond: boolean, key: keyof Config, what: string) => {
    if (!cond) throw new ConfigError(`"${key}" ${what} (got ${JSON.stringify(c[key])})`, key);
  };
  need(c.store.length > 0, "store", "is required: give STORE_URL, e.g. file:///var/lib/unisync or s3://bucket/prefix (commands other than run also find the store the agent last ran with in this folder)");
  need(/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/.test(c.node), "node", "must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit");
  need(c.captureIntervalMs >= 5 && c.captureIntervalMs <= 60000, "captureIntervalMs", "must be between 5 and 60000");
  need(c.pollMinMs >= 10, "pollMinMs", "must be at least 10");
  need(c.pollMaxMs >= c.pollMinMs, "pollMaxMs", "must be at least pollMinMs");
  need(c.indexOverlapMs >= 1000, "indexOverlapMs", "must be at least 1000");
  need(c.repairEveryMs >= 100, "repairEveryMs", "must be at least 100");
  need(c.hintPort >= 0 && c.hintPort <= 65535, "hintPort", "must be a UDP port number, or 0 for off");
  for (const p of c.hintPeers) {
    if (!/^[^\s:]+:\d{1,5}$/.test(p)) throw new ConfigError(`"hintPeers": ${JSON.stringify(p)} must be host:port (an IPv4 address or a host name)`);
  }
  if (c.httpPort >= 0 && !isLoopback(c.httpHost) && c.httpToken.length < 16) {
    throw new ConfigError(
      `"httpToken" must be at least 16 characters when the status server listens on ${JSON.stringify(c.httpHost)}, which is not loopback ` +
        `(the page and /metrics would otherwise be open to the network; UNISYNC_HTTP_TOKEN keeps it out of the file)`,
    );
  }
  if ((c.hintPort > 0 || c.hintPeers.length > 0) && c.hintSecret.length < 16) {
    throw new ConfigError(`"hintSecret" must be at least 16 characters when hintPort or hintPeers is set (the same on every node; UNISYNC_HINT_SECRET keeps it out of the file)`);
  }
  need(c.batchMaxRecords >= 1 && c.batchMaxRecords <= 1_000_000, "batchMaxRecords", "must be between 1 and 1000000");
  need(c.batchMaxBytes >= 1024 && c.batchMaxBytes <= 64 * 1024 * 1024, "batchMaxBytes", "must be between 1024 and 67108864");
  need(c.busyTimeoutMs >= 0, "busyTimeoutMs", "must not be negative");
  need(c.httpPort >= -1 && c.httpPort <= 65535, "httpPort", "must be a port number, 0 for any free port, or -1 for off");
  need(c.heartbeatMs >= 100, "heartbeatMs", "must be at least 100");
  need(c.rescanMs >= 100, "rescanMs", "must be at least 100");
  need(c.snapshotIntervalMs === 0 || c.snapshotIntervalMs >= 1000, "snapshotIntervalMs", "must be 0 (off) or at least 1000");
  need(c.retentionMs >= 1000, "retentionMs", "must be at least 1000 (1 s)");
  need(["fatal", "error", "warn", "info", "debug", "trace", "silent"].includes(c.logLevel), "logLevel", "must be one of fatal, error, warn, info, debug, trace, silent");
  need(["fswatch", "chokidar"].includes(c.folderWatcher), "folderWatcher", "must be fswatch or chokidar");
  for (const d of c.databases) {
    if (d.startsWith("/") || d.split(/[\\/]/).includes("..")) throw new ConfigError(`"databases": ${JSON.stringify(d)} must be a path inside the instance folder`);
  }
}

/**
 * Builds the configuration. `cli` holds what the command line gave (already
 * named by config key); `configPath` overrides the default config file location.
 */
export function loadConfig(cli: Partial<Config> & { instanceDir: string }, configPath?: string, env: NodeJS.ProcessEnv = process.env): Config {
  const instanceDir = resolve(cli.instanceDir);
  if (!existsSync(instanceDir)) throw new ConfigError(`instance folder ${instanceDir} does not exist`);
  // Below the config file, the environment and the command line: what the agent last ran with here.
  const last = lastRun(instanceDir);
  const merged: Record<string, unknown> = {
    ...DEFAULTS,
    instanceDir,
    store: typeof last.store === "string" ? last.store : "",
    node: typeof last.node === "string" ? last.node : hostname().split(".")[0],
  };
  const file = configPath ?? env.UNISYNC_CONFIG ?? defaultConfigPath(instanceDir);
  if (existsSync(file)) {
    const fromFile = parseJsonc(readFileSync(file, "utf8"), file);
    for (const [k, v] of Object.entries(fromFile)) {
      if (!(k in KINDS) || k === "instanceDir") throw new ConfigError(`${file}: unknown setting "${k}" (known: ${Object.keys(KINDS).filter((x) => x !== "instanceDir").join(", ")})`);
      merged[k] = coerce(k as keyof Config, v, file);
    }
  } else if (configPath) {
    throw new ConfigError(`config file ${configPath} does not exist (create one with: unisync init)`);
  }
  for (const k of Object.keys(KINDS) as (keyof Config)[]) {
    const v = env[envName(k)];
    if (v !== undefined && k !== "instanceDir") merged[k] = coerce(k, v, `environment ${envName(k)}`);
  }
  for (const [k, v] of Object.entries(cli)) if (v !== undefined) merged[k] = coerce(k as keyof Config, v, "command line");
  const config = merged as unknown as Config;
  validate(config);
  return config;
}

/** The commented config file `unisync init` writes. */
export function renderConfigFile(c: Pick<Config, "store" | "node">): string {
  const d = DEFAULTS;
  return `// unisync agent settings (JSON; lines starting with // are comments).
// Precedence: this file < UNISYNC_* environment variables < command-line flags.
// Credentials never go here: S3 keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
{
  // Where the shared log lives: file:///path (local or shared mount) or
  // s3://bucket/prefix?endpoint=http://host:9000 (MinIO, AWS S3).
  "store": ${JSON.stringify(c.store)},
  // This node's name: unique in the cluster, stable for the life of the node.
  "node": ${JSON.stringify(c.node)},
  // Extra SQLite files to sync, relative to the instance folder. Files directly in
  // the folder whose header says SQLite are found by themselves.
  "databases": ${JSON.stringify(d.databases)},
  // Tables never synced (they describe the local schema, not data).
  "excludeTables": ${JSON.stringify(d.excludeTables)},
  // Two nodes that insert id 57 into the same table while apart keep both rows: the one
  // created later moves to a new id (the same on every node; see \`unisync conflicts\`).
  // List here the tables whose integer ids mean the same thing on every node (merge
  // them instead). Must be the same on every node.
  "naturalKeyTables": ${JSON.stringify(d.naturalKeyTables)},
  // Rows a database held before unisync met it ("enrolled") have no known time: they
  // lose to every logged change and delete, and only fill in what the cluster lacks,
  // so a node started from an old copy never drags the cluster back. Rows two nodes
  // held under the same id before enrolment are the same row (copies of one
  // database), merged column by column; \`unisync conflicts\` lists where they differed.
  // true: the databases never shared a copy, so such rows are different rows (both
  // kept, one moves to a new id). Must be the same on every node.
  "independentDatabases": ${d.independentDatabases},
  // A row written on one node while another node deleted the row it refers to (a
  // foreign key): by default the deleted row is kept (its delete is undone, on every
  // node, and \`unisync conflicts\` lists it), so nobody's work is lost. Child tables
  // listed here ("table", "table.column" for one foreign key, "*" for all) follow
  // their declared ON DELETE action instead: CASCADE deletes the late row, SET NULL /
  // SET DEFAULT change its reference. Must be the same on every node.
  "declaredOnDelete": ${JSON.stringify(d.declaredOnDelete)},
  // How often (ms) to look for new local changes.
  "captureIntervalMs": ${d.captureIntervalMs},
  // How often (ms) to poll the store's segment index for other nodes' changes: every
  // pollMinMs while the cluster is busy, backing off to pollMaxMs when idle (one LIST each,
  // however many nodes and databases there are).
  "pollMinMs": ${d.pollMinMs},
  "pollMaxMs": ${d.pollMaxMs},
  // Re-read the index this far (ms) behind the newest entry: covers late writers and clocks
  // that disagree by less than half of it.
  "indexOverlapMs": ${d.indexOverlapMs},
  // Gap repair: list one other node's stream every this many ms, in turn, in case an index
  // entry was lost (it then shows up late, never not at all).
  "repairEveryMs": ${d.repairEveryMs},
  // Optional LAN hints: agents that can reach each other over UDP tell each other "new
  // segment" so an idle cluster still syncs at once. Listen on hintPort (0 = off), tell
  // hintPeers ("host:port"), signed with hintSecret (the same on every node; better in
  // UNISYNC_HINT_SECRET). Without hints everything still works by polling.
  "hintPort": ${d.hintPort},
  "hintPeers": ${JSON.stringify(d.hintPeers)},
  "hintSecret": ${JSON.stringify(d.hintSecret)},
  // Upper bounds of one segment.
  "batchMaxRecords": ${d.batchMaxRecords},
  "batchMaxBytes": ${d.batchMaxBytes},
  // How long (ms) to wait for the app's write lock before retrying.
  "busyTimeoutMs": ${d.busyTimeoutMs},
  // Put databases in WAL mode so the app and unisync do not block each other.
  "walMode": ${d.walMode},
  // Status page and Prometheus /metrics (loopback only by default; -1 turns it off).
  // Any other host needs httpToken (16+ characters, better as UNISYNC_HTTP_TOKEN):
  // send it as "Authorization: Bearer TOKEN" (Prometheus: authorization.credentials) or ?token=.
  "httpHost": ${JSON.stringify(d.httpHost)},
  "httpToken": ${JSON.stringify(d.httpToken)},
  "httpPort": ${d.httpPort},
  "heartbeatMs": ${d.heartbeatMs},
  // How often (ms) to look for new database files in the instance folder.
  "rescanMs": ${d.rescanMs},
  "logLevel": ${JSON.stringify(d.logLevel)},
  // Sync every file of the instance folder too, except SQLite databases and their
  // -wal/-shm/-journal files, logs, temp and swap files, and what .unisyncignore lists.
  "syncFiles": ${d.syncFiles},
  // Take a snapshot (database copies + folder manifest + version vector) this often (ms);
  // new nodes start from the newest one, point-in-time restore from the one before T. 0 = off.
  "snapshotIntervalMs": ${d.snapshotIntervalMs},
  // On a node whose databases and folder are empty, restore the newest snapshot first.
  "bootstrap": ${d.bootstrap},
  // "unisync gc" keeps point-in-time restore possible this far back (ms; default 7 days):
  // the newest snapshot at or before now - retentionMs and everything after it.
  "retentionMs": ${d.retentionMs}
}
`;
}
