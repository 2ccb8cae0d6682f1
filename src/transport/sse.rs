//! `GET /topics/{topic}/sse`: Server-Sent Events.
//!
//! The stream's outlet is fed by the fan-out; a slow reader is handled by the hub's policy
//! (it reads its backlog from history by cursor). On the raw socket ([`crate::gate`]) events
//! are HTTP/1.1 chunks framed once per message; through hyper (HTTP/2, or a connection hyper
//! serves) the same outlet feeds a response body ([`super::body`]). The stream ends on
//! shutdown (after everything published before it is written), on token expiry (with an
//! `expired` event), or for a slow consumer under `--slow-consumer disconnect`; clients
//! reconnect with `Last-Event-ID`.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::HeaderMap,
    response::Response,
};
use tokio::net::TcpStream;

use super::{
    HeaderSource, Params,
    body::{self, Framing, Opened},
};
use crate::{AppState, error::Error, gate::auth::Access, hub::Format};

/// The headers of an SSE response (besides the per-request ones). `x-accel-buffering: no`
/// asks nginx not to buffer the stream.
pub const HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
];

/// Sent when the token expires, just before the stream ends. It has no `id:`, so the
/// client's `Last-Event-ID` stays on the last message.
const EXPIRED: &[u8] =
    b"event: expired\ndata: {\"type\":\"expired\",\"code\":\"token_expired\"}\n\n";

/// The last block of a stream whose catch-up the store could not serve (Redis is down): a
/// comment, which EventSource ignores; the stream then ends and the browser comes back with
/// its Last-Event-ID after `retry`.
const UNAVAILABLE: &[u8] = b": message store unavailable; come back with your cursor\n\n";

/// How SSE frames its stream: chunks on the raw socket, so the connection outlives it.
pub static FRAMING: Framing = Framing {
    headers: &HEADERS,
    raw: Format::SseChunked,
    body: Format::Sse,
    expired: EXPIRED,
    unavailable: UNAVAILABLE,
    answers_unavailable: true,
};

/// Checks the request, creates the stream's outlet and subscribes it from `Last-Event-ID`
/// (or `?after=`, or now). `head` (the raw path's response head) is written first, then the
/// `retry:` hint, then history and live events.
#[allow(clippy::too_many_arguments)]
pub async fn open(
    app: &AppState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
    headers: &dyn HeaderSource,
    socket: Option<Arc<TcpStream>>,
    format: Format,
    head: Option<Vec<u8>>,
) -> Result<Opened, Error> {
    let topic = super::topic(topic)?;
    access.check_subscribe(&topic)?;
    // A browser reconnecting sends the URL it first used plus the id it last saw: the
    // header is the newer of the two.
    let after = super::sse_cursor(headers, params)?;
    let hello = format!("retry: {}\n\n", app.transports.stream.sse_retry.as_millis());
    let expires = access.expires_at();
    body::open(
        app,
        &topic,
        after,
        socket,
        format,
        head,
        Some(hello.as_bytes()),
        expires,
    )
    .await
}

/// The stream through axum (HTTP/2, or a connection hyper serves).
pub async fn sse(
    State(app): State<AppState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params<'static>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let opened = open(
        &app,
        &access,
        &topic,
        &params,
        &headers,
        None,
        FRAMING.body,
        None,
    )
    .await;
    match opened {
        Ok(opened) => Ok(body::response(&FRAMING, opened)),
        Err(error) => {
            let retry = app.transports.stream.sse_retry;
            match body::unavailable(&FRAMING, FRAMING.body, &error, retry) {
                Some(body) => {
                    error.report(None);
                    Ok(body::unavailable_response(&FRAMING, body))
                }
                None => Err(error),
            }
        }
    }
}
