//! One connection, several topics: how an outlet that follows a request's topic list names
//! each topic in its cursor ([`crate::message::cursor`]), and the cursor it writes.
//!
//! On SSE every event carries the whole cursor in its `id:` line, so that a reconnecting
//! `EventSource` resumes every topic from its `Last-Event-ID`. That line differs per
//! connection while the event itself does not: the outlet writes the message's shared
//! fields (framed once, at publish) and the connection's own `id:` line side by side, in one
//! `writev`. NDJSON and WebSocket frames stay shared with no per-connection field: their
//! clients build the cursor from each envelope's `topic` and `id`, starting from the
//! `{"type":"cursor"}` line the stream opens with ([`Book::opening`]).

use std::sync::Arc;

use bytes::Bytes;
use smallvec::SmallVec;

use super::{Signal, format::Format, patterns::Patterns};
use crate::message::{
    Message, MessageId, TopicName,
    cursor::{Cursor, topic_hash},
    wire,
};

/// How a followed topic is named in a cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// By its position in the request's list.
    Listed(u32),
    /// By the hash of its name: a topic a pattern picked up.
    Hashed(u64),
}

impl Key {
    /// The key of a topic a pattern picked up.
    pub fn hashed(topic: &TopicName) -> Self {
        Key::Hashed(topic_hash(topic.as_str()))
    }
}

/// The cursor names of an outlet's subs, and what its client's cursor held for topics it
/// does not follow now (a pattern's topic that is gone for the moment): those are written
/// back in every cursor, so that the topic resumes where it was if it comes back.
#[derive(Default)]
pub(super) struct Book {
    /// By sub index.
    keys: SmallVec<[Option<Key>; 4]>,
    carried: Vec<(u64, MessageId)>,
    scratch: Vec<u8>,
    /// The cursor being written, kept to reuse its room (one is written per SSE event).
    work: Cursor,
    /// The most topics the connection may follow.
    pub(super) limit: usize,
    /// Its entries in the hub's pattern registry (slot, prefix), removed when it ends.
    pub(super) watches: Vec<(usize, Box<str>)>,
    pub(super) patterns: Option<Arc<Patterns>>,
}

impl Book {
    /// A book for at most `limit` topics that carries `carried` until their topics are
    /// followed.
    pub(super) fn new(carried: Vec<(u64, MessageId)>, limit: usize) -> Self {
        Self {
            carried,
            limit,
            ..Self::default()
        }
    }

    /// Makes room for the keys of `subs` subs.
    pub(super) fn reserve(&mut self, subs: usize) {
        self.keys
            .reserve_exact(subs.saturating_sub(self.keys.len()));
    }

    /// Records an entry of the hub's pattern registry, to leave when the connection ends.
    pub(super) fn watch(&mut self, patterns: Arc<Patterns>, slot: usize, prefix: &str) {
        self.patterns = Some(patterns);
        self.watches.push((slot, Box::from(prefix)));
    }

    /// The id the client's cursor holds for the topic `key` names, if it carries one.
    pub(super) fn carried_of(&self, key: Key) -> Option<MessageId> {
        let Key::Hashed(hash) = key else { return None };
        self.carried
            .iter()
            .find(|&&(h, _)| h == hash)
            .map(|&(_, id)| id)
    }

    /// Whether the connection watches pattern `prefix*` already.
    pub(super) fn watching(&self, prefix: &str) -> bool {
        self.watches.iter().any(|(_, p)| &**p == prefix)
    }

    /// Leaves the pattern registry (the connection ended).
    pub(super) fn unwatch(&mut self) {
        if let Some(patterns) = &self.patterns {
            for (slot, _) in self.watches.drain(..) {
                patterns.remove(slot);
            }
        }
    }

    /// Names sub `index` by `key`; a carried entry for the same topic is now the sub's.
    pub(super) fn name(&mut self, index: usize, key: Key) {
        if self.keys.len() <= index {
            self.keys.resize(index + 1, None);
        }
        self.keys[index] = Some(key);
        if let Key::Hashed(hash) = key {
            self.carried.retain(|&(h, _)| h != hash);
        }
    }

    /// Leaves the registry for `prefix`; whether it was there.
    pub(super) fn unwatch_prefix(&mut self, prefix: &str) -> bool {
        let Some(patterns) = &self.patterns else {
            return false;
        };
        let before = self.watches.len();
        self.watches.retain(|(slot, watched)| {
            let keep = &**watched != prefix;
            if !keep {
                patterns.remove(*slot);
            }
            keep
        });
        self.watches.len() < before
    }

    /// Whether sub `index` was joined by a pattern that `prefix` is, and no pattern still
    /// watched selects `topic`.
    pub(super) fn only_by(&self, index: usize, topic: &str, prefix: &str) -> bool {
        matches!(self.keys.get(index), Some(Some(Key::Hashed(_))))
            && topic.starts_with(prefix)
            && !self.watches.iter().any(|(_, p)| topic.starts_with(&**p))
    }

    /// Forgets sub `index` (it was unsubscribed).
    pub(super) fn forget(&mut self, index: usize) {
        if let Some(key) = self.keys.get_mut(index) {
            *key = None;
        }
    }

