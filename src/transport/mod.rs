//! The push transports, thin adapters over the [`Hub`](crate::hub::Hub): five techniques
//! (short polling [`poll`], long polling [`longpoll`], Server-Sent Events [`sse`], WebSocket
//! [`ws`], HTTP streaming of NDJSON [`ndjson`]), plus the Durable Streams protocol on the same
//! topics ([`durable`]), and publishing ([`publish`]).
//!
//! Each endpoint is written once and served two ways: the hot reads (poll, long poll, SSE,
//! NDJSON, WebSocket, Durable Streams live reads) on the raw socket (plain HTTP/1.1, the fast
//! path), where the gate ([`crate::gate`]) admits a request and hands the transport one
//! [`call::Call`]; and every endpoint through axum (HTTP/2, connections hyper serves, and the
//! publishes and Durable Streams writes the router serves on the raw connection). What they share
//! lives here: the call contract ([`call`]); the transports' state ([`state`]: the hub, the
//! settings, the policies they apply per topic and per publish); the raw request head
//! ([`head`]) and raw answers ([`response`]); the query parameters (`after`, `limit`,
//! `timeout`, `event`, `client`), parsed strictly and rejected with the same error codes
//! everywhere, read through [`HeaderSource`] (defined in [`crate::access`]); the connection's
//! byte stream and the IO adapters ([`io`]: [`io::Io`], bytes replayed in front, what hyper
//! is given and taking it back); and the loop every streaming connection runs ([`stream`]).

pub mod body;
pub mod call;
pub mod durable;
pub mod head;
pub mod io;
pub mod listed;
pub mod longpoll;
pub mod ndjson;
pub mod poll;
pub mod publish;
pub mod response;
pub mod settings;
pub mod sse;
pub mod state;
pub mod stream;
pub mod ws;

pub use state::{TransportParts, TransportState, Transports};

use std::{borrow::Cow, net::SocketAddr, time::Duration};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::request::Parts,
};

use crate::{
    access::HeaderSource,
    error::Error,
    message::{MessageId, TopicName, TransportKind},
};
use settings::PollSettings;

use crate::hub::Presenter;

/// What a call started, to run once the request's future is gone: all such a connection
/// holds while it lasts.
#[derive(Debug)]
pub enum Then {
    /// A long poll waiting for its answer.
    Park(longpoll::Park),
    /// An SSE or NDJSON stream: events in one response body.
    Body(body::Running),
    /// A WebSocket session.
    Ws(ws::Running),
}

/// A boxed future of a connection's next step.
pub type Step<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = call::Next> + Send + 'a>>;

impl Then {
    /// Runs it on `io`: each kind in a future of its own size, boxed here (a future built in
    /// an async function and then boxed still takes its full size in the caller's state).
    pub fn run<'a>(self, state: &'a TransportState, io: &'a mut io::Io) -> Step<'a> {
        match self {
            Then::Park(park) => Box::pin(longpoll::run_park(state, park, io)),
            Then::Body(running) => Box::pin(body::run(state, running, io)),
            Then::Ws(running) => Box::pin(ws::run(state, running, io)),
        }
    }
}

/// Serves one call: the transport its endpoint names answers it, parks it or opens its
/// stream.
pub async fn serve(call: call::Call<'_>, io: &mut io::Io) -> call::Next {
    match call.transport {
        TransportKind::Poll => poll::serve(call, io).await,
        TransportKind::Longpoll => longpoll::serve(call, io).await,
        TransportKind::Sse => sse::serve(call, io).await,
        TransportKind::Stream => ndjson::serve(call, io).await,
        TransportKind::Ws => ws::serve(call, io).await,
        TransportKind::DsSse | TransportKind::DsLongpoll => durable::serve(call, io).await,
    }
}

/// Boxes the future `make` builds, building it inside this (non-async) function: a future
/// built in an async function and then boxed still takes its full size in the caller's
/// state (rustc keeps the moved-from temporary's storage), which every idle connection would
/// pay for. Used wherever a connection awaits something large it rarely needs (a request's
/// handling, a catch-up read, a client command).
pub(crate) fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::pin(make())
}

