//! What a WebSocket client says: frames in, commands executed, replies out.
//!
//! Client frames are JSON objects with a `type`: `publish`, `subscribe`, `unsubscribe`,
//! `ping`. Replies are `ack`, `subscribed`, `unsubscribed`, `pong`, or `error`; a bad frame
//! is answered with an `error` frame and the connection stays usable. Replies are queued on
//! the connection's outlet, behind whatever the fan-out queued, so they keep their order
//! with the messages.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use bytes::Bytes;
use serde_json::{Value, json, value::RawValue};

use super::frame::{Event, FrameReader, close_code};
use crate::{
    access::Access,
    error::Error,
    hub::Outlet,
    message::{
        MessageId, Payload, TopicName,
        pattern::{Selection, Selector},
        wire,
    },
    transport::TransportState,
    transport::{
        listed::{self, Start},
        publish::{Published, publish_as},
        stream::{Finish, Peer},
    },
};

/// One WebSocket connection's protocol state.
pub struct Session {
    app: TransportState,
    /// The token the connection opened with: checked again by every command.
    access: Access,
    peer: Option<IpAddr>,
    /// The topic of a per-topic connection: where `publish` goes when it names none.
    /// (What the connection follows is its outlet's: a second list here would cost every
    /// followed topic a name and a handle.)
    home: Option<TopicName>,
    frames: FrameReader,
}

impl Session {
    /// A session for a connection from `peer`, publishing to `home` by default.
    pub fn new(
        app: TransportState,
        access: Access,
        peer: Option<IpAddr>,
        home: Option<TopicName>,
    ) -> Self {
        let frames = FrameReader::new(app.settings.stream.ws_max_message);
        Self {
            app,
            access,
            peer,
            home,
            frames,
        }
    }

    /// Executes one client command and returns the reply.
    async fn handle(&mut self, text: &str, outlet: &Arc<Outlet>) -> Value {
        let fields: HashMap<String, &RawValue> = match serde_json::from_str(text) {
            Ok(fields) => fields,
            Err(_) => {
                let error = Error::InvalidMessage("expected a JSON object with a \"type\"".into());
                return error_reply(&error, None);
            }
        };
        let command = Command { fields: &fields };
        let reference = fields.get("ref").copied();
        match self.execute(command, outlet).await {
            Ok(mut reply) => {
                if let Some(reference) = reference {
                    reply["ref"] = serde_json::from_str(reference.get()).unwrap_or(Value::Null);
                }
                reply
            }
            Err(error) => error_reply(&error, reference),
        }
    }

    async fn execute(
        &mut self,
        command: Command<'_>,
        outlet: &Arc<Outlet>,
    ) -> Result<Value, Error> {
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
                let event = command.string("event")?;
                let payload = || {
                    let data = command
                        .fields
                        .get("data")
                        .ok_or_else(|| Error::InvalidMessage("publish needs \"data\"".into()))?;
                    Ok(Payload::from_json(data.get())?)
                };
                let message = publish_as(
                    &self.app,
                    &self.access,
                    self.peer,
                    &topic,
                    event.as_deref(),
                    payload,
                )
                .await?;
                let mut ack =
                    serde_json::to_value(Published::from(&*message)).expect("ack serializes");
                ack["type"] = json!("ack");
                Ok(ack)
            }
            "subscribe" => self.subscribe(&command, outlet).await,
            "unsubscribe" => self.unsubscribe(&command, outlet),
            "ping" => Ok(json!({"type": "pong"})),
            other => Err(Error::UnknownType(other.chars().take(64).collect())),
        }
    }
}

impl Session {
    /// `{"type":"subscribe","topic":"t","after":N}` (or a pattern: [`Session::subscribe_pattern`]).
    async fn subscribe(
        &mut self,
        command: &Command<'_>,
        outlet: &Arc<Outlet>,
    ) -> Result<Value, Error> {
        let name = command.required_string("topic")?;
        if name.ends_with('*') {
            return self.subscribe_pattern(&name, command, outlet).await;
        }
        let topic = TopicName::parse(&name)?;
        self.access.check_subscribe(&topic)?;
        let limit = self.app.settings.stream.max_subscriptions;
        let following = outlet.sub_of(&topic);
        if following.is_none() && outlet.sub_count() >= limit {
            return Err(Error::TooManySubscriptions { limit });
        }
        let after = command.cursor("after")?;
        // Subscribing again starts the topic over from `after`; but a topic the
        // connection's cursor names (its URL's list, or a pattern's) stays as it is, named
        // there: the reply says where it stands.
        if let Some((previous, false)) = following {
            outlet.unsubscribe(previous);
        }
        // The reply is queued before the sub reads anything: it precedes the topic's
        // messages.
        let sub = self.app.hub.subscribe(&topic, after, outlet).await?;
        let cursor = outlet.cursor(sub).unwrap_or_default();
        Ok(json!({"type": "subscribed", "topic": topic, "after": cursor}))
    }

