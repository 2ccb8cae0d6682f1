//! A stream's metadata: what the protocol remembers about a stream besides its data (its
//! content type, lifetime, closed state, writers' sequence numbers, fork links), how it maps
//! the stream's offsets onto its topic's message ids, and the rules that read it (expiry,
//! idempotent producers, `Stream-Seq`, the `Stream-Cursor` intervals).
//!
//! It is stored, JSON-encoded, as the topic's [`StreamState`](crate::store::StreamState)
//! record, so every store keeps it beside the history and changes both in one atomic write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{content::ContentType, error::DurableError, offset::Offset};
use crate::message::MessageId;
use crate::store::StreamExpect;

/// A stream's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The content type as the creator sent it (echoed verbatim).
    pub content_type: String,
    /// Sliding lifetime in seconds since the last read or append (`Stream-TTL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    /// Absolute expiry as the creator wrote it (`Stream-Expires-At`), echoed verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// That expiry in unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// The topic's last message id when the stream was created: its own messages are the ids
    /// after it.
    pub base: MessageId,
    /// The offset the stream's own messages continue from (a fork's fork offset; 0 else).
    pub start: u64,
    /// The stream this one was forked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<ForkOf>,
    /// Live forks of this stream: while any remain, deleting it only hides it.
    #[serde(default)]
    pub forks: u64,
    /// Deleted while forks still read it: answers 410 until the last fork goes.
    #[serde(default)]
    pub deleted: bool,
    /// Closed: no more appends, ever.
    #[serde(default)]
    pub closed: bool,
    /// The producer append that closed it, which a retry may repeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_by: Option<ProducerWrite>,
    /// The last `Stream-Seq` accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<String>,
    /// Each idempotent producer's epoch and last sequence number.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub producers: BTreeMap<String, ProducerState>,
    /// The last read or append, unix milliseconds (the sliding TTL counts from it).
    pub accessed_ms: u64,
    /// The store's version of the state this was read from (not stored): a write decided
    /// on this reading applies only if the state is still at it (see [`Meta::expect`]).
    #[serde(skip)]
    pub version: u64,
}

/// Where a fork's inherited data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkOf {
    /// The source stream's topic.
    pub source: String,
    /// The source offset the fork was taken at.
    pub offset: u64,
    /// How much of the source's next append the fork kept (`Stream-Fork-Sub-Offset`).
    #[serde(default)]
    pub sub: u64,
}

/// One producer's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    /// Its current epoch.
    pub epoch: u64,
    /// The last sequence number accepted in that epoch.
    pub seq: u64,
}

/// The producer headers of one append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerWrite {
    /// `Producer-Id`.
    pub id: String,
    /// `Producer-Epoch`.
    pub epoch: u64,
    /// `Producer-Seq`.
    pub seq: u64,
}

/// What the producer rules make of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerCheck {
    /// A new write: append, then record the producer at this place.
    Accept(ProducerState),
    /// A retry of a write already appended: answer `204` with the producer's last place.
    Duplicate(ProducerState),
}

impl Meta {
    /// The condition a write decided on this reading puts on the stored state: still the
    /// version it was read at, so two nodes deciding at once cannot both write.
    pub fn expect(&self) -> StreamExpect {
        StreamExpect::Version(self.version)
    }

    /// The stream's tail offset, given its topic's last message id.
    pub fn tail(&self, last_id: MessageId) -> Offset {
        Offset(self.start + last_id.saturating_sub(self.base))
    }

    /// The topic message id just before offset `offset`, for an offset at or after
    /// [`Meta::start`].
    pub fn id_at(&self, offset: Offset) -> MessageId {
        self.base + offset.0.saturating_sub(self.start)
    }

    /// The offset after the stream's own message `id`.
    pub fn offset_after(&self, id: MessageId) -> Offset {
        Offset(self.start + id.saturating_sub(self.base))
    }

    /// The stream's content type.
    pub fn content(&self) -> ContentType {
        ContentType::parse(Some(&self.content_type))
    }

