/**
 * A node's keys at run time: its key file, the trust list it accepted and the
 * data keys that list gives it. It seals what the node writes and judges what it
 * reads: who may sign what, under which data key.
 */
import { createHmac, sign, verify } from "node:crypto";
import { existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { listAll, type ObjectStore } from "../store/store.js";
import { openBuffer, OpenStream, sealBuffer, SealError, SealStream, type Opener, type Sealer } from "./envelope.js";
import { KeyConfigError, OPERATOR, openTrustList, pinnedOperator, signPublic, TRUST_PREFIX, unwrapKeys, type KeyFile, type TrustList } from "./trust.js";

/** The label a segment is sealed under: its identity, so a copy under another name or seq is refused. */
export function segmentLabel(origin: string, stream: string, seq: number): string {
  return `segment ${JSON.stringify([origin, stream, seq])}`;
}

/** The newest trust list in the store (verified), or null when the store holds none. */
export async function newestTrustList(store: ObjectStore, operatorRaw: string, afterVersion = 0): Promise<{ list: TrustList; bytes: Buffer } | null> {
  let last: string | undefined;
  for await (const o of listAll(store, TRUST_PREFIX)) last = o.key;
  if (!last) return null;
  const bytes = await store.get(last);
  if (!bytes) return null;
  const list = openTrustList(bytes, operatorRaw, last);
  return list.version > afterVersion ? { list, bytes } : null;
}

export class Vault implements Opener {
  private list!: TrustList;
  private keys = new Map<number, Buffer>();
  private addressKey: Buffer = Buffer.alloc(0);

  /**
   * `cacheFile`: where the accepted trust list is kept (a node starts while the
   * store is down, and never accepts an older version than this one).
   */
  constructor(
    readonly me: KeyFile,
    trustBytes: Buffer,
    private readonly cacheFile?: string,
  ) {
    this.operator = pinnedOperator(me);
    this.accept(openTrustList(trustBytes, this.operator, "the trust list"), trustBytes);
  }

  private readonly operator: string;

  /** The vault of a key file with its cached trust list, or null when there is no cache yet. */
  static fromCache(me: KeyFile, cacheFile: string): Vault | null {
    return existsSync(cacheFile) ? new Vault(me, readFileSync(cacheFile), cacheFile) : null;
  }

  get trust(): TrustList {
    return this.list;
  }

  private accept(list: TrustList, bytes: Buffer): void {
    if (this.list && list.version <= this.list.version) return;
    if (this.me.name !== OPERATOR && !list.members.some((m) => m.name === this.me.name && m.sign === this.me.sign.public)) {
      const removed = list.removed.some((r) => r.name === this.me.name && r.sign === this.me.sign.public);
      throw new KeyConfigError(
        removed
          ? `node "${this.me.name}" was removed from the cluster (trust list version ${list.version}): it may no longer read or write`
          : `node "${this.me.name}" (this key file) is not a member of the cluster (trust list version ${list.version}). ` +
            `The operator adds it with: unisync keys add STORE_URL <the line "unisync keys node" printed>`,
      );
    }
    const secrets = unwrapKeys(list, this.me);
    this.list = list;
    this.keys = secrets.keys;
    this.addressKey = secrets.addressKey;
    if (this.cacheFile) {
      writeFileSync(`${this.cacheFile}.tmp`, bytes, { mode: 0o600 });
      renameSync(`${this.cacheFile}.tmp`, this.cacheFile);
    }
  }

  /** Reads a newer trust list from the store, if there is one; returns whether it changed anything. */
  async refresh(store: ObjectStore): Promise<boolean> {
    const newer = await newestTrustList(store, this.operator, this.list.version);
    if (!newer) return false;
    this.accept(newer.list, newer.bytes);
    return true;
  }

  /** The store name of a content address: an HMAC, so the bucket does not reveal which content it holds. */
  blobName(sha256: string): string {
    return createHmac("sha256", this.addressKey).update(sha256).digest("hex");
  }

  private sealer(signed: boolean): Sealer {
    return {
      keyId: this.list.currentKey,
      key: this.keys.get(this.list.currentKey)!,
      signer: this.me.name,
      sign: signed ? (digest) => sign(null, digest, this.me.sign.private) : undefined,
    };
  }

  seal(payload: Buffer, label: string, signed: boolean): Buffer {
    return sealBuffer(payload, label, this.sealer(signed));
  }

  open(bytes: Buffer, what: string, label?: string, mustSign = false): Buffer {
    return openBuffer(bytes, this, what, label, mustSign).payload;
  }

  sealStream(label: string): SealStream {
    return new SealStream(label, this.sealer(false));
  }

  openStream(what: string, label?: string): OpenStream {
    return new OpenStream(this, what, label);
  }

  key(keyId: number): Buffer | undefined {
    return this.keys.get(keyId);
  }

  /**
   * Who may sign what: a segment only its origin (a removed member only as far
   * as its log went when it was removed), a heartbeat or snapshot only its node,
   * anything else (gc markers) any member or the operator.
   */
  verify(signer: string, label: string, digest: Buffer, signature: Buffer): void {
    const member = this.list.members.find((m) => m.name === signer);
    let key = member?.sign ?? (signer === OPERATOR ? this.operator : undefined);
    const seg = /^segment (\[.*\])$/.exec(label);
    if (seg) {
      const [origin, stream, seq] = JSON.parse(seg[1]!) as [string, string, number];
      if (signer !== origin) throw new SealError("not-trusted", `segment ${seq} of "${origin}" (${stream}) is signed by "${signer}", not by its origin`);
      const gone = this.list.removed.find((r) => r.name === signer);
      if (!member && gone && seq <= (gone.through[stream] ?? 0)) key = gone.sign;
      else if (!member) {
        throw new SealError(
          "not-trusted",
          gone
            ? `segment ${seq} of "${origin}" (${stream}) was written after "${origin}" was removed from the cluster (its log stays valid through seq ${gone.through[stream] ?? 0})`
            : `segment ${seq} of "${origin}" (${stream}) comes from "${origin}", which is not a member of the cluster`,
        );
      }
    } else {
      // A node's heartbeat and snapshots are signed by that node.
      const node = /^nodes\/(.+)\.json$/.exec(label) ?? /^snapshots\/([^/]+)\//.exec(label);
      if (node && decodeURIComponent(node[1]!) !== signer) throw new SealError("not-trusted", `${label} is signed by "${signer}", not by that node`);
      if (!key) throw new SealError("not-trusted", `${label} is signed by "${signer}", which is not a member of the cluster`);
    }
    if (!verify(null, digest, signPublic(key!), signature)) {
      throw new SealError("bad-signature", `${label}: the signature of "${signer}" does not verify (forged, or bytes changed)`);
    }
  }
}
