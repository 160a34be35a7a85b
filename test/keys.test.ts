/**
 * Secured clusters, piece by piece, on a real directory store: the sealed
 * object format, segments (forged, tampered, replayed under another name,
 * removed member, wrong key, rotated key), the decompression-bomb cap, the
 * trust list (forgery, rollback, membership, mixed setups), what the bucket
 * shows a reader without keys, and the status server's token.
 */
import { createHash } from "node:crypto";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import { Readable, Writable } from "node:stream";
import { compress } from "zstd-napi";
import { afterAll, describe, expect, it } from "vitest";
import { addMember, initCluster, removeMember, rotateKey } from "../src/cli/keys.js";
import { loadConfig } from "../src/agent/config.js";
import { Metrics } from "../src/stream/metrics.js";
import { CHUNK, OpenStream, sealBuffer, SealError, SealStream, type Opener } from "../src/keys/envelope.js";
import { secureStore } from "../src/keys/open.js";
import { SecureStore, storedName } from "../src/keys/securestore.js";
import { KeyConfigError, newKeyFile, OPERATOR, publicLine, writeKeyFile, type KeyFile } from "../src/keys/trust.js";
import { newestTrustList, Vault } from "../src/keys/vault.js";
import { blobKey, fetchBlob, fetchBlobToFile, putBlobFromFile } from "../src/log/blobs.js";
import { parseSegmentKey, segmentKey } from "../src/log/keys.js";
import { CorruptSegmentError, decompressFrame, openSegment, sealSegment, type Segment } from "../src/log/segment.js";
import { readAfter } from "../src/log/tail.js";
import { listAll, type ObjectStore } from "../src/store/store.js";
import { openStore } from "../src/store/url.js";
import { startStatusServer } from "../src/web/server.js";
import type { ConsoleBackend } from "../src/web/backend.js";
import type { AgentStatus } from "../src/agent/agent.js";

