//! One admitted connection: read each request head, serve the streaming and polling
//! endpoints on the raw socket, pass other requests to the axum router, and hand anything
//! unusual to hyper.
//!
//! Serving the hot endpoints here is what lets a streaming connection keep only what it
//! needs: no hyper connection state or 8 KiB read buffer, no tungstenite buffers, just its
//! socket, its outlet and a small task; and a poll answer costs one read and one write with
//! nothing but the parse, the hub and the encoding in between.
//!
//! Other requests (publishes, topic info, the lab's assets) go through the same axum router
//! and tower layers as always, with pushhub reading their `Content-Length` body and writing
//! their response: so a keep-alive connection that publishes, then polls, then opens a
//! stream (as browsers and HTTP client pools do) stays on the fast path. What needs more of
//! HTTP/1.1 than that (a chunked or oversized request body, `Expect`, HTTP/1.0, a malformed
//! head) is handed to hyper, with the bytes already read replayed, for the rest of the
//! connection's life.

use std::{borrow::Cow, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, http::StatusCode};

use bytes::Bytes;
use tokio::time::Instant;

use super::{
    head::{Parsed, RequestHead},
    hyper::Protocols,
    response::{self, Length, Meta},
};
use crate::{
    AppState,
    error::Error,
    gate::auth::Access,
    message::{PerTransport, TransportKind},
    transport::{Params, body, boxed, io::Io, longpoll, ndjson, poll, sse, stream, ws},
};

/// Initial size of a request head buffer; it grows to `--max-header-bytes`.
const HEAD_BUFFER: usize = 1024;

/// What every connection shares: one `Arc`, so that a connection's future holds a pointer,
/// not a copy of the state.
pub struct Shared {
    /// Everything the handlers share.
    pub app: AppState,
    /// Which of the raw endpoints `--transports` serves (the others go to the router, which
    /// answers 404).
    pub served: Served,
    /// The app, for requests hyper serves.
    pub router: Router,
    /// hyper's builders.
    pub protocols: Arc<Protocols>,
}

/// One admitted connection, not yet served.
pub struct Connection {
    /// What every connection shares.
    pub shared: Arc<Shared>,
    /// Where it comes from.
    pub peer: SocketAddr,
}

/// Which raw endpoints are served, looked up once from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Served(PerTransport<bool>);

impl Served {
    /// The endpoints `config` serves.
    pub fn of(config: &crate::Config) -> Self {
        Self(PerTransport::from_fn(|kind| config.serves(kind)))
    }

    fn has(self, endpoint: TransportKind) -> bool {
        self.0[endpoint]
    }
}

/// What comes after a request.
enum Next {
    /// Read the next request; these bytes of it were read already.
    KeepAlive(Vec<u8>),
    /// Run a stream the request opened.
    Stream(Box<Stream>),
    /// Let hyper serve the rest of the connection; these bytes were read from it already.
    HandOver(Vec<u8>),
    /// Answer a long poll once it has something to say.
    Park(Box<Park>),
    /// Serve the connection through the emulated link its host name asks for; these bytes
    /// (its first request) were read from it already.
    Link(Box<crate::link::Link>, Vec<u8>),
    /// Close the connection.
    Close,
}

/// A long poll waiting: all a parked connection holds while it waits.
struct Park {
    prepared: longpoll::Prepared,
    meta: Meta,
    close: bool,
    /// Bytes of the next request, read already.
    rest: Vec<u8>,
}

/// A stream a request opened: all a streaming connection holds while it lasts. The request
/// (its head, its parsing, the subscribing) is gone by then.
enum Stream {
    /// SSE or NDJSON: events in one response body.
    Body {
        opened: body::Opened,
        framing: &'static body::Framing,
        input: Vec<u8>,
        /// The client asked to close after this response.
        close: bool,
    },
    Ws {
        opened: ws::Opened,
        input: Vec<u8>,
    },
}

