/**
 * s3rver as its own process for the benchmarks: prints {"endpoint", "bucket"}
 * on stdout once listening, stops on SIGTERM. Reuses the test helper (sorted
 * listings, working continuation tokens).
 */
import { startS3rver } from "../test/helpers/s3rver.js";

const server = await startS3rver("unisync-bench");
process.stdout.write(JSON.stringify({ endpoint: server.endpoint, bucket: server.bucket }) + "\n");
const stop = () => {
  void server.stop().finally(() => process.exit(0));
};
process.once("SIGTERM", stop);
process.once("SIGINT", stop);
