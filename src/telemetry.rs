//! `GET /metrics`: Prometheus text format, through the `metrics` crate and its Prometheus
//! exporter.
//!
//! Hot-path figures (publishes, deliveries, bytes, requests, subscribers) already live in the
//! hub's relaxed atomics for `/stats`; they are copied into the recorder when scraped, so a
//! delivery pays nothing extra. Events that are rare or per write (rejections, slow
//! consumers, stream opens and closes, the delivery lag of each write) are recorded where
//! they happen.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::{AppState, hub::Transport, message::now_millis};

/// Buckets of the delivery lag histogram, seconds.
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("pushhub_delivery_lag_seconds".into()),
                LAG_BUCKETS,
            )
            .expect("non-empty buckets");
        let recorder = builder.build_recorder();
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

/// Folds recorded histogram samples into their buckets every second until `stop`: the
/// exporter keeps raw samples until then, which without scrapes would grow with every write.
pub async fn run_upkeep(stop: tokio_util::sync::CancellationToken) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ticker.tick() => handle().run_upkeep(),
            () = stop.cancelled() => return,
        }
    }
}

fn label(transport: Transport) -> &'static str {
    match transport {
        Transport::Poll => "poll",
        Transport::Longpoll => "longpoll",
        Transport::Sse => "sse",
        Transport::Ws => "ws",
    }
}

const TRANSPORTS: [Transport; 4] = [
    Transport::Poll,
    Transport::Longpoll,
    Transport::Sse,
    Transport::Ws,
];

/// The scrape: the hub's counters copied in, then everything rendered.
pub fn render(app: &AppState) -> String {
    let stats = app.hub.stats();
    metrics::gauge!("pushhub_topics").set(stats.topics as f64);
    metrics::gauge!("pushhub_open_connections").set(app.connections.open() as f64);
    metrics::counter!("pushhub_publishes_total").absolute(stats.publishes);
    let by_transport = |t: Transport, counts: &crate::hub::TransportCounts| match t {
        Transport::Poll => counts.poll,
        Transport::Longpoll => counts.longpoll,
        Transport::Sse => counts.sse,
        Transport::Ws => counts.ws,
    };
    for transport in TRANSPORTS {
        let name = label(transport);
        let subscribers = match transport {
            Transport::Poll => stats.subscribers.poll,
            Transport::Longpoll => stats.subscribers.longpoll,
            Transport::Sse => stats.subscribers.sse,
            Transport::Ws => stats.subscribers.ws,
        };
        metrics::gauge!("pushhub_subscribers", "transport" => name).set(subscribers as f64);
        metrics::counter!("pushhub_deliveries_total", "transport" => name)
            .absolute(by_transport(transport, &stats.deliveries));
        metrics::counter!("pushhub_sent_bytes_total", "transport" => name)
            .absolute(by_transport(transport, &stats.bytes));
        metrics::counter!("pushhub_requests_total", "transport" => name)
            .absolute(by_transport(transport, &stats.requests));
    }
    let handle = handle();
    handle.run_upkeep();
    handle.render()
}

/// A request, frame or connection refused, by error code (`unauthorized`, `rate_limited`...).
pub fn rejected(code: &'static str) {
    metrics::counter!("pushhub_rejected_total", "code" => code).increment(1);
}

/// A streaming subscription opened or closed.
pub(crate) fn stream(transport: Transport, opened: bool) {
    let event = if opened { "opened" } else { "closed" };
    metrics::counter!("pushhub_stream_subscriptions_total", "transport" => label(transport), "event" => event)
        .increment(1);
}

/// A subscriber fell a full queue behind: `resync` (read from history) or `disconnect`.
pub(crate) fn slow_consumer(action: &'static str) {
    metrics::counter!("pushhub_slow_consumers_total", "action" => action).increment(1);
}

/// One write to a subscriber, whose oldest message was published at `published_ms`.
///
/// The histogram handles are looked up once: building a labelled key per write cost more
/// than the write's own user-space work.
pub(crate) fn delivery_lag(transport: Transport, published_ms: u64) {
    static LAG: OnceLock<[metrics::Histogram; 4]> = OnceLock::new();
    let lag = LAG.get_or_init(|| {
        TRANSPORTS
            .map(|t| metrics::histogram!("pushhub_delivery_lag_seconds", "transport" => label(t)))
    });
    let seconds = now_millis().saturating_sub(published_ms) as f64 / 1000.0;
    lag[transport as usize].record(seconds);
}
