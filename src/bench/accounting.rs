//! Per-subscriber delivery accounting: latency histogram, loss and duplicates by id.

use hdrhistogram::Histogram;
use serde::Serialize;

pub use crate::message::now_micros;

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// What one subscriber saw. Ids of a topic are contiguous, so a jump means messages were
/// missed and a repeat means a duplicate.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// Delivery latency in µs (receive time minus the publish time carried in the payload).
    pub latency: Histogram<u64>,
    /// Distinct messages received.
    pub received: u64,
    /// Messages received again (id not above the last one).
    pub duplicates: u64,
    /// Ids skipped between two deliveries, and (after [`Tracker::finish`]) those never
    /// received at all.
    pub missing: u64,
    /// Of `missing`, the tail never received by the end: held somewhere (a buffering proxy)
    /// or not caught up by the drain timeout, rather than skipped.
    pub undelivered: u64,
    /// Highest id received.
    pub last_id: u64,
    /// HTTP requests (polls) or connections (streams) made.
    pub requests: u64,
    /// Body bytes received.
    pub bytes: u64,
    /// Times the connection was lost and opened again (behind a link that cuts).
    pub reconnects: u64,
    /// Time from noticing a lost connection to being served again, µs.
    pub recovery: Histogram<u64>,
    /// With several nodes: latency of the messages published through another node than
    /// this subscriber's, µs (made at the first one: most runs have one node).
    pub cross_node: Option<Histogram<u64>>,
    /// When the connection was lost, µs since the epoch, until it is served again.
    lost_at: Option<u64>,
    /// Where a Durable Streams reader resumes: the opaque offset its server last gave
    /// (offsets are the server's business: pushhub counts messages, others count bytes).
    pub offset: Option<String>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            latency: latency_histogram(),
            received: 0,
            duplicates: 0,
            missing: 0,
            undelivered: 0,
            last_id: 0,
            requests: 0,
            bytes: 0,
            reconnects: 0,
            recovery: latency_histogram(),
            cross_node: None,
            lost_at: None,
            offset: None,
        }
    }
}

impl Tracker {
    /// Records message `id` published at `sent_us` and received at `now_us` (µs since epoch);
    /// `false` when it is a duplicate.
    pub fn on_message(&mut self, id: u64, sent_us: u64, now_us: u64) -> bool {
        if id <= self.last_id {
            self.duplicates += 1;
            return false;
        }
        self.missing += id - self.last_id - 1;
        self.last_id = id;
        self.received += 1;
        self.latency
            .saturating_record(now_us.saturating_sub(sent_us).max(1));
        true
    }

    /// The message just recorded was published through another node than this
    /// subscriber's: its latency also counts as a cross-node one.
    pub fn on_crossed(&mut self, sent_us: u64, now_us: u64) {
        self.cross_node
            .get_or_insert_with(latency_histogram)
            .saturating_record(now_us.saturating_sub(sent_us).max(1));
    }

    /// The connection was lost at `now_us` (the first of several failed attempts counts).
    pub fn lost(&mut self, now_us: u64) {
        self.lost_at.get_or_insert(now_us);
    }

    /// The subscriber is served again (a stream opened, a poll answered) at `now_us`: if it
    /// had lost its connection, that is one reconnect, and the time since is its recovery.
    pub fn served(&mut self, now_us: u64) {
        if let Some(lost_at) = self.lost_at.take() {
            self.reconnects += 1;
            self.recovery
                .saturating_record(now_us.saturating_sub(lost_at).max(1));
        }
    }

    /// Adds `other`'s counts and histograms to these.
    pub fn add(&mut self, other: &Tracker) {
        self.latency
            .add(&other.latency)
            .expect("same histogram bounds");
        self.recovery
            .add(&other.recovery)
            .expect("same histogram bounds");
        if let Some(crossed) = &other.cross_node {
            self.cross_node
                .get_or_insert_with(latency_histogram)
                .add(crossed)
                .expect("same histogram bounds");
        }
        self.received += other.received;
        self.duplicates += other.duplicates;
        self.missing += other.missing;
        self.undelivered += other.undelivered;
        self.requests += other.requests;
        self.bytes += other.bytes;
        self.reconnects += other.reconnects;
    }

    /// Counts what never arrived up to `last_published`.
    pub fn finish(&mut self, last_published: u64) {
        if last_published > self.last_id {
            self.missing += last_published - self.last_id;
            self.undelivered += last_published - self.last_id;
            self.last_id = last_published;
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Percentiles {
    /// Reads the percentiles of a µs histogram, in ms.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(histogram.value_at_quantile(0.5)),
            p90: ms(histogram.value_at_quantile(0.9)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_gaps_duplicates_and_the_unreceived_tail() {
        let mut t = Tracker::default();
        for id in [1, 2, 2, 5, 4, 6] {
            t.on_message(id, 1_000, 3_000);
        }
        assert_eq!(
            (t.received, t.duplicates, t.missing, t.last_id),
            (4, 2, 2, 6)
        );
        t.finish(10);
        assert_eq!((t.missing, t.last_id, t.undelivered), (6, 10, 4));
        t.finish(3);
        assert_eq!(t.missing, 6, "finishing below what was seen adds nothing");
    }

    #[test]
    fn a_recovery_runs_from_the_first_loss_to_being_served_again() {
        let mut t = Tracker::default();
        t.served(1_000);
        assert_eq!(t.reconnects, 0, "the first connection is not a reconnect");
        t.lost(2_000);
        // A refused attempt in between does not restart the clock.
        t.lost(2_500);
        t.served(7_000);
        t.served(8_000);
        assert_eq!(t.reconnects, 1);
        assert_eq!(t.recovery.len(), 1);
        // 5 ms, to the histogram's three significant digits.
        assert!(
            t.recovery.max().abs_diff(5_000) <= 5,
            "{}",
            t.recovery.max()
        );
    }

    #[test]
    fn percentiles_are_read_in_milliseconds() {
        let mut t = Tracker::default();
        for (id, latency_us) in (1..=1000).zip(1..=1000u64) {
            t.on_message(id, 0, latency_us * 100); // 0.1 ms .. 100 ms
        }
        let p = Percentiles::of(&t.latency);
        assert!((p.p50 - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max - 100.0).abs() < 0.1, "{p:?}");
        assert!((p.mean - 50.05).abs() < 0.1, "{p:?}");
        assert_eq!(
            Percentiles::of(&latency_histogram()),
            Percentiles::default()
        );
    }
}
