//! Server-side counters per transport, for `GET /stats` and the lab page.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::Serialize;

use super::Subscribers;
use crate::message::{PerTransport, TransportKind};

/// Copies of each counter, so that threads counting at once do not fight over one cache
/// line: a thread adds to its own copy, a reader sums them.
const COPIES: usize = 8;

/// Which copy the calling thread adds to, assigned round-robin on first use.
fn copy_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % COPIES;
    }
    INDEX.with(|index| *index)
}

/// One counter per transport, per copy. Relaxed atomics: these are statistics, read once a
/// second, and must cost the delivery path no more than an uncontended add.
#[derive(Default)]
pub(crate) struct Striped([Line; COPIES]);

/// The counters of one copy, alone on their cache line.
#[derive(Default)]
#[repr(align(128))]
struct Line([AtomicU64; TransportKind::COUNT]);

impl Striped {
    fn add(&self, transport: TransportKind, amount: u64) {
        self.0[copy_index()].0[transport.index()].fetch_add(amount, Ordering::Relaxed);
    }

    fn get(&self, transport: TransportKind) -> u64 {
        self.0
            .iter()
            .map(|line| line.0[transport.index()].load(Ordering::Relaxed))
            .sum()
    }

    fn snapshot(&self) -> TransportCounts {
        PerTransport::from_fn(|transport| self.get(transport))
    }
}

/// A number per transport.
pub type TransportCounts = PerTransport<u64>;

/// Counters the transports feed.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) publishes: AtomicU64,
    deliveries: Striped,
    bytes: Striped,
    heads: Striped,
    requests: Striped,
}

impl Counters {
    pub(crate) fn delivered(&self, transport: TransportKind, messages: u64, bytes: u64) {
        if messages > 0 {
            self.deliveries.add(transport, messages);
        }
        self.bytes.add(transport, bytes);
    }

    pub(crate) fn heads(&self, transport: TransportKind, bytes: u64) {
        self.heads.add(transport, bytes);
    }

    pub(crate) fn request(&self, transport: TransportKind) {
        self.requests.add(transport, 1);
    }

    pub(crate) fn deliveries(&self, transport: TransportKind) -> u64 {
        self.deliveries.get(transport)
    }
}

/// What `GET /stats` answers.
#[derive(Debug, Serialize)]
pub struct HubStats {
    /// Topics active in this process.
    pub topics: usize,
    /// Messages published since start.
    pub publishes: u64,
    /// Subscribers now, summed over topics.
    pub subscribers: Subscribers,
    /// Messages delivered since start.
    pub deliveries: TransportCounts,
    /// Body bytes sent since start (messages, signals, heartbeats, poll envelopes).
    pub bytes: TransportCounts,
    /// HTTP head bytes since start, both ways: request heads read and response heads written
    /// (and whole error answers) on the HTTP/1.1 path the five transports' requests take.
    /// With `bytes`, what the wire carried for each transport, but for TCP/TLS framing and
    /// what clients send on an open stream (WebSocket pongs).
    pub head_bytes: TransportCounts,
    /// Requests (polls) or connections (streams) accepted since start.
    pub requests: TransportCounts,
}

impl Counters {
    pub(crate) fn snapshot(&self, topics: usize, subscribers: Subscribers) -> HubStats {
        HubStats {
            topics,
            publishes: self.publishes.load(Ordering::Relaxed),
            subscribers,
            deliveries: self.deliveries.snapshot(),
            bytes: self.bytes.snapshot(),
            head_bytes: self.heads.snapshot(),
            requests: self.requests.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_per_transport() {
        let counters = Counters::default();
        counters.delivered(TransportKind::Sse, 2, 300);
        counters.delivered(TransportKind::Sse, 0, 14);
        counters.request(TransportKind::Poll);
        let stats = counters.snapshot(1, Subscribers::default());
        assert_eq!(stats.deliveries[TransportKind::Sse], 2);
        assert_eq!(stats.bytes[TransportKind::Sse], 314);
        assert_eq!(stats.requests[TransportKind::Poll], 1);
    }
}
