//! `GET /topics/{topic}/stream`: HTTP streaming, one JSON value per line
//! (`application/x-ndjson`), what `fetch()` with a `ReadableStream`, curl and any HTTP client
//! read line by line.
//!
//! Each message is its envelope on one line, the same bytes a WebSocket frame carries (shared
//! with it: no copy per subscriber). A cursor signal is a `{"type":"truncated"|"reset",...}`
//! line, a heartbeat a `{"type":"keepalive"}` line, and a stream whose token expires ends with
//! `{"type":"expired","code":"token_expired"}`. It resumes from `?after=` like every other
//! transport. On HTTP/1.1 the body is delimited by the connection's close (one write per
//! message, no chunk framing); through HTTP/2 it is the stream's DATA frames.

use axum::{
    extract::{Path, State},
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
    access::Access,
    error::Error,
    hub::{Format, Native},
};

/// The headers of a stream response (besides the per-request ones). `x-accel-buffering: no`
/// asks nginx not to buffer the stream.
pub const HEADERS: [(&str, &str); 3] = [
    ("content-type", "application/x-ndjson"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
];

/// The last line of a stream whose token expired.
const EXPIRED: &[u8] = b"{\"type\":\"expired\",\"code\":\"token_expired\"}\n";

/// The last line of a stream whose catch-up the store could not serve (Redis is down).
const UNAVAILABLE: &[u8] = b"{\"type\":\"unavailable\",\"code\":\"store_unavailable\"}\n";

/// How the stream frames itself: lines, in a body the connection's close ends on HTTP/1.1.
pub static FRAMING: Framing = Framing {
    headers: &HEADERS,
    raw: Format::Ndjson,
    body: Format::Ndjson,
    expired: EXPIRED,
    unavailable: UNAVAILABLE,
    too_many_topics: b"{\"type\":\"error\",\"code\":\"pattern_too_broad\"}\n",
    // A `fetch()` reader sees the status: `503` with `Retry-After` tells it to come back.
    answers_unavailable: false,
};

/// An NDJSON stream on the raw socket: opened here, then run by the connection
/// ([`body::run`]).
pub async fn serve(call: Call<'_>, io: &mut Io) -> Next {
    let wire = body::raw_wire(Native::Ndjson, &FRAMING, &call, io);
    let head_len = wire.head.as_ref().map_or(0, Vec::len);
    let params = call.params();
    let opened = open(call.state, &call.access, call.topic(), &params, wire).await;
    drop(params);
    body::opened(call, io, &FRAMING, head_len, opened).await
}

/// Checks the request, creates the stream's outlet on `wire` and subscribes it from
/// `?after=` (or now). The wire's head (the raw path's response head) is written first, then
/// history and live lines.
pub async fn open(
    app: &TransportState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
    wire: Wire,
) -> Result<Opened, Error> {
    let expires = access.expires_at();
    let presenter = params.presenter(access)?;
    if listed::is_list(topic) {
        let (selection, start) = listed::check(app, access, topic, |limit| {
            Start::from_params(params, limit)
        })?;
        let follow = Follow::Listed(&selection, &start);
        return body::open(app, follow, wire, None, (expires, presenter)).await;
    }
    let topic = super::topic(topic)?;
    access.check_subscribe(&topic)?;
    let after = params.after()?;
    body::open(
        app,
        Follow::One(&topic, after),
        wire,
        None,
        (expires, presenter),
    )
    .await
}

/// The stream through axum (HTTP/2, or a connection hyper serves).
pub async fn stream(
    State(app): State<TransportState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params<'static>,
) -> Result<Response, Error> {
    let opened = open(&app, &access, &topic, &params, Wire::hyper(Native::Ndjson)).await?;
    Ok(body::response(&FRAMING, opened))
}