    /// Whether its lifetime is over at `now_ms`: its absolute expiry passed, or its TTL
    /// elapsed since the last access (`accessed_ms`, the later of the stored one and what
    /// this process saw).
    pub fn expired(&self, now_ms: u64, accessed_ms: u64) -> bool {
        let accessed = self.accessed_ms.max(accessed_ms);
        self.expires_ms.is_some_and(|at| now_ms >= at)
            || self
                .ttl
                .is_some_and(|ttl| now_ms >= accessed.saturating_add(ttl.saturating_mul(1000)))
    }

    /// Applies the idempotent-producer rules to `write`.
    pub fn check_producer(&self, write: &ProducerWrite) -> Result<ProducerCheck, DurableError> {
        let Some(state) = self.producers.get(&write.id).copied() else {
            return if write.seq == 0 {
                Ok(ProducerCheck::Accept(ProducerState {
                    epoch: write.epoch,
                    seq: 0,
                }))
            } else {
                Err(DurableError::SeqGap {
                    expected: 0,
                    received: write.seq,
                })
            };
        };
        if write.epoch < state.epoch {
            return Err(DurableError::StaleEpoch {
                current: state.epoch,
            });
        }
        if write.epoch > state.epoch {
            return if write.seq == 0 {
                Ok(ProducerCheck::Accept(ProducerState {
                    epoch: write.epoch,
                    seq: 0,
                }))
            } else {
                Err(DurableError::bad(
                    "a new producer epoch must start at Producer-Seq 0",
                ))
            };
        }
        if write.seq <= state.seq {
            return Ok(ProducerCheck::Duplicate(state));
        }
        if write.seq == state.seq + 1 {
            return Ok(ProducerCheck::Accept(ProducerState {
                epoch: state.epoch,
                seq: write.seq,
            }));
        }
        Err(DurableError::SeqGap {
            expected: state.seq + 1,
            received: write.seq,
        })
    }

    /// Applies the `Stream-Seq` rule: a writer's sequence string must sort above the last.
    pub fn check_seq(&self, seq: Option<&str>) -> Result<(), DurableError> {
        match (seq, &self.seq) {
            (Some(seq), Some(last)) if seq.as_bytes() <= last.as_bytes() => {
                Err(DurableError::SeqConflict)
            }
            _ => Ok(()),
        }
    }

    /// Encodes the metadata for the store.
    pub fn encode(&self) -> bytes::Bytes {
        bytes::Bytes::from(serde_json::to_vec(self).expect("metadata serializes"))
    }

    /// Decodes what [`Meta::encode`] stored.
    pub fn decode(record: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(record).map_err(|e| format!("corrupt stream metadata: {e}"))
    }
}

/// The `Stream-Cursor` a response carries: the number of 20-second intervals since
/// 2024-10-09T00:00:00Z, or, when the client's cursor is already there, a later one (by a
/// random 1-180 intervals), so that a CDN never answers two consecutive long polls from one
/// cache entry.
pub fn cursor(client: Option<&str>, now_ms: u64, random: u64) -> u64 {
    const EPOCH_MS: u64 = 1_728_432_000_000;
    const INTERVAL_MS: u64 = 20_000;
    let interval = now_ms.saturating_sub(EPOCH_MS) / INTERVAL_MS;
    match client.and_then(|c| c.parse::<u64>().ok()) {
        Some(client) if client >= interval => client + 1 + random % 180,
        _ => interval,
    }
}