    /// The cursor where every sub stands: `subs` gives, by sub index, the id each one
    /// stands at (`None`: no sub there).
    pub(super) fn cursor(&mut self, subs: impl Iterator<Item = Option<MessageId>>) -> &Cursor {
        let Cursor { listed, hashed } = &mut self.work;
        listed.clear();
        hashed.clear();
        // A topic at 0 is left out: a topic the cursor does not name is read from its start,
        // which is what 0 says (so idle topics cost a cursor nothing).
        hashed.extend(self.carried.iter().filter(|(_, id)| *id > 0));
        let carried = hashed.len();
        for (sent, key) in subs.zip(&self.keys) {
            match (sent, key) {
                (Some(sent), Some(Key::Listed(position))) if sent > 0 => {
                    listed.push((*position, sent))
                }
                (Some(sent), Some(Key::Hashed(hash))) if sent > 0 => hashed.push((*hash, sent)),
                _ => {}
            }
        }
        // A cursor naming more than the limit would be refused when it comes back: the
        // carried entries (topics gone since) give way first.
        let excess = (listed.len() + hashed.len()).saturating_sub(self.limit);
        hashed.drain(..excess.min(carried));
        &self.work
    }

    /// An SSE `id:` line (and the blank line that ends the event) with the cursor where
    /// every sub stands.
    pub(super) fn id_line(&mut self, subs: impl Iterator<Item = Option<MessageId>>) -> Bytes {
        self.cursor(subs);
        let (cursor, scratch) = (&self.work, &mut self.scratch);
        let mut line = Vec::with_capacity(8 + cursor.listed.len() * 6 + cursor.hashed.len() * 18);
        line.extend_from_slice(b"id: ");
        cursor.encode_into(scratch, &mut line);
        line.extend_from_slice(b"\n\n");
        Bytes::from(line)
    }

    /// What a stream in `format` sends once every listed topic is followed, before any
    /// message: on SSE an `id:` line alone (the browser's `lastEventId` is then the cursor,
    /// so a connection that drops before any message resumes from it); elsewhere a
    /// `{"type":"cursor","cursor":"..."}` line or frame to start the client's cursor from.
    pub(super) fn opening(
        &mut self,
        subs: impl Iterator<Item = Option<MessageId>>,
        format: Format,
    ) -> Option<Bytes> {
        match format {
            Format::Sse | Format::SseChunked => Some(format.body(&self.id_line(subs))),
            Format::Ndjson | Format::Ws => {
                let json = format!(
                    "{{\"type\":\"cursor\",\"cursor\":\"{}\"}}",
                    self.cursor(subs).encode()
                );
                Some(match format {
                    Format::Ws => wire::ws_frame(wire::opcode::TEXT, json.as_bytes()),
                    _ => Bytes::from(json + "\n"),
                })
            }
            Format::DsSse | Format::DsSseChunked => None,
        }
    }
}

/// Whether an outlet in `format` with a book writes a per-connection `id:` line per event.
pub(super) fn writes_ids(format: Format) -> bool {
    matches!(format, Format::Sse | Format::SseChunked)
}

/// A message's SSE event without its `id:` line and closing blank line: `event:` and `data:`,
/// a slice of the frame encoded at publish (no copy).
pub(super) fn sse_fields(message: &Message) -> Bytes {
    let frame = message.sse_frame();
    let start = frame
        .iter()
        .position(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    frame.slice(start..frame.len() - 1)
}

/// A signal's SSE event without an `id:` line and closing blank line.
pub(super) fn signal_fields(signal: &Signal, topic: &TopicName) -> Bytes {
    let mut fields = b"event: ".to_vec();
    fields.extend_from_slice(signal.event_name().as_bytes());
    fields.extend_from_slice(b"\ndata: ");
    fields.extend_from_slice(signal.to_json(topic).as_bytes());
    fields.push(b'\n');
    Bytes::from(fields)
}

/// Frames `pieces` (events written as fields and id lines) as one HTTP/1.1 chunk when the
/// body is chunked: a header for all of them and the chunk's end, nothing copied.
pub(super) fn chunk_pieces(format: Format, pieces: &mut Vec<Bytes>, from: usize) {
    if !format.chunked() || pieces.len() == from {
        return;
    }
    let len: usize = pieces[from..].iter().map(Bytes::len).sum();
    let mut header = Vec::with_capacity(12);
    wire::push_chunk_start(&mut header, len);
    pieces.insert(from, Bytes::from(header));
    pieces.push(Bytes::from_static(b"\r\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carried_entries_give_way_at_the_limit() {
        // 100 topics a pattern picked up once and that are gone, carried from the client's
        // cursor, and 3 followed now: a cursor over 100 entries would be refused back.
        let carried: Vec<(u64, MessageId)> = (1..=100).map(|h| (h, 7)).collect();
        let mut book = Book::new(carried, 100);
        for (index, hash) in [1000u64, 1001, 1002].into_iter().enumerate() {
            book.name(index, Key::Hashed(hash));
        }
        let cursor = book.cursor([Some(9), Some(9), Some(9)].into_iter());
        assert_eq!(cursor.listed.len() + cursor.hashed.len(), 100);
        for hash in [1000, 1001, 1002] {
            assert!(cursor.hashed.contains(&(hash, 9)), "followed topics stay");
        }
    }
}
