/**
 * Everything unisync does for one database file: capture (triggers, baseline),
 * sealing local changes into the outbox, uploading, and applying other origins'
 * segments. Each database has its own stream and its own cursors.
 */
import { vaultOf } from "../keys/securestore.js";
import { Progress, type ProgressLine } from "./progress.js";
import { statSync } from "node:fs";
import Database from "better-sqlite3";
import type { Logger } from "pino";
import { baselineTable, recordRowsAsNew } from "../capture/baseline.js";
import { ChangeDrain } from "../capture/drain.js";
import { claimForNode, ensureInternalTables, NodeIdentityError, recordAgentChange, silenced } from "../db/internal.js";
import { getMeta, setMeta } from "../db/meta.js";
import { discoverTables, parentsFirst, quoteIdent, schemaVersion, undeclaredReferences } from "../db/schema.js";
import { CHANGE_DELETE, CHANGE_INSERT, enrolmentMask, installTriggers } from "../capture/triggers.js";
import { hlcFromMs, type HybridClock } from "../log/hlc.js";
import { Outbox } from "../log/outbox.js";
import { decodeSegment } from "../log/segment.js";
import { decodeValues } from "../log/value.js";
import type { KnownSegments } from "../log/index.js";
import { LogEnds, type SyncStream } from "./stream.js";
import { guardAppTriggers } from "../capture/apptriggers.js";
import { readAfter, TailProblems, type TailProblem } from "../log/tail.js";
import { Applier, retryParked, type ParkKind } from "../replay/apply.js";
import { BagStore } from "../merge/bag.js";
import { lineageName, Relocator } from "../merge/relocate.js";
import { AsideRows } from "../merge/unique.js";
import { declaredRule, ReferenceKeeper } from "../replay/references.js";
import { RowStateStore } from "../merge/state.js";
import { TableAccess } from "../merge/table.js";
import type { ObjectStore } from "../store/store.js";
import { deadline, WriteTimer } from "../db/writes.js";
import type { Metrics } from "./metrics.js";

export interface DbSyncOptions {
  path: string;
  /** Name of this database's stream: its path relative to the instance folder. */
  stream: string;
  node: string;
  store: ObjectStore;
  clock: HybridClock;
  log: Logger;
  metrics: Metrics;
  excludeTables: string[];
  /** Tables whose integer keys merge by key instead of moving on a collision (config naturalKeyTables). */
  naturalKeyTables?: string[];
  /** Config independentDatabases: rows two nodes held under one id before enrolment are two rows. */
  independentDatabases?: boolean;
  /** Config declaredOnDelete: child tables ("table" or "table.column") whose late children follow the declared ON DELETE action. */
  declaredOnDelete?: string[];
  /**
   * A database enrolled for the first time replays the log before it records
   * its existing rows (see finishEnrolment). The agent sets it; tools that open
   * a database on their own enrol it at once.
   */
  enrolAfterCatchUp?: boolean;
  /**
   * The file appeared while the agent ran (the app created it): the rows it
   * holds when first met were written by the app a moment ago, before the
   * triggers were in, so they are recorded as this node's inserts, not as a
   * copy of the cluster's rows (see rowsAreNew in the agent).
   */
  rowsAreNew?: boolean;
  maxRecords: number;
  maxBytes: number;
  busyTimeoutMs: number;
  walMode: boolean;
  /** Records whose clock is further ahead of ours wait (see Applier). */
  maxClockDriftMs?: number;
}

/** How often parked records are retried besides after schema changes (constraint clashes may clear). */
const PARKED_RETRY_MS = 10_000;

export { NodeIdentityError };

export class DbSync implements SyncStream {
  readonly db: Database.Database;
  private readonly states: RowStateStore;
  private readonly bag: BagStore;
  private readonly drain: ChangeDrain;
  readonly outbox: Outbox;
  private readonly applier: Applier;
  private readonly relocator: Relocator;
  private readonly references: ReferenceKeeper;
  private tables = new Map<string, TableAccess>();
  /** The current capture generation of each table. */
  private capIds = new Map<string, number>();
  private lastSchemaVersion = -1;
  private lastDataVersion = -1;
  private readonly tailProblems: TailProblems;

  /** Every write transaction on the app's database, timed: how long the app may have waited for us. */
  readonly writes: WriteTimer;

