//! The stored form of a message, shared by the disk and Redis stores.
//!
//! A record is `time\nevent\ndata`: the publish time in milliseconds, the event name and the
//! compact JSON payload. None of the three can contain a newline (names are restricted, the
//! payload is one line), so the format needs no escaping, and a Lua script in Redis can read
//! the time with one `string.match`. The id and topic are not in the record: they are the
//! key it is stored under.

use bytes::Bytes;

use super::StoreError;
use crate::message::{EventName, Message, MessageId, Payload, TopicName};

/// Encodes the parts of a message that are not its key.
pub(crate) fn encode(time: u64, event: &EventName, data: &Payload) -> Vec<u8> {
    let (event, data) = (event.as_str(), data.as_str());
    let mut record = Vec::with_capacity(24 + event.len() + data.len());
    record.extend_from_slice(time.to_string().as_bytes());
    record.push(b'\n');
    record.extend_from_slice(event.as_bytes());
    record.push(b'\n');
    record.extend_from_slice(data.as_bytes());
    record
}

/// The publish time of a record, without decoding the rest.
pub(crate) fn time(record: &[u8]) -> Option<u64> {
    split_time(record).map(|(time, _)| time)
}

/// The publish time and the index of the newline that ends it.
fn split_time(record: &[u8]) -> Option<(u64, usize)> {
    let end = record.iter().position(|&b| b == b'\n')?;
    let time = std::str::from_utf8(&record[..end]).ok()?.parse().ok()?;
    Some((time, end))
}

/// Rebuilds the message stored as `record` under `topic` and `id`.
pub(crate) fn decode(
    id: MessageId,
    topic: &TopicName,
    record: Bytes,
) -> Result<Message, StoreError> {
    let corrupt = || StoreError::Internal(format!("corrupt record {topic}/{id}"));
    let (time, time_end) = split_time(&record).ok_or_else(corrupt)?;
    let rest = record.slice(time_end + 1..);
    let event_end = rest.iter().position(|&b| b == b'\n').ok_or_else(corrupt)?;
    let event = std::str::from_utf8(&rest[..event_end])
        .ok()
        .and_then(|name| EventName::parse(name).ok())
        .ok_or_else(corrupt)?;
    let data = Payload::from_stored(rest.slice(event_end + 1..)).ok_or_else(corrupt)?;
    Ok(Message::new(id, topic.clone(), event, time, &data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_corruption_is_refused() {
        let topic = TopicName::parse("room:1").unwrap();
        let event = EventName::parse("chat").unwrap();
        let data = Payload::from_json(r#"{"text": "a\nb", "n": 1.50}"#).unwrap();
        let record = encode(1_700_000_000_123, &event, &data);
        assert_eq!(time(&record), Some(1_700_000_000_123));
        let message = decode(42, &topic, Bytes::from(record)).unwrap();
        let original = Message::new(42, topic.clone(), event, 1_700_000_000_123, &data);
        assert_eq!(message.envelope(), original.envelope());
        for bad in [
            &b""[..],
            b"12",
            b"x\nmessage\n{}",
            b"1\nbad name\n{}",
            b"1\nm\n{\n}",
        ] {
            assert!(
                decode(1, &topic, Bytes::from_static(bad)).is_err(),
                "{bad:?}"
            );
        }
    }
}
