//! Writing a stream: create (`PUT`, also as a fork of another stream), append, append and
//! close, close (`POST`), delete (`DELETE`). Every write holds its stream's write lock from
//! its first check to its store write, so the protocol's checks (closed, producer epochs
//! and sequences, `Stream-Seq`) and the append they allow are one step.

use axum::{body::Bytes, http::HeaderMap, http::StatusCode, response::Response};
use serde_json::value::RawValue;

use super::{
    content::{self, ContentType, Mode},
    error::DurableError,
    meta::{ForkOf, Meta, ProducerCheck, ProducerWrite, parse_rfc3339},
    offset::{self, Offset, Start},
    read::{Answer, bytes_of, collect, own_tail, values_of},
    sse,
    streams::{Local, Streams},
};
use crate::{
    error::Error,
    message::{EventName, Payload, TopicName, now_millis},
    store::{StoreError, StreamExpect, StreamState, StreamWrite},
    transport::TransportState,
};

/// The largest producer epoch or sequence number (JavaScript's safe integers).
const MAX_PRODUCER_NUMBER: u64 = (1 << 53) - 1;

/// A request header as text; absent when missing, refused when not visible ASCII.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, DurableError> {
    headers
        .get(name)
        .map(|value| {
            value
                .to_str()
                .map_err(|_| DurableError::bad(format!("{name} is not text")))
        })
        .transpose()
}

fn is_true(headers: &HeaderMap, name: &str) -> Result<bool, DurableError> {
    Ok(header(headers, name)?.is_some_and(|v| v.trim().eq_ignore_ascii_case("true")))
}

/// The producer headers: all three or none.
fn producer(headers: &HeaderMap) -> Result<Option<ProducerWrite>, DurableError> {
    let id = header(headers, "producer-id")?;
    let epoch = header(headers, "producer-epoch")?;
    let seq = header(headers, "producer-seq")?;
    let number = |name: &str, value: &str| {
        value
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| value.parse::<u64>().ok())
            .flatten()
            .filter(|n| !value.is_empty() && *n <= MAX_PRODUCER_NUMBER)
            .ok_or_else(|| DurableError::bad(format!("{name} must be an integer up to 2^53-1")))
    };
    match (id, epoch, seq) {
        (None, None, None) => Ok(None),
        (Some(id), Some(epoch), Some(seq)) => {
            if id.is_empty() {
                return Err(DurableError::bad("Producer-Id must not be empty"));
            }
            Ok(Some(ProducerWrite {
                id: id.to_owned(),
                epoch: number("Producer-Epoch", epoch)?,
                seq: number("Producer-Seq", seq)?,
            }))
        }
        _ => Err(DurableError::bad(
            "Producer-Id, Producer-Epoch and Producer-Seq go together",
        )),
    }
}

/// The messages one append of `body` becomes: in JSON mode one message holding its value
/// (or, for a top-level array of several, one `values` message holding them all); text as
/// a JSON string; anything else as base64 in a `bytes` message.
pub(super) fn messages_for(
    mode: Mode,
    body: &[u8],
    creating: bool,
) -> Result<Vec<(EventName, Payload)>, DurableError> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let event = |name: &str| EventName::parse(name).expect("a valid event name");
    Ok(match mode {
        Mode::Json => {
            let values = content::json_values(body, creating)
                .map_err(|e| DurableError::bad(e.to_string()))?;
            json_message(&values).into_iter().collect()
        }
        Mode::Text if std::str::from_utf8(body).is_ok() => {
            let text = std::str::from_utf8(body).unwrap_or_default();
            vec![(EventName::default_event(), Payload::from_text(text))]
        }
        Mode::Text | Mode::Binary => vec![(event("bytes"), bytes_payload(body))],
    })
}

fn json_message(values: &[Box<RawValue>]) -> Option<(EventName, Payload)> {
    let payload = |text: &str| Payload::from_json(text).expect("values were parsed as JSON");
    match values {
        [] => None,
        [value] => Some((EventName::default_event(), payload(value.get()))),
        values => {
            let joined: Vec<&str> = values.iter().map(|v| v.get()).collect();
            let array = format!("[{}]", joined.join(","));
            Some((EventName::parse("values").ok()?, payload(&array)))
        }
    }
}

