// Shared by the reproductions: a temp folder with a file store, and DbSyncs on it.
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { DbSync } from "../../dist/src/stream/dbsync.js";
import { Metrics } from "../../dist/src/stream/metrics.js";
import { HybridClock } from "../../dist/src/log/hlc.js";
import { FileStore } from "../../dist/src/store/file.js";

/** A fresh folder holding a FileStore, and `open(path, node)` for a DbSync on that store. */
export function scratch(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const store = new FileStore(join(dir, "store"));
  const open = (path, node) => {
    const s = new DbSync({ path, stream: "data.db", node, store, clock: new HybridClock(), log: pino({ level: "silent" }), metrics: new Metrics(),
      excludeTables: [], maxRecords: 100, maxBytes: 1 << 20, busyTimeoutMs: 2000, walMode: true });
    s.refreshSchema();
    return s;
  };
  return { dir, store, open };
}
