//! Accepting connections: capacity limits, TLS, graceful shutdown.
//!
//! pushhub runs its own accept loop rather than `axum::serve`, because a gateway on the
//! public internet needs what that helper does not expose: a bound on open connections in
//! total and per client IP, answered with a JSON 503/429 before any work is done; TLS on the
//! same loop; and the choice, per request, of who serves it ([`crate::gate`]).

use std::{
    future::Future, io, net::SocketAddr, os::fd::OwnedFd, path::Path, sync::Arc, time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use super::{
    Gate,
    connection::{Connection, Shared},
    limits::{ConnectionLimits, ConnectionPermit},
};
use crate::{error::Error, transport::io::Io};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// The auth settings are unusable.
    #[error(transparent)]
    Auth(#[from] crate::access::AuthConfigError),
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

/// Listens on `addr` with a backlog of `backlog` pending connections (tokio's own `bind`
/// takes 1,024, which a reconnect storm of a few thousand clients overflows: the clients
/// left out retry after a second or more).
pub fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's and tokio's `bind` do: a restarted node binds again while connections of
    // the one before are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Serves `gate` on `listener` until `stop` fires, with `--workers` workers: this task's
/// runtime is worker 0, each other worker a thread with a single-threaded runtime of its own.
/// Worker 0 accepts every connection and hands them out round-robin: a connection lives on
/// one worker, and so does the fan-out shard that writes to it, so a delivery never wakes
/// another thread; and a new connection wakes one worker (sharing the listening socket
/// would wake them all). Once stopped, each worker lets its open connections finish
/// (long-lived ones end themselves on the same signal) for at most `--shutdown-grace`.
pub async fn serve_workers(
    listener: TcpListener,
    gate: Gate,
    tls: Option<TlsAcceptor>,
    stop: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let limits = gate.connections.clone();
    let grace = gate.settings.shutdown_grace;
    let workers = gate.settings.workers;
    let shared = Arc::new(Shared::new(gate));
    let (others, finished) = start_workers(workers, &shared, &tls)?;
    shared.transports.hub.start_worker(0);
    let here = Worker {
        connections: TaskTracker::new(),
        handshake_timeout: shared.settings.header_timeout,
        shared,
        tls,
    };
    accept(&listener, &limits, &here, &others, stop).await;
    drop(listener);
    // The other workers stop taking connections when their channel closes.
    drop(others);
    wind_down(here.connections, grace).await;
    for ended in finished {
        let _ = ended.await;
    }
    Ok(())
}

/// Starts workers 1 to `count - 1`, each on a thread of its own: the channels that hand them
/// connections, and a signal each sends once its connections have finished.
fn start_workers(
    count: usize,
    shared: &Arc<Shared>,
    tls: &Option<TlsAcceptor>,
) -> io::Result<(Vec<Hand>, Vec<tokio::sync::oneshot::Receiver<()>>)> {
    let mut others = Vec::new();
    let mut finished = Vec::new();
    for index in 1..count {
        let (hand, incoming) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
        let (done, ended) = tokio::sync::oneshot::channel::<()>();
        let (shared, tls) = (shared.clone(), tls.clone());
        std::thread::Builder::new()
            .name(format!("pushhub-worker-{index}"))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(worker(index, incoming, shared, tls)),
                    Err(error) => tracing::error!(%error, index, "worker runtime failed"),
                }
                let _ = done.send(());
            })?;
        others.push(hand);
        finished.push(ended);
    }
    Ok((others, finished))
}

/// The channel that hands a worker its connections.
type Hand = tokio::sync::mpsc::UnboundedSender<Accepted>;

/// What one worker serves its connections with.
struct Worker {
    /// Its open connections, waited for when it stops.
    connections: TaskTracker,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
}

/// Accepts until `stop`: refuses connections over the limits, hands the others out
/// round-robin (`here`, worker 0, takes its turn).
async fn accept(
    listener: &TcpListener,
    limits: &Arc<ConnectionLimits>,
    here: &Worker,
    others: &[Hand],
    stop: impl Future<Output = ()>,
) {
    let mut next = 0usize;
    let spare = Spare::open();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if out_of_files(&error) => {
                    // Files ran out below the connection limit (the store's, Redis's,
                    // the reserve set too low): the spare file makes room to answer one
                    // waiting client, instead of leaving them all in the backlog. While
                    // it is out answering, the others wait.
                    match spare.take() {
                        Some(file) => refuse_out_of_files(listener, limits, here, &spare, file),
                        None => tracing::debug!(%error, "accept failed: out of files"),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(error) => {
                    // A connection reset before accept: keep serving those open.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        let _ = stream.set_nodelay(true);
        let permit = match limits.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                here.refuse(limits, stream, refusal, None);
                continue;
            }
        };
        next = next.wrapping_add(1);
        let target = next % (others.len() + 1);
        if target == 0 {
            here.spawn(stream, peer, permit);
        } else {
            hand_over(here, &others[target - 1], stream, peer, permit);
        }
    }
}

/// Whether accept failed for want of a file (the process's limit, or the system's).
fn out_of_files(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
}

/// A file held open so that a node out of files can still refuse a client: closed to accept
/// one, which is answered 503, and whose socket, shut down, becomes the spare in turn (never
/// closed and opened again, which would let the accept loop take the file in between).
#[derive(Clone)]
struct Spare(Arc<std::sync::Mutex<Option<OwnedFd>>>);

impl Spare {
    fn open() -> Self {
        let spare = Self(Arc::default());
        spare.reopen();
        spare
    }

    /// Holds a newly opened file as the spare (where one is free to open).
    fn reopen(&self) {
        if let Ok(file) = std::fs::File::open("/dev/null") {
            self.keep(file.into());
        }
    }

