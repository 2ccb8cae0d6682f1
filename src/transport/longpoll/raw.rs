//! A long poll on the raw socket: the call checks and parks it; the parked connection then
//! holds only a [`Park`] while it waits, watching its socket; the answer is written by the
//! fan-out ([`super::DirectAnswer`], plain TCP) or by the connection's task.

use std::sync::Arc;

use axum::http::StatusCode;

use super::{Answer, DirectAnswer, Parked, Prepared, prepare};
use crate::{
    error::Error,
    message::TransportKind,
    transport::{
        Then, TransportState, boxed,
        call::{Call, Next, finish, keep_alive},
        io::Io,
        poll,
        response::{self, Length, Meta},
    },
};

/// A long poll waiting: all a parked connection holds while it waits.
#[derive(Debug)]
pub struct Park {
    prepared: Prepared,
    meta: Meta,
    close: bool,
    /// Bytes of the next request, read already.
    rest: Vec<u8>,
}

/// Checks and admits a long poll, which then waits in a future of its own ([`run_park`]).
pub async fn serve(call: Call<'_>, io: &mut Io) -> Next {
    if crate::transport::listed::is_list(call.topic()) {
        return boxed(|| serve_listed(call, io)).await;
    }
    match prepare(call.state, &call.access, call.topic(), &call.params()) {
        Ok(prepared) => Next::Then(Box::new(Then::Park(Park {
            prepared,
            close: call.close,
            rest: call.head.into_rest(),
            meta: call.meta,
        }))),
        Err(error) => call.refuse(io, &error).await,
    }
}

/// A long poll of a topic list on the raw socket: it waits in the call, on every topic
/// (the fan-out wakes it; it reads and answers itself), watching its socket meanwhile: a
/// client that leaves ends the wait, and a pipelined request is kept for later.
async fn serve_listed(call: Call<'_>, io: &mut Io) -> Next {
    let params = call.params();
    let limit = call.state.settings.connection.max_pending_input;
    let mut rest = Vec::new();
    let gone = async {
        loop {
            match io.read_into(&mut rest, 512).await {
                Ok(0) | Err(_) => return,
                Ok(_) if rest.len() > limit => return,
                Ok(_) => {}
            }
        }
    };
    let answer =
        crate::transport::listed::longpoll(call.state, &call.access, call.topic(), &params, gone)
            .await;
    drop(params);
    let response = match &answer {
        Ok(Some(body)) => response::full(StatusCode::OK, &poll::HEADERS, &call.meta, body),
        Ok(None) => return Next::Close,
        Err(error) => response::error(error, &call.meta),
    };
    call.heads(
        response.len()
            - answer
                .as_ref()
                .map_or(0, |b| b.as_ref().map_or(0, Vec::len)),
    );
    let (stall, close) = (call.stall(), call.close);
    let mut pipelined = call.head.into_rest();
    pipelined.extend_from_slice(&rest);
    keep_alive(finish(io, response, close, stall).await, pipelined)
}

/// Waits for a long poll's answer and writes it (or lets the fan-out write it).
///
/// # Cancel safety
/// Cancelling it (the connection's task ends) drops the parked poll, which frees its place
/// and leaves the topic's followers; an answer the fan-out began is then never finished.
pub async fn run_park(state: &TransportState, park: Park, io: &mut Io) -> Next {
    let Park {
        prepared,
        meta,
        close,
        mut rest,
    } = park;
    // On plain TCP the fan-out may answer the poll itself, with this head.
    let direct = io.shared_socket().map(|socket| {
        let head = response::head(StatusCode::OK, &poll::HEADERS, &meta, Length::Deferred);
        DirectAnswer::new(state.clone(), socket, head)
    });
    if let Some(direct) = direct.as_ref().filter(|_| !rest.is_empty()) {
        direct.hold();
    }
    // The steps before and after the wait get futures of their own (`boxed`), so that what
    // a parked poll holds is this function's state alone.
    let answer = match boxed(|| prepared.park(state, direct.clone())).await {
        Ok(Parked::Now(answer)) => Ok(answer),
        Ok(Parked::Waiting(waiting)) => {
            // Parked: this function's state is all the poll holds while it waits (the reads
            // before and after it are other steps). It watches the connection: a client
            // that goes away ends the wait (and frees its place); a pipelined request is
            // kept for later. (Inline, not a function of its own: the arguments of a
            // nested future would cost this one its size class.)
            let limit = state.settings.connection.max_pending_input;
            let deadline = tokio::time::sleep(waiting.timeout());
            tokio::pin!(deadline);
            let stopping = state.shutdown.cancelled();
            tokio::pin!(stopping);
            loop {
                tokio::select! {
                    biased;
                    () = std::future::poll_fn(|cx| waiting.poll_news(cx)) => break,
                    () = &mut deadline => break,
                    () = &mut stopping => break,
                    read = io.read_into(&mut rest, 512) => match read {
                        Ok(0) | Err(_) => return Next::Close,
                        Ok(_) if rest.len() > limit => return Next::Close,
                        // A pipelined request: its bytes are read, so no further read would
                        // wake this task once the fan-out answered; the answer must wake it
                        // instead.
                        Ok(_) => {
                            if let Some(direct) = &direct {
                                direct.hold();
                            }
                        }
                    },
                }
            }
            boxed(|| waiting.finish(state)).await
        }
        Err(error) => Err(error),
    };
    // Answered: its place among the parked polls is free before the client sees the answer.
    if let Some(direct) = &direct {
        direct.release_place();
    }
    let answered = Answered {
        meta,
        close,
        rest,
        direct,
    };
    boxed(|| write_answer(state, io, answer, answered)).await
}

/// What writing a long poll's answer needs besides the answer.
struct Answered {
    meta: Meta,
    close: bool,
    /// Bytes of the next request, read already.
    rest: Vec<u8>,
    direct: Option<Arc<DirectAnswer>>,
}

/// Writes a long poll's answer (or what the fan-out left of it); what comes next.
async fn write_answer(
    state: &TransportState,
    io: &mut Io,
    answer: Result<Answer, Error>,
    answered: Answered,
) -> Next {
    let Answered {
        meta,
        close,
        rest,
        direct,
    } = answered;
    let stall = state.settings.connection.stall_timeout;
    let heads = |bytes| state.hub.record_heads(TransportKind::Longpoll, bytes);
    match answer {
        Ok(Answer::Body(body)) => {
            let response = response::full(StatusCode::OK, &poll::HEADERS, &meta, &body);
            heads(response.len() - body.len());
            keep_alive(finish(io, response, close, stall).await, rest)
        }
        Ok(Answer::Answered) => {
            // The fan-out wrote the answer (all of it, or what the socket took).
            let unwritten = direct.map(|d| d.take_rest()).unwrap_or_default();
            for part in unwritten {
                if io.write_all_within(&part, stall).await.is_err() {
                    return Next::Close;
                }
            }
            if close {
                Next::Close
            } else {
                Next::KeepAlive(rest)
            }
        }
        Err(error) => {
            let answer = response::error(&error, &meta);
            heads(answer.len());
            keep_alive(finish(io, answer, close, stall).await, rest)
        }
    }
}
