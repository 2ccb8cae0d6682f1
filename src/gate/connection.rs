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
    auth::Access,
    error::Error,
    hub::Format,
    transport::{Params, io::Io, longpoll, poll, sse, stream, ws},
};

/// Initial size of a request head buffer; it grows to `--max-header-bytes`.
const HEAD_BUFFER: usize = 1024;

/// What a connection needs besides its stream.
pub struct Connection {
    /// Everything the handlers share.
    pub app: AppState,
    /// Where it comes from.
    pub peer: SocketAddr,
    /// The app, for requests hyper serves.
    pub router: Router,
    /// hyper's builders.
    pub protocols: Arc<Protocols>,
}

/// An endpoint pushhub serves on the raw socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Poll,
    Longpoll,
    Sse,
    Ws,
}

/// What comes after a request.
enum Next {
    /// Read the next request; these bytes of it were read already.
    KeepAlive(Vec<u8>),
    /// Close the connection.
    Close,
}

impl Connection {
    /// Serves the connection until it closes, or hands it to hyper. `negotiated_h2`: TLS chose
    /// HTTP/2, which hyper serves from the start.
    pub async fn serve(self, mut io: Io, negotiated_h2: bool) {
        let stop = self.app.shutdown.clone();
        if negotiated_h2 {
            let protocols = self.protocols.clone();
            protocols
                .serve(io, Vec::new(), true, self.peer, self.router, stop)
                .await;
            return;
        }
        let mut buf = Vec::new();
        loop {
            let head = tokio::select! {
                read = read_head(&mut io, buf, &self.app) => read,
                () = stop.cancelled() => return,
            };
            let head = match head {
                Some(Ok(head)) => head,
                Some(Err(read)) => return self.hand_over(io, read).await,
                None => return,
            };
            let next = match route(&head, &self.app.config) {
                Some((endpoint, topic)) => {
                    let topic = topic.map(Cow::into_owned);
                    self.dispatch(endpoint, topic, head, &mut io).await
                }
                None => match self.app_request(&head) {
                    Some((request, length)) => self.serve_app(head, request, length, &mut io).await,
                    None => return self.hand_over(io, head.into_buffer()).await,
                },
            };
            match next {
                Next::KeepAlive(rest) => buf = rest,
                Next::Close => {
                    let _ = io.shutdown().await;
                    return;
                }
            }
        }
    }

    async fn hand_over(self, io: Io, read: Vec<u8>) {
        let stop = self.app.shutdown.clone();
        self.protocols
            .serve(io, read, false, self.peer, self.router, stop)
            .await;
    }

    /// A request the router may serve here, and its body length: `None` when hyper must
    /// (a chunked or oversized body, `Expect`, a name or value `http` refuses).
    fn app_request(
        &self,
        head: &RequestHead,
    ) -> Option<(axum::http::Request<axum::body::Body>, usize)> {
        if head.has_header("transfer-encoding") || head.has_header("expect") {
            return None;
        }
        let length = match head.header("content-length") {
            None => 0,
            Some(value) => {
                let length: usize = std::str::from_utf8(value).ok()?.parse().ok()?;
                // A body over the limit is refused by axum while hyper streams it in.
                if length > self.app.config.max_body || !head.single("content-length") {
                    return None;
                }
                length
            }
        };
        Some((head.to_request()?, length))
    }

    /// Serves a request through the axum router: reads its body, writes its response.
    async fn serve_app(
        &self,
        head: RequestHead,
        mut request: axum::http::Request<axum::body::Body>,
        length: usize,
        io: &mut Io,
    ) -> Next {
        let close = head.wants_close();
        let mut rest = head.into_rest();
        let deadline = Instant::now() + self.app.config.header_timeout;
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
            .insert(axum::extract::ConnectInfo(self.peer));
        let is_head = request.method() == axum::http::Method::HEAD;
        let response = match tower::ServiceExt::oneshot(self.router.clone(), request).await {
            Ok(response) => response,
            Err(infallible) => match infallible {},
        };
        let stall = self.app.config.stall_timeout;
        match tokio::time::timeout(stall, super::response::write_app(io, response, is_head)).await {
            Ok(Ok(keep)) if keep && !close => Next::KeepAlive(next),
            _ => Next::Close,
        }
    }

