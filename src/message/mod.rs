//! The message envelope, validated names, and the wire encodings shared by every transport.
//!
//! A [`Message`] is encoded once, when it is published, into the byte strings the transports
//! send: the envelope JSON (poll answers), the complete WebSocket text frame around it, and
//! the complete Server-Sent Events frame, also as an HTTP/1.1 chunk. Every subscriber then
//! shares those `Bytes`, so fan-out never serializes, frames or copies per subscriber.

pub mod cursor;
pub mod pattern;
pub mod presence;
pub mod transport;
pub mod wire;

pub use transport::{PerTransport, TransportKind};

use std::{fmt, sync::Arc};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// What the message layer refuses: names and payloads that break its rules. The layers above
/// map it to their answers (`crate::error::Error` turns it into a 400 with a code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A topic name outside 1-128 characters of `[A-Za-z0-9._:-]`.
    #[error("invalid topic name {0:?}")]
    Topic(String),
    /// An event name outside the same rule.
    #[error("invalid event name {0:?}")]
    Event(String),
    /// Text that is not JSON.
    #[error("not valid JSON: {0}")]
    Json(String),
    /// Bytes that are not UTF-8.
    #[error("not valid UTF-8")]
    Utf8,
}

/// A message id. Ids are per topic, start at 1 and grow by exactly 1 per publish, so a gap
/// between two ids a subscriber sees proves it missed something.
pub type MessageId = u64;

/// Longest accepted topic or event name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Whether `name` follows the rule of topic, event and client names: 1 to 128 characters
/// of `[A-Za-z0-9._:-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $error:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `name`: 1 to 128 characters of `[A-Za-z0-9._:-]`.
            pub fn parse(name: &str) -> Result<Self, Invalid> {
                if valid_name(name) {
                    Ok(Self(Arc::from(name)))
                } else {
                    Err(Invalid::$error(truncate_for_error(name)))
                }
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A validated topic name.
    TopicName,
    Topic
);
name_type!(
    /// A validated event name (the SSE `event:` field); `message` by default.
    EventName,
    Event
);

impl EventName {
    /// The event name used when a publisher names none.
    pub fn default_event() -> Self {
        Self(Arc::from("message"))
    }
}

/// Keeps error messages short when a client sends a huge invalid name.
fn truncate_for_error(name: &str) -> String {
    const SHOWN: usize = 64;
    if name.len() <= SHOWN {
        return name.to_owned();
    }
    let mut end = SHOWN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &name[..end])
}

/// The payload of a message: one line of compact, valid JSON.
///
/// Compactness matters: the SSE `data:` field ends at a newline, so the JSON must contain none.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Bytes);

impl Payload {
    /// Validates `text` as JSON and removes insignificant whitespace. Numbers, key order and
    /// string escapes are kept byte for byte, unlike a parse into `serde_json::Value`.
    pub fn from_json(text: &str) -> Result<Self, Invalid> {
        let raw: &RawValue =
            serde_json::from_str(text).map_err(|e| Invalid::Json(e.to_string()))?;
        Ok(Self(Bytes::from(minify_json(raw.get()))))
    }

    /// Wraps arbitrary text as a JSON string.
    pub fn from_text(text: &str) -> Self {
        Self(Bytes::from(
            serde_json::to_string(text).expect("a string always serializes"),
        ))
    }

    /// Rebuilds a payload this server validated before it was stored. Checks only what the
    /// wire encodings rely on (UTF-8, one line), so a corrupted record is refused, not sent.
    pub(crate) fn from_stored(bytes: Bytes) -> Option<Self> {
        (std::str::from_utf8(&bytes).is_ok() && !bytes.contains(&b'\n')).then_some(Self(bytes))
    }

    /// The compact JSON text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("payload is built from UTF-8 text")
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Removes whitespace outside JSON strings. The input must be valid JSON.
///
/// Works on bytes: JSON whitespace, quotes and backslashes are ASCII, and UTF-8 never uses
/// ASCII bytes inside a multi-byte character, so no character is split.
fn minify_json(json: &str) -> String {
    let bytes = json.as_bytes();
    if !bytes
        .iter()
        .any(|b| matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
    {
        return json.to_owned();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            in_string = b == b'"';
            out.push(b);
        }
    }
    String::from_utf8(out).expect("only ASCII whitespace was removed from valid UTF-8")
}

/// A published message, with its wire encodings computed once.
#[derive(Clone)]
pub struct Message {
    /// Per-topic id, the cursor every transport resumes from.
    pub id: MessageId,
    /// The topic it was published to.
    pub topic: TopicName,
    /// Its event name.
    pub event: EventName,
    /// Publish time, unix milliseconds.
    pub time: u64,
    /// The complete WebSocket text frame; `envelope` is its payload, and `ndjson_line` the
    /// envelope and a newline, all in the same allocation.
    ws_frame: Bytes,
    envelope: Bytes,
    ndjson_line: Bytes,
    /// The SSE frame as one HTTP/1.1 chunk; `sse_frame` is its content, in the same allocation.
    sse_chunk: Bytes,
    sse_frame: Bytes,
}

/// The envelope as stored outside this process (e.g. by an external log), parsed back.
#[derive(Deserialize)]
struct EnvelopeOwned<'a> {
    id: MessageId,
    topic: &'a str,
    event: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
    time: u64,
}

