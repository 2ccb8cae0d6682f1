//! The hub: topics, publishing, and reading or following a topic from a cursor.
//!
//! The hub knows nothing of HTTP. Transports call [`Hub::publish`], [`Hub::poll`],
//! [`Hub::wait`] (long polling) and [`Hub::subscribe`] (streams), and turn what they get
//! into their wire format; the cursor rules live here once, for all of them.

mod cursor;
mod presence;
mod stats;
mod subscription;

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use cursor::{Batch, Signal};
pub use presence::{Subscribers, Transport};
pub use stats::{HubStats, TransportCounts};
pub use subscription::{Delivery, Subscription};

use crate::{
    config::Config,
    error::Error,
    message::{EventName, Message, MessageId, Payload, TopicName, now_millis},
    store::{Store, TopicLog},
};
use presence::Presence;
use stats::Counters;

/// Registry shards: publishes and subscribes on different topics rarely contend.
const SHARDS: usize = 64;

/// One slice of the topic registry.
type Shard = Mutex<HashMap<TopicName, Arc<Topic>>>;

/// The hub's tunables, taken from [`Config`].
#[derive(Clone, Debug)]
pub struct HubSettings {
    /// Capacity of each topic's live channel: how far a subscriber may lag before it reads
    /// from history instead.
    pub subscriber_queue: usize,
    /// Messages read from history per catch-up step.
    pub catch_up_batch: usize,
    /// How long a poller counts as subscribed after its last request.
    pub poller_window: Duration,
    /// End a subscription that falls `subscriber_queue` behind instead of resyncing it.
    pub disconnect_slow: bool,
}

impl From<&Config> for HubSettings {
    fn from(config: &Config) -> Self {
        Self {
            subscriber_queue: usize::try_from(config.subscriber_queue).unwrap_or(usize::MAX),
            catch_up_batch: usize::try_from(config.catch_up_batch).unwrap_or(usize::MAX),
            poller_window: config.poller_window,
            disconnect_slow: config.slow_consumer == crate::config::SlowConsumerPolicy::Disconnect,
        }
    }
}

/// A snapshot of one topic, for `GET /topics/{topic}`.
#[derive(Debug, Serialize)]
pub struct TopicInfo {
    /// The topic's name.
    pub topic: TopicName,
    /// Newest id (0 when nothing was published).
    pub last_id: MessageId,
    /// Oldest retained id, or `null` when nothing is retained.
    pub oldest_id: Option<MessageId>,
    /// Subscribers per transport.
    pub subscribers: Subscribers,
}

/// Publishes messages and feeds subscribers. Cheap to share behind an `Arc`.
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    store: Arc<dyn Store>,
    settings: HubSettings,
    counters: Counters,
}

/// One active topic: its log and its live subscribers.
pub(crate) struct Topic {
    name: TopicName,
    log: Arc<dyn TopicLog>,
    /// Live fan-out, created with the first subscriber so that publish-only topics cost no
    /// ring. A broadcast channel is a bounded ring shared by all receivers: a publisher never
    /// waits, and a receiver that falls a full ring behind gets `Lagged` and catches up from
    /// the log.
    live: tokio::sync::OnceCell<broadcast::Sender<Arc<Message>>>,
    presence: Presence,
}

impl Topic {
    /// A receiver of the topic's live messages. The first one also asks the log to follow
    /// the topic (a shared log delivers every node's messages into the channel).
    async fn receiver(&self, capacity: usize) -> broadcast::Receiver<Arc<Message>> {
        self.live
            .get_or_init(|| async {
                let live = broadcast::channel(capacity).0;
                self.log.follow(&live).await;
                live
            })
            .await
            .subscribe()
    }

    /// Hands a message this process appended to its live subscribers, unless the log
    /// delivers it itself.
    fn fan_out(&self, message: &Arc<Message>) {
        if self.log.fans_out_itself() {
            return;
        }
        if let Some(live) = self.live.get() {
            // An error only means nobody listens right now.
            let _ = live.send(message.clone());
        }
    }

    /// Reads the messages after `after`, applying the cursor rules (reset, truncation);
    /// `from_client` says `after` is what a client sent, where 0 means "the oldest retained".
    async fn read_batch(
        &self,
        after: MessageId,
        limit: usize,
        from_client: bool,
    ) -> Result<Batch, Error> {
        let read = self.log.read(after, limit).await?;
        Ok(match cursor::resolve(after, read.head, from_client) {
            cursor::Resolution::Keep(signal) => cursor::batch(read, signal),
            cursor::Resolution::ReadFromStart(signal) => {
                cursor::batch(self.log.read(0, limit).await?, Some(signal))
            }
        })
    }
}

