//! How an outlet frames what it is sent: the wire [`Format`]s, the [`Native`] ones whose
//! bytes every message carries (framed once at publish), and the [`Framer`] of a protocol
//! whose bytes depend on more than the message (Durable Streams' offsets).

use std::sync::Arc;

use bytes::Bytes;

use super::Signal;
use crate::message::{Message, MessageId, TopicName, TransportKind, wire};

/// How a connection frames what it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// WebSocket text frames.
    Ws,
    /// SSE events, in a body whose framing someone else does (hyper, HTTP/2).
    Sse,
    /// SSE events, each as an HTTP/1.1 chunk of a chunked body written by pushhub itself.
    SseChunked,
    /// NDJSON lines (HTTP streaming): one envelope per line, in a body delimited by its end
    /// (the connection's close on HTTP/1.1, the stream's end on HTTP/2).
    Ndjson,
    /// Durable Streams SSE events, in a body someone else frames. Their bytes depend on the
    /// stream's offsets, which the hub does not know: the outlet's [`Framer`] writes them.
    DsSse,
    /// Durable Streams SSE events, each message's as one HTTP/1.1 chunk (its [`Framer`]'s).
    DsSseChunked,
}

/// Writes the bytes of a message for an outlet whose format is a protocol's own
/// ([`Format::DsSse`]): the fan-out asks it once per message and connection, so an
/// implementation shares what it encodes between the connections that get the same bytes.
pub trait Framer: Send + Sync {
    /// The bytes that carry `message` (as one chunk if the outlet's format is chunked).
    fn frame(&self, message: &Arc<Message>) -> Bytes;
}

impl Format {
    /// Whether pushhub frames the body itself as HTTP/1.1 chunks: such a body has an end of
    /// its own (the last chunk), and the connection may serve another request after it.
    pub fn chunked(self) -> bool {
        matches!(self, Format::SseChunked | Format::DsSseChunked)
    }

    /// The transport that speaks this format, for counters and gauges.
    pub fn transport(self) -> TransportKind {
        match self {
            Format::Ws => TransportKind::Ws,
            Format::Sse | Format::SseChunked => TransportKind::Sse,
            Format::Ndjson => TransportKind::Stream,
            Format::DsSse | Format::DsSseChunked => TransportKind::DsSse,
        }
    }

    /// A cursor signal in this format ([`Signal`] renders it); `None` for Durable Streams,
    /// whose streams keep every message (a stream's topic is never trimmed, and a deleted
    /// stream's readers are ended by its protocol, not told of a reset).
    pub fn signal(self, topic: &TopicName, signal: &Signal) -> Option<Bytes> {
        match self {
            Format::Ws => Some(signal.ws_frame(topic)),
            Format::Sse | Format::SseChunked => Some(self.body(&signal.sse_event(topic))),
            Format::Ndjson => Some(signal.ndjson_line(topic)),
            Format::DsSse | Format::DsSseChunked => None,
        }
    }

    /// A `presence` envelope (see [`crate::message::presence`]) in this format: an SSE event
    /// named `presence` with no `id:` (it is not in the topic's history, so it leaves the
    /// client's cursor where it is), an NDJSON line, a WebSocket text frame. `None` for
    /// Durable Streams, whose protocol has no such event.
    pub(super) fn presence(self, envelope: &[u8]) -> Option<Bytes> {
        match self {
            Format::Ws => Some(wire::ws_frame(wire::opcode::TEXT, envelope)),
            Format::Sse | Format::SseChunked => {
                let mut event = Vec::with_capacity(envelope.len() + 24);
                event.extend_from_slice(b"event: presence\ndata: ");
                event.extend_from_slice(envelope);
                event.extend_from_slice(b"\n\n");
                Some(self.body(&event))
            }
            Format::Ndjson => {
                let mut line = Vec::with_capacity(envelope.len() + 1);
                line.extend_from_slice(envelope);
                line.push(b'\n');
                Some(Bytes::from(line))
            }
            Format::DsSse | Format::DsSseChunked => None,
        }
    }

