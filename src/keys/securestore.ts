/**
 * The store as a secured cluster's node sees it: a wrapper around the real one
 * that seals what goes in and opens (and judges) what comes out, so the modules
 * above it do not change.
 *
 * - blobs/ (file contents, snapshot parts): sealed, streamed; named by an HMAC
 *   of the content hash, so the bucket does not tell which content it holds.
 * - nodes/ (heartbeats), snapshots/ (manifests), gc/ (markers): sealed and
 *   signed, under their own key as label (a copy under another name is refused).
 * - log/ (segments) passes through: the outbox seals and signs a segment when it
 *   is made, because its bytes (and name) are fixed before the first upload.
 * - idx/, claims/, probe/, cluster/ pass through: pointers, claims and probes
 *   carry only names and hashes of sealed bytes; the trust list is signed by the operator.
 */
import { pipeline, Readable } from "node:stream";
import type { ListOptions, ListPage, ObjectInfo, ObjectStore, PutIfAbsentResult, RequestCounts } from "../store/store.js";
import type { Vault } from "./vault.js";

const SEALED = ["blobs/", "nodes/", "snapshots/", "gc/"];
const SIGNED = ["nodes/", "snapshots/", "gc/"];
const BLOB = /^blobs\/([0-9a-f]{64})$/;
/** Blobs are not bound to their name: their content is checked against the hash a signed record names. */
const BLOB_LABEL = "blob";

const under = (prefixes: string[], key: string) => prefixes.some((p) => key.startsWith(p));

export class SecureStore implements ObjectStore {
  readonly description: string;
  readonly requests: RequestCounts;
  readonly putThenName?: ObjectStore["putThenName"];

  constructor(
    readonly inner: ObjectStore,
    readonly vault: Vault,
  ) {
    this.description = `${inner.description} (secured)`;
    this.requests = inner.requests;
    if (inner.putThenName) {
      const named = inner.putThenName.bind(inner);
      this.putThenName = async (dir, body, keyFor) => {
        const sealed = pipeline(body, vault.sealStream(BLOB_LABEL), () => undefined);
        let logical: string | null = null;
        await named(dir, sealed, async () => {
          logical = await keyFor();
          return logical === null ? null : this.storedName(logical);
        });
        return logical;
      };
    }
  }

  /** The key an object has in the real store. */
  storedName(key: string): string {
    const blob = BLOB.exec(key);
    return blob ? `blobs/${this.vault.blobName(blob[1]!)}` : key;
  }

  private label(key: string): string {
    return key.startsWith("blobs/") ? BLOB_LABEL : key;
  }

  private seal(key: string, body: Buffer): Buffer {
    return under(SEALED, key) ? this.vault.seal(body, this.label(key), under(SIGNED, key)) : body;
  }

  async put(key: string, body: Buffer | Readable, size?: number): Promise<void> {
    if (Buffer.isBuffer(body) || !under(SEALED, key)) {
      await this.inner.put(this.storedName(key), Buffer.isBuffer(body) ? this.seal(key, body) : body, Buffer.isBuffer(body) ? undefined : size);
      return;
    }
    if (under(SIGNED, key)) throw new Error(`${key}: signed objects are put whole, not streamed`);
    const seal = this.vault.sealStream(BLOB_LABEL);
    await this.inner.put(this.storedName(key), pipeline(body, seal, () => undefined), size === undefined ? undefined : seal.sealedSize(size));
  }

  putIfAbsent(key: string, body: Buffer): Promise<PutIfAbsentResult> {
    return this.inner.putIfAbsent(this.storedName(key), this.seal(key, body));
  }

  async get(key: string): Promise<Buffer | null> {
    const bytes = await this.inner.get(this.storedName(key));
    if (!bytes || !under(SEALED, key)) return bytes;
    return this.vault.open(bytes, key, key.startsWith("blobs/") ? undefined : key, under(SIGNED, key));
  }

  async getStream(key: string): Promise<Readable | null> {
    if (under(SIGNED, key)) {
      const whole = await this.get(key);
      return whole && Readable.from([whole]);
    }
    const stream = await this.inner.getStream(this.storedName(key));
    if (!stream || !under(SEALED, key)) return stream;
    return pipeline(stream, this.vault.openStream(key), () => undefined);
  }

  head(key: string): Promise<ObjectInfo | null> {
    return this.inner.head(this.storedName(key));
  }

  list(prefix: string, options?: ListOptions): Promise<ListPage> {
    return this.inner.list(prefix, options);
  }

  delete(key: string): Promise<void> {
    return this.inner.delete(this.storedName(key));
  }
}

/** The vault of a secured store (undefined for a plain one): segments are sealed and opened with it. */
export function vaultOf(store: ObjectStore): Vault | undefined {
  return store instanceof SecureStore ? store.vault : undefined;
}

/** The name `key` has in the real store (gc compares listings against it). */
export function storedName(store: ObjectStore, key: string): string {
  return store instanceof SecureStore ? store.storedName(key) : key;
}
