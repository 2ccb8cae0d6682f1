//! Reading a stream: the messages after an offset, stitched across fork links, their
//! encodings, the protocol's catch-up read and `HEAD`. The live reads (long poll, SSE) build
//! on these in [`super::live`].

use std::{borrow::Cow, sync::Arc};

use axum::{
    body::{Body, Bytes},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use futures::future::BoxFuture;

use super::{
    content::Mode,
    meta::Meta,
    offset::{Offset, Start},
    sse,
    streams::Streams,
};
use crate::{
    error::Error,
    message::{Message, TopicName},
    transport::TransportState,
};

/// Messages one read returns at most; a longer backlog is paged (without `Up-To-Date`).
pub(super) const READ_LIMIT: usize = 4096;

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
    /// The reply as an axum response.
    pub(super) fn into_response(self) -> Response {
        let mut answer = Answer::new(self.status);
        for (name, value) in self.headers {
            answer = answer.header(name, value);
        }
        answer.body(self.body)
    }
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

/// Resolves where a read starts.
pub(super) async fn start_offset(
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

pub(super) async fn catch_up(
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

pub(super) fn random() -> u64 {
    fastrand::u64(..)
}
