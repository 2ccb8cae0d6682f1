//! `GET /topics/{topic}/longpoll`: the poll answer, held until there is something to say.
//!
//! - here: checking and admitting a long poll ([`prepare`]), parking it in the hub and
//!   reading its answer ([`Prepared`], [`Waiting`]), and the handler hyper serves;
//! - `raw`: the raw socket's call: the parked connection's wait, and writing its answer;
//! - `direct`: the answer the fan-out writes itself on a plain TCP socket.

mod direct;
mod raw;

pub use direct::DirectAnswer;
pub use raw::{Park, run_park, serve};

use std::sync::Arc;

use super::{
    Params,
    poll::{PollRequest, encode_batch, json_response},
};
use crate::{
    access::Access,
    error::Error,
    hub::{ParkedPoll, Parking, Respond, Waited},
    message::TransportKind,
    transport::TransportState,
};
use axum::{
    extract::{Path, State},
    response::Response,
};

/// Answers at once when messages after `after` exist; otherwise parks until one arrives,
/// `timeout` seconds pass (then `200` with an empty list) or the server shuts down.
pub async fn longpoll(
    State(app): State<TransportState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params<'static>,
) -> Result<Response, Error> {
    Ok(json_response(answer(&app, &access, &topic, &params).await?))
}

/// The body of a long poll's answer, whichever server asked.
pub async fn answer(
    app: &TransportState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
) -> Result<Vec<u8>, Error> {
    if super::listed::is_list(topic) {
        // Through hyper a client that leaves drops the whole request.
        let answered = super::listed::longpoll(app, access, topic, params, std::future::pending());
        return Ok(answered.await?.unwrap_or_default());
    }
    prepare(app, access, topic, params)?.answer(app).await
}

/// A long poll checked and admitted, ready to wait: all a parked long poll holds besides
/// its place in the topic's followers (the request it came from is gone by then).
#[derive(Debug)]
pub struct Prepared {
    request: PollRequest,
    timeout: std::time::Duration,
    /// Held for as long as the request is parked: bounds the parked long polls.
    _place: tokio::sync::OwnedSemaphorePermit,
}

/// Checks a long poll's topic, permission and parameters, and takes a place for it.
pub fn prepare(
    app: &TransportState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
) -> Result<Prepared, Error> {
    let request = PollRequest::parse(topic, params, &app.settings.poll, access)?;
    access.check_subscribe(&request.topic)?;
    let timeout = params.timeout(&app.settings.poll)?;
    let place = app
        .parked_longpolls
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::AtCapacity("too many parked long polls"))?;
    Ok(Prepared {
        request,
        timeout,
        _place: place,
    })
}

impl Prepared {
    /// Waits as long as the long poll asks (answering at once when there is news), and
    /// returns the answer's body.
    pub async fn answer(self, app: &TransportState) -> Result<Vec<u8>, Error> {
        let request = &self.request;
        let waited = app
            .hub
            .wait_or_answer(
                request.query(TransportKind::Longpoll),
                self.timeout,
                &app.shutdown,
                None,
            )
            .await?;
        match waited {
            Waited::Batch(batch) => Ok(encode_batch(app, TransportKind::Longpoll, &batch)),
            Waited::Answered => unreachable!("no responder was given"),
        }
    }

    /// The first step of a long poll served on its own connection: answered at once, or
    /// parked ([`Waiting`]), letting the fan-out answer through `direct` when messages come.
    pub async fn park(
        self,
        app: &TransportState,
        direct: Option<Arc<DirectAnswer>>,
    ) -> Result<Parked, Error> {
        let Prepared {
            request,
            timeout,
            _place: place,
        } = self;
        // With a responder the place goes with it, to be freed as soon as either answers.
        let place = match &direct {
            Some(direct) => {
                direct.keep_place(place);
                None
            }
            None => Some(place),
        };
        let parking = app
            .hub
            .park(
                request.query(TransportKind::Longpoll),
                direct.map(|d| d as Arc<dyn Respond>),
            )
            .await?;
        Ok(match parking {
            Parking::Ready(batch) => Parked::Now(Answer::Body(encode_batch(
                app,
                TransportKind::Longpoll,
                &batch,
            ))),
            Parking::Answered => Parked::Now(Answer::Answered),
            Parking::Parked(parked) => Parked::Waiting(Waiting {
                parked,
                client: request.client,
                timeout,
                _place: place,
            }),
        })
    }
}

/// Where a long poll stands after [`Prepared::park`].
#[derive(Debug)]
pub enum Parked {
    /// Answered already, or to be answered now.
    Now(Answer),
    /// Parked: wait for [`Waiting::poll_news`] or [`Waiting::timeout`], then
    /// [`Waiting::finish`].
    Waiting(Waiting),
}

/// A parked long poll: all it holds while it waits.
#[derive(Debug)]
pub struct Waiting {
    parked: ParkedPoll,
    client: String,
    timeout: std::time::Duration,
    _place: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Waiting {
    /// How long the poll waits for news.
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    /// Ready once a message newer than the poll's cursor was published.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`crate::hub::ParkedPoll::poll_news`].
    pub fn poll_news(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.parked.poll_news(cx)
    }

    /// The answer, once woken, timed out or stopping.
    pub async fn finish(self, app: &TransportState) -> Result<Answer, Error> {
        let Waiting { parked, client, .. } = self;
        Ok(match app.hub.unpark(parked, &client).await? {
            Waited::Batch(batch) => {
                Answer::Body(encode_batch(app, TransportKind::Longpoll, &batch))
            }
            Waited::Answered => Answer::Answered,
        })
    }
}

/// How a long poll was answered.
#[derive(Debug)]
pub enum Answer {
    /// With this body, still to be sent.
    Body(Vec<u8>),
    /// By its [`DirectAnswer`], from the fan-out.
    Answered,
}
