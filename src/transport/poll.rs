//! `GET /topics/{topic}/poll`: short polling, answered at once. Also home of the batch
//! encoding that long polling shares.

use axum::{
    extract::{Path, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::{
    Params,
    call::{Call, Next},
    io::Io,
    response as raw,
    settings::PollSettings,
};
use crate::{
    access::Access,
    error::Error,
    hub::{Batch, PollQuery, Signal},
    message::{MessageId, TopicName, TransportKind},
    transport::TransportState,
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
    /// Who is polling, for subscriber counts: its presence name when it gave one.
    pub client: String,
    /// `client` is the name it gave for presence (`client=` or its token's subject).
    pub named: bool,
}

impl PollRequest {
    /// What it asks of the hub, through `transport`.
    pub fn query(&self, transport: TransportKind) -> PollQuery<'_> {
        PollQuery {
            topic: &self.topic,
            after: self.after,
            limit: self.limit,
            client: &self.client,
            name: self.named.then_some(self.client.as_str()),
            transport,
        }
    }

    /// Validates the path and the shared query parameters.
    pub fn parse(
        topic: &str,
        params: &Params,
        settings: &PollSettings,
        access: &Access,
    ) -> Result<Self, Error> {
        let (client, named) = params.poller(access)?;
        Ok(Self {
            topic: super::topic(topic)?,
            after: params.after()?,
            limit: params.limit(settings)?,
            named,
            client: client.into_owned(),
        })
    }
}

/// Answers with the messages after `after` (none without `after`, just `last_id`).
pub async fn poll(
    State(app): State<TransportState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params<'static>,
) -> Result<Response, Error> {
    Ok(json_response(answer(&app, &access, &topic, &params).await?))
}

/// A short poll on the raw socket: one whole answer, then the connection's next request.
pub async fn serve(call: Call<'_>, io: &mut Io) -> Next {
    let answer = answer(call.state, &call.access, call.topic(), &call.params()).await;
    let response = match &answer {
        Ok(body) => raw::full(StatusCode::OK, &HEADERS, &call.meta, body),
        Err(error) => raw::error(error, &call.meta),
    };
    call.heads(response.len() - answer.as_ref().map_or(0, Vec::len));
    call.answer(io, response).await
}

/// The body of a short poll's answer, whichever server asked.
pub async fn answer(
    app: &TransportState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
) -> Result<Vec<u8>, Error> {
    if super::listed::is_list(topic) {
        return super::listed::poll(app, access, topic, params).await;
    }
    let request = PollRequest::parse(topic, params, &app.settings.poll, access)?;
    access.check_subscribe(&request.topic)?;
    let batch = app
        .hub
        .poll(
            &request.topic,
            request.after,
            request.limit,
            &request.client,
            request.named.then_some(request.client.as_str()),
        )
        .await?;
    Ok(encode_batch(app, TransportKind::Poll, &batch))
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
pub fn encode_batch(app: &TransportState, transport: TransportKind, batch: &Batch) -> Vec<u8> {
    let body = encode_body(
        &batch.messages,
        batch.last_id,
        batch.next_after(),
        batch.more,
        batch.signal,
        0,
    );
    app.count_answer(transport, &batch.messages, body.len());
    body
}

/// The body of a poll answer, after `room` bytes left free at its start.
pub fn encode_body(
    messages: &[std::sync::Arc<crate::message::Message>],
    last_id: MessageId,
    next_after: MessageId,
    more: bool,
    signal: Option<Signal>,
    room: usize,
) -> Vec<u8> {
    let size = room
        + 96
        + messages
            .iter()
            .map(|m| m.envelope().len() + 1)
            .sum::<usize>();
    let mut body = Vec::with_capacity(size);
    body.resize(room, 0);
    body.extend_from_slice(b"{\"messages\":[");
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(message.envelope());
    }
    let mut number = itoa::Buffer::new();
    body.extend_from_slice(b"],\"last_id\":");
    body.extend_from_slice(number.format(last_id).as_bytes());
    body.extend_from_slice(b",\"next_after\":");
    body.extend_from_slice(number.format(next_after).as_bytes());
    if more {
        body.extend_from_slice(b",\"more\":true");
    }
    if let Some(signal) = signal {
        signal.poll_fields(&mut body);
    }
    body.push(b'}');
    body
}
