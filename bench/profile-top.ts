/**
 * Summarises a V8 .cpuprofile (node --cpu-prof): the functions with the most
 * self time and the most inclusive time, optionally only within the samples
 * whose stack passes through a function of a given name.
 *   node dist/bench/profile-top.js FILE.cpuprofile [--under pull] [--top 25]
 * e.g. node --cpu-prof --cpu-prof-dir=/tmp/prof dist/bench/run.js --only replay
 */
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { parseArgs } from "node:util";

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

const { values, positionals } = parseArgs({ options: { under: { type: "string" }, top: { type: "string" } }, allowPositionals: true });
if (positionals.length !== 1) {
  console.error("usage: profile-top FILE.cpuprofile [--under FUNCTION] [--top N]");
  process.exit(2);
}
const profile = JSON.parse(readFileSync(positionals[0], "utf8")) as Profile;
const top = Number(values.top ?? 25);
const byId = new Map(profile.nodes.map((n) => [n.id, n]));
const parent = new Map<number, number>();
for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
const label = (n: ProfileNode) =>
  `${n.callFrame.functionName || "(anonymous)"} ${n.callFrame.url ? `${basename(n.callFrame.url)}:${n.callFrame.lineNumber + 1}` : ""}`.trim();

const self = new Map<string, number>();
const inclusive = new Map<string, number>();
let total = 0;
profile.samples.forEach((id, i) => {
  const dt = (profile.timeDeltas[i] ?? 0) / 1000; // ms
  const stack: ProfileNode[] = [];
  for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) stack.push(byId.get(at) as ProfileNode);
  if (values.under && !stack.some((n) => n.callFrame.functionName === values.under)) return;
  total += dt;
  const leaf = label(stack[0]);
  self.set(leaf, (self.get(leaf) ?? 0) + dt);
  for (const name of new Set(stack.map(label))) inclusive.set(name, (inclusive.get(name) ?? 0) + dt);
});

const print = (title: string, m: Map<string, number>) => {
  console.log(`\n${title}`);
  for (const [name, ms] of [...m].sort((a, b) => b[1] - a[1]).slice(0, top)) {
    console.log(`${ms.toFixed(0).padStart(8)} ms ${((ms / total) * 100).toFixed(1).padStart(5)}%  ${name}`);
  }
};
console.log(`${total.toFixed(0)} ms of samples${values.under ? ` under ${values.under}` : ""}`);
print("self time", self);
print("inclusive time", inclusive);
