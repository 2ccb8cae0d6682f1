//! The four push transports, thin adapters over the [`Hub`](crate::hub::Hub).
//!
//! Each file turns hub answers into one wire format; what they share lives here: the query
//! parameters (`after`, `limit`, `timeout`, `event`, `client`), parsed strictly and rejected
//! with the same error codes everywhere.

pub mod longpoll;
pub mod poll;
pub mod publish;
pub mod sse;
pub mod ws;

use std::{collections::HashMap, future::Future, net::SocketAddr, time::Duration};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::request::Parts,
};

use crate::{
    config::Config,
    error::Error,
    message::{EventName, MessageId, TopicName},
};

/// The raw query parameters of a request (the last value wins when one repeats), plus the
/// peer address, read lazily by the typed getters below.
#[derive(Debug, Default)]
pub struct Params {
    values: HashMap<String, String>,
    peer: Option<SocketAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let values = parts
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| *addr);
        Ok(Self { values, peer })
    }
}

impl Params {
    /// The peer's IP address, when known.
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        self.peer.map(|p| p.ip())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// `after`: a message id, as plain decimal digits.
    pub fn after(&self) -> Result<Option<MessageId>, Error> {
        self.get("after")
            .map(|v| parse_cursor("after", v))
            .transpose()
    }

    /// `limit`: 1 to the configured maximum; the configured default when absent.
    pub fn limit(&self, config: &Config) -> Result<usize, Error> {
        let Some(text) = self.get("limit") else {
            return Ok(config.poll_limit.min(config.max_poll_limit));
        };
        let limit = parse_decimal(text)
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
        let timeout = parse_seconds(text).ok_or_else(|| {
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
            .map_or_else(|| Ok(EventName::default_event()), EventName::parse)
    }

    /// Who is polling, for subscriber counts: the `client` parameter when given (a client
    /// library sends a random id), else the peer's IP address.
    pub fn client(&self) -> Result<String, Error> {
        match self.get("client") {
            Some(id) => TopicName::parse(id)
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

/// Completes at `deadline` (a token's expiry), never without one.
pub(crate) async fn expiry(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Deliveries written to a streaming subscriber at once, before one flush.
const WRITE_BATCH: usize = 64;

/// Gathers the deliveries that are ready together into one socket write.
///
/// The SSE and WebSocket writers open a window when a delivery arrives and take more while
/// it lasts: with no delay (the default) only those already waiting, with `--write-delay`
/// also those that arrive before it ends. Each write costs a system call and, on the
/// receiving side, a wake-up, whatever its size; gathering is what makes delivery cheaper
/// at high rates.
#[derive(Debug)]
pub(crate) struct WriteWindow {
    deadline: Option<tokio::time::Instant>,
    taken: usize,
}

impl WriteWindow {
    /// Opens a window for a write whose first delivery is already in hand.
    pub(crate) fn open(delay: Duration) -> Self {
        Self {
            deadline: (!delay.is_zero()).then(|| tokio::time::Instant::now() + delay),
            taken: 1,
        }
    }

    /// The next delivery for the same write, or `None` once the window is closed or full.
    /// `next` must be cancel-safe: it is dropped when the window ends first.
    pub(crate) async fn next<T>(&mut self, next: impl Future<Output = Option<T>>) -> Option<T> {
        use futures::FutureExt;
        if self.taken >= WRITE_BATCH {
            return None;
        }
        let item = match self.deadline {
            None => next.now_or_never().flatten(),
            Some(deadline) => tokio::time::timeout_at(deadline, next).await.ok().flatten(),
        };
        self.taken += usize::from(item.is_some());
        item
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

    #[tokio::test(start_paused = true)]
    async fn write_window_takes_what_is_ready_or_arrives_in_time() {
        use tokio::time::{Instant, sleep};
        let ready = || async { Some(1) };
        let never = || futures::future::pending::<Option<i32>>();

        let mut window = WriteWindow::open(Duration::ZERO);
        assert_eq!(window.next(ready()).await, Some(1));
        assert_eq!(
            window.next(never()).await,
            None,
            "no delay: only what is ready"
        );

        let mut window = WriteWindow::open(Duration::from_millis(10));
        let opened = Instant::now();
        let late = || async {
            sleep(Duration::from_millis(4)).await;
            Some(2)
        };
        assert_eq!(window.next(late()).await, Some(2));
        assert_eq!(window.next(late()).await, Some(2));
        assert_eq!(window.next(late()).await, None, "arrives after the window");
        assert_eq!(opened.elapsed(), Duration::from_millis(10));

        let mut window = WriteWindow::open(Duration::from_secs(1));
        let mut taken = 0;
        while window.next(async { Some(()) }).await.is_some() {
            taken += 1;
        }
        assert_eq!(taken, WRITE_BATCH - 1, "the first is already in hand");
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
