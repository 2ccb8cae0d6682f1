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
    http::Connection,
};

/// What every subscriber of a phase shares.
pub(crate) struct Phase {
    /// Nodes of the cluster; subscriber `i` connects to `bases[i % bases.len()]`.
    pub(crate) bases: Vec<String>,
    /// Topics of the phase; subscriber `i` follows `topics[i % topics.len()]`.
    pub(crate) topics: Vec<String>,
    pub(crate) poll_interval: Duration,
    /// Highest id each subscriber has received, for the drain wait.
    pub(crate) progress: Vec<AtomicU64>,
    pub(crate) stop: CancellationToken,
}

#[derive(Deserialize)]
struct Envelope {
    id: u64,
    data: Payload,
}

#[derive(Deserialize)]
struct Payload {
    /// Publish time, µs since the epoch, written by the bench publisher.
    t: u64,
}

#[derive(Deserialize)]
struct PollAnswer {
    messages: Vec<Envelope>,
    next_after: u64,
    #[serde(default)]
    more: bool,
}

impl Phase {
    /// The node subscriber `index` connects to.
    pub(crate) fn base_of(&self, index: usize) -> &str {
        &self.bases[index % self.bases.len()]
    }

    /// Whether subscriber `index` is on another node than the publisher.
    pub(crate) fn is_cross_node(&self, index: usize) -> bool {
        !index.is_multiple_of(self.bases.len())
    }

    /// The topic subscriber `index` follows.
    pub(crate) fn topic_of(&self, index: usize) -> &str {
        &self.topics[index % self.topics.len()]
    }

    fn record(&self, index: usize, tracker: &mut Tracker, envelope: &Envelope) {
        tracker.on_message(envelope.id, envelope.data.t, now_micros());
        self.progress[index].store(tracker.last_id, Ordering::Relaxed);
    }
}

/// Runs subscriber `index` of `transport` until the phase stops.
pub(crate) async fn run(
    transport: TransportKind,
    phase: Arc<Phase>,
    index: usize,
) -> Result<(usize, Tracker), BenchError> {
    let mut tracker = Tracker::default();
    match transport {
        TransportKind::Ws => websocket(&phase, index, &mut tracker).await?,
        TransportKind::Sse => sse(&phase, index, &mut tracker).await?,
        TransportKind::Stream => ndjson(&phase, index, &mut tracker).await?,
        TransportKind::Longpoll | TransportKind::Poll => {
            polling(transport, &phase, index, &mut tracker).await?
        }
    }
    Ok((index, tracker))
}

