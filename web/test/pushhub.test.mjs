// Unit tests of pushhub.js's cursor and reconnect logic, with fake transports and timers.
// Run: node --test web/test/
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, subscribe, backoffDelay, linkBase, utf8Length, topicHash, ListCursor, TRANSPORTS } from "../pushhub.js";

/** A controllable world: fake WebSocket, EventSource, fetch and timers. */
function world({ topicLastId = 0, pollAnswers = [] } = {}) {
  const w = { sockets: [], sources: [], streams: [], requests: [], timers: [], now: 1_000_000 };
  class FakeWebSocket {
    constructor(url) { this.url = url; this.closed = false; w.sockets.push(this); }
    close() { this.closed = true; }
    open() { this.onopen?.(); }
    frame(value) { this.onmessage?.({ data: JSON.stringify(value) }); }
    drop(code = 1006) { this.onclose?.({ code }); }
  }
  class FakeEventSource {
    constructor(url) { this.url = url; this.listeners = {}; this.closed = false; w.sources.push(this); }
    addEventListener(name, fn) { (this.listeners[name] ??= []).push(fn); }
    close() { this.closed = true; }
    emit(type, data, lastEventId = "") {
      for (const fn of this.listeners[type] ?? []) fn({ type, data: JSON.stringify(data), lastEventId });
    }
  }
  w.fetch = async (url) => {
    w.requests.push(url);
    let body;
    // A long poll with nothing to say is parked by the server: it never answers here.
    if (url.includes("/longpoll") && !url.includes("timeout=0") && pollAnswers.length === 0) return new Promise(() => {});
    if (url.includes("/stream?")) {
      const refusal = pollAnswers[0] instanceof Error ? pollAnswers.shift() : null;
      if (refusal) throw refusal;
      // A body whose chunks the test pushes: `send(text)` one chunk, `end()` the body.
      const stream = { url, chunks: [], waiting: null, ended: false };
      const wake = () => { const resolve = stream.waiting; stream.waiting = null; resolve?.(); };
      stream.send = (text) => { stream.chunks.push(new TextEncoder().encode(text)); wake(); };
      stream.end = () => { stream.ended = true; wake(); };
      const reader = {
        async read() {
          while (stream.chunks.length === 0 && !stream.ended) await new Promise((r) => { stream.waiting = r; });
          return stream.chunks.length ? { value: stream.chunks.shift(), done: false } : { value: undefined, done: true };
        },
        cancel: async () => {},
      };
      w.streams.push(stream);
      return { ok: true, status: 200, body: { getReader: () => reader }, headers: { get: () => null } };
    }
    if (/\/topics\/[^/]+$/.test(url)) body = { last_id: topicLastId };
    else body = pollAnswers.shift() ?? { messages: [], last_id: 0, next_after: Number(/after=(\d+)/.exec(url)?.[1]) };
    if (body instanceof Error) throw body;
    const text = JSON.stringify(body);
    return { ok: true, status: 200, text: async () => text, headers: { get: () => null } };
  };
  w.env = {
    fetch: w.fetch, WebSocket: FakeWebSocket, EventSource: FakeEventSource,
    setTimeout: (fn, ms) => { w.timers.push({ fn, ms }); return w.timers.length; },
    clearTimeout: (id) => { if (w.timers[id - 1]) w.timers[id - 1].fn = () => {}; },
    now: () => w.now, random: () => 0.5, location: { protocol: "http:", host: "h:1" },
  };
  w.runTimers = async () => { const due = w.timers.splice(0); for (const t of due) t.fn(); await settle(); };
  return w;
}

const settle = () => new Promise((resolve) => setImmediate(resolve));
const envelope = (id, time = 999_990) => ({ id, topic: "t", event: "message", data: id, time });