    /// What a stream sends once it knows where it starts, before any message: on SSE an
    /// `id:` line alone, which sets the browser's `EventSource.lastEventId` to the cursor
    /// without dispatching an event, so that a browser whose first connection drops before
    /// any message reconnects with `Last-Event-ID` and misses nothing published meanwhile.
    pub(super) fn start(self, cursor: MessageId) -> Option<Bytes> {
        match self {
            Format::Sse | Format::SseChunked => {
                let mut line = b"id: ".to_vec();
                line.extend_from_slice(itoa::Buffer::new().format(cursor).as_bytes());
                line.extend_from_slice(b"\n\n");
                Some(self.body(&line))
            }
            Format::Ws | Format::Ndjson | Format::DsSse | Format::DsSseChunked => None,
        }
    }

    /// Frames body bytes of an SSE stream (a comment, the `retry:` hint): as they are, or as
    /// one chunk of a chunked body.
    pub fn body(self, bytes: &[u8]) -> Bytes {
        match self {
            Format::SseChunked | Format::DsSseChunked => wire::chunk(bytes),
            Format::Sse | Format::Ws | Format::Ndjson | Format::DsSse => {
                Bytes::copy_from_slice(bytes)
            }
        }
    }

    /// What keeps an idle connection alive, and proves the peer is there: a WebSocket ping,
    /// an SSE comment, or an NDJSON `keepalive` line. `None` for Durable Streams, whose
    /// keep-alive is a control event at the reader's offset, which its protocol sends.
    pub(super) fn heartbeat(self) -> Option<Bytes> {
        Some(match self {
            Format::Ws => Bytes::from_static(b"\x89\x00"),
            Format::Sse => Bytes::from_static(b": keep-alive\n\n"),
            Format::SseChunked => Bytes::from_static(b"e\r\n: keep-alive\n\n\r\n"),
            Format::Ndjson => Bytes::from_static(b"{\"type\":\"keepalive\"}\n"),
            Format::DsSse | Format::DsSseChunked => return None,
        })
    }
}

/// A format whose bytes every message carries, framed once at publish: what
/// [`super::Hub::outlet`] takes. A protocol's own format ([`Format::DsSse`]) has no such
/// bytes, so its outlet is made with its [`Framer`] ([`super::Hub::framed_outlet`]): an
/// outlet without a way to frame its messages cannot be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Native {
    /// [`Format::Ws`].
    Ws,
    /// [`Format::Sse`].
    Sse,
    /// [`Format::SseChunked`].
    SseChunked,
    /// [`Format::Ndjson`].
    Ndjson,
}

impl Native {
    /// The bytes that carry `message` in this format: shared, framed once at publish.
    pub fn message(self, message: &Message) -> &Bytes {
        match self {
            Native::Ws => message.ws_frame(),
            Native::Sse => message.sse_frame(),
            Native::SseChunked => message.sse_chunk(),
            Native::Ndjson => message.ndjson_line(),
        }
    }
}

impl From<Native> for Format {
    fn from(native: Native) -> Self {
        match native {
            Native::Ws => Format::Ws,
            Native::Sse => Format::Sse,
            Native::SseChunked => Format::SseChunked,
            Native::Ndjson => Format::Ndjson,
        }
    }
}

/// Where an outlet's message bytes come from.
#[derive(Clone)]
pub(super) enum Frames {
    /// Each message carries them.
    Native(Native),
    /// The protocol's framer writes them.
    Framer(Arc<dyn Framer>),
}

impl Frames {
    /// The bytes that carry `message`.
    pub(super) fn frame(&self, message: &Arc<Message>) -> Bytes {
        match self {
            Frames::Native(native) => native.message(message).clone(),
            Frames::Framer(framer) => framer.frame(message),
        }
    }
}
