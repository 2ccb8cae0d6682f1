//! `pushhub bench`: a load benchmark of each push transport against a real server.
//!
//! First the write floor is measured ([`floor`]): what one socket write costs on this
//! machine, with the run's subscriber count, rate and frame size. Then, for each transport in
//! turn, on a fresh server (a child started on an ephemeral port; with `--url`, the running
//! one): a short warm-up (a few subscribers, a few messages), then open N subscribers (in
//! batches, not a connect storm), wait until the server counts them all, publish at a fixed
//! rate for a duration, wait for every subscriber to drain, then close them. A fresh server
//! per transport means the memory and CPU one transport leaves behind are not charged to, or
//! reused by, the next. Subscribers and publisher run in this process; the server runs in its
//! own, so its CPU and memory are read apart from `/proc/PID`.
//!
//! Every message carries its publish time in µs; each subscriber records latency in an HDR
//! histogram and accounts loss and duplicates by id ([`accounting::Tracker`]).

pub mod accounting;
pub mod floor;
pub mod http;
pub mod procfs;
pub mod report;
mod subscriber;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use clap::Args;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{config::parse_duration, message::TransportKind};
use accounting::{Percentiles, Tracker, latency_histogram, now_micros};
use subscriber::Phase;

/// Subscribers connected at once while ramping up.
const RAMP_BATCH: usize = 100;
/// Publishes in flight at once.
const PUBLISH_CONCURRENCY: usize = 16;

/// What a phase does once its subscribers are connected.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Publish at `--rate` for `--duration` to every subscriber of one topic.
    Fanout,
    /// Publish nothing for `--duration`: server memory and CPU per idle connection.
    Idle,
    /// Many topics (`--topics`), each with a few of the subscribers; the publish rate is spread
    /// over them, as in a chat service with many rooms.
    Chat,
    /// Search for the highest rate delivered with no loss: start at `--rate`, double while
    /// it holds, then bisect (within 15%) once it does not.
    Throughput,
}

/// Flags of `pushhub bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Server to measure; without it a pushhub server is started as a child process on
    /// 127.0.0.1 with an ephemeral port. Several (comma-separated or repeated) are nodes
    /// of one cluster: subscribers are spread over them, the publisher uses the first.
    #[arg(long, value_delimiter = ',')]
    pub url: Vec<String>,
    /// PIDs of the `--url` servers, in the same order, to read their CPU and memory (a
    /// child's is known).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Without `--url`: how many server nodes to start. More than one needs the nodes to
    /// share topics, e.g. `--server-arg=--redis=redis://127.0.0.1:6379`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub nodes: u16,
    /// Allow a `--url` that is not a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
    /// What to measure: `fanout` (many subscribers of one topic, steady rate), `idle`
    /// (connected subscribers, no traffic), `chat` (many topics with a few subscribers each)
    /// or `throughput` (the highest rate delivered with no loss).
    #[arg(long, value_enum, default_value = "fanout")]
    pub scenario: Scenario,
    /// Transports to measure, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ws,sse,longpoll,poll",
        value_enum
    )]
    pub transports: Vec<TransportKind>,
    /// Topics of the `chat` scenario (the others use one topic).
    #[arg(long, default_value_t = 100)]
    pub topics: usize,
    /// Subscribers per transport.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Messages published per second.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// How long to publish, per transport.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Size of each message's payload.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Interval of the short-poll subscribers.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// How long to wait after the last publish for subscribers to catch up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Where report.md, results.json and latency.svg are written.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// An argument for the server started as a child, e.g. `--server-arg=--write-delay=5ms`;
    /// repeat for several.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// The pushhub binary to start as the server (default: this executable).
    #[arg(long, hide = true)]
    pub server_bin: Option<PathBuf>,
    /// How the bench and the server it starts share the CPUs: `split` gives the server the
    /// first half of the CPUs this process may use and the bench's clients the rest (as
    /// `taskset` would), so that neither steals the other's time and the server runs one
    /// worker per CPU it has; `shared` lets both use every CPU.
    #[arg(long, value_enum, default_value = "split")]
    pub cpus: CpuMode,
}

