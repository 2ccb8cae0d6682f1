//! The protocol's `GET`: a catch-up read ([`super::read`]) or a live one, a long poll
//! (`live=long-poll`, answered whole once something is appended, the stream changes or the
//! wait ends) or an SSE read (`live=sse`: its catch-up, then the stream followed through the
//! hub's fan-out, [`super::follow`]).

use std::{borrow::Cow, sync::Arc, time::Duration};

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode},
    response::Response,
};

use super::{
    content::Mode,
    error::DurableError,
    follow::SseStart,
    meta::{self, Meta},
    offset::{Offset, Start},
    read::{READ_LIMIT, Reply, catch_up, collect, data_event, random, render, start_offset},
    single,
    sse::{self, Control},
    streams::Local,
};
use crate::{
    error::Error,
    hub::{Format, Parking, PollQuery},
    message::{MessageId, TopicName, TransportKind, now_millis},
    transport::TransportState,
    transport::{Params, body},
};

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
        name: None,
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
