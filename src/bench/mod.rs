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
mod args;
mod chart;
mod command;
pub mod compare;
pub mod floor;
pub mod http;
mod phase;
pub mod procfs;
mod publisher;
mod redis;
pub mod report;
mod result;
mod route;
mod server;
mod subscriber;

use std::{sync::Arc, time::Duration};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use args::{BenchArgs, CpuMode, Scenario, affinity, cpu_split};
pub use redis::{RedisFleet, RedisStart};
pub use result::{BenchError, PhaseResult, Run, ServerUsage};

use crate::message::TransportKind;
use accounting::now_micros;
use phase::{run_phase, wait_drained, wait_subscribed};
use publisher::publish;
use route::Route;
use server::{Server, start_server};
use subscriber::Phase;

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
    // One Redis for the whole run (each phase's topics are fresh); its CPU is read per phase.
    let redis = match args.redis_start {
        Some(start) if args.url.is_empty() => {
            eprintln!("bench: starting Redis ({start})");
            Some(RedisFleet::start(start)?)
        }
        Some(_) => {
            return Err(BenchError::Setup(
                "--redis-start starts the Redis of the nodes the bench starts: not with --url"
                    .into(),
            ));
        }
        None => None,
    };
    let redis = redis.as_ref();
    // With `--url` every transport is measured on the same running server(s).
    let shared = if args.url.is_empty() {
        None
    } else {
        Some(start_server(args, None)?)
    };
    let mut results = Vec::new();
    for link in args.links() {
        for &transport in &args.transports {
            let on = link
                .as_ref()
                .map_or_else(String::new, |link| format!(" on {link}"));
            eprintln!(
                "bench: {transport}{on}: {} subscribers, {} msg/s for {:?}",
                args.subscribers, args.rate, args.duration
            );
            let fresh = match &shared {
                Some(_) => None,
                None => Some(start_server(args, redis)?),
            };
            let server = shared.as_ref().or(fresh.as_ref()).expect("one of them");
            warm_up(args, server, &http, transport).await?;
            let route = Route::open(link.as_ref(), server).await?;
            let measured = match args.scenario {
                Scenario::Throughput => {
                    search_throughput(args, server, &route, &http, transport).await
                }
                _ => run_phase(args, server, &route, &http, transport, args.rate).await,
            };
            let mut result = match (measured, &link) {
                (Ok(result), _) => result,
                // Behind a link, a transport that cannot get through is a finding, not a
                // failed run.
                (Err(error), Some(link)) => {
                    eprintln!("bench: {transport}{on}: {error}");
                    PhaseResult::failed(
                        transport.name(),
                        args.rate,
                        args.subscribers,
                        Some(link.to_string()),
                        error.to_string(),
                    )
                }
                (Err(error), None) => return Err(error),
            };
            result.floor_ratio = floor.as_ref().and_then(|floor| floor_ratio(&result, floor));
            results.push(result);
        }
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
        // The comparison is about links, not the server's cost against the floor.
        Scenario::Compare => return None,
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
        r#"{{"t":{},"n":0,"p":"{}"}}"#,
        now_micros(),
        "x".repeat(payload_bytes.saturating_sub(36))
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
        listing: subscriber::Listing::One,
        poll_interval: args.poll_interval.min(Duration::from_millis(100)),
        resume: false,
        progress: (0..SUBSCRIBERS).map(|_| Default::default()).collect(),
        served: (0..SUBSCRIBERS).map(|_| Default::default()).collect(),
        others: (0..SUBSCRIBERS).map(|_| Default::default()).collect(),
        stop: CancellationToken::new(),
    });
    if transport.is_durable() {
        phase::create_stream(http, server.first_base(), &topic).await?;
    }
    let mut subscribers = JoinSet::new();
    for index in 0..SUBSCRIBERS {
        let phase = phase.clone();
        subscribers.spawn(async move { subscriber::run(transport, phase, index).await });
    }
    let topics = [topic];
    wait_subscribed(
        http,
        &server.bases(),
        &phase,
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
        &server.bases(),
        &topics,
        transport,
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
    route: &Route,
    http: &reqwest::Client,
    transport: TransportKind,
) -> Result<PhaseResult, BenchError> {
    let mut rate = args.rate;
    let mut held: Option<PhaseResult> = None;
    let mut failed_at: Option<f64> = None;
    let mut last = None;
    for _ in 0..12 {
        let result = run_phase(args, server, route, http, transport, rate).await?;
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
