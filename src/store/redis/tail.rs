//! The node-local tail cache: the newest messages of each followed topic, as this node's
//! subscription received them, so that reads near the head (long polls woken by a message,
//! pollers keeping up) are answered without a Redis round trip.

use std::{collections::VecDeque, sync::Arc};

use super::super::{LogHead, LogRead};
use crate::message::{Message, MessageId};

/// Messages of a followed topic kept per node, so that reads near the head (long polls
/// woken by a message, pollers keeping up) are answered without a Redis round trip.
pub(super) const TAIL_CAPACITY: usize = 1024;

/// The newest messages of a followed topic as this node's subscription received them, with
/// contiguous ids. Emptied whenever the subscription is lost, so it never answers for a span
/// it may have missed; a read it cannot answer exactly goes to Redis.
#[derive(Default)]
pub(super) struct Tail {
    pub(super) messages: VecDeque<Arc<Message>>,
    pub(super) capacity: usize,
}

impl Tail {
    pub(super) fn push(&mut self, message: &Arc<Message>) {
        match self.messages.back() {
            Some(last) if message.id <= last.id => return,
            Some(last) if message.id != last.id + 1 => self.messages.clear(),
            _ => {}
        }
        if self.messages.len() >= self.capacity {
            self.messages.pop_front();
        }
        self.messages.push_back(message.clone());
    }

    /// The messages after `after`, if this tail holds that span exactly.
    pub(super) fn read(&mut self, after: MessageId, limit: usize, cutoff: u64) -> Option<LogRead> {
        // History older than the age limit is not served, as Redis would not serve it.
        while self.messages.front().is_some_and(|m| m.time < cutoff) {
            self.messages.pop_front();
        }
        let (first, last) = (self.messages.front()?.id, self.messages.back()?.id);
        if after.checked_add(1)? < first || after > last {
            return None;
        }
        let skip = usize::try_from(after + 1 - first).ok()?;
        Some(LogRead {
            messages: self
                .messages
                .iter()
                .skip(skip)
                .take(limit)
                .cloned()
                .collect(),
            head: LogHead {
                last_id: last,
                first_retained: first,
            },
        })
    }
}

pub(super) type SharedTail = Arc<std::sync::Mutex<Tail>>;

pub(super) fn lock(tail: &SharedTail) -> std::sync::MutexGuard<'_, Tail> {
    // Every critical section is a few pointer moves; a panic cannot leave it inconsistent.
    tail.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{EventName, Payload, TopicName};

    fn message(id: MessageId, time: u64) -> Arc<Message> {
        let topic = TopicName::parse("t").unwrap();
        let data = Payload::from_text("x");
        Arc::new(Message::new(
            id,
            topic,
            EventName::default_event(),
            time,
            &data,
        ))
    }

    fn ids(read: Option<LogRead>) -> Option<Vec<MessageId>> {
        read.map(|read| read.messages.iter().map(|m| m.id).collect())
    }

    #[test]
    fn a_tail_answers_only_the_span_it_holds_exactly() {
        let mut tail = Tail {
            messages: VecDeque::new(),
            capacity: 3,
        };
        assert!(tail.read(0, 10, 0).is_none(), "an empty tail knows nothing");
        for id in 5..=8 {
            tail.push(&message(id, 100));
        }
        tail.push(&message(7, 100));
        assert_eq!(ids(tail.read(5, 10, 0)), Some(vec![6, 7, 8]));
        assert_eq!(ids(tail.read(6, 1, 0)), Some(vec![7]));
        assert_eq!(
            ids(tail.read(8, 10, 0)),
            Some(vec![]),
            "caught up: nothing new"
        );
        assert!(tail.read(4, 10, 0).is_none(), "before the tail: ask Redis");
        assert!(
            tail.read(9, 10, 0).is_none(),
            "a cursor ahead of this node: ask Redis"
        );
        let head = tail.read(8, 10, 0).unwrap().head;
        assert_eq!((head.last_id, head.first_retained), (8, 6));

        tail.push(&message(11, 200));
        assert!(tail.read(8, 10, 0).is_none(), "a gap empties the tail");
        assert_eq!(ids(tail.read(10, 10, 0)), Some(vec![11]));
        tail.push(&message(12, 300));
        assert!(
            tail.read(10, 10, 250).is_none(),
            "messages past the age limit are not served"
        );
        assert_eq!(ids(tail.read(11, 10, 250)), Some(vec![12]));
    }
}
