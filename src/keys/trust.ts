/**
 * Who belongs to a secured cluster, and the keys they share.
 *
 * - Each node has its own key file (`.unisync/node.key`, mode 0600): an Ed25519
 *   key that signs what the node writes, an X25519 key that cluster data keys are
 *   wrapped for, and the operator's public key, pinned when the file was made.
 * - The operator (whoever runs `unisync keys`) has a key file of the same shape.
 * - The trust list, `cluster/trust/<version:10>.json` in the store, names the
 *   members (their public keys), the removed members (and how far their logs
 *   stay valid), and every cluster data key ever used, each wrapped for each
 *   current member and the operator. It is signed by the operator: a bucket
 *   writer can delete it, never forge or change it. A node never goes back to a
 *   lower version than one it has accepted.
 */
import { createCipheriv, createDecipheriv, createPrivateKey, createPublicKey, diffieHellman, generateKeyPairSync, hkdfSync, randomBytes, sign, verify, type KeyObject } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";

export const TRUST_PREFIX = "cluster/trust/";
/** The index announces each new trust list as a pointer of origin OPERATOR, stream TRUST_STREAM, seq = version. */
export const TRUST_STREAM = "trust";
/** Wrapped keys for the operator are filed under this name (never a node name: nodes cannot start with '#'). */
export const OPERATOR = "#operator";

export class KeyConfigError extends Error {
  override name = "KeyConfigError";
  readonly code = "KEY_CONFIG";
}

export interface Member {
  name: string;
  /** Ed25519 public key, raw, base64url. */
  sign: string;
  /** X25519 public key, raw, base64url. */
  box: string;
  addedMs: number;
}

export interface RemovedMember {
  name: string;
  sign: string;
  removedMs: number;
  /** Per stream, the last seq of its log that stays valid (what the store held when it was removed). */
  through: Record<string, number>;
}

export interface TrustList {
  format: 1;
  cluster: string;
  version: number;
  createdMs: number;
  /** The operator's Ed25519 public key (the one nodes pinned). */
  operator: string;
  members: Member[];
  removed: RemovedMember[];
  /** Data key id new objects are sealed under. */
  currentKey: number;
  /** Every data key (old ones stay for reading), wrapped per recipient name (members and OPERATOR). */
  keys: { id: number; createdMs: number; wrapped: Record<string, string> }[];
  /** The key that turns content hashes into blob names (never rotated: content stays deduplicated), wrapped the same way. */
  addressKey: Record<string, string>;
}

/** A node's or the operator's own keys. */
export interface KeyFile {
  format: 1;
  /** The node's name, or OPERATOR. */
  name: string;
  sign: { private: KeyObject; public: string };
  box: { private: KeyObject; public: string };
  /** Nodes: the operator's public signing key, pinned when the file was made. */
  operator?: string;
}

const rawPublic = (k: KeyObject) => (k.export({ format: "jwk" }) as { x: string }).x;

/** The operator key a key file trusts: its own for the operator's file, the pinned one for a node's. */
export function pinnedOperator(k: KeyFile): string {
  const operator = k.name === OPERATOR ? k.sign.public : k.operator;
  if (!operator) throw new KeyConfigError(`key file of ${k.name} pins no operator key`);
  return operator;
}

export function newKeyFile(name: string, operator?: string): KeyFile {
  const s = generateKeyPairSync("ed25519");
  const b = generateKeyPairSync("x25519");
  return { format: 1, name, sign: { private: s.privateKey, public: rawPublic(s.publicKey) }, box: { private: b.privateKey, public: rawPublic(b.publicKey) }, operator };
}

export function writeKeyFile(path: string, k: KeyFile): void {
  if (existsSync(path)) throw new KeyConfigError(`${path} already exists; refusing to overwrite a key file (move it aside first if you really mean to)`);
  mkdirSync(dirname(path), { recursive: true });
  const body = {
    format: 1,
    name: k.name,
    sign: k.sign.private.export({ format: "jwk" }),
    box: k.box.private.export({ format: "jwk" }),
    operator: k.operator,
  };
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, JSON.stringify(body, null, 2) + "\n", { mode: 0o600 });
  chmodSync(tmp, 0o600);
  renameSync(tmp, path);
}

