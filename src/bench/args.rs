//! The flags of `pushhub bench`, the scenarios, and how the bench and its server share the
//! CPUs.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use serde::Serialize;

use crate::{
    config::parse_duration,
    link::{Middleboxes, Profile},
    message::TransportKind,
};

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
    /// Each transport on each link (`--link`, default `lan,3g,flaky`) and behind each
    /// middlebox (`--via`, default `none,buffering-proxy,no-websocket`), publishing at
    /// `--rate` for `--duration`: writes comparison.md and comparison.svg with a verdict per
    /// cell (works, degraded and why, broken and why).
    Compare,
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
    /// share topics: `--redis-start`, or a Redis of yours with
    /// `--server-arg=--redis=redis://127.0.0.1:6379`. Subscribers are spread over the nodes,
    /// and each publish goes through one of them in turn.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub nodes: u16,
    /// Start the Redis the nodes share, and remove it afterwards: `single` (one primary) or
    /// `cluster:M` (M primaries, 3 to 16, each with one replica). The report gives Redis's
    /// CPU per publish. Needs `redis-server` (and `redis-cli` for a cluster).
    #[arg(long)]
    pub redis_start: Option<crate::bench::RedisStart>,
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
        default_value = "ws,sse,stream,longpoll,poll",
        value_enum
    )]
    pub transports: Vec<TransportKind>,
    /// Put the subscribers behind emulated links: `lan`, `wifi`, `4g`, `3g`, `satellite`,
    /// `flaky` (comma-separated: each transport is measured on each). Latency is still
    /// publish to receipt, so it carries the link.
    #[arg(long, value_delimiter = ',', value_parser = parse_profile)]
    pub link: Vec<Profile>,
    /// Middleboxes between the subscribers and the server: `none`, `buffering-proxy`,
    /// `no-websocket`, `idle-cutter` (or `idle-cutter=5s`); join with `+` to stack them,
    /// separate with commas to measure each. Without `--link`, on `lan`.
    #[arg(long, value_delimiter = ',')]
    pub via: Vec<Middleboxes>,
    /// Topics of the `chat` scenario (the others use one topic).
    #[arg(long, default_value_t = 100)]
    pub topics: usize,
    /// Subscribers per transport.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Topics each subscriber follows on its one connection: its topic (the one published
    /// to) and K - 1 more, as a topic list `/topics/t,t.f1,.../...`. The others hold one
    /// message each, made before the subscribers connect, and get no more.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub topics_per_subscriber: u16,
    /// With `--topics-per-subscriber K`: follow a pattern (`t*`) instead of a list; the bench
    /// first makes the K - 1 other topics (one message each) for it to match.
    #[arg(long)]
    pub topic_pattern: bool,
    /// With `--topics-per-subscriber K`: subscriber `i` lists its topic at position `i mod K`
    /// instead of first, so that connections next to each other hold different cursors.
    /// The server shares one SSE `id:` line between connections whose cursors are equal;
    /// this measures the case where it cannot.
    #[arg(long, conflicts_with = "topic_pattern")]
    pub distinct_lists: bool,
    /// Idle SSE connections, each following a pattern that matches no topic, held open
    /// through each phase: what pattern subscribers cost the publishes that none of them
    /// follow (a new topic is checked against every pattern once, when created).
    #[arg(long, default_value_t = 0)]
    pub pattern_watchers: usize,
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

fn parse_profile(name: &str) -> Result<Profile, String> {
    Profile::named(name).ok_or_else(|| {
        format!(
            "unknown link profile `{name}` (known: {})",
            Profile::NAMES.join(", ")
        )
    })
}

impl BenchArgs {
    /// The links each transport is measured on, in order: `None` for straight to the server.
    pub fn links(&self) -> Vec<Option<crate::link::Link>> {
        use crate::link::Link;
        let compare = self.scenario == Scenario::Compare;
        if self.link.is_empty() && self.via.is_empty() && !compare {
            return vec![None];
        }
        let profiles = match (&self.link[..], compare) {
            ([], true) => ["lan", "3g", "flaky"]
                .iter()
                .filter_map(|n| Profile::named(n))
                .collect(),
            ([], false) => vec![Profile::named("lan").expect("a profile")],
            (profiles, _) => profiles.to_vec(),
        };
        let vias = match (&self.via[..], compare) {
            ([], true) => ["none", "buffering-proxy", "no-websocket"]
                .iter()
                .filter_map(|v| v.parse().ok())
                .collect(),
            ([], false) => vec![Middleboxes::default()],
            (vias, _) => vias.to_vec(),
        };
        profiles
            .iter()
            .flat_map(|profile| {
                vias.iter().map(|middleboxes| {
                    Some(Link {
                        profile: profile.clone(),
                        middleboxes: middleboxes.clone(),
                    })
                })
            })
            .collect()
    }
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
///
/// Split once, from the CPUs of the first caller (`main`, before it pins the bench's own
/// threads to the clients' half): asked again later, from a pinned thread, it must give the
/// same answer, not split the clients' half again.
pub fn cpu_split(mode: CpuMode) -> Option<(Vec<usize>, Vec<usize>)> {
    static SPLIT: std::sync::OnceLock<Option<(Vec<usize>, Vec<usize>)>> =
        std::sync::OnceLock::new();
    if mode == CpuMode::Shared {
        return None;
    }
    SPLIT
        .get_or_init(|| {
            let cpus = affinity::current()?;
            if cpus.len() < 2 {
                return None;
            }
            let (server, client) = cpus.split_at(cpus.len().div_ceil(2));
            Some((server.to_vec(), client.to_vec()))
        })
        .clone()
}

/// CPU affinity of threads and child processes (Linux).
pub mod affinity {
    use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

    /// The CPUs the calling thread may run on.
    pub fn current() -> Option<Vec<usize>> {
        let set = sched_getaffinity(None).ok()?;
        Some(
            (0..CpuSet::MAX_CPU)
                .filter(|&cpu| set.is_set(cpu))
                .collect(),
        )
    }

    /// Restricts the calling thread (and the threads and processes it starts later) to
    /// `cpus`.
    pub fn pin(cpus: &[usize]) -> std::io::Result<()> {
        let mut set = CpuSet::new();
        cpus.iter().for_each(|&cpu| set.set(cpu));
        sched_setaffinity(None, &set).map_err(std::io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_stays_the_same_once_the_bench_is_pinned() {
        // On a thread of its own: pinning it changes no other test's CPUs.
        std::thread::spawn(|| {
            let first = cpu_split(CpuMode::Split);
            let Some((server, client)) = first.clone() else {
                return; // one CPU: nothing to split
            };
            assert!(server.iter().all(|cpu| !client.contains(cpu)));
            affinity::pin(&client).unwrap();
            assert_eq!(cpu_split(CpuMode::Split), first);
        })
        .join()
        .unwrap();
    }
}
