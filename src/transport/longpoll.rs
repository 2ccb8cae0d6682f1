//! `GET /topics/{topic}/longpoll`: the poll answer, held until there is something to say.

use axum::{
    extract::{Path, State},
    response::Response,
};

use super::{
    Params,
    poll::{PollRequest, batch_response},
};
use crate::{AppState, error::Error, hub::Transport};

/// Answers at once when messages after `after` exist; otherwise parks until one arrives,
/// `timeout` seconds pass (then `200` with an empty list) or the server shuts down.
pub async fn longpoll(
    State(app): State<AppState>,
    Path(topic): Path<String>,
    params: Params,
) -> Result<Response, Error> {
    let request = PollRequest::parse(&topic, &params, &app.config)?;
    let timeout = params.timeout(&app.config)?;
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
    Ok(batch_response(&app, Transport::Longpoll, &batch))
}
