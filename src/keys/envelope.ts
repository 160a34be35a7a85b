/**
 * The sealed object of a secured cluster: what a bucket holds instead of plain
 * bytes. One format for segments, blobs, snapshots and heartbeats:
 *
 *   "USX1" | flags u8 | key id u32 | salt (32) | signer (u8 len + utf8) | label (u16 len + utf8)
 *   | chunks | [signature (64), when flags & SIGNED]
 *
 * - The payload is cut into chunks of CHUNK bytes (the last one shorter), each
 *   encrypted with AES-256-GCM under a key derived for this object alone (HKDF
 *   of the cluster data key `key id` and the random salt), nonce = chunk number,
 *   and the header plus a "last" byte (0) as associated data; an empty end
 *   marker chunk (last = 1) follows. A chunk cannot be changed, moved, dropped
 *   or cut off without failing a tag, and a stream is verified chunk by chunk,
 *   so nothing unverified is released.
 * - The label names what the object is (a store key, or "segment <origin>/<stream>/<seq>"),
 *   so an object copied under another name is refused.
 * - A signed object ends with the signer's Ed25519 signature of the sha256 of
 *   everything before it. Who may sign what is the vault's business (vault.ts).
 */
import { createCipheriv, createDecipheriv, createHash, hkdfSync, randomBytes, type CipherGCM, type DecipherGCM } from "node:crypto";
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
  readonly code = "SEAL";
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

/**
 * Encrypts a payload chunk by chunk as it arrives: CHUNK bytes per chunk (the
 * last data chunk shorter), then a terminator, an empty chunk whose associated
 * data says "last". A reader that misses the terminator knows the object was
 * cut off; no chunk has to be held back to learn whether it is the last one.
 */
class ChunkSealer {
  private cipher: CipherGCM | null = null;
  private filled = 0;
  private index = 0;

  constructor(
    private readonly key: Buffer,
    private readonly header: Buffer,
  ) {}

  write(piece: Buffer, out: Buffer[]): void {
    for (let at = 0; at < piece.length; ) {
      this.cipher ??= startChunk(createCipheriv("aes-256-gcm", this.key, nonce(this.index)), this.header, false);
      const take = Math.min(CHUNK - this.filled, piece.length - at);
      out.push(this.cipher.update(piece.subarray(at, at + take)));
      at += take;
      this.filled += take;
      if (this.filled === CHUNK) this.close(out);
    }
  }

  end(out: Buffer[]): void {
    if (this.cipher) this.close(out);
    const t = startChunk(createCipheriv("aes-256-gcm", this.key, nonce(this.index)), this.header, true);
    t.final();
    out.push(t.getAuthTag());
  }

  private close(out: Buffer[]): void {
    out.push(this.cipher!.final(), this.cipher!.getAuthTag());
    this.cipher = null;
    this.filled = 0;
    this.index++;
  }
}

function startChunk<T extends CipherGCM | DecipherGCM>(c: T, header: Buffer, last: boolean): T {
  c.setAAD(Buffer.concat([header, Buffer.from([last ? 1 : 0])]));
  return c;
}

/**
 * Decrypts chunk by chunk and releases a chunk's plaintext only once its tag
 * verified. Holds at most one chunk plus the terminator's 16 bytes.
 */
class ChunkOpener {
  private pieces: Buffer[] = [];
  private have = 0;
  private index = 0;

  constructor(
    private readonly key: Buffer,
    private readonly header: Buffer,
    private readonly what: string,
  ) {}

  write(piece: Buffer, out: Buffer[]): void {
    this.pieces.push(piece);
    this.have += piece.length;
    // Past a whole chunk plus a terminator's worth, the next CHUNK + TAG bytes are a full data chunk.
    while (this.have > CHUNK + 2 * TAG) this.open(this.take(CHUNK + TAG), false, out);
  }

  end(out: Buffer[]): void {
    if (this.have < TAG) throw new SealError("tampered", `${this.what}: cut off (no terminator after chunk ${this.index})`);
    if (this.have > TAG) this.open(this.take(this.have - TAG), false, out);
    this.open(this.take(TAG), true, out);
  }

  private open(sealed: Buffer[], last: boolean, out: Buffer[]): void {
    const bytes = sealed.reduce((n, b) => n + b.length, 0);
    if (bytes < TAG) throw new SealError("tampered", `${this.what}: cut off (chunk ${this.index} has no tag)`);
    const d = startChunk(createDecipheriv("aes-256-gcm", this.key, nonce(this.index)), this.header, last);
    const plain: Buffer[] = [];
    let left = bytes - TAG;
    const tag: Buffer[] = [];
    for (const b of sealed) {
      const data = Math.min(left, b.length);
      if (data > 0) plain.push(d.update(b.subarray(0, data)));
      if (data < b.length) tag.push(b.subarray(data));
      left -= data;
    }
    d.setAuthTag(Buffer.concat(tag));
    try {
      plain.push(d.final());
    } catch {
      throw new SealError(
        "tampered",
        `${this.what}: ${last ? "the end marker" : `chunk ${this.index}`} fails authentication (bytes changed, moved or cut off, or sealed under another key with the same id)`,
      );
    }
    out.push(...plain);
    this.index++;
  }

