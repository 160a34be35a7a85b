#!/usr/bin/env node
// Import direction check (issue 13): a module of src/ may import only from its own
// folder or from a folder of a lower layer. Every folder of src/ must have a layer.
// Static imports and re-exports (`import ... from`, `export ... from`, `import "..."`)
// and dynamic `import("...")` are checked. Known exceptions are listed below, each
// to be removed when it is fixed; the check fails on a new exception and on a listed
// one that no longer occurs (so the list stays true).
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** The tree to check: src/ of this repository, or the folder given as the first argument (tests). */
const SRC = process.argv[2] ? resolve(process.argv[2]) : resolve(dirname(fileURLToPath(import.meta.url)), "..", "src");

/**
 * Lower number = lower layer. Folders of one number may not import each other.
 * See ARCHITECTURE.md ("Modules") for what each folder holds.
 */
const LAYER = {
  store: 0, // the ObjectStore interface and its backends
  keys: 1, // secured clusters: sealing, trust list, SecureStore
  db: 2, // SQLite helpers: unisync's own tables, table discovery, finding databases, write timing
  log: 3, // segment format, keys, index, outbox, tail, cursors, clock, blobs
  merge: 4, // the shared merge model: merge rule, row state, bags, lineages, unique clashes
  capture: 5, // the app's writes and the folder's changes into records
  replay: 6, // other origins' records into the database and the folder (what it writes itself is captured)
  stream: 7, // one synced stream each: DbSync, FolderSync, and opening them
  snapshot: 8, // snapshots, bootstrap, state at T, rejoin, retention
  agent: 9, // the running node: loops, config, tailing plan, hints, activity
  report: 10, // read-only views for operators: audit trail, conflicts
  web: 11, // the console
  cli: 12, // the commands
};

/** "importer -> imported folder" pairs that run against the flow today. */
const KNOWN = new Set([]);

function* files(dir) {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) yield* files(p);
    else if (p.endsWith(".ts")) yield p;
  }
}

/** Relative module specifiers of a file: static imports, re-exports, side-effect imports, dynamic imports. */
function specifiers(text) {
  const out = [];
  for (const m of text.matchAll(/(?:^|\n)\s*(?:import|export)\b[^;]*?\bfrom\s*["'](\.\.?\/[^"']+)["']/g)) out.push(m[1]);
  for (const m of text.matchAll(/(?:^|\n)\s*import\s*["'](\.\.?\/[^"']+)["']/g)) out.push(m[1]);
  for (const m of text.matchAll(/\bimport\s*\(\s*["'`](\.\.?\/[^"'`]+)["'`]\s*\)/g)) out.push(m[1]);
  return out;
}

const found = new Set();
const fresh = [];
const unlayered = new Set();
for (const file of files(SRC)) {
  const rel = relative(SRC, file);
  const from = rel.includes("/") ? rel.split("/")[0] : null;
  if (from === null || !(from in LAYER)) {
    unlayered.add(from ?? rel);
    continue;
  }
  for (const spec of specifiers(readFileSync(file, "utf8"))) {
    const target = relative(SRC, resolve(dirname(file), spec));
    if (target.startsWith("..")) continue; // outside src/ (e.g. package.json)
    const to = target.includes("/") ? target.split("/")[0] : target;
    if (to === from) continue;
    if (!(to in LAYER)) {
      unlayered.add(to);
      continue;
    }
    if (LAYER[to] < LAYER[from]) continue;
    const pair = `${rel} -> ${to}`;
    if (KNOWN.has(pair)) found.add(pair);
    else fresh.push(`${pair} (${spec}): ${from} (layer ${LAYER[from]}) may not import ${to} (layer ${LAYER[to]})`);
  }
}
const stale = [...KNOWN].filter((k) => !found.has(k));
for (const u of unlayered) console.error(`layers: src/${u} has no layer: give it one in LAYER in scripts/check-layers.mjs`);
for (const f of fresh) console.error(`layers: ${f}`);
for (const s of stale) console.error(`layers: "${s}" no longer occurs: remove it from KNOWN in scripts/check-layers.mjs`);
if (unlayered.size || fresh.length || stale.length) process.exit(1);
console.log(`layers: ok (${Object.keys(LAYER).length} layers, ${found.size} known exceptions left, see scripts/check-layers.mjs)`);
