//! The shared store: topics kept in Redis, so that any number of nodes serve the same topics.
//!
//! Per topic, Redis holds a counter (`pushhub:{topic}:seq`), the retained history as a sorted
//! set scored by id (`pushhub:{topic}:log`, members `id\nrecord`), and a channel
//! (`pushhub:{topic}:live`). A publish is one Lua script, run atomically by Redis: it
//! increments the counter, adds the message, trims the set by count and age, and publishes the
//! member on the channel. Ids are therefore assigned cluster-wide, and Redis publishes each
//! topic's messages in id order.
//!
//! Each node keeps one pub/sub connection ([`Listener`]) and subscribes to the channel of each
//! topic that has live subscribers in it, once, however many subscribers it has; every
//! message (its own publishes too) reaches local subscribers through that subscription, so
//! they all see one order. Redis traffic grows with nodes × active topics, not with
//! subscribers.
//!
//! When Redis is unreachable, publishes and reads fail with `503 store_unavailable`: a `201`
//! is only sent for a message Redis has stored. Subscribers stay connected. The listener
//! reconnects with backoff, subscribes again to every followed topic, and replays what was
//! published after the last message it saw, so subscribers resume by cursor with no loss.
//! The keys use a `{topic}` hash tag, so one topic's keys share a Redis Cluster slot.

mod keys;
mod listener;
mod tail;

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use redis::{Client, Script, aio::ConnectionManager};
use tokio::sync::{mpsc, oneshot};

use super::{
    Live, LogHead, LogRead, Retention, Store, StoreError, StreamState, StreamWrite, StreamWritten,
    TopicLog, record,
};
use crate::message::{EventName, Message, MessageId, Payload, TopicName, now_millis};
use keys::{
    PUBLISH_SCRIPT, READ_SCRIPT, STREAM_SCRIPT, channel, decode_member, log_key, seq_key,
    stream_key,
};
use listener::{Follow, Listener, MAX_BACKOFF};
use tail::{SharedTail, TAIL_CAPACITY, Tail, lock};

/// How long a Redis command may take before the publish or read fails with 503.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

fn unavailable(error: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {error}"))
}

/// Topics in Redis, shared by every node pointed at the same server.
pub struct RedisStore {
    shared: Arc<Shared>,
}

struct Shared {
    commands: ConnectionManager,
    publish: Script,
    read: Script,
    stream: Script,
    retention: Retention,
    listener: mpsc::UnboundedSender<Follow>,
}

impl Shared {
    fn cutoff(&self) -> u64 {
        self.retention.max_age.map_or(0, |age| {
            now_millis().saturating_sub(age.as_millis() as u64).max(1)
        })
    }

    async fn read(
        &self,
        topic: &TopicName,
        after: MessageId,
        limit: usize,
    ) -> Result<LogRead, StoreError> {
        let mut commands = self.commands.clone();
        let mut invocation = self.read.key(seq_key(topic));
        invocation
            .key(log_key(topic))
            .key(stream_key(topic))
            .arg(after.min(1 << 53))
            .arg(limit)
            .arg(self.cutoff());
        let (last_id, first_retained, members): (u64, u64, Vec<Vec<u8>>) = invocation
            .invoke_async(&mut commands)
            .await
            .map_err(unavailable)?;
        let messages = members
            .into_iter()
            .map(|member| decode_member(topic, Bytes::from(member)).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(LogRead {
            messages,
            head: LogHead {
                last_id,
                first_retained,
            },
        })
    }
}

impl RedisStore {
    /// Connects to `url` lazily (a node starts, and answers 503, while Redis is down) and
    /// starts the listener. Must be called inside a Tokio runtime.
    pub fn open(url: &str, retention: Retention) -> Result<Self, StoreError> {
        let client =
            Client::open(url).map_err(|e| StoreError::Internal(format!("--redis {url}: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(MAX_BACKOFF);
        let commands = client
            .get_connection_manager_lazy(config)
            .map_err(unavailable)?;
        let (listener, follows) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            commands,
            publish: Script::new(PUBLISH_SCRIPT),
            read: Script::new(READ_SCRIPT),
            stream: Script::new(STREAM_SCRIPT),
            retention,
            listener,
        });
        Listener::spawn(client, Arc::downgrade(&shared), follows);
        Ok(Self { shared })
    }
}

impl Store for RedisStore {
    fn open(&self, topic: &TopicName, live: Arc<dyn Live>) -> Arc<dyn TopicLog> {
        let capacity = self.shared.retention.max_messages.clamp(1, TAIL_CAPACITY);
        Arc::new(RedisLog {
            topic: topic.clone(),
            live,
            shared: self.shared.clone(),
            following: AtomicBool::new(false),
            streaming: AtomicBool::new(false),
            tail: Arc::new(std::sync::Mutex::new(Tail {
                messages: VecDeque::new(),
                capacity,
            })),
        })
    }
}

struct RedisLog {
    topic: TopicName,
    live: Arc<dyn Live>,
    shared: Arc<Shared>,
    following: AtomicBool,
    /// The topic was last seen to be a stream: its local tail applies no age cutoff.
    streaming: AtomicBool,
    tail: SharedTail,
}

impl Drop for RedisLog {
    fn drop(&mut self) {
        if self.following.load(Ordering::Relaxed) {
            let _ = self.shared.listener.send(Follow::Stop(self.topic.clone()));
        }
    }
}

#[async_trait]
impl TopicLog for RedisLog {
    async fn append(
        &self,
        event: EventName,
        data: &Payload,
        time: u64,
    ) -> Result<Arc<Message>, StoreError> {
        let record = record::encode(time, &event, data);
        let retention = &self.shared.retention;
        let age_ms = retention.max_age.map_or(0, |age| age.as_millis() as u64);
        let mut commands = self.shared.commands.clone();
        let mut invocation = self.shared.publish.key(seq_key(&self.topic));
        invocation
            .key(log_key(&self.topic))
            .key(stream_key(&self.topic))
            .arg(channel(&self.topic))
            .arg(record)
            .arg(retention.max_messages.max(1))
            .arg(self.shared.cutoff())
            .arg(age_ms);
        let id: i64 = invocation
            .invoke_async(&mut commands)
            .await
            .map_err(unavailable)?;
        let id = u64::try_from(id).map_err(|_| StoreError::Sealed)?;
        Ok(Arc::new(Message::new(
            id,
            self.topic.clone(),
            event,
            time,
            data,
        )))
    }

