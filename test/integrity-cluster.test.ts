/**
 * Referential integrity and old copies, end to end: agent processes on s3rver and,
 * on each node, test/apps/flask_scout.py (Flask-SQLAlchemy, PRAGMA foreign_keys on):
 * scout.db holds match (natural ids: the match number 1..12), scouting (child of
 * match, ON DELETE CASCADE, uid UNIQUE) and kv; extra.db holds comment. Every node
 * starts from a copy of one database made by `flask_scout.py --init` (the way an
 * app is put on a second server), and every agent lists `match` in
 * naturalKeyTables (UNISYNC_NATURAL_KEY_TABLES).
 *
 * 1. A node that joins late from an old copy (last night's backup, with rows of
 *    its own added) does not drag the cluster back: the newer kv value and the
 *    deleted match (and its cascaded scouting rows) win, its own rows spread.
 * 2. Three nodes write at once through the app (get-or-create matches, scouting
 *    rows for existing matches, edits, match deletes that cascade, kv, comments),
 *    in three rounds; during round 2 n3's agent is stopped while its app keeps
 *    writing (a whole further batch before the agent starts again), so n3's
 *    scouting inserts certainly race n1's and n2's match deletes. Round 3 runs
 *    while n3 catches up.
 *    Afterwards every node holds identical tables, every scouting row no one
 *    deleted is there once, and PRAGMA foreign_key_check finds no orphan: a
 *    delete that raced a child's insert is undone (the match comes back).
 *
 * KEEP_CLUSTER=1 keeps the folders, journals and logs (kept anyway when a test fails).
 */