/// How the bench and its server share the CPUs (`--cpus`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuMode {
    /// The server gets the first half of the CPUs, the bench the rest.
    Split,
    /// Both use every CPU.
    Shared,
}

/// The CPUs of the server and of the bench's clients under `--cpus split`: `None` when
/// there is only one CPU to share (or the mode is `shared`).
pub fn cpu_split(mode: CpuMode) -> Option<(Vec<usize>, Vec<usize>)> {
    if mode == CpuMode::Shared {
        return None;
    }
    let cpus = affinity::current()?;
    if cpus.len() < 2 {
        return None;
    }
    let (server, client) = cpus.split_at(cpus.len().div_ceil(2));
    Some((server.to_vec(), client.to_vec()))
}

/// CPU affinity of threads and child processes (Linux).
pub mod affinity {
    /// The CPUs the calling thread may run on.
    pub fn current() -> Option<Vec<usize>> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the call fills it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        (ok == 0).then(|| {
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
                .collect()
        })
    }

    /// Restricts the calling thread (and the threads and processes it starts later) to
    /// `cpus`.
    pub fn pin(cpus: &[usize]) -> std::io::Result<()> {
        // SAFETY: building a cpu_set_t from CPU numbers below CPU_SETSIZE.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        let ok = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
        if ok == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

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
    /// Messages received more than once.
    pub duplicates: u64,
    /// Publishes the server refused or failed.
    pub publish_errors: u64,
    /// Delivery latency, ms.
    pub latency_ms: Percentiles,
    /// Server nodes the subscribers were spread over (the publisher posts to the first).
    pub nodes: usize,
    /// With several nodes: latency of the subscribers on the nodes the publisher did not
    /// post to (the message went through the shared store), ms.
    pub cross_node_latency_ms: Option<Percentiles>,
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
}

impl PhaseResult {
    /// Loss, duplicates or an incomplete drain mean the run overloaded the server (or the
    /// bench host): the report says so instead of presenting the figures as clean.
    pub fn overloaded(&self) -> bool {
        self.lost > 0 || self.duplicates > 0 || !self.drained || self.publish_errors > 0
    }

    /// The bench's own publisher fell more than 10% short of the asked rate: past this point
    /// a search measures the bench, not the server.
    pub fn publisher_limited(&self) -> bool {
        self.published > 0 && self.publish_rate < 0.9 * self.rate
    }
}

/// The servers measured: one node, or the nodes of a cluster.
struct Server {
    nodes: Vec<Node>,
}

struct Node {
    base: String,
    pid: Option<u32>,
    child: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Server {
    /// The node the publisher posts to.
    fn publisher_base(&self) -> &str {
        &self.nodes[0].base
    }

    fn bases(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.base.clone()).collect()
    }

    /// PIDs of every node, if all are known.
    fn pids(&self) -> Option<Vec<u32>> {
        self.nodes.iter().map(|n| n.pid).collect()
    }

    /// Resident memory of all nodes together.
    fn rss_kib(&self) -> Option<u64> {
        rss_of(&self.pids()?)
    }

    /// CPU time of all nodes together, ns, from the scheduler's exact accounting.
    fn cpu_ns(&self) -> Option<u64> {
        self.pids()?.into_iter().map(procfs::cpu_ns).sum()
    }

    /// CPU time of all nodes together.
    fn cpu_times(&self) -> Option<procfs::CpuTimes> {
        self.pids()?
            .into_iter()
            .map(procfs::cpu_times)
            .try_fold(procfs::CpuTimes::default(), |sum, times| {
                Some(sum.plus(times?))
            })
    }
}

fn rss_of(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&pid| procfs::rss_kib(pid)).sum()
}

