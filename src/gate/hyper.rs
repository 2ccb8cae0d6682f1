//! The connections hyper serves: HTTP/2 (over TLS), and HTTP/1.1 connections whose request is
//! not one pushhub serves on the raw socket, with the bytes already read replayed in front.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo, http::Request};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::transport::io::{HyperIo, Io, Rewind, StallGuard};

/// The HTTP protocols a connection may speak with hyper: HTTP/1.1 on plain TCP (an
/// HTTP/2-capable connection state costs a few KiB more per idle connection, and browsers
/// use HTTP/2 only over TLS), HTTP/1.1 or HTTP/2 by ALPN over TLS.
#[derive(Debug)]
pub struct Protocols {
    stall_timeout: Duration,
    http1: http1::Builder,
    any: auto::Builder<TokioExecutor>,
}

impl Protocols {
    /// Builders with the gate's limits.
    pub fn new(config: &super::GateSettings) -> Self {
        let max_buf = config.max_header_bytes.max(8192);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .max_buf_size(max_buf);
        let mut any = auto::Builder::new(TokioExecutor::new());
        any.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .max_buf_size(max_buf);
        any.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
        Self {
            stall_timeout: config.stall_timeout,
            http1,
            any,
        }
    }

    /// Serves the rest of a connection with hyper: HTTP/1.1, or whatever ALPN chose when
    /// `negotiated` (TLS). `read` is what was read from it already.
    pub async fn serve(
        self: Arc<Self>,
        io: Io,
        read: Vec<u8>,
        negotiated: bool,
        peer: std::net::SocketAddr,
        router: Router,
        stop: CancellationToken,
    ) {
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request)
        });
        let io: HyperIo = TokioIo::new(StallGuard::new(Rewind::new(read, io), self.stall_timeout));
        let ended = if negotiated {
            let connection = self.any.serve_connection_with_upgrades(io, service);
            let connection = std::pin::pin!(connection);
            until_done(connection, &stop, |c| c.graceful_shutdown())
                .await
                .err()
                .map(|e| e.to_string())
        } else {
            let connection = self.http1.serve_connection(io, service).with_upgrades();
            let connection = std::pin::pin!(connection);
            until_done(connection, &stop, |c| c.graceful_shutdown())
                .await
                .err()
                .map(|e| e.to_string())
        };
        if let Some(error) = ended {
            tracing::debug!(%error, %peer, "connection ended with an error");
        }
    }
}

/// Drives a connection; once `stop` fires, asks it to finish its current request and close.
async fn until_done<C, E>(
    mut connection: Pin<&mut C>,
    stop: &CancellationToken,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::select! {
        ended = connection.as_mut() => return ended,
        () = stop.cancelled() => {}
    }
    graceful_shutdown(connection.as_mut());
    connection.await
}