  private write<T>(what: string, fn: () => T, alwaysPace = false): T {
    this.appCommitted(); // pacing needs to know whether the app writes
    return this.writes.run(this.db, what, fn, alwaysPace);
  }

  /** Per origin: why its stream is stopped (gap, corrupt segment, fork), for status. */
  get problems(): ReadonlyMap<string, TailProblem> {
    return this.tailProblems.byOrigin;
  }

  private readonly log: Logger;

  constructor(private readonly o: DbSyncOptions) {
    const st = statSync(o.path);
    this.identity = `${st.dev}:${st.ino}`;
    this.log = o.log.child({ db: o.stream });
    this.writes = new WriteTimer((ms, what) => {
      o.metrics.inc("unisync_write_locks_total", 1, { db: o.stream });
      o.metrics.inc("unisync_write_lock_held_seconds_total", ms / 1000, { db: o.stream });
      if (ms >= this.writes.longestMs) o.metrics.set("unisync_write_lock_longest_seconds", ms / 1000, { db: o.stream });
      if (ms > 1000) this.log.warn({ ms: Math.round(ms), what }, "held the database's write lock over a second: the app's writes waited");
    });
    this.tailProblems = new TailProblems(this.log, "replay");
    this.db = new Database(o.path, { fileMustExist: true, timeout: o.busyTimeoutMs });
    try {
      this.prepareConnection();
    } catch (err) {
      this.db.close();
      throw err;
    }
    const lastHlc = Number(getMeta(this.db, "hlc") ?? 0);
    o.clock.observe(lastHlc);
    this.states = new RowStateStore(this.db);
    const bag = (this.bag = new BagStore(this.db));
    const aside = new AsideRows(this.db, this.states, () => this.tables, (table, key, keptKey) => {
      // The row left the table: what refers to it follows the row that kept its values.
      const access = this.tables.get(table);
      if (access) this.references.parentGone(access, new Map(access.shape.key.map((k, i) => [k, key[i]])));
      o.metrics.inc("unisync_rows_set_aside_total");
      this.log.warn(
        { table, key: key.map(String), kept: keptKey.map(String) },
        "unique clash: two nodes created rows with the same unique values; the later one is set aside (see `unisync conflicts`)",
      );
    });
    const relocator = (this.relocator = new Relocator(this.db, this.states, () => this.tables, aside, bag, (m) => {
      this.references.parentMoved(m.table, m.to);
      // A tombstone moving (an id reused after a delete) is routine, not a collision.
      if (!m.live) return;
      o.metrics.inc("unisync_rows_moved_total");
      // Info, not a warning: with ids the database picks, collisions are routine and settled alike on every node.
      this.log.info(
        { table: m.table, from: String(m.from), to: String(m.to), lineage: lineageName(m.lineage), keptBy: lineageName(m.winner) },
        "id collision: two nodes created different rows with the same id; this one moved (see `unisync conflicts`)",
      );
    }));
    this.drain = new ChangeDrain(this.db, o.node, o.clock, this.states, bag, relocator, aside, (t) => this.tables.get(t)?.shape, o.independentDatabases, () => this.enrolling);
    this.outbox = new Outbox(this.db, o.node, o.stream, o.clock, vaultOf(o.store));
    this.references = new ReferenceKeeper(
      this.db,
      this.states,
      () => this.tables,
      aside,
      (t) => this.capIds.get(t),
      declaredRule(o.declaredOnDelete ?? []),
      (r) => {
        o.metrics.inc("unisync_references_repaired_total", 1, { action: r.action });
        // Following a set-aside row is its consequence (warned about then); the other repairs change what the app wrote.
        this.log[r.action === "moved to kept row" ? "info" : "warn"](
          { table: r.table, key: r.key.map(String), child: r.child, childKey: r.childKey.map(String), action: r.action },
          r.action === "kept parent"
            ? "a row was written that refers to a row deleted meanwhile: the deleted row is kept (see `unisync conflicts`)"
            : r.action === "moved to kept row"
              ? "a row refers to a row set aside by a unique clash: it now refers to the row that kept those values (see `unisync conflicts`)"
              : "a row was written that refers to a row deleted meanwhile: its declared ON DELETE action applied (see `unisync conflicts`)",
        );
      },
      (message) => this.log.error({ problem: message }, "could not repair a foreign key"),
    );
    this.applier = new Applier(
      this.db,
      o.clock,
      this.states,
      bag,
      () => this.tables,
      relocator,
      aside,
      (p) => {
        o.metrics.inc("unisync_records_parked_total");
        if (p.kind === "clock") o.metrics.inc("unisync_clock_drift_records_total");
        this.log.warn(p, "record parked: cannot apply it yet");
      },
      this.references,
      o.maxClockDriftMs,
    );
    this.applier.enrolling = Number(getMeta(this.db, "enrol_pending") ?? 0) === 1;
    this.applier.mayRepair = () => this.logEnds.allApplied(this.expectedOrigins);
    this.rowsAreNew = Number(getMeta(this.db, "rows_are_new") ?? 0) === 1;
    this.logUnknown = Number(getMeta(this.db, "log_unknown") ?? 0) === 1;
    this.ownThrough = Number(getMeta(this.db, "own_through") ?? 0);
  }

