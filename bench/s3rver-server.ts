/**
 * s3rver as its own process for the benchmarks, so that its request handling
 * does not share the event loop of the process that measures: prints
 * {"endpoint", "bucket"} on stdout once listening, stops on SIGTERM. The test
 * helper patches s3rver to behave like S3 (sorted listings, continuation
 * tokens, common prefixes of deep keys, atomic PUTs).
 */
import { startS3rver } from "../test/helpers/s3rver.js";

const server = await startS3rver("unisync-bench");
process.stdout.write(JSON.stringify({ endpoint: server.endpoint, bucket: server.bucket }) + "\n");
const stop = () => {
  void server.stop().finally(() => process.exit(0));
};
process.once("SIGTERM", stop);
process.once("SIGINT", stop);
