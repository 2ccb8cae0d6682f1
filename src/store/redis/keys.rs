//! What pushhub keeps in Redis, and how: the key scheme (a `{topic}` hash tag, so one
//! topic's keys share a Redis Cluster slot), the Lua scripts Redis runs atomically, and
//! the sorted-set member that carries a message (`id\nrecord`).

use bytes::Bytes;

use super::super::{StoreError, record};
use crate::message::{Message, MessageId, TopicName};

/// Appends a batch of messages, trims and publishes, atomically. KEYS: seq, log, stream.
/// ARGV: channel, max messages, age cutoff in ms (0: none), age limit in ms (0: none), the
/// publish command (`PUBLISH`, `SPUBLISH` in a cluster, empty: the node publishes once
/// replicas have the write), the topic's name, then one record per message. Returns the ids
/// given, in order. A topic that is a stream is not trimmed; a sealed one refuses the whole
/// batch (returns {-1}). A topic's first id is announced on [`CREATED_CHANNEL`].
pub(super) const PUBLISH_SCRIPT: &str = r"
local stream = redis.call('GET', KEYS[3])
if stream and string.byte(stream, 1) == 49 then return {-1} end
local count = #ARGV - 6
local id = redis.call('INCRBY', KEYS[1], count) - count
if id == 0 then redis.call('PUBLISH', 'pushhub:topics', ARGV[6]) end
local ids = {}
for i = 7, #ARGV do
  id = id + 1
  local member = id .. '\n' .. ARGV[i]
  redis.call('ZADD', KEYS[2], id, member)
  if ARGV[5] ~= '' then redis.call(ARGV[5], ARGV[1], member) end
  ids[#ids + 1] = id
end
if stream then return ids end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', id - tonumber(ARGV[2]))
local cutoff = tonumber(ARGV[3])
while cutoff > 0 do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  local time = oldest[1] and tonumber(string.match(oldest[1], '^%d+\n(%d+)\n'))
  if not time or time >= cutoff then break end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, 0)
end
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
return ids
";

/// The classic channel (broadcast to every node of a cluster, unlike a topic's sharded one)
/// on which a topic's first message announces the topic's name: how a node learns of topics
/// created elsewhere, which sharded pub/sub (it has no pattern subscribe) cannot tell it.
pub(super) const CREATED_CHANNEL: &str = "pushhub:topics";

/// Applies a stream write atomically, if the state is still the one its writer read.
/// KEYS: seq, log, stream, version. ARGV: channel, clear (0/1), state (`0`/`1` seal byte then
/// the record; empty removes it), the version read (empty: write whatever it is), the
/// publish command (as [`PUBLISH_SCRIPT`]'s), the topic's name, then one record per message.
/// Returns {-1} when the version moved (another node wrote meanwhile), else {last id, first
/// retained, notice (0/1), ids appended...}. A write that seals or removes the state, or
/// changes it without appending, wants [`STATE_NOTICE`] published on the channel after its
/// messages (notice 1; the script publishes it when it publishes), so that other nodes'
/// readers waiting on the stream look at it again.
pub(super) const STREAM_SCRIPT: &str = r"
local version = tonumber(redis.call('GET', KEYS[4]) or '0')
if ARGV[4] == 'absent' then
  if redis.call('EXISTS', KEYS[3]) == 1 then return {-1} end
elseif ARGV[4] ~= '' and tonumber(ARGV[4]) ~= version then
  return {-1}
end
redis.call('INCR', KEYS[4])
if ARGV[2] == '1' then redis.call('DEL', KEYS[2]) end
local ids = {}
for i = 7, #ARGV do
  local id = redis.call('INCR', KEYS[1])
  if id == 1 then redis.call('PUBLISH', 'pushhub:topics', ARGV[6]) end
  local member = id .. '\n' .. ARGV[i]
  redis.call('ZADD', KEYS[2], id, member)
  if ARGV[5] ~= '' then redis.call(ARGV[5], ARGV[1], member) end
  ids[#ids + 1] = id
end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[3])
else
  redis.call('SET', KEYS[3], ARGV[3])
  redis.call('PERSIST', KEYS[2])