  /** Connection settings, our tables and the node check; throws (the caller closes). */
  private prepareConnection(): void {
    const o = this.o;
    this.db.pragma(`busy_timeout = ${o.busyTimeoutMs}`);
    if (o.walMode) {
      const mode = String(this.db.pragma("journal_mode", { simple: true }));
      if (mode !== "wal") {
        // SQLite does not wait for the app's write lock here; the agent retries at the next rescan.
        const now = String(this.db.pragma("journal_mode = WAL", { simple: true }));
        this.log.info({ from: mode, to: now }, "switched the database to WAL so the app and unisync do not block each other");
      }
    }
    // Children can arrive before their parents from another origin, and a
    // cascade already happened at the origin (its effects are records too).
    this.db.pragma("foreign_keys = OFF");
    this.db.pragma("recursive_triggers = OFF");
    ensureInternalTables(this.db);
    if (claimForNode(this.db, o.path, o.node) && o.enrolAfterCatchUp) {
      // A copy of one database merges into the cluster's rows by id only if the log
      // is replayed into it first; independent databases keep their rows apart instead.
      // A file that comes with merge state (a snapshot's copy) has its rows recorded already.
      const hasState = this.db.prepare("SELECT 1 FROM _unisync_rows UNION ALL SELECT 1 FROM _unisync_bag LIMIT 1").get();
      if (o.rowsAreNew && !hasState) setMeta(this.db, "rows_are_new", 1);
      else if (!o.independentDatabases && !hasState) setMeta(this.db, "enrol_pending", 1);
      // This node may have a log for this stream already (the file was restored or
      // replaced): nothing is sealed until we know where it goes on (continueLog).
      setMeta(this.db, "log_unknown", 1);
    }
  }

  /** (device, inode) of the file when it was opened: a file moved into its place is another file. */
  private readonly identity: string;

  /**
   * Why this connection no longer reads the file at the database's path (an
   * operator moved a restored backup into place, or deleted it), or null.
   * By path (stat, no descriptor), so it never touches the app's locks.
   */
  fileReplaced(): string | null {
    try {
      const st = statSync(this.o.path);
      return `${st.dev}:${st.ino}` === this.identity ? null : "another file was moved into its place";
    } catch (err) {
      return (err as NodeJS.ErrnoException).code === "ENOENT" ? "the file was removed" : null;
    }
  }

  /** True until continueLog: a database enrolled for the first time does not seal yet (meta log_unknown, kept here too). */
  logUnknown = false;

  /**
   * A new file under this node's name: its log goes on after `head`, the last
   * segment the store holds of this node and stream (a restored or replaced
   * file), and those segments are this node's own history, replayed into it
   * like any other origin's (ownThrough) before its rows are enrolled.
   */
  continueLog(head: number): void {
    this.write("continuing the log", () => {
      if (head > 0) {
        setMeta(this.db, "next_seq", Math.max(this.outbox.nextSeq(), head + 1));
        setMeta(this.db, "own_through", head);
      }
      setMeta(this.db, "log_unknown", 0);
    });
    this.logUnknown = false;
    this.ownThrough = Number(getMeta(this.db, "own_through") ?? 0);
    this.lastSchemaVersion = -1; // the enrolment waited for this
    this.refreshSchema();
    if (head > 0) this.log.warn({ head }, "this node's log already holds this database: replaying its own segments into the file, then continuing after them");
  }

