//! What the transports take from the configuration, and nothing more: `config.rs` builds a
//! [`TransportSettings`] from the command line, so a transport never reads a flag and can be
//! driven (and tested) with settings of its own.

use std::time::Duration;

/// Every transport's settings.
#[derive(Clone, Debug)]
pub struct TransportSettings {
    /// Short and long polls.
    pub poll: PollSettings,
    /// SSE and WebSocket streams.
    pub stream: StreamSettings,
    /// `POST /topics/{t}` and the WebSocket `publish` command.
    pub publish: PublishSettings,
    /// The Durable Streams protocol.
    pub durable: DurableSettings,
    /// What every connection a transport serves on the raw socket obeys.
    pub connection: ConnectionSettings,
}

/// What every connection a transport serves on the raw socket obeys.
#[derive(Clone, Debug)]
pub struct ConnectionSettings {
    /// A write that makes no progress for this long ends the connection.
    pub stall_timeout: std::time::Duration,
    /// The most bytes of a client's next (pipelined) request kept while a stream or a parked
    /// long poll runs; a client that sends more is cut off.
    pub max_pending_input: usize,
}

/// The Durable Streams protocol.
#[derive(Clone, Debug)]
pub struct DurableSettings {
    /// Where it is served (`/v1/stream`); `None`: not served.
    pub path: Option<String>,
    /// The largest append body, in bytes.
    pub max_body: usize,
    /// How long a long poll waits, and how often an idle SSE read gets a keep-alive.
    pub long_poll_timeout: Duration,
    /// The host of a created stream's `Location` when the request names none (the address
    /// the server listens on).
    pub default_host: String,
    /// Whether clients reach the server over TLS (the scheme of `Location`).
    pub https: bool,
}

/// Short and long polls.
#[derive(Clone, Debug)]
pub struct PollSettings {
    /// Messages per answer when the request names no `limit`.
    pub default_limit: usize,
    /// The largest `limit` a request may ask for.
    pub max_limit: usize,
    /// How long a long poll waits when the request names no `timeout`.
    pub default_timeout: Duration,
    /// The longest `timeout` a request may ask for.
    pub max_timeout: Duration,
}

/// SSE and WebSocket streams.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// The reconnection delay an SSE stream suggests to the browser (`retry:`).
    pub sse_retry: Duration,
    /// A WebSocket peer that answers no ping, or takes no write, for this long is cut off.
    pub ws_pong_timeout: Duration,
    /// Bytes read from a WebSocket per read.
    pub ws_read_buffer: usize,
    /// The largest WebSocket message (after reassembly) a client may send.
    pub ws_max_message: usize,
    /// Topics one multiplexed WebSocket may follow at once.
    pub max_subscriptions: usize,
}

/// Publishing.
#[derive(Clone, Debug)]
pub struct PublishSettings {
    /// The largest body a publish may carry, in bytes.
    pub max_body: usize,
}
