// The rooms view: each lane follows N rooms, on one connection (a topic list) or one
// connection per room, and shows how many connections the browser holds for it and which
// rooms are flowing. Messages are published over a WebSocket, which the browser's limit of
// 6 HTTP/1.1 connections per host does not count.
import { connect, subscribe } from "/pushhub.js";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const NAMES = { ws: "WebSocket", sse: "SSE", stream: "HTTP stream", longpoll: "Long poll", poll: "Short poll" };
const COLORS = { ws: "#2f6fdb", sse: "#2e9d5b", stream: "#6b46c1", longpoll: "#b7791f", poll: "#9b2c2c" };
/** Rooms are named per page load, so two pages never share one. */
const run = query.get("run") ?? Math.random().toString(36).slice(2, 8);
const roomName = (i) => `room.${run}.${i + 1}`;

$("rooms").value = query.get("rooms") ?? "10";
$("mode").value = query.get("mode") ?? "list";
const chosen = (query.get("lanes") ?? "sse,stream,longpoll").split(",");
for (const transport of Object.keys(NAMES)) {
  const label = document.createElement("label");
  label.innerHTML = `<input type="checkbox" value="${transport}"> ${NAMES[transport]}`;
  label.querySelector("input").checked = chosen.includes(transport);
  $("transports").append(label);
}

/** Counts this page's open connections of a lane: WebSockets, EventSources, fetches. */
class Counted {
  constructor() { this.open = 0; }
  env() {
    const counter = this;
    class CountedWebSocket extends WebSocket {
      constructor(url) {
        super(url);
        counter.open++;
        this.addEventListener("close", () => counter.open--);
      }
    }
    class CountedEventSource extends EventSource {
      constructor(url) { super(url); counter.open++; this.counted = true; }
      close() { if (this.counted) { this.counted = false; counter.open--; } super.close(); }
    }
    const fetchCounted = async (url, init) => {
      counter.open++;
      let response;
      try {
        response = await fetch(url, init);
      } catch (error) {
        counter.open--;
        throw error;
      }
      if (!response.body || init?.method === "HEAD") { counter.open--; return response; }
      // The connection is held until the body is read to its end or cancelled.
      const [mine, theirs] = response.body.tee();
      (async () => {
        const reader = mine.getReader();
        try { while (!(await reader.read()).done); } catch { /* cancelled */ }
        counter.open--;
      })();
      return new Response(theirs, { status: response.status, headers: response.headers });
    };
    return { WebSocket: CountedWebSocket, EventSource: CountedEventSource, fetch: fetchCounted };
  }
}

class RoomLane {
  constructor(transport, rooms, mode) {
    this.transport = transport;
    this.rooms = rooms;
    this.mode = mode;
    this.counted = new Counted();
    this.received = new Array(rooms).fill(0);
    this.seen = new Set();
    this.duplicates = 0;
    this.status = "connecting";
    this.el = $("room-lane-template").content.firstElementChild.cloneNode(true);
    this.el.dataset.transport = transport;
    this.el.style.setProperty("--lane-color", COLORS[transport]);
    this.el.querySelector(".name").textContent = `${NAMES[transport]}: ${rooms} rooms`;
    const list = this.el.querySelector(".rooms");
    this.items = this.received.map((_, i) => {
      const item = document.createElement("li");
      item.dataset.room = i + 1;
      list.append(item);
      return item;
    });
    const names = this.received.map((_, i) => roomName(i));
    const options = { transport, after: 0, pollInterval: 500, env: this.counted.env() };
    const onMessage = (envelope) => {
      const key = `${envelope.topic}/${envelope.id}`;
      if (this.seen.has(key)) { this.duplicates++; return; }
      this.seen.add(key);
      const room = names.indexOf(envelope.topic);
      if (room >= 0) this.received[room]++;
    };
    const onStatus = (s) => { this.status = s.state; };
    this.subscriptions = mode === "list"
      ? [subscribe(names, options)]
      : names.map((name) => connect({ ...options, topic: name }));
    for (const sub of this.subscriptions) sub.on("message", onMessage).on("status", onStatus);
  }

  close() {
    for (const sub of this.subscriptions) sub.close();
    this.el.remove();
  }

  render() {
    const field = (name, value) => { this.el.querySelector(`[data-field="${name}"]`).textContent = value; };
    const flowing = this.received.filter((n) => n > 0).length;
    field("connections", this.counted.open);
    field("flowing", `${flowing} / ${this.rooms}`);
    field("received", this.received.reduce((a, b) => a + b, 0));
    field("duplicates", this.duplicates);
    this.el.querySelector(".status").textContent = this.status;
    this.el.dataset.flowing = flowing;
    this.el.dataset.connections = this.counted.open;
    this.received.forEach((n, i) => {
      this.items[i].textContent = `room ${i + 1}: ${n}`;
      this.items[i].dataset.received = n;
    });
  }
}

let lanes = [];
function restart() {
  for (const lane of lanes) lane.close();
  const rooms = Math.max(1, Math.min(50, Number($("rooms").value) || 10));
  const mode = $("mode").value;
  const transports = [...$("transports").querySelectorAll("input:checked")].map((i) => i.value);
  lanes = transports.map((t) => new RoomLane(t, rooms, mode));
  for (const lane of lanes) $("room-lanes").append(lane.el);
}

let publisher = null;
let published = 0;
/** Publishes one message to every room over the page's WebSocket. */
async function sendToEveryRoom() {
  if (!publisher || publisher.readyState > WebSocket.OPEN) {
    publisher = new WebSocket(`${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`);
    await new Promise((resolve, reject) => { publisher.onopen = resolve; publisher.onerror = reject; });
  }
  const rooms = Math.max(...lanes.map((l) => l.rooms), Number($("rooms").value) || 10);
  for (let i = 0; i < rooms; i++) {
    publisher.send(JSON.stringify({ type: "publish", topic: roomName(i), data: { room: i + 1, at: Date.now() } }));
    published++;
  }
  $("published").textContent = published;
}

$("restart").addEventListener("click", restart);
$("send").addEventListener("click", () => sendToEveryRoom().catch((e) => console.warn(e)));
restart();
setInterval(() => { for (const lane of lanes) lane.render(); }, 200);
// For tests and the curious.
window.rooms = { run, roomName, get lanes() { return lanes; } };
