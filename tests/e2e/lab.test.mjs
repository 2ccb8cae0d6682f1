// The lab page in real headless Chromium, against the real pushhub binary.
// Run: npm ci && npm test   (needs Debian's chromium at /usr/bin/chromium and a built binary)
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { NETWORK_NOISE, openBrowser, root, startServer, stopServer } from "./support.mjs";

/** The figures as the page shows them. */
const lanes = (page) => page.evaluate(() => [...document.querySelectorAll(".lane")].map((el) => {
  const field = (name) => el.querySelector(`[data-field="${name}"]`).textContent;
  return {
    state: el.dataset.state,
    transport: el.querySelector("select").value,
    received: Number(field("received")),
    missing: Number(field("missing")),
    duplicates: Number(field("duplicates")),
    requests: Number(field("requests")),
    requestsPerMessage: parseFloat(field("requests-per-message")),
    signals: field("signals"),
    p50: parseFloat(field("p50")),
    name: el.querySelector(".name").textContent,
  };
}));

const allOpen = (page) => page.waitForFunction(
  () => [...document.querySelectorAll(".lane")].every((el) => el.dataset.state === "open"),
  null, { timeout: 20000 });

async function generate(page, rate, seconds) {
  await page.selectOption("#rate", String(rate));
  await page.fill("#duration", String(seconds));
  await page.click("#generate");
  await page.waitForFunction(() => document.querySelector("#generator").dataset.running === "true");
}

async function generatorDoneAndLanesCaughtUp(page) {
  await page.waitForFunction(() => document.querySelector("#generator").dataset.running === "false",
    null, { timeout: 60000 });
  // Every lane has every message the server acknowledged (the short-poll lane may need an interval).
  await page.waitForFunction(() => {
    const { lanes, acked } = window.lab;
    return lanes.every((lane) => [...acked.keys()].every((seq) => lane.seen.has(seq)));
  }, null, { timeout: 30000, polling: 100 });
  await page.waitForTimeout(400); // two renders, so the figures on the page are current
}

async function assertExactlyOnce(page, label) {
  const acked = Number(await page.textContent("#acked"));
  assert.ok(acked > 0, `${label}: nothing was published`);
  assert.equal(Number(await page.textContent("#failed")), 0, `${label}: publishes failed`);
  for (const [i, lane] of (await lanes(page)).entries()) {
    assert.equal(lane.received, acked, `${label}: lane ${i} (${lane.transport}) received ${lane.received} of ${acked}`);
    assert.equal(lane.missing, 0, `${label}: lane ${i} missing`);
    assert.equal(lane.duplicates, 0, `${label}: lane ${i} duplicates`);
  }
  return acked;
}

