/**
 * The sealed object of a secured cluster: what a bucket holds instead of plain
 * bytes. One format for segments, blobs, snapshots and heartbeats:
 *
 *   "USX1" | flags u8 | key id u32 | salt (32) | signer (u8 len + utf8) | label (u16 len + utf8)
 *   | chunks | [signature (64), when flags & SIGNED]
 *
 * - The payload is cut into chunks of CHUNK bytes (the last one shorter, maybe
 *   empty), each encrypted with AES-256-GCM under a key derived for this object
 *   alone (HKDF of the cluster data key `key id` and the random salt), nonce =
 *   chunk number, and the header plus a "last chunk" byte as associated data. A
 *   chunk cannot be changed, moved, dropped or cut off without failing its tag,
 *   and a stream is verified chunk by chunk, so nothing unverified is released.
 * - The label names what the object is (a store key, or "segment <origin>/<stream>/<seq>"),
 *   so an object copied under another name is refused.
 * - A signed object ends with the signer's Ed25519 signature of the sha256 of
 *   everything before it. Who may sign what is the vault's business (vault.ts).
 */
import { createCipheriv, createDecipheriv, createHash, hkdfSync, randomBytes } from "node:crypto";
import { Transform, type TransformCallback } from "node:stream";

export const SEALED_MAGIC = Buffer.from("USX1");
const FLAG_SIGNED = 1;
/** Plaintext bytes per chunk: memory per stream stays at about two of these. */
export const CHUNK = 1024 * 1024;
const TAG = 16;
export const SIGNATURE_BYTES = 64;

/** A sealed object that cannot be used: the message says why, in words an operator can act on. */
export class SealError extends Error {
  override name = "SealError";
  constructor(
    readonly reason: "not-sealed" | "malformed" | "unknown-key" | "tampered" | "unsigned" | "bad-signature" | "not-trusted" | "wrong-label",
    message: string,
  ) {
    super(message);
  }
}

export interface EnvelopeHeader {
  keyId: number;
  salt: Buffer;
  signer: string;
  label: string;
  signed: boolean;
  /** The header as stored (associated data of every chunk). */
  raw: Buffer;
}

export function isSealed(bytes: Buffer): boolean {
  return bytes.length >= 4 && bytes.subarray(0, 4).equals(SEALED_MAGIC);
}

function buildHeader(keyId: number, signer: string, label: string, signed: boolean): EnvelopeHeader {
  const salt = randomBytes(32);
  const s = Buffer.from(signer, "utf8");
  const l = Buffer.from(label, "utf8");
  if (s.length > 255 || l.length > 65535) throw new Error("signer or label too long for a sealed object");
  const raw = Buffer.alloc(4 + 1 + 4 + 32 + 1 + s.length + 2 + l.length);
  let o = SEALED_MAGIC.copy(raw, 0);
  o = raw.writeUInt8(signed ? FLAG_SIGNED : 0, o);
  o = raw.writeUInt32BE(keyId, o);
  o += salt.copy(raw, o);
  o = raw.writeUInt8(s.length, o);
  o += s.copy(raw, o);
  o = raw.writeUInt16BE(l.length, o);
  l.copy(raw, o);
  return { keyId, salt, signer, label, signed, raw };
}

/** Reads the header at the start of `bytes`; null when more bytes are needed. */
export function parseHeader(bytes: Buffer): EnvelopeHeader | null {
  if (bytes.length < 4) return null;
  if (!isSealed(bytes)) throw new SealError("not-sealed", "not a sealed object (no USX1 header)");
  if (bytes.length < 42) return null;
  const flags = bytes.readUInt8(4);
  const keyId = bytes.readUInt32BE(5);
  const salt = Buffer.from(bytes.subarray(9, 41));
  const sLen = bytes.readUInt8(41);
  if (bytes.length < 42 + sLen + 2) return null;
  const signer = bytes.subarray(42, 42 + sLen).toString("utf8");
  const lLen = bytes.readUInt16BE(42 + sLen);
  const end = 44 + sLen + lLen;
  if (bytes.length < end) return null;
  const label = bytes.subarray(44 + sLen, end).toString("utf8");
  if (flags & ~FLAG_SIGNED) throw new SealError("malformed", `sealed object with unknown flags ${flags}`);
  return { keyId, salt, signer, label, signed: (flags & FLAG_SIGNED) !== 0, raw: Buffer.from(bytes.subarray(0, end)) };
}

