//! One phase: one transport measured on one server. Connect the subscribers (in batches,
//! until the server counts them all), publish (or stay idle) while the server's CPU, RSS and
//! request counts are sampled, wait for every subscriber to drain, then add up what the
//! subscribers saw and what the server spent.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    BenchArgs, BenchError, PhaseResult, Scenario, ServerUsage,
    accounting::{Percentiles, Tracker, now_micros},
    procfs::CpuTimes,
    publisher,
    route::{Route, Wire},
    server::{Server, rss_of},
    subscriber::{self, Listing, Phase},
};
use crate::message::TransportKind;

/// Subscribers connected at once while ramping up.
const RAMP_BATCH: usize = 100;

/// The subscribers' tasks, each answering with its index and what it saw.
type Subscribers = JoinSet<Result<(usize, Tracker), BenchError>>;

/// Runs one phase of `transport` at `rate` on `server`.
pub(super) async fn run_phase(
    args: &BenchArgs,
    server: &Server,
    route: &Route,
    http: &reqwest::Client,
    transport: TransportKind,
    rate: f64,
) -> Result<PhaseResult, BenchError> {
    let run = PhaseRun {
        args,
        server,
        route,
        http,
        transport,
        rate,
    };
    let phase = run.prepare().await?;
    let rss_before = server.rss_kib();
    let progress = progress_bar(args, transport);
    let (subscribers, connected) = run.connect_all(&phase, &progress, rss_before).await?;
    let watchers = Watchers::start(server, &phase, &progress, connected.rss);
    let measured = run.measure(&phase, &progress, connected).await;
    phase.stop.cancel();
    let peak_rss = watchers.stop().await;
    let status = if measured.load.drained {
        "done"
    } else {
        "not drained"
    };
    progress.finish_with_message(status);
    let seen = collect(subscribers, &phase, &measured.load.last_ids).await?;
    Ok(run.result(&measured, &seen, peak_rss))
}

/// One phase being run: what it runs against (the run's settings, the server, the
/// subscribers' route to it, the HTTP client), the transport and the publish rate.
struct PhaseRun<'a> {
    args: &'a BenchArgs,
    server: &'a Server,
    route: &'a Route,
    http: &'a reqwest::Client,
    transport: TransportKind,
    rate: f64,
}

/// What connecting the subscribers cost the server.
#[derive(Debug, Clone, Copy)]
struct Connected {
    /// RSS before the first subscriber connected, KiB.
    rss_before: Option<u64>,
    /// RSS once the server counted them all, KiB.
    rss: Option<u64>,
    /// Server CPU per connect, µs.
    cpu_us_per_connect: Option<f64>,
}

/// What the measured window (publish and drain, or idle) gave.
struct Measured {
    /// What the load did.
    load: Load,
    /// How long it took.
    elapsed: Duration,
    /// What the server spent.
    window: Window,
    /// What crossed the link, when there is one.
    wire: Option<Wire>,
}