  /** This node's own segments to replay into the file (a restored or replaced file), or 0 (meta own_through, kept here too). */
  ownThrough = 0;

  /** Whether this node's own earlier segments (through ownThrough) are not all replayed into the file yet. */
  replaysOwnLog(): boolean {
    return this.ownThrough > this.cursor(this.o.node).seq;
  }

  /**
   * True while this database's existing rows wait to be enrolled: a database met
   * for the first time replays what the cluster logged first, so rows the log
   * has land on its rows with the same key (a copy or a backup of the cluster's
   * database is the same rows, and the logged values win), and only what the log
   * does not have is enrolled afterwards. The app's new writes are captured meanwhile.
   */
  get enrolling(): boolean {
    return this.applier.enrolling;
  }

  /** Enrols the existing rows once the log has been replayed (the agent calls it when every origin is caught up). */
  finishEnrolment(): void {
    if (!this.enrolling) return;
    this.write("enrolment", () => {
      // What the app wrote is in the merge state first (a row it just inserted at a key the log deleted is its own).
      this.sealEverything();
      // Rows the app changed before the log reached them: enrolled as they are now.
      const touched = this.db.prepare("SELECT tbl, row_key FROM _unisync_enrol_touched").all() as { tbl: string; row_key: Buffer }[];
      for (const t of touched) {
        const access = this.tables.get(t.tbl);
        const capId = this.capIds.get(t.tbl);
        const row = access && capId !== undefined ? access.find(access.shape.key, decodeValues(t.row_key)) : null;
        if (!access || capId === undefined || !row) continue;
        recordAgentChange(this.db, capId, CHANGE_INSERT, access.shape.columns.map((c) => row.get(c) ?? null), enrolmentMask(), [], "changed by the app before this database was enrolled");
      }
      this.db.prepare("DELETE FROM _unisync_enrol_touched").run();
      this.dropStaleCopies();
      setMeta(this.db, "enrol_pending", 0);
    });
    this.applier.enrolling = false;
    this.reportUnplaced(true);
    this.lastSchemaVersion = -1;
    this.firstEnrolment = true;
    try {
      this.refreshSchema();
    } finally {
      this.firstEnrolment = false;
    }
  }

  /**
   * Rows of this node's copy at keys the log deleted are stale copies: every node
   * dropped those rows. They go now, in the enrolment transaction, not when the
   * baseline reaches them (drain.ts), so that nothing revives them meanwhile: an
   * app's write or a reference repair of such a row would be logged as a change
   * newer than the delete.
   */
  private dropStaleCopies(): void {
    const dead = this.db.prepare("SELECT pk FROM _unisync_rows WHERE tbl = ? AND alive = 0").pluck();
    let dropped = 0;
    silenced(this.db, () => {
      for (const access of this.tables.values()) {
        if (!access.shape.hasDeclaredKey) continue;
        for (const pk of dead.all(access.shape.name) as Buffer[]) dropped += access.delete(access.shape.key, decodeValues(pk)) ? 1 : 0;
      }
    });
    if (dropped > 0) this.log.info({ rows: dropped }, "dropped this database's stale copies of rows the cluster deleted");
  }

  /** While finishEnrolment records the rows: columns the log never wrote hold this copy's own values. */
  private firstEnrolment = false;
  /** Meta rows_are_new: the first trigger installation records the rows as this node's inserts (DbSyncOptions.rowsAreNew). */
  private rowsAreNew = false;

  get stream(): string {
    return this.o.stream;
  }

  /** The table being enrolled now: rows done of total, and the ETA (status, console). */
  enrolProgress: ProgressLine | undefined;

  /** Rows per table whose copies differed at enrolment, as last reported. */
  private readonly differencesSaid = new Map<string, number>();