    /// Takes the spare file out (its drop closes it), if it is held.
    fn take(&self) -> Option<OwnedFd> {
        self.lock().take()
    }

    /// Keeps `fd` as the spare.
    fn keep(&self, fd: OwnedFd) {
        self.lock().get_or_insert(fd);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<OwnedFd>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Closes the spare file, accepts the client waiting and refuses it: `503`, "out of files".
/// Its socket is the next spare.
fn refuse_out_of_files(
    listener: &TcpListener,
    limits: &Arc<ConnectionLimits>,
    here: &Worker,
    spare: &Spare,
    file: OwnedFd,
) {
    drop(file);
    use futures::FutureExt;
    match listener.accept().now_or_never() {
        Some(Ok((stream, peer))) => {
            tracing::warn!(%peer, "out of files: refused a connection");
            let refusal = Error::AtCapacity("out of files: the open-file limit is reached");
            here.refuse(limits, stream, refusal, Some(spare.clone()));
        }
        _ => spare.reopen(),
    }
}

/// Hands a connection to another worker (or serves it here if that worker is gone).
fn hand_over(
    here: &Worker,
    to: &Hand,
    stream: TcpStream,
    peer: SocketAddr,
    permit: ConnectionPermit,
) {
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, %peer, "could not hand a connection over");
            return;
        }
    };
    if let Err(unsent) = to.send(Accepted {
        stream,
        peer,
        permit,
    }) {
        here.spawn_accepted(unsent.0);
    }
}

/// A connection accepted by worker 0 for another worker.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: ConnectionPermit,
}

/// Worker `index`: serves the connections handed to it until worker 0 stops handing them
/// out, then lets them finish within the grace period.
async fn worker(
    index: usize,
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
) {
    shared.transports.hub.start_worker(index);
    let grace = shared.settings.shutdown_grace;
    let here = Worker {
        connections: TaskTracker::new(),
        handshake_timeout: shared.settings.header_timeout,
        shared,
        tls,
    };
    while let Some(accepted) = incoming.recv().await {
        here.spawn_accepted(accepted);
    }
    wind_down(here.connections, grace).await;
}

impl Worker {
    /// Serves one admitted connection on this worker, holding its place until it ends. Each
    /// kind of connection is its own task type, so a plain connection's task carries no room
    /// for a TLS handshake.
    /// Answers a connection over a limit (`refusal`, as JSON, or a TLS alert), then closes
    /// it, or keeps its socket as the `spare` file when it took the spare's place. Refusals
    /// answered at once are bounded: past the bound the connection is closed at once,
    /// unanswered, so that a flood of refused clients cannot take the files kept back for
    /// the store and the listener.
    fn refuse(
        &self,
        limits: &Arc<ConnectionLimits>,
        stream: TcpStream,
        refusal: Error,
        spare: Option<Spare>,
    ) {
        let place = limits.refusal();
        if place.is_none() && spare.is_none() {
            crate::telemetry::rejected(refusal.code());
            return;
        }
        let tls = self.tls.is_some();
        self.connections.spawn(async move {
            let mut stream = stream;
            if tls {
                refuse_tls(&mut stream, refusal).await;
            } else {
                refuse(&mut stream, refusal).await;
            }
            drop(place);
            if let Some(spare) = spare {
                match stream.into_std() {
                    Ok(stream) => spare.keep(stream.into()),
                    // Closed with its registration: its file is free to open again.
                    Err(_) => spare.reopen(),
                }
            }
        });
    }

    fn spawn(&self, stream: TcpStream, peer: SocketAddr, permit: ConnectionPermit) {
        let connection = Connection {
            shared: self.shared.clone(),
            peer,
        };
        match &self.tls {
            None => {
                self.connections.spawn(async move {
                    connection.serve(Io::Tcp(Arc::new(stream)), false).await;
                    drop(permit);
                });
            }
            Some(tls) => {
                let tls = tls.clone();
                let handshake_timeout = self.handshake_timeout;
                self.connections.spawn(async move {
                    serve_tls(connection, stream, tls, handshake_timeout).await;
                    drop(permit);
                });
            }
        }
    }

    /// Serves a connection handed over from worker 0 on this worker's runtime.
    fn spawn_accepted(&self, accepted: Accepted) {
        let Accepted {
            stream,
            peer,
            permit,
        } = accepted;
        match TcpStream::from_std(stream) {
            Ok(stream) => self.spawn(stream, peer, permit),
            Err(error) => tracing::warn!(%error, %peer, "could not take a connection"),
        }
    }
}

/// Waits at most `grace` for a worker's connections to finish.
async fn wind_down(connections: TaskTracker, grace: Duration) {
    connections.close();
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
    stream: TcpStream,
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

/// Refuses a TLS connection over a limit without a handshake (which would cost the CPU the
/// limit protects, and then have to speak HTTP/1.1 or HTTP/2 as ALPN chose): a fatal
/// `internal_error` alert, the one TLS record that may be sent before the handshake, so the
/// client reports a refused handshake instead of garbage or a reset.
async fn refuse_tls<I: AsyncRead + AsyncWrite + Unpin>(mut io: I, refusal: Error) {
    // Read the ClientHello first (briefly): closing with unread input resets the connection.
    let mut hello = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), io.read(&mut hello)).await;
    crate::telemetry::rejected(refusal.code());
    // Record type alert (21), TLS 1.2 record version, length 2, level fatal (2),
    // description internal_error (80).
    const ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50];
    let _ = io.write_all(&ALERT).await;
    let _ = io.shutdown().await;
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
