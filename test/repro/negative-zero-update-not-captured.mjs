// Reproduction (run after `npm run build`): node test/repro/negative-zero-update-not-captured.mjs
//
// An untyped column keeps the sign of a REAL zero. The update trigger decides
// "changed" with `OLD.c IS NOT NEW.c OR typeof(OLD.c) <> typeof(NEW.c)`, which
// is false for -0.0 -> 0.0 (and 0.0 -> -0.0): the write is never captured, so
// the nodes differ for good. random_writer.py writes both zeros into untyped
// columns (REALS has -0.0 and 0.0), so long runs hit it (seen in crash.test.ts:
// edges.label 0.0 on the writer's node, -0.0 on the other).
import Database from "better-sqlite3";
import { join } from "node:path";
import { scratch } from "./lib.mjs";

const { dir, store, open } = scratch("negzero-");
const pathA = join(dir, "a.db");
const pathB = join(dir, "b.db");
for (const p of [pathA, pathB]) new Database(p).exec("CREATE TABLE edges(id INTEGER PRIMARY KEY, label)").close();
const A = open(pathA, "A");
const B = open(pathB, "B");
const appA = new Database(pathA);
const appB = new Database(pathB);
const sync = async () => { A.sealPending(); await A.upload(); await B.pull("A"); };

appA.prepare("INSERT INTO edges VALUES (1, ?)").run(-0);
await sync();
appA.prepare("UPDATE edges SET label = ? WHERE id = 1").run(0);
await sync();
const sign = (db) => (Object.is(db.prepare("SELECT label FROM edges").get().label, -0) ? "-0.0" : "0.0");
console.log(`A: label = ${sign(appA)}, B: label = ${sign(appB)}`);
console.log(sign(appA) === sign(appB) ? "OK" : "BUG: the update -0.0 -> 0.0 was not captured");
process.exitCode = sign(appA) === sign(appB) ? 0 : 1;