fn bytes_payload(bytes: &[u8]) -> Payload {
    Payload::from_json(&format!("\"{}\"", sse::base64(bytes))).expect("base64 is a JSON string")
}

/// What a `PUT` asks for.
struct Create {
    content: ContentType,
    content_given: bool,
    ttl: Option<u64>,
    expires: Option<(String, u64)>,
    closed: bool,
    fork: Option<(TopicName, Option<Offset>, u64)>,
}

impl Create {
    fn parse(app: &TransportState, headers: &HeaderMap) -> Result<Self, DurableError> {
        let content_given = header(headers, "content-type")?;
        let ttl = header(headers, "stream-ttl")?
            .map(|v| content::plain_number(v).ok_or_else(|| DurableError::bad("bad Stream-TTL")))
            .transpose()?;
        let expires = header(headers, "stream-expires-at")?
            .map(|v| {
                parse_rfc3339(v.trim())
                    .map(|ms| (v.to_owned(), ms))
                    .ok_or_else(|| DurableError::bad("Stream-Expires-At is not an RFC 3339 time"))
            })
            .transpose()?;
        if ttl.is_some() && expires.is_some() {
            return Err(DurableError::bad(
                "send Stream-TTL or Stream-Expires-At, not both",
            ));
        }
        let source = header(headers, "stream-forked-from")?;
        let fork_offset = header(headers, "stream-fork-offset")?
            .map(|v| match offset::parse(v) {
                Ok(Start::At(offset)) => Ok(offset),
                _ => Err(DurableError::bad(
                    "Stream-Fork-Offset is not an offset of the source",
                )),
            })
            .transpose()?;
        let sub = header(headers, "stream-fork-sub-offset")?
            .map(|v| {
                content::plain_number(v)
                    .ok_or_else(|| DurableError::bad("bad Stream-Fork-Sub-Offset"))
            })
            .transpose()?;
        if source.is_none() && (sub.is_some() || fork_offset.is_some()) {
            return Err(DurableError::bad("fork offsets need Stream-Forked-From"));
        }
        let fork = source
            .map(|path| {
                let prefix = app.settings.durable.path.as_deref().unwrap_or_default();
                path.strip_prefix(prefix)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .and_then(|name| TopicName::parse(name).ok())
                    .map(|name| (name, fork_offset, sub.unwrap_or(0)))
                    .ok_or(DurableError::NotFound)
            })
            .transpose()?;
        Ok(Self {
            content: ContentType::parse(content_given),
            content_given: content_given.is_some(),
            ttl,
            expires,
            closed: is_true(headers, "stream-closed")?,
            fork,
        })
    }

    /// Whether an existing stream was created with this configuration (an idempotent
    /// repeat): a fork's inherited content type and lifetime count as given.
    fn matches(&self, meta: &Meta) -> bool {
        let forked = self.fork.is_some();
        let content = (forked && !self.content_given) || self.content.same_as(&meta.content());
        let lifetime = (forked && self.ttl.is_none() && self.expires.is_none())
            || (self.ttl == meta.ttl
                && self.expires.as_ref().map(|(raw, _)| raw) == meta.expires_at.as_ref());
        let fork = match (&self.fork, &meta.fork) {
            (None, None) => true,
            (Some((source, offset, sub)), Some(of)) => {
                source.as_str() == of.source
                    && offset.is_none_or(|o| o.0 == of.offset)
                    && *sub == of.sub
            }
            _ => false,
        };
        content && lifetime && fork && self.closed == meta.closed
    }
}

/// How many times a write is decided again when another node changed the stream between
/// the read it was decided on and the write.
const DECIDE_AGAIN: usize = 8;

/// Runs `decide` (read the stream's state, decide, write on condition that the state did not
/// move) until no other node wrote in between: how producer and `Stream-Seq` checks hold
/// across nodes. Past [`DECIDE_AGAIN`] tries the answer is 503 `stream_contended`.
async fn decided<Fut>(mut decide: impl FnMut() -> Fut) -> Result<Response, Error>
where
    Fut: std::future::Future<Output = Result<Response, Error>>,
{
    for _ in 1..DECIDE_AGAIN {
        match decide().await {
            Err(Error::Store(StoreError::Conflict)) => continue,
            other => return other,
        }
    }
    decide().await
}

