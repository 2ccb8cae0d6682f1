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

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use redis::{Client, Script, aio::ConnectionManager};
use tokio::sync::{mpsc, oneshot};

use super::{Live, LogHead, LogRead, Retention, Store, StoreError, TopicLog, record};
use crate::message::{EventName, Message, MessageId, Payload, TopicName, now_millis};

/// Appends, trims and publishes, atomically. KEYS: seq, log. ARGV: channel, record,
/// max messages, age cutoff in ms (0: none), age limit in ms (0: none).
const PUBLISH_SCRIPT: &str = r"
local id = redis.call('INCR', KEYS[1])
local member = id .. '\n' .. ARGV[2]
redis.call('ZADD', KEYS[2], id, member)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', id - tonumber(ARGV[3]))
local cutoff = tonumber(ARGV[4])
while cutoff > 0 do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  local time = oldest[1] and tonumber(string.match(oldest[1], '^%d+\n(%d+)\n'))
  if not time or time >= cutoff then break end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, 0)
end
if tonumber(ARGV[5]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
redis.call('PUBLISH', ARGV[1], member)
return id
";

/// Reads a topic's ends and the messages after a cursor, from one moment. KEYS: seq, log.
/// ARGV: after, limit, age cutoff in ms (0: none). Returns {last id, first retained, members}.
const READ_SCRIPT: &str = r"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local cutoff = tonumber(ARGV[3])
local first = last + 1
local rank = 0
while true do
  local oldest = redis.call('ZRANGE', KEYS[2], rank, rank, 'WITHSCORES')
  if not oldest[1] then break end
  local time = tonumber(string.match(oldest[1], '^%d+\n(%d+)\n'))
  if cutoff > 0 and time and time < cutoff then
    rank = rank + 1
  else
    first = tonumber(oldest[2])
    break
  end
end
local from = math.max(tonumber(ARGV[1]) + 1, first)
local members = {}
if tonumber(ARGV[2]) > 0 and from <= last then
  members = redis.call('ZRANGEBYSCORE', KEYS[2], from, '+inf', 'LIMIT', 0, ARGV[2])
end
return {last, first, members}
";

/// How long a Redis command may take before the publish or read fails with 503.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// First wait before the listener reconnects; doubled after each failure.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between two reconnection attempts of the listener.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Messages replayed per read when the listener catches up after a reconnection.
const REPLAY_BATCH: usize = 1000;

fn seq_key(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:seq")
}

fn log_key(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:log")
}

fn channel(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:live")
}

/// The topic of a channel name made by [`channel`].
fn topic_of_channel(channel: &str) -> Option<TopicName> {
    let inner = channel.strip_prefix("pushhub:{")?.strip_suffix("}:live")?;
    TopicName::parse(inner).ok()
}

/// Runs a pub/sub command with the command timeout: a Redis that accepts connections but
/// does not answer must not hang the listener (and every subscriber waiting on it).
async fn within<T>(
    command: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {COMMAND_TIMEOUT:?}")),
    }
}

fn unavailable(error: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {error}"))
}

/// Splits a sorted-set member `id\nrecord` into its message.
fn decode_member(topic: &TopicName, member: Bytes) -> Result<Message, StoreError> {
    let corrupt = || StoreError::Internal(format!("corrupt redis member in {topic}"));
    let split = member
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(corrupt)?;
    let id = std::str::from_utf8(&member[..split])
        .ok()
        .and_then(|id| id.parse().ok())
        .ok_or_else(corrupt)?;
    record::decode(id, topic, member.slice(split + 1..))
}

/// Messages of a followed topic kept per node, so that reads near the head (long polls
/// woken by a message, pollers keeping up) are answered without a Redis round trip.
const TAIL_CAPACITY: usize = 1024;

/// The newest messages of a followed topic as this node's subscription received them, with
/// contiguous ids. Emptied whenever the subscription is lost, so it never answers for a span
/// it may have missed; a read it cannot answer exactly goes to Redis.
#[derive(Default)]
struct Tail {
    messages: VecDeque<Arc<Message>>,
    capacity: usize,
}

