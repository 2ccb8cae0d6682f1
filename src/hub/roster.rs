//! Who is on a topic, by name: each topic's [`Roster`] of named members on this node, the
//! connections that watch its presence, and the [`Rolls`] that flush what changed.
//!
//! A streaming subscriber whose client named itself joins when it subscribes and leaves when
//! its subscription ends (its [`Ticket`] is dropped). A named poller joins at its first
//! request and stays while it polls: it leaves once no request of its has been seen for the
//! poller window (`--poller-window`), and never while a long poll of its is parked, so a long
//! poller is not seen to leave between two requests.
//!
//! Changes are not told one by one. Each roster gathers them, and every [`FLUSH_EVERY`] the
//! [`Rolls`] turn each changed roster's gathered joins and leaves into one coalesced, capped
//! [`Diff`]: one `presence` envelope per topic per interval to each watcher here, and one
//! write to the store's [`PresenceBoard`] (which tells the other nodes). Bound: a watcher
//! receives at most one envelope per topic per interval from each node, each listing at most
//! [`crate::message::presence::MAX_CHANGES`] members.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use smallvec::SmallVec;

use super::{Format, Outlet};
use crate::{
    message::{
        TopicName, TransportKind, now_millis,
        presence::{Diff, Member, coalesce, oldest_first},
    },
    store::{PresenceBoard, PresenceChange, RemotePresence},
};

/// How often gathered changes are told: the most a join or leave waits, and the least time
/// between two presence envelopes of one topic from one node.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// Who a connection says it is, and whether it wants its topics' presence envelopes.
#[derive(Clone, Debug, Default)]
pub struct Presenter {
    /// Its name (`client=`, or the token's subject): `None` stays anonymous (counted, not
    /// listed).
    pub client: Option<Box<str>>,
    /// `presence=1`: the connection receives the `presence` envelopes of its topics.
    pub events: bool,
}

impl Presenter {
    /// Whether it takes part in presence at all.
    pub fn is_some(&self) -> bool {
        self.client.is_some() || self.events
    }
}

/// This node's rosters: its name and key, and the rosters with changes to tell.
pub(crate) struct Rolls {
    /// The node's name, shown in each member (`--node-name`).
    pub(crate) node: Box<str>,
    /// The node's key: its name and a random incarnation, so a restarted node's members are
    /// never mistaken for the dead one's.
    pub(crate) key: Box<str>,
    serial: AtomicU64,
    /// Rosters with gathered changes.
    dirty: Mutex<Vec<Arc<Roster>>>,
    /// Notified when `dirty` stops being empty.
    changed: tokio::sync::Notify,
    /// Rosters with named pollers, whose expiry is checked every second.
    polled: Mutex<Vec<Arc<Roster>>>,
    /// How long a poller stays after its last request.
    window: Duration,
    /// What pollers' last-seen times count from.
    epoch: Instant,
    pub(crate) board: Option<Arc<dyn PresenceBoard>>,
}

impl Rolls {
    pub(crate) fn new(
        node: &str,
        window: Duration,
        board: impl FnOnce(&str) -> Option<Arc<dyn PresenceBoard>>,
    ) -> Self {
        let key = format!("{node}~{:08x}", fastrand::u32(..));
        Self {
            node: node.into(),
            board: board(&key),
            key: key.into(),
            serial: AtomicU64::new(0),
            dirty: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            polled: Mutex::default(),
            window,
            epoch: Instant::now(),
        }
    }

