//! The loop every streaming connection runs, whatever it speaks (SSE, WebSocket) and over
//! whatever it runs (plain TCP, TLS).
//!
//! The fan-out writes most deliveries straight to the socket; this loop only does what the
//! [`Outlet`] asks ([`Outlet::poll_action`]): finish writes that would have blocked, catch a
//! topic up from its log, end. Meanwhile it reads what the client sends (WebSocket frames,
//! or the end of the stream) and hands it to the transport's [`Peer`]. Policies that are
//! the same for every transport live here once: the stall limit (a peer whose socket takes
//! nothing for that long is dropped), the token's expiry, and backpressure (while a write is
//! blocked, the client's input is not read, so a peer that sends but does not read cannot
//! make the server queue replies without bound).

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    sync::Arc,
    task::Poll,
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::AsyncWrite,
    time::{Instant, Sleep},
};

use super::io::Io;
use crate::{
    error::Error,
    hub::{Action, CatchUp, End, Outlet, SubId},
    message::TopicName,
};

/// What the loop needs from the configuration and the request.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A connection whose writes make no progress for this long is dropped.
    pub stall: Duration,
    /// Read size; the buffer exists only while there is input to read.
    pub read_chunk: usize,
}

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The outlet ended (drained at shutdown, slow consumer, unresponsive peer, write error).
    Ended(End),
    /// The client's token expired.
    Expired,
    /// The client closed the connection, or it failed.
    PeerGone,
    /// Writes made no progress for the stall limit.
    Stalled,
    /// The store could not serve the stream's catch-up (Redis is down): the stream ends
    /// cleanly, saying so, and the client comes back with its cursor.
    Unavailable,
    /// The transport ended it (a WebSocket closing handshake or protocol violation: its
    /// close frame is queued and gets written before the connection closes).
    Closed,
}

/// What a transport adds to the loop.
pub trait Peer: Send {
    /// Bytes arrived; `input` holds everything not consumed yet. Consume what was handled.
    fn on_input(
        &mut self,
        input: &mut Vec<u8>,
        outlet: &Arc<Outlet>,
    ) -> impl Future<Output = Result<(), Finish>> + Send;

    /// Reading a topic's history failed; the sub is gone. End, or tell the client and go on.
    fn on_catch_up_failed(
        &mut self,
        outlet: &Outlet,
        topic: &TopicName,
        error: &Error,
    ) -> Result<(), Finish>;
}

/// The policies of a stream that do not depend on what carries its bytes, shared by the loop
/// below (raw sockets) and by the SSE response body hyper polls: the token's expiry, what
/// the outlet asks for, and how a catch-up that fails is undone.
pub struct Driver {
    expiry: Option<Pin<Box<Sleep>>>,
    /// The transport's own watch over what the stream follows (a Durable Stream's close or
    /// delete), which acts on the outlet; polled with it, dropped once it completes. Boxed
    /// again to a thin pointer: every WebSocket and SSE connection holds a driver, few have a
    /// watch.
    watch: Option<Box<Watch>>,
}

/// A transport's watch over a stream's source, run with the stream: it acts through the
/// outlet (a keep-alive, the stream's end) and completes when it has nothing left to watch.
pub type Watch = futures::future::BoxFuture<'static, ()>;

/// What a stream does next.
pub enum Next {
    /// Write these frames.
    Write(Vec<Bytes>),
    /// Read a topic's history (run it with [`Driver::catch_up`]).
    CatchUp(CatchUp),
    /// End, for this reason.
    Finish(Finish),
}

impl Driver {
    /// A driver for a stream whose token expires at `expires`.
    pub fn new(expires: Option<Instant>, watch: Option<Watch>) -> Self {
        Self {
            expiry: expires.map(|at| Box::pin(tokio::time::sleep_until(at))),
            watch: watch.map(Box::new),
        }
    }