impl Message {
    /// Builds a message and encodes it for every transport.
    pub fn new(
        id: MessageId,
        topic: TopicName,
        event: EventName,
        time: u64,
        data: &Payload,
    ) -> Self {
        // Written by hand: names are restricted to [A-Za-z0-9._:-], which JSON never escapes,
        // and the payload is already compact, validated JSON, so nothing needs re-parsing.
        // The envelope is written after room for the longest WebSocket header, which is then
        // filled in right-aligned, so frame and envelope share one allocation.
        let data = data.as_str();
        let (mut id_text, mut time_text) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (id_text, time_text) = (id_text.format(id), time_text.format(time));
        let mut frame = Vec::with_capacity(
            wire::WS_MAX_HEADER
                + 48
                + id_text.len()
                + topic.as_str().len()
                + event.as_str().len()
                + data.len()
                + time_text.len()
                + 1,
        );
        frame.resize(wire::WS_MAX_HEADER, 0);
        frame.extend_from_slice(b"{\"id\":");
        frame.extend_from_slice(id_text.as_bytes());
        frame.extend_from_slice(b",\"topic\":\"");
        frame.extend_from_slice(topic.as_str().as_bytes());
        frame.extend_from_slice(b"\",\"event\":\"");
        frame.extend_from_slice(event.as_str().as_bytes());
        frame.extend_from_slice(b"\",\"data\":");
        frame.extend_from_slice(data.as_bytes());
        frame.extend_from_slice(b",\"time\":");
        frame.extend_from_slice(time_text.as_bytes());
        frame.push(b'}');
        let envelope_len = frame.len() - wire::WS_MAX_HEADER;
        // The NDJSON line's newline, after the envelope and outside the WebSocket frame.
        frame.push(b'\n');
        let (header, used) = wire::ws_header(wire::opcode::TEXT, envelope_len);
        let start = wire::WS_MAX_HEADER - used;
        frame[start..wire::WS_MAX_HEADER].copy_from_slice(&header[..used]);
        let shared = Bytes::from(frame);
        let ndjson_line = shared.slice(wire::WS_MAX_HEADER..);
        let ws_frame = shared.slice(start..shared.len() - 1);
        let envelope = ws_frame.slice(used..);

        let sse_len = wire::sse_frame_len(id, event.as_str(), &envelope);
        let mut chunk = Vec::with_capacity(sse_len + 12);
        wire::push_chunk_start(&mut chunk, sse_len);
        let frame_start = chunk.len();
        wire::push_sse_frame(&mut chunk, id, event.as_str(), &envelope);
        chunk.extend_from_slice(b"\r\n");
        let sse_chunk = Bytes::from(chunk);
        let sse_frame = sse_chunk.slice(frame_start..frame_start + sse_len);
        Self {
            id,
            topic,
            event,
            time,
            ws_frame,
            envelope,
            ndjson_line,
            sse_chunk,
            sse_frame,
        }
    }

    /// Rebuilds a message from its envelope JSON, as written by [`Message::envelope`].
    pub fn from_envelope(json: &[u8]) -> Result<Self, Invalid> {
        let text = std::str::from_utf8(json).map_err(|_| Invalid::Utf8)?;
        let parsed: EnvelopeOwned<'_> =
            serde_json::from_str(text).map_err(|e| Invalid::Json(e.to_string()))?;
        let payload = Payload(Bytes::from(minify_json(parsed.data.get())));
        Ok(Self::new(
            parsed.id,
            TopicName::parse(parsed.topic)?,
            EventName::parse(parsed.event)?,
            parsed.time,
            &payload,
        ))
    }

    /// The payload's compact JSON, as published: the `data` field of the envelope.
    pub fn data(&self) -> &str {
        let (mut id, mut time) = (itoa::Buffer::new(), itoa::Buffer::new());
        let head = r#"{"id":,"topic":"","event":"","data":"#.len()
            + id.format(self.id).len()
            + self.topic.as_str().len()
            + self.event.as_str().len();
        let tail = r#","time":}"#.len() + time.format(self.time).len();
        std::str::from_utf8(&self.envelope[head..self.envelope.len() - tail])
            .expect("the envelope is built from UTF-8 text")
    }

    /// The envelope `{"id","topic","event","data","time"}` as compact JSON: the body of a
    /// WebSocket frame and an element of a poll answer.
    pub fn envelope(&self) -> &Bytes {
        &self.envelope
    }

