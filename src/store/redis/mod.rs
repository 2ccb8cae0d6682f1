//! The shared store: topics kept in Redis (one primary, or a Redis Cluster), so that any
//! number of nodes serve the same topics.
//!
//! Per topic, Redis holds a counter (`pushhub:{topic}:seq`), the retained history as a sorted
//! set scored by id (`pushhub:{topic}:log`, members `id\nrecord`), and a channel
//! (`pushhub:{topic}:live`). The `{topic}` hash tag puts all of a topic's keys and its channel
//! in one cluster slot. A publish is one Lua script, run atomically by the slot's primary: it
//! increments the counter, adds the message, trims the set by count and age, and publishes
//! the member on the channel (`PUBLISH`; `SPUBLISH` in a cluster, so a message travels only
//! within its shard). Ids are therefore assigned cluster-wide, and each topic's messages are
//! published in id order. A topic's first id is also announced on a classic channel
//! ([`RedisStore::created_topics`]), which reaches every node of a cluster.
//!
//! Each node subscribes to the channel of each topic that has live subscribers on it, once,
//! however many subscribers it has ([`Listener`]); every message (its own publishes too)
//! reaches local subscribers through that subscription, so they all see one order.
//!
//! When Redis (or the slot's primary) is unreachable, publishes and reads fail with
//! `503 store_unavailable`: a `201` is only sent for a message Redis has stored. With
//! `--redis-min-replicas N` a publish is answered `201` only once `WAIT` says N replicas have
//! it, and only then published to subscribers, so a failover can take back no message a
//! subscriber saw. Subscribers stay connected through an outage or a failover; the listener
//! replays what they missed from the log.
//!
//! Durable Streams writes carry the version of the stream state they were decided on, and
//! the script refuses a write whose version moved ([`StoreError::Conflict`]): the
//! compare-and-set that makes producer and `Stream-Seq` checks atomic across nodes.

mod batch;
mod connection;
mod keys;
mod listener;
mod presence;
mod tail;

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use redis::{Cmd, Pipeline, Script, Value, aio::ConnectionLike};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{
    Created, Live, LogHead, LogRead, Retention, Store, StoreError, StreamExpect, StreamState,
    StreamWrite, StreamWritten, TopicLog, record,
};
use crate::message::{EventName, Message, MessageId, Payload, TopicName, now_millis};
use connection::{COMMAND_TIMEOUT, Connection, not_run};
pub use connection::{RedisMode, RedisOptions};
use keys::{
    CONFIRM_SCRIPT, PUBLISH_SCRIPT, READ_SCRIPT, STATE_NOTICE, STREAM_SCRIPT, ack_key, channel,
    decode_member, encode_member, log_key, seq_key, stream_key, version_key,
};
use listener::{Follow, Listener};
use tail::{SharedTail, TAIL_CAPACITY, Tail, lock};

fn unavailable(error: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {error}"))
}

/// A script's answer as `T`.
fn parse<T: redis::FromRedisValue>(value: Value) -> Result<T, StoreError> {
    redis::from_redis_value(value).map_err(|e| StoreError::Internal(format!("redis: {e}")))
}

/// `EVALSHA` of `script` on `keys`; the caller adds the arguments. Routed by its first key.
fn evalsha(script: &Script, keys: &[String]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    cmd
}

/// Topics in Redis (one primary or a cluster), shared by every node pointed at it.
pub struct RedisStore {
    shared: Arc<Shared>,
    created: broadcast::Sender<Created>,
    /// Presence envelopes other nodes sent, for the board.
    presence: broadcast::Sender<super::RemotePresence>,
}

struct Shared {
    commands: Connection,
    /// Where writes go (a cluster's, with the library's retries off: a write whose reply
    /// was lost may have run, and must not run twice), and with `--redis-min-replicas` their
    /// `WAIT`, on the slot's primary. `None`: the command connection.
    writes: Option<Connection>,
    min_replicas: u32,
    replica_timeout_ms: u64,
    /// The command a script publishes a topic's messages with (`PUBLISH`; `SPUBLISH` in a
    /// cluster, where it reaches only the topic's shard).
    publish_command: &'static str,
    publish: Script,
    read: Script,
    stream: Script,
    confirm: Script,
    retention: Retention,
    listener: mpsc::UnboundedSender<Follow>,
}

