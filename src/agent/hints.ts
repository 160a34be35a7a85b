/**
 * Optional LAN hints: after uploading, an agent sends each peer a small UDP
 * datagram "origin X has new segments", signed with the cluster's hint secret
 * (HMAC-SHA256) and stamped with the time. A peer that receives a valid one
 * polls the index at once instead of waiting out its idle interval, so polling
 * can stay rare while changes still show up quickly. A hint carries no data and
 * is never trusted for any: it only makes a poll happen sooner (and at most
 * once per pollMinMs), so a lost, forged or replayed hint costs at most one LIST.
 */
import { createHmac, timingSafeEqual } from "node:crypto";
import { createSocket, type Socket } from "node:dgram";

export interface HintSettings {
  node: string;
  /** UDP port to listen on (0: do not listen). */
  port: number;
  /** Peers as host:port (IPv4 addresses or host names). */
  peers: string[];
  secret: string;
}

interface Logger {
  warn(obj: object, msg: string): void;
  debug(obj: object, msg: string): void;
}

/** A hint older or newer than this is refused (replays, clocks far off). */
const MAX_AGE_MS = 60_000;
/** At most one hint out per this interval; one poll catches everything published meanwhile. */
const SEND_GAP_MS = 100;

function sign(secret: string, body: string): string {
  return createHmac("sha256", secret).update(body).digest("hex");
}

export function encodeHint(secret: string, origin: string, atMs: number): Buffer {
  const body = JSON.stringify({ v: 1, o: origin, t: atMs });
  return Buffer.from(`${body}\n${sign(secret, body)}`);
}

/** The origin of a valid hint, or a reason it is not one. */
export function decodeHint(secret: string, msg: Buffer, now = Date.now()): { origin: string } | { refused: string } {
  const text = msg.toString("utf8");
  const nl = text.lastIndexOf("\n");
  if (nl < 0 || msg.length > 512) return { refused: "not a unisync hint" };
  const body = text.slice(0, nl);
  const mac = Buffer.from(text.slice(nl + 1), "hex");
  const want = Buffer.from(sign(secret, body), "hex");
  if (mac.length !== want.length || !timingSafeEqual(mac, want)) return { refused: "bad signature (another cluster, or a different hintSecret)" };
  try {
    const h = JSON.parse(body) as { v?: unknown; o?: unknown; t?: unknown };
    if (h.v !== 1 || typeof h.o !== "string" || typeof h.t !== "number") return { refused: "unknown hint format" };
    if (Math.abs(now - h.t) > MAX_AGE_MS) return { refused: `stamped ${Math.round((now - h.t) / 1000)} s away from our clock` };
    return { origin: h.o };
  } catch {
    return { refused: "unreadable hint" };
  }
}

export class Hints {
  private lastSentMs = 0;
  private pending: NodeJS.Timeout | null = null;
  received = 0;
  refused = 0;

  private constructor(
    private readonly socket: Socket,
    private readonly settings: HintSettings,
    private readonly peers: { host: string; port: number }[],
  ) {}

  static async start(settings: HintSettings, onHint: (origin: string) => void, log: Logger): Promise<Hints> {
    const peers = settings.peers.map((p) => {
      const i = p.lastIndexOf(":");
      return { host: p.slice(0, i), port: Number(p.slice(i + 1)) };
    });
    const socket = createSocket("udp4");
    const hints = new Hints(socket, settings, peers);
    socket.on("error", (err) => log.warn({ err: err.message }, "LAN hint socket error; polling goes on without hints"));
    socket.on("message", (msg, from) => {
      const r = decodeHint(settings.secret, msg, Date.now());
      if ("refused" in r) {
        hints.refused++;
        log.debug({ from: from.address, reason: r.refused }, "LAN hint refused");
      } else if (r.origin !== settings.node) {
        hints.received++;
        onHint(r.origin);
      }
    });
    await new Promise<void>((resolve, reject) => {
      socket.once("error", reject);
      socket.bind(settings.port || 0, () => {
        socket.off("error", reject);
        resolve();
      });
    });
    return hints;
  }

  /** Tells every peer that this node published segments (coalesced: at most one datagram per peer per 100 ms). */
  notify(): void {
    if (this.peers.length === 0 || this.pending) return;
    const wait = Math.max(0, this.lastSentMs + SEND_GAP_MS - Date.now());
    this.pending = setTimeout(() => {
      this.pending = null;
      this.lastSentMs = Date.now();
      const msg = encodeHint(this.settings.secret, this.settings.node, this.lastSentMs);
      for (const p of this.peers) this.socket.send(msg, p.port, p.host, () => undefined);
    }, wait);
    this.pending.unref();
  }

  close(): void {
    if (this.pending) clearTimeout(this.pending);
    try {
      this.socket.close();
    } catch {
      // already closed
    }
  }
}
