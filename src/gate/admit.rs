//! Admission of one request, whatever listener it came through: the token, verified once,
//! and the `Origin` of a WebSocket handshake. The raw path calls it with a request head; a
//! listener that is not TCP (WebTransport sessions arrive over QUIC) calls it with its own
//! headers. Connection limits are the accept loop's ([`super::limits`]); the topic
//! permission and the publish rate are the transport's, per topic and per publish.

use crate::{
    access::{Access, HeaderSource},
    error::Error,
    message::TransportKind,
    transport::TransportState,
};

/// A request asking to be admitted.
#[derive(Clone, Copy)]
pub struct Admission<'a> {
    /// The transport it asks for.
    pub transport: TransportKind,
    /// Its headers.
    pub headers: &'a dyn HeaderSource,
    /// Its query (a browser's `EventSource` and `WebSocket` send the token as `?token=`).
    pub query: &'a str,
}

/// Admits a request: the caller's [`Access`], or the refusal to answer (401 for a bad or
/// expired token, 403 for a WebSocket `Origin` outside `--allowed-origins`), checked in that
/// order, as the router's extractors check them.
pub fn admit(state: &TransportState, request: Admission<'_>) -> Result<Access, Error> {
    let access = Access::for_request(&state.auth, request.headers, request.query)?;
    if request.transport == TransportKind::Ws {
        state.origins.check_websocket(request.headers)?;
    }
    Ok(access)
}

impl std::fmt::Debug for Admission<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}
