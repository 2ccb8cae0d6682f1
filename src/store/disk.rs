//! The durable store: each topic's history and id counter on disk, in an embedded
//! [fjall](https://docs.rs/fjall) database (an LSM tree with a write-ahead journal).
//!
//! Layout: keyspace `messages` maps `topic \0 id` (id big-endian, so a topic's messages are
//! one ordered key range) to the [record](super::record); keyspace `heads` maps `topic` to
//! its last id and oldest retained id; keyspace `streams` maps a topic that is a stream to
//! its [`StreamState`] (a seal byte, then the record). They change in one atomic batch, so
//! after a crash the counter never lags a stored message and ids never repeat, and a stream's
//! state never disagrees with its history.
//!
//! One writer thread owns every write. Publishes queue to it; it takes what has queued
//! (with `--fsync batch`, also what arrives within `--fsync-window`), assigns ids, writes one
//! batch to the journal, `fdatasync`s it, and only then answers the publishes, which is when
//! the server sends `201`. Count retention deletes the message that falls out of the window in
//! the same batch; age retention runs in the writer every second. Readers never wait for the
//! writer: each read takes a snapshot and reads the exact key range the head names, so it
//! never walks over deleted keys that compaction has not yet removed.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};
use futures::future::BoxFuture;
use tokio::sync::oneshot;

use super::{
    Live, LogHead, LogRead, Retention, Store, StoreError, StreamState, StreamWrite, StreamWritten,
    TopicLog, record,
};
use crate::message::{EventName, Message, MessageId, Payload, TopicName};

/// Publishes written with one journal write and one `fdatasync`, at most.
const MAX_GROUP: usize = 1024;
/// How often age retention runs.
const EXPIRE_INTERVAL: Duration = Duration::from_secs(1);
/// Journal size after which fjall flushes memtables and drops old journal files; bounds the
/// replay work after a crash and the journal's share of the data dir (fjall's minimum).
const MAX_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;
/// Size at which a keyspace's memtable is flushed to a table. fjall's default (64 MiB) would
/// hold that much of recent, mostly already expired, history in memory; recent messages are
/// also in the live rings, so a small memtable costs little.
const MAX_MEMTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// Block cache for reads of older history.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// When a publish counts as durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every publish is written and `fdatasync`ed on its own before it is acknowledged.
    Always,
    /// Publishes that queue together (within `--fsync-window`) share one write and one
    /// `fdatasync`; each is still acknowledged only after that sync.
    Batch,
}

/// Stores history in a fjall database under one directory.
pub struct DiskStore {
    shared: Arc<Shared>,
}

struct Shared {
    db: Database,
    messages: Keyspace,
    heads: Keyspace,
    streams: Keyspace,
    appends: mpsc::Sender<Job>,
}

/// What the writer is asked to do.
enum Job {
    /// A publish.
    Append(Append),
    /// A change of a topic's stream state, done alone in its own batch.
    Stream(StreamJob),
}

/// A [`StreamWrite`] waiting for the writer.
struct StreamJob {
    topic: TopicName,
    write: StreamWrite,
    live: Arc<dyn Live>,
    done: oneshot::Sender<Result<StreamWritten, StoreError>>,
}

/// A publish waiting for the writer.
struct Append {
    topic: TopicName,
    event: EventName,
    data: Payload,
    time: u64,
    /// The topic's live sink: the writer hands the message on after the commit, in id order.
    live: Arc<dyn Live>,
    done: oneshot::Sender<Result<Arc<Message>, StoreError>>,
}

/// A topic's ends, as stored in `heads`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    last_id: MessageId,
    first_retained: MessageId,
}

impl Default for Head {
    fn default() -> Self {
        Self {
            last_id: 0,
            first_retained: 1,
        }
    }
}

impl Head {
    fn encode(self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.last_id.to_be_bytes());
        bytes[8..].copy_from_slice(&self.first_retained.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        Some(Self {
            last_id: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            first_retained: u64::from_be_bytes(bytes[8..].try_into().ok()?),
        })
    }

