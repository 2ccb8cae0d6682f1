// pushhub.js: a dependency-free browser client for pushhub.
//
//   import { connect } from "/pushhub.js";
//   const sub = connect({ topic: "chat", transport: "auto" });
//   sub.on("message", (envelope) => console.log(envelope.id, envelope.data));
//   sub.on("status", (s) => console.log(s.state, s.transport));
//   sub.switchTo("sse");   // resumes from the last id delivered: nothing lost or repeated
//   sub.close();
//
// Every transport resumes from `cursor`, the id of the last message delivered, so switching
// transport and reconnecting never lose or repeat a message. See docs/client.md.
//
// Several topics on one connection, on every transport:
//
//   import { subscribe } from "/pushhub.js";
//   const rooms = subscribe(["room.1", "room.2"], { transport: "sse" });   // or "room.*"
//   rooms.on("message", (envelope) => console.log(envelope.topic, envelope.id));
//
// `cursor` is then a ListCursor: one id per topic, sent as the list's cursor string
// (docs/api.md, "The cursor of a list").
//
// Presence: name the subscriber and listen for who joins and leaves (streams; docs/api.md,
// "Presence"):
//
//   const room = connect({ topic: "room", transport: "sse", client: "ann", presence: true });
//   room.on("presence", (diff) => console.log(diff.joins, diff.leaves));

/** Fallback order of `transport: "auto"`. */
export const TRANSPORTS = ["ws", "sse", "stream", "longpoll", "poll"];

/** Latency samples kept per subscription (a ring). */
const LATENCY_SAMPLES = 10000;

/** UTF-8 byte length of a string, without allocating. */
export function utf8Length(text) {
  let bytes = 0;
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    if (code < 0x80) bytes += 1;
    else if (code < 0x800) bytes += 2;
    else if (code >= 0xd800 && code <= 0xdbff) { bytes += 4; i++; } // surrogate pair
    else bytes += 3;
  }
  return bytes;
}

/** Exponential backoff with jitter: attempt 1 waits initial/2..initial, doubling, capped. */
export function backoffDelay(attempt, { initial = 500, max = 10000 } = {}, random = Math.random) {
  const ceiling = Math.min(max, initial * 2 ** Math.max(0, attempt - 1));
  return Math.round(ceiling * (0.5 + random() / 2));
}

/**
 * The origin that puts a subscription on the emulated `link` behind `via`: the server serves
 * `3g.localhost` (and `3g--buffering-proxy.localhost`) through that emulated link, and
 * browsers resolve every `*.localhost` name to this machine. "" (this page's origin) for
 * `direct` and `none`. See `GET /links` and docs/api.md.
 */
export function linkBase(link, via, location) {
  if (link === "direct" && via === "none") return "";
  const label = [link === "direct" ? "lan" : link, ...(via === "none" ? [] : [via])].join("--");
  const port = location.port ? `:${location.port}` : "";
  return `${location.protocol}//${label}.localhost${port}`;
}

/** Opens a subscription; see {@link Subscription}. */
export function connect(options) {
  return new Subscription(options);
}

/**
 * Follows several topics, or a pattern (`"chat.*"`), on one connection of any transport.
 * @param {string[]|string} topics  names and `prefix*` patterns, or one pattern
 * @param {object} [options]  as {@link Subscription}'s, without `topic`
 */
export function subscribe(topics, options = {}) {
  return new Subscription({ ...options, topic: topics });
}

/** Whether a topic argument is a list (several entries, or a pattern). */
function isList(topic) {
  return Array.isArray(topic) || topic.includes(",") || topic.endsWith("*");
}

const FNV_OFFSET = 0xcbf29ce484222325n;
const FNV_PRIME = 0x100000001b3n;
const U64 = (1n << 64n) - 1n;

/** FNV-1a, 64 bits, of a topic name's UTF-8 bytes: how a list's cursor names a pattern's topic. */
export function topicHash(name) {
  let hash = FNV_OFFSET;
  for (const byte of new TextEncoder().encode(name)) hash = ((hash ^ BigInt(byte)) * FNV_PRIME) & U64;
  return hash;
}