impl Shared {
    fn cutoff(&self) -> u64 {
        self.retention.max_age.map_or(0, |age| {
            now_millis().saturating_sub(age.as_millis() as u64).max(1)
        })
    }

    /// The command a write script publishes with: none when replicas must confirm first
    /// (the node publishes once `WAIT` says they have it, so no subscriber ever sees a
    /// message a failover could take back and hand its id to another).
    fn script_publishes(&self) -> &'static str {
        if self.min_replicas > 0 {
            ""
        } else {
            self.publish_command
        }
    }

    /// Reads the topic's ends and the messages after `after` (at most `limit`). With
    /// `--redis-min-replicas`, a read that finds the log ahead of the confirmed id first
    /// asks whether replicas have it ([`Shared::reconfirm`]), so an acknowledged message is
    /// never hidden behind a confirmed id that a failover set back.
    async fn read(
        &self,
        topic: &TopicName,
        after: MessageId,
        limit: usize,
    ) -> Result<LogRead, StoreError> {
        let read = self.read_once(topic, after, limit).await?;
        if self.min_replicas == 0 || !read.capped || !self.reconfirm(topic).await {
            return Ok(read.read);
        }
        Ok(self.read_once(topic, after, limit).await?.read)
    }

    /// With `--redis-min-replicas`: when the replicas have everything the topic's primary
    /// has now, raises the topic's confirmed id to its counter; whether it did. A write's own
    /// confirmation normally does this; this is for the one a failover lost (the messages
    /// replicated, the raise not yet), and costs a read only while the log is ahead of the
    /// confirmed id. `WAIT` counts the replication of its own connection's writes, so a
    /// write that changes nothing (`INCRBY` 0, which reads the counter) goes first.
    async fn reconfirm(&self, topic: &TopicName) -> bool {
        let key = seq_key(topic);
        let mut pipeline = Pipeline::new();
        pipeline
            .cmd("INCRBY")
            .arg(&key)
            .arg(0)
            .cmd("WAIT")
            .arg(self.min_replicas)
            .arg(self.replica_timeout_ms.min(RECONFIRM_WAIT_MS));
        let mut connection = self.writes.clone().unwrap_or_else(|| self.commands.clone());
        let answer = connection.on_primary(&key, &pipeline).await;
        let (newest, acked): (MessageId, u64) = match answer.map(|values| {
            let mut values = values.into_iter().map(Value::extract_error);
            (values.next(), values.next())
        }) {
            Ok((Some(Ok(newest)), Some(Ok(acked)))) => match (parse(newest), parse(acked)) {
                (Ok(newest), Ok(acked)) => (newest, acked),
                _ => return false,
            },
            _ => return false,
        };
        acked >= u64::from(self.min_replicas) && self.confirm(topic, newest, &[]).await.is_ok()
    }

    /// A read as it stands (capped at the confirmed id, no `WAIT`): the listener's, whose
    /// loop delivers every topic of the node and must never wait on replicas.
    async fn read_log(
        &self,
        topic: &TopicName,
        after: MessageId,
        limit: usize,
    ) -> Result<LogRead, StoreError> {
        Ok(self.read_once(topic, after, limit).await?.read)
    }

    async fn read_once(
        &self,
        topic: &TopicName,
        after: MessageId,
        limit: usize,
    ) -> Result<CappedRead, StoreError> {
        let mut commands = self.commands.clone();
        let mut invocation = self.read.key(seq_key(topic));
        invocation
            .key(log_key(topic))
            .key(stream_key(topic))
            .key(ack_key(topic))
            .arg(after.min(1 << 53))
            .arg(limit)
            .arg(self.cutoff())
            .arg(if self.min_replicas > 0 { "1" } else { "0" });
        let (capped_id, first_retained, members, newest): (u64, u64, Vec<Vec<u8>>, u64) =
            invocation
                .invoke_async(&mut commands)
                .await
                .map_err(unavailable)?;
        let messages = members
            .into_iter()
            .map(|member| decode_member(topic, Bytes::from(member)).map(Arc::new))
            .collect::<Result<_, _>>()?;
        // A cursor between the confirmed id and the counter (a client that saw a message
        // confirmed an instant ago, on another node) is not "ahead of the topic": the read
        // stands at the cursor, and what comes next is delivered once confirmed.
        let last_id = if after <= newest {
            capped_id.max(after)
        } else {
            capped_id
        };
        Ok(CappedRead {
            read: LogRead {
                messages,
                head: LogHead {
                    last_id,
                    first_retained,
                },
            },
            capped: capped_id < newest,
        })
    }

    /// Runs a write script (`cmd`, an [`evalsha`] of `script` on `key`'s slot) once.
    ///
    /// With `--redis-min-replicas N` the script and a `WAIT N timeout` go pipelined to the
    /// slot's primary, and fewer than N confirmations is a 503: the write may still be kept
    /// (and delivered later), but no `201` is given for what a failover could lose. A write
    /// is sent again only after an answer that says it did not run (`NOSCRIPT`, `MOVED`,
    /// `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, `READONLY`, `LOADING`); never after a lost reply,
    /// which could mean it ran (the write connection of a cluster has the library's retries
    /// off for this reason).
    async fn write(
        &self,
        key: &str,
        script: &Script,
        code: &str,
        cmd: Cmd,
    ) -> Result<Value, StoreError> {
        let mut connection = self.writes.clone().unwrap_or_else(|| self.commands.clone());
        let mut loaded = false;
        for attempt in 1.. {
            let outcome = if self.min_replicas > 0 {
                self.replicated(connection.clone(), key, &cmd).await?
            } else {
                connection
                    .req_packed_command(&cmd)
                    .await
                    .and_then(Value::extract_error)
            };
            match outcome {
                // A primary that never ran the script (new, restarted, promoted): load it
                // there and run it again.
                Err(error) if not_run(&error) && !loaded => {
                    loaded = true;
                    let mut load = Pipeline::new();
                    load.cmd("SCRIPT").arg("LOAD").arg(code);
                    let hash = connection
                        .on_primary(key, &load)
                        .await
                        .map_err(unavailable)?;
                    debug_assert!(matches!(
                        hash.first(),
                        Some(Value::BulkString(h)) if h == script.get_hash().as_bytes()
                    ));
                }
                // The cluster is moving the slot, or electing its primary: the write did
                // not run; try again shortly (the library refreshes its slot map meanwhile).
                Err(error) if refused_before_running(&error) && attempt < WRITE_ATTEMPTS => {
                    // A redirect inside a pipeline does not make the library look at the
                    // cluster again; a plain keyed command meeting the same redirect does.
                    connection.refresh_route(key).await;
                    tokio::time::sleep(REROUTE_PAUSE * attempt).await;
                }
                other => return other.map_err(unavailable),
            }
        }
        unreachable!("the loop returns")
    }

    /// The script, then `WAIT`, as one pipeline on the slot's primary. The inner result is
    /// the script's; the outer error is a refusal (too few replicas, or Redis unreachable).
    async fn replicated(
        &self,
        mut writes: Connection,
        key: &str,
        cmd: &Cmd,
    ) -> Result<redis::RedisResult<Value>, StoreError> {
        let mut pipeline = Pipeline::new();
        pipeline
            .add_command(cmd.clone())
            .cmd("WAIT")
            .arg(self.min_replicas)
            .arg(self.replica_timeout_ms);
        let mut values = match writes.on_primary(key, &pipeline).await {
            Ok(values) => values.into_iter(),
            // Refused before running (a redirect): the caller may send it again.
            Err(error) if refused_before_running(&error) || not_run(&error) => {
                return Ok(Err(error));
            }
            Err(error) => return Err(unavailable(error)),
        };
        let (Some(written), Some(acked)) = (values.next(), values.next()) else {
            return Err(StoreError::Internal(
                "redis: short answer to a write".into(),
            ));
        };
        let written = written.extract_error();
        if written.is_err() {
            return Ok(written);
        }
        let acked: u64 = parse(acked.extract_error().map_err(unavailable)?)?;
        if acked < u64::from(self.min_replicas) {
            return Err(StoreError::Unavailable(format!(
                "redis: {acked} of {} replicas confirmed the write within {} ms; it may still \
                 be kept and delivered",
                self.min_replicas, self.replica_timeout_ms
            )));
        }
        Ok(written)
    }

    /// Appends `records` to the topic in one script call (see [`batch::Appends`]): their
    /// ids, in order.
    async fn append_batch(
        &self,
        topic: &TopicName,
        records: &[&[u8]],
    ) -> Result<Vec<MessageId>, StoreError> {
        let retention = &self.retention;
        let age_ms = retention.max_age.map_or(0, |age| age.as_millis() as u64);
        let keys = [seq_key(topic), log_key(topic), stream_key(topic)];
        let mut cmd = evalsha(&self.publish, &keys);
        cmd.arg(channel(topic))
            .arg(retention.max_messages.max(1))
            .arg(self.cutoff())
            .arg(age_ms)
            .arg(self.script_publishes())
            .arg(topic.as_str());
        for record in records {
            cmd.arg(*record);
        }
        let answer = self
            .write(&keys[0], &self.publish, PUBLISH_SCRIPT, cmd)
            .await?;
        let ids: Vec<i64> = parse(answer)?;
        if ids.first() == Some(&-1) {
            return Err(StoreError::Sealed);
        }
        if ids.len() != records.len() {
            return Err(StoreError::Internal("redis: bad publish answer".into()));
        }
        let ids: Vec<MessageId> = ids.into_iter().map(|id| id as MessageId).collect();
        if self.min_replicas > 0 {
            let members: Vec<Vec<u8>> = ids
                .iter()
                .zip(records)
                .map(|(&id, record)| encode_member(id, record))
                .collect();
            self.confirm(topic, *ids.last().unwrap_or(&0), &members)
                .await?;
        }
        Ok(ids)
    }

    /// With `--redis-min-replicas`: once a write is confirmed, makes it visible to reads
    /// (the topic's confirmed id) and publishes its members in id order. Idempotent, so the
    /// library may retry it.
    async fn confirm(
        &self,
        topic: &TopicName,
        newest: MessageId,
        members: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        if self.min_replicas == 0 {
            return Ok(());
        }
        let mut invocation = self.confirm.key(ack_key(topic));
        invocation
            .arg(newest)
            .arg(channel(topic))
            .arg(self.publish_command);
        for member in members {
            invocation.arg(member.as_slice());
        }
        let mut commands = self.commands.clone();
        invocation
            .invoke_async::<()>(&mut commands)
            .await
            .map_err(unavailable)
    }
}

