/**
 * Segments: a batch of records encoded as protobuf (proto/unisync.proto),
 * compressed as one standard zstd frame and named by the sha256 of the stored
 * bytes, so a reader can verify what it fetched before using any of it.
 */
import { createHash } from "node:crypto";
import { join } from "node:path";
import Long from "long";
import protobuf from "protobufjs";
import { compress, decompress } from "zstd-napi";
import zstd from "zstd-napi/binding.js";
import { isSealed, parseHeader, SealError } from "../keys/envelope.js";
import { segmentLabel, type Vault } from "../keys/vault.js";
import { packageRoot } from "./paths.js";
import type { SqlValue } from "./value.js";
import { readSegment, type WireSegmentHead } from "./wire.js";

/**
 * Version 2 added row lineages, born keys and references (id collisions).
 * Version 3 added enrolment records (values of unknown time), notes and
 * `continues`; an older reader must stop at them rather than apply enrolment
 * values as if they were new writes. Versions 1 and 2 still read.
 */
export const FORMAT_VERSION = 3;
const READABLE_VERSIONS = [1, 2, 3];

export type RowOp = 1 | 2 | 3;
export const OP_INSERT: RowOp = 1;
export const OP_UPDATE: RowOp = 2;
export const OP_DELETE: RowOp = 3;

export interface RowChange {
  table: string;
  op: RowOp;
  columns: string[];
  values: SqlValue[];
  key: string[];
  /** UPDATE: indexes into columns that the change wrote. */
  changed: number[];
  /**
   * Which entity the change is about. Tables without a key: the copy (its
   * insert's clock and origin) an UPDATE/DELETE changed. Tables with an
   * INTEGER PRIMARY KEY: the row's lineage (see src/merge/relocate.ts).
   */
  instance?: { hlc: number; origin: string };
  /** The key the lineage was created at, when it is not the row's key now. */
  bornKey?: SqlValue;
  /** Lineages of the rows that foreign-key columns point at. */
  refs?: RowRef[];
  /** UPDATE/DELETE: the insert that made the row this change saw (see merge.ts). */
  incarnation?: { hlc: number; origin: string };
  /** With a lineage: its epoch at its born key (see relocate.ts). */
  epoch?: number;
  /** An INSERT of a row no trigger saw (enrolment): values of unknown time (merge.ts). */
  enrolment?: boolean;
  /** Why the agent itself made this change (a foreign-key repair, references.ts). */
  note?: string;
}

/** A foreign-key column's value as a reference to a row lineage. */
export interface RowRef {
  column: string;
  lineage: { hlc: number; origin: string };
  /** The lineage's creation key, when it is not the column's value. */
  bornKey?: SqlValue;
}

export interface FileChange {
  path: string;
  /** 1 WRITE, 2 DELETE, 3 SYMLINK */
  kind: 1 | 2 | 3;
  size: number;
  mode: number;
  mtimeMs: number;
  sha256: string;
  /** SYMLINK: target relative to the link's folder. */
  linkTarget?: string;
  /** The version of the path the writer held when it made the change (0/"" for none). */
  baseHlc?: number;
  baseOrigin?: string;
}

export interface LogRecord {
  hlc: number;
  row?: RowChange;
  file?: FileChange;
}

export interface Segment {
  origin: string;
  stream: string;
  seq: number;
  createdMs: number;
  records: LogRecord[];
  /** The writer's app transaction goes on in the next segment. */
  continues?: boolean;
}

/** Raised when stored bytes are not a valid segment; the message says why. */
export class CorruptSegmentError extends Error {
  readonly code: "CORRUPT_SEGMENT" | "SEGMENT_REFUSED" = "CORRUPT_SEGMENT";
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "CorruptSegmentError";
  }
}

/**
 * A segment a secured cluster does not accept (forged, tampered, a removed
 * member's, an unknown key, a plain/sealed mix). Its message starts "refused: ".
 */
