//! `GET /topics/{topic}/sse`: Server-Sent Events.
//!
//! A slow reader is handled by the hub's subscription policy (it reads its backlog from
//! history by cursor); this adapter only writes frames, heartbeats, and ends the stream on
//! shutdown so that clients reconnect elsewhere with `Last-Event-ID`.

use std::time::Duration;

use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use bytes::BytesMut;
use tokio::time::{Interval, MissedTickBehavior, interval_at};

use super::{Params, WriteWindow, expiry, parse_cursor};
use crate::{
    AppState,
    auth::Access,
    error::Error,
    hub::{Delivery, Signal, Subscription, Transport},
    message::{TopicName, encode_sse_frame},
};

const HEARTBEAT: &[u8] = b": keep-alive\n\n";
/// Sent when the token expires, just before the stream ends. It has no `id:`, so the
/// client's `Last-Event-ID` stays on the last message.
const EXPIRED: &[u8] =
    b"event: expired\ndata: {\"type\":\"expired\",\"code\":\"token_expired\"}\n\n";

/// Streams the topic from `Last-Event-ID` (or `?after=`, or now), then live.
pub async fn sse(
    State(app): State<AppState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let topic = super::topic(&topic)?;
    access.check_subscribe(&topic)?;
    // A browser reconnecting sends the URL it first used plus the id it last saw: the
    // header is the newer of the two.
    let after = match headers.get("last-event-id") {
        Some(value) => Some(parse_cursor(
            "Last-Event-ID",
            value
                .to_str()
                .map_err(|_| Error::param("Last-Event-ID", "must be ASCII digits"))?,
        )?),
        None => params.after()?,
    };
    let subscription = app.hub.subscribe(&topic, after, Transport::Sse).await?;
    app.hub.record_request(Transport::Sse);
    let hello = Bytes::from(format!("retry: {}\n\n", app.config.sse_retry.as_millis()));
    let stream = SseStream {
        hello: Some(hello),
        subscription,
        heartbeat: heartbeat(app.config.heartbeat),
        write_delay: app.config.write_delay,
        ended: false,
        draining: false,
        app: app.clone(),
        expires: access.expires_at(),
    };
    let body = Body::from_stream(futures::stream::unfold(stream, |mut stream| async move {
        let chunk = stream.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), stream))
    }));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        body,
    )
        .into_response())
}

fn heartbeat(period: Duration) -> Interval {
    let mut ticker = interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// A signal as an SSE event whose `id:` is the cursor after it, so a reconnect resumes right.
fn signal_frame(topic: &TopicName, signal: &Signal) -> Bytes {
    encode_sse_frame(
        signal.resume_after(),
        signal.event_name(),
        signal.to_json(topic).as_bytes(),
    )
}

struct SseStream {
    /// The `retry:` hint, sent first so the client sees the stream open at once.
    hello: Option<Bytes>,
    subscription: Subscription,
    heartbeat: Interval,
    write_delay: Duration,
    /// The subscription ended while a write was being gathered: end after that write.
    ended: bool,
    /// The server is stopping: write what is ready, then end.
    draining: bool,
    /// The hub (for counters), the stop signal, and the publish gate the drain waits on.
    app: AppState,
    /// When the client's token expires: the stream ends then, with an `expired` event.
    expires: Option<tokio::time::Instant>,
}

impl SseStream {
    /// The next chunk of the body, or `None` to end the stream.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        if let Some(hello) = self.hello.take() {
            return Some(hello);
        }
        if self.draining {
            return self.drain().await;
        }
        let first = tokio::select! {
            delivery = next_delivery(&mut self.subscription, &mut self.ended) => delivery?,
            _ = self.heartbeat.tick() => return Some(Bytes::from_static(HEARTBEAT)),
            () = self.app.shutdown.cancelled() => {
                // Deliver what was acknowledged before the stop, then end.
                self.app.publishes_settled().await;
                self.draining = true;
                return self.drain().await;
            }
            () = expiry(self.expires) => {
                self.ended = true;
                return Some(Bytes::from_static(EXPIRED));
            }
        };
        Some(self.gather(first).await)
    }

    /// The next chunk of deliveries ready now, or `None` once there are none.
    async fn drain(&mut self) -> Option<Bytes> {
        use futures::FutureExt;
        let first = next_delivery(&mut self.subscription, &mut self.ended)
            .now_or_never()
            .flatten()?;
        Some(self.gather(first).await)
    }

    /// The frame of `first` followed by those of the deliveries that join it in one write,
    /// counted as delivered.
    async fn gather(&mut self, first: Delivery) -> Bytes {
        let (chunk, messages) = self.gather_frames(first).await;
        self.app
            .hub
            .record_delivery(Transport::Sse, messages, chunk.len() as u64);
        chunk
    }

    /// The frames of one write and how many messages they carry.
    async fn gather_frames(&mut self, first: Delivery) -> (Bytes, u64) {
        let mut window = WriteWindow::open(self.write_delay);
        if let Delivery::Message(message) = &first {
            crate::telemetry::delivery_lag(Transport::Sse, message.time);
        }
        let (frame, mut messages) = self.frame(&first);
        let Some(second) = window
            .next(next_delivery(&mut self.subscription, &mut self.ended))
            .await
        else {
            return (frame, messages);
        };
        let mut chunk = BytesMut::from(&frame[..]);
        let mut next = Some(second);
        while let Some(delivery) = next {
            let (frame, count) = self.frame(&delivery);
            chunk.extend_from_slice(&frame);
            messages += count;
            next = window
                .next(next_delivery(&mut self.subscription, &mut self.ended))
                .await;
        }
        (chunk.freeze(), messages)
    }

    fn frame(&self, delivery: &Delivery) -> (Bytes, u64) {
        match delivery {
            Delivery::Message(message) => (message.sse_frame().clone(), 1),
            Delivery::Signal(signal) => (signal_frame(self.subscription.topic(), signal), 0),
        }
    }
}

/// The next delivery; `None` (remembered in `ended`) once the stream must end.
async fn next_delivery(subscription: &mut Subscription, ended: &mut bool) -> Option<Delivery> {
    match subscription.next().await {
        Ok(Some(delivery)) => Some(delivery),
        Ok(None) => {
            *ended = true;
            None
        }
        Err(Error::SlowConsumer) => {
            crate::telemetry::slow_consumer("disconnect");
            tracing::debug!(topic = %subscription.topic(), "ending SSE stream of a slow consumer");
            *ended = true;
            None
        }
        Err(error) => {
            tracing::warn!(%error, topic = %subscription.topic(), "ending SSE stream");
            *ended = true;
            None
        }
    }
}
