/**
 * `unisync log`: the audit trail. Reads every origin's segments from the store,
 * page by page and one segment at a time (verified like replay does), and prints
 * the changes that match the filters: who changed which row or file, when.
 */
import { listOrigins, listStreams, parseSegmentKey, streamPrefix } from "../log/keys.js";
import { hlcToIso, hlcToMs } from "../log/hlc.js";
import { vaultOf } from "../keys/securestore.js";
import { CorruptSegmentError, openSegment, OP_DELETE, OP_INSERT, type LogRecord, type Segment } from "../log/segment.js";
import { showValue } from "../log/value.js";
import { listAll, type ObjectStore } from "../store/store.js";
import { FILES_STREAM } from "../stream/foldersync.js";


export interface LogFilter {
  db?: string;
  table?: string;
  /** Key value(s) of a row: "57", or "a=1,b=x" for a composite key. */
  key?: string;
  path?: string;
  origin?: string;
  sinceMs?: number;
  untilMs?: number;
}

export interface AuditEntry {
  time: string;
  hlc: number;
  origin: string;
  stream: string;
  seq: number;
  op: string;
  table?: string;
  key?: Record<string, string>;
  values?: Record<string, string>;
  /** Values before the change (one row's history, --key): the newest earlier value of each column. */
  old?: Record<string, string>;
  path?: string;
  size?: number;
  sha256?: string;
  /** Why the agent made this change itself (a foreign-key repair). */
  note?: string;
}

function keyMatches(filter: string, key: Record<string, string>): boolean {
  if (!filter.includes("=")) return Object.values(key).length === 1 && Object.values(key)[0] === filter;
  return filter.split(",").every((part) => {
    const [k, v] = part.split("=");
    return key[k] === v;
  });
}

/** Plain rendering of a value for matching and display (text without quotes). */
const plain = (v: Parameters<typeof showValue>[0]) => (typeof v === "string" ? v : showValue(v));

function keyOf(row: NonNullable<LogRecord["row"]>): Record<string, string> {
  return Object.fromEntries(row.key.map((k) => [k, plain(row.values[row.columns.indexOf(k)])]));
}

function toEntry(origin: string, stream: string, seq: number, r: LogRecord): AuditEntry {
  const base = { time: hlcToIso(r.hlc), hlc: r.hlc, origin, stream, seq };
  if (r.file) {
    const op = r.file.kind === 2 ? "delete" : r.file.kind === 3 ? "symlink" : "write";
    return { ...base, op, path: r.file.path, size: r.file.size, sha256: r.file.sha256 || undefined };
  }
  const row = r.row;
  if (!row) return { ...base, op: "unknown" };
  const key = keyOf(row);
  const shown = row.op === OP_INSERT || row.op === OP_DELETE ? row.columns.map((_, i) => i) : row.changed;
  const values = Object.fromEntries(shown.map((i) => [row.columns[i], showValue(row.values[i])]));
  // "enrol": a row that was there before unisync (values of unknown time, older than every logged change).
  const op = row.enrolment ? "enrol" : row.op === OP_INSERT ? "insert" : row.op === OP_DELETE ? "delete" : row.note && row.changed.length === 0 ? "keep" : "update";
  return { ...base, op, table: row.table, key, values, note: row.note };
}

/**
 * Every change matching `filter`, in log order per origin and stream. A
 * segment that replay would refuse (corrupt, forged, written by a removed
 * member) ends its stream here too, as it does for replay; `skipped` hears why.
 */
