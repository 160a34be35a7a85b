/**
 * ObjectStore over S3 or an S3-compatible server (MinIO, s3rver). All keys live
 * under an optional prefix inside one bucket.
 */
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  UploadPartCommand,
  type CompletedPart,
} from "@aws-sdk/client-s3";
import { Readable } from "node:stream";
import { compareKeys, validateKey } from "./file.js";
import {
  RequestCounts,
  StoreConfigError,
  StoreUnavailableError,
  type ListOptions,
  type PutIfAbsentResult,
  type RequestKind,
  type ListPage,
  type ObjectInfo,
  type ObjectStore,
} from "./store.js";

export interface S3StoreOptions {
  bucket: string;
  /** Key prefix inside the bucket; '' for the bucket root. A trailing '/' is added. */
  prefix?: string;
  /** e.g. http://127.0.0.1:9000 for MinIO; AWS when absent. */
  endpoint?: string;
  region?: string;
  forcePathStyle?: boolean;
  /** When absent the SDK's default chain applies (AWS_* env vars, profiles, ...). */
  credentials?: { accessKeyId: string; secretAccessKey: string; sessionToken?: string };
  /** SDK attempts per request (default 3). */
  maxAttempts?: number;
  connectTimeoutMs?: number;
  /**
   * A request whose connection carries no byte for this long fails (and is retried):
   * a store that hangs (a frozen server, a network that drops packets) must not hold a
   * request, or the agent's stop, for ever. Slow transfers that progress are not cut.
   */
  idleTimeoutMs?: number;
  /** Multipart part size for streamed puts; S3 requires at least 5 MiB. */
  partSize?: number;
}

const DEFAULT_PART_SIZE = 8 * 1024 * 1024;
const DEFAULT_LIMIT = 1000;
const S3_MAX_KEYS = 1000;

/** Error names that no retry can fix. */
const CONFIG_ERRORS = new Set([
  "NoSuchBucket",
  "AccessDenied",
  "InvalidAccessKeyId",
  "SignatureDoesNotMatch",
  "InvalidBucketName",
  "AllAccessDisabled",
  "AuthorizationHeaderMalformed",
  "PermanentRedirect",
  "ExpiredToken",
  "InvalidToken",
  "Forbidden",
]);

const UNAVAILABLE_ERRORS = new Set([
  "TimeoutError",
  "RequestTimeout",
  "RequestTimeTooSkewed",
  "SlowDown",
  "ServiceUnavailable",
  "InternalError",
  "ThrottlingException",
]);

/** S3 bills multipart steps as PUTs; every attempt (SDK retries included) is a request. */
const COMMAND_KINDS: Record<string, RequestKind> = {
  ListObjectsV2Command: "LIST",
  GetObjectCommand: "GET",
  HeadObjectCommand: "HEAD",
  DeleteObjectCommand: "DELETE",
  PutObjectCommand: "PUT",
  CreateMultipartUploadCommand: "PUT",
  UploadPartCommand: "PUT",
  CompleteMultipartUploadCommand: "PUT",
  AbortMultipartUploadCommand: "DELETE",
};

interface SdkErrorShape {
  name?: string;
  code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
}

export class S3Store implements ObjectStore {
  readonly description: string;
  readonly bucket: string;
  readonly prefix: string;
  readonly requests = new RequestCounts();
  private readonly client: S3Client;
  private readonly partSize: number;

  constructor(options: S3StoreOptions) {
    if (!options.bucket) throw new StoreConfigError("S3 store: bucket name is empty");
    this.bucket = options.bucket;
    let prefix = (options.prefix ?? "").replace(/^\/+/, "");
    if (prefix !== "" && !prefix.endsWith("/")) prefix += "/";
    this.prefix = prefix;
    const region = options.region ?? "us-east-1";
    this.partSize = options.partSize ?? DEFAULT_PART_SIZE;
    this.description = `s3://${this.bucket}/${this.prefix} (${options.endpoint ?? `AWS ${region}`})`;
    this.client = new S3Client({
      region,
      endpoint: options.endpoint,
      forcePathStyle: options.forcePathStyle ?? false,
      credentials: options.credentials,
      maxAttempts: options.maxAttempts ?? 3,
      // s3rver and older MinIO reject the SDK's default CRC32 trailers.
      requestChecksumCalculation: "WHEN_REQUIRED",
      responseChecksumValidation: "WHEN_REQUIRED",
      requestHandler: {
        connectionTimeout: options.connectTimeoutMs ?? 5_000,
        // Not requestTimeout: since @smithy/node-http-handler 4 that bounds a whole request
        // and only warns unless told to throw; the idle limit is what was meant.
        socketTimeout: options.idleTimeoutMs ?? 30_000,
      },
    });
    // Below the retry middleware, so each attempt on the wire counts once.
    this.client.middlewareStack.add(
      (next, context) => (args) => {
        const kind = COMMAND_KINDS[context.commandName ?? ""];
        if (kind) this.requests.count(kind);
        return next(args);
      },
      { step: "deserialize", name: "unisyncCountRequests" },
    );
  }