    fn log_head(self) -> LogHead {
        LogHead {
            last_id: self.last_id,
            first_retained: self.first_retained,
        }
    }
}

fn message_key(topic: &TopicName, id: MessageId) -> Vec<u8> {
    let topic = topic.as_str().as_bytes();
    let mut key = Vec::with_capacity(topic.len() + 9);
    key.extend_from_slice(topic);
    // Topic names never contain NUL, so "a" and "ab" have disjoint key ranges.
    key.push(0);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn io_error(error: fjall::Error) -> StoreError {
    StoreError::Internal(format!("disk store: {error}"))
}

impl DiskStore {
    /// Opens (or creates) the database in `dir`, recovering its journal after a crash, and
    /// starts the writer thread.
    pub fn open(
        dir: &Path,
        retention: Retention,
        fsync: FsyncPolicy,
        window: Duration,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Internal(format!("{}: {e}", dir.display())))?;
        let db = Database::builder(dir)
            .max_journaling_size(MAX_JOURNAL_BYTES)
            .cache_size(CACHE_BYTES)
            .open()
            .map_err(io_error)?;
        let options = || KeyspaceCreateOptions::default().max_memtable_size(MAX_MEMTABLE_BYTES);
        let messages = db.keyspace("messages", options).map_err(io_error)?;
        let heads = db.keyspace("heads", options).map_err(io_error)?;
        let streams = db.keyspace("streams", options).map_err(io_error)?;
        let mut sealed = HashMap::new();
        for entry in streams.iter() {
            let (key, value) = entry.into_inner().map_err(io_error)?;
            let name = std::str::from_utf8(&key)
                .ok()
                .and_then(|name| TopicName::parse(name).ok())
                .ok_or_else(|| StoreError::Internal("corrupt stream key".into()))?;
            sealed.insert(name, value.first() == Some(&1));
        }
        let mut topics = HashMap::new();
        for entry in heads.iter() {
            let (key, value) = entry.into_inner().map_err(io_error)?;
            let name = std::str::from_utf8(&key)
                .ok()
                .and_then(|name| TopicName::parse(name).ok());
            match (name, Head::decode(&value)) {
                (Some(name), Some(head)) => topics.insert(name, head),
                _ => return Err(StoreError::Internal("corrupt topic head".into())),
            };
        }
        let (appends, queue) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            messages: messages.clone(),
            heads: heads.clone(),
            streams: streams.clone(),
            stream_seals: sealed,
            retention,
            fsync,
            window,
            topics,
        };
        thread::Builder::new()
            .name("pushhub-store-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| StoreError::Internal(format!("writer thread: {e}")))?;
        Ok(Self {
            shared: Arc::new(Shared {
                db,
                messages,
                heads,
                streams,
                appends,
            }),
        })
    }
}

impl Store for DiskStore {
    fn open(&self, topic: &TopicName, live: Arc<dyn Live>) -> Arc<dyn TopicLog> {
        Arc::new(DiskLog {
            topic: topic.clone(),
            shared: self.shared.clone(),
            live,
        })
    }

    /// The topics with a head (every topic that was ever published to and not emptied by
    /// age), by a prefix scan of the `heads` keyspace: one ordered key range.
    fn topics<'a>(
        &'a self,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<Vec<TopicName>>, StoreError>> {
        Box::pin(async move {
            let snapshot = self.shared.db.snapshot();
            let mut topics = Vec::new();
            for entry in snapshot.prefix(&self.shared.heads, prefix.as_bytes()) {
                if topics.len() >= limit {
                    break;
                }
                let (key, value) = entry.into_inner().map_err(io_error)?;
                let name = std::str::from_utf8(&key)
                    .ok()
                    .and_then(|name| TopicName::parse(name).ok())
                    .ok_or_else(|| StoreError::Internal("corrupt topic head".into()))?;
                if Head::decode(&value).is_some_and(|head| head.last_id > 0) {
                    topics.push(name);
                }
            }
            Ok(Some(topics))
        })
    }
}

