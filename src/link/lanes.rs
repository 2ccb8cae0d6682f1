//! Links a server applies to its own connections, chosen by the client through the host name:
//! a request to `http://3g.localhost:8080/...` (or `3g--buffering-proxy.localhost`) is served
//! through the `3g` link (and a buffering proxy). Browsers and curl resolve every
//! `*.localhost` name to the loopback address, and each host name is its own origin with its
//! own connection pool, so each lane of the lab gets its own link while the page and the
//! other lanes keep theirs. This is how the lab puts one lane on `3g` beside another on `lan`.
//!
//! The server hands such a connection (and the request it read) to [`Lanes::serve`], which
//! forwards it through the link to the server's own address; the server recognises those
//! inner connections by their address ([`Lanes::is_inner`]) and serves them as usual.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Instant,
};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{
    Link,
    proxy::{Connection, Counters, Registry, in_blackout, reset},
};

/// A server's links for its own connections.
#[derive(Debug)]
pub struct Lanes {
    /// The server's own address, where the links lead, once it listens.
    upstream: std::sync::OnceLock<SocketAddr>,
    /// The inner connections' local addresses.
    inner: Arc<Registry>,
    /// What crossed the links, all lanes together.
    counters: Arc<Counters>,
    /// The flaky links' blackout clock.
    started: Instant,
    seed: AtomicU64,
}

impl Lanes {
    /// Links that will lead to the server once it says where it listens ([`Lanes::lead_to`]).
    pub fn new() -> Lanes {
        Lanes {
            upstream: std::sync::OnceLock::new(),
            inner: Arc::default(),
            counters: Arc::default(),
            started: Instant::now(),
            seed: AtomicU64::new(fastrand::u64(..)),
        }
    }
}

impl Default for Lanes {
    fn default() -> Self {
        Self::new()
    }
}

impl Lanes {
    /// Where the links lead: the server's listening address (an unspecified address, such as
    /// `0.0.0.0`, is reached on loopback). The first call decides.
    pub fn lead_to(&self, mut listening: SocketAddr) {
        if listening.ip().is_unspecified() {
            listening.set_ip(match listening {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = self.upstream.set(listening);
    }

    /// The link a `Host` header names: `3g.localhost:8080` is `3g`, and
    /// `flaky--no-websocket.localhost` is `flaky+no-websocket` (`--` stands for `+`, which a
    /// host name cannot hold). `None` for any other host.
    pub fn link_of_host(host: &str) -> Option<Link> {
        let name = host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        });
        let label = name
            .strip_suffix(".localhost")
            .or_else(|| name.strip_suffix(".localhost."))?;
        label.replace("--", "+").parse().ok()
    }

    /// Whether a connection from `peer` is one of the links' own (already through its link).
    pub fn is_inner(&self, peer: SocketAddr) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&peer)
    }

    /// What crossed the links so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Serves `client` through `link` until either side closes, the link cuts it, or `stop`;
    /// `read` is what the server read of it already (its first request).
    pub async fn serve(
        &self,
        client: TcpStream,
        read: Vec<u8>,
        link: Link,
        stop: CancellationToken,
    ) {
        self.counters
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(&upstream) = self.upstream.get() else {
            reset(&client);
            return;
        };
        if link.profile.cuts.is_some() && in_blackout(&link, self.started.elapsed()) {
            self.counters
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            reset(&client);
            return;
        }
        let seed = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, std::sync::atomic::Ordering::Relaxed);
        let connection = Connection {
            link: Arc::new(link),
            counters: self.counters.clone(),
            seed,
            upstream,
            read,
            registry: Some(self.inner.clone()),
        };
        connection.run(client, stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_name_links() {
        let link = |host| Lanes::link_of_host(host).map(|l| l.to_string());
        assert_eq!(link("3g.localhost:8080").as_deref(), Some("3g"));
        assert_eq!(
            link("flaky--buffering-proxy--no-websocket.localhost").as_deref(),
            Some("flaky+buffering-proxy+no-websocket")
        );
        assert_eq!(link("localhost:8080"), None);
        assert_eq!(link("127.0.0.1:8080"), None);
        assert_eq!(link("5g.localhost:8080"), None);
        assert_eq!(link("3g.example.com"), None);
    }
}
