/**
 * Turns captured changes into stamped log records. Stamping folds each change
 * into the row's merge state in the same transaction, so that a remote record
 * applied afterwards is compared against this node's newest writes.
 */
import type { Database, Statement } from "better-sqlite3";
import { HybridClock } from "../log/hlc.js";
import { OP_DELETE, OP_INSERT, OP_UPDATE, type LogRecord, type RowChange } from "../log/segment.js";
import { rowIdentity, type SqlValue } from "../log/value.js";
import { mergeChange } from "../replay/merge.js";
import type { BagStore } from "../replay/bag.js";
import type { RowStateStore } from "../replay/state.js";
import { CHANGE_DELETE, CHANGE_INSERT, maskHasColumn } from "./triggers.js";

interface CaptureGeneration {
  table: string;
  columns: string[];
  key: string[];
}

type ChangeRow = unknown[]; // id, cap, op, ms, mask, v0..vN (raw row)

/** A row change as captured; keyless updates also carry the values before it. */
type CapturedChange = RowChange & { oldValues?: SqlValue[] };

export interface DrainedBatch {
  records: LogRecord[];
  /** Highest _unisync_changes id included; delete up to it once sealed. */
  lastId: number;
  /** Approximate encoded size of the records, for batch bounds. */
  bytes: number;
}

function approxSize(v: SqlValue): number {
  if (v === null) return 1;
  if (typeof v === "string") return v.length * 3;
  if (Buffer.isBuffer(v)) return v.length;
  return 9;
}

export class ChangeDrain {
  private readonly generations = new Map<number, CaptureGeneration>();
  private readonly readBatch: Statement;
  private readonly readCap: Statement;

  constructor(
    private readonly db: Database,
    private readonly origin: string,
    private readonly clock: HybridClock,
    private readonly states: RowStateStore,
    private readonly bag: BagStore,
    /** True for tables without a declared key, whose rows are bag instances (see bag.ts). */
    private readonly keyless: (table: string) => boolean,
  ) {
    this.readBatch = db.prepare("SELECT * FROM _unisync_changes WHERE id > ? ORDER BY id LIMIT ?").raw(true).safeIntegers(true);
    this.readCap = db.prepare("SELECT tbl, columns, key FROM _unisync_capture WHERE id = ?");
  }

  pendingCount(): number {
    return (this.db.prepare("SELECT count(*) AS n FROM _unisync_changes").get() as { n: number }).n;
  }

  private generation(capId: number): CaptureGeneration {
    let g = this.generations.get(capId);
    if (!g) {
      const row = this.readCap.get(capId) as { tbl: string; columns: string; key: string } | undefined;
      if (!row) throw new Error(`capture generation ${capId} is missing from _unisync_capture`);
      g = { table: row.tbl, columns: JSON.parse(row.columns) as string[], key: JSON.parse(row.key) as string[] };
      this.generations.set(capId, g);
    }
    return g;
  }

  /** Row changes a captured change stands for (an update of the key is a delete plus an insert). */
  private toRowChanges(g: CaptureGeneration, op: number, mask: unknown, slots: SqlValue[]): CapturedChange[] {
    const n = g.columns.length;
    const values = slots.slice(0, n);
    const base = { table: g.table, columns: g.columns, key: g.key };
    if (op === CHANGE_INSERT) return [{ ...base, op: OP_INSERT, values, changed: [] }];
    if (op === CHANGE_DELETE) return [{ ...base, op: OP_DELETE, values, changed: [] }];
    const changed = g.columns.map((_, i) => i).filter((i) => maskHasColumn(mask, i));
    if (changed.length === 0) return [];
    const oldKey = slots.slice(n, n + g.key.length);
    // Without a declared key the "key" is every column: the copy changes in place.
    if (this.keyless(g.table)) return [{ ...base, op: OP_UPDATE, values, changed, oldValues: oldKey }];
    const newKey = g.key.map((k) => values[g.columns.indexOf(k)]);
    if (rowIdentity(oldKey, false).equals(rowIdentity(newKey, false))) return [{ ...base, op: OP_UPDATE, values, changed }];
    const oldValues = values.slice();
    g.key.forEach((k, i) => (oldValues[g.columns.indexOf(k)] = oldKey[i]));
    return [
      { ...base, op: OP_DELETE, values: oldValues, changed: [] },
      { ...base, op: OP_INSERT, values, changed: [] },
    ];
  }

  /**
   * Reads, stamps and folds up to `maxRecords` changes (or about `maxBytes`).
   * Must run inside a write transaction that also seals the records, so the
   * stamps and the merge state commit together with the segment.
   */
  drain(maxRecords: number, maxBytes: number): DrainedBatch {
    const records: LogRecord[] = [];
    let lastId = 0;
    let bytes = 0;
    let after = 0;
    while (records.length < maxRecords && bytes < maxBytes) {
      const rows = this.readBatch.all(after, Math.min(1000, maxRecords - records.length)) as ChangeRow[];
      if (rows.length === 0) break;
      for (const row of rows) {
        const [id, cap, op, ms, mask] = row as [bigint, bigint, bigint, bigint | null, unknown];
        const slots = row.slice(5) as SqlValue[];
        const g = this.generation(Number(cap));
        after = Number(id);
        lastId = after;
        for (const change of this.toRowChanges(g, Number(op), mask, slots)) {
          const hlc = this.clock.tick(ms === null ? undefined : Number(ms));
          const { oldValues, ...row } = change;
          this.fold(row, hlc, oldValues);
          records.push({ hlc, row });
          for (const v of change.values) bytes += approxSize(v);
        }
        if (records.length >= maxRecords || bytes >= maxBytes) break;
      }
    }
    return { records, lastId, bytes };
  }

  /** Records a local change in the merge state; the table already holds it. */
  private fold(change: RowChange, hlc: number, oldValues?: SqlValue[]): void {
    const stamp = { hlc, origin: this.origin };
    if (this.keyless(change.table)) {
      if (change.op === OP_INSERT) this.bag.record(change.table, stamp, "insert", change.values, stamp);
      else {
        // The app changed one of the equal copies: name the oldest live one.
        const instance = this.bag.pickInstance(change.table, oldValues ?? change.values);
        if (instance) {
          this.bag.record(change.table, instance, change.op === OP_DELETE ? "delete" : "update", change.values, stamp);
          change.instance = instance;
        }
      }
      return;
    }
    const keyValues = change.key.map((k) => change.values[change.columns.indexOf(k)]);
    const pk = rowIdentity(keyValues, false);
    const prior = this.states.get(change.table, pk);
    // A fresh insert needs no current row to merge against (mergeChange's fast path).
    const asRow = prior === null && change.op === OP_INSERT ? null : new Map(change.columns.map((c, i) => [c, change.values[i]]));
    const { state } = mergeChange(prior, asRow, {
      op: change.op,
      stamp,
      columns: change.columns,
      values: change.values,
      changed: change.changed,
    });
    this.states.put(change.table, pk, state);
  }

  removeThrough(lastId: number): void {
    this.db.prepare("DELETE FROM _unisync_changes WHERE id <= ?").run(lastId);
  }
}