impl PhaseRun<'_> {
    /// The phase's shared state: fresh topics, and a progress and a served flag per
    /// subscriber. For Durable Streams, its topics are also created as streams.
    async fn prepare(&self) -> Result<Arc<Phase>, BenchError> {
        let k = usize::from(self.args.topics_per_subscriber);
        let listing = match (k, self.args.topic_pattern) {
            (1, _) => Listing::One,
            (k, false) if self.args.distinct_lists => Listing::Spread(k),
            (k, false) => Listing::List(k),
            (k, true) => Listing::Pattern(k),
        };
        let phase = Arc::new(Phase {
            bases: self.route.bases(),
            topics: topics(self.args, self.transport),
            listing,
            poll_interval: self.args.poll_interval,
            resume: self.route.link.is_some(),
            progress: (0..self.args.subscribers)
                .map(|_| Default::default())
                .collect(),
            served: (0..self.args.subscribers)
                .map(|_| Default::default())
                .collect(),
            others: (0..self.args.subscribers)
                .map(|_| Default::default())
                .collect(),
            stop: CancellationToken::new(),
        });
        if self.transport.is_durable() {
            // A Durable Streams read needs a stream: the phase's topics become JSON streams, and
            // the publisher's publishes are their appends.
            for topic in &phase.topics {
                create_stream(self.http, self.server.first_base(), topic).await?;
            }
        }
        if let Listing::List(k) | Listing::Spread(k) | Listing::Pattern(k) = phase.listing {
            // The other topics hold a message each before the subscribers connect, as rooms
            // with history do (a pattern picks up only topics that exist), so that each
            // subscriber's cursor names every one of them.
            for topic in &phase.topics {
                for filler in Listing::fillers(topic, k) {
                    let url = format!("{}/topics/{filler}", self.server.first_base());
                    // A payload the subscribers' parser reads (their accounting leaves it
                    // out by topic).
                    let sent = self
                        .http
                        .post(url)
                        .header("content-type", "application/json")
                        .body(r#"{"t":0}"#)
                        .send()
                        .await;
                    if !sent.is_ok_and(|r| r.status().is_success()) {
                        return Err(BenchError::Client(format!("could not make topic {filler}")));
                    }
                }
            }
        }
        for i in 0..self.args.pattern_watchers {
            let path = format!("/topics/{}-nomatch-{i}.*/sse", phase.topics[0]);
            let base = phase.base_of(i).to_owned();
            tokio::spawn(subscriber::watch(base, path, phase.stop.clone()));
        }
        Ok(phase)
    }

    /// Connects every subscriber and waits until the server counts them all; returns their
    /// tasks and what connecting them cost the server (RSS from `rss_before`, CPU).
    async fn connect_all(
        &self,
        phase: &Arc<Phase>,
        progress: &indicatif::ProgressBar,
        rss_before: Option<u64>,
    ) -> Result<(Subscribers, Connected), BenchError> {
        let (args, server) = (self.args, self.server);
        let connect_cpu_start = server.cpu_ns();
        let mut subscribers = connect(args, phase, self.transport, progress).await;
        wait_subscribed(
            self.http,
            &server.bases(),
            phase,
            self.transport,
            args.subscribers,
            &mut subscribers,
        )
        .await?;
        let rss = server.rss_kib();
        let count = args.subscribers as f64;
        let cpu_us_per_connect = server
            .cpu_ns()
            .zip(connect_cpu_start)
            .map(|(end, start)| end.saturating_sub(start) as f64 / 1000.0 / count);
        let connected = Connected {
            rss_before,
            rss,
            cpu_us_per_connect,
        };
        Ok((subscribers, connected))
    }

    /// Applies the load (publish and drain, or stay idle), reading the server's CPU, RSS and
    /// counts and the link's counters on both sides of it.
    async fn measure(
        &self,
        phase: &Phase,
        progress: &indicatif::ProgressBar,
        connected: Connected,
    ) -> Measured {
        let (server, http, transport) = (self.server, self.http, self.transport);
        let counted_start = server_counts(http, &server.bases(), transport).await;
        let wire_start = self.route.wire();
        let cpu_start = server.cpu_times();
        let (redis_start, nodes_start) = (server.redis_cpu_ns(), server.node_cpu_ns());
        show_load(self.args, progress);
        let started = Instant::now();
        let load = apply_load(self.args, self.rate, server, phase, transport).await;
        let elapsed = started.elapsed();
        let window = Window {
            cpu: cpu_start.zip(server.cpu_times()),
            redis_cpu_ns: server
                .redis_cpu_ns()
                .zip(redis_start)
                .map(|(end, start)| end.saturating_sub(start)),
            node_cpu_ns: server.node_cpu_ns().zip(nodes_start).map(|(end, start)| {
                end.iter()
                    .zip(start)
                    .map(|(end, start)| end.saturating_sub(start))
                    .collect()
            }),
            rss: (connected.rss_before, connected.rss, server.rss_kib()),
            counted: counted_start.zip(server_counts(http, &server.bases(), transport).await),
            connect_cpu: connected.cpu_us_per_connect,
        };
        let wire = self
            .route
            .wire()
            .zip(wire_start)
            .map(|(end, start)| end.since(start));
        Measured {
            load,
            elapsed,
            window,
            wire,
        }
    }

    /// The phase's result: what the load did, what the server spent (`peak_rss` its highest
    /// RSS, KiB) and what the subscribers saw, per delivery where it says so.
    fn result(&self, measured: &Measured, seen: &Seen, peak_rss: u64) -> PhaseResult {
        let (args, load, window) = (self.args, &measured.load, &measured.window);
        let wire = measured.wire;
        let deliveries = seen.total.received;
        let per_delivery = |v: u64| {
            if deliveries == 0 {
                0.0
            } else {
                v as f64 / deliveries as f64
            }
        };
        PhaseResult {
            transport: self.transport.name().to_owned(),
            rate: self.rate,
            publish_rate: load.publish_rate,
            subscribers: args.subscribers,
            published: load.published,
            deliveries,
            // Fresh topics: a topic's last id is how many messages it got.
            expected_deliveries: (0..args.subscribers)
                .map(|i| load.last_ids[i % load.last_ids.len()])
                .sum(),
            lost: seen.total.missing,
            undelivered: seen.total.undelivered,
            duplicates: seen.total.duplicates,
            publish_errors: load.errors,
            latency_ms: Percentiles::of(&seen.total.latency),
            nodes: self.server.nodes.len(),
            cross_node_latency_ms: seen.total.cross_node.as_ref().map(Percentiles::of),
            redis_us_per_publish: window
                .redis_cpu_ns
                .filter(|_| load.published > 0)
                .map(|ns| ns as f64 / 1000.0 / load.published as f64),
            node_cpu_us_per_delivery: window.per_node_cpu_us_per_delivery(&seen.per_node),
            deliveries_per_second: deliveries as f64 / measured.elapsed.as_secs_f64(),
            requests_per_delivery: per_delivery(seen.total.requests),
            bytes_per_delivery: per_delivery(seen.total.bytes),
            drained: load.drained,
            server: window.usage(deliveries, args.subscribers, peak_rss),
            floor_ratio: None,
            link: self.route.link.as_ref().map(ToString::to_string),
            wire_bytes_per_delivery: wire.map(|w| per_delivery(w.bytes)),
            server_wire_bytes_per_delivery: window
                .counted
                .map(|(start, end)| per_delivery(end.wire_bytes.saturating_sub(start.wire_bytes))),
            link_cuts: wire.map(|w| w.cuts),
            reconnects: seen.total.reconnects,
            recovery_ms: (seen.total.reconnects > 0).then(|| Percentiles::of(&seen.total.recovery)),
            failure: None,
        }
    }
}

