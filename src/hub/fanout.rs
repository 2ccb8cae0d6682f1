//! Live fan-out: who follows each topic on this node, and the writers that deliver to them.
//!
//! A topic's log hands every message it appends, in id order, to the topic's [`TopicLive`]
//! (the log's [`Live`] sink). That only queues the message on each fan-out *shard* that has
//! followers of the topic: one lock and one push per shard, whatever the number of
//! followers, so a publisher never waits for subscribers.
//!
//! Each shard has one writer task. Woken by the first message queued, it takes everything
//! queued (with `--write-delay`, also what arrives within the delay), groups it by topic, and
//! walks the shard's followers of each topic, offering each outlet all of that topic's new
//! messages at once ([`Outlet::deliver`]): one `writev` of shared, pre-framed bytes per
//! connection, straight to its socket. So a delivery costs one system call and no task
//! wake-up, and when messages arrive faster than a walk takes, several leave in one write.
//! Connections are spread over the shards round-robin; with one shard per core, the shards
//! write in parallel.
//!
//! Parked long polls follow topics too, as [`Waiter`]s: a writer answers one itself through
//! its responder when it can, and otherwise wakes it.
//!
//! One ticker task per shard ([`super::ticker`]), on the shard's worker, serves its
//! connections' timers by walking the shard's registry, so an idle connection costs no
//! timer. Parked long polls and the answers the fan-out writes them are in
//! [`super::waiter`]; what a walk counts, in [`super::tally`].

use std::{
    future::poll_fn,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Poll, Waker},
    time::Duration,
};

use smallvec::SmallVec;

use super::{
    outlet::{ListId, Outlet, Scratch, Shards},
    stats::Counters,
    ticker::{self, Intervals},
    waiter::{AnswerCache, Waiter},
};
use crate::{
    message::{Message, TransportKind, now_millis},
    store::Live,
};

/// Followers handed out per lock of a topic's follower list: the writer copies this many
/// handles, releases the lock, then writes, so subscribing never waits for a long walk.
const WALK_CHUNK: usize = 32;
/// Deliveries a writer makes before it yields to the runtime, so that a walk over many
/// thousands of connections does not hold a worker thread for its whole length.
const YIELD_EVERY: usize = 256;

/// Timing the fan-out needs from the configuration.
#[derive(Clone, Debug)]
pub struct FanoutSettings {
    /// Shards (writer tasks); connections are spread over them.
    pub shards: usize,
    /// How long a writer waits after being woken to gather more messages per write.
    pub write_delay: Duration,
    /// SSE heartbeat interval.
    pub heartbeat: Duration,
    /// WebSocket ping interval.
    pub ping_interval: Duration,
    /// How long a WebSocket peer gets to answer a ping.
    pub pong_timeout: Duration,
}

impl Default for FanoutSettings {
    fn default() -> Self {
        Self {
            shards: default_shards(),
            write_delay: Duration::ZERO,
            heartbeat: Duration::from_secs(15),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
        }
    }
}

/// One shard per core the process may use: the writers then spread over the runtime's
/// worker threads.
pub fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 64))
}

/// Something that follows a topic on one shard.
#[derive(Clone)]
pub(super) enum Follower {
    /// A streaming connection: sub `sub` of `outlet`.
    Stream {
        /// The connection.
        outlet: Arc<Outlet>,
        /// Which of its subs follows this topic (4 bytes: a follower is per connection and
        /// topic, and a connection's subs are bounded by its limit).
        sub: u32,
    },
    /// A parked long poll.
    Waiter(Arc<Waiter>),
}

/// A slab of followers: stable slots, so a follower leaves by its slot in O(1).
struct Slots<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T: Clone> Slots<T> {
    fn insert(&mut self, value: T) -> usize {
        self.len += 1;
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(value);
                slot
            }
            None => {
                self.slots.push(Some(value));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        if let Some(entry) = self.slots.get_mut(slot)
            && entry.take().is_some()
        {
            self.len -= 1;
            self.free.push(slot);
            if self.len == 0 {
                // Give back the memory of a topic that had many followers once.
                *self = Self::default();
            }
        }
    }

    /// Copies up to `max` entries from slot `*from` on, and advances `*from` past them.
    fn chunk(&self, from: &mut usize, max: usize, out: &mut SmallVec<[T; WALK_CHUNK]>) {
        while *from < self.slots.len() && out.len() < max {
            if let Some(value) = &self.slots[*from] {
                out.push(value.clone());
            }
            *from += 1;
        }
    }
}

/// The followers of one topic on this node, per shard; the topic log's [`Live`] sink.
pub(crate) struct TopicLive {
    me: Weak<TopicLive>,
    followers: Box<[Mutex<Slots<Follower>>]>,
    /// Followers per shard, read without the lock to skip empty shards.
    counts: Box<[AtomicUsize]>,
    fanout: Arc<Fanout>,
    /// Woken when another node closes or removes the topic's stream state.
    pub(super) state_changed: tokio::sync::Notify,
}

