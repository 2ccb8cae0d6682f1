//! Presence shared through Redis ([`RedisBoard`]).
//!
//! Keys:
//! - `pushhub:{t}:presence`, a hash per topic (in the topic's slot): member id → member JSON.
//!   A member id starts with its node's key and `/`, so a node's members are found by prefix.
//! - `pushhub:nodes`, a sorted set of node keys scored by their last beat (Redis's own
//!   clock, so the nodes' clocks need not agree).
//! - `pushhub:node:{key}:topics`, per node, the topics where it has members: what a survivor
//!   reads to reap it.
//!
//! A node's changes reach the other nodes as a `p` payload (`p`, the origin node's key, a
//! newline, the envelope) on the topic's own channel, so only nodes that follow the topic
//! receive them. Every beat says which nodes stopped beating [`NODE_TIMEOUT`] ago; the
//! first survivor to remove one from `pushhub:nodes` reaps it: it deletes its members and
//! sends their leaving on its behalf. Lists leave out members of nodes that are not live,
//! so a node that died while reaping another leaves nothing visible behind.
//!
//! [`NODE_TIMEOUT`]: super::super::PresenceBoard::NODE_TIMEOUT

use std::{collections::HashSet, sync::Arc};

use futures::future::BoxFuture;
use redis::{Cmd, Value};
use tokio::sync::broadcast;

use super::{COMMAND_TIMEOUT, Shared, keys::channel, unavailable};
use crate::{
    message::{
        TopicName,
        presence::{Diff, Member, oldest_first},
    },
    store::{PresenceBoard, PresenceChange, RemotePresence, StoreError},
};

/// The sorted set of live nodes.
const NODES_KEY: &str = "pushhub:nodes";

/// Beats: scores this node with Redis's time and returns {whether it was new, the nodes
/// older than the timeout, the nodes within it}. KEYS: nodes. ARGV: node key, timeout ms.
const BEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local new = redis.call('ZADD', KEYS[1], now, ARGV[1])
local cut = now - tonumber(ARGV[2])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cut)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], cut, '+inf')
return {new, dead, live}
";

/// The live nodes. KEYS: nodes. ARGV: timeout ms.
const LIVE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
";

/// A topic's presence hash (in its slot, with its other keys).
fn presence_key(topic: &TopicName) -> String {
    format!("pushhub:{{{}}}:presence", topic.as_str())
}

/// The set of topics where `node` has members.
fn node_topics_key(node: &str) -> String {
    format!("pushhub:node:{node}:topics")
}

/// The node key a member id starts with.
fn node_of(id: &str) -> &str {
    id.split_once('/').map_or(id, |(node, _)| node)
}

/// The payload that carries an envelope on a topic's channel.
pub(super) fn payload(origin: &str, envelope: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(origin.len() + envelope.len() + 2);
    payload.push(b'p');
    payload.extend_from_slice(origin.as_bytes());
    payload.push(b'\n');
    payload.extend_from_slice(envelope);
    payload
}

/// Reads a payload of [`payload`]'s: `None` for anything else (a message starts with its
/// id, a state notice with `s`).
pub(super) fn parse_payload(topic: &TopicName, payload: &[u8]) -> Option<RemotePresence> {
    let rest = payload.strip_prefix(b"p")?;
    let newline = rest.iter().position(|&b| b == b'\n')?;
    Some(RemotePresence {
        topic: topic.clone(),
        origin: std::str::from_utf8(&rest[..newline]).ok()?.to_owned(),
        envelope: bytes::Bytes::copy_from_slice(&rest[newline + 1..]),
    })
}

/// Presence on Redis, for one node.
pub(super) struct RedisBoard {
    pub(super) shared: Arc<Shared>,
    pub(super) node: String,
    pub(super) feed: broadcast::Sender<RemotePresence>,
}

impl RedisBoard {
    async fn run<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut connection = self.shared.commands.clone();
        let value: Value = tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async(&mut connection))
            .await
            .map_err(|_| StoreError::Unavailable("redis: presence timed out".into()))?
            .map_err(unavailable)?;
        super::parse(value)
    }

    async fn publish(
        &self,
        topic: &TopicName,
        origin: &str,
        envelope: &[u8],
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd(self.shared.publish_command);
        cmd.arg(channel(topic)).arg(payload(origin, envelope));
        self.run::<Value>(&cmd).await.map(drop)
    }

    /// The members recorded for `topic`, by id.
    async fn recorded(&self, topic: &TopicName) -> Result<Vec<(String, Member)>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(presence_key(topic));
        let fields: Vec<(String, String)> = self.run(&cmd).await?;
        Ok(fields
            .into_iter()
            .filter_map(|(id, json)| Some((id, serde_json::from_str(&json).ok()?)))
            .collect())
    }

    async fn delete(&self, topic: &TopicName, ids: &[&str]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(presence_key(topic)).arg(ids);
        self.run::<Value>(&cmd).await.map(drop)
    }

    async fn record(&self, topic: &TopicName, members: &[Member]) -> Result<(), StoreError> {
        if members.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("HSET");
        cmd.arg(presence_key(topic));
        for member in members {
            cmd.arg(&member.id)
                .arg(serde_json::to_string(member).unwrap_or_default());
        }
        self.run::<Value>(&cmd).await?;
        let mut cmd = redis::cmd("SADD");
        cmd.arg(node_topics_key(&self.node)).arg(topic.as_str());
        self.run::<Value>(&cmd).await.map(drop)
    }

    /// Takes `topic` out of this node's set of topics with members (it has none left there).
    async fn unlist(&self, topic: &TopicName) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SREM");
        cmd.arg(node_topics_key(&self.node)).arg(topic.as_str());
        self.run::<Value>(&cmd).await.map(drop)
    }

    /// Removes a dead node's members and tells of their leaving on its behalf.
    async fn reap(&self, dead: &str) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(node_topics_key(dead));
        let topics: Vec<String> = self.run(&cmd).await?;
        for topic in topics.iter().filter_map(|t| TopicName::parse(t).ok()) {
            let leaves: Vec<Member> = self
                .recorded(&topic)
                .await?
                .into_iter()
                .filter(|(id, _)| node_of(id) == dead)
                .map(|(_, member)| member)
                .collect();
            let ids: Vec<&str> = leaves.iter().map(|m| m.id.as_str()).collect();
            self.delete(&topic, &ids).await?;
            if !leaves.is_empty() {
                let envelope = Diff::capped(Vec::new(), leaves).envelope(&topic);
                self.publish(&topic, dead, &envelope).await?;
            }
        }
        let mut cmd = redis::cmd("DEL");
        cmd.arg(node_topics_key(dead));
        self.run::<Value>(&cmd).await?;
        tracing::info!(
            node = dead,
            topics = topics.len(),
            "presence: reaped a dead node"
        );
        Ok(())
    }
}