fn start_server(args: &BenchArgs) -> Result<Server, BenchError> {
    if !args.url.is_empty() {
        let mut nodes = Vec::new();
        for (index, url) in args.url.iter().enumerate() {
            let base = url.trim_end_matches('/').to_owned();
            let host = base
                .split("://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default();
            let loopback = host.starts_with("127.")
                || host.starts_with("localhost")
                || host.starts_with("[::1]");
            if !loopback && !args.allow_remote {
                return Err(BenchError::Setup(format!(
                    "{url} is not a loopback address: pass --allow-remote to load a remote server"
                )));
            }
            nodes.push(Node {
                base,
                pid: args.server_pid.get(index).copied(),
                child: None,
            });
        }
        return Ok(Server { nodes });
    }
    if args.nodes > 1 && !args.server_args.iter().any(|a| a.starts_with("--redis")) {
        return Err(BenchError::Setup(
            "--nodes above 1 needs shared topics: add --server-arg=--redis=redis://HOST:PORT"
                .into(),
        ));
    }
    let nodes = (0..args.nodes)
        .map(|_| start_node(args))
        .collect::<Result<_, _>>()?;
    Ok(Server { nodes })
}

fn start_node(args: &BenchArgs) -> Result<Node, BenchError> {
    let binary = match &args.server_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?,
    };
    let mut command = Command::new(binary);
    if let Some((server_cpus, _)) = cpu_split(args.cpus) {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure only calls sched_setaffinity, which is async-signal-safe.
        unsafe {
            command.pre_exec(move || affinity::pin(&server_cpus));
        }
    }
    let mut child = command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-poll-limit",
            "1000",
        ])
        .args(&args.server_args)
        .env("PUSHHUB_LOG", "pushhub=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .ok_or_else(|| BenchError::Server("server exited before listening".into()))??;
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split('/').next().unwrap_or_default().to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok(Node {
        base: format!("http://{addr}"),
        pid: Some(child.id()),
        child: Some(child),
    })
}

/// What one run measured: the write floor and each transport.
#[derive(Debug, Clone)]
pub struct Run {
    /// The write floor of this run, when it could be measured.
    pub floor: Option<floor::Floor>,
    /// One result per transport.
    pub results: Vec<PhaseResult>,
}

/// Runs the floor and every phase, and returns their results (the report is written by the
/// caller).
pub async fn run(args: &BenchArgs) -> Result<Run, BenchError> {
    if args.subscribers == 0 || args.rate <= 0.0 {
        return Err(BenchError::Setup(
            "--subscribers and --rate must be positive".into(),
        ));
    }
    // Each subscriber holds a socket; raise the soft open-file limit to the hard one.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .map_err(|e| BenchError::Client(e.to_string()))?;
    let floor = measure_floor(args).await;
    // With `--url` every transport is measured on the same running server(s).
    let shared = if args.url.is_empty() {
        None
    } else {
        Some(start_server(args)?)
    };
    let mut results = Vec::new();
    for &transport in &args.transports {
        eprintln!(
            "bench: {transport}: {} subscribers, {} msg/s for {:?}",
            args.subscribers, args.rate, args.duration
        );
        let fresh = match &shared {
            Some(_) => None,
            None => Some(start_server(args)?),
        };
        let server = shared.as_ref().or(fresh.as_ref()).expect("one of them");
        warm_up(args, server, &http, transport).await?;
        let mut result = match args.scenario {
            Scenario::Throughput => search_throughput(args, server, &http, transport).await?,
            _ => run_phase(args, server, &http, transport, args.rate).await?,
        };
        result.floor_ratio = floor.as_ref().and_then(|floor| floor_ratio(&result, floor));
        results.push(result);
    }
    Ok(Run { floor, results })
}

/// CPU per delivery (or per empty request) over the floor.
fn floor_ratio(result: &PhaseResult, floor: &floor::Floor) -> Option<f64> {
    let server = result.server.as_ref()?;
    if floor.cpu_us_per_delivery <= 0.0 {
        return None;
    }
    let cost = if result.deliveries > 0 {
        server.cpu_us_per_delivery
    } else {
        server.cpu_us_per_request?
    };
    Some(cost / floor.cpu_us_per_delivery)
}

