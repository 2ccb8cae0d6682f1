//! The transports that stream events in one HTTP response body: SSE and NDJSON (HTTP
//! streaming). They differ only in framing, which each describes in a [`Framing`]; opening
//! the stream, its last bytes, the peer that watches the request side, and the body hyper
//! polls (HTTP/2, or a connection hyper serves) are written once, here, and so is the raw
//! socket's side: the call's answer ([`opened`]) and the stream's loop ([`run`], through
//! [`super::stream::run`]).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    body::Bytes,
    http::{HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use futures::{FutureExt, Stream, future::BoxFuture};
use tokio::{net::TcpStream, time::Instant};

use super::{
    Then, TransportState,
    call::{Call, Next as CallNext, finish, keep_alive},
    io::Io,
    listed::{self, Start},
    response::{self, Length, Meta},
    stream::{self, Driver, Finish, Next, Peer},
};
use crate::{
    error::Error,
    hub::{End, Format, Native, Outlet, OutletGuard, Presenter},
    message::{MessageId, TopicName, pattern::Selection, wire},
};

/// How one body-streaming transport frames its stream.
#[derive(Debug)]
pub struct Framing {
    /// Its response headers (besides the per-request ones).
    pub headers: &'static [(&'static str, &'static str)],
    /// Its format on the raw HTTP/1.1 socket, where pushhub frames the body itself: chunked
    /// ([`Format::chunked`]), or delimited by the connection's close.
    pub raw: Format,
    /// Its format in a body hyper frames (HTTP/2, or a connection hyper serves).
    pub body: Format,
    /// Sent when the token expires, just before the stream ends.
    pub expired: &'static [u8],
    /// Sent when the store cannot serve the stream's catch-up (Redis is down), just before
    /// the stream ends.
    pub unavailable: &'static [u8],
    /// Sent when a pattern picked up more topics than the connection may follow, just before
    /// the stream ends (reconnecting is refused with `pattern_too_broad`).
    pub too_many_topics: &'static [u8],
    /// Whether a subscribe the store cannot serve yet is answered with a stream that tells
    /// the client to come back (`200` and an SSE `retry:`: a browser's EventSource gives up
    /// for good on any other answer) instead of `503`.
    pub answers_unavailable: bool,
}

/// A stream set up and following its topic.
pub struct Opened {
    /// The stream's outlet.
    pub outlet: OutletGuard,
    /// When the client's token expires.
    pub expires: Option<Instant>,
    /// The transport's watch over the stream's source, if it has one.
    pub watch: Option<stream::Watch>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("outlet", &self.outlet)
            .field("expires", &self.expires)
            .field("watch", &self.watch.is_some())
            .finish()
    }
}

impl Opened {
    /// The [`Driver`] of the stream, which owns its expiry and watch from here on.
    pub fn driver(&mut self) -> Driver {
        Driver::new(self.expires, self.watch.take())
    }
}

/// Where a body stream is written: its socket (on the raw path, so the fan-out writes to it
/// directly), its format (`F`: a [`Native`] one, or a protocol's own [`Format`]), and the
/// response head queued before anything else (raw path).
#[derive(Debug)]
pub struct Wire<F = Native> {
    /// The plain TCP socket the fan-out may write to.
    pub socket: Option<Arc<TcpStream>>,
    /// The stream's wire format.
    pub format: F,
    /// The response head, when this server frames the response itself.
    pub head: Option<Vec<u8>>,
}

impl<F> Wire<F> {
    /// A body hyper frames (HTTP/2, or a connection hyper serves): no socket, no head.
    pub fn hyper(format: F) -> Self {
        Self {
            socket: None,
            format,
            head: None,
        }
    }
}

/// What a body stream follows.
#[derive(Debug, Clone, Copy)]
pub enum Follow<'a> {
    /// One topic, from a message id (or now).
    One(&'a TopicName, Option<MessageId>),
    /// A topic list, from its start ([`listed`]).
    Listed(&'a Selection, &'a Start),
}

