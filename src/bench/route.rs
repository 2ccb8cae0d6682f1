//! Where a phase's subscribers connect: straight to the nodes, or through an emulated link
//! ([`crate::link::Proxy`], one per node, running in the bench's process so that its work is
//! not charged to the server measured). The publisher always posts straight to the first
//! node: the link is the subscribers' access network.

use std::net::SocketAddr;

use super::{BenchError, server::Server};
use crate::link::{Counters, Link, Proxy};

/// The subscribers' way to the server.
#[derive(Debug)]
pub(super) struct Route {
    /// The link, if any.
    pub(super) link: Option<Link>,
    /// With a link: one proxy per node, in the nodes' order.
    proxies: Vec<Proxy>,
    /// Without one: the nodes' bases.
    direct: Vec<String>,
}

impl Route {
    /// A route to `server` through `link` (straight to it with `None`).
    pub(super) async fn open(link: Option<&Link>, server: &Server) -> Result<Route, BenchError> {
        let direct = server.bases();
        let mut proxies = Vec::new();
        if let Some(link) = link {
            for base in &direct {
                let upstream = resolve(base).await?;
                let proxy = Proxy::start(link.clone(), upstream)
                    .await
                    .map_err(|e| BenchError::Setup(format!("link proxy: {e}")))?;
                proxies.push(proxy);
            }
        }
        Ok(Route {
            link: link.cloned(),
            proxies,
            direct,
        })
    }

    /// Where subscriber `i` connects: `bases()[i % len]`.
    pub(super) fn bases(&self) -> Vec<String> {
        if self.proxies.is_empty() {
            return self.direct.clone();
        }
        self.proxies
            .iter()
            .map(|p| format!("http://{}", p.addr()))
            .collect()
    }

    /// What crossed the links so far, both ways (heads, framing, bodies), and the cuts.
    pub(super) fn wire(&self) -> Option<Wire> {
        if self.proxies.is_empty() {
            return None;
        }
        let sum = |f: fn(&Counters) -> &std::sync::atomic::AtomicU64| {
            self.proxies
                .iter()
                .map(|p| Counters::get(f(p.counters())))
                .sum::<u64>()
        };
        Some(Wire {
            bytes: sum(|c| &c.bytes_up) + sum(|c| &c.bytes_down),
            cuts: sum(|c| &c.cuts) + sum(|c| &c.idle_cuts),
            refused: sum(|c| &c.refused) + sum(|c| &c.upgrades_refused),
        })
    }
}

/// The links' counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Wire {
    /// Bytes both ways.
    pub(super) bytes: u64,
    /// Connections cut (by the link or an idle cutter).
    pub(super) cuts: u64,
    /// Connections or upgrades refused.
    pub(super) refused: u64,
}

impl Wire {
    pub(super) fn since(self, start: Wire) -> Wire {
        Wire {
            bytes: self.bytes.saturating_sub(start.bytes),
            cuts: self.cuts.saturating_sub(start.cuts),
            refused: self.refused.saturating_sub(start.refused),
        }
    }
}

/// The socket address of a base such as `http://127.0.0.1:8080`.
async fn resolve(base: &str) -> Result<SocketAddr, BenchError> {
    let host = base
        .split_once("://")
        .map_or(base, |(_, rest)| rest)
        .trim_end_matches('/');
    // `localhost` may resolve to ::1 first while the server listens on 127.0.0.1: the first
    // address that takes a connection is the server's.
    let addrs = tokio::net::lookup_host(host)
        .await
        .map_err(|e| BenchError::Setup(format!("cannot resolve {base}: {e}")))?;
    for addr in addrs {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(addr);
        }
    }
    Err(BenchError::Setup(format!(
        "no address of {base} takes a connection for the link proxy"
    )))
}