struct DiskLog {
    topic: TopicName,
    shared: Arc<Shared>,
    live: Arc<dyn Live>,
}

#[async_trait]
impl TopicLog for DiskLog {
    async fn append(
        &self,
        event: EventName,
        data: &Payload,
        time: u64,
    ) -> Result<Arc<Message>, StoreError> {
        let (done, written) = oneshot::channel();
        let gone = || StoreError::Unavailable("the store writer has stopped".into());
        self.shared
            .appends
            .send(Job::Append(Append {
                topic: self.topic.clone(),
                event,
                data: data.clone(),
                time,
                live: self.live.clone(),
                done,
            }))
            .map_err(|_| gone())?;
        written.await.map_err(|_| gone())?
    }

    async fn stream(&self) -> Result<Option<StreamState>, StoreError> {
        let value = self
            .shared
            .streams
            .get(self.topic.as_str())
            .map_err(io_error)?;
        Ok(value.map(|value| decode_stream(&value)))
    }

    async fn write_stream(&self, write: StreamWrite) -> Result<StreamWritten, StoreError> {
        let (done, written) = oneshot::channel();
        let gone = || StoreError::Unavailable("the store writer has stopped".into());
        self.shared
            .appends
            .send(Job::Stream(StreamJob {
                topic: self.topic.clone(),
                write,
                live: self.live.clone(),
                done,
            }))
            .map_err(|_| gone())?;
        written.await.map_err(|_| gone())?
    }

    async fn read(&self, after: MessageId, limit: usize) -> Result<LogRead, StoreError> {
        // A read near the head (every live reader's, every poll's) finds its messages in the
        // memtable or the block cache: a few microseconds, not worth a trip to a blocking
        // thread. A read further back may go to disk, so it runs on Tokio's blocking pool,
        // not on the worker that serves other connections.
        // One snapshot for the head and the range: retention deleting the oldest messages
        // meanwhile cannot make the range start later than the head says.
        let snapshot = self.shared.db.snapshot();
        let head = read_head(&snapshot, &self.shared, &self.topic)?;
        let from = after.saturating_add(1).max(head.first_retained);
        let behind = head.last_id.saturating_sub(from);
        if behind < HOT_IDS && limit as u64 <= HOT_IDS {
            return read_range(&snapshot, &self.shared, &self.topic, head, from, limit);
        }
        let (shared, topic) = (self.shared.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || {
            read_range(&snapshot, &shared, &topic, head, from, limit)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("cold read: {e}")))?
    }

    fn release_if_idle(&self, _now_ms: u64) -> bool {
        // Everything lives on disk: the handle can go, and retention runs in the writer.
        true
    }
}

/// How far behind the head (in ids) a read is served on the caller's thread: such a read
/// is near what was just written, so it is in memory (8 MiB memtables hold tens of
/// thousands of small messages).
const HOT_IDS: u64 = 1024;

/// A stream state as stored: a seal byte (1 sealed, 0 open), then the record.
fn encode_stream(state: &StreamState) -> Vec<u8> {
    let mut value = Vec::with_capacity(1 + state.record.len());
    value.push(u8::from(state.sealed));
    value.extend_from_slice(&state.record);
    value
}

fn decode_stream(value: &[u8]) -> StreamState {
    StreamState {
        version: 0,
        sealed: value.first() == Some(&1),
        record: Bytes::copy_from_slice(value.get(1..).unwrap_or_default()),
    }
}

/// A topic's head as last committed.
fn read_head(snapshot: &Snapshot, shared: &Shared, topic: &TopicName) -> Result<Head, StoreError> {
    match snapshot
        .get(&shared.heads, topic.as_str())
        .map_err(io_error)?
    {
        Some(bytes) => {
            Head::decode(&bytes).ok_or_else(|| StoreError::Internal("corrupt head".into()))
        }
        None => Ok(Head::default()),
    }
}