test("five lanes receive every message exactly once, across switches, toggles and a restart mid-run", async () => {
  let server = await startServer();
  const { browser, page, errors } = await openBrowser();
  try {
    await page.goto(`http://${server.addr}/?topic=e2e`);
    await allOpen(page);

    // Generator at 100 msg/s for 4 s; mid-run, two lanes change transport and one is toggled.
    await generate(page, 100, 4);
    await page.waitForTimeout(1200);
    // Lanes 1 to 3 rotate transports: SSE -> long poll, HTTP stream -> SSE, long poll ->
    // HTTP stream.
    await page.selectOption('.lane[data-lane="1"] [data-select="transport"]', "longpoll");
    await page.selectOption('.lane[data-lane="2"] [data-select="transport"]', "sse");
    await page.selectOption('.lane[data-lane="3"] [data-select="transport"]', "stream");
    await page.waitForTimeout(600);
    await page.uncheck('.lane[data-lane="1"] input[type=checkbox]');
    await page.waitForTimeout(500);
    await page.check('.lane[data-lane="1"] input[type=checkbox]');
    await generatorDoneAndLanesCaughtUp(page);
    const firstRun = await assertExactlyOnce(page, "first run");
    assert.ok(firstRun >= 350, `generator published only ${firstRun} of 400`);

    // Consistent figures: short polling pays requests per message, WebSocket does not.
    const figures = await lanes(page);
    assert.equal(figures[0].transport, "ws");
    assert.equal(figures[4].transport, "poll");
    assert.ok(figures[4].requests > figures[0].requests,
      `poll lane made ${figures[4].requests} requests, ws lane ${figures[0].requests}`);
    assert.ok(figures[4].requestsPerMessage > figures[0].requestsPerMessage);
    // The server's own view counted deliveries on every transport.
    await page.waitForTimeout(1100);
    const delivered = await page.$$eval('#server tr[data-row="deliveries"] td', (tds) => tds.map((td) => Number(td.textContent)));
    assert.ok(delivered.every((n) => n > 0), `server deliveries per transport: ${delivered}`);
    // Wire bytes as the server counts them, beside what the page sees: a long poll pays HTTP
    // heads on every answer, which the page cannot see; a WebSocket frame is what the page
    // sees, plus a few bytes.
    const perMessage = await page.evaluate(() => [...document.querySelectorAll(".lane")].map((el) => ({
      page: parseFloat(el.querySelector('[data-field="bytes-per-message"]').textContent),
      server: parseFloat(el.querySelector('[data-field="server-bytes-per-message"]').textContent),
    })));
    assert.ok(perMessage[1].server > perMessage[1].page + 50, `long poll: ${JSON.stringify(perMessage[1])}`);
    assert.ok(Math.abs(perMessage[0].server - perMessage[0].page) < 0.3 * perMessage[0].page,
      `WebSocket: ${JSON.stringify(perMessage[0])}`);
    assert.deepEqual(errors, [], "console errors before the restart");

    mkdirSync(path.join(root, "docs/img"), { recursive: true });
    await page.screenshot({ path: path.join(root, "docs/img/lab.png"), fullPage: true });

    // A narrow screen: the page reflows without horizontal scrolling.
    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForTimeout(300);
    assert.equal(await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth), 0);
    await page.setViewportSize({ width: 1200, height: 900 });

    // Stop and restart the server on the same address while the generator runs. The
    // in-memory topic starts again at id 1: every lane must be told (reset), reconnect, and
    // receive every message acknowledged after the restart exactly once.
    const addr = server.addr;
    await generate(page, 100, 6);
    await page.waitForTimeout(3000);
    const beforeStop = await page.evaluate(() => window.lab.acked.size);
    await stopServer(server);
    server = await startServer(addr);
    const restartedAt = await page.evaluate(() => Date.now());
    await page.waitForTimeout(700);
    await page.selectOption('.lane[data-lane="1"] [data-select="transport"]', "ws");
    await page.waitForFunction(() => document.querySelector("#generator").dataset.running === "false",
      null, { timeout: 60000 });
    await page.waitForFunction((since) => {
      const { lanes, acked } = window.lab;
      const after = [...acked].filter(([, at]) => at > since).map(([seq]) => seq);
      return after.length > 0 && lanes.every((lane) => lane.resets >= 1 && after.every((seq) => lane.seen.has(seq)));
    }, restartedAt, { timeout: 30000, polling: 100 });
    await page.waitForTimeout(400);
    const report = await page.evaluate(({ firstRun, beforeStop }) => {
      const { lanes, acked } = window.lab;
      return lanes.map((lane) => ({
        transport: lane.transport,
        repeated: lane.repeated,
        // Acknowledged between the first run and the stop, never delivered: lost with the
        // in-memory history when the process stopped.
        lostInRestart: [...acked.keys()].filter((seq) => seq > firstRun && seq <= beforeStop && !lane.seen.has(seq)).length,
      }));
    }, { firstRun, beforeStop });
    const failedWhileDown = Number(await page.textContent("#failed"));
    console.log("restart mid-run:", JSON.stringify(report), "publishes refused while down:", failedWhileDown);
    for (const [i, lane] of (await lanes(page)).entries()) {
      assert.equal(lane.duplicates, 0, `lane ${i} duplicates after restart`);
      assert.equal(lane.state, "open", `lane ${i} recovered`);
    }
    for (const lane of report) {
      // Push lanes lose at most what was in flight at the stop; the short-poll lane at most one
      // interval of traffic (1 s at 100 msg/s) plus that.
      assert.ok(lane.lostInRestart <= 150, `${lane.transport} lost ${lane.lostInRestart} in the restart`);
    }
    assert.deepEqual(errors.filter((e) => !NETWORK_NOISE.test(e)), [], "console errors");
  } finally {
    await browser.close();
    await stopServer(server);
  }
});

