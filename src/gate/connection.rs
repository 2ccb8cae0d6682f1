//! One admitted connection: read each request head, route it, admit it and hand the
//! streaming and polling endpoints to their transport on the raw socket (one
//! [`Call`]; the transport serves it and says what comes next), pass other requests to the
//! axum router, and hand anything unusual to hyper. Nothing here knows how a transport
//! answers.
//!
//! Serving the hot endpoints on the raw socket is what lets a streaming connection keep
//! only what it needs: no hyper connection state or 8 KiB read buffer, no tungstenite
//! buffers, just its socket, its outlet and a small task; and a poll answer costs one read
//! and one write with nothing but the parse, the hub and the encoding in between.
//!
//! Other requests (publishes, topic info, the lab's assets) go through the same axum router
//! and tower layers as always, with pushhub reading their `Content-Length` body and writing
//! their response: so a keep-alive connection that publishes, then polls, then opens a
//! stream (as browsers and HTTP client pools do) stays on the fast path. What needs more of
//! HTTP/1.1 than that (a chunked or oversized request body, `Expect`, HTTP/1.0, a malformed
//! head) is handed to hyper, with the bytes already read replayed, for the rest of the
//! connection's life.

use std::{borrow::Cow, net::SocketAddr, sync::Arc};

use axum::Router;
use tokio::time::Instant;

use super::{
    GateSettings,
    admit::{Admission, admit},
    hyper::Protocols,
};
use crate::{
    link::{Lanes, Link},
    message::TransportKind,
    transport::{
        self, Then, TransportState, boxed,
        call::{self, Call},
        head::{Parsed, RequestHead},
        io::Io,
        response::{self, Meta},
    },
};

/// Initial size of a request head buffer; it grows to `--max-header-bytes`.
const HEAD_BUFFER: usize = 1024;

/// What every connection shares: one `Arc`, so that a connection's future holds a pointer,
/// not a copy of the state.
pub struct Shared {
    /// The gate's settings.
    pub settings: GateSettings,
    /// What the transports share (and the stop signal).
    pub transports: TransportState,
    /// The emulated links, when `<link>.localhost` host names are served.
    pub lanes: Option<Arc<Lanes>>,
    /// The app, for requests the router or hyper serve.
    pub router: Router,
    /// hyper's builders.
    pub protocols: Arc<Protocols>,
}

impl Shared {
    /// What the connections of `gate` share.
    pub fn new(gate: super::Gate) -> Self {
        let super::Gate {
            settings,
            transports,
            lanes,
            router,
            connections: _,
        } = gate;
        Self {
            protocols: Arc::new(Protocols::new(&settings)),
            settings,
            transports,
            lanes,
            router,
        }
    }
}

/// One admitted connection, not yet served.
pub struct Connection {
    /// What every connection shares.
    pub shared: Arc<Shared>,
    /// Where it comes from.
    pub peer: SocketAddr,
}

/// What comes after a request.
enum Next {
    /// Read the next request; these bytes of it were read already.
    KeepAlive(Vec<u8>),
    /// Run what a transport's call started (a parked long poll, a stream).
    Then(Box<Then>),
    /// Let hyper serve the rest of the connection; these bytes were read from it already.
    HandOver(Vec<u8>),
    /// Serve the connection through the emulated link its host name asks for; these bytes
    /// (its first request) were read from it already.
    Link(Box<Link>, Vec<u8>),
    /// Close the connection.
    Close,
}

impl From<call::Next> for Next {
    fn from(next: call::Next) -> Self {
        match next {
            call::Next::KeepAlive(rest) => Next::KeepAlive(rest),
            call::Next::Then(then) => Next::Then(then),
            call::Next::Close => Next::Close,
        }
    }
}

