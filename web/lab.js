// The comparison lab: five subscriptions to one topic, one per lane, fed by one generator.
// Each generated message carries {run, seq}; a lane checks the sequence numbers it receives
// against those the server acknowledged, so "missing" and "duplicates" are measured, not
// assumed.
import { connect, linkBase } from "/pushhub.js";

const $ = (id) => document.getElementById(id);
const topic = new URLSearchParams(location.search).get("topic") ?? "lab";
const run = Math.random().toString(36).slice(2, 10);
const NAMES = { ws: "WebSocket", sse: "SSE", stream: "HTTP stream", longpoll: "Long poll", poll: "Short poll", auto: "Auto" };
const COLORS = { ws: "#2f6fdb", sse: "#2e9d5b", stream: "#6b46c1", longpoll: "#b7791f", poll: "#9b2c2c", auto: "#4a5568" };
const TRANSPORTS = ["ws", "sse", "stream", "longpoll", "poll"];
const CHART_POINTS = 120; // one per 500 ms: the last minute
const CHART_MIN_POINTS = 20; // the axis spans at least 10 s
const settings = { pollInterval: 1000, longPollTimeout: 25 };
/** What `GET /links` says: whether lanes can use emulated links, and which. */
let linkInfo = { enabled: false, profiles: [], middleboxes: [] };


/** The server's latest `GET /stats`. */
let serverStats = null;

/** Wire bytes per delivery of `transport` as the server counts them: bodies and HTTP heads. */
function serverBytesPerDelivery(transport) {
  const deliveries = serverStats?.deliveries?.[transport] ?? 0;
  if (!deliveries) return null;
  return (serverStats.bytes[transport] + (serverStats.head_bytes?.[transport] ?? 0)) / deliveries;
}

/** seq -> time the server acknowledged it. */
const acked = new Map();
let nextSeq = 0;
let failed = 0;
let startCursor = 0;

const percentile = (sorted, p) => sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] : null;
const ms = (v) => (v === null ? "–" : v < 10 ? `${v.toFixed(1)} ms` : `${Math.round(v)} ms`);
const bytes = (v) => (v >= 1e6 ? `${(v / 1e6).toFixed(2)} MB` : v >= 1e4 ? `${(v / 1e3).toFixed(1)} kB` : `${v} B`);

class Lane {
  constructor(index, transport) {
    this.index = index;
    this.transport = transport;
    this.subscription = null;
    this.cursor = null;
    this.seen = new Set();
    this.received = 0;
    this.repeated = 0;
    this.resets = 0;
    this.truncations = 0;
    this.latencies = [];
    this.recent = [];
    this.points = [];
    this.folded = { requests: 0, bytes: 0, duplicates: 0 };
    this.status = "off";
    this.link = "direct";
    this.via = "none";
    this.el = $("lane-template").content.firstElementChild.cloneNode(true);
    this.el.dataset.lane = index;
    const toggle = this.el.querySelector("input[type=checkbox]");
    const select = this.el.querySelector('[data-select="transport"]');
    select.value = transport;
    toggle.addEventListener("change", () => (toggle.checked ? this.start() : this.stop()));
    select.addEventListener("change", () => this.switchTo(select.value));
    const link = this.el.querySelector('[data-select="link"]');
    const via = this.el.querySelector('[data-select="via"]');
    link.addEventListener("change", () => this.moveTo(link.value, this.via));
    via.addEventListener("change", () => this.moveTo(this.link, via.value));
    $("lanes").append(this.el);
  }

  /** Fills the link and middlebox selectors from `GET /links`. */
  offerLinks(info) {
    const link = this.el.querySelector('[data-select="link"]');
    const via = this.el.querySelector('[data-select="via"]');
    for (const p of info.profiles) {
      const option = new Option(p.name, p.name);
      option.title = p.description;
      link.add(option);
    }
    for (const m of info.middleboxes) via.add(new Option(m, m));
    link.disabled = via.disabled = !info.enabled;
  }

  /** Puts the lane on another link: it reconnects there from its last message id. */
  moveTo(link, via) {
    this.link = link;
    this.via = via;
    this.el.querySelector('[data-select="link"]').value = link;
    this.el.querySelector('[data-select="via"]').value = via;
    if (this.subscription) {
      this.stop();
      this.start();
    }
  }

