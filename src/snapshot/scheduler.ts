/**
 * The agent's snapshot loop: a snapshot every `intervalMs`, one soon after the
 * start when the store holds none of this node yet (the baseline a new node or
 * a point-in-time restore starts from), and one whenever `unisync snapshot`
 * asks through a request file. One snapshot at a time.
 */
import type { Logger } from "pino";
import type { ObjectStore } from "../store/store.js";
import { answerRequest, pendingRequests } from "./agentlink.js";
import { takeSnapshot, type DbSource, type SnapshotResult, type StreamSource } from "./create.js";
import { listSnapshots } from "./format.js";

export interface SchedulerOptions {
  instanceDir: string;
  workDir: string;
  node: string;
  store: ObjectStore;
  log: Logger;
  intervalMs: number;
  /** The streams as they are now (databases come and go). */
  sources: () => { dbs: DbSource[]; files: StreamSource | null };
  stopping: () => boolean;
  /** Delay of the first snapshot when this node has none in the store. */
  firstDelayMs?: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export class SnapshotScheduler {
  private running: Promise<SnapshotResult> | null = null;

  constructor(private readonly o: SchedulerOptions) {}

  /** Takes a snapshot now (or joins the one in progress). */
  snapshotNow(): Promise<SnapshotResult> {
    if (this.running) return this.running;
    const { dbs, files } = this.o.sources();
    const t0 = Date.now();
    this.running = takeSnapshot({ node: this.o.node, store: this.o.store, dbs, files, workDir: this.o.workDir, upload: "wait", abort: this.o.stopping })
      .then((r) => {
        this.o.log.info({ key: r.key, bytes: r.bytes, databases: r.manifest.databases.length, files: r.manifest.files?.manifest.count ?? 0, ms: Date.now() - t0 }, "snapshot published");
        return r;
      })
      .finally(() => {
        this.running = null;
      });
    return this.running;
  }

  async run(): Promise<void> {
    let next = Date.now() + (this.o.intervalMs || Infinity);
    if (this.o.intervalMs > 0) {
      try {
        const mine = (await listSnapshots(this.o.store)).some((s) => s.node === this.o.node);
        if (!mine) next = Date.now() + (this.o.firstDelayMs ?? 10_000);
      } catch {
        // store down: the regular interval applies
      }
    }
    while (!this.o.stopping()) {
      await sleep(250);
      for (const id of pendingRequests(this.o.instanceDir)) {
        try {
          const r = await this.snapshotNow();
          answerRequest(this.o.instanceDir, id, { ok: true, key: r.key, bytes: r.bytes, hlc: r.manifest.hlc });
        } catch (err) {
          answerRequest(this.o.instanceDir, id, { ok: false, error: (err as Error).message });
        }
      }
      if (Date.now() >= next && !this.o.stopping()) {
        next = Date.now() + this.o.intervalMs;
        await this.snapshotNow().catch((err: Error) => this.o.log.warn({ err: err.message }, "snapshot failed; next try at the next interval"));
      }
    }
  }
}