    /// The next thing to do. Poll it only when no write is blocked: the stream then ends on a
    /// frame boundary when its token expires.
    pub fn poll_next(&mut self, cx: &mut std::task::Context<'_>, outlet: &Outlet) -> Poll<Next> {
        if let Some(expiry) = self.expiry.as_mut()
            && expiry.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Next::Finish(Finish::Expired));
        }
        if let Some(watch) = self.watch.as_mut()
            && watch.as_mut().as_mut().poll(cx).is_ready()
        {
            self.watch = None;
        }
        outlet.poll_action(cx).map(|action| match action {
            Action::Write(frames) => Next::Write(frames),
            Action::CatchUp(catch_up) => Next::CatchUp(catch_up),
            Action::End(end) => Next::Finish(Finish::Ended(end)),
        })
    }

    /// Reads what a sub missed. If the read fails the sub is dropped (its place in the
    /// outlet would otherwise wait forever) and the failure returned with its topic, for the
    /// transport to end the stream or tell the client. Callers box it: its state is needed
    /// only while it runs.
    pub async fn catch_up(outlet: &Outlet, catch_up: CatchUp) -> Result<(), (TopicName, Error)> {
        let topic = catch_up.topic().clone();
        let sub: SubId = Outlet::catch_up_sub(&catch_up);
        outlet.catch_up(catch_up).await.map_err(|error| {
            outlet.unsubscribe(sub);
            (topic, Error::from(error))
        })
    }
}

/// Whether an end leaves something worth sending before the transport's last bytes: the
/// rest of a drain, what was queued before the token expired, a close frame. The other ends
/// (the peer is gone, or stalled) write nothing more.
pub fn flushes(finish: Finish) -> bool {
    matches!(
        finish,
        Finish::Closed
            | Finish::Expired
            | Finish::Unavailable
            | Finish::Ended(End::SlowConsumer | End::Drained | End::Finished)
    )
}

enum Step {
    Input,
    CatchUp(CatchUp),
    Finish(Finish),
}

/// Runs the stream until it ends, and says why. Bytes queued before the end (a close frame)
/// are written first when the end is [`Finish::Closed`] or a drain.
pub async fn run<P: Peer>(
    io: &mut Io,
    outlet: &Arc<Outlet>,
    peer: &mut P,
    settings: &Settings,
    mut driver: Driver,
    input: &mut Vec<u8>,
) -> Finish {
    let mut writer = Writer::default();
    loop {
        let step = poll_fn(|cx| {
            loop {
                match writer.poll(cx, io, settings.stall) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(finish)) => return Poll::Ready(Step::Finish(finish)),
                    // Backpressure: no input is read while a write is blocked. The expiry
                    // waits too: the stream ends on a frame boundary (a blocked write ends
                    // by the stall limit instead).
                    Poll::Pending => return Poll::Pending,
                }
                match driver.poll_next(cx, outlet) {
                    Poll::Ready(Next::Write(frames)) => writer.start(frames),
                    Poll::Ready(Next::CatchUp(catch_up)) => {
                        return Poll::Ready(Step::CatchUp(catch_up));
                    }
                    Poll::Ready(Next::Finish(finish)) => return Poll::Ready(Step::Finish(finish)),
                    Poll::Pending => break,
                }
            }
            match io.poll_readable(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Step::Finish(Finish::PeerGone)),
                Poll::Pending => return Poll::Pending,
            }
            match io.poll_read_into(cx, input, settings.read_chunk) {
                Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(Step::Finish(Finish::PeerGone)),
                Poll::Ready(Ok(_)) => Poll::Ready(Step::Input),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match step {
            Step::Input => {
                // Boxed: what handling input needs (a publish, a subscribe) is held only while
                // it runs, not by every idle connection.
                let handled = super::boxed(|| peer.on_input(input, outlet)).await;
                if input.is_empty() {
                    // Idle connections hold no read buffer.
                    *input = Vec::new();
                }
                if let Err(finish) = handled {
                    return super::boxed(|| end(io, outlet, finish, settings.stall)).await;
                }
            }
            Step::CatchUp(catch_up) => {
                // Boxed: the read's state exists only while it runs.
                let caught_up = super::boxed(|| Driver::catch_up(outlet, catch_up)).await;
                if let Err((topic, error)) = caught_up
                    && let Err(finish) = peer.on_catch_up_failed(outlet, &topic, &error)
                {
                    return finish;
                }
            }
            Step::Finish(finish) => {
                return super::boxed(|| end(io, outlet, finish, settings.stall)).await;
            }
        }
    }
}

