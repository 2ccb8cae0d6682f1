import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["conformance.test.mjs"],
    testTimeout: 5_000,
    hookTimeout: 30_000,
  },
});
