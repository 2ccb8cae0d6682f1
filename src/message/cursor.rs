//! The cursor of a request that follows several topics: one compact, versioned string that
//! resumes every topic it follows, on any transport.
//!
//! A single topic's cursor is a message id (`after=41`). Several topics need one id each, in
//! a string short enough for a URL and an SSE `id:` line, so the names are not spelled out
//! (topic names can be 128 characters):
//! - a topic the request lists by name is named by its **position** in the list (the list is
//!   stable: an `EventSource` reconnects to the URL it first used);
//! - a topic a pattern picked up is named by a 64-bit **hash** of its name
//!   ([`topic_hash`], FNV-1a, which a browser computes in a few lines).
//!
//! Bytes, then base64url without padding (no NUL, CR or LF, which an `EventSource` would
//! refuse in an id):
//!
//! ```text
//! 0x02                                   version
//! varint n,  byte shape                  listed topics, their positions by shape:
//!   (shape 0: nothing)                     0, 1, ..., n - 1, in that order
//!   (shape 1: n × varint position)         as given, in any order
//!   (shape 2: varint k, k bytes)           a bitmap (bit p of byte p / 8, low bit first)
//!                                          of n positions, in ascending order
//!   n × varint id                          then their ids, in the same order
//! varint m,  m × (u64 hash big-endian, varint id) topics picked up by a pattern
//! ```
//!
//! Varints are LEB128 (7 bits a byte, low first). An id is the last message the reader has
//! (0: none yet, so from the topic's oldest retained). At 100 topics whose ids are below
//! 2^42 the string is at most 1,872 characters (one more than version 1: the shape byte).
//!
//! Version 1, which servers before it wrote and which is still read, gave each listed topic
//! as `(varint position, varint id)`. A list whose topics all have messages names them in
//! order, so version 2 leaves the positions out (or, when some topics are at 0 and left out,
//! writes them as a bitmap): about a byte less per listed topic, in every SSE event's `id:`
//! line (half the line at 100 topics). The encoder picks the shortest shape.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::{MessageId, pattern::Selection};

/// The format's version: the first byte.
const VERSION: u8 = 2;
/// The version before, still read.
const VERSION_1: u8 = 1;
/// Version 2's shapes of the listed positions: 0, 1, ..., n - 1 in order; given; a bitmap.
const IN_ORDER: u8 = 0;
const GIVEN: u8 = 1;
const BITMAP: u8 = 2;

/// Where each followed topic stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Listed topics: (position in the request's list, last id).
    pub listed: Vec<(u32, MessageId)>,
    /// Topics a pattern picked up: ([`topic_hash`] of the name, last id).
    pub hashed: Vec<(u64, MessageId)>,
}

/// Why a cursor string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a cursor of this server: {0}")]
pub struct Malformed(pub &'static str);

/// FNV-1a, 64 bits, of a topic's name: how a cursor names a topic a pattern picked up.
pub fn topic_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// How many bytes `value` takes as a varint.
pub fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Writes a cursor's bytes (before base64url) entry by entry, without a [`Cursor`] first:
/// an SSE connection builds its `id:` line from its subs this way, noting where each id is
/// to rewrite it in place later. The caller gives the counts before the entries.
#[derive(Debug)]
pub struct Encoder<'a>(&'a mut Vec<u8>);

impl<'a> Encoder<'a> {
    /// Starts a cursor, in `bytes`, with `listed` listed entries at `positions`: their ids
    /// come next, in the same order.
    pub fn new(
        bytes: &'a mut Vec<u8>,
        listed: usize,
        positions: impl Iterator<Item = u32> + Clone,
    ) -> Self {
        bytes.push(VERSION);
        push_varint(bytes, listed as u64);
        // One walk for the shape (the caller's positions may come from a walk of its subs).
        let (mut in_order, mut ascending, mut given) = (true, true, 0);
        let mut last: Option<u32> = None;
        for (index, position) in positions.clone().enumerate() {
            in_order &= position as usize == index;
            ascending &= last.is_none_or(|last| last < position);
            given += varint_len(position.into());
            last = Some(position);
        }
        let bitmap = last.map_or(0, |last| last as usize / 8 + 1);
        if in_order {
            bytes.push(IN_ORDER);
        } else if ascending && bitmap + varint_len(bitmap as u64) < given {
            bytes.push(BITMAP);
            push_varint(bytes, bitmap as u64);
            let start = bytes.len();
            bytes.resize(start + bitmap, 0);
            for position in positions {
                bytes[start + position as usize / 8] |= 1 << (position % 8);
            }
        } else {
            bytes.push(GIVEN);
            for position in positions {
                push_varint(bytes, u64::from(position));
            }
        }
        Self(bytes)
    }

