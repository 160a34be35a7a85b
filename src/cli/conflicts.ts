/** `unisync conflicts`: what the merge rules resolved in each synced database of this node (read by report/conflicts.ts). */
import Database from "better-sqlite3";
import { existsSync } from "node:fs";
import { loadConfig } from "../agent/config.js";
import { findDatabases } from "../db/databases.js";
import { readConflicts, type ConflictReport } from "../report/conflicts.js";
import { BadInputError } from "./usage.js";

type Parse = (args: string[], options: Record<string, { type: "string" | "boolean" }>) => { values: Record<string, string | boolean | undefined>; positionals: string[] };

export const CONFLICTS_HELP = `Usage: unisync conflicts INSTANCE_DIR [--limit N] [--json]

Lists what the merge rules resolved in each synced database of this node:
  moved      two nodes created different rows with the same INTEGER PRIMARY KEY
             while apart. Both rows are kept: the one created first keeps the id,
             the other moved to a new id (the same on every node), and the rows
             that pointed at it (foreign keys) moved with it.
  set aside  two nodes created rows with the same values in a UNIQUE column. The
             row created first stays; the other is kept here with all its values,
             out of the table, on every node alike. It comes back by itself when
             the clash ends (the kept row changes those values or is deleted).
  kept/fixed foreign keys the merge repaired: a row written on one node while
             another deleted the row it refers to keeps that row alive (or, for
             tables in declaredOnDelete, follows the declared ON DELETE action);
             a row referring to a row set aside now refers to the row that kept
             its values.
  enrolled   columns that two nodes held differently under one key before
             unisync met their databases (copies edited apart): the value of the
             node that enrolled first is kept; both are shown.
  parked     records that cannot apply yet (a table or column this node lacks,
             a row they point at not yet arrived, a clock too far ahead).
  --limit N  list at most N of each kind (default 1000; the totals are always whole)
  --json     machine-readable output`;

export async function conflictsCommand(args: string[], parse: Parse): Promise<void> {
  const { values, positionals } = parse(args, { json: { type: "boolean" }, limit: { type: "string" } });
  if (values.help) return console.log(CONFLICTS_HELP);
  if (positionals.length !== 1) throw new BadInputError(`conflicts needs INSTANCE_DIR\n\n${CONFLICTS_HELP}`);
  const limit = values.limit === undefined ? 1000 : Number(values.limit);
  if (!Number.isInteger(limit) || limit < 0) throw new BadInputError(`--limit must be a whole number, got ${JSON.stringify(values.limit)}`);
  const config = loadConfig({ instanceDir: positionals[0], store: "unused" }, undefined);
  const reports: ConflictReport[] = [];
  for (const { path, stream } of findDatabases(config.instanceDir, config.databases, true).synced) {
    if (!existsSync(path)) continue;
    const db = new Database(path, { readonly: true, fileMustExist: true });
    db.defaultSafeIntegers(true);
    try {
      if (db.prepare("SELECT 1 FROM sqlite_master WHERE name = '_unisync_meta'").get()) reports.push(readConflicts(db, stream, limit));
    } finally {
      db.close();
    }
  }
  if (values.json) return console.log(JSON.stringify({ instanceDir: config.instanceDir, databases: reports }, null, 2));
  if (reports.length === 0) return console.log("no enrolled database here yet (start the agent)");
  for (const r of reports) {
    console.log(
      `database ${r.stream}: ${r.totals.moved} moved, ${r.totals.setAside} set aside, ${r.totals.repaired} foreign key(s) repaired, ` +
        `${r.totals.enrolmentDifferences} enrolment difference(s), ${r.parked} parked`,
    );
    const shown = r.moved.length + r.setAside.length + r.repaired.length + r.enrolmentDifferences.length;
    const total = r.totals.moved + r.totals.setAside + r.totals.repaired + r.totals.enrolmentDifferences;
    if (shown < total) console.log(`  (listing at most ${limit} of each kind, ${shown} of ${total}: --limit N lists more)`);
    for (const m of r.moved) {
      console.log(`  moved     ${m.table} ${m.from} -> ${m.to}  (created by ${m.createdBy}${m.createdAt ? ` at ${m.createdAt}` : ""}; id ${m.from} kept by ${m.keptBy})`);
    }
    for (const s of r.setAside) {
      const vals = Object.entries(s.values).map(([k, v]) => `${k}=${v}`).join(", ");
      const kept = s.kept ? Object.entries(s.kept).map(([k, v]) => `${k}=${v}`).join(", ") : "(not here now)";
      console.log(`  set aside ${s.table} (${s.key.join(", ")}) clashes with kept row (${s.keptKey.join(", ")})\n            set aside: ${vals}\n            kept:      ${kept}`);
    }
    for (const f of r.repaired) {
      const what = f.action === "kept parent" ? `kept ${f.table} (${f.key.join(", ")}), deleted while ${f.child} (${f.childKey.join(", ")}) was written referring to it`
        : f.action === "moved to kept row" ? `${f.child} (${f.childKey.join(", ")}) now refers to the ${f.table} row that kept the unique values of (${f.key.join(", ")}), set aside`
        : `${f.child} (${f.childKey.join(", ")}): ${f.action}, as ${f.table} (${f.key.join(", ")}) was deleted`;
      console.log(`  repaired  ${what}  [${f.at}]`);
    }
    for (const d of r.enrolmentDifferences) {
      console.log(`  enrolled  ${d.table} (${d.key.join(", ")}).${d.column}: kept ${d.kept.value} (${d.kept.node}); ${d.other.node} had ${d.other.value}`);
    }
    if (r.parked) console.log(`  parked    ${r.parked} record(s): see \`unisync status\` for why`);
  }
}
