//! Reading a stream: the messages after an offset, stitched across fork links, and the
//! protocol's three reads of them: catch-up (`GET`), long poll (`live=long-poll`) and SSE
//! (`live=sse`); and `HEAD`.

use std::{borrow::Cow, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use futures::future::BoxFuture;

use super::{
    content::Mode,
    error::DurableError,
    follow::SseStart,
    meta::{self, Meta},
    offset::{Offset, Start},
    single,
    sse::{self, Control},
    streams::{Local, Streams},
};
use crate::{
    error::Error,
    hub::{Format, Parking, PollQuery},
    message::{Message, MessageId, TopicName, TransportKind, now_millis},
    transport::TransportState,
    transport::{Params, body},
};

/// Messages one read returns at most; a longer backlog is paged (without `Up-To-Date`).
const READ_LIMIT: usize = 4096;

/// One message of a stream, with the offset after it.
#[derive(Debug, Clone)]
pub struct Piece {
    /// The offset after this message.
    pub end: Offset,
    /// The message.
    pub message: Arc<Message>,
}

/// A read's messages and where the stream stood.
#[derive(Debug, Default)]
pub struct Read {
    /// Messages after the asked offset, in order.
    pub pieces: Vec<Piece>,
    /// The stream's tail when read.
    pub tail: Offset,
    /// Not everything up to the tail was returned (the page was full).
    pub more: bool,
}

impl Read {
    /// Where the next read starts: after the last message returned, else at the tail.
    pub fn next(&self) -> Offset {
        self.pieces.last().map_or(self.tail, |p| p.end)
    }
}

/// The messages of the stream `topic` after `after`, at most `limit` and none past `upto`:
/// first what it inherited from its fork source (up to the fork offset), then its own.
pub fn collect<'a>(
    app: &'a TransportState,
    topic: &'a TopicName,
    meta: &'a Meta,
    after: Offset,
    upto: Option<Offset>,
    limit: usize,
) -> BoxFuture<'a, Result<Read, Error>> {
    Box::pin(async move {
        let mut pieces = Vec::new();
        if let Some(fork) = meta.fork.as_ref().filter(|_| after.0 < meta.start) {
            let source = TopicName::parse(&fork.source).map_err(Error::from)?;
            let Some(source_meta) = Streams::load(app, &source).await? else {
                return Err(crate::store::StoreError::Internal(format!(
                    "fork source {source} of {topic} is missing"
                ))
                .into());
            };
            let cap = Offset(meta.start.min(upto.map_or(u64::MAX, |u| u.0)));
            let inherited = collect(app, &source, &source_meta, after, Some(cap), limit).await?;
            pieces = inherited.pieces;
            if inherited.more || pieces.len() >= limit || pieces.last().is_some_and(|p| p.end < cap)
            {
                let tail = own_tail(app, topic, meta).await?;
                return Ok(Read {
                    pieces,
                    tail,
                    more: true,
                });
            }
        }
        let from = after.max(Offset(meta.start));
        if upto.is_some_and(|upto| from >= upto) {
            // Nothing of this stream's own is in range.
            return Ok(Read {
                pieces,
                tail: upto.unwrap_or(from),
                more: false,
            });
        }
        let room = limit - pieces.len();
        let read = app.hub.read(topic, meta.id_at(from), room).await?;
        let mut tail = meta.tail(read.head.last_id);
        let mut more = read
            .messages
            .last()
            .is_some_and(|last| last.id < read.head.last_id);
        for message in read.messages {
            if message.id <= meta.base {
                continue;
            }
            let end = meta.offset_after(message.id);
            if upto.is_some_and(|upto| end > upto) {
                more = false;
                break;
            }
            pieces.push(Piece { end, message });
        }
        if let Some(upto) = upto {
            tail = tail.min(upto);
            more &= pieces.last().is_some_and(|p| p.end < upto);
        }
        Ok(Read { pieces, tail, more })
    })
}

pub(super) async fn own_tail(
    app: &TransportState,
    topic: &TopicName,
    meta: &Meta,
) -> Result<Offset, Error> {
    let read = app.hub.read(topic, u64::MAX, 0).await?;
    Ok(meta.tail(read.head.last_id).max(Offset(meta.start)))
}

