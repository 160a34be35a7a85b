/**
 * The merge rule (merge/merge.ts) as the pure function it is: every order of
 * the same records gives the same row, also for values a record carries but did
 * not write, and a node's own values that no record ever carried.
 */
import { describe, expect, it } from "vitest";
import { OP_DELETE, OP_INSERT, OP_UPDATE } from "../src/log/segment.js";
import type { SqlValue } from "../src/log/value.js";
import { mergeChange, type IncomingChange, type RowState } from "../src/merge/merge.js";

/** One node: a row's merge state and the table row it keeps. */
interface Node {
  state: RowState | null;
  row: Map<string, SqlValue> | null;
}

function apply(node: Node, change: IncomingChange): Node {
  const { state, write } = mergeChange(node.state, node.row, change);
  if (write.kind === "insert") return { state, row: new Map(write.values) };
  if (write.kind === "update") return { state, row: new Map([...(node.row ?? []), ...write.values]) };
  if (write.kind === "delete") return { state, row: null };
  return { state, row: node.row };
}

const at = (hlc: number, origin: string) => ({ hlc, origin });
const cols = ["id", "a", "z"];
// n2 inserts the row before its app had column z; n1 and n4 added z since, each
// holding a value no write recorded (a default, a copy's own value).
const insert: IncomingChange = { op: OP_INSERT, stamp: at(100, "n2"), columns: ["id", "a"], values: [1, "x"], changed: [] };
const deleteByN1: IncomingChange = { op: OP_DELETE, stamp: at(200, "n1"), columns: cols, values: [1, "x", null], changed: [] };
const updateByN4: IncomingChange = { op: OP_UPDATE, stamp: at(300, "n4"), columns: cols, values: [1, "y", "four"], changed: [1] };

/** A node that applied the insert, and whose table holds a z value of its own. */
function inserted(): Node {
  const n = apply({ state: null, row: null }, insert);
  n.row?.set("z", "only here");
  return n;
}

describe("merge rule", () => {
  it("values carried but not written end the same in every order, and win over a value no record carried", () => {
    const orders = [
      [deleteByN1, updateByN4],
      [updateByN4, deleteByN1],
    ];
    const results = orders.map((order) => {
      let n = inserted();
      for (const c of order) n = apply(n, c);
      return n;
    });
    for (const r of results) expect(r.row).toEqual(new Map<string, SqlValue>([["id", 1], ["a", "y"], ["z", "four"]]));
    expect(results[0].state).toEqual(results[1].state);
  });

  it("a deleted row keeps only values some record carried", () => {
    let n = inserted();
    n = apply(n, { ...deleteByN1, columns: ["id", "a"], values: [1, "x"] });
    expect(n.row).toBeNull();
    expect(n.state?.dead).toEqual(new Map<string, SqlValue>([["id", 1], ["a", "x"]]));
    // A later write revives it from what the log holds: z takes its default, as on every node.
    n = apply(n, { op: OP_UPDATE, stamp: at(400, "n3"), columns: ["id", "a"], values: [1, "w"], changed: [1] });
    expect(n.row).toEqual(new Map<string, SqlValue>([["id", 1], ["a", "w"]]));
  });
});
