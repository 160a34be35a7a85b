import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Integration tests start several processes; a 2-core machine cannot run files in parallel.
    pool: "forks",
    fileParallelism: false,
  },
});