  /** The lane's link in words: "3g", "3g behind buffering-proxy", "direct". */
  linkName() {
    return this.via === "none" ? this.link : `${this.link === "direct" ? "lan" : this.link} behind ${this.via}`;
  }

  start() {
    const sub = connect({
      base: linkBase(this.link, this.via, location),
      topic, transport: this.transport, after: this.cursor ?? startCursor,
      pollInterval: settings.pollInterval, longPollTimeout: settings.longPollTimeout,
      backoff: { initial: 300, max: 3000 },
    });
    sub.on("message", (m) => this.onMessage(m));
    sub.on("signal", (s) => (s.type === "reset" ? this.resets++ : this.truncations++));
    sub.on("status", (s) => {
      this.state = s.state;
      this.current = s.transport ?? this.current;
      this.status = s.state === "reconnecting" ? `reconnecting in ${s.delay} ms (${s.reason})`
        : s.state === "fallback" ? `fell back from ${s.from}` : `${s.state}${s.state === "open" ? ` from #${s.after}` : ""}`;
    });
    this.subscription = sub;
    this.state = "connecting";
  }

  stop() {
    const sub = this.subscription;
    if (!sub) return;
    this.cursor = sub.cursor;
    this.folded.requests += sub.stats.requests;
    this.folded.bytes += sub.stats.bytes;
    this.folded.duplicates += sub.stats.duplicates;
    sub.close();
    this.subscription = null;
    this.state = "off";
    this.status = `off at #${this.cursor}`;
  }

  switchTo(transport) {
    this.transport = transport;
    this.subscription?.switchTo(transport);
  }

  onMessage(message) {
    this.received++;
    const latency = Date.now() - message.time;
    this.latencies.push(latency);
    if (this.latencies.length > 20000) this.latencies.shift();
    this.recent.push(latency);
    const data = message.data;
    if (data && data.run === run) {
      if (this.seen.has(data.seq)) this.repeated++;
      else this.seen.add(data.seq);
    }
  }

  figures(now) {
    const sub = this.subscription;
    const requests = this.folded.requests + (sub?.stats.requests ?? 0);
    const sent = this.folded.bytes + (sub?.stats.bytes ?? 0);
    const duplicates = this.repeated + this.folded.duplicates + (sub?.stats.duplicates ?? 0);
    // A message counts as missing once it is older than the slowest transport's normal delay.
    const grace = settings.pollInterval + 2000;
    let missing = 0;
    for (const [seq, at] of acked) if (now - at > grace && !this.seen.has(seq)) missing++;
    const sorted = [...this.latencies].sort((a, b) => a - b);
    return {
      received: this.received, missing, duplicates, requests, bytes: sent,
      p50: percentile(sorted, 0.5), p95: percentile(sorted, 0.95), max: sorted.at(-1) ?? null,
    };
  }

  render(now) {
    const f = this.figures(now);
    const set = (field, text) => { this.el.querySelector(`[data-field="${field}"]`).textContent = text; };
    this.el.dataset.state = this.state ?? "off";
    this.el.style.setProperty("--lane-color", COLORS[this.transport]);
    const current = this.transport === "auto" && this.subscription?.transport
      ? `Auto → ${NAMES[this.subscription.transport] ?? this.subscription.transport}` : NAMES[this.transport];
    this.el.querySelector(".name").textContent = current;
    this.el.dataset.link = this.link;
    this.el.dataset.via = this.via;
    this.el.querySelector(".status").textContent = this.status;
    set("received", f.received);
    set("missing", f.missing);
    set("duplicates", f.duplicates);
    this.el.querySelector('[data-field="missing"]').classList.toggle("bad", f.missing > 0);
    this.el.querySelector('[data-field="duplicates"]').classList.toggle("bad", f.duplicates > 0);
    set("p50", ms(f.p50));
    set("p95", ms(f.p95));
    set("max", ms(f.max));
    set("requests", f.requests);
    set("bytes", bytes(f.bytes));
    set("bytes-per-message", f.received ? `${Math.round(f.bytes / f.received)} B` : "–");
    const wire = serverBytesPerDelivery(this.subscription?.transport ?? this.transport);
    set("server-bytes-per-message", wire === null ? "–" : `${Math.round(wire)} B`);
    set("requests-per-message", f.received ? (f.requests / f.received).toFixed(3) : "–");
    set("signals", `${this.resets} / ${this.truncations}`);
  }

