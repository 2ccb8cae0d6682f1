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
    let request = PollRequest::parse(topic, params, &app.config)?;
    access.check_subscribe(&request.topic)?;
    let timeout = params.timeout(&app.config)?;
    // Held for as long as the request is parked: bounds the parked long polls.
    let _place = app
        .parked_longpolls
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::AtCapacity("too many parked long polls"))?;
    let batch = app
        .hub
        .wait(
            &request.topic,
            request.after,
            request.limit,
            timeout,
            &request.client,
            &app.shutdown,
        )
        .await?;
    Ok(encode_batch(app, Transport::Longpoll, &batch))
}