/// A log read, and whether the confirmed id hid some of the log from it.
struct CappedRead {
    read: LogRead,
    capped: bool,
}

/// How long a read waits for replicas to confirm what its topic's log holds beyond the
/// confirmed id (at most `--redis-replica-timeout`): short, since a read is not a publish.
const RECONFIRM_WAIT_MS: u64 = 100;

/// Tries of a write refused before it ran (the slot moving, a primary being elected).
const WRITE_ATTEMPTS: u32 = 5;
/// The pause before the next try, times the number of tries so far.
const REROUTE_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// An answer by which Redis refused a command without running it.
fn refused_before_running(error: &redis::RedisError) -> bool {
    matches!(error.kind(), redis::ErrorKind::Server(_))
        && !matches!(error.retry_method(), redis::RetryMethod::NoRetry)
}

impl RedisStore {
    /// Connects to one primary at `url` lazily (a node starts, and answers 503, while Redis
    /// is down) and starts the listener. Must be called inside a Tokio runtime.
    pub fn open(url: &str, retention: Retention) -> Result<Self, StoreError> {
        Self::connect(&RedisOptions::single(url), retention)
    }

    /// Connects as `options` say (one primary or a cluster, replicas to wait for), lazily,
    /// and starts the listener. Must be called inside a Tokio runtime.
    pub fn connect(options: &RedisOptions, retention: Retention) -> Result<Self, StoreError> {
        let links = connection::connect(options)?;
        let (listener, follows) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            commands: links.commands,
            writes: links.writes,
            min_replicas: options.min_replicas,
            // `WAIT 0` would wait for ever: the timeout is never 0.
            replica_timeout_ms: (options.replica_timeout.as_millis() as u64).max(1),
            publish_command: if links.cluster { "SPUBLISH" } else { "PUBLISH" },
            publish: Script::new(PUBLISH_SCRIPT),
            read: Script::new(READ_SCRIPT),
            stream: Script::new(STREAM_SCRIPT),
            confirm: Script::new(CONFIRM_SCRIPT),
            retention,
            listener,
        });
        let (created, _) = broadcast::channel(1024);
        let (presence, _) = broadcast::channel(1024);
        Listener::spawn(
            links.subscriber,
            links.pushes,
            Arc::downgrade(&shared),
            follows,
            listener::Feeds {
                created: created.clone(),
                presence: presence.clone(),
            },
        );
        Ok(Self {
            shared,
            created,
            presence,
        })
    }

    /// Names of topics as their first message is stored, by any node: how a node learns of
    /// topics created elsewhere (a topic's own channel is sharded, and sharded pub/sub has no
    /// pattern subscribe).
    pub fn created_topics(&self) -> broadcast::Receiver<Created> {
        self.created.subscribe()
    }
}