function pushVarint(bytes, value) {
  let v = BigInt(value);
  while (v >= 0x80n) { bytes.push(Number(v & 0x7fn) | 0x80); v >>= 7n; }
  bytes.push(Number(v));
}

/**
 * Where each topic of a list stands: listed topics by their position in the list, topics a
 * pattern picked up by {@link topicHash}. Encodes to (and decodes from) the server's cursor
 * string: version 2, then varint n, a shape byte (0: the positions are 0, 1, ..., n - 1 in
 * order; 1: n varint positions follow; 2: varint k and a k-byte bitmap of n ascending
 * positions, bit p of byte p / 8, low bit first) and n varint ids, then varint m and m ×
 * (u64 hash big-endian, varint id), in base64url without padding. Version 1 (n × (varint
 * position, varint id) after n) is still read.
 */
export class ListCursor {
  /** @param {string[]} list  the request's entries, in order */
  constructor(list) {
    this.list = list;
    /** position → last id */
    this.listed = new Map();
    /** hash (BigInt) → last id */
    this.hashed = new Map();
  }

  /** Reads a cursor string the server gave (a stream's `cursor`, an SSE id, `next_after`). */
  static decode(list, text) {
    const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    let at = 0;
    const varint = () => {
      let value = 0n;
      for (let shift = 0n; ; shift += 7n) {
        if (at >= bytes.length) throw new Error("pushhub: cursor cut short");
        const byte = bytes[at++];
        value |= BigInt(byte & 0x7f) << shift;
        if (!(byte & 0x80)) return value;
      }
    };
    const version = bytes[at++];
    if (version !== 1 && version !== 2) throw new Error("pushhub: unknown cursor version");
    const cursor = new ListCursor(list);
    const n = Number(varint());
    if (version === 1) {
      for (let i = 0; i < n; i++) cursor.listed.set(Number(varint()), Number(varint()));
    } else {
      const shape = bytes[at++];
      const positions = [];
      if (shape === 0) for (let i = 0; i < n; i++) positions.push(i);
      else if (shape === 1) for (let i = 0; i < n; i++) positions.push(Number(varint()));
      else if (shape === 2) {
        const k = Number(varint());
        if (at + k > bytes.length) throw new Error("pushhub: cursor cut short");
        for (let p = 0; p < k * 8; p++) if (bytes[at + (p >> 3)] & (1 << (p & 7))) positions.push(p);
        at += k;
        if (positions.length !== n) throw new Error("pushhub: cursor bitmap names another number of topics");
      } else throw new Error("pushhub: unknown cursor shape");
      for (const position of positions) cursor.listed.set(position, Number(varint()));
    }
    for (let m = Number(varint()); m > 0; m--) {
      let hash = 0n;
      for (let i = 0; i < 8; i++) hash = (hash << 8n) | BigInt(bytes[at++]);
      cursor.hashed.set(hash, Number(varint()));
    }
    return cursor;
  }

