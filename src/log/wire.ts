/**
 * A hand-written reader of the Segment message (proto/unisync.proto), the hot
 * path of replay: protobufjs's generated decoder plus the mapping of its
 * objects into records cost about 3.5 µs per record, most of a pull's decoding.
 * This reads the wire format straight into LogRecords. It follows the proto3
 * rules protobufjs applies: unknown fields are skipped, repeated scalars are
 * read packed or not, strings must be valid UTF-8, and any truncation or
 * malformed field throws (segment.ts turns that into a CorruptSegmentError).
 * test/segment.test.ts checks it against protobufjs on random segments.
 */
import { isUtf8 } from "node:buffer";
import type { FileChange, LogRecord, RowChange, RowOp, RowRef } from "./segment.js";
import type { SqlValue } from "./value.js";

/** Wire types. Groups (3, 4) are not used by proto3 and are refused. */
const VARINT = 0;
const FIXED64 = 1;
const BYTES = 2;
const FIXED32 = 5;

export interface WireSegmentHead {
  formatVersion: number;
  origin: string;
  stream: string;
  seq: number;
  createdMs: number;
  continues: boolean;
  records: LogRecord[];
}

class Reader {
  pos = 0;
  /** The end of the message being read; sub-messages are read in place (enter/leave). */
  end: number;
  /** The halves of the last varint64(), unsigned. */
  lo = 0;
  hi = 0;

  constructor(readonly buf: Buffer) {
    this.end = buf.length;
  }

  more(): boolean {
    return this.pos < this.end;
  }

  /** Narrows the reader to the length-delimited sub-message at pos; returns the outer end for leave(). */
  enter(): number {
    const len = this.varint();
    if (len > this.end - this.pos) throw new Error(`length ${len} runs past the end`);
    const outer = this.end;
    this.end = this.pos + len;
    return outer;
  }

  leave(outer: number): void {
    this.pos = this.end;
    this.end = outer;
  }