export async function* audit(store: ObjectStore, filter: LogFilter, skipped: (why: string) => void = () => undefined): AsyncGenerator<AuditEntry> {
  const origins = (await listOrigins(store)).filter((o) => !filter.origin || o === filter.origin);
  for (const origin of origins) {
    const streams = (await listStreams(store, origin)).filter((s) => {
      if (filter.path !== undefined) return s === FILES_STREAM;
      if (filter.table !== undefined || filter.key !== undefined) return s !== FILES_STREAM && (!filter.db || s === filter.db);
      return !filter.db || s === filter.db;
    });
    for (const stream of streams) {
      for await (const obj of listAll(store, streamPrefix(origin, stream))) {
        const name = parseSegmentKey(obj.key);
        if (!name) continue;
        const bytes = await store.get(obj.key);
        if (!bytes) continue;
        let segment: Segment;
        try {
          segment = openSegment(bytes, name.sha256, vaultOf(store));
        } catch (err) {
          if (!(err instanceof CorruptSegmentError)) throw err;
          skipped(`${obj.key}: ${err.message}; the rest of this stream is not shown`);
          break;
        }
        // Clocks grow along an origin's log: past `until`, nothing later can match.
        if (filter.untilMs !== undefined && segment.records.length && hlcToMs(segment.records[0].hlc) > filter.untilMs) break;
        for (const r of segment.records) {
          const ms = hlcToMs(r.hlc);
          if (filter.sinceMs !== undefined && ms < filter.sinceMs) continue;
          if (filter.untilMs !== undefined && ms > filter.untilMs) continue;
          // Cheap tests on the raw record first: rendering every value of a million records is most of the time.
          if (filter.table !== undefined && r.row?.table !== filter.table) continue;
          if (filter.path !== undefined && r.file?.path !== filter.path) continue;
          if (filter.key !== undefined && !(r.row && keyMatches(filter.key, keyOf(r.row)))) continue;
          yield toEntry(origin, stream, name.seq, r);
        }
      }
    }
  }
}

/**
 * One row's (or file's) changes from every origin, in clock order, each with the
 * values it replaced: the newest earlier value of each column it wrote (a
 * delete shows the whole row before it), which is the value every node held
 * just before the change once all origins were merged. Origins' logs are read
 * one after another, so this needs the whole history in memory: used for --key
 * and --path, which select one row or file.
 */
export function withOldValues(entries: AuditEntry[]): AuditEntry[] {
  // Enrolled values rank below every logged change, and the earliest enrolment
  // above later ones (merge.ts): so they come first, the earliest last.
  const order = (a: AuditEntry, b: AuditEntry): number => {
    const ea = a.op === "enrol";
    const eb = b.op === "enrol";
    if (ea !== eb) return ea ? -1 : 1;
    const byClock = ea ? b.hlc - a.hlc : a.hlc - b.hlc;
    return byClock || (a.origin < b.origin ? -1 : a.origin > b.origin ? 1 : 0);
  };
  const sorted = [...entries].sort(order);
  const current = new Map<string, Record<string, string>>();
  return sorted.map((e) => {
    const id = e.path !== undefined ? `file ${e.path}` : `${e.stream} ${e.table} ${JSON.stringify(e.key)}`;
    const now = current.get(id) ?? {};
    const written = e.path !== undefined ? { sha256: e.sha256 ?? "", size: String(e.size ?? "") } : (e.values ?? {});
    const old: Record<string, string> = {};
    const replaced = e.op === "delete" ? Object.keys(now) : e.op === "insert" ? [] : e.op === "keep" ? [] : Object.keys(written);
    for (const c of replaced) if (c in now) old[c] = now[c];
    current.set(id, e.op === "delete" ? {} : e.op === "insert" ? { ...written } : e.op === "keep" ? { ...written, ...now } : { ...now, ...written });
    return Object.keys(old).length ? { ...e, old } : e;
  });
}

export function formatEntry(e: AuditEntry): string {
  const who = `${e.time}  ${e.origin.padEnd(10)} ${e.op.padEnd(7)}`;
  if (e.path !== undefined) return `${who} ${e.path}${e.size !== undefined && e.op === "write" ? `  ${e.size} bytes  sha256 ${e.sha256?.slice(0, 12)}` : ""}`;
  const key = Object.entries(e.key ?? {}).map(([k, v]) => `${k}=${v}`).join(",");
  const values =
    e.op === "delete" && e.old
      ? Object.entries(e.old).map(([k, v]) => `${k}=${v}`).join(" ")
      : Object.entries(e.values ?? {}).map(([k, v]) => (e.old && k in e.old ? `${k}: ${e.old[k]} -> ${v}` : `${k}=${v}`)).join(" ");
  return `${who} ${e.stream}:${e.table}[${key}]  ${e.op === "keep" ? "" : values}${e.note ? `  (${e.note})` : ""}`;
}
