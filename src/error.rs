//! The one error type of the HTTP surface, answered as `{"error": "...", "code": "..."}`.
//!
//! Client faults map to 4xx and are logged at debug level only; server faults map to 5xx, are
//! logged, and their details are not sent to the client.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::{hub::HubError, store::StoreError};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A topic name outside 1-128 characters of `[A-Za-z0-9._:-]`.
    #[error("invalid topic name {0:?}: use 1-128 characters of A-Z a-z 0-9 . _ : -")]
    InvalidTopic(String),
    /// An event name outside the same rule as topics.
    #[error("invalid event name {0:?}: use 1-128 characters of A-Z a-z 0-9 . _ : -")]
    InvalidEvent(String),
    /// A query parameter that is not what the endpoint accepts.
    #[error("invalid `{name}`: {reason}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// What was wrong, for a human.
        reason: String,
    },
    /// A body sent as `application/json` that is not JSON.
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    /// A body that is not UTF-8 text.
    #[error("body is not valid UTF-8")]
    InvalidUtf8,
    /// A WebSocket message that is not a well-formed command.
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// A WebSocket command type the server does not know.
    #[error("unknown message type {0:?}: use publish, subscribe, unsubscribe or ping")]
    UnknownType(String),
    /// A body that could not be read.
    #[error("could not read the request body: {0}")]
    InvalidBody(String),
    /// A body over the configured limit.
    #[error("body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A plain HTTP request to a WebSocket URL.
    #[error("this URL speaks WebSocket: send an Upgrade: websocket request")]
    UpgradeRequired,
    /// No such route.
    #[error("no such endpoint")]
    NotFound,
    /// The route exists but not with this method.
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// The server is stopping and takes no new work.
    #[error("server is shutting down")]
    ShuttingDown,
    /// No token was presented where one is needed.
    #[error("a bearer token is required: send Authorization: Bearer <token> or ?token=")]
    Unauthorized,
    /// The token is malformed, badly signed, or lacks `exp`.
    #[error("the token is not valid")]
    InvalidToken,
    /// The token's `exp` has passed.
    #[error("the token has expired")]
    TokenExpired,
    /// The token does not grant this action on this topic.
    #[error("the token does not allow this on this topic")]
    Forbidden,
    /// The token does not allow following one entry of a topic list (named).
    #[error("the token does not allow subscribing to {0}")]
    ForbiddenTopic(String),
    /// A topic list longer than `--max-subscriptions-per-connection`.
    #[error("{0}")]
    TooManyTopics(String),
    /// A topic list that is not one (an entry twice).
    #[error("{0}")]
    InvalidTopicList(String),
    /// A pattern of the list matches more topics than a connection may follow.
    #[error(
        "{pattern} matches {matched} topics; at most {limit} may be followed on one connection"
    )]
    PatternTooBroad {
        /// The pattern.
        pattern: String,
        /// Topics it matches, with the rest of the list.
        matched: usize,
        /// The most allowed.
        limit: usize,
    },
    /// A cursor string that is not one this server writes.
    #[error("{0}")]
    InvalidCursor(String),
    /// A cursor naming a topic outside the request's list.
    #[error("{0}")]
    CursorMismatch(String),
    /// A WebSocket `Origin` outside the allowlist (cross-site WebSocket hijacking).
    #[error("origin not allowed")]
    OriginNotAllowed,
    /// A per-client rate or count limit was hit.
    #[error("too many requests: {what}")]
    TooManyRequests {
        /// Which limit, for a human.
        what: &'static str,
        /// Seconds after which a retry may succeed.
        retry_after: u64,
    },
    /// A server-wide capacity limit was hit.
    #[error("server at capacity: {0}")]
    AtCapacity(&'static str),
    /// A multiplexed WebSocket asked for more topics than `--max-subscriptions-per-connection`.
    #[error("this connection already follows {limit} topics, the most allowed")]
    TooManySubscriptions {
        /// The limit.
        limit: usize,
    },
    /// The message store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A refusal a protocol defines with a status, code and headers of its own (Durable
    /// Streams: `transport::durable::DurableError` converts into it).
    #[error("{}", .0.message)]
    Protocol(Box<Refusal>),
}

