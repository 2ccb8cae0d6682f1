//! The node's one pub/sub connection ([`Listener`]): it subscribes to the channel of each
//! topic that has live subscribers on this node (in tasks of their own, so that one slow
//! subscribe never pauses delivery for the others), hands every message to the topic's
//! [`Live`] sink and tail, and after losing Redis reconnects with backoff, subscribes again
//! and replays what was published meanwhile.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use redis::Client;
use tokio::sync::{mpsc, oneshot};

use super::super::{Live, StoreError};
use super::{
    COMMAND_TIMEOUT, Shared,
    keys::{STATE_NOTICE, channel, decode_member, topic_of_channel},
    tail::{SharedTail, lock},
};
use crate::message::{Message, MessageId, TopicName};

/// First wait before the listener reconnects; doubled after each failure.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between two reconnection attempts of the listener.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Messages replayed per read when the listener catches up after a reconnection.
const REPLAY_BATCH: usize = 1000;

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

/// A subscription to a topic's channel, done (or failed) in its own task.
struct Confirmed {
    topic: TopicName,
    outcome: Result<(), String>,
    /// The topic's newest id once subscribed: where a replay after reconnecting starts.
    head: MessageId,
    subscribed: oneshot::Sender<()>,
}

/// A change to what the listener follows.
pub(super) enum Follow {
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
pub(super) struct Listener {
    client: Client,
    /// Weak, so that the listener ends when the store is dropped.
    shared: std::sync::Weak<Shared>,
    topics: HashMap<TopicName, Followed>,
}

impl Listener {
    /// Starts the listener of a store; it ends when the store is dropped.
    pub(super) fn spawn(
        client: Client,
        shared: std::sync::Weak<Shared>,
        follows: mpsc::UnboundedReceiver<Follow>,
    ) {
        let listener = Listener {
            client,
            shared,
            topics: HashMap::new(),
        };
        tokio::spawn(listener.run(follows));
    }

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
        if payload == STATE_NOTICE {
            followed.live.state_changed();
            return;
        }
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