  /** A varint as a number: exact up to 2^53, as protobufjs's Long-to-number. */
  varint(): number {
    let result = 0;
    let mul = 1;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.end) throw new Error("truncated varint");
      const b = this.buf[this.pos++];
      result += (b & 0x7f) * mul;
      if (b < 0x80) return result;
      mul *= 128;
    }
    throw new Error("varint longer than 10 bytes");
  }

  /** A varint as its low 32 bits, unsigned (tags, uint32, enum and bool fields). */
  uint32(): number {
    if (this.pos < this.end && this.buf[this.pos] < 0x80) return this.buf[this.pos++]; // one byte: most tags
    this.varint64();
    return this.lo;
  }

  /** Reads a varint into lo and hi (its unsigned 32-bit halves). */
  varint64(): void {
    let lo = 0;
    let hi = 0;
    let shift = 0;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.end) throw new Error("truncated varint");
      const b = this.buf[this.pos++];
      const bits = b & 0x7f;
      if (shift < 28) lo |= bits << shift;
      else if (shift === 28) {
        lo |= bits << 28;
        hi |= bits >>> 4;
      } else hi |= bits << (shift - 32);
      if (b < 0x80) {
        this.lo = lo >>> 0;
        this.hi = hi >>> 0;
        return;
      }
      shift += 7;
    }
    throw new Error("varint longer than 10 bytes");
  }

  /** An int64 varint (two's complement over 10 bytes when negative) as a number. */
  int64(): number {
    this.varint64();
    if (!(this.hi & 0x80000000)) return this.hi * 2 ** 32 + this.lo;
    return Number(BigInt.asIntN(64, (BigInt(this.hi) << 32n) | BigInt(this.lo)));
  }

  /** A zigzag-encoded sint64 as a bigint (every 64-bit value exactly). */
  sint64(): bigint {
    this.varint64();
    const lo = this.lo;
    if (this.hi === 0) return BigInt(lo & 1 ? -((lo + 1) / 2) : lo / 2); // small values without BigInt arithmetic
    const n = (BigInt(this.hi) << 32n) | BigInt(lo);
    return BigInt.asIntN(64, (n >> 1n) ^ -(n & 1n));
  }

  double(): number {
    if (this.pos + 8 > this.end) throw new Error("truncated double");
    const v = this.buf.readDoubleLE(this.pos);
    this.pos += 8;
    return v;
  }

  /** Skips a length-delimited field; returns its bounds. */
  span(): [number, number] {
    const len = this.varint();
    const start = this.pos;
    if (len > this.end - start) throw new Error(`length ${len} runs past the end`);
    this.pos = start + len;
    return [start, this.pos];
  }

  /** Names seen in this segment (tables, columns, origins) by a hash of their bytes. */
  private readonly names = new Map<number, string>();
  /** The previous row's column and key lists: a row with the same ones shares them. */
  lastColumns: string[] = [];
  lastKey: string[] = [];

  /**
   * A short ASCII name, the same string object each time it recurs in the
   * segment (a column name is in every record): no new string per record.
   */
  name(): string {
    const start = this.pos;
    const len = this.varint();
    const a = this.pos;
    if (len > 64 || len > this.end - a) {
      this.pos = start;
      return this.string();
    }
    const buf = this.buf;
    let h = len;
    for (let i = a; i < a + len; i++) {
      const c = buf[i];
      if (c >= 0x80) {
        this.pos = start;
        return this.string();
      }
      h = (Math.imul(h, 31) + c) | 0;
    }
    this.pos = a + len;
    const known = this.names.get(h);
    if (known !== undefined && known.length === len) {
      let same = true;
      for (let i = 0; i < len && same; i++) same = known.charCodeAt(i) === buf[a + i];
      if (same) return known;
    }
    const s = buf.toString("latin1", a, a + len);
    this.names.set(h, s);
    return s;
  }

  string(): string {
    const [a, b] = this.span();
    const buf = this.buf;
    let i = a;
    while (i < b && buf[i] < 0x80) i++;
    if (i === b) return buf.toString("latin1", a, b); // ASCII, as names are: nothing to validate or decode
    const bytes = buf.subarray(a, b);
    if (!isUtf8(bytes)) throw new Error("invalid UTF-8 in a string field");
    return bytes.toString("utf8");
  }

  bytes(): Buffer {
    const [a, b] = this.span();
    return this.buf.subarray(a, b);
  }

  skip(wireType: number): void {
    if (wireType === VARINT) this.varint64();
    else if (wireType === FIXED64) this.advance(8);
    else if (wireType === BYTES) this.span();
    else if (wireType === FIXED32) this.advance(4);
    else throw new Error(`unsupported wire type ${wireType}`);
  }

  private advance(n: number): void {
    if (this.pos + n > this.end) throw new Error("truncated field");
    this.pos += n;
  }

  /** Repeated uint32: packed (one length-delimited run) or one varint per entry. */
  uint32s(wireType: number, into: number[]): void {
    if (wireType === BYTES) {
      const outer = this.enter();
      while (this.more()) into.push(this.uint32());
      this.leave(outer);
    } else if (wireType === VARINT) into.push(this.uint32());
    else throw new Error(`wire type ${wireType} for a repeated uint32`);
  }
}

/** `list`, or `last` when it holds the same names (so callers can cache by list). */
function same(list: string[], last: string[]): string[] {
  if (list.length !== last.length) return list;
  for (let i = 0; i < list.length; i++) if (list[i] !== last[i]) return list;
  return last;
}

function expect(wireType: number, want: number, field: string): void {
  if (wireType !== want) throw new Error(`field ${field} has wire type ${wireType}, expected ${want}`);
}

