//! Who the caller is and what it may do: the policies the gate applies when it admits a
//! request, and the verdict ([`Access`]) it hands the transport with the call.
//!
//! - [`token`]: JWT bearer tokens checked against topic patterns; [`Access`] is one caller's
//!   verdict, which a transport asks `check_publish` / `check_subscribe` per topic, and a
//!   long-lived stream keeps for its token's expiry.
//! - [`origin`]: which browser origins may call the API (CORS) and open WebSockets.
//! - [`rate`]: publishes per second per client, which transports apply per publish.
//!
//! These sit below the transports and the gate alike: the gate admits with them whatever the
//! listener (a TCP connection's request head today, a QUIC session's headers tomorrow), and a
//! transport checks per topic and per publish with what the gate handed it. They read request
//! headers through [`HeaderSource`], whoever parsed them.

pub mod origin;
pub mod rate;
pub mod token;

use axum::http::HeaderMap;

pub use origin::OriginPolicy;
pub use rate::RateLimiter;
pub use token::{Access, Auth, AuthConfigError, TopicPattern, unix_now};

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