  samplePoint() {
    const sorted = this.recent.sort((a, b) => a - b);
    this.points.push(this.subscription ? percentile(sorted, 0.5) : null);
    if (this.points.length > CHART_POINTS) this.points.shift();
    this.recent = [];
  }
}

const lanes = TRANSPORTS.map((t, i) => new Lane(i, t));

// Publishing
async function publishOne() {
  const seq = ++nextSeq;
  try {
    const response = await fetch(`/topics/${topic}`, {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ run, seq }),
    });
    if (response.ok) acked.set(seq, Date.now());
    else failed++;
  } catch {
    failed++;
  }
}

// The generator publishes over one WebSocket (`/ws`), each message a `publish` frame whose
// `ref` is its sequence number, acknowledged by an `ack` frame: no HTTP request per message,
// and up to WINDOW messages in flight, so 1,000 and 5,000 msg/s are real rates. What held a
// run back, when it fell short, is said: the acknowledgements (server or socket), or the
// page itself (its main thread, busy rendering).
const WINDOW = 2000;
let publisher = null;

/** The generator's WebSocket, opened once and reopened if it closes. */
function publisherSocket() {
  if (publisher && publisher.socket.readyState <= WebSocket.OPEN) return publisher;
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`);
  const pending = new Map();
  const ready = new Promise((resolve, reject) => {
    socket.onopen = resolve;
    socket.onerror = () => reject(new Error("the generator's WebSocket failed"));
  });
  socket.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    if (!pending.has(frame.ref)) return;
    pending.delete(frame.ref);
    if (frame.type === "ack") acked.set(frame.ref, Date.now());
    else failed++;
  };
  socket.onclose = () => {
    failed += pending.size;
    pending.clear();
    if (publisher?.socket === socket) publisher = null;
  };
  publisher = { socket, ready, pending };
  return publisher;
}

let generator = null;
async function generate(rate, seconds) {
  const started = performance.now();
  const total = Math.round(rate * seconds);
  let sent = 0;
  // Why the run fell behind its schedule, when it did: the window of acks was full, or the
  // page's timer came late (a busy main thread).
  const limits = { window: 0, page: 0 };
  generator = { stop: false, started, sent: () => sent, rate, limits };
  $("generator").dataset.running = "true";
  $("generate").textContent = "Stop generator";
  $("generator-limit").textContent = "";
  let link = publisherSocket();
  let last = performance.now();
  while (!generator.stop && sent < total) {
    const now = performance.now();
    if (now - last > 50) limits.page++;
    last = now;
    const due = Math.min(total, Math.floor(((now - started) * rate) / 1000) + 1);
    if (link.socket.readyState !== WebSocket.OPEN) {
      // Time spent reconnecting is not the page being slow.
      last = Infinity;
      // Not connected (yet, or the server went away): what falls due meanwhile fails, as a
      // refused publish would; reconnect and go on.
      try {
        link = publisherSocket();
        await link.ready;
      } catch {
        failed += due - sent;
        sent = due;
        link = { socket: { readyState: WebSocket.CLOSED } };
        publisher = null;
        await new Promise((r) => setTimeout(r, 200));
      }
      continue;
    }
    const { socket, pending } = link;
    while (sent < due && pending.size < WINDOW) {
      const seq = ++nextSeq;
      pending.set(seq, true);
      socket.send(JSON.stringify({ type: "publish", topic, data: { run, seq }, ref: seq }));
      sent++;
    }
    if (sent < due && pending.size >= WINDOW) limits.window++;
    await new Promise((r) => setTimeout(r, 4));
  }
  // The rate the sending kept, before waiting for the last acknowledgements.
  const achieved = sent / ((performance.now() - started) / 1000);
  const deadline = performance.now() + 5000;
  while ((publisher?.pending.size ?? 0) > 0 && performance.now() < deadline) {
    await new Promise((r) => setTimeout(r, 10));
  }
  if (achieved < 0.9 * rate) {
    $("generator-limit").textContent = limits.window >= limits.page
      ? `${Math.round(achieved)} of ${rate} msg/s: held back by acknowledgements (${WINDOW} in flight): the server or its socket is the limit`
      : `${Math.round(achieved)} of ${rate} msg/s: this page is the limit (its main thread came late ${limits.page} times)`;
  }
  generator = null;
  $("generator").dataset.running = "false";
  $("generate").textContent = "Start generator";
}

$("send-one").addEventListener("click", publishOne);
$("generate").addEventListener("click", () => {
  if (generator) generator.stop = true;
  else generate(Number($("rate").value), Number($("duration").value));
});
$("poll-interval").addEventListener("input", (e) => {
  settings.pollInterval = Number(e.target.value);
  $("poll-interval-value").textContent = `${settings.pollInterval} ms`;
  for (const lane of lanes) if (lane.subscription) lane.subscription.pollInterval = settings.pollInterval;
});
$("longpoll-timeout").addEventListener("change", (e) => {
  settings.longPollTimeout = Math.min(120, Math.max(1, Number(e.target.value) || 25));
  for (const lane of lanes) if (lane.subscription) lane.subscription.longPollTimeout = settings.longPollTimeout;
});

// Chart: median latency per half second, per lane, on a log scale from 1 ms to 10 s. The time
// axis spans the samples taken so far (at least 10 s, at most the last minute), labelled in
// seconds before now; the legend says which transport and link each line is.
let samples = 0;
function drawChart() {
  const canvas = $("chart");
  const dpr = devicePixelRatio;
  const width = (canvas.width = canvas.clientWidth * dpr);
  const height = (canvas.height = 240 * dpr);
  const ctx = canvas.getContext("2d");
  const left = 48 * dpr;
  const bottom = 22 * dpr;
  const plot = height - bottom;
  const y = (v) => plot - ((Math.log10(Math.max(1, Math.min(10000, v)))) / 4) * (plot - 20 * dpr) - 10 * dpr;
  ctx.clearRect(0, 0, width, height);
  ctx.font = `${11 * dpr}px system-ui`;
  ctx.fillStyle = "#6b7685";
  ctx.strokeStyle = "#eef0f3";
  for (const v of [1, 10, 100, 1000, 10000]) {
    ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(width, y(v)); ctx.stroke();
    ctx.fillText(v >= 1000 ? `${v / 1000} s` : `${v} ms`, 2, y(v) + 4);
  }
  // The window: the samples kept, fitted to the width.
  const span = Math.max(CHART_MIN_POINTS, Math.min(CHART_POINTS, samples));
  const step = (width - left - 8 * dpr) / (span - 1);
  const x = (age) => width - 8 * dpr - age * step; // age: samples before the newest
  const seconds = span / 2;
  const tick = seconds <= 15 ? 2 : seconds <= 30 ? 5 : 10;
  ctx.textAlign = "center";
  for (let s = 0; s * 2 <= span - 1; s += tick) {
    const at = x(s * 2);
    ctx.beginPath(); ctx.moveTo(at, plot); ctx.lineTo(at, plot + 4 * dpr); ctx.stroke();
    ctx.textAlign = s === 0 ? "right" : "center";
    ctx.fillText(s === 0 ? "now" : `−${s} s`, s === 0 ? at + 6 * dpr : at, plot + 16 * dpr);
  }
  ctx.textAlign = "start";
  for (const lane of lanes) {
    ctx.strokeStyle = COLORS[lane.transport];
    ctx.lineWidth = 2 * dpr;
    ctx.setLineDash(lane.link === "direct" && lane.via === "none" ? [] : [6 * dpr, 3 * dpr]);
    ctx.beginPath();
    let pen = false;
    ctx.fillStyle = COLORS[lane.transport];
    const n = lane.points.length;
    lane.points.forEach((v, i) => {
      const age = n - 1 - i;
      if (v === null || age >= span) { pen = false; return; }
      if (pen) ctx.lineTo(x(age), y(v)); else ctx.moveTo(x(age), y(v));
      // A dot too: short polls deliver in bursts, so their points often stand alone.
      const r = 2.5 * dpr;
      ctx.fillRect(x(age) - r, y(v) - r, 2 * r, 2 * r);
      pen = true;
    });
    ctx.stroke();
  }
  ctx.setLineDash([]);
  const legend = lanes.map((lane) =>
    `<li style="--lane-color:${COLORS[lane.transport]}" data-lane="${lane.index}">` +
    `${NAMES[lane.transport]} <small>on ${lane.linkName()}</small></li>`).join("");
  if ($("legend").innerHTML !== legend) $("legend").innerHTML = legend;
}

// Server view
async function refreshServer() {
  try {
    const stats = await (await fetch("/stats", { cache: "no-store" })).json();
    serverStats = stats;
    for (const row of ["subscribers", "deliveries", "requests", "bytes", "head_bytes", "wire_per_message"]) {
      const cells = document.querySelectorAll(`#server tr[data-row="${row}"] td`);
      TRANSPORTS.forEach((t, i) => {
        if (row === "wire_per_message") {
          const wire = serverBytesPerDelivery(t);
          cells[i].textContent = wire === null ? "–" : `${Math.round(wire)} B`;
        } else {
          cells[i].textContent = row.endsWith("bytes") ? bytes(stats[row][t]) : stats[row][t];
        }
      });
    }
    $("server-status").textContent = `${stats.topics} topics, ${stats.publishes} messages published since start`;
  } catch {
    $("server-status").textContent = "server unreachable";
  }
}

