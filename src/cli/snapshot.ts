/**
 * `unisync snapshot`: take a snapshot now, or list the store's snapshots. With
 * an agent running beside the folder it asks the agent (only the agent may copy
 * the databases it holds open); otherwise it opens the streams itself.
 */
import { join, resolve } from "node:path";
import pino from "pino";
import { loadConfig, openNodeStore } from "../agent/config.js";
import { hlcToIso } from "../log/hlc.js";
import { requestSnapshot, runningAgent } from "../snapshot/agentlink.js";
import { takeSnapshot } from "../snapshot/create.js";
import { listSnapshots, readManifest } from "../snapshot/format.js";
import { openStreams } from "../stream/streams.js";
import { BadInputError } from "./usage.js";

type Parse = (args: string[], options: Record<string, { type: "string" | "boolean" }>) => { values: Record<string, string | boolean | undefined>; positionals: string[] };

export const SNAPSHOT_HELP = `Usage: unisync snapshot INSTANCE_DIR [--store URL] [--json]
       unisync snapshot --list [INSTANCE_DIR] [--store URL] [--verify] [--json]

Takes a snapshot of this node now: a consistent copy of every synced database
(merge state kept, node-local state stripped), the folder manifest and the
version vector, stored content-addressed under snapshots/ and blobs/. If the
agent runs beside INSTANCE_DIR it takes the snapshot (it holds the databases
open); otherwise this command does. The agent also takes one every
snapshotIntervalMs (config).
  --list      list the snapshots in the store, newest first
  --verify    with --list: read each manifest and check its hash
  --store URL the store (default: from INSTANCE_DIR's config)
  --json      machine-readable output`;

export async function snapshotCommand(args: string[], parse: Parse): Promise<void> {
  const { values, positionals } = parse(args, { store: { type: "string" }, json: { type: "boolean" }, list: { type: "boolean" }, verify: { type: "boolean" } });
  if (values.help) return console.log(SNAPSHOT_HELP);
  if (positionals.length > 1) throw new BadInputError(`snapshot takes one INSTANCE_DIR\n\n${SNAPSHOT_HELP}`);
  const storeArg = typeof values.store === "string" ? values.store : undefined;
  if (values.list) {
    const url = storeArg ?? (positionals[0] ? loadConfig({ instanceDir: positionals[0] }, undefined).store : undefined);
    if (!url) throw new BadInputError(`snapshot --list needs --store URL or an INSTANCE_DIR whose config names the store`);
    const store = await openNodeStore(url, positionals[0]);
    for (const ref of await listSnapshots(store)) {
      let problem: string | undefined;
      if (values.verify) problem = await readManifest(store, ref).then(() => undefined, (err: Error) => err.message);
      if (values.json) console.log(JSON.stringify({ ...ref, time: hlcToIso(ref.hlc), ...(values.verify ? { ok: !problem, problem } : {}) }));
      else console.log(`${hlcToIso(ref.hlc)}  ${ref.node.padEnd(12)} ${ref.key}${values.verify ? (problem ? `  CORRUPT: ${problem}` : "  ok") : ""}`);
    }
    return;
  }
  if (positionals.length !== 1) throw new BadInputError(`snapshot needs INSTANCE_DIR (or --list)\n\n${SNAPSHOT_HELP}`);
  const instanceDir = resolve(positionals[0]);
  const agent = runningAgent(instanceDir);
  let out: { key: string; bytes: number; hlc: number; by: string };
  if (agent) {
    const r = await requestSnapshot(instanceDir, 600_000);
    if (!r.ok) throw new Error(`the agent (pid ${agent.pid}) could not take the snapshot: ${r.error}`);
    out = { key: r.key, bytes: r.bytes, hlc: r.hlc, by: `agent pid ${agent.pid}` };
  } else {
    const config = loadConfig({ instanceDir, store: storeArg }, undefined);
    const store = await openNodeStore(config.store, config.instanceDir);
    const streams = openStreams({ ...config, store, log: pino({ level: "warn" }, pino.destination(2)) });
    try {
      await streams.files?.scanOnce(); // the folder as it is now, sealed like the agent would
      const r = await takeSnapshot({
        node: config.node,
        store,
        dbs: streams.dbs,
        files: streams.files,
        workDir: join(config.instanceDir, ".unisync", "snapshot-work"),
        upload: "push",
      });
      out = { key: r.key, bytes: r.bytes, hlc: r.manifest.hlc, by: "this command (no agent running)" };
    } finally {
      await streams.close();
    }
  }
  if (values.json) console.log(JSON.stringify({ ...out, time: hlcToIso(out.hlc) }));
  else console.log(`snapshot ${out.key}\n  at ${hlcToIso(out.hlc)}, ${out.bytes} bytes uploaded, taken by ${out.by}`);
}