/// Creates the stream's outlet on `wire`, queues its head and `hello`, and subscribes it to
/// what it follows until `expires`, as `presenter` says who it is. The request was checked
/// by the transport (permission, cursor) before.
pub async fn open(
    app: &TransportState,
    follow: Follow<'_>,
    wire: Wire,
    hello: Option<&[u8]>,
    (expires, presenter): (Option<Instant>, Presenter),
) -> Result<Opened, Error> {
    let Wire {
        socket,
        format,
        head,
    } = wire;
    let outlet = match follow {
        Follow::One(..) => app.hub.outlet(socket, format),
        Follow::Listed(_, start) => app
            .hub
            .listed_outlet(socket, format, listed::carried(start)),
    };
    outlet.present_as(presenter);
    if let Some(head) = head {
        outlet.push(Bytes::from(head));
    }
    if let Some(hello) = hello {
        outlet.push(Format::from(format).body(hello));
    }
    match follow {
        Follow::One(topic, after) => {
            app.hub.subscribe(topic, after, &outlet).await?;
        }
        Follow::Listed(selection, start) => {
            listed::open_listed(app, selection, start, &outlet).await?;
        }
    }
    app.hub.record_request(Format::from(format).transport());
    Ok(Opened {
        outlet,
        expires,
        watch: None,
    })
}

/// The raw socket's wire for a body stream of `framing` in `format` (its raw format), with
/// its response head.
pub fn raw_wire<F>(format: F, framing: &Framing, call: &Call<'_>, io: &Io) -> Wire<F> {
    Wire {
        socket: io.shared_socket(),
        format,
        head: Some(raw_head(framing, &call.meta)),
    }
}

/// The response head of a body stream on the raw socket: chunked, or (no chunk framing)
/// with the body ending at the connection's close.
pub fn raw_head(framing: &Framing, meta: &Meta) -> Vec<u8> {
    if framing.raw.chunked() {
        return response::head(StatusCode::OK, framing.headers, meta, Length::Chunked);
    }
    let mut headers = framing.headers.to_vec();
    headers.push(("connection", "close"));
    response::head(StatusCode::OK, &headers, meta, Length::None)
}

/// A body stream running on the raw socket: all such a connection holds while it lasts.
#[derive(Debug)]
pub struct Running {
    opened: Opened,
    framing: &'static Framing,
    /// Bytes of the client's next request, read already.
    input: Vec<u8>,
    /// The client asked to close after this response.
    close: bool,
}

/// Hands an opened body stream (whose head, `head_len` bytes, is queued) to the
/// connection, or refuses the call: a store that cannot serve the stream yet gets the
/// framing's come-back answer when it has one.
pub async fn opened(
    call: Call<'_>,
    io: &mut Io,
    framing: &'static Framing,
    head_len: usize,
    opened: Result<Opened, Error>,
) -> CallNext {
    match opened {
        Ok(opened) => {
            call.heads(head_len);
            CallNext::Then(Box::new(Then::Body(Running {
                opened,
                framing,
                close: call.close,
                input: call.head.into_rest(),
            })))
        }
        Err(error) => {
            let retry = call.state.settings.stream.sse_retry;
            match unavailable(framing, framing.raw, &error, retry) {
                Some(body) => {
                    error.report(None);
                    let mut answer = raw_head(framing, &call.meta);
                    answer.extend_from_slice(&body);
                    call.heads(answer.len());
                    call.answer_and_close(io, answer).await
                }
                None => call.refuse(io, &error).await,
            }
        }
    }
}

/// Runs an SSE or NDJSON stream on the raw socket; after a stream with an end of its own
/// (chunked), the connection may serve a pipelined request.
pub async fn run(state: &TransportState, running: Running, io: &mut Io) -> CallNext {
    let Running {
        mut opened,
        framing,
        mut input,
        close,
    } = running;
    let connection = &state.settings.connection;
    let settings = stream::Settings {
        stall: connection.stall_timeout,
        read_chunk: 512,
    };
    let mut peer = BodyPeer {
        max_input: connection.max_pending_input,
    };
    let outlet = opened.outlet.0.clone();
    let driver = opened.driver();
    let finished = stream::run(io, &outlet, &mut peer, &settings, driver, &mut input).await;
    drop(opened);
    let Some(tail) = tail(framing, framing.raw, finished) else {
        return CallNext::Close;
    };
    // After an expired token or the end of what it followed (a closed Durable Stream) the
    // connection may serve a pipelined request (if the body has an end of its own); after a
    // drain or a slow consumer's end it closes.
    let keep = framing.raw.chunked()
        && matches!(finished, Finish::Expired | Finish::Ended(End::Finished))
        && !close;
    keep_alive(finish(io, tail, !keep, settings.stall).await, input)
}