/// `PUT`: creates the stream, or confirms an identical one.
pub(super) async fn put(
    app: &TransportState,
    topic: &TopicName,
    headers: &HeaderMap,
    body: Bytes,
    location: String,
) -> Result<Response, Error> {
    decided(|| put_once(app, topic, headers, body.clone(), location.clone())).await
}

async fn put_once(
    app: &TransportState,
    topic: &TopicName,
    headers: &HeaderMap,
    body: Bytes,
    location: String,
) -> Result<Response, Error> {
    let create = Create::parse(app, headers)?;
    let local = app.streams.local(topic);
    let _writing = local.write.lock().await;
    if let Some(answer) = existing(app, topic, &local, &create).await? {
        return Ok(answer);
    }
    let now = now_millis();
    let mut meta = Meta {
        content_type: create.content.raw.clone(),
        ttl: create.ttl,
        expires_at: create.expires.as_ref().map(|(raw, _)| raw.clone()),
        expires_ms: create.expires.as_ref().map(|(_, ms)| *ms),
        closed: create.closed,
        accessed_ms: now,
        ..Meta::default()
    };
    let mut messages = Vec::new();
    if let Some((source, offset, sub)) = &create.fork {
        let prefix = inherit(app, &create, &mut meta, (source, *offset, *sub)).await?;
        messages.extend(prefix);
    }
    let mode = meta.content().mode();
    messages.extend(messages_for(mode, &body, true)?);
    // The topic's ids after its last one are the stream's. (A pushhub publish landing
    // between this read and the write below would only leave a gap in the stream's offsets,
    // which stay increasing.)
    meta.base = app.hub.read(topic, u64::MAX, 0).await?.head.last_id;
    if let Some((source, _, _)) = &create.fork {
        add_fork(app, source).await?;
    }
    let write = stream_write(&meta, messages, true, now);
    let written = app.write_stream(topic, write).await?;
    local.touch();
    Ok(Answer::new(StatusCode::CREATED)
        .header("location", location)
        .header("content-type", &meta.content_type)
        .header(
            "stream-next-offset",
            meta.tail(written.head.last_id).to_string(),
        )
        .header_if(meta.closed, "stream-closed", "true")
        .body(axum::body::Body::empty()))
}

/// What a `PUT` meets where a stream exists: `Some` answer when it confirms an identical
/// one; `None` when the path is free (nothing there, or an expired stream just retired); a
/// conflict otherwise.
async fn existing(
    app: &TransportState,
    topic: &TopicName,
    local: &Local,
    create: &Create,
) -> Result<Option<Response>, Error> {
    let Some(meta) = Streams::load(app, topic).await? else {
        return Ok(None);
    };
    let accessed = local.accessed.load(std::sync::atomic::Ordering::Relaxed);
    if meta.deleted {
        return Err(DurableError::Conflict("the stream was deleted; its forks remain").into());
    }
    if meta.expired(now_millis(), accessed) {
        let forked = meta.forks > 0;
        app.streams.retire(app, topic, meta).await?;
        if forked {
            return Err(DurableError::Conflict("the stream expired; its forks remain").into());
        }
        return Ok(None);
    }
    if !create.matches(&meta) {
        return Err(DurableError::Conflict("the stream exists with another configuration").into());
    }
    let tail = own_tail(app, topic, &meta).await?;
    Ok(Some(
        Answer::new(StatusCode::OK)
            .header("content-type", &meta.content_type)
            .header("stream-next-offset", tail.to_string())
            .header_if(meta.closed, "stream-closed", "true")
            .body(axum::body::Body::empty()),
    ))
}

/// A fork's share of its source: the content type and lifetime it inherits (unless the
/// `PUT` names its own), where it starts, and its first own message when a sub-offset keeps
/// part of the source's next append.
async fn inherit(
    app: &TransportState,
    create: &Create,
    meta: &mut Meta,
    (source, offset, sub): (&TopicName, Option<Offset>, u64),
) -> Result<Option<(EventName, Payload)>, Error> {
    let (source_meta, prefix) = fork_source(app, create, source, offset, sub).await?;
    if !create.content_given {
        meta.content_type = source_meta.content_type.clone();
    }
    if create.ttl.is_none() && create.expires.is_none() {
        meta.ttl = source_meta.ttl;
        meta.expires_at = source_meta.expires_at.clone();
        meta.expires_ms = source_meta.expires_ms;
    }
    let at = match offset {
        Some(offset) => offset,
        None => own_tail(app, source, &source_meta).await?,
    };
    meta.start = at.0;
    meta.fork = Some(ForkOf {
        source: source.to_string(),
        offset: at.0,
        sub,
    });
    Ok(prefix)
}

