//! Accepting connections: capacity limits, request-head limits, TLS, graceful shutdown.
//!
//! pushhub runs its own accept loop over hyper (as axum's `serve-with-hyper` example does)
//! rather than `axum::serve`, because a gateway on the public internet needs what that
//! helper does not expose: a bound on open connections in total and per client IP, answered
//! with a JSON 503/429 before any work is done; a deadline for the request head (slow-header
//! attacks) and a bound on its size; and TLS on the same loop.

use std::{future::Future, io, net::SocketAddr, path::Path, pin::Pin, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo, http::Request};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{AppState, error::Error, limits::ConnectionPermit};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// The auth settings are unusable.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthConfigError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Listening failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Loads `--tls-cert` and `--tls-key` (PEM) into a rustls acceptor.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, StartError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| StartError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| StartError::Tls(format!("{}: {e}", key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StartError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| StartError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `router` on `listener` until `stop` fires, then lets open connections finish
/// (long-lived ones end themselves on the same signal) for at most `grace`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    router: Router,
    state: &AppState,
    tls: Option<TlsAcceptor>,
    stop: impl Future<Output = ()>,
) {
    let config = &state.config;
    let limits = state.connections.clone();
    let builder = Arc::new(Protocols::new(config));
    let connections = TaskTracker::new();
    let stopped = state.shutdown.clone();
    let handshake_timeout = config.header_timeout;
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before accept: keep
                    // serving the connections already open.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let admitted = limits.admit(peer.ip());
        let (builder, router, tls) = (builder.clone(), router.clone(), tls.clone());
        let watcher = stopped.clone();
        connections.spawn(async move {
            let Some(tls) = tls else {
                builder
                    .serve_or_refuse(stream, false, peer, router, watcher, admitted)
                    .await;
                return;
            };
            match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    builder
                        .serve_or_refuse(stream, true, peer, router, watcher, admitted)
                        .await
                }
                Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    connections.close();
    let grace = config.shutdown_grace;
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "connections still open after the shutdown grace period"
        );
    }
}

/// The HTTP protocols a connection may speak: HTTP/1.1 on plain TCP (an HTTP/2-capable
/// connection state costs a few KiB more per idle connection, and browsers use HTTP/2 only
/// over TLS), HTTP/1.1 or HTTP/2 by ALPN over TLS.
struct Protocols {
    stall_timeout: Duration,
    http1: http1::Builder,
    any: auto::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(config: &crate::Config) -> Self {
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

    /// Serves an admitted connection, or answers a refused one with its error.
    async fn serve_or_refuse<I>(
        &self,
        io: I,
        tls: bool,
        peer: SocketAddr,
        router: Router,
        stop: CancellationToken,
        admitted: Result<ConnectionPermit, Error>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let permit = match admitted {
            Ok(permit) => permit,
            Err(refusal) => return refuse(io, refusal).await,
        };
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request)
        });
        let io = TokioIo::new(StallGuard::new(io, self.stall_timeout));
        let ended = if tls {
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
        drop(permit);
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

/// Answers a connection over a limit with the error as JSON, then closes it.
async fn refuse<I: AsyncRead + AsyncWrite + Unpin>(mut io: I, refusal: Error) {
    // Read the request first (briefly): closing a socket with unread input resets it, and
    // the client would see a reset instead of the answer.
    let mut head = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), io.read(&mut head)).await;
    crate::telemetry::rejected(refusal.code());
    let status = refusal.status();
    let body = refusal.body_json();
    let retry_after = refusal.retry_after().unwrap_or(1);
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\nretry-after: {retry_after}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.shutdown().await;
}

/// Fails a connection's writes once they have made no progress for `limit`: a peer that
/// stopped reading (or vanished without a FIN) otherwise holds its connection, its
/// subscription and its buffers until TCP gives up, which can take many minutes.
struct StallGuard<I> {
    io: I,
    limit: Duration,
    stalled_since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> StallGuard<I> {
    fn new(io: I, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled_since: None,
        }
    }

    /// Turns a pending write into an error once the stall has lasted `limit`.
    fn check<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<io::Result<T>>,
    ) -> std::task::Poll<io::Result<T>> {
        use std::{future::Future as _, task::Poll};
        if polled.is_ready() {
            self.stalled_since = None;
            return polled;
        }
        let limit = self.limit;
        let deadline = self
            .stalled_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for StallGuard<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for StallGuard<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
