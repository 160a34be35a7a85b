/**
 * The web console in headless Chromium (Debian's chromium, driven by
 * playwright-core) against three agent processes on s3rver:
 *  - the console shows all three nodes;
 *  - a row written on n1 shows up in n2's activity feed as applied;
 *  - a node paused from its console shows a growing lag on another node's
 *    console, and catches up (lag 0) after "Resume sync";
 *  - a unique clash (two nodes insert the same name while one is paused)
 *    shows both rows' values side by side;
 *  - one row's history is found from the console's search.
 * Screenshots go to test/artifacts/console/ (printed at the end).
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium, type Browser, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { clusterSuite, PYTHON, REPO } from "./helpers/cluster.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SHOTS = join(REPO, "test", "artifacts", "console");
const suite = clusterSuite();
let browser: Browser | undefined;

beforeAll(async () => {
  if (!existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM}: apt-get install chromium (make deps / .ci/run do it)`);
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
  mkdirSync(SHOTS, { recursive: true });
});
afterAll(async () => {
  await browser?.close();
});

const sql = (db: string, ...statements: string[]) => {
  const r = spawnSync(PYTHON, ["-c", "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nfor s in sys.argv[2:]:\n  c.execute(s)\n  c.commit()", db, ...statements]);
  if (r.status !== 0) throw new Error(r.stderr.toString());
};

/** The lag the console shows for `node`'s app.db row. */
const lagOf = (page: Page, node: string) => page.locator(`#cluster tr[data-node="${node}"][data-stream="app.db"]`).getAttribute("data-lag").then(Number);

describe("web console in Chromium", () => {
  it("shows every node, live activity, a paused node's lag and catch-up, and a conflict's two values", async () => {
    const c = await suite.start(["n1", "n2", "n3"], "console", { env: { UNISYNC_SNAPSHOT_INTERVAL_MS: "0" } });
    for (const n of ["n1", "n2", "n3"]) sql(c.instance(n, "app.db"), "CREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT UNIQUE, note TEXT)");
    const open = async (node: string) => {
      const page = await browser!.newPage({ viewport: { width: 1200, height: 900 } });
      await page.goto(c.node(node).statusUrl!);
      await page.waitForSelector("body[data-ready]");
      return page;
    };
    const [p1, p2, p3] = [await open("n1"), await open("n2"), await open("n3")];
    const shot = (page: Page, name: string) => page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });

    // Every node, with app.db once each agent picked it up.
    await p1.waitForFunction(() => new Set([...document.querySelectorAll<HTMLElement>("#cluster tr[data-stream='app.db']")].map((r) => r.dataset.node)).size === 3, undefined, { timeout: 30_000 });
    expect(await p1.locator("#cluster tr[data-node='n1'] td").first().textContent()).toContain("(this node)");
    await shot(p1, "1-cluster");

    // A write on n1 appears as applied on n2.
    sql(c.instance("n1", "app.db"), "INSERT INTO people(name, note) VALUES ('alice', 'written on n1')");
    await p2.locator("#feed li[data-kind='applied']", { hasText: "of n1 to app.db" }).first().waitFor({ timeout: 30_000 });
    await shot(p2, "2-activity");

    // n3 paused from its console: n1's console shows its lag growing, then 0 after resume.
    await p3.click("#pause");
    await p3.waitForFunction(() => document.querySelector("#state")?.textContent === "paused");
    // n1 sees n3 paused once n3's heartbeat says so (every heartbeatMs, read every 2 s): from then on its cursors stand still.
    await p1.locator("#cluster tr[data-node='n3'] .pill", { hasText: "paused" }).waitFor({ timeout: 15_000 });
    sql(c.instance("n1", "app.db"), "INSERT INTO people(name) VALUES ('p1')", "INSERT INTO people(name) VALUES ('p2')");
    await p1.waitForFunction(() => Number(document.querySelector<HTMLElement>("#cluster tr[data-node='n3'][data-stream='app.db']")?.dataset.lag) > 0, undefined, { timeout: 30_000 });
    const first = await lagOf(p1, "n3");
    sql(c.instance("n1", "app.db"), "INSERT INTO people(name) VALUES ('p3')", "INSERT INTO people(name) VALUES ('p4')", "INSERT INTO people(name) VALUES ('p5')");
    await p1.waitForFunction((was) => Number(document.querySelector<HTMLElement>("#cluster tr[data-node='n3'][data-stream='app.db']")?.dataset.lag) > was, first, { timeout: 30_000 });
    await shot(p1, "3-paused-lag");
    await p3.click("#pause"); // now "Resume sync"
    await p1.waitForFunction(() => document.querySelector<HTMLElement>("#cluster tr[data-node='n3'][data-stream='app.db']")?.dataset.lag === "0", undefined, { timeout: 30_000 });
    await shot(p1, "4-caught-up");

    // A unique clash: n2 paused, both insert 'bob'; after resume the console shows both rows.
    await p2.click("#pause");
    await p2.waitForFunction(() => document.querySelector("#state")?.textContent === "paused");
    sql(c.instance("n1", "app.db"), "INSERT INTO people(name, note) VALUES ('bob', 'bob of n1')");
    sql(c.instance("n2", "app.db"), "INSERT INTO people(name, note) VALUES ('bob', 'bob of n2')");
    await p2.click("#pause");
    const conflict = p2.locator("#conflicts .conflict", { hasText: "bob of n1" }).filter({ hasText: "bob of n2" });
    await conflict.first().waitFor({ timeout: 45_000 });
    expect(await conflict.first().textContent()).toMatch(/kept.*set aside/s);
    await shot(p2, "5-conflict");

    // One row's history from the log.
    await p1.fill("#hist input[name=table]", "people");
    await p1.fill("#hist input[name=key]", "1");
    await p1.click("#hist button");
    await p1.locator("#history td", { hasText: "alice" }).first().waitFor({ timeout: 30_000 });
    await shot(p1, "6-history");

    // A phone-sized screen: nothing overflows the page sideways (tables scroll inside their cards).
    await p1.setViewportSize({ width: 390, height: 844 });
    expect(await p1.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth + 1)).toBe(true);
    await shot(p1, "7-phone");
    console.log(`console screenshots in ${SHOTS}`);
  });
});
