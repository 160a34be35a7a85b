/**
 * The snapshot copy never holds a change without a clock: when the app commits
 * between our seal and the copy (VACUUM INTO cannot run inside our write
 * transaction), the copy is taken again. The vector read from the copy matches
 * what it holds, and node-local state is stripped while the merge state stays.
 */
import { describe, expect, it } from "vitest";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import Database from "better-sqlite3";
import { copyDatabase } from "../src/snapshot/copy.js";
import { FileStore } from "../src/store/file.js";
import { appConnection, openSync } from "./helpers/node.js";

describe("snapshot copy", () => {
  it("retakes the copy when the app commits between seal and copy; strips node-local state, keeps merge state", () => {
    const dir = mkdtempSync(join(tmpdir(), "unisync-snapcopy-"));
    const path = join(dir, "app.db");
    const app = appConnection(path);
    app.exec("CREATE TABLE item(id INTEGER PRIMARY KEY, v)");
    const sync = openSync(path, "n1", new FileStore(join(dir, "store")));
    for (let i = 0; i < 5; i++) app.prepare("INSERT INTO item(v) VALUES (?)").run(`a${i}`);
    let seals = 0;
    const racing = {
      db: sync.db,
      sealPending: () => {
        const n = sync.sealPending();
        // The app commits right after our seal, twice: those copies must be thrown away.
        if (++seals <= 2) app.prepare("INSERT INTO item(v) VALUES (?)").run(`late${seals}`);
        return n;
      },
    };
    const dest = join(dir, "copy.sqlite");
    const r = copyDatabase(racing, "n1", dest);
    expect(seals).toBe(3);
    const copy = new Database(dest, { readonly: true });
    try {
      expect((copy.prepare("SELECT count(*) AS n FROM item").get() as { n: number }).n).toBe(7);
      // Every row in the copy has its merge state; nothing pending, nothing node-local.
      expect((copy.prepare("SELECT count(*) AS n FROM _unisync_rows WHERE tbl = 'item'").get() as { n: number }).n).toBe(7);
      for (const t of ["_unisync_changes", "_unisync_outbox", "_unisync_cursors"]) expect((copy.prepare(`SELECT count(*) AS n FROM ${t}`).get() as { n: number }).n).toBe(0);
      expect(copy.prepare("SELECT v FROM _unisync_meta WHERE k IN ('node', 'next_seq')").all()).toEqual([]);
      // The vector names exactly the segments sealed before the copy.
      expect(r.vector).toEqual({ n1: sync.outbox.nextSeq() - 1 });
      expect(r.hlc).toBeGreaterThan(0);
    } finally {
      copy.close();
      sync.close();
      app.close();
    }
  });
});
