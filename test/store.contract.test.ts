/**
 * The ObjectStore contract, run against every backend. Each test works under
 * its own key namespace so one store instance serves the whole suite.
 */
import { createCipheriv, createHash, randomBytes } from "node:crypto";
import { mkdtemp, readdir, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { Readable } from "node:stream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FileStore } from "../src/store/file.js";
import { S3Store } from "../src/store/s3.js";
import { listAll, probeConditionalWrites, StoreConfigError, StoreUnavailableError, type ObjectStore } from "../src/store/store.js";
import { freePort, MOTO_ENV, startMoto, type MotoHandle } from "./helpers/moto.js";
import { openStore } from "../src/store/url.js";
import { S3RVER_ENV, s3StoreUrl, startS3rver } from "./helpers/s3rver.js";

const MiB = 1024 * 1024;

/** Bytewise (UTF-8) order, the order every listing must use. */
function bytewise(keys: string[]): string[] {
  return [...keys].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
}

async function drain(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

/** A deterministic pseudo-random stream of `total` bytes (AES-CTR keystream) and the sha256 it will have. */
function pseudoRandomStream(total: number, seed: string): { stream: Readable; sha256: string } {
  const key = createHash("sha256").update(seed).digest().subarray(0, 16);
  const blocks = function* (): Generator<Buffer> {
    const cipher = createCipheriv("aes-128-ctr", key, Buffer.alloc(16));
    const zeros = Buffer.alloc(64 * 1024);
    for (let left = total; left > 0; left -= zeros.length) yield cipher.update(zeros.subarray(0, Math.min(left, zeros.length)));
  };
  const hash = createHash("sha256");
  for (const b of blocks()) hash.update(b);
  return { stream: Readable.from(blocks()), sha256: hash.digest("hex") };
}

function sha256(buf: Buffer): string {
  return createHash("sha256").update(buf).digest("hex");
}


export interface ContractOptions {
  /** The server filters startAfter in UTF-16 order rather than UTF-8 byte order (s3rver). */
  utf16StartAfter?: boolean;
  /** The server ignores If-None-Match (s3rver): putIfAbsent overwrites, and the probe must say so. */
  ignoresConditionalWrites?: boolean;
}

export function storeContract(name: string, makeStore: () => Promise<ObjectStore>, options: ContractOptions = {}): void {
  describe(`ObjectStore contract: ${name}`, () => {
    let store: ObjectStore;
    let n = 0;
    // A fresh namespace per test keeps tests independent on a shared store.
    const ns = () => `t${n++}-${randomBytes(3).toString("hex")}/`;

    beforeAll(async () => {
      store = await makeStore();
    });

    it("round-trips buffers, including empty and binary ones", async () => {
      const p = ns();
      const binary = randomBytes(70_000);
      await store.put(`${p}text`, Buffer.from("hello"));
      await store.put(`${p}empty`, Buffer.alloc(0));
      await store.put(`${p}bin/all-bytes`, binary);
      expect((await store.get(`${p}text`))?.toString()).toBe("hello");
      expect((await store.get(`${p}empty`))?.length).toBe(0);
      expect((await store.get(`${p}bin/all-bytes`))?.equals(binary)).toBe(true);
      expect(await store.head(`${p}bin/all-bytes`)).toEqual({ key: `${p}bin/all-bytes`, size: binary.length });
      expect(await store.head(`${p}empty`)).toEqual({ key: `${p}empty`, size: 0 });
      const s = await store.getStream(`${p}bin/all-bytes`);
      expect(s).not.toBeNull();
      expect((await drain(s!)).equals(binary)).toBe(true);
    });

    it("returns null for missing keys", async () => {
      const p = ns();
      expect(await store.get(`${p}nope`)).toBeNull();
      expect(await store.head(`${p}nope`)).toBeNull();
      expect(await store.getStream(`${p}nope`)).toBeNull();
      expect(await store.get(`${p}deeper/still/nope`)).toBeNull();
    });

    it("overwrites", async () => {
      const p = ns();
      await store.put(`${p}k`, Buffer.from("first version"));
      await store.put(`${p}k`, Buffer.from("v2"));
      expect((await store.get(`${p}k`))?.toString()).toBe("v2");
      expect((await store.head(`${p}k`))?.size).toBe(2);
    });

    it(options.ignoresConditionalWrites ? "says that it ignores If-None-Match" : "never overwrites on putIfAbsent", async () => {
      const p = ns();
      expect(await store.putIfAbsent(`${p}claim`, Buffer.from("first"))).toBe("created");
      const second = await store.putIfAbsent(`${p}claim`, Buffer.from("second"));
      if (options.ignoresConditionalWrites) {
        expect(second).toBe("created");
        expect(await probeConditionalWrites(store, `${p}probe`)).toBe(false);
        return;
      }
      expect(second).toBe("exists");
      expect((await store.get(`${p}claim`))?.toString()).toBe("first");
      // Racing writers: exactly one wins, and its body is the one stored.
      const bodies = Array.from({ length: 6 }, (_, i) => Buffer.from(`racer ${i}`));
      const results = await Promise.all(bodies.map((b) => store.putIfAbsent(`${p}race`, b).catch(() => "error")));
      expect(results.filter((r) => r === "created")).toHaveLength(1);
      expect((await store.get(`${p}race`))?.toString()).toBe(`racer ${results.indexOf("created")}`);
      expect(await probeConditionalWrites(store, `${p}probe`)).toBe(true);
      expect(await store.head(`${p}probe`)).toBeNull();
      expect((await store.list(p)).objects.map((o) => o.key).filter((k) => !k.includes("/.tmp"))).toEqual([`${p}claim`, `${p}race`]);
    });

    it("counts its requests by kind", async () => {
      const p = ns();
      const before = store.requests.snapshot();
      await store.put(`${p}a`, Buffer.from("x"));
      await store.get(`${p}a`);
      await store.head(`${p}a`);
      await store.list(p);
      await store.delete(`${p}a`);
      const after = store.requests.snapshot();
      for (const kind of ["PUT", "GET", "HEAD", "LIST", "DELETE"] as const) expect(after[kind] - before[kind], kind).toBe(1);
    });

    it("streams a ~20 MB body in and out", async () => {
      const p = ns();
      const size = 20 * MiB + 12345;
      const { stream, sha256: expected } = pseudoRandomStream(size, p);
      await store.put(`${p}big`, stream);
      expect((await store.head(`${p}big`))?.size).toBe(size);
      const out = await store.getStream(`${p}big`);
      const hash = createHash("sha256");
      for await (const chunk of out!) hash.update(chunk as Buffer);
      expect(hash.digest("hex")).toBe(expected);
      expect(sha256((await store.get(`${p}big`))!)).toBe(expected);
    });

    it("accepts small streams, with and without a size", async () => {
      const p = ns();
      await store.put(`${p}s1`, Readable.from([Buffer.from("ab"), Buffer.from("cd")]), 4);
      await store.put(`${p}s2`, Readable.from([]));
      expect((await store.get(`${p}s1`))?.toString()).toBe("abcd");
      expect((await store.get(`${p}s2`))?.length).toBe(0);
      await expect(store.put(`${p}s3`, Readable.from([Buffer.from("abc")]), 5)).rejects.toThrow(/expected 5 bytes/);
      expect(await store.get(`${p}s3`)).toBeNull();
    });

    it("leaves no object behind when the body stream fails", async () => {
      const p = ns();
      const failing = (bytes: number) =>
        Readable.from(
          (async function* () {
            for (let sent = 0; sent < bytes; sent += MiB) yield Buffer.alloc(MiB, 7);
            throw new Error("source broke");
          })(),
        );
      await expect(store.put(`${p}small`, failing(1))).rejects.toThrow(/source broke/);
      // Fails after S3 stores have started a multipart upload (two 8 MiB parts read).
      await expect(store.put(`${p}large`, failing(20))).rejects.toThrow(/source broke/);
      expect(await store.head(`${p}small`)).toBeNull();
      expect(await store.head(`${p}large`)).toBeNull();
      expect((await store.list(p)).objects).toEqual([]);
    });

    describe("list", () => {
      // Bytewise order differs from a naive directory walk: "a/..." sorts between "a-b" and "a0".
      const names = ["a/b", "a-b", "a/c", "a0", "a/d/e", "a.x", "b", "z", "ü"];
      let p: string;
      let keys: string[];

      beforeAll(async () => {
        p = ns();
        keys = bytewise(names.map((k) => p + k));
        await Promise.all(keys.map((k) => store.put(k, Buffer.from(k))));
      });

      it("lists in bytewise order with sizes", async () => {
        const page = await store.list(p);
        expect(page.objects.map((o) => o.key)).toEqual(keys);
        expect(page.objects.every((o) => o.size === Buffer.byteLength(o.key))).toBe(true);
        expect(page.prefixes).toEqual([]);
        expect(page.next).toBeUndefined();
      });

      it("honours prefixes that are not directory boundaries", async () => {
        const under = async (prefix: string) => (await store.list(p + prefix)).objects.map((o) => o.key.slice(p.length));
        expect(await under("a")).toEqual(["a-b", "a.x", "a/b", "a/c", "a/d/e", "a0"]);
        expect(await under("a/")).toEqual(["a/b", "a/c", "a/d/e"]);
        expect(await under("a/d")).toEqual(["a/d/e"]);
        expect(await under("a/b")).toEqual(["a/b"]);
        expect(await under("nothing")).toEqual([]);
        expect((await store.list(`${p}a-`)).objects.map((o) => o.key)).toEqual([`${p}a-b`]);
      });

      it("honours startAfter", async () => {
        const after = async (startAfter: string) =>
          (await store.list(p, { startAfter })).objects.map((o) => o.key.slice(p.length));
        expect(await after(`${p}a/b`)).toEqual(bytewise(names).slice(bytewise(names).indexOf("a/b") + 1));
        expect(await after(`${p}a/`)).toEqual(["a/b", "a/c", "a/d/e", "a0", "b", "z", "ü"]);
        expect(await after(`${p}a-a`)).toEqual(["a-b", "a.x", "a/b", "a/c", "a/d/e", "a0", "b", "z", "ü"]);
        expect(await after(`${p}z`)).toEqual(["ü"]);
        // startAfter before the prefix lists everything under it.
        expect((await store.list(`${p}a/`, { startAfter: "" })).objects).toHaveLength(3);
        expect((await store.list(`${p}a/`, { startAfter: p })).objects).toHaveLength(3);
      });

      it("rolls up common prefixes with a '/' delimiter", async () => {
        const top = await store.list(p, { delimiter: "/" });
        expect(top.objects.map((o) => o.key.slice(p.length))).toEqual(["a-b", "a.x", "a0", "b", "z", "ü"]);
        expect(top.prefixes).toEqual([`${p}a/`]);
        const inA = await store.list(`${p}a/`, { delimiter: "/" });
        expect(inA.objects.map((o) => o.key)).toEqual([`${p}a/b`, `${p}a/c`]);
        expect(inA.prefixes).toEqual([`${p}a/d/`]);
        const partial = await store.list(`${p}a`, { delimiter: "/" });
        expect(partial.objects.map((o) => o.key.slice(p.length))).toEqual(["a-b", "a.x", "a0"]);
        expect(partial.prefixes).toEqual([`${p}a/`]);
      });

      it("paginates through objects and prefixes alike", async () => {
        const seen: string[] = [];
        let startAfter: string | undefined;
        for (let pages = 0; pages < 50; pages++) {
          const page = await store.list(p, { delimiter: "/", limit: 2, startAfter });
          const entries = bytewise([...page.objects.map((o) => o.key), ...page.prefixes]);
          expect(entries.length).toBeGreaterThan(0);
          expect(entries.length).toBeLessThanOrEqual(2);
          seen.push(...entries);
          if (!page.next) break;
          expect(page.next).toBe(entries[entries.length - 1]);
          startAfter = page.next;
        }
        // Pages ascend without repeats: the concatenation is already sorted.
        expect(seen).toEqual(bytewise([...names.filter((k) => !k.startsWith("a/")), "a/"].map((k) => p + k)));
      });
    });

    // JS compares UTF-16 code units, so "😀" < "\uFFFD" there but not in UTF-8 byte order.
    it("orders astral characters bytewise", async () => {
      const p = ns();
      const names = ["\uFFFD", "😀", "\uE000", "~"];
      await Promise.all(names.map((k) => store.put(p + k, Buffer.from(k))));
      const keys = (await store.list(p)).objects.map((o) => o.key.slice(p.length));
      expect(keys).toEqual(["~", "\uE000", "\uFFFD", "😀"]);
      if (options.utf16StartAfter) return;
      const after = await store.list(p, { startAfter: `${p}\uFFFD` });
      expect(after.objects.map((o) => o.key.slice(p.length))).toEqual(["😀"]);
    });

    it("paginates ~2,500 keys with limit and next", async () => {
      const p = ns();
      const count = 2_500;
      const keys = Array.from({ length: count }, (_, i) => `${p}seg/${String(i).padStart(6, "0")}`);
      for (let i = 0; i < count; i += 100) {
        await Promise.all(keys.slice(i, i + 100).map((k) => store.put(k, Buffer.from("x"))));
      }
      const sizes: number[] = [];
      const all: string[] = [];
      let startAfter: string | undefined;
      for (;;) {
        const page = await store.list(`${p}seg/`, { limit: 1000, startAfter });
        sizes.push(page.objects.length);
        all.push(...page.objects.map((o) => o.key));
        if (!page.next) break;
        expect(page.next).toBe(page.objects[page.objects.length - 1]!.key);
        startAfter = page.next;
      }
      expect(sizes).toEqual([1000, 1000, 500]);
      expect(all).toEqual(keys);
      // The default limit is 1000 too, and listAll walks every page.
      expect((await store.list(`${p}seg/`)).objects).toHaveLength(1000);
      let total = 0;
      for await (const o of listAll(store, `${p}seg/`, keys[99])) {
        expect(o.key).toBe(keys[100 + total]);
        total++;
      }
      expect(total).toBe(count - 100);
      // Small pages from the middle.
      const page = await store.list(`${p}seg/`, { limit: 3, startAfter: keys[1234] });
      expect(page.objects.map((o) => o.key)).toEqual(keys.slice(1235, 1238));
      expect(page.next).toBe(keys[1237]);
    });

    it("deletes, and deleting a missing key is fine", async () => {
      const p = ns();
      await store.put(`${p}d/one`, Buffer.from("1"));
      await store.put(`${p}keep`, Buffer.from("2"));
      await store.delete(`${p}d/one`);
      expect(await store.get(`${p}d/one`)).toBeNull();
      expect(await store.head(`${p}d/one`)).toBeNull();
      await store.delete(`${p}d/one`);
      await store.delete(`${p}never/existed`);
      const page = await store.list(p, { delimiter: "/" });
      expect(page.objects.map((o) => o.key)).toEqual([`${p}keep`]);
      expect(page.prefixes).toEqual([]);
    });

    it("rejects invalid keys", async () => {
      for (const key of ["", "/abs", "a/../b", "..", "./a", "a\\b", "a\0b", "a//b", "a/", ".tmp-x"]) {
        await expect(store.put(key, Buffer.from("x")), JSON.stringify(key)).rejects.toThrow(/invalid object key/);
        await expect(store.get(key), JSON.stringify(key)).rejects.toThrow(/invalid object key/);
      }
    });
  });
}

// ---------------------------------------------------------------------------

let fileRoot: string;
beforeAll(async () => {
  fileRoot = await mkdtemp(path.join(tmpdir(), "filestore-"));
});
afterAll(async () => {
  await rm(fileRoot, { recursive: true, force: true });
});

storeContract("FileStore", async () => new FileStore(fileRoot));

describe("FileStore specifics", () => {
  let root: string;
  let store: FileStore;
  beforeAll(async () => {
    root = await mkdtemp(path.join(tmpdir(), "filestore-x-"));
    store = new FileStore(root);
  });
  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it("never lists temp files and never exposes a failed put", async () => {
    await store.put("log/o/s/0001", Buffer.from("x"));
    await writeFile(path.join(root, "log/o/s/.tmp-leftover"), "partial");
    const failing = Readable.from(
      (async function* () {
        yield Buffer.alloc(1000);
        throw new Error("source broke");
      })(),
    );
    await expect(store.put("log/o/s/0002", failing)).rejects.toThrow(/source broke/);
    expect(await store.get("log/o/s/0002")).toBeNull();
    expect((await store.list("log/")).objects.map((o) => o.key)).toEqual(["log/o/s/0001"]);
    const names = await readdir(path.join(root, "log/o/s"));
    expect(names.sort()).toEqual([".tmp-leftover", "0001"]);
  });

  it("tidies empty parent directories on delete", async () => {
    await store.put("tidy/a/b/c", Buffer.from("x"));
    await store.put("tidy/keep", Buffer.from("x"));
    await store.delete("tidy/a/b/c");
    await expect(stat(path.join(root, "tidy/a"))).rejects.toThrow();
    expect((await stat(path.join(root, "tidy"))).isDirectory()).toBe(true);
    expect((await stat(root)).isDirectory()).toBe(true);
  });

  it("does not report directories holding only temp files as prefixes", async () => {
    await store.put("pre/x/1", Buffer.from("x"));
    await store.delete("pre/x/1");
    await store.put("pre/y", Buffer.from("y"));
    const { mkdir } = await import("node:fs/promises");
    await mkdir(path.join(root, "pre/empty/deeper"), { recursive: true });
    await writeFile(path.join(root, "pre/empty/.tmp-123"), "");
    const page = await store.list("pre/", { delimiter: "/" });
    expect(page.prefixes).toEqual([]);
    expect(page.objects.map((o) => o.key)).toEqual(["pre/y"]);
  });

  it("explains a key whose parent is an object", async () => {
    await store.put("clash", Buffer.from("x"));
    await expect(store.put("clash/child", Buffer.from("y"))).rejects.toThrow(/parent segment/);
  });

  it("never lists outside the root for odd prefixes", async () => {
    const inner = new FileStore(path.join(root, "inner"));
    await inner.put("k", Buffer.from("x"));
    for (const prefix of ["../", "./", "/", "..", "inner//", "../inner/"]) {
      expect((await inner.list(prefix)).objects, prefix).toEqual([]);
    }
    expect((await inner.list("")).objects).toMatchObject([{ key: "k", size: 1 }]);
  });

  it("lists an empty or missing root as empty", async () => {
    const missing = new FileStore(path.join(root, "does-not-exist"));
    expect(await missing.list("")).toEqual({ objects: [], prefixes: [] });
  });
});

// ---------------------------------------------------------------------------

describe("S3Store against s3rver", () => {
  let server: Awaited<ReturnType<typeof startS3rver>>;
  beforeAll(async () => {
    server = await startS3rver();
  });
  afterAll(async () => {
    await server?.stop();
  });

  storeContract("S3Store (s3rver)", async () => openStore(s3StoreUrl(server.endpoint, server.bucket, "contract"), { ...S3RVER_ENV }), {
    utf16StartAfter: true,
    ignoresConditionalWrites: true,
  });

  it("keeps keys under its prefix and strips it from listings", async () => {
    const a = openStore(s3StoreUrl(server.endpoint, server.bucket, "iso/a"), { ...S3RVER_ENV });
    const b = openStore(s3StoreUrl(server.endpoint, server.bucket, "iso/b/"), { ...S3RVER_ENV });
    await a.put("k/1", Buffer.from("a"));
    await b.put("k/1", Buffer.from("b"));
    expect((await a.get("k/1"))?.toString()).toBe("a");
    expect((await a.list("")).objects).toMatchObject([{ key: "k/1", size: 1 }]);
    expect((await b.list("k/")).objects).toMatchObject([{ key: "k/1", size: 1 }]);
    expect(a.description).toBe(`s3://${server.bucket}/iso/a/ (${server.endpoint})`);
  });

  it("maps a missing bucket and bad credentials to StoreConfigError", async () => {
    const noBucket = openStore(s3StoreUrl(server.endpoint, "no-such-bucket"), { ...S3RVER_ENV });
    await expect(noBucket.put("k", Buffer.from("x"))).rejects.toThrow(StoreConfigError);
    await expect(noBucket.list("")).rejects.toThrow(/does not exist/);
    const badKey = new S3Store({
      bucket: server.bucket,
      endpoint: server.endpoint,
      forcePathStyle: true,
      credentials: { accessKeyId: "WRONG", secretAccessKey: "very-secret-value" },
    });
    const err = await badKey.get("k").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StoreConfigError);
    expect((err as Error).message).toMatch(/InvalidAccessKeyId/);
    expect((err as Error).message).not.toContain("very-secret-value");
    // (s3rver does not verify SigV4 signatures, so a wrong secret cannot be tested here.)
  });

  it("reports an unreachable endpoint as StoreUnavailableError quickly", async () => {
    const endpoint = `http://127.0.0.1:${await freePort()}`;
    const store = openStore(s3StoreUrl(endpoint, "bucket", "p"), { ...S3RVER_ENV }, { maxAttempts: 2 });
    const started = Date.now();
    const err = await store.put("k", Buffer.from("x")).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StoreUnavailableError);
    expect((err as Error).message).toContain(endpoint);
    expect((err as Error).message).toMatch(/put/);
    expect((err as Error).message).not.toContain(S3RVER_ENV.AWS_SECRET_ACCESS_KEY + "@");
    await expect(store.get("k")).rejects.toThrow(StoreUnavailableError);
    await expect(store.list("")).rejects.toThrow(StoreUnavailableError);
    expect(Date.now() - started).toBeLessThan(5_000);
  });
});

