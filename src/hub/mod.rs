//! The hub: topics, publishing, and reading or following a topic from a cursor.
//!
//! The hub knows nothing of HTTP. Transports call [`Hub::publish`], [`Hub::poll`],
//! [`Hub::park`] (long polling) and [`Hub::subscribe`] (streams), and turn what they get
//! into their wire format; the cursor rules live here once, for all of them.
//!
//! A streaming connection is an [`Outlet`]: the fan-out (`fanout.rs`) writes each new message
//! straight to it, and its own task only works when a write would block or a topic must be
//! read back from its log ([`Outlet::poll_action`]).

mod cursor;
mod error;
mod fanout;
mod format;
mod multi;
mod outlet;
mod patterns;
mod presence;
mod roster;
mod stats;
mod tally;
mod ticker;
mod waiter;

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{Arc, Mutex},
    time::Duration,
};

/// The hasher of the topic registry and presence maps: foldhash, seeded per process. Topic
/// names come from clients, so the seed keeps them from choosing colliding names; foldhash
/// is several times cheaper than SipHash on short names, and a lookup happens per request.
type Hasher = foldhash::fast::RandomState;

use serde::Serialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use cursor::{Batch, Signal};
pub use error::HubError;
pub use fanout::{FanoutSettings, default_shards};
pub use format::{Format, Framer, Native};
pub use multi::Key;
pub use outlet::{Action, CatchUp, End, Outlet, OutletGuard, SubId};
pub use patterns::Watching;
pub use presence::Subscribers;
pub use roster::{FLUSH_EVERY, PollerHold, Presenter};
pub use stats::{HubStats, TransportCounts};
pub use waiter::{AnswerCache, Respond, Responded};

use crate::{
    message::{EventName, Message, MessageId, Payload, TopicName, TransportKind, now_millis},
    store::{Created, LogRead, Store, StreamState, StreamWrite, StreamWritten, TopicLog},
};
use fanout::{Fanout, Follower, TopicLive};
use outlet::Shards as _;
use presence::Presence;
use stats::Counters;
use waiter::{Outcome, Waiter};

/// Registry shards: publishes and subscribes on different topics rarely contend.
const SHARDS: usize = 64;

/// One slice of the topic registry.
type Shard = Mutex<HashMap<TopicName, Arc<Topic>, Hasher>>;

/// The hub's tunables (`config.rs` builds them from the command line).
#[derive(Clone, Debug)]
pub struct HubSettings {
    /// How many messages may wait for one streaming connection's socket before it stops being
    /// fed live and reads its backlog from history instead.
    pub subscriber_queue: usize,
    /// Messages read from history per catch-up step.
    pub catch_up_batch: usize,
    /// How long a poller counts as subscribed after its last request.
    pub poller_window: Duration,
    /// What happens to a streaming connection that falls `subscriber_queue` behind.
    pub slow_consumer: SlowConsumerPolicy,
    /// Writers, write delay, heartbeats and pings.
    pub fanout: FanoutSettings,
    /// The most topics one connection follows through a topic list and its patterns.
    pub max_topics_per_connection: usize,
    /// This node's name in presence lists.
    pub node_name: String,
}

impl Default for HubSettings {
    fn default() -> Self {
        Self {
            subscriber_queue: 256,
            catch_up_batch: 256,
            poller_window: Duration::from_secs(30),
            slow_consumer: SlowConsumerPolicy::Resync,
            fanout: FanoutSettings::default(),
            max_topics_per_connection: 100,
            node_name: "pushhub".into(),
        }
    }
}

/// What happens to a streaming subscriber that falls too far behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowConsumerPolicy {
    /// Read the backlog from history by cursor (nothing lost while history holds it).
    Resync,
    /// Close the connection; the client reconnects with its cursor.
    Disconnect,
}

/// Where a long poll stands after [`Hub::park`].
#[derive(Debug)]
pub enum Parking {
    /// Something to answer with now.
    Ready(Batch),
    /// The fan-out answered it through its responder while it was parking.
    Answered,
    /// Nothing yet: parked on the topic.
    Parked(ParkedPoll),
}

/// A long poll parked on a topic: its entry in the topic's followers (removed when this is
/// dropped) and what reading its answer needs. All a parked poll holds in the hub.
pub struct ParkedPoll {
    topic: Arc<Topic>,
    waiter: Arc<Waiter>,
    shard: usize,
    slot: usize,
    after: MessageId,
    limit: usize,
    from_client: bool,
    since: std::time::Instant,
    /// Who parked it: a long poll, or a Durable Streams read waiting.
    transport: TransportKind,
    /// A named poller (counted by its roster entry, which its hold refreshes).
    named: bool,
}

impl std::fmt::Debug for ParkedPoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkedPoll")
            .field("topic", &self.topic.name)
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl ParkedPoll {
    /// Ready once a message newer than the cursor was offered (and maybe answered).
    ///
    /// # Cancel safety
    /// Cancel safe: polling only registers the waker; the poll stays parked until
    /// [`Hub::unpark`].
    pub fn poll_news(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.waiter.poll_news(cx)
    }

    /// Completes once a message newer than the cursor was offered (and maybe answered).
    ///
    /// # Cancel safety
    /// Cancel safe, as [`ParkedPoll::poll_news`].
    pub async fn news(&self) {
        std::future::poll_fn(|cx| self.poll_news(cx)).await;
    }
}

impl Drop for ParkedPoll {
    fn drop(&mut self) {
        self.topic.live.remove(self.shard, self.slot);
    }
}

