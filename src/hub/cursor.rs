//! Cursor resolution: what a reader that resumes `after` an id gets, and the two signals
//! (`truncated`, `reset`) that tell it when the log cannot continue exactly where it left off.
//! Every transport reads through here, so they all answer the same cursor the same way.

use std::sync::Arc;

use serde::Serialize;

use bytes::Bytes;

use crate::{
    message::{Message, MessageId, TopicName, wire},
    store::{LogHead, LogRead},
};

/// Tells a reader its cursor could not be honoured exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Signal {
    /// Messages after the cursor are no longer retained; delivery goes on from `oldest_id`.
    Truncated {
        /// The first id that will be delivered.
        oldest_id: MessageId,
    },
    /// The cursor is ahead of the topic's last id: the topic was dropped or the server
    /// restarted, and ids started again at 1. Delivery goes on from the oldest retained message.
    Reset {
        /// The topic's newest id now.
        last_id: MessageId,
    },
}

impl Signal {
    /// The event name on the SSE stream.
    pub fn event_name(&self) -> &'static str {
        match self {
            Signal::Truncated { .. } => "truncated",
            Signal::Reset { .. } => "reset",
        }
    }

    /// The cursor a reader holds right after this signal, before the messages that follow
    /// it: resuming from here neither skips them nor repeats the signal.
    pub fn resume_after(&self) -> MessageId {
        match self {
            Signal::Truncated { oldest_id } => oldest_id.saturating_sub(1),
            Signal::Reset { .. } => 0,
        }
    }

    // Every wire form of a signal is rendered below, and only here.

    /// On a WebSocket: a text frame of [`Signal::to_json`].
    pub fn ws_frame(&self, topic: &TopicName) -> Bytes {
        wire::ws_frame(wire::opcode::TEXT, self.to_json(topic).as_bytes())
    }

    /// On an SSE stream: an event named after the signal, carrying [`Signal::to_json`], whose
    /// `id:` is the cursor right after it, so that a reconnecting `EventSource` resumes where
    /// the signal leaves it.
    pub fn sse_event(&self, topic: &TopicName) -> Bytes {
        wire::sse_frame(
            self.resume_after(),
            self.event_name(),
            self.to_json(topic).as_bytes(),
        )
    }

    /// On an NDJSON stream: [`Signal::to_json`] as one line.
    pub fn ndjson_line(&self, topic: &TopicName) -> Bytes {
        let mut line = self.to_json(topic).into_bytes();
        line.push(b'\n');
        Bytes::from(line)
    }

    /// In a poll answer: fields of its JSON object, `,"truncated":true,"oldest_id":N` or
    /// `,"reset":true`, appended to `body`.
    pub fn poll_fields(&self, body: &mut Vec<u8>) {
        match *self {
            Signal::Truncated { oldest_id } => {
                body.extend_from_slice(b",\"truncated\":true,\"oldest_id\":");
                body.extend_from_slice(itoa::Buffer::new().format(oldest_id).as_bytes());
            }
            Signal::Reset { .. } => body.extend_from_slice(b",\"reset\":true"),
        }
    }

    /// The JSON object sent on SSE and WebSocket: `{"type":..,"topic":..,...}`.
    pub fn to_json(&self, topic: &TopicName) -> String {
        #[derive(Serialize)]
        struct Tagged<'a> {
            #[serde(flatten)]
            signal: &'a Signal,
            topic: &'a TopicName,
        }
        serde_json::to_string(&Tagged {
            signal: self,
            topic,
        })
        .expect("signal always serializes")
    }
}

/// A page of messages for a reader at a cursor.
#[derive(Debug, Default)]
pub struct Batch {
    /// Messages after the cursor, oldest first.
    pub messages: Vec<Arc<Message>>,
    /// The topic's newest id when read.
    pub last_id: MessageId,
    /// Set when the cursor could not be honoured exactly; it applies before `messages`.
    pub signal: Option<Signal>,
    /// More messages are retained after the last one returned (the page was full).
    pub more: bool,
}

