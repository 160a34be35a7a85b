#!/usr/bin/env node
// Import direction check (issue 13): a module of src/ may import only from its own
// folder or from a folder of a lower layer. Known exceptions are listed below, each
// to be removed when it is fixed; the check fails on a new exception and on a listed
// one that no longer occurs (so the list stays true).
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const SRC = resolve(dirname(fileURLToPath(import.meta.url)), "..", "src");

/** Lower number = lower layer. Folders of one number may not import each other. */
const LAYER = { store: 0, keys: 1, db: 2, log: 3, capture: 4, replay: 4, snapshot: 5, agent: 6, web: 7, cli: 8 };

/** "importer -> imported folder" pairs that run against the flow today (issue 13 moves them). */
const KNOWN = new Set([
  "replay/folder.ts -> capture",
  "replay/references.ts -> capture",
]);

function* files(dir) {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) yield* files(p);
    else if (p.endsWith(".ts")) yield p;
  }
}

const found = new Set();
const fresh = [];
for (const file of files(SRC)) {
  const rel = relative(SRC, file);
  const from = rel.split("/")[0];
  const text = readFileSync(file, "utf8");
  for (const m of text.matchAll(/(?:^|\n)\s*(?:import|export)[^;]*?from\s+"(\.\.?\/[^"]+)"/g)) {
    const target = relative(SRC, resolve(dirname(file), m[1]));
    const to = target.split("/")[0];
    if (to === from || !(to in LAYER) || !(from in LAYER)) continue;
    if (LAYER[to] < LAYER[from]) continue;
    const pair = `${rel} -> ${to}`;
    if (KNOWN.has(pair)) found.add(pair);
    else fresh.push(`${pair} (${m[1]}): ${from} (layer ${LAYER[from]}) may not import ${to} (layer ${LAYER[to]})`);
  }
}
const stale = [...KNOWN].filter((k) => !found.has(k));
for (const f of fresh) console.error(`layers: ${f}`);
for (const s of stale) console.error(`layers: "${s}" no longer occurs: remove it from KNOWN in scripts/check-layers.mjs`);
if (fresh.length || stale.length) process.exit(1);
console.log(`layers: ok (${found.size} known exceptions left, see scripts/check-layers.mjs)`);
