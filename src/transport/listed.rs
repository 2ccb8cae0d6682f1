//! `GET /topics/{a},{b},{news.*}/{poll|longpoll|sse|stream|ws}`: several topics on one
//! request, resumed by one cursor ([`crate::message::cursor`]).
//!
//! Every transport reads a topic list the same way, here: the list (at most
//! `--max-subscriptions-per-connection` entries, names and `prefix*` patterns), the token's
//! grant for each entry, where to start ([`Start`]: now, `after=0`, or a cursor string), and
//! the topics that are followed ([`plan`]: the listed names, and the topics each pattern
//! matches now). Streams then follow them all on one outlet, which writes the cursor
//! ([`open_listed`]); polls read each and answer with one body ([`poll`], [`longpoll`]).
//!
//! A list of one name and no pattern is the single-topic endpoint, with its plain id cursor.

use std::{future::Future, sync::Arc};

use crate::{
    access::{Access, HeaderSource},
    error::Error,
    hub::{Batch, Key, Outlet, ParkedPoll, Parking, PollQuery, Waited},
    message::{
        Message, MessageId, TopicName, TransportKind,
        cursor::{Cursor, looks_like_cursor},
        pattern::{Selection, Selector},
    },
};

use super::{Params, TransportState};

/// Whether a `{topic}` path segment is a topic list rather than one name.
pub fn is_list(segment: &str) -> bool {
    segment.contains(',') || segment.ends_with('*')
}

/// Reads a topic list: at most `--max-subscriptions-per-connection` entries.
pub fn selection(app: &TransportState, segment: &str) -> Result<Selection, Error> {
    Ok(Selection::parse(
        segment,
        app.settings.stream.max_subscriptions.max(1),
    )?)
}

/// Where the topics of a list start.
#[derive(Debug, Clone)]
pub enum Start {
    /// No cursor: from now, every topic.
    Now,
    /// `after=0`: from the oldest retained message, every topic.
    Oldest,
    /// A cursor string: each topic after its id; a topic it does not name from its start
    /// (the cursor's writer had seen nothing of it: a topic a pattern picked up since).
    At(Cursor),
}

impl Start {
    /// Reads a cursor value (`name` says where it came from, for the error): `0`, or a cursor
    /// string of at most `limit` topics.
    pub fn parse(name: &str, value: &[u8], limit: usize) -> Result<Self, Error> {
        if value == b"0" {
            return Ok(Start::Oldest);
        }
        if !looks_like_cursor(value) {
            return Err(Error::InvalidCursor(format!(
                "{name}: several topics resume from the cursor string a stream or poll gave \
                 (next_after, an SSE id), or from 0"
            )));
        }
        let text = std::str::from_utf8(value)
            .map_err(|_| Error::InvalidCursor(format!("{name}: not a cursor")))?;
        Cursor::decode(text, limit)
            .map(Start::At)
            .map_err(|malformed| Error::InvalidCursor(format!("{name}: {malformed}")))
    }

    /// From `?after=`.
    pub fn from_params(params: &Params, limit: usize) -> Result<Self, Error> {
        match params.get("after") {
            Some(value) => Self::parse("after", value.as_bytes(), limit),
            None => Ok(Start::Now),
        }
    }

    /// From `Last-Event-ID` (a reconnecting `EventSource`: the newer of the two), else
    /// `?after=`.
    pub fn from_sse(
        headers: &dyn HeaderSource,
        params: &Params,
        limit: usize,
    ) -> Result<Self, Error> {
        match headers.header("last-event-id") {
            Some(value) => Self::parse("Last-Event-ID", value, limit),
            None => Self::from_params(params, limit),
        }
    }

    /// The cursor's entries for topics a pattern picked up.
    fn hashed(&self) -> Vec<(u64, MessageId)> {
        match self {
            Start::At(cursor) => cursor.hashed.clone(),
            Start::Now | Start::Oldest => Vec::new(),
        }
    }
}

/// One topic a list follows: its name, how the cursor names it, and where it starts
/// (`None`: from now).
#[derive(Debug, Clone)]
pub struct Planned {
    /// The topic.
    pub topic: TopicName,
    /// Its name in the cursor.
    pub key: Key,
    /// Where it starts.
    pub after: Option<MessageId>,
}