impl TopicLive {
    pub(super) fn new(fanout: &Arc<Fanout>) -> Arc<Self> {
        let shards = fanout.shards.len();
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            followers: (0..shards).map(|_| Mutex::default()).collect(),
            counts: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            fanout: fanout.clone(),
            state_changed: tokio::sync::Notify::new(),
        })
    }

    fn followers(&self, shard: usize) -> MutexGuard<'_, Slots<Follower>> {
        self.followers[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a follower on `shard`; returns its slot.
    pub(super) fn add(&self, shard: usize, follower: Follower) -> usize {
        self.fanout.start();
        let mut followers = self.followers(shard);
        let slot = followers.insert(follower);
        self.counts[shard].store(followers.len, Ordering::Release);
        slot
    }

    /// Removes the follower in `slot` of `shard`.
    pub(super) fn remove(&self, shard: usize, slot: usize) {
        let mut followers = self.followers(shard);
        followers.remove(slot);
        self.counts[shard].store(followers.len, Ordering::Release);
    }

    /// Followers on this node, all shards.
    pub(super) fn len(&self) -> usize {
        self.counts.iter().map(|c| c.load(Ordering::Acquire)).sum()
    }

    pub(super) fn fanout(&self) -> &Fanout {
        &self.fanout
    }
}

impl Live for TopicLive {
    fn deliver(&self, message: &Arc<Message>) {
        for (shard, count) in self.counts.iter().enumerate() {
            if count.load(Ordering::Acquire) == 0 {
                continue;
            }
            if let Some(me) = self.me.upgrade() {
                self.fanout.shards[shard].enqueue(me, message.clone());
            }
        }
    }

    fn state_changed(&self) {
        self.state_changed.notify_waiters();
    }
}

/// What one shard's writer is asked to deliver.
#[derive(Default)]
struct Queue {
    items: Vec<(Arc<TopicLive>, Arc<Message>)>,
    waker: Option<Waker>,
    closed: bool,
}

/// One fan-out shard: its writer's queue and the registry of its streaming connections.
#[derive(Default)]
struct Shard {
    queue: Mutex<Queue>,
    /// Streaming connections of this shard, for the ticker's walks and the drain.
    streams: Mutex<Slots<Weak<Outlet>>>,
    /// The writer runs.
    started: AtomicBool,
}

