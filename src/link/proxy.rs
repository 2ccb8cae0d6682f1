//! The proxy hop: listens on its own port and forwards each connection to the server through
//! a [`Link`], one task per connection running four pipes (each direction's reader and
//! writer) beside the link's cut timer and the idle cutter's watchdog.
//!
//! Each reader takes what its side sent, lets the middleboxes look at it, splits it into
//! segments and stamps each with its arrival time ([`Shaper`]); the writer waits for that time
//! and writes. The channel between them is bounded, so a slow link pushes back on the sender
//! as a real one does (the server's socket fills, and its slow-consumer handling sees it).
//! A connection's first request byte leaves one round trip after the connection opens: the
//! handshake a real link would have made it wait for.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use super::{
    Link,
    framing::{ResponseHold, UPGRADE_REFUSED, UpgradeGuard, Verdict},
    shaper::{SEGMENT, Shaper},
};

/// Segments in flight between a reader and its writer: about a router's queue (64 × 1448 B).
const QUEUE: usize = 64;

/// What crossed a proxy since it started.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted (refused ones included).
    pub connections: AtomicU64,
    /// Connections refused during a blackout.
    pub refused: AtomicU64,
    /// Connections the link cut (FIN or RST).
    pub cuts: AtomicU64,
    /// Of those, cut with a reset.
    pub resets: AtomicU64,
    /// Connections an idle cutter closed.
    pub idle_cuts: AtomicU64,
    /// Upgrade requests a `no-websocket` proxy refused.
    pub upgrades_refused: AtomicU64,
    /// Bytes delivered from the clients to the server (request heads and bodies, WebSocket
    /// frames).
    pub bytes_up: AtomicU64,
    /// Bytes delivered from the server to the clients (response heads, framing, bodies,
    /// heartbeats).
    pub bytes_down: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A running link emulator: a listener on 127.0.0.1 that forwards to one server. Dropping it
/// stops it and cuts every connection through it.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: CancellationToken,
}

