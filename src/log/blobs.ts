/**
 * File contents in the store: `blobs/<sha256 of the raw content>`, written once
 * and shared by every node and every version. The stored bytes are either the
 * raw content or one zstd frame of it (chosen when it pays); a reader tells them
 * apart by the zstd magic number, so content that itself starts with that magic
 * is always stored compressed. Both directions stream with bounded memory and
 * verify the sha256 (and size) while streaming: a blob that does not hash to its
 * name is never stored and never used.
 */
import { createHash } from "node:crypto";
import { createReadStream, createWriteStream } from "node:fs";
import { open } from "node:fs/promises";
import { PassThrough, pipeline, Readable, Transform, type TransformCallback } from "node:stream";
import { pipeline as pipelineAsync } from "node:stream/promises";
import { compress, CompressStream, DecompressStream } from "zstd-napi";
import type { ObjectStore } from "../store/store.js";

export const ZSTD_MAGIC = Buffer.from([0x28, 0xb5, 0x2f, 0xfd]);
const SAMPLE_BYTES = 64 * 1024;
/** Compress only when a sample shrinks below this fraction. */
const PAYS = 0.9;

export function blobKey(sha256: string): string {
  if (!/^[0-9a-f]{64}$/.test(sha256)) throw new BlobIntegrityError(`not a sha256: ${JSON.stringify(sha256)}`);
  return `blobs/${sha256}`;
}

/** Stored bytes that do not hash to their name, are truncated, or are missing. */
export class BlobIntegrityError extends Error {
  override name = "BlobIntegrityError";
}

/** The blob is not in the store yet: its origin has not uploaded it. Wait, it is no fault. */
export class BlobMissingError extends BlobIntegrityError {}

/** Counts and hashes what flows through; fails at the end (or as soon as it is too long) on a mismatch. */
export class VerifyStream extends Transform {
  private readonly hash = createHash("sha256");
  private bytes = 0;

  constructor(
    private readonly expectedSha: string,
    private readonly expectedSize: number | undefined,
    private readonly what: string,
  ) {
    super();
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.bytes += chunk.length;
    if (this.expectedSize !== undefined && this.bytes > this.expectedSize) {
      done(new BlobIntegrityError(`${this.what}: more than the expected ${this.expectedSize} bytes`));
      return;
    }
    this.hash.update(chunk);
    done(null, chunk);
  }

  override _flush(done: TransformCallback): void {
    if (this.expectedSize !== undefined && this.bytes !== this.expectedSize) {
      done(new BlobIntegrityError(`${this.what}: ${this.bytes} bytes, expected ${this.expectedSize} (truncated?)`));
      return;
    }
    const actual = this.hash.digest("hex");
    if (actual !== this.expectedSha) done(new BlobIntegrityError(`${this.what}: content hashes to ${actual}, expected ${this.expectedSha}`));
    else done();
  }
}

/** Whether storing `file` compressed pays, judged from its first 64 KiB. */
async function shouldCompress(file: string): Promise<boolean> {
  const fh = await open(file, "r");
  try {
    const sample = Buffer.alloc(SAMPLE_BYTES);
    const { bytesRead } = await fh.read(sample, 0, SAMPLE_BYTES, 0);
    const head = sample.subarray(0, bytesRead);
    if (head.length >= 4 && head.subarray(0, 4).equals(ZSTD_MAGIC)) return true; // must be self-describing
    if (head.length < 64) return false;
    return compress(head, { compressionLevel: 1 }).length < head.length * PAYS;
  } finally {
    await fh.close();
  }
}

/**
 * Uploads a local file (a staged copy whose hash is already known) as a blob,
 * unless the store already has it. The content is re-hashed on the way out: if
 * it no longer matches, the put fails and nothing is stored.
 */
export async function putBlobFromFile(store: ObjectStore, file: string, sha256: string, size: number): Promise<"exists" | "uploaded"> {
  const key = blobKey(sha256);
  if (await store.head(key)) return "exists";
  const compressIt = await shouldCompress(file);
  const verify = new VerifyStream(sha256, size, `upload of ${file}`);
  const body: Readable = compressIt
    ? pipeline(createReadStream(file), verify, new CompressStream({ compressionLevel: 3 }), new PassThrough(), () => undefined)
    : pipeline(createReadStream(file), verify, new PassThrough(), () => undefined);
  await store.put(key, body);
  return "uploaded";
}

/**
 * Streams blob `sha256` into `dest` (a new file), decompressing if it was stored
 * compressed, and verifies size and hash while streaming. Throws
 * BlobIntegrityError when the blob is missing, truncated or does not match; the
 * caller then removes `dest` and never uses it.
 */
export async function fetchBlobToFile(store: ObjectStore, sha256: string, size: number, dest: string, mode = 0o600): Promise<void> {
  const stream = await store.getStream(blobKey(sha256));
  if (!stream) throw new BlobMissingError(`blob ${sha256} is not in the store (yet)`);
  const it = stream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  const first: Buffer[] = [];
  let have = 0;
  let ended = false;
  while (have < 4) {
    const r = await it.next();
    if (r.done) {
      ended = true;
      break;
    }
    const b = Buffer.isBuffer(r.value) ? r.value : Buffer.from(r.value);
    first.push(b);
    have += b.length;
  }
  const head = Buffer.concat(first);
  const compressed = head.length >= 4 && head.subarray(0, 4).equals(ZSTD_MAGIC);
  async function* rest(): AsyncGenerator<Buffer> {
    if (head.length) yield head;
    if (ended) return;
    for (let r = await it.next(); !r.done; r = await it.next()) yield r.value;
  }
  const source = Readable.from(rest(), { objectMode: false });
  const verify = new VerifyStream(sha256, size, `blob ${sha256}`);
  const out = createWriteStream(dest, { flags: "wx", mode });
  try {
    if (compressed) await pipelineAsync(source, new DecompressStream(), verify, out);
    else await pipelineAsync(source, verify, out);
  } catch (err) {
    stream.destroy();
    if (err instanceof BlobIntegrityError) throw err;
    if (/zstd|frame|decompress/i.test((err as Error).message)) throw new BlobIntegrityError(`blob ${sha256}: corrupt zstd data: ${(err as Error).message}`);
    throw err;
  }
}

/**
 * Copies `src` to `dest` while hashing it (one read of the source, bounded
 * memory). Returns the sha256, the byte count and the first 16 bytes.
 */
export async function copyAndHash(src: string, dest: string): Promise<{ sha256: string; size: number; head: Buffer }> {
  const hash = createHash("sha256");
  let size = 0;
  const heads: Buffer[] = [];
  let headLen = 0;
  const tap = new Transform({
    transform(chunk: Buffer, _e, done) {
      hash.update(chunk);
      size += chunk.length;
      if (headLen < 16) {
        heads.push(chunk.subarray(0, 16 - headLen));
        headLen += Math.min(16, chunk.length);
      }
      done(null, chunk);
    },
  });
  await pipelineAsync(createReadStream(src), tap, createWriteStream(dest, { flags: "wx", mode: 0o600 }));
  return { sha256: hash.digest("hex"), size, head: Buffer.concat(heads).subarray(0, 16) };
}

/** sha256 of a file, streaming. */
export async function hashFile(file: string): Promise<{ sha256: string; size: number }> {
  const hash = createHash("sha256");
  let size = 0;
  for await (const chunk of createReadStream(file)) {
    hash.update(chunk as Buffer);
    size += (chunk as Buffer).length;
  }
  return { sha256: hash.digest("hex"), size };
}