    /// `now` in milliseconds since the epoch of pollers' times.
    fn clock(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// A new roster for `topic`.
    pub(crate) fn roster(self: &Arc<Self>, topic: &TopicName) -> Arc<Roster> {
        Arc::new(Roster {
            topic: topic.clone(),
            rolls: self.clone(),
            state: Mutex::default(),
        })
    }

    fn member(&self, id: String, client: &str, transport: TransportKind) -> Member {
        Member {
            id,
            client: client.into(),
            transport: transport.name().into(),
            node: self.node.to_string(),
            since: now_millis(),
        }
    }

    /// Takes every roster's gathered changes: sends each diff's envelope to the roster's
    /// watchers here, and returns what the board must be told.
    pub(crate) fn flush(&self) -> Vec<Flushed> {
        let dirty = std::mem::take(&mut *lock(&self.dirty));
        let mut flushed = Vec::with_capacity(dirty.len());
        for roster in dirty {
            let mut state = roster.lock();
            state.dirty = false;
            let mut joins = std::mem::take(&mut state.joins);
            let mut leaves = std::mem::take(&mut state.leaves);
            coalesce(&mut joins, &mut leaves);
            if joins.is_empty() && leaves.is_empty() {
                continue;
            }
            let diff = Diff::capped(joins.clone(), leaves.clone());
            let envelope = Bytes::from(diff.envelope(&roster.topic));
            let emptied = state.members.is_empty();
            let watchers = state.watching();
            drop(state);
            tell(watchers, &envelope);
            flushed.push(Flushed {
                topic: roster.topic.clone(),
                joins,
                leaves,
                envelope,
                emptied,
            });
        }
        flushed
    }

    /// Lets named pollers not seen for the window leave.
    pub(crate) fn expire_pollers(&self) {
        let now = Instant::now();
        // Taken out of its lock: a poller's first request takes the roster's lock, then this.
        let mut polled = std::mem::take(&mut *lock(&self.polled));
        polled.retain(|roster| {
            let mut state = roster.lock();
            let window = self.window;
            let mut gone = Vec::new();
            let now = self.clock(now);
            state.pollers.retain(|_, pollers| {
                pollers.retain(|p| {
                    let expired = p.slot.expired(now, window);
                    if expired {
                        gone.push(p.id.clone());
                    }
                    !expired
                });
                !pollers.is_empty()
            });
            for id in gone {
                roster.left(&mut state, &id);
            }
            !state.pollers.is_empty()
        });
        lock(&self.polled).extend(polled);
    }

    /// Every member here of every roster in `rosters`, for the board after it lost them.
    pub(crate) fn everyone(rosters: &[Arc<Roster>]) -> Vec<(TopicName, Vec<Member>)> {
        rosters
            .iter()
            .map(|roster| {
                let state = roster.lock();
                (
                    roster.topic.clone(),
                    state.members.values().cloned().collect::<Vec<_>>(),
                )
            })
            .filter(|(_, members)| !members.is_empty())
            .collect()
    }
}

/// One topic's flushed changes, for the board.
pub(crate) struct Flushed {
    pub(crate) topic: TopicName,
    pub(crate) joins: Vec<Member>,
    pub(crate) leaves: Vec<Member>,
    pub(crate) envelope: Bytes,
    /// No member of the topic is left on this node.
    pub(crate) emptied: bool,
}

impl Flushed {
    /// What the board is told.
    pub(crate) fn change(&self) -> PresenceChange<'_> {
        PresenceChange {
            joins: &self.joins,
            leaves: &self.leaves,
            envelope: Some(&self.envelope),
            emptied: self.emptied,
        }
    }
}

/// One topic's named members on this node and its presence watchers.
pub(crate) struct Roster {
    topic: TopicName,
    rolls: Arc<Rolls>,
    state: Mutex<RosterState>,
}

#[derive(Default)]
struct RosterState {
    members: HashMap<String, Member, super::Hasher>,
    /// Named pollers by name, then by transport: a request finds its poller without
    /// allocating, and its parked poll's hold touches only the poller's slot.
    pollers: HashMap<Box<str>, SmallVec<[Poller; 1]>, super::Hasher>,
    /// Connections that receive the presence envelopes (a free slot is `None`).
    watchers: Vec<Option<Weak<Outlet>>>,
    joins: Vec<Member>,
    leaves: Vec<Member>,
    /// In the rolls' dirty list.
    dirty: bool,
}

struct Poller {
    transport: TransportKind,
    id: String,
    slot: Arc<Slot>,
}

/// When a named poller was last seen, and how many long polls of its are parked: shared
/// with those polls' holds, which update it without the roster's lock.
#[derive(Debug, Default)]
struct Slot {
    held: AtomicUsize,
    /// Milliseconds since the rolls' epoch.
    seen: AtomicU64,
}