impl Tail {
    fn push(&mut self, message: &Arc<Message>) {
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
    fn read(&mut self, after: MessageId, limit: usize, cutoff: u64) -> Option<LogRead> {
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

type SharedTail = Arc<std::sync::Mutex<Tail>>;

fn lock(tail: &SharedTail) -> std::sync::MutexGuard<'_, Tail> {
    // Every critical section is a few pointer moves; a panic cannot leave it inconsistent.
    tail.lock().unwrap_or_else(|e| e.into_inner())
}

/// Topics in Redis, shared by every node pointed at the same server.
pub struct RedisStore {
    shared: Arc<Shared>,
}

struct Shared {
    commands: ConnectionManager,
    publish: Script,
    read: Script,
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

/// A subscription to a topic's channel, done (or failed) in its own task.
struct Confirmed {
    topic: TopicName,
    outcome: Result<(), String>,
    /// The topic's newest id once subscribed: where a replay after reconnecting starts.
    head: MessageId,
    subscribed: oneshot::Sender<()>,
}

/// A change to what the listener follows.
enum Follow {
    /// Deliver the topic's messages into `live`; answer once Redis confirms the subscription
    /// (or at once, when Redis is down: the resubscription after reconnecting replays).
    Start {
        topic: TopicName,
        live: Arc<dyn Live>,
        tail: SharedTail,
        subscribed: oneshot::Sender<()>,
    },
    /// The topic is no longer active on this node.
    Stop(TopicName),
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
            retention,
            listener,
        });
        tokio::spawn(
            Listener {
                client,
                shared: Arc::downgrade(&shared),
                topics: HashMap::new(),
            }
            .run(follows),
        );
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
            .arg(channel(&self.topic))
            .arg(record)
            .arg(retention.max_messages.max(1))
            .arg(self.shared.cutoff())
            .arg(age_ms);
        let id: u64 = invocation
            .invoke_async(&mut commands)
            .await
            .map_err(unavailable)?;
        Ok(Arc::new(Message::new(
            id,
            self.topic.clone(),
            event,
            time,
            data,
        )))
    }

    async fn read(&self, after: MessageId, limit: usize) -> Result<LogRead, StoreError> {
        if let Some(read) = self.read_now(after, limit) {
            return read;
        }
        self.shared.read(&self.topic, after, limit).await
    }