test("delivers in order, drops duplicates, tracks the cursor and latency", async () => {
  const w = world();
  const sub = connect({ topic: "t", transport: "ws", after: 0, env: w.env });
  const got = [];
  sub.on("message", (m) => got.push(m.id));
  await settle();
  const socket = w.sockets[0];
  assert.equal(socket.url, "ws://h:1/topics/t/ws?after=0");
  socket.open();
  for (const id of [1, 2, 2, 3, 1]) socket.frame(envelope(id));
  assert.deepEqual(got, [1, 2, 3]);
  assert.equal(sub.cursor, 3);
  assert.equal(sub.stats.messages, 3);
  assert.equal(sub.stats.duplicates, 2);
  assert.deepEqual(sub.stats.latencies, [10, 10, 10]);
  assert.equal(sub.stats.requests, 1);
  assert.ok(sub.stats.bytes > 0);
});

test("starts from now: learns the topic's last id before opening a transport", async () => {
  const w = world({ topicLastId: 41 });
  const sub = connect({ topic: "t", transport: "sse", env: w.env });
  await settle();
  assert.equal(w.requests[0], "/topics/t");
  assert.equal(w.sources[0].url, "/topics/t/sse?after=41");
  assert.equal(sub.stats.requests, 2);
});

test("switchTo resumes the new transport from the cursor and ignores the old one", async () => {
  const w = world();
  const sub = connect({ topic: "t", transport: "ws", after: 5, env: w.env });
  const got = [];
  sub.on("message", (m) => got.push(m.id));
  await settle();
  const socket = w.sockets[0];
  socket.open();
  socket.frame(envelope(6));
  sub.switchTo("longpoll");
  assert.ok(socket.closed);
  socket.frame(envelope(7)); // a late frame from the old transport is not delivered
  await settle();
  const longPolls = w.requests.filter((u) => u.includes("/longpoll"));
  assert.match(longPolls[0], /\/topics\/t\/longpoll\?after=6&timeout=0$/, "the first long poll checks the way");
  assert.match(longPolls[1], /\/topics\/t\/longpoll\?after=6&timeout=25$/, "then it parks");
  sub.switchTo("sse");
  assert.equal(w.sources[0].url, "/topics/t/sse?after=6");
  w.sources[0].emit("message", envelope(7), "7");
  assert.deepEqual(got, [6, 7]);
});

test("truncated and reset signals move the cursor", async () => {
  const w = world();
  const sub = connect({ topic: "t", transport: "ws", after: 3, env: w.env });
  const signals = [];
  sub.on("signal", (s) => signals.push(s.type));
  await settle();
  const socket = w.sockets[0];
  socket.frame({ type: "truncated", topic: "t", oldest_id: 10 });
  assert.equal(sub.cursor, 9);
  socket.frame(envelope(10));
  socket.frame({ type: "reset", topic: "t", last_id: 2 });
  assert.equal(sub.cursor, 0);
  socket.frame(envelope(1));
  assert.equal(sub.cursor, 1);
  assert.deepEqual(signals, ["truncated", "reset"]);
});

test("reconnects with capped exponential backoff and jitter, resetting after success", async () => {
  const w = world();
  const sub = connect({ topic: "t", transport: "ws", after: 0, backoff: { initial: 100, max: 400 }, env: w.env });
  const statuses = [];
  sub.on("status", (s) => statuses.push(s));
  await settle();
  w.sockets[0].open();
  w.sockets[0].drop();
  const delays = [];
  for (let i = 0; i < 4; i++) {
    delays.push(statuses.at(-1).delay);
    await w.runTimers();
    w.sockets.at(-1).drop(); // fails again before opening
  }
  // random() = 0.5 gives 75% of the ceiling: 100, 200, 400, 400 (capped).
  assert.deepEqual(delays, [75, 150, 300, 300]);
  assert.equal(statuses.at(-1).state, "reconnecting");
  await w.runTimers();
  w.sockets.at(-1).open();
  assert.equal(sub.attempt, 0);
  assert.equal(statuses.at(-1).state, "open");
  assert.equal(w.sockets.at(-1).url, "ws://h:1/topics/t/ws?after=0");
});