for (const [served, expected] of [["sse,longpoll,poll", "sse"], ["stream,longpoll,poll", "stream"]]) {
  test(`auto falls back to ${expected} when the server serves only ${served}`, async () => {
    const server = await startServer("127.0.0.1:0", ["--transports", served]);
    const { browser, page } = await openBrowser();
    try {
      await page.goto(`http://${server.addr}/healthz`);
      const result = await page.evaluate(async (expected) => {
        const { connect } = await import("/pushhub.js");
        const states = [];
        const sub = connect({ topic: "fallback", transport: "auto" });
        sub.on("status", (s) => states.push(`${s.state}:${s.transport}`));
        const message = new Promise((resolve) => sub.on("message", resolve));
        await new Promise((resolve) => sub.on("status", (s) => s.state === "open" && resolve()));
        await fetch("/topics/fallback", { method: "POST", body: `over ${expected}` });
        const envelope = await message;
        sub.close();
        return { states, transport: sub.transport, data: envelope.data };
      }, expected);
      assert.equal(result.transport, expected);
      assert.ok(result.states.includes(`fallback:${expected}`), result.states.join(", "));
      assert.equal(result.data, `over ${expected}`);
    } finally {
      await browser.close();
      await stopServer(server);
    }
  });
}

// The browser's own EventSource, opened without a cursor, whose connection drops before the
// first message: it must come back with Last-Event-ID (the stream's opening `id:` line set
// it) and receive what was published while it was away, not start "from now" again.
test("a browser EventSource that loses its connection before any message misses nothing", async () => {
  const dataDir = mkdtempSync(path.join(os.tmpdir(), "pushhub-e2e-"));
  const durable = ["--data-dir", dataDir, "--sse-retry", "3s"];
  let server = await startServer("127.0.0.1:0", durable);
  const { browser, page } = await openBrowser();
  try {
    await page.goto(`http://${server.addr}/healthz`);
    await page.evaluate(() => new Promise((resolve) => {
      window.got = [];
      const source = new EventSource("/topics/away/sse");
      source.onmessage = (event) => window.got.push(JSON.parse(event.data).data);
      source.onopen = () => resolve();
    }));
    await page.waitForTimeout(300);
    // The connection drops (a restart), and messages are published before the browser
    // reconnects (it waits --sse-retry).
    const addr = server.addr;
    await stopServer(server);
    server = await startServer(addr, durable);
    for (const text of ["one", "two", "three"]) {
      const response = await fetch(`http://${addr}/topics/away`, { method: "POST", body: text });
      assert.equal(response.status, 201);
    }
    await page.waitForFunction(() => window.got.length >= 3, null, { timeout: 20000 });
    assert.deepEqual(await page.evaluate(() => window.got), ["one", "two", "three"]);
  } finally {
    await browser.close();
    await stopServer(server);
    rmSync(dataDir, { recursive: true, force: true });
  }
});

// One lane on 3g beside lanes straight to the server: the 3g lane's latency carries the link
// (100 ms ± 30 one way), the others' does not; a lane on `auto` behind a proxy that refuses
// WebSocket upgrades falls back to SSE and misses nothing.
test("a lab lane on 3g shows the link's delay, and auto falls back behind no-websocket", async () => {
  const server = await startServer();
  const { browser, page, errors } = await openBrowser();
  try {
    await page.goto(`http://${server.addr}/?topic=links`);
    await allOpen(page);
    await page.selectOption('.lane[data-lane="0"] [data-select="link"]', "3g");
    await page.selectOption('.lane[data-lane="4"] [data-select="transport"]', "auto");
    await page.selectOption('.lane[data-lane="4"] [data-select="via"]', "no-websocket");
    await allOpen(page);
    await generate(page, 10, 3);
    await page.waitForFunction(() => document.querySelector("#generator").dataset.running === "false",
      null, { timeout: 20000 });
    await page.waitForFunction(() => [...document.querySelectorAll(".lane")].every((el) =>
      Number(el.querySelector('[data-field="received"]').textContent) >= 30), null, { timeout: 20000 });
    await page.waitForTimeout(3500); // past the lab's grace for counting a message missing
    const shown = await lanes(page);
    for (const lane of shown) {
      assert.equal(lane.missing, 0, JSON.stringify(lane));
      assert.equal(lane.duplicates, 0, JSON.stringify(lane));
    }
    assert.ok(shown[0].p50 >= 80, `the 3g lane's median: ${shown[0].p50} ms`);
    assert.ok(shown[1].p50 < 50, `a direct lane's median: ${shown[1].p50} ms`);
    assert.equal(shown[4].name, "Auto → SSE");
    const legend = await page.textContent("#legend");
    assert.match(legend, /WebSocket on 3g/);
    assert.match(legend, /Auto on lan behind no-websocket/);
    const counters = (await (await fetch(`http://${server.addr}/links`)).json()).counters;
    assert.ok(counters.upgrades_refused >= 1, JSON.stringify(counters));
    assert.ok(counters.bytes_down > 0, JSON.stringify(counters));
    assert.deepEqual(errors.filter((e) => !NETWORK_NOISE.test(e)), []);
  } finally {
    await browser.close();
    await stopServer(server);
  }
});

