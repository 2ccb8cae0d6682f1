//! An outlet: one streaming connection as the fan-out sees it.
//!
//! The fan-out writers ([`super::fanout`]) hand each message to every outlet that follows its
//! topic. When nothing is queued for the connection and it has a plain TCP socket, the writer
//! writes the message's pre-framed bytes straight to the socket with a non-blocking
//! `try_write`: no task wake-up, no copy, no per-connection buffer. Only when a write would
//! block (or lands partially) is the rest queued here and the connection's own task woken to
//! finish it; from then on, until the queue is empty, everything for that connection is
//! queued behind it, so bytes never interleave or reorder.
//!
//! Each topic the connection follows is a [`Sub`] with a cursor: the id of the last message
//! written or queued. A message is accepted only if it is the cursor's successor. Anything
//! else (a gap, a queue that overflowed, a subscription still reading its history) marks the
//! sub *lost*: the writers then only note the newest id they offered, and the connection's
//! task reads what it missed from the topic's log by cursor ([`Outlet::catch_up`]) before
//! the sub is live again. That one rule gives exactly-once, in-order delivery across history
//! and live, concurrent publishers, slow consumers and shutdown.
//!
//! What a connection's task does is asked with [`Outlet::poll_action`]: write queued bytes,
//! catch a sub up from its log, or end (and why). A connection without a shared socket (TLS,
//! a response body driven by hyper) gets the same protocol with every write queued.

use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    sync::{Arc, Mutex, MutexGuard, Weak},
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use smallvec::SmallVec;
use tokio::net::TcpStream;

use super::{
    Topic,
    format::{Format, Frames},
    multi::{self, Book, Key, SharedLines, Standing},
    roster::Pass,
    tally::Tally,
};
use crate::message::{Message, MessageId, TopicName, TransportKind, wire};

/// Why an outlet must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// A write failed: the peer is gone. Nothing more can be sent.
    Gone,
    /// The peer let `--subscriber-queue` messages pile up under `--slow-consumer disconnect`.
    SlowConsumer,
    /// A WebSocket peer did not answer a ping within `--ws-pong-timeout`.
    Unresponsive,
    /// The server is stopping, and everything published before the stop has been written.
    Drained,
    /// What it follows has ended (a closed or deleted Durable Stream): everything up to the
    /// end was written, then its last bytes ([`Outlet::finish_after`]).
    Finished,
    /// A pattern it follows picked up a topic beyond `--max-subscriptions-per-connection`.
    TooManyTopics,
}

/// Why [`Outlet::add_sub`] added no sub.
#[derive(Debug)]
pub(super) enum Refused {
    /// The connection follows the topic already, with this sub.
    Following(SubId),
    /// The connection follows as many topics as it may.
    Full,
    /// The connection has ended.
    Ended,
}

/// What a connection's task must do next.
#[derive(Debug)]
pub enum Action {
    /// Write these bytes, in order, completely, before asking again.
    Write(Vec<Bytes>),
    /// Read what a sub missed from its topic's log: pass this to [`Outlet::catch_up`].
    CatchUp(CatchUp),
    /// End the connection.
    End(End),
}

/// A catch-up read to make, from [`Action::CatchUp`].
#[derive(Debug)]
pub struct CatchUp {
    sub: usize,
    topic: Arc<Topic>,
    after: MessageId,
    from_client: bool,
    limit: usize,
}

impl CatchUp {
    /// The topic of the sub to catch up.
    pub fn topic(&self) -> &TopicName {
        &self.topic.name
    }
}

/// A handle on one sub of an outlet (one topic it follows), returned by
/// [`crate::hub::Hub::subscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubId(usize);

impl SubId {
    pub(super) fn index(self) -> usize {
        self.0
    }
}

/// A sub not placed in its topic's follower list yet.
const NO_SLOT: u32 = u32::MAX;

/// One topic an outlet follows: 32 bytes (a unit test holds it), as a connection holds one
/// per topic it follows.
pub(super) struct Sub {
    pub(super) topic: Arc<Topic>,
    /// Where the outlet sits in the topic's list of followers ([`NO_SLOT`] until placed):
    /// 4 bytes, not an `Option<usize>`'s 16, as a connection holds a sub per topic.
    slot: u32,
    /// The id of the last message written or queued (or the starting cursor).
    sent: MessageId,
    /// While lost: the newest id a writer offered since the current catch-up read began,
    /// so the catch-up knows whether that read can have missed something.
    seen: MessageId,
    /// Must read from the log after `sent` before taking live messages again.
    lost: bool,
    /// `sent` is still the client's own cursor, where 0 means "from the oldest retained".
    from_client: bool,
    /// What its connection counts as in its topic's subscribers, until the sub is dropped.
    transport: TransportKind,
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.topic.presence.leave(self.transport);
    }
}

impl Standing for Option<Sub> {
    fn standing(&self) -> Option<(u64, MessageId)> {
        self.as_ref().map(|sub| (sub.topic.hash, sub.sent))
    }
}

