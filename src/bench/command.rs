//! The command line that reproduces a run, as the reports quote it: both `report.md` and
//! `comparison.md` start with it, so it lives below both of them.

use std::fmt::Write as _;

use super::BenchArgs;

/// The command line that reproduces a run.
pub fn command_line(args: &BenchArgs) -> String {
    let mut line = format!(
        "pushhub bench --scenario {} --transports {} --subscribers {} --rate {} --duration {}s --payload-bytes {} --poll-interval {}ms",
        match args.scenario {
            super::Scenario::Fanout => "fanout",
            super::Scenario::Idle => "idle",
            super::Scenario::Throughput => "throughput",
            super::Scenario::Chat => "chat",
            super::Scenario::Compare => "compare",
        },
        args.transports
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(","),
        args.subscribers,
        args.rate,
        args.duration.as_secs_f64(),
        args.payload_bytes,
        args.poll_interval.as_millis()
    );
    if args.scenario == super::Scenario::Chat {
        let _ = write!(line, " --topics {}", args.topics);
    }
    if args.topics_per_subscriber > 1 {
        let _ = write!(
            line,
            " --topics-per-subscriber {}",
            args.topics_per_subscriber
        );
        if args.topic_pattern {
            line.push_str(" --topic-pattern");
        }
        if args.distinct_lists {
            line.push_str(" --distinct-lists");
        }
    }
    if args.pattern_watchers > 0 {
        let _ = write!(line, " --pattern-watchers {}", args.pattern_watchers);
    }
    if !args.link.is_empty() {
        let names: Vec<&str> = args.link.iter().map(|p| p.name).collect();
        let _ = write!(line, " --link {}", names.join(","));
    }
    if !args.via.is_empty() {
        let vias: Vec<String> = args.via.iter().map(ToString::to_string).collect();
        let _ = write!(line, " --via {}", vias.join(","));
    }
    if args.nodes > 1 {
        let _ = write!(line, " --nodes {}", args.nodes);
    }
    if let Some(start) = args.redis_start {
        let _ = write!(line, " --redis-start {start}");
    }
    if !args.url.is_empty() {
        let _ = write!(line, " --url {}", args.url.join(","));
    }
    if args.cpus == super::CpuMode::Shared {
        line.push_str(" --cpus shared");
    }
    for arg in &args.server_args {
        let _ = write!(line, " --server-arg={arg}");
    }
    line
}