    /// The next listed entry's id; returns where it starts.
    pub fn listed(&mut self, id: MessageId) -> usize {
        let at = self.0.len();
        push_varint(self.0, id);
        at
    }

    /// Ends the listed entries: `hashed` hashed entries come next.
    pub fn hashed_count(&mut self, hashed: usize) {
        push_varint(self.0, hashed as u64);
    }

    /// A hashed entry; returns where its id starts.
    pub fn hashed(&mut self, hash: u64, id: MessageId) -> usize {
        self.0.extend_from_slice(&hash.to_be_bytes());
        let at = self.0.len();
        push_varint(self.0, id);
        at
    }
}

/// Reads bytes in order, refusing anything past the end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, Malformed> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first().ok_or(Malformed("cut short"))?;
            self.0 = rest;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(Malformed("a number overflows 64 bits"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Malformed("a number overflows 64 bits"))
    }

    fn byte(&mut self) -> Result<u8, Malformed> {
        let (&byte, rest) = self.0.split_first().ok_or(Malformed("cut short"))?;
        self.0 = rest;
        Ok(byte)
    }

    fn position(&mut self) -> Result<u32, Malformed> {
        u32::try_from(self.varint()?).map_err(|_| Malformed("a position out of range"))
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        let (bytes, rest) = self
            .0
            .split_first_chunk::<8>()
            .ok_or(Malformed("cut short"))?;
        self.0 = rest;
        Ok(u64::from_be_bytes(*bytes))
    }

    fn count(&mut self, limit: usize) -> Result<usize, Malformed> {
        usize::try_from(self.varint()?)
            .ok()
            .filter(|&n| n <= limit)
            .ok_or(Malformed("names more topics than a connection may follow"))
    }
}