/// Checks a fork's source and offsets; returns the source's metadata and the fork's first
/// own message when a sub-offset keeps part of the source's next append.
async fn fork_source(
    app: &TransportState,
    create: &Create,
    source: &TopicName,
    offset: Option<Offset>,
    sub: u64,
) -> Result<(Meta, Option<(EventName, Payload)>), Error> {
    let source_meta = match app.streams.open(app, source).await {
        Err(error) if error.code() == DurableError::Gone.code() => {
            return Err(DurableError::Conflict("the fork source was deleted").into());
        }
        other => other?,
    };
    let source_content = source_meta.content();
    if create.content_given && !create.content.same_as(&source_content) {
        return Err(DurableError::Conflict("a fork keeps its source's content type").into());
    }
    let tail = own_tail(app, source, &source_meta).await?;
    let at = offset.unwrap_or(tail);
    if at > tail {
        return Err(DurableError::bad("Stream-Fork-Offset is past the source's tail").into());
    }
    if sub == 0 {
        return Ok((source_meta, None));
    }
    let next = collect(app, source, &source_meta, at, None, 1).await?;
    let Some(piece) = next.pieces.first() else {
        return Err(DurableError::bad("no append after the fork offset to take a part of").into());
    };
    let sub = usize::try_from(sub).unwrap_or(usize::MAX);
    let too_far = || DurableError::bad("Stream-Fork-Sub-Offset is past the end of the append");
    let prefix = match source_content.mode() {
        Mode::Json => {
            let values: Vec<Box<RawValue>> =
                serde_json::from_str(&format!("[{}]", values_of(&piece.message)))
                    .map_err(|e| crate::store::StoreError::Internal(e.to_string()))?;
            if sub > values.len() {
                return Err(too_far().into());
            }
            json_message(&values[..sub])
        }
        mode => {
            let bytes = bytes_of(&piece.message);
            if sub > bytes.len() {
                return Err(too_far().into());
            }
            messages_for(mode, &bytes[..sub], true)?.into_iter().next()
        }
    };
    Ok((source_meta, prefix))
}

/// Counts one more fork on `source` (under the source's own write lock).
async fn add_fork(app: &TransportState, source: &TopicName) -> Result<(), Error> {
    let local = app.streams.local(source);
    let _writing = local.write.lock().await;
    let mut meta = app.streams.open(app, source).await?;
    meta.forks += 1;
    Streams::save(app, source, &meta).await
}

/// `POST`: appends, appends and closes, or closes.
pub(super) async fn post(
    app: &TransportState,
    topic: &TopicName,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, Error> {
    decided(|| post_once(app, topic, headers, body.clone())).await
}

async fn post_once(
    app: &TransportState,
    topic: &TopicName,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, Error> {
    let Append {
        producer,
        close,
        content_given,
        seq,
    } = Append::parse(headers, &body)?;
    let local = app.streams.local(topic);
    let _writing = local.write.lock().await;
    let mut meta = app.streams.open(app, topic).await?;
    local.touch();
    if meta.closed {
        return closed(
            app,
            topic,
            &meta,
            producer.as_ref(),
            close && body.is_empty(),
        )
        .await;
    }
    if !body.is_empty() && !ContentType::parse(content_given).same_as(&meta.content()) {
        return Err(DurableError::Conflict("the content type differs from the stream's").into());
    }
    let accepted = match &producer {
        None => None,
        Some(write) => match meta.check_producer(write)? {
            ProducerCheck::Duplicate(state) => {
                let tail = own_tail(app, topic, &meta).await?;
                let answer = Answer::new(StatusCode::NO_CONTENT)
                    .header("stream-next-offset", tail.to_string());
                return Ok(
                    with_producer(answer, state.epoch, state.seq).body(axum::body::Body::empty())
                );
            }
            ProducerCheck::Accept(state) => Some((write.id.clone(), state)),
        },
    };
    meta.check_seq(seq)?;
    let messages = messages_for(meta.content().mode(), &body, false)?;
    if let Some((id, state)) = &accepted {
        meta.producers.insert(id.clone(), *state);
    }
    meta.seq = seq.map(str::to_owned).or(meta.seq.take());
    if close {
        (meta.closed, meta.closed_by) = (true, producer.clone());
    }
    meta.accessed_ms = now_millis();
    let write = stream_write(&meta, messages, false, meta.accessed_ms);
    let written = app.write_stream(topic, write).await?;
    if close {
        local.changed.notify_waiters();
    }
    let status = if producer.is_some() && !body.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::NO_CONTENT
    };
    let mut answer = Answer::new(status)
        .header(
            "stream-next-offset",
            meta.tail(written.head.last_id).to_string(),
        )
        .header_if(close, "stream-closed", "true");
    if let Some((_, state)) = accepted {
        answer = with_producer(answer, state.epoch, state.seq);
    }
    Ok(answer.body(axum::body::Body::empty()))
}

/// What a `POST`'s headers ask, checked against its body.
struct Append<'h> {
    producer: Option<ProducerWrite>,
    /// `Stream-Closed: true`.
    close: bool,
    content_given: Option<&'h str>,
    seq: Option<&'h str>,
}