    async fn read(&self, after: MessageId, limit: usize) -> Result<LogRead, StoreError> {
        // From Redis itself: the local tail may not have received this node's own latest
        // appends yet; `read_now` answers from it where that is good enough.
        self.shared.read(&self.topic, after, limit).await
    }

    fn read_now(&self, after: MessageId, limit: usize) -> Option<Result<LogRead, StoreError>> {
        let cutoff = if self.streaming.load(Ordering::Relaxed) {
            0
        } else {
            self.shared.cutoff()
        };
        lock(&self.tail).read(after, limit, cutoff).map(Ok)
    }

    async fn stream(&self) -> Result<Option<StreamState>, StoreError> {
        let mut commands = self.shared.commands.clone();
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(stream_key(&self.topic))
            .query_async(&mut commands)
            .await
            .map_err(unavailable)?;
        let state = value.map(|value| StreamState {
            sealed: value.first() == Some(&b'1'),
            record: Bytes::copy_from_slice(value.get(1..).unwrap_or_default()),
        });
        self.streaming.store(state.is_some(), Ordering::Relaxed);
        Ok(state)
    }

    async fn write_stream(&self, write: StreamWrite) -> Result<StreamWritten, StoreError> {
        let mut commands = self.shared.commands.clone();
        let mut invocation = self.shared.stream.key(seq_key(&self.topic));
        let state = write.state.as_ref().map_or_else(Vec::new, |state| {
            let mut value = vec![if state.sealed { b'1' } else { b'0' }];
            value.extend_from_slice(&state.record);
            value
        });
        invocation
            .key(log_key(&self.topic))
            .key(stream_key(&self.topic))
            .arg(channel(&self.topic))
            .arg(if write.clear { "1" } else { "0" })
            .arg(state);
        for (event, data) in &write.messages {
            invocation.arg(record::encode(write.time, event, data));
        }
        let answer: Vec<u64> = invocation
            .invoke_async(&mut commands)
            .await
            .map_err(unavailable)?;
        self.streaming
            .store(write.state.is_some(), Ordering::Relaxed);
        let (head, ids) = match answer.as_slice() {
            [last_id, first_retained, ids @ ..] => (
                LogHead {
                    last_id: *last_id,
                    first_retained: *first_retained,
                },
                ids,
            ),
            _ => return Err(StoreError::Internal("redis: bad stream answer".into())),
        };
        let messages = ids
            .iter()
            .zip(write.messages)
            .map(|(&id, (event, data))| {
                Arc::new(Message::new(
                    id,
                    self.topic.clone(),
                    event,
                    write.time,
                    &data,
                ))
            })
            .collect();
        Ok(StreamWritten { messages, head })
    }

    fn release_if_idle(&self, _now_ms: u64) -> bool {
        // Everything lives in Redis; dropping the handle also ends the subscription.
        true
    }

    async fn follow(&self) {
        let (subscribed, confirmed) = oneshot::channel();
        self.following.store(true, Ordering::Relaxed);
        let start = Follow::Start {
            topic: self.topic.clone(),
            live: self.live.clone(),
            tail: self.tail.clone(),
            subscribed,
        };
        if self.shared.listener.send(start).is_ok() {
            let _ = confirmed.await;
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}
