// The comparison lab: five subscriptions to one topic, one per lane, fed by one generator.
// Each generated message carries {run, seq}; a lane checks the sequence numbers it receives
// against those the server acknowledged, so "missing" and "duplicates" are measured, not
// assumed.
import { connect } from "/pushhub.js";

const $ = (id) => document.getElementById(id);
const topic = new URLSearchParams(location.search).get("topic") ?? "lab";
const run = Math.random().toString(36).slice(2, 10);
const NAMES = { ws: "WebSocket", sse: "SSE", stream: "HTTP stream", longpoll: "Long poll", poll: "Short poll" };
const COLORS = { ws: "#2f6fdb", sse: "#2e9d5b", stream: "#6b46c1", longpoll: "#b7791f", poll: "#9b2c2c" };
const TRANSPORTS = ["ws", "sse", "stream", "longpoll", "poll"];
const CHART_POINTS = 120; // one per 500 ms: the last minute
const settings = { pollInterval: 1000, longPollTimeout: 25 };

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
    this.el = $("lane-template").content.firstElementChild.cloneNode(true);
    this.el.dataset.lane = index;
    const toggle = this.el.querySelector("input[type=checkbox]");
    const select = this.el.querySelector("select");
    select.value = transport;
    toggle.addEventListener("change", () => (toggle.checked ? this.start() : this.stop()));
    select.addEventListener("change", () => this.switchTo(select.value));
    $("lanes").append(this.el);
  }

  start() {
    const sub = connect({
      topic, transport: this.transport, after: this.cursor ?? startCursor,
      pollInterval: settings.pollInterval, longPollTimeout: settings.longPollTimeout,
      backoff: { initial: 300, max: 3000 },
    });
    sub.on("message", (m) => this.onMessage(m));
    sub.on("signal", (s) => (s.type === "reset" ? this.resets++ : this.truncations++));
    sub.on("status", (s) => {
      this.state = s.state;
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
    this.el.querySelector(".name").textContent = NAMES[this.transport];
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

let generator = null;
async function generate(rate, seconds) {
  const started = performance.now();
  const total = Math.round(rate * seconds);
  const inflight = new Set();
  let sent = 0;
  generator = { stop: false, started, sent: () => sent };
  $("generator").dataset.running = "true";
  $("generate").textContent = "Stop generator";
  while (!generator.stop && sent < total) {
    const due = Math.min(total, Math.floor(((performance.now() - started) * rate) / 1000) + 1);
    // At most 3 publishes in flight: browsers allow 6 HTTP/1.1 connections per host, and
    // the SSE, HTTP stream and long-poll lanes hold one each.
    while (sent < due && inflight.size < 3) {
      const p = publishOne().finally(() => inflight.delete(p));
      inflight.add(p);
      sent++;
    }
    await new Promise((r) => setTimeout(r, inflight.size >= 3 ? 1 : 10));
  }
  await Promise.all(inflight);
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

// Chart: median latency per half second, per lane, on a log scale from 1 ms to 10 s.
function drawChart() {
  const canvas = $("chart");
  const width = (canvas.width = canvas.clientWidth * devicePixelRatio);
  const height = (canvas.height = 220 * devicePixelRatio);
  const ctx = canvas.getContext("2d");
  const left = 48 * devicePixelRatio;
  const y = (v) => height - ((Math.log10(Math.max(1, Math.min(10000, v)))) / 4) * (height - 20) - 10;
  ctx.clearRect(0, 0, width, height);
  ctx.font = `${11 * devicePixelRatio}px system-ui`;
  ctx.fillStyle = "#6b7685";
  ctx.strokeStyle = "#eef0f3";
  for (const v of [1, 10, 100, 1000, 10000]) {
    ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(width, y(v)); ctx.stroke();
    ctx.fillText(v >= 1000 ? `${v / 1000} s` : `${v} ms`, 2, y(v) + 4);
  }
  const step = (width - left) / (CHART_POINTS - 1);
  for (const lane of lanes) {
    ctx.strokeStyle = COLORS[lane.transport];
    ctx.lineWidth = 2 * devicePixelRatio;
    ctx.beginPath();
    let pen = false;
    const offset = CHART_POINTS - lane.points.length;
    ctx.fillStyle = COLORS[lane.transport];
    lane.points.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      const x = left + (offset + i) * step;
      if (pen) ctx.lineTo(x, y(v)); else ctx.moveTo(x, y(v));
      // A dot too: short polls deliver in bursts, so their points often stand alone.
      const r = 2.5 * devicePixelRatio;
      ctx.fillRect(x - r, y(v) - r, 2 * r, 2 * r);
      pen = true;
    });
    ctx.stroke();
  }
}

// Server view
async function refreshServer() {
  try {
    const stats = await (await fetch("/stats", { cache: "no-store" })).json();
    for (const row of ["subscribers", "deliveries", "requests", "bytes"]) {
      const cells = document.querySelectorAll(`#server tr[data-row="${row}"] td`);
      TRANSPORTS.forEach((t, i) => {
        cells[i].textContent = row === "bytes" ? bytes(stats[row][t]) : stats[row][t];
      });
    }
    $("server-status").textContent = `${stats.topics} topics, ${stats.publishes} messages published since start`;
  } catch {
    $("server-status").textContent = "server unreachable";
  }
}

function render() {
  const now = Date.now();
  for (const lane of lanes) lane.render(now);
  $("acked").textContent = acked.size;
  $("failed").textContent = failed;
  if (generator) {
    const seconds = (performance.now() - generator.started) / 1000;
    $("actual-rate").textContent = seconds > 0 ? Math.round(generator.sent() / seconds) : 0;
  }
}

$("topic").textContent = topic;
try {
  startCursor = (await (await fetch(`/topics/${topic}`)).json()).last_id;
} catch {
  startCursor = 0;
}
for (const lane of lanes) lane.start();
setInterval(render, 250);
setInterval(() => { for (const lane of lanes) lane.samplePoint(); drawChart(); }, 500);
setInterval(refreshServer, 1000);
refreshServer();
render();
// For tests and the curious: the lab's state.
window.lab = { lanes, acked, topic, run };
