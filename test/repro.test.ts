/**
 * Regression checks: every script in test/repro/ reproduced a bug found by the
 * integration tests (see test/repro/README.md). Each prints OK and exits 0 once
 * the bug is fixed, and must stay that way.
 */
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";

const dir = join(import.meta.dirname, "repro");

describe("bug reproductions stay fixed", () => {
  for (const script of readdirSync(dir).filter((f) => f.endsWith(".mjs") && f !== "lib.mjs").sort()) {
    it(script, () => {
      const r = spawnSync("node", [join(dir, script)], { encoding: "utf8", timeout: 90_000 });
      expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(0);
      expect(r.stdout).toMatch(/OK/);
    });
  }
});