impl Store for RedisStore {
    /// The topics with a counter (`pushhub:{t}:seq`), by `SCAN` with a pattern: every
    /// primary's keys are walked, so its cost grows with the keyspace (see scaling.md).
    fn topics<'a>(
        &'a self,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<Vec<TopicName>>, StoreError>> {
        Box::pin(async move {
            // Topic names hold no glob character (`*?[]\\`), so the prefix needs no escape.
            let pattern = format!("pushhub:{{{prefix}*}}:seq");
            let mut commands = self.shared.commands.clone();
            let keys = tokio::time::timeout(COMMAND_TIMEOUT * 4, commands.scan(&pattern, limit))
                .await
                .map_err(|_| StoreError::Unavailable("redis: SCAN timed out".into()))?
                .map_err(unavailable)?;
            let mut topics: Vec<TopicName> = keys
                .iter()
                .filter_map(|key| {
                    let key = std::str::from_utf8(key).ok()?;
                    TopicName::parse(key.strip_prefix("pushhub:{")?.strip_suffix("}:seq")?).ok()
                })
                .collect();
            topics.sort();
            topics.dedup();
            topics.truncate(limit);
            Ok(Some(topics))
        })
    }

    fn created_topics(&self) -> Option<broadcast::Receiver<Created>> {
        Some(self.created.subscribe())
    }

    fn presence_board(&self, node: &str) -> Option<Arc<dyn super::PresenceBoard>> {
        Some(Arc::new(presence::RedisBoard {
            shared: self.shared.clone(),
            node: node.to_owned(),
            feed: self.presence.clone(),
        }))
    }

    fn open(&self, topic: &TopicName, live: Arc<dyn Live>) -> Arc<dyn TopicLog> {
        let capacity = self.shared.retention.max_messages.clamp(1, TAIL_CAPACITY);
        Arc::new(RedisLog {
            topic: topic.clone(),
            live,
            shared: self.shared.clone(),
            following: AtomicBool::new(false),
            streaming: AtomicBool::new(false),
            tail: Arc::new(std::sync::Mutex::new(Tail {
                messages: VecDeque::new(),
                capacity,
            })),
            appends: batch::Appends::new(topic.clone(), self.shared.clone()),
        })
    }
}

