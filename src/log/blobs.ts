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
import { PassThrough, pipeline, Readable, Transform, Writable, type TransformCallback } from "node:stream";
import { pipeline as pipelineAsync } from "node:stream/promises";
import { compress, CompressStream, DecompressStream } from "zstd-napi";
import type { ObjectStore } from "../store/store.js";
import { SealError } from "../keys/envelope.js";
import { newChunkHasher, type ChunkHasher } from "./hasher.js";

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
  readonly code: "BLOB_INTEGRITY" | "BLOB_MISSING" = "BLOB_INTEGRITY";
}

/** The blob is not in the store yet: its origin has not uploaded it. Wait, it is no fault. */
export class BlobMissingError extends BlobIntegrityError {
  override readonly code = "BLOB_MISSING";
}

/** A blob a secured store refuses (changed bytes, unknown key) is, to its readers, one that does not check out. */
function sealedAsIntegrity(sha256: string, err: unknown): unknown {
  return err instanceof SealError ? new BlobIntegrityError(`blob ${sha256}: ${err.message}`) : err;
}

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

/** Content up to this size is read, hashed, stored and fetched as one buffer. */
export const SMALL_BLOB = 1024 * 1024;
/** Below this, compression saves too little to pay for itself on both sides. */
const MIN_COMPRESS = 4096;
/** Reads of large files: few, big chunks (the memory bound is a few of these). */
const CHUNK = 1024 * 1024;
/** Reads in flight ahead of the upload. */
const READ_AHEAD = 4;

/** Whether content whose first bytes are `sample` (of `size` in all) is stored compressed. */
function compressPays(sample: Buffer, size: number): boolean {
  if (sample.length >= 4 && sample.subarray(0, 4).equals(ZSTD_MAGIC)) return true; // must be self-describing
  if (size < MIN_COMPRESS) return false;
  const head = sample.subarray(0, SAMPLE_BYTES);
  return compress(head, { compressionLevel: 1 }).length < head.length * PAYS;
}

