//! Accepting connections: capacity limits, TLS, graceful shutdown.
//!
//! pushhub runs its own accept loop rather than `axum::serve`, because a gateway on the
//! public internet needs what that helper does not expose: a bound on open connections in
//! total and per client IP, answered with a JSON 503/429 before any work is done; TLS on the
//! same loop; and the choice, per request, of who serves it ([`crate::gate`]).

use std::{future::Future, io, path::Path, sync::Arc, time::Duration};

use axum::Router;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::{
    AppState,
    error::Error,
    gate::{
        connection::{Connection, Shared},
        hyper::Protocols,
    },
    transport::io::Io,
};

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
    let shared = Arc::new(Shared {
        app: state.clone(),
        router,
        protocols: Arc::new(Protocols::new(config)),
    });
    let connections = TaskTracker::new();
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
        // Each kind of connection is its own task type, so a plain connection's task carries
        // no room for a refusal or a TLS handshake.
        let connection = Connection {
            shared: shared.clone(),
            peer,
        };
        match (limits.admit(peer.ip()), &tls) {
            (Err(refusal), _) => {
                connections.spawn(refuse(stream, refusal));
            }
            (Ok(permit), None) => {
                connections.spawn(async move {
                    connection.serve(Io::Tcp(Arc::new(stream)), false).await;
                    drop(permit);
                });
            }
            (Ok(permit), Some(tls)) => {
                let tls = tls.clone();
                connections.spawn(async move {
                    serve_tls(connection, stream, tls, handshake_timeout).await;
                    drop(permit);
                });
            }
        }
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

/// A TLS connection: the handshake (within `--header-timeout`), then HTTP/2 or HTTP/1.1 as
/// ALPN chose.
async fn serve_tls(
    connection: Connection,
    stream: tokio::net::TcpStream,
    tls: TlsAcceptor,
    handshake_timeout: Duration,
) {
    let peer = connection.peer;
    let io = Io::Tcp(Arc::new(stream));
    match tokio::time::timeout(handshake_timeout, tls.accept(io)).await {
        Ok(Ok(stream)) => {
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            connection.serve(Io::Other(Box::new(stream)), h2).await;
        }
        Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
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
