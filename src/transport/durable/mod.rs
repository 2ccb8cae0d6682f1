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
//! - [`read`]: catch-up, long-poll and SSE reads, `HEAD`;
//! - [`write`]: create and fork, append and close, delete;
//! - [`sse`]: the protocol's SSE framing;
//! - [`error`]: what the protocol refuses.

pub mod content;
pub mod error;
pub mod follow;
pub mod meta;
pub mod offset;
pub mod read;
pub mod sse;
pub mod streams;
pub mod write;

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::any,
};
use futures::StreamExt;

pub use error::DurableError;
pub use streams::Streams;

use std::borrow::Cow;

use super::Params;
use crate::{AppState, error::Error, gate::auth::Access, message::TopicName};

/// A refused body is read up to this many times the limit before the answer, so that the
/// client sees the `413` instead of a reset while it is still sending.
const DRAIN_FACTOR: usize = 4;

/// The routes of the protocol, under `path`.
pub fn routes(path: &str) -> Router<AppState> {
    Router::new().route(&format!("{path}/{{*name}}"), any(serve))
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

/// Serves one request to a stream.
#[allow(clippy::too_many_arguments)]
async fn serve(
    State(app): State<AppState>,
    access: Access,
    method: Method,
    uri: Uri,
    Path(name): Path<String>,
    params: Params<'static>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let answer = async {
        let topic = TopicName::parse(&name)?;
        let client = access.client_key(params.peer_ip());
        match method {
            Method::GET => {
                access.check_subscribe(&topic)?;
                read::get(&app, &topic, &params, &headers, client).await
            }
            Method::HEAD => {
                access.check_subscribe(&topic)?;
                read::head(&app, &topic).await
            }
            Method::PUT | Method::POST => {
                access.check_publish(&topic)?;
                app.publish_limiter.check(&client)?;
                let body = read_body(body, app.transports.durable.max_body).await?;
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
fn location(app: &AppState, headers: &HeaderMap, uri: &Uri) -> String {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map_or_else(|| app.config.listen.to_string(), str::to_owned);
    let scheme = if app.config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{host}{}", uri.path())
}
