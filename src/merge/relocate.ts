/**
 * Id collisions (DESIGN.md invariant 6). An app that lets SQLite pick ids
 * (INTEGER PRIMARY KEY, max + 1) on two offline nodes gets id 57 on both for
 * two different rows. Merging them by key would lose one, so rows of such
 * tables carry a *lineage*: the (HLC, origin) of the insert that first created
 * the row, and an *epoch*: one more than the epoch of the lineage its writer
 * held at that key (1 when it held none). So an id reused after a delete is a
 * new lineage with a higher epoch, and two nodes that never heard of each
 * other's row pick the same epoch.
 *
 * Two lineages at one key collide. The rule, the same on every node whatever
 * the arrival order: the higher epoch, then the smaller (HLC, origin), keeps
 * the key; the other moves to freshKey(table, key, lineage), a function of
 * those three only, where the same rule applies again if that key is taken.
 * A move is never undone (a lineage moves only because one that outranks it
 * claims its key, a fact every node learns), so every node ends with the same
 * rows at the same ids, whether or not the loser's origin ever comes back.
 * A deleted lineage moves too (as a tombstone): a concurrent update that
 * revives it then revives it at its new key, not over the row that reused its id.
 *
 * References follow: a foreign-key column that points at a lineage's row is
 * recorded with that lineage (RowChange.refs, and RowState.refs here); a move
 * rewrites the children whose refs name the moved lineage, and a child that
 * arrives later is pointed at wherever its parent lives. A child whose parent
 * lineage this node has not seen yet waits (parked) until the parent arrives.
 */
import { createHash } from "node:crypto";
import type { Database, Statement } from "better-sqlite3";
import { silenced } from "../db/internal.js";
import { compareStamp } from "../log/hlc.js";
import { rowIdentity, type SqlValue } from "../log/value.js";
import { sameStamp, type Lineage, type Stamp } from "./merge.js";
import type { RowStateStore } from "./state.js";
import type { TableAccess } from "./table.js";
import type { AsideRows } from "./unique.js";
import type { BagStore } from "./bag.js";

export type { Lineage };

export interface Move {
  table: string;
  lineage: Lineage;
  /** The key the lineage was created at. */
  bornKey: bigint;
  from: bigint;
  to: bigint;
  /** The lineage that kept `from`. */
  winner: Lineage;
  /** Whether a live row moved (false: only a deleted row's tombstone). */
  live: boolean;
}

/**
 * Moved rows get ids in [2^40, 2^41): far above what apps count to, and below
 * 2^53, so the ids stay exact in JavaScript and JSON clients.
 */
const FRESH_BASE = 2n ** 40n;

export function freshKey(table: string, from: bigint, lineage: Lineage): bigint {
  const h = createHash("sha256").update(`${table}\u0000${from}\u0000${lineage.hlc}\u0000${lineage.origin}`).digest();
  const k = FRESH_BASE + (h.readBigUInt64BE(0) & (FRESH_BASE - 1n));
  return k === from ? k + 1n : k;
}

/**
 * Rows recorded at enrolment (there before unisync) have a lineage with hlc 0.
 * By default it is named by the row's id ("#id:57"): nodes that enrol copies of
 * one database at the same time (before either has replayed the other) hold the
 * same rows under the same names, merged column by column. (A node that joins a
 * cluster with a log replays it before it enrols, so its rows take the log's
 * lineages at their ids: see DbSync.finishEnrolment.) With `independent`
 * (config independentDatabases: the databases never shared a copy) it is named
 * by the row's values: equal rows still merge, different rows under one id are
 * two rows and one moves, like any id collision.
 */
export function enrolmentLineage(key: bigint, values: readonly SqlValue[], independent = false): Stamp {
  if (!independent) return { hlc: 0, origin: `#id:${key}` };
  return { hlc: 0, origin: `#${createHash("sha256").update(rowIdentity(values, true)).digest("hex").slice(0, 32)}` };
}

/** Whether a lineage was recorded at enrolment (a row there before unisync). */
export const isEnrolled = (l: Stamp) => l.hlc === 0;

export const sameLineage = sameStamp;

export const lineageName = (l: Stamp) => `${l.origin}@${l.hlc}`;