/// The write floor for this run's subscribers, rate, duration and frame size (the
/// WebSocket frame of one of its messages). Pollers of an idle run write one answer per
/// interval each. `None` when the sockets could not be opened (too many for the file limit).
async fn measure_floor(args: &BenchArgs) -> Option<floor::Floor> {
    let rate = match args.scenario {
        Scenario::Idle if args.transports.contains(&TransportKind::Poll) => {
            1.0 / args.poll_interval.as_secs_f64().max(0.001)
        }
        Scenario::Idle => return None,
        _ => args.rate,
    };
    let messages = ((rate * args.duration.as_secs_f64()).round() as usize).max(1);
    let frame_bytes = frame_bytes(args.payload_bytes);
    let subscribers = args.subscribers;
    eprintln!(
        "bench: write floor: {subscribers} sockets, {messages} messages of {frame_bytes} bytes at {rate} msg/s"
    );
    // The writer runs where the server would, the reader where the clients do.
    let writer_cpus = cpu_split(args.cpus).map(|(server, _)| server);
    let measured = tokio::task::spawn_blocking(move || {
        floor::measure(
            subscribers,
            messages,
            rate,
            frame_bytes,
            writer_cpus.as_deref(),
        )
    })
    .await;
    match measured {
        Ok(Ok(floor)) => Some(floor),
        Ok(Err(error)) => {
            eprintln!("bench: the write floor could not be measured: {error}");
            None
        }
        Err(_) => None,
    }
}

/// The size of the WebSocket frame of a bench message with `payload_bytes` of payload.
fn frame_bytes(payload_bytes: usize) -> usize {
    use crate::message::{EventName, Message, Payload, TopicName};
    let topic = TopicName::parse(&format!("bench-ws-{:x}", now_micros())).expect("valid name");
    let body = format!(
        r#"{{"t":{},"p":"{}"}}"#,
        now_micros(),
        "x".repeat(payload_bytes.saturating_sub(30))
    );
    let payload = Payload::from_json(&body).expect("valid JSON");
    let message = Message::new(1000, topic, EventName::default_event(), 1, &payload);
    message.ws_frame().len()
}

/// Connects a few subscribers of `transport`, publishes a few messages to them, and closes
/// them: what a server allocates once (runtime threads' first tasks, the first topics, the
/// first buffers of each kind) is then not counted as the measured subscribers' memory.
async fn warm_up(
    args: &BenchArgs,
    server: &Server,
    http: &reqwest::Client,
    transport: TransportKind,
) -> Result<(), BenchError> {
    const SUBSCRIBERS: usize = 20;
    const MESSAGES: u64 = 20;
    let topic = format!("bench-warmup-{transport}-{:x}", now_micros());
    let phase = Arc::new(Phase {
        bases: server.bases(),
        topics: vec![topic.clone()],
        poll_interval: args.poll_interval.min(Duration::from_millis(100)),
        progress: (0..SUBSCRIBERS).map(|_| Default::default()).collect(),
        stop: CancellationToken::new(),
    });
    let mut subscribers = JoinSet::new();
    for index in 0..SUBSCRIBERS {
        let phase = phase.clone();
        subscribers.spawn(async move { subscriber::run(transport, phase, index).await });
    }
    let topics = [topic];
    wait_subscribed(
        http,
        &server.bases(),
        &topics,
        transport,
        SUBSCRIBERS,
        &mut subscribers,
    )
    .await?;
    let warm_args = BenchArgs {
        duration: Duration::from_millis(100),
        ..args.clone()
    };
    let (last_ids, _, _) = publish(
        &warm_args,
        MESSAGES as f64 * 10.0,
        server.publisher_base(),
        &topics,
    )
    .await;
    wait_drained(&phase, &last_ids, Duration::from_secs(10)).await;
    phase.stop.cancel();
    while subscribers.join_next().await.is_some() {}
    Ok(())
}

