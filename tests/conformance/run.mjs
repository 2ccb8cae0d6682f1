// Runs the Durable Streams conformance suite (@durable-streams/server-conformance-tests,
// pinned in package-lock.json) against the real pushhub binary, once per store: in memory,
// --data-dir and --redis. Exits non-zero if any test fails in any of them.
//   PUSHHUB_BIN=../../target/debug/pushhub node run.mjs [memory|disk|redis ...]
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { startPushhub, startRedis } from "./server.mjs";

// The suite waits for a long poll's 204 within vitest's 5 s test timeout: the server's
// long-poll wait must be well under it (upstream runs its servers with 500 ms).
const LONG_POLL = ["--ds-long-poll-timeout", "500ms"];
const stores = process.argv.slice(2).length ? process.argv.slice(2) : ["memory", "disk", "redis"];
let failed = false;
for (const store of stores) {
  let args = [...LONG_POLL];
  let redis;
  let dir;
  if (store === "disk") {
    dir = mkdtempSync(path.join(tmpdir(), "pushhub-ds-"));
    args.push("--data-dir", dir);
  } else if (store === "redis") {
    redis = await startRedis();
    args.push("--redis", redis.url);
  } else if (store !== "memory") {
    throw new Error(`unknown store ${store}`);
  }
  const server = await startPushhub(args);
  console.log(`== conformance suite, ${store} store, ${server.base}`);
  const run = spawnSync("npx", ["vitest", "run", "--config", "vitest.config.mjs", "--reporter=dot"], {
    stdio: "inherit",
    env: { ...process.env, DS_BASE_URL: server.base },
  });
  if (run.status !== 0) {
    failed = true;
    console.log(`== ${store}: FAILED\n${server.child.output()}`);
  }
  await server.stop();
  await redis?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