  /**
   * Two nodes held different values under one key before unisync met their
   * databases: merged as copies of one row (the earlier enrolment's values
   * kept, the others listed by `unisync conflicts`). If the databases never
   * shared a copy, these are different rows and the setting is wrong: say so.
   */
  private reportEnrolmentDifferences(): void {
    const rows = this.db.prepare("SELECT tbl, count(DISTINCT row_key) AS n FROM _unisync_enrol_diffs GROUP BY tbl").all() as { tbl: string; n: number | bigint }[];
    for (const r of rows) {
      const n = Number(r.n);
      if (n <= (this.differencesSaid.get(r.tbl) ?? 0)) continue;
      this.differencesSaid.set(r.tbl, n);
      this.log.warn(
        { table: r.tbl, rows: n },
        "rows that two nodes held under the same key before unisync met their databases hold different values: they were merged as copies of one row, one node's values kept and the others listed by `unisync conflicts`. " +
          "If these databases never shared a copy (each server's rows are its own), they are different rows: stop every agent before more is merged and see \"independentDatabases\" in the README",
      );
    }
  }

  /**
   * A table whose triggers vanished was dropped and created again. A migration
   * that rebuilds it copies its rows; one that came back holding less than half
   * the rows the merge state counts alive lost them without a delete trigger
   * firing (DROP TABLE, an "init-db" command): they are not deleted on other
   * nodes, and this node now differs from the cluster. Said loudly, as nothing
   * here can tell the intent.
   */
  private reportLostRows(table: string): void {
    // Rows set aside by a unique clash are alive but out of the table, and so are rows
    // whose delete the triggers captured but the state has not taken in yet.
    const count = (sql: string) => Number(this.db.prepare(sql).pluck().get(table));
    const alive =
      count("SELECT count(*) FROM _unisync_rows WHERE tbl = ? AND alive = 1") -
      count("SELECT count(*) FROM _unisync_conflicts WHERE tbl = ?") -
      count(`SELECT count(*) FROM _unisync_changes WHERE op = ${CHANGE_DELETE} AND cap IN (SELECT id FROM _unisync_capture WHERE tbl = ?)`);
    const held = Number(this.db.prepare(`SELECT count(*) FROM ${quoteIdent(table)}`).pluck().get());
    // Only a table that came back with most of its rows gone: a recreated, emptied one.
    if (alive <= 0 || held * 2 >= alive) return;
    this.log.error(
      { table, rowsHere: held, rowsTheClusterHas: alive },
      "this table was dropped and created again, and lost rows without any delete being recorded: the other nodes still hold them, so this node now differs from the cluster. " +
        "To delete rows everywhere, delete them with DELETE (the app), not by recreating the table. To get them back here: stop the agent, move this database file aside, start the agent and let the app create the file again: the cluster's log is replayed into it",
    );
  }

  /** Columns already reported as undeclared references (once per process). */
  private readonly warnedReferences = new Set<string>();