/** Value: a oneof; like the protobufjs-based reader, integer > real > text > blob > null when several are present. */
function readValue(r: Reader): SqlValue {
  const outer = r.enter();
  let integer: bigint | undefined;
  let real: number | undefined;
  let text: string | undefined;
  let blob: Buffer | undefined;
  let isNull = false;
  while (r.more()) {
    const tag = r.uint32();
    const wt = tag & 7;
    switch (tag >>> 3) {
      case 1: expect(wt, VARINT, "Value.null"); r.uint32(); isNull = true; break;
      case 2: expect(wt, VARINT, "Value.integer"); integer = r.sint64(); break;
      case 3: expect(wt, FIXED64, "Value.real"); real = r.double(); break;
      case 4: expect(wt, BYTES, "Value.text"); text = r.string(); break;
      case 5: expect(wt, BYTES, "Value.blob"); blob = r.bytes(); break;
      default: r.skip(wt);
    }
  }
  r.leave(outer);
  if (integer !== undefined) return integer;
  if (real !== undefined) return real;
  if (text !== undefined) return text;
  if (blob !== undefined) return blob;
  if (isNull) return null;
  throw new Error("value with no storage class");
}

function readRef(r: Reader): RowRef {
  const outer = r.enter();
  let column = "";
  let hlc = 0;
  let origin = "";
  let bornKey: SqlValue | undefined;
  while (r.more()) {
    const tag = r.uint32();
    const wt = tag & 7;
    switch (tag >>> 3) {
      case 1: expect(wt, BYTES, "Ref.column"); column = r.name(); break;
      case 2: expect(wt, VARINT, "Ref.lineage_hlc"); hlc = r.varint(); break;
      case 3: expect(wt, BYTES, "Ref.lineage_origin"); origin = r.name(); break;
      case 4: expect(wt, BYTES, "Ref.born_key"); bornKey = readValue(r); break;
      default: r.skip(wt);
    }
  }
  r.leave(outer);
  return { column, lineage: { hlc, origin }, bornKey };
}

function readRow(r: Reader): RowChange {
  const outer = r.enter();
  let table = "";
  let op = 0;
  const columns: string[] = [];
  const values: SqlValue[] = [];
  const key: string[] = [];
  const changed: number[] = [];
  let instanceHlc = 0;
  let instanceOrigin = "";
  let bornKey: SqlValue | undefined;
  const refs: RowRef[] = [];
  let incarnationHlc = 0;
  let incarnationOrigin = "";
  let epoch = 0;
  let enrolment = false;
  let note = "";
  while (r.more()) {
    const tag = r.uint32();
    const wt = tag & 7;
    switch (tag >>> 3) {
      case 1: expect(wt, BYTES, "RowChange.table"); table = r.name(); break;
      case 2: expect(wt, VARINT, "RowChange.op"); op = r.uint32() | 0; break;
      case 3: expect(wt, BYTES, "RowChange.columns"); columns.push(r.name()); break;
      case 4: expect(wt, BYTES, "RowChange.values"); values.push(readValue(r)); break;
      case 5: expect(wt, BYTES, "RowChange.key"); key.push(r.name()); break;
      case 6: r.uint32s(wt, changed); break;
      case 7: expect(wt, VARINT, "RowChange.instance_hlc"); instanceHlc = r.varint(); break;
      case 8: expect(wt, BYTES, "RowChange.instance_origin"); instanceOrigin = r.name(); break;
      case 9: expect(wt, BYTES, "RowChange.born_key"); bornKey = readValue(r); break;
      case 10: expect(wt, BYTES, "RowChange.refs"); refs.push(readRef(r)); break;
      case 11: expect(wt, VARINT, "RowChange.incarnation_hlc"); incarnationHlc = r.varint(); break;
      case 12: expect(wt, BYTES, "RowChange.incarnation_origin"); incarnationOrigin = r.name(); break;
      case 13: expect(wt, VARINT, "RowChange.epoch"); epoch = r.uint32(); break;
      case 14: expect(wt, VARINT, "RowChange.enrolment"); enrolment = r.uint32() !== 0; break;
      case 15: expect(wt, BYTES, "RowChange.note"); note = r.string(); break;
      default: r.skip(wt);
    }
  }
  r.leave(outer);
  r.lastColumns = same(columns, r.lastColumns);
  r.lastKey = same(key, r.lastKey);
  return {
    table,
    op: op as RowOp,
    columns: r.lastColumns,
    values,
    key: r.lastKey,
    changed,
    instance: instanceOrigin ? { hlc: instanceHlc, origin: instanceOrigin } : undefined,
    bornKey,
    epoch: epoch || undefined,
    incarnation: incarnationOrigin ? { hlc: incarnationHlc, origin: incarnationOrigin } : undefined,
    enrolment: enrolment || undefined,
    note: note || undefined,
    refs: refs.length ? refs : undefined,
  };
}