/**
 * Whether lineage a keeps a key that b also claims. A row there before unisync
 * yields to a logged insert of the same epoch: a node that enrols later never
 * takes an id away from a row the cluster already logged.
 */
export function outranks(a: Lineage, b: Lineage): boolean {
  if (a.epoch !== b.epoch) return a.epoch > b.epoch;
  if (isEnrolled(a) !== isEnrolled(b)) return isEnrolled(b);
  return compareStamp(a.hlc, a.origin, b.hlc, b.origin) < 0;
}

/** An INTEGER PRIMARY KEY value as a bigint (values read back may be numbers). */
export function intKey(v: SqlValue): bigint | null {
  if (typeof v === "bigint") return v;
  if (typeof v === "number" && Number.isInteger(v)) return BigInt(v);
  return null;
}

const pkOf = (key: bigint) => rowIdentity([key], false);

export class Relocator {
  private readonly getMove: Statement;
  private readonly putMove: Statement;
  /** Tables that have moves: most never do, and then a lookup costs nothing. */
  private readonly tablesWithMoves = new Set<string>();
  /** Moves made by this Relocator so far: a caller can tell whether a placement moved another lineage. */
  moveCount = 0;

  constructor(
    private readonly db: Database,
    private readonly states: RowStateStore,
    private readonly tables: () => Map<string, TableAccess>,
    /** Rows set aside by unique clashes move with their lineage. */
    private readonly aside: AsideRows,
    /** Copies in tables without a key follow their parent's move too. */
    private readonly bag: BagStore,
    private readonly onMove: (m: Move) => void,
  ) {
    this.getMove = db.prepare("SELECT born_key, key FROM _unisync_moves WHERE tbl = ? AND lin_hlc = ? AND lin_origin = ?").safeIntegers(true);
    this.putMove = db.prepare(
      "INSERT OR REPLACE INTO _unisync_moves(tbl, lin_hlc, lin_origin, born_key, key, from_key, winner_hlc, winner_origin, moved_ms, live, followed) " +
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    );
    for (const t of db.prepare("SELECT DISTINCT tbl FROM _unisync_moves").pluck(true).all() as string[]) this.tablesWithMoves.add(t);
  }

  private moved(table: string, lineage: Stamp): { bornKey: bigint; key: bigint } | null {
    if (!this.tablesWithMoves.has(table)) return null;
    const r = this.getMove.get(table, lineage.hlc, lineage.origin) as { born_key: bigint; key: bigint } | undefined;
    return r ? { bornKey: r.born_key, key: r.key } : null;
  }

  /** Where a lineage moved to, or null if it never moved. */
  movedTo(table: string, lineage: Stamp): bigint | null {
    return this.moved(table, lineage)?.key ?? null;
  }

  /** The key a lineage now at `key` was created at. */
  bornKey(table: string, lineage: Stamp, key: bigint): bigint {
    return this.moved(table, lineage)?.bornKey ?? key;
  }

  /** The born key a record must carry for a lineage now at `key`: undefined when it never moved. */
  recordedBornKey(table: string, lineage: Stamp, key: bigint): bigint | undefined {
    const born = this.bornKey(table, lineage, key);
    return born === key ? undefined : born;
  }

  /** Where a lineage lives here, or null when this node has not seen it yet. */
  locate(table: string, lineage: Stamp, bornKey: bigint): bigint | null {
    const m = this.moved(table, lineage);
    if (m) return m.key;
    const at = this.states.get(table, pkOf(bornKey))?.lineage;
    return at && sameLineage(at, lineage) ? bornKey : null;
  }

  /**
   * The key for a record of `lineage` (created at `bornKey`): where it lives, or
   * for a lineage new here, its born key after resolving a collision there.
   */
  place(access: TableAccess, lineage: Lineage, bornKey: bigint): bigint {
    const m = this.moved(access.shape.name, lineage);
    if (m) return m.key;
    return this.claim(access, lineage, bornKey, bornKey, true);
  }

  /**
   * A local insert started `lineage` at `key`, where this node held another
   * (deleted, or replaced) lineage: that one moves away. The table row at the
   * key is the new one and stays. The tables may hold writes not folded yet
   * (the drain is part way), so the rows pointing at the moved lineage follow
   * it later, in followDeferred, once the drain has caught up.
   */
  makeRoom(table: string, lineage: Lineage, key: bigint): void {
    const access = this.tables().get(table);
    if (access) this.claim(access, lineage, key, key, false);
  }