/// What a stream sends last, per the reason it ends: the `expired` notice, and on a chunked
/// body the chunk that ends it (`None`: the connection just closes).
pub fn tail(framing: &Framing, format: Format, finish: Finish) -> Option<Vec<u8>> {
    let mut tail = Vec::new();
    match finish {
        Finish::Expired => tail.extend_from_slice(&format.body(framing.expired)),
        Finish::Unavailable => tail.extend_from_slice(&format.body(framing.unavailable)),
        Finish::Ended(End::TooManyTopics) => {
            tail.extend_from_slice(&format.body(framing.too_many_topics))
        }
        Finish::Ended(End::Drained | End::SlowConsumer | End::Finished) | Finish::Closed => {}
        Finish::Ended(End::Gone | End::Unresponsive) | Finish::PeerGone | Finish::Stalled => {
            return None;
        }
    }
    if let Finish::Ended(End::SlowConsumer) = finish {
        tracing::debug!(transport = %format.transport(), "ending the stream of a slow consumer");
    }
    if format.chunked() {
        tail.extend_from_slice(wire::LAST_CHUNK);
    }
    Some(tail)
}

/// A body-streaming client sends nothing after its request but, perhaps, the next pipelined
/// request: that is kept (up to `max_input` bytes) to be served when the stream ends; the end
/// of its input ends the stream.
#[derive(Debug)]
pub struct BodyPeer {
    /// The most bytes kept.
    pub max_input: usize,
}

impl Peer for BodyPeer {
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
        Err(catch_up_failed(topic, error))
    }
}

/// A body stream cannot tell its client that one read failed and go on: it ends, and the
/// client reconnects with its cursor. A store that is down says so first.
fn catch_up_failed(topic: &TopicName, error: &Error) -> Finish {
    tracing::warn!(%error, %topic, "ending stream");
    if error.is_store_unavailable() {
        Finish::Unavailable
    } else {
        Finish::PeerGone
    }
}

/// The whole body of a stream that cannot start because the store cannot serve it yet (Redis
/// is down): when the framing answers so, the `retry:` hint (`retry` ms) and a comment
/// saying why, then its end. The client comes back after `retry` with its cursor
/// (`Last-Event-ID`), as after any end of its stream; by then the store may be back.
/// `None`: refuse with the error's status (`503` and `Retry-After`) instead.
pub fn unavailable(
    framing: &Framing,
    format: Format,
    error: &Error,
    retry: std::time::Duration,
) -> Option<Vec<u8>> {
    if !framing.answers_unavailable || !error.is_store_unavailable() {
        return None;
    }
    let mut text = format!("retry: {}\n", retry.as_millis()).into_bytes();
    text.extend_from_slice(framing.unavailable);
    let mut body = format.body(&text).to_vec();
    if format.chunked() {
        body.extend_from_slice(wire::LAST_CHUNK);
    }
    Some(body)
}

/// [`unavailable`]'s answer through hyper: `200` with the framing's headers and that body.
pub fn unavailable_response(framing: &'static Framing, body: Vec<u8>) -> Response {
    let mut response = Bytes::from(body).into_response();
    with_headers(framing, &mut response);
    response
}

fn with_headers(framing: &Framing, response: &mut Response) {
    for (name, value) in framing.headers {
        response.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
}

/// The streaming response hyper serves: a `Body` fed by the opened stream, with the
/// transport's headers.
pub fn response(framing: &'static Framing, mut opened: Opened) -> Response {
    let driver = opened.driver();
    let body = axum::body::Body::from_stream(Body {
        outlet: opened.outlet,
        catch_up: None,
        driver,
        framing,
        ended: false,
    });
    let mut response = body.into_response();
    with_headers(framing, &mut response);
    response
}

/// A response body fed by an outlet: hyper polls it, and it answers what the stream's
/// [`Driver`] asks, with the same policies and the same last bytes ([`tail`]) as the raw
/// socket's loop.
struct Body {
    outlet: OutletGuard,
    catch_up: Option<BoxFuture<'static, Result<(), (TopicName, Error)>>>,
    driver: Driver,
    framing: &'static Framing,
    ended: bool,
}

impl Body {
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
        last.extend(tail(self.framing, self.framing.body, finish).unwrap_or_default());
        (!last.is_empty()).then(|| Ok(Bytes::from(last)))
    }
}

impl Stream for Body {
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
                        return Poll::Ready(this.last(catch_up_failed(&topic, &error)));
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