export class SegmentRefusedError extends CorruptSegmentError {
  override readonly code = "SEGMENT_REFUSED";
  constructor(why: string, options?: { cause?: unknown }) {
    super(`refused: ${why}`, options);
    this.name = "SegmentRefusedError";
  }
}

const root = protobuf.loadSync(join(packageRoot(), "proto", "unisync.proto"));
const SegmentType = root.lookupType("unisync.v1.Segment");


type LongLike = { low: number; high: number; unsigned?: boolean } | number;

interface WireValue {
  null?: boolean;
  integer?: LongLike;
  real?: number;
  text?: string;
  blob?: Uint8Array;
}

function toWire(v: SqlValue): WireValue {
  if (v === null) return { null: true };
  if (typeof v === "bigint") {
    return { integer: Long.fromBits(Number(BigInt.asIntN(32, v)), Number(BigInt.asIntN(32, v >> 32n)), false) };
  }
  if (typeof v === "number") return { real: v };
  if (typeof v === "string") return { text: v };
  return { blob: v };
}

function longToBigInt(v: LongLike): bigint {
  if (typeof v === "number") return BigInt(v);
  return (BigInt(v.high) << 32n) | BigInt(v.low >>> 0);
}

function longToNumber(v: LongLike | undefined): number {
  if (v === undefined) return 0;
  if (typeof v === "number") return v;
  return Number(longToBigInt(v));
}

// Decoded messages carry proto3 defaults on their prototype: only own
// properties tell which member of the oneof was actually on the wire.
const has = (o: object, k: string) => Object.prototype.hasOwnProperty.call(o, k);

function fromWire(w: WireValue): SqlValue {
  if (has(w, "integer")) return longToBigInt(w.integer as LongLike);
  if (has(w, "real")) return w.real as number;
  if (has(w, "text")) return w.text as string;
  if (has(w, "blob")) return Buffer.from((w.blob as Uint8Array).buffer, (w.blob as Uint8Array).byteOffset, (w.blob as Uint8Array).byteLength);
  if (has(w, "null")) return null;
  throw new CorruptSegmentError("value with no storage class");
}

export function encodeSegment(seg: Segment): Buffer {
  const message = SegmentType.fromObject({
    formatVersion: FORMAT_VERSION,
    origin: seg.origin,
    stream: seg.stream,
    seq: seg.seq,
    createdMs: seg.createdMs,
    continues: seg.continues || undefined,
    records: seg.records.map((r) => ({
      hlc: r.hlc,
      row: r.row && {
        table: r.row.table,
        op: r.row.op,
        columns: r.row.columns,
        values: r.row.values.map(toWire),
        key: r.row.key,
        changed: r.row.changed,
        instanceHlc: r.row.instance?.hlc,
        instanceOrigin: r.row.instance?.origin,
        bornKey: r.row.bornKey === undefined ? undefined : toWire(r.row.bornKey),
        incarnationHlc: r.row.incarnation?.hlc,
        epoch: r.row.epoch,
        incarnationOrigin: r.row.incarnation?.origin,
        enrolment: r.row.enrolment || undefined,
        note: r.row.note || undefined,
        refs: r.row.refs?.map((f) => ({
          column: f.column,
          lineageHlc: f.lineage.hlc,
          lineageOrigin: f.lineage.origin,
          bornKey: f.bornKey === undefined ? undefined : toWire(f.bornKey),
        })),
      },
      file: r.file,
    })),
  });
  return Buffer.from(SegmentType.encode(message).finish());
}

interface WireRecord {
  hlc?: LongLike;
  row?: {
    table?: string;
    op?: number;
    columns?: string[];
    values?: WireValue[];
    key?: string[];
    changed?: number[];
    instanceHlc?: LongLike;
    instanceOrigin?: string;
    bornKey?: WireValue;
    incarnationHlc?: LongLike;
    epoch?: number;
    incarnationOrigin?: string;
    enrolment?: boolean;
    note?: string;
    refs?: { column?: string; lineageHlc?: LongLike; lineageOrigin?: string; bornKey?: WireValue }[];
  };
  file?: {
    path?: string;
    kind?: number;
    size?: LongLike;
    mode?: number;
    mtimeMs?: LongLike;
    sha256?: string;
    linkTarget?: string;
    baseHlc?: LongLike;
    baseOrigin?: string;
  };
}