/// Doubles the rate while every message reaches every subscriber, then bisects between the
/// last rate that held and the first that did not. Returns the result at the highest rate
/// that held (or the last attempt, marked overloaded, if none did).
async fn search_throughput(
    args: &BenchArgs,
    server: &Server,
    http: &reqwest::Client,
    transport: TransportKind,
) -> Result<PhaseResult, BenchError> {
    let mut rate = args.rate;
    let mut held: Option<PhaseResult> = None;
    let mut failed_at: Option<f64> = None;
    let mut last = None;
    for _ in 0..12 {
        let result = run_phase(args, server, http, transport, rate).await?;
        eprintln!(
            "bench: {transport} at {rate:.0} msg/s: {}",
            if result.overloaded() {
                "lost messages"
            } else if result.publisher_limited() {
                "publisher-limited"
            } else {
                "held"
            }
        );
        if result.overloaded() {
            failed_at = Some(rate);
            last = Some(result);
        } else if result.publisher_limited() {
            // Faster is not measurable from this bench host.
            return Ok(result);
        } else {
            held = Some(result);
        }
        match next_rate(rate, held.as_ref().map(|r| r.rate), failed_at) {
            Some(next) => rate = next,
            None => break,
        }
    }
    held.or(last)
        .ok_or_else(|| BenchError::Setup("throughput search ran no phase".into()))
}

/// The next rate of a throughput search, or `None` when it has converged: double until a
/// rate fails, then bisect between the best rate that held and the lowest that failed, until
/// they are within 15%.
fn next_rate(rate: f64, held: Option<f64>, failed_at: Option<f64>) -> Option<f64> {
    let next = match (held, failed_at) {
        (_, None) => rate * 2.0,
        (Some(good), Some(bad)) if bad / good <= 1.15 => return None,
        (Some(good), Some(bad)) => (good + bad) / 2.0,
        (None, Some(bad)) => bad / 2.0,
    };
    (next >= 1.0).then_some(next)
}

