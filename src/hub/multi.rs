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
    cursor::{Cursor, Encoder, topic_hash, varint_len},
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
/// In [`Line::at`]: a sub the cursor leaves out (at id 0, or unnamed), or whose id is too
/// far into the cursor's bytes for a `u16` (past 65,534: over 3,400 topics), and so is
/// built whole each time it moves.
const ABSENT: u16 = u16::MAX;

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
    /// The SSE `id:` line, kept from event to event (SSE connections only), and shared with
    /// every other connection whose cursor is the same ([`SharedLines`]): copied before it is
    /// changed, when shared.
    line: Option<Arc<Line>>,
    /// The most topics the connection may follow (a `u32`, so that with `fresh` the book
    /// stays in its allocator size class).
    limit: u32,
    /// `line` says where every sub stands (but for the one an [`Book::id_line`] call names,
    /// which it patches).
    fresh: bool,
    /// `names` are `0, 1, 2, ...`: each sub is named by its own index ([`Book::name_of`]).
    in_order: bool,
    /// How many times the line was built whole, and taken from another connection.
    #[cfg(test)]
    builds: usize,
    #[cfg(test)]
    taken: usize,
    /// Its entries in the hub's pattern registry (slot, prefix), removed when it ends.
    pub(super) watches: Vec<(usize, Box<str>)>,
    pub(super) patterns: Option<Arc<Patterns>>,
}

/// An SSE connection's current `id:` line.
///
/// Every event carries the cursor over all the connection's topics, and between two events
/// one topic moves by one id: the base64 groups over its id's varint are decoded, the
/// varint rewritten and the groups encoded again in place, instead of walking every sub and
/// encoding the whole cursor per event. The line is built whole again when its shape
/// changes: a topic joins or leaves the cursor (a first message), an id's varint grows a
/// byte, a sub is added or removed, or a cursor is set back ([`Book::stale`]). It holds the
/// text alone (and 2 bytes a topic), as an idle connection keeps it: boxed slices, not
/// `Vec`s, so that behind an `Arc` it takes the 64-byte size class a boxed `Line` of `Vec`s
/// took.
#[derive(Clone, Default, PartialEq, Eq)]
struct Line {
    /// `id: `, the cursor's bytes in base64url, and the blank line that ends the event.
    text: Box<[u8]>,
    /// By sub index: where its id's varint starts in the cursor's bytes, or [`ABSENT`].
    at: Box<[u16]>,
    /// The length of the cursor's bytes.
    bytes: u32,
}

/// What [`Line::patch`] does to a line.
enum Patch {
    /// Nothing: the id is already there, or the sub is left out and stays so.
    Same,
    /// The line's shape changes: build it whole.
    Rebuild,
    /// Write `chars` over the text from `from`.
    Write {
        from: usize,
        chars: [u8; 16],
        len: usize,
    },
}

const ID_PREFIX: &[u8] = b"id: ";

/// What a book reads of a sub (by index, `None` where there is none): the hash of its
/// topic's name and the id it stands at.
pub(super) trait Standing {
    fn standing(&self) -> Option<(u64, MessageId)>;
}

impl Line {
    /// What rewriting sub `moved`'s id as `sent` takes: read only, so that a shared line
    /// is copied only when its text does change.
    fn patch(&self, moved: usize, sent: MessageId) -> Patch {
        let Some(&at) = self.at.get(moved) else {
            return Patch::Rebuild;
        };
        if at == ABSENT {
            // Left out: unchanged while still at 0.
            return if sent == 0 {
                Patch::Same
            } else {
                Patch::Rebuild
            };
        }
        let at = usize::from(at);
        // The base64 groups (3 bytes, 4 characters) over the varint: it is at most 10
        // bytes, so 4 groups from the one it starts in.
        let first = at / 3 * 3;
        let end = (first + 12).min(self.bytes as usize);
        let from = ID_PREFIX.len() + first / 3 * 4;
        let len = base64::encoded_len(end - first, false).unwrap_or(0);
        let mut groups = [0u8; 12];
        let groups = &mut groups[..end - first];
        decode_groups(&self.text[from..from + len], groups);
        let (old, varint) = read_varint(&groups[at - first..]);
        if old == sent {
            return Patch::Same;
        }
        if sent == 0 || varint_len(sent) != varint {
            return Patch::Rebuild;
        }
        let mut value = sent;
        for byte in &mut groups[at - first..at - first + varint] {
            *byte = (value as u8 & 0x7f) | if value >= 0x80 { 0x80 } else { 0 };
            value >>= 7;
        }
        let mut chars = [0u8; 16];
        encode_groups(groups, &mut chars[..len]);
        Patch::Write { from, chars, len }
    }
}