interface WireSegment {
  formatVersion?: number;
  origin?: string;
  stream?: string;
  seq?: LongLike;
  createdMs?: LongLike;
  continues?: boolean;
  records?: WireRecord[];
}

export function decodeSegment(bytes: Buffer): Segment {
  let wire: WireSegmentHead;
  try {
    wire = readSegment(bytes);
  } catch (err) {
    throw new CorruptSegmentError(`malformed protobuf: ${(err as Error).message}`, { cause: err });
  }
  checkVersion(wire.formatVersion);
  const { origin, stream, seq, createdMs, continues, records } = wire;
  return { origin, stream, seq, createdMs, continues: continues || undefined, records };
}

function checkVersion(version: number | undefined): void {
  if (!READABLE_VERSIONS.includes(version ?? 0)) {
    throw new CorruptSegmentError(
      `unsupported segment format version ${version ?? "(none)"}; this unisync reads versions ${READABLE_VERSIONS.join(", ")}`,
    );
  }
}

/**
 * The same through protobufjs's generated decoder: the reference that
 * test/segment.test.ts checks wire.ts's reader against (replay uses decodeSegment).
 */
export function decodeSegmentWithProtobufjs(bytes: Buffer): Segment {
  let wire: WireSegment;
  try {
    wire = SegmentType.decode(bytes) as unknown as WireSegment;
  } catch (err) {
    throw new CorruptSegmentError(`malformed protobuf: ${(err as Error).message}`, { cause: err });
  }
  checkVersion(wire.formatVersion);
  return {
    origin: wire.origin ?? "",
    stream: wire.stream ?? "",
    seq: longToNumber(wire.seq),
    createdMs: longToNumber(wire.createdMs),
    continues: wire.continues || undefined,
    records: (wire.records ?? []).map((r) => ({
      hlc: longToNumber(r.hlc),
      row: r.row ? {
        table: r.row.table ?? "",
        op: (r.row.op ?? 0) as RowOp,
        columns: r.row.columns ?? [],
        values: (r.row.values ?? []).map(fromWire),
        key: r.row.key ?? [],
        changed: r.row.changed ?? [],
        instance: r.row.instanceOrigin ? { hlc: longToNumber(r.row.instanceHlc), origin: r.row.instanceOrigin } : undefined,
        bornKey: r.row.bornKey && has(r.row, "bornKey") ? fromWire(r.row.bornKey) : undefined,
        epoch: r.row.epoch || undefined,
        incarnation: r.row.incarnationOrigin ? { hlc: longToNumber(r.row.incarnationHlc), origin: r.row.incarnationOrigin } : undefined,
        enrolment: r.row.enrolment || undefined,
        note: r.row.note || undefined,
        refs: r.row.refs?.length
          ? r.row.refs.map((f) => ({
              column: f.column ?? "",
              lineage: { hlc: longToNumber(f.lineageHlc), origin: f.lineageOrigin ?? "" },
              bornKey: f.bornKey && has(f, "bornKey") ? fromWire(f.bornKey) : undefined,
            }))
          : undefined,
      } : undefined,
      file: r.file ? {
        path: r.file.path ?? "",
        kind: (r.file.kind ?? 0) as 1 | 2 | 3,
        size: longToNumber(r.file.size),
        mode: r.file.mode ?? 0,
        mtimeMs: longToNumber(r.file.mtimeMs),
        sha256: r.file.sha256 ?? "",
        linkTarget: r.file.linkTarget || undefined,
        baseHlc: longToNumber(r.file.baseHlc),
        baseOrigin: r.file.baseOrigin ?? "",
      } : undefined,
    })),
  };
}

