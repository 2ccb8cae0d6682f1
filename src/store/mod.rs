//! Where messages live: the [`Store`] boundary, and the in-memory store.
//!
//! The hub asks a store for one [`TopicLog`] per active topic. A log assigns ids, keeps the
//! retained history, and hands every message it appends to the topic's [`Live`] sink (the
//! hub's fan-out); the hub keeps everything live (subscribers, fan-out) and never looks
//! inside a log. This split is what lets a durable log or a log shared by many nodes
//! (where ids are assigned by the shared system) replace the in-memory one without touching the
//! hub or any transport.
//!
//! Contract every log keeps:
//! - ids of one topic are assigned `last_id + 1`, so they are contiguous and strictly
//!   increasing; a subscriber that sees a gap knows it missed messages and reads them back;
//! - a message returned by [`TopicLog::append`] is readable by [`TopicLog::read`] until
//!   retention removes it;
//! - [`TopicLog::read`] returns the messages and the [`LogHead`] of one consistent moment;
//! - every message appended is handed to the topic's [`Live`] sink once, in id order, after
//!   it is readable (a local log: its own appends; a shared log: every node's, once the topic
//!   is followed).

mod disk;
mod memory;
mod record;
mod redis;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::broadcast;

use crate::message::{EventName, Message, MessageId, Payload, TopicName, presence::Member};

pub use disk::{DiskStore, FsyncPolicy};

/// What a shared store tells of topics created by other processes ([`Store::created_topics`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Created {
    /// A topic's first message was stored.
    Topic(TopicName),
    /// Announcements may have been lost (the store's subscription to them dropped and is
    /// back): whoever needs them lists what exists now.
    Missed,
}
pub use memory::MemoryStore;
pub use redis::{RedisMode, RedisOptions, RedisStore};

/// What a store failed with. How each is answered over HTTP is `error.rs`'s business.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing service cannot be reached; the request may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store failed in a way a retry will not fix.
    #[error("store failure: {0}")]
    Internal(String),
    /// The topic is a closed stream: it takes no more appends.
    #[error("the topic is a closed stream and takes no more messages")]
    Sealed,
    /// A [`StreamWrite`] expected a state version that another process has moved on from:
    /// nothing was written; read the state again and decide again.
    #[error("the stream changed since it was read")]
    Conflict,
}

/// A topic's stream state, kept beside its history for the layer that serves it as a
/// stream (Durable Streams): an opaque record the store never reads, and whether the log is
/// sealed. While a topic has one, its log retains everything (no count or age retention)
/// and a sealed log refuses every append, whoever publishes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamState {
    /// What the stream layer stored (its metadata, encoded as it likes).
    pub record: Bytes,
    /// No append is accepted any more.
    pub sealed: bool,
    /// How many writes the state has seen, as the store counts them: what a
    /// [`StreamExpect::Version`] names. Not part of what is stored; a store shared by several
    /// processes sets it when it reads (local stores, whose writers take turns, leave 0).
    pub version: u64,
}

/// One atomic change of a topic's stream state, in this order: drop the retained history
/// (`clear`), append `messages` (ids assigned in order), then set or remove the state. A
/// crash leaves all of it or none of it.
#[derive(Debug, Default)]
pub struct StreamWrite {
    /// Drops every retained message first (the stream was deleted or is recreated); ids
    /// still continue from the last one.
    pub clear: bool,
    /// Messages to append, each an event name and a payload.
    pub messages: Vec<(EventName, Payload)>,
    /// Their publish time (milliseconds since the epoch).
    pub time: u64,
    /// The new state; `None` removes it, returning the topic to ordinary retention.
    pub state: Option<StreamState>,
    /// What the state must still be for the write to apply, else it fails with
    /// [`StoreError::Conflict`]: a compare-and-set that makes a decision taken on one node
    /// atomic across every node sharing the store.
    pub expect: StreamExpect,
}

