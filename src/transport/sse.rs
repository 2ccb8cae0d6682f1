//! `GET /topics/{topic}/sse`: Server-Sent Events.
//!
//! The stream's outlet is fed by the fan-out; a slow reader is handled by the hub's policy
//! (it reads its backlog from history by cursor). On the raw socket ([`crate::gate`]) events
//! are HTTP/1.1 chunks framed once per message; through hyper (HTTP/2, or a connection hyper
//! serves) the same outlet feeds a response body. The stream ends on shutdown (after
//! everything published before it is written), on token expiry (with an `expired` event),
//! or for a slow consumer under `--slow-consumer disconnect`; clients reconnect with
//! `Last-Event-ID`.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, HeaderName, HeaderValue, header},
    response::{IntoResponse, Response},
};
use futures::{FutureExt, Stream, future::BoxFuture};
use tokio::{net::TcpStream, time::Instant};

use super::{
    HeaderSource, Params,
    stream::{self, Driver, Finish, Next, Peer},
};
use crate::{
    AppState,
    error::Error,
    gate::auth::Access,
    hub::{End, Format, Outlet, OutletGuard},
    message::{TopicName, TransportKind, wire},
};

/// The headers of an SSE response (besides the per-request ones). `x-accel-buffering: no`
/// asks nginx not to buffer the stream.
pub const HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
];

/// Sent when the token expires, just before the stream ends. It has no `id:`, so the
/// client's `Last-Event-ID` stays on the last message.
const EXPIRED: &[u8] =
    b"event: expired\ndata: {\"type\":\"expired\",\"code\":\"token_expired\"}\n\n";

/// An SSE stream set up and following its topic.
pub struct Opened {
    /// The stream's outlet.
    pub outlet: OutletGuard,
    /// When the client's token expires.
    pub expires: Option<Instant>,
}

/// Checks the request, creates the stream's outlet and subscribes it from `Last-Event-ID`
/// (or `?after=`, or now). `head` (the raw path's response head) is written first, then the
/// `retry:` hint, then history and live events.
#[allow(clippy::too_many_arguments)]
pub async fn open(
    app: &AppState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
    headers: &dyn HeaderSource,
    socket: Option<Arc<TcpStream>>,
    format: Format,
    head: Option<Vec<u8>>,
) -> Result<Opened, Error> {
    let topic = super::topic(topic)?;
    access.check_subscribe(&topic)?;
    // A browser reconnecting sends the URL it first used plus the id it last saw: the
    // header is the newer of the two.
    let after = super::sse_cursor(headers, params)?;
    let outlet = app.hub.outlet(socket, format);
    if let Some(head) = head {
        outlet.push(Bytes::from(head));
    }
    let hello = format!("retry: {}\n\n", app.transports.stream.sse_retry.as_millis());
    outlet.push(format.body(hello.as_bytes()));
    app.hub.subscribe(&topic, after, &outlet).await?;
    app.hub.record_request(TransportKind::Sse);
    Ok(Opened {
        outlet,
        expires: access.expires_at(),
    })
}

/// What an SSE stream sends last, per the reason it ends: the `expired` event, and on a
/// chunked body the chunk that ends it (`None`: the connection just closes).
pub fn tail(format: Format, finish: Finish) -> Option<Vec<u8>> {
    let mut tail = Vec::new();
    match finish {
        Finish::Expired => tail.extend_from_slice(&format.body(EXPIRED)),
        Finish::Ended(End::Drained | End::SlowConsumer) | Finish::Closed => {}
        Finish::Ended(End::Gone | End::Unresponsive) | Finish::PeerGone | Finish::Stalled => {
            return None;
        }
    }
    if let Finish::Ended(End::SlowConsumer) = finish {
        tracing::debug!("ending the SSE stream of a slow consumer");
    }
    if format == Format::SseChunked {
        tail.extend_from_slice(wire::LAST_CHUNK);
    }
    Some(tail)
}