  /** The cursor string. */
  encode() {
    const bytes = [2];
    pushVarint(bytes, this.listed.size);
    // The shortest shape of the positions, as the server picks it.
    const positions = [...this.listed.keys()];
    const given = [];
    for (const position of positions) pushVarint(given, position);
    const bitmap = positions.length ? Math.floor(positions.at(-1) / 8) + 1 : 0;
    const ascending = positions.every((position, i) => i === 0 || positions[i - 1] < position);
    const sized = [];
    pushVarint(sized, bitmap);
    if (positions.every((position, i) => position === i)) bytes.push(0);
    else if (ascending && bitmap + sized.length < given.length) {
      bytes.push(2, ...sized);
      const bits = new Array(bitmap).fill(0);
      for (const position of positions) bits[position >> 3] |= 1 << (position & 7);
      bytes.push(...bits);
    } else bytes.push(1, ...given);
    for (const id of this.listed.values()) pushVarint(bytes, id);
    pushVarint(bytes, this.hashed.size);
    for (const [hash, id] of this.hashed) {
      for (let shift = 56n; shift >= 0n; shift -= 8n) bytes.push(Number((hash >> shift) & 0xffn));
      pushVarint(bytes, id);
    }
    return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  /** The last id of `topic` known, or undefined. */
  idOf(topic) {
    const position = this.list.indexOf(topic);
    return position >= 0 ? this.listed.get(position) : this.hashed.get(topicHash(topic));
  }

  /** `topic` now stands at `id`. */
  saw(topic, id) {
    const position = this.list.indexOf(topic);
    if (position >= 0) this.listed.set(position, id);
    else this.hashed.set(topicHash(topic), id);
  }
}

export class Subscription {
  /**
   * @param {object} o
   * @param {string} [o.base]  server origin, e.g. "http://127.0.0.1:8080"; "" = this page's
   * @param {string|string[]} o.topic  a topic, or a list of topics and `prefix*` patterns
   *   (`"a,b"`, `["a", "news.*"]`, `"news.*"`) followed on one connection
   * @param {"ws"|"sse"|"stream"|"longpoll"|"poll"|"auto"} [o.transport="auto"]
   * @param {number} [o.after]  resume after this id; default: from now
   * @param {number} [o.pollInterval=1000]  ms between short polls
   * @param {number} [o.longPollTimeout=25]  seconds a long poll may be held
   * @param {string[]} [o.events=["message"]]  SSE event names to listen for
   * @param {{initial:number,max:number}} [o.backoff]  reconnect delays in ms
   * @param {string} [o.client]  the name to be listed under in the topic's presence (a
   *   token's subject wins); without it the subscriber is anonymous (counted, not listed)
   * @param {boolean} [o.presence=false]  receive the topics' presence envelopes (streams)
   * @param {object} [o.env]  fetch, WebSocket, EventSource, setTimeout, clearTimeout, now, random
   */
  constructor({
    base = "", topic, transport = "auto", after, pollInterval = 1000, longPollTimeout = 25,
    events = ["message"], backoff = { initial: 500, max: 10000 }, client, presence = false, env = {},
  }) {
    if (!topic) throw new Error("pushhub: topic is required");
    const g = globalThis;
    this.env = {
      fetch: env.fetch ?? ((...a) => g.fetch(...a)),
      WebSocket: env.WebSocket ?? g.WebSocket,
      EventSource: env.EventSource ?? g.EventSource,
      setTimeout: env.setTimeout ?? ((f, ms) => g.setTimeout(f, ms)),
      clearTimeout: env.clearTimeout ?? ((t) => g.clearTimeout(t)),
      now: env.now ?? (() => Date.now()),
      random: env.random ?? Math.random,
      location: env.location ?? g.location,
    };
    this.base = base.replace(/\/$/, "");
    /** The list's entries (several topics or a pattern), or null for one topic. */
    this.list = isList(topic) ? (Array.isArray(topic) ? [...topic] : topic.split(",")) : null;
    this.topic = this.list ? this.list.join(",") : topic;
    this.pollInterval = pollInterval;
    this.longPollTimeout = longPollTimeout;
    this.events = events;
    this.backoff = backoff;
    /** The presence name, or null (anonymous). */
    this.client = client ?? null;
    this.presence = presence;
    /** Id of the last message delivered (a ListCursor for a list); null until known. */
    this.cursor = after === undefined || after === null ? null
      : this.list ? (after === 0 || after === "0" ? new ListCursor(this.list) : ListCursor.decode(this.list, after))
        : after;
    this.auto = transport === "auto";
    /** The transport in use. */
    this.transport = this.auto ? TRANSPORTS[0] : transport;
    /** Counters: messages, duplicates dropped, requests, bytes received, latency samples. */
    this.stats = { messages: 0, duplicates: 0, requests: 0, bytes: 0, signals: 0, latencies: [] };
    this.listeners = { message: [], status: [], signal: [], presence: [] };
    this.attempt = 0;
    this.generation = 0;
    this.closed = false;
    this.stopActive = null;
    this.retryTimer = null;
    // Start after the caller has had a chance to add listeners.
    Promise.resolve().then(() => this.start());
  }