impl Cursor {
    /// The cursor as its string.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(3 + self.listed.len() * 5 + self.hashed.len() * 13);
        self.encode_bytes(&mut bytes);
        URL_SAFE_NO_PAD.encode(&bytes)
    }

    fn encode_bytes(&self, bytes: &mut Vec<u8>) {
        let positions = self.listed.iter().map(|&(position, _)| position);
        let mut encoder = Encoder::new(bytes, self.listed.len(), positions);
        for &(_, id) in &self.listed {
            encoder.listed(id);
        }
        encoder.hashed_count(self.hashed.len());
        for &(hash, id) in &self.hashed {
            encoder.hashed(hash, id);
        }
    }

    /// Reads a cursor string naming at most `limit` topics, each once.
    pub fn decode(text: &str, limit: usize) -> Result<Self, Malformed> {
        // The longest string `limit` topics can make; anything longer is refused unread.
        let most = 4 * (4 + limit * 19).div_ceil(3);
        if text.len() > most {
            return Err(Malformed("longer than any cursor of this many topics"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| Malformed("not base64url"))?;
        let mut reader = Reader(&bytes);
        let version = match reader.0.split_first() {
            Some((&version @ (VERSION | VERSION_1), rest)) => {
                reader.0 = rest;
                version
            }
            Some(_) => return Err(Malformed("unknown version")),
            None => return Err(Malformed("empty")),
        };
        let mut cursor = Cursor::default();
        let listed = reader.count(limit)?;
        let named = |cursor: &Cursor, position: u32| {
            if cursor.listed.iter().any(|&(p, _)| p == position) {
                return Err(Malformed("a position named twice"));
            }
            Ok(position)
        };
        if version == VERSION_1 {
            for _ in 0..listed {
                let position = named(&cursor, reader.position()?)?;
                cursor.listed.push((position, reader.varint()?));
            }
        } else {
            match reader.byte()? {
                IN_ORDER => cursor.listed.extend((0..listed as u32).map(|p| (p, 0))),
                GIVEN => {
                    for _ in 0..listed {
                        let position = named(&cursor, reader.position()?)?;
                        cursor.listed.push((position, 0));
                    }
                }
                BITMAP => {
                    let len = usize::try_from(reader.varint()?)
                        .ok()
                        .filter(|&len| len <= reader.0.len())
                        .ok_or(Malformed("cut short"))?;
                    let (bitmap, rest) = reader.0.split_at(len);
                    reader.0 = rest;
                    for (index, &byte) in bitmap.iter().enumerate() {
                        for bit in (0..8).filter(|bit| byte & (1 << bit) != 0) {
                            let position = u32::try_from(index * 8 + bit)
                                .map_err(|_| Malformed("a position out of range"))?;
                            cursor.listed.push((position, 0));
                        }
                    }
                    if cursor.listed.len() != listed {
                        return Err(Malformed("the bitmap names another number of topics"));
                    }
                }
                _ => return Err(Malformed("unknown shape of the listed positions")),
            }
            for entry in &mut cursor.listed {
                entry.1 = reader.varint()?;
            }
        }
        let hashed = reader.count(limit - listed.min(limit))?;
        for _ in 0..hashed {
            let hash = reader.u64()?;
            if cursor.hashed.iter().any(|&(h, _)| h == hash) {
                return Err(Malformed("a topic named twice"));
            }
            cursor.hashed.push((hash, reader.varint()?));
        }
        if !reader.0.is_empty() {
            return Err(Malformed("bytes after the end"));
        }
        Ok(cursor)
    }

    /// The id held for listed position `position`.
    pub fn listed(&self, position: usize) -> Option<MessageId> {
        self.listed
            .iter()
            .find(|&&(p, _)| p as usize == position)
            .map(|&(_, id)| id)
    }

    /// The id held for the topic whose hash is `hash`.
    pub fn hashed(&self, hash: u64) -> Option<MessageId> {
        self.hashed
            .iter()
            .find(|&&(h, _)| h == hash)
            .map(|&(_, id)| id)
    }

    /// Sets the id of a listed position, adding it if new.
    pub fn set_listed(&mut self, position: u32, id: MessageId) {
        match self.listed.iter_mut().find(|(p, _)| *p == position) {
            Some(entry) => entry.1 = id,
            None => self.listed.push((position, id)),
        }
    }

    /// Sets the id of a hashed topic, adding it if new.
    pub fn set_hashed(&mut self, hash: u64, id: MessageId) {
        match self.hashed.iter_mut().find(|(h, _)| *h == hash) {
            Some(entry) => entry.1 = id,
            None => self.hashed.push((hash, id)),
        }
    }
}

/// A client's cursor over a topic list, kept from what it receives: the stream's opening
/// cursor, then each envelope's `topic` and `id` and each `truncated` or `reset` signal.
/// What `pushhub sub` keeps (and what pushhub.js does in the browser).
#[derive(Debug, Clone)]
pub struct Tracker {
    list: Selection,
    cursor: Cursor,
}

impl Tracker {
    /// A tracker for `list`, starting from `cursor` (a cursor string it was given).
    pub fn new(list: Selection, cursor: Cursor) -> Self {
        Self { list, cursor }
    }

    /// Adopts the cursor a stream opened with (`{"type":"cursor"}`) or a poll answered
    /// (`next_after`).
    pub fn reset_to(&mut self, cursor: Cursor) {
        self.cursor = cursor;
    }

    /// `topic` now stands at `id` (a message received; or a signal's resume point).
    pub fn saw(&mut self, topic: &str, id: MessageId) {
        match self.list.position(topic) {
            Some(position) => self.cursor.set_listed(position as u32, id),
            None => self.cursor.set_hashed(topic_hash(topic), id),
        }
    }

    /// The cursor as it stands.
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }
}