/// A protocol's own refusal, as it is answered: the layer that speaks the protocol decides
/// status, code and headers, and this layer answers it like every other error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable machine-readable code.
    pub code: &'static str,
    /// The text shown to the client.
    pub message: String,
    /// Headers the answer carries.
    pub headers: Vec<(&'static str, String)>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: String,
    code: &'a str,
}

impl From<crate::message::Invalid> for Error {
    fn from(invalid: crate::message::Invalid) -> Self {
        use crate::message::Invalid;
        match invalid {
            Invalid::Topic(name) => Error::InvalidTopic(name),
            Invalid::Event(name) => Error::InvalidEvent(name),
            Invalid::Json(reason) => Error::InvalidJson(reason),
            Invalid::Utf8 => Error::InvalidUtf8,
        }
    }
}

impl From<crate::message::pattern::ListError> for Error {
    fn from(error: crate::message::pattern::ListError) -> Self {
        use crate::message::pattern::ListError;
        match error {
            ListError::Invalid(invalid) => invalid.into(),
            too_many @ ListError::TooMany { .. } => Error::TooManyTopics(too_many.to_string()),
            repeated @ ListError::Repeated(_) => Error::InvalidTopicList(repeated.to_string()),
        }
    }
}

impl From<HubError> for Error {
    fn from(error: HubError) -> Self {
        match error {
            HubError::Store(store) => Error::Store(store),
            too_many @ HubError::TooManyTopics { .. } => Error::TooManyTopics(too_many.to_string()),
            // The connection is ending: whatever is answered, nobody reads it.
            HubError::Ended => Error::ShuttingDown,
        }
    }
}

impl Error {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidTopic(_)
            | Error::InvalidEvent(_)
            | Error::InvalidParameter { .. }
            | Error::InvalidJson(_)
            | Error::InvalidUtf8
            | Error::InvalidBody(_)
            | Error::InvalidMessage(_)
            | Error::UnknownType(_)
            | Error::TooManyTopics(_)
            | Error::InvalidTopicList(_)
            | Error::PatternTooBroad { .. }
            | Error::InvalidCursor(_)
            | Error::CursorMismatch(_) => StatusCode::BAD_REQUEST,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::ShuttingDown | Error::AtCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Unauthorized | Error::InvalidToken | Error::TokenExpired => {
                StatusCode::UNAUTHORIZED
            }
            Error::Forbidden | Error::ForbiddenTopic(_) | Error::OriginNotAllowed => {
                StatusCode::FORBIDDEN
            }
            Error::TooManyRequests { .. } | Error::TooManySubscriptions { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Error::Store(StoreError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Store(StoreError::Internal(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Store(StoreError::Sealed) => StatusCode::CONFLICT,
            Error::Store(StoreError::Conflict) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Protocol(refusal) => refusal.status,
        }
    }

    /// The stable machine-readable code, also used in WebSocket `error` frames.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidTopic(_) => "invalid_topic",
            Error::InvalidEvent(_) => "invalid_event",
            Error::InvalidParameter { .. } => "invalid_parameter",
            Error::InvalidJson(_) => "invalid_json",
            Error::InvalidUtf8 => "invalid_utf8",
            Error::InvalidBody(_) => "invalid_body",
            Error::InvalidMessage(_) => "invalid_message",
            Error::UnknownType(_) => "unknown_type",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::UpgradeRequired => "upgrade_required",
            Error::NotFound => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::ShuttingDown => "shutting_down",
            Error::Unauthorized => "unauthorized",
            Error::InvalidToken => "invalid_token",
            Error::TokenExpired => "token_expired",
            Error::Forbidden | Error::ForbiddenTopic(_) => "forbidden",
            Error::TooManyTopics(_) => "too_many_topics",
            Error::InvalidTopicList(_) => "invalid_topic_list",
            Error::PatternTooBroad { .. } => "pattern_too_broad",
            Error::InvalidCursor(_) => "invalid_cursor",
            Error::CursorMismatch(_) => "cursor_mismatch",
            Error::OriginNotAllowed => "origin_not_allowed",
            Error::TooManyRequests { .. } => "rate_limited",
            Error::AtCapacity(_) => "at_capacity",
            Error::TooManySubscriptions { .. } => "too_many_subscriptions",
            Error::Store(StoreError::Unavailable(_)) => "store_unavailable",
            Error::Store(StoreError::Internal(_)) => "store_error",
            Error::Store(StoreError::Sealed) => "stream_closed",
            Error::Store(StoreError::Conflict) => "stream_contended",
            Error::Protocol(refusal) => refusal.code,
        }
    }