// The browser's own EventSource, opened without a cursor on the flaky link (every connection
// cut after 2-8 s, a fifth of them reset): its first connection is cut before any message,
// and messages are published from then on, some while it is away. It must come back with
// Last-Event-ID every time (the stream's opening id line set it) and miss nothing.
test("a browser EventSource behind the flaky link misses nothing across its cuts", async () => {
  const server = await startServer("127.0.0.1:0", ["--sse-retry", "300ms"]);
  const port = server.addr.split(":").at(-1);
  const { browser, page } = await openBrowser();
  try {
    await page.goto(`http://${server.addr}/healthz`);
    await page.evaluate((port) => {
      window.got = [];
      window.cuts = 0;
      const source = new EventSource(`http://flaky.localhost:${port}/topics/flaky-es/sse`);
      source.onmessage = (event) => window.got.push(Number(JSON.parse(event.data).data));
      source.onerror = () => { window.cuts++; window.log.push(["error", source.readyState, Date.now() % 100000]); };
      source.onopen = () => window.log.push(["open", Date.now() % 100000]);
      window.log = [];
    }, port);
    await page.waitForFunction(() => window.cuts >= 1, null, { timeout: 15000 });
    assert.deepEqual(await page.evaluate(() => window.got), [], "cut before any message");
    let published = 0;
    const until = Date.now() + 9000;
    while (Date.now() < until) {
      const response = await fetch(`http://${server.addr}/topics/flaky-es`, { method: "POST", body: String(++published) });
      assert.equal(response.status, 201);
      await new Promise((r) => setTimeout(r, 100));
    }
    await page.waitForFunction((n) => window.got.includes(n), published, { timeout: 20000 })
      .catch(async (e) => { console.log(published, JSON.stringify(await page.evaluate(() => ({ got: window.got, cuts: window.cuts, log: window.log })))); throw e; });
    const { got, cuts } = await page.evaluate(() => ({ got: window.got, cuts: window.cuts }));
    assert.deepEqual(got, Array.from({ length: published }, (_, i) => i + 1));
    assert.ok(cuts >= 2, `cut ${cuts} times`);
  } finally {
    await browser.close();
    await stopServer(server);
  }
});

/** A redis-server on a free port, persisting to `dir` (so a restart keeps the topic's ids). */
async function startRedis(dir, port) {
  if (!port) {
    const net = await import("node:net");
    port = await new Promise((resolve) => {
      const probe = net.createServer().listen(0, "127.0.0.1", () => {
        const { port } = probe.address();
        probe.close(() => resolve(port));
      });
    });
  }
  const proc = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "",
    "--appendonly", "yes", "--appendfsync", "always", "--dir", dir], { stdio: "ignore" });
  for (let i = 0; i < 200; i++) {
    const up = await new Promise(async (resolve) => {
      const net = await import("node:net");
      const socket = net.connect(port, "127.0.0.1", () => { socket.end(); resolve(true); });
      socket.on("error", () => resolve(false));
    });
    if (up) return { proc, port };
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error("redis-server did not start");
}

