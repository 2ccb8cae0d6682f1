//! What pushhub keeps in Redis, and how: the key scheme (a `{topic}` hash tag, so one
//! topic's keys share a Redis Cluster slot), the two Lua scripts Redis runs atomically, and
//! the sorted-set member that carries a message (`id\nrecord`).

use bytes::Bytes;

use super::super::{StoreError, record};
use crate::message::{Message, TopicName};

/// Appends, trims and publishes, atomically. KEYS: seq, log. ARGV: channel, record,
/// max messages, age cutoff in ms (0: none), age limit in ms (0: none).
pub(super) const PUBLISH_SCRIPT: &str = r"
local id = redis.call('INCR', KEYS[1])
local member = id .. '\n' .. ARGV[2]
redis.call('ZADD', KEYS[2], id, member)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', id - tonumber(ARGV[3]))
local cutoff = tonumber(ARGV[4])
while cutoff > 0 do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  local time = oldest[1] and tonumber(string.match(oldest[1], '^%d+\n(%d+)\n'))
  if not time or time >= cutoff then break end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, 0)
end
if tonumber(ARGV[5]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
redis.call('PUBLISH', ARGV[1], member)
return id
";

/// Reads a topic's ends and the messages after a cursor, from one moment. KEYS: seq, log.
/// ARGV: after, limit, age cutoff in ms (0: none). Returns {last id, first retained, members}.
pub(super) const READ_SCRIPT: &str = r"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local cutoff = tonumber(ARGV[3])
local first = last + 1
local rank = 0
while true do
  local oldest = redis.call('ZRANGE', KEYS[2], rank, rank, 'WITHSCORES')
  if not oldest[1] then break end
  local time = tonumber(string.match(oldest[1], '^%d+\n(%d+)\n'))
  if cutoff > 0 and time and time < cutoff then
    rank = rank + 1
  else
    first = tonumber(oldest[2])
    break
  end
end
local from = math.max(tonumber(ARGV[1]) + 1, first)
local members = {}
if tonumber(ARGV[2]) > 0 and from <= last then
  members = redis.call('ZRANGEBYSCORE', KEYS[2], from, '+inf', 'LIMIT', 0, ARGV[2])
end
return {last, first, members}
";

/// The topic's id counter.
pub(super) fn seq_key(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:seq")
}

pub(super) fn log_key(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:log")
}

pub(super) fn channel(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:live")
}

/// The topic of a channel name made by [`channel`].
pub(super) fn topic_of_channel(channel: &str) -> Option<TopicName> {
    let inner = channel.strip_prefix("pushhub:{")?.strip_suffix("}:live")?;
    TopicName::parse(inner).ok()
}

/// Splits a sorted-set member `id\nrecord` into its message.
pub(super) fn decode_member(topic: &TopicName, member: Bytes) -> Result<Message, StoreError> {
    let corrupt = || StoreError::Internal(format!("corrupt redis member in {topic}"));
    let split = member
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(corrupt)?;
    let id = std::str::from_utf8(&member[..split])
        .ok()
        .and_then(|id| id.parse().ok())
        .ok_or_else(corrupt)?;
    record::decode(id, topic, member.slice(split + 1..))
}
