//! pushhub: one hub, five ways to push each message to a browser, plus Durable Streams.
//!
//! A publisher posts a message to a topic; the hub gives it the topic's next id and exposes it
//! at once through short polling, long polling, Server-Sent Events, WebSocket and HTTP
//! streaming (NDJSON). All five speak the same JSON envelope and resume from the same cursor
//! (the message id), so a client can switch transport mid-stream and lose nothing. The same
//! topics are also served through the Durable Streams protocol (`/v1/stream` by default).
//!
//! # How a message flows
//!
//! 1. A transport parses the request ([`transport`]) and calls
//!    [`transport::Transports::publish`], which
//!    checks the server is not stopping and calls [`hub::Hub::publish`].
//! 2. The hub asks the topic's log ([`store::TopicLog`]) to append it. The log assigns the
//!    id and keeps bounded history; [`message::Message`] frames it once per wire format
//!    (envelope, WebSocket frame, SSE event and chunk), here.
//! 3. The hub hands the shared `Arc<Message>` to the fan-out writer of each worker that has
//!    subscribers of the topic: the publisher never waits for a subscriber. (With Redis, the
//!    message comes back through the node's subscription instead, for every node alike.)
//! 4. Each writer walks the topic's subscribers on its worker ([`hub::Outlet`]) and writes
//!    the shared bytes straight to their sockets; only a subscriber whose socket would block
//!    gets a queue and its own task woken. A subscriber that sees an id gap, or whose queue
//!    overflows, reads what it missed from the log by cursor. Parked long polls are answered
//!    by the same walk; pollers read the log directly ([`hub::Hub::poll`],
//!    [`hub::Hub::park`]).
//!
//! # Layout
//!
//! Layers import only downward, bottom first here (docs/architecture.md; `tests/layers.rs`
//! checks every module):
//!
//! - [`message`]: envelope, names, ids, encodings, [`message::TransportKind`]; imports nothing
//!   of the crate.
//! - [`telemetry`]: counters and handles for `GET /metrics`; a leaf.
//! - [`store`]: where history lives, behind the [`store::Store`] trait.
//! - [`hub`]: topics, publish, subscribe from a cursor, fan-out, subscriber counts; its own
//!   settings and error type, no HTTP, no CLI.
//! - [`link`]: the link emulator (delay, bandwidth, cuts, middleboxes) the bench puts its
//!   subscribers behind and the lab's lanes reach through `<link>.localhost`; a leaf.
//! - [`web`]: the embedded demo page.
//! - [`error`]: the HTTP answer of every layer's errors, in one place.
//! - [`access`]: who the caller is and what it may do: tokens ([`access::Access`]), origins,
//!   the publish rate; applied by the gate and the transports alike.
//! - [`transport`]: `publish`, `poll`, `longpoll`, `sse`, `ws`, `ndjson` and Durable Streams
//!   (`durable`), each whole (the call the gate hands it, its raw-socket path, its hyper
//!   handler), and the stream driver: thin adapters over the hub, with their own settings.
//! - [`gate`]: what runs before a transport, in order: accept loop and workers, connection
//!   limits, TLS, request heads, the raw fast path or hyper, admission (token, WebSocket
//!   origin).
//! - [`config`]: every tunable, with flags, environment variables and defaults; it builds each
//!   layer's settings.
//! - [`app`]: the shared state, the router and the small handlers (the one publish path is
//!   the transports': [`transport::publish::publish_as`]).
//! - [`bench`](mod@bench): `pushhub bench`, the load benchmark.
//!
//! # Where history lives
//!
//! Three [`store::Store`]s sit behind the same trait: in memory (the default), on disk
//! (`--data-dir`, [`store::DiskStore`]: an embedded fjall database whose single writer
//! thread acknowledges a publish only after `fdatasync`), and in Redis (`--redis`,
//! [`store::RedisStore`]: ids from a Lua script, so several nodes share topics). A log that
//! learns of messages from other nodes delivers them itself, through
//! [`store::TopicLog::follow`], to the same `Live` sink step 3 fills (the topic's followers
//! per fan-out shard); from there on, nothing
//! differs, and the transports never know which store runs.
//!
//! # Production concerns, and where they sit
//!
//! Everything a public deployment needs is in front of the hub, never inside it: the accept
//! loop refuses connections over the limits before parsing anything; a token is verified once
//! per request and checked per topic by the transports before they call the hub; long-lived
//! streams carry their token's expiry and the stop signal in their `select!`. The hub stays
//! free of HTTP and of policy, so its hot path (publish, fan-out) is what the benchmarks
//! measure.

pub mod access;
pub mod app;
pub mod bench;
pub mod client;
pub mod config;
pub mod error;
pub mod gate;
pub mod hub;
pub mod link;
pub mod message;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod web;

use std::future::Future;

use tokio::net::TcpListener;

pub use app::{App, AppState, router};
pub use config::Config;
pub use error::Error;
use gate::server::{self, StartError};

/// Serves on `listener` until `shutdown` completes, then ends every stream and waits at most
/// `config.shutdown_grace` for connections to finish.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let state = AppState::new(config)?;
    serve(listener, state, shutdown).await
}

/// Like [`run`], with state built by the caller (tests use it to reach the hub).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let gate = state.gate();
    let tls = match &gate.settings.tls {
        Some((cert, key)) => Some(server::tls_acceptor(cert, key)?),
        None => None,
    };
    if let (Some(lanes), Ok(addr)) = (&state.lanes, listener.local_addr()) {
        lanes.lead_to(addr);
    }
    let stop = state.transport.shutdown.clone();
    tokio::spawn(
        state
            .transport
            .hub
            .clone()
            .run_sweeper(state.config.sweep_interval, stop.clone()),
    );
    tokio::spawn(state.transport.hub.clone().run_directory(stop.clone()));
    tokio::spawn(state.transport.hub.clone().run_presence(stop.clone()));
    if state.transport.settings.durable.path.is_some() {
        tokio::spawn(
            state
                .transport
                .streams
                .clone()
                .run_sweeper(state.transport.clone(), stop.clone()),
        );
    }
    let stopping = {
        let state = state.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = state.transport.shutdown.cancelled() => {}
            }
            // Long polls and idle connections end on this; streams stop their heartbeats,
            // and once every publish admitted before the stop is appended, write what they
            // have not been sent and end. The accept loop then waits for them.
            state.transport.shutdown.cancel();
            state.transport.hub.stop_timers();
            tokio::spawn(async move {
                state.transport.publishes_settled().await;
                state.transport.hub.drain();
            });
        }
    };
    let hub = state.transport.hub.clone();
    let served = server::serve_workers(listener, gate, tls, stopping).await;
    // Bounded: a Redis that does not answer must not hold the exit.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), hub.leave_all()).await;
    served
}
