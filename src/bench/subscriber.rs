//! One benchmark subscriber per transport, each a real client over its own connection.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use crate::message::TransportKind;

use super::{
    BenchError,
    accounting::{Tracker, now_micros},
    http::{Connection, Items, RETRY_FIRST, RETRY_MOST, sse_event},
};

/// What every subscriber of a phase shares.
pub(crate) struct Phase {
    /// Nodes of the cluster; subscriber `i` connects to `bases[i % bases.len()]`.
    pub(crate) bases: Vec<String>,
    /// Topics of the phase; subscriber `i` follows `topics[i % topics.len()]`.
    pub(crate) topics: Vec<String>,
    /// How each subscriber follows its topic: alone, or with more on one connection
    /// (`--topics-per-subscriber`).
    pub(crate) listing: Listing,
    pub(crate) poll_interval: Duration,
    /// Whether a subscriber whose connection is lost connects again and resumes from the
    /// last id it saw, as a real client does (behind an emulated link that cuts); without
    /// it a lost connection is a failure of the run.
    pub(crate) resume: bool,
    /// Highest id each subscriber has received, for the drain wait.
    pub(crate) progress: Vec<AtomicU64>,
    /// Subscribers served at least once (a stream opened, a poll answered): behind a link
    /// that cuts, "all connected at once" may never be seen, so the phase waits for this.
    pub(crate) served: Vec<std::sync::atomic::AtomicBool>,
    /// Messages of its other topics each subscriber received: the catch-up it is sent when
    /// it opens (`--topics-per-subscriber`), which the measured window must not include.
    pub(crate) others: Vec<AtomicU64>,
    pub(crate) stop: CancellationToken,
}

/// How a subscriber follows its topic (`--topics-per-subscriber K`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Listing {
    /// The topic alone.
    One,
    /// A list: the topic first, then `K - 1` topics that hold one message each (made before
    /// the subscribers connect; received, and left out of the accounting) and get no more.
    List(usize),
    /// A list of the same topics, subscriber `i`'s at position `i mod K` (`--distinct-lists`).
    Spread(usize),
    /// A pattern (`topic*`) matching the topic and `K - 1` topics made before it connects
    /// (one message each, which the subscriber receives and the accounting leaves out).
    Pattern(usize),
}

impl Listing {
    /// What subscriber `index`, of `topic`, asks for in the path.
    pub(crate) fn path(&self, topic: &str, index: usize) -> String {
        match self {
            Listing::One => topic.to_owned(),
            Listing::List(k) | Listing::Spread(k) => {
                let mut list: Vec<String> = Listing::fillers(topic, *k).collect();
                list.insert(self.position(index), topic.to_owned());
                list.join(",")
            }
            Listing::Pattern(_) => format!("{topic}*"),
        }
    }

    /// How many messages of other topics a subscriber receives when it opens: one from each
    /// topic made for it to follow besides its own.
    pub(crate) fn others(&self) -> u64 {
        match self {
            Listing::One => 0,
            Listing::List(k) | Listing::Spread(k) | Listing::Pattern(k) => *k as u64 - 1,
        }
    }

    /// Where subscriber `index` lists its topic.
    fn position(&self, index: usize) -> usize {
        match self {
            Listing::Spread(k) => index % k,
            _ => 0,
        }
    }

    /// The topics that follow `topic` in a list of `k`, or that its pattern picks up.
    pub(crate) fn fillers(topic: &str, k: usize) -> impl Iterator<Item = String> + '_ {
        (1..k).map(move |i| format!("{topic}.f{i}"))
    }

    /// `after` for a subscriber of `topic` that has ids up to `last_id` of it: a list's
    /// cursor names only that topic (the others have no message; one a pattern picked up is
    /// read from its start, and its message left out).
    fn after(&self, topic: &str, index: usize, last_id: u64) -> String {
        use crate::message::cursor::{Cursor, topic_hash};
        match self {
            Listing::One => last_id.to_string(),
            _ if last_id == 0 => "0".to_owned(),
            Listing::List(_) | Listing::Spread(_) => Cursor {
                listed: vec![(self.position(index) as u32, last_id)],
                hashed: Vec::new(),
            }
            .encode(),
            Listing::Pattern(_) => Cursor {
                listed: Vec::new(),
                hashed: vec![(topic_hash(topic), last_id)],
            }
            .encode(),
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    id: u64,
    /// Checked when a subscriber follows more than its topic.
    #[serde(borrow, default)]
    topic: &'a str,
    data: Payload,
}

#[derive(Deserialize)]
struct Payload {
    /// Publish time, µs since the epoch, written by the bench publisher.
    t: u64,
    /// The node it was published through (the bench's own messages say; others may not).
    #[serde(default)]
    n: Option<usize>,
}

/// A Durable Streams SSE control event: where the reader stands.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Control {
    stream_next_offset: String,
}