impl Slot {
    fn expired(&self, now: u64, window: Duration) -> bool {
        self.held.load(Ordering::Acquire) == 0
            && now.saturating_sub(self.seen.load(Ordering::Relaxed)) >= window.as_millis() as u64
    }
}

impl RosterState {
    /// The watchers still connected; forgets those that are gone.
    fn watching(&mut self) -> Vec<Arc<Outlet>> {
        let mut outlets = Vec::new();
        for slot in &mut self.watchers {
            match slot.as_ref().and_then(Weak::upgrade) {
                Some(outlet) => outlets.push(outlet),
                None => *slot = None,
            }
        }
        outlets
    }
}

/// Sends `envelope` to `outlets`, framed once per format. Called without the roster's lock:
/// an outlet's lock is taken here, and a sub dropped under its outlet's lock takes the
/// roster's ([`Ticket`]'s drop), so holding both the other way round could deadlock.
fn tell(outlets: Vec<Arc<Outlet>>, envelope: &[u8]) {
    let mut framed: Vec<(Format, Bytes)> = Vec::new();
    for outlet in outlets {
        let format = outlet.format();
        let bytes = match framed.iter().find(|(f, _)| *f == format) {
            Some((_, bytes)) => bytes.clone(),
            None => match format.presence(envelope) {
                Some(bytes) => {
                    framed.push((format, bytes.clone()));
                    bytes
                }
                None => continue,
            },
        };
        outlet.send(bytes);
    }
}

impl Roster {
    fn lock(&self) -> MutexGuard<'_, RosterState> {
        lock(&self.state)
    }

    /// Enters a subscription of `outlet` through `transport`: a member if `presenter` is
    /// named, a watcher if it wants events. Both end when the ticket is dropped.
    pub(crate) fn enter(
        self: &Arc<Self>,
        presenter: &Presenter,
        transport: TransportKind,
        outlet: &Arc<Outlet>,
    ) -> Ticket {
        let mut state = self.lock();
        let member = presenter.client.as_deref().map(|client| {
            let serial = self.rolls.serial.fetch_add(1, Ordering::Relaxed);
            let id = format!("{}/{serial}", self.rolls.key);
            self.joined(&mut state, self.rolls.member(id.clone(), client, transport));
            id
        });
        let watcher = presenter.events.then(|| {
            let entry = Some(Arc::downgrade(outlet));
            match state.watchers.iter().position(Option::is_none) {
                Some(free) => {
                    state.watchers[free] = entry;
                    free
                }
                None => {
                    state.watchers.push(entry);
                    state.watchers.len() - 1
                }
            }
        });
        Ticket {
            roster: self.clone(),
            member,
            watcher,
        }
    }

    /// A named poller's request: it joins if it is new, and is seen now. With `hold`, a long
    /// poll of its is parked until the returned hold is dropped.
    pub(crate) fn polled(
        self: &Arc<Self>,
        client: &str,
        transport: TransportKind,
        hold: bool,
    ) -> Option<PollerHold> {
        // A held poller cannot expire, and its hold's drop sets when it was last seen: the
        // clock is read once per long poll, there.
        let now = (!hold).then(|| self.rolls.clock(Instant::now()));
        let mut state = self.lock();
        let known = state
            .pollers
            .get(client)
            .and_then(|pollers| pollers.iter().find(|p| p.transport == transport))
            .map(|p| p.slot.clone());
        let slot = match known {
            Some(slot) => slot,
            None => self.new_poller(&mut state, client, transport),
        };
        // Under the lock, so that the expiry cannot take the poller in between.
        match now {
            Some(now) => slot.seen.store(now, Ordering::Relaxed),
            None => {
                slot.held.fetch_add(1, Ordering::AcqRel);
            }
        }
        drop(state);
        hold.then(|| PollerHold {
            slot,
            epoch: self.rolls.epoch,
        })
    }

    fn new_poller(
        self: &Arc<Self>,
        state: &mut RosterState,
        client: &str,
        transport: TransportKind,
    ) -> Arc<Slot> {
        let first = state.pollers.is_empty();
        let id = format!("{}/{}:{client}", self.rolls.key, transport.name());
        let slot = Arc::new(Slot::default());
        state
            .pollers
            .entry(client.into())
            .or_default()
            .push(Poller {
                transport,
                id: id.clone(),
                slot: slot.clone(),
            });
        self.joined(state, self.rolls.member(id, client, transport));
        if first {
            lock(&self.rolls.polled).push(self.clone());
        }
        slot
    }

    /// Named pollers through `transport` seen within `window` or parked now.
    pub(crate) fn pollers(&self, transport: TransportKind, window: Duration) -> usize {
        let now = self.rolls.clock(Instant::now());
        let state = self.lock();
        state
            .pollers
            .values()
            .flatten()
            .filter(|p| p.transport == transport && !p.slot.expired(now, window))
            .count()
    }

    /// The named members here.
    pub(crate) fn members(&self) -> Vec<Member> {
        self.lock().members.values().cloned().collect()
    }

    /// Sends `envelope` (a diff another node told) to the watchers here.
    pub(crate) fn tell(&self, envelope: &[u8]) {
        let watchers = self.lock().watching();
        tell(watchers, envelope);
    }

    /// Whether nobody is listed or watching here.
    pub(crate) fn is_idle(&self) -> bool {
        let state = self.lock();
        state.members.is_empty() && state.watchers.iter().all(Option::is_none)
    }

    fn joined(self: &Arc<Self>, state: &mut RosterState, member: Member) {
        state.joins.push(member.clone());
        state.members.insert(member.id.clone(), member);
        self.mark(state);
    }

    fn left(self: &Arc<Self>, state: &mut RosterState, id: &str) {
        if let Some(member) = state.members.remove(id) {
            state.leaves.push(member);
            self.mark(state);
        }
    }

    fn mark(self: &Arc<Self>, state: &mut RosterState) {
        if !state.dirty {
            state.dirty = true;
            let mut dirty = lock(&self.rolls.dirty);
            if dirty.is_empty() {
                // The flush task sleeps until there is something to flush.
                self.rolls.changed.notify_one();
            }
            dirty.push(self.clone());
        }
    }
}

