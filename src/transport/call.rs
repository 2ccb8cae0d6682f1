//! The contract between the gate and the transports on the raw socket: the gate reads a
//! request's head, routes it and admits it (the token, a WebSocket's `Origin`; connection
//! limits were applied at accept); then it hands the
//! transport one [`Call`] (the socket stays with the connection, passed beside it), and the
//! transport's own file does everything after that: it answers, parks a long poll, or opens
//! a stream, and says what the connection does next ([`Next`]).
//!
//! What runs for long (a parked long poll, an SSE or NDJSON body, a WebSocket session) is
//! handed back as a [`Then`]: the request's future (its head, its parsing, the subscribing)
//! is gone before it starts, and the connection runs it in a future of its own size
//! ([`Then::run`]), so an idle connection holds only what its stream needs. Which transport
//! serves a call, and how what it started runs, is the transport module's
//! ([`super::serve`], [`Then`]): this file is the contract every transport imports.

use std::{borrow::Cow, net::SocketAddr, time::Duration};

use smallvec::SmallVec;

use super::{
    Params, Then, TransportState, durable,
    head::RequestHead,
    io::Io,
    response::{self, Meta},
};
use crate::{access::Access, error::Error, message::TransportKind};

/// One admitted request to a transport's endpoint on the raw socket.
#[derive(Debug)]
pub struct Call<'a> {
    /// What the transports share.
    pub state: &'a TransportState,
    /// The endpoint's transport.
    pub transport: TransportKind,
    /// Where the request comes from.
    pub peer: SocketAddr,
    /// The topics its path names, percent-decoded, in order: one for a per-topic endpoint,
    /// none for the multiplexed WebSocket. A list, so that one call can carry several.
    pub topics: Topics,
    /// The request head (and any bytes read after it).
    pub head: RequestHead,
    /// The request id and CORS headers every answer carries.
    pub meta: Meta,
    /// The caller's verdict: what its token allows, and when it expires.
    pub access: Access,
    /// The client asked to close after this response.
    pub close: bool,
}

/// The topics of one call: inline for the usual one.
pub type Topics = SmallVec<[String; 1]>;

/// What the connection does after a call.
#[derive(Debug)]
pub enum Next {
    /// Read the next request; these bytes of it were read already.
    KeepAlive(Vec<u8>),
    /// Run what the call started, in a future of its own.
    Then(Box<Then>),
    /// Close the connection.
    Close,
}

impl Call<'_> {
    /// The query parameters, with the peer's address.
    pub fn params(&self) -> Params<'_> {
        Params::new(Cow::Borrowed(self.head.query()), Some(self.peer))
    }

    /// The one topic of a per-topic endpoint (empty for the multiplexed WebSocket).
    pub fn topic(&self) -> &str {
        self.topics.first().map_or("", String::as_str)
    }

    /// How long a write may make no progress.
    pub fn stall(&self) -> Duration {
        self.state.settings.connection.stall_timeout
    }

    /// Answers with `error`; what comes next.
    pub async fn refuse(self, io: &mut Io, error: &Error) -> Next {
        let refusal = Refusal {
            state: self.state,
            transport: self.transport,
            meta: &self.meta,
            close: self.close,
        };
        refusal.answer(io, error, self.head).await
    }

    /// Counts `bytes` of heads (or of a whole error answer) for this endpoint's transport.
    pub fn heads(&self, bytes: usize) {
        self.state.hub.record_heads(self.transport, bytes);
    }

    /// Writes a whole answer; after it, the connection reads the request the client
    /// pipelined (unless it asked to close).
    pub async fn answer(self, io: &mut Io, answer: Vec<u8>) -> Next {
        let stall = self.stall();
        let close = self.close;
        keep_alive(
            finish(io, answer, close, stall).await,
            self.head.into_rest(),
        )
    }

    /// Writes a whole answer, then closes the connection.
    pub async fn answer_and_close(self, io: &mut Io, answer: Vec<u8>) -> Next {
        let stall = self.stall();
        finish(io, answer, true, stall).await
    }
}

/// A request to a transport's endpoint refused before or after it became a call (admission
/// refuses before: a bad token, a WebSocket's Origin): answered the same way either way.
#[derive(Debug)]
pub struct Refusal<'a> {
    /// What the transports share.
    pub state: &'a TransportState,
    /// The endpoint's transport.
    pub transport: TransportKind,
    /// The request id and CORS headers of the answer.
    pub meta: &'a Meta,
    /// The client asked to close after this response.
    pub close: bool,
}