/// Up to `limit` messages of `topic` from id `from` on, no further than `head`: the range a
/// read asked for, with the head it was computed from (ids past it may not be complete yet).
fn read_range(
    snapshot: &Snapshot,
    shared: &Shared,
    topic: &TopicName,
    head: Head,
    from: MessageId,
    limit: usize,
) -> Result<LogRead, StoreError> {
    let mut messages = Vec::new();
    if limit > 0 && from <= head.last_id {
        let to = from.saturating_add(limit as u64 - 1).min(head.last_id);
        let range = message_key(topic, from)..=message_key(topic, to);
        for entry in snapshot.range(&shared.messages, range) {
            let (key, value) = entry.into_inner().map_err(io_error)?;
            let id = key
                .get(key.len().saturating_sub(8)..)
                .and_then(|bytes| bytes.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Internal("corrupt key".into()))?;
            let record = Bytes::copy_from_slice(&value);
            messages.push(Arc::new(record::decode(id, topic, record)?));
        }
    }
    Ok(LogRead {
        messages,
        head: head.log_head(),
    })
}

/// The only thread that writes to the database.
struct Writer {
    db: Database,
    messages: Keyspace,
    heads: Keyspace,
    streams: Keyspace,
    /// The topics that are streams (kept whole, never trimmed), and whether each is sealed.
    stream_seals: HashMap<TopicName, bool>,
    retention: Retention,
    fsync: FsyncPolicy,
    window: Duration,
    /// Every topic's head, as last committed.
    topics: HashMap<TopicName, Head>,
}