export function readKeyFile(path: string): KeyFile {
  let body: { format?: number; name?: string; sign?: object; box?: object; operator?: string };
  try {
    body = JSON.parse(readFileSync(path, "utf8"));
  } catch (err) {
    throw new KeyConfigError(`cannot read key file ${path}: ${(err as Error).message}`);
  }
  if (body.format !== 1 || typeof body.name !== "string" || !body.sign || !body.box) throw new KeyConfigError(`${path} is not a unisync key file`);
  try {
    const signKey = createPrivateKey({ key: body.sign as never, format: "jwk" });
    const boxKey = createPrivateKey({ key: body.box as never, format: "jwk" });
    return {
      format: 1,
      name: body.name,
      sign: { private: signKey, public: rawPublic(createPublicKey(signKey)) },
      box: { private: boxKey, public: rawPublic(createPublicKey(boxKey)) },
      operator: body.operator,
    };
  } catch (err) {
    throw new KeyConfigError(`key file ${path} holds a damaged key: ${(err as Error).message}`);
  }
}

export const signPublic = (raw: string) => createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: raw }, format: "jwk" });
const boxPublic = (raw: string) => createPublicKey({ key: { kty: "OKP", crv: "X25519", x: raw }, format: "jwk" });

/** The one-line public identity a node hands to the operator: unisync-node:<name>:<sign>:<box>. */
export function publicLine(k: KeyFile): string {
  return `unisync-node:${encodeURIComponent(k.name)}:${k.sign.public}:${k.box.public}`;
}

export function parsePublicLine(line: string): { name: string; sign: string; box: string } {
  const m = /^unisync-node:([^:\s]+):([A-Za-z0-9_-]{43}):([A-Za-z0-9_-]{43})$/.exec(line.trim());
  if (!m) throw new KeyConfigError(`not a node's public line (expected unisync-node:NAME:SIGNKEY:BOXKEY, as "unisync keys node" prints it): ${JSON.stringify(line)}`);
  const name = decodeURIComponent(m[1]!);
  try {
    signPublic(m[2]!);
    boxPublic(m[3]!);
  } catch {
    throw new KeyConfigError(`the public line of ${name} holds keys that are not valid Ed25519/X25519 keys`);
  }
  return { name, sign: m[2]!, box: m[3]! };
}

/** Seals `secret` so that only the holder of the X25519 key `boxRaw` can open it (ephemeral X25519, HKDF, AES-256-GCM). */
export function wrapSecret(secret: Buffer, boxRaw: string, context: string): string {
  const eph = generateKeyPairSync("x25519");
  const shared = diffieHellman({ privateKey: eph.privateKey, publicKey: boxPublic(boxRaw) });
  const ephRaw = Buffer.from(rawPublic(eph.publicKey), "base64url");
  const key = Buffer.from(hkdfSync("sha256", shared, Buffer.concat([ephRaw, Buffer.from(boxRaw, "base64url")]), "unisync wrap v1", 32));
  const iv = randomBytes(12);
  const c = createCipheriv("aes-256-gcm", key, iv);
  c.setAAD(Buffer.from(context));
  const ct = Buffer.concat([c.update(secret), c.final()]);
  return Buffer.concat([ephRaw, iv, ct, c.getAuthTag()]).toString("base64url");
}

export function unwrapSecret(wrapped: string, k: KeyFile, context: string): Buffer {
  const b = Buffer.from(wrapped, "base64url");
  const ephRaw = b.subarray(0, 32);
  const shared = diffieHellman({ privateKey: k.box.private, publicKey: boxPublic(ephRaw.toString("base64url")) });
  const key = Buffer.from(hkdfSync("sha256", shared, Buffer.concat([ephRaw, Buffer.from(k.box.public, "base64url")]), "unisync wrap v1", 32));
  const d = createDecipheriv("aes-256-gcm", key, b.subarray(32, 44));
  d.setAAD(Buffer.from(context));
  d.setAuthTag(b.subarray(b.length - 16));
  try {
    return Buffer.concat([d.update(b.subarray(44, b.length - 16)), d.final()]);
  } catch {
    throw new KeyConfigError(`a cluster key wrapped for ${k.name} does not open with this key file (a key file made again after the node was added?)`);
  }
}