impl Connection {
    /// Serves the connection until it closes, or hands it to hyper. `negotiated_h2`: TLS chose
    /// HTTP/2, which hyper serves from the start.
    pub async fn serve(self, mut io: Io, negotiated_h2: bool) {
        let Connection { shared, peer } = self;
        if negotiated_h2 {
            return boxed(|| hand_over(&shared, peer, io, Vec::new(), true)).await;
        }
        // The connection's own future holds only this loop's state; each request (and each
        // stream) gets a future of its own size, for as long as it runs.
        let mut buf = Vec::new();
        let mut first = true;
        loop {
            let next = boxed(|| request(&shared, peer, &mut io, buf, first)).await;
            first = false;
            let next = match next {
                Next::Park(park) => boxed(|| run_park(&shared.app, unbox(park), &mut io)).await,
                // Unboxed first: the box is freed before the stream starts.
                Next::Stream(stream) => match unbox(stream) {
                    Stream::Ws { opened, input } => {
                        boxed(|| ws::run(&shared.app, opened, &mut io, input)).await;
                        Next::Close
                    }
                    Stream::Body {
                        opened,
                        framing,
                        input,
                        close,
                    } => {
                        boxed(|| run_body(&shared.app, opened, framing, input, close, &mut io))
                            .await
                    }
                },
                next => next,
            };
            match next {
                Next::KeepAlive(rest) => buf = rest,
                Next::HandOver(read) => {
                    return boxed(|| hand_over(&shared, peer, io, read, false)).await;
                }
                Next::Link(link, read) => {
                    return boxed(|| through_link(&shared, io, *link, read)).await;
                }
                Next::Stream(_) | Next::Park(_) | Next::Close => {
                    let _ = io.shutdown().await;
                    return;
                }
            }
        }
    }
}

/// Moves a value out of its box, freeing the box (a box moved out of in a `match` lives as
/// long as the arm).
#[allow(clippy::boxed_local, reason = "taking the box is the point")]
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// Reads the next request (`buf`: what of it was read already) and serves it, or opens the
/// stream it asks for. The `first` request of a connection may ask for an emulated link by
/// its host name.
async fn request(
    shared: &Shared,
    peer: SocketAddr,
    io: &mut Io,
    buf: Vec<u8>,
    first: bool,
) -> Next {
    // Borrowed, not cloned: a clone takes the token's lock, once per request.
    let head = tokio::select! {
        read = read_head(io, buf, &shared.app) => read,
        () = shared.app.shutdown.cancelled() => return Next::Close,
    };
    let head = match head {
        Some(Ok(head)) => head,
        Some(Err(read)) => return Next::HandOver(read),
        None => return Next::Close,
    };
    if first && let Some(link) = link_asked(shared, peer, &head) {
        return Next::Link(Box::new(link), head.into_buffer());
    }
    match route(&head, shared.served, shared.app.config.durable_path()) {
        // Not boxed again: this request's future is itself boxed and gone once it answers
        // (a parked long poll or a stream continues in a future of its own).
        Some((endpoint, topic)) => {
            let topic = topic.map(Cow::into_owned);
            dispatch(shared, peer, endpoint, topic, head, io).await
        }
        None => match app_request(&shared.app, &head) {
            Some((request, length)) => serve_app(shared, peer, head, request, length, io).await,
            None => Next::HandOver(head.into_buffer()),
        },
    }
}

/// The emulated link a connection's first request names by its host (`3g.localhost`), when
/// the server serves link hosts and the connection is not already one of a link's own.
fn link_asked(shared: &Shared, peer: SocketAddr, head: &RequestHead) -> Option<crate::link::Link> {
    let lanes = shared.app.lanes.as_ref()?;
    let host = std::str::from_utf8(head.header("host")?).ok()?;
    let link = crate::link::Lanes::link_of_host(host)?;
    (!lanes.is_inner(peer)).then_some(link)
}

/// Serves the connection through `link` to this server (the request read so far goes first).
/// Only a plain TCP connection can be: a TLS one is closed.
async fn through_link(shared: &Shared, io: Io, link: crate::link::Link, read: Vec<u8>) {
    let (Some(lanes), Io::Tcp(stream)) = (&shared.app.lanes, io) else {
        return;
    };
    let Ok(stream) = Arc::try_unwrap(stream) else {
        return;
    };
    lanes
        .serve(stream, read, link, shared.app.shutdown.clone())
        .await;
}

/// Serves the rest of the connection with hyper.
async fn hand_over(shared: &Shared, peer: SocketAddr, io: Io, read: Vec<u8>, h2: bool) {
    let stop = shared.app.shutdown.clone();
    let router = shared.router.clone();
    shared
        .protocols
        .clone()
        .serve(io, read, h2, peer, router, stop)
        .await;
}

