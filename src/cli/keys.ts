/**
 * `unisync keys`: make a store a secured cluster, add and remove nodes, rotate
 * the data key. Each change publishes the next version of the trust list,
 * signed with the operator key (see src/keys/trust.ts).
 */
import { randomBytes, randomUUID } from "node:crypto";
import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { loadConfig, nodeKeyPaths } from "../agent/config.js";
import { newestTrustList } from "../keys/vault.js";
import {
  addDataKey,
  KeyConfigError,
  newKeyFile,
  OPERATOR,
  parsePublicLine,
  pinnedOperator,
  publicLine,
  readKeyFile,
  signTrustList,
  TRUST_PREFIX,
  TRUST_STREAM,
  trustKey,
  unwrapKeys,
  wrapAllFor,
  wrapSecret,
  writeKeyFile,
  type KeyFile,
  type TrustList,
} from "../keys/trust.js";
import { publishPointer } from "../log/index.js";
import { listOrigins, listStreams, logHead } from "../log/keys.js";
import { sha256Hex } from "../log/segment.js";
import { listAll, type ObjectStore } from "../store/store.js";
import { openStore } from "../store/url.js";
import { BadInputError } from "./usage.js";

type Parse = (args: string[], options: Record<string, { type: "string" | "boolean" }>) => { values: Record<string, string | boolean | undefined>; positionals: string[] };

export const KEYS_HELP = `Usage: unisync keys <init|node|add|remove|rotate|show> ...

A secured cluster signs everything a node writes (Ed25519, one key per node)
and encrypts segments, file contents, snapshots and heartbeats (AES-256-GCM)
before they reach the store. A trust list in the store, signed by the
operator's key, names the member nodes and holds the data keys, wrapped for
each member. See README.md, "Secured clusters", for what this protects against.

  unisync keys init STORE_URL            make an empty store a secured cluster; creates the
                                         operator key file if it does not exist and prints its public key
  unisync keys node INSTANCE_DIR --operator KEY [--node NAME]
                                         on a node: make its key file (INSTANCE_DIR/.unisync/node.key)
                                         and print the line to hand to the operator
  unisync keys add STORE_URL LINE        admit a node (LINE: what "keys node" printed)
  unisync keys remove STORE_URL NAME     expel a node: its later segments are refused, and a new data
                                         key it does not get is made current (stop the node first)
  unisync keys rotate STORE_URL          a new data key for everything written from now on
  unisync keys show STORE_URL            members, removed nodes, data keys, trust list version

Options:
  --operator-key FILE   the operator key file (default ./unisync-operator.key, or UNISYNC_OPERATOR_KEY);
                        keep it off the nodes, and keep a copy: it is the only way to change the cluster
  --operator KEY        (keys node) the operator's public key, as "keys init" printed it
  --node NAME           (keys node) this node's name (default: as "unisync run" picks it)
  --json                (keys show) machine-readable output`;

const operatorLine = (k: KeyFile) => `unisync-operator:${k.sign.public}`;

async function publish(store: ObjectStore, operator: KeyFile, list: TrustList): Promise<TrustList> {
  const bytes = signTrustList(list, operator);
  if ((await store.putIfAbsent(trustKey(list.version), bytes)) === "exists") {
    throw new KeyConfigError(`another change published trust list version ${list.version} meanwhile; run the command again`);
  }
  // Announced in the index that every agent polls anyway: they take the new list at their next poll.
  await publishPointer(store, Date.now(), OPERATOR, TRUST_STREAM, [{ seq: list.version, sha256: sha256Hex(bytes) }]);
  return list;
}

async function current(store: ObjectStore, keys: KeyFile): Promise<TrustList> {
  const found = await newestTrustList(store, pinnedOperator(keys));
  if (!found) throw new KeyConfigError(`${store.description} is not a secured cluster (no trust list): run "unisync keys init" first`);
  return found.list;
}

/** The next version of the list, after `change`. */
async function nextVersion(store: ObjectStore, operator: KeyFile, change: (list: TrustList, nowMs: number) => void): Promise<TrustList> {
  const list = await current(store, operator);
  const nowMs = Date.now();
  change(list, nowMs);
  list.version++;
  list.createdMs = nowMs;
  return publish(store, operator, list);
}