impl Refusal<'_> {
    /// Answers `error` (with the protocol's security headers on a Durable Streams endpoint),
    /// counts it, and keeps the bytes of a pipelined next request after `head`.
    pub async fn answer(self, io: &mut Io, error: &Error, head: RequestHead) -> Next {
        // Durable Streams puts its security headers on every answer, refusals included.
        let more: &[(&str, &str)] = if self.transport.is_durable() {
            &durable::read::SECURITY_HEADERS
        } else {
            &[]
        };
        let answer = response::error_with(error, self.meta, more);
        self.state.hub.record_heads(self.transport, answer.len());
        let stall = self.state.settings.connection.stall_timeout;
        keep_alive(
            finish(io, answer, self.close, stall).await,
            head.into_rest(),
        )
    }
}

/// Writes a response (within the stall limit); what comes next.
///
/// # Cancel safety
/// Not cancel safe: a write cut short leaves part of the response on the wire.
pub async fn finish(io: &mut Io, response: Vec<u8>, close: bool, stall: Duration) -> Next {
    match io.write_all_within(&response, stall).await {
        Ok(()) if !close => Next::KeepAlive(Vec::new()),
        _ => Next::Close,
    }
}

/// `next`, keeping `rest` (bytes of the next request, read already) when it keeps the
/// connection.
pub fn keep_alive(next: Next, rest: Vec<u8>) -> Next {
    match next {
        Next::KeepAlive(_) => Next::KeepAlive(rest),
        other => other,
    }
}

#[cfg(test)]
mod memory_budget {
    //! What an idle connection holds is mostly the future of what its call started (a
    //! stream, a parked long poll), in an allocation of its own: jemalloc rounds each up to
    //! its size class (..., 384, 512, 640, 768, 1024), so a few bytes more can cost a whole
    //! class per connection (the idle benchmark shows it: a WebSocket session future of 648
    //! bytes measured 2.00 KiB per connection, 632 bytes measured 1.87). This test opens each
    //! through its transport's real call and fails when one outgrows the class it was
    //! measured at; the figures are in docs/benchmarks.md.
    use std::sync::Arc;

    use super::*;
    use crate::transport::{head::Parsed, serve};

    /// What `request` starts on the raw socket.
    async fn started(
        state: &TransportState,
        io: &mut Io,
        kind: TransportKind,
        request: &str,
    ) -> Then {
        let (Parsed::Head(head), _) = RequestHead::parse(request.as_bytes().to_vec()) else {
            panic!("not a head: {request}")
        };
        let access = Access::for_request(&state.auth, &head, "").unwrap();
        let call = Call {
            state,
            transport: kind,
            peer: "127.0.0.1:9".parse().unwrap(),
            topics: (kind != TransportKind::Ws)
                .then(|| "t".to_owned())
                .into_iter()
                .collect(),
            meta: Meta::of(&head, &state.origins),
            head,
            access,
            close: false,
        };
        match serve(call, io).await {
            Next::Then(then) => *then,
            other => panic!("{request} started nothing: {other:?}"),
        }
    }

    #[tokio::test]
    async fn what_a_call_starts_stays_within_its_size_class() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let app = crate::AppState::new(crate::Config::default()).unwrap();
        let state = app.transport.clone();
        let mut io = Io::Tcp(Arc::new(stream));
        let ws = "GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
            sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n";
        let cases = [
            (
                TransportKind::Sse,
                "GET /topics/t/sse HTTP/1.1\r\n\r\n",
                640,
            ),
            (
                TransportKind::Stream,
                "GET /topics/t/stream HTTP/1.1\r\n\r\n",
                640,
            ),
            (TransportKind::Ws, ws, 640),
            (
                TransportKind::Longpoll,
                "GET /topics/t/longpoll?after=0&timeout=20 HTTP/1.1\r\n\r\n",
                1024,
            ),
        ];
        // The outlet each stream holds, in its `Arc` (two counters before it): 304 bytes,
        // measured, in jemalloc's 320-byte class.
        let outlet = std::mem::size_of::<crate::hub::Outlet>() + 16;
        eprintln!("outlet: {outlet} bytes");
        assert!(
            outlet <= 320,
            "an outlet is {outlet} bytes, over its 320-byte class"
        );
        for (kind, request, class) in cases {
            let then = started(&state, &mut io, kind, request).await;
            let step = then.run(&state, &mut io);
            let size = std::mem::size_of_val(&*step);
            eprintln!("{kind}: {size} bytes");
            assert!(
                size <= class,
                "{kind}'s future is {size} bytes, over the {class}-byte class it was measured at"
            );
        }
    }
}
