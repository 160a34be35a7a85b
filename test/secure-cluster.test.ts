/**
 * A secured cluster of three agent processes on moto's S3 server, set up with
 * the CLI as a user would (keys init, keys node, keys add):
 *  - rows and files sync, and no object in the bucket holds a row value, a
 *    file's content or a file's sha256 in clear;
 *  - a segment forged under n1's name (signed by n2's key), tampered bytes, an
 *    old segment replayed under a new seq and a decompression bomb signed by n1
 *    itself are each refused by every reader, shown in status, and never
 *    applied; the agents keep running;
 *  - after "keys rotate" every node writes under the new key and still syncs;
 *  - after "keys remove n3" the segments n3 writes are refused by n1 and n2
 *    (status says why), n3 is told it was removed, and n1 and n2 go on syncing;
 *  - an agent without keys is refused at start with a message that says how to join.
 * Reproduce with SEED=<printed seed>; KEEP_CLUSTER=1 keeps folders and logs.
 */
import { spawnSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { compareDatabases } from "./helpers/checker.js";
import { appSucceeded, CLI, clusterSuite, runApp, runCli, syncedFileHashes, waitFor, PYTHON } from "./helpers/cluster.js";
import { MOTO_ENV } from "./helpers/moto.js";
import { readKeyFile } from "../src/keys/trust.js";
import { newestTrustList, Vault } from "../src/keys/vault.js";
import { publishPointer } from "../src/log/index.js";
import { logHead, segmentKey } from "../src/log/keys.js";
import { sealSegment, sha256Hex } from "../src/log/segment.js";
import { segmentLabel } from "../src/keys/vault.js";
import { compress } from "zstd-napi";
import { listAll } from "../src/store/store.js";
import { openStore } from "../src/store/url.js";

const SEED = Number(process.env.SEED ?? Math.floor(Math.random() * 1_000_000));
const NODES = ["n1", "n2", "n3"];

const suite = clusterSuite("moto");

async function cli(args: string[]): Promise<string> {
  const r = await runCli(args, MOTO_ENV);
  if (r.code !== 0) throw new Error(`unisync ${args.join(" ")} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
}

const sql = (db: string, statement: string) => {
  const r = spawnSync(PYTHON, ["-c", `import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()`, db, statement]);
  if (r.status !== 0) throw new Error(r.stderr.toString());
};

describe("secured cluster on moto's S3 server", () => {
  it("syncs sealed, refuses forged and removed members' segments, survives rotation, and turns away agents without keys", async (ctx) => {
    console.log(`secure-cluster.test SEED=${SEED}`);
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    let operatorKey = "";
    let operatorPublic = "";
    const c = await suite.start(NODES, `secure-${SEED}`, {
      prepare: async (c) => {
        operatorKey = join(c.root, "operator.key");
        const init = await cli(["keys", "init", c.options.store, "--operator-key", operatorKey]);
        operatorPublic = /unisync-operator:[A-Za-z0-9_-]{43}/.exec(init)![0];
        for (const name of NODES) {
          const line = /unisync-node:\S+/.exec(await cli(["keys", "node", c.instance(name), "--operator", operatorPublic, "--node", name]))![0];
          await cli(["keys", "add", c.options.store, line, "--operator-key", operatorKey]);
        }
      },
    });
    const url = c.options.store;
    const store = openStore(url, { ...MOTO_ENV });
    for (const [i, name] of NODES.entries()) {
      await appSucceeded(runApp("random_writer.py", [c.instance(name, "data.db"), "--node", String(i + 1), "--ops", "0"]), "create data.db");
    }
    const marker = `ROW-MARKER-${SEED}`;
    sql(c.instance("n1", "data.db"), `INSERT INTO items(t) VALUES ('${marker}')`);
    for (const name of NODES) {
      mkdirSync(c.instance(name, "docs"), { recursive: true });
      writeFileSync(c.instance(name, `docs/${name}.txt`), `FILE-MARKER-${SEED} of ${name}\n`.repeat(100));
    }
    await c.writeRandom(NODES, SEED, 60);
    await c.waitForQuiescence(["data.db"], 90_000);
    await c.waitForConvergence(c.paths("data.db"), 30_000);
    await waitFor(() => NODES.every((n) => Object.keys(syncedFileHashes(c.instance(n))).filter((p) => p.startsWith("docs/")).length === 3), 30_000, "files on every node");
    const fileHashes = Object.values(syncedFileHashes(c.instance("n1")));

    // The bucket, read without keys: no row value, file content or file hash in clear.
    let objects = 0;
    for await (const o of listAll(store, "")) {
      objects++;
      const body = (await store.get(o.key))!;
      for (const secret of [marker, `FILE-MARKER-${SEED}`, ...fileHashes]) {
        expect(body.includes(Buffer.from(secret)), `${o.key} holds ${secret} in clear`).toBe(false);
        expect(o.key.includes(secret), `${o.key} names ${secret}`).toBe(false);
      }
    }
    expect(objects).toBeGreaterThan(10);

    // Hostile objects at n1's next seq, one at a time, each announced in the index like a real
    // segment: every reader refuses it, says why in status, applies nothing, and keeps running.
    const trust = (await newestTrustList(store, operatorPublic.slice("unisync-operator:".length)))!.bytes;
    const vaultOf = (n: string) => new Vault(readKeyFile(c.instance(n, ".unisync/node.key")), trust);
    const seq = (await logHead(store, "n1", "data.db")) + 1;
    const forgedRow = (seqNo: number) => ({
      origin: "n1", stream: "data.db", seq: seqNo, createdMs: Date.now(),
      records: [{ hlc: Date.now() * 1024, row: { table: "items", op: 1 as const, columns: ["id", "t"], values: [999_999n, `FORGED-${SEED}`], key: ["id"], changed: [] } }],
    });
    const realFirst = (await store.list("log/n1/data.db/", { limit: 1 })).objects[0]!.key;
    const tampered = Buffer.from((await store.get(realFirst))!);
    tampered[tampered.length - 70] ^= 1;
    const bomb = Buffer.from(compress(Buffer.alloc(8 * 1024 * 1024), { compressionLevel: 19 }));
    bomb.writeUInt32LE(0xffffffff, 5 + ((bomb[4]! >> 5) & 1 ? 0 : 1));
    const attacks: { what: string; bytes: Buffer; refusal: RegExp }[] = [
      { what: "forged origin (n2's key, n1's name)", bytes: sealSegment(forgedRow(seq), vaultOf("n2")).bytes, refusal: /refused: .*signed by "n2", not by its origin/ },
      { what: "tampered bytes", bytes: tampered, refusal: /refused: .*(fails authentication|does not verify)/ },
      { what: "old segment replayed under a new seq", bytes: (await store.get(realFirst))!, refusal: /header says n1\/data.db#1, key says n1\/data.db#\d+/ },
      { what: "decompression bomb signed by n1 itself", bytes: vaultOf("n1").seal(bomb, segmentLabel("n1", "data.db", seq), true), refusal: /declares 4294967295 bytes decompressed, over the .* limit/ },
    ];
    for (const a of attacks) {
      const sha = sha256Hex(a.bytes);
      const key = segmentKey("n1", "data.db", seq, sha);
      await store.put(key, a.bytes);
      await publishPointer(store, Date.now(), "n1", "data.db", [{ seq, sha256: sha }]);
      for (const n of ["n2", "n3"]) {
        await waitFor(async () => a.refusal.test((await c.status(n)).databases[0]?.problems.n1 ?? ""), 30_000, `${n} to refuse the ${a.what}`);
      }
      await store.delete(key);
    }
    for (const n of NODES) expect(c.running(n), `${n} keeps running`).toBe(true);

    // Rotation: every node takes the new list from the index and writes under key 2.
    await cli(["keys", "rotate", url, "--operator-key", operatorKey]);
    await waitFor(async () => (await Promise.all(NODES.map((n) => c.status(n)))).every((s) => s.trust?.currentKey === 2), 30_000, "every node on data key 2");
    await c.writeRandom(NODES, SEED + 1, 30);
    await c.waitForQuiescence(["data.db"], 90_000);
    await c.waitForConvergence(c.paths("data.db"), 30_000);
    expect(spawnSync(PYTHON, ["-c", `import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from items where t like 'FORGED%'").fetchone()[0])`, c.instance("n2", "data.db")]).stdout.toString().trim()).toBe("0");

    // Removal of n3 (still running): what it writes afterwards is refused by n1 and n2.
    await cli(["keys", "remove", url, "n3", "--operator-key", operatorKey]);
    await waitFor(async () => /was removed/.test((await c.status("n3")).trust?.error ?? ""), 30_000, "n3 to learn it was removed");
    sql(c.instance("n3", "data.db"), `INSERT INTO items(t) VALUES ('AFTER-REMOVAL-${SEED}')`);
    for (const n of ["n1", "n2"]) {
      await waitFor(async () => /written after "n3" was removed/.test((await c.status(n)).databases[0]?.problems.n3 ?? ""), 30_000, `${n} to refuse n3's new segment`);
    }
    await c.writeRandom(["n1", "n2"], SEED + 2, 20);
    await waitFor(() => compareDatabases([c.instance("n1", "data.db"), c.instance("n2", "data.db")]).length === 0, 60_000, "n1 and n2 to agree");
    for (const n of ["n1", "n2"]) {
      expect(spawnSync(PYTHON, ["-c", `import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from items where t like 'AFTER-REMOVAL%'").fetchone()[0])`, c.instance(n, "data.db")]).stdout.toString().trim()).toBe("0");
    }
    for (const n of NODES) expect(c.running(n), `${n} keeps running`).toBe(true);
    expect(c.unexpectedExits).toEqual([]);

    // A new member bootstraps from a sealed snapshot plus sealed segments. The snapshot is
    // taken here: the agents' first ones come 10 s after their start, and a fast run gets
    // here sooner (n4 then found none; an empty node without one has no database to sync).
    await cli(["snapshot", c.instance("n1"), "--json"]);
    mkdirSync(join(c.root, "n4", "instance"), { recursive: true });
    const n4line = /unisync-node:\S+/.exec(await cli(["keys", "node", join(c.root, "n4", "instance"), "--operator", operatorPublic, "--node", "n4"]))![0];
    await cli(["keys", "add", url, n4line, "--operator-key", operatorKey]);
    await c.addNode("n4");
    await waitFor(() => compareDatabases([c.instance("n1", "data.db"), c.instance("n4", "data.db")]).length === 0, 90_000, "n4 to hold what n1 holds");
    expect(Object.keys(syncedFileHashes(c.instance("n4"))).filter((p) => p.startsWith("docs/"))).toHaveLength(3);

    // The audit and gc read the sealed log with the node's keys.
    expect(await cli(["log", c.instance("n1"), "--store", url, "--table", "items", "--limit", "1000"])).toContain(marker);
    const gc = await runCli(["gc", c.instance("n1"), "--store", url, "--json"], MOTO_ENV);
    expect(gc.code, `${gc.stderr}\n${gc.stdout}`).toBe(0);

    // An agent without keys: refused at start, exit code 2, one clear line.
    const plainDir = join(c.root, "plain", "instance");
    mkdirSync(plainDir, { recursive: true });
    const plain = spawnSync(process.execPath, [CLI, "run", plainDir, url, "--node", "n5", "--http-port", "off"], { env: { ...process.env, ...MOTO_ENV }, timeout: 30_000 });
    expect(plain.status).toBe(2);
    expect(plain.stderr.toString()).toMatch(/holds a secured cluster .* no key file .*Join it with: unisync keys node/);
  });
});