struct RedisLog {
    topic: TopicName,
    live: Arc<dyn Live>,
    shared: Arc<Shared>,
    following: AtomicBool,
    /// The topic was last seen to be a stream: its local tail applies no age cutoff.
    streaming: AtomicBool,
    tail: SharedTail,
    appends: Arc<batch::Appends>,
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
        let id = self
            .appends
            .append(record::encode(time, &event, data))
            .await?;
        Ok(Arc::new(Message::new(
            id,
            self.topic.clone(),
            event,
            time,
            data,
        )))
    }

    async fn read(&self, after: MessageId, limit: usize) -> Result<LogRead, StoreError> {
        // From Redis itself: the local tail may not have received this node's own latest
        // appends yet; `read_now` answers from it where that is good enough.
        self.shared.read(&self.topic, after, limit).await
    }

    fn read_now(&self, after: MessageId, limit: usize) -> Option<Result<LogRead, StoreError>> {
        let cutoff = if self.streaming.load(Ordering::Relaxed) {
            0
        } else {
            self.shared.cutoff()
        };
        lock(&self.tail).read(after, limit, cutoff).map(Ok)
    }

    async fn stream(&self) -> Result<Option<StreamState>, StoreError> {
        let mut commands = self.shared.commands.clone();
        let (value, version): (Option<Vec<u8>>, Option<u64>) = redis::cmd("MGET")
            .arg(stream_key(&self.topic))
            .arg(version_key(&self.topic))
            .query_async(&mut commands)
            .await
            .map_err(unavailable)?;
        let state = value.map(|value| StreamState {
            sealed: value.first() == Some(&b'1'),
            record: Bytes::copy_from_slice(value.get(1..).unwrap_or_default()),
            version: version.unwrap_or(0),
        });
        self.streaming.store(state.is_some(), Ordering::Relaxed);
        Ok(state)
    }

    async fn write_stream(&self, write: StreamWrite) -> Result<StreamWritten, StoreError> {
        let shared = &self.shared;
        let keys = [
            seq_key(&self.topic),
            log_key(&self.topic),
            stream_key(&self.topic),
            version_key(&self.topic),
        ];
        let state = write.state.as_ref().map_or_else(Vec::new, |state| {
            let mut value = vec![if state.sealed { b'1' } else { b'0' }];
            value.extend_from_slice(&state.record);
            value
        });
        let mut cmd = evalsha(&shared.stream, &keys);
        cmd.arg(channel(&self.topic))
            .arg(if write.clear { "1" } else { "0" })
            .arg(state)
            .arg(match write.expect {
                StreamExpect::Any => String::new(),
                StreamExpect::Absent => "absent".into(),
                StreamExpect::Version(version) => version.to_string(),
            })
            .arg(shared.script_publishes())
            .arg(self.topic.as_str());
        let records: Vec<Vec<u8>> = write
            .messages
            .iter()
            .map(|(event, data)| record::encode(write.time, event, data))
            .collect();
        for record in &records {
            cmd.arg(record);
        }
        let answer = shared
            .write(&keys[0], &shared.stream, STREAM_SCRIPT, cmd)
            .await?;
        let answer: Vec<i64> = parse(answer)?;
        let (head, notice, ids) = match answer.as_slice() {
            [-1] => return Err(StoreError::Conflict),
            [last_id, first_retained, notice, ids @ ..] => (
                LogHead {
                    last_id: *last_id as u64,
                    first_retained: *first_retained as u64,
                },
                *notice == 1,
                ids,
            ),
            _ => return Err(StoreError::Internal("redis: bad stream answer".into())),
        };
        self.streaming
            .store(write.state.is_some(), Ordering::Relaxed);
        let mut members: Vec<Vec<u8>> = ids
            .iter()
            .zip(&records)
            .map(|(&id, record)| encode_member(id as MessageId, record))
            .collect();
        if notice {
            members.push(STATE_NOTICE.to_vec());
        }
        shared.confirm(&self.topic, head.last_id, &members).await?;
        let messages = ids
            .iter()
            .zip(write.messages)
            .map(|(&id, (event, data))| {
                Arc::new(Message::new(
                    id as u64,
                    self.topic.clone(),
                    event,
                    write.time,
                    &data,
                ))
            })
            .collect();
        Ok(StreamWritten { messages, head })
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

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}