/// Everything the writers and the connection's task share, behind one lock.
#[derive(Default)]
struct State {
    /// Bytes accepted but not yet written, in order. Non-empty only while `busy`.
    pending: VecDeque<Bytes>,
    /// The connection's task owns the socket's writes (it is flushing, catching up, or must
    /// be woken to do so): writers queue instead of writing.
    busy: bool,
    waker: Option<Waker>,
    subs: SmallVec<[Option<Sub>; 1]>,
    end: Option<End>,
    /// The server is stopping: catch every sub up from its log, write it, then end.
    draining: bool,
    /// The connection's task is writing its last bytes (a close frame, the end of a stream):
    /// nothing more is accepted, so nothing can follow them.
    sealed: bool,
    /// Something was written since the last heartbeat tick.
    active: bool,
    /// The ping round this connection has not answered yet (0: none).
    unanswered_ping: u32,
    /// Bytes to end with once a sub has been sent a given message ([`Outlet::finish_after`]).
    finale: Option<Finale>,
    /// A connection that follows a request's topic list: how its cursor names each sub.
    book: Option<Box<Book>>,
    /// Who the connection says it is, for presence ([`Outlet::present_as`]).
    named: Option<Box<Named>>,
}

/// A connection that takes part in presence: who it says it is, and by sub index the place
/// in its topic's roster each sub holds (left when the sub goes).
struct Named {
    presenter: Arc<super::Presenter>,
    passes: Vec<(usize, Pass)>,
}

impl State {
    /// Takes the roster place sub `index` holds, if any (to drop outside the lock).
    fn take_pass(&mut self, index: usize) -> Option<Pass> {
        let passes = &mut self.named.as_mut()?.passes;
        let at = passes.iter().position(|&(sub, _)| sub == index)?;
        Some(passes.swap_remove(at).1)
    }
}

/// The end of an outlet that waits for a sub to reach a message.
struct Finale {
    sub: usize,
    last: MessageId,
    bytes: Bytes,
}

/// One streaming connection's delivery state.
pub struct Outlet {
    state: Mutex<State>,
    /// The connection's socket, when writers may write to it directly.
    socket: Option<Arc<TcpStream>>,
    format: Format,
    /// Where its messages' bytes come from.
    frames: Frames,
    transport: TransportKind,
    /// The fan-out shard that serves this connection.
    pub(super) shard: usize,
    /// Where this outlet is in its shard's registry (heartbeats, pings, drain).
    registry_slot: usize,
    queue_limit: usize,
    disconnect_slow: bool,
    catch_up_batch: usize,
    fanout: Arc<dyn Shards>,
}

impl std::fmt::Debug for Outlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outlet")
            .field("format", &self.format)
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

/// The fan-out an outlet belongs to, as the outlet sees it: which shard serves a new
/// connection, where it registers for the ticker's walks and the drain, and whether it must
/// drain at once. (The fan-out implements it; naming it here, not the fan-out's type, keeps
/// the two files from importing each other.)
pub(super) trait Shards: Send + Sync {
    /// The shard for a new connection.
    fn pick_shard(&self) -> usize;
    /// Whether the server is draining (a new outlet drains at once).
    fn is_draining(&self) -> bool;
    /// Adds an outlet to its shard's registry; returns its slot.
    fn register(&self, shard: usize, outlet: Weak<Outlet>) -> usize;
    /// Removes the outlet in `slot` of `shard`'s registry.
    fn unregister(&self, shard: usize, slot: usize);
}

/// Which follower list an offer comes from, by address: a sub's slot may have been reused
/// for another topic after the writer read the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ListId(usize);

impl ListId {
    /// The identity of the list behind `list`.
    pub(super) fn of<T>(list: &Arc<T>) -> Self {
        Self(Arc::as_ptr(list).cast::<()>() as usize)
    }
}

/// What [`Outlet::take`] took of an offer: the sub's cursor before and after, and whether a
/// message was missing.
struct Taken {
    /// Messages accepted.
    count: usize,
    first_sent: MessageId,
    last_sent: MessageId,
    gap: bool,
}

/// One offer to a sub, once taken: what writing or queueing it needs.
struct Offer {
    sub: usize,
    /// Messages accepted.
    accepted: usize,
    taken: Taken,
    /// The newest id offered.
    newest: MessageId,
    /// The first message's publish time (latency).
    time: u64,
}

/// Several SSE events in one write make one chunk: a chunk header for all of them, the
/// shared unchunked frames, the chunk's end. Nothing is copied. The events are the ones
/// [`Outlet::take`] accepted, picked again by the same rule (each the successor of the one
/// before), so a repeated id is not sent twice.
fn one_chunk(messages: &[Arc<Message>], taken: &Taken, frames: &mut Vec<Bytes>) {
    frames.clear();
    let mut next = taken.first_sent + 1;
    for message in messages {
        if message.id == next && message.id <= taken.last_sent {
            frames.push(message.sse_frame().clone());
            next += 1;
        }
    }
    let len: usize = frames.iter().map(Bytes::len).sum();
    let mut header = Vec::with_capacity(12);
    wire::push_chunk_start(&mut header, len);
    frames.insert(0, Bytes::from(header));
    frames.push(Bytes::from_static(wire::CHUNK_END));
}

/// What a fan-out writer reuses from one delivery to the next in its walks: the frames of
/// one offer, what it counts, and the SSE `id:` lines it wrote for the walk's messages.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) frames: Vec<Bytes>,
    pub(super) tally: Tally,
    pub(super) lines: SharedLines,
}

/// The most bytes one [`Action::Write`] hands out: a bound on one `writev`.
const WRITE_BATCH: usize = 64;

