/**
 * The agent's web console, /status.json, /metrics and the console's /api/, on
 * loopback by default (any other address only with a token: see config.ts).
 * GETs read; POSTs act (pause, resume, sync now, snapshot) and must carry the
 * header `x-unisync`, which a page of another site cannot send without a CORS
 * preflight that this server never grants.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import type { Metrics } from "../stream/metrics.js";
import type { LogFilter } from "../report/audit.js";
import type { ConsoleBackend } from "./backend.js";
import { consolePage } from "./page.js";

/** Whether a request carries `token` (Bearer header or ?token=), compared in constant time. */
function authorized(req: IncomingMessage, token: string): boolean {
  const header = /^Bearer\s+(.+)$/i.exec(req.headers.authorization ?? "")?.[1];
  const given = header ?? new URL(req.url ?? "/", "http://x").searchParams.get("token") ?? "";
  const a = createHash("sha256").update(given).digest();
  const b = createHash("sha256").update(token).digest();
  return timingSafeEqual(a, b);
}

function send(res: ServerResponse, code: number, body: unknown, type = "application/json"): void {
  res.writeHead(code, { "content-type": type, "cache-control": "no-store" });
  res.end(type === "application/json" ? JSON.stringify(body, null, 1) : String(body));
}

const ACTIONS: Record<string, (b: ConsoleBackend) => Promise<string> | string> = {
  "/api/pause": (b) => (b.pause(), "paused: changes are captured and wait"),
  "/api/resume": (b) => (b.resume(), "resumed"),
  "/api/sync": (b) => (b.syncNow(), "uploading and polling now"),
  "/api/snapshot": async (b) => {
    const r = await b.snapshot();
    return `snapshot published: ${r.key} (${r.bytes} bytes)`;
  },
};

async function route(req: IncomingMessage, res: ServerResponse, backend: ConsoleBackend, metrics: Metrics): Promise<void> {
  const url = new URL(req.url ?? "/", "http://x");
  const path = url.pathname;
  if (req.method === "POST") {
    const action = ACTIONS[path];
    if (!action) return send(res, 404, { error: "no such action" });
    if (!req.headers["x-unisync"]) return send(res, 403, { error: "actions need the x-unisync header (sent by the console page)" });
    return send(res, 200, { message: await action(backend) });
  }
  if (req.method !== "GET" && req.method !== "HEAD") return send(res, 405, { error: "GET or POST" });
  if (path === "/") return send(res, 200, consolePage(backend.status().node), "text/html; charset=utf-8");
  if (path === "/metrics") return send(res, 200, metrics.render(), "text/plain; version=0.0.4");
  if (path === "/status.json") return send(res, 200, backend.status());
  if (path === "/api/cluster") return send(res, 200, await backend.cluster());
  if (path === "/api/activity") return send(res, 200, backend.activity(Number(url.searchParams.get("after") ?? 0) || 0));
  if (path === "/api/conflicts") return send(res, 200, backend.conflicts());
  if (path === "/api/parked") return send(res, 200, backend.parked());
  if (path === "/api/history") {
    const q = (k: string) => url.searchParams.get(k) || undefined;
    const filter: LogFilter = { db: q("db"), table: q("table"), key: q("key"), path: q("path") };
    if (!(filter.table && filter.key) && !filter.path) return send(res, 400, { error: "give table and key, or path" });
    return send(res, 200, await backend.history(filter));
  }
  send(res, 404, { error: "not found" });
}

/** `token`: required on every request when non-empty (the config insists on one off loopback). */
export async function startStatusServer(host: string, port: number, backend: ConsoleBackend, metrics: Metrics, token = ""): Promise<{ server: Server; url: string }> {
  const server = createServer((req, res) => {
    if (token && !authorized(req, token)) {
      res.writeHead(401, { "www-authenticate": 'Bearer realm="unisync"', "content-type": "text/plain" });
      res.end("unisync: this status server needs its token (Authorization: Bearer TOKEN, or ?token=TOKEN)\n");
      return;
    }
    route(req, res, backend, metrics).catch((err: Error) => send(res, 500, { error: err.message }));
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  const addr = server.address() as AddressInfo;
  return { server, url: `http://${host.includes(":") ? `[${host}]` : host}:${addr.port}/` };
}