/// Checks a list, its grant and its start: everything refused before any topic is touched.
pub fn check(
    app: &TransportState,
    access: &Access,
    segment: &str,
    start: impl FnOnce(usize) -> Result<Start, Error>,
) -> Result<(Selection, Start), Error> {
    let selection = selection(app, segment)?;
    access.check_selection(&selection)?;
    let start = start(app.settings.stream.max_subscriptions.max(1))?;
    if let Start::At(cursor) = &start {
        fits(&selection, cursor)?;
    }
    Ok((selection, start))
}

/// Refuses a cursor that names a topic outside the list: a position past its end or on a
/// pattern, or a hashed topic when the list has no pattern.
pub fn fits(selection: &Selection, cursor: &Cursor) -> Result<(), Error> {
    for &(position, _) in &cursor.listed {
        match selection.entries().get(position as usize) {
            Some(Selector::Name(_)) => {}
            _ => {
                return Err(Error::CursorMismatch(format!(
                    "the cursor names topic #{position} of a list this one ({selection}) does \
                     not have: resume with the list the cursor came from"
                )));
            }
        }
    }
    if !cursor.hashed.is_empty() && !selection.has_patterns() {
        return Err(Error::CursorMismatch(format!(
            "the cursor names topics a pattern picked up, and {selection} has no pattern"
        )));
    }
    Ok(())
}

/// The topics a checked list follows now, each once: the listed names in order, then what
/// each pattern matches. With `outlet`, the outlet first joins each pattern's registry, so
/// that a topic created while this lists is joined, not missed.
pub async fn plan(
    app: &TransportState,
    selection: &Selection,
    start: &Start,
    outlet: Option<&Arc<Outlet>>,
) -> Result<Vec<Planned>, Error> {
    let limit = app.settings.stream.max_subscriptions.max(1);
    let mut topics: Vec<(TopicName, Key)> = Vec::with_capacity(selection.entries().len());
    for (position, entry) in selection.entries().iter().enumerate() {
        if let Selector::Name(name) = entry {
            topics.push((name.clone(), Key::Listed(position as u32)));
        }
    }
    for entry in selection.entries() {
        let Selector::Prefix(prefix) = entry else {
            continue;
        };
        if let Some(outlet) = outlet {
            app.hub.watch_prefix(outlet, prefix)?;
        }
        for topic in app.hub.topics_with_prefix(prefix, limit).await? {
            if !topics.iter().any(|(t, _)| *t == topic) {
                let key = Key::hashed(&topic);
                topics.push((topic, key));
            }
            if topics.len() > limit {
                return Err(Error::PatternTooBroad {
                    pattern: entry.to_string(),
                    matched: topics.len(),
                    limit,
                });
            }
        }
    }
    Ok(topics
        .into_iter()
        .map(|(topic, key)| {
            let after = match start {
                Start::Now => None,
                Start::Oldest => Some(0),
                Start::At(cursor) => Some(
                    match key {
                        Key::Listed(position) => cursor.listed(position as usize),
                        Key::Hashed(hash) => cursor.hashed(hash),
                    }
                    .unwrap_or(0),
                ),
            };
            Planned { topic, key, after }
        })
        .collect())
}

/// Makes `outlet` (from [`crate::hub::Hub::listed_outlet`], carrying `start`'s hashed
/// entries) follow a checked list from `start`, then queues its first cursor. Returns the
/// topics followed, with their subs.
pub async fn open_listed(
    app: &TransportState,
    selection: &Selection,
    start: &Start,
    outlet: &Arc<Outlet>,
) -> Result<(), Error> {
    follow(app, selection, start, outlet).await?;
    outlet.open_cursor();
    Ok(())
}

/// [`open_listed`] without the opening cursor: for a running multiplexed WebSocket, whose
/// `subscribed` reply carries it.
pub async fn follow(
    app: &TransportState,
    selection: &Selection,
    start: &Start,
    outlet: &Arc<Outlet>,
) -> Result<(), Error> {
    let planned = plan(app, selection, start, Some(outlet)).await?;
    outlet.reserve(planned.len());
    for Planned { topic, key, after } in planned {
        app.hub
            .subscribe_as(&topic, after, outlet, Some(key))
            .await?;
    }
    Ok(())
}

