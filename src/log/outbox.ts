/**
 * Sealed segments wait in _unisync_outbox until the store has them. Sealing
 * fixes the seq, the clocks and the bytes in the same transaction that removes
 * the captured changes, so a crash before or during upload retries the very same
 * object under the very same key: readers never see two different segment Ns.
 */
import type { Database, Statement } from "better-sqlite3";
import { enforcesConditionalWrites, listAll, type ObjectStore } from "../store/store.js";
import { getMeta, setMeta } from "../db/meta.js";
import { hlcToMs, type HybridClock } from "./hlc.js";
import { publishPointer } from "./index.js";
import { claimKey, parseSegmentKey, segmentKey, seqFloorKey, streamPrefix } from "./keys.js";
import { sealSegment, type LogRecord } from "./segment.js";
import type { Vault } from "../keys/vault.js";

/** The store holds segments of this origin that this database did not seal. */
export class LogForkError extends Error {
  override name = "LogForkError";
  readonly code = "LOG_FORK";
}

export interface OutboxEntry {
  seq: number;
  key: string;
  bytes: Buffer;
  records: number;
}

export class Outbox {
  private readonly insertStmt: Statement;
  private readonly firstStmt: Statement;
  private readonly removeStmt: Statement;

  constructor(
    private readonly db: Database,
    readonly origin: string,
    readonly stream: string,
    /** Pointer times never go below what this node's clock has seen (readers' windows follow the newest pointer). */
    private readonly clock?: HybridClock,
    /** A secured cluster's keys: segments are sealed and signed with them. */
    private readonly vault?: Vault,
  ) {
    this.insertStmt = db.prepare("INSERT INTO _unisync_outbox(seq, key, bytes, records, sealed_ms) VALUES (?, ?, ?, ?, ?)");
    this.firstStmt = db.prepare("SELECT seq, key, bytes, records FROM _unisync_outbox ORDER BY seq LIMIT ?");
    this.removeStmt = db.prepare("DELETE FROM _unisync_outbox WHERE seq = ?");
  }

  /** The seq the next sealed segment will get (dense, starting at 1). */
  nextSeq(): number {
    return Number(getMeta(this.db, "next_seq") ?? 1);
  }

  /**
   * Seals records into a segment; must run inside the transaction that drained
   * them. `continues`: the app transaction they belong to may go on in the next.
   */
  seal(records: LogRecord[], nowMs: number, continues = false): OutboxEntry {
    const seq = this.nextSeq();
    const { bytes, sha256 } = sealSegment({ origin: this.origin, stream: this.stream, seq, createdMs: nowMs, records, continues }, this.vault);
    const key = segmentKey(this.origin, this.stream, seq, sha256);
    this.insertStmt.run(seq, key, bytes, records.length, nowMs);
    setMeta(this.db, "next_seq", seq + 1);
    setMeta(this.db, "last_sealed_ms", nowMs);
    return { seq, key, bytes, records: records.length };
  }

  /** When the newest segment was sealed (ms; 0: never): with a reader's cursor time, how far behind the reader is. */
  lastSealedMs(): number {
    return Number(getMeta(this.db, "last_sealed_ms") ?? 0);
  }

  /** The `n` oldest sealed segments, in seq order. */
  oldest(n = 1): OutboxEntry[] {
    const rows = this.firstStmt.all(n) as { seq: number; key: string; bytes: Buffer; records: number }[];
    return rows.map((r) => ({ seq: Number(r.seq), key: r.key, bytes: r.bytes, records: Number(r.records) }));
  }

  size(): { segments: number; records: number } {
    const r = this.db.prepare("SELECT count(*) AS n, coalesce(sum(records), 0) AS r FROM _unisync_outbox").get() as { n: number; r: number };
    return { segments: Number(r.n), records: Number(r.r) };
  }

  /**
   * Puts sealed segments (a few at a time) and one index pointer naming them
   * all, and forgets them once the store has everything (never before). Where
   * the store enforces If-None-Match each seq is claimed first, so two writers
   * under one name cannot both land a seq. A segment itself is a plain put: its
   * key names its bytes, so a retry after a crash writes the same object again.
   */
  async upload(store: ObjectStore, entries: OutboxEntry[], parallel = 4): Promise<void> {
    if (entries.length === 0) return;
    const claims = await enforcesConditionalWrites(store);
    for (let i = 0; i < entries.length; i += parallel) {
      await Promise.all(
        entries.slice(i, i + parallel).map(async (e) => {
          if (claims) await this.claim(store, e);
          await store.put(e.key, e.bytes);
        }),
      );
    }
    const ms = Math.max(Date.now(), this.clock ? hlcToMs(this.clock.current) : 0);
    await publishPointer(store, ms, this.origin, this.stream, entries.map((e) => ({ seq: e.seq, sha256: parseSegmentKey(e.key)!.sha256 })));
    for (const e of entries) this.removeStmt.run(e.seq);
  }

  private async claim(store: ObjectStore, entry: OutboxEntry): Promise<void> {
    const key = claimKey(this.origin, this.stream, entry.seq);
    if ((await store.putIfAbsent(key, Buffer.from(entry.key))) === "created") return;
    const holder = (await store.get(key))?.toString();
    if (holder === entry.key) return; // ours: an earlier try of this very upload
    throw new LogForkError(
      `seq ${entry.seq} of origin "${this.origin}" (${this.stream}) is already claimed in the store by ${holder ?? "a claim that vanished"}, ` +
        `not by this database's segment ${entry.key}. Either another running agent uses the node name "${this.origin}" ` +
        `(give each node its own --node), or this database was restored from an older copy. Refusing to write so that the log does not fork.`,
    );
  }

  /**
   * Refuses to write when the store holds segments of this origin and stream
   * that this database did not seal: two nodes with one name, or a database
   * restored from an older copy. Writing on would fork the log. Segments we
   * sealed may be in the store in any order (uploads run in parallel), so from
   * the oldest unconfirmed one on, every key must be ours: a seq below next_seq
   * and, while still in the outbox, the very key we sealed.
   */
  async checkStoreAgrees(store: ObjectStore): Promise<void> {
    const next = this.nextSeq();
    const from = this.oldest()[0]?.seq ?? next;
    const ours = this.db.prepare("SELECT key FROM _unisync_outbox WHERE seq = ?").pluck(true);
    for await (const obj of listAll(store, streamPrefix(this.origin, this.stream), `${seqFloorKey(this.origin, this.stream, from - 1)}~`)) {
      const name = parseSegmentKey(obj.key);
      if (!name) continue;
      const sealed = name.seq < next ? (ours.get(name.seq) as string | undefined) : undefined;
      if (name.seq < next && (sealed === undefined || sealed === obj.key)) continue;
      throw new LogForkError(
        `the store already holds ${obj.key}, a segment of origin "${this.origin}" that this database did not write ` +
          `(it has sealed up to ${next - 1}). Either two nodes use the name "${this.origin}" (give each its own --node), ` +
          `or this database was restored from an older copy. Refusing to write so that the log does not fork.`,
      );
    }
  }
}
