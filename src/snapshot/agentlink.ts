/**
 * How the CLI talks to a running agent of the same instance folder, through
 * files in INSTANCE_DIR/.unisync/ (never synced, no port to know):
 * - `agent.json`: pid of the running agent (written at start, removed at stop;
 *   a stale file after kill -9 is recognised because the pid is gone);
 * - `requests/<id>.snapshot`: "take a snapshot now"; the agent answers in
 *   `requests/<id>.result.json`. Only the agent may copy the databases it holds
 *   open (a second descriptor in its process would drop the app's locks).
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { join } from "node:path";

export interface AgentInfo {
  pid: number;
  node: string;
  startedMs: number;
}

const stateDir = (instanceDir: string) => join(instanceDir, ".unisync");
const agentFile = (instanceDir: string) => join(stateDir(instanceDir), "agent.json");
const requestDir = (instanceDir: string) => join(stateDir(instanceDir), "requests");

/** Writes `text` to `path` whole or not at all (a temporary file renamed over it). */
export function writeAtomic(path: string, text: string): void {
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, text);
  renameSync(tmp, path);
}

export function announceAgent(instanceDir: string, info: AgentInfo): void {
  mkdirSync(stateDir(instanceDir), { recursive: true });
  writeAtomic(agentFile(instanceDir), JSON.stringify(info));
}

export function retireAgent(instanceDir: string): void {
  const a = runningAgent(instanceDir);
  if (a?.pid === process.pid) rmSync(agentFile(instanceDir), { force: true });
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** The agent running beside this instance folder, or null. */
export function runningAgent(instanceDir: string): AgentInfo | null {
  try {
    const info = JSON.parse(readFileSync(agentFile(instanceDir), "utf8")) as AgentInfo;
    return Number.isInteger(info.pid) && alive(info.pid) ? info : null;
  } catch {
    return null;
  }
}

/** Ids of snapshot requests waiting for the agent. */
export function pendingRequests(instanceDir: string): string[] {
  const dir = requestDir(instanceDir);
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((n) => n.endsWith(".snapshot"))
    .map((n) => n.slice(0, -".snapshot".length));
}

export type RequestResult = { ok: true; key: string; bytes: number; hlc: number } | { ok: false; error: string };

export function answerRequest(instanceDir: string, id: string, result: RequestResult): void {
  writeAtomic(join(requestDir(instanceDir), `${id}.result.json`), JSON.stringify(result));
  rmSync(join(requestDir(instanceDir), `${id}.snapshot`), { force: true });
}

/** Asks the running agent for a snapshot and waits for its answer. */
export async function requestSnapshot(instanceDir: string, timeoutMs: number): Promise<RequestResult> {
  const dir = requestDir(instanceDir);
  mkdirSync(dir, { recursive: true });
  const id = `${Date.now()}-${randomBytes(4).toString("hex")}`;
  writeAtomic(join(dir, `${id}.snapshot`), "");
  const result = join(dir, `${id}.result.json`);
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (existsSync(result)) {
      const r = JSON.parse(readFileSync(result, "utf8")) as RequestResult;
      rmSync(result, { force: true });
      return r;
    }
    if (!runningAgent(instanceDir)) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  rmSync(join(dir, `${id}.snapshot`), { force: true });
  return { ok: false, error: `the agent did not answer within ${Math.round(timeoutMs / 1000)} s` };
}
