/**
 * Python moto's S3 server (`moto_server`, moto 5) as a second, unpatched S3
 * implementation: it lists with delimiters correctly and enforces
 * If-None-Match, as MinIO and AWS do, where s3rver needs patches. Started as a
 * child process on a free loopback port; the bucket is created with a PUT.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";

/** Any credentials do: moto does not check signatures. */
export const MOTO_ENV = { AWS_ACCESS_KEY_ID: "moto", AWS_SECRET_ACCESS_KEY: "moto" } as const;

export interface MotoHandle {
  endpoint: string;
  bucket: string;
  stop(): Promise<void>;
}

/** A loopback TCP port nobody listens on right now. */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** The command that runs moto's server here: `moto_server`, else `python3 -m moto.server`. */
function motoCommand(): string[] {
  if (spawnSync("moto_server", ["--help"], { stdio: "ignore" }).status === 0) return ["moto_server"];
  if (spawnSync("python3", ["-c", "import moto.server"], { stdio: "ignore" }).status === 0) return ["python3", "-m", "moto.server"];
  throw new Error("moto's S3 server is not installed: `python3 -m pip install 'moto[server]>=5'` (.ci/run does it)");
}

export async function startMoto(bucket = "unisync-test"): Promise<MotoHandle> {
  const [cmd, ...args] = motoCommand();
  const port = await freePort();
  const proc: ChildProcess = spawn(cmd!, [...args, "-H", "127.0.0.1", "-p", String(port)], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  proc.stderr?.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
  const endpoint = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`moto_server exited (${proc.exitCode}): ${stderr}`);
    const res = await fetch(`${endpoint}/${bucket}`, { method: "PUT" }).catch(() => null);
    if (res?.ok) break;
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`moto_server did not answer on ${endpoint} within 30 s: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  return {
    endpoint,
    bucket,
    async stop() {
      if (proc.exitCode !== null) return;
      const exited = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
      proc.kill("SIGTERM");
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
      if (proc.exitCode === null) proc.kill("SIGKILL");
    },
  };
}