  /** Adds a listener for "message" (envelope), "status" ({state, transport, ...}), "signal",
   * or "presence" ({topic, joins, leaves[, overflow]}). */
  on(event, listener) {
    if (!this.listeners[event]) throw new Error(`pushhub: unknown event ${event}`);
    this.listeners[event].push(listener);
    return this;
  }

  /** Moves to another transport, resuming from the cursor. */
  switchTo(transport) {
    this.auto = transport === "auto";
    this.transport = this.auto ? TRANSPORTS[0] : transport;
    this.attempt = 0;
    this.stop();
    this.start();
  }

  /** Stops for good. */
  close() {
    this.closed = true;
    this.stop();
    this.emit("status", { state: "closed", transport: this.transport });
  }

  emit(event, value) {
    for (const listener of this.listeners[event]) listener(value);
  }

  stop() {
    this.generation++;
    if (this.retryTimer !== null) this.env.clearTimeout(this.retryTimer);
    this.retryTimer = null;
    const stopActive = this.stopActive;
    this.stopActive = null;
    if (stopActive) stopActive();
  }

  async start() {
    if (this.closed) return;
    const generation = ++this.generation;
    this.emit("status", { state: "connecting", transport: this.transport, attempt: this.attempt });
    if (this.cursor === null) {
      // Learn where "now" is first, so that every transport, and every later switch, starts
      // from a known id (for a list: a poll without a cursor answers every topic's).
      try {
        this.stats.requests++;
        const now = this.list ? `/topics/${this.topic}/poll` : `/topics/${this.topic}`;
        const response = await this.env.fetch(this.url(now), { cache: "no-store" });
        const text = await response.text();
        this.stats.bytes += utf8Length(text);
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        if (generation !== this.generation) return;
        const body = JSON.parse(text);
        this.cursor = this.list ? ListCursor.decode(this.list, body.next_after) : body.last_id;
      } catch (error) {
        if (generation === this.generation) this.failed(generation, error.message, false);
        return;
      }
    }
    const open = {
      ws: openWebSocket, sse: openEventSource, stream: openStream, longpoll: openPolling, poll: openPolling,
    }[this.transport];
    if (!open) throw new Error(`pushhub: unknown transport ${this.transport}`);
    this.stopActive = open(this, generation);
  }

  url(path) {
    return `${this.base}${path}`;
  }

  /** The cursor as `?after=` takes it, with the presence parameters. */
  after() {
    const cursor = this.list ? this.cursor.encode() : `${this.cursor}`;
    const name = this.client === null ? "" : `&client=${encodeURIComponent(this.client)}`;
    return `${cursor}${name}${this.presence ? "&presence=1" : ""}`;
  }

  /** Takes the cursor a list's stream opened with, or a poll of a list answered. */
  adopt(text, generation) {
    if (generation !== this.generation || !this.list || typeof text !== "string") return;
    this.cursor = ListCursor.decode(this.list, text);
  }

  // Called by the transports; `generation` drops callbacks of a transport already stopped.

  deliver(envelope, generation) {
    if (generation !== this.generation) return;
    const known = this.list ? this.cursor?.idOf(envelope.topic) : this.cursor;
    if (known !== null && known !== undefined && envelope.id <= known) {
      this.stats.duplicates++;
      return;
    }
    if (this.list) this.cursor.saw(envelope.topic, envelope.id);
    else this.cursor = envelope.id;
    this.stats.messages++;
    const latencies = this.stats.latencies;
    if (latencies.length >= LATENCY_SAMPLES) latencies.shift();
    latencies.push(this.env.now() - envelope.time);
    this.emit("message", envelope);
  }