/// Parses an RFC 3339 timestamp (`2026-12-02T10:00:00Z`, `...+01:00`, with or without
/// fractional seconds) into unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't' | b' ')
        || bytes[13] != b':'
        || bytes[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(rest.as_bytes()[0], b'+' | b'-') => {
            if rest.as_bytes()[3] != b':' {
                return None;
            }
            let hours: i64 = rest[1..3].parse().ok()?;
            let minutes: i64 = rest[4..6].parse().ok()?;
            let total = hours * 60 + minutes;
            if rest.starts_with('-') { -total } else { total }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    u64::try_from(seconds * 1000 + millis).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn producer(id: &str, epoch: u64, seq: u64) -> ProducerWrite {
        ProducerWrite {
            id: id.into(),
            epoch,
            seq,
        }
    }

    fn with(id: &str, epoch: u64, seq: u64) -> Meta {
        let mut meta = Meta::default();
        meta.producers
            .insert(id.into(), ProducerState { epoch, seq });
        meta
    }

    #[test]
    fn producer_rules_follow_the_protocol_table() {
        let fresh = Meta::default();
        assert!(matches!(
            fresh.check_producer(&producer("p", 3, 0)),
            Ok(ProducerCheck::Accept(ProducerState { epoch: 3, seq: 0 }))
        ));
        assert_eq!(
            fresh.check_producer(&producer("p", 0, 1)),
            Err(DurableError::SeqGap {
                expected: 0,
                received: 1
            })
        );
        let meta = with("p", 1, 2);
        assert_eq!(
            meta.check_producer(&producer("p", 0, 3)),
            Err(DurableError::StaleEpoch { current: 1 })
        );
        assert!(matches!(
            meta.check_producer(&producer("p", 2, 0)),
            Ok(ProducerCheck::Accept(ProducerState { epoch: 2, seq: 0 }))
        ));
        assert!(matches!(
            meta.check_producer(&producer("p", 2, 1)),
            Err(DurableError::BadRequest(_))
        ));
        assert_eq!(
            meta.check_producer(&producer("p", 1, 1)),
            Ok(ProducerCheck::Duplicate(ProducerState { epoch: 1, seq: 2 }))
        );
        assert!(matches!(
            meta.check_producer(&producer("p", 1, 3)),
            Ok(ProducerCheck::Accept(ProducerState { epoch: 1, seq: 3 }))
        ));
        assert_eq!(
            meta.check_producer(&producer("p", 1, 5)),
            Err(DurableError::SeqGap {
                expected: 3,
                received: 5
            })
        );
    }

    #[test]
    fn stream_seq_compares_bytewise() {
        let mut meta = Meta::default();
        assert!(meta.check_seq(Some("2")).is_ok());
        meta.seq = Some("2".into());
        assert_eq!(meta.check_seq(Some("10")), Err(DurableError::SeqConflict));
        assert_eq!(meta.check_seq(Some("2")), Err(DurableError::SeqConflict));
        assert!(meta.check_seq(Some("3")).is_ok());
        meta.seq = Some("a".into());
        assert_eq!(meta.check_seq(Some("B")), Err(DurableError::SeqConflict));
    }

    #[test]
    fn ttl_slides_from_the_last_access_and_expiry_is_absolute() {
        let meta = Meta {
            ttl: Some(2),
            accessed_ms: 10_000,
            ..Meta::default()
        };
        assert!(!meta.expired(11_999, 0));
        assert!(meta.expired(12_000, 0));
        assert!(
            !meta.expired(12_000, 11_500),
            "an access seen here renews it"
        );
        let meta = Meta {
            expires_ms: Some(5_000),
            accessed_ms: 10_000,
            ..Meta::default()
        };
        assert!(meta.expired(10_000, 10_000));
    }

    #[test]
    fn offsets_map_onto_topic_ids() {
        let meta = Meta {
            base: 40,
            start: 7,
            ..Meta::default()
        };
        assert_eq!(meta.tail(40), Offset(7));
        assert_eq!(meta.tail(43), Offset(10));
        assert_eq!(meta.id_at(Offset(9)), 42);
        assert_eq!(meta.offset_after(41), Offset(8));
    }

    #[test]
    fn rfc3339_timestamps_parse_with_any_offset() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-12-02T10:00:00Z"),
            parse_rfc3339("2026-12-02T10:00:00+00:00")
        );
        assert_eq!(
            parse_rfc3339("2026-12-02T11:00:00.250+01:00"),
            parse_rfc3339("2026-12-02T10:00:00.25Z")
        );
        assert_eq!(
            parse_rfc3339("2024-10-09T00:00:00Z"),
            Some(1_728_432_000_000)
        );
        for bad in [
            "not-a-timestamp",
            "2026-13-02T10:00:00Z",
            "2026-12-02 10:00",
            "",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn cursors_move_on_when_the_client_is_already_there() {
        let now = 1_728_432_000_000 + 20_000 * 100 + 5;
        assert_eq!(cursor(None, now, 0), 100);
        assert_eq!(cursor(Some("50"), now, 0), 100);
        assert_eq!(cursor(Some("100"), now, 0), 101);
        assert_eq!(cursor(Some("120"), now, 7), 128);
        assert_eq!(cursor(Some("junk"), now, 7), 100);
    }
}
