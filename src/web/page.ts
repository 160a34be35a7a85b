/**
 * The console page: one self-contained HTML document (no CDN, no build step),
 * which polls the agent's /api/ endpoints. Readable on a phone: tables scroll
 * sideways inside their cards, controls are large enough to tap.
 */
export function consolePage(node: string): string {
  const name = node.replace(/[&<>"]/g, "");
  const title = `unisync · ${name}`;
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${title}</title>
<style>
:root{--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;--mute:#57606a;--line:#d0d7de;--bg:#f6f8fa}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:var(--bg);color:#1f2328}
header{display:flex;flex-wrap:wrap;gap:.5em 1em;align-items:center;padding:.8em 1em;background:#fff;border-bottom:1px solid var(--line);position:sticky;top:0;z-index:1}
header h1{font-size:1.15em;margin:0}header .sp{flex:1}
button{font:inherit;padding:.45em .9em;border:1px solid var(--line);border-radius:6px;background:#fff;cursor:pointer;min-height:2.4em}
button:hover{background:var(--bg)}button.primary{background:#1f6feb;color:#fff;border-color:#1f6feb}
main{display:grid;gap:1em;padding:1em;grid-template-columns:repeat(auto-fit,minmax(min(100%,34em),1fr))}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:.8em 1em;min-width:0}
section.wide{grid-column:1/-1}h2{font-size:1em;margin:.1em 0 .6em}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3em .5em;border-bottom:1px solid var(--line);vertical-align:top;white-space:nowrap}
td.wrap{white-space:normal;word-break:break-word}th{color:var(--mute);font-weight:600}
.pill{display:inline-block;padding:.05em .55em;border-radius:1em;font-size:.85em;color:#fff}
.ok{background:var(--ok)}.warn{background:var(--warn)}.bad{background:var(--bad)}.mute{color:var(--mute)}
#feed{list-style:none;margin:0;padding:0;max-height:22em;overflow-y:auto}#feed li{padding:.25em 0;border-bottom:1px solid var(--line)}
#feed .k{display:inline-block;min-width:5em;color:var(--mute);white-space:nowrap}form{display:flex;flex-wrap:wrap;gap:.5em;margin-bottom:.6em}
input{font:inherit;padding:.4em;border:1px solid var(--line);border-radius:6px;min-width:8em;flex:1}
.side{display:grid;grid-template-columns:1fr 1fr;gap:.5em}.side div{background:var(--bg);padding:.4em;border-radius:6px}
#msg{color:var(--mute)}
</style></head><body>
<header><h1>unisync · <span id="self">${name}</span></h1><span id="state" class="pill ok">…</span><span class="sp"></span>
<button id="pause">Pause sync</button><button id="sync" class="primary">Sync now</button><button id="snap">Take snapshot</button><span id="msg"></span></header>
<main>
<section class="wide"><h2>Cluster</h2><div class="scroll"><table id="cluster"><thead><tr><th>node</th><th>last seen</th><th>state</th><th>stream</th><th>lag (segments)</th><th>lag (s)</th><th>pending</th><th>outbox</th><th>parked</th><th>req/s</th><th>problems</th></tr></thead><tbody></tbody></table></div></section>
<section><h2>Activity</h2><ul id="feed"></ul></section>
<section><h2>Conflicts</h2><div id="conflicts" class="mute">none</div></section>
<section><h2>Parked records</h2><div id="parked" class="mute">none</div></section>
<section><h2>History of a row or file</h2>
<form id="hist"><input name="table" placeholder="table"><input name="key" placeholder="key, e.g. 57 or a=1,b=x"><input name="path" placeholder="or file path"><button>Search</button></form>
<div id="history" class="mute">Give a table and key, or a file path.</div></section>
</main>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
const headers = Object.assign({ "x-unisync": "console" }, token ? { authorization: "Bearer " + token } : {});
const $ = (s) => document.querySelector(s);
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
const ago = (ms) => { const s = Math.max(0, Math.round((Date.now() - ms) / 1000)); return s < 60 ? s + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago"; };
async function api(path, method = "GET") {
  const r = await fetch(path, { method, headers });
  if (!r.ok) throw new Error(path + ": " + r.status + " " + (await r.text()));
  return r.json();
}
let paused = false;
async function cluster() {
  const nodes = await api("/api/cluster");
  const rows = [];
  for (const n of nodes) {
    const stale = !n.self && Date.now() - n.lastSeenMs > 120000;
    const state = n.storeError ? '<span class="pill bad">store down</span>' : n.trustError ? '<span class="pill bad">not trusted</span>' : n.paused ? '<span class="pill warn">paused</span>' : stale ? '<span class="pill warn">silent</span>' : '<span class="pill ok">syncing</span>';
    if (n.self) { paused = n.paused; $("#pause").textContent = paused ? "Resume sync" : "Pause sync"; $("#state").className = "pill " + (paused ? "warn" : "ok"); $("#state").textContent = paused ? "paused" : "syncing"; }
    const streams = n.streams.length ? n.streams : [{ stream: "-", lagSegments: 0, lagSeconds: 0, pending: 0, outbox: 0, parked: 0, problems: [] }];
    streams.forEach((s, i) => {
      const lag = s.lagSegments ? '<span class="pill ' + (s.lagSegments > 20 ? "bad" : "warn") + '">' + s.lagSegments + "</span>" : '<span class="pill ok">0</span>';
      rows.push("<tr data-node=\\"" + esc(n.node) + "\\" data-stream=\\"" + esc(s.stream) + "\\" data-lag=\\"" + s.lagSegments + "\\">" +
        (i === 0 ? "<td rowspan=" + streams.length + "><b>" + esc(n.node) + "</b>" + (n.self ? " (this node)" : "") + "</td><td rowspan=" + streams.length + ">" + (n.self ? "now" : ago(n.lastSeenMs)) + "</td><td rowspan=" + streams.length + ">" + state + "</td>" : "") +
        "<td>" + esc(s.stream) + "</td><td>" + lag + "</td><td>" + (s.lagSeconds ?? "?") + "</td><td>" + s.pending + "</td><td>" + s.outbox + "</td><td>" + s.parked + "</td>" +
        (i === 0 ? "<td rowspan=" + streams.length + ">" + n.requestsPerSecond + "</td>" : "") +
        '<td class="wrap">' + (s.progress ? '<span class="pill warn">' + esc(s.progress) + "</span><br>" : "") + (s.problems.map(esc).join("<br>") || (s.progress ? "" : '<span class="mute">none</span>')) + "</td></tr>");
    });
  }
  $("#cluster tbody").innerHTML = rows.join("");
}
let lastEvent = 0;
async function feed() {
  const events = await api("/api/activity?after=" + lastEvent);
  const ul = $("#feed");
  for (const e of events) {
    lastEvent = e.id;
    const li = document.createElement("li");
    li.dataset.kind = e.kind;
    li.innerHTML = '<span class="k">' + new Date(e.atMs).toLocaleTimeString([], { hour12: false }) + "</span> " + (e.kind === "problem" ? '<span class="pill bad">problem</span> ' : e.kind === "control" ? '<span class="pill warn">' + e.kind + "</span> " : "") + esc(e.text);
    ul.prepend(li);
  }
  while (ul.children.length > 200) ul.lastChild.remove();
}
const kv = (o) => o ? Object.entries(o).map(([k, v]) => "<b>" + esc(k) + "</b> " + esc(v)).join("<br>") : '<span class="mute">(not here now)</span>';
async function conflicts() {
  const dbs = await api("/api/conflicts");
  const parts = [];
  for (const d of dbs) {
    for (const s of d.setAside) parts.push('<div class="conflict"><p><b>' + esc(d.stream) + " · " + esc(s.table) + "</b>: unique clash, row (" + esc(s.key.join(", ")) + ") set aside " + esc(s.detectedAt) + '</p><div class="side"><div><b>kept</b> (' + esc(s.keptKey.join(", ")) + ")<br>" + kv(s.kept) + '</div><div><b>set aside</b><br>' + kv(s.values) + "</div></div></div>");
    for (const m of d.moved) parts.push("<p><b>" + esc(d.stream) + " · " + esc(m.table) + "</b>: id collision, row " + esc(m.from) + " (created by " + esc(m.createdBy) + ") moved to " + esc(m.to) + "; " + esc(m.from) + " kept by " + esc(m.keptBy) + "</p>");
    for (const e of d.enrolmentDifferences) parts.push('<div class="conflict"><p><b>' + esc(d.stream) + " · " + esc(e.table) + "</b> (" + esc(e.key.join(", ")) + ")." + esc(e.column) + ': copies differed at enrolment</p><div class="side"><div><b>kept</b> (' + esc(e.kept.node) + ")<br>" + esc(e.kept.value) + "</div><div><b>other</b> (" + esc(e.other.node) + ")<br>" + esc(e.other.value) + "</div></div></div>");
    for (const r of d.repaired) parts.push("<p><b>" + esc(d.stream) + " · " + esc(r.child) + "</b> (" + esc(r.childKey.join(", ")) + "): " + esc(r.action) + " (" + esc(r.table) + " " + esc(r.key.join(", ")) + ")</p>");
  }
  $("#conflicts").innerHTML = parts.join("") || "none";
  const parked = await api("/api/parked");
  $("#parked").innerHTML = parked.length ? '<div class="scroll"><table><tr><th>db</th><th>from</th><th>table</th><th>kind</th><th>reason</th><th>since</th></tr>' + parked.map((p) => "<tr><td>" + esc(p.stream) + "</td><td>" + esc(p.origin) + " #" + p.seq + "</td><td>" + esc(p.table) + "</td><td>" + esc(p.kind) + '</td><td class="wrap">' + esc(p.reason) + "</td><td>" + esc(p.parkedAt) + "</td></tr>").join("") + "</table></div>" : "none";
}
$("#hist").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const q = new URLSearchParams([...new FormData(ev.target)].filter(([, v]) => v));
  $("#history").textContent = "reading the log…";
  try {
    const entries = await api("/api/history?" + q);
    $("#history").innerHTML = entries.length ? '<div class="scroll"><table><tr><th>time</th><th>node</th><th>change</th><th>old → new</th></tr>' + entries.map((e) => {
      const vals = e.path ? esc((e.size ?? "") + " bytes " + (e.sha256 ?? "").slice(0, 12)) : Object.entries(e.values ?? {}).map(([k, v]) => "<b>" + esc(k) + "</b> " + (e.old && k in e.old ? esc(e.old[k]) + " → " : "") + esc(v)).join("<br>");
      return "<tr><td>" + esc(e.time) + "</td><td>" + esc(e.origin) + "</td><td>" + esc(e.op) + '</td><td class="wrap">' + vals + "</td></tr>";
    }).join("") + "</table></div>" : "no change of it in the log";
  } catch (err) { $("#history").textContent = err.message; }
});
const act = (path, label) => async () => { $("#msg").textContent = label + "…"; try { const r = await api(path, "POST"); $("#msg").textContent = r.message ?? "done"; } catch (err) { $("#msg").textContent = err.message; } tick(); };
$("#pause").addEventListener("click", () => act(paused ? "/api/resume" : "/api/pause", paused ? "resuming" : "pausing")());
$("#sync").addEventListener("click", act("/api/sync", "syncing"));
$("#snap").addEventListener("click", act("/api/snapshot", "taking a snapshot"));
let n = 0;
async function tick() {
  try { await cluster(); await feed(); if (n++ % 3 === 0) await conflicts(); document.body.dataset.ready = "1"; }
  catch (err) { $("#msg").textContent = err.message; }
}
tick(); setInterval(tick, 2000);
</script></body></html>`;
}