    /// `{"type":"unsubscribe","topic":"t"}`, or a pattern (`news.*`): that pattern and the
    /// topics only it picked up.
    fn unsubscribe(&mut self, command: &Command<'_>, outlet: &Arc<Outlet>) -> Result<Value, Error> {
        let name = command.required_string("topic")?;
        let was_subscribed = match name.strip_suffix('*') {
            Some(prefix) => {
                Selector::parse(&name)?;
                self.app.hub.unwatch_prefix(outlet, prefix)
            }
            None => {
                let topic = TopicName::parse(&name)?;
                outlet
                    .sub_of(&topic)
                    .is_some_and(|(sub, _)| outlet.unsubscribe(sub))
            }
        };
        Ok(json!({"type": "unsubscribed", "topic": name, "was_subscribed": was_subscribed}))
    }

    /// `{"type":"subscribe","topic":"news.*","after":...}`: every topic the pattern
    /// matches, and those created later, on this connection. `after` is absent (from now),
    /// `0` (every topic from its start) or a cursor string (the `cursor` of an earlier
    /// `subscribed` reply, or one the client kept); the reply carries the cursor over every
    /// topic the connection follows through patterns.
    async fn subscribe_pattern(
        &mut self,
        name: &str,
        command: &Command<'_>,
        outlet: &Arc<Outlet>,
    ) -> Result<Value, Error> {
        let limit = self.app.settings.stream.max_subscriptions.max(1);
        let selection = Selection::parse(name, 1)?;
        self.access.check_selection(&selection)?;
        let start = match command.fields.get("after") {
            None => Start::Now,
            Some(raw) => {
                let text = serde_json::from_str::<String>(raw.get())
                    .unwrap_or_else(|_| raw.get().to_owned());
                Start::parse("after", text.as_bytes(), limit)?
            }
        };
        if let Start::At(cursor) = &start {
            listed::fits(&selection, cursor)?;
        }
        self.app.hub.keep_cursor(outlet);
        let prefix = name.strip_suffix('*').unwrap_or(name);
        let watched = self.app.hub.watches_prefix(outlet, prefix);
        if let Err(error) = listed::follow(&self.app, &selection, &start, outlet).await {
            // Refused (too broad, too many topics) or failed partway: follow nothing of it,
            // or its next topic would end the whole connection for the limit.
            if !watched {
                self.app.hub.unwatch_prefix(outlet, prefix);
            }
            return Err(error);
        }
        Ok(json!({"type": "subscribed", "topic": name, "cursor": outlet.list_cursor()}))
    }
}

impl Peer for Session {
    async fn on_input(&mut self, input: &mut Vec<u8>, outlet: &Arc<Outlet>) -> Result<(), Finish> {
        let mut used = 0;
        let result = loop {
            let frame = match self.frames.next(&input[used..]) {
                Ok(Some(frame)) => frame,
                Ok(None) => break Ok(()),
                Err(violation) => {
                    outlet.push_last(wire::ws_close_frame(violation.code, violation.reason));
                    break Err(Finish::Closed);
                }
            };
            used += frame.0;
            outlet.heard();
            match frame.1 {
                None | Some(Event::Pong) => {}
                Some(Event::Ping(payload)) => {
                    outlet.push(wire::ws_frame(wire::opcode::PONG, &payload));
                }
                Some(Event::Text(text)) => {
                    let reply = self.handle(&text, outlet).await;
                    outlet.push(text_frame(&reply));
                }
                Some(Event::Binary(_)) => {
                    let error = Error::InvalidMessage(
                        "binary frames are not accepted: send JSON text".into(),
                    );
                    outlet.push(text_frame(&error_reply(&error, None)));
                }
                Some(Event::Close(_)) => {
                    // Answer the closing handshake with a close frame of our own.
                    outlet.push_last(wire::ws_close_frame(1000, ""));
                    break Err(Finish::Closed);
                }
            }
        };
        input.drain(..used);
        result
    }

    fn on_catch_up_failed(
        &mut self,
        outlet: &Outlet,
        topic: &TopicName,
        error: &Error,
    ) -> Result<(), Finish> {
        // The outlet has dropped the sub.
        tracing::warn!(%error, %topic, "WebSocket subscription failed");
        let mut reply = error_reply(error, None);
        reply["topic"] = json!(topic);
        outlet.push(text_frame(&reply));
        Ok(())
    }
}

/// The close frame a WebSocket gets when its stream ends for `finish` (`None`: just close).
pub fn close_frame(finish: Finish) -> Option<Bytes> {
    use crate::hub::End;
    let (code, reason) = match finish {
        Finish::Ended(End::Drained) => (close_code::AWAY, "server shutting down"),
        Finish::Ended(End::SlowConsumer) => (close_code::AGAIN, "subscriber fell too far behind"),
        Finish::Expired => (close_code::TOKEN_EXPIRED, "token expired"),
        Finish::Unavailable => (close_code::AGAIN, "store_unavailable"),
        Finish::Ended(End::TooManyTopics) => (close_code::POLICY, "pattern_too_broad"),
        // A WebSocket follows no source that ends.
        Finish::Ended(End::Gone | End::Unresponsive | End::Finished)
        | Finish::PeerGone
        | Finish::Stalled
        | Finish::Closed => return None,
    };
    Some(wire::ws_close_frame(code, reason))
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
            // A JSON number's text is its digits: the same rule as everywhere else.
            .map(|raw| crate::transport::parse_cursor(name, raw.get().as_bytes()))
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

fn text_frame(reply: &Value) -> Bytes {
    wire::ws_frame(wire::opcode::TEXT, reply.to_string().as_bytes())
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}
