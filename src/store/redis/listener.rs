//! The node's subscriber ([`Listener`]): it subscribes to the channel of each topic that has
//! live subscribers on this node (sharded in a cluster, so a message travels only in its
//! shard), hands every message to the topic's [`Live`] sink and tail, and repairs what a
//! lost subscription missed from the topic's log.
//!
//! The connection library reconnects and subscribes again by itself, and follows a slot
//! to its new primary after a failover or a resharding. What it cannot know is what was
//! published meanwhile, so the listener reads its pushes: a disconnection marks every topic
//! lost (and empties the tails), and a topic's next subscription confirmation replays its
//! log from the last id delivered before the topic counts as live again. A lost topic is
//! also read and subscribed again every [`REPAIR_EVERY`], so its subscribers keep receiving
//! (at that pace) while its shard's subscription is down, and a message whose live copy
//! never came is delivered from the log when a later id shows the gap.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::super::{Created, Live, RemotePresence, StoreError};
use super::{
    COMMAND_TIMEOUT, Shared,
    connection::Connection,
    keys::{CREATED_CHANNEL, STATE_NOTICE, channel, decode_member, topic_of_channel},
    tail::{SharedTail, lock},
};
use crate::message::{Message, MessageId, TopicName};

/// How often lost topics are read from their logs and subscribed again.
pub(super) const REPAIR_EVERY: Duration = Duration::from_millis(500);
/// How long after a disconnection the listener checks that live topics really receive.
const PROBATION: Duration = Duration::from_secs(30);
/// Messages read per round when the listener catches a topic up from its log.
const REPLAY_BATCH: usize = 1000;

/// Runs a subscription command with the command timeout: a Redis that accepts connections
/// but does not answer must not hang a subscriber waiting on it.
async fn within<T>(
    command: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {COMMAND_TIMEOUT:?}")),
    }
}

/// A first subscription to a topic's channel, done (or failed) in its own task.
struct Confirmed {
    topic: TopicName,
    outcome: Result<(), String>,
    /// The topic's newest id once subscribed: where a replay after a loss starts.
    head: MessageId,
    subscribed: oneshot::Sender<()>,
}

/// Where the listener sends what is not a topic's message.
pub(super) struct Feeds {
    /// Names of topics created on any node.
    pub(super) created: broadcast::Sender<Created>,
    /// Presence envelopes from other nodes.
    pub(super) presence: broadcast::Sender<RemotePresence>,
}

/// A change to what the listener follows.
pub(super) enum Follow {
    /// Deliver the topic's messages into `live`; answer once Redis confirms the subscription
    /// (or at once, when Redis is down: the repair after it returns replays).
    Start {
        topic: TopicName,
        live: Arc<dyn Live>,
        tail: SharedTail,
        subscribed: oneshot::Sender<()>,
    },
    /// The topic is no longer active on this node.
    Stop(TopicName),
}

/// Where a followed topic's subscription stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    /// Its first subscription is in flight.
    Subscribing,
    /// Subscribed, and everything before the subscription was delivered.
    Live,
    /// The subscription was (or may have been) lost: messages may be missing until a
    /// confirmation and a replay.
    Lost,
}

/// One followed topic in the listener.
struct Followed {
    live: Arc<dyn Live>,
    tail: SharedTail,
    /// The newest id delivered, where a replay starts.
    last_seen: MessageId,
    standing: Standing,
    /// During probation: the log's head at the last check, when it was ahead of what was
    /// delivered. Still ahead at the next check means the subscription is silent.
    behind: Option<MessageId>,
}

impl Followed {
    fn new(live: Arc<dyn Live>, tail: SharedTail) -> Self {
        Self {
            live,
            tail,
            last_seen: 0,
            standing: Standing::Subscribing,
            behind: None,
        }
    }

    /// Hands on a message not delivered yet; an id already delivered is dropped here, once
    /// for every subscriber of the node.
    fn deliver(&mut self, message: Arc<Message>) {
        if message.id <= self.last_seen {
            return;
        }
        self.last_seen = message.id;
        lock(&self.tail).push(&message);
        self.live.deliver(&message);
    }
}

