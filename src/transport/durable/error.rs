//! What the Durable Streams protocol refuses, with the status and headers it specifies.
//! Each converts into the one HTTP error ([`Error::Protocol`]), answered like every other
//! refusal.

use axum::http::StatusCode;

use super::offset::Offset;
use crate::error::{Error, Refusal};

/// A request the protocol refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurableError {
    /// No stream at this path (or it expired).
    #[error("no such stream")]
    NotFound,
    /// The stream was deleted while forks still read its data.
    #[error("the stream was deleted; only its forks still read it")]
    Gone,
    /// A malformed header, parameter or body.
    #[error("{0}")]
    BadRequest(String),
    /// A create that does not match the existing stream's configuration, or a path that
    /// cannot be created now.
    #[error("{0}")]
    Conflict(&'static str),
    /// The stream is closed and takes no more appends.
    #[error("the stream is closed")]
    Closed {
        /// Its final offset.
        next: Offset,
    },
    /// A `Stream-Seq` not above the last one.
    #[error("Stream-Seq must be above the last one accepted")]
    SeqConflict,
    /// A producer epoch older than the stream's current one for that producer.
    #[error("producer epoch is stale: the current epoch is {current}")]
    StaleEpoch {
        /// The current epoch.
        current: u64,
    },
    /// A producer sequence number that skips ahead.
    #[error("producer sequence gap: expected {expected}, received {received}")]
    SeqGap {
        /// The next sequence number the stream accepts.
        expected: u64,
        /// The one sent.
        received: u64,
    },
    /// A body over `--ds-max-body`.
    #[error("body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

impl DurableError {
    /// The HTTP status the protocol answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            DurableError::NotFound => StatusCode::NOT_FOUND,
            DurableError::Gone => StatusCode::GONE,
            DurableError::BadRequest(_) => StatusCode::BAD_REQUEST,
            DurableError::Conflict(_)
            | DurableError::Closed { .. }
            | DurableError::SeqConflict
            | DurableError::SeqGap { .. } => StatusCode::CONFLICT,
            DurableError::StaleEpoch { .. } => StatusCode::FORBIDDEN,
            DurableError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The stable machine-readable code of the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            DurableError::NotFound => "stream_not_found",
            DurableError::Gone => "stream_gone",
            DurableError::BadRequest(_) => "invalid_request",
            DurableError::Conflict(_) => "stream_conflict",
            DurableError::Closed { .. } => "stream_closed",
            DurableError::SeqConflict => "sequence_conflict",
            DurableError::StaleEpoch { .. } => "stale_producer_epoch",
            DurableError::SeqGap { .. } => "producer_sequence_gap",
            DurableError::TooLarge { .. } => "payload_too_large",
        }
    }

    /// The protocol's headers on this refusal.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            DurableError::Closed { next } => vec![
                ("stream-closed", "true".into()),
                ("stream-next-offset", next.to_string()),
            ],
            DurableError::StaleEpoch { current } => {
                vec![("producer-epoch", current.to_string())]
            }
            DurableError::SeqGap { expected, received } => vec![
                ("producer-expected-seq", expected.to_string()),
                ("producer-received-seq", received.to_string()),
            ],
            _ => Vec::new(),
        }
    }

    /// Shorthand for a [`DurableError::BadRequest`].
    pub fn bad(reason: impl Into<String>) -> Self {
        DurableError::BadRequest(reason.into())
    }
}

impl From<DurableError> for Error {
    fn from(error: DurableError) -> Self {
        Error::Protocol(Box::new(Refusal {
            status: error.status(),
            code: error.code(),
            message: error.to_string(),
            headers: error.headers(),
        }))
    }
}
