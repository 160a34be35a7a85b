/** Seeded randomness for property tests: print the seed, rerun with SEED=... */
import type { SqlValue } from "../../src/log/value.js";

export function mulberry32(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const EDGES: SqlValue[] = [
  null, 0n, -1n, 1n, -(2n ** 63n), 2n ** 63n - 1n, 2n ** 53n + 1n,
  0.1 + 0.2, -0, 0, 5e-324, 1.7976931348623157e308, -1e-300,
  "", "😀", "a\u0000b", "e\u0301", "中文", "line\nbreak 'quote\"", Buffer.alloc(0),
];

/**
 * A random value of any storage class, edges included. `signedZero: false`
 * turns -0.0 into 0.0, for places where SQL cannot tell them apart (=, IS,
 * printf, quote all agree): copies of a row in a table without a key.
 */
export function randomValue(rand: () => number, signedZero = true): SqlValue {
  const v = anyValue(rand);
  return !signedZero && typeof v === "number" && v === 0 ? 0 : v;
}

function anyValue(rand: () => number): SqlValue {
  const k = Math.floor(rand() * 6);
  if (k === 0) return EDGES[Math.floor(rand() * EDGES.length)];
  if (k === 1) return BigInt.asIntN(64, (BigInt(Math.floor(rand() * 2 ** 32)) << 32n) | BigInt(Math.floor(rand() * 2 ** 32)));
  if (k === 2) {
    const b = Buffer.alloc(8);
    for (let i = 0; i < 8; i++) b[i] = Math.floor(rand() * 256);
    const d = b.readDoubleBE(0);
    return Number.isNaN(d) ? 1.5 : d; // SQLite stores NaN as NULL
  }
  if (k === 3) return Array.from({ length: Math.floor(rand() * 20) }, () => String.fromCodePoint(Math.floor(rand() * 0xd7ff) + 1)).join("");
  if (k === 4) return Buffer.from(Array.from({ length: Math.floor(rand() * 40) }, () => Math.floor(rand() * 256)));
  return null;
}
