//! What runs before a handler, in this order:
//!
//! 1. the accept loop ([`crate::gate::server`]): connection limits (503/429 answered before any
//!    parsing), `TCP_NODELAY`, the TLS handshake (with its own deadline);
//! 2. the request head ([`head`]): read with `httparse` within `--header-timeout` and
//!    `--max-header-bytes`;
//! 3. the route ([`connection`]): the streaming and polling endpoints (`GET` of
//!    `/topics/{t}/poll|longpoll|sse|ws` and `/ws`) are served on the raw socket; everything
//!    else (and HTTP/2) goes to hyper and axum ([`hyper`]) with the bytes already read
//!    replayed in front ([`rewind`]);
//! 4. per request: the token ([`crate::gate::auth`]), then in each endpoint the origin check
//!    ([`crate::gate::origin`]), the topic permission, the rate limits ([`crate::gate::limits`]);
//!    responses carry the request id and CORS headers ([`response`]).
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
