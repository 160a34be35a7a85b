/**
 * SQLite values as unisync holds them in memory. Integers are always bigint
 * (better-sqlite3 with safeIntegers) so that ±2^63 survive; numbers are REAL.
 */
export type SqlValue = null | bigint | number | string | Buffer;

export const enum TypeTag {
  Null = 0,
  Integer = 1,
  Real = 2,
  Text = 3,
  Blob = 4,
}

export function typeTag(v: SqlValue): TypeTag {
  if (v === null) return TypeTag.Null;
  if (typeof v === "bigint") return TypeTag.Integer;
  if (typeof v === "number") return TypeTag.Real;
  if (typeof v === "string") return TypeTag.Text;
  return TypeTag.Blob;
}

/**
 * The identity of a row: canonical bytes of its key values, equal on every node
 * exactly when SQLite would call the keys equal. In a declared key 1 and 1.0 are
 * the same key, as are 0.0 and -0.0; in a table without a key the storage class
 * counts (the copies are matched with typeof), but SQL cannot tell -0.0 from 0.0.
 */
export function rowIdentity(values: readonly SqlValue[], classesDiffer: boolean): Buffer {
  return encodeValues(
    values.map((v) => {
      if (typeof v !== "number") return v;
      if (v === 0) return classesDiffer ? 0 : 0n;
      if (!classesDiffer && Number.isInteger(v) && v >= -(2 ** 63) && v < 2 ** 63) return BigInt(v);
      return v;
    }),
  );
}

/** Exact bytes of a tuple of values (storage classes and bits kept). */
export function encodeValues(values: readonly SqlValue[]): Buffer {
  const parts: Buffer[] = [];
  for (const v of values) {
    const tag = typeTag(v);
    let body: Buffer;
    switch (tag) {
      case TypeTag.Null:
        body = Buffer.alloc(0);
        break;
      case TypeTag.Integer:
        body = Buffer.alloc(8);
        body.writeBigInt64BE(v as bigint);
        break;
      case TypeTag.Real:
        body = Buffer.alloc(8);
        body.writeDoubleBE(v as number);
        break;
      case TypeTag.Text:
        body = Buffer.from(v as string, "utf8");
        break;
      default:
        body = v as Buffer;
    }
    const head = Buffer.alloc(5);
    head.writeUInt8(tag, 0);
    head.writeUInt32BE(body.length, 1);
    parts.push(head, body);
  }
  return Buffer.concat(parts);
}

export function decodeValues(bytes: Buffer): SqlValue[] {
  const out: SqlValue[] = [];
  let at = 0;
  while (at < bytes.length) {
    const tag = bytes.readUInt8(at) as TypeTag;
    const len = bytes.readUInt32BE(at + 1);
    const body = bytes.subarray(at + 5, at + 5 + len);
    at += 5 + len;
    switch (tag) {
      case TypeTag.Null: out.push(null); break;
      case TypeTag.Integer: out.push(body.readBigInt64BE(0)); break;
      case TypeTag.Real: out.push(body.readDoubleBE(0)); break;
      case TypeTag.Text: out.push(body.toString("utf8")); break;
      default: out.push(Buffer.from(body));
    }
  }
  return out;
}

/** Exact equality of two values, storage class included (1 and 1.0 differ). */
export function sameValue(a: SqlValue, b: SqlValue): boolean {
  if (a === null || b === null) return a === b;
  if (typeof a !== typeof b) return false;
  if (Buffer.isBuffer(a)) return Buffer.isBuffer(b) && a.equals(b);
  if (typeof a === "number") return Object.is(a, b); // bit-exact: 0 and -0 differ
  return a === b;
}

/** A short human rendering for logs and the audit view. */
export function showValue(v: SqlValue): string {
  if (v === null) return "NULL";
  if (typeof v === "bigint") return v.toString();
  if (typeof v === "number") return Number.isInteger(v) ? v.toFixed(1) : String(v);
  if (typeof v === "string") return JSON.stringify(v);
  return `x'${v.toString("hex")}'`;
}