function readFile(r: Reader): FileChange {
  const outer = r.enter();
  const f: FileChange = { path: "", kind: 0 as 1 | 2 | 3, size: 0, mode: 0, mtimeMs: 0, sha256: "", baseHlc: 0, baseOrigin: "" };
  while (r.more()) {
    const tag = r.uint32();
    const wt = tag & 7;
    switch (tag >>> 3) {
      case 1: expect(wt, BYTES, "FileChange.path"); f.path = r.string(); break;
      case 2: expect(wt, VARINT, "FileChange.kind"); f.kind = (r.uint32() | 0) as 1 | 2 | 3; break;
      case 3: expect(wt, VARINT, "FileChange.size"); f.size = r.varint(); break;
      case 4: expect(wt, VARINT, "FileChange.mode"); f.mode = r.uint32(); break;
      case 5: expect(wt, VARINT, "FileChange.mtime_ms"); f.mtimeMs = r.int64(); break;
      case 6: expect(wt, BYTES, "FileChange.sha256"); f.sha256 = r.string(); break;
      case 7: expect(wt, BYTES, "FileChange.link_target"); f.linkTarget = r.string() || undefined; break;
      case 8: expect(wt, VARINT, "FileChange.base_hlc"); f.baseHlc = r.varint(); break;
      case 9: expect(wt, BYTES, "FileChange.base_origin"); f.baseOrigin = r.string(); break;
      default: r.skip(wt);
    }
  }
  r.leave(outer);
  return f;
}

function readRecord(r: Reader): LogRecord {
  const outer = r.enter();
  const rec: LogRecord = { hlc: 0 };
  while (r.more()) {
    const tag = r.uint32();
    const wt = tag & 7;
    switch (tag >>> 3) {
      case 1: expect(wt, VARINT, "Record.hlc"); rec.hlc = r.varint(); break;
      case 10: expect(wt, BYTES, "Record.row"); rec.row = readRow(r); break;
      case 11: expect(wt, BYTES, "Record.file"); rec.file = readFile(r); break;
      default: r.skip(wt);
    }
  }
  r.leave(outer);
  return rec;
}

/** Reads an encoded Segment message; throws an Error saying what is malformed. */
export function readSegment(bytes: Buffer): WireSegmentHead {
  const r = new Reader(bytes);
  const seg: WireSegmentHead = { formatVersion: 0, origin: "", stream: "", seq: 0, createdMs: 0, continues: false, records: [] };
  while (r.more()) {
    const tag = r.uint32();
    const wt = tag & 7;
    switch (tag >>> 3) {
      case 1: expect(wt, VARINT, "Segment.format_version"); seg.formatVersion = r.uint32(); break;
      case 2: expect(wt, BYTES, "Segment.origin"); seg.origin = r.string(); break;
      case 3: expect(wt, BYTES, "Segment.stream"); seg.stream = r.string(); break;
      case 4: expect(wt, VARINT, "Segment.seq"); seg.seq = r.varint(); break;
      case 5: expect(wt, BYTES, "Segment.records"); seg.records.push(readRecord(r)); break;
      case 6: expect(wt, VARINT, "Segment.created_ms"); seg.createdMs = r.int64(); break;
      case 7: expect(wt, VARINT, "Segment.continues"); seg.continues = r.uint32() !== 0; break;
      default: r.skip(wt);
    }
  }
  return seg;
}