/// Writes what is still queued when the end leaves something worth sending (a close frame,
/// the rest of a drain, what was queued before the token expired), then returns `finish`.
/// The outlet is sealed first: nothing the fan-out offers from now on is queued behind
/// those last bytes, so the transport's own ending (a close frame, the `expired` event, the
/// last chunk) follows whole frames and nothing follows it.
async fn end(io: &mut Io, outlet: &Outlet, finish: Finish, stall: Duration) -> Finish {
    if flushes(finish) {
        outlet.seal();
        if let Err(failed) = write_pending(io, outlet, stall).await {
            return failed;
        }
    }
    finish
}

/// Writes everything queued on a sealed outlet (a transport's last bytes included), with the
/// stall limit.
pub async fn write_pending(io: &mut Io, outlet: &Outlet, stall: Duration) -> Result<(), Finish> {
    let mut writer = Writer::default();
    poll_fn(|cx| {
        loop {
            match writer.poll(cx, io, stall) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            match outlet.take_pending() {
                Some(frames) => writer.start(frames),
                None => return Poll::Ready(Ok(())),
            }
        }
    })
    .await
}

/// Writes one batch of frames completely (and flushes, for TLS), with the stall limit.
#[derive(Default)]
struct Writer {
    frames: Vec<Bytes>,
    done: usize,
    flushing: bool,
    stall: Option<Pin<Box<Sleep>>>,
}

impl Writer {
    fn start(&mut self, frames: Vec<Bytes>) {
        self.frames = frames;
        self.done = 0;
    }

    /// `Ready(Ok)` when nothing is left to write.
    fn poll(
        &mut self,
        cx: &mut std::task::Context<'_>,
        io: &mut Io,
        limit: Duration,
    ) -> Poll<Result<(), Finish>> {
        if self.frames.is_empty() && !self.flushing {
            return Poll::Ready(Ok(()));
        }
        let before = self.done;
        let polled = if self.frames.is_empty() {
            Poll::Ready(Ok(()))
        } else {
            io.poll_write_frames(cx, &self.frames, &mut self.done)
        };
        let polled = match polled {
            Poll::Ready(Ok(())) => {
                // Dropped, not cleared: an idle connection keeps no write list allocated.
                self.frames = Vec::new();
                self.done = 0;
                self.flushing = true;
                Pin::new(&mut *io).poll_flush(cx)
            }
            other => other,
        };
        match polled {
            Poll::Ready(Ok(())) => {
                self.flushing = false;
                self.stall = None;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(Finish::PeerGone)),
            Poll::Pending => {
                if self.done != before {
                    self.stall = None;
                }
                let deadline = self
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(Finish::Stalled));
                }
                Poll::Pending
            }
        }
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("expires", &self.expiry.is_some())
            .finish()
    }
}

impl std::fmt::Debug for Next {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Next::Write(frames) => f.debug_tuple("Write").field(&frames.len()).finish(),
            Next::CatchUp(_) => f.write_str("CatchUp"),
            Next::Finish(finish) => f.debug_tuple("Finish").field(finish).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The stream loop and the WebSocket session over an in-memory pipe, on Tokio's paused
    //! clock (a test waits no real second: the runtime jumps to the next timer once every
    //! task is idle): the token's expiry, heartbeats, the stall limit and close codes. And
    //! the direct-write path, which needs a real socket, over a loopback TCP pair on the real
    //! clock.

    use std::time::{SystemTime, UNIX_EPOCH};

    use axum::http::HeaderMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::{
        access::Access,
        hub::Native,
        message::{EventName, Payload},
        transport::{
            TransportState,
            body::{self, BodyPeer, Wire},
            ws::{self, Running, Start},
        },
    };

    const SECRET: &str = "s3cret";

    fn state(config: crate::Config) -> TransportState {
        crate::AppState::new(config).unwrap().transport.clone()
    }

    fn topic() -> TopicName {
        TopicName::parse("t").unwrap()
    }

