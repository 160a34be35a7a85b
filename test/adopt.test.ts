/**
 * Nodes that did not bootstrap still get the cluster's databases. Three agent
 * processes on moto start together: n1 with the app's database full of rows,
 * n2 with only a file of its own in the folder (not empty, so no bootstrap),
 * n3 empty (no snapshot exists yet at its start). The database arrives on n2
 * and n3 once n1's first snapshot exists, and it syncs both ways from then on.
 * A node whose own log holds the database, and whose file is gone, does not get
 * it back behind the operator's back.
 */
import { describe, expect, it } from "vitest";
import { existsSync, rmSync, writeFileSync } from "node:fs";
import { appSucceeded, clusterSuite, runApp, sleep, waitFor } from "./helpers/cluster.js";

const suite = clusterSuite("moto");

describe("databases a node lacks", () => {
  it("are brought in from the first snapshot that holds them, and never where this node's own log had them", async (ctx) => {
    ctx.onTestFailed(() => {
      suite.keep = true;
    });
    const c = await suite.start(["n1", "n2", "n3"], "adopt", {
      prepare: async (cl) => {
        await appSucceeded(runApp("random_writer.py", [cl.instance("n1", "data.db"), "--node", "1", "--seed", "7", "--ops", "150", "--sleep-ms", "0"]), "random_writer on n1");
        writeFileSync(cl.instance("n2", "notes.txt"), "n2's own file\n");
      },
    });
    const placed = (n: string) => c.logEntries(n).some((e) => e.msg?.toString().startsWith("a database of the cluster was missing here"));
    // No snapshot at the others' start: n1 takes its first one about 10 s after its own.
    expect(c.logEntries("n3").some((e) => e.msg === "empty node and no snapshot in the store: replaying every origin's log from the start")).toBe(true);
    await waitFor(() => placed("n2") && placed("n3"), 60_000, "n2 and n3 to bring in data.db", 250);
    await c.waitForConvergence(c.paths("data.db"), 60_000);

    // From then on it syncs both ways, as a database of its own.
    await appSucceeded(runApp("random_writer.py", [c.instance("n3", "data.db"), "--node", "3", "--seed", "8", "--ops", "60", "--sleep-ms", "5"]), "random_writer on n3");
    await appSucceeded(runApp("random_writer.py", [c.instance("n2", "data.db"), "--node", "2", "--seed", "9", "--ops", "60", "--sleep-ms", "5"]), "random_writer on n2");
    await c.waitForQuiescence(["data.db"], 90_000);
    await c.waitForConvergence(c.paths("data.db"), 30_000);

    // n2 loses its file while stopped: its own log holds data.db, so it is not brought back.
    await c.stop("n2");
    for (const s of ["", "-wal", "-shm"]) rmSync(c.instance("n2", `data.db${s}`), { force: true });
    await c.restart("n2");
    await waitFor(
      () => c.logEntries("n2").some((e) => e.msg === "a database of the cluster is missing here and was not brought in" && String(e.why).includes("own log already holds")),
      30_000,
      "n2 to decline bringing data.db back",
      250,
    );
    await sleep(1000);
    expect(existsSync(c.instance("n2", "data.db"))).toBe(false);
    expect(c.badLogLines()).toEqual([]);
    expect(c.unexpectedExits).toEqual([]);
  }, 240_000);
});