impl PresenceBoard for RedisBoard {
    fn write<'a>(
        &'a self,
        topic: &'a TopicName,
        change: PresenceChange<'a>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // Recorded before it is told, so a watcher that reads the list on hearing of a
            // join finds it.
            self.record(topic, change.joins).await?;
            let ids: Vec<&str> = change.leaves.iter().map(|m| m.id.as_str()).collect();
            self.delete(topic, &ids).await?;
            if change.emptied {
                self.unlist(topic).await?;
            }
            if let Some(envelope) = change.envelope {
                self.publish(topic, &self.node, envelope).await?;
            }
            Ok(())
        })
    }

    fn resync<'a>(
        &'a self,
        members: &'a [(TopicName, Vec<Member>)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("SMEMBERS");
            cmd.arg(node_topics_key(&self.node));
            let recorded: Vec<String> = self.run(&cmd).await?;
            let mut topics: Vec<TopicName> = members.iter().map(|(t, _)| t.clone()).collect();
            topics.extend(recorded.iter().filter_map(|t| TopicName::parse(t).ok()));
            topics.sort();
            topics.dedup();
            for topic in &topics {
                let here: &[Member] = members
                    .iter()
                    .find(|(t, _)| t == topic)
                    .map_or(&[], |(_, m)| m.as_slice());
                let keep: HashSet<&str> = here.iter().map(|m| m.id.as_str()).collect();
                let recorded = self.recorded(topic).await?;
                let stale: Vec<&str> = recorded
                    .iter()
                    .map(|(id, _)| id.as_str())
                    .filter(|id| node_of(id) == self.node && !keep.contains(id))
                    .collect();
                self.delete(topic, &stale).await?;
                self.record(topic, here).await?;
                if here.is_empty() {
                    self.unlist(topic).await?;
                }
            }
            Ok(())
        })
    }

    fn list<'a>(&'a self, topic: &'a TopicName) -> BoxFuture<'a, Result<Vec<Member>, StoreError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(LIVE_SCRIPT)
                .arg(1)
                .arg(NODES_KEY)
                .arg(<dyn PresenceBoard>::NODE_TIMEOUT.as_millis() as u64);
            let live: HashSet<String> = self.run::<Vec<String>>(&cmd).await?.into_iter().collect();
            let mut members: Vec<Member> = self
                .recorded(topic)
                .await?
                .into_iter()
                .filter(|(id, _)| live.contains(node_of(id)))
                .map(|(_, member)| member)
                .collect();
            oldest_first(&mut members);
            Ok(members)
        })
    }

    fn beat(&self) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(BEAT_SCRIPT)
                .arg(1)
                .arg(NODES_KEY)
                .arg(&self.node)
                .arg(<dyn PresenceBoard>::NODE_TIMEOUT.as_millis() as u64);
            let (new, dead, _live): (i64, Vec<String>, Vec<String>) = self.run(&cmd).await?;
            for dead in dead {
                // The first node to remove it reaps it.
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(NODES_KEY).arg(&dead);
                if self.run::<i64>(&cmd).await? == 1 {
                    self.reap(&dead).await?;
                }
            }
            Ok(new == 1)
        })
    }

    fn remote(&self) -> broadcast::Receiver<RemotePresence> {
        self.feed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_messages_are_not_taken_for_them() {
        let topic = TopicName::parse("room").unwrap();
        let sent = payload("n:1~ab", br#"{"type":"presence"}"#);
        let got = parse_payload(&topic, &sent).unwrap();
        assert_eq!(got.origin, "n:1~ab");
        assert_eq!(&got.envelope[..], br#"{"type":"presence"}"#);
        assert!(parse_payload(&topic, b"12\n{}").is_none());
        assert!(parse_payload(&topic, b"state").is_none());
        assert_eq!(node_of("n:1~ab/17"), "n:1~ab");
    }
}