impl Hub {
    /// A hub over `store`.
    pub fn new(store: Arc<dyn Store>, settings: HubSettings) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            store,
            settings,
            counters: Counters::default(),
        })
    }

    fn shard(&self, name: &TopicName) -> std::sync::MutexGuard<'_, HashMap<TopicName, Arc<Topic>>> {
        let index = self.hasher.hash_one(name) as usize % SHARDS;
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The topic, created on first use. Holding the returned `Arc` keeps the sweeper from
    /// dropping it (see [`Hub::sweep`]).
    fn topic(&self, name: &TopicName) -> Arc<Topic> {
        let mut shard = self.shard(name);
        if let Some(topic) = shard.get(name) {
            return topic.clone();
        }
        let topic = Arc::new(Topic {
            name: name.clone(),
            log: self.store.open(name),
            live: tokio::sync::OnceCell::new(),
            presence: Presence::default(),
        });
        shard.insert(name.clone(), topic.clone());
        topic
    }

    /// Appends a message and hands it to every live subscriber. Returns once the store has
    /// accepted it.
    pub async fn publish(
        &self,
        topic: &TopicName,
        event: EventName,
        data: &Payload,
    ) -> Result<Arc<Message>, Error> {
        let topic = self.topic(topic);
        let message = topic.log.append(event, data, now_millis()).await?;
        topic.fan_out(&message);
        self.counters
            .publishes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(message)
    }

    /// A short poll: messages after `after` (none and just the newest id when `after` is
    /// `None`), answered at once.
    pub async fn poll(
        &self,
        topic: &TopicName,
        after: Option<MessageId>,
        limit: usize,
        client: &str,
    ) -> Result<Batch, Error> {
        let topic = self.topic(topic);
        topic
            .presence
            .touch(Transport::Poll, client, self.settings.poller_window);
        if topic.log.fans_out_itself() {
            // A shared log answers reads near the head from what its subscription received;
            // a polled topic is followed like a streamed one.
            drop(topic.receiver(self.settings.subscriber_queue).await);
        }
        match after {
            Some(after) => topic.read_batch(after, limit, true).await,
            None => Ok(Batch {
                last_id: topic.log.head().await?.last_id,
                ..Batch::default()
            }),
        }
    }

    /// A long poll: like [`Hub::poll`], but when nothing newer than the cursor exists, waits
    /// until a message arrives, `timeout` passes or `shutdown` fires, then answers. Without a
    /// cursor it waits for the next message. A parked call holds one broadcast receiver and
    /// a timer: no CPU while it waits.
    pub async fn wait(
        &self,
        topic: &TopicName,
        after: Option<MessageId>,
        limit: usize,
        timeout: Duration,
        client: &str,
        shutdown: &CancellationToken,
    ) -> Result<Batch, Error> {
        let window = self.settings.poller_window;
        let topic = self.topic(topic);
        topic.presence.touch(Transport::Longpoll, client, window);
        // Subscribe before reading, so a message published between the read and the wait
        // is in the receiver: nothing falls between history and live.
        let mut live = topic.receiver(self.settings.subscriber_queue).await;
        let (after, from_client) = match after {
            Some(after) => (after, true),
            None => (topic.log.head().await?.last_id, false),
        };
        let batch = topic.read_batch(after, limit, from_client).await?;
        if !batch.is_empty() {
            return Ok(batch);
        }
        let parked = topic.presence.stream(Transport::Longpoll);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let woken = loop {
            tokio::select! {
                received = live.recv() => match received {
                    Ok(message) if message.id <= after => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break true,
                    Err(broadcast::error::RecvError::Closed) => break false,
                },
                () = &mut deadline => break false,
                () = shutdown.cancelled() => break false,
            }
        };
        drop(parked);
        topic.presence.touch(Transport::Longpoll, client, window);
        if woken {
            topic.read_batch(after, limit, from_client).await
        } else {
            Ok(batch)
        }
    }

    /// Follows a topic from `after` (from now when `None`): history first, then live, with
    /// no gap and no repeat. `transport` is what the subscriber is counted as.
    pub async fn subscribe(
        &self,
        topic: &TopicName,
        after: Option<MessageId>,
        transport: Transport,
    ) -> Result<Subscription, Error> {
        let topic = self.topic(topic);
        let live = topic.receiver(self.settings.subscriber_queue).await;
        let (cursor, from_client) = match after {
            Some(after) => (after, true),
            None => (topic.log.head().await?.last_id, false),
        };
        let gauge = topic.presence.stream(transport);
        Ok(Subscription::new(
            topic,
            live,
            cursor,
            from_client,
            self.settings.catch_up_batch,
            self.settings.disconnect_slow,
            gauge,
        ))
    }

    /// The topic's ends and subscriber counts.
    pub async fn info(&self, topic: &TopicName) -> Result<TopicInfo, Error> {
        let topic = self.topic(topic);
        let head = topic.log.head().await?;
        Ok(TopicInfo {
            topic: topic.name.clone(),
            last_id: head.last_id,
            oldest_id: head.oldest_id(),
            subscribers: topic.presence.counts(self.settings.poller_window),
        })
    }

    /// Counts `messages` delivered in `bytes` over `transport` (fed by the transports).
    pub fn record_delivery(&self, transport: Transport, messages: u64, bytes: u64) {
        self.counters.delivered(transport, messages, bytes);
    }

    /// Counts one poll request or one stream connection over `transport`.
    pub fn record_request(&self, transport: Transport) {
        self.counters.request(transport);
    }

    /// Counters and subscriber totals over every topic.
    pub fn stats(&self) -> HubStats {
        let window = self.settings.poller_window;
        let mut topics = 0;
        let mut subscribers = Subscribers::default();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            topics += shard.len();
            for topic in shard.values() {
                let counts = topic.presence.counts(window);
                subscribers.poll += counts.poll;
                subscribers.longpoll += counts.longpoll;
                subscribers.sse += counts.sse;
                subscribers.ws += counts.ws;
            }
        }
        self.counters.snapshot(topics, subscribers)
    }

    /// Number of topics active in this process.
    pub fn topic_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Drops every topic nobody uses and whose log has nothing left to give; returns how many
    /// were dropped.
    ///
    /// Every user of a topic holds a clone of its `Arc`, and clones are only made under the
    /// shard lock held here, so a strong count of 1 proves nobody is publishing, reading or
    /// subscribing, and nobody can start to until the lock is released.
    pub fn sweep(&self) -> usize {
        let now = now_millis();
        let window = self.settings.poller_window;
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, topic| {
                let idle = Arc::strong_count(topic) == 1
                    && topic.presence.is_idle(window)
                    && topic.log.release_if_idle(now);
                dropped += usize::from(idle);
                !idle
            });
        }
        dropped
    }

    /// Sweeps every `interval` until `shutdown` fires.
    pub async fn run_sweeper(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let dropped = self.sweep();
                    if dropped > 0 {
                        tracing::debug!(dropped, "dropped idle topics");
                    }
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, Retention};

    fn hub(history: usize, queue: usize) -> Arc<Hub> {
        let store = MemoryStore::new(Retention {
            max_messages: history,
            max_age: None,
        });
        Hub::new(
            Arc::new(store),
            HubSettings {
                subscriber_queue: queue,
                catch_up_batch: 3,
                poller_window: Duration::from_secs(30),
                disconnect_slow: false,
            },
        )
    }

    fn name() -> TopicName {
        TopicName::parse("t").unwrap()
    }

    async fn publish(hub: &Hub, count: usize) {
        for _ in 0..count {
            let data = Payload::from_text("x");
            hub.publish(&name(), EventName::default_event(), &data)
                .await
                .unwrap();
        }
    }

    async fn drain(subscription: &mut Subscription, count: usize) -> Vec<String> {
        let mut seen = Vec::new();
        while seen.len() < count {
            let next = tokio::time::timeout(Duration::from_secs(5), subscription.next())
                .await
                .expect("delivery")
                .unwrap()
                .unwrap();
            seen.push(match next {
                Delivery::Message(m) => m.id.to_string(),
                Delivery::Signal(s) => s.event_name().to_string(),
            });
        }
        seen
    }

    #[tokio::test]
    async fn out_of_order_fan_out_is_delivered_in_id_order() {
        let hub = hub(100, 16);
        let mut subscription = hub
            .subscribe(&name(), Some(0), Transport::Ws)
            .await
            .unwrap();
        let data = Payload::from_text("x");
        hub.publish(&name(), EventName::default_event(), &data)
            .await
            .unwrap();
        // The subscriber is now past its initial history read, on the live path.
        assert_eq!(drain(&mut subscription, 1).await, ["1"]);
        let topic = hub.topic(&name());
        let second = topic
            .log
            .append(EventName::default_event(), &data, 0)
            .await
            .unwrap();
        let third = topic
            .log
            .append(EventName::default_event(), &data, 0)
            .await
            .unwrap();
        // The later publisher fans out first: a gap the subscriber must fill from the log.
        topic.fan_out(&third);
        topic.fan_out(&second);
        assert_eq!(drain(&mut subscription, 2).await, ["2", "3"]);
        publish(&hub, 1).await;
        assert_eq!(drain(&mut subscription, 1).await, ["4"]);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_catches_up_from_history() {
        let hub = hub(100, 4);
        let mut subscription = hub.subscribe(&name(), None, Transport::Ws).await.unwrap();
        publish(&hub, 50).await;
        let expected: Vec<String> = (1..=50).map(|i: u64| i.to_string()).collect();
        assert_eq!(drain(&mut subscription, 50).await, expected);
    }

    #[tokio::test]
    async fn a_subscriber_behind_history_gets_truncated_once() {
        let hub = hub(5, 2);
        let mut subscription = hub.subscribe(&name(), None, Transport::Sse).await.unwrap();
        publish(&hub, 20).await;
        assert_eq!(
            drain(&mut subscription, 6).await,
            ["truncated", "16", "17", "18", "19", "20"]
        );
        publish(&hub, 1).await;
        assert_eq!(drain(&mut subscription, 1).await, ["21"]);
    }

    #[tokio::test]
    async fn sweep_keeps_topics_in_use() {
        let hub = hub(5, 2);
        let subscription = hub.subscribe(&name(), None, Transport::Ws).await.unwrap();
        assert_eq!(hub.sweep(), 0, "a subscribed topic is kept");
        drop(subscription);
        assert_eq!(hub.sweep(), 1);
        publish(&hub, 1).await;
        assert_eq!(hub.sweep(), 0, "a topic with retained history is kept");
    }
}