function objectKey(dataKey: Buffer, salt: Buffer): Buffer {
  return Buffer.from(hkdfSync("sha256", dataKey, salt, "unisync object v1", 32));
}

function nonce(chunk: number): Buffer {
  const n = Buffer.alloc(12);
  n.writeUIntBE(chunk, 6, 6);
  return n;
}

function sealChunk(key: Buffer, header: Buffer, index: number, last: boolean, plain: Buffer): Buffer {
  const c = createCipheriv("aes-256-gcm", key, nonce(index));
  c.setAAD(Buffer.concat([header, Buffer.from([last ? 1 : 0])]));
  return Buffer.concat([c.update(plain), c.final(), c.getAuthTag()]);
}

function openChunk(key: Buffer, header: Buffer, index: number, last: boolean, sealed: Buffer, what: string): Buffer {
  if (sealed.length < TAG) throw new SealError("tampered", `${what}: truncated (chunk ${index} has no tag)`);
  const d = createDecipheriv("aes-256-gcm", key, nonce(index));
  d.setAAD(Buffer.concat([header, Buffer.from([last ? 1 : 0])]));
  d.setAuthTag(sealed.subarray(sealed.length - TAG));
  try {
    return Buffer.concat([d.update(sealed.subarray(0, sealed.length - TAG)), d.final()]);
  } catch {
    throw new SealError("tampered", `${what}: chunk ${index} fails authentication (bytes changed, cut off, or sealed under another key with the same id)`);
  }
}

/** What sealing needs: the data key to write with, who signs, and how. */
export interface Sealer {
  keyId: number;
  key: Buffer;
  signer: string;
  /** Ed25519 signature of a 32-byte digest; absent: the object is not signed. */
  sign?: (digest: Buffer) => Buffer;
}

/** What opening needs: data keys by id, and a judge of signatures. */
export interface Opener {
  key(keyId: number): Buffer | undefined;
  /** Throws SealError unless `signer` may sign `label` and `signature` is theirs over `digest`. */
  verify(signer: string, label: string, digest: Buffer, signature: Buffer): void;
}

const signedDigest = (bytes: Buffer) => createHash("sha256").update("unisync-sig-v1\0").update(bytes).digest();

/** The stored bytes of `payload` under `label`. */
export function sealBuffer(payload: Buffer, label: string, s: Sealer): Buffer {
  const header = buildHeader(s.keyId, s.signer, label, s.sign !== undefined);
  const key = objectKey(s.key, header.salt);
  const parts = [header.raw];
  const count = Math.max(1, Math.ceil(payload.length / CHUNK));
  for (let i = 0; i < count; i++) parts.push(sealChunk(key, header.raw, i, i === count - 1, payload.subarray(i * CHUNK, (i + 1) * CHUNK)));
  const body = Buffer.concat(parts);
  return s.sign ? Buffer.concat([body, s.sign(signedDigest(body))]) : body;
}

function keyFor(o: Opener, h: EnvelopeHeader, what: string): Buffer {
  const k = o.key(h.keyId);
  if (!k) {
    throw new SealError(
      "unknown-key",
      `${what} is sealed under cluster data key ${h.keyId}, which this node does not hold ` +
        `(a newer key this node has not read yet, a key it was never given, or an object of another cluster)`,
    );
  }
  return objectKey(k, h.salt);
}

/**
 * The payload of a sealed object, after checking its label (when `expectLabel`
 * is given), its signature (when `mustSign`, or whenever it has one) and every chunk.
 */
