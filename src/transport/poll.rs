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

/// What short and long polls both ask: a topic, a cursor, a page size, and who asks.
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
            client: params.client()?,
        })
    }
}

/// Answers with the messages after `after` (none without `after`, just `last_id`).
pub async fn poll(
    State(app): State<AppState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params,
) -> Result<Response, Error> {
    let request = PollRequest::parse(&topic, &params, &app.config)?;
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
    Ok(batch_response(&app, Transport::Poll, &batch))
}

/// Encodes a batch as `{"messages":[...],"last_id":M,"next_after":C,...}` and counts it.
///
/// Written by hand from the envelopes encoded at publish time, so an answer to many pollers
/// costs copies, not serializations.
pub fn batch_response(app: &AppState, transport: Transport, batch: &Batch) -> Response {
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
    body.extend_from_slice(
        format!(
            "],\"last_id\":{},\"next_after\":{}",
            batch.last_id,
            batch.next_after()
        )
        .as_bytes(),
    );
    if batch.more {
        body.extend_from_slice(b",\"more\":true");
    }
    match batch.signal {
        Some(Signal::Truncated { oldest_id }) => {
            body.extend_from_slice(
                format!(",\"truncated\":true,\"oldest_id\":{oldest_id}").as_bytes(),
            );
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
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}
