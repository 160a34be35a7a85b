/** The console's cluster view: lag in segments and seconds computed from the nodes' statuses (heartbeats). */
import { describe, expect, it } from "vitest";
import type { AgentStatus } from "../src/agent/agent.js";
import { clusterView } from "../src/web/backend.js";

function node(name: string, db: { nextSeq: number; lastSealedMs: number; cursors: Record<string, number>; cursorMs: Record<string, number> }, paused = false): AgentStatus {
  return {
    node: name,
    paused,
    databases: [{ stream: "app.db", pendingChanges: 0, outboxSegments: 0, parked: 0, problems: {}, ...db }],
    storeRequests: { perSecond: { LIST: 0.2, GET: 0.1, PUT: 0, HEAD: 0, DELETE: 0 } },
  } as unknown as AgentStatus;
}

describe("console cluster view", () => {
  it("sums the segments a node lacks from every other node and says how much older its copy is", () => {
    const t = 1_800_000_000_000;
    const view = clusterView([
      // n1 wrote 10 segments, the last at t; n2 wrote 4, the last at t - 5 s.
      { status: node("n1", { nextSeq: 11, lastSealedMs: t, cursors: { n2: 4, n3: 0 }, cursorMs: { n2: t - 5000 } }), atMs: t, self: true },
      { status: node("n2", { nextSeq: 5, lastSealedMs: t - 5000, cursors: { n1: 10 }, cursorMs: { n1: t } }), atMs: t - 1000, self: false },
      // n3 (paused) applied n1 up to 7 (its record of t - 30 s) and nothing of n2.
      { status: node("n3", { nextSeq: 1, lastSealedMs: 0, cursors: { n1: 7 }, cursorMs: { n1: t - 30_000 } }, true), atMs: t - 2000, self: false },
    ]);
    const lag = Object.fromEntries(view.map((n) => [n.node, n.streams[0]!]));
    expect(lag.n1).toMatchObject({ lagSegments: 0, lagSeconds: 0 });
    expect(lag.n2).toMatchObject({ lagSegments: 0, lagSeconds: 0 });
    // 3 of n1's and 4 of n2's; n1's newest write is 30 s newer than the last n3 has of n1
    // (n2's age is unknown: n3 has nothing of n2 to compare with).
    expect(lag.n3!.lagSegments).toBe(7);
    expect(lag.n3!.lagSeconds).toBe(30);
    expect(view.find((n) => n.node === "n3")!.paused).toBe(true);
    // Only a node it has nothing of: no time to compare, said as null (the page shows "?").
    const fresh = clusterView([
      { status: node("a", { nextSeq: 3, lastSealedMs: t, cursors: {}, cursorMs: {} }), atMs: t, self: true },
      { status: node("b", { nextSeq: 1, lastSealedMs: 0, cursors: {}, cursorMs: {} }), atMs: t, self: false },
    ]);
    expect(fresh.find((n) => n.node === "b")!.streams[0]).toMatchObject({ lagSegments: 2, lagSeconds: null });
    expect(view.find((n) => n.node === "n1")!.requestsPerSecond).toBe(0.3);
  });
});