/// The base64url alphabet.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Each base64url character's six bits, by byte.
const SEXTETS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut index = 0;
    while index < 64 {
        table[ALPHABET[index] as usize] = index as u8;
        index += 1;
    }
    table
};

/// Decodes a few base64url groups the line wrote (so valid: no checks) into `bytes`, whose
/// length says how many bytes they hold (the last group may be partial, unpadded). By hand:
/// the base64 crate's general engine costs several hundred instructions for four groups,
/// and this runs once per SSE event.
fn decode_groups(text: &[u8], bytes: &mut [u8]) {
    let sextet = |at: usize| u32::from(text.get(at).map_or(0, |&c| SEXTETS[c as usize]));
    for (group, out) in bytes.chunks_mut(3).enumerate() {
        let at = group * 4;
        let value = sextet(at) << 18 | sextet(at + 1) << 12 | sextet(at + 2) << 6 | sextet(at + 3);
        let [_, b0, b1, b2] = value.to_be_bytes();
        match out {
            [x, y, z] => (*x, *y, *z) = (b0, b1, b2),
            [x, y] => (*x, *y) = (b0, b1),
            [x] => *x = b0,
            _ => {}
        }
    }
}

/// Encodes `bytes` as base64url into `text` (sized for them, unpadded): [`decode_groups`]'s
/// inverse.
fn encode_groups(bytes: &[u8], text: &mut [u8]) {
    let char_of = |value: u32, shift: u32| ALPHABET[(value >> shift) as usize & 63];
    for (group, chars) in bytes.chunks(3).zip(text.chunks_mut(4)) {
        let value = match *group {
            [x, y, z] => u32::from_be_bytes([0, x, y, z]),
            [x, y] => u32::from_be_bytes([0, x, y, 0]),
            [x] => u32::from_be_bytes([0, x, 0, 0]),
            _ => 0,
        };
        for (index, c) in chars.iter_mut().enumerate() {
            *c = char_of(value, 18 - 6 * index as u32);
        }
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

impl Book {
    /// A book for at most `limit` topics that carries `carried` until their topics are
    /// followed.
    pub(super) fn new(carried: Vec<(u64, MessageId)>, limit: usize) -> Self {
        Self {
            carried,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            ..Self::default()
        }
    }

    /// The most topics the connection may follow.
    pub(super) fn limit(&self) -> usize {
        self.limit as usize
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
        // Appending to names in order keeps them so (checked in one step, as a list's
        // subs are named one after another); anything else checks them all.
        let appended = self.names.len() == index && (index == 0 || self.in_order);
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
        self.in_order = if appended {
            self.names[index] as usize == index
        } else {
            self.names.iter().enumerate().all(|(i, &n)| n as usize == i)
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
        self.name_of(index) != UNNAMED
    }

    /// How the cursor names sub `index` ([`UNNAMED`] past the names). Where the names are
    /// the list's positions in order (a list, as most are), the names are not read: a
    /// delivery would pay a cache line of each connection's for them.
    #[inline]
    fn name_of(&self, index: usize) -> u32 {
        match self.names.len() {
            len if index >= len => UNNAMED,
            _ if self.in_order => index as u32,
            _ => self.names[index],
        }
    }

    /// Forgets sub `index` (it was unsubscribed).
    pub(super) fn forget(&mut self, index: usize) {
        if let Some(name) = self.names.get_mut(index) {
            *name = UNNAMED;
            self.in_order = false;
        }
        self.stale();
    }

    /// A sub's cursor moved other than by the event being written (set, set back, caught
    /// up in bulk): the next `id:` line is built whole.
    pub(super) fn stale(&mut self) {
        self.fresh = false;
    }

    /// What the cursor names, by sub: its list position, or [`HASHED`] with its topic's
    /// hash, and the id it stands at. A topic at 0 is left out: a topic the cursor does not
    /// name is read from its start, which is what 0 says (so idle topics cost a cursor
    /// nothing).
    fn named<'s, S: Standing>(
        &'s self,
        subs: &'s [S],
    ) -> impl Iterator<Item = (usize, u32, u64, MessageId)> + Clone + 's {
        subs.iter()
            .zip(&self.names)
            .enumerate()
            .filter(|(_, (_, name))| **name != UNNAMED)
            .filter_map(|(index, (sub, &name))| {
                let (hash, sent) = sub.standing().filter(|&(_, sent)| sent > 0)?;
                Some((index, name, hash, sent))
            })
    }

    /// The carried entries the cursor names: a cursor naming more than the limit would be
    /// refused when it comes back, so they give way first.
    fn carried_named(&self, named: usize) -> impl Iterator<Item = &(u64, MessageId)> {
        let carried = self.carried.iter().filter(|(_, id)| *id > 0);
        let excess = (carried.clone().count() + named).saturating_sub(self.limit());
        carried.skip(excess)
    }

    /// The cursor where every sub stands.
    pub(super) fn cursor(&self, subs: &[impl Standing]) -> Cursor {
        let mut cursor = Cursor::default();
        let mut hashed = Vec::new();
        for (_, name, hash, sent) in self.named(subs) {
            match name {
                HASHED => hashed.push((hash, sent)),
                position => cursor.listed.push((position, sent)),
            }
        }
        let named = cursor.listed.len() + hashed.len();
        cursor.hashed.extend(self.carried_named(named));
        cursor.hashed.extend(hashed);
        cursor
    }

    /// The SSE `id:` line (`id: ` and the cursor where every sub stands, then a newline),
    /// sub `moved` (if any) having just moved: patched in place when only its id's digits
    /// changed ([`Line`]), after a copy if the line is shared.
    fn id_line(&mut self, subs: &[impl Standing], moved: Option<usize>) -> &[u8] {
        let moved_named = moved.is_some_and(|moved| self.name_of(moved) != UNNAMED);
        let patched = match (&mut self.line, moved) {
            (Some(line), Some(moved)) if self.fresh => {
                let sent = subs
                    .get(moved)
                    .and_then(Standing::standing)
                    .map(|(_, sent)| sent);
                match sent {
                    Some(sent) if moved_named => match line.patch(moved, sent) {
                        Patch::Same => true,
                        Patch::Rebuild => false,
                        Patch::Write { from, chars, len } => {
                            Arc::make_mut(line).text[from..from + len]
                                .copy_from_slice(&chars[..len]);
                            true
                        }
                    },
                    // Not in the cursor: nothing to change.
                    _ => true,
                }
            }
            (Some(_), None) => self.fresh,
            _ => false,
        };
        if !patched {
            self.rebuild(subs);
        }
        #[cfg(debug_assertions)]
        self.check(subs);
        &self.line.as_ref().expect("built above").text
    }

    /// Queues one SSE event to `out`, sub `moved` having just moved to it: the connection's
    /// own head (the chunk's header when the body is chunked, and the `id:` line), in one
    /// allocation; then `fields`, shared with every connection and ending with the chunk's end
    /// when chunked ([`sse_fields`]). The message is still framed once, and an event is two
    /// pieces (one `iovec` fewer than a separate chunk end).
    pub(super) fn event(
        &mut self,
        subs: &[impl Standing],
        moved: usize,
        fields: Bytes,
        format: Format,
        out: &mut Vec<Bytes>,
    ) {
        let line = self.id_line(subs, Some(moved));
        out.push(head(line, &fields, format));
        out.push(fields);
    }

    /// Queues `message`'s SSE event to `out`, sub `moved` having just moved to it
    /// ([`Book::event`] with the message's shared fields).
    pub(super) fn message_event(
        &mut self,
        subs: &[impl Standing],
        moved: usize,
        message: &Message,
        format: Format,
        out: &mut Vec<Bytes>,
    ) {
        self.event(subs, moved, sse_fields(message, format), format, out);
    }

    /// [`Book::message_event`] in a fan-out writer's walk, which delivers one message to
    /// every follower of its topic: a connection whose line is the one another connection
    /// had before the same event takes the line that one has after it, and the same head,
    /// instead of copying, patching and framing its own ([`SharedLines`]). Otherwise it
    /// writes its own, and takes another's if the result is the same (connections that
    /// follow the same list and were sent the same messages converge on one line).
    pub(super) fn shared_event(
        &mut self,
        subs: &[impl Standing],
        moved: usize,
        message: &Arc<Message>,
        format: Format,
        out: &mut Vec<Bytes>,
        shared: &mut SharedLines,
    ) {
        let name = match self.name_of(moved) {
            name if name != UNNAMED
                && self.carried.is_empty()
                && self.fresh
                && shared.worth_trying() =>
            {
                name
            }
            // Not in the cursor (its line does not change), a cursor that carries entries
            // (what the line becomes depends on them and on the limit), a stale line, or a
            // walk where cursors seldom match.
            _ => return self.message_event(subs, moved, message, format, out),
        };
        shared.tried += 1;
        let key = EventKey {
            message: Arc::as_ptr(message) as usize,
            moved,
            name,
            chunked: format.chunked(),
        };
        let before = self.line.as_ref();
        if let Some(seen) = before.and_then(|line| shared.after(&key, line)) {
            self.adopt(seen, out);
            out.push(seen.fields.clone());
            shared.took += 1;
            #[cfg(debug_assertions)]
            self.check(subs);
            return;
        }
        // Kept as the entry's key only when others may hold it too (a line this
        // connection alone holds is patched in place).
        let before = before.filter(|line| Arc::strong_count(line) > 1).cloned();
        let fields = sse_fields(message, format);
        self.id_line(subs, Some(moved));
        let line = self.line.as_ref().expect("built by id_line");
        if let Some(seen) = shared.same(&key, line) {
            // The same line as another's: its head too (none is built for this one).
            if seen.before.is_none() {
                seen.before = before;
            }
            self.adopt(seen, out);
            shared.took += 1;
        } else {
            let head = head(&line.text, &fields, format);
            if shared.has_room() {
                shared.lines.push(SharedLine {
                    key,
                    before,
                    after: line.clone(),
                    head: head.clone(),
                    fields: fields.clone(),
                });
            }
            out.push(head);
        }
        out.push(fields);
    }

    /// Takes the line and head another connection wrote for the same event.
    #[inline]
    fn adopt(&mut self, seen: &SharedLine, out: &mut Vec<Bytes>) {
        self.line = Some(seen.after.clone());
        out.push(seen.head.clone());
        #[cfg(test)]
        {
            self.taken += 1;
        }
    }

    /// Checks (in debug builds) that the line says where every sub stands.
    #[cfg(debug_assertions)]
    fn check(&self, subs: &[impl Standing]) {
        let line = self.line.as_ref().expect("checked with a line");
        debug_assert_eq!(
            std::str::from_utf8(&line.text[ID_PREFIX.len()..line.text.len() - 1]),
            Ok(self.cursor(subs).encode().as_str()),
            "a patched or shared id line says what a new one would"
        );
    }
    /// Builds the `id:` line whole, recording where each sub's id is (as
    /// [`Book::cursor`] orders the entries, without building one).
    fn rebuild(&mut self, subs: &[impl Standing]) {
        // One walk of the subs (the encoder reads the listed positions twice more).
        let named: Vec<(usize, u32, u64, MessageId)> = self.named(subs).collect();
        let hashed = named
            .iter()
            .filter(|&&(_, name, ..)| name == HASHED)
            .count();
        let listed = named.len() - hashed;
        let carried = self.carried_named(named.len()).count();
        let mut at = vec![ABSENT; subs.len()];
        let offset = |at: usize| u16::try_from(at).unwrap_or(ABSENT);
        let mut bytes = Vec::with_capacity(3 + listed * 4 + (carried + hashed) * 11);
        let positions = named
            .iter()
            .filter(|&&(_, name, ..)| name != HASHED)
            .map(|&(_, name, ..)| name);
        let mut encoder = Encoder::new(&mut bytes, listed, positions);
        for &(index, name, _, sent) in &named {
            if name != HASHED {
                at[index] = offset(encoder.listed(sent));
            }
        }
        encoder.hashed_count(carried + hashed);
        for &(hash, id) in self.carried_named(named.len()) {
            encoder.hashed(hash, id);
        }
        for &(index, name, hash, sent) in &named {
            if name == HASHED {
                at[index] = offset(encoder.hashed(hash, sent));
            }
        }
        let chars = base64::encoded_len(bytes.len(), false).unwrap_or(0);
        // Exactly sized (a boxed slice): kept for the connection's life.
        let mut text = Vec::with_capacity(ID_PREFIX.len() + chars + 1);
        text.extend_from_slice(ID_PREFIX);
        text.resize(ID_PREFIX.len() + chars, 0);
        URL_SAFE_NO_PAD
            .encode_slice(&bytes, &mut text[ID_PREFIX.len()..])
            .expect("sized above");
        text.push(b'\n');
        let built = Line {
            text: text.into_boxed_slice(),
            at: at.into_boxed_slice(),
            bytes: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
        };
        // In place when this connection alone holds its line; a shared one stays as the
        // others hold it.
        match self.line.as_mut().and_then(Arc::get_mut) {
            Some(line) => *line = built,
            None => self.line = Some(Arc::new(built)),
        }
        self.fresh = true;
        #[cfg(test)]
        {
            self.builds += 1;
        }
    }

    /// What a stream in `format` sends once every listed topic is followed, before any
    /// message: on SSE an `id:` line alone (the browser's `lastEventId` is then the cursor,
    /// so a connection that drops before any message resumes from it); elsewhere a
    /// `{"type":"cursor","cursor":"..."}` line or frame to start the client's cursor from.
    pub(super) fn opening(&mut self, subs: &[impl Standing], format: Format) -> Option<Bytes> {
        match format {
            Format::Sse | Format::SseChunked => {
                // An event of an `id:` line alone: the line and the blank line that ends it.
                let mut event = self.id_line(subs, None).to_vec();
                event.push(b'\n');
                Some(format.body(&event))
            }
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

/// An SSE event's own head: the chunk's header when `format` is chunked (sized for the
/// line and `fields`, which end with the chunk's end), then the `id:` line, in one
/// allocation.
fn head(line: &[u8], fields: &Bytes, format: Format) -> Bytes {
    // The chunk's data when chunked: the line and the fields, less the chunk's end that
    // comes with the fields.
    let chunk = format.chunked().then(|| {
        debug_assert!(
            fields.ends_with(wire::CHUNK_END),
            "the chunk's end comes with the fields"
        );
        line.len() + fields.len() - wire::CHUNK_END.len()
    });
    // Exactly sized: a `Vec` with room to spare becomes a `Bytes` through a second
    // allocation (its shared header).
    let header = chunk.map_or(0, |len| {
        (usize::BITS - (len | 1).leading_zeros()).div_ceil(4) as usize + 2
    });
    let mut head = Vec::with_capacity(header + line.len());
    if let Some(len) = chunk {
        wire::push_chunk_start(&mut head, len);
    }
    head.extend_from_slice(line);
    debug_assert_eq!(head.len(), head.capacity());
    Bytes::from(head)
}

/// Which event of a fan-out walk a [`SharedLine`] is: a message (by address: the writer
/// holds it for the walk, and the lines are forgotten before it lets go), the sub that moved
/// to it and how the cursor names that sub, and whether the body is chunked.
#[derive(Clone, Copy, PartialEq, Eq)]
struct EventKey {
    message: usize,
    moved: usize,
    name: u32,
    chunked: bool,
}

/// An `id:` line a connection wrote for one event of a walk.
struct SharedLine {
    key: EventKey,
    /// The line before the event, when other connections held it too.
    before: Option<Arc<Line>>,
    after: Arc<Line>,
    /// The event's head ([`head`]) and fields.
    head: Bytes,
    fields: Bytes,
}

/// The `id:` lines a fan-out writer wrote in the walk over one topic's followers, so that
/// connections with the same cursor share one line and one head: those following the same
/// list that were sent the same messages (the common case: many clients of one page). A
/// connection whose line is another's `before` takes its `after` for the same event (a
/// line's next state depends on its text, the sub that moved, how it is named and the new
/// id, as the book holds no carried entries), at the cost of a lookup instead of a patch,
/// a copy and an allocation. The writer forgets them after each topic.
#[derive(Default)]
pub(super) struct SharedLines {
    lines: Vec<SharedLine>,
    /// Connections of this walk that looked for a line, and those that took one.
    tried: u32,
    took: u32,
}

/// How many connections of a walk look for a line before the writer judges whether that
/// pays: where fewer than one in four takes one, the rest of the walk writes its own lines
/// without looking (two scans of the kept lines cost about a quarter of writing one).
const SHARED_TRIAL: u32 = 16;

/// How many lines a writer keeps per walk: a few cursors shared by many connections pay;
/// connections whose cursors all differ pay a comparison per line kept.
const SHARED_LINES: usize = 8;

impl SharedLines {
    /// Forgets every line (the walk is over).
    pub(super) fn clear(&mut self) {
        self.lines.clear();
        (self.tried, self.took) = (0, 0);
    }

    /// Whether looking for a line still pays in this walk.
    fn worth_trying(&self) -> bool {
        self.tried < SHARED_TRIAL || self.took * 4 >= self.tried
    }

    /// The line written for event `key` by a connection whose line was `before`.
    fn after(&self, key: &EventKey, before: &Arc<Line>) -> Option<&SharedLine> {
        self.lines.iter().find(|seen| {
            seen.key == *key && seen.before.as_ref().is_some_and(|b| Arc::ptr_eq(b, before))
        })
    }

    /// A line written for event `key` that says what `line` says.
    fn same(&mut self, key: &EventKey, line: &Arc<Line>) -> Option<&mut SharedLine> {
        self.lines.iter_mut().find(|seen| {
            seen.key == *key && (Arc::ptr_eq(&seen.after, line) || seen.after == *line)
        })
    }

    /// Whether another line may be kept (checked first: keeping one costs a clone of its
    /// head and fields, which connections whose cursors all differ would pay for nothing).
    fn has_room(&self) -> bool {
        self.lines.len() < SHARED_LINES
    }
}

/// A message's SSE event without its `id:` line: `event:`, `data:` and the blank line that
/// ends it, and the chunk's end when `format` is chunked: a slice of the frame (or chunk)
/// encoded at publish (no copy). (An event's fields may come in any order: the
/// connection's own `id:` line goes first.)
fn sse_fields(message: &Message, format: Format) -> Bytes {
    let frame = message.sse_frame();
    let id_line = frame
        .iter()
        .position(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    if format.chunked() {
        // The chunk is its header, the frame, then the chunk's end.
        let chunk = message.sse_chunk();
        let header = chunk.len() - frame.len() - wire::CHUNK_END.len();
        chunk.slice(header + id_line..)
    } else {
        frame.slice(id_line..)
    }
}

/// A signal's SSE event without an `id:` line (and with the chunk's end when `format` is
/// chunked, as [`sse_fields`]).
pub(super) fn signal_fields(signal: &Signal, topic: &TopicName, format: Format) -> Bytes {
    let mut fields = b"event: ".to_vec();
    fields.extend_from_slice(signal.event_name().as_bytes());
    fields.extend_from_slice(b"\ndata: ");
    fields.extend_from_slice(signal.to_json(topic).as_bytes());
    fields.extend_from_slice(b"\n\n");
    if format.chunked() {
        fields.extend_from_slice(wire::CHUNK_END);
    }
    Bytes::from(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Standing for Option<(u64, MessageId)> {
        fn standing(&self) -> Option<(u64, MessageId)> {
            *self
        }
    }

    /// Names read through the in-order shortcut are the names kept.
    #[test]
    fn names_in_order_are_read_without_the_names() {
        let mut book = Book::new(Vec::new(), 100);
        let kept = |book: &Book| -> Vec<u32> { (0..6).map(|i| book.name_of(i)).collect() };
        for index in 0..4 {
            book.name(index, Key::Listed(index as u32));
        }
        assert!(book.in_order);
        assert_eq!(kept(&book), [0, 1, 2, 3, UNNAMED, UNNAMED]);
        // A position out of order, a gap, a pattern's topic, a sub forgotten: read them.
        book.name(4, Key::Listed(7));
        assert!(!book.in_order);
        assert_eq!(kept(&book), [0, 1, 2, 3, 7, UNNAMED]);
        book.name(4, Key::Listed(4));
        assert!(book.in_order, "in order again");
        book.name(5, Key::Hashed(9));
        assert_eq!(kept(&book), [0, 1, 2, 3, 4, HASHED]);
        book.name(5, Key::Listed(5));
        book.forget(1);
        assert_eq!(kept(&book), [0, UNNAMED, 2, 3, 4, 5]);
        assert!(!book.names(1) && book.names(2));
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
        format!("id: {}\n", book.cursor(subs).encode())
    }

    #[test]
    fn groups_decode_and_encode_as_the_base64_crate_does() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 97 + 13) as u8).collect();
            let text = URL_SAFE_NO_PAD.encode(&bytes);
            let mut back = vec![0; len];
            decode_groups(text.as_bytes(), &mut back);
            assert_eq!(back, bytes);
            let mut again = vec![0; text.len()];
            encode_groups(&bytes, &mut again);
            assert_eq!(again, text.as_bytes());
        }
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
        let first = book.id_line(&subs, None).to_vec();
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
            let line = book.id_line(&subs, Some(moved)).to_vec();
            assert_eq!(line, whole(&book, &subs).as_bytes(), "step {step}");
        }
        // Most lines are patches: rebuilds come from the shape changes alone (27 topics
        // leaving 0, 53 varints growing past 127, a removal and a set-back).
        let rebuilt = book.builds;
        assert!(rebuilt < 100, "{rebuilt} of 2,000 lines were rebuilt");
    }

    /// A connection of `connections_with_the_same_cursor_share_one_line`: its book, its
    /// subs, and by topic the sub that follows it.
    struct Conn {
        book: Book,
        subs: Vec<Option<(u64, MessageId)>>,
        sub_of: Vec<usize>,
    }

    #[test]
    fn connections_with_the_same_cursor_share_one_line() {
        // 40 connections follow the same 30 topics in the same order, 8 follow them in
        // another order (so their cursors differ), and 2 carry an entry from their client's
        // cursor (never shared). One writer's walks deliver 400 messages, one topic's at a
        // time; one of the 40 is set back halfway. Every event is the whole cursor's line
        // and the message's fields, and the 40 end on one line per format, which the others
        // do not share.
        use crate::message::{EventName, Payload};
        const TOPICS: usize = 30;
        let payload = Payload::from_json(r#"{"n":1}"#).expect("valid");
        let mut conns: Vec<Conn> = (0..50)
            .map(|c| {
                let carried = if c >= 48 { vec![(77, 5)] } else { Vec::new() };
                let mut book = Book::new(carried, 100);
                let mut sub_of = vec![0; TOPICS];
                for (index, topic) in sub_of.iter_mut().enumerate() {
                    // The other order: the list reversed, so position `index` is topic
                    // `TOPICS - 1 - index`.
                    *topic = if (40..48).contains(&c) {
                        TOPICS - 1 - index
                    } else {
                        index
                    };
                }
                for (topic, &index) in sub_of.iter().enumerate() {
                    book.name(index, Key::Listed(topic as u32));
                }
                let subs = vec![Some((0, 0)); TOPICS];
                Conn { book, subs, sub_of }
            })
            .collect();
        for conn in &mut conns {
            conn.book.id_line(&conn.subs, None);
        }
        let mut shared = SharedLines::default();
        let mut ids = [0u64; TOPICS];
        for step in 0..400usize {
            let topic = (step * 7 + step / 30) % TOPICS;
            ids[topic] += 1;
            let name = TopicName::parse(&format!("room.{topic}")).expect("valid");
            let message = Arc::new(Message::new(
                ids[topic],
                name,
                EventName::default_event(),
                0,
                &payload,
            ));
            shared.clear();
            for (c, conn) in conns.iter_mut().enumerate() {
                if step == 200 && c == 3 {
                    conn.subs[conn.sub_of[5]] = Some((0, 1));
                    conn.book.stale();
                }
                let moved = conn.sub_of[topic];
                conn.subs[moved] = Some((0, ids[topic]));
                let format = if c % 2 == 0 {
                    Format::SseChunked
                } else {
                    Format::Sse
                };
                let mut out = Vec::new();
                conn.book
                    .shared_event(&conn.subs, moved, &message, format, &mut out, &mut shared);
                let fields = sse_fields(&message, format);
                let line = whole(&conn.book, &conn.subs);
                let expected = [head(line.as_bytes(), &fields, format), fields].concat();
                assert_eq!(out.concat(), expected, "step {step}, connection {c}");
            }
            if step == 200 {
                let line = |c: usize| conns[c].book.line.clone().expect("a line");
                assert!(!Arc::ptr_eq(&line(3), &line(1)), "set back, it has its own");
            }
        }
        let line = |c: usize| conns[c].book.line.clone().expect("a line");
        // One line per format (the head differs): the 20 chunked on one, the 20 plain on
        // another (the one set back among them again, once its topic moved on).
        let same = |first: usize| {
            (0..40)
                .filter(|&c| Arc::ptr_eq(&line(c), &line(first)))
                .count()
        };
        assert_eq!((same(0), same(1)), (20, 20), "connections on one line");
        for c in 40..50 {
            assert!(
                !Arc::ptr_eq(&line(c), &line(0)) && !Arc::ptr_eq(&line(c), &line(1)),
                "connection {c} shares"
            );
        }
        assert!(
            Arc::ptr_eq(&line(41), &line(43)),
            "the other order is shared too"
        );
        // Without sharing each of the 40 writes its own line for each of the 400 events.
        // Shared, the first of each format writes it and the others take it.
        let taken: usize = conns[..40].iter().map(|conn| conn.book.taken).sum();
        assert!(taken >= 400 * 38 - 200, "{taken} of 16,000 lines taken");
        assert!(conns[48..].iter().all(|conn| conn.book.taken == 0));
    }

    #[test]
    fn a_walk_of_distinct_cursors_stops_looking_for_shared_lines() {
        // 40 connections, each naming the moved topic at its own list position, so no two
        // cursors match: the first 16 look for a line and keep theirs, the rest do not
        // look. Every event is still right.
        use crate::message::{EventName, Payload};
        let payload = Payload::from_json(r#"{"n":1}"#).expect("valid");
        let name = TopicName::parse("room.0").expect("valid");
        let message = Arc::new(Message::new(
            1,
            name,
            EventName::default_event(),
            0,
            &payload,
        ));
        let mut shared = SharedLines::default();
        for c in 0..40u32 {
            let mut book = Book::new(Vec::new(), 100);
            book.name(0, Key::Listed(c));
            let mut subs = vec![Some((0, 0))];
            book.id_line(&subs, None);
            subs[0] = Some((0, 1));
            let mut out = Vec::new();
            book.shared_event(&subs, 0, &message, Format::Sse, &mut out, &mut shared);
            let fields = sse_fields(&message, Format::Sse);
            let line = whole(&book, &subs);
            assert_eq!(out.concat(), [line.as_bytes(), &fields].concat(), "{c}");
        }
        assert_eq!((shared.tried, shared.took), (SHARED_TRIAL, 0));
        assert_eq!(shared.lines.len(), SHARED_LINES);
    }

    #[test]
    fn a_chunked_event_is_one_chunk_of_the_line_and_the_shared_fields() {
        // Two pieces: this connection's chunk header and `id:` line, then the message's
        // fields with the chunk's end, sliced from the chunk framed at publish.
        use crate::message::{EventName, Payload};
        let topic = TopicName::parse("room.1").expect("valid");
        let payload = Payload::from_json(r#"{"text":"hello"}"#).expect("valid");
        let message = Message::new(42, topic, EventName::default_event(), 7, &payload);
        let mut book = Book::new(Vec::new(), 10);
        book.name(0, Key::Listed(0));
        let subs = [Some((0, 42))];
        for format in [Format::SseChunked, Format::Sse] {
            let mut out = Vec::new();
            book.event(&subs, 0, sse_fields(&message, format), format, &mut out);
            assert_eq!(out.len(), 2, "{format:?}: head and shared fields");
            let wire: Vec<u8> = out.concat();
            let frame = message.sse_frame();
            let fields = &frame[frame.iter().position(|&b| b == b'\n').expect("id line") + 1..];
            let event = [whole(&book, &subs).as_bytes(), fields].concat();
            let expected = if format == Format::SseChunked {
                [format!("{:x}\r\n", event.len()).as_bytes(), &event, b"\r\n"].concat()
            } else {
                event
            };
            assert_eq!(
                String::from_utf8_lossy(&wire),
                String::from_utf8_lossy(&expected),
                "{format:?}"
            );
        }
    }
}