#[derive(Deserialize)]
struct PollAnswer<'a> {
    #[serde(borrow)]
    messages: Vec<Envelope<'a>>,
    /// A message id, or a topic list's cursor string.
    next_after: serde_json::Value,
    #[serde(default)]
    more: bool,
}

impl Phase {
    /// The node subscriber `index` connects to.
    pub(crate) fn base_of(&self, index: usize) -> &str {
        &self.bases[index % self.bases.len()]
    }

    /// A connection for subscriber `index` to its node, from its own source address where
    /// the node is on loopback ([`super::http::source_address`]).
    fn connection(&self, index: usize) -> Connection {
        let base = self.base_of(index);
        Connection::new(base).from_source(super::http::source_address(base, index))
    }

    /// The node subscriber `index` is on (its index in `bases`).
    pub(crate) fn node_of(&self, index: usize) -> usize {
        index % self.bases.len()
    }

    /// Whether every subscriber has received the messages of its other topics (its
    /// catch-up at open).
    pub(crate) fn caught_up_on_others(&self) -> bool {
        let others = self.listing.others();
        self.others
            .iter()
            .all(|got| got.load(Ordering::Relaxed) >= others)
    }

    /// The topic subscriber `index` follows.
    pub(crate) fn topic_of(&self, index: usize) -> &str {
        &self.topics[index % self.topics.len()]
    }

    /// Where subscriber `index` resumes after `last_id`.
    fn after_of(&self, index: usize, last_id: u64) -> String {
        self.listing.after(self.topic_of(index), index, last_id)
    }

    /// The path segment subscriber `index` asks for.
    fn path_of(&self, index: usize) -> String {
        self.listing.path(self.topic_of(index), index)
    }