    /// The text shown to the client: server faults are not described.
    pub fn public_message(&self) -> String {
        if self.status().is_server_error()
            && !matches!(self, Error::ShuttingDown | Error::AtCapacity(_))
        {
            match self {
                Error::Store(StoreError::Unavailable(_)) => "message store unavailable".into(),
                _ => "internal error".into(),
            }
        } else {
            self.to_string()
        }
    }

    /// The store cannot serve the request yet (Redis is down): a retry will succeed once it is
    /// back, so streams tell their clients to come back rather than refuse them.
    pub fn is_store_unavailable(&self) -> bool {
        matches!(self, Error::Store(StoreError::Unavailable(_)))
    }

    /// Seconds for `Retry-After`: when a retry may succeed, for refusals that are temporary.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Error::TooManyRequests { retry_after, .. } => Some(*retry_after),
            _ if self.status() == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        }
    }

    /// The JSON body `{"error": "...", "code": "..."}`.
    pub fn body_json(&self) -> String {
        serde_json::to_string(&self.body()).expect("error bodies serialize")
    }

    fn body(&self) -> ErrorBody<'static> {
        ErrorBody {
            error: self.public_message(),
            code: self.code(),
        }
    }

    /// Shorthand for an [`Error::InvalidParameter`].
    pub fn param(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidParameter {
            name,
            reason: reason.into(),
        }
    }
}

impl Error {
    /// Counts the refusal by code and logs it: server faults as errors, client faults at
    /// debug level only. `request` is the request id, where the caller has no request span.
    pub fn report(&self, request: Option<&str>) {
        crate::telemetry::rejected(self.code());
        let failed = self.status().is_server_error() && matches!(self, Error::Store(_));
        match (request, failed) {
            (Some(id), true) => tracing::error!(error = %self, id, "request failed"),
            (Some(id), false) => tracing::debug!(error = %self, id, "request rejected"),
            (None, true) => tracing::error!(error = %self, "request failed"),
            (None, false) => tracing::debug!(error = %self, "request rejected"),
        }
    }

    /// Headers the answer carries besides its JSON body: `Upgrade` on 426, `Retry-After` on
    /// temporary refusals, `WWW-Authenticate` on 401.
    pub fn headers(&self) -> smallvec::SmallVec<[(&'static str, String); 2]> {
        let mut headers = smallvec::SmallVec::new();
        if let Error::Protocol(refusal) = self {
            headers.extend(refusal.headers.iter().cloned());
        }
        let status = self.status();
        if status == StatusCode::UPGRADE_REQUIRED {
            headers.push(("upgrade", "websocket".to_owned()));
        }
        if let Some(seconds) = self.retry_after() {
            headers.push(("retry-after", seconds.to_string()));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.push(("www-authenticate", "Bearer realm=\"pushhub\"".to_owned()));
        }
        headers
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.report(None);
        let mut response = (self.status(), Json(self.body())).into_response();
        for (name, value) in self.headers() {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response
                    .headers_mut()
                    .insert(header::HeaderName::from_static(name), value);
            }
        }
        response
    }
}
