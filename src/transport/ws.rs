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

use std::{collections::HashMap, pin::Pin};

use axum::{
    extract::{
        Path, State, WebSocketUpgrade,
        ws::{
            CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, close_code,
            rejection::WebSocketUpgradeRejection,
        },
    },
    response::Response,
};
use futures::{
    SinkExt, Stream, StreamExt,
    stream::{SplitSink, SplitStream},
};
use serde_json::{Value, json, value::RawValue};
use tokio::sync::mpsc;
use tokio_stream::StreamMap;

use super::{Params, WriteWindow, publish::Published};
use crate::{
    AppState,
    config::Config,
    error::Error,
    hub::{Delivery, Subscription, Transport},
    message::{EventName, MessageId, Payload, TopicName},
};

/// Follows one topic from `?after=` (or from now).
pub async fn topic_ws(
    State(app): State<AppState>,
    Path(topic): Path<String>,
    params: Params,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Error> {
    let topic = super::topic(&topic)?;
    let after = params.after()?;
    let upgrade = upgrade.map_err(|_| Error::UpgradeRequired)?;
    // Subscribe before answering 101: whatever is published once the client sees the
    // handshake complete reaches it.
    let subscription = app.hub.subscribe(&topic, after, Transport::Ws).await?;
    let config = app.config.clone();
    let mut session = Session::new(app, Some(topic));
    session.add(subscription);
    Ok(configure(upgrade, &config).on_upgrade(move |socket| session.run(socket)))
}

/// A connection that follows any number of topics, chosen by `subscribe` frames.
pub async fn multiplexed_ws(
    State(app): State<AppState>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Error> {
    let upgrade = upgrade.map_err(|_| Error::UpgradeRequired)?;
    let config = app.config.clone();
    let session = Session::new(app, None);
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
    /// The topic of a per-topic connection: where `publish` goes when it names none.
    home: Option<TopicName>,
    feeds: StreamMap<TopicName, Feed>,
}

type Sink = SplitSink<WebSocket, WsMessage>;

impl Session {
    fn new(app: AppState, home: Option<TopicName>) -> Self {
        Self {
            app,
            home,
            feeds: StreamMap::new(),
        }
    }

    fn add(&mut self, subscription: Subscription) {
        self.feeds
            .insert(subscription.topic().clone(), feed(subscription));
    }

    async fn run(mut self, socket: WebSocket) {
        self.app.hub.record_request(Transport::Ws);
        let shutdown = self.app.shutdown.clone();
        let (mut sink, incoming) = socket.split();
        // Frames are read by a task of their own, so that a wake-up for a delivery does not
        // also poll the socket for input (tungstenite clears its read buffer on every poll).
        let (frames_tx, mut frames) = mpsc::channel(1);
        let reader = tokio::spawn(read_frames(incoming, frames_tx));
        let close = loop {
            let written = tokio::select! {
                frame = frames.recv() => match frame {
                    Some(Ok(WsMessage::Text(text))) => {
                        let reply = self.handle(text.as_str()).await;
                        sink.send(text_frame(reply.to_string())).await
                    }
                    Some(Ok(WsMessage::Binary(_))) => {
                        let error = Error::InvalidMessage("binary frames are not accepted: send JSON text".into());
                        sink.send(text_frame(error_reply(&error, None).to_string())).await
                    }
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => Ok(()),
                    Some(Ok(WsMessage::Close(_))) | None => break None,
                    Some(Err(error)) => break close_for(error),
                },
                Some((topic, delivery)) = self.feeds.next(), if !self.feeds.is_empty() => {
                    self.write_deliveries(&mut sink, topic, delivery).await
                }
                () = shutdown.cancelled() => break Some((close_code::AWAY, "server shutting down")),
            };
            if written.is_err() {
                break None;
            }
        };
        if let Some((code, reason)) = close {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let _ = sink.send(WsMessage::Close(Some(frame))).await;
        }
        reader.abort();
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
                let event = match command.string("event")? {
                    Some(event) => EventName::parse(&event)?,
                    None => EventName::default_event(),
                };
                let data = command
                    .fields
                    .get("data")
                    .ok_or_else(|| Error::InvalidMessage("publish needs \"data\"".into()))?;
                let payload = Payload::from_json(data.get())?;
                let message = self.app.hub.publish(&topic, event, &payload).await?;
                let mut ack =
                    serde_json::to_value(Published::from(&*message)).expect("ack serializes");
                ack["type"] = json!("ack");
                Ok(ack)
            }
            "subscribe" => {
                let topic = TopicName::parse(&command.required_string("topic")?)?;
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

/// Passes the client's frames to its session until the connection ends or the session does.
async fn read_frames(
    mut incoming: SplitStream<WebSocket>,
    frames: mpsc::Sender<Result<WsMessage, axum::Error>>,
) {
    while let Some(frame) = incoming.next().await {
        let last = matches!(frame, Err(_) | Ok(WsMessage::Close(_)));
        if frames.send(frame).await.is_err() || last {
            break;
        }
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