  /**
   * An enrolled row (there before unisync) at `key`, where the state holds
   * another lineage: placed as a record of it would be on any node (it yields
   * to a logged lineage), and moved in the table if it lost the key.
   */
  placeEnrolled(table: string, lineage: Lineage, key: bigint): bigint {
    const access = this.tables().get(table);
    if (!access) return key;
    const row = access.find(access.shape.key, [key]);
    const at = this.claim(access, lineage, key, key, true);
    if (at !== key && row) {
      silenced(this.db, () => {
        access.delete(access.shape.key, [key]);
        row.set(access.shape.key[0], at);
        access.insert(row);
      });
    }
    return at;
  }

  /** Row access to a synced table. */
  access(table: string): TableAccess | undefined {
    return this.tables().get(table);
  }

  /** Moves the references deferred by makeRoom; call when every captured change is folded. */
  followDeferred(): void {
    const waiting = this.db.prepare("SELECT tbl, lin_hlc, lin_origin, from_key, key FROM _unisync_moves WHERE followed = 0").safeIntegers(true).all() as {
      tbl: string; lin_hlc: bigint; lin_origin: string; from_key: bigint; key: bigint;
    }[];
    if (waiting.length === 0) return;
    silenced(this.db, () => {
      for (const w of waiting) {
        const access = this.tables().get(w.tbl);
        if (access) this.followReferences(access, { hlc: Number(w.lin_hlc), origin: w.lin_origin }, w.from_key, w.key);
        this.db.prepare("UPDATE _unisync_moves SET followed = 1 WHERE tbl = ? AND lin_hlc = ? AND lin_origin = ?").run(w.tbl, w.lin_hlc, w.lin_origin);
      }
    });
  }

  /** `occupantInTable`: whether the table row at the key belongs to its current occupant (false while the drain is part way). */
  private claim(access: TableAccess, lineage: Lineage, key: bigint, bornKey: bigint, occupantInTable: boolean): bigint {
    const table = access.shape.name;
    const occupant = this.states.get(table, pkOf(key))?.lineage;
    // Rows recorded before lineages existed merge by key, as they always did.
    if (!occupant || sameLineage(occupant, lineage)) return key;
    if (outranks(lineage, occupant)) {
      const occupantBorn = this.bornKey(table, occupant, key);
      const dest = this.claim(access, occupant, freshKey(table, key, occupant), occupantBorn, true);
      const move = { table, lineage: occupant, bornKey: occupantBorn, from: key, to: dest, winner: lineage, live: false };
      // In a savepoint: a move that fails (an app constraint) leaves nothing half done.
      this.db.transaction(() => this.moveRow(access, move, occupantInTable))();
      return key;
    }
    const dest = this.claim(access, lineage, freshKey(table, key, lineage), bornKey, true);
    this.recordMove({ table, lineage, bornKey, from: key, to: dest, winner: occupant, live: true });
    return dest;
  }

  private recordMove(m: Move, followed = true): void {
    this.putMove.run(m.table, m.lineage.hlc, m.lineage.origin, m.bornKey, m.to, m.from, m.winner.hlc, m.winner.origin, Date.now(), m.live ? 1 : 0, followed ? 1 : 0);
    this.tablesWithMoves.add(m.table);
    this.moveCount++;
    this.onMove(m);
  }

  /** Moves a lineage's row and merge state from one key to another, and the rows that point at it. */
  private moveRow(access: TableAccess, m: Move, occupantInTable: boolean): void {
    const keyCol = access.shape.key[0];
    const state = this.states.get(m.table, pkOf(m.from));
    const row = occupantInTable && state?.alive ? access.find([keyCol], [m.from]) : null;
    // A row there that no state knows is this node's own copy, not enrolled yet
    // (DbSync.enrolling): the same id, so the same row, which the log's replaces.
    if (row && !this.states.get(m.table, pkOf(m.to))) access.delete([keyCol], [m.to]);
    if (row) {
      access.delete([keyCol], [m.from]);
      row.set(keyCol, m.to);
      access.insert(row);
      m.live = true;
    }
    this.aside.rekey(m.table, keyCol, m.from, m.to);
    if (state) {
      this.states.delete(m.table, pkOf(m.from));
      state.dead?.set(keyCol, m.to);
      this.states.put(m.table, pkOf(m.to), state);
    }
    this.recordMove(m, occupantInTable);
    if (occupantInTable) this.followReferences(access, m.lineage, m.from, m.to);
  }