/// A request the router may serve here, and its body length: `None` when hyper must (a
/// chunked or oversized body, `Expect`, a name or value `http` refuses).
fn app_request(
    app: &AppState,
    head: &RequestHead,
) -> Option<(axum::http::Request<axum::body::Body>, usize)> {
    if head.has_header("transfer-encoding") || head.has_header("expect") {
        return None;
    }
    // A stream or a long poll asked in a form not served raw (absolute-form target, a body
    // on a GET, HEAD): hyper streams its response, where this path writes a whole one.
    let path = head.path();
    if ["/sse", "/stream", "/longpoll", "/ws"]
        .iter()
        .any(|end| path.ends_with(end))
    {
        return None;
    }
    // A Durable Streams SSE read streams for as long as the client stays: hyper writes it,
    // where this path writes whole answers within the stall timeout.
    if app
        .config
        .durable_path()
        .is_some_and(|prefix| path.starts_with(prefix))
        && head.query().contains("live=sse")
    {
        return None;
    }
    let length = match head.header("content-length") {
        None => 0,
        Some(value) => {
            // Digits only, as hyper reads it (`str::parse` would take a leading `+`, which a
            // proxy in front might read otherwise): anything else goes to hyper, which
            // refuses it.
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let length: usize = std::str::from_utf8(value).ok()?.parse().ok()?;
            // A body over the limit is refused by axum while hyper streams it in.
            if length > app.config.max_body || !head.single("content-length") {
                return None;
            }
            length
        }
    };
    Some((head.to_request()?, length))
}

/// Serves a request through the axum router: reads its body, writes its response.
async fn serve_app(
    shared: &Shared,
    peer: SocketAddr,
    head: RequestHead,
    mut request: axum::http::Request<axum::body::Body>,
    length: usize,
    io: &mut Io,
) -> Next {
    let config = &shared.app.config;
    let close = head.wants_close();
    let mut rest = head.into_rest();
    let deadline = Instant::now() + config.header_timeout;
    while rest.len() < length {
        let room = length - rest.len();
        match tokio::time::timeout_at(deadline, io.read_into(&mut rest, room)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Next::Close,
        }
    }
    let next = rest.split_off(length);
    *request.body_mut() = axum::body::Body::from(rest);
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    let is_head = request.method() == axum::http::Method::HEAD;
    let response = match tower::ServiceExt::oneshot(shared.router.clone(), request).await {
        Ok(response) => response,
        Err(infallible) => match infallible {},
    };
    let written = response::write_app(io, response, is_head);
    match tokio::time::timeout(config.stall_timeout, written).await {
        Ok(Ok(keep)) if keep && !close => Next::KeepAlive(next),
        _ => Next::Close,
    }
}

/// One request to a hot endpoint, checked as far as every endpoint checks it.
struct Call<'a> {
    app: &'a AppState,
    /// The endpoint's transport.
    transport: TransportKind,
    peer: SocketAddr,
    topic: String,
    head: RequestHead,
    meta: Meta,
    access: Access,
    /// The client asked to close after this response.
    close: bool,
}

impl Call<'_> {
    fn params(&self) -> Params<'_> {
        Params::new(Cow::Borrowed(self.head.query()), Some(self.peer))
    }

    /// Answers with `error`; what comes next.
    async fn refuse(self, io: &mut Io, error: &Error) -> Next {
        let stall = self.app.config.stall_timeout;
        // Durable Streams puts its security headers on every answer, refusals included.
        let more: &[(&str, &str)] = if self.transport.is_durable() {
            &crate::transport::durable::read::SECURITY_HEADERS
        } else {
            &[]
        };
        let answer = response::error_with(error, &self.meta, more);
        self.heads(answer.len());
        finish(io, answer, self.close, stall).await
    }

    /// Counts `bytes` of heads (or of a whole error answer) for this endpoint's transport.
    fn heads(&self, bytes: usize) {
        self.app.hub.record_heads(self.transport, bytes);
    }
}