/// How a long poll ended.
#[derive(Debug)]
pub enum Waited {
    /// What to answer.
    Batch(Batch),
    /// The fan-out answered it through the responder.
    Answered,
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

/// What a poll asks of a topic: where it stands, how much it takes, and who asks with which
/// transport (for the topic's subscriber counts).
#[derive(Debug, Clone, Copy)]
pub struct PollQuery<'a> {
    /// The topic read.
    pub topic: &'a TopicName,
    /// The client's cursor; `None`: from the newest message as of now.
    pub after: Option<MessageId>,
    /// Messages per answer at most.
    pub limit: usize,
    /// Who is polling.
    pub client: &'a str,
    /// The name it gave for presence (`client=` or its token's subject), if any.
    pub name: Option<&'a str>,
    /// Through which transport.
    pub transport: TransportKind,
}

/// Publishes messages and feeds subscribers. Cheap to share behind an `Arc`.
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: Hasher,
    store: Arc<dyn Store>,
    settings: HubSettings,
    counters: Arc<Counters>,
    fanout: Arc<Fanout>,
    /// Connections following a pattern, which topics created from now on must join.
    patterns: Arc<patterns::Patterns>,
    /// Topics whose first message was published here, for [`Hub::run_directory`].
    created: tokio::sync::mpsc::UnboundedSender<TopicName>,
    created_here: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<TopicName>>>,
    /// Named subscribers and presence watchers, per topic, and what is shared with other
    /// nodes.
    rolls: Arc<roster::Rolls>,
}

/// One active topic: its log and its live followers.
pub struct Topic {
    name: TopicName,
    log: Arc<dyn TopicLog>,
    /// Who follows the topic on this node; the log delivers every append here, in id order.
    live: Arc<TopicLive>,
    presence: Presence,
    /// Set once the log follows the topic (a shared log subscribes to it, once).
    followed: tokio::sync::OnceCell<()>,
    /// How a cursor names the topic when a pattern picked it up (`topic_hash` of its name).
    hash: u64,
}

/// A handle on a topic's stream-state notices ([`Hub::state_notices`]).
#[derive(Debug)]
pub struct StateNotices(Arc<Topic>);

impl StateNotices {
    /// Completes at the next notice after it is enabled (or first polled).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.live.state_changed.notified()
    }
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Topic {
    /// Asks the log to follow the topic before the first reader or follower relies on it: a
    /// log shared by several nodes starts delivering every node's messages here.
    async fn follow(&self) {
        self.followed.get_or_init(|| self.log.follow()).await;
    }

    /// Reads the messages after `after`, applying the cursor rules (reset, truncation);
    /// `from_client` says `after` is what a client sent, where 0 means "the oldest retained".
    async fn read_batch(
        &self,
        after: MessageId,
        limit: usize,
        from_client: bool,
    ) -> Result<Batch, HubError> {
        let read = self.read(after, limit).await?;
        Ok(match cursor::resolve(after, read.head, from_client) {
            cursor::Resolution::Keep(signal) => cursor::batch(read, signal),
            cursor::Resolution::ReadFromStart(signal) => {
                cursor::batch(self.read(0, limit).await?, Some(signal))
            }
        })
    }

    /// A log read, without an async call when the log answers at once.
    async fn read(&self, after: MessageId, limit: usize) -> Result<LogRead, HubError> {
        match self.log.read_now(after, limit) {
            Some(read) => Ok(read?),
            None => Ok(self.log.read(after, limit).await?),
        }
    }
}

