/**
 * What tailing costs the store (issue 10), from each agent's own request
 * counts (/status.json storeRequests.total, deltas over a window):
 *  - idle: 3 agent processes (default settings), each with 5 databases and the
 *    folder stream (6 streams), nothing changing; on the file store, moto and
 *    s3rver. Target <= 0.5 requests per node per second.
 *  - origins: one agent (the reader, 6 streams) and N-1 light fake writers in
 *    this process that put valid segments and index pointers straight into the
 *    store, one segment every 30-60 s each, in a stream the reader does not
 *    hold (so what is measured is the cost of tailing, not of fetching data);
 *    N = 3, 50, 100, and 100 origins that wrote once and then stay quiet.
 *    Target <= 0.5 requests per second whatever N.
 *  - busy: the same 3-agent clusters while an app inserts a row every 20-50 ms
 *    on every node. Target <= 2 LIST per node per second; GET and PUT shown.
 * The idle clusters and the origin readers run side by side (a 2-CPU machine
 * barely notices idle agents); the busy phases run one store at a time.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { DEFAULTS } from "../src/agent/config.js";
import { publishPointer } from "../src/log/index.js";
import { segmentKey } from "../src/log/keys.js";
import { sealSegment } from "../src/log/segment.js";
import { openStore } from "../src/store/url.js";
import { REQUEST_KINDS, type ObjectStore, type RequestKind } from "../src/store/store.js";
import { MOTO_ENV, startMoto } from "../test/helpers/moto.js";
import {
  agentStatus,
  createDb,
  insertItems,
  ITEMS_INSERT,
  itemRow,
  result,
  s3Url,
  S3RVER_ENV,
  sleep,
  startAgent,
  startS3rverProcess,
  type AgentProcess,
  type AgentStatusJson,
  type Bench,
  type Ctx,
  type Result,
} from "./lib.js";

const DBS = 5;
/** The fake origins' stream: no agent holds it, so the reader only ever sees its pointers. */
const FAKE_STREAM = "fake-origin.db";

interface StoreUnderTest {
  kind: string;
  url(prefix: string): string;
  env: Record<string, string>;
  stop(): Promise<void>;
}

/** One agent's requests per second over a window, by kind, with what its planner listed and why. */
interface NodeRates {
  node: string;
  perKind: Record<RequestKind, number>;
  all: number;
  indexPolls: number;
  listings: Record<string, number>;
  pollIntervalMs: number;
}

async function snapshotAll(agents: AgentProcess[]): Promise<AgentStatusJson[]> {
  return await Promise.all(agents.map(agentStatus));
}

function ratesBetween(agents: AgentProcess[], before: AgentStatusJson[], after: AgentStatusJson[], seconds: number): NodeRates[] {
  return agents.map((a, i) => {
    const b = before[i]!;
    const e = after[i]!;
    const perKind = Object.fromEntries(REQUEST_KINDS.map((k) => [k, (e.storeRequests.total[k] - b.storeRequests.total[k]) / seconds])) as Record<RequestKind, number>;
    const listings = Object.fromEntries(Object.entries(e.tailing.listings).map(([why, n]) => [why, n - (b.tailing.listings[why] ?? 0)]));
    return {
      node: a.name,
      perKind,
      all: REQUEST_KINDS.reduce((s, k) => s + perKind[k], 0),
      indexPolls: e.tailing.indexPolls - b.tailing.indexPolls,
      listings,
      pollIntervalMs: e.tailing.pollIntervalMs,
    };
  });
}

/** Counts every agent's requests over `ms`; requests per second per node. */
async function measureWindow(agents: AgentProcess[], ms: number): Promise<{ seconds: number; nodes: NodeRates[] }> {
  const before = await snapshotAll(agents);
  const t = performance.now();
  await sleep(ms);
  const after = await snapshotAll(agents);
  const seconds = (performance.now() - t) / 1000;
  return { seconds, nodes: ratesBetween(agents, before, after, seconds) };
}

const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / xs.length;
const round3 = (x: number) => Math.round(x * 1000) / 1000;

function perKindMean(nodes: NodeRates[]): Record<RequestKind, number> {
  return Object.fromEntries(REQUEST_KINDS.map((k) => [k, round3(mean(nodes.map((n) => n.perKind[k])))])) as Record<RequestKind, number>;
}

function describe(nodes: NodeRates[]): string {
  const k = perKindMean(nodes);
  return `${round3(mean(nodes.map((n) => n.all)))} req/node/s (${REQUEST_KINDS.map((x) => `${x} ${k[x]}`).join(", ")}); index polls ${nodes.map((n) => n.indexPolls).join("/")}, listings ${nodes.map((n) => JSON.stringify(n.listings)).join(" ")}`;
}