    fn read_now(&self, after: MessageId, limit: usize) -> Option<Result<LogRead, StoreError>> {
        lock(&self.tail)
            .read(after, limit, self.shared.cutoff())
            .map(Ok)
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

/// One followed topic in the listener.
struct Followed {
    live: Arc<dyn Live>,
    tail: SharedTail,
    /// The newest id delivered, where a replay after reconnecting starts.
    last_seen: MessageId,
}

impl Followed {
    fn deliver(&mut self, message: Arc<Message>) {
        self.last_seen = self.last_seen.max(message.id);
        lock(&self.tail).push(&message);
        self.live.deliver(&message);
    }
}

/// The node's one pub/sub connection, and the topics it follows.
struct Listener {
    client: Client,
    /// Weak, so that the listener ends when the store is dropped.
    shared: std::sync::Weak<Shared>,
    topics: HashMap<TopicName, Followed>,
}

impl Listener {
    async fn run(mut self, mut follows: mpsc::UnboundedReceiver<Follow>) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let error = match self.session(&mut follows, &mut backoff).await {
                Ok(()) => return,
                Err(error) => error,
            };
            // What arrives while unsubscribed is not in the tails: reads go to Redis until the
            // replay after reconnecting has filled them again.
            for followed in self.topics.values() {
                lock(&followed.tail).messages.clear();
            }
            if backoff == MIN_BACKOFF {
                tracing::warn!(%error, "redis: listener disconnected; reconnecting");
            }
            // Keep taking follow changes while Redis is away; the resubscription after
            // reconnecting covers them.
            let pause = tokio::time::sleep(backoff);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    () = &mut pause => break,
                    change = follows.recv() => match change {
                        Some(change) => self.record(change),
                        None => return,
                    },
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection: subscribe to every followed topic, replay what they missed, then
    /// deliver until the connection fails (`Err`) or the store is dropped (`Ok`).
    async fn session(
        &mut self,
        follows: &mut mpsc::UnboundedReceiver<Follow>,
        backoff: &mut Duration,
    ) -> Result<(), String> {
        let (mut sink, mut stream) = within(self.client.get_async_pubsub()).await?.split();
        let channels: Vec<String> = self.topics.keys().map(channel).collect();
        if !channels.is_empty() {
            within(sink.subscribe(&channels)).await?;
        }
        self.replay_all().await.map_err(|e| e.to_string())?;
        if *backoff != MIN_BACKOFF || !channels.is_empty() {
            tracing::info!(topics = channels.len(), "redis: listener subscribed");
        }
        *backoff = MIN_BACKOFF;
        // Subscribing to a new topic (a round trip, then a read of its head) runs in a task of
        // its own: meanwhile this loop keeps delivering every other topic's messages.
        let (confirmed_tx, mut confirmed) = mpsc::unbounded_channel::<Confirmed>();
        loop {
            tokio::select! {
                change = follows.recv() => {
                    let Some(change) = change else { return Ok(()) };
                    self.start_or_stop(change, &sink, &confirmed_tx);
                }
                done = confirmed.recv() => {
                    // The sender lives in this frame: never `None` here.
                    let Some(done) = done else { continue };
                    self.confirm(done, &sink)?;
                }
                message = stream.next() => {
                    let Some(message) = message else {
                        return Err("connection closed".into());
                    };
                    self.deliver(message.get_channel_name(), message.get_payload_bytes());
                }
            }
        }
    }

    /// A follow change while connected: a new topic is followed at once (what arrives for it
    /// is delivered) and subscribed in a task; a stopped one is unsubscribed in a task.
    fn start_or_stop(
        &mut self,
        change: Follow,
        sink: &redis::aio::PubSubSink,
        confirmed: &mpsc::UnboundedSender<Confirmed>,
    ) {
        let (topic, live, tail, subscribed) = match change {
            Follow::Start {
                topic,
                live,
                tail,
                subscribed,
            } => (topic, live, tail, subscribed),
            Follow::Stop(topic) => {
                if self.topics.remove(&topic).is_some() {
                    let mut sink = sink.clone();
                    tokio::spawn(async move {
                        let _ = within(sink.unsubscribe(channel(&topic))).await;
                    });
                }
                return;
            }
        };
        self.topics.insert(
            topic.clone(),
            Followed {
                live,
                tail,
                last_seen: 0,
            },
        );
        let (mut sink, shared, confirmed) = (sink.clone(), self.shared.clone(), confirmed.clone());
        tokio::spawn(async move {
            let outcome = within(sink.subscribe(channel(&topic))).await;
            // Where replays start; the subscriber reads its own history after this.
            let head = match shared.upgrade() {
                Some(shared) => shared.read(&topic, MessageId::MAX, 0).await.ok(),
                None => None,
            };
            let _ = confirmed.send(Confirmed {
                topic,
                outcome,
                head: head.map_or(0, |read| read.head.last_id),
                subscribed,
            });
        });
    }

    /// A subscription confirmed (or failed): the subscriber may read its history now.
    fn confirm(&mut self, done: Confirmed, sink: &redis::aio::PubSubSink) -> Result<(), String> {
        let Confirmed {
            topic,
            outcome,
            head,
            subscribed,
        } = done;
        match self.topics.get_mut(&topic) {
            Some(followed) => followed.last_seen = followed.last_seen.max(head),
            None => {
                // Stopped while subscribing: drop the subscription it was given.
                let mut sink = sink.clone();
                tokio::spawn(async move {
                    let _ = within(sink.unsubscribe(channel(&topic))).await;
                });
            }
        }
        let _ = subscribed.send(());
        // A failed subscribe ends the session: reconnecting subscribes to every topic again.
        outcome
    }

    /// A follow change while disconnected: only recorded (and a new follower answered at
    /// once); the resubscription after reconnecting, and its replay, cover it.
    fn record(&mut self, change: Follow) {
        match change {
            Follow::Start {
                topic,
                live,
                tail,
                subscribed,
            } => {
                self.topics.insert(
                    topic,
                    Followed {
                        live,
                        tail,
                        last_seen: 0,
                    },
                );
                let _ = subscribed.send(());
            }
            Follow::Stop(topic) => {
                self.topics.remove(&topic);
            }
        }
    }

    fn deliver(&mut self, channel: &str, payload: &[u8]) {
        let Some(topic) = topic_of_channel(channel) else {
            return;
        };
        let Some(followed) = self.topics.get_mut(&topic) else {
            return;
        };
        match decode_member(&topic, Bytes::copy_from_slice(payload)) {
            Ok(message) => followed.deliver(Arc::new(message)),
            Err(error) => tracing::warn!(%error, "redis: undecodable message"),
        }
    }

    /// After (re)subscribing: delivers what every followed topic got while the listener was
    /// not subscribed. Subscribers skip ids they already have.
    async fn replay_all(&mut self) -> Result<(), StoreError> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        for (topic, followed) in &mut self.topics {
            loop {
                let read = shared.read(topic, followed.last_seen, REPLAY_BATCH).await?;
                let Some(newest) = read.messages.last().map(|m| m.id) else {
                    followed.last_seen = followed.last_seen.max(read.head.last_id);
                    break;
                };
                for message in read.messages {
                    followed.deliver(message);
                }
                followed.last_seen = newest;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