end
local notice = 0
if #ARGV < 7 or ARGV[3] == '' or string.byte(ARGV[3], 1) == 49 then
  notice = 1
  if ARGV[5] ~= '' then redis.call(ARGV[5], ARGV[1], 'state') end
end
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local first = last + 1
if oldest[2] then first = tonumber(oldest[2]) end
local out = {last, first, notice}
for _, id in ipairs(ids) do out[#out + 1] = id end
return out
";

/// What [`STREAM_SCRIPT`] publishes on a topic's channel when its stream state changes in a
/// way readers wait for: no message member looks like it (members start with an id).
pub(super) const STATE_NOTICE: &[u8] = b"state";

/// Reads a topic's ends and the messages after a cursor, from one moment. KEYS: seq, log,
/// stream, ack. ARGV: after, limit, age cutoff in ms (0: none; a stream has none), capped
/// (`1` with `--redis-min-replicas`: nothing above the topic's confirmed id is read, as if
/// the counter stood there). Returns {last id (capped), first retained, members, newest id}.
pub(super) const READ_SCRIPT: &str = r"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local newest = last
if ARGV[4] == '1' then
  local ack = tonumber(redis.call('GET', KEYS[4]) or '0')
  if ack < last then last = ack end
end
local cutoff = tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 1 then cutoff = 0 end
local first = last + 1
local rank = 0
while true do
  local oldest = redis.call('ZRANGE', KEYS[2], rank, rank, 'WITHSCORES')
  if not oldest[1] then break end
  local time = tonumber(string.match(oldest[1], '^%d+\n(%d+)\n'))
  if cutoff > 0 and time and time < cutoff then
    rank = rank + 1
  else
    first = math.min(tonumber(oldest[2]), last + 1)
    break
  end
end
local from = math.max(tonumber(ARGV[1]) + 1, first)
local members = {}
if tonumber(ARGV[2]) > 0 and from <= last then
  members = redis.call('ZRANGEBYSCORE', KEYS[2], from, last, 'LIMIT', 0, ARGV[2])
end
return {last, first, members, newest}
";

/// With `--redis-min-replicas`, run once a write's `WAIT` confirmed it: raises the topic's
/// confirmed id (what reads may see) and publishes the write's members, so that no reader
/// or subscriber ever sees a message a failover could take back. KEYS: ack. ARGV: the
/// write's newest id, channel, publish command, then the members to publish.
pub(super) const CONFIRM_SCRIPT: &str = r"
local ack = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > ack then redis.call('SET', KEYS[1], ARGV[1]) end
for i = 4, #ARGV do redis.call(ARGV[3], ARGV[2], ARGV[i]) end
return 1
";

/// The topic's id counter.
pub(super) fn seq_key(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:seq")
}

pub(super) fn log_key(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:log")
}

/// The topic's stream state (a seal byte `0`/`1`, then the record), while it is a stream.
pub(super) fn stream_key(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:stream")
}

/// The topic's newest id whose write replicas confirmed (with `--redis-min-replicas`).
pub(super) fn ack_key(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:ack")
}

/// How many times the topic's stream state was written: the version a compare-and-set of
/// the state compares. Kept when the state is removed, so a version is never reused.
pub(super) fn version_key(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:sver")
}

pub(super) fn channel(topic: &TopicName) -> String {
    format!("pushhub:{{{topic}}}:live")
}

/// The topic of a channel name made by [`channel`].
pub(super) fn topic_of_channel(channel: &str) -> Option<TopicName> {
    let inner = channel.strip_prefix("pushhub:{")?.strip_suffix("}:live")?;
    TopicName::parse(inner).ok()
}

/// The sorted-set member (and channel message) `id\nrecord` of a message, as the scripts
/// build it.
pub(super) fn encode_member(id: MessageId, record: &[u8]) -> Vec<u8> {
    let mut member = format!("{id}\n").into_bytes();
    member.extend_from_slice(record);
    member
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
