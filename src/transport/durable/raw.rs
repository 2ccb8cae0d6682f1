//! Durable Streams live reads on the raw socket: a long poll's whole answer, or an SSE
//! stream written event by event through the hub's fan-out, with the protocol's security
//! headers on every answer. Other requests to streams go through the router.

use axum::http::StatusCode;

use super::{
    live::{self, Live},
    read::SECURITY_HEADERS,
};
use crate::{
    hub::Format,
    message::TopicName,
    transport::{
        body, boxed,
        call::{Call, Next},
        io::Io,
        response::{self, Length},
    },
};

/// Serves a live read (`live=long-poll` or `live=sse`) the gate routed here.
pub async fn serve(call: Call<'_>, io: &mut Io) -> Next {
    let topic = match TopicName::parse(call.topic()) {
        Ok(topic) => topic,
        Err(invalid) => return call.refuse(io, &invalid.into()).await,
    };
    if let Err(error) = call.access.check_subscribe(&topic) {
        return call.refuse(io, &error).await;
    }
    let params = call.params();
    let client = call.access.client_key(Some(call.peer.ip()));
    let live = boxed(|| live::live(call.state, &topic, &params, client)).await;
    drop(params);
    match live {
        Err(error) => call.refuse(io, &error).await,
        Ok(Live::Reply(reply)) => {
            let headers = with_security(&reply.headers);
            let answer = response::full(reply.status, &headers, &call.meta, &reply.body);
            drop(headers);
            call.heads(answer.len() - reply.body.len());
            call.answer(io, answer).await
        }
        Ok(Live::Sse { headers, start }) => {
            let head = response::head(
                StatusCode::OK,
                &with_security(&headers),
                &call.meta,
                Length::Chunked,
            );
            drop(headers);
            let head_len = head.len();
            let wire = body::Wire {
                socket: io.shared_socket(),
                format: Format::DsSseChunked,
                head: Some(head),
            };
            // Boxed: a parked long poll, served by this same function, holds its state
            // while it waits; opening a stream's state is needed only while it runs.
            let opened = boxed(|| start.open(wire)).await;
            body::opened(call, io, &super::sse::FRAMING, head_len, opened).await
        }
    }
}

/// The protocol's headers of an answer, then its security headers.
fn with_security<'a>(headers: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    let mut all: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    all.extend_from_slice(&SECURITY_HEADERS);
    all
}