/**
 * Waits until every agent finished its first round, uploaded everything, and
 * (if `idle`) backed off to pollMaxMs; at least `minMs` in all. Returns how long it took.
 */
async function settle(ctx: Ctx, label: string, agents: AgentProcess[], opts: { minMs: number; idle: boolean; timeoutMs: number }): Promise<number> {
  const t = Date.now();
  for (;;) {
    const all = await snapshotAll(agents);
    const done = all.every((s) => {
      const streams = [...s.databases, ...(s.files ? [s.files] : [])];
      return (
        s.tailing.indexPolls >= 2 &&
        s.databases.every((d) => !d.enrolling) &&
        streams.every((x) => x.pendingChanges === 0 && x.outboxSegments === 0) &&
        (!opts.idle || s.tailing.pollIntervalMs >= DEFAULTS.pollMaxMs)
      );
    });
    const waited = Date.now() - t;
    if (done && waited >= opts.minMs) return waited;
    if (waited > opts.timeoutMs) {
      ctx.log(`${label}: not settled after ${opts.timeoutMs / 1000} s (poll intervals ${all.map((s) => s.tailing.pollIntervalMs).join("/")} ms); measuring anyway`);
      return waited;
    }
    await sleep(1000);
  }
}

/** An instance folder like a small app's: 5 databases with a few rows each (ids distinct per node) and a couple of files. */
function makeInstance(dir: string, nodeIndex: number): void {
  mkdirSync(join(dir, "docs"), { recursive: true });
  for (let d = 0; d < DBS; d++) {
    const path = join(dir, `app-${d}.db`);
    createDb(path);
    const db = new Database(path);
    const first = (nodeIndex + 1) * 1_000_000 + 1;
    insertItems(db, first, first + 4, 5);
    db.close();
  }
  writeFileSync(join(dir, `notes-${nodeIndex}.txt`), `notes of node ${nodeIndex}\n`);
  writeFileSync(join(dir, "docs", `readme-${nodeIndex}.md`), `# node ${nodeIndex}\n`.repeat(20));
}

interface Cluster {
  kind: string;
  agents: AgentProcess[];
  instances: string[];
}

async function startCluster(ctx: Ctx, name: string, storeUrl: string, env: Record<string, string>, nodes: number): Promise<Cluster> {
  const dir = ctx.tmp(`tailing-${name}`);
  const instances: string[] = [];
  const agents: AgentProcess[] = [];
  for (let i = 0; i < nodes; i++) {
    const inst = join(dir, `n${i}`);
    makeInstance(inst, i);
    instances.push(inst);
    agents.push(startAgent(`n${i}`, inst, storeUrl, join(dir, `n${i}.log`), env));
  }
  await Promise.race([Promise.all(agents.map((a) => a.ready)), sleep(60_000).then(() => Promise.reject(new Error(`${name}: agents not ready after 60 s`)))]);
  return { kind: name, agents, instances };
}

/**
 * Origins that only write: each puts a valid segment (sealed and named by its
 * hash, as an outbox would) and its index pointer, as an agent's upload does.
 * No seq claims and no heartbeats: a reader never reads either.
 */
class FakeOrigins {
  private readonly seqs: number[];
  private readonly timers = new Set<NodeJS.Timeout>();
  private stopped = false;
  written = 0;
  failures = 0;

  constructor(
    private readonly store: ObjectStore,
    readonly count: number,
  ) {
    this.seqs = Array.from({ length: count }, () => 0);
  }

  private async write(i: number): Promise<void> {
    const origin = `fake-${String(i).padStart(3, "0")}`;
    const seq = ++this.seqs[i]!;
    const { bytes, sha256 } = sealSegment({ origin, stream: FAKE_STREAM, seq, createdMs: Date.now(), records: [] });
    await this.store.put(segmentKey(origin, FAKE_STREAM, seq, sha256), bytes);
    await publishPointer(this.store, Date.now(), origin, FAKE_STREAM, [{ seq, sha256 }]);
    this.written++;
  }

  /** Every origin writes its first segment (so the reader finds them under log/ at start). */
  async seed(): Promise<void> {
    for (let i = 0; i < this.count; i++) await this.write(i);
  }