/// Creates `topic` as a Durable Streams JSON stream.
pub(super) async fn create_stream(
    http: &reqwest::Client,
    base: &str,
    topic: &str,
) -> Result<(), BenchError> {
    let response = http
        .put(format!("{base}/v1/stream/{topic}"))
        .header("content-type", "application/json")
        .send()
        .await
        .map_err(|e| BenchError::Client(format!("creating stream {topic}: {e}")))?;
    if response.status() != 201 {
        return Err(BenchError::Client(format!(
            "creating stream {topic}: answered {}",
            response.status()
        )));
    }
    Ok(())
}

/// Fresh topics for a phase: one, or `--topics` of them for the chat scenario.
fn topics(args: &BenchArgs, transport: TransportKind) -> Vec<String> {
    let prefix = format!("bench-{transport}-{:x}", now_micros());
    match args.scenario {
        Scenario::Chat => (0..args.topics.clamp(1, args.subscribers))
            .map(|k| format!("{prefix}-{k}"))
            .collect(),
        _ => vec![prefix],
    }
}

fn progress_bar(args: &BenchArgs, transport: TransportKind) -> indicatif::ProgressBar {
    let progress = indicatif::ProgressBar::new(args.subscribers as u64).with_style(
        indicatif::ProgressStyle::with_template("{prefix:>9} {msg:<12} [{bar:30}] {pos}/{len}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    progress.set_prefix(transport.name());
    progress.set_message("connecting");
    progress
}

/// Turns the progress bar from counting connections to counting the load's milliseconds.
fn show_load(args: &BenchArgs, progress: &indicatif::ProgressBar) {
    progress.set_message(match args.scenario {
        Scenario::Fanout | Scenario::Throughput | Scenario::Chat | Scenario::Compare => {
            "publishing"
        }
        Scenario::Idle => "idle",
    });
    progress.set_length(args.duration.as_millis() as u64);
    progress.set_position(0);
}

/// Starts every subscriber, `RAMP_BATCH` at a time: a ramp, not a connect storm.
async fn connect(
    args: &BenchArgs,
    phase: &Arc<Phase>,
    transport: TransportKind,
    progress: &indicatif::ProgressBar,
) -> Subscribers {
    let mut subscribers = JoinSet::new();
    for index in 0..args.subscribers {
        progress.inc(1);
        let phase = phase.clone();
        subscribers.spawn(async move { subscriber::run(transport, phase, index).await });
        if (index + 1) % RAMP_BATCH == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    subscribers
}

/// Tasks that run beside the load: the server's peak RSS, sampled, and the progress bar.
struct Watchers {
    peak: Arc<AtomicU64>,
    sampler: Option<JoinHandle<()>>,
    ticker: JoinHandle<()>,
}

impl Watchers {
    fn start(
        server: &Server,
        phase: &Phase,
        progress: &indicatif::ProgressBar,
        rss_connected: Option<u64>,
    ) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_connected.unwrap_or(0)));
        let sampler = server.pids().map(|pids| {
            let (peak, stop) = (peak.clone(), phase.stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    if let Some(rss) = rss_of(&pids) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        let (progress, stop) = (progress.clone(), phase.stop.clone());
        let started = Instant::now();
        let ticker = tokio::spawn(async move {
            while !stop.is_cancelled() {
                progress.set_position(started.elapsed().as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self {
            peak,
            sampler,
            ticker,
        }
    }

    /// Waits for both to see the phase's stop; returns the peak RSS seen, KiB.
    async fn stop(self) -> u64 {
        if let Some(sampler) = self.sampler {
            let _ = sampler.await;
        }
        let _ = self.ticker.await;
        self.peak.load(Ordering::Relaxed)
    }
}

/// What the load phase did.
struct Load {
    /// The newest id of each topic.
    last_ids: Vec<u64>,
    published: u64,
    errors: u64,
    publish_rate: f64,
    drained: bool,
}

/// Publishes at `rate` and waits for the drain, or (idle) waits out the duration.
async fn apply_load(
    args: &BenchArgs,
    rate: f64,
    server: &Server,
    phase: &Phase,
    transport: TransportKind,
) -> Load {
    match args.scenario {
        Scenario::Fanout | Scenario::Throughput | Scenario::Chat | Scenario::Compare => {
            let started = Instant::now();
            let (last_ids, published, errors) =
                publisher::publish(args, rate, &server.bases(), &phase.topics, transport).await;
            let publish_rate = published as f64 / started.elapsed().as_secs_f64();
            let drained = wait_drained(phase, &last_ids, args.drain_timeout).await;
            Load {
                last_ids,
                published,
                errors,
                publish_rate,
                drained,
            }
        }
        Scenario::Idle => {
            tokio::time::sleep(args.duration).await;
            Load {
                last_ids: vec![0; phase.topics.len()],
                published: 0,
                errors: 0,
                publish_rate: 0.0,
                drained: true,
            }
        }
    }
}

/// What the server spent in the measured window.
struct Window {
    /// CPU times at its start and end.
    cpu: Option<(CpuTimes, CpuTimes)>,
    /// CPU the Redis processes the bench started used in it, ns.
    redis_cpu_ns: Option<u64>,
    /// CPU each node used in it, ns, in the nodes' order.
    node_cpu_ns: Option<Vec<u64>>,
    /// RSS before connecting, once connected, at the end, KiB.
    rss: (Option<u64>, Option<u64>, Option<u64>),
    /// The server's counts at its start and end.
    counted: Option<(Counted, Counted)>,
    /// Server CPU per connect, µs.
    connect_cpu: Option<f64>,
}

impl Window {
    /// Each node's CPU over the deliveries its own subscribers received, µs (with several
    /// nodes; a node's CPU also pays for the publishes it took and the messages it relayed).
    fn per_node_cpu_us_per_delivery(&self, per_node: &[u64]) -> Vec<f64> {
        match &self.node_cpu_ns {
            Some(cpu) if cpu.len() > 1 => cpu
                .iter()
                .zip(per_node)
                .map(|(&ns, &deliveries)| ns as f64 / 1000.0 / deliveries.max(1) as f64)
                .collect(),
            _ => Vec::new(),
        }
    }

    fn usage(&self, deliveries: u64, subscribers: usize, peak_rss_kib: u64) -> Option<ServerUsage> {
        let (start, end) = self.cpu?;
        let (Some(before), Some(connected), Some(rss_end)) = self.rss else {
            return None;
        };
        let used = end.since(start);
        let cpu = used.total().as_secs_f64();
        let requests = self
            .counted
            .map(|(start, end)| end.requests.saturating_sub(start.requests));
        Some(ServerUsage {
            cpu_seconds: cpu,
            cpu_system_share: if cpu > 0.0 {
                used.system.as_secs_f64() / cpu
            } else {
                0.0
            },
            cpu_us_per_delivery: if deliveries == 0 {
                0.0
            } else {
                cpu * 1e6 / deliveries as f64
            },
            requests,
            cpu_us_per_request: requests.filter(|&n| n > 0).map(|n| cpu * 1e6 / n as f64),
            cpu_us_per_connect: self.connect_cpu,
            peak_rss_kib,
            rss_per_subscriber_kib: connected.saturating_sub(before) as f64 / subscribers as f64,
            rss_growth_kib: rss_end as i64 - connected as i64,
        })
    }
}

/// What the subscribers saw, added up.
struct Seen {
    /// Every subscriber's counts and latencies together (the cross-node latencies too).
    total: Tracker,
    /// Deliveries received by the subscribers of each node, in the nodes' order.
    per_node: Vec<u64>,
}

/// Joins every subscriber and adds up its counts and latencies.
async fn collect(
    mut subscribers: Subscribers,
    phase: &Phase,
    last_ids: &[u64],
) -> Result<Seen, BenchError> {
    let mut seen = Seen {
        total: Tracker::default(),
        per_node: vec![0; phase.bases.len()],
    };
    while let Some(joined) = subscribers.join_next().await {
        let (index, mut tracker) = joined.map_err(|e| BenchError::Client(e.to_string()))??;
        tracker.finish(last_ids[index % last_ids.len()]);
        seen.per_node[phase.node_of(index)] += tracker.received;
        seen.total.add(&tracker);
    }
    Ok(seen)
}

/// What the nodes have counted for one transport since they started (`GET /stats`).
#[derive(Debug, Clone, Copy)]
struct Counted {
    requests: u64,
    /// Body bytes and HTTP head bytes, both ways: what the server put on the wire.
    wire_bytes: u64,
}

/// The nodes' counts for `transport`, summed.
async fn server_counts(
    http: &reqwest::Client,
    bases: &[String],
    transport: TransportKind,
) -> Option<Counted> {
    let mut total = Counted {
        requests: 0,
        wire_bytes: 0,
    };
    for base in bases {
        let stats: serde_json::Value = http
            .get(format!("{base}/stats"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let name = transport.name();
        total.requests += stats["requests"][name].as_u64()?;
        total.wire_bytes +=
            stats["bytes"][name].as_u64()? + stats["head_bytes"][name].as_u64().unwrap_or(0);
    }
    Some(total)
}

/// Waits until the server counts every subscriber of the phase, or (behind a link that cuts,
/// where all of them may never be connected at the same moment) until each has been served
/// at least once.
pub(super) async fn wait_subscribed(
    http: &reqwest::Client,
    bases: &[String],
    phase: &Phase,
    transport: TransportKind,
    expected: usize,
    subscribers: &mut JoinSet<Result<(usize, Tracker), BenchError>>,
) -> Result<(), BenchError> {
    // A pattern picks its topic up at the topic's first message, published later: its
    // subscribers are counted on a topic it picked up already.
    let topics: Vec<String> = match phase.listing {
        Listing::Pattern(_) => phase.topics.iter().map(|t| format!("{t}.f1")).collect(),
        _ => phase.topics.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // A subscriber that ended already could not connect.
        if let Some(joined) = subscribers.try_join_next() {
            return Err(match joined {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => {
                    BenchError::Client("a subscriber ended before publishing began".into())
                }
                Err(e) => BenchError::Client(e.to_string()),
            });
        }
        let all_served = phase.served.iter().all(|s| s.load(Ordering::Relaxed));
        // A Durable Streams reader resumes by offset, so once served (its SSE response open,
        // its first catch-up read answered) it misses nothing; and the server may not be
        // pushhub (the Node reference server has no /topics). A short poller likewise holds
        // its cursor once its first poll is answered: the bench's pollers are anonymous (a
        // `client=` would name them in presence), so the server tells them apart only by
        // address, which they share.
        if all_served
            && (transport.is_durable()
                || (transport == TransportKind::Poll && phase.caught_up_on_others()))
        {
            return Ok(());
        }
        let mut counted = 0;
        for (base, topic) in bases
            .iter()
            .flat_map(|b| topics.iter().map(move |t| (b, t)))
            .filter(|_| !transport.is_durable())
        {
            let info: serde_json::Value = http
                .get(format!("{base}/topics/{topic}"))
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| BenchError::Server(e.to_string()))?
                .json()
                .await
                .map_err(|e| BenchError::Server(e.to_string()))?;
            counted += info["subscribers"][transport.name()].as_u64().unwrap_or(0) as usize;
        }
        // Counted at subscribe, a subscriber following several topics is then sent its
        // other topics' messages: the window starts once each has them, so that it measures
        // deliveries and not that catch-up (which `cpu_us_per_connect` counts).
        let caught_up = phase.caught_up_on_others();
        if (counted >= expected || (phase.resume && all_served)) && caught_up {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Server(if caught_up {
                format!("only {counted} of {expected} {transport} subscribers connected")
            } else {
                format!(
                    "{transport} subscribers did not all receive the {} messages of their other topics",
                    phase.listing.others()
                )
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every subscriber has received its topic's last id, or the timeout passes.
pub(super) async fn wait_drained(phase: &Phase, last_ids: &[u64], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let caught_up = phase
            .progress
            .iter()
            .enumerate()
            .all(|(i, p)| p.load(Ordering::Relaxed) >= last_ids[i % last_ids.len()]);
        if caught_up {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