  /** Installs or refreshes triggers when the schema changed; returns true if it did. */
  refreshSchema(): boolean {
    const version = schemaVersion(this.db);
    if (version === this.lastSchemaVersion) return false;
    // The version is read in the transaction that installs the triggers (our own DDL
    // bumps it), so a migration the app runs while the baseline below goes on is noticed.
    const { defs, installedAt } = this.write("installing triggers", () => {
        const natural = new Set((this.o.naturalKeyTables ?? []).map((t) => t.toLowerCase()));
        const shapes = discoverTables(this.db, this.o.excludeTables).map((s) => (natural.has(s.name.toLowerCase()) ? { ...s, autoId: false } : s));
        // Parents first: rows recorded below (and baselines) find the lineages their references name.
        const defs = parentsFirst(installTriggers(this.db, shapes, Date.now()), (d) => d.shape);
        // The app's triggers that write synced tables stay quiet while replay writes (their writes come as records).
        const app = guardAppTriggers(this.db, new Set(shapes.map((s) => s.name)));
        if (app.guarded.length > 0) this.log.info({ triggers: app.guarded }, "the app's triggers that write synced tables do not fire for replayed changes (what they wrote at the origin arrives in the log)");
        for (const m of app.mixed) {
          this.log.warn({ trigger: m.trigger, unsynced: m.unsynced }, "this app trigger writes synced and unsynced tables: it does not fire for replayed changes, so these unsynced tables miss them on other nodes");
        }
        for (const f of app.failed) {
          this.log.warn({ trigger: f.trigger, error: f.error }, "could not add the replay guard to this app trigger: it also fires for replayed changes, and what it writes may be written twice on other nodes");
        }
        if (this.rowsAreNew) {
          // The app's new database: the rows it wrote before these triggers are its inserts,
          // recorded in this transaction, ahead of whatever the triggers capture next.
          for (const d of defs.filter((x) => x.needsBaseline)) {
            const n = recordRowsAsNew(this.db, d);
            d.needsBaseline = false;
            if (n > 0) this.log.info({ table: d.shape.name, rows: n }, "recorded the rows the app wrote into its new database before the triggers were in, as this node's inserts");
          }
          setMeta(this.db, "rows_are_new", 0);
        }
        for (const d of defs.filter((x) => x.needsBaseline && x.shape.hasDeclaredKey)) this.reportLostRows(d.shape.name);
        for (const d of defs.filter((x) => x.previousColumns && !x.shape.hasDeclaredKey)) {
          // Copies of a table without a key are known by all their values: they follow the new columns.
          const access = new TableAccess(this.db, d.shape);
          this.bag.remap(d.shape.name, d.previousColumns as string[], d.shape.columns, (c) => access.defaultValue(c));
        }
        return { defs, installedAt: schemaVersion(this.db) };
      });
    this.rowsAreNew = false;
    this.tables = new Map(defs.map((d) => [d.shape.name, new TableAccess(this.db, d.shape)]));
    this.capIds = new Map(defs.map((d) => [d.shape.name, d.capId]));
    for (const u of undeclaredReferences(defs.map((d) => d.shape))) {
      const id = `${u.table}.${u.column}`;
      if (this.warnedReferences.has(id)) continue;
      this.warnedReferences.add(id);
      this.log.warn(
        { table: u.table, column: u.column, parent: u.parent },
        "this column looks like a reference but is not a declared foreign key: if two nodes create rows with the same id in the parent table, one moves and this column keeps the old id. Declare it (SQLAlchemy: ForeignKey), or list the parent in naturalKeyTables if its ids mean the same row on every node",
      );
    }
    // Rows are enrolled once the log is replayed in (enrolling) and its own place is known.
    for (const def of this.enrolling || this.logUnknown ? [] : defs.filter((d) => d.needsBaseline)) {
      // Counts and ETA in the log (every 5 s) and in status (the console shows it).
      const total = Number((this.db.prepare(`SELECT count(*) AS n FROM ${quoteIdent(def.shape.name)}`).get() as { n: number | bigint }).n);
      const progress = new Progress(`enrolling ${def.shape.name}`, total, (line) => this.log.info(line, "enrolment progress"), null, 5000);
      let recorded = 0;
      const n = baselineTable(
        this.db,
        def,
        this.states,
        this.bag,
        () => (this.sealBatch(deadline()), !this.hasPending()),
        (what, fn) => this.write(what, fn, true),
        (rows) => {
          progress.add(rows - recorded);
          recorded = rows;
          this.enrolProgress = progress.snapshot();
        },
        this.firstEnrolment,
      );
      this.enrolProgress = undefined;
      if (n > 0) {
        // A fresh node's clock may not have ticked yet: the enrolment time is at least now.
        this.applier.enrolments.count(this.o.node, def.shape.name, Math.max(this.o.clock.current, hlcFromMs(Date.now())), "added", n);
        this.log.info({ table: def.shape.name, rows: n }, "enrolled rows that no trigger had seen: they count as older than every logged change (baseline)");
      }
    }
    this.lastSchemaVersion = installedAt;
    this.log.info({ tables: defs.length, schemaVersion: installedAt }, "capture triggers in place");
    this.retryParked();
    return true;
  }

  private lastParkedRetry = 0;

  /** What must happen now and then even when nothing arrives: parked records get another try. */
  maintain(): void {
    if (Date.now() - this.lastParkedRetry > PARKED_RETRY_MS) this.retryParked();
  }

  /**
   * Applies parked records that can apply now (schema caught up, clash cleared,
   * clock reached, referenced row arrived); `kind` limits it to one kind.
   */
  retryParked(kind?: ParkKind): number {
    if (this.logUnknown) return 0;
    if (!kind) this.lastParkedRetry = Date.now();
    if (!this.db.prepare("SELECT 1 FROM _unisync_parked WHERE ? IS NULL OR kind = ? LIMIT 1").get(kind ?? null, kind ?? null)) return 0;
    const n = retryParked(this.db, this.applier, decodeSegment, (fn) => this.write("retrying parked records", () => (this.sealEverything(), fn())), kind);
    if (n > 0) this.log.info({ records: n }, "applied parked records");
    return n;
  }

