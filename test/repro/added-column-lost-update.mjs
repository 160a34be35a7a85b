// Reproduction (run after `npm run build`): node test/repro/added-column-lost-update.mjs
//
// Node A has migrated (ADD COLUMN note) and sets note on a row; node B has not
// migrated yet, so A's record is parked on B. B then updates most other columns
// of the row (a later clock). The merge state compacts B's stamps into the row's
// `base` clock, and a column the state has never seen (note) takes the base
// clock: when B migrates and retries the parked record, A's older write to note
// loses against B's update, which never wrote note. A keeps A's note: the two
// nodes differ forever (no later record touches note).
import Database from "better-sqlite3";
import { join } from "node:path";
import { scratch } from "./lib.mjs";

const { dir, store, open } = scratch("added-column-");
const pathA = join(dir, "a.db");
const pathB = join(dir, "b.db");
for (const p of [pathA, pathB]) new Database(p).exec("CREATE TABLE items(id INTEGER PRIMARY KEY, a, b)").close();
const A = open(pathA, "A");
const B = open(pathB, "B");
const appA = new Database(pathA);
const appB = new Database(pathB);
const sync = async (from, to, origin) => { from.sealPending(); await from.upload(); await to.pull(origin); };
const tick = () => new Promise((r) => setTimeout(r, 5));

appB.exec("INSERT INTO items VALUES (1, 'a0', 'b0')");
await sync(B, A, "B");

appA.exec("ALTER TABLE items ADD COLUMN note TEXT DEFAULT 'n/a'");   // A's app migrates first
await tick();
appA.exec("UPDATE items SET note = 'from A' WHERE id = 1");
await sync(A, B, "A");                                                  // parked on B: no column note yet
console.log("parked on B:", B.parkedCount());

await tick();
appB.exec("UPDATE items SET a = 'a1', b = 'b1' WHERE id = 1");          // later write on B, not touching note
B.sealPending();                                                        // ... captured and sealed as usual
appB.exec("ALTER TABLE items ADD COLUMN note TEXT DEFAULT 'n/a'");    // B's app migrates later
await sync(B, A, "B");
B.sealPending();                                                        // B sees the new column, retries parked records
await sync(A, B, "A");

const row = (db) => JSON.stringify(db.prepare("SELECT id, a, b, note FROM items").get());
console.log("A:", row(appA));
console.log("B:", row(appB));
console.log(row(appA) === row(appB) ? "OK" : "BUG: the nodes disagree on note for good");
process.exitCode = row(appA) === row(appB) ? 0 : 1;