  signal(signal, generation) {
    if (generation !== this.generation) return;
    this.stats.signals++;
    const at = signal.type === "reset" ? 0 : signal.oldest_id - 1;
    if (this.list) this.cursor.saw(signal.topic, at);
    else this.cursor = at;
    this.emit("signal", signal);
  }

  opened(generation) {
    if (generation !== this.generation) return;
    this.attempt = 0;
    this.emit("status", { state: "open", transport: this.transport, after: this.list ? this.after() : this.cursor });
  }

  failed(generation, reason, wasOpen) {
    if (generation !== this.generation || this.closed) return;
    this.stop();
    const next = TRANSPORTS[TRANSPORTS.indexOf(this.transport) + 1];
    if (this.auto && !wasOpen && next) {
      // This transport never worked here (refused, blocked by a proxy): try the next one.
      const from = this.transport;
      this.transport = next;
      this.attempt = 0;
      this.emit("status", { state: "fallback", from, transport: next, reason });
      this.start();
      return;
    }
    this.attempt++;
    const delay = backoffDelay(this.attempt, this.backoff, this.env.random);
    this.emit("status", { state: "reconnecting", transport: this.transport, attempt: this.attempt, delay, reason });
    this.retryTimer = this.env.setTimeout(() => {
      this.retryTimer = null;
      this.start();
    }, delay);
  }
}

function webSocketUrl(sub, path) {
  if (sub.base) return sub.base.replace(/^http/, "ws") + path;
  const location = sub.env.location;
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${path}`;
}

function isSignal(frame) {
  return frame.type === "truncated" || frame.type === "reset";
}

function openWebSocket(sub, generation) {
  const socket = new sub.env.WebSocket(webSocketUrl(sub, `/topics/${sub.topic}/ws?after=${sub.after()}`));
  sub.stats.requests++;
  let open = false;
  socket.onopen = () => { open = true; sub.opened(generation); };
  socket.onmessage = (event) => {
    const text = typeof event.data === "string" ? event.data : "";
    sub.stats.bytes += utf8Length(text);
    const frame = JSON.parse(text);
    if (frame.type === undefined) sub.deliver(frame, generation);
    else if (isSignal(frame)) sub.signal(frame, generation);
    else if (frame.type === "cursor") sub.adopt(frame.cursor, generation);
    else if (frame.type === "presence") sub.emit("presence", frame);
  };
  socket.onclose = (event) => sub.failed(generation, `closed (${event?.code ?? "?"})`, open);
  return () => {
    socket.onclose = null;
    socket.onmessage = null;
    socket.close();
  };
}

function openEventSource(sub, generation) {
  const source = new sub.env.EventSource(sub.url(`/topics/${sub.topic}/sse?after=${sub.after()}`));
  sub.stats.requests++;
  let open = false;
  const frameBytes = (event) => utf8Length(`id: ${event.lastEventId}\nevent: ${event.type}\ndata: ${event.data}\n\n`);
  const onMessage = (event) => {
    sub.stats.bytes += frameBytes(event);
    sub.deliver(JSON.parse(event.data), generation);
  };
  const onSignal = (event) => {
    sub.stats.bytes += frameBytes(event);
    sub.signal(JSON.parse(event.data), generation);
  };
  for (const name of sub.events) source.addEventListener(name, onMessage);
  source.addEventListener("truncated", onSignal);
  source.addEventListener("reset", onSignal);
  source.addEventListener("presence", (event) => {
    sub.stats.bytes += frameBytes(event);
    sub.emit("presence", JSON.parse(event.data));
  });
  source.onopen = () => { open = true; sub.opened(generation); };
  // EventSource would reconnect by itself with Last-Event-ID; we close it and reconnect with
  // ?after=cursor instead, so that backoff, fallback and switchTo all follow one cursor.
  source.onerror = () => {
    source.close();
    sub.failed(generation, "stream error", open);
  };
  return () => source.close();
}

// HTTP streaming: one JSON value per line, read from the response body as it arrives. A line
// without `type` is a message; `truncated`/`reset` are signals; `keepalive` and `expired`
// carry nothing to deliver (the body ends after `expired`, and the end reconnects).
function openStream(sub, generation) {
  const controller = typeof AbortController === "undefined" ? null : new AbortController();
  let stopped = false;
  const live = () => !stopped && generation === sub.generation;
  (async () => {
    let open = false;
    try {
      sub.stats.requests++;
      const response = await sub.env.fetch(sub.url(`/topics/${sub.topic}/stream?after=${sub.after()}`), {
        cache: "no-store", signal: controller?.signal,
      });
      if (!live()) return;
      if (!response.ok || !response.body) {
        sub.failed(generation, response.ok ? "no streamed body" : `HTTP ${response.status}`, false);
        return;
      }
      open = true;
      sub.opened(generation);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let pending = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (!live()) { reader.cancel?.().catch?.(() => {}); return; }
        if (done) break;
        sub.stats.bytes += value.byteLength;
        pending += decoder.decode(value, { stream: true });
        let end;
        while ((end = pending.indexOf("\n")) >= 0) {
          const line = pending.slice(0, end);
          pending = pending.slice(end + 1);
          if (!line) continue;
          const frame = JSON.parse(line);
          if (frame.type === undefined) sub.deliver(frame, generation);
          else if (isSignal(frame)) sub.signal(frame, generation);
          else if (frame.type === "cursor") sub.adopt(frame.cursor, generation);
          else if (frame.type === "presence") sub.emit("presence", frame);
          if (!live()) return;
        }
      }
      sub.failed(generation, "stream ended", open);
    } catch (error) {
      if (live()) sub.failed(generation, error.message, open);
    }
  })();
  return () => {
    stopped = true;
    controller?.abort();
  };
}

function openPolling(sub, generation) {
  const kind = sub.transport;
  const controller = typeof AbortController === "undefined" ? null : new AbortController();
  let stopped = false;
  let timer = null;
  const live = () => !stopped && generation === sub.generation;
  const wait = (ms) => new Promise((resolve) => { timer = sub.env.setTimeout(resolve, ms); });
  (async () => {
    let open = false;
    while (live()) {
      // The first long poll of a connection is answered at once (timeout=0): it proves the
      // transport works, so "open" is reported now and not after the first hold.
      const query = kind === "longpoll"
        ? `after=${sub.after()}&timeout=${open ? sub.longPollTimeout : 0}`
        : `after=${sub.after()}`;
      let response;
      let text;
      try {
        sub.stats.requests++;
        response = await sub.env.fetch(sub.url(`/topics/${sub.topic}/${kind}?${query}`), {
          cache: "no-store", signal: controller?.signal,
        });
        text = await response.text();
      } catch (error) {
        if (live()) sub.failed(generation, error.message, open);
        return;
      }
      if (!live()) return;
      sub.stats.bytes += Number(response.headers?.get?.("content-length")) || utf8Length(text);
      if (!response.ok) {
        sub.failed(generation, `HTTP ${response.status}`, open);
        return;
      }
      if (!open) { open = true; sub.opened(generation); }
      const body = JSON.parse(text);
      // One topic's signals are on the answer; a list's, per topic under `topics`.
      const topics = sub.list ? Object.entries(body.topics ?? {}) : [[sub.topic, body]];
      for (const [topic, fields] of topics) {
        if (fields.reset) sub.signal({ type: "reset", topic, last_id: fields.last_id }, generation);
        if (fields.truncated) sub.signal({ type: "truncated", topic, oldest_id: fields.oldest_id }, generation);
      }
      for (const message of body.messages) sub.deliver(message, generation);
      if (!live()) return;
      if (sub.list) sub.adopt(body.next_after, generation);
      else sub.cursor = body.next_after;
      // A full page means more is waiting: ask again at once, whatever the interval.
      if (kind === "poll" && !body.more) await wait(sub.pollInterval);
    }
  })();
  return () => {
    stopped = true;
    if (timer !== null) sub.env.clearTimeout(timer);
    controller?.abort();
  };
}