impl Outlet {
    pub(super) fn new(
        fanout: Arc<dyn Shards>,
        socket: Option<Arc<TcpStream>>,
        format: Format,
        frames: Frames,
        transport: TransportKind,
        settings: &super::HubSettings,
    ) -> Arc<Self> {
        let shard = fanout.pick_shard();
        let draining = fanout.is_draining();
        let outlet = Arc::new_cyclic(|me| Self {
            state: Mutex::new(State {
                // The task writes the response head (or the handshake) first: until its first
                // flush, writers queue behind it.
                busy: true,
                draining,
                ..State::default()
            }),
            socket,
            format,
            frames,
            transport,
            shard,
            registry_slot: fanout.register(shard, me.clone()),
            queue_limit: settings.subscriber_queue.max(1),
            disconnect_slow: settings.slow_consumer == super::SlowConsumerPolicy::Disconnect,
            catch_up_batch: settings.catch_up_batch.max(1),
            fanout: fanout.clone(),
        });
        // A drain that began after the first look walked the registry before this outlet was
        // in it (the registry's lock orders the two): drain it here.
        if !draining && fanout.is_draining() {
            outlet.drain();
        }
        outlet
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent between statements that could
        // panic, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bytes that carry `message` to this connection.
    fn frame(&self, message: &Arc<Message>) -> Bytes {
        self.frames.frame(message)
    }

    /// How this outlet frames messages.
    pub fn format(&self) -> Format {
        self.format
    }

    /// What the outlet's connection is counted as.
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// Makes this the outlet of a connection that follows a request's topic list: its
    /// cursor names each sub by the key it is added with, and carries `carried` (the
    /// client's entries for topics not followed now). Called before any sub is added.
    pub(super) fn keep_book(&self, carried: Vec<(u64, MessageId)>, limit: usize) {
        self.lock()
            .book
            .get_or_insert_with(|| Box::new(Book::new(carried, limit)));
    }

    /// The cursor over every topic the outlet follows by key (a connection with a book).
    pub fn list_cursor(&self) -> Option<String> {
        let mut state = self.lock();
        let state = &mut *state;
        Some(state.book.as_ref()?.cursor(&state.subs).encode())
    }

    /// Stops following a pattern: leaves its registry entry, and stops following the topics
    /// it picked up that no other watched pattern selects. Whether it was followed.
    pub(super) fn unwatch_prefix(&self, prefix: &str) -> bool {
        let dropped: Vec<SubId> = {
            let mut state = self.lock();
            let state = &mut *state;
            let Some(book) = state.book.as_mut() else {
                return false;
            };
            if !book.unwatch_prefix(prefix) {
                return false;
            }
            state
                .subs
                .iter()
                .enumerate()
                .filter_map(|(index, sub)| {
                    let sub = sub.as_ref()?;
                    book.only_by(index, sub.topic.name.as_str(), prefix)
                        .then_some(SubId(index))
                })
                .collect()
        };
        for sub in dropped {
            self.unsubscribe(sub);
        }
        true
    }

    /// Runs `f` on the outlet's book: `None` when it has none or has ended.
    pub(super) fn with_book<R>(&self, f: impl FnOnce(&mut Book) -> R) -> Option<R> {
        let mut state = self.lock();
        if state.end.is_some() {
            return None;
        }
        state.book.as_deref_mut().map(f)
    }

    /// Queues what a connection with a book sends once every listed topic is followed: its
    /// first cursor ([`Book::opening`]).
    pub fn open_cursor(&self) {
        let mut state = self.lock();
        let state = &mut *state;
        if state.sealed {
            return;
        }
        let Some(book) = state.book.as_mut() else {
            return;
        };
        if let Some(bytes) = book.opening(&state.subs, self.format) {
            state.pending.push_back(bytes);
            state.busy = true;
            state.active = true;
        }
    }

    /// Adds a topic to follow from `sent` (lost until its first catch-up), named `key` in
    /// the cursor of a connection with a book. Called by the hub.
    /// A connection with a book follows each topic once, and at most its limit: else
    /// nothing is added ([`Refused`]).
    /// `pass` is the sub's place in its topic's roster (a named connection's).
    pub(super) fn add_sub(
        &self,
        topic: Arc<Topic>,
        pass: Option<Pass>,
        key: Option<Key>,
    ) -> Result<SubId, Refused> {
        let mut state = self.lock();
        let state = &mut *state;
        if state.end.is_some() {
            // Detached (or ending): a sub added now would never be removed, and would keep
            // the outlet, its socket and the topic alive (a pattern's join that awaited the
            // store while the client left).
            return Err(Refused::Ended);
        }
        if let Some(book) = &mut state.book {
            let mut count = 0;
            for (index, sub) in state.subs.iter().enumerate() {
                if let Some(sub) = sub {
                    // The hashes first: a list's subs are compared with every one before.
                    if sub.topic.hash == topic.hash && sub.topic.name == topic.name {
                        // A topic the list names, joined first by a pattern: the list's
                        // position is what its cursor must name it by (a reconnect to the
                        // same URL looks it up there).
                        if let Some(key @ Key::Listed(_)) = key {
                            book.name(index, key);
                        }
                        return Err(Refused::Following(SubId(index)));
                    }
                    count += 1;
                }
            }
            if count >= book.limit() {
                return Err(Refused::Full);
            }
        }
        topic.presence.join(self.transport);
        let sub = Sub {
            topic,
            slot: NO_SLOT,
            sent: 0,
            seen: 0,
            lost: true,
            from_client: false,
            transport: self.transport,
        };
        let index = match state.subs.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                state.subs.push(None);
                state.subs.len() - 1
            }
        };
        state.subs[index] = Some(sub);
        if let (Some(named), Some(pass)) = (state.named.as_mut(), pass) {
            named.passes.push((index, pass));
        }
        if let Some(book) = state.book.as_mut() {
            match key {
                Some(key) => book.name(index, key),
                None => book.stale(),
            }
        }
        Ok(SubId(index))
    }

    /// Records where the sub sits in its topic's follower list, so that it is removed from
    /// there with the sub. `false` when the sub is gone (the connection ended meanwhile): the
    /// caller removes the follower it added.
    pub(super) fn place_sub(&self, sub: SubId, slot: usize) -> bool {
        let Ok(slot) = u32::try_from(slot) else {
            return false;
        };
        let mut state = self.lock();
        match state.subs.get_mut(sub.0) {
            Some(Some(entry)) if slot != NO_SLOT => {
                entry.slot = slot;
                true
            }
            _ => false,
        }
    }

    /// Sets the starting cursor of a placed sub.
    pub(super) fn start_sub(&self, sub: SubId, sent: MessageId, from_client: bool) -> bool {
        let mut state = self.lock();
        match state.subs.get_mut(sub.0) {
            Some(Some(entry)) => {
                entry.sent = sent;
                entry.from_client = from_client;
            }
            _ => return false,
        }
        if let Some(book) = state.book.as_mut() {
            book.stale();
        }
        // A sub added to a running connection (a pattern's new topic) is read by its task:
        // wake it, as a message offered to a sub that is still lost does not.
        Self::wake(&mut state);
        // Queued under the same lock as the cursor is set: before any message of the sub.
        // (A connection with a book sends one cursor for all its subs: `open_cursor`.)
        if state.book.is_none()
            && let Some(line) = self.format.start(sent)
            && !state.sealed
        {
            state.pending.push_back(line);
            state.busy = true;
            state.active = true;
        }
        true
    }

    /// The cursor of a sub: the last id written or queued to it.
    pub fn cursor(&self, sub: SubId) -> Option<MessageId> {
        let state = self.lock();
        state.subs.get(sub.0)?.as_ref().map(|s| s.sent)
    }

    /// The sub that follows `topic`, if one does, and whether the connection's cursor names
    /// it (a topic of the request's list, or one a pattern picked up). A walk of the subs: a
    /// connection follows at most `--max-subscriptions-per-connection` topics, and this is
    /// asked per command, not per message.
    pub fn sub_of(&self, topic: &TopicName) -> Option<(SubId, bool)> {
        let state = self.lock();
        let index = state
            .subs
            .iter()
            .position(|sub| sub.as_ref().is_some_and(|sub| sub.topic.name == *topic))?;
        let named = state.book.as_ref().is_some_and(|book| book.names(index));
        Some((SubId(index), named))
    }

    /// How many topics the outlet follows.
    pub fn sub_count(&self) -> usize {
        self.lock().subs.iter().flatten().count()
    }

    /// Stops following one topic; returns whether the sub existed.
    pub fn unsubscribe(&self, sub: SubId) -> bool {
        // Dropped outside the lock, with the roster place it held.
        let (removed, _pass) = {
            let mut state = self.lock();
            if let Some(book) = state.book.as_mut() {
                book.forget(sub.0);
            }
            let pass = state.take_pass(sub.0);
            (state.subs.get_mut(sub.0).and_then(Option::take), pass)
        };
        match removed {
            Some(sub) => {
                if sub.slot != NO_SLOT {
                    sub.topic.live.remove(self.shard, sub.slot as usize);
                }
                true
            }
            None => false,
        }
    }

    /// Stops following every topic and leaves the registry: called when the connection ends
    /// (by [`OutletGuard`]), so that no writer keeps the outlet alive.
    pub fn detach(&self) {
        let (subs, _named) = {
            let mut state = self.lock();
            state.end.get_or_insert(End::Gone);
            state.waker = None;
            if let Some(book) = state.book.as_mut() {
                book.unwatch();
            }
            (std::mem::take(&mut state.subs), state.named.take())
        };
        for sub in subs.into_iter().flatten() {
            if sub.slot != NO_SLOT {
                sub.topic.live.remove(self.shard, sub.slot as usize);
            }
        }
        self.fanout.unregister(self.shard, self.registry_slot);
    }

    /// Called by a fan-out writer: offers `messages` (one topic's, in id order) to sub `sub`,
    /// with the writer's `scratch` for its walk over the topic's followers.
    /// In steps: take the successors of the sub's cursor ([`Outlet::take`]), join several
    /// SSE chunks into one ([`one_chunk`]), seal after a finale, then write them straight to
    /// the socket ([`Outlet::write_direct`]) or queue them ([`Outlet::enqueue`]).
    pub(super) fn deliver(
        &self,
        sub: usize,
        live: ListId,
        messages: &[Arc<Message>],
        scratch: &mut Scratch,
    ) {
        let Scratch {
            frames,
            tally,
            lines,
        } = scratch;
        let mut state = self.lock();
        let state = &mut *state;
        if state.end.is_some() || state.sealed {
            return;
        }
        let stop = Self::stop(&state.finale, sub);
        let Some(Some(entry)) = state.subs.get_mut(sub) else {
            return;
        };
        if ListId::of(&entry.topic.live) != live {
            // The slot was reused for another topic after the writer read the follower list.
            return;
        }
        let newest = messages.last().map_or(0, |m| m.id);
        if entry.lost {
            entry.seen = entry.seen.max(newest);
            return;
        }
        let bounds = (stop, newest);
        let taken = match state.book.as_deref_mut() {
            Some(book) if multi::writes_ids(self.format) => Self::take(
                &mut state.subs,
                sub,
                messages,
                bounds,
                frames,
                |subs, m, frames| book.shared_event(subs, sub, m, self.format, frames, lines),
            ),
            _ => Self::take(
                &mut state.subs,
                sub,
                messages,
                bounds,
                frames,
                |_, m, frames| frames.push(self.frame(m)),
            ),
        };
        if frames.is_empty() {
            if taken.gap {
                Self::wake(state);
            }
            return;
        }
        let finished = Self::finale_due(&mut state.finale, sub, taken.last_sent);
        let accepted = taken.count;
        if self.format == Format::SseChunked && accepted > 1 && state.book.is_none() {
            one_chunk(messages, &taken, frames);
        }
        if let Some(last) = finished {
            Self::seal_with(state, last, frames);
        }
        let offer = Offer {
            sub,
            accepted,
            taken,
            newest,
            time: messages[0].time,
        };
        match &self.socket {
            Some(socket) if !state.busy && state.pending.is_empty() => {
                self.write_direct(state, socket, frames, &offer, tally);
            }
            _ => self.enqueue(state, frames, &offer, tally),
        }
    }

    /// The write holds the message the outlet was to end after: its `last` bytes follow in
    /// the same write, and nothing else is accepted.
    fn seal_with(state: &mut State, last: Bytes, frames: &mut Vec<Bytes>) {
        if !last.is_empty() {
            frames.push(last);
        }
        state.sealed = true;
        state.end.get_or_insert(End::Finished);
        Self::wake(state);
    }

    /// Takes from `messages` the successors of sub `sub`'s cursor, up to `stop`, framed into
    /// `frames`, and moves the cursor; a message missing in between marks the sub lost (the
    /// log has it). `frame` frames one message, after the cursor moved past it (it sees
    /// every sub: an SSE connection with a book writes the cursor of all of them); generic,
    /// so that the single-topic path is compiled without the book's branch.
    fn take(
        subs: &mut [Option<Sub>],
        sub: usize,
        messages: &[Arc<Message>],
        (stop, newest): (MessageId, MessageId),
        frames: &mut Vec<Bytes>,
        mut frame: impl FnMut(&[Option<Sub>], &Arc<Message>, &mut Vec<Bytes>),
    ) -> Taken {
        frames.clear();
        let first_sent = subs[sub].as_ref().map_or(0, |s| s.sent);
        let (mut count, mut gap) = (0, false);
        for message in messages {
            let Some(entry) = subs[sub].as_mut() else {
                break;
            };
            if message.id <= entry.sent {
                continue;
            }
            if message.id > stop {
                break;
            }
            if message.id != entry.sent + 1 {
                // Delivered out of order, or never offered.
                gap = true;
                entry.lost = true;
                entry.seen = entry.seen.max(newest);
                break;
            }
            entry.sent = message.id;
            frame(subs, message, frames);
            count += 1;
        }
        Taken {
            count,
            first_sent,
            last_sent: subs[sub].as_ref().map_or(first_sent, |s| s.sent),
            gap,
        }
    }

    /// Writes an offer's frames straight to the socket (nothing is queued before them); what
    /// the socket does not take is queued and the connection's task woken to finish it.
    fn write_direct(
        &self,
        state: &mut State,
        socket: &TcpStream,
        frames: &[Bytes],
        offer: &Offer,
        tally: &mut Tally,
    ) {
        match write_now(socket, frames) {
            Ok(written) => {
                tally.delivered(self.transport, offer.accepted, frames, offer.time);
                state.active = true;
                if queue_rest(&mut state.pending, frames, written) {
                    crate::telemetry::blocked_write();
                    state.busy = true;
                    Self::wake(state);
                } else if offer.taken.gap {
                    Self::wake(state);
                }
            }
            Err(_) => {
                state.end = Some(End::Gone);
                Self::wake(state);
            }
        }
    }

    /// Queues an offer's frames for the connection's task, unless that would overflow its
    /// queue: then the slow-consumer policy decides (end it, or take the offer back and have
    /// the sub read its backlog from the log).
    fn enqueue(
        &self,
        state: &mut State,
        frames: &mut Vec<Bytes>,
        offer: &Offer,
        tally: &mut Tally,
    ) {
        if state.pending.len() + offer.accepted > self.queue_limit && !state.sealed {
            // The connection is not keeping up (unless these are its last messages).
            if self.disconnect_slow {
                crate::telemetry::slow_consumer("disconnect");
                state.end.get_or_insert(End::SlowConsumer);
            } else {
                crate::telemetry::slow_consumer("resync");
                let Some(Some(entry)) = state.subs.get_mut(offer.sub) else {
                    return;
                };
                entry.sent = offer.taken.first_sent;
                entry.lost = true;
                if let Some(book) = state.book.as_mut() {
                    // The lines written for the offer are not sent.
                    book.stale();
                }
                entry.seen = entry.seen.max(offer.newest);
            }
            Self::wake(state);
            return;
        }
        tally.delivered(self.transport, offer.accepted, frames, offer.time);
        state.pending.extend(frames.drain(..));
        state.active = true;
        if !state.busy {
            state.busy = true;
            Self::wake(state);
        }
    }

    /// Makes room for `more` subs (and their cursor keys) at once: a topic list's size is
    /// known before it is followed, and a vector grown by doubling would hold up to twice
    /// the memory per topic an idle connection needs.
    pub fn reserve(&self, more: usize) {
        let mut state = self.lock();
        let state = &mut *state;
        let free = state.subs.iter().filter(|sub| sub.is_none()).count();
        let more = more.saturating_sub(free);
        state.subs.reserve_exact(more);
        if let Some(book) = state.book.as_mut() {
            book.reserve(state.subs.len() + more);
        }
    }

    /// Names the connection for presence: the topics it subscribes to from now on list it
    /// (when named) and send it their `presence` envelopes (when it asked for them).
    pub fn present_as(&self, presenter: super::Presenter) {
        self.lock().named = presenter.is_some().then(|| {
            Box::new(Named {
                presenter: Arc::new(presenter),
                passes: Vec::new(),
            })
        });
    }

    /// Who the connection says it is, if it said.
    pub(super) fn presenter(&self) -> Option<Arc<super::Presenter>> {
        Some(self.lock().named.as_ref()?.presenter.clone())
    }

    /// Sends bytes that are not a message (a reply, a heartbeat, a handshake): written at
    /// once when the socket is free, else queued behind what is pending. Never dropped for
    /// the queue bound: these are few and small.
    pub fn send(&self, bytes: Bytes) {
        self.send_marked(bytes, true);
    }

    /// [`Outlet::send`]; `activity`: whether the bytes count as traffic that makes the next
    /// heartbeat unneeded (a heartbeat itself does not, or an idle stream would get one every
    /// other interval).
    fn send_marked(&self, bytes: Bytes, activity: bool) {
        let mut state = self.lock();
        let state = &mut *state;
        if state.end == Some(End::Gone) || state.sealed {
            return;
        }
        state.active |= activity;
        if !state.busy
            && state.pending.is_empty()
            && let Some(socket) = &self.socket
        {
            {
                let frames = [bytes];
                match write_now(socket, &frames) {
                    Ok(written) => {
                        if queue_rest(&mut state.pending, &frames, written) {
                            crate::telemetry::blocked_write();
                            state.busy = true;
                            Self::wake(state);
                        }
                    }
                    Err(_) => {
                        state.end = Some(End::Gone);
                        Self::wake(state);
                    }
                }
                return;
            }
        }
        state.pending.push_back(bytes);
        if !state.busy {
            state.busy = true;
            Self::wake(state);
        }
    }

    /// Queues bytes for the connection's own task to write on its next turn; for the task
    /// itself (a reply), which asks [`Outlet::poll_action`] right after, so no wake-up.
    pub fn push(&self, bytes: Bytes) {
        let mut state = self.lock();
        if state.sealed {
            return;
        }
        state.pending.push_back(bytes);
        state.busy = true;
        state.active = true;
    }

    /// Queues the connection's last bytes (a WebSocket close frame), even on a sealed outlet,
    /// and seals it in the same step, so that nothing the fan-out offers meanwhile lands
    /// behind them.
    pub fn push_last(&self, bytes: Bytes) {
        let mut state = self.lock();
        state.pending.push_back(bytes);
        state.busy = true;
        state.sealed = true;
    }

    /// Accepts nothing more (messages, heartbeats, replies): the connection's task is about
    /// to write what is queued and end. What is already queued stays, in order.
    pub fn seal(&self) {
        self.lock().sealed = true;
    }

    /// Ends the outlet once sub `sub` has been sent message `last` (at once if it has):
    /// `bytes` are written after everything before them, and nothing after. For a source
    /// that ends (a Durable Stream closed at `last`), whose last messages may still be on
    /// their way through the fan-out or in the log.
    pub fn finish_after(&self, sub: SubId, last: MessageId, bytes: Bytes) {
        let mut state = self.lock();
        let state = &mut *state;
        if state.sealed || state.end.is_some() {
            return;
        }
        let Some(Some(entry)) = state.subs.get(sub.0) else {
            return;
        };
        if entry.sent >= last {
            Self::queue_finale(state, bytes);
            state.busy = true;
        } else {
            state.finale = Some(Finale {
                sub: sub.0,
                last,
                bytes,
            });
        }
        Self::wake(state);
    }

    /// The last message sub `sub` may be sent: the one it ends after, if it is to end.
    fn stop(finale: &Option<Finale>, sub: usize) -> MessageId {
        finale
            .as_ref()
            .filter(|f| f.sub == sub)
            .map_or(MessageId::MAX, |f| f.last)
    }

    /// The last bytes to queue now that sub `sub` was sent up to `sent`, if they are due.
    fn finale_due(finale: &mut Option<Finale>, sub: usize, sent: MessageId) -> Option<Bytes> {
        finale
            .take_if(|f| f.sub == sub && sent >= f.last)
            .map(|f| f.bytes)
    }

    /// Queues an outlet's last bytes and ends it: nothing is accepted after them.
    fn queue_finale(state: &mut State, bytes: Bytes) {
        if !bytes.is_empty() {
            state.pending.push_back(bytes);
        }
        state.sealed = true;
        state.end.get_or_insert(End::Finished);
    }

    fn wake(state: &mut State) {
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }

    /// Ends the outlet (the ping round went unanswered, or the task decided so).
    pub(super) fn end(&self, end: End) {
        let mut state = self.lock();
        state.end.get_or_insert(end);
        Self::wake(&mut state);
    }

    /// What the connection's task must do next; registers its waker when nothing.
    pub fn poll_action(&self, cx: &mut Context<'_>) -> Poll<Action> {
        let mut state = self.lock();
        let state = &mut *state;
        if matches!(state.end, Some(End::Gone | End::Unresponsive)) {
            return Poll::Ready(Action::End(state.end.expect("checked")));
        }
        if !state.pending.is_empty() {
            state.busy = true;
            let take = state.pending.len().min(WRITE_BATCH);
            let batch: Vec<Bytes> = state.pending.drain(..take).collect();
            if state.pending.is_empty() {
                // An idle connection keeps no queue allocated.
                state.pending = VecDeque::new();
            }
            return Poll::Ready(Action::Write(batch));
        }
        if let Some(end) = state.end {
            return Poll::Ready(Action::End(end));
        }
        let lost = state
            .subs
            .iter_mut()
            .enumerate()
            .find_map(|(i, s)| s.as_mut().filter(|s| s.lost).map(|s| (i, s)));
        if let Some((index, sub)) = lost {
            // Whatever was offered before this read was appended before it, so the read
            // finds it: only what is offered from now on may be newer than what it returns.
            sub.seen = 0;
            state.busy = true;
            let room = self.queue_limit.saturating_sub(state.pending.len()).max(1);
            return Poll::Ready(Action::CatchUp(CatchUp {
                sub: index,
                topic: sub.topic.clone(),
                after: sub.sent,
                from_client: sub.from_client,
                limit: self.catch_up_batch.min(room),
            }));
        }
        if state.draining {
            return Poll::Ready(Action::End(End::Drained));
        }
        state.busy = false;
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Takes queued bytes regardless of anything else (the last writes of a connection that
    /// is ending); `None` when nothing is queued.
    pub fn take_pending(&self) -> Option<Vec<Bytes>> {
        let mut state = self.lock();
        if state.pending.is_empty() {
            return None;
        }
        let take = state.pending.len().min(WRITE_BATCH);
        Some(state.pending.drain(..take).collect())
    }

    /// Reads what a sub missed from its log and queues it (signal first, then messages),
    /// counted as delivered. The sub goes live again once nothing newer was offered to it
    /// meanwhile; otherwise the next [`Outlet::poll_action`] asks for another read.
    pub async fn catch_up(&self, catch_up: CatchUp) -> Result<(), super::HubError> {
        let CatchUp {
            sub,
            topic,
            after,
            from_client,
            limit,
        } = catch_up;
        let batch = topic.read_batch(after, limit, from_client).await;
        let mut state = self.lock();
        let state = &mut *state;
        if state.sealed {
            return Ok(());
        }
        let stop = Self::stop(&state.finale, sub);
        let Some(Some(entry)) = state.subs.get_mut(sub) else {
            return Ok(());
        };
        if !Arc::ptr_eq(&entry.topic, &topic) || entry.sent != after {
            return Ok(());
        }
        let batch = batch?;
        entry.from_client = false;
        let ids = state
            .book
            .as_deref_mut()
            .filter(|_| multi::writes_ids(self.format));
        let (delivered, bytes) =
            self.queue_batch(&mut state.subs, ids, sub, &batch, stop, &mut state.pending);
        let Some(Some(entry)) = state.subs.get_mut(sub) else {
            return Ok(());
        };
        if batch.messages.is_empty() {
            // Nothing retained after the cursor: resume from the newest id, so that a
            // truncation or reset is signalled once, not again at the next read.
            entry.sent = entry.sent.max(batch.last_id);
            if let Some(book) = state.book.as_mut() {
                book.stale();
            }
        }
        // `seen` holds only what was offered since the read began (see `poll_action`): one
        // that the read may not have found. (Were older offers kept, an id from before ids
        // restarted, a reset, would keep the sub reading forever.)
        entry.lost = batch.more || entry.seen > entry.sent;
        let sent = entry.sent;
        if let Some(last) = Self::finale_due(&mut state.finale, sub, sent) {
            Self::queue_finale(state, last);
        }
        if delivered > 0 || !state.pending.is_empty() {
            state.active = true;
        }
        topic.live.fanout().record(self.transport, delivered, bytes);
        Ok(())
    }

    /// Queues a catch-up's batch for sub `sub` (signal first, then messages up to `stop`);
    /// returns the messages and bytes queued. With `ids` (an SSE connection with a book) each
    /// event is its shared fields and the connection's own `id:` line, all in one chunk when
    /// the body is chunked.
    fn queue_batch(
        &self,
        subs: &mut [Option<Sub>],
        mut ids: Option<&mut Book>,
        sub: usize,
        batch: &super::Batch,
        stop: MessageId,
        pending: &mut VecDeque<Bytes>,
    ) -> (u64, u64) {
        let mut pieces = Vec::new();
        let Some(entry) = subs[sub].as_mut() else {
            return (0, 0);
        };
        if let Some(signal) = &batch.signal {
            entry.sent = signal.resume_after();
            match ids.as_deref_mut() {
                Some(book) => {
                    let fields = multi::signal_fields(signal, &entry.topic.name, self.format);
                    book.event(subs, sub, fields, self.format, &mut pieces);
                }
                None => pieces.extend(self.format.signal(&entry.topic.name, signal)),
            }
        }
        // Messages and their bytes, as delivered (the signal and chunk framing are not).
        let (mut delivered, mut bytes) = (0u64, 0u64);
        for message in &batch.messages {
            let entry = subs[sub].as_mut().expect("checked");
            if message.id <= entry.sent {
                continue;
            }
            if message.id > stop {
                break;
            }
            entry.sent = message.id;
            let before = pieces.len();
            match ids.as_deref_mut() {
                Some(book) => {
                    book.message_event(subs, sub, message, self.format, &mut pieces);
                }
                None => pieces.push(self.frame(message)),
            }
            bytes += pieces[before..].iter().map(|p| p.len() as u64).sum::<u64>();
            delivered += 1;
        }
        pending.extend(pieces);
        (delivered, bytes)
    }

    /// Drops one sub whose catch-up failed; the caller tells the client.
    pub fn abandon(&self, catch_up: &CatchUp) {
        self.unsubscribe(SubId(catch_up.sub));
    }

    /// The sub a catch-up was for.
    pub fn catch_up_sub(catch_up: &CatchUp) -> SubId {
        SubId(catch_up.sub)
    }

    /// Marks the connection as heard from (any frame): it answered the pending ping round.
    pub fn heard(&self) {
        let mut state = self.lock();
        state.unanswered_ping = 0;
    }

    /// Ticker duty: a heartbeat if nothing was written since the last tick.
    pub(super) fn heartbeat_if_idle(&self) {
        let idle = {
            let mut state = self.lock();
            let idle = !state.active && state.end.is_none() && !state.sealed;
            state.active = false;
            idle
        };
        if idle && let Some(heartbeat) = self.format.heartbeat() {
            self.send_marked(heartbeat, false);
        }
    }

    /// Ticker duty: a WebSocket ping of round `round`, unless an earlier one is unanswered.
    pub(super) fn ping(&self, round: u32) {
        {
            let mut state = self.lock();
            if state.end.is_some() || state.sealed {
                return;
            }
            if state.unanswered_ping == 0 {
                state.unanswered_ping = round;
            }
        }
        if let Some(ping) = self.format.heartbeat() {
            self.send(ping);
        }
    }

    /// Ticker duty: ends the connection if round `round`'s ping is still unanswered.
    pub(super) fn check_pong(&self, round: u32) {
        let unanswered = self.lock().unanswered_ping == round;
        if unanswered {
            self.end(End::Unresponsive);
        }
    }

    /// Starts the drain: every sub reads from its log what it has not been sent, so that
    /// everything published before the stop reaches the connection; then it ends.
    pub(super) fn drain(&self) {
        let mut state = self.lock();
        state.draining = true;
        for sub in state.subs.iter_mut().flatten() {
            sub.lost = true;
        }
        Self::wake(&mut state);
    }
}

/// Writes as much of `frames` as the socket takes now, in one system call.
fn write_now(socket: &TcpStream, frames: &[Bytes]) -> io::Result<usize> {
    let result = if let [frame] = frames {
        socket.try_write(frame)
    } else {
        let slices: SmallVec<[IoSlice<'_>; 16]> = frames.iter().map(|f| IoSlice::new(f)).collect();
        socket.try_write_vectored(&slices)
    };
    match result {
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(0),
        other => other,
    }
}

/// Queues what of `frames` was not written (`written` bytes were), the partly written frame
/// from the right byte. Returns whether anything was queued.
fn queue_rest(pending: &mut VecDeque<Bytes>, frames: &[Bytes], mut written: usize) -> bool {
    let mut queued = false;
    for frame in frames {
        if written >= frame.len() {
            written -= frame.len();
            continue;
        }
        pending.push_back(frame.slice(written..));
        written = 0;
        queued = true;
    }
    queued
}

/// Detaches an outlet when the connection that owns it ends, however it ends.
#[derive(Debug)]
pub struct OutletGuard(pub Arc<Outlet>);

impl std::ops::Deref for OutletGuard {
    type Target = Arc<Outlet>;

    fn deref(&self) -> &Arc<Outlet> {
        &self.0
    }
}

impl Drop for OutletGuard {
    fn drop(&mut self) {
        self.0.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(sizes: &[usize]) -> Vec<Bytes> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![b'a' + i as u8; n]))
            .collect()
    }

    #[test]
    fn a_sub_stays_within_32_bytes() {
        // One per topic a connection follows: the idle cost of following many topics.
        assert_eq!(std::mem::size_of::<Option<Sub>>(), 32);
    }

    #[test]
    fn a_partial_write_queues_the_rest_from_the_right_byte() {
        let all = frames(&[5, 3, 4]);
        let flat: Vec<u8> = all.iter().flat_map(|f| f.iter().copied()).collect();
        for written in 0..=flat.len() {
            let mut pending = VecDeque::new();
            let queued = queue_rest(&mut pending, &all, written);
            let rest: Vec<u8> = pending.iter().flat_map(|f| f.iter().copied()).collect();
            assert_eq!(rest, &flat[written..], "after {written} bytes");
            assert_eq!(queued, written < flat.len());
        }
    }
}