impl Proxy {
    /// Starts a proxy on an ephemeral port of 127.0.0.1 that forwards to `upstream` through
    /// `link`.
    pub async fn start(link: Link, upstream: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            Arc::new(link),
            upstream,
            counters.clone(),
            stop.clone(),
        ));
        Ok(Proxy {
            addr,
            counters,
            stop,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What crossed it so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    link: Arc<Link>,
    upstream: SocketAddr,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let started = blackout_clock(&link);
    let mut seed = fastrand::u64(..);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let Ok((client, _)) = accepted else {
            // Out of descriptors, most likely: let some close.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        Counters::add(&counters.connections, 1);
        if in_blackout(&link, started.elapsed()) {
            Counters::add(&counters.refused, 1);
            reset(&client);
            continue;
        }
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let connection = Connection {
            link: link.clone(),
            counters: counters.clone(),
            seed,
            upstream,
            read: Vec::new(),
            registry: None,
        };
        tokio::spawn(connection.run(client, stop.child_token()));
    }
}

/// The start of a link's blackout cycle: a random point of its period before now, so that a
/// run shorter than the period (a bench cell) meets a blackout as often as real time spent on
/// the link would (a tenth of it for `flaky`), not never.
pub(super) fn blackout_clock(link: &Link) -> Instant {
    let now = Instant::now();
    match &link.profile.cuts {
        Some(cuts) => now
            .checked_sub(cuts.blackout_every.mul_f64(fastrand::f64()))
            .unwrap_or(now),
        None => now,
    }
}

/// Whether a flaky link is in one of its blackouts `elapsed` after its cycle started: the last
/// `blackout_for` of every `blackout_every`.
pub(super) fn in_blackout(link: &Link, elapsed: Duration) -> bool {
    let Some(cuts) = &link.profile.cuts else {
        return false;
    };
    let every = cuts.blackout_every.as_nanos().max(1);
    let into = elapsed.as_nanos() % every;
    into >= every.saturating_sub(cuts.blackout_for.as_nanos())
}

/// Makes the socket's close a reset (RST) instead of a FIN: `SO_LINGER` with a zero timeout.
pub(super) fn reset(socket: &TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(socket, Some(Duration::ZERO));
}

/// One segment for a writer.
enum Segment {
    /// Bytes to write at their arrival time.
    Data(Instant, Bytes),
    /// The sender closed its side: shut down the writer's.
    End,
}

/// How a connection through the link ended.
enum Ending {
    /// Both sides finished (or the proxy stopped).
    Done,
    /// The link cut it, with a reset or not.
    Cut { reset: bool },
    /// An idle cutter closed it.
    Idle,
}

/// The moment of a connection's last byte either way, as nanoseconds since it opened.
struct Activity {
    opened: Instant,
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last
            .store(self.opened.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// The local addresses of a server's own connections through its links (see
/// [`super::Lanes`]): a server must not route them into a link again.
pub(super) type Registry = Mutex<std::collections::HashSet<SocketAddr>>;

/// One connection through the link.
pub(super) struct Connection {
    pub(super) link: Arc<Link>,
    pub(super) counters: Arc<Counters>,
    pub(super) seed: u64,
    /// Where it goes.
    pub(super) upstream: SocketAddr,
    /// What was read from the client already (the first request, when a server routed the
    /// connection here after reading it).
    pub(super) read: Vec<u8>,
    /// Where to note the upstream connection's local address while it lasts.
    pub(super) registry: Option<Arc<Registry>>,
}

impl Connection {
    pub(super) async fn run(mut self, mut client: TcpStream, stop: CancellationToken) {
        let Ok(mut server) = TcpStream::connect(self.upstream).await else {
            reset(&client);
            return;
        };
        let registered = self.registry.clone().zip(server.local_addr().ok());
        if let Some((registry, local)) = &registered {
            registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(*local);
        }
        let read = std::mem::take(&mut self.read);
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let profile = &self.link.profile;
        let opened = Instant::now();
        // The handshake's round trip passes before the first request byte can leave.
        let up = Mutex::new(Shaper::new(profile, opened + profile.delay * 2, self.seed));
        let down = Mutex::new(Shaper::new(profile, opened, self.seed.rotate_left(17)));
        let activity = Activity {
            opened,
            last: AtomicU64::new(0),
        };
        let (up_tx, up_rx) = mpsc::channel(QUEUE);
        let (down_tx, down_rx) = mpsc::channel(QUEUE);
        let ending = {
            let (client_read, client_write) = client.split();
            let (server_read, server_write) = server.split();
            let pipes = async {
                tokio::join!(
                    self.read_requests(
                        read,
                        client_read,
                        [&up, &down],
                        [&up_tx, &down_tx],
                        &activity
                    ),
                    self.read_responses(server_read, &down, &down_tx, &activity),
                    write(server_write, up_rx, &self.counters.bytes_up, &activity),
                    write(client_write, down_rx, &self.counters.bytes_down, &activity),
                )
            };
            tokio::select! {
                _ = pipes => Ending::Done,
                reset = self.cut_timer() => Ending::Cut { reset },
                () = self.idle_watch(&activity) => Ending::Idle,
                () = stop.cancelled() => Ending::Done,
            }
        };
        match ending {
            Ending::Done => {}
            Ending::Cut { reset: true } => {
                Counters::add(&self.counters.cuts, 1);
                Counters::add(&self.counters.resets, 1);
                reset(&client);
            }
            Ending::Cut { reset: false } => Counters::add(&self.counters.cuts, 1),
            Ending::Idle => Counters::add(&self.counters.idle_cuts, 1),
        }
        // Forgotten before the socket closes: once it has, another connection may get its
        // address.
        if let Some((registry, local)) = registered {
            registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&local);
        }
        // Dropped without a shutdown: a FIN, or with the linger set above, a reset.
        drop(client);
        drop(server);
    }

    /// Client to server: requests (each head checked by a `no-websocket` proxy), WebSocket
    /// frames.
    async fn read_requests(
        &self,
        read: Vec<u8>,
        mut from: impl AsyncRead + Unpin,
        [up, down]: [&Mutex<Shaper>; 2],
        [up_tx, down_tx]: [&mpsc::Sender<Segment>; 2],
        activity: &Activity,
    ) {
        let mut guard = self
            .link
            .middleboxes
            .no_websocket
            .then(UpgradeGuard::default);
        // What the server read already goes first.
        let mut n = read.len();
        let mut buf = read;
        buf.resize(n.max(16 * 1024), 0);
        loop {
            if n == 0 {
                n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
            }
            activity.touch();
            let forward = match guard.as_mut().map(|g| g.feed(&buf[..n])) {
                None => buf[..n].to_vec(),
                Some(Verdict::Forward(bytes)) => bytes,
                Some(Verdict::Refuse) => {
                    Counters::add(&self.counters.upgrades_refused, 1);
                    let _ = send(down, down_tx, UPGRADE_REFUSED).await;
                    let _ = down_tx.send(Segment::End).await;
                    break;
                }
            };
            if send(up, up_tx, &forward).await.is_err() {
                return;
            }
            n = 0;
        }
        let _ = up_tx.send(Segment::End).await;
    }

    /// Server to client: responses (held by a `buffering-proxy`), WebSocket frames.
    async fn read_responses(
        &self,
        mut from: impl AsyncRead + Unpin,
        down: &Mutex<Shaper>,
        down_tx: &mpsc::Sender<Segment>,
        activity: &Activity,
    ) {
        let mut hold = self.link.middleboxes.buffering.map(ResponseHold::new);
        let mut buf = vec![0; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            activity.touch();
            let forward = match hold.as_mut() {
                Some(hold) => hold.feed(&buf[..n]),
                None => buf[..n].to_vec(),
            };
            if send(down, down_tx, &forward).await.is_err() {
                return;
            }
        }
        if let Some(hold) = hold.as_mut() {
            let _ = send(down, down_tx, &hold.finish()).await;
        }
        let _ = down_tx.send(Segment::End).await;
    }

    /// Resolves when a flaky link cuts the connection, with whether it resets it.
    async fn cut_timer(&self) -> bool {
        let Some(cuts) = &self.link.profile.cuts else {
            return std::future::pending().await;
        };
        let mut rng = fastrand::Rng::with_seed(self.seed ^ 0x5555);
        let (low, high) = (cuts.after.0.as_secs_f64(), cuts.after.1.as_secs_f64());
        let after = low + rng.f64() * (high - low).max(0.0);
        tokio::time::sleep(Duration::from_secs_f64(after)).await;
        rng.f64() < cuts.reset_share
    }

    /// Resolves when the connection has been silent for the idle cutter's limit.
    async fn idle_watch(&self, activity: &Activity) {
        let Some(limit) = self.link.middleboxes.idle_cut else {
            return std::future::pending().await;
        };
        loop {
            let deadline = activity.last() + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// Splits `bytes` into segments stamped with their arrival and queues them for the writer.
async fn send(shaper: &Mutex<Shaper>, tx: &mpsc::Sender<Segment>, bytes: &[u8]) -> Result<(), ()> {
    for piece in bytes.chunks(SEGMENT) {
        let arrival = shaper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .arrival(Instant::now(), piece.len());
        tx.send(Segment::Data(arrival, Bytes::copy_from_slice(piece)))
            .await
            .map_err(|_| ())?;
    }
    Ok(())
}

/// Writes each segment at its arrival time; counts what it wrote.
async fn write(
    mut to: impl AsyncWrite + Unpin,
    mut rx: mpsc::Receiver<Segment>,
    counter: &AtomicU64,
    activity: &Activity,
) {
    while let Some(Segment::Data(arrival, bytes)) = rx.recv().await {
        tokio::time::sleep_until(arrival.into()).await;
        if to.write_all(&bytes).await.is_err() {
            return;
        }
        activity.touch();
        Counters::add(counter, bytes.len() as u64);
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Profile;

    #[test]
    fn a_flaky_link_blacks_out_the_last_three_seconds_of_every_thirty() {
        let flaky = Link::new(Profile::named("flaky").unwrap());
        let s = Duration::from_secs;
        assert!(!in_blackout(&flaky, s(0)));
        assert!(!in_blackout(&flaky, Duration::from_millis(26_999)));
        assert!(in_blackout(&flaky, s(27)));
        assert!(in_blackout(&flaky, Duration::from_millis(29_999)));
        assert!(!in_blackout(&flaky, s(30)));
        assert!(in_blackout(&flaky, s(58)));
        assert!(!in_blackout(
            &Link::new(Profile::named("3g").unwrap()),
            s(28)
        ));
    }
}