test("jitter stays within half to all of the ceiling", () => {
  assert.equal(backoffDelay(1, { initial: 1000, max: 8000 }, () => 0), 500);
  assert.equal(backoffDelay(1, { initial: 1000, max: 8000 }, () => 1), 1000);
  assert.equal(backoffDelay(10, { initial: 1000, max: 8000 }, () => 1), 8000);
});

test("auto falls back ws -> sse -> stream -> longpoll -> poll when a transport never opens", async () => {
  const w = world({ pollAnswers: [new Error("refused"), new Error("refused")] });
  const sub = connect({ topic: "t", transport: "auto", after: 0, env: w.env });
  const states = [];
  sub.on("status", (s) => states.push(`${s.state}:${s.transport}`));
  await settle();
  assert.deepEqual(TRANSPORTS, ["ws", "sse", "stream", "longpoll", "poll"]);
  w.sockets[0].drop(1006); // upgrade refused
  await settle();
  assert.equal(sub.transport, "sse");
  w.sources[0].onerror();
  await settle();
  assert.equal(sub.transport, "poll", "the long poll was refused too");
  assert.match(w.requests.find((u) => u.includes("/longpoll")), /timeout=0/);
  assert.ok(["sse", "stream", "longpoll", "poll"].every((t) => states.includes(`fallback:${t}`)), states.join());
  assert.match(w.requests.at(-1), /\/topics\/t\/poll\?after=0/);
});

test("auto keeps a transport that once worked and reconnects it", async () => {
  const w = world();
  const sub = connect({ topic: "t", transport: "auto", after: 0, env: w.env });
  await settle();
  w.sockets[0].open();
  w.sockets[0].drop();
  assert.equal(sub.transport, "ws");
  await w.runTimers();
  assert.equal(w.sockets.length, 2);
});

test("polls again at once when the answer was full, then waits the interval", async () => {
  const w = world({
    pollAnswers: [
      { messages: [envelope(1), envelope(2)], last_id: 3, next_after: 2, more: true },
      { messages: [envelope(3)], last_id: 3, next_after: 3 },
    ],
  });
  const sub = connect({ topic: "t", transport: "poll", after: 0, pollInterval: 1000, env: w.env });
  const got = [];
  sub.on("message", (m) => got.push(m.id));
  await settle(); await settle();
  assert.deepEqual(got, [1, 2, 3]);
  assert.equal(w.requests.length, 2);
  assert.equal(w.timers.at(-1).ms, 1000);
  sub.close();
  await w.runTimers();
  assert.equal(w.requests.length, 2, "no poll after close");
});

test("stream: reads lines split across chunks, signals, keep-alives, and resumes after its end", async () => {
  const w = world();
  const sub = connect({ topic: "t", transport: "stream", after: 4, env: w.env });
  const got = [];
  const states = [];
  sub.on("message", (m) => got.push(m.id));
  sub.on("status", (s) => states.push(s.state));
  await settle();
  const first = w.streams[0];
  assert.equal(first.url, "/topics/t/stream?after=4");
  const line = (value) => JSON.stringify(value) + "\n";
  const text = line(envelope(5)) + line({ type: "keepalive" }) + line(envelope(6));
  first.send(text.slice(0, 10)); // a line cut between two chunks
  first.send(text.slice(10));
  const rest = line({ type: "truncated", topic: "t", oldest_id: 9 }) + line(envelope(9));
  const expired = line({ type: "expired", code: "token_expired" });
  first.send(rest);
  first.send(expired);
  first.end();
  await settle();
  assert.deepEqual(got, [5, 6, 9]);
  assert.equal(sub.stats.signals, 1);
  assert.equal(sub.stats.bytes, utf8Length(text + rest + expired), "every byte of the body");
  assert.deepEqual(states, ["connecting", "open", "reconnecting"]);
  await w.runTimers();
  assert.equal(w.streams[1].url, "/topics/t/stream?after=9", "resumes from the cursor");
});