export function openBuffer(bytes: Buffer, o: Opener, what: string, expectLabel?: string, mustSign = false): { header: EnvelopeHeader; payload: Buffer } {
  const header = parseHeader(bytes);
  if (!header) throw new SealError("malformed", `${what}: truncated header`);
  if (expectLabel !== undefined && header.label !== expectLabel) {
    throw new SealError("wrong-label", `${what} was sealed as "${header.label}", not as "${expectLabel}": an object copied or replayed under another name`);
  }
  let end = bytes.length;
  if (header.signed) {
    end -= SIGNATURE_BYTES;
    if (end < header.raw.length) throw new SealError("malformed", `${what}: truncated signature`);
    o.verify(header.signer, header.label, signedDigest(bytes.subarray(0, end)), bytes.subarray(end));
  } else if (mustSign) {
    throw new SealError("unsigned", `${what} carries no signature`);
  }
  const key = keyFor(o, header, what);
  const out: Buffer[] = [];
  let pos = header.raw.length;
  for (let i = 0; ; i++) {
    const last = end - pos <= CHUNK + TAG;
    const next = last ? end : pos + CHUNK + TAG;
    out.push(openChunk(key, header.raw, i, last, bytes.subarray(pos, next), what));
    pos = next;
    if (last) break;
  }
  return { header, payload: Buffer.concat(out) };
}

/** Seals a stream (unsigned: a stream's authenticity comes from the data key and the content hash its record names). */
export class SealStream extends Transform {
  private readonly header: EnvelopeHeader;
  private readonly key: Buffer;
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private index = 0;

  constructor(label: string, s: Sealer) {
    super();
    this.header = buildHeader(s.keyId, s.signer, label, false);
    this.key = objectKey(s.key, this.header.salt);
    this.push(this.header.raw);
  }

  /** Stored size of a payload of `plain` bytes (for uploads that must state a length). */
  sealedSize(plain: number): number {
    return this.header.raw.length + plain + TAG * Math.max(1, Math.ceil(plain / CHUNK));
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    // Hold back at least one byte beyond a full chunk: only the end says which chunk is last.
    while (this.pendingBytes > CHUNK) this.emit1(false);
    done();
  }

  override _flush(done: TransformCallback): void {
    this.emit1(true);
    done();
  }

  private emit1(last: boolean): void {
    const all = Buffer.concat(this.pending);
    const take = last ? all.length : CHUNK;
    this.push(sealChunk(this.key, this.header.raw, this.index++, last, all.subarray(0, take)));
    this.pending = [all.subarray(take)];
    this.pendingBytes = all.length - take;
  }
}

/** Opens a sealed stream chunk by chunk; fails (and releases nothing more) at the first chunk that does not authenticate. */
export class OpenStream extends Transform {
  private header: EnvelopeHeader | null = null;
  private key: Buffer | null = null;
  /** Bytes received and not opened yet: joined only once a whole chunk is there (no copying per piece). */
  private parts: Buffer[] = [];
  private have = 0;
  private index = 0;

  constructor(
    private readonly opener: Opener,
    private readonly what: string,
    private readonly expectLabel?: string,
  ) {
    super();
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    try {
      this.parts.push(chunk);
      this.have += chunk.length;
      if (!this.header) {
        const buf = this.joined();
        this.header = parseHeader(buf);
        if (!this.header) return done();
        if (this.header.signed) throw new SealError("malformed", `${this.what}: a signed object cannot be streamed`);
        if (this.expectLabel !== undefined && this.header.label !== this.expectLabel) {
          throw new SealError("wrong-label", `${this.what} was sealed as "${this.header.label}", not as "${this.expectLabel}"`);
        }
        this.key = keyFor(this.opener, this.header, this.what);
        this.parts = [buf.subarray(this.header.raw.length)];
        this.have = this.parts[0]!.length;
      }
      // Hold back one byte beyond a whole chunk: only the end says which chunk is last.
      if (this.have > CHUNK + TAG) {
        let buf = this.joined();
        while (buf.length > CHUNK + TAG) {
          this.push(openChunk(this.key!, this.header.raw, this.index++, false, buf.subarray(0, CHUNK + TAG), this.what));
          buf = buf.subarray(CHUNK + TAG);
        }
        this.parts = [buf];
        this.have = buf.length;
      }
      done();
    } catch (err) {
      done(err as Error);
    }
  }

  private joined(): Buffer {
    const all = this.parts.length === 1 ? this.parts[0]! : Buffer.concat(this.parts);
    this.parts = [all];
    return all;
  }

  override _flush(done: TransformCallback): void {
    try {
      if (!this.header || !this.key) throw new SealError("malformed", `${this.what}: truncated header`);
      this.push(openChunk(this.key, this.header.raw, this.index++, true, this.joined(), this.what));
      done();
    } catch (err) {
      done(err as Error);
    }
  }
}