    /// The complete WebSocket text frame carrying the envelope (unmasked, as servers send).
    pub fn ws_frame(&self) -> &Bytes {
        &self.ws_frame
    }

    /// The envelope and a newline: one line of an NDJSON stream.
    pub fn ndjson_line(&self) -> &Bytes {
        &self.ndjson_line
    }

    /// The complete SSE frame (`id:`, `event:`, `data:` lines and the blank line).
    pub fn sse_frame(&self) -> &Bytes {
        &self.sse_frame
    }

    /// The SSE frame as one HTTP/1.1 chunk, for a chunked response body.
    pub fn sse_chunk(&self) -> &Bytes {
        &self.sse_chunk
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.envelope).unwrap_or("<envelope>"))
    }
}

/// Unix time in milliseconds: the envelope's `time`.
pub fn now_millis() -> u64 {
    now_micros() / 1000
}

/// Unix time in microseconds.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_the_payload_inside_the_envelope() {
        let topic = TopicName::parse("t.1").unwrap();
        for payload in [r#"{"a":[1,2]}"#, r#""x,\"time\":1}""#, "7"] {
            let data = Payload::from_json(payload).unwrap();
            let message = Message::new(123, topic.clone(), EventName::default_event(), 99, &data);
            assert_eq!(message.data(), data.as_str());
        }
    }

    #[test]
    fn names_follow_the_charset_and_length_rule() {
        assert!(TopicName::parse("chat.room-1:a_b").is_ok());
        assert!(TopicName::parse(&"a".repeat(128)).is_ok());
        for bad in ["", "a b", "a/b", "é", &"a".repeat(129)] {
            assert!(TopicName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn payload_json_is_minified_without_touching_strings_or_numbers() {
        let p =
            Payload::from_json("{ \"a\" : [1, 2.50 ,1e3],\n \"s\": \"x y\\\" \\n z\" }").unwrap();
        assert_eq!(p.as_str(), r#"{"a":[1,2.50,1e3],"s":"x y\" \n z"}"#);
        assert!(Payload::from_json("{").is_err());
        assert!(Payload::from_json("").is_err());
        assert_eq!(Payload::from_text("a\n\"b").as_str(), r#""a\n\"b""#);
        assert_eq!(
            Payload::from_json("{ \"é\" : \"ü ß\\\\\", \"n\": [ ] }")
                .unwrap()
                .as_str(),
            r#"{"é":"ü ß\\","n":[]}"#
        );
    }

    #[test]
    fn message_encodings_round_trip() {
        let topic = TopicName::parse("t").unwrap();
        let event = EventName::parse("greet").unwrap();
        let msg = Message::new(
            7,
            topic,
            event,
            42,
            &Payload::from_json("{\"k\": 1}").unwrap(),
        );
        assert_eq!(
            &msg.envelope()[..],
            br#"{"id":7,"topic":"t","event":"greet","data":{"k":1},"time":42}"#
        );
        assert_eq!(
            &msg.sse_frame()[..],
            &b"id: 7\nevent: greet\ndata: {\"id\":7,\"topic\":\"t\",\"event\":\"greet\",\"data\":{\"k\":1},\"time\":42}\n\n"[..]
        );
        assert_eq!(&msg.ws_frame()[..2], &[0x81, msg.envelope().len() as u8]);
        assert_eq!(&msg.ws_frame()[2..], &msg.envelope()[..]);
        assert_eq!(
            &msg.ndjson_line()[..msg.envelope().len()],
            &msg.envelope()[..]
        );
        assert_eq!(&msg.ndjson_line()[msg.envelope().len()..], b"\n");
        let chunk = &msg.sse_chunk()[..];
        let text = format!("{:x}\r\n", msg.sse_frame().len());
        assert!(chunk.starts_with(text.as_bytes()) && chunk.ends_with(b"\n\n\r\n"));
        assert_eq!(&chunk[text.len()..chunk.len() - 2], &msg.sse_frame()[..]);
        let back = Message::from_envelope(msg.envelope()).unwrap();
        assert_eq!(back.envelope(), msg.envelope());
        assert_eq!(back.sse_frame(), msg.sse_frame());
    }

    #[test]
    fn long_envelopes_get_the_longer_websocket_header() {
        let topic = TopicName::parse("t").unwrap();
        let data = Payload::from_text(&"x".repeat(70_000));
        let msg = Message::new(1, topic, EventName::default_event(), 0, &data);
        assert_eq!(&msg.ws_frame()[..2], &[0x81, 127]);
        let len = u64::from_be_bytes(msg.ws_frame()[2..10].try_into().unwrap());
        assert_eq!(len as usize, msg.envelope().len());
        assert_eq!(&msg.ws_frame()[10..], &msg.envelope()[..]);
    }
}