/** Which lane wins on latency, bytes and requests, in words. */
export function verdict(rows) {
  const live = rows.filter((r) => r.received > 0);
  if (live.length === 0) return "Start the generator to compare the lanes.";
  const best = (key) => live.reduce((a, b) => (b[key] < a[key] ? b : a));
  const fastest = best("p50");
  const leanest = best("bytesPerMessage");
  const fewest = best("requestsPerMessage");
  const parts = [
    `Fastest: ${fastest.label} (median ${ms(fastest.p50)}).`,
    `Fewest bytes per message: ${leanest.label} (${Math.round(leanest.bytesPerMessage)} B, as the page counts them).`,
    `Fewest requests per message: ${fewest.label} (${fewest.requestsPerMessage.toFixed(3)}).`,
  ];
  const troubled = rows.filter((r) => r.missing > 0 || r.duplicates > 0);
  if (troubled.length) {
    parts.push(`Not clean: ${troubled.map((r) => `${r.label} (${r.missing} missing, ${r.duplicates} repeated)`).join("; ")}.`);
  }
  return parts.join(" ");
}

function render() {
  const now = Date.now();
  for (const lane of lanes) lane.render(now);
  $("verdict").textContent = verdict(lanes.filter((lane) => lane.subscription).map((lane) => {
    const f = lane.figures(now);
    return {
      label: `${NAMES[lane.subscription?.transport ?? lane.transport]} on ${lane.linkName()}`,
      received: f.received, missing: f.missing, duplicates: f.duplicates, p50: f.p50 ?? Infinity,
      bytesPerMessage: f.received ? f.bytes / f.received : Infinity,
      requestsPerMessage: f.received ? f.requests / f.received : Infinity,
    };
  }));
  $("acked").textContent = acked.size;
  $("failed").textContent = failed;
  if (generator) {
    const seconds = (performance.now() - generator.started) / 1000;
    $("actual-rate").textContent = seconds > 0 ? Math.round(generator.sent() / seconds) : 0;
  }
}

