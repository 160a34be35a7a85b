/**
 * Large-file upload in one process, on one page-cached file, so that disk
 * writeback noise between separate runs does not decide the ratio: a raw
 * `FileStore.put` of a read stream against `uploadFile` (hashing queued beside
 * the copy, the default: log/hasher.ts) and `uploadFile` hashing each chunk inline
 * (the earlier way), in rotating order, best and median of N rounds each. Also
 * sha256 alone (hashFile).
 *
 *   npm run build && node dist/bench/upload-inproc.js [SIZE_MB=256] [ROUNDS=7] [DIR=tmpdir]
 *   STORE=s3 ...: the same against s3rver (its own process, bench/s3rver-server.ts),
 *   the S3 path of uploadFile (hash first, then one streamed PUT) against a raw PUT.
 */
import { randomBytes } from "node:crypto";
import { closeSync, createReadStream, fsyncSync, mkdtempSync, openSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { hashFile, uploadFile } from "../src/log/blobs.js";
import { mainThreadHasher } from "../src/log/hasher.js";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { FileStore } from "../src/store/file.js";
import type { ObjectStore } from "../src/store/store.js";
import { openStore } from "../src/store/url.js";
import { S3RVER_ENV, s3StoreUrl } from "../test/helpers/s3rver.js";

/** s3rver in its own process; returns a store on it and a stop function. */
async function s3Store(): Promise<{ store: ObjectStore; stop: () => void }> {
  const proc = spawn(process.execPath, [join(import.meta.dirname, "s3rver-server.js")], { stdio: ["ignore", "pipe", "inherit"] });
  const line = await new Promise<string>((resolve) => createInterface({ input: proc.stdout }).once("line", resolve));
  const { endpoint, bucket } = JSON.parse(line) as { endpoint: string; bucket: string };
  Object.assign(process.env, S3RVER_ENV);
  return { store: openStore(s3StoreUrl(endpoint, bucket, `upload-${Date.now()}`)), stop: () => proc.kill("SIGTERM") };
}

const [mbArg, roundsArg, dirArg] = process.argv.slice(2);
const mb = Number(mbArg ?? 256);
const rounds = Number(roundsArg ?? 7);
const dir = mkdtempSync(join(dirArg ?? tmpdir(), "unisync-upload-"));

try {
  const file = join(dir, "source.bin");
  const fd = openSync(file, "w");
  for (let i = 0; i < mb / 8; i++) writeSync(fd, randomBytes(8 << 20));
  fsyncSync(fd);
  closeSync(fd);
  const want = (await hashFile(file)).sha256;
  const s3 = process.env.STORE === "s3" ? await s3Store() : null;
  const store: ObjectStore = s3?.store ?? new FileStore(join(dir, "store"));
  process.once("exit", () => s3?.stop());
  await store.put("blobs/.keep", Buffer.alloc(0));
  await store.put("bench/.keep", Buffer.alloc(0));

  const variants: Record<string, () => Promise<void>> = {
    raw_put: async () => {
      await store.put("bench/raw.bin", createReadStream(file, { highWaterMark: 1 << 20 }));
      await store.delete("bench/raw.bin");
    },
    upload_queued: async () => {
      const u = await uploadFile(store, file);
      if (u.sha256 !== want) throw new Error("wrong hash");
      await store.delete(`blobs/${u.sha256}`);
    },
    upload_inline: async () => {
      const u = await uploadFile(store, file, mainThreadHasher);
      if (u.sha256 !== want) throw new Error("wrong hash");
      await store.delete(`blobs/${u.sha256}`);
    },
    sha256_only: async () => {
      await hashFile(file);
    },
  };
  const times: Record<string, number[]> = {};
  for (let r = 0; r < rounds; r++) {
    // Rotate the order each round so no variant always follows the same one.
    const names = Object.keys(variants);
    for (let i = 0; i < names.length; i++) {
      const name = names[(i + r) % names.length]!;
      const t = performance.now();
      await variants[name]!();
      (times[name] ??= []).push(performance.now() - t);
    }
  }
  const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const rawBest = Math.min(...times.raw_put!);
  const rawMed = med(times.raw_put!);
  console.log(`${mb} MB, ${rounds} rounds, ${dir}, store ${store.description}`);
  for (const [name, xs] of Object.entries(times)) {
    const best = Math.min(...xs);
    console.log(
      `${name.padEnd(14)} best ${best.toFixed(0).padStart(5)} ms  median ${med(xs).toFixed(0).padStart(5)} ms` +
        (name.startsWith("upload") ? `  ratio vs raw: best ${(rawBest / best).toFixed(2)}x, median ${(rawMed / med(xs)).toFixed(2)}x` : "") +
        `  [${xs.map((x) => x.toFixed(0)).join(" ")}]`,
    );
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