  /** The next n bytes, as pieces (no copying of the bulk). */
  private take(n: number): Buffer[] {
    const got: Buffer[] = [];
    while (n > 0) {
      const p = this.pieces[0]!;
      if (p.length <= n) {
        got.push(p);
        this.pieces.shift();
        n -= p.length;
        this.have -= p.length;
      } else {
        got.push(p.subarray(0, n));
        this.pieces[0] = p.subarray(n);
        this.have -= n;
        n = 0;
      }
    }
    return got;
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
  const parts = [header.raw];
  const sealer = new ChunkSealer(objectKey(s.key, header.salt), header.raw);
  sealer.write(payload, parts);
  sealer.end(parts);
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

/** Refuses an object sealed under another name than the one it was read by. */
function checkLabel(header: EnvelopeHeader, what: string, expectLabel: string | undefined): void {
  if (expectLabel !== undefined && header.label !== expectLabel) {
    throw new SealError("wrong-label", `${what} was sealed as "${header.label}", not as "${expectLabel}": an object copied or replayed under another name`);
  }
}

/**
 * The payload of a sealed object, after checking its label (when `expectLabel`
 * is given), its signature (when `mustSign`, or whenever it has one) and every chunk.
 */
export function openBuffer(bytes: Buffer, o: Opener, what: string, expectLabel?: string, mustSign = false): { header: EnvelopeHeader; payload: Buffer } {
  const header = parseHeader(bytes);
  if (!header) throw new SealError("malformed", `${what}: truncated header`);
  checkLabel(header, what, expectLabel);
  let end = bytes.length;
  if (header.signed) {
    end -= SIGNATURE_BYTES;
    if (end < header.raw.length) throw new SealError("malformed", `${what}: truncated signature`);
    o.verify(header.signer, header.label, signedDigest(bytes.subarray(0, end)), bytes.subarray(end));
  } else if (mustSign) {
    throw new SealError("unsigned", `${what} carries no signature`);
  }
  const opener = new ChunkOpener(keyFor(o, header, what), header.raw, what);
  const out: Buffer[] = [];
  opener.write(bytes.subarray(header.raw.length, end), out);
  opener.end(out);
  return { header, payload: Buffer.concat(out) };
}

/** Seals a stream (unsigned: a stream's authenticity comes from the data key and the content hash its record names). */
export class SealStream extends Transform {
  private readonly header: EnvelopeHeader;
  private readonly sealer: ChunkSealer;

  constructor(label: string, s: Sealer) {
    super();
    this.header = buildHeader(s.keyId, s.signer, label, false);
    this.sealer = new ChunkSealer(objectKey(s.key, this.header.salt), this.header.raw);
    this.push(this.header.raw);
  }

  /** Stored size of a payload of `plain` bytes (for uploads that must state a length). */
  sealedSize(plain: number): number {
    return this.header.raw.length + plain + TAG * (Math.ceil(plain / CHUNK) + 1);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    const out: Buffer[] = [];
    this.sealer.write(chunk, out);
    for (const b of out) this.push(b);
    done();
  }

  override _flush(done: TransformCallback): void {
    const out: Buffer[] = [];
    this.sealer.end(out);
    for (const b of out) this.push(b);
    done();
  }
}

/** Opens a sealed stream chunk by chunk; fails (and releases nothing more) at the first chunk that does not authenticate. */
export class OpenStream extends Transform {
  private head: Buffer[] = [];
  private opener: ChunkOpener | null = null;

  constructor(
    private readonly keys: Opener,
    private readonly what: string,
    private readonly expectLabel?: string,
  ) {
    super();
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    try {
      const out: Buffer[] = [];
      if (this.opener) this.opener.write(chunk, out);
      else {
        this.head.push(chunk);
        const buf = Buffer.concat(this.head);
        const header = parseHeader(buf);
        if (!header) return done();
        if (header.signed) throw new SealError("malformed", `${this.what}: a signed object cannot be streamed`);
        checkLabel(header, this.what, this.expectLabel);
        this.opener = new ChunkOpener(keyFor(this.keys, header, this.what), header.raw, this.what);
        this.head = [];
        this.opener.write(buf.subarray(header.raw.length), out);
      }
      for (const b of out) this.push(b);
      done();
    } catch (err) {
      done(err as Error);
    }
  }

  override _flush(done: TransformCallback): void {
    try {
      if (!this.opener) throw new SealError("malformed", `${this.what}: truncated header`);
      const out: Buffer[] = [];
      this.opener.end(out);
      for (const b of out) this.push(b);
      done();
    } catch (err) {
      done(err as Error);
    }
  }
}