$("topic").textContent = topic;
try {
  linkInfo = await (await fetch("/links")).json();
} catch {
  linkInfo = { enabled: false, profiles: [], middleboxes: [] };
}
const loopback = /^(127\.|localhost$|\[::1\]$)/.test(location.hostname) || location.hostname === "::1";
// Link hosts are served on plain HTTP only (a TLS connection is not put on a link).
const plain = location.protocol === "http:";
if (!linkInfo.enabled || !loopback || !plain) {
  linkInfo.enabled = false;
  $("links-hint").hidden = false;
  $("links-hint").textContent = !loopback || !plain
    ? "Emulated links need the lab opened on this machine over plain HTTP (http://127.0.0.1 or http://localhost): they use *.localhost host names."
    : "Emulated links are off on this server (--link-hosts off).";
}
for (const lane of lanes) lane.offerLinks(linkInfo);
try {
  startCursor = (await (await fetch(`/topics/${topic}`)).json()).last_id;
} catch {
  startCursor = 0;
}
for (const lane of lanes) lane.start();
setInterval(render, 250);
setInterval(() => { for (const lane of lanes) lane.samplePoint(); samples++; drawChart(); }, 500);
setInterval(refreshServer, 1000);
refreshServer();
render();
// For tests and the curious: the lab's state.
window.lab = { lanes, acked, topic, run, linkInfo };
