//! What a run measures, as the report and `results.json` show it: one [`PhaseResult`] per
//! transport, the server's usage, and the run's [`Run`] with its floor.

use serde::Serialize;

use super::{accounting::Percentiles, floor};

/// What can stop a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The server could not be started or reached.
    #[error("server: {0}")]
    Server(String),
    /// A bench client failed.
    #[error("client: {0}")]
    Client(String),
    /// The run was set up wrongly.
    #[error("{0}")]
    Setup(String),
    /// Writing the report failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Server resources used during a phase (known when the server's PID is).
#[derive(Debug, Clone, Serialize)]
pub struct ServerUsage {
    /// CPU seconds used from the first publish to the end of the drain.
    pub cpu_seconds: f64,
    /// The kernel's share of those CPU seconds (system time / total), 0 to 1.
    pub cpu_system_share: f64,
    /// CPU microseconds per delivered message.
    pub cpu_us_per_delivery: f64,
    /// Requests the server counted for this transport in the same window (polls, or stream
    /// connections), when its `/stats` could be read.
    pub requests: Option<u64>,
    /// CPU microseconds per request: for pollers that get nothing (the `idle` scenario), the
    /// cost of an empty poll.
    pub cpu_us_per_request: Option<f64>,
    /// Server CPU to accept and subscribe one subscriber, µs (from connecting the first to
    /// the server counting the last).
    pub cpu_us_per_connect: Option<f64>,
    /// Highest RSS seen during the phase, KiB.
    pub peak_rss_kib: u64,
    /// RSS added by connecting the subscribers, per subscriber, KiB.
    pub rss_per_subscriber_kib: f64,
    /// RSS at the end of the drain minus RSS once the subscribers were connected, KiB: what
    /// publishing added (history fills up to its bound, then this stays flat).
    pub rss_growth_kib: i64,
}

/// The measurements of one transport.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    /// Transport measured.
    pub transport: String,
    /// Publish rate asked for, msg/s.
    pub rate: f64,
    /// Publish rate the bench achieved, msg/s.
    pub publish_rate: f64,
    /// Subscribers connected.
    pub subscribers: usize,
    /// Messages the server acknowledged.
    pub published: u64,
    /// Distinct deliveries received, all subscribers together.
    pub deliveries: u64,
    /// `published × subscribers`.
    pub expected_deliveries: u64,
    /// Messages never received, all subscribers together.
    pub lost: u64,
    /// Of `lost`, the tail not received by the end of the drain (held on the way, or not
    /// caught up), as opposed to ids skipped.
    pub undelivered: u64,
    /// Messages received more than once.
    pub duplicates: u64,
    /// Publishes the server refused or failed.
    pub publish_errors: u64,
    /// Delivery latency, ms.
    pub latency_ms: Percentiles,
    /// Server nodes the subscribers were spread over (publishes go through each in turn).
    pub nodes: usize,
    /// With several nodes: latency of the deliveries published through another node than
    /// the subscriber's (the message went through the shared store), ms.
    pub cross_node_latency_ms: Option<Percentiles>,
    /// Redis CPU per acknowledged publish, µs, when the bench started the Redis
    /// (`--redis-start`): every Redis process, primaries and replicas, over the publish and
    /// drain window.
    pub redis_us_per_publish: Option<f64>,
    /// With several nodes: each node's CPU per delivery its own subscribers received, µs,
    /// in the nodes' order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub node_cpu_us_per_delivery: Vec<f64>,
    /// Deliveries per second over the publish and drain window.
    pub deliveries_per_second: f64,
    /// Requests (polls) or connections (streams) per delivery.
    pub requests_per_delivery: f64,
    /// Body bytes received per delivery.
    pub bytes_per_delivery: f64,
    /// Whether every subscriber caught up before the drain timeout.
    pub drained: bool,
    /// Server CPU and memory, when measurable.
    pub server: Option<ServerUsage>,
    /// Server CPU per delivery (per request, for pollers that got nothing) divided by the
    /// write floor measured in the same run.
    pub floor_ratio: Option<f64>,
    /// The link the subscribers were behind (`3g+buffering-proxy`), if any.
    pub link: Option<String>,
    /// Behind a link: bytes that crossed it both ways per delivery, over the publish and
    /// drain window: request and response heads, framing, bodies, heartbeats; what the
    /// network carries, counted by the proxy in front of the server.
    pub wire_bytes_per_delivery: Option<f64>,
    /// The same as the server counts it (`GET /stats`: body bytes plus HTTP heads both ways)
    /// per delivery, over the same window; with or without a link.
    pub server_wire_bytes_per_delivery: Option<f64>,
    /// Connections the link cut (or an idle cutter closed) in that window.
    pub link_cuts: Option<u64>,
    /// Times subscribers lost their connection and were served again.
    pub reconnects: u64,
    /// From noticing a lost connection to being served again, ms (when there were any).
    pub recovery_ms: Option<Percentiles>,
    /// Why the phase could not be measured (a subscriber refused, say), when it could not.
    pub failure: Option<String>,
}

impl PhaseResult {
    /// A phase that could not run, and why (behind a link, a refusal is a finding).
    pub fn failed(
        transport: &str,
        rate: f64,
        subscribers: usize,
        link: Option<String>,
        reason: String,
    ) -> PhaseResult {
        PhaseResult {
            transport: transport.to_owned(),
            rate,
            publish_rate: 0.0,
            subscribers,
            published: 0,
            deliveries: 0,
            expected_deliveries: 0,
            lost: 0,
            undelivered: 0,
            duplicates: 0,
            publish_errors: 0,
            latency_ms: Percentiles::default(),
            nodes: 1,
            cross_node_latency_ms: None,
            redis_us_per_publish: None,
            node_cpu_us_per_delivery: Vec::new(),
            deliveries_per_second: 0.0,
            requests_per_delivery: 0.0,
            bytes_per_delivery: 0.0,
            drained: false,
            server: None,
            floor_ratio: None,
            link,
            wire_bytes_per_delivery: None,
            server_wire_bytes_per_delivery: None,
            link_cuts: None,
            reconnects: 0,
            recovery_ms: None,
            failure: Some(reason),
        }
    }

    /// Loss, duplicates or an incomplete drain mean the run overloaded the server (or the
    /// bench host): the report says so instead of presenting the figures as clean.
    pub fn overloaded(&self) -> bool {
        self.lost > 0
            || self.duplicates > 0
            || !self.drained
            || self.publish_errors > 0
            || self.failure.is_some()
    }

    /// The bench's own publisher fell more than 10% short of the asked rate: past this point
    /// a search measures the bench, not the server.
    pub fn publisher_limited(&self) -> bool {
        self.published > 0 && self.publish_rate < 0.9 * self.rate
    }
}

/// What one run measured: the write floor and each transport.
#[derive(Debug, Clone)]
pub struct Run {
    /// The write floor of this run, when it could be measured.
    pub floor: Option<floor::Floor>,
    /// One result per transport.
    pub results: Vec<PhaseResult>,
}
