//! Publishing: the one path every transport publishes through ([`publish_as`]: permission,
//! rate limit, event name, payload, append), and `POST /topics/{topic}` over HTTP. The
//! WebSocket `publish` command calls the same path and acknowledges with [`Published`].

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use std::{net::IpAddr, sync::Arc};

use super::Params;
use crate::{
    access::Access,
    error::Error,
    message::{EventName, Message, MessageId, Payload, TopicName},
    transport::{TransportState, Transports},
};

/// What a publisher is told: where its message landed.
#[derive(Debug, Serialize)]
pub struct Published<'a> {
    /// The id the message got.
    pub id: MessageId,
    /// Its topic.
    pub topic: &'a str,
    /// Its event name.
    pub event: &'a str,
    /// Its publish time, unix milliseconds.
    pub time: u64,
}

impl<'a> From<&'a Message> for Published<'a> {
    fn from(message: &'a Message) -> Self {
        Self {
            id: message.id,
            topic: message.topic.as_str(),
            event: message.event.as_str(),
            time: message.time,
        }
    }
}

/// Publishes for a client, as every transport does: the token must allow publishing on
/// `topic`, the client (its token's subject, else `peer`) must be within the publish rate,
/// `event` must be a valid name (`message` when absent), and `payload` must read; checked in
/// that order, so the same request is refused with the same error whatever carried it.
pub async fn publish_as(
    app: &Transports,
    access: &Access,
    peer: Option<IpAddr>,
    topic: &TopicName,
    event: Option<&str>,
    payload: impl FnOnce() -> Result<Payload, Error>,
) -> Result<Arc<Message>, Error> {
    access.check_publish(topic)?;
    app.publish_limiter.check(&access.client_key(peer))?;
    let event = match event {
        Some(name) => EventName::parse(name)?,
        None => EventName::default_event(),
    };
    let payload = payload()?;
    app.publish(topic, event, &payload).await
}

/// Publishes the body: JSON as is when sent as `application/json` (or `+json`), any other
/// body as a JSON string of its UTF-8 text.
pub async fn publish(
    State(app): State<TransportState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params<'static>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Error> {
    let topic = super::topic(&topic)?;
    let event = params.get("event");
    let payload = || {
        let body = body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::PayloadTooLarge {
                    limit: app.settings.publish.max_body,
                }
            } else {
                Error::InvalidBody(rejection.body_text())
            }
        })?;
        let text = std::str::from_utf8(&body).map_err(|_| Error::InvalidUtf8)?;
        Ok(if is_json(&headers) {
            Payload::from_json(text)?
        } else {
            Payload::from_text(text)
        })
    };
    let message = publish_as(
        &app,
        &access,
        params.peer_ip(),
        &topic,
        event.as_deref(),
        payload,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(Published::from(&*message))).into_response())
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}
