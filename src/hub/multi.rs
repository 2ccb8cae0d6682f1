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

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

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

/// How [`Book::names`] names a sub the cursor does not name.
const UNNAMED: u32 = u32::MAX;
/// How [`Book::names`] names a sub named by its topic's hash.
const HASHED: u32 = u32::MAX - 1;
/// In [`Line::at`]: a sub the cursor leaves out (at id 0, or unnamed).
const ABSENT: u32 = u32::MAX;

/// The cursor names of an outlet's subs, and what its client's cursor held for topics it
/// does not follow now (a pattern's topic that is gone for the moment): those are written
/// back in every cursor, so that the topic resumes where it was if it comes back.
#[derive(Default)]
pub(super) struct Book {
    /// By sub index: its position in the request's list, [`HASHED`] (a topic a pattern
    /// picked up, named by its topic's hash) or [`UNNAMED`]. Four bytes, not a [`Key`]'s
    /// sixteen: a connection holds one per topic it follows.
    names: Vec<u32>,
    carried: Vec<(u64, MessageId)>,
    /// The SSE `id:` line, kept from event to event (SSE connections only).
    line: Option<Box<Line>>,
    /// The most topics the connection may follow.
    pub(super) limit: usize,
    /// Its entries in the hub's pattern registry (slot, prefix), removed when it ends.
    pub(super) watches: Vec<(usize, Box<str>)>,
    pub(super) patterns: Option<Arc<Patterns>>,
}

/// An SSE connection's current `id:` line and the cursor bytes under it.
///
/// Every event carries the cursor over all the connection's topics, and between two events
/// one topic moves by one id: its id's varint is rewritten in place and the four-character
/// base64 groups over it encoded again, instead of walking every sub and encoding the whole
/// cursor per event. The line is built whole again when its shape changes: a topic joins or
/// leaves the cursor (a first message), an id's varint grows a byte, a sub is added or
/// removed, or a cursor is set back ([`Book::stale`]).
#[derive(Default)]
struct Line {
    /// The cursor's bytes ([`crate::message::cursor`]'s format).
    bin: Vec<u8>,
    /// `id: `, base64url of `bin`, and the blank line that ends the event.
    text: Vec<u8>,
    /// By sub index: where its id's varint starts in `bin`, or [`ABSENT`].
    at: Vec<u32>,
    /// `bin`, `text` and `at` are those of the subs as they stand (but for the one a
    /// [`Book::id_line`] call names, which it patches).
    fresh: bool,
    /// How many times it was built whole.
    #[cfg(test)]
    builds: usize,
}

const ID_PREFIX: &[u8] = b"id: ";

/// What a book reads of a sub (by index, `None` where there is none): the hash of its
/// topic's name and the id it stands at.
pub(super) trait Standing {
    fn standing(&self) -> Option<(u64, MessageId)>;
}

impl Line {
    /// Rewrites sub `moved`'s id in place; `false` when the line must be built again.
    fn patch(&mut self, moved: usize, sent: MessageId) -> bool {
        let Some(&at) = self.at.get(moved) else {
            return false;
        };
        if at == ABSENT {
            // Left out: unchanged while still at 0.
            return sent == 0;
        }
        let at = at as usize;
        let (old, len) = read_varint(&self.bin[at..]);
        if old == sent {
            return true;
        }
        if sent == 0 || varint_len(sent) != len {
            return false;
        }
        let mut value = sent;
        for byte in &mut self.bin[at..at + len] {
            *byte = (value as u8 & 0x7f) | if value >= 0x80 { 0x80 } else { 0 };
            value >>= 7;
        }
        // The base64 groups (3 bytes, 4 characters) over the bytes that changed.
        let first = at / 3 * 3;
        let end = ((at + len).div_ceil(3) * 3).min(self.bin.len());
        let from = ID_PREFIX.len() + first / 3 * 4;
        let chars = base64::encoded_len(end - first, false).unwrap_or(0);
        URL_SAFE_NO_PAD
            .encode_slice(&self.bin[first..end], &mut self.text[from..from + chars])
            .expect("the groups keep their length");
        true
    }
}

/// A LEB128 varint at the start of `bytes`, and its length (the line wrote it).
fn read_varint(bytes: &[u8]) -> (u64, usize) {
    let mut value = 0u64;
    for (index, &byte) in bytes.iter().enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return (value, index + 1);
        }
    }
    (value, bytes.len())
}

fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
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

    /// Makes room for the names of `subs` subs.
    pub(super) fn reserve(&mut self, subs: usize) {
        self.names
            .reserve_exact(subs.saturating_sub(self.names.len()));
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
        if self.names.len() <= index {
            self.names.resize(index + 1, UNNAMED);
        }
        self.names[index] = match key {
            // A list is at most the connection's limit long, far below the markers.
            Key::Listed(position) => position.min(HASHED - 1),
            Key::Hashed(hash) => {
                self.carried.retain(|&(h, _)| h != hash);
                HASHED
            }
        };
        self.stale();
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
        self.names.get(index) == Some(&HASHED)
            && topic.starts_with(prefix)
            && !self.watches.iter().any(|(_, p)| topic.starts_with(&**p))
    }

    /// Whether the cursor names sub `index`.
    pub(super) fn names(&self, index: usize) -> bool {
        self.names.get(index).is_some_and(|&name| name != UNNAMED)
    }

    /// Forgets sub `index` (it was unsubscribed).
    pub(super) fn forget(&mut self, index: usize) {
        if let Some(name) = self.names.get_mut(index) {
            *name = UNNAMED;
        }
        self.stale();
    }

    /// A sub's cursor moved other than by the event being written (set, set back, caught
    /// up in bulk): the next `id:` line is built whole.
    pub(super) fn stale(&mut self) {
        if let Some(line) = &mut self.line {
            line.fresh = false;
        }
    }

    /// The cursor where every sub stands, and by entry (listed, then hashed) the index of
    /// the sub it is (`None`: a carried entry).
    fn entries(&self, subs: &[impl Standing]) -> (Cursor, Vec<Option<usize>>) {
        let mut cursor = Cursor::default();
        // A topic at 0 is left out: a topic the cursor does not name is read from its start,
        // which is what 0 says (so idle topics cost a cursor nothing).
        cursor
            .hashed
            .extend(self.carried.iter().filter(|(_, id)| *id > 0));
        let carried = cursor.hashed.len();
        let (mut listed, mut hashed) = (Vec::new(), vec![None; carried]);
        for (index, (sub, &name)) in subs.iter().zip(&self.names).enumerate() {
            let Some((hash, sent)) = sub.standing().filter(|&(_, sent)| sent > 0) else {
                continue;
            };
            match name {
                UNNAMED => {}
                HASHED => {
                    cursor.hashed.push((hash, sent));
                    hashed.push(Some(index));
                }
                position => {
                    cursor.listed.push((position, sent));
                    listed.push(Some(index));
                }
            }
        }
        // A cursor naming more than the limit would be refused when it comes back: the
        // carried entries (topics gone since) give way first.
        let excess = (cursor.listed.len() + cursor.hashed.len()).saturating_sub(self.limit);
        let drop = excess.min(carried);
        cursor.hashed.drain(..drop);
        hashed.drain(..drop);
        listed.extend(hashed);
        (cursor, listed)
    }

    /// The cursor where every sub stands.
    pub(super) fn cursor(&self, subs: &[impl Standing]) -> Cursor {
        self.entries(subs).0
    }

    /// An SSE `id:` line (and the blank line that ends the event) with the cursor where
    /// every sub stands, sub `moved` (if any) having just moved: patched in place when only
    /// its id's digits changed ([`Line`]).
    pub(super) fn id_line(&mut self, subs: &[impl Standing], moved: Option<usize>) -> Bytes {
        let patched = match (&mut self.line, moved) {
            (Some(line), Some(moved)) if line.fresh => {
                let sent = subs
                    .get(moved)
                    .and_then(Standing::standing)
                    .map(|(_, sent)| sent);
                match sent {
                    Some(sent) if self.names.get(moved).is_some_and(|&n| n != UNNAMED) => {
                        line.patch(moved, sent)
                    }
                    // Not in the cursor: nothing to change.
                    _ => true,
                }
            }
            (Some(line), None) => line.fresh,
            _ => false,
        };
        if !patched {
            self.rebuild(subs);
        }
        let line = self.line.as_ref().expect("built above");
        debug_assert_eq!(
            std::str::from_utf8(&line.text[ID_PREFIX.len()..line.text.len() - 2]),
            Ok(self.cursor(subs).encode().as_str()),
            "a patched id line says what a new one would"
        );
        Bytes::copy_from_slice(&line.text)
    }

    /// Builds the `id:` line whole, recording where each sub's id is.
    fn rebuild(&mut self, subs: &[impl Standing]) {
        let (cursor, owners) = self.entries(subs);
        let line = self.line.get_or_insert_with(Box::default);
        line.at.clear();
        line.at.resize(subs.len(), ABSENT);
        line.bin.clear();
        let mut entry = 0;
        cursor.encode_bytes(&mut line.bin, |offset| {
            if let Some(Some(index)) = owners.get(entry) {
                line.at[*index] = offset as u32;
            }
            entry += 1;
        });
        line.text.clear();
        line.text.extend_from_slice(ID_PREFIX);
        let start = line.text.len();
        line.text.resize(
            start + base64::encoded_len(line.bin.len(), false).unwrap_or(0),
            0,
        );
        URL_SAFE_NO_PAD
            .encode_slice(&line.bin, &mut line.text[start..])
            .expect("sized above");
        line.text.extend_from_slice(b"\n\n");
        // Kept for the connection's life: no slack beyond what the next patch needs.
        line.bin.shrink_to_fit();
        line.text.shrink_to_fit();
        line.fresh = true;
        #[cfg(test)]
        {
            line.builds += 1;
        }
    }

    /// What a stream in `format` sends once every listed topic is followed, before any
    /// message: on SSE an `id:` line alone (the browser's `lastEventId` is then the cursor,
    /// so a connection that drops before any message resumes from it); elsewhere a
    /// `{"type":"cursor","cursor":"..."}` line or frame to start the client's cursor from.
    pub(super) fn opening(&mut self, subs: &[impl Standing], format: Format) -> Option<Bytes> {
        match format {
            Format::Sse | Format::SseChunked => Some(format.body(&self.id_line(subs, None))),
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

    impl Standing for Option<(u64, MessageId)> {
        fn standing(&self) -> Option<(u64, MessageId)> {
            *self
        }
    }

    #[test]
    fn carried_entries_give_way_at_the_limit() {
        // 100 topics a pattern picked up once and that are gone, carried from the client's
        // cursor, and 3 followed now: a cursor over 100 entries would be refused back.
        let carried: Vec<(u64, MessageId)> = (1..=100).map(|h| (h, 7)).collect();
        let mut book = Book::new(carried, 100);
        for (index, hash) in [1000u64, 1001, 1002].into_iter().enumerate() {
            book.name(index, Key::Hashed(hash));
        }
        let cursor = book.cursor(&[Some((1000, 9)), Some((1001, 9)), Some((1002, 9))]);
        assert_eq!(cursor.listed.len() + cursor.hashed.len(), 100);
        for hash in [1000, 1001, 1002] {
            assert!(cursor.hashed.contains(&(hash, 9)), "followed topics stay");
        }
    }

    /// The line `book` would write for `subs`, built whole.
    fn whole(book: &Book, subs: &[Option<(u64, MessageId)>]) -> String {
        format!("id: {}\n\n", book.cursor(subs).encode())
    }

    #[test]
    fn a_patched_id_line_says_what_a_whole_one_would() {
        // 40 listed topics and 40 a pattern picked up, moved one id at a time in a
        // scattered order, across the varints' one- and two-byte lengths, from 0 (left
        // out) and with a sub removed and one set back: each line, patched or rebuilt,
        // equals the whole encoding of the cursor as it stands.
        let mut book = Book::new(vec![(7, 3)], 100);
        let mut subs: Vec<Option<(u64, MessageId)>> = Vec::new();
        for index in 0..80 {
            let key = if index < 40 {
                Key::Listed(index as u32)
            } else {
                Key::Hashed(0x9e37_79b9_7f4a_7c15 ^ index as u64)
            };
            book.name(index, key);
            let hash = match key {
                Key::Hashed(hash) => hash,
                Key::Listed(_) => 0,
            };
            subs.push(Some((hash, if index % 3 == 0 { 0 } else { 120 })));
        }
        let first = book.id_line(&subs, None);
        assert_eq!(first, whole(&book, &subs).as_bytes());
        for step in 0..2_000usize {
            let moved = (step * 37) % subs.len();
            if step == 700 {
                subs[5] = None;
                book.forget(5);
            }
            if step == 1_300 {
                if let Some((_, sent)) = &mut subs[11] {
                    *sent = 2;
                }
                book.stale();
            }
            let Some((_, sent)) = &mut subs[moved] else {
                continue;
            };
            *sent += 1;
            let line = book.id_line(&subs, Some(moved));
            assert_eq!(line, whole(&book, &subs).as_bytes(), "step {step}");
        }
        // Most lines are patches: rebuilds come from the shape changes alone (27 topics
        // leaving 0, 53 varints growing past 127, a removal and a set-back).
        let rebuilt = book.line.as_ref().map_or(0, |line| line.builds);
        assert!(rebuilt < 100, "{rebuilt} of 2,000 lines were rebuilt");
    }
}