impl Connection {
    /// Serves the connection until it closes, or hands it to hyper. `negotiated_h2`: TLS chose
    /// HTTP/2, which hyper serves from the start.
    pub async fn serve(self, mut io: Io, negotiated_h2: bool) {
        let Connection { shared, peer } = self;
        if negotiated_h2 {
            return boxed(|| hand_over(&shared, peer, io, Vec::new(), true)).await;
        }
        // The connection's own future holds only this loop's state; each request (and what
        // it starts) gets a future of its own size, for as long as it runs.
        let mut buf = Vec::new();
        let mut first = true;
        loop {
            let mut next = boxed(|| request(&shared, peer, &mut io, buf, first)).await;
            first = false;
            if let Next::Then(then) = next {
                // Unboxed first: the box is freed before the stream starts.
                next = unbox(then).run(&shared.transports, &mut io).await.into();
            }
            match next {
                Next::KeepAlive(rest) => buf = rest,
                Next::HandOver(read) => {
                    return boxed(|| hand_over(&shared, peer, io, read, false)).await;
                }
                Next::Link(link, read) => {
                    return boxed(|| through_link(&shared, io, *link, read)).await;
                }
                Next::Then(_) | Next::Close => {
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
    let head = tokio::select! {
        read = read_head(io, buf, &shared.settings) => read,
        () = shared.transports.shutdown.cancelled() => return Next::Close,
    };
    let head = match head {
        Some(Ok(head)) => head,
        Some(Err(read)) => return Next::HandOver(read),
        None => return Next::Close,
    };
    if first && let Some(link) = link_asked(shared, peer, &head) {
        return Next::Link(Box::new(link), head.into_buffer());
    }
    match route(&head, &shared.settings) {
        // Not boxed again: this request's future is itself boxed and gone once it answers
        // (a parked long poll or a stream continues in a future of its own).
        Some((endpoint, topic)) => {
            let topics = topic.map(Cow::into_owned).into_iter().collect();
            hand_call(shared, peer, endpoint, topics, head, io).await
        }
        None => match app_request(&shared.settings, &head) {
            Some((request, length)) => serve_app(shared, peer, head, request, length, io).await,
            None => Next::HandOver(head.into_buffer()),
        },
    }
}

/// The emulated link a connection's first request names by its host (`3g.localhost`), when
/// the server serves link hosts and the connection is not already one of a link's own.
fn link_asked(shared: &Shared, peer: SocketAddr, head: &RequestHead) -> Option<Link> {
    let lanes = shared.lanes.as_ref()?;
    let host = std::str::from_utf8(head.header("host")?).ok()?;
    let link = Lanes::link_of_host(host)?;
    (!lanes.is_inner(peer)).then_some(link)
}

/// Serves the connection through `link` to this server (the request read so far goes first).
/// Only a plain TCP connection can be: a TLS one is closed.
async fn through_link(shared: &Shared, io: Io, link: Link, read: Vec<u8>) {
    let (Some(lanes), Io::Tcp(stream)) = (&shared.lanes, io) else {
        return;
    };
    let Ok(stream) = Arc::try_unwrap(stream) else {
        return;
    };
    lanes
        .serve(stream, read, link, shared.transports.shutdown.clone())
        .await;
}

/// Serves the rest of the connection with hyper.
async fn hand_over(shared: &Shared, peer: SocketAddr, io: Io, read: Vec<u8>, h2: bool) {
    let stop = shared.transports.shutdown.clone();
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
    settings: &GateSettings,
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
    if settings
        .durable_path
        .as_deref()
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
            if length > settings.max_body || !head.single("content-length") {
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
    let settings = &shared.settings;
    let close = head.wants_close();
    let mut rest = head.into_rest();
    let deadline = Instant::now() + settings.header_timeout;
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
    match tokio::time::timeout(settings.stall_timeout, written).await {
        Ok(Ok(keep)) if keep && !close => Next::KeepAlive(next),
        _ => Next::Close,
    }
}

/// Admits a request to a transport's endpoint and hands the transport the call: it answers
/// it, or starts what the connection runs next (a parked long poll, a stream).
async fn hand_call(
    shared: &Shared,
    peer: SocketAddr,
    transport: TransportKind,
    topics: transport::call::Topics,
    head: RequestHead,
    io: &mut Io,
) -> Next {
    let state = &shared.transports;
    let meta = Meta::of(&head, &state.origins);
    let close = head.wants_close();
    state.hub.record_heads(transport, head.len());
    let admission = Admission {
        transport,
        headers: &head,
        query: head.query(),
    };
    let access = match admit(state, admission) {
        Ok(access) => access,
        Err(error) => {
            let refusal = call::Refusal {
                state,
                transport,
                meta: &meta,
                close,
            };
            return refusal.answer(io, &error, head).await.into();
        }
    };
    let call = Call {
        state,
        transport,
        peer,
        topics,
        head,
        meta,
        access,
        close,
    };
    transport::serve(call, io).await.into()
}

/// Reads the next request head: `Some(Ok)` a head, `Some(Err(bytes))` something for hyper,
/// `None` the connection closed, or sent no complete head within `--header-timeout`.
///
/// # Cancel safety
/// Not cancel safe: bytes read are lost when cancelled (it is cancelled only to close).
async fn read_head(
    io: &mut Io,
    mut buf: Vec<u8>,
    settings: &GateSettings,
) -> Option<Result<RequestHead, Vec<u8>>> {
    let deadline = Instant::now() + settings.header_timeout;
    let max = settings.max_header_bytes;
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
    settings: &GateSettings,
) -> Option<(TransportKind, Option<Cow<'a, str>>)> {
    if !head.is_plain_get() {
        return None;
    }
    let path = head.path();
    if path == "/ws" {
        return settings
            .serves(TransportKind::Ws)
            .then_some((TransportKind::Ws, None));
    }
    if let Some(name) = settings
        .durable_path
        .as_deref()
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
        if name.is_empty() || !settings.serves(endpoint) {
            return None;
        }
        return Some((endpoint, Some(percent_decode(name)?)));
    }
    let (topic, kind) = path.strip_prefix("/topics/")?.split_once('/')?;
    let endpoint: TransportKind = kind.parse().ok()?;
    if topic.is_empty() || endpoint.is_durable() || !settings.serves(endpoint) {
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
        let settings = crate::Config::default().gate_settings();
        route(&head, &settings).map(|(e, t)| (e, t.map(Cow::into_owned)))
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
    //! What an idle connection holds is mostly its own future and the future of what it runs
    //! (`transport::call` measures those), each in an allocation of its own: jemalloc rounds
    //! each up to its size class (..., 384, 512, 640, 768, 1024), so a few bytes more can
    //! cost a whole class per connection. This test fails when the connection's own future
    //! outgrows the class it was measured at; the figures are in docs/benchmarks.md.
    use super::*;

    #[tokio::test]
    async fn the_connection_future_stays_within_its_size_class() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let app = crate::AppState::new(crate::Config::default()).unwrap();
        let shared = Arc::new(Shared::new(app.gate()));
        let io = Io::Tcp(Arc::new(stream));
        let future = Connection { shared, peer }.serve(io, false);
        let size = std::mem::size_of_val(&future);
        assert!(
            size <= 384,
            "Connection::serve is {size} bytes, over its 384-byte class"
        );
    }
}