/// What a gauge holds for presence (see `presence.rs`'s `Gauge`): held for its drop.
#[derive(Debug)]
#[expect(dead_code, reason = "held for what its drop does, never read")]
pub(crate) enum Pass {
    /// A subscription's place in a roster.
    Member(Ticket),
    /// A named long poller's parked poll.
    Poller(PollerHold),
}

/// A subscription's place in a roster: its member and its watcher slot, removed on drop.
pub(crate) struct Ticket {
    roster: Arc<Roster>,
    member: Option<String>,
    watcher: Option<usize>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.roster.lock();
        if let Some(id) = &self.member {
            self.roster.left(&mut state, id);
        }
        if let Some(slot) = self.watcher
            && let Some(entry) = state.watchers.get_mut(slot)
        {
            *entry = None;
        }
    }
}

/// A parked long poll of a named poller: the poller cannot expire while it is held, and is
/// seen again when it is dropped.
pub struct PollerHold {
    slot: Arc<Slot>,
    epoch: Instant,
}

impl std::fmt::Debug for PollerHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PollerHold").field(&self.slot).finish()
    }
}

impl Drop for PollerHold {
    fn drop(&mut self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.slot.seen.store(now, Ordering::Relaxed);
        self.slot.held.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Presence, as the hub serves it.
impl super::Hub {
    /// The named members of `topic` on every node (this node's alone without a shared
    /// store), oldest first.
    pub async fn presence(&self, topic: &TopicName) -> Result<Vec<Member>, super::HubError> {
        if let Some(board) = &self.rolls.board {
            return Ok(board.list(topic).await?);
        }
        let mut members = self
            .roster_of(topic)
            .map(|roster| roster.members())
            .unwrap_or_default();
        oldest_first(&mut members);
        Ok(members)
    }

    /// The roster of `topic` on this node, if the topic is open and has one.
    fn roster_of(&self, topic: &TopicName) -> Option<Arc<Roster>> {
        self.shard(topic)
            .get(topic)
            .and_then(|topic| topic.presence.roster_if_any().cloned())
    }

    /// Every roster of this node.
    fn rosters(&self) -> Vec<Arc<Roster>> {
        let mut rosters = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            rosters.extend(
                shard
                    .values()
                    .filter_map(|topic| topic.presence.roster_if_any().cloned()),
            );
        }
        rosters
    }

    /// Tells what changed, at most every [`FLUSH_EVERY`]; beats on the board and passes on
    /// other nodes' envelopes. Runs until `shutdown`; started once, with the sweeper. After
    /// the connections have ended, [`super::Hub::leave_all`] tells their leaving.
    ///
    /// Idle, it does not wake: it flushes when a change was gathered (no sooner than
    /// [`FLUSH_EVERY`] after the last flush), and ticks every second only while there is a
    /// board to beat on or a named poller to expire.
    pub async fn run_presence(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut beat = tokio::time::interval(<dyn PresenceBoard>::BEAT_EVERY);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut remote = self.rolls.board.as_ref().map(|board| board.remote());
        let mut last_flush = tokio::time::Instant::now();
        // Set when the board may have missed a write: everything is written again.
        let mut resync = false;
        loop {
            let ticking = self.rolls.board.is_some() || !lock(&self.rolls.polled).is_empty();
            tokio::select! {
                () = self.rolls.changed.notified() => {
                    tokio::time::sleep_until(last_flush + FLUSH_EVERY).await;
                    last_flush = tokio::time::Instant::now();
                    resync |= !self.flush_presence().await;
                }
                _ = beat.tick(), if ticking => {
                    self.rolls.expire_pollers();
                    resync = self.beat(resync).await;
                }
                envelope = async {
                    match remote.as_mut() {
                        Some(feed) => feed.recv().await,
                        None => std::future::pending().await,
                    }
                } => match envelope {
                    Ok(envelope) => self.tell_remote(&envelope),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "presence: other nodes' envelopes were missed");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => remote = None,
                },
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Flushes the gathered changes; `false` if the board failed to take one.
    async fn flush_presence(&self) -> bool {
        let flushed = self.rolls.flush();
        let Some(board) = &self.rolls.board else {
            return true;
        };
        let mut written = true;
        for topic in &flushed {
            if let Err(error) = board.write(&topic.topic, topic.change()).await {
                tracing::warn!(%error, topic = %topic.topic, "presence: not shared");
                written = false;
            }
        }
        written
    }

    /// One beat on the board; resyncs this node's members when the board lost them (or
    /// `resync` says a write failed). Returns whether a resync is still due.
    async fn beat(&self, resync: bool) -> bool {
        let Some(board) = &self.rolls.board else {
            return false;
        };
        match board.beat().await {
            Ok(unknown) if unknown || resync => {
                let members = Rolls::everyone(&self.rosters());
                match board.resync(&members).await {
                    Ok(()) => false,
                    Err(error) => {
                        tracing::warn!(%error, "presence: resync failed");
                        true
                    }
                }
            }
            Ok(_) => false,
            Err(error) => {
                tracing::debug!(%error, "presence: no beat");
                true
            }
        }
    }

    /// Passes another node's envelope to this node's watchers of its topic.
    fn tell_remote(&self, envelope: &RemotePresence) {
        if envelope.origin == *self.rolls.key {
            return;
        }
        if let Some(roster) = self.roster_of(&envelope.topic) {
            roster.tell(&envelope.envelope);
        }
    }

    /// Once the connections have ended (or the grace ran out): tells every member's leaving,
    /// so that other nodes need not wait for this one to be declared dead.
    pub async fn leave_all(&self) {
        let _ = self.flush_presence().await;
        let Some(board) = &self.rolls.board else {
            return;
        };
        for (topic, leaves) in Rolls::everyone(&self.rosters()) {
            let envelope = Diff::capped(Vec::new(), leaves.clone()).envelope(&topic);
            let change = PresenceChange {
                joins: &[],
                leaves: &leaves,
                envelope: Some(&envelope),
                emptied: true,
            };
            if let Err(error) = board.write(&topic, change).await {
                tracing::warn!(%error, "presence: could not tell the last leaves");
                return;
            }
        }
    }
}