impl Writer {
    fn run(mut self, queue: mpsc::Receiver<Job>) {
        let mut next_expiry = Instant::now() + EXPIRE_INTERVAL;
        // A stream job taken while a group was gathering, done right after that group.
        let mut pending: Option<StreamJob> = None;
        loop {
            if let Some(job) = pending.take() {
                self.write_stream(job);
            }
            let wait = next_expiry.saturating_duration_since(Instant::now());
            let first = match queue.recv_timeout(wait) {
                Ok(Job::Append(append)) => append,
                Ok(Job::Stream(job)) => {
                    self.write_stream(job);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.expire();
                    next_expiry = Instant::now() + EXPIRE_INTERVAL;
                    continue;
                }
                // The store was dropped: every acknowledged publish is already synced.
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut group = vec![first];
            if self.fsync == FsyncPolicy::Batch {
                if !self.window.is_zero() {
                    thread::sleep(self.window);
                }
                while group.len() < MAX_GROUP {
                    match queue.try_recv() {
                        Ok(Job::Append(append)) => group.push(append),
                        Ok(Job::Stream(job)) => {
                            pending = Some(job);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            self.write(group);
            if Instant::now() >= next_expiry {
                self.expire();
                next_expiry = Instant::now() + EXPIRE_INTERVAL;
            }
        }
    }

    /// Assigns ids to `group`, writes and syncs it as one batch, then answers each publish.
    fn write(&mut self, group: Vec<Append>) {
        let mut heads: HashMap<TopicName, (Head, Head)> = HashMap::new();
        let mut written = Vec::with_capacity(group.len());
        for append in group {
            if self.stream_seals.get(&append.topic) == Some(&true) {
                let _ = append.done.send(Err(StoreError::Sealed));
                continue;
            }
            let (_, head) = heads.entry(append.topic.clone()).or_insert_with(|| {
                let head = self.topics.get(&append.topic).copied().unwrap_or_default();
                (head, head)
            });
            head.last_id += 1;
            let record = record::encode(append.time, &append.event, &append.data);
            let message = Message::new(
                head.last_id,
                append.topic,
                append.event,
                append.time,
                &append.data,
            );
            written.push((Arc::new(message), record, append.live, append.done));
        }
        let max = self.retention.max_messages.max(1) as u64;
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for (topic, (before, after)) in heads.iter_mut() {
            if self.stream_seals.contains_key(topic) {
                // A stream keeps everything.
                continue;
            }
            after.first_retained = after
                .first_retained
                .max(after.last_id.saturating_sub(max) + 1);
            // Stored messages now outside the count window. Messages of this group that fall
            // outside it are simply never written, so no key is inserted and removed in one
            // batch.
            let stale_end = after.first_retained.min(before.last_id + 1);
            for id in before.first_retained..stale_end {
                batch.remove(&self.messages, message_key(topic, id));
            }
        }
        for (message, record, _, _) in &written {
            let (_, head) = &heads[&message.topic];
            if message.id >= head.first_retained {
                batch.insert(
                    &self.messages,
                    message_key(&message.topic, message.id),
                    record.as_slice(),
                );
            }
        }
        for (topic, (_, head)) in &heads {
            batch.insert(&self.heads, topic.as_str(), head.encode());
        }
        let outcome = batch.commit().map_err(io_error);
        if outcome.is_ok() {
            self.topics
                .extend(heads.into_iter().map(|(topic, (_, head))| (topic, head)));
        }
        for (message, _, live, done) in written {
            let answer = match &outcome {
                Ok(()) => {
                    // Here, in the writer, the messages of a topic are in id order.
                    live.deliver(&message);
                    Ok(message)
                }
                Err(error) => Err(StoreError::Internal(error.to_string())),
            };
            // A publisher that went away no longer needs the answer; the message is stored.
            let _ = done.send(answer);
        }
    }

    /// Applies one [`StreamWrite`] in a batch of its own, synced, then answers it.
    fn write_stream(&mut self, job: StreamJob) {
        let StreamJob {
            topic,
            write,
            live,
            done,
        } = job;
        let before = self.topics.get(&topic).copied().unwrap_or_default();
        let mut head = before;
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        if write.clear {
            for id in head.first_retained..=head.last_id {
                batch.remove(&self.messages, message_key(&topic, id));
            }
            head.first_retained = head.last_id + 1;
        }
        let mut messages = Vec::with_capacity(write.messages.len());
        for (event, data) in write.messages {
            head.last_id += 1;
            let record = record::encode(write.time, &event, &data);
            batch.insert(
                &self.messages,
                message_key(&topic, head.last_id),
                record.as_slice(),
            );
            messages.push(Arc::new(Message::new(
                head.last_id,
                topic.clone(),
                event,
                write.time,
                &data,
            )));
        }
        match &write.state {
            Some(state) => batch.insert(&self.streams, topic.as_str(), encode_stream(state)),
            None => batch.remove(&self.streams, topic.as_str()),
        }
        if head != before {
            batch.insert(&self.heads, topic.as_str(), head.encode());
        }
        let answer = match batch.commit() {
            Ok(()) => {
                self.topics.insert(topic.clone(), head);
                match &write.state {
                    Some(state) => self.stream_seals.insert(topic, state.sealed),
                    None => self.stream_seals.remove(&topic),
                };
                for message in &messages {
                    live.deliver(message);
                }
                Ok(StreamWritten {
                    messages,
                    head: head.log_head(),
                })
            }
            Err(error) => Err(io_error(error)),
        };
        let _ = done.send(answer);
    }

    /// Deletes what age retention (and a count limit lowered since the last run) no longer
    /// keeps.
    fn expire(&mut self) {
        let max = self.retention.max_messages.max(1) as u64;
        let cutoff = self
            .retention
            .max_age
            .map(|age| crate::message::now_millis().saturating_sub(age.as_millis() as u64));
        let mut batch = self.db.batch();
        let mut changed = Vec::new();
        for (topic, head) in &self.topics {
            if self.stream_seals.contains_key(topic) {
                continue;
            }
            let mut first = head.first_retained;
            let floor = head.last_id.saturating_sub(max) + 1;
            while first <= head.last_id {
                let expired = first < floor
                    || cutoff.is_some_and(|cutoff| {
                        self.messages
                            .get(message_key(topic, first))
                            .ok()
                            .flatten()
                            .and_then(|value| record::time(&value))
                            .is_none_or(|time| time < cutoff)
                    });
                if !expired {
                    break;
                }
                batch.remove(&self.messages, message_key(topic, first));
                first += 1;
            }
            if first != head.first_retained {
                let head = Head {
                    last_id: head.last_id,
                    first_retained: first,
                };
                batch.insert(&self.heads, topic.as_str(), head.encode());
                changed.push((topic.clone(), head));
            }
        }
        if changed.is_empty() {
            return;
        }
        // Not synced: if a crash undoes an expiry, the next run repeats it.
        match batch.commit() {
            Ok(()) => self.topics.extend(changed),
            Err(error) => tracing::warn!(%error, "disk store: expiring history failed"),
        }
    }
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, max_messages: usize, max_age: Option<Duration>) -> DiskStore {
        let retention = Retention {
            max_messages,
            max_age,
        };
        // A reopen may race the previous writer thread's exit (it holds the database lock).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match DiskStore::open(dir, retention, FsyncPolicy::Batch, Duration::ZERO) {
                Ok(store) => return store,
                Err(error) if Instant::now() > deadline => panic!("{error}"),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn topic(name: &str) -> TopicName {
        TopicName::parse(name).unwrap()
    }

    async fn ids(log: &Arc<dyn TopicLog>, after: MessageId) -> Vec<MessageId> {
        let read = log.read(after, 1000).await.unwrap();
        read.messages.iter().map(|m| m.id).collect()
    }

    #[tokio::test]
    async fn reads_far_behind_the_head_and_near_it_both_read_exactly_their_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10_000, None);
        let log = store.open(&topic("cold"), super::super::nowhere());
        let data = Payload::from_json(r#"{"n":1}"#).unwrap();
        let total = HOT_IDS * 3;
        let appends = (0..total).map(|_| log.append(EventName::default_event(), &data, 1));
        futures::future::join_all(appends).await;
        // From the start: more than `HOT_IDS` behind, so read on the blocking pool.
        let cold = log.read(0, total as usize).await.unwrap();
        let ids: Vec<MessageId> = cold.messages.iter().map(|m| m.id).collect();
        assert_eq!(ids, (1..=total).collect::<Vec<_>>());
        assert_eq!(cold.head.last_id, total);
        // Near the head: inline, same answer for the same range.
        let hot = log.read(total - 10, 100).await.unwrap();
        let ids: Vec<MessageId> = hot.messages.iter().map(|m| m.id).collect();
        assert_eq!(ids, (total - 9..=total).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stream_keeps_everything_its_state_survives_a_reopen_and_a_seal_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let data = Payload::from_json(r#"{"n":1}"#).unwrap();
        let event = EventName::default_event;
        {
            let store = open(dir.path(), 2, None);
            let log = store.open(&topic("s"), super::super::nowhere());
            log.append(event(), &data, 1).await.unwrap();
            let written = log
                .write_stream(StreamWrite {
                    clear: true,
                    messages: vec![(event(), data.clone()), (event(), data.clone())],
                    time: 1,
                    state: Some(StreamState {
                        record: Bytes::from_static(b"meta"),
                        sealed: false,
                        version: 0,
                    }),
                    ..StreamWrite::default()
                })
                .await
                .unwrap();
            assert_eq!(written.head.first_retained, 2, "clear dropped id 1");
            for _ in 0..3 {
                log.append(event(), &data, 1).await.unwrap();
            }
            assert_eq!(
                ids(&log, 0).await,
                [2, 3, 4, 5, 6],
                "a stream is not trimmed to --history-size 2"
            );
            log.write_stream(StreamWrite {
                state: Some(StreamState {
                    record: Bytes::from_static(b"closed"),
                    sealed: true,
                    version: 0,
                }),
                ..StreamWrite::default()
            })
            .await
            .unwrap();
        }
        let store = open(dir.path(), 2, None);
        let log = store.open(&topic("s"), super::super::nowhere());
        let state = log.stream().await.unwrap().unwrap();
        assert_eq!((&state.record[..], state.sealed), (&b"closed"[..], true));
        assert!(matches!(
            log.append(event(), &data, 1).await,
            Err(StoreError::Sealed)
        ));
        assert_eq!(ids(&log, 0).await, [2, 3, 4, 5, 6]);
        // Removing the state returns the topic to ordinary retention and appends.
        log.write_stream(StreamWrite::default()).await.unwrap();
        assert!(log.stream().await.unwrap().is_none());
        log.append(event(), &data, 1).await.unwrap();
        assert_eq!(ids(&log, 0).await, [6, 7]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn history_and_counters_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 3, None);
        let (a, ab) = (
            store.open(&topic("a"), super::super::nowhere()),
            store.open(&topic("ab"), super::super::nowhere()),
        );
        let data = Payload::from_json(r#"{"n":1}"#).unwrap();
        let appends = (0..5).map(|_| a.append(EventName::default_event(), &data, 1));
        let assigned: Vec<_> = futures::future::join_all(appends)
            .await
            .into_iter()
            .map(|m| m.unwrap().id)
            .collect();
        let mut sorted = assigned.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            [1, 2, 3, 4, 5],
            "concurrent appends get distinct ids"
        );
        ab.append(EventName::default_event(), &data, 1)
            .await
            .unwrap();
        assert_eq!(
            ids(&a, 0).await,
            [3, 4, 5],
            "the count limit applies on disk"
        );
        assert_eq!(ids(&a, 3).await, [4, 5]);
        assert_eq!(
            ids(&ab, 0).await,
            [1],
            "a topic prefixing another is separate"
        );
        drop((a, ab));
        drop(store);

        let store = open(dir.path(), 3, None);
        let a = store.open(&topic("a"), super::super::nowhere());
        assert_eq!(ids(&a, 0).await, [3, 4, 5]);
        let head = a.head().await.unwrap();
        assert_eq!((head.last_id, head.oldest_id()), (5, Some(3)));
        let next = a
            .append(EventName::default_event(), &data, 1)
            .await
            .unwrap();
        assert_eq!(next.id, 6, "ids go on from the stored counter");
        assert!(next.envelope().ends_with(b"\"data\":{\"n\":1},\"time\":1}"));
        assert_eq!(ids(&a, 0).await, [4, 5, 6]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn age_retention_empties_a_topic_but_keeps_its_counter() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 100, Some(Duration::from_secs(60)));
        let log = store.open(&topic("t"), super::super::nowhere());
        let data = Payload::from_text("x");
        let now = crate::message::now_millis();
        for time in [now - 120_000, now - 90_000, now] {
            log.append(EventName::default_event(), &data, time)
                .await
                .unwrap();
        }
        tokio::time::sleep(EXPIRE_INTERVAL + Duration::from_millis(500)).await;
        assert_eq!(
            ids(&log, 0).await,
            [3],
            "messages older than the age limit are gone"
        );
        let head = log.head().await.unwrap();
        assert_eq!((head.last_id, head.oldest_id()), (3, Some(3)));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_lower_count_limit_after_a_restart_trims_the_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 100, None);
        let log = store.open(&topic("t"), super::super::nowhere());
        let data = Payload::from_text("x");
        for _ in 0..10 {
            log.append(EventName::default_event(), &data, 1)
                .await
                .unwrap();
        }
        drop(log);
        drop(store);
        let store = open(dir.path(), 4, None);
        let log = store.open(&topic("t"), super::super::nowhere());
        tokio::time::sleep(EXPIRE_INTERVAL + Duration::from_millis(500)).await;
        assert_eq!(ids(&log, 0).await, [7, 8, 9, 10]);
    }
}