/// The query parameters of a request (the last value wins when one repeats), plus the peer
/// address, read by the typed getters below. The query is split once into the positions of
/// its names and values; a value is decoded (and allocated) only when it has escapes.
#[derive(Debug, Default, Clone)]
pub struct Params<'a> {
    query: Cow<'a, str>,
    peer: Option<SocketAddr>,
    pairs: smallvec::SmallVec<[QueryPair; 8]>,
}

/// Where one `name=value` pair sits in the query, and whether it has escapes.
#[derive(Debug, Clone, Copy)]
struct QueryPair {
    name: (u32, u32),
    value: (u32, u32),
    escaped: bool,
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

/// Where the `name=value` pairs of a query are, in one pass over its bytes: `&` ends a pair,
/// the first `=` ends its name.
fn split_query(bytes: &[u8]) -> smallvec::SmallVec<[QueryPair; 8]> {
    let mut pairs = smallvec::SmallVec::new();
    let (mut start, mut name_end, mut escaped) = (0, None, false);
    for (at, &byte) in bytes.iter().chain(std::iter::once(&b'&')).enumerate() {
        match byte {
            b'&' => {
                if at > start {
                    let name_end = name_end.unwrap_or(at);
                    pairs.push(QueryPair {
                        name: (start as u32, name_end as u32),
                        value: ((name_end + 1).min(at) as u32, at as u32),
                        escaped,
                    });
                }
                (start, name_end, escaped) = (at + 1, None, false);
            }
            b'=' if name_end.is_none() => name_end = Some(at),
            b'%' | b'+' => escaped = true,
            _ => {}
        }
    }
    pairs
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space, `%XX` a byte; invalid
/// UTF-8 becomes U+FFFD, as `form_urlencoded` does.
fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl<'a> Params<'a> {
    /// The parameters of `query` (without the `?`), from `peer`.
    pub fn new(query: Cow<'a, str>, peer: Option<SocketAddr>) -> Self {
        let pairs = split_query(query.as_bytes());
        Self { query, peer, pairs }
    }

    /// The peer's IP address, when known.
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        self.peer.map(|p| p.ip())
    }

    fn text(&self, (start, end): (u32, u32)) -> &str {
        &self.query[start as usize..end as usize]
    }

    /// The pairs whose decoded name is `name`, in query order.
    fn named<'s>(&'s self, name: &'s str) -> impl DoubleEndedIterator<Item = &'s QueryPair> {
        self.pairs.iter().filter(move |pair| {
            let key = self.text(pair.name);
            if pair.escaped {
                form_decode(key) == name
            } else {
                key == name
            }
        })
    }

    /// How many times parameter `name` is given.
    pub fn count(&self, name: &str) -> usize {
        self.named(name).count()
    }

    /// The last value of parameter `name`, decoded.
    pub fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        let text = |span| self.text(span);
        self.named(name).next_back().map(|pair| {
            let value = text(pair.value);
            if pair.escaped {
                Cow::Owned(form_decode(value))
            } else {
                Cow::Borrowed(value)
            }
        })
    }

    /// `after`: a message id, as plain decimal digits.
    pub fn after(&self) -> Result<Option<MessageId>, Error> {
        self.get("after")
            .map(|v| parse_cursor("after", v.as_bytes()))
            .transpose()
    }

