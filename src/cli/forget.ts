/**
 * `unisync forget INSTANCE_DIR --db FILE`: removes unisync's tables and
 * triggers from one database, leaving the app's tables as they are. For a file
 * copied from another node (the agent refuses it: its seqs and clocks are that
 * node's) or a file that should be enrolled afresh: the next agent that meets
 * it replays the log into it before it enrols its rows, so nothing in it
 * overrides what the cluster logged.
 */
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import Database from "better-sqlite3";
import { loadConfig } from "../agent/config.js";
import { forgetUnisync } from "../db/internal.js";
import { getMeta } from "../db/meta.js";
import { runningAgent } from "../snapshot/agentlink.js";
import { BadInputError } from "./usage.js";

type Parse = (args: string[], options: Record<string, { type: "string" | "boolean" }>) => { values: Record<string, string | boolean | undefined>; positionals: string[] };

export const FORGET_HELP = `Usage: unisync forget INSTANCE_DIR --db FILE [--force]

Removes unisync's own tables and triggers (_unisync_*) from one database of the
instance folder; the app's tables stay as they are, and the app's own triggers
get back the text the app wrote (the agent adds a replay guard to those that
write synced tables). Use it for a database copied from another node (the agent
refuses such a file) or restored from a backup, to enrol it afresh: the agent
then replays the cluster's log into it before it enrols its rows, so nothing in
it overrides what the cluster logged.
The agent must not be running beside the folder.
  --db FILE   the database, relative to INSTANCE_DIR (e.g. app.db)
  --force     also when the file holds this node's changes that are not in the
              store yet (they would be lost)`;

export async function forgetCommand(args: string[], parse: Parse): Promise<void> {
  const { values, positionals } = parse(args, { db: { type: "string" }, force: { type: "boolean" } });
  if (values.help) return console.log(FORGET_HELP);
  if (positionals.length !== 1 || typeof values.db !== "string") throw new BadInputError(`forget needs INSTANCE_DIR and --db FILE\n\n${FORGET_HELP}`);
  const config = loadConfig({ instanceDir: positionals[0], store: "unused" }, undefined);
  const path = resolve(join(config.instanceDir, values.db));
  if (!path.startsWith(config.instanceDir + "/")) throw new BadInputError(`--db ${values.db} is not inside the instance folder`);
  if (!existsSync(path)) throw new BadInputError(`${path} does not exist`);
  const agent = runningAgent(config.instanceDir);
  if (agent) throw new BadInputError(`the agent (pid ${agent.pid}, node ${agent.node}) is running beside ${config.instanceDir}: stop it first`);
  const db = new Database(path, { fileMustExist: true, timeout: config.busyTimeoutMs });
  try {
    if (!db.prepare("SELECT 1 FROM sqlite_master WHERE name = '_unisync_meta'").get()) return console.log(`${values.db}: unisync keeps nothing in it`);
    const owner = getMeta(db, "node");
    const count = (t: string) => (db.prepare(`SELECT 1 FROM sqlite_master WHERE name = '${t}'`).get() ? Number(db.prepare(`SELECT count(*) FROM ${t}`).pluck().get()) : 0);
    const unsent = count("_unisync_outbox") + count("_unisync_changes");
    if (owner === config.node && unsent > 0 && !values.force) {
      throw new BadInputError(`${values.db} holds ${unsent} change(s) of this node (${config.node}) not in the store yet; start the agent to send them, or use --force to lose them`);
    }
    const n = forgetUnisync(db);
    console.log(`${values.db}: removed ${n} unisync table(s) and trigger(s) (it was enrolled by ${String(owner ?? "no node")}); the agent enrols it afresh at its next start`);
  } finally {
    db.close();
  }
}