    async fn dispatch(
        &self,
        endpoint: Endpoint,
        topic: Option<String>,
        head: RequestHead,
        io: &mut Io,
    ) -> Next {
        let app = &self.app;
        let meta = Meta::of(&head, &app.origins);
        let close = head.wants_close();
        let stall = app.config.stall_timeout;
        let access = match Access::for_request(&app.auth, &head, head.query()) {
            Ok(access) => access,
            Err(error) => {
                return finish(io, response::error(&error, &meta), close, stall).await;
            }
        };
        let topic = topic.as_deref().unwrap_or_default();
        match endpoint {
            Endpoint::Poll => {
                let params = Params::new(Cow::Borrowed(head.query()), Some(self.peer));
                let answer = poll::answer(app, &access, topic, &params).await;
                let rest = head.into_rest();
                let response = answered(answer, &meta);
                keep_alive(finish(io, response, close, stall).await, rest)
            }
            Endpoint::Longpoll => {
                let params = Params::new(Cow::Owned(head.query().to_owned()), Some(self.peer));
                let mut rest = head.into_rest();
                let answer = longpoll::answer(app, &access, topic, &params);
                // While parked, watch the connection: a client that goes away ends the wait
                // (and frees its place); a pipelined request is kept for later.
                let limit = app.config.max_header_bytes;
                let answer = tokio::select! {
                    answer = answer => answer,
                    () = watch(io, &mut rest, limit) => return Next::Close,
                };
                let response = answered(answer, &meta);
                keep_alive(finish(io, response, close, stall).await, rest)
            }
            Endpoint::Sse => self.sse(topic, head, meta, access, io).await,
            Endpoint::Ws => {
                let params = Params::new(Cow::Borrowed(head.query()), Some(self.peer));
                let topic = (!topic.is_empty()).then_some(topic);
                let (accept, home) = match ws::check(app, &access, topic, &params, &head) {
                    Ok(checked) => checked,
                    Err(error) => {
                        return finish(io, response::error(&error, &meta), close, stall).await;
                    }
                };
                let headers = ws::upgrade_headers(&accept);
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                let switching = response::head(
                    StatusCode::SWITCHING_PROTOCOLS,
                    &headers,
                    &meta,
                    Length::None,
                );
                let peer = params.peer_ip();
                let rest = head.into_rest();
                let socket = io.shared_socket();
                match ws::open(app, access, home, peer, socket, Bytes::from(switching)).await {
                    Ok(opened) => {
                        ws::run(app, opened, io, rest).await;
                        Next::Close
                    }
                    Err(error) => finish(io, response::error(&error, &meta), true, stall).await,
                }
            }
        }
    }

    async fn sse(
        &self,
        topic: &str,
        head: RequestHead,
        meta: Meta,
        access: Access,
        io: &mut Io,
    ) -> Next {
        let app = &self.app;
        let close = head.wants_close();
        let stall = app.config.stall_timeout;
        let params = Params::new(Cow::Borrowed(head.query()), Some(self.peer));
        let response_head = response::head(StatusCode::OK, &sse::HEADERS, &meta, Length::Chunked);
        let opened = sse::open(
            app,
            &access,
            topic,
            &params,
            &head,
            io.shared_socket(),
            Format::SseChunked,
            Some(response_head),
        )
        .await;
        let opened = match opened {
            Ok(opened) => opened,
            Err(error) => return finish(io, response::error(&error, &meta), close, stall).await,
        };
        let mut input = head.into_rest();
        let settings = stream::Settings {
            stall,
            read_chunk: 512,
            expires: opened.expires,
        };
        let mut peer = sse::SsePeer {
            max_input: app.config.max_header_bytes,
        };
        let outlet = opened.outlet.0.clone();
        let finished = stream::run(io, &outlet, &mut peer, &settings, &mut input).await;
        drop(opened.outlet);
        let Some(tail) = sse::tail(Format::SseChunked, finished) else {
            return Next::Close;
        };
        let keep = matches!(finished, stream::Finish::Expired) && !close;
        keep_alive(finish(io, tail, !keep, stall).await, input)
    }
}