/// The condition of a [`StreamWrite`] on the state its writer read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamExpect {
    /// Write whatever the state is.
    #[default]
    Any,
    /// The topic has no stream state (a stream is being created where none is).
    Absent,
    /// The state is still at this [`StreamState::version`].
    Version(u64),
}

/// What a [`StreamWrite`] appended, and the log's ends after it.
#[derive(Debug, Default)]
pub struct StreamWritten {
    /// The appended messages, in id order.
    pub messages: Vec<Arc<Message>>,
    /// The log's ends after the write.
    pub head: LogHead,
}

/// How much history a topic keeps.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// At most this many messages per topic (at least 1).
    pub max_messages: usize,
    /// Messages older than this are dropped; `None` keeps them until the count limit.
    pub max_age: Option<Duration>,
}

/// The ends of a topic's log at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogHead {
    /// The id of the newest message ever appended (0 when none was).
    pub last_id: MessageId,
    /// The id of the oldest retained message; `last_id + 1` when nothing is retained.
    pub first_retained: MessageId,
}

impl LogHead {
    /// The oldest retained id, if any message is retained.
    pub fn oldest_id(&self) -> Option<MessageId> {
        (self.first_retained <= self.last_id).then_some(self.first_retained)
    }
}

/// The answer of a [`TopicLog::read`].
#[derive(Debug, Default)]
pub struct LogRead {
    /// Retained messages with an id above the requested one, oldest first.
    pub messages: Vec<Arc<Message>>,
    /// The log's ends when it was read.
    pub head: LogHead,
}

/// Where a log hands the messages of its topic, in id order: the hub's fan-out.
pub trait Live: Send + Sync + 'static {
    /// Takes one message. Must not block: it is called where the log orders its appends.
    fn deliver(&self, message: &Arc<Message>);

    /// The topic's stream state was closed or removed by another process sharing the store
    /// (a Durable Stream closed or deleted on another node). Only a shared store calls it,
    /// and only for topics it follows here. Must not block.
    fn state_changed(&self) {}
}

/// Opens topic logs. One store serves the whole hub.
pub trait Store: Send + Sync + 'static {
    /// The log of `topic`, created empty if the store has none, delivering into `live`.
    /// Cheap: called when a topic becomes active in this process.
    fn open(&self, topic: &TopicName, live: Arc<dyn Live>) -> Arc<dyn TopicLog>;

    /// The topics whose name starts with `prefix` that hold or held a message, at most
    /// `limit`, for a subscriber's pattern. `None`: the store keeps no directory apart from
    /// its open logs (memory), and the caller lists those.
    fn topics<'a>(
        &'a self,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<Vec<TopicName>>, StoreError>> {
        let _ = (prefix, limit);
        Box::pin(async { Ok(None) })
    }

    /// Names of topics as their first message is stored by another process sharing the
    /// store, and word when some may have been missed (`None`: nothing else shares it).
    fn created_topics(&self) -> Option<broadcast::Receiver<Created>> {
        None
    }

    /// The board on which the process with node key `node` shares presence with the other
    /// processes of the store (`None`: nothing else shares it, presence stays local).
    fn presence_board(&self, node: &str) -> Option<Arc<dyn PresenceBoard>> {
        let _ = node;
        None
    }
}

/// What one node tells the board of one topic's presence after a flush.
#[derive(Clone, Copy, Debug)]
pub struct PresenceChange<'a> {
    /// Members that joined here.
    pub joins: &'a [Member],
    /// Members that left here.
    pub leaves: &'a [Member],
    /// The `presence` envelope for the other nodes' watchers (`None`: tell nobody).
    pub envelope: Option<&'a [u8]>,
    /// No member of the topic is left on this node.
    pub emptied: bool,
}

/// A `presence` envelope another node sent about a topic.
#[derive(Clone, Debug)]
pub struct RemotePresence {
    /// The topic.
    pub topic: TopicName,
    /// The key of the node whose members it is about (a reaped node's, when a survivor
    /// tells of its members' leaving).
    pub origin: String,
    /// The envelope, as its watchers receive it.
    pub envelope: Bytes,
}

