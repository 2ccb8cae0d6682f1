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
    error::Error,
    hub::{Batch, Signal},
};

/// Answers with the messages after `after` (none without `after`, just `last_id`).
pub async fn poll(
    State(app): State<AppState>,
    Path(topic): Path<String>,
    params: Params,
) -> Result<Response, Error> {
    let topic = super::topic(&topic)?;
    let after = params.after()?;
    let limit = params.limit(&app.config)?;
    let client = params.client()?;
    let batch = app.hub.poll(&topic, after, limit, &client).await?;
    Ok(batch_response(&batch))
}

/// Encodes a batch as `{"messages":[...],"last_id":M,"next_after":C,...}`.
///
/// Written by hand from the envelopes encoded at publish time, so an answer to many pollers
/// costs copies, not serializations.
pub fn batch_response(batch: &Batch) -> Response {
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