import { copyFileSync, existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { describe, expect, it } from "vitest";
import { appSucceeded, clusterSuite, integrityCheck, runApp, waitFor, type AppRun, type Cluster } from "./helpers/cluster.js";
import { runCli } from "./helpers/cluster.js";

const DBS = ["scout.db", "extra.db"];
/** Every agent of both scenarios: the match number is the same match on every node. */
const AGENT_ENV = { UNISYNC_NATURAL_KEY_TABLES: "match" };

const suite = clusterSuite();

/** One line of flask_scout.py's journal (see its docstring). */
interface Entry {
  node: string;
  /** Wall-clock seconds just after the commit. */
  t: number;
  op: "insert" | "update" | "delete" | "set";
  table: "match" | "scouting" | "kv" | "comment";
  seed?: boolean;
  uid?: string;
  /** Match number: of the match (table match) or of the scouting row's match. */
  id?: number;
  ids?: number[];
  match?: number;
  cascade?: string[];
  k?: string;
  v?: string;
}

const readJournal = (path: string): Entry[] =>
  existsSync(path) ? readFileSync(path, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as Entry) : [];

const rows = (path: string, sql: string, ...params: unknown[]) => {
  const db = new Database(path, { readonly: true, fileMustExist: true });
  try {
    return db.prepare(sql).all(...params) as Record<string, unknown>[];
  } finally {
    db.close();
  }
};

/**
 * PRAGMA foreign_key_check of a database, each row described for a failure message
 * (for scouting rows also the uid and match_id, since ids may differ between runs).
 */
function foreignKeyProblems(path: string): string[] {
  const db = new Database(path, { readonly: true, fileMustExist: true });
  try {
    const found = db.prepare("PRAGMA foreign_key_check").all() as { table: string; rowid: number; parent: string; fkid: number }[];
    return found.map((r) => {
      const row = r.table === "scouting" ? db.prepare("SELECT uid, match_id FROM scouting WHERE rowid = ?").get(r.rowid) : undefined;
      return `${r.table} rowid ${r.rowid} -> missing ${r.parent} (fk ${r.fkid})${row ? ` ${JSON.stringify(row)}` : ""}`;
    });
  } finally {
    db.close();
  }
}

/** Runs flask_scout.py on an instance folder (one-shot modes), journaling into `journal`. */
async function scout(instanceDir: string, args: string[], journal: string, name: string): Promise<void> {
  const run = runApp("flask_scout.py", [instanceDir, ...args, "--journal-file", journal], join(instanceDir, "..", "apps.log"));
  await appSucceeded(run, `flask_scout.py ${args.join(" ")} (${name})`);
}

/** Creates the app's databases in ROOT/seed (`--init`), once per cluster; returns that folder. */
async function seedDatabases(c: Cluster): Promise<string> {
  const dir = join(c.root, "seed", "instance");
  mkdirSync(dir, { recursive: true });
  await scout(dir, ["--init"], join(c.root, "seed", "journal.jsonl"), "seed");
  // The app runs in SQLite's default rollback-journal mode: the .db files are complete copies.
  for (const f of DBS) expect(existsSync(join(dir, `${f}-wal`)), `${f}-wal in the seed folder`).toBe(false);
  return dir;
}

/**
 * Gives node `name` copies of the app's databases from `fromDir`, lets `prepare` write
 * in them (the app, before any agent ran there), then starts the node's agent for the
 * first time. (Cluster.addNode starts an agent beside a folder it creates; it keeps
 * what the folder already holds.)
 */
async function joinWithCopies(c: Cluster, name: string, fromDir: string, prepare?: (instanceDir: string) => Promise<void>): Promise<void> {
  const instanceDir = join(c.root, name, "instance");
  mkdirSync(instanceDir, { recursive: true });
  for (const f of DBS) copyFileSync(join(fromDir, f), join(instanceDir, f));
  await prepare?.(instanceDir);
  await c.addNode(name);
}

const journalOf = (c: Cluster, name: string) => join(c.root, name, "journal.jsonl");

describe("integrity with a Flask-SQLAlchemy app (foreign keys on, natural match ids)", () => {
  it("a node that joins late from an old copy does not drag the cluster back", async (ctx) => {
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    process.env.SQLALCHEMY_SILENCE_UBER_WARNING = "1";
    const t0 = Date.now();
    // No node yet: each joins from a folder prepared before its agent's first start.
    const c = await suite.start([], "latejoin", { env: AGENT_ENV });
    try {
      const seed = await seedDatabases(c);
      const seedJournal = readJournal(join(c.root, "seed", "journal.jsonl"));
      const match3Seed = seedJournal.filter((e) => e.table === "scouting" && e.match === 3).map((e) => e.uid!);
      expect(match3Seed.length).toBe(2);

      // a and b: copies of the fresh databases. The seed folder stays as it is: it is
      // the backup c will start from.
      await joinWithCopies(c, "a", seed);
      await joinWithCopies(c, "b", seed);
      await c.waitForQuiescence(DBS, 30_000);

      // On a, through the app: a newer x, and match 3 deleted (the database cascades
      // to its two scouting rows).
      await scout(c.instance("a"), ["--set", "x", "2026new", "--node", "a"], journalOf(c, "a"), "a");
      await scout(c.instance("a"), ["--delete-match", "3", "--node", "a"], journalOf(c, "a"), "a");
      const del = readJournal(journalOf(c, "a")).find((e) => e.op === "delete" && e.table === "match");
      expect(del?.cascade?.slice().sort(), "the app's cascade removed match 3's seed scouting rows").toEqual(match3Seed.slice().sort());
      // Both edits have reached b, so they are in the store before c's agent starts.
      await waitFor(
        () =>
          rows(c.instance("b", "scout.db"), "SELECT v FROM kv WHERE k = 'x'")[0]?.v === "2026new" &&
          rows(c.instance("b", "scout.db"), "SELECT 1 FROM match WHERE id = 3").length === 0,
        30_000,
        "b to hold x=2026new and no match 3",
      );

      // c: last night's backup (the original files), plus rows of its own written by the
      // app before c's agent ever ran: a scouting row of match 5 and a new kv key.
      await joinWithCopies(c, "c", seed, async (dir) => {
        expect(rows(join(dir, "scout.db"), "SELECT v FROM kv WHERE k = 'x'")[0]?.v).toBe("2025");
        await scout(dir, ["--add-scouting", "5", "--node", "c"], journalOf(c, "c"), "c");
        await scout(dir, ["--set", "c-note", "written on c before its agent started", "--node", "c"], journalOf(c, "c"), "c");
      });
      const cOwn = readJournal(journalOf(c, "c")).find((e) => e.table === "scouting" && e.op === "insert")!.uid!;

      await c.waitForQuiescence(DBS, 90_000);
      for (const db of DBS) await c.waitForConvergence(c.paths(db), 30_000);

      const problems: string[] = [];
      for (const n of ["a", "b", "c"]) {
        const path = c.instance(n, "scout.db");
        const kv = Object.fromEntries(rows(path, "SELECT k, v FROM kv").map((r) => [r.k, r.v]));
        if (kv.x !== "2026new") problems.push(`${n}: kv x = ${JSON.stringify(kv.x)}, not "2026new"`);
        if (kv.y !== "keep") problems.push(`${n}: kv y = ${JSON.stringify(kv.y)}, not "keep"`);
        if (kv["c-note"] !== "written on c before its agent started") problems.push(`${n}: c's kv row c-note is ${JSON.stringify(kv["c-note"])}`);
        if (rows(path, "SELECT 1 FROM match WHERE id = 3").length) problems.push(`${n}: match 3 is back`);
        for (const r of rows(path, "SELECT uid, id FROM scouting WHERE match_id = 3")) problems.push(`${n}: scouting row of match 3 is back: ${JSON.stringify(r)}`);
        for (const uid of match3Seed) {
          for (const r of rows(path, "SELECT uid, match_id FROM scouting WHERE uid = ?", uid)) problems.push(`${n}: cascaded scouting row back: ${JSON.stringify(r)}`);
        }
        const own = rows(path, "SELECT match_id FROM scouting WHERE uid = ?", cOwn);
        if (own.length !== 1 || Number(own[0].match_id) !== 5) problems.push(`${n}: c's scouting row ${cOwn}: ${JSON.stringify(own)} (want once, on match 5)`);
        for (const db of DBS) {
          const ic = integrityCheck(c.instance(n, db));
          if (ic !== "ok") problems.push(`${n}/${db}: integrity_check ${ic}`);
          for (const p of foreignKeyProblems(c.instance(n, db))) problems.push(`${n}/${db}: foreign_key_check: ${p}`);
        }
      }
      expect(problems).toEqual([]);
      expect(c.unexpectedExits).toEqual([]);
      // status says who enrolled rows when and what they did; log shows them as enrolled.
      // Given only the folder, status finds the store and node name the agent was started with on its command line.
      const st = await runCli(["status", c.instance("a"), "--json"]);
      expect(st.code, st.stderr).toBe(0);
      const enrolments = (JSON.parse(st.stdout) as { databases: { stream: string; enrolments: { origin: string; added: number }[] }[] }).databases.find((d) => d.stream === "scout.db")?.enrolments ?? [];
      expect(enrolments.some((e) => e.origin === "c" && e.added > 0), JSON.stringify(enrolments)).toBe(true);
      const human = await runCli(["status", c.instance("a"), "--store", c.options.store]);
      expect(human.stdout).toMatch(/enrolled by c at .*row\(s\) that were there before unisync/);
      const log = await runCli(["log", "--store", c.options.store, "--db", "scout.db", "--table", "kv", "--key", "c-note"]);
      expect(log.stdout).toMatch(/ c +enrol /);
      const bad = c.badLogLines();
      if (bad.length) console.log(`agent log lines at error level (${bad.length}):\n${bad.slice(0, 10).join("\n")}`);
      console.log(`late join: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    } catch (err) {
      suite.keep = true; // (onTestFailed runs only after the finally below)
      throw err;
    } finally {
      // The second scenario starts its own cluster; this one's processes go now.
      await c.destroy(suite.keep);
      suite.cluster = undefined;
    }
  }, 240_000);

  it("three nodes with natural integer ids, one agent stopped and started again, concurrent parent deletes and child writes", async (ctx) => {
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    process.env.SQLALCHEMY_SILENCE_UBER_WARNING = "1";
    const t0 = Date.now();
    const NODES = ["n1", "n2", "n3"];
    const OPS = 150; // requests per node and batch (rounds 1, 2a, 2b; round 3 is shorter)
    const c = await suite.start([], "natural", { env: AGENT_ENV });
    const seed = await seedDatabases(c);
    for (const n of NODES) await joinWithCopies(c, n, seed);
    await c.waitForQuiescence(DBS, 30_000);

    /** Starts the app's random requests on every node at once (`seed` + node index as seeds). */
    const startRound = (label: string, seed: number, ops = OPS): { name: string; run: AppRun }[] =>
      NODES.map((n, i) => ({
        name: `${n} round ${label}`,
        run: runApp(
          "flask_scout.py",
          [c.instance(n), "--ops", String(ops), "--seed", String(seed + i), "--node", n, "--sleep-ms", "10", "--journal-file", journalOf(c, n)],
          join(c.node(n).dir, "apps.log"),
        ),
      }));
    const finish = async (apps: { name: string; run: AppRun }[]) => {
      for (const a of apps) await appSucceeded(a.run, a.name);
    };
    const lines = (n: string) => readJournal(journalOf(c, n)).length;

    // Round 1: every agent runs.
    await finish(startRound("1", 10));

    // Round 2: n3's agent stops once n3's app is under way; the app keeps writing, and
    // once the agent is gone (a clean stop may take seconds) all three apps write one
    // more batch, so n3 certainly writes a whole batch unseen and unaware.
    const before = lines("n3");
    const round2 = startRound("2a", 20);
    await waitFor(() => lines("n3") >= before + 20, 30_000, "n3's app to get going in round 2");
    await c.stop("n3");
    // From here on n3 applies nothing and sends nothing until its restart (after the round).
    const stoppedAt = Date.now() / 1000;
    await finish(round2);
    await finish(startRound("2b", 40));
    const restartedAt = Date.now() / 1000;

    // The app commits what its journal says: with no agent running beside it, n3's
    // database holds exactly what its own offline requests left.
    {
      const j3 = readJournal(journalOf(c, "n3"));
      const offline = j3.filter((e) => e.t > stoppedAt);
      const deletedBy3 = new Set(j3.flatMap((e) => (e.op === "delete" ? (e.table === "scouting" ? [e.uid!] : (e.cascade ?? [])) : [])));
      const have = new Set(rows(c.instance("n3", "scout.db"), "SELECT uid FROM scouting").map((r) => String(r.uid)));
      const wrong: string[] = [];
      for (const e of offline) {
        if (e.table === "scouting" && e.op === "insert" && !deletedBy3.has(e.uid!) && !have.has(e.uid!)) wrong.push(`n3 inserted ${e.uid} offline: missing in n3's database`);
        const gone = e.op === "delete" ? (e.table === "scouting" ? [e.uid!] : (e.cascade ?? [])) : [];
        for (const u of gone) if (have.has(u)) wrong.push(`n3 deleted ${u} offline (${e.table} delete): still in n3's database`);
      }
      expect(offline.length, "n3's app wrote while its agent was stopped").toBeGreaterThan(30);
      expect(wrong).toEqual([]);
    }
    await c.restart("n3");

    // Round 3, short (its match deletes would cascade away much of what the races of
    // round 2 left): every agent runs again, n3 catching up meanwhile.
    await finish(startRound("3", 30, 60));

    await c.waitForQuiescence(DBS, 120_000);
    for (const db of DBS) await c.waitForConvergence(c.paths(db), 30_000);
    const settledAt = Date.now();

    // ---- what the journals say
    const journals = new Map(NODES.map((n) => [n, readJournal(journalOf(c, n))]));
    const all = [...readJournal(join(c.root, "seed", "journal.jsonl")), ...[...journals.values()].flat()];
    const inserted = all.filter((e) => e.table === "scouting" && e.op === "insert").map((e) => e.uid!);
    const deleted = new Set(all.flatMap((e) => (e.op !== "delete" ? [] : e.table === "scouting" ? [e.uid!] : (e.cascade ?? []))));
    const comments = all.filter((e) => e.table === "comment" && e.op === "insert").map((e) => e.uid!);
    const matchDeletes = all.filter((e) => e.table === "match" && e.op === "delete");

    // The race this test is about, certain during n3's offline stretch: n1 or n2 deleted
    // match M while n3 (unaware of it, and unseen by them) added a scouting row to M.
    // (n3's row must go to the match it held, not one n3 itself re-created offline.)
    const margin = 0.1;
    const offlineWindow = (e: Entry) => e.t > stoppedAt + margin && e.t < restartedAt - margin;
    const n3Created = (journals.get("n3") ?? []).filter((e) => e.table === "match" && e.op === "insert" && offlineWindow(e));
    const racing = (ins: Entry) => matchDeletes.filter((d) => d.node !== "n3" && d.id === ins.match && offlineWindow(d));
    /** n3's offline scouting inserts that raced at least one match delete on n1/n2. */
    const raced = (journals.get("n3") ?? [])
      .filter((e) => e.table === "scouting" && e.op === "insert" && offlineWindow(e))
      .filter((e) => !n3Created.some((m) => m.id === e.match && m.t < e.t))
      .filter((e) => racing(e).length > 0);
    /** Those no one deleted afterwards (directly or by a later cascade): their fate is checked below. */
    const racedAlive = raced.filter((e) => !deleted.has(e.uid!));
    console.log(
      `offline n3 scouting inserts that raced a match delete on n1/n2: ${raced.length}, deleted by no one later: ${racedAlive.length}, e.g. ` +
        racedAlive.slice(0, 3).map((e) => `${e.uid} on match ${e.match} vs delete on ${racing(e).map((d) => d.node).join(",")}`).join("; "),
    );

    // ---- checks on every node
    const problems: string[] = [];
    const ref = c.instance("n1", "scout.db");
    for (const n of NODES) {
      const path = c.instance(n, "scout.db");
      const count = new Map<string, number>();
      for (const r of rows(path, "SELECT uid FROM scouting")) count.set(String(r.uid), (count.get(String(r.uid)) ?? 0) + 1);
      for (const [uid, k] of count) if (k > 1) problems.push(`${n}: scouting uid ${uid} ${k} times (phantom duplicate)`);
      for (const uid of inserted) {
        if (deleted.has(uid)) continue;
        const k = count.get(uid) ?? 0;
        if (k !== 1) {
          const e = all.find((x) => x.uid === uid && x.op === "insert")!;
          problems.push(`${n}: scouting ${uid} (inserted on ${e.node} into match ${e.match}, never deleted) is there ${k} times (lost committed write)`);
        }
      }
      const haveComments = new Set(rows(c.instance(n, "extra.db"), "SELECT uid FROM comment").map((r) => String(r.uid)));
      for (const uid of comments) if (!haveComments.has(uid)) problems.push(`${n}: comment ${uid} lost`);
      for (const db of DBS) {
        const ic = integrityCheck(c.instance(n, db));
        if (ic !== "ok") problems.push(`${n}/${db}: integrity_check ${ic}`);
        for (const p of foreignKeyProblems(c.instance(n, db))) problems.push(`${n}/${db}: foreign_key_check: ${p}`);
      }
    }

    // ---- counts for the reader (from n1; every node is identical by now)
    const matchesNow = new Set(rows(ref, "SELECT id FROM match").map((r) => Number(r.id)));
    /** The last journaled event of each match (create or delete, any node, by time). */
    const last = new Map<number, Entry>();
    for (const e of all.filter((x) => x.table === "match" && x.id !== undefined).sort((x, y) => x.t - y.t)) last.set(e.id!, e);
    const cameBack = [...last.values()].filter((e) => e.op === "delete" && matchesNow.has(e.id!)).map((e) => e.id!);
    const scoutingNow = rows(ref, "SELECT uid FROM scouting").map((r) => String(r.uid));
    const resurrected = scoutingNow.filter((u) => deleted.has(u));
    console.log(
      [
        `match deletes: ${matchDeletes.length} (cascading to ${matchDeletes.reduce((s, e) => s + (e.cascade?.length ?? 0), 0)} scouting rows), ` +
          `match creates: ${all.filter((e) => e.table === "match" && e.op === "insert" && !e.seed).length}`,
        `matches now: ${matchesNow.size} [${[...matchesNow].sort((a, b) => a - b).join(",")}]; ` +
          `came back (last journaled event a delete, yet present): ${cameBack.length} [${cameBack.sort((a, b) => a - b).join(",")}]`,
        `scouting rows: ${inserted.length} inserted, ${deleted.size} deleted (directly or by cascade), ${scoutingNow.length} now, ` +
          `${resurrected.length} of them deleted somewhere but kept by a concurrent edit`,
        `offline n3 rows that raced a match delete and no one deleted later: ${racedAlive.length}, ` +
          `their matches present now: ${racedAlive.filter((e) => matchesNow.has(e.match!)).length}/${racedAlive.length}`,
        `comments: ${comments.length}; settled ${((settledAt - t0) / 1000).toFixed(1)} s after start`,
      ].join("\n"),
    );
    const bad = c.badLogLines();
    if (bad.length) console.log(`agent log lines at error level (${bad.length}):\n${bad.slice(0, 10).join("\n")}`);

    expect(problems.slice(0, 80), `${problems.length} problems`).toEqual([]);
    expect(c.unexpectedExits).toEqual([]);
    // The scenario really happened: a match delete raced a scouting insert on another
    // node, and at least one such row lived to the end (so the checks above saw its fate).
    expect(raced.length, "n3's offline scouting inserts that raced a match delete on n1/n2").toBeGreaterThan(0);
    expect(racedAlive.length, "raced scouting rows that no one deleted later").toBeGreaterThan(0);
    console.log(`three nodes: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  }, 300_000);
});
