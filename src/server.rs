//! Accepting connections: capacity limits, request-head limits, TLS, graceful shutdown.
//!
//! pushhub runs its own accept loop over hyper (as axum's `serve-with-hyper` example does)
//! rather than `axum::serve`, because a gateway on the public internet needs what that
//! helper does not expose: a bound on open connections in total and per client IP, answered
//! with a JSON 503/429 before any work is done; a deadline for the request head (slow-header
//! attacks) and a bound on its size; and TLS on the same loop.

use std::{future::Future, io, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo, http::Request};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .max_buf_size(config.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
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
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Some(tls) = tls else {
                match admitted {
                    Ok(permit) => {
                        serve_connection(stream, peer, &builder, router, watcher, permit).await
                    }
                    Err(refusal) => refuse(stream, refusal).await,
                }
                return;
            };
            let stream = match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%error, %peer, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            match admitted {
                Ok(permit) => {
                    serve_connection(stream, peer, &builder, router, watcher, permit).await
                }
                Err(refusal) => refuse(stream, refusal).await,
            }
        });
    }
    drop(listener);
    let grace = config.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "connections still open after the shutdown grace period"
        );
    }
}

async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    router: Router,
    watcher: hyper_util::server::graceful::Watcher,
    permit: ConnectionPermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().oneshot(request)
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(error = %error, %peer, "connection ended with an error");
    }
    drop(permit);
}

/// Answers a connection over a limit with the error as JSON, then closes it.
async fn refuse<I: AsyncRead + AsyncWrite + Unpin>(mut io: I, refusal: Error) {
    // Read the request first (briefly): closing a socket with unread input resets it, and
    // the client would see a reset instead of the answer.
    let mut head = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), io.read(&mut head)).await;
    let status = refusal.status();
    let body =
        serde_json::json!({"error": refusal.public_message(), "code": refusal.code()}).to_string();
    let retry_after = match &refusal {
        Error::TooManyRequests { retry_after, .. } => *retry_after,
        _ => 1,
    };
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\nretry-after: {retry_after}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.shutdown().await;
}