/// Where "now" is for every topic a list follows: a cursor at each topic's newest id (a
/// session that starts after its handshake was answered starts from there).
pub async fn now(app: &TransportState, selection: &Selection) -> Result<Start, Error> {
    let mut cursor = Cursor::default();
    for planned in plan(app, selection, &Start::Now, None).await? {
        let last = app.hub.last_id(&planned.topic).await?;
        match planned.key {
            Key::Listed(position) => cursor.set_listed(position, last),
            Key::Hashed(hash) => cursor.set_hashed(hash, last),
        }
    }
    Ok(Start::At(cursor))
}

/// What a stream's outlet carries from its client's cursor.
pub fn carried(start: &Start) -> Vec<(u64, MessageId)> {
    start.hashed()
}

/// A short poll of a list: every topic read at once, one answer.
pub async fn poll(
    app: &TransportState,
    access: &Access,
    segment: &str,
    params: &Params<'_>,
) -> Result<Vec<u8>, Error> {
    let (selection, start) = check(app, access, segment, |limit| {
        Start::from_params(params, limit)
    })?;
    let limit = params.limit(&app.settings.poll)?;
    let (client, named) = params.poller(access)?;
    let name = named.then_some(&*client);
    let planned = plan(app, &selection, &start, None).await?;
    let mut batches = Vec::with_capacity(planned.len());
    for topic in &planned {
        let batch = app
            .hub
            .poll(&topic.topic, topic.after, limit, &client, name)
            .await?;
        batches.push(batch);
    }
    Ok(answer(
        app,
        TransportKind::Poll,
        &planned,
        &batches,
        &start,
        limit,
    ))
}

/// A long poll of a list: answered at once when any topic has something after its cursor,
/// else parked on every topic until one has, a pattern of the list picks up a new topic,
/// `timeout` passes, the server stops, or `gone` completes (the client left: then no
/// answer).
pub async fn longpoll(
    app: &TransportState,
    access: &Access,
    segment: &str,
    params: &Params<'_>,
    gone: impl Future<Output = ()>,
) -> Result<Option<Vec<u8>>, Error> {
    let (selection, start) = check(app, access, segment, |limit| {
        Start::from_params(params, limit)
    })?;
    let limit = params.limit(&app.settings.poll)?;
    let timeout = params.timeout(&app.settings.poll)?;
    let (client, named) = params.poller(access)?;
    let client = client.into_owned();
    let name = named.then_some(client.as_str());
    let _place = app
        .parked_longpolls
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::AtCapacity("too many parked long polls"))?;
    // Watch the patterns before listing what they match: a topic created in between wakes
    // the poll (a permit is kept for a waiter to come).
    let created = Arc::new(tokio::sync::Notify::new());
    let prefixes = selection.entries().iter().filter_map(|entry| match entry {
        Selector::Prefix(prefix) => Some(prefix.as_str()),
        Selector::Name(_) => None,
    });
    let _watching = app.hub.watch_prefixes(prefixes, &created);
    let mut planned = plan(app, &selection, &start, None).await?;
    let (parked, batches) = park_all(app, &planned, limit, (&client, name)).await?;
    let mut picked_up = false;
    if batches.iter().all(Option::is_none) {
        let news = std::future::poll_fn(|cx| {
            for poll in parked.iter().flatten() {
                if poll.poll_news(cx).is_ready() {
                    return std::task::Poll::Ready(());
                }
            }
            std::task::Poll::Pending
        });
        tokio::select! {
            () = news => {}
            () = created.notified() => picked_up = true,
            () = tokio::time::sleep(timeout) => {}
            () = app.shutdown.cancelled() => {}
            () = gone => return Ok(None),
        }
    }
    let mut answered = unpark_all(app, parked, batches, &client).await?;
    if picked_up {
        // Topics a pattern picked up while the poll waited: read from their start (or from
        // where the cursor has them).
        for topic in plan(app, &selection, &start, None).await? {
            if planned.iter().any(|p| p.topic == topic.topic) {
                continue;
            }
            let after = topic.after.or(Some(0));
            answered.push(
                app.hub
                    .poll(&topic.topic, after, limit, &client, name)
                    .await?,
            );
            planned.push(Planned { after, ..topic });
        }
    }
    Ok(Some(answer(
        app,
        TransportKind::Longpoll,
        &planned,
        &answered,
        &start,
        limit,
    )))
}