/// The bytes of a message of a text or binary stream: base64-decoded when it holds bytes
/// (event `bytes`), the text of a JSON string, or the JSON itself for anything else (a
/// pushhub publish of an object, say).
pub fn bytes_of(message: &Message) -> Cow<'_, [u8]> {
    let data = message.data().as_bytes();
    if message.event.as_str() == "bytes"
        && let Some(decoded) = data
            .strip_prefix(b"\"")
            .and_then(|d| d.strip_suffix(b"\""))
            .and_then(sse::unbase64)
    {
        return Cow::Owned(decoded);
    }
    if data.first() == Some(&b'"')
        && let Ok(text) = serde_json::from_slice::<Cow<'_, str>>(data)
    {
        return match text {
            Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
            Cow::Owned(text) => Cow::Owned(text.into_bytes()),
        };
    }
    Cow::Borrowed(data)
}

/// The JSON values of a message of a JSON stream, comma-separated: the elements of a
/// multi-value append (event `values`), else the message's one value.
pub fn values_of(message: &Message) -> &str {
    let data = message.data();
    if message.event.as_str() == "values" && data.len() >= 2 {
        &data[1..data.len() - 1]
    } else {
        data
    }
}

/// The body of a read of `pieces`: a JSON array of every value in JSON mode, the bytes
/// concatenated otherwise.
pub fn render(mode: Mode, pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    if mode == Mode::Json {
        out.push(b'[');
        for piece in pieces {
            let values = values_of(&piece.message);
            if values.is_empty() {
                continue;
            }
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(values.as_bytes());
        }
        out.push(b']');
    } else {
        for piece in pieces {
            out.extend_from_slice(&bytes_of(&piece.message));
        }
    }
    out
}

/// Appends the SSE `data` event that carries `pieces`: their [`render`]ing, in base64 for a
/// binary stream.
pub fn data_event(out: &mut Vec<u8>, mode: Mode, pieces: &[Piece]) {
    let body = render(mode, pieces);
    if mode == Mode::Binary {
        sse::data_event(out, sse::base64(&body).as_bytes());
    } else {
        sse::data_event(out, &body);
    }
}

/// The headers the protocol puts on every answer, besides CORS's `Access-Control-Allow-Origin`:
/// what the router's layers add on hyper's side, and the gate writes itself on its own.
pub const SECURITY_HEADERS: [(&str, &str); 3] = [
    ("x-content-type-options", "nosniff"),
    ("cross-origin-resource-policy", "cross-origin"),
    ("access-control-expose-headers", EXPOSED_HEADERS),
];

/// The response headers a browser client must be allowed to read (CORS), comma-separated: the
/// gate sends them as they are, the router's CORS layer splits them.
pub const EXPOSED_HEADERS: &str = "stream-next-offset,stream-cursor,stream-up-to-date,\
    stream-closed,stream-ttl,stream-expires-at,stream-sse-data-encoding,producer-epoch,\
    producer-seq,producer-expected-seq,producer-received-seq,etag";

/// A whole answer, whoever writes it: the router (as an axum response) or the gate.
#[derive(Debug)]
pub struct Reply {
    /// Its status.
    pub status: StatusCode,
    /// The protocol's headers.
    pub headers: Vec<(&'static str, String)>,
    /// Its body.
    pub body: Vec<u8>,
}

impl Reply {
    fn into_response(self) -> Response {
        let mut answer = Answer::new(self.status);
        for (name, value) in self.headers {
            answer = answer.header(name, value);
        }
        answer.body(self.body)
    }
}

/// A live read's answer: a long poll's whole answer, or an SSE stream to write event by event.
#[derive(Debug)]
pub enum Live {
    /// A whole answer.
    Reply(Reply),
    /// `200` with these headers, then the events of a read that follows the stream
    /// ([`SseStart::open`]).
    Sse {
        /// The protocol's headers (content type, cache control, data encoding).
        headers: Vec<(&'static str, String)>,
        /// The catch-up, and where the read follows the stream from (boxed: a long poll's
        /// answer, the other variant, is what the gate holds while it writes).
        start: Box<SseStart>,
    },
}

/// A response with the protocol's stream headers.
pub(super) struct Answer {
    builder: axum::http::response::Builder,
}

impl Answer {
    pub(super) fn new(status: StatusCode) -> Self {
        Self {
            builder: Response::builder().status(status),
        }
    }

