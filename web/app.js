// The demo room: one subscription at a time, over the transport picked. Every transport
// resumes from `cursor` (the last message id shown), so switching loses and repeats nothing.

const $ = (id) => document.getElementById(id);
const list = $("messages");
let cursor = 0; // ids are per topic; 0 asks for the oldest retained message
let current = null;

document.querySelectorAll(".host").forEach((el) => { el.textContent = location.host; });

function show(envelope, transport) {
  if (envelope.id <= cursor) return; // already shown (a transport may overlap on switch)
  cursor = envelope.id;
  const data = envelope.data;
  const text = typeof data === "object" && data !== null && "text" in data
    ? `${data.user ?? "?"}: ${data.text}` : JSON.stringify(data);
  const item = document.createElement("li");
  const latency = Date.now() - envelope.time;
  item.innerHTML = `<span class="tag ${transport}"></span><span class="body"></span><span class="meta"></span>`;
  item.querySelector(".tag").textContent = transport;
  item.querySelector(".body").textContent = text;
  item.querySelector(".meta").textContent = `#${envelope.id} · ${latency} ms`;
  list.append(item);
  list.scrollTop = list.scrollHeight;
}

function signal(sig) {
  const item = document.createElement("li");
  item.className = "signal";
  if (sig.type === "reset") {
    cursor = 0;
    item.textContent = `topic restarted (now at #${sig.last_id}): reading from the start`;
  } else {
    cursor = sig.oldest_id - 1;
    item.textContent = `history no longer holds what you missed: continuing from #${sig.oldest_id}`;
  }
  list.append(item);
}

function status(text) { $("status").textContent = text; }

const base = () => `/topics/${encodeURIComponent($("topic").value)}`;

function polling(kind) {
  let stopped = false;
  const controller = new AbortController();
  (async () => {
    while (!stopped) {
      const query = kind === "poll" ? `after=${cursor}` : `after=${cursor}&timeout=25`;
      try {
        const response = await fetch(`${base()}/${kind}?${query}`, { signal: controller.signal });
        const body = await response.json();
        if (!response.ok) { status(`error: ${body.error}`); return; }
        if (body.reset) signal({ type: "reset", last_id: body.last_id });
        if (body.truncated) signal({ type: "truncated", oldest_id: body.oldest_id });
        body.messages.forEach((m) => show(m, kind));
        status(`${kind}: at #${cursor}`);
        if (kind === "poll" && !body.more) await new Promise((r) => setTimeout(r, 1000));
      } catch (e) {
        if (stopped) return;
        status(`${kind}: retrying (${e.message})`);
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  })();
  return () => { stopped = true; controller.abort(); };
}

function sse() {
  const source = new EventSource(`${base()}/sse?after=${cursor}`);
  source.onopen = () => status(`sse: open from #${cursor}`);
  source.onerror = () => status("sse: reconnecting…");
  source.addEventListener("message", (e) => show(JSON.parse(e.data), "sse"));
  source.addEventListener("truncated", (e) => signal(JSON.parse(e.data)));
  source.addEventListener("reset", (e) => signal(JSON.parse(e.data)));
  return () => source.close();
}

function ws() {
  let socket;
  let stopped = false;
  const open = () => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}${base()}/ws?after=${cursor}`);
    socket.onopen = () => status(`ws: open from #${cursor}`);
    socket.onmessage = (e) => {
      const frame = JSON.parse(e.data);
      if (!frame.type) show(frame, "ws");
      else if (frame.type === "truncated" || frame.type === "reset") signal(frame);
    };
    socket.onclose = () => {
      if (stopped) return;
      status("ws: reconnecting…");
      setTimeout(open, 1000);
    };
  };
  open();
  return () => { stopped = true; socket.close(); };
}

const transports = { poll: () => polling("poll"), longpoll: () => polling("longpoll"), sse, ws };

function connect() {
  if (current) current();
  const picked = document.querySelector("input[name=transport]:checked").value;
  current = transports[picked]();
}

$("transports").addEventListener("change", connect);
$("topic").addEventListener("change", () => {
  if (!$("topic").checkValidity()) return;
  cursor = 0;
  list.replaceChildren();
  connect();
});
$("publish").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("text").value;
  const response = await fetch(base(), {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user: $("name").value || "guest", text }),
  });
  if (response.ok) $("text").value = "";
  else status(`publish failed: ${(await response.json()).error}`);
});

connect();
