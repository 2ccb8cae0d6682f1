//! `GET /topics/{topic}/ws` and `GET /ws`: WebSocket, one topic or many per connection.
//!
//! Both endpoints run the same [`Session`]: the per-topic one starts subscribed to its topic
//! and publishes there by default; the multiplexed one starts with no subscription.
//!
//! Server frames: an envelope (a message, recognisable by having no `type`), or a control
//! object with a `type`: `ack`, `subscribed`, `unsubscribed`, `pong`, `error`, and the
//! cursor signals `truncated` and `reset`. Client frames are JSON objects with a `type`:
//! `publish`, `subscribe`, `unsubscribe`, `ping`. A bad client frame is answered with an
//! `error` frame and the connection stays usable.
//!
//! A client that stops reading blocks only its own session: the socket write waits, the
//! subscription falls behind, and the hub's policy (read the backlog from history by cursor)
//! bounds what it holds. Nothing is queued per connection beyond the write buffer.

use std::{
    collections::HashMap,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use axum::{
    body::Bytes,
    extract::{
        Path, State, WebSocketUpgrade,
        ws::{
            CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, close_code,
            rejection::WebSocketUpgradeRejection,
        },
    },
    http::HeaderMap,
    response::Response,
};
use futures::{SinkExt, Stream, StreamExt, stream::SplitSink, task::AtomicWaker};
use serde_json::{Value, json, value::RawValue};
use tokio::time::MissedTickBehavior;
use tokio_stream::StreamMap;

use super::{Params, WriteWindow, expiry, publish::Published};
use crate::{
    AppState,
    auth::Access,
    config::Config,
    error::Error,
    hub::{Delivery, Subscription, Transport},
    message::{EventName, MessageId, Payload, TopicName},
};

/// Follows one topic from `?after=` (or from now).
pub async fn topic_ws(
    State(app): State<AppState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Error> {
    app.origins.check_websocket(&headers)?;
    let topic = super::topic(&topic)?;
    access.check_subscribe(&topic)?;
    let after = params.after()?;
    let upgrade = upgrade.map_err(|_| Error::UpgradeRequired)?;
    // Subscribe before answering 101: whatever is published once the client sees the
    // handshake complete reaches it.
    let subscription = app.hub.subscribe(&topic, after, Transport::Ws).await?;
    let config = app.config.clone();
    let mut session = Session::new(app, access, params.peer_ip(), Some(topic));
    session.add(subscription);
    Ok(configure(upgrade, &config).on_upgrade(move |socket| session.run(socket)))
}

/// A connection that follows any number of topics, chosen by `subscribe` frames.
pub async fn multiplexed_ws(
    State(app): State<AppState>,
    access: Access,
    params: Params,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Error> {
    app.origins.check_websocket(&headers)?;
    let upgrade = upgrade.map_err(|_| Error::UpgradeRequired)?;
    let config = app.config.clone();
    let session = Session::new(app, access, params.peer_ip(), None);
    Ok(configure(upgrade, &config).on_upgrade(move |socket| session.run(socket)))
}

fn configure(upgrade: WebSocketUpgrade, config: &Config) -> WebSocketUpgrade {
    upgrade
        .read_buffer_size(config.ws_read_buffer)
        .write_buffer_size(config.ws_write_buffer)
        .max_message_size(config.ws_max_message)
        .max_frame_size(config.ws_max_message)
}

type Feed = Pin<Box<dyn Stream<Item = Result<Delivery, Error>> + Send>>;

fn feed(subscription: Subscription) -> Feed {
    Box::pin(futures::stream::unfold(
        subscription,
        |mut subscription| async move {
            match subscription.next().await {
                Ok(Some(delivery)) => Some((Ok(delivery), subscription)),
                Ok(None) => None,
                Err(error) => Some((Err(error), subscription)),
            }
        },
    ))
}

struct Session {
    app: AppState,
    /// The token the connection opened with: checked again by every command.
    access: Access,
    peer: Option<IpAddr>,
    /// The topic of a per-topic connection: where `publish` goes when it names none.
    home: Option<TopicName>,
    feeds: StreamMap<TopicName, Feed>,
    /// Set when a subscription must end the connection (a slow consumer under `disconnect`).
    close: Option<(u16, &'static str)>,
}

/// What the session does after one turn of its loop.
enum Step {
    Nothing,
    Write(WsMessage),
    Deliver(TopicName, Result<Delivery, Error>),
}

/// Close code for an expired token (application range 4000-4999).
const CLOSE_TOKEN_EXPIRED: u16 = 4001;

type Sink = SplitSink<WebSocket, WsMessage>;

impl Session {
    fn new(app: AppState, access: Access, peer: Option<IpAddr>, home: Option<TopicName>) -> Self {
        Self {
            app,
            access,
            peer,
            home,
            feeds: StreamMap::new(),
            close: None,
        }
    }

    fn add(&mut self, subscription: Subscription) {
        self.feeds
            .insert(subscription.topic().clone(), feed(subscription));
    }

    async fn run(mut self, socket: WebSocket) {
        self.app.hub.record_request(Transport::Ws);
        let config = self.app.config.clone();
        let shutdown = self.app.shutdown.clone();
        let expires = self.access.expires_at();
        // A peer that stops reading stalls our writes; one that vanished answers no ping.
        // Either is cut off after this long, and its resources freed.
        let stall_limit = config.ws_pong_timeout;
        let mut ping = tokio::time::interval_at(
            tokio::time::Instant::now() + config.ws_ping_interval,
            config.ws_ping_interval,
        );
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pong_deadline = None;
        let (mut sink, incoming) = socket.split();
        // A wake-up for a delivery must not also poll the socket for input: tungstenite
        // clears its read buffer on every poll, which cost ~5% of delivery CPU.
        let mut incoming = WakeGated::new(incoming);
        let close = loop {
            let step = tokio::select! {
                frame = incoming.next() => {
                    pong_deadline = None;
                    match frame {
                        Some(Ok(WsMessage::Text(text))) => {
                            Step::Write(text_frame(self.handle(text.as_str()).await.to_string()))
                        }
                        Some(Ok(WsMessage::Binary(_))) => {
                            let error = Error::InvalidMessage("binary frames are not accepted: send JSON text".into());
                            Step::Write(text_frame(error_reply(&error, None).to_string()))
                        }
                        Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => Step::Nothing,
                        Some(Ok(WsMessage::Close(_))) | None => break None,
                        Some(Err(error)) => break close_for(error),
                    }
                }
                Some((topic, delivery)) = self.feeds.next(), if !self.feeds.is_empty() => {
                    Step::Deliver(topic, delivery)
                }
                _ = ping.tick() => {
                    pong_deadline.get_or_insert(tokio::time::Instant::now() + stall_limit);
                    Step::Write(WsMessage::Ping(Bytes::new()))
                }
                () = expiry(pong_deadline) => {
                    tracing::debug!("WebSocket peer did not answer a ping: closing");
                    break None;
                }
                () = expiry(expires) => break Some((CLOSE_TOKEN_EXPIRED, "token expired")),
                () = shutdown.cancelled() => {
                    // Deliver what was acknowledged before the stop, then close.
                    self.app.publishes_settled().await;
                    let drained = tokio::time::timeout(stall_limit, self.drain(&mut sink)).await;
                    if !matches!(drained, Ok(Ok(()))) {
                        break None;
                    }
                    break Some((close_code::AWAY, "server shutting down"));
                }
            };
            let written = match step {
                Step::Nothing => Ok(Ok(())),
                Step::Write(frame) => tokio::time::timeout(stall_limit, sink.send(frame)).await,
                Step::Deliver(topic, delivery) => {
                    tokio::time::timeout(
                        stall_limit,
                        self.write_deliveries(&mut sink, topic, delivery),
                    )
                    .await
                }
            };
            if !matches!(written, Ok(Ok(()))) {
                // The peer is gone or has stopped reading: nothing more can reach it.
                break None;
            }
            if let Some(close) = self.close.take() {
                break Some(close);
            }
        };
        if let Some((code, reason)) = close {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let _ =
                tokio::time::timeout(stall_limit, sink.send(WsMessage::Close(Some(frame)))).await;
        }
    }

    /// Writes every delivery that is ready now, without waiting for more.
    async fn drain(&mut self, sink: &mut Sink) -> Result<(), axum::Error> {
        use futures::FutureExt;
        while let Some(Some((topic, delivery))) = self.feeds.next().now_or_never() {
            self.write_deliveries(sink, topic, delivery).await?;
        }
        Ok(())
    }

    /// Writes a delivery and any others already waiting, then flushes once.
    async fn write_deliveries(
        &mut self,
        sink: &mut Sink,
        topic: TopicName,
        delivery: Result<Delivery, Error>,
    ) -> Result<(), axum::Error> {
        let mut next = Some((topic, delivery));
        let mut window = WriteWindow::open(self.app.config.write_delay);
        let (mut messages, mut bytes) = (0, 0);
        if let Some((_, Ok(Delivery::Message(message)))) = &next {
            crate::telemetry::delivery_lag(Transport::Ws, message.time);
        }
        while let Some((topic, delivery)) = next {
            let frame = match delivery {
                Ok(Delivery::Message(message)) => {
                    messages += 1;
                    bytes += message.envelope().len() as u64;
                    WsMessage::Text(
                        Utf8Bytes::try_from(message.envelope().clone())
                            .expect("envelopes are UTF-8 JSON"),
                    )
                }
                Ok(Delivery::Signal(signal)) => text_frame(signal.to_json(&topic)),
                Err(Error::SlowConsumer) => {
                    crate::telemetry::slow_consumer("disconnect");
                    self.close = Some((close_code::AGAIN, "subscriber fell too far behind"));
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, %topic, "WebSocket subscription failed");
                    self.feeds.remove(&topic);
                    let mut reply = error_reply(&error, None);
                    reply["topic"] = json!(topic);
                    text_frame(reply.to_string())
                }
            };
            sink.feed(frame).await?;
            next = if self.feeds.is_empty() {
                None
            } else {
                window.next(self.feeds.next()).await
            };
        }
        self.app.hub.record_delivery(Transport::Ws, messages, bytes);
        sink.flush().await
    }

    /// Executes one client command and returns the reply frame.
    async fn handle(&mut self, text: &str) -> Value {
        let fields: HashMap<String, &RawValue> = match serde_json::from_str(text) {
            Ok(fields) => fields,
            Err(_) => {
                let error = Error::InvalidMessage("expected a JSON object with a \"type\"".into());
                return error_reply(&error, None);
            }
        };
        let command = Command { fields: &fields };
        let reference = fields.get("ref").copied();
        match self.execute(command).await {
            Ok(mut reply) => {
                if let Some(reference) = reference {
                    reply["ref"] = serde_json::from_str(reference.get()).unwrap_or(Value::Null);
                }
                reply
            }
            Err(error) => error_reply(&error, reference),
        }
    }

    async fn execute(&mut self, command: Command<'_>) -> Result<Value, Error> {
        let kind = command
            .string("type")?
            .ok_or_else(|| Error::InvalidMessage("missing \"type\"".into()))?;
        match kind.as_str() {
            "publish" => {
                let topic = match command.string("topic")? {
                    Some(topic) => TopicName::parse(&topic)?,
                    None => self.home.clone().ok_or_else(|| {
                        Error::InvalidMessage("publish on /ws needs a \"topic\"".into())
                    })?,
                };
                self.access.check_publish(&topic)?;
                self.app
                    .publish_limiter
                    .check(&self.access.client_key(self.peer))?;
                let event = match command.string("event")? {
                    Some(event) => EventName::parse(&event)?,
                    None => EventName::default_event(),
                };
                let data = command
                    .fields
                    .get("data")
                    .ok_or_else(|| Error::InvalidMessage("publish needs \"data\"".into()))?;
                let payload = Payload::from_json(data.get())?;
                let message = self.app.publish(&topic, event, &payload).await?;
                let mut ack =
                    serde_json::to_value(Published::from(&*message)).expect("ack serializes");
                ack["type"] = json!("ack");
                Ok(ack)
            }
            "subscribe" => {
                let topic = TopicName::parse(&command.required_string("topic")?)?;
                self.access.check_subscribe(&topic)?;
                let limit = self.app.config.max_subscriptions_per_connection;
                if !self.feeds.contains_key(&topic) && self.feeds.len() >= limit {
                    return Err(Error::TooManySubscriptions { limit });
                }
                let after = command.cursor("after")?;
                let subscription = self.app.hub.subscribe(&topic, after, Transport::Ws).await?;
                let cursor = subscription.cursor();
                self.add(subscription);
                Ok(json!({"type": "subscribed", "topic": topic, "after": cursor}))
            }
            "unsubscribe" => {
                let topic = TopicName::parse(&command.required_string("topic")?)?;
                let was_subscribed = self.feeds.remove(&topic).is_some();
                Ok(
                    json!({"type": "unsubscribed", "topic": topic, "was_subscribed": was_subscribed}),
                )
            }
            "ping" => Ok(json!({"type": "pong"})),
            other => Err(Error::UnknownType(other.chars().take(64).collect())),
        }
    }
}

/// A stream polled only when it has woken its task (or has just yielded an item), so that
/// the other branches of a `select!` waking the task do not poll it for nothing.
struct WakeGated<S> {
    stream: S,
    signal: Arc<WakeSignal>,
}

struct WakeSignal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<S> WakeGated<S> {
    fn new(stream: S) -> Self {
        Self {
            stream,
            signal: Arc::new(WakeSignal {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl<S: Stream + Unpin> Stream for WakeGated<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        self.signal.task.register(cx.waker());
        if !self.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(self.signal.clone());
        let polled = self
            .stream
            .poll_next_unpin(&mut Context::from_waker(&waker));
        if polled.is_ready() {
            // More may be buffered: poll again next time without waiting for a wake-up.
            self.signal.woken.store(true, Ordering::Release);
        }
        polled
    }
}

/// The fields of a client frame, read on demand so that `"data": null` and a missing
/// `data` stay distinguishable.
struct Command<'a> {
    fields: &'a HashMap<String, &'a RawValue>,
}

impl Command<'_> {
    fn string(&self, name: &str) -> Result<Option<String>, Error> {
        self.fields
            .get(name)
            .map(|raw| {
                serde_json::from_str::<String>(raw.get())
                    .map_err(|_| Error::InvalidMessage(format!("\"{name}\" must be a string")))
            })
            .transpose()
    }

    fn required_string(&self, name: &str) -> Result<String, Error> {
        self.string(name)?
            .ok_or_else(|| Error::InvalidMessage(format!("missing \"{name}\"")))
    }

    fn cursor(&self, name: &'static str) -> Result<Option<MessageId>, Error> {
        self.fields
            .get(name)
            .map(|raw| {
                serde_json::from_str::<MessageId>(raw.get()).map_err(|_| {
                    Error::param(
                        name,
                        "must be a message id: a whole number from 0 to 18446744073709551615",
                    )
                })
            })
            .transpose()
    }
}

fn error_reply(error: &Error, reference: Option<&RawValue>) -> Value {
    crate::telemetry::rejected(error.code());
    let mut reply = json!({"type": "error", "code": error.code(), "error": error.public_message()});
    if let Some(reference) = reference {
        reply["ref"] = serde_json::from_str(reference.get()).unwrap_or(Value::Null);
    }
    reply
}

fn text_frame(text: String) -> WsMessage {
    WsMessage::Text(text.into())
}

/// The close code for a failed read: the client broke a rule we can name.
fn close_for(error: axum::Error) -> Option<(u16, &'static str)> {
    let inner = error.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => Some((close_code::SIZE, "message too large")),
        Some(tungstenite::Error::Utf8(_)) => {
            Some((close_code::INVALID, "invalid UTF-8 in text frame"))
        }
        Some(tungstenite::Error::Protocol(_)) => Some((close_code::PROTOCOL, "protocol error")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures::task::noop_waker;

    use super::*;

    #[test]
    fn a_gated_stream_is_polled_only_after_its_own_wake_up() {
        let polls = Arc::new(AtomicUsize::new(0));
        let (sender, receiver) = futures::channel::mpsc::unbounded::<u32>();
        let mut counted = CountPolls {
            inner: receiver,
            polls: polls.clone(),
        };
        let mut gated = WakeGated::new(&mut counted);
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(gated.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1, "first poll goes through");
        assert!(gated.poll_next_unpin(&mut cx).is_pending());
        assert!(gated.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1, "no wake-up: not polled");

        sender.unbounded_send(7).unwrap();
        assert_eq!(gated.poll_next_unpin(&mut cx), Poll::Ready(Some(7)));
        assert_eq!(polls.load(Ordering::Relaxed), 2);
        assert!(
            gated.poll_next_unpin(&mut cx).is_pending(),
            "polled again after an item"
        );
        assert_eq!(polls.load(Ordering::Relaxed), 3);
    }

    struct CountPolls<S> {
        inner: S,
        polls: Arc<AtomicUsize>,
    }

    impl<S: Stream + Unpin> Stream for CountPolls<S> {
        type Item = S::Item;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.inner.poll_next_unpin(cx)
        }
    }
}
