//! `GET /metrics`: Prometheus text format, through the `metrics` crate and its Prometheus
//! exporter.
//!
//! A leaf: counters and handles, no knowledge of the hub or the app. Hot-path figures
//! (publishes, deliveries, bytes, requests, subscribers) already live in the hub's relaxed
//! atomics for `/stats`; the app copies them into the recorder when scraped (`app.rs`), so a
//! delivery pays nothing extra. Events that are rare (rejections, slow consumers, stream opens
//! and closes) are recorded where they happen. The delivery lag histogram is pushhub's own:
//! a fan-out writer counts the lags of a whole walk in a local `LagTally` and adds it to
//! the shared buckets once, so a delivery costs an array increment, not an atomic operation.

use std::{
    fmt::Write as _,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::message::{TransportKind, now_millis};

/// Upper bounds of the delivery lag histogram's buckets, milliseconds, and as Prometheus
/// prints them (seconds).
const LAG_BUCKETS: [(u64, &str); 13] = [
    (1, "0.001"),
    (2, "0.002"),
    (5, "0.005"),
    (10, "0.01"),
    (25, "0.025"),
    (50, "0.05"),
    (100, "0.1"),
    (250, "0.25"),
    (500, "0.5"),
    (1000, "1"),
    (2500, "2.5"),
    (5000, "5"),
    (10_000, "10"),
];
/// Buckets plus the one past the last bound (`+Inf`).
const LAG_SLOTS: usize = LAG_BUCKETS.len() + 1;

/// The delivery lag histogram: per transport, a count per bucket and the sum of lags.
struct LagHistogram {
    buckets: [[AtomicU64; LAG_SLOTS]; TransportKind::COUNT],
    sum_ms: [AtomicU64; TransportKind::COUNT],
}

static LAG: LagHistogram = LagHistogram {
    buckets: [const { [const { AtomicU64::new(0) }; LAG_SLOTS] }; TransportKind::COUNT],
    sum_ms: [const { AtomicU64::new(0) }; TransportKind::COUNT],
};

fn lag_slot(lag_ms: u64) -> usize {
    LAG_BUCKETS
        .iter()
        .position(|&(bound, _)| lag_ms <= bound)
        .unwrap_or(LAG_BUCKETS.len())
}

/// Delivery lags counted locally, added to the shared histogram by [`LagTally::flush`].
#[derive(Default)]
pub(crate) struct LagTally {
    counts: [[u64; LAG_SLOTS]; TransportKind::COUNT],
    sum_ms: [u64; TransportKind::COUNT],
    any: bool,
}

impl LagTally {
    /// One write to a subscriber of `transport`, whose oldest message is `lag_ms` old.
    pub(crate) fn record(&mut self, transport: TransportKind, lag_ms: u64) {
        let index = transport.index();
        self.counts[index][lag_slot(lag_ms)] += 1;
        self.sum_ms[index] += lag_ms;
        self.any = true;
    }

    /// Adds what was counted to the shared histogram, and starts again from zero.
    pub(crate) fn flush(&mut self) {
        if !self.any {
            return;
        }
        for (index, counts) in self.counts.iter().enumerate() {
            for (slot, &count) in counts.iter().enumerate() {
                if count > 0 {
                    LAG.buckets[index][slot].fetch_add(count, Ordering::Relaxed);
                }
            }
            if self.sum_ms[index] > 0 {
                LAG.sum_ms[index].fetch_add(self.sum_ms[index], Ordering::Relaxed);
            }
        }
        *self = Self::default();
    }
}

fn render_lag(out: &mut String) {
    out.push_str("# HELP pushhub_delivery_lag_seconds Time from publish to the write that delivered a message.\n");
    out.push_str("# TYPE pushhub_delivery_lag_seconds histogram\n");
    for transport in TransportKind::ALL {
        let index = transport.index();
        let name = transport.name();
        let mut cumulative = 0;
        for (slot, (_, bound)) in LAG_BUCKETS.iter().enumerate() {
            cumulative += LAG.buckets[index][slot].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "pushhub_delivery_lag_seconds_bucket{{transport=\"{name}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += LAG.buckets[index][LAG_BUCKETS.len()].load(Ordering::Relaxed);
        let sum = LAG.sum_ms[index].load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(
            out,
            "pushhub_delivery_lag_seconds_bucket{{transport=\"{name}\",le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "pushhub_delivery_lag_seconds_sum{{transport=\"{name}\"}} {sum}"
        );
        let _ = writeln!(
            out,
            "pushhub_delivery_lag_seconds_count{{transport=\"{name}\"}} {cumulative}"
        );
    }
}

fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Only one recorder per process: if the embedding program installed its own, the
        // events go there and this handle renders the scrape-time figures only.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Installs the recorder (once per process).
pub fn install() {
    handle();
}

/// The scrape: what is recorded where it happens (and what the caller copied in just
/// before, the app's counters taken at scrape time), and the delivery lag histogram.
pub fn render() -> String {
    for transport in TransportKind::ALL {
        for (index, event) in ["opened", "closed"].into_iter().enumerate() {
            let count = STREAMS[transport.index()][index].load(Ordering::Relaxed);
            metrics::counter!("pushhub_stream_subscriptions_total", "transport" => transport.name(), "event" => event)
                .absolute(count);
        }
    }
    metrics::counter!("pushhub_blocked_writes_total")
        .absolute(BLOCKED_WRITES.load(Ordering::Relaxed));
    let mut text = handle().render();
    render_lag(&mut text);
    text
}

/// A request, frame or connection refused, by error code (`unauthorized`, `rate_limited`...).
pub fn rejected(code: &'static str) {
    metrics::counter!("pushhub_rejected_total", "code" => code).increment(1);
}

/// Streaming subscriptions (and parked long polls) opened and closed, per transport: plain
/// atomics, copied into the recorder at scrape time, because a long poll parks and unparks
/// at request rate.
static STREAMS: [[AtomicU64; 2]; TransportKind::COUNT] =
    [const { [const { AtomicU64::new(0) }; 2] }; TransportKind::COUNT];

/// Writes by the fan-out that a socket did not take whole (it would block, or took part):
/// the rest waits in the connection's queue. A rising count means readers or the network are
/// slower than the publish rate.
static BLOCKED_WRITES: AtomicU64 = AtomicU64::new(0);

/// A fan-out write left bytes for the connection's task.
pub(crate) fn blocked_write() {
    BLOCKED_WRITES.fetch_add(1, Ordering::Relaxed);
}

/// A streaming subscription opened or closed.
pub(crate) fn stream(transport: TransportKind, opened: bool) {
    STREAMS[transport.index()][usize::from(!opened)].fetch_add(1, Ordering::Relaxed);
}

/// A subscriber fell a full queue behind: `resync` (read from history) or `disconnect`.
pub(crate) fn slow_consumer(action: &'static str) {
    metrics::counter!("pushhub_slow_consumers_total", "action" => action).increment(1);
}

/// One write to a subscriber, whose oldest message was published at `published_ms` (polls;
/// the fan-out counts its writes in a [`LagTally`]).
pub(crate) fn delivery_lag(transport: TransportKind, published_ms: u64) {
    let lag_ms = now_millis().saturating_sub(published_ms);
    let index = transport.index();
    LAG.buckets[index][lag_slot(lag_ms)].fetch_add(1, Ordering::Relaxed);
    LAG.sum_ms[index].fetch_add(lag_ms, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lags_fall_in_the_first_bucket_that_holds_them() {
        assert_eq!(lag_slot(0), 0);
        assert_eq!(lag_slot(1), 0);
        assert_eq!(lag_slot(2), 1);
        assert_eq!(lag_slot(3), 2);
        assert_eq!(lag_slot(10_000), 12);
        assert_eq!(lag_slot(10_001), 13);
    }
}
