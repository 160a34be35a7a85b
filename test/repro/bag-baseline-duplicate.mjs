// Reproduction (run after `npm run build`): node test/repro/bag-baseline-duplicate.mjs
//
// The baseline pass decides whether a row of a table WITHOUT a key is already
// recorded by looking at the merge state (_unisync_rows), which only knows
// changes that were already sealed. A row the app inserted after the triggers
// were installed but that is still waiting in _unisync_changes is therefore
// recorded a second time by the baseline: other nodes get two copies.
// Here the baseline is re-run the way a restart after `kill -9` during the
// baseline does it; in the cluster test the same happens without any crash when
// the app commits between the trigger transaction and the baseline chunks.
import Database from "better-sqlite3";
import { join } from "node:path";
import { scratch } from "./lib.mjs";

const { dir, store, open } = scratch("bag-baseline-");
const a = join(dir, "a.db");
const b = join(dir, "b.db");
for (const p of [a, b]) new Database(p).exec("CREATE TABLE logs(msg TEXT)").close();

let s1 = open(a, "n1");                       // triggers installed, baseline done (empty table)
const app = new Database(a);
app.exec("INSERT INTO logs VALUES ('x')");    // captured by the trigger, not sealed yet
// kill -9 of the agent between installing triggers and finishing the baseline:
app.exec("UPDATE _unisync_capture SET baseline_done = 0");
s1.close();
s1 = open(a, "n1");                           // restart: baseline runs while 'x' is still pending
s1.sealPending();
await s1.upload();

const s2 = open(b, "n2");
await s2.pull("n1");
const count = (p) => new Database(p, { readonly: true }).prepare("SELECT count(*) AS n FROM logs").get().n;
console.log(`n1 has ${count(a)} row(s) 'x', n2 has ${count(b)}`);
console.log(count(a) === count(b) ? "OK" : "BUG: the row was duplicated on the other node");
process.exitCode = count(a) === count(b) ? 0 : 1;
