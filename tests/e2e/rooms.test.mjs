// Many topics on one connection in real headless Chromium: the lab's rooms view over SSE on
// HTTP/1.1 (10 rooms keep flowing on one connection, where 10 EventSources stall at the
// browser's 6 connections per host), and a 100-topic cursor carried by a browser's own
// EventSource across a reconnect, cross-origin.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { NETWORK_NOISE, openBrowser, startServer, stopServer } from "./support.mjs";

async function post(addr, topic, data) {
  const response = await fetch(`http://${addr}/topics/${topic}`, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(data),
  });
  assert.equal(response.status, 201);
}

/** Opens the rooms view and publishes `rounds` messages to each room (from outside the browser). */
async function roomsRun(page, addr, mode, rounds) {
  const run = `${mode.replace("-", "")}${Date.now().toString(36)}`;
  await page.goto(`http://${addr}/rooms.html?rooms=10&lanes=sse&mode=${mode}&run=${run}`);
  await page.waitForFunction(() => window.rooms?.lanes?.length === 1);
  // Every stream the browser could open is open (the others wait for a free connection).
  await page.waitForTimeout(1500);
  for (let round = 0; round < rounds; round++) {
    for (let room = 1; room <= 10; room++) await post(addr, `room.${run}.${room}`, { round, room });
  }
  return run;
}

const laneState = (page) => page.evaluate(() => {
  const lane = window.rooms.lanes[0];
  return { received: [...lane.received], connections: lane.counted.open, duplicates: lane.duplicates };
});

test("10 rooms over SSE on HTTP/1.1: one connection keeps every room flowing; one per room stalls", async () => {
  const server = await startServer();
  const { browser, page, errors } = await openBrowser();
  try {
    console.log(`chromium ${browser.version()}`);
    await roomsRun(page, server.addr, "list", 3);
    await page.waitForFunction(() => window.rooms.lanes[0].received.every((n) => n === 3),
      null, { timeout: 20000, polling: 100 });
    await page.waitForTimeout(500);
    const list = await laneState(page);
    assert.deepEqual(list.received, Array(10).fill(3), "every room, every message, once");
    assert.equal(list.duplicates, 0);
    assert.equal(list.connections, 1, "one connection for the ten rooms");
    // The page shows it.
    await page.waitForFunction(() => document.querySelector(".room-lane").dataset.flowing === "10");

    await roomsRun(page, server.addr, "per-room", 3);
    await page.waitForTimeout(3000);
    const perRoom = await laneState(page);
    const flowing = perRoom.received.filter((n) => n > 0).length;
    assert.equal(perRoom.connections, 10, "ten EventSources asked for");
    assert.ok(flowing <= 6, `at most 6 rooms can flow on HTTP/1.1, ${flowing} did: ${perRoom.received}`);
    assert.ok(perRoom.received.filter((n) => n === 0).length >= 4, `stalled rooms: ${perRoom.received}`);
    assert.deepEqual(errors.filter((e) => !NETWORK_NOISE.test(e)), [], "console errors");
  } finally {
    await browser.close();
    await stopServer(server);
  }
});

test("a 100-topic cursor rides a browser EventSource's Last-Event-ID across a restart, cross-origin", async () => {
  const dataDir = mkdtempSync(path.join(os.tmpdir(), "pushhub-e2e-"));
  const durable = ["--data-dir", dataDir, "--sse-retry", "1s"];
  let server = await startServer("127.0.0.1:0", durable);
  const names = Array.from({ length: 100 }, (_, i) => `wide.${String(i).padStart(3, "0")}.${"x".repeat(115)}`);
  const { browser, page } = await openBrowser();
  try {
    for (const name of names) await post(server.addr, name, { n: 1 });
    const port = server.addr.split(":")[1];
    // The page is on 127.0.0.1, the stream on localhost: another origin (CORS).
    await page.goto(`http://${server.addr}/healthz`);
    await page.evaluate((port) => new Promise((resolve) => {
      window.got = [];
      window.ids = [];
      window.opened = 0;
      const source = new EventSource(`http://localhost:${port}/topics/wide.*/sse?after=0`);
      source.onmessage = (event) => {
        const envelope = JSON.parse(event.data);
        window.got.push(`${envelope.topic}#${envelope.id}`);
        window.ids.push(event.lastEventId.length);
      };
      source.onopen = () => { window.opened++; resolve(); };
    }), port);
    await page.waitForFunction(() => window.got.length === 100, null, { timeout: 20000 });
    const longest = Math.max(...await page.evaluate(() => window.ids));
    assert.ok(longest > 1000 && longest <= 2048, `the cursor is ${longest} characters`);

    const addr = server.addr;
    await stopServer(server);
    server = await startServer(addr, durable);
    for (const name of names) await post(addr, name, { n: 2 });
    await page.waitForFunction(() => window.got.length >= 200 && window.opened >= 2, null, { timeout: 30000 });
    await page.waitForTimeout(500);
    const got = await page.evaluate(() => window.got);
    assert.equal(got.length, 200, "nothing repeated after the reconnect");
    assert.deepEqual(new Set(got), new Set(names.flatMap((n) => [`${n}#1`, `${n}#2`])));
  } finally {
    await browser.close();
    await stopServer(server);
    rmSync(dataDir, { recursive: true, force: true });
  }
});