export const trustKey = (version: number) => `${TRUST_PREFIX}${String(version).padStart(10, "0")}.json`;

/** The stored form: the list as a JSON string and the operator's signature over exactly those bytes. */
export function signTrustList(list: TrustList, operator: KeyFile): Buffer {
  const text = JSON.stringify(list);
  const signature = sign(null, Buffer.from(`unisync-trust-v1\0${text}`), operator.sign.private).toString("base64url");
  return Buffer.from(JSON.stringify({ list: text, signature }, null, 1));
}

/** Checks a stored trust list against the pinned operator key; throws KeyConfigError saying what is wrong. */
export function openTrustList(bytes: Buffer, operatorRaw: string, where: string): TrustList {
  let outer: { list?: string; signature?: string };
  try {
    outer = JSON.parse(bytes.toString("utf8"));
  } catch {
    throw new KeyConfigError(`${where} is not a trust list (not JSON)`);
  }
  if (typeof outer.list !== "string" || typeof outer.signature !== "string") throw new KeyConfigError(`${where} is not a trust list`);
  const ok = verify(null, Buffer.from(`unisync-trust-v1\0${outer.list}`), signPublic(operatorRaw), Buffer.from(outer.signature, "base64url"));
  if (!ok) throw new KeyConfigError(`${where} is not signed by this cluster's operator key (forged, changed, or another cluster's)`);
  const list = JSON.parse(outer.list) as TrustList;
  if (list.format !== 1 || list.operator !== operatorRaw) throw new KeyConfigError(`${where}: unknown trust list format or operator`);
  return list;
}

/** The data keys and the address key of `list`, as `k` unwraps them. */
export function unwrapKeys(list: TrustList, k: KeyFile): { keys: Map<number, Buffer>; addressKey: Buffer } {
  const keys = new Map<number, Buffer>();
  for (const dk of list.keys) {
    const w = dk.wrapped[k.name];
    if (w) keys.set(dk.id, unwrapSecret(w, k, `${list.cluster}/key/${dk.id}/${k.name}`));
  }
  const a = list.addressKey[k.name];
  if (!a || !keys.has(list.currentKey)) throw new KeyConfigError(`the trust list (version ${list.version}) holds no keys for "${k.name}"`);
  return { keys, addressKey: unwrapSecret(a, k, `${list.cluster}/address/${k.name}`) };
}

/** Wraps every key for one more recipient (adding a member). */
export function wrapAllFor(list: TrustList, secrets: { keys: Map<number, Buffer>; addressKey: Buffer }, name: string, boxRaw: string): void {
  for (const dk of list.keys) {
    const s = secrets.keys.get(dk.id);
    if (s) dk.wrapped[name] = wrapSecret(s, boxRaw, `${list.cluster}/key/${dk.id}/${name}`);
  }
  list.addressKey[name] = wrapSecret(secrets.addressKey, boxRaw, `${list.cluster}/address/${name}`);
}

/** A fresh data key, wrapped for the operator and every member, made current. */
export function addDataKey(list: TrustList, operator: KeyFile, nowMs: number): Buffer {
  const id = Math.max(0, ...list.keys.map((k) => k.id)) + 1;
  const secret = randomBytes(32);
  const wrapped: Record<string, string> = {};
  for (const [name, box] of [[OPERATOR, operator.box.public], ...list.members.map((m) => [m.name, m.box])] as [string, string][]) {
    wrapped[name] = wrapSecret(secret, box, `${list.cluster}/key/${id}/${name}`);
  }
  list.keys.push({ id, createdMs: nowMs, wrapped });
  list.currentKey = id;
  return secret;
}