/** Makes an empty store a secured cluster: version 1 of the trust list, one data key, no members yet. */
export async function initCluster(store: ObjectStore, operator: KeyFile, nowMs = Date.now()): Promise<TrustList> {
  for await (const o of listAll(store, TRUST_PREFIX)) throw new KeyConfigError(`${store.description} is a secured cluster already (${o.key}); use "unisync keys add/remove/rotate"`);
  const origins = await listOrigins(store);
  if (origins.length) {
    throw new KeyConfigError(
      `${store.description} already holds a plain log (origins ${origins.join(", ")}), whose history is in clear. ` +
        `Secure a new, empty store (another bucket or prefix) and point every node at it: each node's data joins it by enrolment`,
    );
  }
  const list: TrustList = { format: 1, cluster: randomUUID(), version: 1, createdMs: nowMs, operator: operator.sign.public, members: [], removed: [], currentKey: 0, keys: [], addressKey: {} };
  addDataKey(list, operator, nowMs);
  list.addressKey[OPERATOR] = wrapSecret(randomBytes(32), operator.box.public, `${list.cluster}/address/${OPERATOR}`);
  return publish(store, operator, list);
}

/** Admits a node by the public line its "unisync keys node" printed: every data key is wrapped for it. */
export function addMember(store: ObjectStore, operator: KeyFile, line: string): Promise<TrustList> {
  const node = parsePublicLine(line);
  return nextVersion(store, operator, (list, nowMs) => {
    const same = list.members.find((m) => m.name === node.name);
    if (same) throw new KeyConfigError(same.sign === node.sign ? `"${node.name}" is a member already` : `a member named "${node.name}" exists with other keys: remove it first, or give the new node another name`);
    if (list.removed.some((r) => r.name === node.name)) {
      throw new KeyConfigError(`"${node.name}" was removed from this cluster; a node that joins again needs a new name (--node), so that its old log stays apart`);
    }
    wrapAllFor(list, unwrapKeys(list, operator), node.name, node.box);
    list.members.push({ name: node.name, sign: node.sign, box: node.box, addedMs: nowMs });
  });
}

/**
 * Expels a node: its log stays valid as far as the store holds it now, later
 * segments of it are refused, and a new data key (not given to it) becomes
 * current, so it cannot read what is written from now on.
 */
export async function removeMember(store: ObjectStore, operator: KeyFile, name: string): Promise<TrustList> {
  const through: Record<string, number> = {};
  for (const stream of await listStreams(store, name)) through[stream] = await logHead(store, name, stream);
  return nextVersion(store, operator, (list, nowMs) => {
    const member = list.members.find((m) => m.name === name);
    if (!member) throw new KeyConfigError(`"${name}" is not a member (members: ${list.members.map((m) => m.name).join(", ") || "none"})`);
    list.members = list.members.filter((m) => m.name !== name);
    list.removed.push({ name, sign: member.sign, removedMs: nowMs, through });
    for (const k of list.keys) delete k.wrapped[name];
    delete list.addressKey[name];
    addDataKey(list, operator, nowMs);
  });
}

/** A new data key for everything written from now on; old keys stay for reading. */
export function rotateKey(store: ObjectStore, operator: KeyFile): Promise<TrustList> {
  return nextVersion(store, operator, (list, nowMs) => void addDataKey(list, operator, nowMs));
}

function operatorKeyPath(v: string | boolean | undefined): string {
  return resolve(typeof v === "string" ? v : process.env.UNISYNC_OPERATOR_KEY ?? "unisync-operator.key");
}

function loadOperator(v: string | boolean | undefined): KeyFile {
  const path = operatorKeyPath(v);
  if (!existsSync(path)) throw new BadInputError(`no operator key file at ${path} (--operator-key FILE, or UNISYNC_OPERATOR_KEY)`);
  const k = readKeyFile(path);
  if (k.name !== OPERATOR) throw new BadInputError(`${path} is a node's key file, not the operator's`);
  return k;
}