impl<'h> Append<'h> {
    /// Reads the headers; a `POST` needs a body unless it closes, and a body needs a type.
    fn parse(headers: &'h HeaderMap, body: &Bytes) -> Result<Self, DurableError> {
        let producer = producer(headers)?;
        let close = is_true(headers, "stream-closed")?;
        if body.is_empty() && !close {
            return Err(DurableError::bad("an append needs a body"));
        }
        let content_given = header(headers, "content-type")?;
        if !body.is_empty() && content_given.is_none() {
            return Err(DurableError::bad("an append needs a Content-Type"));
        }
        let seq = header(headers, "stream-seq")?;
        Ok(Self {
            producer,
            close,
            content_given,
            seq,
        })
    }
}

/// A write of `messages` with the stream's state `meta` (sealed when closed), atomically;
/// `clear`: the topic's history goes first (a stream created where one was).
/// `created`: the stream is new, so the write applies only where no stream is (else only
/// where the state is still the one `meta` was read from).
fn stream_write(
    meta: &Meta,
    messages: Vec<(EventName, Payload)>,
    created: bool,
    time: u64,
) -> StreamWrite {
    StreamWrite {
        clear: created,
        messages,
        time,
        state: Some(StreamState {
            record: meta.encode(),
            sealed: meta.closed,
            version: 0,
        }),
        expect: if created {
            StreamExpect::Absent
        } else {
            meta.expect()
        },
    }
}

/// A producer's epoch and sequence number on an answer.
fn with_producer(answer: Answer, epoch: u64, seq: u64) -> Answer {
    answer
        .header("producer-epoch", epoch.to_string())
        .header("producer-seq", seq.to_string())
}

/// A `POST` to a closed stream: a retry of the append that closed it, or a plain close
/// (`just_close`: no body, no producer), succeeds again; anything else is refused with the
/// stream's final offset.
async fn closed(
    app: &TransportState,
    topic: &TopicName,
    meta: &Meta,
    producer: Option<&ProducerWrite>,
    just_close: bool,
) -> Result<Response, Error> {
    let tail = own_tail(app, topic, meta).await?;
    let closed = || {
        Answer::new(StatusCode::NO_CONTENT)
            .header("stream-next-offset", tail.to_string())
            .header("stream-closed", "true")
    };
    if let Some(write) = producer.filter(|p| meta.closed_by.as_ref() == Some(*p)) {
        // A retry of the append that closed the stream.
        return Ok(with_producer(closed(), write.epoch, write.seq).body(axum::body::Body::empty()));
    }
    if just_close && producer.is_none() {
        // Closing is idempotent.
        return Ok(closed().body(axum::body::Body::empty()));
    }
    Err(DurableError::Closed { next: tail }.into())
}

/// `DELETE`: removes the stream, or hides it while forks still read it.
pub(super) async fn delete(app: &TransportState, topic: &TopicName) -> Result<Response, Error> {
    let local = app.streams.local(topic);
    let _writing = local.write.lock().await;
    let meta = app.streams.open(app, topic).await?;
    app.streams.retire(app, topic, meta).await?;
    local.changed.notify_waiters();
    Ok(Answer::new(StatusCode::NO_CONTENT).body(axum::body::Body::empty()))
}
