/**
 * What the console shows and does, read from the running agent and the store:
 * the cluster (every node's heartbeat, with lag computed against the other
 * nodes' writes), the activity feed, conflicts and parked records of this
 * node's databases, one row's or file's history from the log, and the controls.
 */
import type { Agent, AgentStatus, Heartbeat } from "../agent/agent.js";
import type { ActivityEvent } from "../agent/activity.js";
import { readConflicts, type ConflictReport } from "../report/conflicts.js";
import { listParked } from "../replay/apply.js";
import { audit, withOldValues, type AuditEntry, type LogFilter } from "../report/audit.js";
import { readHeartbeats } from "../snapshot/gc.js";

/** One stream of one node, as the cluster view shows it. */
export interface StreamView {
  stream: string;
  /** Segments other nodes wrote that this node has not applied yet. */
  lagSegments: number;
  /**
   * How much older this node's copy is than the newest write it lacks (s; 0 when caught
   * up; null when it lacks writes of nodes it has applied nothing of yet: no time to compare).
   */
  lagSeconds: number | null;
  pending: number;
  outbox: number;
  parked: number;
  problems: string[];
  /** Long work on this stream now (enrolling a big table): what, how far, ETA. */
  progress?: string;
}

export interface NodeView {
  node: string;
  self: boolean;
  /** When its heartbeat was written (this node: now). */
  lastSeenMs: number;
  paused: boolean;
  storeError?: string;
  trustError?: string;
  requestsPerSecond: number;
  streams: StreamView[];
}

export interface ParkedView {
  stream: string;
  origin: string;
  seq: number;
  table: string | null;
  reason: string;
  parkedAt: string | null;
}

export interface ConsoleBackend {
  status(): AgentStatus;
  cluster(): Promise<NodeView[]>;
  activity(afterId: number): ActivityEvent[];
  conflicts(): ConflictReport[];
  parked(): ParkedView[];
  history(filter: LogFilter, limit?: number): Promise<AuditEntry[]>;
  pause(): void;
  resume(): void;
  syncNow(): void;
  snapshot(): Promise<{ key: string; bytes: number }>;
}

type StreamStatus = AgentStatus["databases"][number] | NonNullable<AgentStatus["files"]>;

function streamsOf(s: AgentStatus): StreamStatus[] {
  return s.files ? [...s.databases, s.files] : s.databases;
}

function describeProgress(p: { progress: string; done: number; total: number; etaS: number | null } | undefined): string | undefined {
  if (!p) return undefined;
  return `${p.progress}: ${p.done} of ${p.total}${p.etaS === null ? "" : `, about ${p.etaS} s left`}`;
}

/** Lag of every node's every stream, from the statuses (heartbeats) of all nodes. */
export function clusterView(statuses: { status: AgentStatus; atMs: number; self: boolean }[]): NodeView[] {
  const written = new Map<string, { seq: number; sealedMs: number }>(); // `${origin}\n${stream}`
  for (const { status } of statuses) {
    for (const st of streamsOf(status)) written.set(`${status.node}\n${st.stream}`, { seq: st.nextSeq - 1, sealedMs: st.lastSealedMs ?? 0 });
  }
  return statuses
    .map(({ status, atMs, self }) => ({
      node: status.node,
      self,
      lastSeenMs: atMs,
      paused: status.paused === true,
      storeError: status.storeError,
      trustError: status.trust?.error,
      requestsPerSecond: Math.round(Object.values(status.storeRequests?.perSecond ?? {}).reduce((a, b) => a + b, 0) * 100) / 100,
      streams: streamsOf(status).map((st) => {
        let lagSegments = 0;
        let lagMs: number | null = 0;
        let unknown = false;
        for (const other of statuses) {
          if (other.status.node === status.node) continue;
          const w = written.get(`${other.status.node}\n${st.stream}`);
          if (!w) continue;
          const behind = Math.max(0, w.seq - (st.cursors[other.status.node] ?? 0));
          lagSegments += behind;
          const appliedMs = st.cursorMs?.[other.status.node];
          if (behind > 0 && appliedMs && w.sealedMs) lagMs = Math.max(lagMs, w.sealedMs - appliedMs);
          else if (behind > 0) unknown = true;
        }
        if (unknown && lagMs === 0) lagMs = null;
        return {
          stream: st.stream,
          lagSegments,
          lagSeconds: lagMs === null ? null : Math.round(Math.max(0, lagMs) / 100) / 10,
          pending: st.pendingChanges,
          outbox: st.outboxSegments,
          parked: st.parked,
          problems: Object.entries(st.problems).map(([origin, m]) => `${origin}: ${m}`),
          progress: describeProgress("enrolmentProgress" in st ? st.enrolmentProgress : undefined),
        };
      }),
    }))
    .sort((a, b) => (a.node < b.node ? -1 : 1));
}

/** The console's view of a running agent. Heartbeats are read at most every `cacheMs` (only while someone looks). */
export function agentBackend(agent: Agent, cacheMs = 2000): ConsoleBackend {
  let cached: { atMs: number; beats: Heartbeat[] } | null = null;
  const heartbeats = async (): Promise<Heartbeat[]> => {
    if (cached && Date.now() - cached.atMs < cacheMs) return cached.beats;
    // Refused (secured cluster), unreadable or foreign ones are left out, as gc leaves them out.
    const beats = (await readHeartbeats(agent.store, [])) as Heartbeat[];
    cached = { atMs: Date.now(), beats };
    return beats;
  };
  return {
    status: () => agent.status(),
    async cluster() {
      const self = agent.status();
      const others = (await heartbeats()).filter((h) => h.node !== self.node && Array.isArray(h.databases));
      return clusterView([{ status: self, atMs: Date.now(), self: true }, ...others.map((h) => ({ status: h, atMs: h.atMs, self: false }))]);
    },
    activity: (afterId) => agent.activity.since(afterId),
    conflicts: () => agent.databases().map((d) => readConflicts(d.db, d.stream, 200)),
    parked: () => agent.databases().flatMap((d) => listParked(d.db, 200).map((p) => ({ stream: d.stream, ...p }))),
    async history(filter, limit = 200) {
      const all: AuditEntry[] = [];
      for await (const e of audit(agent.store, filter)) all.push(e);
      return withOldValues(all).slice(-limit);
    },
    pause: () => agent.pause(),
    resume: () => agent.resume(),
    syncNow: () => agent.syncNow(),
    snapshot: async () => {
      const r = await agent.snapshots.snapshotNow();
      return { key: r.key, bytes: r.bytes };
    },
  };
}