    pub(super) fn header(mut self, name: &'static str, value: impl AsRef<str>) -> Self {
        if let Ok(value) = HeaderValue::from_str(value.as_ref()) {
            self.builder = self.builder.header(name, value);
        }
        self
    }

    pub(super) fn header_if(self, on: bool, name: &'static str, value: impl AsRef<str>) -> Self {
        if on { self.header(name, value) } else { self }
    }

    pub(super) fn body(self, body: impl Into<Body>) -> Response {
        self.builder
            .body(body.into())
            .unwrap_or_else(|_| Response::new(Body::empty()))
    }
}

/// The validator of a catch-up answer: the stream's identity (its topic and the topic id it
/// starts after, which changes when the path is deleted and created again), the offset asked,
/// the offset reached, and whether it showed the stream closed.
fn etag(topic: &TopicName, meta: &Meta, asked: &str, next: Offset, closed: bool) -> String {
    let closed = if closed { ":c" } else { "" };
    format!("\"{topic}:{}:{asked}:{next}{closed}\"", meta.base)
}

/// `HEAD`: the stream's metadata.
pub(super) async fn head(app: &TransportState, topic: &TopicName) -> Result<Response, Error> {
    let meta = app.streams.open(app, topic).await?;
    let tail = own_tail(app, topic, &meta).await?;
    Ok(Answer::new(StatusCode::OK)
        .header("content-type", &meta.content_type)
        .header("stream-next-offset", tail.to_string())
        .header("cache-control", "no-store")
        .header_if(meta.closed, "stream-closed", "true")
        .header_if(
            meta.ttl.is_some(),
            "stream-ttl",
            meta.ttl.unwrap_or_default().to_string(),
        )
        .header_if(
            meta.expires_at.is_some(),
            "stream-expires-at",
            meta.expires_at.clone().unwrap_or_default(),
        )
        .header("etag", etag(topic, &meta, "-1", tail, meta.closed))
        .body(Body::empty()))
}

/// `GET`: a catch-up read, a long poll or an SSE stream, per `live`.
pub(super) async fn get(
    app: &TransportState,
    topic: &TopicName,
    query: &Params<'_>,
    headers: &HeaderMap,
    client: String,
) -> Result<Response, Error> {
    if single(query, "live")?.is_some() {
        return Ok(match live(app, topic, query, client).await? {
            Live::Reply(reply) => reply.into_response(),
            Live::Sse { headers, start } => {
                let opened = start.open(body::Wire::hyper(Format::DsSse)).await?;
                let mut response = body::response(&sse::FRAMING, opened);
                for (name, value) in headers {
                    if let Ok(value) = HeaderValue::from_str(&value) {
                        response.headers_mut().insert(name, value);
                    }
                }
                response
            }
        });
    }
    let local = app.streams.local(topic);
    let meta = app.streams.open_local(app, topic, &local).await?;
    local.touch();
    let offset = single(query, "offset")?;
    let start = match offset.as_deref() {
        None => Start::Beginning,
        Some(text) => super::offset::parse(text).map_err(|e| DurableError::bad(e.to_string()))?,
    };
    catch_up(app, topic, meta, start, offset.as_deref(), headers).await
}

/// A live read (`live=long-poll` or `live=sse`), served by the router or by the gate.
pub async fn live(
    app: &TransportState,
    topic: &TopicName,
    query: &Params<'_>,
    client: String,
) -> Result<Live, Error> {
    let kind = match single(query, "live")?.as_deref() {
        Some("long-poll") => TransportKind::DsLongpoll,
        Some("sse") => TransportKind::DsSse,
        other => {
            return Err(DurableError::bad(format!(
                "live must be long-poll or sse, not {}",
                other.unwrap_or_default()
            ))
            .into());
        }
    };
    app.hub.record_request(kind);
    let Some(offset) = single(query, "offset")? else {
        return Err(DurableError::bad("a live read needs an offset").into());
    };
    let local = app.streams.local(topic);
    let meta = app.streams.open_local(app, topic, &local).await?;
    local.touch();
    let start = super::offset::parse(&offset).map_err(|e| DurableError::bad(e.to_string()))?;
    let cursor = single(query, "cursor")?.map(Cow::into_owned);
    if kind == TransportKind::DsLongpoll {
        return Ok(Live::Reply(
            long_poll(app, topic, meta, start, cursor, local, client).await?,
        ));
    }
    // Boxed: what starting an SSE read holds is not part of every parked long poll.
    Box::pin(sse(app, topic, meta, start, cursor, local)).await
}

/// Starts a live SSE read: its catch-up, and where it follows the stream from.
async fn sse(
    app: &TransportState,
    topic: &TopicName,
    meta: Meta,
    start: Start,
    cursor: Option<String>,
    local: Arc<Local>,
) -> Result<Live, Error> {
    let binary = meta.content().mode() == Mode::Binary;
    let from = start_offset(app, topic, &meta, start).await?;
    let mut headers = vec![
        ("content-type", "text/event-stream".to_owned()),
        ("cache-control", "no-cache".to_owned()),
    ];
    if binary {
        headers.push(("stream-sse-data-encoding", "base64".to_owned()));
    }
    let asked = cursor.as_deref().and_then(|c| c.parse::<u64>().ok());
    let caught_up = sse_catch_up(app, topic, &meta, from, cursor.as_deref()).await?;
    app.hub.record_delivery(
        TransportKind::DsSse,
        caught_up.delivered,
        caught_up.events.len() as u64,
    );
    if caught_up.ended {
        // Closed, and read to its end: the whole answer.
        return Ok(Live::Reply(Reply {
            status: StatusCode::OK,
            headers,
            body: caught_up.events,
        }));
    }
    Ok(Live::Sse {
        headers,
        start: Box::new(SseStart {
            app: app.clone(),
            topic: topic.clone(),
            local,
            after: meta.id_at(caught_up.next.max(Offset(meta.start))),
            meta,
            events: caught_up.events,
            asked,
        }),
    })
}

/// What an SSE read sends before it follows its stream.
struct SseCatchUp {
    events: Vec<u8>,
    delivered: u64,
    /// Where the read goes on.
    next: Offset,
    /// The stream is closed and was read to its end: nothing follows.
    ended: bool,
}

/// The events of an SSE read's catch-up from `from`: each page's `data` event with its
/// `control` event, until the read reaches the stream's own messages (a fork's inherited
/// ones are read here, from its source), or the tail, or the close.
async fn sse_catch_up(
    app: &TransportState,
    topic: &TopicName,
    meta: &Meta,
    mut from: Offset,
    asked: Option<&str>,
) -> Result<SseCatchUp, Error> {
    let mode = meta.content().mode();
    let mut events = Vec::new();
    let mut delivered = 0;
    loop {
        let read = collect(app, topic, meta, from, None, READ_LIMIT).await?;
        let up_to_date = !read.more;
        if !read.pieces.is_empty() {
            data_event(&mut events, mode, &read.pieces);
            delivered += read.pieces.len() as u64;
        }
        from = read.next();
        if meta.closed && up_to_date {
            sse::control_event(&mut events, &Control::Closed { next: from });
            return Ok(SseCatchUp {
                events,
                delivered,
                next: from,
                ended: true,
            });
        }
        let cursor = meta::cursor(asked, now_millis(), random()).to_string();
        sse::control_event(
            &mut events,
            &Control::Open {
                next: from,
                cursor: &cursor,
                up_to_date,
            },
        );
        // The rest of the stream's own messages is the subscription's to read.
        if up_to_date || from.0 >= meta.start {
            return Ok(SseCatchUp {
                events,
                delivered,
                next: from,
                ended: false,
            });
        }
    }
}

/// Resolves where a read starts.
async fn start_offset(
    app: &TransportState,
    topic: &TopicName,
    meta: &Meta,
    start: Start,
) -> Result<Offset, Error> {
    Ok(match start {
        Start::Beginning => Offset::ZERO,
        Start::At(offset) => offset,
        Start::Now | Start::Beyond => own_tail(app, topic, meta).await?,
    })
}

async fn catch_up(
    app: &TransportState,
    topic: &TopicName,
    meta: Meta,
    start: Start,
    asked: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    let mode = meta.content().mode();
    if start == Start::Now {
        let tail = own_tail(app, topic, &meta).await?;
        let body = if mode == Mode::Json { &b"[]"[..] } else { b"" };
        return Ok(Answer::new(StatusCode::OK)
            .header("content-type", &meta.content_type)
            .header("stream-next-offset", tail.to_string())
            .header("stream-up-to-date", "true")
            .header("cache-control", "no-store")
            .header_if(meta.closed, "stream-closed", "true")
            .body(Bytes::from_static(body)));
    }
    let from = start_offset(app, topic, &meta, start).await?;
    let read = collect(app, topic, &meta, from, None, READ_LIMIT).await?;
    let next = read.next();
    let up_to_date = !read.more;
    let closed = meta.closed && up_to_date;
    let tag = etag(topic, &meta, asked.unwrap_or("-1"), next, closed);
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes())
    {
        return Ok(Answer::new(StatusCode::NOT_MODIFIED)
            .header("etag", tag)
            .body(Body::empty()));
    }
    Ok(Answer::new(StatusCode::OK)
        .header("content-type", &meta.content_type)
        .header("stream-next-offset", next.to_string())
        .header_if(up_to_date, "stream-up-to-date", "true")
        .header_if(closed, "stream-closed", "true")
        .header("etag", tag)
        .body(render(mode, &read.pieces)))
}

fn random() -> u64 {
    fastrand::u64(..)
}

/// Waits until the stream's own topic has a message after id `after`, the stream changes (a
/// close, a delete, here or on another node sharing the store), `timeout` passes or the
/// server stops. `true` unless it timed out or the server is stopping.
async fn wait(
    app: &TransportState,
    topic: &TopicName,
    local: &Local,
    after: MessageId,
    timeout: Duration,
    client: &str,
) -> Result<bool, Error> {
    let changed = local.changed.notified();
    tokio::pin!(changed);
    changed.as_mut().enable();
    let elsewhere = app.hub.state_notices(topic);
    let changed_elsewhere = elsewhere.notified();
    tokio::pin!(changed_elsewhere);
    changed_elsewhere.as_mut().enable();
    let query = PollQuery {
        topic,
        after: Some(after),
        limit: 1,
        client,
        transport: TransportKind::DsLongpoll,
    };
    let parked = match app.hub.park(query, None).await? {
        Parking::Parked(parked) => parked,
        Parking::Ready(_) | Parking::Answered => return Ok(true),
    };
    tokio::select! {
        () = parked.news() => Ok(true),
        () = &mut changed => Ok(true),
        () = &mut changed_elsewhere => Ok(true),
        () = tokio::time::sleep(timeout) => Ok(false),
        () = app.shutdown.cancelled() => Ok(false),
    }
}

async fn long_poll(
    app: &TransportState,
    topic: &TopicName,
    mut meta: Meta,
    start: Start,
    cursor: Option<String>,
    local: Arc<Local>,
    client: String,
) -> Result<Reply, Error> {
    let mode = meta.content().mode();
    let timeout = app.settings.durable.long_poll_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut from = start_offset(app, topic, &meta, start).await?;
    loop {
        let read = collect(app, topic, &meta, from, None, READ_LIMIT).await?;
        let next_cursor = meta::cursor(cursor.as_deref(), now_millis(), random()).to_string();
        if !read.pieces.is_empty() {
            let up_to_date = !read.more;
            let body = render(mode, &read.pieces);
            app.hub.record_delivery(
                TransportKind::DsLongpoll,
                read.pieces.len() as u64,
                body.len() as u64,
            );
            let mut headers = vec![
                ("content-type", meta.content_type.clone()),
                ("stream-next-offset", read.next().to_string()),
                ("stream-cursor", next_cursor),
            ];
            if up_to_date {
                headers.push(("stream-up-to-date", "true".into()));
            }
            if meta.closed && up_to_date {
                headers.push(("stream-closed", "true".into()));
            }
            return Ok(Reply {
                status: StatusCode::OK,
                headers,
                body,
            });
        }
        let timed_out = meta.closed
            || tokio::time::Instant::now() >= deadline
            || !wait(
                app,
                topic,
                &local,
                meta.id_at(read.tail),
                deadline - tokio::time::Instant::now(),
                &client,
            )
            .await?;
        if timed_out {
            let mut headers = vec![
                ("stream-next-offset", read.tail.to_string()),
                ("stream-up-to-date", "true".to_owned()),
            ];
            if meta.closed {
                headers.push(("stream-closed", "true".into()));
            } else {
                headers.push(("stream-cursor", next_cursor));
            }
            return Ok(Reply {
                status: StatusCode::NO_CONTENT,
                headers,
                body: Vec::new(),
            });
        }
        local.touch();
        meta = app.streams.open_local(app, topic, &local).await?;
        from = read.tail;
    }
}
