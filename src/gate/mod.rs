//! The gate: everything that runs before a transport takes a request, in this order.
//!
//! 1. The accept loop ([`server`]): worker 0 accepts and hands connections out round-robin;
//!    connection limits in total and per IP ([`limits`], refused with 503/429 before any
//!    parsing); `TCP_NODELAY`; the TLS handshake with its own deadline (over the limit, a
//!    TLS connection gets a fatal alert instead of a handshake).
//! 2. The request head ([`connection`]): read with `httparse`
//!    ([`crate::transport::head`]) within `--header-timeout` and `--max-header-bytes`; a peer
//!    that stops reading is cut off after `--stall-timeout`.
//! 3. The route ([`connection`]): the streaming and polling endpoints (`GET` of
//!    `/topics/{t}/poll|longpoll|sse|stream|ws`, `/ws`, and the Durable Streams live reads
//!    under `--ds-path`) are handed to their transport on the raw socket; other requests with
//!    a plain body (publishes, topic info, the lab's assets) go to the axum router on the
//!    same connection; HTTP/2 and anything unusual (chunked or oversized bodies, `Expect`,
//!    HTTP/1.0, malformed heads) go to hyper ([`hyper`]) with the bytes already read
//!    replayed in front.
//! 4. Admission ([`admit`]): the token, verified once (giving a
//!    [`crate::access::Access`]), and the `Origin` of a WebSocket handshake. Then the gate
//!    hands the transport one [`crate::transport::call::Call`] and steps aside: the
//!    transport's own file serves it (the topic permission, the publish rate, the answer,
//!    the stream).
//!
//! The raw path and hyper's give the same answers, byte for byte where a client can tell
//! (status, headers, bodies, close codes); `tests/http_api.rs` checks it.

pub mod admit;
pub mod connection;
pub mod hyper;
pub mod limits;
pub mod server;

use std::{path::PathBuf, sync::Arc, time::Duration};

use axum::Router;

use crate::{
    link::Lanes,
    message::{PerTransport, TransportKind},
    transport::TransportState,
};
use limits::ConnectionLimits;

/// What the gate takes from the configuration (`config.rs` builds it).
#[derive(Clone, Debug)]
pub struct GateSettings {
    /// How long a client may take to send a request head (and a TLS handshake).
    pub header_timeout: Duration,
    /// The largest request head read; a larger one goes to hyper, which answers 431.
    pub max_header_bytes: usize,
    /// The largest request body the router is given here; a larger one goes to hyper.
    pub max_body: usize,
    /// A write that makes no progress for this long ends the connection.
    pub stall_timeout: Duration,
    /// How long each worker waits for its connections once stopped.
    pub shutdown_grace: Duration,
    /// Worker runtimes (threads), each with its own share of the connections.
    pub workers: usize,
    /// Which transports are served (`--transports`, and the Durable Streams reads when
    /// `--ds-path` is on): the others' raw requests go to the router, which answers 404.
    pub served: PerTransport<bool>,
    /// Where the Durable Streams protocol is served, if it is.
    pub durable_path: Option<String>,
    /// The TLS certificate and key, when the server speaks TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl GateSettings {
    /// Whether `transport`'s endpoints are served.
    pub fn serves(&self, transport: TransportKind) -> bool {
        self.served[transport]
    }
}

/// What the gate runs with, built by the app: its settings, the transports it hands calls
/// to, the connection limits, the emulated links, and the router for everything else.
pub struct Gate {
    /// The gate's settings.
    pub settings: GateSettings,
    /// What the transports share; also the stop signal.
    pub transports: TransportState,
    /// Open connections, in total and per IP.
    pub connections: Arc<ConnectionLimits>,
    /// The emulated links clients reach through `<link>.localhost` (`--link-hosts`).
    pub lanes: Option<Arc<Lanes>>,
    /// The app, for requests hyper or the router serve.
    pub router: Router,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