async fn websocket(phase: &Phase, index: usize, tracker: &mut Tracker) -> Result<(), BenchError> {
    let url = format!(
        "{}/topics/{}/ws?after=0",
        phase.base_of(index).replacen("http", "ws", 1),
        phase.topic_of(index)
    );
    // A small read buffer: tungstenite zeroes the unused part of it on every read, and its
    // 128 KiB default made that zeroing most of the bench's own CPU, which then limited what
    // it could measure.
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(&url, Some(config), false)
        .await
        .map_err(|e| BenchError::Client(format!("WebSocket connect: {e}")))?;
    tracker.requests += 1;
    loop {
        let frame = tokio::select! {
            frame = socket.next() => frame,
            () = phase.stop.cancelled() => break,
        };
        match frame {
            Some(Ok(WsMessage::Text(text))) => {
                tracker.bytes += text.len() as u64;
                if let Ok(envelope) = serde_json::from_str::<Envelope>(&text) {
                    phase.record(index, tracker, &envelope);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(BenchError::Client(format!("WebSocket: {e}"))),
            None => break,
        }
    }
    let _ = socket.close(None).await;
    Ok(())
}

/// How a streamed body separates its items, and where an item's envelope is.
struct BodyItems {
    /// The transport, for errors.
    name: &'static str,
    /// The path's last segment and the `accept` header.
    endpoint: &'static str,
    accept: &'static str,
    /// What ends an item: a blank line (SSE), a newline (NDJSON).
    delimiter: &'static [u8],
    /// The envelope an item carries, if it is a message.
    envelope: fn(&[u8]) -> Option<&[u8]>,
}

/// An HTTP stream: one envelope per line (signal and keep-alive lines are not envelopes and
/// fail to parse as one).
const NDJSON: BodyItems = BodyItems {
    name: "stream",
    endpoint: "stream",
    accept: "accept: application/x-ndjson",
    delimiter: b"\n",
    envelope: |line| Some(line),
};

/// SSE: the `data:` of each event that is not a signal.
const SSE: BodyItems = BodyItems {
    name: "SSE",
    endpoint: "sse",
    accept: "accept: text/event-stream",
    delimiter: b"\n\n",
    envelope: |block| {
        let is_signal = block
            .split(|&b| b == b'\n')
            .any(|l| l == b"event: truncated" || l == b"event: reset");
        let data = block
            .split(|&b| b == b'\n')
            .find_map(|l| l.strip_prefix(b"data: "));
        data.filter(|_| !is_signal)
    },
};

async fn ndjson(phase: &Phase, index: usize, tracker: &mut Tracker) -> Result<(), BenchError> {
    body_stream(&NDJSON, phase, index, tracker).await
}

async fn sse(phase: &Phase, index: usize, tracker: &mut Tracker) -> Result<(), BenchError> {
    body_stream(&SSE, phase, index, tracker).await
}

/// Reads a streamed body (SSE or NDJSON) until the phase stops, recording every envelope.
async fn body_stream(
    items: &BodyItems,
    phase: &Phase,
    index: usize,
    tracker: &mut Tracker,
) -> Result<(), BenchError> {
    let path = format!(
        "/topics/{}/{}?after=0",
        phase.topic_of(index),
        items.endpoint
    );
    let mut connection = Connection::new(phase.base_of(index));
    let status = connection
        .open_stream(&path, &[items.accept])
        .await
        .map_err(io_error)?;
    if status != 200 {
        return Err(BenchError::Client(format!(
            "{} answered {status}",
            items.name
        )));
    }
    tracker.requests += 1;
    let delimiter = items.delimiter;
    let mut buffer: Vec<u8> = Vec::new();
    // Where the search for the end of the next item resumes.
    let mut scanned = 0;
    loop {
        let before = buffer.len();
        let more = tokio::select! {
            more = connection.next_data(&mut buffer) => more,
            () = phase.stop.cancelled() => break,
        };
        if !more.map_err(io_error)? {
            break;
        }
        tracker.bytes += (buffer.len() - before) as u64;
        let mut start = 0;
        while let Some(end) = buffer[scanned.max(start)..]
            .windows(delimiter.len())
            .position(|w| w == delimiter)
            .map(|at| scanned.max(start) + at)
        {
            if let Some(data) = (items.envelope)(&buffer[start..end])
                && let Ok(envelope) = serde_json::from_slice::<Envelope>(data)
            {
                phase.record(index, tracker, &envelope);
            }
            start = end + delimiter.len();
        }
        buffer.drain(..start);
        // The end of an item may straddle two reads: look again from its possible start.
        scanned = buffer.len().saturating_sub(delimiter.len() - 1);
    }
    Ok(())
}

async fn polling(
    kind: TransportKind,
    phase: &Phase,
    index: usize,
    tracker: &mut Tracker,
) -> Result<(), BenchError> {
    let mut connection = Connection::new(phase.base_of(index));
    let mut after = 0;
    while !phase.stop.is_cancelled() {
        let path = match kind {
            TransportKind::Longpoll => format!(
                "/topics/{}/longpoll?after={after}&timeout=10&limit=1000&client=bench-{index}",
                phase.topic_of(index)
            ),
            _ => format!(
                "/topics/{}/poll?after={after}&limit=1000&client=bench-{index}",
                phase.topic_of(index)
            ),
        };
        let answer = tokio::select! {
            answer = connection.get(&path) => answer.map_err(io_error)?,
            () = phase.stop.cancelled() => break,
        };
        if answer.status != 200 {
            return Err(BenchError::Client(format!(
                "{kind} answered {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            )));
        }
        tracker.requests += 1;
        tracker.bytes += answer.body.len() as u64;
        let answer: PollAnswer = serde_json::from_slice(&answer.body)
            .map_err(|e| BenchError::Client(format!("{kind} answer: {e}")))?;
        for envelope in &answer.messages {
            phase.record(index, tracker, envelope);
        }
        after = answer.next_after;
        if kind == TransportKind::Poll && !answer.more {
            tokio::select! {
                () = tokio::time::sleep(phase.poll_interval) => {}
                () = phase.stop.cancelled() => break,
            }
        }
    }
    Ok(())
}

fn io_error(e: std::io::Error) -> BenchError {
    BenchError::Client(e.to_string())
}
