//! `GET /topics/{topic}/poll`: short polling, answered at once. Also home of the batch
//! encoding that long polling shares.

use axum::{
    extract::{Path, State},
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};

use super::Params;
use crate::{
    AppState,
    auth::Access,
    config::Config,
    error::Error,
    hub::{Batch, Signal, Transport},
    message::{MessageId, TopicName},
};

/// The headers of a poll or long-poll answer (besides the per-request ones).
pub const HEADERS: [(&str, &str); 2] = [
    ("content-type", "application/json"),
    ("cache-control", "no-store"),
];

/// What short and long polls both ask: a topic, a cursor, a page size, and who asks.
#[derive(Debug)]
pub struct PollRequest {
    /// The topic read.
    pub topic: TopicName,
    /// The client's cursor, if it sent one.
    pub after: Option<MessageId>,
    /// Messages per answer at most.
    pub limit: usize,
    /// Who is polling, for subscriber counts.
    pub client: String,
}

impl PollRequest {
    /// Validates the path and the shared query parameters.
    pub fn parse(topic: &str, params: &Params, config: &Config) -> Result<Self, Error> {
        Ok(Self {
            topic: super::topic(topic)?,
            after: params.after()?,
            limit: params.limit(config)?,
            client: params.client()?.into_owned(),
        })
    }
}

/// Answers with the messages after `after` (none without `after`, just `last_id`).
pub async fn poll(
    State(app): State<AppState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params<'static>,
) -> Result<Response, Error> {
    Ok(json_response(answer(&app, &access, &topic, &params).await?))
}

/// The body of a short poll's answer, whichever server asked.
pub async fn answer(
    app: &AppState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
) -> Result<Vec<u8>, Error> {
    let request = PollRequest::parse(topic, params, &app.config)?;
    access.check_subscribe(&request.topic)?;
    let batch = app
        .hub
        .poll(
            &request.topic,
            request.after,
            request.limit,
            &request.client,
        )
        .await?;
    Ok(encode_batch(app, Transport::Poll, &batch))
}

/// A poll or long-poll body as an axum response.
pub fn json_response(body: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(HEADERS[0].1)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static(HEADERS[1].1),
            ),
        ],
        body,
    )
        .into_response()
}

/// Encodes a batch as `{"messages":[...],"last_id":M,"next_after":C,...}` and counts it.
///
/// Written by hand from the envelopes encoded at publish time, so an answer to many pollers
/// costs copies, not serializations.
pub fn encode_batch(app: &AppState, transport: Transport, batch: &Batch) -> Vec<u8> {
    let size = 96
        + batch
            .messages
            .iter()
            .map(|m| m.envelope().len() + 1)
            .sum::<usize>();
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(b"{\"messages\":[");
    for (i, message) in batch.messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(message.envelope());
    }
    let mut number = itoa::Buffer::new();
    body.extend_from_slice(b"],\"last_id\":");
    body.extend_from_slice(number.format(batch.last_id).as_bytes());
    body.extend_from_slice(b",\"next_after\":");
    body.extend_from_slice(number.format(batch.next_after()).as_bytes());
    if batch.more {
        body.extend_from_slice(b",\"more\":true");
    }
    match batch.signal {
        Some(Signal::Truncated { oldest_id }) => {
            body.extend_from_slice(b",\"truncated\":true,\"oldest_id\":");
            body.extend_from_slice(number.format(oldest_id).as_bytes());
        }
        Some(Signal::Reset { .. }) => body.extend_from_slice(b",\"reset\":true"),
        None => {}
    }
    body.push(b'}');
    app.hub.record_request(transport);
    if let (Transport::Longpoll, Some(first)) = (transport, batch.messages.first()) {
        crate::telemetry::delivery_lag(transport, first.time);
    }
    app.hub
        .record_delivery(transport, batch.messages.len() as u64, body.len() as u64);
    body
}
