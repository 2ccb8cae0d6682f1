//! Server-side counters per transport, for `GET /stats` and the lab page.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::Serialize;

use super::{Subscribers, Transport};

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
pub(crate) struct PerTransport([Line; COPIES]);

/// The counters of one copy, alone on their cache line.
#[derive(Default)]
#[repr(align(128))]
struct Line([AtomicU64; 4]);

impl PerTransport {
    fn add(&self, transport: Transport, amount: u64) {
        self.0[copy_index()].0[transport as usize].fetch_add(amount, Ordering::Relaxed);
    }

    fn get(&self, transport: Transport) -> u64 {
        self.0
            .iter()
            .map(|line| line.0[transport as usize].load(Ordering::Relaxed))
            .sum()
    }

    fn snapshot(&self) -> TransportCounts {
        TransportCounts {
            poll: self.get(Transport::Poll),
            longpoll: self.get(Transport::Longpoll),
            sse: self.get(Transport::Sse),
            ws: self.get(Transport::Ws),
        }
    }
}

/// A number per transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TransportCounts {
    /// Short polling.
    pub poll: u64,
    /// Long polling.
    pub longpoll: u64,
    /// Server-Sent Events.
    pub sse: u64,
    /// WebSocket.
    pub ws: u64,
}

/// Counters the transports feed.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) publishes: AtomicU64,
    deliveries: PerTransport,
    bytes: PerTransport,
    requests: PerTransport,
}

impl Counters {
    pub(crate) fn delivered(&self, transport: Transport, messages: u64, bytes: u64) {
        if messages > 0 {
            self.deliveries.add(transport, messages);
        }
        self.bytes.add(transport, bytes);
    }

    pub(crate) fn request(&self, transport: Transport) {
        self.requests.add(transport, 1);
    }

    pub(crate) fn deliveries(&self, transport: Transport) -> u64 {
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
        counters.delivered(Transport::Sse, 2, 300);
        counters.delivered(Transport::Sse, 0, 14);
        counters.request(Transport::Poll);
        let stats = counters.snapshot(1, Subscribers::default());
        assert_eq!(stats.deliveries.sse, 2);
        assert_eq!(stats.bytes.sse, 314);
        assert_eq!(stats.requests.poll, 1);
    }
}