    fn record(&self, index: usize, tracker: &mut Tracker, envelope: &Envelope) {
        if self.listing != Listing::One && envelope.topic != self.topic_of(index) {
            self.others[index].fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.record_at(index, tracker, envelope.id, &envelope.data);
    }

    fn record_at(&self, index: usize, tracker: &mut Tracker, id: u64, payload: &Payload) {
        let now = now_micros();
        let crossed = self.bases.len() > 1 && payload.n.is_some_and(|n| n != self.node_of(index));
        if tracker.on_message(id, payload.t, now) && crossed {
            tracker.on_crossed(payload.t, now);
        }
        self.progress[index].store(tracker.last_id, Ordering::Relaxed);
    }

    /// Records the values a Durable Streams read returned after the reader's last id: one
    /// value per publish, so the stream's n-th value is the (fresh) topic's id n.
    fn record_values(&self, index: usize, tracker: &mut Tracker, values: &[Payload]) {
        for value in values {
            let id = tracker.last_id + 1;
            self.record_at(index, tracker, id, value);
        }
    }
}

/// Holds a stream open and reads it until `stop` (a pattern watcher, `--pattern-watchers`).
pub(crate) async fn watch(base: String, path: String, stop: CancellationToken) {
    let mut connection = Connection::new(&base);
    let opened = tokio::select! {
        opened = connection.open_stream(&path, &["accept: text/event-stream"]) => opened,
        () = stop.cancelled() => return,
    };
    if !matches!(opened, Ok(200)) {
        tracing::warn!(path, "a pattern watcher was refused: {opened:?}");
        return;
    }
    let mut items = Items::new(b"\n\n");
    loop {
        tokio::select! {
            more = items.read(&mut connection) => if !matches!(more, Ok(Some(_))) { return },
            () = stop.cancelled() => return,
        }
        items.drain(|_| {});
    }
}

/// Where a Durable Streams reader starts: the offset its server last gave, else the
/// beginning (the phase's streams are fresh).
fn ds_offset(tracker: &Tracker) -> &str {
    tracker.offset.as_deref().unwrap_or("-1")
}

/// How one connection of a subscriber ended.
pub(crate) enum Ended {
    /// The phase stopped.
    Stopped,
    /// The server (or a link) closed the connection.
    Closed,
    /// The connection failed at the network level: refused, reset, cut.
    Failed(String),
}

/// Runs subscriber `index` of `transport` until the phase stops. A connection the network
/// loses is opened again from the last id seen when the phase resumes; an answer the server
/// (or a proxy) gives with a refusing status ends the subscriber with that error.
pub(crate) async fn run(
    transport: TransportKind,
    phase: Arc<Phase>,
    index: usize,
) -> Result<(usize, Tracker), BenchError> {
    let mut tracker = Tracker::default();
    let mut retry = RETRY_FIRST;
    loop {
        let received_before = tracker.received;
        let ended = match transport {
            TransportKind::Ws => websocket(&phase, index, &mut tracker).await?,
            TransportKind::Sse => sse(&phase, index, &mut tracker).await?,
            TransportKind::Stream => ndjson(&phase, index, &mut tracker).await?,
            TransportKind::DsSse => body_stream(&DS_SSE, &phase, index, &mut tracker).await?,
            TransportKind::Longpoll | TransportKind::Poll | TransportKind::DsLongpoll => {
                polling(transport, &phase, index, &mut tracker).await?
            }
        };
        if tracker.requests > 0 {
            phase.served[index].store(true, Ordering::Relaxed);
        }
        match ended {
            Ended::Stopped => break,
            Ended::Closed if !phase.resume => break,
            Ended::Failed(reason) if !phase.resume => return Err(BenchError::Client(reason)),
            Ended::Closed | Ended::Failed(_) => {}
        }
        if phase.stop.is_cancelled() {
            break;
        }
        // A loss is one only after the subscriber was served once (a first connection that
        // fails is not a reconnect); the backoff starts over only after a connection that
        // delivered something (one answered and closed at once is no recovery).
        if tracker.requests > 0 {
            tracker.lost(now_micros());
        }
        if tracker.received > received_before {
            retry = RETRY_FIRST;
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = phase.stop.cancelled() => break,
        }
        retry = (retry * 2).min(RETRY_MOST);
    }
    Ok((index, tracker))
}

/// The subscriber is served: counted, and a recovery ends if one was under way.
fn served(phase: &Phase, index: usize, tracker: &mut Tracker) {
    tracker.requests += 1;
    tracker.served(now_micros());
    phase.served[index].store(true, Ordering::Relaxed);
}

async fn websocket(
    phase: &Phase,
    index: usize,
    tracker: &mut Tracker,
) -> Result<Ended, BenchError> {
    let url = format!(
        "{}/topics/{}/ws?after={}",
        phase.base_of(index).replacen("http", "ws", 1),
        phase.path_of(index),
        phase.after_of(index, tracker.last_id)
    );
    // A small read buffer: tungstenite zeroes the unused part of it on every read, and its
    // 128 KiB default made that zeroing most of the bench's own CPU, which then limited what
    // it could measure.
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    use tokio_tungstenite::tungstenite::Error;
    let base = phase.base_of(index);
    let source = super::http::source_address(base, index);
    let stream = match super::http::connect_from(super::http::authority(base), source).await {
        Ok(stream) => stream,
        Err(e) => return Ok(Ended::Failed(format!("WebSocket connect: {e}"))),
    };
    let _ = stream.set_nodelay(true);
    let mut socket =
        match tokio_tungstenite::client_async_with_config(&url, stream, Some(config)).await {
            Ok((socket, _)) => socket,
            Err(Error::Http(response)) => {
                return Err(BenchError::Client(format!(
                    "WebSocket connect: answered {}",
                    response.status()
                )));
            }
            Err(e) => return Ok(Ended::Failed(format!("WebSocket connect: {e}"))),
        };
    served(phase, index, tracker);
    let ended = loop {
        let frame = tokio::select! {
            frame = socket.next() => frame,
            () = phase.stop.cancelled() => break Ended::Stopped,
        };
        match frame {
            Some(Ok(WsMessage::Text(text))) => {
                tracker.bytes += text.len() as u64;
                if let Ok(envelope) = serde_json::from_str::<Envelope>(&text) {
                    phase.record(index, tracker, &envelope);
                }
            }
            Some(Ok(WsMessage::Close(_))) | None => break Ended::Closed,
            Some(Ok(_)) => {}
            Some(Err(e)) => break Ended::Failed(format!("WebSocket: {e}")),
        }
    };
    let _ = socket.close(None).await;
    Ok(ended)
}

/// How a streamed body is asked for, separates its items, and what an item carries.
struct BodyItems {
    /// The transport, for errors.
    name: &'static str,
    /// The path to open, from where the subscriber stands.
    path: fn(&Phase, usize, &Tracker) -> String,
    /// The `accept` header.
    accept: &'static str,
    /// What ends an item: a blank line (SSE), a newline (NDJSON).
    delimiter: &'static [u8],
    /// Records the messages one item carries, if any.
    record: fn(&Phase, usize, &mut Tracker, &[u8]),
}

/// The path of one of pushhub's own streaming endpoints.
fn native_path(phase: &Phase, index: usize, endpoint: &str, after: u64) -> String {
    format!(
        "/topics/{}/{endpoint}?after={}",
        phase.path_of(index),
        phase.after_of(index, after)
    )
}

/// Records an item that is a whole envelope.
fn record_envelope(phase: &Phase, index: usize, tracker: &mut Tracker, item: &[u8]) {
    if let Ok(envelope) = serde_json::from_slice::<Envelope>(item) {
        phase.record(index, tracker, &envelope);
    }
}

/// An HTTP stream: one envelope per line (signal and keep-alive lines are not envelopes and
/// fail to parse as one).
const NDJSON: BodyItems = BodyItems {
    name: "stream",
    path: |phase, index, tracker| native_path(phase, index, "stream", tracker.last_id),
    accept: "accept: application/x-ndjson",
    delimiter: b"\n",
    record: record_envelope,
};

/// SSE: the `data:` of each event that is not a signal.
const SSE: BodyItems = BodyItems {
    name: "SSE",
    path: |phase, index, tracker| native_path(phase, index, "sse", tracker.last_id),
    accept: "accept: text/event-stream",
    delimiter: b"\n\n",
    record: |phase, index, tracker, block| {
        let (event, data) = sse_event(block);
        let is_signal = event == b"truncated" || event == b"reset";
        if let Some(data) = data.filter(|_| !is_signal) {
            record_envelope(phase, index, tracker, data);
        }
    },
};

/// A Durable Streams SSE read: each `data` event is a JSON array of the values after the
/// reader's offset (its `data:` lines joined); `control` events only say where it stands.
const DS_SSE: BodyItems = BodyItems {
    name: "ds-sse",
    path: |phase, index, tracker| {
        format!(
            "/v1/stream/{}?offset={}&live=sse",
            phase.topic_of(index),
            ds_offset(tracker)
        )
    },
    accept: "accept: text/event-stream",
    delimiter: b"\n\n",
    record: |phase, index, tracker, block| {
        let mut lines = block.split(|&b| b == b'\n');
        let event = lines.next();
        let data: Vec<&[u8]> = lines.filter_map(|l| l.strip_prefix(b"data:")).collect();
        let data = data.join(&b'\n');
        if event == Some(&b"event: data"[..]) {
            if let Ok(values) = serde_json::from_slice::<Vec<Payload>>(&data) {
                phase.record_values(index, tracker, &values);
            }
        } else if event == Some(&b"event: control"[..])
            && let Ok(control) = serde_json::from_slice::<Control>(&data)
        {
            tracker.offset = Some(control.stream_next_offset);
        }
    },
};

async fn ndjson(phase: &Phase, index: usize, tracker: &mut Tracker) -> Result<Ended, BenchError> {
    body_stream(&NDJSON, phase, index, tracker).await
}

async fn sse(phase: &Phase, index: usize, tracker: &mut Tracker) -> Result<Ended, BenchError> {
    body_stream(&SSE, phase, index, tracker).await
}

/// Reads a streamed body (SSE, NDJSON, Durable Streams SSE) until the phase stops,
/// recording every message.
async fn body_stream(
    items: &BodyItems,
    phase: &Phase,
    index: usize,
    tracker: &mut Tracker,
) -> Result<Ended, BenchError> {
    let path = (items.path)(phase, index, tracker);
    let mut connection = phase.connection(index);
    let headers = [items.accept];
    let opened = tokio::select! {
        opened = connection.open_stream(&path, &headers) => opened,
        () = phase.stop.cancelled() => return Ok(Ended::Stopped),
    };
    let status = match opened {
        Ok(status) => status,
        Err(e) => return Ok(Ended::Failed(format!("{}: {e}", items.name))),
    };
    if status != 200 {
        return Err(BenchError::Client(format!(
            "{} answered {status}",
            items.name
        )));
    }
    served(phase, index, tracker);
    let mut split = Items::new(items.delimiter);
    loop {
        let more = tokio::select! {
            more = split.read(&mut connection) => more,
            () = phase.stop.cancelled() => return Ok(Ended::Stopped),
        };
        match more {
            Ok(Some(read)) => tracker.bytes += read as u64,
            Ok(None) => return Ok(Ended::Closed),
            Err(e) => return Ok(Ended::Failed(format!("{}: {e}", items.name))),
        }
        split.drain(|item| (items.record)(phase, index, tracker, item));
    }
}

async fn polling(
    kind: TransportKind,
    phase: &Phase,
    index: usize,
    tracker: &mut Tracker,
) -> Result<Ended, BenchError> {
    let mut connection = phase.connection(index);
    let mut after = phase.after_of(index, tracker.last_id);
    // A Durable Streams reader catches up first (answered at once), then long-polls.
    let mut caught_up = kind != TransportKind::DsLongpoll;
    while !phase.stop.is_cancelled() {
        let path = match kind {
            TransportKind::DsLongpoll if !caught_up => format!(
                "/v1/stream/{}?offset={}",
                phase.topic_of(index),
                ds_offset(tracker)
            ),
            TransportKind::Longpoll => format!(
                "/topics/{}/longpoll?after={after}&timeout=10&limit=1000",
                phase.path_of(index)
            ),
            TransportKind::DsLongpoll => format!(
                "/v1/stream/{}?offset={}&live=long-poll",
                phase.topic_of(index),
                ds_offset(tracker)
            ),
            _ => format!(
                "/topics/{}/poll?after={after}&limit=1000",
                phase.path_of(index)
            ),
        };
        let answer = tokio::select! {
            answer = connection.get(&path) => answer,
            () = phase.stop.cancelled() => break,
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => return Ok(Ended::Failed(format!("{kind}: {e}"))),
        };
        let durable = kind == TransportKind::DsLongpoll;
        if !(answer.status == 200 || durable && answer.status == 204) {
            return Err(BenchError::Client(format!(
                "{kind} answered {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            )));
        }
        served(phase, index, tracker);
        tracker.bytes += answer.body.len() as u64;
        if durable {
            // 204: the wait ended with nothing new; 200: the values after the offset.
            if answer.status == 200 {
                let values: Vec<Payload> = serde_json::from_slice(&answer.body)
                    .map_err(|e| BenchError::Client(format!("{kind} answer: {e}")))?;
                phase.record_values(index, tracker, &values);
            }
            if let Some(offset) = answer.next_offset {
                tracker.offset = Some(offset);
            }
            caught_up = true;
            continue;
        }
        let answer: PollAnswer = serde_json::from_slice(&answer.body)
            .map_err(|e| BenchError::Client(format!("{kind} answer: {e}")))?;
        for envelope in &answer.messages {
            phase.record(index, tracker, envelope);
        }
        after = match answer.next_after {
            serde_json::Value::String(cursor) => cursor,
            next => next.to_string(),
        };
        if kind == TransportKind::Poll && !answer.more {
            tokio::select! {
                () = tokio::time::sleep(phase.poll_interval) => {}
                () = phase.stop.cancelled() => break,
            }
        }
    }
    Ok(Ended::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(listing: Listing, subscribers: usize) -> Phase {
        Phase {
            bases: vec!["http://127.0.0.1:1".into()],
            topics: vec!["t".into()],
            listing,
            poll_interval: Duration::from_millis(100),
            resume: false,
            progress: (0..subscribers).map(|_| Default::default()).collect(),
            served: (0..subscribers).map(|_| Default::default()).collect(),
            others: (0..subscribers).map(|_| Default::default()).collect(),
            stop: CancellationToken::new(),
        }
    }

    fn envelope<'a>(topic: &'a str, id: u64) -> Envelope<'a> {
        Envelope {
            id,
            topic,
            data: Payload { t: 1, n: None },
        }
    }

    /// The measured window waits for every subscriber's catch-up on its other topics: a
    /// subscriber counted by the server may still be receiving it.
    #[test]
    fn subscribers_are_caught_up_once_each_has_its_other_topics() {
        let phase = phase(Listing::List(3), 2);
        let mut trackers = [Tracker::default(), Tracker::default()];
        assert!(!phase.caught_up_on_others());
        phase.record(0, &mut trackers[0], &envelope("t.f1", 1));
        phase.record(0, &mut trackers[0], &envelope("t.f2", 1));
        // Its own topic's messages are deliveries, not the catch-up.
        phase.record(1, &mut trackers[1], &envelope("t", 1));
        phase.record(1, &mut trackers[1], &envelope("t.f1", 1));
        assert!(!phase.caught_up_on_others(), "subscriber 1 lacks t.f2");
        assert_eq!(trackers[1].received, 1);
        phase.record(1, &mut trackers[1], &envelope("t.f2", 1));
        assert!(phase.caught_up_on_others());
        // One topic alone has nothing to catch up on.
        assert!(self::phase(Listing::One, 2).caught_up_on_others());
    }
}