/// Serves one request to a hot endpoint: answers it, or opens the stream (or parks the long
/// poll) it asks for, which then continues in a future of its own, holding only its state.
async fn dispatch(
    shared: &Shared,
    peer: SocketAddr,
    endpoint: TransportKind,
    topic: Option<String>,
    head: RequestHead,
    io: &mut Io,
) -> Next {
    let app = &shared.app;
    let meta = Meta::of(&head, &app.origins);
    let close = head.wants_close();
    app.hub.record_heads(endpoint, head.len());
    let access = match Access::for_request(&app.auth, &head, head.query()) {
        Ok(access) => access,
        Err(error) => {
            let stall = app.config.stall_timeout;
            let answer = response::error(&error, &meta);
            app.hub.record_heads(endpoint, answer.len());
            return finish(io, answer, close, stall).await;
        }
    };
    let call = Call {
        app,
        transport: endpoint,
        peer,
        topic: topic.unwrap_or_default(),
        head,
        meta,
        access,
        close,
    };
    match endpoint {
        TransportKind::Poll => poll_call(call, io).await,
        TransportKind::Longpoll => longpoll_call(call, io).await,
        TransportKind::Sse => sse_call(call, io).await,
        TransportKind::Ws => ws_call(call, io).await,
        TransportKind::Stream => stream_call(call, io).await,
        TransportKind::DsSse | TransportKind::DsLongpoll => durable_call(call, io).await,
    }
}

async fn poll_call(call: Call<'_>, io: &mut Io) -> Next {
    let answer = poll::answer(call.app, &call.access, &call.topic, &call.params()).await;
    let body = answer.as_ref().map_or(0, Vec::len);
    let response = answered(answer, &call.meta);
    call.heads(response.len() - body);
    let stall = call.app.config.stall_timeout;
    keep_alive(
        finish(io, response, call.close, stall).await,
        call.head.into_rest(),
    )
}

async fn longpoll_call(call: Call<'_>, io: &mut Io) -> Next {
    match longpoll::prepare(call.app, &call.access, &call.topic, &call.params()) {
        Ok(prepared) => Next::Park(Box::new(Park {
            prepared,
            close: call.close,
            rest: call.head.into_rest(),
            meta: call.meta,
        })),
        Err(error) => call.refuse(io, &error).await,
    }
}

/// Waits for a long poll's answer and writes it (or lets the fan-out write it).
async fn run_park(app: &AppState, park: Park, io: &mut Io) -> Next {
    let Park {
        prepared,
        meta,
        close,
        mut rest,
    } = park;
    let limit = app.config.max_header_bytes;
    // On plain TCP the fan-out may answer the poll itself, with this head.
    let direct = io.shared_socket().map(|socket| {
        let head = response::head(StatusCode::OK, &poll::HEADERS, &meta, Length::Deferred);
        longpoll::DirectAnswer::new(app.clone(), socket, head)
    });
    if let Some(direct) = direct.as_ref().filter(|_| !rest.is_empty()) {
        direct.hold();
    }
    // The steps before and after the wait get futures of their own (`boxed`), so that what
    // a parked poll holds is this loop's state alone.
    let answer = match boxed(|| prepared.park(app, direct.clone())).await {
        Ok(longpoll::Parked::Now(answer)) => Ok(answer),
        Ok(longpoll::Parked::Waiting(waiting)) => {
            // Parked: this loop's state is all the poll holds while it waits (the reads
            // before and after it are other steps). It watches the connection: a client
            // that goes away ends the wait (and frees its place); a pipelined request is
            // kept for later.
            let deadline = tokio::time::sleep(waiting.timeout());
            tokio::pin!(deadline);
            let stopping = app.shutdown.cancelled();
            tokio::pin!(stopping);
            loop {
                tokio::select! {
                    biased;
                    () = std::future::poll_fn(|cx| waiting.poll_news(cx)) => break,
                    () = &mut deadline => break,
                    () = &mut stopping => break,
                    read = io.read_into(&mut rest, 512) => match read {
                        Ok(0) | Err(_) => return Next::Close,
                        Ok(_) if rest.len() > limit => return Next::Close,
                        // A pipelined request: its bytes are read, so no further read would
                        // wake this task once the fan-out answered; the answer must wake it
                        // instead.
                        Ok(_) => {
                            if let Some(direct) = &direct {
                                direct.hold();
                            }
                        }
                    },
                }
            }
            boxed(|| waiting.finish(app)).await
        }
        Err(error) => Err(error),
    };
    // Answered: its place among the parked polls is free before the client sees the answer.
    if let Some(direct) = &direct {
        direct.release_place();
    }
    boxed(|| write_park_answer(app, io, answer, meta, close, rest, direct)).await
}

