/**
 * Large file through folder sync: two agent processes (file:// store), a file of
 * SIZE_MB (default 1024) written into node a's folder; measures the time until
 * node b holds an identical copy and the peak RSS of both agents (sampled from
 * /proc every 100 ms). Exit code 1 if an agent's RSS reached 200 MB.
 *
 *   npm run build && node dist/bench/folder-large.js [SIZE_MB] [--keep]
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { createReadStream, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statSync } from "node:fs";
import { open } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const repo = [join(here, "..", ".."), join(here, "..")].find((d) => existsSync(join(d, "bin", "unisync.js")))!;
const cli = join(repo, "bin", "unisync.js");
const sizeMb = Number(process.argv.slice(2).find((a) => /^\d+$/.test(a)) ?? 1024);
const keep = process.argv.includes("--keep");
const LIMIT_MB = 200;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function rssMb(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) / 1024 : 0;
  } catch {
    return 0;
  }
}

async function hashFile(p: string): Promise<string> {
  const h = createHash("sha256");
  for await (const c of createReadStream(p, { highWaterMark: 1 << 20 })) h.update(c as Buffer);
  return h.digest("hex");
}

async function main(): Promise<void> {
  const root = mkdtempSync(join(tmpdir(), "unisync-large-"));
  const storeDir = join(root, "store");
  mkdirSync(storeDir);
  const agents: { name: string; dir: string; proc: ChildProcess; peak: number }[] = [];
  for (const name of ["a", "b"]) {
    const dir = join(root, name);
    mkdirSync(dir);
    const logFd = openSync(join(root, `${name}.log`), "a");
    const proc = spawn(process.execPath, [cli, "run", dir, `file://${storeDir}`, "--node", name, "--http-port", "off"], {
      env: { ...process.env, UNISYNC_POLL_MAX_MS: "300", UNISYNC_RESCAN_MS: "1000" },
      stdio: ["ignore", logFd, logFd],
    });
    agents.push({ name, dir, proc, peak: 0 });
  }
  const sampler = setInterval(() => {
    for (const a of agents) a.peak = Math.max(a.peak, rssMb(a.proc.pid!));
  }, 100);
  try {
    await sleep(1500);
    const baseline = agents.map((a) => rssMb(a.proc.pid!));
    // Write the file into a's folder in 8 MiB chunks of random (incompressible) bytes.
    const src = join(agents[0]!.dir, "big file.bin");
    const h = createHash("sha256");
    const fh = await open(src, "w");
    const t0 = Date.now();
    for (let i = 0; i < sizeMb / 8; i++) {
      const chunk = randomBytes(8 * 1024 * 1024);
      h.update(chunk);
      await fh.write(chunk);
    }
    await fh.close();
    const want = h.digest("hex");
    const tWritten = Date.now();
    const dst = join(agents[1]!.dir, "big file.bin");
    const deadline = Date.now() + 30 * 60_000;
    while (!(existsSync(dst) && statSync(dst).size === sizeMb * 1024 * 1024)) {
      if (Date.now() > deadline) throw new Error("timed out waiting for node b");
      if (agents.some((a) => a.proc.exitCode !== null)) throw new Error(`an agent exited; logs in ${root}`);
      await sleep(100);
    }
    const tArrived = Date.now();
    const same = (await hashFile(dst)) === want;
    const result = {
      sizeMb,
      writeSeconds: (tWritten - t0) / 1000,
      syncSecondsAfterWrite: (tArrived - tWritten) / 1000,
      throughputMBps: Math.round((sizeMb / ((tArrived - tWritten) / 1000)) * 10) / 10,
      identical: same,
      rssBaselineMb: Object.fromEntries(agents.map((a, i) => [a.name, Math.round(baseline[i]!)])),
      rssPeakMb: Object.fromEntries(agents.map((a) => [a.name, Math.round(a.peak)])),
      limitMb: LIMIT_MB,
    };
    console.log(JSON.stringify(result, null, 2));
    if (!same || agents.some((a) => a.peak >= LIMIT_MB)) process.exitCode = 1;
  } finally {
    clearInterval(sampler);
    for (const a of agents) a.proc.kill("SIGTERM");
    await sleep(1000);
    for (const a of agents) if (a.proc.exitCode === null) a.proc.kill("SIGKILL");
    if (keep) console.log(`kept ${root}`);
    else rmSync(root, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(2);
});