async fn run_phase(
    args: &BenchArgs,
    server: &Server,
    http: &reqwest::Client,
    transport: TransportKind,
    rate: f64,
) -> Result<PhaseResult, BenchError> {
    let prefix = format!("bench-{transport}-{:x}", now_micros());
    let topics: Vec<String> = match args.scenario {
        Scenario::Chat => (0..args.topics.clamp(1, args.subscribers))
            .map(|k| format!("{prefix}-{k}"))
            .collect(),
        _ => vec![prefix],
    };
    let phase = Arc::new(Phase {
        bases: server.bases(),
        topics: topics.clone(),
        poll_interval: args.poll_interval,
        progress: (0..args.subscribers).map(|_| Default::default()).collect(),
        stop: CancellationToken::new(),
    });
    let rss_before = server.rss_kib();
    let connect_cpu_start = server.cpu_ns();

    let progress = indicatif::ProgressBar::new(args.subscribers as u64).with_style(
        indicatif::ProgressStyle::with_template("{prefix:>9} {msg:<12} [{bar:30}] {pos}/{len}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    progress.set_prefix(transport.name());
    progress.set_message("connecting");
    let mut subscribers = JoinSet::new();
    for index in 0..args.subscribers {
        progress.inc(1);
        let phase = phase.clone();
        subscribers.spawn(async move { subscriber::run(transport, phase, index).await });
        if (index + 1) % RAMP_BATCH == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    wait_subscribed(
        http,
        &server.bases(),
        &topics,
        transport,
        args.subscribers,
        &mut subscribers,
    )
    .await?;
    let rss_connected = server.rss_kib();
    let connect_cpu = server
        .cpu_ns()
        .zip(connect_cpu_start)
        .map(|(end, start)| end.saturating_sub(start) as f64 / 1000.0 / args.subscribers as f64);

    // Sample the server's RSS while the phase runs.
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(
        rss_connected.unwrap_or(0),
    ));
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

    let requests_start = server_requests(http, &server.bases(), transport).await;
    let cpu_start = server.cpu_times();
    progress.set_message(match args.scenario {
        Scenario::Fanout | Scenario::Throughput | Scenario::Chat => "publishing",
        Scenario::Idle => "idle",
    });
    progress.set_length(args.duration.as_millis() as u64);
    progress.set_position(0);
    let ticker = {
        let (progress, stop) = (progress.clone(), phase.stop.clone());
        let started = Instant::now();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                progress.set_position(started.elapsed().as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let started = Instant::now();
    let (last_ids, published, publish_errors, publish_rate, drained) = match args.scenario {
        Scenario::Fanout | Scenario::Throughput | Scenario::Chat => {
            let (last_ids, published, errors) =
                publish(args, rate, server.publisher_base(), &topics).await;
            let publish_rate = published as f64 / started.elapsed().as_secs_f64();
            let drained = wait_drained(&phase, &last_ids, args.drain_timeout).await;
            (last_ids, published, errors, publish_rate, drained)
        }
        Scenario::Idle => {
            tokio::time::sleep(args.duration).await;
            (vec![0; topics.len()], 0, 0, 0.0, true)
        }
    };
    let elapsed = started.elapsed();
    let cpu_end = server.cpu_times();
    let rss_end = server.rss_kib();
    let requests_end = server_requests(http, &server.bases(), transport).await;
    phase.stop.cancel();
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }
    let _ = ticker.await;
    progress.finish_with_message(if drained { "done" } else { "not drained" });

    let mut total = Tracker::default();
    let mut latency = latency_histogram();
    let mut cross_node = latency_histogram();
    while let Some(joined) = subscribers.join_next().await {
        let (index, mut tracker) = joined.map_err(|e| BenchError::Client(e.to_string()))??;
        tracker.finish(last_ids[index % last_ids.len()]);
        latency
            .add(&tracker.latency)
            .expect("same histogram bounds");
        if phase.is_cross_node(index) {
            cross_node
                .add(&tracker.latency)
                .expect("same histogram bounds");
        }
        total.received += tracker.received;
        total.duplicates += tracker.duplicates;
        total.missing += tracker.missing;
        total.requests += tracker.requests;
        total.bytes += tracker.bytes;
    }
    let deliveries = total.received;
    let per_delivery = |v: u64| {
        if deliveries == 0 {
            0.0
        } else {
            v as f64 / deliveries as f64
        }
    };
    let server_usage = match (cpu_start, cpu_end, rss_before, rss_connected, rss_end) {
        (Some(start), Some(end), Some(before), Some(connected), Some(rss_end)) => {
            let used = end.since(start);
            let cpu = used.total().as_secs_f64();
            let requests = requests_start
                .zip(requests_end)
                .map(|(start, end)| end.saturating_sub(start));
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
                cpu_us_per_connect: connect_cpu,
                peak_rss_kib: peak.load(Ordering::Relaxed),
                rss_per_subscriber_kib: connected.saturating_sub(before) as f64
                    / args.subscribers as f64,
                rss_growth_kib: rss_end as i64 - connected as i64,
            })
        }
        _ => None,
    };
    Ok(PhaseResult {
        transport: transport.name().to_owned(),
        rate,
        publish_rate,
        subscribers: args.subscribers,
        published,
        deliveries,
        // Fresh topics: a topic's last id is how many messages it got.
        expected_deliveries: (0..args.subscribers)
            .map(|i| last_ids[i % last_ids.len()])
            .sum(),
        lost: total.missing,
        duplicates: total.duplicates,
        publish_errors,
        latency_ms: Percentiles::of(&latency),
        nodes: server.nodes.len(),
        cross_node_latency_ms: (server.nodes.len() > 1).then(|| Percentiles::of(&cross_node)),
        deliveries_per_second: deliveries as f64 / elapsed.as_secs_f64(),
        requests_per_delivery: per_delivery(total.requests),
        bytes_per_delivery: per_delivery(total.bytes),
        drained,
        server: server_usage,
        floor_ratio: None,
    })
}

/// The requests the nodes have counted for `transport` since they started (`GET /stats`).
async fn server_requests(
    http: &reqwest::Client,
    bases: &[String],
    transport: TransportKind,
) -> Option<u64> {
    let mut total = 0;
    for base in bases {
        let stats: serde_json::Value = http
            .get(format!("{base}/stats"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        total += stats["requests"][transport.name()].as_u64()?;
    }
    Some(total)
}

/// Waits until the server counts every subscriber of the phase.
async fn wait_subscribed(
    http: &reqwest::Client,
    bases: &[String],
    topics: &[String],
    transport: TransportKind,
    expected: usize,
    subscribers: &mut JoinSet<Result<(usize, Tracker), BenchError>>,
) -> Result<(), BenchError> {
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
        let mut counted = 0;
        for (base, topic) in bases
            .iter()
            .flat_map(|b| topics.iter().map(move |t| (b, t)))
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
        if counted >= expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Server(format!(
                "only {counted} of {expected} {transport} subscribers connected"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `rate × duration` messages at a steady pace, over `PUBLISH_CONCURRENCY`
/// keep-alive connections; returns the highest id per topic, how many were acknowledged,
/// and how many failed.
async fn publish(
    args: &BenchArgs,
    rate: f64,
    base: &str,
    topics: &[String],
) -> (Vec<u64>, u64, u64) {
    let count = (rate * args.duration.as_secs_f64()).round().max(1.0) as u64;
    let padding = "x".repeat(args.payload_bytes.saturating_sub(30));
    // Idle connections wait here; a publish takes one and gives it back.
    let (give_back, pool) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..PUBLISH_CONCURRENCY {
        let _ = give_back.send(http::Connection::new(base));
    }
    let pool = Arc::new(tokio::sync::Mutex::new(pool));
    let mut posts = JoinSet::new();
    let start = tokio::time::Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let Some(mut connection) = pool.lock().await.recv().await else {
            break;
        };
        let slot = i as usize % topics.len();
        let path = format!("/topics/{}", topics[slot]);
        let body = format!(r#"{{"t":{},"p":"{padding}"}}"#, now_micros());
        let give_back = give_back.clone();
        posts.spawn(async move {
            let answer = connection.post_json(&path, body.as_bytes()).await;
            let _ = give_back.send(connection);
            let answer = answer.ok()?;
            if !(200..300).contains(&answer.status) {
                return None;
            }
            let id =
                serde_json::from_slice::<serde_json::Value>(&answer.body).ok()?["id"].as_u64()?;
            Some((slot, id))
        });
    }
    let (mut last_ids, mut ok, mut failed) = (vec![0; topics.len()], 0, 0);
    while let Some(joined) = posts.join_next().await {
        match joined.ok().flatten() {
            Some((slot, id)) => {
                ok += 1;
                last_ids[slot] = last_ids[slot].max(id);
            }
            None => failed += 1,
        }
    }
    (last_ids, ok, failed)
}

/// Waits until every subscriber has received its topic's last id, or the timeout passes.
async fn wait_drained(phase: &Phase, last_ids: &[u64], timeout: Duration) -> bool {
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

#[cfg(test)]
mod tests {
    use super::next_rate;

    #[test]
    fn throughput_search_doubles_then_bisects_to_within_fifteen_percent() {
        assert_eq!(next_rate(1000.0, Some(1000.0), None), Some(2000.0));
        // 8000 failed after 4000 held: try 6000, then 7000, and stop within 15%.
        assert_eq!(next_rate(8000.0, Some(4000.0), Some(8000.0)), Some(6000.0));
        assert_eq!(next_rate(6000.0, Some(6000.0), Some(8000.0)), Some(7000.0));
        assert_eq!(next_rate(7000.0, Some(7000.0), Some(8000.0)), None);
        // Nothing held yet: halve.
        assert_eq!(next_rate(1000.0, None, Some(1000.0)), Some(500.0));
        assert_eq!(next_rate(1.5, None, Some(1.5)), None);
    }
}
