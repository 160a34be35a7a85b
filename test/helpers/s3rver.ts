/**
 * An in-process s3rver for tests. Tests that talk to it need S3RVER_ENV in the
 * environment (or passed to openStore) because s3rver checks signatures.
 */
import crypto from "node:crypto";
import { createWriteStream, readdirSync, type Dirent } from "node:fs";
import { mkdir, mkdtemp, rename, rm } from "node:fs/promises";
import { Readable, Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import { createRequire } from "node:module";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { compareKeys } from "../../src/store/file.js";

/** s3rver's fixed credentials. */
export const S3RVER_ENV = { AWS_ACCESS_KEY_ID: "S3RVER", AWS_SECRET_ACCESS_KEY: "S3RVER" } as const;

// s3rver is CommonJS without type declarations; this is the part we use.
interface S3rverInstance {
  run(): Promise<AddressInfo>;
  close(): Promise<void>;
  /** Set by run(); used to drop keep-alive connections so that stop() is a real outage. */
  httpServer?: { closeAllConnections?(): void };
}
type S3rverClass = new (options: {
  address: string;
  port: number;
  silent: boolean;
  directory: string;
  configureBuckets: { name: string; configs: (string | Buffer)[] }[];
}) => S3rverInstance;
type Walk = (dir: string, recurseFilter?: (dir: string) => boolean) => Generator<string>;

const require = createRequire(import.meta.url);

/**
 * s3rver walks its data directory in readdir order, so its listings are not
 * sorted and MaxKeys truncation drops arbitrary keys. Real S3 and MinIO list in
 * bytewise key order; make s3rver do the same by walking each directory in the
 * order its keys sort (a directory sorts as "name/", an object file as its key).
 * Must run before s3rver's filesystem store module is loaded.
 */
function loadS3rver(): S3rverClass {
  const utils = require("s3rver/lib/utils") as { walk: Walk; sortedWalk?: true };
  if (!utils.sortedWalk) {
    const sidecar = /\._S3rver_[^/]*$/;
    const walk: Walk = function* (dir, recurseFilter) {
      const entries = readdirSync(dir, { withFileTypes: true }).map((d: Dirent) => ({
        name: d.name,
        dir: d.isDirectory(),
        sortKey: d.isDirectory() ? `${d.name}/` : d.name.replace(sidecar, ""),
      }));
      entries.sort((a, b) => compareKeys(a.sortKey, b.sortKey));
      for (const e of entries) {
        const p = path.posix.join(dir, e.name);
        if (!e.dir) yield p;
        else if (!recurseFilter || recurseFilter(p)) yield* walk(p, recurseFilter);
      }
    };
    utils.walk = walk;
    utils.sortedWalk = true;
    patchDesForContinuationTokens();
    if (require.cache[require.resolve("s3rver/lib/stores/filesystem")]) {
      throw new Error("s3rver was loaded before its directory walk could be patched");
    }
    patchDelimiterListing();
    patchAtomicPut();
  }
  return require("s3rver") as S3rverClass;
}

interface ListOptions {
  delimiter?: string;
  prefix?: string;
  startAfter?: string;
  maxKeys?: number;
}
interface ListResult {
  objects: { key: string }[];
  commonPrefixes: string[];
  isTruncated: boolean;
}
type ListObjects = (this: unknown, bucket: string, options: ListOptions) => Promise<ListResult>;

/**
 * s3rver stops walking a directory once the part of its path after the prefix
 * holds the delimiter, and only derives common prefixes from objects it walked.
 * So a common prefix whose objects all sit two or more levels deeper is never
 * reported: listing "log/" with delimiter "/" over "log/A/app.db/0001-....seg"
 * returns nothing, and an agent never discovers origin A. S3 and MinIO report
 * "log/A/". Answer delimiter listings from the full listing instead.
 * (Same fix as bench/s3rver-server.ts, which found it; tests need it too.)
 */
function patchDelimiterListing(): void {
  const Store = require("s3rver/lib/stores/filesystem") as { prototype: { listObjects: ListObjects; delimiterPatched?: true } };
  if (Store.prototype.delimiterPatched) return;
  const original = Store.prototype.listObjects;
  Store.prototype.listObjects = async function (bucket, options) {
    const delimiter = options.delimiter ?? "";
    if (!delimiter) return original.call(this, bucket, options);
    const prefix = options.prefix ?? "";
    const maxKeys = options.maxKeys ?? Infinity;
    const all = await original.call(this, bucket, { ...options, delimiter: "", maxKeys: Infinity });
    const objects: { key: string }[] = [];
    const prefixes = new Set<string>();
    let isTruncated = false;
    for (const o of all.objects) {
      const idx = o.key.slice(prefix.length).indexOf(delimiter);
      if (idx !== -1) prefixes.add(o.key.slice(0, prefix.length + idx + delimiter.length));
      else if (objects.length < maxKeys) objects.push(o);
      else isTruncated = true;
    }
    return { objects, commonPrefixes: [...prefixes].sort(), isTruncated };
  };
  Store.prototype.delimiterPatched = true;
}

interface PutObject {
  bucket: string;
  key: string;
  metadata: unknown;
  content: Buffer | NodeJS.ReadableStream;
}
interface FilesystemStore {
  getResourcePath(bucket: string, key: string, resource: string): string;
  putMetadata(bucket: string, key: string, metadata: unknown, md5: string): Promise<void>;
}

/**
 * s3rver writes an object straight into its final file (readers can get a
 * partial or empty body) and, for streamed bodies, writes the metadata before
 * the file is flushed. S3 and MinIO make an object visible whole or not at all.
 * Write to a temp file, rename it into place, then write the metadata. (Found
 * when stopping s3rver mid-PUT left an empty segment that GETs returned.)
 */
function patchAtomicPut(): void {
  const Store = require("s3rver/lib/stores/filesystem") as { prototype: { putObject(o: PutObject): Promise<unknown>; atomicPut?: true } };
  if (Store.prototype.atomicPut) return;
  Store.prototype.putObject = async function (this: FilesystemStore, object: PutObject) {
    const objectPath = this.getResourcePath(object.bucket, object.key, "object");
    await mkdir(path.dirname(objectPath), { recursive: true });
    const tmp = `${objectPath}.tmp-${crypto.randomBytes(6).toString("hex")}`;
    const hash = crypto.createHash("md5");
    let size = 0;
    const count = new Transform({
      transform(chunk: Buffer, _enc, done) {
        hash.update(chunk);
        size += chunk.length;
        done(null, chunk);
      },
    });
    const source = Buffer.isBuffer(object.content) ? Readable.from([object.content]) : (object.content as Readable);
    try {
      await pipeline(source, count, createWriteStream(tmp));
      await rename(tmp, objectPath);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
    const md5 = hash.digest("hex");
    await this.putMetadata(object.bucket, object.key, object.metadata, md5);
    return { size, md5 };
  };
  Store.prototype.atomicPut = true;
}

/**
 * s3rver encrypts ListObjectsV2 continuation tokens with DES, which Node 17+
 * (OpenSSL 3 without the legacy provider) refuses, so every truncated listing
 * answers HTTP 500. Only s3rver reads those tokens, so substitute AES for 'des'
 * in this process; 'des' cannot work here anyway, so nothing else changes.
 */
function patchDesForContinuationTokens(): void {
  const pad = (b: Buffer) => Buffer.concat([b, Buffer.alloc(16)]).subarray(0, 16);
  // The crypto exports are overloaded; this shim only needs the (alg, key, iv) form s3rver uses.
  type Factory = (alg: string, key: Buffer, iv: Buffer, ...rest: unknown[]) => unknown;
  const mutable = crypto as unknown as Record<"createCipheriv" | "createDecipheriv", Factory>;
  for (const name of ["createCipheriv", "createDecipheriv"] as const) {
    const original = mutable[name];
    mutable[name] = (alg, key, iv, ...rest) =>
      alg === "des" ? original("aes-128-cbc", pad(key), pad(iv), ...rest) : original(alg, key, iv, ...rest);
  }
}

export interface S3rverOptions {
  /** Listen on this port (default: any free port). Pass the port of a stopped server to restart it. */
  port?: number;
  /**
   * Keep objects in this directory (default: a fresh temp directory). A directory
   * passed in is never removed by stop(), so a server can be stopped and started
   * again on the same port and data, like a store that was down for a while.
   */
  directory?: string;
}

export interface S3rverHandle {
  endpoint: string;
  bucket: string;
  port: number;
  directory: string;
  /** Stops the server (dropping open connections); removes the data unless it was passed in or keepData is set. */
  stop(options?: { keepData?: boolean }): Promise<void>;
}

export async function startS3rver(bucket = "unisync-test", options: S3rverOptions = {}): Promise<S3rverHandle> {
  const S3rver = loadS3rver();
  const ownDirectory = options.directory === undefined;
  const directory = options.directory ?? (await mkdtemp(path.join(tmpdir(), "s3rver-")));
  const server = new S3rver({
    address: "127.0.0.1",
    port: options.port ?? 0,
    silent: true,
    directory,
    configureBuckets: [{ name: bucket, configs: [] }],
  });
  const address = await server.run();
  return {
    endpoint: `http://127.0.0.1:${address.port}`,
    bucket,
    port: address.port,
    directory,
    async stop({ keepData = false } = {}) {
      const closed = server.close();
      // close() waits for keep-alive connections of clients (agents) to end by themselves.
      server.httpServer?.closeAllConnections?.();
      await closed;
      if (ownDirectory && !keepData) await rm(directory, { recursive: true, force: true });
    },
  };
}

/** An s3:// URL for openStore pointing at a local endpoint with path-style addressing. */
export function s3StoreUrl(endpoint: string, bucket: string, prefix = ""): string {
  const p = prefix.replace(/^\/+/, "").split("/").map(encodeURIComponent).join("/");
  return `s3://${bucket}/${p}?endpoint=${encodeURIComponent(endpoint)}&path_style=true`;
}