/// An SSE client sends nothing after its request but, perhaps, the next pipelined request:
/// that is kept (up to `max_input` bytes) to be served when the stream ends; the end of its
/// input ends the stream.
#[derive(Debug)]
pub struct SsePeer {
    /// The most bytes kept.
    pub max_input: usize,
}

impl Peer for SsePeer {
    async fn on_input(&mut self, input: &mut Vec<u8>, _: &Arc<Outlet>) -> Result<(), Finish> {
        if input.len() > self.max_input {
            return Err(Finish::PeerGone);
        }
        Ok(())
    }

    fn on_catch_up_failed(
        &mut self,
        _: &Outlet,
        topic: &TopicName,
        error: &Error,
    ) -> Result<(), Finish> {
        tracing::warn!(%error, %topic, "ending SSE stream");
        Err(Finish::PeerGone)
    }
}

/// The stream through axum (HTTP/2, or a connection hyper serves).
pub async fn sse(
    State(app): State<AppState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params<'static>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let opened = open(
        &app,
        &access,
        &topic,
        &params,
        &headers,
        None,
        Format::Sse,
        None,
    )
    .await?;
    let body = Body::from_stream(SseBody {
        outlet: opened.outlet,
        catch_up: None,
        driver: Driver::new(opened.expires),
        ended: false,
    });
    let mut response = body.into_response();
    for (name, value) in HEADERS {
        response.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    debug_assert_eq!(header::CONTENT_TYPE.as_str(), HEADERS[0].0);
    Ok(response)
}

/// A response body fed by an outlet: hyper polls it, and it answers what the stream's
/// [`Driver`] asks, with the same policies and the same last bytes ([`tail`]) as the raw
/// socket's loop.
struct SseBody {
    outlet: OutletGuard,
    catch_up: Option<BoxFuture<'static, Result<(), (TopicName, Error)>>>,
    driver: Driver,
    ended: bool,
}

impl SseBody {
    /// The body's last chunk: what was queued before the end (the outlet sealed first, as on
    /// the raw socket), then the stream's [`tail`]; `None` when there is nothing to send.
    fn last(&mut self, finish: Finish) -> Option<Result<Bytes, std::convert::Infallible>> {
        self.ended = true;
        let mut last = Vec::new();
        if stream::flushes(finish) {
            self.outlet.seal();
            while let Some(frames) = self.outlet.take_pending() {
                frames
                    .iter()
                    .for_each(|frame| last.extend_from_slice(frame));
            }
        }
        last.extend(tail(Format::Sse, finish).unwrap_or_default());
        (!last.is_empty()).then(|| Ok(Bytes::from(last)))
    }
}

impl Stream for SseBody {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            if let Some(catch_up) = this.catch_up.as_mut() {
                match catch_up.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => this.catch_up = None,
                    Poll::Ready(Err((topic, error))) => {
                        let mut peer = SsePeer { max_input: 0 };
                        let finish = peer
                            .on_catch_up_failed(&this.outlet, &topic, &error)
                            .err()
                            .unwrap_or(Finish::PeerGone);
                        return Poll::Ready(this.last(finish));
                    }
                }
            }
            match this.driver.poll_next(cx, &this.outlet) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Next::Write(frames)) => {
                    let chunk = match <[Bytes; 1]>::try_from(frames) {
                        Ok([one]) => one,
                        Err(frames) => Bytes::from(frames.concat()),
                    };
                    return Poll::Ready(Some(Ok(chunk)));
                }
                Poll::Ready(Next::CatchUp(catch_up)) => {
                    let outlet = Arc::clone(&this.outlet);
                    this.catch_up =
                        Some(async move { Driver::catch_up(&outlet, catch_up).await }.boxed());
                }
                Poll::Ready(Next::Finish(finish)) => return Poll::Ready(this.last(finish)),
            }
        }
    }
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}
