// The Durable Streams conformance suite against a running pushhub.
// Run: npm ci && DS_BASE_URL=http://127.0.0.1:PORT npm run conformance
// The base URL is the origin only: the suite appends /v1/stream/<name> itself, and fork
// headers (Stream-Forked-From) carry server paths of that shape.
import { runConformanceTests } from "@durable-streams/server-conformance-tests";

runConformanceTests({
  baseUrl: process.env.DS_BASE_URL ?? "http://127.0.0.1:4437",
  // Sizes the vitest timeout of the few long-poll tests; the server's own long-poll wait must
  // stay well under vitest's 5 s default (two tests wait for its 204).
  longPollTimeoutMs: 20_000,
  // The six "reserved subscription API" tests are off by default, as in the suite's CLI.
  subscriptions: false,
});