/// Writes a long poll's answer (or what the fan-out left of it); what comes next.
async fn write_park_answer(
    app: &AppState,
    io: &mut Io,
    answer: Result<longpoll::Answer, Error>,
    meta: Meta,
    close: bool,
    rest: Vec<u8>,
    direct: Option<Arc<longpoll::DirectAnswer>>,
) -> Next {
    let stall = app.config.stall_timeout;
    match answer {
        Ok(longpoll::Answer::Body(body)) => {
            let response = response::full(StatusCode::OK, &poll::HEADERS, &meta, &body);
            app.hub
                .record_heads(TransportKind::Longpoll, response.len() - body.len());
            keep_alive(finish(io, response, close, stall).await, rest)
        }
        Ok(longpoll::Answer::Answered) => {
            // The fan-out wrote the answer (all of it, or what the socket took).
            let unwritten = direct.map(|d| d.take_rest()).unwrap_or_default();
            for part in unwritten {
                if io.write_all_within(&part, stall).await.is_err() {
                    return Next::Close;
                }
            }
            if close {
                Next::Close
            } else {
                Next::KeepAlive(rest)
            }
        }
        Err(error) => {
            let answer = response::error(&error, &meta);
            app.hub.record_heads(TransportKind::Longpoll, answer.len());
            keep_alive(finish(io, answer, close, stall).await, rest)
        }
    }
}

async fn sse_call(call: Call<'_>, io: &mut Io) -> Next {
    let framing = &sse::FRAMING;
    let head = body_head(framing, &call.meta);
    let head_len = head.len();
    let opened = sse::open(
        call.app,
        &call.access,
        &call.topic,
        &call.params(),
        &call.head,
        io.shared_socket(),
        framing.raw,
        Some(head),
    )
    .await;
    body_opened(call, io, framing, head_len, opened).await
}

async fn stream_call(call: Call<'_>, io: &mut Io) -> Next {
    let framing = &ndjson::FRAMING;
    let head = body_head(framing, &call.meta);
    let head_len = head.len();
    let params = call.params();
    let opened = ndjson::open(
        call.app,
        &call.access,
        &call.topic,
        &params,
        io.shared_socket(),
        Some(head),
    )
    .await;
    body_opened(call, io, framing, head_len, opened).await
}

/// The response head of a body stream on the raw socket: chunked, or (no chunk framing)
/// with the body ending at the connection's close.
fn body_head(framing: &body::Framing, meta: &Meta) -> Vec<u8> {
    if framing.raw.chunked() {
        return response::head(StatusCode::OK, framing.headers, meta, Length::Chunked);
    }
    let mut headers = framing.headers.to_vec();
    headers.push(("connection", "close"));
    response::head(StatusCode::OK, &headers, meta, Length::None)
}

/// Hands an opened body stream to the connection's loop, or refuses the request.
async fn body_opened(
    call: Call<'_>,
    io: &mut Io,
    framing: &'static body::Framing,
    head_len: usize,
    opened: Result<body::Opened, Error>,
) -> Next {
    match opened {
        Ok(opened) => {
            call.heads(head_len);
            Next::Stream(Box::new(Stream::Body {
                opened,
                framing,
                close: call.close,
                input: call.head.into_rest(),
            }))
        }
        Err(error) => {
            let retry = call.app.transports.stream.sse_retry;
            match body::unavailable(framing, framing.raw, &error, retry) {
                Some(body) => {
                    error.report(None);
                    let mut answer = body_head(framing, &call.meta);
                    answer.extend_from_slice(&body);
                    call.heads(answer.len());
                    let stall = call.app.config.stall_timeout;
                    finish(io, answer, true, stall).await
                }
                None => call.refuse(io, &error).await,
            }
        }
    }
}

async fn ws_call(call: Call<'_>, io: &mut Io) -> Next {
    let topic = (!call.topic.is_empty()).then_some(call.topic.as_str());
    let checked = ws::check(call.app, &call.access, topic, &call.params(), &call.head);
    let (accept, home) = match checked {
        Ok(checked) => checked,
        Err(error) => return call.refuse(io, &error).await,
    };
    let headers = ws::upgrade_headers(&accept);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let switching = response::head(
        StatusCode::SWITCHING_PROTOCOLS,
        &headers,
        &call.meta,
        Length::None,
    );
    let socket = io.shared_socket();
    let peer = Some(call.peer.ip());
    let access = call.access.clone();
    let switching_len = switching.len();
    let opened = ws::open(call.app, access, home, peer, socket, Bytes::from(switching)).await;
    match opened {
        Ok(opened) => {
            call.heads(switching_len);
            Next::Stream(Box::new(Stream::Ws {
                opened,
                input: call.head.into_rest(),
            }))
        }
        // The store cannot serve the subscribe yet (Redis is down): complete the handshake
        // and close with 1013 (try again later), which a client can act on; a refused
        // handshake is only a failure to a browser.
        Err(error) if error.is_store_unavailable() => {
            error.report(None);
            let mut answer = response::head(
                StatusCode::SWITCHING_PROTOCOLS,
                &headers,
                &call.meta,
                Length::None,
            );
            answer.extend_from_slice(&ws::frame::close_for(&error));
            call.heads(answer.len());
            let stall = call.app.config.stall_timeout;
            finish(io, answer, true, stall).await
        }
        Err(error) => {
            let stall = call.app.config.stall_timeout;
            let answer = response::error(&error, &call.meta);
            call.heads(answer.len());
            finish(io, answer, true, stall).await
        }
    }
}