  private full(key: string): string {
    validateKey(key);
    return this.prefix + key;
  }

  async put(key: string, body: Buffer | Readable, size?: number): Promise<void> {
    const Key = this.full(key);
    if (Buffer.isBuffer(body)) {
      checkSize(key, size, body.length);
      await this.send("put", key, () => this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key, Body: body })));
      return;
    }
    // Read one part ahead: a body that fits in one part is a plain PutObject.
    const parts = fixedParts(body, this.partSize)[Symbol.asyncIterator]();
    const first = await parts.next();
    const second = await parts.next();
    if (second.done) {
      const data = first.done ? Buffer.alloc(0) : first.value;
      checkSize(key, size, data.length);
      await this.send("put", key, () => this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key, Body: data })));
      return;
    }
    const created = await this.send("put (create multipart upload)", key, () =>
      this.client.send(new CreateMultipartUploadCommand({ Bucket: this.bucket, Key })),
    );
    const UploadId = created.UploadId;
    if (!UploadId) throw new Error(`S3 store ${this.description}: put ${key}: server returned no UploadId`);
    try {
      const done: CompletedPart[] = [];
      let total = 0;
      const upload = async (data: Buffer) => {
        const PartNumber = done.length + 1;
        const res = await this.send("put (upload part)", key, () =>
          this.client.send(new UploadPartCommand({ Bucket: this.bucket, Key, UploadId, PartNumber, Body: data })),
        );
        done.push({ PartNumber, ETag: res.ETag });
        total += data.length;
      };
      await upload(first.value!);
      await upload(second.value);
      for (let next = await parts.next(); !next.done; next = await parts.next()) await upload(next.value);
      checkSize(key, size, total);
      await this.send("put (complete multipart upload)", key, () =>
        this.client.send(
          new CompleteMultipartUploadCommand({ Bucket: this.bucket, Key, UploadId, MultipartUpload: { Parts: done } }),
        ),
      );
    } catch (err) {
      // Best effort: some servers (s3rver) do not implement abort; lifecycle rules clean up the rest.
      await this.client
        .send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key, UploadId }))
        .catch(() => undefined);
      throw err;
    }
  }

  async putIfAbsent(key: string, body: Buffer): Promise<PutIfAbsentResult> {
    const Key = this.full(key);
    try {
      await this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key, Body: body, IfNoneMatch: "*" }));
      return "created";
    } catch (err) {
      const status = (err as SdkErrorShape).$metadata?.httpStatusCode;
      if (status === 412) return "exists";
      // 409: another conditional write of this key is in flight; its outcome decides.
      if (status === 409) throw new StoreUnavailableError(`S3 store ${this.description}: put ${JSON.stringify(key)}: concurrent conditional write (HTTP 409); retrying`, { cause: err });
      throw this.mapError(err, "put", key);
    }
  }

  async get(key: string): Promise<Buffer | null> {
    const Key = this.full(key);
    const res = await this.sendOrNull("get", key, () => this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key })));
    if (!res?.Body) return res ? Buffer.alloc(0) : null;
    try {
      const bytes = await res.Body.transformToByteArray();
      return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    } catch (err) {
      throw this.mapError(err, "get (read body)", key);
    }
  }

  async getStream(key: string): Promise<Readable | null> {
    const Key = this.full(key);
    const res = await this.sendOrNull("getStream", key, () =>
      this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key })),
    );
    if (!res) return null;
    if (!res.Body) return Readable.from([]);
    // In Node the SDK body is an http.IncomingMessage (a Readable) with helper mixins.
    if (res.Body instanceof Readable) return res.Body;
    throw new Error(`S3 store ${this.description}: getStream ${key}: response body is not a Node stream`);
  }

  async head(key: string): Promise<ObjectInfo | null> {
    const Key = this.full(key);
    const res = await this.sendOrNull("head", key, () => this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key })));
    return res ? { key, size: res.ContentLength ?? 0 } : null;
  }

  async delete(key: string): Promise<void> {
    const Key = this.full(key);
    await this.send("delete", key, () => this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key })));
  }

  /**
   * Objects and common prefixes form one ascending stream; a prefix sits at its
   * own position, so `next` may be a prefix and the next page continues after
   * it. S3 repeats a prefix whose keys extend past StartAfter, hence the filter.
   */
  async list(prefix: string, options: ListOptions = {}): Promise<ListPage> {
    const limit = Math.max(1, options.limit ?? DEFAULT_LIMIT);
    const startAfter = options.startAfter ?? "";
    const delimiter = options.delimiter || undefined;
    let after = startAfter;
    for (;;) {
      const res = await this.send("list", prefix, () =>
        this.client.send(
          new ListObjectsV2Command({
            Bucket: this.bucket,
            Prefix: this.prefix + prefix || undefined,
            StartAfter: after ? this.prefix + after : undefined,
            Delimiter: delimiter,
            MaxKeys: Math.min(limit + 1, S3_MAX_KEYS),
          }),
        ),
      );
      const strip = (k: string | undefined): string | undefined =>
        k !== undefined && k.startsWith(this.prefix) ? k.slice(this.prefix.length) : undefined;
      type Item = { name: string; size?: number; modifiedMs?: number };
      const raw: Item[] = [];
      for (const o of res.Contents ?? []) {
        const name = strip(o.Key);
        if (name !== undefined) raw.push({ name, size: o.Size ?? 0, modifiedMs: o.LastModified?.getTime() });
      }
      for (const p of res.CommonPrefixes ?? []) {
        const name = strip(p.Prefix);
        if (name !== undefined) raw.push({ name });
      }
      // Sorting also covers servers (s3rver) that return prefixes beyond MaxKeys.
      raw.sort((a, b) => compareKeys(a.name, b.name));
      const items = raw.filter((i) => compareKeys(i.name, startAfter) > 0);

      if (items.length === 0 && res.IsTruncated && raw.length > 0) {
        // Only a repeated prefix came back; move past it.
        after = raw[raw.length - 1]!.name;
        continue;
      }
      const more = items.length > limit || res.IsTruncated === true;
      const page = items.slice(0, limit);
      const result: ListPage = {
        objects: page.flatMap((i) => (i.size === undefined ? [] : [{ key: i.name, size: i.size, ...(i.modifiedMs !== undefined ? { modifiedMs: i.modifiedMs } : {}) }])),
        prefixes: page.flatMap((i) => (i.size === undefined ? [i.name] : [])),
      };
      if (more && page.length > 0) result.next = page[page.length - 1]!.name;
      return result;
    }
  }

  private async send<T>(op: string, key: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      throw this.mapError(err, op, key);
    }
  }

  /** Like send, but a missing object is null. */
  private async sendOrNull<T>(op: string, key: string, fn: () => Promise<T>): Promise<T | null> {
    try {
      return await fn();
    } catch (err) {
      const e = err as SdkErrorShape;
      if (e.name === "NoSuchKey" || e.name === "NotFound") return null;
      throw this.mapError(err, op, key);
    }
  }

  private mapError(err: unknown, op: string, key: string): Error {
    if (err instanceof StoreConfigError || err instanceof StoreUnavailableError) return err;
    const e = (err ?? {}) as SdkErrorShape;
    const name = e.name ?? "Error";
    const status = e.$metadata?.httpStatusCode;
    const where = `S3 store ${this.description}: ${op} ${JSON.stringify(key)}`;

    if (name === "CredentialsProviderError") {
      return new StoreConfigError(
        `${where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN if needed)`,
        { cause: err },
      );
    }
    if (name === "NoSuchBucket") {
      return new StoreConfigError(`${where}: bucket "${this.bucket}" does not exist`, { cause: err });
    }
    if (CONFIG_ERRORS.has(name) || status === 401 || status === 403) {
      // Server messages for auth failures can echo request details; keep only the code.
      return new StoreConfigError(
        `${where}: ${name} (HTTP ${status ?? "?"}); check the credentials, bucket, region and endpoint`,
        { cause: err },
      );
    }
    if (err instanceof TypeError || err instanceof RangeError) return err;
    // No HTTP status means the request never got an answer: network or timeout.
    if (UNAVAILABLE_ERRORS.has(name) || status === undefined || status >= 500 || status === 429 || status === 408) {
      const detail = e.code && !e.message?.includes(e.code) ? `${e.code}: ${e.message}` : (e.message ?? name);
      return new StoreUnavailableError(`${where}: store unavailable (${status ? `HTTP ${status}, ` : ""}${detail})`, {
        cause: err,
      });
    }
    return new Error(`${where}: ${name} (HTTP ${status}): ${e.message ?? ""}`, { cause: err });
  }
}

function checkSize(key: string, expected: number | undefined, actual: number): void {
  if (expected !== undefined && expected !== actual) {
    throw new Error(`put ${key}: expected ${expected} bytes but the body had ${actual}`);
  }
}

/** Re-chunks a stream into parts of exactly `size` bytes (the last may be shorter); always yields at least once. */
async function* fixedParts(stream: Readable, size: number): AsyncGenerator<Buffer> {
  let chunks: Buffer[] = [];
  let length = 0;
  let yielded = false;
  for await (const chunk of stream as AsyncIterable<Buffer | string>) {
    let buf = typeof chunk === "string" ? Buffer.from(chunk) : chunk;
    while (length + buf.length >= size) {
      const take = size - length;
      chunks.push(buf.subarray(0, take));
      yield Buffer.concat(chunks, size);
      yielded = true;
      chunks = [];
      length = 0;
      buf = buf.subarray(take);
    }
    if (buf.length > 0) {
      chunks.push(buf);
      length += buf.length;
    }
  }
  if (length > 0 || !yielded) yield Buffer.concat(chunks, length);
}
