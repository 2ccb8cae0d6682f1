//! `GET /topics/{topic}/longpoll`: the poll answer, held until there is something to say.

use axum::{
    extract::{Path, State},
    response::Response,
};

use super::{
    Params,
    poll::{PollRequest, encode_batch, json_response},
};
use crate::{AppState, auth::Access, error::Error, hub::Transport};

/// Answers at once when messages after `after` exist; otherwise parks until one arrives,
/// `timeout` seconds pass (then `200` with an empty list) or the server shuts down.
pub async fn longpoll(
    State(app): State<AppState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params<'static>,
) -> Result<Response, Error> {
    Ok(json_response(answer(&app, &access, &topic, &params).await?))
}

/// The body of a long poll's answer, whichever server asked.
pub async fn answer(
    app: &AppState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
) -> Result<Vec<u8>, Error> {
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
    app: &AppState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
) -> Result<Prepared, Error> {
    let request = PollRequest::parse(topic, params, &app.config)?;
    access.check_subscribe(&request.topic)?;
    let timeout = params.timeout(&app.config)?;
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
    pub async fn answer(self, app: &AppState) -> Result<Vec<u8>, Error> {
        let request = &self.request;
        let batch = app
            .hub
            .wait(
                &request.topic,
                request.after,
                request.limit,
                self.timeout,
                &request.client,
                &app.shutdown,
            )
            .await?;
        Ok(encode_batch(app, Transport::Longpoll, &batch))
    }
}
