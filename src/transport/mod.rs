//! The four push transports, thin adapters over the [`Hub`](crate::hub::Hub).
//!
//! Each endpoint is written once and served two ways: on the raw socket by the gate (plain
//! HTTP/1.1, the fast path: [`crate::gate`]) and through axum (HTTP/2, and connections hyper
//! serves). What they share lives here: the query parameters (`after`, `limit`, `timeout`,
//! `event`, `client`), parsed strictly and rejected with the same error codes everywhere;
//! the request headers, whoever parsed them ([`HeaderSource`]); the connection's byte stream
//! ([`io::Io`]); and the loop every streaming connection runs ([`stream`]).

pub mod io;
pub mod longpoll;
pub mod poll;
pub mod publish;
pub mod sse;
pub mod stream;
pub mod ws;

use std::{borrow::Cow, net::SocketAddr, time::Duration};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{HeaderMap, request::Parts},
};

use crate::{
    config::Config,
    error::Error,
    message::{EventName, MessageId, TopicName},
};

/// Boxes the future `make` builds, building it inside this (non-async) function: a future
/// built in an async function and then boxed still takes its full size in the caller's
/// state (rustc keeps the moved-from temporary's storage), which every idle connection would
/// pay for. Used wherever a connection awaits something large it rarely needs (a request's
/// handling, a catch-up read, a client command).
pub(crate) fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::pin(make())
}

/// Request headers, whoever parsed them: hyper (`HeaderMap`) or the gate's own head parser.
pub trait HeaderSource: Sync {
    /// The value of the header `name` (lowercase), if present.
    fn header(&self, name: &str) -> Option<&[u8]>;
}

impl HeaderSource for HeaderMap {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }
}

/// The query parameters of a request (the last value wins when one repeats), plus the peer
/// address, read lazily by the typed getters below: nothing is allocated for a parameter
/// that is not asked for.
#[derive(Debug, Default, Clone)]
pub struct Params<'a> {
    query: Cow<'a, str>,
    peer: Option<SocketAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for Params<'static> {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| *addr);
        Ok(Params::new(
            Cow::Owned(parts.uri.query().unwrap_or_default().to_owned()),
            peer,
        ))
    }
}

impl<'a> Params<'a> {
    /// The parameters of `query` (without the `?`), from `peer`.
    pub fn new(query: Cow<'a, str>, peer: Option<SocketAddr>) -> Self {
        Self { query, peer }
    }

    /// The peer's IP address, when known.
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        self.peer.map(|p| p.ip())
    }

    /// The last value of parameter `name`, percent-decoded.
    pub fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        form_urlencoded::parse(self.query.as_bytes())
            .filter(|(key, _)| key == name)
            .last()
            .map(|(_, value)| value)
    }

    /// `after`: a message id, as plain decimal digits.
    pub fn after(&self) -> Result<Option<MessageId>, Error> {
        self.get("after")
            .map(|v| parse_cursor("after", &v))
            .transpose()
    }

    /// `limit`: 1 to the configured maximum; the configured default when absent.
    pub fn limit(&self, config: &Config) -> Result<usize, Error> {
        let Some(text) = self.get("limit") else {
            return Ok(config.poll_limit.min(config.max_poll_limit));
        };
        let limit = parse_decimal(&text)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| Error::param("limit", "must be a whole number"))?;
        if limit == 0 || limit > config.max_poll_limit {
            return Err(Error::param(
                "limit",
                format!("must be between 1 and {}", config.max_poll_limit),
            ));
        }
        Ok(limit)
    }

    /// `timeout`: seconds, with up to three decimals, at most the configured maximum.
    pub fn timeout(&self, config: &Config) -> Result<Duration, Error> {
        let Some(text) = self.get("timeout") else {
            return Ok(config.longpoll_timeout.min(config.longpoll_max_timeout));
        };
        let max = config.longpoll_max_timeout;
        let timeout = parse_seconds(&text).ok_or_else(|| {
            Error::param("timeout", "must be a number of seconds such as 25 or 0.5")
        })?;
        if timeout > max {
            return Err(Error::param(
                "timeout",
                format!("must be at most {} seconds", max.as_secs_f64()),
            ));
        }
        Ok(timeout)
    }

    /// `event`: an event name, `message` when absent.
    pub fn event(&self) -> Result<EventName, Error> {
        self.get("event")
            .map_or_else(|| Ok(EventName::default_event()), |e| EventName::parse(&e))
    }

    /// Who is polling, for subscriber counts: the `client` parameter when given (a client
    /// library sends a random id), else the peer's IP address.
    pub fn client(&self) -> Result<String, Error> {
        match self.get("client") {
            Some(id) => TopicName::parse(&id)
                .map(|id| id.to_string())
                .map_err(|_| Error::param("client", "use 1-128 characters of A-Z a-z 0-9 . _ : -")),
            None => Ok(self.peer.map_or_else(String::new, |p| p.ip().to_string())),
        }
    }
}

/// Parses a cursor value: plain decimal digits that fit in 64 bits.
pub fn parse_cursor(name: &'static str, text: &str) -> Result<MessageId, Error> {
    parse_decimal(text).ok_or_else(|| {
        Error::param(
            name,
            "must be a message id: a whole number from 0 to 18446744073709551615",
        )
    })
}

/// Plain decimal digits only: no sign, exponent, spaces or fraction.
fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `25`, `0.5`, `2.125`: seconds with at most millisecond precision.
fn parse_seconds(text: &str) -> Option<Duration> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if text.ends_with('.') || fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds = parse_decimal(whole)?;
    let millis = format!("{fraction:0<3}").parse::<u64>().ok()?;
    seconds
        .checked_mul(1000)?
        .checked_add(millis)
        .map(Duration::from_millis)
}

/// Validates the `{topic}` path segment.
pub fn topic(path: &str) -> Result<TopicName, Error> {
    TopicName::parse(path)
}

/// The `Last-Event-ID` header (the newer cursor of a reconnecting `EventSource`), else the
/// `after` parameter.
pub fn sse_cursor(headers: &dyn HeaderSource, params: &Params) -> Result<Option<MessageId>, Error> {
    match headers.header("last-event-id") {
        Some(value) => Ok(Some(parse_cursor(
            "Last-Event-ID",
            std::str::from_utf8(value)
                .map_err(|_| Error::param("Last-Event-ID", "must be ASCII digits"))?,
        )?)),
        None => params.after(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_plain_decimal() {
        assert_eq!(parse_cursor("after", "0").unwrap(), 0);
        assert_eq!(
            parse_cursor("after", "18446744073709551615").unwrap(),
            u64::MAX
        );
        for bad in [
            "",
            "-1",
            "abc",
            "1e99",
            "1.0",
            " 1",
            "+1",
            "18446744073709551616",
            "NaN",
        ] {
            assert!(parse_cursor("after", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn seconds_allow_millisecond_fractions() {
        assert_eq!(parse_seconds("25"), Some(Duration::from_secs(25)));
        assert_eq!(parse_seconds("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_seconds("1.25"), Some(Duration::from_millis(1250)));
        for bad in ["", "-1", "1e99", "abc", "1.", ".5", "1.2345", "inf", "NaN"] {
            assert_eq!(parse_seconds(bad), None, "{bad:?} accepted");
        }
    }
}
