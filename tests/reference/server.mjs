// The Durable Streams reference server (@durable-streams/server, pinned in
// package-lock.json), in memory, on 127.0.0.1:PORT: the peer pushhub is measured against
// (docs/benchmarks.md). Prints its pid and URL, and runs until killed.
//   node server.mjs [PORT] [LONG_POLL_MS]
import { DurableStreamTestServer } from "@durable-streams/server";

const port = Number(process.argv[2] ?? 4438);
const longPollTimeout = Number(process.argv[3] ?? 20000);
// Compression off: pushhub sends uncompressed bodies, and the bench's clients ask for none.
const server = new DurableStreamTestServer({ port, host: "127.0.0.1", longPollTimeout, compression: false });
const url = await server.start();
console.log(`reference server pid ${process.pid} listening on ${url}`);