/// A handler's answer as a complete response.
fn answered(answer: Result<Vec<u8>, Error>, meta: &Meta) -> Vec<u8> {
    match answer {
        Ok(body) => response::full(StatusCode::OK, &poll::HEADERS, meta, &body),
        Err(error) => response::error(&error, meta),
    }
}

/// Writes a response (within the stall limit); what comes next.
async fn finish(io: &mut Io, response: Vec<u8>, close: bool, stall: Duration) -> Next {
    match tokio::time::timeout(stall, io.write_all(&response)).await {
        Ok(Ok(())) if !close => Next::KeepAlive(Vec::new()),
        _ => Next::Close,
    }
}

fn keep_alive(next: Next, rest: Vec<u8>) -> Next {
    match next {
        Next::KeepAlive(_) => Next::KeepAlive(rest),
        Next::Close => Next::Close,
    }
}

/// Completes when the client closes the connection (or sends more than `limit` bytes ahead);
/// what it sends meanwhile is kept in `rest`.
async fn watch(io: &mut Io, rest: &mut Vec<u8>, limit: usize) {
    loop {
        match io.read_into(rest, 512).await {
            Ok(0) | Err(_) => return,
            Ok(_) if rest.len() > limit => return,
            Ok(_) => {}
        }
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
    config: &crate::Config,
) -> Option<(Endpoint, Option<Cow<'a, str>>)> {
    if !head.is_plain_get() {
        return None;
    }
    let path = head.path();
    if path == "/ws" {
        return config.serves("ws").then_some((Endpoint::Ws, None));
    }
    let (topic, kind) = path.strip_prefix("/topics/")?.split_once('/')?;
    let endpoint = match kind {
        "poll" => Endpoint::Poll,
        "longpoll" => Endpoint::Longpoll,
        "sse" => Endpoint::Sse,
        "ws" => Endpoint::Ws,
        _ => return None,
    };
    if topic.is_empty() || !config.serves(kind) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(request: &str) -> Option<(Endpoint, Option<String>)> {
        let (Parsed::Head(head), _) = RequestHead::parse(request.as_bytes().to_vec()) else {
            panic!("not a head: {request}");
        };
        route(&head, &crate::Config::default()).map(|(e, t)| (e, t.map(Cow::into_owned)))
    }

    #[test]
    fn only_plain_gets_of_the_hot_endpoints_are_served_raw() {
        assert_eq!(
            routed("GET /topics/a.b/sse?after=1 HTTP/1.1\r\n\r\n"),
            Some((Endpoint::Sse, Some("a.b".into())))
        );
        assert_eq!(
            routed("GET /topics/bad%20topic/poll HTTP/1.1\r\n\r\n"),
            Some((Endpoint::Poll, Some("bad topic".into())))
        );
        assert_eq!(
            routed("GET /ws HTTP/1.1\r\n\r\n"),
            Some((Endpoint::Ws, None))
        );
        for other in [
            "POST /topics/a HTTP/1.1\r\n\r\n",
            "GET /topics/a HTTP/1.1\r\n\r\n",
            "GET /topics//poll HTTP/1.1\r\n\r\n",
            "GET /topics/a/b/poll HTTP/1.1\r\n\r\n",
            "GET /stats HTTP/1.1\r\n\r\n",
            "GET /topics/a/poll HTTP/1.1\r\ncontent-length: 3\r\n\r\n",
            "POST /topics/a/poll HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(routed(other), None, "{other}");
        }
    }
}