const root = mkdtempSync(join(tmpdir(), "unisync-keys-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let dirs = 0;
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** A secured cluster in a fresh directory store, with members `names`. */
async function cluster(names: string[]) {
  const inner = openStore(join(root, `store-${++dirs}`));
  const op = newKeyFile(OPERATOR);
  await initCluster(inner, op);
  const keys: Record<string, KeyFile> = {};
  for (const n of names) {
    keys[n] = newKeyFile(n, op.sign.public);
    await addMember(inner, op, publicLine(keys[n]!));
  }
  const vault = async (n: string) => new Vault(keys[n]!, (await newestTrustList(inner, op.sign.public))!.bytes);
  const storeOf = async (n: string) => new SecureStore(inner, await vault(n));
  return { inner, op, keys, vault, storeOf };
}

const row = (v: string): Segment["records"][number] => ({ hlc: 1024, row: { table: "t", op: 1, columns: ["id", "v"], values: [1n, v], key: ["id"], changed: [] } });
const segment = (origin: string, seq: number, v = "secret value"): Segment => ({ origin, stream: "app.db", seq, createdMs: 1, records: [row(v)] });

/** Puts a sealed segment where readers look for it and returns the reader's verdict. */
async function putAndRead(reader: ObjectStore, inner: ObjectStore, origin: string, seq: number, bytes: Buffer): Promise<{ applied: number; problem?: string }> {
  // One candidate per seq at a time (two would be a fork, a different refusal).
  for await (const o of listAll(inner, `log/${origin}/app.db/`)) if (parseSegmentKey(o.key)?.seq === seq) await inner.delete(o.key);
  await inner.put(segmentKey(origin, "app.db", seq, sha(bytes)), bytes);
  const r = await readAfter(reader, origin, "app.db", seq - 1, 10);
  let applied = 0;
  for await (const _ of r.segments) applied++;
  return { applied, problem: r.problem()?.message };
}

describe("sealed objects", () => {
  const key = Buffer.alloc(32, 7);
  const opener = (k = key): Opener => ({ key: (id) => (id === 1 ? k : undefined), verify: () => undefined });
  const sealer = { keyId: 1, key, signer: "n1" };

  it("round-trip as buffers and streams, and refuse a flipped byte, a dropped or cut chunk and a wrong key", async () => {
    for (const size of [0, 10, CHUNK, 2 * CHUNK + 12345]) {
      const plain = Buffer.alloc(size, 0x61);
      const sealed = sealBuffer(plain, "blob", sealer);
      expect(sealed.includes(Buffer.from("aaaaaaaa"))).toBe(false);
      // Stream in odd pieces both ways; the streamed form is the buffer form.
      const streamed: Buffer[] = [];
      const seal = new SealStream("blob", sealer);
      await pipeline(Readable.from(pieces(plain, 777_777)), seal, sink(streamed));
      expect(Buffer.concat(streamed).length).toBe(seal.sealedSize(size));
      const back: Buffer[] = [];
      await pipeline(Readable.from(pieces(Buffer.concat(streamed), 100_003)), new OpenStream(opener(), "test"), sink(back));
      expect(Buffer.concat(back).equals(plain)).toBe(true);
      const { openBuffer } = await import("../src/keys/envelope.js");
      expect(openBuffer(sealed, opener(), "test").payload.equals(plain)).toBe(true);
    }
    const { openBuffer } = await import("../src/keys/envelope.js");
    const sealed = sealBuffer(Buffer.alloc(2 * CHUNK + 5, 1), "blob", sealer);
    const flipped = Buffer.from(sealed);
    flipped[flipped.length - 100] ^= 1;
    expect(() => openBuffer(flipped, opener(), "x")).toThrow(/fails authentication/);
    const headerLen = sealed.length - (2 * CHUNK + 5) - 4 * 16; // three data chunks and the end marker
    const dropped = Buffer.concat([sealed.subarray(0, headerLen), sealed.subarray(headerLen + CHUNK + 16)]);
    expect(() => openBuffer(dropped, opener(), "x")).toThrow(/fails authentication/);
    const cut = sealed.subarray(0, headerLen + 2 * (CHUNK + 16));
    expect(() => openBuffer(cut, opener(), "x")).toThrow(/fails authentication/);
    expect(() => openBuffer(sealed, opener(Buffer.alloc(32, 8)), "x")).toThrow(/fails authentication/);
    expect(() => openBuffer(sealed.subarray(0, sealed.length - 16), opener(), "x")).toThrow(/cut off \(chunk 2 has no tag\)/);
    expect(() => openBuffer(sealed, { ...opener(), key: () => undefined }, "x")).toThrow(/data key 1, which this node does not hold/);
    // A stream stops at the first bad chunk and releases nothing of it or after it.
    const early = Buffer.from(sealed);
    early[headerLen + CHUNK + 16 + 100] ^= 1;
    const out: Buffer[] = [];
    await expect(pipeline(Readable.from(pieces(early, 65536)), new OpenStream(opener(), "x"), sink(out))).rejects.toThrow(/chunk 1 fails authentication/);
    expect(Buffer.concat(out).length).toBe(CHUNK);
  });
});

describe("segments of a secured cluster", () => {
  it("open for members and refuse forged origin, tampered bytes, a replay under another name, non-members and mixed setups", async () => {
    const c = await cluster(["n1", "n2"]);
    const n1 = await c.storeOf("n1");
    const n2 = await c.storeOf("n2");
    const good = sealSegment(segment("n1", 1), (await c.vault("n1")));
    expect(good.bytes.includes(Buffer.from("secret value"))).toBe(false);
    expect(await putAndRead(n2, c.inner, "n1", 1, good.bytes)).toEqual({ applied: 1, problem: undefined });

    // n2 writes a segment under n1's name: its signature is n2's, not n1's.
    const forged = sealSegment(segment("n1", 2, "forged"), await c.vault("n2"));
    expect((await putAndRead(n2, c.inner, "n1", 2, forged.bytes)).problem).toMatch(/refused: .*signed by "n2", not by its origin/);

    // An outsider with its own keys (never added) and a copy of the trust list cannot sign for anyone.
    const outsider = newKeyFile("n1", c.op.sign.public);
    const outsiderVault = await c.vault("n1");
    Object.assign(outsiderVault, { me: outsider });
    const impostor = sealSegment(segment("n1", 2, "impostor"), outsiderVault);
    expect((await putAndRead(n2, c.inner, "n1", 2, impostor.bytes)).problem).toMatch(/refused: .*signature of "n1" does not verify/);

    // Tampered bytes, renamed to match their new hash: authentication fails.
    const tampered = Buffer.from(good.bytes);
    tampered[tampered.length - 80] ^= 4;
    expect((await putAndRead(n2, c.inner, "n1", 2, tampered)).problem).toMatch(/refused: .*(does not verify|fails authentication)/);

    // Segment 1 copied as segment 2: signed and sealed as seq 1.
    expect((await putAndRead(n2, c.inner, "n1", 2, good.bytes)).problem).toMatch(/header says n1\/app.db#1, key says n1\/app.db#2/);

    // A plain segment in a secured cluster, and a sealed one read by a node without keys.
    const plain = sealSegment(segment("n1", 2, "plain"));
    expect((await putAndRead(n2, c.inner, "n1", 2, plain.bytes)).problem).toMatch(/refused: the segment is not signed, but this cluster is secured/);
    expect(() => openSegment(good.bytes, good.sha256)).toThrow(/refused: the segment is signed and encrypted .* this node has no cluster keys/);
    // After all the refusals, the real segment 2 is taken.
    const fine = sealSegment(segment("n1", 2, "fine"), await c.vault("n1"));
    expect(await putAndRead(n1, c.inner, "n1", 2, fine.bytes)).toMatchObject({ applied: 1 });
  });

  it("a removed member's log stays valid as far as it went; later segments and the new key are out of its reach", async () => {
    const c = await cluster(["n1", "n2", "n3"]);
    const n3vault = await c.vault("n3");
    const before = sealSegment(segment("n3", 1), n3vault);
    await c.inner.put(segmentKey("n3", "app.db", 1, before.sha256), before.bytes);
    await removeMember(c.inner, c.op, "n3");
    const n1 = await c.storeOf("n1");
    expect(await putAndRead(n1, c.inner, "n3", 1, before.bytes)).toEqual({ applied: 1, problem: undefined });
    const after = sealSegment(segment("n3", 2, "after removal"), n3vault);
    expect((await putAndRead(n1, c.inner, "n3", 2, after.bytes)).problem).toMatch(/refused: .*written after "n3" was removed from the cluster \(its log stays valid through seq 1\)/);
    // n1 now writes under key 2, which n3 never had.
    const mine = sealSegment(segment("n1", 1, "not for n3"), (n1 as SecureStore).vault);
    expect(() => openSegment(mine.bytes, mine.sha256, n3vault)).toThrow(/refused: .*sealed under cluster data key 2, which this node does not hold/);
    // n3 cannot open the store any more.
    const dir = mkdtempSync(join(root, "n3-"));
    writeKeyFile(join(dir, "node.key"), c.keys.n3!);
    await expect(secureStore(c.inner, { keyFile: join(dir, "node.key") })).rejects.toThrow(/node "n3" was removed from the cluster/);
  });

  it("rotation: new segments use the new key, old ones still open, a node behind on the list catches up on refresh", async () => {
    const c = await cluster(["n1", "n2"]);
    const n2old = await c.vault("n2");
    const old = sealSegment(segment("n1", 1, "old"), await c.vault("n1"));
    await rotateKey(c.inner, c.op);
    const n1 = await c.vault("n1");
    expect(n1.trust.currentKey).toBe(2);
    const fresh = sealSegment(segment("n1", 2, "new"), n1);
    expect(openSegment(old.bytes, old.sha256, n1).records[0]!.row!.values[1]).toBe("old");
    expect(() => openSegment(fresh.bytes, fresh.sha256, n2old)).toThrow(/data key 2, which this node does not hold/);
    expect(await n2old.refresh(c.inner)).toBe(true);
    expect(openSegment(fresh.bytes, fresh.sha256, n2old).records[0]!.row!.values[1]).toBe("new");
  });
});

describe("decompression bomb", () => {
  it("a 1 KB frame that declares 4 GB is refused before anything is allocated; frames without a size or with a tail too", () => {
    // A real frame of 8 MB of zeros (a few hundred bytes), then its declared size patched to 4 GB.
    const frame = compress(Buffer.alloc(8 * 1024 * 1024), { compressionLevel: 19 });
    expect(frame.length).toBeLessThan(1024);
    const bomb = Buffer.from(frame);
    // Frame header: magic (4), descriptor (1): size flag 3 = 8-byte content size after the window byte if any.
    const fhd = bomb[4]!;
    const single = (fhd >> 5) & 1;
    const fcsFlag = fhd >> 6;
    expect(fcsFlag).toBe(2); // 4-byte size for 8 MB
    bomb.writeUInt32LE(0xffffffff, 5 + (single ? 0 : 1));
    const rss = process.memoryUsage().rss;
    expect(() => decompressFrame(bomb)).toThrow(/declares 4294967295 bytes decompressed, over the 268435456-byte limit \(refused before decompressing\)/);
    expect(process.memoryUsage().rss - rss).toBeLessThan(64 * 1024 * 1024);
    expect(() => decompressFrame(frame, 1024 * 1024)).toThrow(/over the 1048576-byte limit/);
    // Through openSegment too: refused as corrupt, with the hash right.
    expect(() => openSegment(bomb, sha(bomb))).toThrow(CorruptSegmentError);
    // A frame that declares less than it holds: zstd stops at the declared size.
    const liar = Buffer.from(frame);
    liar.writeUInt32LE(1000, 5 + (single ? 0 : 1));
    expect(() => decompressFrame(liar)).toThrow(/not a valid zstd frame: Destination buffer is too small/);
    const twoFrames = Buffer.concat([compress(Buffer.from("a")), frame]);
    expect(() => decompressFrame(twoFrames)).toThrow(/bytes after the zstd frame/);
  });
});

describe("trust list", () => {
  it("forgery, rollback, strangers and mixed setups are refused with a message that says what to do", async () => {
    const c = await cluster(["n1"]);
    const dir = mkdtempSync(join(root, "node-"));
    const keyFile = join(dir, "node.key");
    const trustCache = join(dir, "trust.json");
    writeKeyFile(keyFile, c.keys.n1!);
    const s = await secureStore(c.inner, { keyFile, trustCache });
    expect(s).toBeInstanceOf(SecureStore);
    const version = (s as SecureStore).vault.trust.version;

    // Another operator's list put in the store is not this cluster's.
    const other = newKeyFile(OPERATOR);
    const otherStore = openStore(join(root, `store-${++dirs}`));
    await initCluster(otherStore, other);
    const forged = (await newestTrustList(otherStore, other.sign.public))!.bytes;
    await c.inner.put(`cluster/trust/${String(version + 1).padStart(10, "0")}.json`, forged);
    await expect((s as SecureStore).vault.refresh(c.inner)).rejects.toThrow(/not signed by this cluster's operator key/);
    await c.inner.delete(`cluster/trust/${String(version + 1).padStart(10, "0")}.json`);

    // Rollback: the newest list deleted from the store; the node keeps the newer one it cached.
    await rotateKey(c.inner, c.op);
    const again = await secureStore(c.inner, { keyFile, trustCache });
    expect((again as SecureStore).vault.trust.currentKey).toBe(2);
    for await (const o of listAll(c.inner, "cluster/trust/")) if (o.key.endsWith(`${String(version + 1).padStart(10, "0")}.json`)) await c.inner.delete(o.key);
    const rolledBack = await secureStore(c.inner, { keyFile, trustCache });
    expect((rolledBack as SecureStore).vault.trust.currentKey).toBe(2);

    // A stranger's key file, a plain node on the secured store, a keyed node on a plain store.
    const stranger = join(dir, "stranger.key");
    writeKeyFile(stranger, newKeyFile("n9", c.op.sign.public));
    await expect(secureStore(c.inner, { keyFile: stranger })).rejects.toThrow(/node "n9" \(this key file\) is not a member .* unisync keys add/);
    await expect(secureStore(c.inner, { keyFile: join(dir, "none.key") })).rejects.toThrow(/holds a secured cluster .* this node has no key file/);
    const plainStore = openStore(join(root, `store-${++dirs}`));
    await expect(secureStore(plainStore, { keyFile })).rejects.toThrow(/has a key file .* is not a secured cluster/);
    await expect(initCluster(c.inner, c.op)).rejects.toThrow(KeyConfigError);
    const used = openStore(join(root, `store-${++dirs}`));
    await used.put(segmentKey("old", "app.db", 1, "a".repeat(64)), Buffer.from("x"));
    await expect(initCluster(used, c.op)).rejects.toThrow(/already holds a plain log \(origins old\)/);
  });
});

describe("what the bucket shows", () => {
  it("blob names are HMACs, contents and heartbeats are sealed, and a heartbeat signed by another member is refused", async () => {
    const c = await cluster(["n1", "n2"]);
    const n1 = await c.storeOf("n1");
    const n2 = await c.storeOf("n2");
    const file = join(root, "big.txt");
    const content = Buffer.from("the password is hunter2\n".repeat(200_000));
    writeFileSync(file, content);
    await putBlobFromFile(n1, file, sha(content), content.length);
    const small = Buffer.from("small secret file");
    await n1.put(blobKey(sha(small)), small);
    const names = [];
    for await (const o of listAll(c.inner, "blobs/")) names.push(o.key);
    expect(names).toHaveLength(2);
    expect(names).not.toContain(blobKey(sha(content)));
    expect(names).toContain(storedName(n1, blobKey(sha(content))));
    const out = join(root, "big.out");
    await fetchBlobToFile(n2, sha(content), content.length, out);
    expect(readFileSync(out).equals(content)).toBe(true);
    expect((await fetchBlob(n2, sha(small), small.length)).equals(small)).toBe(true);

    await n1.put("nodes/n1.json", Buffer.from(JSON.stringify({ node: "n1", cursors: { secretdb: 5 } })));
    expect(JSON.parse((await n2.get("nodes/n1.json"))!.toString()).node).toBe("n1");
    // n2 writes n1's heartbeat (to make gc think n1 has caught up): refused.
    await n2.put("nodes/n1.json", Buffer.from("{}"));
    await expect(n1.get("nodes/n1.json")).rejects.toThrow(/signed by "n2", not by that node/);
    // A blob replaced by other bytes of the same cluster fails its content hash.
    await c.inner.put(storedName(n1, blobKey(sha(small))), (await c.inner.get(storedName(n1, blobKey(sha(content)))))!);
    await expect(fetchBlob(n2, sha(small), small.length)).rejects.toThrow(/blob/);

    const everything: Buffer[] = [];
    const walk = (d: string): void => {
      for (const e of readdirSync(d, { withFileTypes: true })) (e.isDirectory() ? walk(join(d, e.name)) : everything.push(readFileSync(join(d, e.name))));
    };
    walk((c.inner as unknown as { root: string }).root ?? "");
    for (const b of everything) {
      expect(b.includes(Buffer.from("hunter2"))).toBe(false);
      expect(b.includes(Buffer.from("secretdb"))).toBe(false);
      expect(b.includes(Buffer.from(sha(content)))).toBe(false);
    }
  });
});

describe("status server off loopback", () => {
  it("needs a token: the config refuses none, the server answers 401 without it", async () => {
    expect(() => loadConfig({ instanceDir: root, store: "file:///x", node: "a", httpHost: "0.0.0.0" }, undefined, {})).toThrow(/"httpToken" must be at least 16 characters/);
    const token = "0123456789abcdef-token";
    const status = { node: "n1", store: "x", origins: [], databases: [], notSynced: {}, storeRequests: { perSecond: {}, total: {}, conditionalWrites: "unknown" }, tailing: { pollIntervalMs: 1 } } as unknown as AgentStatus;
    const backend = { status: () => status } as unknown as ConsoleBackend;
    const { server, url } = await startStatusServer("127.0.0.1", 0, backend, new Metrics(), token);
    try {
      expect((await get(`${url}metrics`)).code).toBe(401);
      expect((await get(`${url}status.json?token=wrong`)).code).toBe(401);
      expect((await get(`${url}status.json?token=${token}`)).code).toBe(200);
      expect((await get(`${url}metrics`, { authorization: `Bearer ${token}` })).code).toBe(200);
    } finally {
      server.close();
    }
  });
});

function* pieces(b: Buffer, n: number): Generator<Buffer> {
  for (let i = 0; i < b.length; i += n) yield b.subarray(i, i + n);
}

function sink(into: Buffer[]): Writable {
  return new Writable({
    write(c: Buffer, _e, done) {
      into.push(c);
      done();
    },
  });
}

function get(url: string, headers: Record<string, string> = {}): Promise<{ code: number }> {
  return new Promise((resolve, reject) => {
    request(url, { headers }, (res) => {
      res.resume();
      resolve({ code: res.statusCode ?? 0 });
    })
      .on("error", reject)
      .end();
  });
}