    /// `limit`: 1 to the configured maximum; the configured default when absent.
    pub fn limit(&self, settings: &PollSettings) -> Result<usize, Error> {
        let Some(text) = self.get("limit") else {
            return Ok(settings.default_limit.min(settings.max_limit));
        };
        let limit = parse_decimal(&text)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| Error::param("limit", "must be a whole number"))?;
        if limit == 0 || limit > settings.max_limit {
            return Err(Error::param(
                "limit",
                format!("must be between 1 and {}", settings.max_limit),
            ));
        }
        Ok(limit)
    }

    /// `timeout`: seconds, with up to three decimals, at most the configured maximum.
    pub fn timeout(&self, settings: &PollSettings) -> Result<Duration, Error> {
        let Some(text) = self.get("timeout") else {
            return Ok(settings.default_timeout.min(settings.max_timeout));
        };
        let max = settings.max_timeout;
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

    /// Who the client says it is, for presence: its token's subject, else `client=` (without
    /// a token a client names itself), and whether it asked for its topics' `presence`
    /// envelopes (`presence=1`).
    pub fn presenter(&self, access: &crate::access::Access) -> Result<Presenter, Error> {
        let events = match self.get("presence").as_deref() {
            None | Some("0" | "false") => false,
            Some("1" | "true") => true,
            Some(_) => return Err(Error::param("presence", "must be 1 or 0")),
        };
        let (client, named) = self.poller(access)?;
        Ok(Presenter {
            client: named.then(|| client.as_ref().into()),
            events,
        })
    }

    /// Who is polling, and whether that is a name for presence: the token's subject or
    /// `client=` (named), else the peer's IP address (anonymous, counted by address).
    pub fn poller<'s>(
        &'s self,
        access: &'s crate::access::Access,
    ) -> Result<(Cow<'s, str>, bool), Error> {
        Ok(match (access.subject(), self.given_client()?) {
            (Some(subject), _) => (Cow::Borrowed(subject), true),
            (None, Some(id)) => (id, true),
            (None, None) => (self.peer_id(), false),
        })
    }

    /// The peer's IP address, which tells anonymous pollers apart.
    fn peer_id(&self) -> Cow<'static, str> {
        Cow::Owned(self.peer.map_or_else(String::new, |p| p.ip().to_string()))
    }

    /// `client=`, checked, if given.
    fn given_client(&self) -> Result<Option<Cow<'_, str>>, Error> {
        match self.get("client") {
            Some(id) if crate::message::valid_name(&id) => Ok(Some(id)),
            Some(_) => Err(Error::param(
                "client",
                "use 1-128 characters of A-Z a-z 0-9 . _ : -",
            )),
            None => Ok(None),
        }
    }
}

/// Parses a cursor value, wherever it comes from (a query parameter, the `Last-Event-ID`
/// header, a field of a WebSocket command): plain decimal digits that fit in 64 bits.
pub fn parse_cursor(name: &'static str, text: &[u8]) -> Result<MessageId, Error> {
    std::str::from_utf8(text)
        .ok()
        .and_then(parse_decimal)
        .ok_or_else(|| {
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
    // "5" is 500 ms, "05" 50, "005" 5.
    let millis = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0, |millis, digit| millis * 10 + u64::from(digit - b'0'));
    seconds
        .checked_mul(1000)?
        .checked_add(millis)
        .map(Duration::from_millis)
}

/// Validates the `{topic}` path segment.
pub fn topic(path: &str) -> Result<TopicName, Error> {
    Ok(TopicName::parse(path)?)
}

/// The `Last-Event-ID` header (the newer cursor of a reconnecting `EventSource`), else the
/// `after` parameter.
pub fn sse_cursor(headers: &dyn HeaderSource, params: &Params) -> Result<Option<MessageId>, Error> {
    match headers.header("last-event-id") {
        Some(value) => parse_cursor("Last-Event-ID", value).map(Some),
        None => params.after(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_plain_decimal() {
        assert_eq!(parse_cursor("after", b"0").unwrap(), 0);
        assert_eq!(
            parse_cursor("after", b"18446744073709551615").unwrap(),
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
            assert!(
                parse_cursor("after", bad.as_bytes()).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn query_parameters_decode_like_form_urlencoded_and_the_last_wins() {
        for query in [
            "after=3&limit=7&after=4",
            "a=%41%zz+b&after=%34&&x&client=c%2Fd",
            "after=&after",
            "token=a%2Bb%3D&after=1",
            "%61fter=5",
            "after=%E2%82%AC%FF",
        ] {
            let params = Params::new(Cow::Borrowed(query), None);
            let expected: std::collections::HashMap<String, String> =
                form_urlencoded::parse(query.as_bytes())
                    .into_owned()
                    .collect();
            for name in ["after", "limit", "a", "x", "client", "token", "missing"] {
                assert_eq!(
                    params.get(name).map(Cow::into_owned),
                    expected.get(name).cloned(),
                    "{name} in {query}"
                );
            }
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
