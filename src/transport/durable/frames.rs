//! A stream's SSE events as its live readers on this node get them: each append's `data`
//! event and the `control` event after it, encoded once for every reader of the current
//! cursor interval and kept for the fan-out's walks.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use axum::body::Bytes;

use super::{
    content::Mode,
    meta::Meta,
    offset::Offset,
    read::{self, Piece},
    sse::{self, Control},
};
use crate::message::{Message, MessageId, wire};

/// Messages whose events are kept per stream: the fan-out asks for the newest few, in
/// order, one walk after another.
const KEPT: usize = 8;

/// The SSE events of a stream's messages, encoded once for all of its readers on this node
/// (those whose cursor is the current interval's: every reader that came without one, or
/// with one from an earlier interval).
#[derive(Debug)]
pub struct Frames {
    /// The stream's topic id its own offsets start after (see [`Meta::base`]).
    base: MessageId,
    /// Its first own offset (see [`Meta::start`]).
    start: u64,
    mode: Mode,
    recent: Mutex<VecDeque<Encoded>>,
}

#[derive(Debug)]
struct Encoded {
    id: MessageId,
    interval: u64,
    /// The events as one HTTP/1.1 chunk.
    chunk: Bytes,
    /// The events alone (a slice of `chunk`).
    events: Bytes,
}

impl Frames {
    /// The frames for a stream described by `meta`.
    pub fn new(meta: &Meta) -> Self {
        Self {
            base: meta.base,
            start: meta.start,
            mode: meta.content().mode(),
            recent: Mutex::new(VecDeque::with_capacity(KEPT)),
        }
    }

    /// Whether these frames are the ones of the stream `meta` describes (a stream deleted and
    /// created again at the same path starts after another id).
    pub fn fits(&self, meta: &Meta) -> bool {
        self.base == meta.base && self.start == meta.start && self.mode == meta.content().mode()
    }

    /// The offset after message `id`, as [`Meta::offset_after`].
    fn offset_after(&self, id: MessageId) -> Offset {
        Offset(self.start + id.saturating_sub(self.base))
    }

    /// `message`'s `data` event and the `control` event after it (up to date, with the
    /// `Stream-Cursor` `cursor`), as one chunk and as the events alone.
    pub(super) fn encode(&self, message: &Arc<Message>, cursor: &str) -> (Bytes, Bytes) {
        let end = self.offset_after(message.id);
        let piece = Piece {
            end,
            message: message.clone(),
        };
        let mut events = Vec::new();
        read::data_event(&mut events, self.mode, std::slice::from_ref(&piece));
        sse::control_event(
            &mut events,
            &Control::Open {
                next: end,
                cursor,
                up_to_date: true,
            },
        );
        let chunk = wire::chunk(&events);
        let start = chunk.len() - 2 - events.len();
        let events = chunk.slice(start..chunk.len() - 2);
        (chunk, events)
    }

    /// `message`'s events for the readers of interval `interval`, encoded by the first to
    /// ask; `true` when this call encoded them.
    pub(super) fn shared(
        &self,
        message: &Arc<Message>,
        interval: u64,
        chunked: bool,
    ) -> (Bytes, bool) {
        let pick = |e: &Encoded| if chunked { &e.chunk } else { &e.events }.clone();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = recent
            .iter()
            .find(|e| e.id == message.id && e.interval == interval)
        {
            return (pick(found), false);
        }
        let (chunk, events) = self.encode(message, itoa::Buffer::new().format(interval));
        let encoded = Encoded {
            id: message.id,
            interval,
            chunk,
            events,
        };
        let bytes = pick(&encoded);
        if recent.len() == KEPT {
            recent.pop_front();
        }
        recent.push_back(encoded);
        (bytes, true)
    }
}