/// Parks a long poll on each planned topic (each reads once, and again once followed): a
/// topic with something to say now has its batch instead of a parked poll.
async fn park_all(
    app: &TransportState,
    planned: &[Planned],
    limit: usize,
    (client, name): (&str, Option<&str>),
) -> Result<(Vec<Option<ParkedPoll>>, Vec<Option<Batch>>), Error> {
    let mut parked = Vec::with_capacity(planned.len());
    let mut batches = Vec::with_capacity(planned.len());
    for topic in planned {
        let query = PollQuery {
            topic: &topic.topic,
            after: topic.after,
            limit,
            client,
            name,
            transport: TransportKind::Longpoll,
        };
        match app.hub.park(query, None).await? {
            Parking::Ready(batch) => {
                batches.push(Some(batch));
                parked.push(None);
            }
            Parking::Parked(poll) => {
                batches.push(None);
                parked.push(Some(poll));
            }
            Parking::Answered => unreachable!("no responder was given"),
        }
    }
    Ok((parked, batches))
}

/// Each topic's batch: the one read at once, or what its parked poll reads now.
async fn unpark_all(
    app: &TransportState,
    parked: Vec<Option<ParkedPoll>>,
    batches: Vec<Option<Batch>>,
    client: &str,
) -> Result<Vec<Batch>, Error> {
    let mut answered = Vec::with_capacity(batches.len());
    for (poll, batch) in parked.into_iter().zip(batches) {
        answered.push(match (poll, batch) {
            (_, Some(batch)) => batch,
            (Some(poll), None) => match app.hub.unpark(poll, client).await? {
                Waited::Batch(batch) => batch,
                Waited::Answered => unreachable!("no responder was given"),
            },
            (None, None) => Batch::default(),
        });
    }
    Ok(answered)
}

/// The `limit` oldest messages of `batches`, each topic's taken in id order from its first:
/// a merge on each topic's next message's time, so a topic's kept messages are always a
/// prefix of its batch (its cursor then skips nothing), even where publish times within a
/// topic go backwards (two publishers, or nodes' clocks). By topic, then id.
fn oldest_first(batches: &[Batch], limit: usize) -> Vec<(usize, &Arc<Message>)> {
    let mut next = vec![0usize; batches.len()];
    let mut kept = Vec::with_capacity(limit);
    while kept.len() < limit {
        let pick = (0..batches.len())
            .filter(|&i| next[i] < batches[i].messages.len())
            .min_by_key(|&i| (batches[i].messages[next[i]].time, i));
        let Some(i) = pick else { break };
        kept.push((i, &batches[i].messages[next[i]]));
        next[i] += 1;
    }
    kept.sort_by_key(|(i, m)| (*i, m.id));
    kept
}

/// Where each topic of a poll's answer stands (the cursor), and the `topics` object: the
/// topics with messages in the answer (`all`, after the limit) or a signal.
fn cursor_and_topics(
    planned: &[Planned],
    batches: &[Batch],
    all: &[(usize, &Arc<Message>)],
    (start, limit): (&Start, usize),
) -> (Cursor, Vec<u8>) {
    // The client's entries for topics a pattern picked up that are gone stay in the cursor
    // (as on streams), so such a topic resumes where it was if it comes back.
    let mut cursor = Cursor {
        listed: Vec::new(),
        hashed: start.hashed(),
    };
    let mut topics = Vec::with_capacity(64 * planned.len());
    topics.push(b'{');
    for (i, (topic, batch)) in planned.iter().zip(batches).enumerate() {
        let kept = all.iter().rev().find(|(t, _)| *t == i).map(|(_, m)| m.id);
        let next = match (kept, batch.messages.first()) {
            (Some(id), _) => id,
            (None, Some(first)) => first.id - 1,
            (None, None) => batch.next_after(),
        };
        match topic.key {
            Key::Listed(position) => cursor.set_listed(position, next),
            Key::Hashed(hash) => cursor.set_hashed(hash, next),
        }
        // Only the topics with something to say: at 100 topics the rest would outweigh
        // the messages (the cursor holds where each stands).
        if kept.is_none() && batch.signal.is_none() {
            continue;
        }
        if topics.len() > 1 {
            topics.push(b',');
        }
        topics.extend_from_slice(b"\"");
        topics.extend_from_slice(topic.topic.as_str().as_bytes());
        topics.extend_from_slice(b"\":{\"last_id\":");
        topics.extend_from_slice(itoa::Buffer::new().format(batch.last_id).as_bytes());
        if let Some(signal) = batch.signal {
            signal.poll_fields(&mut topics);
        }
        topics.push(b'}');
    }
    topics.push(b'}');
    // As on streams, a topic at 0 is left out (not named: from its start).
    cursor.listed.retain(|&(_, id)| id > 0);
    cursor.hashed.retain(|&(_, id)| id > 0);
    // And as on streams, past the limit the carried entries (topics gone) give way, or the
    // cursor would be refused when it comes back.
    let mut excess = (cursor.listed.len() + cursor.hashed.len()).saturating_sub(limit);
    cursor.hashed.retain(|&(hash, _)| {
        let carried = !planned.iter().any(|p| p.key == Key::Hashed(hash));
        let drop = carried && excess > 0;
        excess -= usize::from(drop);
        !drop
    });
    (cursor, topics)
}

