//! Durable Streams (ElectricSQL's open protocol for offset-addressed, append-only HTTP
//! streams), served under `--ds-path` (`/v1/stream`) on the same hub as the other
//! transports: a stream is a topic, an append is a message, and an offset is a place in
//! the topic's history, so what is appended here reaches every pushhub subscriber of the
//! topic and what is published there can be read here. docs/durable-streams.md has the
//! design; the protocol as its conformance suite checks it is in
//! docs/durable-streams-protocol.md.
//!
//! - [`offset`]: the opaque offsets and their validation;
//! - [`content`]: content types, JSON mode, JSON bodies flattened into values;
//! - [`meta`]: a stream's metadata (stored beside its history) and the rules that read it;
//! - [`streams`]: per-stream write locks, access times and wake-ups, retiring streams;
//! - [`read`]: reading a stream (stitched across forks), its encodings, catch-up, `HEAD`;
//! - [`live`]: `GET`, and the live reads: long poll and SSE;
//! - [`follow`]: a live SSE read following its stream through the fan-out; [`frames`]: its
//!   events, encoded once per append for every reader;
//! - `raw`: live reads on the raw socket, the call the gate hands over;
//! - [`write`](mod@write): create and fork, append and close, delete;
//! - [`sse`]: the protocol's SSE framing;
//! - [`error`]: what the protocol refuses.

pub mod content;
pub mod error;
pub mod follow;
pub mod frames;
pub mod live;
pub mod meta;
pub mod offset;
mod raw;
pub mod read;
pub mod sse;
pub mod streams;
pub mod write;

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{FromRef, Path, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::any,
};
use futures::StreamExt;

pub use error::DurableError;
pub use raw::serve;
pub use streams::Streams;

use std::borrow::Cow;

use super::Params;
use crate::{
    access::{Access, Auth, OriginPolicy},
    error::Error,
    message::TopicName,
    transport::TransportState,
};
use axum::http::header;
use std::sync::Arc;
use tower_http::cors::CorsLayer;

/// A refused body is read up to this many times the limit before the answer, so that the
/// client sees the `413` instead of a reset while it is still sending.
const DRAIN_FACTOR: usize = 4;

/// The routes of the protocol, under `path`, for a router whose state holds the transports'
/// and the token policy.
pub fn routes<S>(path: &str) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    TransportState: FromRef<S>,
    Arc<Auth>: FromRef<S>,
{
    Router::new().route(&format!("{path}/{{*name}}"), any(handle))
}

/// The CORS layer of the Durable Streams routes: the protocol's methods, request headers
/// (its writers' and readers' headers, `If-None-Match`) and the response headers a
/// browser client must see.
pub fn cors_layer(origins: &OriginPolicy) -> CorsLayer {
    const ALLOWED: [&str; 14] = [
        "content-type",
        "authorization",
        "if-none-match",
        "stream-seq",
        "stream-ttl",
        "stream-expires-at",
        "stream-closed",
        "producer-id",
        "producer-epoch",
        "producer-seq",
        "stream-forked-from",
        "stream-fork-offset",
        "stream-fork-sub-offset",
        "last-event-id",
    ];
    let names = |names: &[&'static str]| {
        names
            .iter()
            .map(|name| header::HeaderName::from_static(name))
            .collect::<Vec<_>>()
    };
    origins
        .cors_layer()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::HEAD,
            Method::OPTIONS,
        ])
        .allow_headers(names(&ALLOWED))
        .expose_headers(
            read::EXPOSED_HEADERS
                .split(',')
                .map(header::HeaderName::from_static)
                .collect::<Vec<_>>(),
        )
}

/// The value of query parameter `name`: `None` when absent, `400` when it is given more than
/// once (the protocol refuses `?offset=a&offset=b`).
pub fn single<'p>(
    params: &'p Params<'_>,
    name: &str,
) -> Result<Option<Cow<'p, str>>, DurableError> {
    if params.count(name) > 1 {
        return Err(DurableError::bad(format!("{name} is given more than once")));
    }
    Ok(params.get(name))
}

/// Reads a body up to `limit` bytes; a longer one is read on (up to a bound) and refused.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Error> {
    let mut data = body.into_data_stream();
    let mut buffer = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| Error::InvalidBody(e.to_string()))?;
        seen += chunk.len();
        if seen <= limit {
            buffer.extend_from_slice(&chunk);
        } else if seen > limit.saturating_mul(DRAIN_FACTOR) {
            break;
        }
    }
    if seen > limit {
        return Err(DurableError::TooLarge { limit }.into());
    }
    Ok(Bytes::from(buffer))
}

/// Serves one request to a stream, through the router.
async fn handle(
    State(app): State<TransportState>,
    access: Access,
    Path(name): Path<String>,
    params: Params<'static>,
    request: axum::extract::Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let answer = async {
        let topic = TopicName::parse(&name)?;
        let client = access.client_key(params.peer_ip());
        match method {
            Method::GET => {
                access.check_subscribe(&topic)?;
                live::get(&app, &topic, &params, &headers, client).await
            }
            Method::HEAD => {
                access.check_subscribe(&topic)?;
                read::head(&app, &topic).await
            }
            Method::PUT | Method::POST => {
                access.check_publish(&topic)?;
                app.publish_limiter.check(&client)?;
                let body = read_body(body, app.settings.durable.max_body).await?;
                if method == Method::PUT {
                    write::put(&app, &topic, &headers, body, location(&app, &headers, &uri)).await
                } else {
                    write::post(&app, &topic, &headers, body).await
                }
            }
            Method::DELETE => {
                access.check_publish(&topic)?;
                write::delete(&app, &topic).await
            }
            Method::OPTIONS => Ok(StatusCode::NO_CONTENT.into_response()),
            _ => Err(Error::MethodNotAllowed),
        }
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// The absolute URL of the stream a `PUT` created, as its client reached it.
fn location(app: &TransportState, headers: &HeaderMap, uri: &Uri) -> String {
    let durable = &app.settings.durable;
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map_or_else(|| durable.default_host.clone(), str::to_owned);
    let scheme = if durable.https { "https" } else { "http" };
    format!("{scheme}://{host}{}", uri.path())
}
