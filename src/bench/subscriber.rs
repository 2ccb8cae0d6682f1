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

use super::{
    BenchError,
    accounting::{Tracker, now_micros},
};

/// What every subscriber of a phase shares.
pub(crate) struct Phase {
    /// Nodes of the cluster; subscriber `i` connects to `bases[i % bases.len()]`.
    pub(crate) bases: Vec<String>,
    /// Topics of the phase; subscriber `i` follows `topics[i % topics.len()]`.
    pub(crate) topics: Vec<String>,
    pub(crate) http: reqwest::Client,
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
    transport: &str,
    phase: Arc<Phase>,
    index: usize,
) -> Result<(usize, Tracker), BenchError> {
    let mut tracker = Tracker::default();
    match transport {
        "ws" => websocket(&phase, index, &mut tracker).await?,
        "sse" => sse(&phase, index, &mut tracker).await?,
        "longpoll" | "poll" => polling(transport, &phase, index, &mut tracker).await?,
        other => return Err(BenchError::Setup(format!("unknown transport {other}"))),
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

async fn sse(phase: &Phase, index: usize, tracker: &mut Tracker) -> Result<(), BenchError> {
    let url = format!(
        "{}/topics/{}/sse?after=0",
        phase.base_of(index),
        phase.topic_of(index)
    );
    let response = phase.http.get(&url).send().await.map_err(client_error)?;
    tracker.requests += 1;
    let mut body = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::select! {
            chunk = body.next() => chunk,
            () = phase.stop.cancelled() => break,
        };
        let Some(chunk) = chunk else { break };
        let chunk = chunk.map_err(client_error)?;
        tracker.bytes += chunk.len() as u64;
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buffer.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            let is_message = !block
                .lines()
                .any(|l| l == "event: truncated" || l == "event: reset");
            let data = block.lines().find_map(|l| l.strip_prefix("data: "));
            if let (true, Some(data)) = (is_message, data)
                && let Ok(envelope) = serde_json::from_str::<Envelope>(data)
            {
                phase.record(index, tracker, &envelope);
            }
        }
    }
    Ok(())
}

async fn polling(
    kind: &str,
    phase: &Phase,
    index: usize,
    tracker: &mut Tracker,
) -> Result<(), BenchError> {
    let mut after = 0;
    while !phase.stop.is_cancelled() {
        let url = match kind {
            "longpoll" => format!(
                "{}/topics/{}/longpoll?after={after}&timeout=10&limit=1000&client=bench-{index}",
                phase.base_of(index),
                phase.topic_of(index)
            ),
            _ => format!(
                "{}/topics/{}/poll?after={after}&limit=1000&client=bench-{index}",
                phase.base_of(index),
                phase.topic_of(index)
            ),
        };
        let request = async {
            let response = phase.http.get(&url).send().await?;
            response.bytes().await
        };
        let body = tokio::select! {
            body = request => body.map_err(client_error)?,
            () = phase.stop.cancelled() => break,
        };
        tracker.requests += 1;
        tracker.bytes += body.len() as u64;
        let answer: PollAnswer = serde_json::from_slice(&body)
            .map_err(|e| BenchError::Client(format!("{kind} answer: {e}")))?;
        for envelope in &answer.messages {
            phase.record(index, tracker, envelope);
        }
        after = answer.next_after;
        if kind == "poll" && !answer.more {
            tokio::select! {
                () = tokio::time::sleep(phase.poll_interval) => {}
                () = phase.stop.cancelled() => break,
            }
        }
    }
    Ok(())
}

fn client_error(e: reqwest::Error) -> BenchError {
    BenchError::Client(e.to_string())
}