impl Batch {
    /// The cursor to resume from after this batch: the last message returned, or the
    /// topic's newest id when nothing was returned.
    pub fn next_after(&self) -> MessageId {
        self.messages.last().map_or(self.last_id, |m| m.id)
    }

    /// Whether a reader learns anything from this batch.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.signal.is_none()
    }
}

/// What to do with a first read at `after`.
pub(crate) enum Resolution {
    /// The read stands as it is, with this signal if any.
    Keep(Option<Signal>),
    /// The cursor is ahead of the log: read again from the start and signal a reset.
    ReadFromStart(Signal),
}

/// Decides how a read at `after` relates to the log's `head`.
///
/// A client's own `after=0` means "from the oldest retained message" and is never truncated
/// (`zero_means_oldest`). A cursor the server holds for a subscriber that has seen nothing
/// yet is also 0, but there it means "everything from id 1", so losing any of it is
/// signalled.
pub(crate) fn resolve(after: MessageId, head: LogHead, zero_means_oldest: bool) -> Resolution {
    if after > head.last_id {
        Resolution::ReadFromStart(Signal::Reset {
            last_id: head.last_id,
        })
    } else if (after > 0 || !zero_means_oldest) && after.saturating_add(1) < head.first_retained {
        Resolution::Keep(Some(Signal::Truncated {
            oldest_id: head.first_retained,
        }))
    } else {
        Resolution::Keep(None)
    }
}

/// Builds a batch from a log read.
pub(crate) fn batch(read: LogRead, signal: Option<Signal>) -> Batch {
    let more = read
        .messages
        .last()
        .is_some_and(|last| last.id < read.head.last_id);
    Batch {
        messages: read.messages,
        last_id: read.head.last_id,
        signal,
        more,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(last_id: MessageId, first_retained: MessageId) -> LogHead {
        LogHead {
            last_id,
            first_retained,
        }
    }

    fn signal(after: MessageId, h: LogHead) -> Option<Signal> {
        match resolve(after, h, true) {
            Resolution::Keep(s) => s,
            Resolution::ReadFromStart(s) => Some(s),
        }
    }

    #[test]
    fn cursor_inside_history_is_exact() {
        assert_eq!(signal(0, head(10, 1)), None);
        assert_eq!(signal(4, head(10, 5)), None);
        assert_eq!(signal(10, head(10, 5)), None);
        assert_eq!(signal(0, head(0, 1)), None);
    }

    #[test]
    fn cursor_before_history_is_truncated() {
        assert_eq!(
            signal(3, head(10, 5)),
            Some(Signal::Truncated { oldest_id: 5 })
        );
        // Everything expired: the reader missed 4..=10 and is told delivery resumes at 11.
        assert_eq!(
            signal(3, head(10, 11)),
            Some(Signal::Truncated { oldest_id: 11 })
        );
        assert_eq!(
            signal(0, head(10, 5)),
            None,
            "after=0 asks for the oldest retained"
        );
        assert!(
            matches!(
                resolve(0, head(10, 5), false),
                Resolution::Keep(Some(Signal::Truncated { oldest_id: 5 }))
            ),
            "a server-held cursor at 0 has missed 1..=4"
        );
    }

    #[test]
    fn cursor_ahead_of_log_is_reset() {
        assert_eq!(signal(11, head(10, 1)), Some(Signal::Reset { last_id: 10 }));
        assert_eq!(signal(5, head(0, 1)), Some(Signal::Reset { last_id: 0 }));
        assert_eq!(
            signal(u64::MAX, head(0, 1)),
            Some(Signal::Reset { last_id: 0 })
        );
    }

    #[test]
    fn signals_serialize_with_their_topic() {
        let topic = TopicName::parse("t").unwrap();
        assert_eq!(
            Signal::Truncated { oldest_id: 5 }.to_json(&topic),
            r#"{"type":"truncated","oldest_id":5,"topic":"t"}"#
        );
        assert_eq!(
            Signal::Reset { last_id: 0 }.to_json(&topic),
            r#"{"type":"reset","last_id":0,"topic":"t"}"#
        );
    }
}