    async fn publish(state: &TransportState, n: usize) {
        for i in 0..n {
            let payload = Payload::from_text(&format!("message {i} {}", "x".repeat(100)));
            state
                .publish(&topic(), EventName::default_event(), &payload)
                .await
                .unwrap();
        }
    }

    /// A caller whose token expires `seconds` from now (on the wall clock, as tokens do).
    fn expiring_access(state: &TransportState, seconds: u64) -> Access {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + seconds;
        let claims = serde_json::json!({"exp": exp, "pushhub": {"subscribe": ["t"]}});
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap();
        Access::for_request(&state.auth, &HeaderMap::new(), &format!("token={token}")).unwrap()
    }

    /// A per-topic WebSocket session on `t`, running on the server end of an in-memory pipe
    /// of `buffer` bytes; the client end is returned.
    async fn ws_session(
        state: &TransportState,
        access: Access,
        buffer: usize,
    ) -> (tokio::task::JoinHandle<()>, DuplexStream) {
        let (client, server) = tokio::io::duplex(buffer);
        let start = Start {
            access,
            home: Some(crate::transport::ws::Home::One(topic(), None)),
            peer: None,
            socket: None,
            head: Bytes::new(),
            presenter: Default::default(),
        };
        let opened = ws::open(state, start).await.unwrap();
        let state = state.clone();
        let session = tokio::spawn(async move {
            let mut io = Io::Other(Box::new(server));
            let running = Running {
                opened,
                input: Vec::new(),
            };
            ws::run(&state, running, &mut io).await;
        });
        (session, client)
    }

