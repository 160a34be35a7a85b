/** unisync's own key-value row store in each synced database (`_unisync_meta`, made by db/internal.ts). */
import type { Database } from "better-sqlite3";

export function getMeta(db: Database, key: string): unknown {
  const row = db.prepare("SELECT v FROM _unisync_meta WHERE k = ?").get(key) as { v: unknown } | undefined;
  return row?.v;
}

export function setMeta(db: Database, key: string, value: unknown): void {
  db.prepare("INSERT INTO _unisync_meta(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v").run(key, value);
}