  /** Children that point at the moved lineage (by their refs) now point at its new key. */
  private followReferences(parent: TableAccess, lineage: Stamp, from: bigint, to: bigint): void {
    const m = { table: parent.shape.name, lineage, from, to };
    const parentKey = parent.shape.key[0];
    for (const child of this.tables().values()) {
      for (const fk of child.shape.foreignKeys) {
        if (fk.table.toLowerCase() !== m.table.toLowerCase() || (fk.to !== null && fk.to !== parentKey)) continue;
        if (!child.shape.hasDeclaredKey) {
          const affected = this.bag.followMove(child, fk.column, m.lineage, m.from, m.to);
          if (affected.length > 0) this.bag.reconcile(child, affected);
          continue;
        }
        for (const row of child.rowsWhere(fk.column, m.from)) {
          const keyValues = child.shape.key.map((k) => row.get(k) as SqlValue);
          const pk = rowIdentity(keyValues, false);
          const state = this.states.get(child.shape.name, pk);
          const ref = state?.refs?.[fk.column];
          if (!state || !ref || !sameLineage(ref, m.lineage)) continue;
          if (!child.shape.key.includes(fk.column)) {
            child.update(child.shape.key, keyValues, new Map([[fk.column, m.to]]));
            continue;
          }
          // The column is part of the child's key (an association table): the child moves too.
          row.set(fk.column, m.to);
          const newKey = child.shape.key.map((k) => row.get(k) as SqlValue);
          const newPk = rowIdentity(newKey, false);
          child.delete(child.shape.key, keyValues);
          this.states.delete(child.shape.name, pk);
          const there = this.states.get(child.shape.name, newPk);
          // A row already at the new key is the same child (written by a node that saw the move): keep the newer.
          if (there && compareStamp(there.exists.hlc, there.exists.origin, state.exists.hlc, state.exists.origin) >= 0) continue;
          if (child.find(child.shape.key, newKey)) child.delete(child.shape.key, newKey);
          child.insert(row);
          this.states.put(child.shape.name, newPk, state);
        }
        // Rows out of the table follow too: a deleted child (whose values a newer
        // update or a kept reference would bring back) and a child set aside by a
        // unique clash (which comes back once the clash ends). A node that saw the
        // move while they were in the table holds them at the new key already.
        this.followTombstones(child, fk.column, m);
        this.aside.followMove(child, fk.column, m.lineage, m.from, m.to);
      }
    }
  }

  /**
   * Deleted children (merge state only) whose kept reference in `column` names
   * the moved lineage and whose kept value is its old key now hold its new key;
   * where the column is part of the child's key, the tombstone moves to its new
   * key, unless a row lives there (written by a node that saw the move: a newer
   * incarnation, which a delete of the old one does not remove) or a newer
   * tombstone holds it.
   */
  private followTombstones(child: TableAccess, column: string, m: { lineage: Stamp; from: bigint; to: bigint }): void {
    const table = child.shape.name;
    for (const { pk, state } of this.states.deadReferring(table, m.lineage)) {
      const ref = state.refs?.[column];
      const dead = state.dead;
      if (!ref || !sameLineage(ref, m.lineage) || !dead || intKey(dead.get(column) ?? null) !== m.from) continue;
      dead.set(column, m.to);
      if (!child.shape.key.includes(column)) {
        this.states.put(table, pk, state);
        continue;
      }
      const newKey = child.shape.key.map((k) => dead.get(k) ?? null);
      const newPk = rowIdentity(newKey, false);
      this.states.delete(table, pk);
      const there = this.states.get(table, newPk);
      if (there && (there.alive || compareStamp(there.exists.hlc, there.exists.origin, state.exists.hlc, state.exists.origin) >= 0)) continue;
      this.states.put(table, newPk, state);
    }
  }
}