function describe(list: TrustList): string {
  const when = (ms: number) => new Date(ms).toISOString();
  return [
    `cluster ${list.cluster}, trust list version ${list.version} (${when(list.createdMs)})`,
    `operator key: unisync-operator:${list.operator}`,
    `members: ${list.members.map((m) => `${m.name} (since ${when(m.addedMs)})`).join(", ") || "none yet"}`,
    ...list.removed.map((r) => `removed: ${r.name} at ${when(r.removedMs)}; its log stays valid through ${Object.entries(r.through).map(([s, n]) => `${s}#${n}`).join(", ") || "nothing"}`),
    `data keys: ${list.keys.map((k) => `${k.id}${k.id === list.currentKey ? " (current)" : ""}`).join(", ")}`,
  ].join("\n");
}

export async function keysCommand(args: string[], parse: Parse): Promise<void> {
  const { values, positionals } = parse(args, { "operator-key": { type: "string" }, operator: { type: "string" }, node: { type: "string" }, json: { type: "boolean" } });
  const [sub, ...rest] = positionals;
  if (values.help || !sub) {
    console.log(KEYS_HELP);
    if (!sub && !values.help) throw new BadInputError("keys needs a subcommand: init, node, add, remove, rotate or show");
    return;
  }
  const need = (n: number, what: string) => {
    if (rest.length !== n) throw new BadInputError(`keys ${sub} needs ${what}\n\n${KEYS_HELP}`);
  };
  if (sub === "node") {
    need(1, "INSTANCE_DIR");
    const op = typeof values.operator === "string" ? values.operator.replace(/^unisync-operator:/, "") : "";
    if (!/^[A-Za-z0-9_-]{43}$/.test(op)) throw new BadInputError(`keys node needs --operator KEY, the operator's public key as "unisync keys init" printed it (unisync-operator:...)`);
    const config = loadConfig({ instanceDir: rest[0]!, store: "unused", node: typeof values.node === "string" ? values.node : undefined }, undefined);
    const { keyFile } = nodeKeyPaths(config.instanceDir);
    const k = newKeyFile(config.node, op);
    writeKeyFile(keyFile, k);
    console.log(`wrote ${keyFile} (keep it private; it never leaves this node)\nhand this line to the operator, who runs: unisync keys add STORE_URL '<line>'\n${publicLine(k)}`);
    return;
  }
  if (sub === "init") {
    need(1, "STORE_URL");
    const path = operatorKeyPath(values["operator-key"]);
    const made = !existsSync(path);
    if (made) writeKeyFile(path, newKeyFile(OPERATOR));
    const operator = loadOperator(path);
    const list = await initCluster(openStore(rest[0]!), operator);
    console.log(
      `${made ? `wrote the operator key file ${path} (keep it safe and off the nodes)\n` : ""}` +
        `secured cluster ${list.cluster} created.\noperator public key (for "unisync keys node ... --operator"):\n${operatorLine(operator)}`,
    );
    return;
  }
  if (sub === "show") {
    need(1, "STORE_URL");
    const nodeKey = process.env.UNISYNC_KEY_FILE;
    if (!existsSync(operatorKeyPath(values["operator-key"])) && !nodeKey) {
      throw new BadInputError(`keys show needs the operator key file (--operator-key FILE) or a node's (UNISYNC_KEY_FILE) to check the list's signature`);
    }
    const keys = nodeKey && !existsSync(operatorKeyPath(values["operator-key"])) ? readKeyFile(nodeKey) : loadOperator(values["operator-key"]);
    const list = await current(openStore(rest[0]!), keys);
    const plain = { ...list, keys: list.keys.map((k) => ({ id: k.id, createdMs: k.createdMs, wrappedFor: Object.keys(k.wrapped) })), addressKey: undefined };
    console.log(values.json ? JSON.stringify(plain, null, 2) : describe(list));
    return;
  }
  const operator = loadOperator(values["operator-key"]);
  let list: TrustList;
  if (sub === "add") {
    need(2, "STORE_URL and the node's public line");
    list = await addMember(openStore(rest[0]!), operator, rest[1]!);
  } else if (sub === "remove") {
    need(2, "STORE_URL and NAME");
    list = await removeMember(openStore(rest[0]!), operator, rest[1]!);
  } else if (sub === "rotate") {
    need(1, "STORE_URL");
    list = await rotateKey(openStore(rest[0]!), operator);
  } else throw new BadInputError(`unknown keys subcommand "${sub}"\n\n${KEYS_HELP}`);
  console.log(`published trust list version ${list.version}; running agents take it at their next poll (within pollMaxMs, 5 s by default)\n${describe(list)}`);
}