  /** Cheap check whether another connection (the app) committed since the last look (true the first time). */
  appCommitted(): boolean {
    const v = this.db.pragma("data_version", { simple: true }) as number;
    const changed = v !== this.lastDataVersion;
    if (changed && this.lastDataVersion !== -1) this.writes.noteAppWrite();
    this.lastDataVersion = v;
    return changed;
  }

  /** Seals one batch of captured changes into the outbox (until `until` passes, if given); returns the records sealed. */
  private sealBatch(until?: { passed(): boolean }): number {
    const batch = this.drain.drain(this.o.maxRecords, this.o.maxBytes, until);
    if (batch.records.length === 0) {
      if (batch.lastId > 0) this.drain.removeThrough(batch.lastId); // no-op updates only
      return 0;
    }
    const entry = this.outbox.seal(batch.records, Date.now(), batch.continues);
    this.drain.removeThrough(batch.lastId);
    // Rows pointing at a lineage a local insert displaced follow it once the tables and the state agree again.
    if (!this.hasPending()) {
      this.relocator.followDeferred();
      // A local write may have ended a unique clash: a row set aside comes back.
      this.applier.aside.restore();
    }
    setMeta(this.db, "hlc", this.o.clock.current);
    this.o.metrics.inc("unisync_records_captured_total", batch.records.length);
    this.log.debug({ seq: entry.seq, records: entry.records, bytes: entry.bytes.length }, "sealed segment");
    return batch.records.length;
  }

  /**
   * Inside an apply transaction: local captures first, so the merge compares
   * remote records with this node's newest writes, not with stale clocks.
   */
  private sealEverything(): void {
    if (this.logUnknown) return;
    while (this.sealBatch() > 0 || this.hasPending());
  }

  /**
   * Seals what was captured, one transaction per segment, at most `maxBatches`
   * of them: the capture loop passes a small number so that the app gets its
   * write lock between our transactions while a big backlog drains.
   */
  sealPending(maxBatches = Infinity): number {
    this.refreshSchema();
    if (this.logUnknown) return 0;
    let total = 0;
    for (let batch = 0; batch < maxBatches; batch++) {
      const n = this.write("sealing", () => this.sealBatch(deadline()));
      if (n === 0 && !this.hasPending()) break;
      total += n;
    }
    return total;
  }

  /** Whether captured changes wait to be sealed. */
  hasPending(): boolean {
    return !!this.db.prepare("SELECT 1 FROM _unisync_changes LIMIT 1").get();
  }

  /**
   * Uploads up to `max` sealed segments, oldest first, in batches of
   * `batchSize` under one index pointer each (Outbox.upload); returns
   * how many went up. Bounded so that one busy database never starves the
   * others of upload turns. `stop` is asked between batches (the agent stopping).
   */
  async upload(max = 32, batchSize = 16, stop: () => boolean = () => false): Promise<number> {
    let n = 0;
    while (n < max && !stop()) {
      const batch = this.outbox.oldest(Math.min(batchSize, max - n));
      if (batch.length === 0) break;
      await this.outbox.upload(this.o.store, batch);
      n += batch.length;
      for (const e of batch) {
        this.o.metrics.inc("unisync_segments_uploaded_total");
        this.o.metrics.inc("unisync_bytes_uploaded_total", e.bytes.length);
      }
    }
    return n;
  }