test("utf8Length counts bytes", () => {
  assert.equal(utf8Length("abc"), 3);
  assert.equal(utf8Length("é"), 2);
  assert.equal(utf8Length("€"), 3);
  assert.equal(utf8Length("😀"), 4);
});

test("linkBase names the emulated link's host, on this page's port", () => {
  const page = { protocol: "http:", port: "8080" };
  assert.equal(linkBase("direct", "none", page), "");
  assert.equal(linkBase("3g", "none", page), "http://3g.localhost:8080");
  assert.equal(linkBase("flaky", "buffering-proxy", page), "http://flaky--buffering-proxy.localhost:8080");
  assert.equal(linkBase("direct", "no-websocket", { protocol: "http:", port: "" }), "http://lan--no-websocket.localhost");
});

test("a list's cursor encodes as the server's: positions, FNV-1a hashes, varints, base64url", () => {
  // Vectors the Rust server wrote: a,b at 1 and 1; x.* with x.one at 1.
  const two = new ListCursor(["a", "b"]);
  two.saw("a", 1);
  two.saw("b", 1);
  assert.equal(two.encode(), "AgIAAQEA", "version 2: positions in order are left out");
  const pattern = new ListCursor(["x.*"]);
  pattern.saw("x.one", 1);
  assert.equal(pattern.encode(), "AgAAAcP6fkB9Twa5AQ");
  assert.equal(topicHash("foobar"), 0x85944171f73967e8n, "the FNV-1a reference value");
  // Round trip, with an id past 32 bits and a long name.
  const wide = new ListCursor(["a", "n.*"]);
  wide.saw("a", 2 ** 42);
  wide.saw(`n.${"x".repeat(126)}`, 300);
  const back = ListCursor.decode(["a", "n.*"], wide.encode());
  assert.equal(back.idOf("a"), 2 ** 42);
  assert.equal(back.idOf(`n.${"x".repeat(126)}`), 300);
  assert.equal(back.idOf("n.other"), undefined);
  assert.throws(() => ListCursor.decode(["a"], "Aw"), /version/);
  // Version 1, as servers before version 2 wrote it, is still read: a at 1, b at 1.
  const v1 = ListCursor.decode(["a", "b"], "AQIAAQEBAA");
  assert.equal(v1.idOf("a"), 1);
  assert.equal(v1.idOf("b"), 1);
  // Ascending with gaps (topics at 0 left out): a bitmap, the same bytes as the server's
  // (the Rust test listed_positions_in_order_are_left_out checks the same cursor).
  const names = Array.from({ length: 100 }, (_, i) => `t${i}`);
  const sparse = new ListCursor(names);
  for (let i = 1; i < 100; i++) sparse.saw(`t${i}`, 1);
  const sparseBytes = Uint8Array.from(atob(sparse.encode().replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0));
  assert.deepEqual([...sparseBytes.slice(0, 4)], [2, 99, 2, 13]);
  assert.equal(sparseBytes.length, 4 + 13 + 99 + 1);
  const sparseBack = ListCursor.decode(names, sparse.encode());
  assert.deepEqual([sparseBack.idOf("t0"), sparseBack.idOf("t1"), sparseBack.idOf("t99")], [undefined, 1, 1]);
  // Out of order, the positions are given, and read back.
  const shuffled = new ListCursor(["a", "b", "c"]);
  shuffled.saw("c", 5);
  shuffled.saw("a", 7);
  const again = ListCursor.decode(["a", "b", "c"], shuffled.encode());
  assert.deepEqual([again.idOf("a"), again.idOf("b"), again.idOf("c")], [7, undefined, 5]);
});