/// The node's subscriber connection, and the topics it follows.
pub(super) struct Listener {
    subscriber: Connection,
    /// Weak, so that the listener ends when the store is dropped.
    shared: std::sync::Weak<Shared>,
    topics: HashMap<TopicName, Followed>,
    created: broadcast::Sender<Created>,
    /// A connection dropped since the announcements' channel was last confirmed subscribed:
    /// topics created meanwhile were announced to nobody here.
    announcements_lost: bool,
    /// Where presence envelopes from other nodes go.
    presence: broadcast::Sender<RemotePresence>,
    /// Until when live topics are checked against their logs (after a disconnection).
    probation: Option<tokio::time::Instant>,
}

impl Listener {
    /// Starts the listener of a store; it ends when the store is dropped.
    pub(super) fn spawn(
        subscriber: Connection,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        shared: std::sync::Weak<Shared>,
        follows: mpsc::UnboundedReceiver<Follow>,
        feeds: Feeds,
    ) {
        let listener = Listener {
            subscriber,
            shared,
            topics: HashMap::new(),
            created: feeds.created,
            announcements_lost: false,
            presence: feeds.presence,
            probation: None,
        };
        tokio::spawn(listener.run(follows, pushes));
    }

    async fn run(
        mut self,
        mut follows: mpsc::UnboundedReceiver<Follow>,
        mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    ) {
        // The classic channel of topic announcements; the library keeps it subscribed.
        let mut subscriber = self.subscriber.clone();
        tokio::spawn(async move {
            while let Err(error) = within(subscriber.subscribe(CREATED_CHANNEL)).await {
                tracing::debug!(%error, "redis: announcements not subscribed yet");
                tokio::time::sleep(REPAIR_EVERY).await;
            }
        });
        let (confirmed_tx, mut confirmed) = mpsc::unbounded_channel::<Confirmed>();
        let mut repair = tokio::time::interval(REPAIR_EVERY);
        repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                change = follows.recv() => {
                    let Some(change) = change else { return };
                    self.start_or_stop(change, &confirmed_tx);
                }
                done = confirmed.recv() => {
                    // The sender lives in this frame: never `None` here.
                    let Some(done) = done else { continue };
                    self.confirm(done);
                }
                push = pushes.recv() => {
                    let Some(push) = push else { return };
                    self.on_push(push).await;
                }
                _ = repair.tick() => self.repair().await,
            }
        }
    }

    /// A new topic is followed at once (what arrives for it is delivered) and subscribed in
    /// a task, so one slow subscribe never pauses delivery for the others; a stopped one is
    /// unsubscribed in a task.
    fn start_or_stop(&mut self, change: Follow, confirmed: &mpsc::UnboundedSender<Confirmed>) {
        let (topic, live, tail, subscribed) = match change {
            Follow::Start {
                topic,
                live,
                tail,
                subscribed,
            } => (topic, live, tail, subscribed),
            Follow::Stop(topic) => {
                if self.topics.remove(&topic).is_some() {
                    let mut subscriber = self.subscriber.clone();
                    tokio::spawn(async move {
                        let _ = within(subscriber.unfollow(&channel(&topic))).await;
                    });
                }
                return;
            }
        };
        self.topics.insert(topic.clone(), Followed::new(live, tail));
        let (mut subscriber, shared, confirmed) = (
            self.subscriber.clone(),
            self.shared.clone(),
            confirmed.clone(),
        );
        tokio::spawn(async move {
            let outcome = within(subscriber.follow(&channel(&topic))).await;
            // Where replays start; the subscriber reads its own history after this.
            let head = match (&outcome, shared.upgrade()) {
                (Ok(()), Some(shared)) => shared.read_log(&topic, MessageId::MAX, 0).await.ok(),
                _ => None,
            };
            let _ = confirmed.send(Confirmed {
                outcome: outcome.and_then(|()| {
                    head.as_ref()
                        .map(drop)
                        .ok_or_else(|| "head not read".to_owned())
                }),
                topic,
                head: head.map_or(0, |read| read.head.last_id),
                subscribed,
            });
        });
    }

    /// A first subscription confirmed (or failed): the subscriber may read its history now.
    /// A failed one leaves the topic lost, for the repair to subscribe and replay.
    fn confirm(&mut self, done: Confirmed) {
        let Confirmed {
            topic,
            outcome,
            head,
            subscribed,
        } = done;
        match self.topics.get_mut(&topic) {
            Some(followed) if followed.standing == Standing::Subscribing => {
                followed.last_seen = followed.last_seen.max(head);
                followed.standing = if outcome.is_ok() {
                    Standing::Live
                } else {
                    Standing::Lost
                };
            }
            Some(_) => {}
            None => {
                // Stopped while subscribing: drop the subscription it was given.
                let mut subscriber = self.subscriber.clone();
                tokio::spawn(async move {
                    let _ = within(subscriber.unfollow(&channel(&topic))).await;
                });
            }
        }
        let _ = subscribed.send(());
    }

    async fn on_push(&mut self, push: PushInfo) {
        if !matches!(push.kind, PushKind::Message | PushKind::SMessage) {
            tracing::debug!(kind = ?push.kind, data = ?push.data, "redis: push");
        }
        let channel_of = |data: &[Value]| match data.first() {
            Some(Value::BulkString(name)) => String::from_utf8(name.clone()).ok(),
            _ => None,
        };
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let (Some(name), Some(Value::BulkString(payload))) =
                    (channel_of(&push.data), push.data.get(1))
                else {
                    return;
                };
                if name == CREATED_CHANNEL {
                    if let Ok(topic) = TopicName::parse(&String::from_utf8_lossy(payload)) {
                        let _ = self.created.send(Created::Topic(topic));
                    }
                    return;
                }
                self.deliver(&name, payload).await;
            }
            PushKind::Subscribe | PushKind::SSubscribe => {
                let name = channel_of(&push.data);
                if name.as_deref() == Some(CREATED_CHANNEL) && self.announcements_lost {
                    // Subscribed again: what is created from here on is announced; what was
                    // created while it was down is listed by whoever follows patterns.
                    self.announcements_lost = false;
                    let _ = self.created.send(Created::Missed);
                }
                let topic = name.and_then(|name| topic_of_channel(&name));
                if let Some(topic) = topic
                    && self
                        .topics
                        .get(&topic)
                        .is_some_and(|f| f.standing == Standing::Lost)
                {
                    // Subscribed again (reconnected, or moved to the slot's new primary):
                    // what was published meanwhile is in the log.
                    if self.replay(&topic).await.is_ok()
                        && let Some(followed) = self.topics.get_mut(&topic)
                    {
                        followed.standing = Standing::Live;
                    }
                }
            }
            PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                // Not asked for while still followed: the server dropped it (its slot moved).
                let topic = channel_of(&push.data).and_then(|name| topic_of_channel(&name));
                if let Some(followed) = topic.and_then(|topic| self.topics.get_mut(&topic)) {
                    followed.standing = Standing::Lost;
                    self.probation = Some(tokio::time::Instant::now() + PROBATION);
                }
            }
            PushKind::Disconnection => self.lost_all(),
            _ => {}
        }
    }

    /// A connection was lost: every topic may be missing messages from now on. (A cluster's
    /// pushes do not say which node's; marking all costs one read per topic.)
    fn lost_all(&mut self) {
        self.probation = Some(tokio::time::Instant::now() + PROBATION);
        self.announcements_lost = true;
        for followed in self.topics.values_mut() {
            // What arrives while unsubscribed is not in the tails: reads go to Redis until a
            // replay has filled them again.
            lock(&followed.tail).messages.clear();
            if followed.standing == Standing::Live {
                followed.standing = Standing::Lost;
            }
        }
        tracing::warn!("redis: subscriber disconnected; resubscribing and replaying");
    }

    async fn deliver(&mut self, channel: &str, payload: &[u8]) {
        let Some(topic) = topic_of_channel(channel) else {
            return;
        };
        let Some(followed) = self.topics.get_mut(&topic) else {
            return;
        };
        if payload == STATE_NOTICE {
            followed.live.state_changed();
            return;
        }
        if let Some(remote) = super::presence::parse_payload(&topic, payload) {
            let _ = self.presence.send(remote);
            return;
        }
        let message = match decode_member(&topic, Bytes::copy_from_slice(payload)) {
            Ok(message) => Arc::new(message),
            Err(error) => {
                tracing::warn!(%error, "redis: undecodable message");
                return;
            }
        };
        // A gap (a live copy that never came, or publishes confirmed out of order across
        // nodes): what is between is in the log, and every id below a confirmed one is
        // confirmed too.
        if followed.last_seen > 0 && message.id > followed.last_seen + 1 {
            let _ = self.replay_until(&topic, message.id - 1).await;
        }
        if let Some(followed) = self.topics.get_mut(&topic) {
            followed.deliver(message);
        }
    }

    /// Reads every lost topic from its log and subscribes it again. Stops at the first
    /// failure: Redis is away, and the next round tries again.
    async fn repair(&mut self) {
        if self
            .probation
            .is_some_and(|until| tokio::time::Instant::now() < until)
            && self.find_silent().await.is_err()
        {
            return;
        }
        for topic in self.standing(Standing::Lost) {
            if self.replay(&topic).await.is_err() {
                return;
            }
            let mut subscriber = self.subscriber.clone();
            // Its confirmation (a push) marks the topic live, after one more replay.
            tokio::spawn(async move {
                let channel = channel(&topic);
                subscriber.refresh_route(&channel).await;
                let _ = within(subscriber.follow(&channel)).await;
            });
        }
    }

    /// The followed topics that stand so.
    fn standing(&self, standing: Standing) -> Vec<TopicName> {
        self.topics
            .iter()
            .filter(|(_, f)| f.standing == standing)
            .map(|(topic, _)| topic.clone())
            .collect()
    }

    /// After a disconnection, a subscription may be confirmed by a node that then never
    /// delivers (a killed primary restarted as a replica accepts it before it learns it
    /// was replaced): a live topic whose log stays ahead of what was delivered for one
    /// whole round is silent, and counts as lost.
    async fn find_silent(&mut self) -> Result<(), StoreError> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        for topic in self.standing(Standing::Live) {
            let head = shared
                .read_log(&topic, MessageId::MAX, 0)
                .await?
                .head
                .last_id;
            let Some(followed) = self.topics.get_mut(&topic) else {
                continue;
            };
            match followed.behind {
                Some(then) if followed.last_seen < then => {
                    tracing::warn!(%topic, "redis: subscription silent; subscribing again");
                    followed.standing = Standing::Lost;
                    followed.behind = None;
                }
                _ => followed.behind = (head > followed.last_seen).then_some(head),
            }
        }
        Ok(())
    }

    /// Delivers what the topic's log holds after the last id delivered.
    async fn replay(&mut self, topic: &TopicName) -> Result<(), StoreError> {
        self.replay_until(topic, MessageId::MAX).await
    }

    /// Delivers what the topic's log holds after the last id delivered, up to `until`.
    async fn replay_until(
        &mut self,
        topic: &TopicName,
        until: MessageId,
    ) -> Result<(), StoreError> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        loop {
            let Some(after) = self.topics.get(topic).map(|f| f.last_seen) else {
                return Ok(());
            };
            let read = shared.read_log(topic, after, REPLAY_BATCH).await?;
            let Some(followed) = self.topics.get_mut(topic) else {
                return Ok(());
            };
            if read.head.last_id < after {
                // The log is behind what was delivered: a failover took back writes no
                // replica had (possible only without --redis-min-replicas). Start again from
                // the log's head, or every new message would look like a duplicate.
                tracing::warn!(
                    %topic, delivered = after, head = read.head.last_id,
                    "redis: the topic's log lost messages in a failover"
                );
                followed.last_seen = read.head.last_id;
                return Ok(());
            }
            let more = read.messages.len() == REPLAY_BATCH;
            tracing::debug!(
                %topic, after, head = read.head.last_id, read = read.messages.len(),
                "redis: replayed from the log"
            );
            for message in read.messages {
                if message.id > until {
                    return Ok(());
                }
                followed.deliver(message);
            }
            if !more {
                return Ok(());
            }
        }
    }
}