  /** From now on each origin writes one segment every minMs..maxMs (random, so they do not all write together). */
  start(minMs: number, maxMs: number): void {
    const next = (i: number) => {
      if (this.stopped) return;
      const t = setTimeout(() => {
        this.timers.delete(t);
        if (this.stopped) return;
        this.write(i).then(
          () => next(i),
          () => (this.failures++, next(i)),
        );
      }, minMs + Math.random() * (maxMs - minMs));
      this.timers.add(t);
    };
    for (let i = 0; i < this.count; i++) next(i);
  }

  stop(): void {
    this.stopped = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }
}

interface OriginsRun {
  label: string;
  origins: number;
  fakes: FakeOrigins;
  reader: Cluster;
  /** Fake origins keep writing (else they wrote once and stay quiet). */
  active: boolean;
}

async function startOriginsRun(ctx: Ctx, origins: number, active: boolean): Promise<OriginsRun> {
  const label = `${origins}${active ? "" : "-quiet"}`;
  const root = ctx.tmp(`tailing-origins-${label}-store`);
  const fakes = new FakeOrigins(openStore(`file://${root}`), origins - 1);
  await fakes.seed();
  const reader = await startCluster(ctx, `origins-${label}`, `file://${root}`, {}, 1);
  if (active) fakes.start(30_000, 60_000);
  return { label, origins, fakes, reader, active };
}

/** An app on every node inserting one row every 20-50 ms into app-0.db, until stopped. */
function startApps(cluster: Cluster): { stop(): Promise<number> } {
  let stopped = false;
  let rows = 0;
  const loops = cluster.instances.map(async (inst, n) => {
    const db = new Database(join(inst, "app-0.db"), { timeout: 5000 });
    const insert = db.prepare(ITEMS_INSERT);
    let id = (n + 1) * 10_000_000;
    try {
      while (!stopped) {
        insert.run(...itemRow(++id));
        rows++;
        await sleep(20 + Math.random() * 30);
      }
    } finally {
      db.close();
    }
  });
  return {
    async stop() {
      stopped = true;
      await Promise.all(loops);
      return rows;
    },
  };
}

async function startStores(ctx: Ctx): Promise<StoreUnderTest[]> {
  const fileRoot = ctx.tmp("tailing-file-store");
  const stores: StoreUnderTest[] = [{ kind: "file", url: () => `file://${fileRoot}`, env: {}, stop: async () => undefined }];
  const moto = await startMoto("unisync-bench");
  stores.push({ kind: "moto", url: (p) => s3Url(moto.endpoint, moto.bucket, p), env: { ...MOTO_ENV }, stop: () => moto.stop() });
  const s3 = await startS3rverProcess();
  stores.push({ kind: "s3rver", url: (p) => s3Url(s3.endpoint, s3.bucket, p), env: { ...S3RVER_ENV }, stop: () => s3.stop() });
  return stores;
}

