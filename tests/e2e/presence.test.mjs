// Presence in real headless Chromium: pushhub.js named on SSE hears another subscriber join
// and leave, and a browser EventSource's Last-Event-ID stays the last message's across
// presence events (they carry no id), so a reconnect resumes where the messages left it.
import { test } from "node:test";
import assert from "node:assert/strict";
import { NETWORK_NOISE, openBrowser, startServer, stopServer } from "./support.mjs";

test("pushhub.js hears joins and leaves; presence events leave EventSource's lastEventId alone", async () => {
  const server = await startServer();
  const { browser, page, errors } = await openBrowser();
  const bob = new AbortController();
  try {
    await page.goto(`http://${server.addr}/healthz`);
    await page.evaluate(async () => {
      const { connect } = await import("/pushhub.js");
      window.heard = [];
      window.raw = [];
      const sub = connect({ topic: "lobby", transport: "sse", client: "ann", presence: true, after: 0 });
      sub.on("presence", (diff) => {
        for (const m of diff.joins) window.heard.push(`+${m.client}`);
        for (const m of diff.leaves) window.heard.push(`-${m.client}`);
      });
      // A browser's own EventSource, named and watching, to read lastEventId as it goes.
      const source = new EventSource("/topics/lobby/sse?after=0&client=eve&presence=1");
      source.addEventListener("message", (e) => window.raw.push(`message ${e.lastEventId}`));
      source.addEventListener("presence", (e) => {
        const diff = JSON.parse(e.data);
        const names = [...diff.joins.map((m) => `+${m.client}`), ...diff.leaves.map((m) => `-${m.client}`)];
        window.raw.push(`presence ${names.join(",")} lastEventId=${e.lastEventId}`);
      });
    });
    // Each watcher hears its own join (a watcher hears changes from its subscription on,
    // so whether ann hears eve's depends on which arrived first: the list tells).
    await page.waitForFunction(() => window.heard.includes("+ann") && window.raw.some((r) => r.includes("+eve")),
      null, { timeout: 10000 }).catch(async (error) => {
      throw new Error(`${error.message}: ${await page.evaluate(() => JSON.stringify([window.heard, window.raw]))}`);
    });
    const posted = await fetch(`http://${server.addr}/topics/lobby`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ n: 1 }),
    });
    assert.equal(posted.status, 201);
    await page.waitForFunction(() => window.raw.includes("message 1"), null, { timeout: 10000 });
    // Another named subscriber, outside the browser, comes and goes.
    const stream = await fetch(`http://${server.addr}/topics/lobby/stream?client=bob`, { signal: bob.signal });
    assert.equal(stream.status, 200);
    await page.waitForFunction(() => window.heard.includes("+bob"), null, { timeout: 10000 });
    const listed = await page.evaluate(async () => (await (await fetch("/topics/lobby/presence")).json()));
    assert.deepEqual(listed.members.map((m) => m.client).sort(), ["ann", "bob", "eve"]);
    bob.abort();
    await page.waitForFunction(() => window.heard.includes("-bob"), null, { timeout: 10000 });
    const raw = await page.evaluate(() => window.raw);
    assert.ok(raw.includes("presence +bob lastEventId=1"), raw.join("\n"));
    assert.ok(raw.includes("presence -bob lastEventId=1"), raw.join("\n"));
    assert.deepEqual(errors.filter((e) => !NETWORK_NOISE.test(e)), [], "console errors");
  } finally {
    bob.abort();
    await browser.close();
    await stopServer(server);
  }
});
