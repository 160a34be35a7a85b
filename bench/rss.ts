/**
 * Agent memory while syncing a bulk load: the app on node A inserts N rows in
 * transactions of 10k, agent A ships them to a file store, agent B applies
 * them. Both agents' VmRSS is sampled from /proc every 200 ms; VmHWM (the
 * kernel's peak RSS) is read just before they stop. Baselines: each agent's
 * RSS once started and idle; for the end-to-end time (first insert on A to
 * last row visible on B) and for the app's own insert time on A, a raw local
 * insert of the same rows (no triggers, no agent).
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { createDb, insertItems, percentile, procMemory, result, sleep, startAgent, type Bench, type Ctx, type Result } from "./lib.js";

const TXN = 10_000;

export const rss: Bench = {
  name: "rss",
  title: "agent memory while syncing a bulk load (file store)",
  async run(ctx: Ctx): Promise<Result[]> {
    const n = ctx.quick ? 20_000 : ctx.full ? 1_000_000 : 200_000;
    const dir = ctx.tmp("rss");

    // Baseline: the raw local insert.
    createDb(join(dir, "raw.db"));
    const raw = new Database(join(dir, "raw.db"));
    let t = performance.now();
    insertItems(raw, 1, n, TXN);
    const rawMs = performance.now() - t;
    raw.close();

    const store = join(dir, "store");
    const inst = { A: join(dir, "a"), B: join(dir, "b") };
    for (const d of Object.values(inst)) {
      mkdirSync(d);
      createDb(join(d, "app.db"));
    }
    const agents = (["A", "B"] as const).map((name) => startAgent(name, inst[name], `file://${store}`, join(dir, `${name}.log`)));
    const samples: { t: number; A: number; B: number }[] = [];
    let sampler: NodeJS.Timeout | undefined;
    try {
      await Promise.all(agents.map((a) => a.ready));
      await sleep(1000); // let start-up allocations settle
      const idle = agents.map((a) => procMemory(a.pid)?.rssMb ?? NaN);
      const t0 = performance.now();
      sampler = setInterval(() => {
        const [a, b] = agents.map((x) => procMemory(x.pid)?.rssMb ?? NaN);
        samples.push({ t: performance.now() - t0, A: a, B: b });
      }, 200);

      // The app: transactions of 10k rows, yielding between them so sampling goes on.
      const app = new Database(join(inst.A, "app.db"), { timeout: 30_000 });
      const txnMs: number[] = []; // each includes waiting for the write lock (agent A seals in its own transactions)
      for (let a = 1; a <= n; a += TXN) {
        const ts = performance.now();
        insertItems(app, a, Math.min(n, a + TXN - 1), TXN);
        txnMs.push(performance.now() - ts);
        await sleep(0);
      }
      app.close();
      const insertMs = performance.now() - t0;

      const replica = new Database(join(inst.B, "app.db"), { readonly: true });
      const maxId = replica.prepare("SELECT coalesce(max(id), 0) FROM items").pluck();
      const deadline = Date.now() + (ctx.full ? 1800_000 : 600_000);
      let lastLog = 0;
      while ((maxId.get() as number) < n) {
        if (Date.now() > deadline) throw new Error(`node B has ${String(maxId.get())} of ${n} rows at the deadline`);
        if (Date.now() - lastLog > 10_000) {
          lastLog = Date.now();
          ctx.log(`rss: node B at ${String(maxId.get())}/${n} rows, ${((performance.now() - t0) / 1000).toFixed(0)} s`);
        }
        await sleep(50);
      }
      const e2eMs = performance.now() - t0;
      const count = replica.prepare("SELECT count(*) FROM items").pluck().get() as number;
      replica.close();
      if (count !== n) throw new Error(`node B has ${count} rows, expected ${n}`);
      clearInterval(sampler);
      const hwm = agents.map((a) => procMemory(a.pid)?.hwmMb ?? NaN);
      const maxSampled = (k: "A" | "B") => Math.max(...samples.map((s) => s[k]).filter(Number.isFinite));
      ctx.log(
        `rss: ${n} rows end-to-end ${(e2eMs / 1000).toFixed(1)} s (app insert ${(insertMs / 1000).toFixed(1)} s, ` +
          `its ${TXN}-row txns p50 ${percentile(txnMs, 50).toFixed(0)} ms max ${Math.max(...txnMs).toFixed(0)} ms; raw ${(rawMs / 1000).toFixed(1)} s); ` +
          `A idle ${idle[0].toFixed(0)} max ${maxSampled("A").toFixed(0)} hwm ${hwm[0].toFixed(0)} MB; B idle ${idle[1].toFixed(0)} max ${maxSampled("B").toFixed(0)} hwm ${hwm[1].toFixed(0)} MB`,
      );
      const errors = agents.flatMap((a) => a.errors);
      return [
        ...(["A", "B"] as const).map((k, i) =>
          result({
            name: `rss.agent${k}.peak`,
            value: hwm[i],
            unit: "MB",
            baseline: idle[i],
            baselineLabel: "idle agent RSS",
            target: { on: "value", op: "<", limit: 300 },
            detail: { maxSampledMb: maxSampled(k), role: k === "A" ? "captures and uploads" : "applies" },
          }),
        ),
        result({
          name: "rss.app_insert_with_agents",
          value: insertMs / 1000,
          unit: "s",
          baseline: rawMs / 1000,
          baselineLabel: "raw local insert",
          detail: {
            note: "the app's own insert time on node A while both agents run (triggers + waiting for the agent's seal transactions + CPU shared with the agents)",
            txnP50Ms: percentile(txnMs, 50),
            txnMaxMs: Math.max(...txnMs),
            rawTxnMs: rawMs / Math.ceil(n / TXN),
            txnMs,
          },
        }),
        result({
          name: "rss.end_to_end",
          value: e2eMs / 1000,
          unit: "s",
          baseline: rawMs / 1000,
          baselineLabel: "raw local insert",
          detail: { n, txn: TXN, appInsertMs: insertMs, rawMs, e2eMs, errors, samples },
        }),
      ];
    } finally {
      if (sampler) clearInterval(sampler);
      await Promise.all(agents.map((a) => a.stop()));
    }
  },
};