async function readSample(file: string): Promise<Buffer> {
  const fh = await open(file, "r");
  try {
    const sample = Buffer.alloc(SAMPLE_BYTES);
    const { bytesRead } = await fh.read(sample, 0, SAMPLE_BYTES, 0);
    return sample.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** Stores `content` (already hashed by the caller) as blob `sha256`, unless the store has it. */
export async function putBlob(store: ObjectStore, content: Buffer, sha256: string): Promise<"exists" | "uploaded"> {
  const key = blobKey(sha256);
  if (await store.head(key)) return "exists";
  await store.put(key, compressPays(content, content.length) ? compress(content, { compressionLevel: 3 }) : content);
  return "uploaded";
}

/**
 * Uploads a local file whose hash is already known as a blob, unless the store
 * already has it. The content is re-hashed on the way out: if it no longer
 * matches, the put fails and nothing is stored.
 */
export async function putBlobFromFile(store: ObjectStore, file: string, sha256: string, size: number): Promise<"exists" | "uploaded"> {
  const key = blobKey(sha256);
  if (await store.head(key)) return "exists";
  const compressIt = compressPays(await readSample(file), size);
  const verify = new VerifyStream(sha256, size, `upload of ${file}`);
  const source = createReadStream(file, { highWaterMark: CHUNK });
  const body: Readable = compressIt
    ? pipeline(source, verify, new CompressStream({ compressionLevel: 3 }), new PassThrough(), () => undefined)
    : pipeline(source, verify, new PassThrough(), () => undefined);
  await store.put(key, body);
  return "uploaded";
}

/** Hashes, counts and keeps the first 16 bytes of what flows through. */
class HashTap extends Transform {
  private readonly hash = createHash("sha256");
  size = 0;
  head = Buffer.alloc(0);

  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.hash.update(chunk);
    this.size += chunk.length;
    if (this.head.length < 16) this.head = Buffer.concat([this.head, chunk.subarray(0, 16 - this.head.length)]);
    done(null, chunk);
  }

  digest(): string {
    return this.hash.digest("hex");
  }
}

export interface UploadedFile {
  sha256: string;
  size: number;
  /** The first 16 bytes (the caller checks for the SQLite header). */
  head: Buffer;
  /** The store held this content already (another path, another node, an earlier version). */
  existed: boolean;
}

/**
 * Makes sure a local file's content is in the store as blobs/<sha256>. Where the
 * store can name an object after writing it (FileStore), the file is read once:
 * hashed on its way into a temp object that is then named by that hash. Other
 * stores (S3: a key is fixed before the upload starts) hash first and stream
 * once, verified on the way out. Either way what is stored hashes to its name;
 * the caller still checks that the file did not change meanwhile (size, mtime).
 */
export async function uploadFile(store: ObjectStore, file: string, hasher: () => ChunkHasher = newChunkHasher): Promise<UploadedFile> {
  if (!store.putThenName) {
    const h = await hashFile(file);
    const existed = (await putBlobFromFile(store, file, h.sha256, h.size)) === "exists";
    return { ...h, existed };
  }
  const sample = await readSample(file);
  // A sample shorter than SAMPLE_BYTES is the whole file.
  const compressIt = compressPays(sample, sample.length < SAMPLE_BYTES ? sample.length : Infinity);
  const hashed = hashedChunks(file, hasher());
  try {
    const body: Readable = compressIt
      ? pipeline(Readable.from(hashed.chunks, { objectMode: false, highWaterMark: 1 }), new CompressStream({ compressionLevel: 3 }), new PassThrough(), () => undefined)
      : Readable.from(hashed.chunks, { objectMode: false, highWaterMark: 1 });
    let sha256 = "";
    let existed = false;
    await store.putThenName("blobs", body, async () => {
      sha256 = await hashed.digest();
      // Raw bytes that start with the zstd magic would be misread: the file changed under us.
      if (!compressIt && hashed.head().subarray(0, 4).equals(ZSTD_MAGIC)) throw new BlobIntegrityError(`${file} changed while it was read`);
      const key = blobKey(sha256);
      existed = (await store.head(key)) !== null;
      return existed ? null : key;
    });
    return { sha256, size: hashed.size(), head: hashed.head(), existed };
  } finally {
    hashed.close();
  }
}

/**
 * A file's chunks in order, read READ_AHEAD chunks ahead. Each chunk goes to
 * the hasher (a worker thread: see log/hasher.ts) as soon as its read completes
 * and in file order, so hashing runs beside the consumer's writes of the same
 * bytes instead of between them. Reads wait while the hasher is behind.
 */
function hashedChunks(
  file: string,
  hasher: ChunkHasher,
): { chunks: AsyncGenerator<Buffer>; digest(): Promise<string>; size(): number; head(): Buffer; close(): void } {
  let size = 0;
  let head = Buffer.alloc(0);
  async function* chunks(): AsyncGenerator<Buffer> {
    const fh = await open(file, "r");
    const queue: Promise<Buffer>[] = [];
    let handed: Promise<unknown> = Promise.resolve();
    let pos = 0;
    const issue = () => {
      const buf = hasher.alloc(CHUNK);
      const read = fh.read(buf, 0, CHUNK, pos);
      pos += CHUNK;
      // Chunks go to the hasher in file order, whatever order the reads complete in.
      const chunk = handed.then(() => read).then(({ bytesRead }) => {
        const c = buf.subarray(0, bytesRead);
        if (bytesRead > 0) hasher.update(c);
        size += bytesRead;
        if (head.length < 16) head = Buffer.concat([head, c.subarray(0, 16 - head.length)]);
        return c;
      });
      handed = chunk;
      queue.push(chunk);
    };
    try {
      for (let i = 0; i < READ_AHEAD; i++) issue();
      for (;;) {
        const c = await queue.shift()!;
        if (c.length === 0) return;
        await hasher.room();
        issue();
        yield c;
      }
    } finally {
      // A consumer that stopped early leaves reads in flight: let them end before closing.
      await Promise.all(queue.map((q) => q.catch(() => undefined)));
      await fh.close();
    }
  }
  return { chunks: chunks(), digest: () => hasher.digest(), size: () => size, head: () => head, close: () => hasher.close() };
}

/**
 * Blob `sha256` as a buffer (for content up to SMALL_BLOB), decompressed if it
 * was stored compressed, with size and hash verified. Throws BlobIntegrityError
 * when it is missing, truncated or does not match.
 */
export async function fetchBlob(store: ObjectStore, sha256: string, size: number): Promise<Buffer> {
  const stored = await store.get(blobKey(sha256)).catch((err) => {
    throw sealedAsIntegrity(sha256, err);
  });
  if (!stored) throw new BlobMissingError(`blob ${sha256} is not in the store (yet)`);
  if (!(stored.length >= 4 && stored.subarray(0, 4).equals(ZSTD_MAGIC))) {
    if (stored.length !== size) throw new BlobIntegrityError(`blob ${sha256}: ${stored.length} bytes, expected ${size} (truncated?)`);
    const actual = createHash("sha256").update(stored).digest("hex");
    if (actual !== sha256) throw new BlobIntegrityError(`blob ${sha256}: content hashes to ${actual}, expected ${sha256}`);
    return stored;
  }
  // Streaming decompression bounded by the expected size: a zstd bomb stops early.
  const out: Buffer[] = [];
  try {
    await pipelineAsync(
      Readable.from([stored]),
      new DecompressStream(),
      new VerifyStream(sha256, size, `blob ${sha256}`),
      new Writable({
        write: (c: Buffer, _e, done) => {
          out.push(c);
          done();
        },
      }),
    );
  } catch (err) {
    if (err instanceof BlobIntegrityError) throw err;
    throw new BlobIntegrityError(`blob ${sha256}: corrupt zstd data: ${(err as Error).message}`);
  }
  return Buffer.concat(out);
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
    const r = await it.next().catch((err) => {
      throw sealedAsIntegrity(sha256, err);
    });
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
    if (err instanceof SealError) throw sealedAsIntegrity(sha256, err);
    if (/zstd|frame|decompress/i.test((err as Error).message)) throw new BlobIntegrityError(`blob ${sha256}: corrupt zstd data: ${(err as Error).message}`);
    throw err;
  }
}

/** sha256, size and first 16 bytes of a file, streaming. */
export async function hashFile(file: string): Promise<Omit<UploadedFile, "existed">> {
  const tap = new HashTap();
  await pipelineAsync(createReadStream(file, { highWaterMark: CHUNK }), tap, new Writable({ write: (_c, _e, done) => done() }));
  return { sha256: tap.digest(), size: tap.size, head: tap.head };
}