/// Runs an SSE or NDJSON stream; after an SSE stream, the connection may serve a pipelined
/// request.
async fn run_body(
    app: &AppState,
    mut opened: body::Opened,
    framing: &'static body::Framing,
    mut input: Vec<u8>,
    close: bool,
    io: &mut Io,
) -> Next {
    let stall = app.config.stall_timeout;
    let settings = stream::Settings {
        stall,
        read_chunk: 512,
    };
    let mut peer = body::BodyPeer {
        max_input: app.config.max_header_bytes,
    };
    let outlet = opened.outlet.0.clone();
    let driver = opened.driver();
    let finished = stream::run(io, &outlet, &mut peer, &settings, driver, &mut input).await;
    drop(opened);
    let Some(tail) = body::tail(framing, framing.raw, finished) else {
        return Next::Close;
    };
    // After an expired token or the end of what it followed (a closed Durable Stream) the
    // connection may serve a pipelined request (if the body has an end of its own); after a
    // drain or a slow consumer's end it closes.
    let keep = framing.raw.chunked()
        && matches!(
            finished,
            stream::Finish::Expired | stream::Finish::Ended(crate::hub::End::Finished)
        )
        && !close;
    keep_alive(finish(io, tail, !keep, stall).await, input)
}

/// A handler's answer as a complete response.
fn answered(answer: Result<Vec<u8>, Error>, meta: &Meta) -> Vec<u8> {
    match answer {
        Ok(body) => response::full(StatusCode::OK, &poll::HEADERS, meta, &body),
        Err(error) => response::error(&error, meta),
    }
}

/// Writes a response (within the stall limit); what comes next.
/// A Durable Streams live read on the raw socket: a long poll's whole answer, or an SSE
/// stream written event by event, with the protocol's headers on every answer.
async fn durable_call(call: Call<'_>, io: &mut Io) -> Next {
    use crate::transport::durable::{self, read::Live, read::SECURITY_HEADERS};
    let stall = call.app.config.stall_timeout;
    let topic = match crate::message::TopicName::parse(&call.topic) {
        Ok(topic) => topic,
        Err(invalid) => return call.refuse(io, &invalid.into()).await,
    };
    if let Err(error) = call.access.check_subscribe(&topic) {
        return call.refuse(io, &error).await;
    }
    let params = call.params();
    let client = call.access.client_key(Some(call.peer.ip()));
    let live = boxed(|| durable::read::live(call.app, &topic, &params, client)).await;
    drop(params);
    fn with_security<'a>(headers: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        let mut all: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        all.extend_from_slice(&SECURITY_HEADERS);
        all
    }
    match live {
        Err(error) => call.refuse(io, &error).await,
        Ok(Live::Reply(reply)) => {
            let headers = with_security(&reply.headers);
            let answer = response::full(reply.status, &headers, &call.meta, &reply.body);
            call.heads(answer.len() - reply.body.len());
            finish(io, answer, call.close, stall).await
        }
        Ok(Live::Sse { headers, start }) => {
            let head = response::head(
                StatusCode::OK,
                &with_security(&headers),
                &call.meta,
                Length::Chunked,
            );
            drop(headers);
            let head_len = head.len();
            // Boxed: a parked long poll, served by this same function, holds its state
            // while it waits; opening a stream's state is needed only while it runs.
            let socket = io.shared_socket();
            let format = crate::hub::Format::DsSseChunked;
            let opened = boxed(|| start.open(socket, format, Some(head))).await;
            body_opened(call, io, &durable::sse::FRAMING, head_len, opened).await
        }
    }
}

