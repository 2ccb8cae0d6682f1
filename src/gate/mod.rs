//! The gate: everything that runs before a handler, in this order.
//!
//! 1. The accept loop ([`server`]): worker 0 accepts and hands connections out round-robin;
//!    connection limits in total and per IP ([`limits`], refused with 503/429 before any
//!    parsing); `TCP_NODELAY`; the TLS handshake with its own deadline (over the limit, a
//!    TLS connection gets a fatal alert instead of a handshake).
//! 2. The request head ([`head`]): read with `httparse` within `--header-timeout` and
//!    `--max-header-bytes`; a peer that stops reading is cut off after `--stall-timeout`.
//! 3. The route ([`connection`]): the streaming and polling endpoints (`GET` of
//!    `/topics/{t}/poll|longpoll|sse|ws` and `/ws`) are served on the raw socket; everything
//!    else (and HTTP/2) goes to hyper and axum ([`hyper`]) with the bytes already read
//!    replayed in front ([`rewind`]).
//! 4. Per request: the token, verified once ([`auth`], giving an [`auth::Access`]); then in
//!    each endpoint the WebSocket origin check ([`origin`]), the topic permission, the publish
//!    rate limit ([`limits`]); responses carry the request id and CORS headers
//!    ([`response`]).
//!
//! The raw path and hyper's give the same answers, byte for byte where a client can tell
//! (status, headers, bodies, close codes); `tests/http_api.rs` checks it.

pub mod auth;
pub mod connection;
pub mod head;
pub mod hyper;
pub mod limits;
pub mod origin;
pub mod response;
pub mod rewind;
pub mod server;

pub use hyper::reclaim;