/// The answer to a poll of a list, counted:
/// `{"messages":[...],"next_after":"<cursor>","topics":{"a":{"last_id":N,...}},"more":true}`,
/// where `topics` names the topics with messages in the answer or a signal.
/// At most `limit` messages in all, the oldest first; each topic's cursor stops at the
/// last of its messages the answer holds, so nothing left out is skipped.
fn answer(
    app: &TransportState,
    transport: TransportKind,
    planned: &[Planned],
    batches: &[Batch],
    start: &Start,
    limit: usize,
) -> Vec<u8> {
    let mut all: Vec<(usize, &Arc<Message>)> = batches
        .iter()
        .enumerate()
        .flat_map(|(i, batch)| batch.messages.iter().map(move |m| (i, m)))
        .collect();
    let trimmed = all.len() > limit;
    if trimmed {
        all = oldest_first(batches, limit);
    }
    let most = app.settings.stream.max_subscriptions.max(1);
    let (cursor, topics) = cursor_and_topics(planned, batches, &all, (start, most));
    let more = trimmed || batches.iter().any(|b| b.more);
    let mut body = Vec::with_capacity(
        96 + topics.len()
            + all
                .iter()
                .map(|(_, m)| m.envelope().len() + 1)
                .sum::<usize>(),
    );
    body.extend_from_slice(b"{\"messages\":[");
    for (n, (_, message)) in all.iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(message.envelope());
    }
    body.extend_from_slice(b"],\"next_after\":\"");
    body.extend_from_slice(cursor.encode().as_bytes());
    body.extend_from_slice(b"\",\"topics\":");
    body.extend_from_slice(&topics);
    if more {
        body.extend_from_slice(b",\"more\":true");
    }
    body.push(b'}');
    let messages: Vec<Arc<Message>> = all.iter().map(|(_, m)| Arc::clone(m)).collect();
    app.count_answer(transport, &messages, body.len());
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{EventName, Payload};

    fn batch(topic: &str, messages: &[(MessageId, u64)]) -> Batch {
        let topic = TopicName::parse(topic).unwrap();
        Batch {
            messages: messages
                .iter()
                .map(|&(id, time)| {
                    Arc::new(Message::new(
                        id,
                        topic.clone(),
                        EventName::default_event(),
                        time,
                        &Payload::from_text("x"),
                    ))
                })
                .collect(),
            ..Batch::default()
        }
    }

    #[test]
    fn a_trimmed_list_poll_keeps_a_prefix_of_each_topic() {
        // Topic a's id 6 was stamped before its id 5 (two publishers): keeping the oldest
        // by time alone would keep a6 and skip a5 for good.
        let batches = [
            batch("a", &[(5, 1002), (6, 1000)]),
            batch("b", &[(1, 1001)]),
        ];
        let kept: Vec<(usize, MessageId)> = oldest_first(&batches, 2)
            .iter()
            .map(|(i, m)| (*i, m.id))
            .collect();
        assert_eq!(kept, [(0, 5), (1, 1)]);
        let all: Vec<(usize, MessageId)> = oldest_first(&batches, 10)
            .iter()
            .map(|(i, m)| (*i, m.id))
            .collect();
        assert_eq!(all, [(0, 5), (0, 6), (1, 1)]);
    }
}