  /**
   * Applies what the store holds from `origin` after our cursor; returns records applied.
   * `untilHlc` (point-in-time replay): only records stamped at or before it; an
   * origin's clocks grow along its log, so the pull stops at the first later one.
   */
  async pull(origin: string, maxSegments = 16, untilHlc = Infinity, stop: () => boolean = () => false, known?: KnownSegments): Promise<number> {
    this.logEnds.reading(origin);
    // Applying seals pending changes first: not before the log's place is known.
    if (this.logUnknown) return 0;
    // Each apply transaction seals pending captures first; with a backlog bigger
    // than a segment that would hold the app's write lock too long: drain first.
    if (this.db.prepare("SELECT 1 FROM _unisync_changes LIMIT 1 OFFSET ?").get(this.o.maxRecords)) return 0;
    this.maintain();
    const cursor = this.applier.cursor(origin);
    const { segments, problem } = await readAfter(this.o.store, origin, this.o.stream, cursor.seq, maxSegments, 4, known);
    let applied = 0;
    let seen = 0;
    for await (const s of segments) {
      // Stopping: what is applied stays applied (the cursor says how far, also part way through a segment).
      if (stop()) {
        seen = maxSegments; // not read to the end
        break;
      }
      seen++;
      const segment = untilHlc === Infinity ? s.segment : { ...s.segment, records: s.segment.records.filter((r) => r.hlc <= untilHlc) };
      // Stop where a point-in-time replay's records end. A segment that holds no
      // records at all still moves the cursor: stopping there would stall the log.
      if (segment.records.length === 0 && s.segment.records.length > 0) break;
      this.refreshSchema();
      // One transaction per turn: a long segment takes several, the app writes in between.
      for (;;) {
        const outcome = this.write("applying", () => {
          this.sealEverything();
          const r = this.applier.applySegment(segment, s.key, deadline());
          setMeta(this.db, "hlc", this.o.clock.current);
          return r;
        });
        applied += outcome.applied;
        this.o.metrics.inc("unisync_records_applied_total", outcome.applied);
        if (outcome.done || stop()) break;
      }
      this.o.metrics.inc("unisync_segments_applied_total");
      if (segment.records.length < s.segment.records.length) break;
    }
    // Children that arrived before their parent wait for it: the parent may be in what just applied.
    if (applied > 0) {
      this.retryParked("row");
      this.reportEnrolmentDifferences();
    }
    this.tailProblems.update(origin, problem());
    this.logEnds.pulled(origin, known, seen, maxSegments, problem());
    this.reportUnplaced();
    // References are repaired once every origin's log is applied as far as it goes (Applier.mayRepair), in turns.
    while (!stop() && this.applier.referencesDue()) this.write("repairing references", () => (this.sealEverything(), this.applier.checkReferences()));
    return applied;
  }

  private readonly logEnds = new LogEnds();

  /** Origins whose logs must be applied as far as they go before references are repaired (beside every origin pulled so far). */
  private expectedOrigins: readonly string[] = [];

  /** Names the cluster's origins (the agent's listing, a catch-up's origins): until each is pulled, no reference repair. */
  expectOrigins(origins: readonly string[]): void {
    this.expectedOrigins = origins;
  }

  /** References the app wrote while this database enrolled that cannot follow their row (ChangeDrain.unplaced). */
  get unplacedReferences(): number {
    return this.drain.unplaced.count;
  }

  private unplacedReported = 0;

  /** Warns at the first such reference, and with the total when enrolment ends. */
  private reportUnplaced(final = false): void {
    const { count, first } = this.drain.unplaced;
    if (count === 0 || (!final && this.unplacedReported > 0)) return;
    this.unplacedReported = count;
    this.log.warn(
      { references: count, first },
      final
        ? "while this database enrolled, the app wrote rows pointing at rows the log had not reached yet; any of those the log moved (id collisions) is now named by the old id, the same on every node: check them (`unisync conflicts` lists the moves)"
        : "the app writes rows pointing at rows of this database while it enrols: if the log moves such a row (an id collision), the reference keeps the old id and names another row on every node. Start the app after `unisync status` stops saying enrolling (README, \"Joining with data\")",
    );
  }

  /** Whether the last pull of each of these origins applied all the store held. */
  caughtUp(origins: readonly string[]): boolean {
    return this.logEnds.caughtUp(origins);
  }

  cursor(origin: string) {
    return this.applier.cursor(origin);
  }

  cursors() {
    return this.applier.cursors();
  }

  pendingChanges(): number {
    return this.drain.pendingCount();
  }

  /** Captured changes not sealed yet (SyncStream). */
  unsentChanges(): number {
    return this.pendingChanges();
  }

  parkedCount(): number {
    return Number((this.db.prepare("SELECT count(*) AS n FROM _unisync_parked").get() as { n: number }).n);
  }

  /** Rows moved by id collisions (live ones; includes rows deleted since) and rows set aside by unique clashes. */
  conflictCounts(): { moved: number; setAside: number } {
    const count = (sql: string) => Number((this.db.prepare(sql).get() as { n: number }).n);
    return { moved: count("SELECT count(*) AS n FROM _unisync_moves WHERE live = 1"), setAside: count("SELECT count(*) AS n FROM _unisync_conflicts") };
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
