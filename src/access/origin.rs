//! Which browser origins may use the API: CORS for HTTP, and the `Origin` check of WebSocket
//! handshakes (browsers do not apply CORS to WebSocket, so without this check any site a
//! user visits could open a WebSocket to the gateway with the user's cookies or network
//! position: cross-site WebSocket hijacking).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{FromRef, FromRequestParts},
    http::{HeaderValue, Method, header, request::Parts},
};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::HeaderSource;
use crate::error::Error;

/// The origin allowlist of `--allowed-origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPolicy {
    /// Any origin (`*`, or the default while listening on loopback: the local demo).
    Any,
    /// These origins, plus pages served by the gateway itself.
    List(Vec<String>),
}

impl OriginPolicy {
    /// The policy of `--allowed-origins` for a server listening on `listen`.
    pub fn new(allowed: &[String], listen: SocketAddr) -> Self {
        let allowed: Vec<String> = allowed
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        if allowed.iter().any(|o| o == "*") || (allowed.is_empty() && listen.ip().is_loopback()) {
            OriginPolicy::Any
        } else {
            OriginPolicy::List(allowed)
        }
    }

    fn allows(&self, origin: &str) -> bool {
        match self {
            OriginPolicy::Any => true,
            OriginPolicy::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }

    /// Checks a WebSocket handshake: no `Origin` (not a browser), the gateway's own pages
    /// (`Origin` host equals `Host`), or an allowed origin.
    pub fn check_websocket(&self, headers: &dyn HeaderSource) -> Result<(), Error> {
        let Some(origin) = headers.header("origin") else {
            return Ok(());
        };
        let origin = std::str::from_utf8(origin).map_err(|_| Error::OriginNotAllowed)?;
        let same_origin = headers
            .header("host")
            .and_then(|h| std::str::from_utf8(h).ok())
            .is_some_and(|host| {
                origin
                    .split_once("://")
                    .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host))
            });
        if same_origin || self.allows(origin) {
            Ok(())
        } else {
            Err(Error::OriginNotAllowed)
        }
    }

    /// The CORS answer to a simple request's `Origin`, as [`OriginPolicy::cors_layer`]
    /// gives it: the `Access-Control-Allow-Origin` value (`*` for any, the origin itself when
    /// listed, none otherwise) and whether the response varies with `Origin` (a list does).
    pub fn cors<'a>(&self, origin: Option<&'a [u8]>) -> (Option<&'a [u8]>, bool) {
        match self {
            OriginPolicy::Any => (Some(b"*"), false),
            OriginPolicy::List(list) => (
                origin.filter(|o| list.iter().any(|allowed| allowed.as_bytes() == *o)),
                true,
            ),
        }
    }

    /// The CORS layer: preflights and `Access-Control-Allow-Origin` for allowed origins only.
    pub fn cors_layer(&self) -> CorsLayer {
        let allow_origin = match self {
            OriginPolicy::Any => AllowOrigin::any(),
            OriginPolicy::List(list) => AllowOrigin::list(
                list.iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok())
                    .collect::<Vec<_>>(),
            ),
        };
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("last-event-id"),
            ])
            .max_age(std::time::Duration::from_secs(3600))
    }
}

/// An extractor for WebSocket handshakes hyper serves: passes when the request's `Origin` is
/// allowed ([`OriginPolicy::check_websocket`]), else refuses with 403 `origin_not_allowed`.
/// The raw path's gate makes the same check before it hands the call over.
#[derive(Debug, Clone, Copy)]
pub struct WebSocketOrigin;

impl<S: Send + Sync> FromRequestParts<S> for WebSocketOrigin
where
    Arc<OriginPolicy>: FromRef<S>,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        Arc::<OriginPolicy>::from_ref(state).check_websocket(&parts.headers)?;
        Ok(WebSocketOrigin)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;

    use super::*;

    fn headers(origin: &str, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ORIGIN, origin.parse().unwrap());
        headers.insert(header::HOST, host.parse().unwrap());
        headers
    }

    #[test]
    fn loopback_is_open_and_public_addresses_need_a_list() {
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(OriginPolicy::new(&[], loopback), OriginPolicy::Any);
        assert_eq!(OriginPolicy::new(&[], public), OriginPolicy::List(vec![]));
        assert_eq!(OriginPolicy::new(&["*".into()], public), OriginPolicy::Any);
    }

    #[test]
    fn websocket_origins_are_checked_against_the_list_and_the_host() {
        let policy = OriginPolicy::new(
            &["https://app.example.com/".into()],
            "0.0.0.0:443".parse().unwrap(),
        );
        assert!(
            policy
                .check_websocket(&headers("https://app.example.com", "push.example.com"))
                .is_ok()
        );
        assert!(
            policy
                .check_websocket(&headers("https://push.example.com", "push.example.com"))
                .is_ok(),
            "the gateway's own demo page"
        );
        assert!(matches!(
            policy.check_websocket(&headers("https://evil.example", "push.example.com")),
            Err(Error::OriginNotAllowed)
        ));
        assert!(
            policy.check_websocket(&HeaderMap::new()).is_ok(),
            "not a browser"
        );
    }
}
