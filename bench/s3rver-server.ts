/**
 * s3rver as its own process for the benchmarks: prints {"endpoint", "bucket"}
 * on stdout once listening, stops on SIGTERM. Reuses the test helper (sorted
 * listings, working continuation tokens) and adds one more fix, below.
 */
import { createRequire } from "node:module";
import { startS3rver } from "../test/helpers/s3rver.js";

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
 */
function patchDelimiterListing(): void {
  const require = createRequire(import.meta.url);
  const Store = require("s3rver/lib/stores/filesystem") as { prototype: { listObjects: ListObjects } };
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
}

const server = await startS3rver("unisync-bench"); // loads s3rver with the helper's patches first
patchDelimiterListing();
process.stdout.write(JSON.stringify({ endpoint: server.endpoint, bucket: server.bucket }) + "\n");
const stop = () => {
  void server.stop().finally(() => process.exit(0));
};
process.once("SIGTERM", stop);
process.once("SIGINT", stop);