// The browser's own EventSource on a node whose Redis goes down. One was open before (behind
// the flaky link, its connection is cut and it reconnects during the outage); one is opened
// during it, with no cursor (a page loaded while Redis is away). Each is answered 200 with
// `retry:` and ended (not 503, on which a browser gives up for good), so both keep coming back,
// and once Redis is back both receive what is published.
test("browser EventSources that (re)connect while Redis is down get what is published after", async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), "pushhub-e2e-redis-"));
  let redis = await startRedis(dir);
  const server = await startServer("127.0.0.1:0", ["--redis", `redis://127.0.0.1:${redis.port}/`, "--sse-retry", "300ms"]);
  const port = server.addr.split(":").at(-1);
  const publish = (text) => fetch(`http://${server.addr}/topics/outage`, { method: "POST", body: text });
  const { browser, page } = await openBrowser();
  try {
    await page.goto(`http://${server.addr}/healthz`);
    const open = (name, url) => page.evaluate(([name, url]) => {
      window.sources ??= {};
      const entry = { got: [], errors: 0, opens: 0, source: new EventSource(url) };
      entry.source.onmessage = (event) => entry.got.push(JSON.parse(event.data).data);
      entry.source.onerror = () => entry.errors++;
      entry.source.onopen = () => entry.opens++;
      window.sources[name] = entry;
    }, [name, url]);
    const state = (name) => page.evaluate((name) => {
      const { got, errors, source } = window.sources[name];
      return { got, errors, readyState: source.readyState };
    }, name);
    await open("before", `http://flaky.localhost:${port}/topics/outage/sse`);
    await page.waitForFunction(() => window.sources.before.source.readyState === 1, null, { timeout: 10000 });
    assert.equal((await publish("before")).status, 201);
    await page.waitForFunction(() => window.sources.before.got.length === 1, null, { timeout: 10000 });

    redis.proc.kill("SIGKILL");
    await once(redis.proc, "exit");
    assert.equal((await publish("lost")).status, 503, "publishes are refused while Redis is down");
    await open("during", `http://${server.addr}/topics/outage/sse`);
    // At least two reconnects of each during the outage (the flaky link cuts 2-8 s after
    // each connect; the one opened during the outage is ended at once).
    const seen = (await state("before")).errors;
    await page.waitForFunction((n) => window.sources.before.errors >= n + 2
      && window.sources.during.errors >= 2, seen, { timeout: 30000 });
    for (const name of ["before", "during"]) {
      assert.notEqual((await state(name)).readyState, 2, `the EventSource opened ${name} the outage gave up`);
    }

    redis = await startRedis(dir, redis.port);
    // The one that never had a cursor follows "from now": from its first stream that starts,
    // told apart from the ended answers of the outage by staying open for a second.
    await page.waitForFunction(() => {
      const during = window.sources.during;
      const now = Date.now();
      if (during.source.readyState !== 1 || during.opens !== during.seenOpens) {
        during.seenOpens = during.opens;
        during.since = now;
        return false;
      }
      return now - during.since >= 1000;
    }, null, { timeout: 20000, polling: 50 });
    let status = 0;
    for (let i = 0; i < 200 && status !== 201; i++) {
      status = (await publish("after")).status;
      if (status !== 201) await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(status, 201);
    await page.waitForFunction(() => ["before", "during"].every((name) =>
      window.sources[name].got.includes("after")), null, { timeout: 20000 });
    assert.deepEqual((await state("before")).got, ["before", "after"]);
    assert.deepEqual((await state("during")).got, ["after"]);
  } finally {
    await browser.close();
    await stopServer(server);
    redis.proc.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  }
});

// The generator publishes over one WebSocket with acknowledgements: 1,000 and 5,000 msg/s are
// real rates (a run of 2 s takes about 2 s and every message is acknowledged), or the page
// says what held it back.
test("the generator reaches 1000 and 5000 msg/s over its WebSocket, or says what held it back", async () => {
  const server = await startServer();
  const { browser, page, errors } = await openBrowser();
  try {
    await page.goto(`http://${server.addr}/?topic=rates`);
    await allOpen(page);
    for (const rate of [1000, 5000]) {
      const before = await page.evaluate(() => window.lab.acked.size);
      const started = Date.now();
      await generate(page, rate, 2);
      await page.waitForFunction(() => document.querySelector("#generator").dataset.running === "false",
        null, { timeout: 30000 });
      const seconds = (Date.now() - started) / 1000;
      const acked = (await page.evaluate(() => window.lab.acked.size)) - before;
      const limit = (await page.textContent("#generator-limit")).trim();
      console.log(`# generator at ${rate} msg/s: ${acked} acknowledged in ${seconds.toFixed(2)} s${limit ? `; ${limit}` : ""}`);
      assert.equal(acked, rate * 2, `${rate}: every message acknowledged`);
      assert.ok(seconds <= 2 * 1.1 + 0.6 || limit.length > 0, `${rate} msg/s took ${seconds} s and the page said nothing`);
    }
    const stats = await (await fetch(`http://${server.addr}/stats`)).json();
    assert.equal(stats.publishes, 12000);
    assert.deepEqual(errors.filter((e) => !NETWORK_NOISE.test(e)), []);
  } finally {
    await browser.close();
    await stopServer(server);
  }
});