test("subscribe() follows a list on one connection, per-topic duplicates dropped, and resumes it", async () => {
  const now = new ListCursor(["a", "b"]);
  now.saw("a", 4);
  now.saw("b", 0);
  const w = world({ pollAnswers: [{ messages: [], next_after: now.encode(), topics: {} }] });
  const sub = subscribe(["a", "b"], { transport: "ws", env: w.env });
  const got = [];
  sub.on("message", (m) => got.push(`${m.topic}${m.id}`));
  await settle();
  assert.equal(w.requests[0], "/topics/a,b/poll", "from now: a poll of the list says where now is");
  const socket = w.sockets[0];
  assert.equal(socket.url, `ws://h:1/topics/a,b/ws?after=${now.encode()}`);
  socket.open();
  socket.frame({ type: "cursor", cursor: now.encode() });
  for (const [topic, id] of [["a", 5], ["b", 1], ["a", 5], ["b", 1], ["a", 4], ["b", 2]]) {
    socket.frame({ id, topic, event: "message", data: id, time: 999_990 });
  }
  assert.deepEqual(got, ["a5", "b1", "b2"]);
  assert.equal(sub.stats.duplicates, 3);
  socket.frame({ type: "truncated", topic: "b", oldest_id: 9 });
  sub.switchTo("sse");
  const resumed = ListCursor.decode(["a", "b"], decodeURIComponent(w.sources[0].url.split("after=")[1]));
  assert.equal(resumed.idOf("a"), 5);
  assert.equal(resumed.idOf("b"), 8, "a truncated signal moves its topic's cursor");
  const pattern = subscribe("room.*", { transport: "poll", after: 0, env: w.env });
  await settle();
  assert.match(w.requests.at(-1), /\/topics\/room\.\*\/poll\?after=AgAAAA$/, "after 0: an empty cursor");
  pattern.close();
  sub.close();
});

test("presence: names the subscriber on every transport, passes envelopes on, keeps the cursor", async () => {
  const w = world();
  const diff = { type: "presence", topic: "t", joins: [{ id: "n~1/0", client: "bo" }], leaves: [] };
  const heard = [];
  const got = [];
  const sse = connect({ topic: "t", transport: "sse", after: 3, client: "ann", presence: true, env: w.env });
  sse.on("presence", (d) => heard.push(["sse", d.joins[0].client]));
  sse.on("message", (m) => got.push(m.id));
  const ws = connect({ topic: "t", transport: "ws", after: 3, client: "ann", presence: true, env: w.env });
  ws.on("presence", (d) => heard.push(["ws", d.joins[0].client]));
  const stream = connect({ topic: "t", transport: "stream", after: 3, presence: true, env: w.env });
  stream.on("presence", (d) => heard.push(["stream", d.joins[0].client]));
  const poll = connect({ topic: "t", transport: "poll", after: 3, client: "a b", env: w.env });
  await settle();
  assert.equal(w.sources[0].url, "/topics/t/sse?after=3&client=ann&presence=1");
  assert.equal(w.sockets[0].url, "ws://h:1/topics/t/ws?after=3&client=ann&presence=1");
  assert.equal(w.streams[0].url, "/topics/t/stream?after=3&presence=1", "anonymous: no client=");
  assert.ok(w.requests.some((u) => u === "/topics/t/poll?after=3&client=a%20b"), w.requests.join());
  w.sources[0].emit("presence", diff);
  w.sources[0].emit("message", envelope(4), "4");
  w.sockets[0].frame(diff);
  w.streams[0].send(JSON.stringify(diff) + "\n");
  await settle();
  assert.deepEqual(heard, [["sse", "bo"], ["ws", "bo"], ["stream", "bo"]]);
  assert.deepEqual(got, [4]);
  assert.equal(sse.cursor, 4, "a presence envelope is not a message: the cursor is the message's");
  assert.equal(ws.stats.messages, 0);
  for (const sub of [sse, ws, stream, poll]) sub.close();
});
