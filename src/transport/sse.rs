//! `GET /topics/{topic}/sse`: Server-Sent Events.
//!
//! The stream's outlet is fed by the fan-out; a slow reader is handled by the hub's policy
//! (it reads its backlog from history by cursor). On the raw socket ([`serve`]) events
//! are HTTP/1.1 chunks framed once per message; through hyper (HTTP/2, or a connection hyper
//! serves) the same outlet feeds a response body ([`super::body`]). The stream ends on
//! shutdown (after everything published before it is written), on token expiry (with an
//! `expired` event), or for a slow consumer under `--slow-consumer disconnect`; clients
//! reconnect with `Last-Event-ID`.

use axum::{
    extract::{Path, State},
    http::HeaderMap,
    response::Response,
};

use super::{
    Params, TransportState,
    body::{self, Follow, Framing, Opened, Wire},
    call::{Call, Next},
    io::Io,
    listed::{self, Start},
};
use crate::{
    access::{Access, HeaderSource},
    error::Error,
    hub::{Format, Native},
};

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
    too_many_topics: b"event: error\ndata: {\"type\":\"error\",\"code\":\"pattern_too_broad\"}\n\n",
    answers_unavailable: true,
};

/// An SSE stream on the raw socket: opened here, then run by the connection
/// ([`body::run`]).
pub async fn serve(call: Call<'_>, io: &mut Io) -> Next {
    let wire = body::raw_wire(Native::SseChunked, &FRAMING, &call, io);
    let head_len = wire.head.as_ref().map_or(0, Vec::len);
    let params = call.params();
    let opened = open(
        call.state,
        &call.access,
        call.topic(),
        &params,
        &call.head,
        wire,
    )
    .await;
    drop(params);
    body::opened(call, io, &FRAMING, head_len, opened).await
}

/// Checks the request, creates the stream's outlet on `wire` and subscribes it from
/// `Last-Event-ID` (or `?after=`, or now). The wire's head (the raw path's response head) is
/// written first, then the `retry:` hint, then history and live events.
pub async fn open(
    app: &TransportState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
    headers: &dyn HeaderSource,
    wire: Wire,
) -> Result<Opened, Error> {
    let hello = format!("retry: {}\n\n", app.settings.stream.sse_retry.as_millis());
    let hello = Some(hello.as_bytes());
    let expires = access.expires_at();
    let presenter = params.presenter(access)?;
    if listed::is_list(topic) {
        let (selection, start) = listed::check(app, access, topic, |limit| {
            Start::from_sse(headers, params, limit)
        })?;
        let follow = Follow::Listed(&selection, &start);
        return body::open(app, follow, wire, hello, (expires, presenter)).await;
    }
    let topic = super::topic(topic)?;
    access.check_subscribe(&topic)?;
    // A browser reconnecting sends the URL it first used plus the id it last saw: the
    // header is the newer of the two.
    let after = super::sse_cursor(headers, params)?;
    body::open(
        app,
        Follow::One(&topic, after),
        wire,
        hello,
        (expires, presenter),
    )
    .await
}

/// The stream through axum (HTTP/2, or a connection hyper serves).
pub async fn sse(
    State(app): State<TransportState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params<'static>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let wire = Wire::hyper(Native::Sse);
    let opened = open(&app, &access, &topic, &params, &headers, wire).await;
    match opened {
        Ok(opened) => Ok(body::response(&FRAMING, opened)),
        Err(error) => {
            let retry = app.settings.stream.sse_retry;
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