impl Hub {
    /// A hub over `store`.
    pub fn new(store: Arc<dyn Store>, settings: HubSettings) -> Arc<Self> {
        let counters = Arc::new(Counters::default());
        let (created, created_here) = tokio::sync::mpsc::unbounded_channel();
        let rolls = Arc::new(roster::Rolls::new(
            &settings.node_name,
            settings.poller_window,
            |key| store.presence_board(key),
        ));
        Arc::new(Self {
            rolls,
            patterns: Arc::default(),
            created,
            created_here: Mutex::new(Some(created_here)),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(Hasher::default())))
                .collect(),
            hasher: Hasher::default(),
            store,
            fanout: Fanout::new(settings.fanout.clone(), counters.clone()),
            settings,
            counters,
        })
    }

    fn shard(
        &self,
        name: &TopicName,
    ) -> std::sync::MutexGuard<'_, HashMap<TopicName, Arc<Topic>, Hasher>> {
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
        let live = TopicLive::new(&self.fanout);
        let topic = Arc::new(Topic {
            name: name.clone(),
            log: self.store.open(name, live.clone()),
            live,
            presence: Presence::default(),
            followed: tokio::sync::OnceCell::new(),
            hash: crate::message::cursor::topic_hash(name.as_str()),
        });
        shard.insert(name.clone(), topic.clone());
        topic
    }

    /// Appends a message; the topic's log hands it to the fan-out. Returns once the store has
    /// accepted it.
    pub async fn publish(
        &self,
        topic: &TopicName,
        event: EventName,
        data: &Payload,
    ) -> Result<Arc<Message>, HubError> {
        let topic = self.topic(topic);
        let message = topic.log.append(event, data, now_millis()).await?;
        if message.id == 1 && !self.patterns.is_empty() {
            // A new topic: the connections whose patterns select it join it.
            let _ = self.created.send(topic.name.clone());
        }
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
        name: Option<&str>,
    ) -> Result<Batch, HubError> {
        let topic = self.topic(topic);
        // A named poller is counted by its roster entry; an anonymous one by its id.
        match name {
            Some(name) => {
                topic.presence.roster(&self.rolls, &topic.name).polled(
                    name,
                    TransportKind::Poll,
                    false,
                );
            }
            None => topic
                .presence
                .touch(TransportKind::Poll, client, self.settings.poller_window),
        }
        // A shared log answers reads near the head from what its subscription received; a
        // polled topic is followed like a streamed one.
        topic.follow().await;
        match after {
            Some(after) => topic.read_batch(after, limit, true).await,
            None => Ok(Batch {
                last_id: topic.log.head().await?.last_id,
                ..Batch::default()
            }),
        }
    }

    /// A long poll's first step: answers at once ([`Parking::Ready`]) when something newer
    /// than the cursor exists, else parks the poll on the topic ([`Parking::Parked`]) until
    /// a message arrives; the caller waits on [`ParkedPoll::news`] (or its deadline, or a
    /// shutdown), then calls [`Hub::unpark`]. Without a cursor it waits for the next message.
    /// When `respond` is given, the fan-out may answer the parked poll itself with the next
    /// messages ([`Waited::Answered`]).
    ///
    /// The steps are separate so that a parked poll holds only its [`ParkedPoll`] (one entry
    /// in the topic's follower list) and the caller's timer, not the state of the reads
    /// before and after: no CPU while it waits, and little memory.
    pub async fn park(
        &self,
        query: PollQuery<'_>,
        respond: Option<Arc<dyn Respond>>,
    ) -> Result<Parking, HubError> {
        let PollQuery {
            topic,
            after,
            limit,
            client,
            name,
            transport,
        } = query;
        let topic = self.topic(topic);
        // A named poller is counted by its roster entry, held until the poll is answered (a
        // long poller is not seen to leave while parked); an anonymous one by its id.
        let held = match name {
            Some(name) => topic
                .presence
                .roster(&self.rolls, &topic.name)
                .polled(name, transport, true),
            None => {
                topic
                    .presence
                    .touch(transport, client, self.settings.poller_window);
                None
            }
        };
        topic.follow().await;
        let (after, from_client) = match after {
            Some(after) => (after, true),
            None => (topic.log.head().await?.last_id, false),
        };
        let batch = topic.read_batch(after, limit, from_client).await?;
        if !batch.is_empty() {
            return Ok(Parking::Ready(batch));
        }
        // Park: follow the topic, then read once more, so that a message published between
        // the first read and now is not missed.
        let waiter = Waiter::new(after, limit, respond);
        let shard = self.fanout.pick_shard();
        let slot = topic.live.add(shard, Follower::Waiter(waiter.clone()));
        let parked = ParkedPoll {
            topic,
            waiter,
            shard,
            slot,
            after,
            limit,
            from_client,
            since: std::time::Instant::now(),
            transport,
            named: name.is_some(),
        };
        let batch = parked.topic.read_batch(after, limit, from_client).await;
        // A writer may have answered the poll during that read (the fan-out answers parked
        // polls on their sockets): claim the answer back before sending one, or the client
        // would get two.
        if !matches!(&batch, Ok(batch) if batch.is_empty()) {
            return match parked.waiter.claim() {
                Outcome::Answered => Ok(Parking::Answered),
                Outcome::Waiting | Outcome::News => batch.map(Parking::Ready),
            };
        }
        // The gauge holds the named poller's hold from here (the waiter is on the heap; the
        // parked poll's size is per connection).
        let gauge = parked.topic.presence.stream(transport);
        parked
            .waiter
            .count(gauge.with_pass(held.map(roster::Pass::Poller)));
        Ok(Parking::Parked(parked))
    }

    /// A parked poll's last step, once it was woken, its deadline passed or the server is
    /// stopping: its answer (what the log holds after its cursor now, maybe nothing), unless
    /// the fan-out answered it already.
    pub async fn unpark(&self, parked: ParkedPoll, client: &str) -> Result<Waited, HubError> {
        let outcome = parked.waiter.claim();
        parked.waiter.uncount();
        // A long wait would let the poller's last-seen time age out of the window before its
        // next request; a short one leaves it fresh enough.
        let window = self.settings.poller_window;
        if parked.since.elapsed() > window / 2 && !parked.named {
            parked
                .topic
                .presence
                .touch(parked.transport, client, window);
        }
        if outcome == Outcome::Answered {
            return Ok(Waited::Answered);
        }
        let ParkedPoll {
            ref topic,
            after,
            limit,
            from_client,
            ..
        } = parked;
        Ok(Waited::Batch(
            topic.read_batch(after, limit, from_client).await?,
        ))
    }

    /// A whole long poll: [`Hub::park`], then a wait for news, `timeout` or `shutdown`, then
    /// [`Hub::unpark`].
    pub async fn wait_or_answer(
        &self,
        query: PollQuery<'_>,
        timeout: Duration,
        shutdown: &CancellationToken,
        respond: Option<Arc<dyn Respond>>,
    ) -> Result<Waited, HubError> {
        let client = query.client;
        let parked = match self.park(query, respond).await? {
            Parking::Ready(batch) => return Ok(Waited::Batch(batch)),
            Parking::Answered => return Ok(Waited::Answered),
            Parking::Parked(parked) => parked,
        };
        tokio::select! {
            () = parked.news() => {}
            () = tokio::time::sleep(timeout) => {}
            () = shutdown.cancelled() => {}
        }
        self.unpark(parked, client).await
    }

    /// A new streaming connection, writing to `socket` directly when it is given (plain TCP),
    /// else through its task. Detached from every topic when the guard drops.
    pub fn outlet(&self, socket: Option<Arc<TcpStream>>, native: Native) -> OutletGuard {
        let format = Format::from(native);
        OutletGuard(Outlet::new(
            self.fanout.clone(),
            socket,
            format,
            format::Frames::Native(native),
            format.transport(),
            &self.settings,
        ))
    }

    /// An outlet whose messages `framer` writes, in `format` ([`Format::DsSse`] or
    /// [`Format::DsSseChunked`]).
    pub fn framed_outlet(
        &self,
        socket: Option<Arc<TcpStream>>,
        format: Format,
        framer: Arc<dyn Framer>,
    ) -> OutletGuard {
        OutletGuard(Outlet::new(
            self.fanout.clone(),
            socket,
            format,
            format::Frames::Framer(framer),
            format.transport(),
            &self.settings,
        ))
    }

    /// Makes `outlet` follow a topic from `after` (from now when `None`): history first, then
    /// live, with no gap and no repeat. The connection's task does the history part when
    /// [`Outlet::poll_action`] asks.
    pub async fn subscribe(
        &self,
        topic: &TopicName,
        after: Option<MessageId>,
        outlet: &Arc<Outlet>,
    ) -> Result<SubId, HubError> {
        self.subscribe_as(topic, after, outlet, None).await
    }

    /// A new streaming connection that follows a request's topic list
    /// ([`Hub::subscribe_as`]): every cursor it writes names all its topics, and carries
    /// `carried` (the client's cursor entries for topics it does not follow now).
    pub fn listed_outlet(
        &self,
        socket: Option<Arc<TcpStream>>,
        native: Native,
        carried: Vec<(u64, MessageId)>,
    ) -> OutletGuard {
        let outlet = self.outlet(socket, native);
        outlet.keep_book(carried, self.settings.max_topics_per_connection);
        outlet
    }

    /// Makes a running connection's outlet keep a cursor over the topics it follows by key,
    /// as [`Hub::listed_outlet`]'s does (a multiplexed WebSocket subscribing to a pattern).
    pub fn keep_cursor(&self, outlet: &Arc<Outlet>) {
        outlet.keep_book(Vec::new(), self.settings.max_topics_per_connection);
    }

    /// Stops `outlet` following pattern `prefix*` and the topics only it picked up; whether
    /// it followed it.
    pub fn unwatch_prefix(&self, outlet: &Arc<Outlet>, prefix: &str) -> bool {
        outlet.unwatch_prefix(prefix)
    }

    /// Makes `outlet` (from [`Hub::listed_outlet`]) join every topic starting with `prefix`
    /// whose first message is published from now on, here or on another node sharing the
    /// store, from that topic's start. Call it before listing the topics that exist
    /// ([`Hub::topics_with_prefix`]): a topic created in between is then joined once, not
    /// missed.
    ///
    /// A pattern the connection watches already is not entered twice, and a connection
    /// watches at most as many patterns as it may follow topics: else
    /// [`HubError::TooManyTopics`] (a client repeating subscribes must not grow the registry
    /// every creation walks).
    pub fn watch_prefix(&self, outlet: &Arc<Outlet>, prefix: &str) -> Result<(), HubError> {
        match outlet.with_book(|book| (book.watching(prefix), book.watches.len() >= book.limit())) {
            Some((true, _)) | None => return Ok(()),
            Some((false, true)) => {
                return Err(HubError::TooManyTopics {
                    limit: self.settings.max_topics_per_connection,
                });
            }
            Some((false, false)) => {}
        }
        let watcher = patterns::Watcher::Outlet(Arc::downgrade(outlet));
        let slot = self.patterns.add(prefix, watcher);
        let patterns = self.patterns.clone();
        if outlet
            .with_book(|book| book.watch(patterns, slot, prefix))
            .is_none()
        {
            // No book (or the connection ended): nothing would ever leave the entry.
            self.patterns.remove(slot);
        }
        Ok(())
    }

    /// Whether `outlet` watches pattern `prefix*`.
    pub fn watches_prefix(&self, outlet: &Arc<Outlet>, prefix: &str) -> bool {
        outlet
            .with_book(|book| book.watching(prefix))
            .unwrap_or(false)
    }

    /// The topics whose name starts with `prefix` and that hold or held a message: at most
    /// `limit + 1` of them (so a caller can tell that there are more than `limit`).
    pub async fn topics_with_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<TopicName>, HubError> {
        if let Some(listed) = self.store.topics(prefix, limit + 1).await? {
            return Ok(listed);
        }
        // A store without a directory of its own (memory): its topics are the open ones.
        let open: Vec<Arc<Topic>> = self
            .shards
            .iter()
            .flat_map(|shard| {
                let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                shard
                    .values()
                    .filter(|t| t.name.as_str().starts_with(prefix))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut listed = Vec::new();
        for topic in open {
            if topic.log.head().await?.last_id > 0 {
                listed.push(topic.name.clone());
                if listed.len() > limit {
                    break;
                }
            }
        }
        Ok(listed)
    }

    /// Joins the topics created from now on to the connections whose patterns select them:
    /// topics whose first message is published here, and (a store shared by several nodes)
    /// elsewhere. Runs until `shutdown`; started once, with the sweeper.
    pub async fn run_directory(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut here) = self
            .created_here
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let mut elsewhere = self.store.created_topics();
        loop {
            let created = tokio::select! {
                Some(topic) = here.recv() => Some(topic),
                topic = async {
                    match elsewhere.as_mut() {
                        Some(feed) => feed.recv().await,
                        None => std::future::pending().await,
                    }
                } => match topic {
                    Ok(Created::Topic(topic)) => Some(topic),
                    Ok(Created::Missed) => {
                        tracing::warn!("topic creations elsewhere may have been missed: looking again");
                        None
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "missed topic creations: looking again");
                        None
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        elsewhere = None;
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            match created {
                Some(topic) => self.join_created(&topic).await,
                None => self.rejoin_all().await,
            }
        }
    }

    /// Joins a created topic to the connections whose patterns select it, and wakes the
    /// long polls whose patterns do.
    async fn join_created(&self, topic: &TopicName) {
        for watcher in self.patterns.selecting(topic.as_str()) {
            match watcher {
                patterns::Live::Outlet(outlet) => self.join(topic, &outlet).await,
                patterns::Live::Waiting(notify) => notify.notify_one(),
            }
        }
    }

    /// Wakes `notify` whenever a topic is created that one of `prefixes` selects (a long
    /// poll of a topic list with patterns, parked on the topics that exist), until the
    /// returned guard is dropped.
    pub fn watch_prefixes<'a>(
        &self,
        prefixes: impl IntoIterator<Item = &'a str>,
        notify: &Arc<tokio::sync::Notify>,
    ) -> Watching {
        let mut watching = Watching::new(self.patterns.clone());
        for prefix in prefixes {
            watching.add(prefix, notify);
        }
        watching
    }

    /// Joins every topic each pattern selects now to its connection (creations were
    /// missed): topics a connection follows already are left as they are.
    async fn rejoin_all(&self) {
        let limit = self.settings.max_topics_per_connection;
        for (prefix, watcher) in self.patterns.all() {
            let outlet = match watcher {
                patterns::Live::Outlet(outlet) => outlet,
                patterns::Live::Waiting(notify) => {
                    notify.notify_one();
                    continue;
                }
            };
            match self.topics_with_prefix(&prefix, limit).await {
                Ok(topics) => {
                    for topic in topics {
                        self.join(&topic, &outlet).await;
                    }
                }
                Err(error) => tracing::warn!(%error, prefix, "could not list a pattern's topics"),
            }
        }
    }

    /// Makes `outlet` follow `topic` from its start, unless it does already; ends it when
    /// that would exceed its limit.
    async fn join(&self, topic: &TopicName, outlet: &Arc<Outlet>) {
        let key = Key::hashed(topic);
        // From where the client's cursor has it, if it does (a reconnecting client whose
        // own plan has not subscribed it yet), else from its start.
        let after = outlet
            .with_book(|book| book.carried_of(key))
            .flatten()
            .unwrap_or(0);
        match self
            .subscribe_as(topic, Some(after), outlet, Some(key))
            .await
        {
            Ok(_) => {}
            Err(HubError::TooManyTopics { .. }) => outlet.end(End::TooManyTopics),
            // The client left meanwhile: nothing to join.
            Err(HubError::Ended) => {}
            Err(error) => {
                // Nothing would join it later (the sub exists only once subscribed): end the
                // connection, whose client reconnects with its cursor and lists the pattern's
                // topics again, rather than miss the topic.
                tracing::warn!(%error, %topic, "could not join a pattern's new topic");
                outlet.end(End::Gone);
            }
        }
    }

    /// [`Hub::subscribe`], naming the topic `key` in the cursor of an outlet made by
    /// [`Hub::listed_outlet`]. Once every listed topic is subscribed, the caller queues the
    /// first cursor ([`Outlet::open_cursor`]).
    pub async fn subscribe_as(
        &self,
        topic: &TopicName,
        after: Option<MessageId>,
        outlet: &Arc<Outlet>,
        key: Option<Key>,
    ) -> Result<SubId, HubError> {
        let topic = self.topic(topic);
        topic.follow().await;
        let ticket = outlet.presenter().map(|presenter| {
            topic.presence.roster(&self.rolls, &topic.name).enter(
                &presenter,
                outlet.transport(),
                outlet,
            )
        });
        let sub = match outlet.add_sub(topic.clone(), ticket.map(roster::Pass::Member), key) {
            Ok(sub) => sub,
            Err(outlet::Refused::Following(sub)) => return Ok(sub),
            Err(outlet::Refused::Full) => {
                return Err(HubError::TooManyTopics {
                    limit: self.settings.max_topics_per_connection,
                });
            }
            Err(outlet::Refused::Ended) => return Err(HubError::Ended),
        };
        // Follow before reading the cursor: whatever is appended from here on is offered to
        // the sub (and, while it catches up, noted), so nothing falls between.
        let Ok(index) = u32::try_from(sub.index()) else {
            outlet.unsubscribe(sub);
            return Err(HubError::TooManyTopics {
                limit: self.settings.max_topics_per_connection,
            });
        };
        let slot = topic.live.add(
            outlet.shard,
            Follower::Stream {
                outlet: outlet.clone(),
                sub: index,
            },
        );
        // The slot is recorded before anything is awaited: if this call is dropped (its
        // connection went away), the outlet's detach removes the follower.
        if !outlet.place_sub(sub, slot) {
            // The connection ended meanwhile: nothing to follow for.
            topic.live.remove(outlet.shard, slot);
            return Ok(sub);
        }
        let start = match after {
            Some(after) => Ok((after, true)),
            None => topic.log.head().await.map(|head| (head.last_id, false)),
        };
        let started = match &start {
            Ok((cursor, from_client)) => outlet.start_sub(sub, *cursor, *from_client),
            Err(_) => false,
        };
        if !started {
            // Removes the follower too.
            outlet.unsubscribe(sub);
        }
        start?;
        Ok(sub)
    }

    /// Notices of the topic's stream state being closed or removed by another node sharing
    /// the store (a Durable Stream closed or deleted there). They arrive while the topic is
    /// followed on this node (a subscriber or a parked poll), which is when someone waits.
    pub fn state_notices(&self, topic: &TopicName) -> StateNotices {
        StateNotices(self.topic(topic))
    }

    /// The topic's stream state (see [`StreamState`]), if it is a stream.
    pub async fn stream_state(&self, topic: &TopicName) -> Result<Option<StreamState>, HubError> {
        let topic = self.topic(topic);
        Ok(topic.log.stream().await?)
    }

    /// Applies a [`StreamWrite`] to the topic: its messages reach every subscriber like
    /// publishes, and are counted as publishes.
    pub async fn write_stream(
        &self,
        topic: &TopicName,
        write: StreamWrite,
    ) -> Result<StreamWritten, HubError> {
        let topic = self.topic(topic);
        let written = topic.log.write_stream(write).await?;
        if written.messages.first().is_some_and(|m| m.id == 1) && !self.patterns.is_empty() {
            // A new topic, as on a publish: the connections whose patterns select it join.
            let _ = self.created.send(topic.name.clone());
        }
        self.counters.publishes.fetch_add(
            written.messages.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(written)
    }

    /// Reads the topic's log after `after` (at most `limit` messages) from the store itself,
    /// so that it includes every append acknowledged before it (a shared log's local tail
    /// may lag), following it first, so that what comes next is also offered live.
    pub async fn read(
        &self,
        topic: &TopicName,
        after: MessageId,
        limit: usize,
    ) -> Result<LogRead, HubError> {
        let topic = self.topic(topic);
        topic.follow().await;
        Ok(topic.log.read(after, limit).await?)
    }

    /// The topic's newest id now: where a reader that starts "from now" begins.
    pub async fn last_id(&self, topic: &TopicName) -> Result<MessageId, HubError> {
        let topic = self.topic(topic);
        topic.follow().await;
        Ok(topic.log.head().await?.last_id)
    }

    /// The topic's ends and subscriber counts.
    pub async fn info(&self, topic: &TopicName) -> Result<TopicInfo, HubError> {
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
    pub fn record_delivery(&self, transport: TransportKind, messages: u64, bytes: u64) {
        self.counters.delivered(transport, messages, bytes);
    }

    /// Counts `bytes` of HTTP heads (a request's, an answer's) of `transport`.
    pub fn record_heads(&self, transport: TransportKind, bytes: usize) {
        self.counters.heads(transport, bytes as u64);
    }

    /// Messages delivered over `transport` so far (cheaper than [`Hub::stats`]).
    pub fn deliveries(&self, transport: TransportKind) -> u64 {
        self.counters.deliveries(transport)
    }

    /// Counts one poll request or one stream connection over `transport`.
    pub fn record_request(&self, transport: TransportKind) {
        self.counters.request(transport);
    }

    /// The calling thread runs worker `worker` of the server: the connections it accepts
    /// use that worker's fan-out shard, whose writer this starts on the current runtime.
    pub fn start_worker(&self, worker: usize) {
        self.fanout.start_worker(worker);
    }

    /// The server is stopping: heartbeats and pings stop.
    pub fn stop_timers(&self) {
        self.fanout.stop_timers();
    }

    /// Every publish admitted before the stop is appended: each streaming connection writes
    /// what it has not been sent yet, then ends ([`End::Drained`]).
    pub fn drain(&self) {
        self.fanout.drain();
    }

    /// Streaming connections open on this node.
    pub fn streams(&self) -> usize {
        self.fanout.streams()
    }

    /// Counters and subscriber totals over every topic.
    pub fn stats(&self) -> HubStats {
        let window = self.settings.poller_window;
        let mut topics = 0;
        let mut subscribers = Subscribers::default();
        // The topics are counted outside the registry's locks, which every publish and
        // subscribe needs: under a lock, only their `Arc`s are copied.
        let mut held: Vec<Arc<Topic>> = Vec::new();
        for shard in self.shards.iter() {
            held.clear();
            {
                let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                topics += shard.len();
                held.extend(shard.values().cloned());
            }
            for topic in &held {
                let counts = topic.presence.counts(window);
                for (transport, count) in counts.iter() {
                    subscribers[transport] += count;
                }
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
    /// Every user of a topic holds a clone of its `Arc` (a follower through its outlet's sub),
    /// and clones are only made under the shard lock held here, so a strong count of 1 proves
    /// nobody is publishing, reading or subscribing, and nobody can start to until the lock is
    /// released.
    pub fn sweep(&self) -> usize {
        let now = now_millis();
        let window = self.settings.poller_window;
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, topic| {
                let idle = Arc::strong_count(topic) == 1
                    && topic.live.len() == 0
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

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::{future::poll_fn, task::Poll};

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
                ..HubSettings::default()
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

    /// What the outlet asks its connection's task to do next (within 5 s).
    async fn next_action(outlet: &Outlet) -> Action {
        tokio::time::timeout(Duration::from_secs(5), poll_fn(|cx| outlet.poll_action(cx)))
            .await
            .expect("an action")
    }

    /// Drives an outlet the way a connection's task does, and returns what it was sent: the
    /// id of each message, the event name of each signal.
    async fn take(outlet: &Outlet, count: usize) -> Vec<String> {
        let mut seen = Vec::new();
        while seen.len() < count {
            match next_action(outlet).await {
                Action::Write(frames) => {
                    for frame in frames {
                        let text = std::str::from_utf8(&frame).unwrap();
                        let mut lines = text.lines();
                        let id = lines.next().unwrap().strip_prefix("id: ").unwrap();
                        // The stream's start (an `id:` line alone) is not a delivery.
                        let Some(event) = lines.next().and_then(|l| l.strip_prefix("event: "))
                        else {
                            continue;
                        };
                        seen.push(if event == "message" { id } else { event }.to_owned());
                    }
                }
                Action::CatchUp(catch_up) => outlet.catch_up(catch_up).await.unwrap(),
                Action::End(end) => panic!("ended: {end:?}"),
            }
        }
        seen
    }

    #[tokio::test]
    async fn out_of_order_fan_out_is_delivered_in_id_order() {
        let hub = hub(100, 16);
        let outlet = hub.outlet(None, Native::Sse);
        let sub = hub.subscribe(&name(), Some(0), &outlet).await.unwrap();
        publish(&hub, 1).await;
        // The subscriber is now past its initial history read, on the live path.
        assert_eq!(take(&outlet, 1).await, ["1"]);
        publish(&hub, 2).await;
        // Before the writer runs (this runtime has one thread), message 3 is offered first:
        // a gap the subscriber must fill from the log.
        let topic = hub.topic(&name());
        let third = topic.log.read(2, 1).await.unwrap().messages;
        assert_eq!(third[0].id, 3);
        outlet.deliver(
            sub.index(),
            outlet::ListId::of(&topic.live),
            &third,
            &mut Default::default(),
        );
        assert_eq!(take(&outlet, 2).await, ["2", "3"]);
        publish(&hub, 1).await;
        assert_eq!(take(&outlet, 1).await, ["4"], "2 and 3 are not repeated");
    }

    /// What `poll_action` answers now, without waiting.
    fn action_now(outlet: &Outlet) -> Poll<Action> {
        outlet.poll_action(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    /// Takes an SSE stream's start, the `id:` block queued before any message, and returns
    /// the cursor it carries.
    fn started(outlet: &Outlet) -> String {
        let Poll::Ready(Action::Write(frames)) = action_now(outlet) else {
            panic!("a stream starts with its cursor");
        };
        let text = String::from_utf8(frames.concat()).unwrap();
        let block = text.split_once("id: ").expect("an id line").1;
        let (cursor, rest) = block.split_once('\n').unwrap();
        assert!(rest.starts_with('\n'), "an id line alone: {text:?}");
        cursor.to_owned()
    }

    #[tokio::test]
    async fn a_message_offered_during_a_catch_up_read_is_read_again() {
        let hub = hub(100, 16);
        let outlet = hub.outlet(None, Native::Sse);
        let sub = hub.subscribe(&name(), Some(0), &outlet).await.unwrap();
        assert_eq!(started(&outlet), "0");
        let Poll::Ready(Action::CatchUp(catch_up)) = action_now(&outlet) else {
            panic!("a new subscriber reads its history first");
        };
        // Message 1 is offered while the read is under way, but the read (of an empty log,
        // as when it ran just before the append) does not return it.
        let topic = hub.topic(&name());
        let early = Message::new(
            1,
            name(),
            EventName::default_event(),
            0,
            &Payload::from_text("x"),
        );
        outlet.deliver(
            sub.index(),
            outlet::ListId::of(&topic.live),
            &[Arc::new(early)],
            &mut Default::default(),
        );
        outlet.catch_up(catch_up).await.unwrap();
        assert!(
            matches!(action_now(&outlet), Poll::Ready(Action::CatchUp(_))),
            "the sub went live past a message it was offered and never sent"
        );
    }

    #[tokio::test]
    async fn a_batch_that_repeats_ids_is_written_once_in_one_chunk() {
        let hub = hub(100, 16);
        let outlet = hub.outlet(None, Native::SseChunked);
        let sub = hub.subscribe(&name(), Some(0), &outlet).await.unwrap();
        assert_eq!(started(&outlet), "0");
        let Poll::Ready(Action::CatchUp(catch_up)) = action_now(&outlet) else {
            panic!("a new subscriber reads its history first");
        };
        outlet.catch_up(catch_up).await.unwrap();
        assert!(action_now(&outlet).is_pending(), "live, nothing to send");
        publish(&hub, 2).await;
        // Before the writer runs (one thread), the two messages are offered twice in one
        // batch, as a store that replays after a reconnect may offer them.
        let topic = hub.topic(&name());
        let two = topic.log.read(0, 2).await.unwrap().messages;
        let batch = [two.clone(), two].concat();
        outlet.deliver(
            sub.index(),
            outlet::ListId::of(&topic.live),
            &batch,
            &mut Default::default(),
        );
        let Poll::Ready(Action::Write(frames)) = action_now(&outlet) else {
            panic!("the batch is queued");
        };
        let bytes = frames.concat();
        let text = std::str::from_utf8(&bytes).unwrap();
        let (size, rest) = text.split_once("\r\n").unwrap();
        let body = rest.strip_suffix("\r\n").expect("one chunk");
        assert_eq!(usize::from_str_radix(size, 16).unwrap(), body.len());
        assert_eq!(body.matches("id: 1\n").count(), 1, "{body}");
        assert_eq!(body.matches("id: 2\n").count(), 1, "{body}");
    }

    #[test]
    fn a_claimed_long_poll_is_answered_by_no_writer() {
        struct Counting(std::sync::atomic::AtomicUsize);
        impl Respond for Counting {
            fn respond(&self, _: &[Arc<Message>], _: MessageId, _: &mut AnswerCache) -> Responded {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Responded::Written
            }
        }
        let message = Arc::new(Message::new(
            1,
            name(),
            EventName::default_event(),
            0,
            &Payload::from_text("x"),
        ));
        let responder = Arc::new(Counting(Default::default()));
        // Answered by a writer first: the poller's claim says so, and it sends nothing.
        let answered = Waiter::new(0, 10, Some(responder.clone()));
        answered.offer(std::slice::from_ref(&message), &mut AnswerCache::default());
        assert_eq!(answered.claim(), Outcome::Answered);
        // Claimed first (the poller answers itself): a writer offering news answers nothing.
        let claimed = Waiter::new(0, 10, Some(responder.clone()));
        assert_eq!(claimed.claim(), Outcome::Waiting);
        claimed.offer(std::slice::from_ref(&message), &mut AnswerCache::default());
        assert_eq!(responder.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_catches_up_from_history() {
        let hub = hub(100, 4);
        let outlet = hub.outlet(None, Native::Sse);
        hub.subscribe(&name(), None, &outlet).await.unwrap();
        publish(&hub, 50).await;
        tokio::task::yield_now().await;
        let expected: Vec<String> = (1..=50).map(|i: u64| i.to_string()).collect();
        assert_eq!(take(&outlet, 50).await, expected);
    }

    #[tokio::test]
    async fn a_subscriber_behind_history_gets_truncated_once() {
        let hub = hub(5, 2);
        let outlet = hub.outlet(None, Native::Sse);
        hub.subscribe(&name(), None, &outlet).await.unwrap();
        publish(&hub, 20).await;
        assert_eq!(
            take(&outlet, 6).await,
            ["truncated", "16", "17", "18", "19", "20"]
        );
        publish(&hub, 1).await;
        assert_eq!(take(&outlet, 1).await, ["21"]);
    }

    #[tokio::test]
    async fn the_drain_delivers_what_was_published_then_ends() {
        let hub = hub(100, 4);
        let outlet = hub.outlet(None, Native::Sse);
        hub.subscribe(&name(), Some(0), &outlet).await.unwrap();
        publish(&hub, 10).await;
        hub.drain();
        let expected: Vec<String> = (1..=10).map(|i: u64| i.to_string()).collect();
        assert_eq!(take(&outlet, 10).await, expected);
        let end = poll_fn(|cx| outlet.poll_action(cx)).await;
        assert!(matches!(end, Action::End(End::Drained)), "{end:?}");
    }

    /// A framer that writes `m<id>;` for each message.
    struct Ids;

    impl Framer for Ids {
        fn frame(&self, message: &Arc<Message>) -> bytes::Bytes {
            format!("m{};", message.id).into()
        }
    }

    /// Everything a framed outlet writes until it ends, and how it ends.
    async fn written_until_end(outlet: &Outlet) -> (String, End) {
        let mut text = String::new();
        loop {
            match next_action(outlet).await {
                Action::Write(frames) => {
                    text.push_str(std::str::from_utf8(&frames.concat()).unwrap())
                }
                Action::CatchUp(catch_up) => outlet.catch_up(catch_up).await.unwrap(),
                Action::End(end) => return (text, end),
            }
        }
    }

    #[tokio::test]
    async fn a_finished_outlet_ends_right_after_its_last_message_live_or_from_the_log() {
        // The last message still to come when the end is asked for (it arrives live, or from
        // the log if the catch-up reads it): everything up to it, then the last bytes.
        let hub = hub(100, 16);
        let outlet = hub.framed_outlet(None, Format::DsSse, Arc::new(Ids));
        let sub = hub.subscribe(&name(), Some(0), &outlet).await.unwrap();
        publish(&hub, 2).await;
        outlet.finish_after(sub, 4, "end".into());
        publish(&hub, 2).await;
        // Offered after the last one: never written.
        publish(&hub, 1).await;
        let (text, end) = written_until_end(&outlet).await;
        assert_eq!(text, "m1;m2;m3;m4;end");
        assert_eq!(end, End::Finished);

        // Already sent when the end is asked for: the last bytes at once.
        let outlet = hub.framed_outlet(None, Format::DsSse, Arc::new(Ids));
        let sub = hub.subscribe(&name(), Some(3), &outlet).await.unwrap();
        let mut text = String::new();
        loop {
            match action_now(&outlet) {
                Poll::Ready(Action::Write(frames)) => {
                    text.push_str(std::str::from_utf8(&frames.concat()).unwrap());
                }
                Poll::Ready(Action::CatchUp(catch_up)) => outlet.catch_up(catch_up).await.unwrap(),
                Poll::Ready(Action::End(end)) => panic!("ended: {end:?}"),
                Poll::Pending => break,
            }
        }
        assert_eq!(text, "m4;m5;");
        outlet.finish_after(sub, 5, "end".into());
        publish(&hub, 1).await;
        assert_eq!(
            written_until_end(&outlet).await,
            ("end".to_owned(), End::Finished)
        );
    }

    #[tokio::test]
    async fn an_ended_connection_follows_nothing_more() {
        // A pattern's join that awaited the store while the client left must not add a sub
        // that nothing would remove (it would keep the outlet and the topic alive).
        let hub = hub(5, 2);
        let outlet = hub.outlet(None, Native::Sse);
        outlet.detach();
        let refused = hub.subscribe(&name(), Some(0), &outlet).await;
        assert!(matches!(refused, Err(HubError::Ended)), "{refused:?}");
        assert_eq!(hub.topic(&name()).live.len(), 0, "no follower left behind");
    }

    #[tokio::test]
    async fn sweep_keeps_topics_in_use() {
        let hub = hub(5, 2);
        let outlet = hub.outlet(None, Native::Ws);
        hub.subscribe(&name(), None, &outlet).await.unwrap();
        assert_eq!(hub.sweep(), 0, "a subscribed topic is kept");
        drop(outlet);
        assert_eq!(hub.sweep(), 1);
        publish(&hub, 1).await;
        assert_eq!(hub.sweep(), 0, "a topic with retained history is kept");
    }
}
