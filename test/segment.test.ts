import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { CorruptSegmentError, openSegment, sealSegment, type Segment } from "../src/log/segment.js";
import { sameValue } from "../src/log/value.js";
import { mulberry32, randomValue } from "./helpers/random.js";

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

describe("segment codec", () => {
  it("round-trips every storage class bit-exactly", () => {
    const seed = Number(process.env.SEED ?? Date.now() % 100000);
    const rand = mulberry32(seed);
    const values = Array.from({ length: 2000 }, () => randomValue(rand));
    const seg: Segment = {
      origin: "n1",
      stream: "app.db",
      seq: 7,
      createdMs: 1,
      records: [{ hlc: 2 ** 52 + 3, row: { table: "t", op: 1, columns: values.map((_, i) => `c${i}`), values, key: ["c0"], changed: [] } }],
    };
    const { bytes, sha256 } = sealSegment(seg);
    const back = openSegment(bytes, sha256);
    expect(back.seq).toBe(7);
    expect(back.records[0].hlc).toBe(2 ** 52 + 3);
    const got = back.records[0].row?.values ?? [];
    values.forEach((v, i) => {
      if (!sameValue(v, got[i])) throw new Error(`seed ${seed}: value ${i} ${String(v)} came back as ${String(got[i])}`);
    });
  });

  it("refuses wrong hash, truncation, garbage and unknown versions", () => {
    const { bytes } = sealSegment({ origin: "a", stream: "s", seq: 1, createdMs: 0, records: [{ hlc: 5, row: { table: "t", op: 1, columns: ["a"], values: [1n], key: ["a"], changed: [] } }] });
    expect(() => openSegment(bytes, "0".repeat(64))).toThrow(CorruptSegmentError);
    const cut = bytes.subarray(0, bytes.length - 3);
    expect(() => openSegment(cut, sha(cut))).toThrow(CorruptSegmentError);
    const junk = Buffer.from("definitely not zstd");
    expect(() => openSegment(junk, sha(junk))).toThrow(/zstd/);
  });
});
