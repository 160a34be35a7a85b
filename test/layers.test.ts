/**
 * The import direction check (scripts/check-layers.mjs, run by `make test`): src/
 * passes it, and it fails on an import against the layers (static, re-export or
 * dynamic) and on a folder without a layer.
 */
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";

const script = join(import.meta.dirname, "..", "scripts", "check-layers.mjs");
const root = mkdtempSync(join(tmpdir(), "unisync-layers-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

function check(files: Record<string, string> | null): { code: number | null; out: string } {
  let args = [script];
  if (files) {
    const src = mkdtempSync(join(root, "src-"));
    for (const [rel, text] of Object.entries(files)) {
      mkdirSync(dirname(join(src, rel)), { recursive: true });
      writeFileSync(join(src, rel), text);
    }
    args = [script, src];
  }
  const r = spawnSync(process.execPath, args, { encoding: "utf8" });
  return { code: r.status, out: r.stdout + r.stderr };
}

describe("layer check", () => {
  it("passes on src/ with no exceptions left", () => {
    const r = check(null);
    expect(r.out).toMatch(/layers: ok \(\d+ layers, 0 known exceptions left/);
    expect(r.code).toBe(0);
  });

  it("allows imports downwards and within a folder", () => {
    const r = check({
      "agent/a.ts": 'import { x } from "../db/x.js";\nimport { y } from "./y.js";\nexport const a = x + y;\n',
      "agent/y.ts": "export const y = 1;\n",
      "db/x.ts": "export const x = 1;\n",
    });
    expect(r.code).toBe(0);
  });

  it("fails on an import upwards, static, re-exported or dynamic", () => {
    for (const text of [
      'import type { Agent } from "../agent/agent.js";\n',
      'export * from "../agent/agent.js";\n',
      'export const load = () => import("../agent/agent.js");\n',
      'import {\n  Agent,\n} from "../agent/agent.js";\n',
    ]) {
      const r = check({ "db/x.ts": text, "agent/agent.ts": "export class Agent {}\n" });
      expect(r.out).toContain("db/x.ts -> agent");
      expect(r.code).toBe(1);
    }
  });

  it("fails on a side-effect import upwards (the console importing a command)", () => {
    const r = check({ "web/x.ts": 'import "../cli/main.js";\n', "cli/main.ts": "export {};\n" });
    expect(r.out).toContain("web/x.ts -> cli");
    expect(r.code).toBe(1);
  });

  it("fails on a folder of src/ without a layer", () => {
    const r = check({ "misc/x.ts": "export {};\n" });
    expect(r.out).toContain("src/misc has no layer");
    expect(r.code).toBe(1);
  });
});
