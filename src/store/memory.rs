//! The in-memory store: a bounded ring of recent messages per topic.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;

use super::{
    Live, LogHead, LogRead, Retention, Store, StoreError, StreamState, StreamWrite, StreamWritten,
    TopicLog,
};
use crate::message::{EventName, Message, MessageId, Payload, TopicName};

/// Keeps history in process memory. Ids restart at 1 when the process restarts or when an
/// idle topic is dropped.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    retention: Retention,
}

impl MemoryStore {
    /// A store that keeps each topic's history per `retention`.
    pub fn new(retention: Retention) -> Self {
        Self { retention }
    }
}

impl Store for MemoryStore {
    fn open(&self, topic: &TopicName, live: Arc<dyn Live>) -> Arc<dyn TopicLog> {
        Arc::new(MemoryLog {
            topic: topic.clone(),
            live,
            retention: self.retention,
            state: Mutex::new(LogState::default()),
        })
    }
}

struct MemoryLog {
    topic: TopicName,
    live: Arc<dyn Live>,
    retention: Retention,
    // A std mutex: every critical section is a few pointer moves and is never held across
    // an `.await`, so an async mutex would only add overhead.
    state: Mutex<LogState>,
}

#[derive(Default)]
struct LogState {
    /// Retained messages; ids are contiguous, so `messages[i].id == first_id + i`.
    messages: VecDeque<Arc<Message>>,
    last_id: MessageId,
    /// Set while the topic is a stream: it keeps everything, and refuses appends once sealed.
    stream: Option<StreamState>,
}

impl LogState {
    fn head(&self) -> LogHead {
        LogHead {
            last_id: self.last_id,
            first_retained: self.messages.front().map_or(self.last_id + 1, |m| m.id),
        }
    }

    fn expire(&mut self, retention: &Retention, now_ms: u64) {
        if self.stream.is_some() {
            return;
        }
        while self.messages.len() > retention.max_messages {
            self.messages.pop_front();
        }
        if let Some(max_age) = retention.max_age {
            let cutoff = now_ms.saturating_sub(max_age.as_millis() as u64);
            while self.messages.front().is_some_and(|m| m.time < cutoff) {
                self.messages.pop_front();
            }
        }
    }
}

impl MemoryLog {
    /// Appends one message under the lock and hands it on (under the lock, so that
    /// concurrent publishers hand their messages on in id order).
    fn push(
        &self,
        state: &mut LogState,
        event: EventName,
        data: &Payload,
        time: u64,
    ) -> Arc<Message> {
        let id = state.last_id + 1;
        let message = Arc::new(Message::new(id, self.topic.clone(), event, time, data));
        state.last_id = id;
        state.messages.push_back(message.clone());
        self.live.deliver(&message);
        message
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        // A panic while holding this lock cannot leave the ring inconsistent (every mutation
        // is a single push or pop), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl TopicLog for MemoryLog {
    async fn append(
        &self,
        event: EventName,
        data: &Payload,
        time: u64,
    ) -> Result<Arc<Message>, StoreError> {
        let mut state = self.lock();
        if state.stream.as_ref().is_some_and(|s| s.sealed) {
            return Err(StoreError::Sealed);
        }
        let message = self.push(&mut state, event, data, time);
        state.expire(&self.retention, time);
        Ok(message)
    }

    async fn stream(&self) -> Result<Option<StreamState>, StoreError> {
        Ok(self.lock().stream.clone())
    }

    async fn write_stream(&self, write: StreamWrite) -> Result<StreamWritten, StoreError> {
        let mut state = self.lock();
        if write.clear {
            state.messages.clear();
        }
        let messages = write
            .messages
            .into_iter()
            .map(|(event, data)| self.push(&mut state, event, &data, write.time))
            .collect();
        state.stream = write.state;
        state.expire(&self.retention, write.time);
        Ok(StreamWritten {
            messages,
            head: state.head(),
        })
    }

    async fn read(&self, after: MessageId, limit: usize) -> Result<LogRead, StoreError> {
        self.read_now(after, limit)
            .expect("memory reads answer at once")
    }

    async fn head(&self) -> Result<LogHead, StoreError> {
        let mut state = self.lock();
        state.expire(&self.retention, crate::message::now_millis());
        Ok(state.head())
    }

    fn read_now(&self, after: MessageId, limit: usize) -> Option<Result<LogRead, StoreError>> {
        let mut state = self.lock();
        state.expire(&self.retention, crate::message::now_millis());
        let head = state.head();
        let skip = after.saturating_add(1).saturating_sub(head.first_retained);
        let messages = state
            .messages
            .iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .take(limit)
            .cloned()
            .collect();
        Some(Ok(LogRead { messages, head }))
    }

    fn release_if_idle(&self, now_ms: u64) -> bool {
        let mut state = self.lock();
        state.expire(&self.retention, now_ms);
        state.messages.is_empty() && state.stream.is_none()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn log(max_messages: usize, max_age: Option<Duration>) -> Arc<dyn TopicLog> {
        MemoryStore::new(Retention {
            max_messages,
            max_age,
        })
        .open(&TopicName::parse("t").unwrap(), super::super::nowhere())
    }

    async fn append(log: &Arc<dyn TopicLog>, time: u64) -> MessageId {
        let data = Payload::from_text("x");
        log.append(EventName::default_event(), &data, time)
            .await
            .unwrap()
            .id
    }

    #[tokio::test]
    async fn ids_are_contiguous_and_reads_seek_by_cursor() {
        let log = log(3, None);
        let now = crate::message::now_millis();
        for expected in 1..=5 {
            assert_eq!(append(&log, now).await, expected);
        }
        let read = log.read(0, 10).await.unwrap();
        let ids: Vec<_> = read.messages.iter().map(|m| m.id).collect();
        assert_eq!(ids, [3, 4, 5]);
        assert_eq!(
            read.head,
            LogHead {
                last_id: 5,
                first_retained: 3
            }
        );
        let ids: Vec<_> = log
            .read(3, 1)
            .await
            .unwrap()
            .messages
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, [4]);
        assert!(log.read(5, 10).await.unwrap().messages.is_empty());
        assert!(log.read(u64::MAX, 10).await.unwrap().messages.is_empty());
    }

    #[tokio::test]
    async fn age_retention_empties_the_log_but_keeps_the_counter() {
        let log = log(100, Some(Duration::from_secs(60)));
        let now = crate::message::now_millis();
        append(&log, now - 120_000).await;
        append(&log, now).await;
        let read = log.read(0, 10).await.unwrap();
        assert_eq!(read.messages.len(), 1);
        assert_eq!(read.head.oldest_id(), Some(2));
        assert!(!log.release_if_idle(now));
        assert!(log.release_if_idle(now + 61_000));
        let head = log.head().await.unwrap();
        assert_eq!((head.last_id, head.oldest_id()), (2, None));
    }
}