export const tailing: Bench = {
  name: "tailing",
  title: "store requests of tailing: idle 3-node clusters, 3/50/100 origins, busy clusters (agent processes, default settings)",
  async run(ctx: Ctx): Promise<Result[]> {
    const idleMs = ctx.quick ? 20_000 : 60_000;
    const busyMs = ctx.quick ? 10_000 : 20_000;
    const results: Result[] = [];
    const stores = await startStores(ctx);
    const clusters: Cluster[] = [];
    const originRuns: OriginsRun[] = [];
    try {
      // Everything idle starts together: the clusters, then the origin readers.
      for (const s of stores) clusters.push(await startCluster(ctx, s.kind, s.url("tailing"), s.env, 3));
      for (const [n, active] of [[3, true], [50, true], [100, true], [100, false]] as const) originRuns.push(await startOriginsRun(ctx, n, active));
      ctx.log(`tailing: ${clusters.length} clusters of 3 and ${originRuns.length} origin readers started; settling`);

      // Settle: first rounds done, uploads done, idle clusters backed off to pollMaxMs (their own writes hold them busy 30 s).
      const settled = await Promise.all([
        ...clusters.map((c) => settle(ctx, c.kind, c.agents, { minMs: 20_000, idle: true, timeoutMs: 120_000 })),
        // Active fake origins keep the reader's pointers fresh: it never backs off fully, so only wait for its first rounds.
        ...originRuns.map((r) => settle(ctx, `origins ${r.label}`, r.reader.agents, { minMs: 20_000, idle: !r.active, timeoutMs: 120_000 })),
      ]);
      ctx.log(`tailing: settled after ${settled.map((ms) => (ms / 1000).toFixed(0)).join("/")} s; measuring ${idleMs / 1000} s with nothing changing`);

      // One window for all of them.
      const windows = await Promise.all([...clusters, ...originRuns.map((r) => r.reader)].map((c) => measureWindow(c.agents, idleMs)));
      clusters.forEach((c, i) => {
        const w = windows[i]!;
        ctx.log(`tailing idle ${c.kind}: ${describe(w.nodes)}`);
        const detail = { windowS: round3(w.seconds), perKindPerNode: perKindMean(w.nodes), nodes: w.nodes, settledS: settled[i]! / 1000 };
        results.push(
          result({ name: `tailing.idle.${c.kind}.req_per_node_s`, value: mean(w.nodes.map((n) => n.all)), unit: "req/s", target: { on: "value", op: "<=", limit: 0.5 }, detail }),
          result({ name: `tailing.idle.${c.kind}.list_per_node_s`, value: mean(w.nodes.map((n) => n.perKind.LIST)), unit: "LIST/s" }),
        );
      });
      // Gap repair should list one stream of one origin every repairEveryMs on every node.
      const idleNodes = windows.slice(0, clusters.length).flatMap((w) => w.nodes.map((n) => ({ n, seconds: w.seconds })));
      results.push(
        result({
          name: "tailing.idle.repair_listings_per_node_min",
          value: mean(idleNodes.map(({ n, seconds }) => ((n.listings.repair ?? 0) * 60) / seconds)),
          unit: "LIST/min",
          baseline: 60_000 / DEFAULTS.repairEveryMs,
          baselineLabel: "60 s / repairEveryMs",
        }),
      );
      originRuns.forEach((r, j) => {
        const w = windows[clusters.length + j]!;
        const node = w.nodes[0]!;
        ctx.log(`tailing origins ${r.label}: reader ${describe(w.nodes)}; poll interval at the end ${node.pollIntervalMs} ms; fake segments written ${r.fakes.written} (failures ${r.fakes.failures})`);
        results.push(
          result({
            name: `tailing.origins.${r.label}.reader_req_s`,
            value: node.all,
            unit: "req/s",
            target: { on: "value", op: "<=", limit: 0.5 },
            detail: { windowS: round3(w.seconds), origins: r.origins, fakeWriting: r.active ? "one segment every 30-60 s each" : "quiet", perKind: node.perKind, listings: node.listings, indexPolls: node.indexPolls, pollIntervalMsAtEnd: node.pollIntervalMs },
          }),
        );
      });
      for (const r of originRuns) r.fakes.stop();
      await Promise.all(originRuns.map((r) => Promise.all(r.reader.agents.map((a) => a.stop()))));
      originRuns.length = 0;

      // Busy: one cluster at a time (2 CPUs), the others idle meanwhile.
      for (const c of clusters) {
        const apps = startApps(c);
        await sleep(5000); // past the switch from idle to busy polling
        const w = await measureWindow(c.agents, busyMs);
        const rows = await apps.stop();
        const k = perKindMean(w.nodes);
        // More LISTs than index polls: a poll re-lists the whole overlap window, one LIST per 1,000 pointers in it.
        const pollsPerS = mean(w.nodes.map((n) => n.indexPolls)) / w.seconds;
        ctx.log(`tailing busy ${c.kind}: ${describe(w.nodes)}; ${(k.LIST / pollsPerS).toFixed(2)} LIST per index poll; ${rows} rows inserted in all`);
        const detail = { windowS: round3(w.seconds), perKindPerNode: k, indexPollsPerNodeS: round3(pollsPerS), nodes: w.nodes, rowsInserted: rows, insertEveryMs: "20-50 per node" };
        results.push(
          result({ name: `tailing.busy.${c.kind}.list_per_node_s`, value: k.LIST, unit: "LIST/s", baseline: pollsPerS, baselineLabel: "index polls/s", target: { on: "value", op: "<=", limit: 2 }, detail }),
          result({ name: `tailing.busy.${c.kind}.get_per_node_s`, value: k.GET, unit: "GET/s" }),
          result({ name: `tailing.busy.${c.kind}.put_per_node_s`, value: k.PUT, unit: "PUT/s" }),
        );
        await Promise.all(c.agents.map((a) => a.stop()));
        const errors = c.agents.flatMap((a) => a.errors);
        if (errors.length) ctx.log(`tailing ${c.kind}: agents logged ${errors.length} error(s), first: ${errors[0]}`);
      }
      clusters.length = 0;
    } finally {
      for (const r of originRuns) r.fakes.stop();
      await Promise.all([...clusters, ...originRuns.map((r) => r.reader)].flatMap((c) => c.agents.map((a) => a.stop())));
      for (const s of stores) await s.stop();
    }
    return results;
  },
};