export function sha256Hex(bytes: Buffer): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/**
 * The bytes to store for a segment and the hash that names them. In a secured
 * cluster (`vault`) the zstd frame is sealed and signed under the segment's
 * identity, so the name hashes ciphertext and says nothing about the content.
 */
export function sealSegment(seg: Segment, vault?: Vault): { bytes: Buffer; sha256: string } {
  const frame = compress(encodeSegment(seg), { compressionLevel: 3 });
  const bytes = vault ? vault.seal(frame, segmentLabel(seg.origin, seg.stream, seg.seq), true) : frame;
  return { bytes, sha256: sha256Hex(bytes) };
}

/** Maximum decompressed size accepted, so a hostile frame cannot exhaust memory. */
export const MAX_SEGMENT_BYTES = 256 * 1024 * 1024;

/**
 * One zstd frame, decompressed only if it declares its size and that size is
 * within the limit: nothing is allocated for a frame that claims more, and zstd
 * itself refuses content longer than the frame declares. unisync's writer
 * always declares the size, so a frame that does not is refused.
 */
export function decompressFrame(frame: Buffer, limit = MAX_SEGMENT_BYTES): Buffer {
  let declared: number | null;
  let frameBytes: number;
  try {
    declared = zstd.getFrameContentSize(frame);
    frameBytes = zstd.findFrameCompressedSize(frame);
  } catch (err) {
    throw new CorruptSegmentError(`not a valid zstd frame: ${(err as Error).message}`, { cause: err });
  }
  if (frameBytes !== frame.length) throw new CorruptSegmentError(`${frame.length - frameBytes} bytes after the zstd frame (one frame per segment)`);
  if (declared === null) throw new CorruptSegmentError("zstd frame does not declare its decompressed size");
  if (declared > limit) throw new CorruptSegmentError(`segment declares ${declared} bytes decompressed, over the ${limit}-byte limit (refused before decompressing)`);
  try {
    return decompress(frame);
  } catch (err) {
    throw new CorruptSegmentError(`not a valid zstd frame: ${(err as Error).message}`, { cause: err });
  }
}

/**
 * Verifies, opens (secured cluster: signature, membership, key), decompresses
 * and decodes stored bytes; throws CorruptSegmentError on any mismatch.
 * A secured node refuses plain segments and a plain node sealed ones: a mixed
 * cluster stops at the first such segment instead of applying half of it.
 */
export function openSegment(bytes: Buffer, expectedSha256: string, vault?: Vault): Segment {
  const actual = sha256Hex(bytes);
  if (actual !== expectedSha256) {
    throw new CorruptSegmentError(`hash mismatch: key says ${expectedSha256}, bytes hash to ${actual}`);
  }
  let frame = bytes;
  let label: string | undefined;
  if (isSealed(bytes)) {
    if (!vault) {
      throw new SegmentRefusedError(
        "the segment is signed and encrypted (a secured cluster) and this node has no cluster keys; " +
          "a node joins a secured cluster with \"unisync keys node\" and the operator's \"unisync keys add\"",
      );
    }
    try {
      label = parseHeader(bytes)?.label;
      frame = vault.open(bytes, "segment", label, true);
    } catch (err) {
      if (err instanceof SealError) throw new SegmentRefusedError(err.message, { cause: err });
      throw err;
    }
  } else if (vault) {
    throw new SegmentRefusedError("the segment is not signed, but this cluster is secured (a node without keys, or a forgery, wrote it)");
  }
  const seg = decodeSegment(decompressFrame(frame));
  if (label !== undefined && label !== segmentLabel(seg.origin, seg.stream, seg.seq)) {
    throw new SegmentRefusedError(`sealed as ${label} but holds ${segmentLabel(seg.origin, seg.stream, seg.seq)}`);
  }
  return seg;
}