// moto's S3 server, unpatched: correct delimiter listings and enforced If-None-Match, like MinIO and AWS.
describe("S3Store against moto", () => {
  let moto: MotoHandle | undefined;
  beforeAll(async () => {
    moto = await startMoto();
  });
  afterAll(async () => {
    await moto?.stop();
  });
  storeContract("S3Store (moto)", async () => openStore(s3StoreUrl(moto!.endpoint, moto!.bucket, "contract"), { ...MOTO_ENV }));
});

describe("openStore rejects bad URLs", () => {
  const cases: [string, RegExp][] = [
    ["ftp://host/dir", /unsupported scheme "ftp:".*accepted forms/],
    ["s3://AKIA:secret@bucket/prefix", /credentials must not be embedded.*AWS_ACCESS_KEY_ID/],
    ["s3://", /not a valid bucket name/],
    ["s3://bucket/p?endpoint=not a url", /endpoint .* is not a URL/],
    ["s3://bucket/p?secret_key=abc", /looks like a credential/],
    ["s3://bucket/p?regoin=eu", /unknown parameter "regoin"/],
    ["s3://bucket/p?path_style=maybe", /path_style must be true or false/],
    ["", /empty/],
  ];
  for (const [url, message] of cases) {
    it(JSON.stringify(url), () => {
      let caught: unknown;
      try {
        openStore(url, {});
      } catch (err) {
        caught = err;
      }
      expect(caught).toBeInstanceOf(StoreConfigError);
      expect((caught as Error).message).toMatch(message);
      expect((caught as Error).message).not.toContain("secret@");
    });
  }
});