thread_local! {
    /// The worker (and so the shard) of the calling thread, set by [`Fanout::start_worker`].
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

impl Shard {
    fn enqueue(&self, topic: Arc<TopicLive>, message: Arc<Message>) {
        let waker = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.items.push((topic, message));
            queue.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Moves what is queued into `into`; `Ready(false)` once the fan-out is gone.
    fn poll_take(
        &self,
        cx: &mut std::task::Context<'_>,
        into: &mut Vec<(Arc<TopicLive>, Arc<Message>)>,
    ) -> Poll<bool> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.closed {
            return Poll::Ready(false);
        }
        if queue.items.is_empty() {
            queue.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        std::mem::swap(&mut queue.items, into);
        Poll::Ready(true)
    }

    fn take_now(&self, into: &mut Vec<(Arc<TopicLive>, Arc<Message>)>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut queue.items);
    }

    /// The live outlets of this shard's registry, `WALK_CHUNK` at a time.
    fn each_stream(&self, mut visit: impl FnMut(&Outlet)) {
        let mut from = 0;
        loop {
            let mut chunk = SmallVec::new();
            self.streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .chunk(&mut from, WALK_CHUNK, &mut chunk);
            if chunk.is_empty() {
                return;
            }
            for outlet in chunk.iter().filter_map(Weak::upgrade) {
                visit(&outlet);
            }
        }
    }
}

impl Shards for Fanout {
    /// The shard for a new connection: the calling worker's, else round-robin.
    fn pick_shard(&self) -> usize {
        match WORKER.with(std::cell::Cell::get) {
            Some(shard) => shard,
            None => self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards.len(),
        }
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Adds a streaming outlet to its shard's registry (starting the shards' writers if the
    /// hub runs without workers); returns its slot.
    fn register(&self, shard: usize, outlet: Weak<Outlet>) -> usize {
        self.start();
        self.shards[shard]
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(outlet)
    }

    fn unregister(&self, shard: usize, slot: usize) {
        self.shards[shard]
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(slot);
    }
}

impl ticker::Streams for Fanout {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn each_stream(&self, index: usize, visit: &mut dyn FnMut(&Outlet)) {
        self.shards[index].each_stream(visit);
    }
}

/// The fan-out of one hub: its shards, their writers and tickers.
pub(crate) struct Fanout {
    shards: Box<[Arc<Shard>]>,
    next_shard: AtomicUsize,
    counters: Arc<Counters>,
    settings: FanoutSettings,
    /// Stop pinging and sending heartbeats: the server is stopping.
    stopping: AtomicBool,
    /// New outlets drain at once: the server is stopping and publishes have settled.
    draining: AtomicBool,
    me: Weak<Fanout>,
}

impl Fanout {
    pub(super) fn new(settings: FanoutSettings, counters: Arc<Counters>) -> Arc<Self> {
        let shards = settings.shards.max(1);
        Arc::new_cyclic(|me| Self {
            shards: (0..shards).map(|_| Arc::new(Shard::default())).collect(),
            next_shard: AtomicUsize::new(0),
            counters,
            settings,
            stopping: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            me: me.clone(),
        })
    }

    /// The calling thread is worker `worker`: its connections use shard `worker`, whose
    /// writer runs on this thread's runtime (so writing to them wakes no other thread).
    pub(super) fn start_worker(&self, worker: usize) {
        let shard = worker % self.shards.len();
        WORKER.with(|current| current.set(Some(shard)));
        self.start_shard(shard);
    }

    /// Starts shard `index`'s writer and ticker on the current runtime, once.
    fn start_shard(&self, index: usize) {
        let shard = &self.shards[index];
        if !shard.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(write_loop(
                shard.clone(),
                index,
                self.counters.clone(),
                self.settings.write_delay,
            ));
            let intervals = Intervals {
                heartbeat: self.settings.heartbeat,
                ping_interval: self.settings.ping_interval,
                pong_timeout: self.settings.pong_timeout,
            };
            tokio::spawn(ticker::tick_loop(self.me.clone(), index, intervals));
        }
    }

    /// Starts every shard not started yet on the current runtime: a hub used without
    /// workers (tests, benchmarks) still delivers.
    fn start(&self) {
        for index in 0..self.shards.len() {
            if !self.shards[index].started.load(Ordering::Acquire) {
                self.start_shard(index);
            }
        }
    }

    /// Counts deliveries made outside a writer's walk (catch-up reads).
    pub(super) fn record(&self, transport: TransportKind, messages: u64, bytes: u64) {
        if messages > 0 || bytes > 0 {
            self.counters.delivered(transport, messages, bytes);
        }
    }

    /// The server is stopping: no more pings or heartbeats.
    pub(super) fn stop_timers(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Publishes have settled: every connection reads from its logs what it has not been
    /// sent, writes it, and ends.
    pub(super) fn drain(&self) {
        self.stopping.store(true, Ordering::Release);
        self.draining.store(true, Ordering::Release);
        for shard in self.shards.iter() {
            shard.each_stream(Outlet::drain);
        }
    }

    /// Streaming connections on this node.
    pub(super) fn streams(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.streams.lock().unwrap_or_else(|e| e.into_inner()).len)
            .sum()
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        for shard in self.shards.iter() {
            let waker = {
                let mut queue = shard.queue.lock().unwrap_or_else(|e| e.into_inner());
                queue.closed = true;
                queue.waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// One shard's writer: takes what is queued, delivers it, repeats. Holds only its shard, so
/// it ends when the fan-out is dropped.
async fn write_loop(
    shard: Arc<Shard>,
    index: usize,
    counters: Arc<Counters>,
    write_delay: Duration,
) {
    let mut batch = Vec::new();
    let mut messages: Vec<Arc<Message>> = Vec::new();
    let mut scratch = Scratch::default();
    let mut answers = AnswerCache::default();
    loop {
        if !poll_fn(|cx| shard.poll_take(cx, &mut batch)).await {
            return;
        }
        if !write_delay.is_zero() {
            tokio::time::sleep(write_delay).await;
            shard.take_now(&mut batch);
        }
        // Group by topic, keeping each topic's messages in the order its log gave them.
        batch.sort_by_key(|(topic, _)| Arc::as_ptr(topic) as usize);
        scratch.tally.now_ms = now_millis();
        let mut delivered = 0;
        let mut start = 0;
        while start < batch.len() {
            let topic = batch[start].0.clone();
            let end = start
                + batch[start..]
                    .iter()
                    .take_while(|(t, _)| Arc::ptr_eq(t, &topic))
                    .count();
            // The lines of the last walk name its messages by address: forgotten before the
            // writer lets go of them.
            scratch.lines.clear();
            messages.clear();
            messages.extend(batch[start..end].iter().map(|(_, m)| m.clone()));
            start = end;
            answers.clear();
            let mut from = 0;
            loop {
                let mut chunk: SmallVec<[Follower; WALK_CHUNK]> = SmallVec::new();
                topic
                    .followers(index)
                    .chunk(&mut from, WALK_CHUNK, &mut chunk);
                if chunk.is_empty() {
                    break;
                }
                for follower in &chunk {
                    match follower {
                        Follower::Stream { outlet, sub } => {
                            let list = ListId::of(&topic);
                            let sub = *sub as usize;
                            outlet.deliver(sub, list, &messages, &mut scratch);
                        }
                        Follower::Waiter(waiter) => waiter.offer(&messages, &mut answers),
                    }
                }
                delivered += chunk.len();
                drop(chunk);
                if delivered >= YIELD_EVERY {
                    delivered = 0;
                    scratch.tally.flush(&counters);
                    scratch.tally.now_ms = now_millis();
                    tokio::task::yield_now().await;
                }
            }
        }
        scratch.lines.clear();
        scratch.frames.clear();
        batch.clear();
        messages.clear();
        answers.clear();
        scratch.tally.flush(&counters);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_follower_is_two_words() {
        // One per connection and topic in the topic's slab.
        assert_eq!(std::mem::size_of::<Option<super::Follower>>(), 16);
    }
}