/// Presence shared by every node of a store: each node's members, which nodes are alive, and
/// the envelopes the nodes send each other. A node that stops beating for
/// [`PresenceBoard::NODE_TIMEOUT`] is declared dead by the first survivor to notice, which
/// removes its members and tells their leaving.
pub trait PresenceBoard: Send + Sync + 'static {
    /// Records one topic's changes on this node and sends the envelope to the other nodes.
    fn write<'a>(
        &'a self,
        topic: &'a TopicName,
        change: PresenceChange<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Replaces everything recorded for this node with `members` (per topic), after writes
    /// were lost (the store was away, or declared this node dead while it stalled).
    fn resync<'a>(
        &'a self,
        members: &'a [(TopicName, Vec<Member>)],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The members of `topic` on every live node.
    fn list<'a>(&'a self, topic: &'a TopicName) -> BoxFuture<'a, Result<Vec<Member>, StoreError>>;

    /// Says this node is alive, and reaps the nodes that stopped. `Ok(true)`: the board did
    /// not know this node (its first beat, or it was declared dead): what it holds must be
    /// [`PresenceBoard::resync`]ed.
    fn beat(&self) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Envelopes from the other nodes, for topics followed here.
    fn remote(&self) -> broadcast::Receiver<RemotePresence>;
}

impl dyn PresenceBoard {
    /// How often a node beats.
    pub const BEAT_EVERY: Duration = Duration::from_secs(1);
    /// How long a node may go without beating before it is declared dead: its members leave
    /// within this plus one beat.
    pub const NODE_TIMEOUT: Duration = Duration::from_secs(5);
}

/// One topic's history and id counter.
#[async_trait]
pub trait TopicLog: Send + Sync + 'static {
    /// Assigns the next id and appends the message; it is durable per the store's policy when
    /// this returns.
    async fn append(
        &self,
        event: EventName,
        data: &Payload,
        time: u64,
    ) -> Result<Arc<Message>, StoreError>;

    /// Retained messages with id greater than `after`, oldest first, at most `limit`.
    async fn read(&self, after: MessageId, limit: usize) -> Result<LogRead, StoreError>;

    /// The log's ends without reading messages.
    async fn head(&self) -> Result<LogHead, StoreError> {
        Ok(self.read(MessageId::MAX, 0).await?.head)
    }

    /// [`TopicLog::read`], answered without waiting when the log can (it holds what is
    /// asked in memory); `None` when it cannot, and `read` must be called. Saves a read near
    /// the head (every poll, every long poll) the cost of an async call.
    fn read_now(&self, after: MessageId, limit: usize) -> Option<Result<LogRead, StoreError>> {
        let _ = (after, limit);
        None
    }

    /// Applies age retention and says whether this handle can be discarded without losing
    /// anything a later reader could ask for. Called by the hub's sweeper, under its registry
    /// lock, so it must not block: a log whose state is elsewhere simply answers `true`.
    fn release_if_idle(&self, now_ms: u64) -> bool;

    /// Called once, before the topic's first reader or follower in this process relies on
    /// live delivery. A log shared by several nodes starts delivering every appended message
    /// (from any node) into its [`Live`] sink, and returns once that delivery is in place, so
    /// a reader that reads history next misses nothing. A local log has nothing to do: it
    /// delivers its own appends.
    async fn follow(&self) {}

    /// The topic's stream state, if it has one.
    async fn stream(&self) -> Result<Option<StreamState>, StoreError>;

    /// Applies `write` atomically: ignores the seal of the state it replaces (the stream layer
    /// decides who may append to a closed stream), hands the appended messages to the
    /// [`Live`] sink like any append.
    async fn write_stream(&self, write: StreamWrite) -> Result<StreamWritten, StoreError>;
}

/// A sink that drops what it is given, for tests of a log alone.
#[cfg(test)]
pub(crate) fn nowhere() -> Arc<dyn Live> {
    struct Nowhere;
    impl Live for Nowhere {
        fn deliver(&self, _: &Arc<Message>) {}
    }
    Arc::new(Nowhere)
}
