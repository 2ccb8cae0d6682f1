// The official TypeScript client (@durable-streams/client) against the real pushhub binary:
// create, append, read live over SSE and long poll, then resume from a saved offset after
// the server is killed (-9) and restarted on the same --data-dir. Also checks that what the
// client appends is a pushhub topic that pushhub's own poll transport serves.
//   PUSHHUB_BIN=../../target/debug/pushhub node --test client.test.mjs
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { DurableStream } from "@durable-streams/client";
import { startPushhub } from "./server.mjs";

/** Reads `count` JSON items through `live`, starting at `offset`; resolves with them and the offset after. */
async function readItems(handle, live, offset, count) {
  const response = await handle.stream({ live, offset });
  const items = [];
  let last = offset;
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${live}: got ${items.length} of ${count}`)), 10_000);
    const unsubscribe = response.subscribeJson((batch) => {
      items.push(...batch.items);
      last = batch.offset;
      if (items.length >= count) {
        clearTimeout(timer);
        unsubscribe();
        response.cancel();
        resolve();
      }
    });
  });
  return { items, offset: last };
}

test("the official client creates, appends, reads live and resumes across a kill -9", async () => {
  const dir = mkdtempSync(path.join(tmpdir(), "pushhub-ds-client-"));
  try {
    let server = await startPushhub(["--data-dir", dir, "--ds-long-poll-timeout", "2s"]);
    const url = `${server.base}/v1/stream/client-e2e`;
    const handle = await DurableStream.create({ url, contentType: "application/json" });
    await handle.append(JSON.stringify({ n: 1 }));
    await handle.append(JSON.stringify({ n: 2 }));

    // SSE from the start: the two appends, then a live one through the same read.
    let reading = readItems(handle, "sse", "-1", 3);
    await new Promise((r) => setTimeout(r, 300));
    await handle.append(JSON.stringify({ n: 3, live: "sse" }));
    const sse = await reading;
    assert.deepEqual(sse.items, [{ n: 1 }, { n: 2 }, { n: 3, live: "sse" }]);
    // Long poll from where SSE stopped: only what is appended after it.
    reading = readItems(handle, "long-poll", sse.offset, 2);
    await new Promise((r) => setTimeout(r, 300));
    await handle.append(JSON.stringify({ n: 4, live: "long-poll" }));
    await handle.append(JSON.stringify({ n: 5, live: "long-poll" }));
    const longPoll = await reading;
    assert.deepEqual(longPoll.items, [
      { n: 4, live: "long-poll" },
      { n: 5, live: "long-poll" },
    ]);

    // Where a reader stands now, saved as an application would.
    const caughtUp = await handle.stream({ live: false, offset: "-1" });
    const before = await caughtUp.json();
    const saved = caughtUp.offset;
    assert.equal(before.length, 5);

    // pushhub's own transports serve the same topic: one message per append.
    const poll = await (await fetch(`${server.base}/topics/client-e2e/poll?after=0`)).json();
    assert.equal(poll.messages.length, 5);
    assert.deepEqual(poll.messages[0].data, { n: 1 });

    await server.stop("SIGKILL");
    server = await startPushhub(["--data-dir", dir, "--ds-long-poll-timeout", "2s"], server.port);
    const again = new DurableStream({ url, contentType: "application/json" });
    await again.append(JSON.stringify({ n: 6, after: "restart" }));
    const resumed = await again.stream({ live: false, offset: saved });
    assert.deepEqual(await resumed.json(), [{ n: 6, after: "restart" }]);
    const all = await (await again.stream({ live: false, offset: "-1" })).json();
    assert.deepEqual(all.slice(0, 2), [{ n: 1 }, { n: 2 }]);
    assert.equal(all.length, 6);
    await server.stop();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