    /// Reads server frames (unmasked) until a close frame; returns its code.
    async fn close_code(client: &mut DuplexStream) -> u16 {
        loop {
            let mut head = [0u8; 2];
            client
                .read_exact(&mut head)
                .await
                .expect("a frame before the end");
            let len = match head[1] & 0x7F {
                126 => usize::from(client.read_u16().await.unwrap()),
                127 => usize::try_from(client.read_u64().await.unwrap()).unwrap(),
                n => usize::from(n),
            };
            let mut payload = vec![0; len];
            client.read_exact(&mut payload).await.unwrap();
            if head[0] & 0x0F == 0x8 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_websocket_closes_4001_when_its_token_expires() {
        // Pings far apart: this client answers none, and must not be cut off for that first.
        let state = state(crate::Config {
            jwt_secret: Some(SECRET.into()),
            ws_ping_interval: Duration::from_secs(3600),
            ..Default::default()
        });
        let access = expiring_access(&state, 60);
        let started = Instant::now();
        let (session, mut client) = ws_session(&state, access, 64 * 1024).await;
        assert_eq!(close_code(&mut client).await, 4001);
        let lasted = started.elapsed();
        assert!(
            lasted >= Duration::from_secs(58) && lasted <= Duration::from_secs(61),
            "closed after {lasted:?}, not at the token's expiry"
        );
        session.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_websocket_closes_1001_when_the_server_drains() {
        let state = state(crate::Config::default());
        let access = Access::for_request(&state.auth, &HeaderMap::new(), "").unwrap();
        let (session, mut client) = ws_session(&state, access, 64 * 1024).await;
        publish(&state, 3).await;
        state.hub.drain();
        assert_eq!(close_code(&mut client).await, 1001);
        session.await.unwrap();
    }

    /// An SSE stream on `t` over the server end of an in-memory pipe, run by the stream loop;
    /// returns how it finished.
    async fn sse_stream(
        state: &TransportState,
        buffer: usize,
        stall: Duration,
    ) -> (tokio::task::JoinHandle<Finish>, DuplexStream) {
        let (client, server) = tokio::io::duplex(buffer);
        let wire = Wire::hyper(Native::Sse);
        let mut opened = body::open(
            state,
            body::Follow::One(&topic(), None),
            wire,
            None,
            (None, Default::default()),
        )
        .await
        .unwrap();
        let stream = tokio::spawn(async move {
            let mut io = Io::Other(Box::new(server));
            let settings = Settings {
                stall,
                read_chunk: 512,
            };
            let outlet = opened.outlet.0.clone();
            let driver = opened.driver();
            let mut peer = BodyPeer { max_input: 1024 };
            run(
                &mut io,
                &outlet,
                &mut peer,
                &settings,
                driver,
                &mut Vec::new(),
            )
            .await
        });
        (stream, client)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_gets_a_heartbeat_each_interval() {
        let state = state(crate::Config {
            heartbeat: Duration::from_secs(15),
            ..Default::default()
        });
        let (stream, mut client) = sse_stream(&state, 64 * 1024, Duration::from_secs(30)).await;
        let started = Instant::now();
        let mut seen = Vec::new();
        let mut beats = Vec::new();
        while beats.len() < 2 {
            let mut chunk = [0u8; 256];
            let n = client.read(&mut chunk).await.unwrap();
            seen.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&seen).into_owned();
            if text.matches(": keep-alive").count() > beats.len() {
                beats.push(started.elapsed());
            }
        }
        // The shard's ticker beats a connection that was idle for a whole interval: the
        // first within two intervals of its opening write, then one every interval (a
        // heartbeat is not traffic that makes the next one unneeded: before that was fixed,
        // they came every other interval, [30s, 60s]).
        assert!(beats[0] <= Duration::from_secs(30), "{beats:?}");
        assert_eq!(beats[1] - beats[0], Duration::from_secs(15), "{beats:?}");
        drop(client);
        assert_eq!(stream.await.unwrap(), Finish::PeerGone);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_is_cut_off_after_the_stall_limit() {
        let state = state(crate::Config::default());
        let stall = Duration::from_secs(30);
        // 256 bytes of pipe, and a client that never reads: the writes block.
        let (stream, _client) = sse_stream(&state, 256, stall).await;
        let started = Instant::now();
        publish(&state, 20).await;
        assert_eq!(stream.await.unwrap(), Finish::Stalled);
        let lasted = started.elapsed();
        assert!(
            lasted >= stall && lasted < stall + Duration::from_secs(1),
            "cut off after {lasted:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_websocket_client_close_is_answered_with_a_close() {
        let state = state(crate::Config::default());
        let access = Access::for_request(&state.auth, &HeaderMap::new(), "").unwrap();
        let (session, mut client) = ws_session(&state, access, 64 * 1024).await;
        // A masked close frame, code 1000 (mask 0: the payload as is).
        client
            .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8])
            .await
            .unwrap();
        assert_eq!(close_code(&mut client).await, 1000);
        session.await.unwrap();
    }

    #[tokio::test]
    async fn the_fan_out_writes_to_an_idle_socket_itself() {
        let state = state(crate::Config::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let socket = Arc::new(listener.accept().await.unwrap().0);
        let wire = Wire {
            socket: Some(socket.clone()),
            format: Native::Sse,
            head: None,
        };
        let opened = body::open(
            &state,
            body::Follow::One(&topic(), None),
            wire,
            None,
            (None, Default::default()),
        )
        .await
        .unwrap();
        // The connection's task does what its outlet asks (its start, the opening `id:`
        // line) until nothing is left, as its loop does; from then on no task of the
        // connection runs.
        let outlet = opened.outlet.0.clone();
        loop {
            let action = poll_fn(|cx| Poll::Ready(outlet.poll_action(cx))).await;
            match action {
                Poll::Ready(Action::Write(frames)) => {
                    for frame in frames {
                        assert_eq!(socket.try_write(&frame).unwrap(), frame.len());
                    }
                }
                Poll::Ready(Action::CatchUp(catch_up)) => outlet.catch_up(catch_up).await.unwrap(),
                Poll::Ready(other) => panic!("{other:?}"),
                Poll::Pending => break,
            }
        }
        publish(&state, 2).await;
        // Both messages arrive, written by the fan-out's writer straight to the socket.
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while String::from_utf8_lossy(&seen).matches("data: ").count() < 2 {
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout_at(deadline, client.read(&mut chunk)).await;
            let n = read.expect("the fan-out wrote the messages").unwrap();
            seen.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&seen);
        assert!(
            text.contains("id: 1\n") && text.contains("id: 2\n"),
            "{text}"
        );
        assert_eq!(
            state.hub.stats().deliveries[crate::message::TransportKind::Sse],
            2
        );
    }
}