async fn finish(io: &mut Io, response: Vec<u8>, close: bool, stall: Duration) -> Next {
    match io.write_all_within(&response, stall).await {
        Ok(()) if !close => Next::KeepAlive(Vec::new()),
        _ => Next::Close,
    }
}

fn keep_alive(next: Next, rest: Vec<u8>) -> Next {
    match next {
        Next::KeepAlive(_) => Next::KeepAlive(rest),
        other => other,
    }
}

/// Reads the next request head: `Some(Ok)` a head, `Some(Err(bytes))` something for hyper,
/// `None` the connection closed, or sent no complete head within `--header-timeout`.
async fn read_head(
    io: &mut Io,
    mut buf: Vec<u8>,
    app: &AppState,
) -> Option<Result<RequestHead, Vec<u8>>> {
    let deadline = Instant::now() + app.config.header_timeout;
    let max = app.config.max_header_bytes;
    loop {
        if !buf.is_empty() {
            match RequestHead::parse(buf) {
                (Parsed::Head(head), _) => return Some(Ok(head)),
                (Parsed::Other, Some(read)) => return Some(Err(read)),
                (_, read) => buf = read.unwrap_or_default(),
            }
            if buf.len() >= max {
                // Too large for us: hyper reads the rest and answers 431.
                return Some(Err(buf));
            }
        }
        let room = HEAD_BUFFER.min(max.saturating_sub(buf.len()).max(1));
        match tokio::time::timeout_at(deadline, io.read_into(&mut buf, room)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(_)) => {}
        }
    }
}

/// The endpoint a request head asks for, if pushhub serves it on the raw socket, and its
/// `{topic}` segment, percent-decoded.
fn route<'a>(
    head: &'a RequestHead,
    served: Served,
    durable: Option<&str>,
) -> Option<(TransportKind, Option<Cow<'a, str>>)> {
    if !head.is_plain_get() {
        return None;
    }
    let path = head.path();
    if path == "/ws" {
        return served
            .has(TransportKind::Ws)
            .then_some((TransportKind::Ws, None));
    }
    if let Some(name) = durable
        .and_then(|prefix| path.strip_prefix(prefix))
        .and_then(|rest| rest.strip_prefix('/'))
    {
        // A Durable Streams live read; anything else there goes to the router.
        let query = head.query();
        let endpoint = if query.contains("live=sse") {
            TransportKind::DsSse
        } else if query.contains("live=long-poll") {
            TransportKind::DsLongpoll
        } else {
            return None;
        };
        if name.is_empty() || !served.has(endpoint) {
            return None;
        }
        return Some((endpoint, Some(percent_decode(name)?)));
    }
    let (topic, kind) = path.strip_prefix("/topics/")?.split_once('/')?;
    let endpoint: TransportKind = kind.parse().ok()?;
    if topic.is_empty() || endpoint.is_durable() || !served.has(endpoint) {
        return None;
    }
    let topic = percent_decode(topic)?;
    Some((endpoint, Some(topic)))
}

