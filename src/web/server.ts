/** The agent's small status page, /status.json and Prometheus /metrics, on loopback by default. */
import { createHash, timingSafeEqual } from "node:crypto";
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import type { AgentStatus } from "../agent/agent.js";
import type { Metrics } from "../agent/metrics.js";

const escape = (s: string) => s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c] as string);

export function renderStatusHtml(s: AgentStatus): string {
  const rows = s.databases
    .map(
      (d) =>
        `<tr><td>${escape(d.stream)}</td><td>${d.nextSeq - 1}</td><td>${d.pendingChanges}</td><td>${d.outboxSegments}</td><td>${d.parked}</td><td>${d.moved} / ${d.setAside}</td>` +
        `<td>${Object.entries(d.cursors).map(([o, c]) => `${escape(o)}@${c}`).join(", ") || "-"}</td>` +
        `<td>${Object.values(d.problems).map(escape).join("<br>") || "ok"}</td></tr>`,
    )
    .join("");
  return `<!doctype html><meta charset="utf-8"><title>unisync ${escape(s.node)}</title>
<style>body{font:14px system-ui;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}</style>
<h1>unisync node ${escape(s.node)}</h1>
<p>Store: ${escape(s.store)} — ${s.storeError ? `<b>unreachable</b>: ${escape(s.storeError)}` : "reachable"}. Other origins: ${s.origins.map(escape).join(", ") || "none yet"}.</p>
<p>Store requests per second (last minute): ${Object.entries(s.storeRequests.perSecond).map(([k, v]) => `${k} ${v}`).join(", ")}; conditional writes: ${escape(s.storeRequests.conditionalWrites)}; polling every ${s.tailing.pollIntervalMs} ms.</p>
${s.trust ? `<p>Secured cluster: trust list version ${s.trust.version}, data key ${s.trust.currentKey}, members ${s.trust.members.map(escape).join(", ")}${s.trust.error ? ` — <b>trust list not accepted</b>: ${escape(s.trust.error)}` : ""}.</p>` : ""}
<table><tr><th>database</th><th>segments written</th><th>pending changes</th><th>outbox</th><th>parked</th><th>moved / set aside</th><th>applied (origin@seq)</th><th>problems</th></tr>${rows}</table>
${Object.entries(s.notSynced).map(([db, why]) => `<p><b>${escape(db)} is not synced</b>: ${escape(why)}</p>`).join("")}
<p><a href="/status.json">status.json</a> · <a href="/metrics">metrics</a></p>`;
}

/** Whether a request carries `token` (Bearer header or ?token=), compared in constant time. */
function authorized(req: IncomingMessage, token: string): boolean {
  const header = /^Bearer\s+(.+)$/i.exec(req.headers.authorization ?? "")?.[1];
  const given = header ?? new URL(req.url ?? "/", "http://x").searchParams.get("token") ?? "";
  const a = createHash("sha256").update(given).digest();
  const b = createHash("sha256").update(token).digest();
  return timingSafeEqual(a, b);
}

/** `token`: required on every request when non-empty (the config insists on one off loopback). */
export async function startStatusServer(host: string, port: number, status: () => AgentStatus, metrics: Metrics, token = ""): Promise<{ server: Server; url: string }> {
  const server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0];
    if (token && !authorized(req, token)) {
      res.writeHead(401, { "www-authenticate": 'Bearer realm="unisync"', "content-type": "text/plain" });
      res.end("unisync: this status server needs its token (Authorization: Bearer TOKEN, or ?token=TOKEN)\n");
      return;
    }
    if (path === "/metrics") {
      res.writeHead(200, { "content-type": "text/plain; version=0.0.4" });
      res.end(metrics.render());
    } else if (path === "/status.json") {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(status(), null, 2));
    } else if (path === "/") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      res.end(renderStatusHtml(status()));
    } else {
      res.writeHead(404).end("not found\n");
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  const addr = server.address() as AddressInfo;
  return { server, url: `http://${host}:${addr.port}/` };
}