/// Whether `text` is a cursor string rather than a plain message id: cursors start with the
/// version byte's first character, `A`, which no number does.
pub fn looks_like_cursor(text: &[u8]) -> bool {
    text.first() == Some(&b'A')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_and_stays_within_its_bound() {
        let cursor = Cursor {
            listed: vec![(0, 7), (2, 0), (1, u64::MAX)],
            hashed: vec![(topic_hash("news.sport"), 12), (u64::MAX, 1)],
        };
        let text = cursor.encode();
        assert!(looks_like_cursor(text.as_bytes()));
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(Cursor::decode(&text, 5).unwrap(), cursor);
        // Entry by entry, noting where each id starts.
        let mut bytes = Vec::new();
        let positions = cursor.listed.iter().map(|&(position, _)| position);
        let mut encoder = Encoder::new(&mut bytes, cursor.listed.len(), positions);
        let mut ats: Vec<usize> = cursor
            .listed
            .iter()
            .map(|&(_, id)| encoder.listed(id))
            .collect();
        encoder.hashed_count(cursor.hashed.len());
        ats.extend(
            cursor
                .hashed
                .iter()
                .map(|&(hash, id)| encoder.hashed(hash, id)),
        );
        assert_eq!(URL_SAFE_NO_PAD.encode(&bytes), text);
        assert_eq!(bytes[ats[0]], 7, "the first listed id");
        assert_eq!(bytes[ats[4]], 1, "the last hashed id");

        // 100 topics, all picked up by a pattern, ids just under 2^42: under 2 KiB.
        let big = Cursor {
            listed: Vec::new(),
            hashed: (0..100)
                .map(|i| (topic_hash(&format!("{i:0128}")), (1 << 42) - 1))
                .collect(),
        };
        assert!(big.encode().len() <= 1872, "{}", big.encode().len());
        assert_eq!(Cursor::decode(&big.encode(), 100).unwrap(), big);
    }

    #[test]
    fn listed_positions_in_order_are_left_out() {
        // 100 listed topics at ids 1..=100, in order: a shape byte instead of 100 positions.
        let list = Cursor {
            listed: (0..100).map(|p| (p, u64::from(p) + 1)).collect(),
            hashed: Vec::new(),
        };
        let bytes = URL_SAFE_NO_PAD.decode(list.encode()).unwrap();
        assert_eq!(&bytes[..3], [VERSION, 100, IN_ORDER]);
        assert_eq!(
            bytes.len(),
            3 + 100 + 1,
            "one byte an id, and the hashed count"
        );
        assert_eq!(Cursor::decode(&list.encode(), 100).unwrap(), list);
        // With some topics left out (at 0), in ascending order: a bitmap of 13 bytes.
        let sparse = Cursor {
            listed: (1..100).map(|p| (p, 1)).collect(),
            hashed: Vec::new(),
        };
        let bytes = URL_SAFE_NO_PAD.decode(sparse.encode()).unwrap();
        assert_eq!(&bytes[..4], [VERSION, 99, BITMAP, 13]);
        assert_eq!(bytes.len(), 4 + 13 + 99 + 1);
        assert_eq!(Cursor::decode(&sparse.encode(), 100).unwrap(), sparse);
        // A few topics far apart: given, as a bitmap would be longer.
        let far = Cursor {
            listed: vec![(3, 1), (900, 2)],
            hashed: Vec::new(),
        };
        let bytes = URL_SAFE_NO_PAD.decode(far.encode()).unwrap();
        assert_eq!(&bytes[..3], [VERSION, 2, GIVEN]);
        assert_eq!(Cursor::decode(&far.encode(), 100).unwrap(), far);
        // Out of order, they are given.
        let mut shuffled = list.clone();
        shuffled.listed.swap(3, 70);
        let bytes = URL_SAFE_NO_PAD.decode(shuffled.encode()).unwrap();
        assert_eq!(&bytes[..3], [VERSION, 100, GIVEN]);
        assert_eq!(Cursor::decode(&shuffled.encode(), 100).unwrap(), shuffled);
    }

    #[test]
    fn a_version_1_cursor_is_still_read() {
        // What servers before version 2 wrote: listed (0, 7) and (2, 9), hashed (5, 3).
        let v1 = [1, 2, 0, 7, 2, 9, 1, 0, 0, 0, 0, 0, 0, 0, 5, 3];
        let cursor = Cursor::decode(&URL_SAFE_NO_PAD.encode(v1), 5).unwrap();
        assert_eq!(cursor.listed, [(0, 7), (2, 9)]);
        assert_eq!(cursor.hashed, [(5, 3)]);
    }

    #[test]
    fn fnv1a_matches_its_reference_values() {
        // From the FNV reference test suite.
        assert_eq!(topic_hash(""), 0xcbf29ce484222325);
        assert_eq!(topic_hash("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(topic_hash("foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn what_is_not_a_cursor_is_refused() {
        let two = Cursor {
            listed: vec![(0, 1), (1, 2)],
            hashed: vec![],
        };
        let good = URL_SAFE_NO_PAD.decode(two.encode()).unwrap();
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![3, 0, 0],
            // Version 2: an unknown shape; a position given twice; an id missing; a bitmap
            // naming 2 topics of 1, or cut short.
            vec![2, 1, 3, 0, 0],
            vec![2, 1, 2, 1, 0b11, 5, 0],
            vec![2, 1, 2, 4, 1],
            vec![2, 2, 1, 4, 4, 1, 1, 0],
            vec![2, 2, 0, 1, 0],
            good[..good.len() - 1].to_vec(),
            [good.clone(), vec![0]].concat(),
            vec![1, 2, 0, 1, 0, 2, 0],
            vec![
                1, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8, 1, 1, 2, 3, 4, 5, 6, 7, 8, 1,
            ],
            vec![
                1, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0,
            ],
        ];
        for bytes in cases {
            let text = URL_SAFE_NO_PAD.encode(&bytes);
            assert!(Cursor::decode(&text, 5).is_err(), "{bytes:?} accepted");
        }
        assert!(Cursor::decode(&two.encode(), 1).is_err(), "over the limit");
        for text in ["", "A", "A$", "AQ==", "0"] {
            assert!(Cursor::decode(text, 5).is_err(), "{text:?} accepted");
        }
    }
}