/// Decodes `%XX` escapes as axum's `Path` does; `None` (hyper answers) when the result is not
/// UTF-8.
fn percent_decode(segment: &str) -> Option<Cow<'_, str>> {
    if !segment.contains('%') {
        return Some(Cow::Borrowed(segment));
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(request: &str) -> Option<(TransportKind, Option<String>)> {
        let (Parsed::Head(head), _) = RequestHead::parse(request.as_bytes().to_vec()) else {
            panic!("not a head: {request}");
        };
        let config = crate::Config::default();
        route(&head, Served::of(&config), config.durable_path())
            .map(|(e, t)| (e, t.map(Cow::into_owned)))
    }

    #[test]
    fn only_plain_gets_of_the_hot_endpoints_are_served_raw() {
        assert_eq!(
            routed("GET /topics/a.b/sse?after=1 HTTP/1.1\r\n\r\n"),
            Some((TransportKind::Sse, Some("a.b".into())))
        );
        assert_eq!(
            routed("GET /topics/bad%20topic/poll HTTP/1.1\r\n\r\n"),
            Some((TransportKind::Poll, Some("bad topic".into())))
        );
        assert_eq!(
            routed("GET /ws HTTP/1.1\r\n\r\n"),
            Some((TransportKind::Ws, None))
        );
        assert_eq!(
            routed("GET /topics/a/stream?after=0 HTTP/1.1\r\n\r\n"),
            Some((TransportKind::Stream, Some("a".into())))
        );
        assert_eq!(
            routed("GET /v1/stream/a.b?offset=-1&live=sse HTTP/1.1\r\n\r\n"),
            Some((TransportKind::DsSse, Some("a.b".into())))
        );
        assert_eq!(
            routed("GET /v1/stream/x?live=long-poll&offset=now HTTP/1.1\r\n\r\n"),
            Some((TransportKind::DsLongpoll, Some("x".into())))
        );
        for other in [
            "GET /v1/stream/a?offset=-1 HTTP/1.1\r\n\r\n",
            "HEAD /v1/stream/a?offset=-1&live=sse HTTP/1.1\r\n\r\n",
            "POST /v1/stream/a?live=sse HTTP/1.1\r\n\r\n",
            "GET /v1/stream/?live=sse HTTP/1.1\r\n\r\n",
            "GET /topics/a/ds-sse HTTP/1.1\r\n\r\n",
            "POST /topics/a HTTP/1.1\r\n\r\n",
            "GET /topics/a HTTP/1.1\r\n\r\n",
            "GET /topics//poll HTTP/1.1\r\n\r\n",
            "GET /topics/a/b/poll HTTP/1.1\r\n\r\n",
            "GET /stats HTTP/1.1\r\n\r\n",
            "GET /topics/a/streams HTTP/1.1\r\n\r\n",
            "GET /topics/a/poll HTTP/1.1\r\ncontent-length: 3\r\n\r\n",
            "POST /topics/a/poll HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(routed(other), None, "{other}");
        }
    }
}

#[cfg(test)]
mod memory_budget {
    //! What an idle connection holds is mostly the futures below, each in an allocation of
    //! its own: jemalloc rounds each up to its size class (..., 384, 512, 640, 768, 1024), so
    //! a few bytes more can cost a whole class per connection (the idle benchmark shows it:
    //! a WebSocket session future of 648 bytes measured 2.00 KiB per connection, 632 bytes
    //! measured 1.87). This test fails when one outgrows the class it was measured at; the
    //! figures are in docs/benchmarks.md.
    use super::*;
    use crate::hub::Format;

    #[tokio::test]
    async fn per_connection_futures_stay_within_their_size_classes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let app = AppState::new(crate::Config::default()).unwrap();
        let shared = Arc::new(Shared {
            served: Served::of(&app.config),
            router: crate::router(app.clone()),
            protocols: Arc::new(Protocols::new(&app.config)),
            app: app.clone(),
        });
        let mut io = Io::Tcp(Arc::new(stream));
        let mut sizes = Vec::new();

        // An SSE stream.
        let outlet = app.hub.outlet(None, Format::Sse);
        let opened = body::Opened {
            outlet,
            expires: None,
            watch: None,
        };
        let future = run_body(&app, opened, &sse::FRAMING, Vec::new(), false, &mut io);
        sizes.push(("run_body", std::mem::size_of_val(&future), 640));
        drop(future);

        // A WebSocket session.
        let (Parsed::Head(any), _) = RequestHead::parse(b"GET / HTTP/1.1\r\n\r\n".to_vec()) else {
            panic!("a head")
        };
        let access = Access::for_request(&app.auth, &any, "").unwrap();
        let opened = ws::open(&app, access.clone(), None, None, None, Bytes::new())
            .await
            .unwrap();
        let future = ws::run(&app, opened, &mut io, Vec::new());
        sizes.push(("ws::run", std::mem::size_of_val(&future), 640));
        drop(future);

        // A parked long poll.
        let params = Params::new(Cow::Borrowed("after=0&timeout=20"), Some(peer));
        let park = Park {
            prepared: longpoll::prepare(&app, &access, "t", &params).unwrap(),
            meta: Meta::of(&any, &app.origins),
            close: false,
            rest: Vec::new(),
        };
        let future = run_park(&app, park, &mut io);
        sizes.push(("run_park", std::mem::size_of_val(&future), 1024));
        drop(future);

        // The connection's own future, inside its task.
        let future = Connection { shared, peer }.serve(io, false);
        sizes.push(("Connection::serve", std::mem::size_of_val(&future), 384));

        for (name, size, class) in sizes {
            assert!(
                size <= class,
                "{name} is {size} bytes, over the {class}-byte class it was measured at"
            );
        }
    }
}
