//! The benchmark's outputs: a terminal table, `results.json`, `report.md` with a
//! plain-language reading, and `latency.svg`.

use std::fmt::Write as _;

use serde::Serialize;

use super::{BenchArgs, PhaseResult, Run, accounting::Percentiles};

pub use super::command::command_line;

#[derive(Serialize)]
struct Document<'a> {
    command: String,
    subscribers: usize,
    rate: f64,
    duration_s: f64,
    payload_bytes: usize,
    poll_interval_ms: u128,
    floor: Option<&'a super::floor::Floor>,
    results: &'a [PhaseResult],
}

/// Writes `results.json`, `report.md` and `latency.svg` into `args.out`.
pub fn write_all(args: &BenchArgs, run: &Run) -> std::io::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("results.json"), json(args, run))?;
    std::fs::write(args.out.join("report.md"), markdown(args, run))?;
    std::fs::write(args.out.join("latency.svg"), svg(&run.results))?;
    if args.scenario == super::Scenario::Compare {
        super::compare::write(args, &run.results)?;
    }
    Ok(())
}

/// The machine-readable results.
pub fn json(args: &BenchArgs, run: &Run) -> String {
    serde_json::to_string_pretty(&Document {
        command: command_line(args),
        subscribers: args.subscribers,
        rate: args.rate,
        duration_s: args.duration.as_secs_f64(),
        payload_bytes: args.payload_bytes,
        poll_interval_ms: args.poll_interval.as_millis(),
        floor: run.floor.as_ref(),
        results: &run.results,
    })
    .expect("results serialize")
}

fn server_cell(result: &PhaseResult, f: impl Fn(&super::ServerUsage) -> String) -> String {
    result.server.as_ref().map_or_else(|| "n/a".into(), f)
}

/// The results as a Markdown table (also printed on the terminal).
pub fn table(results: &[PhaseResult]) -> String {
    let mut out = String::from(
        "| transport | msg/s | subs | published | deliveries | lost | dup | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | deliv/s | req/deliv | bytes/deliv | server CPU s | sys % | CPU µs/deliv | × floor | connect µs | peak RSS MiB | RSS/sub KiB | RSS growth MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let l = &r.latency_ms;
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.4} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.transport,
            r.rate,
            r.subscribers,
            r.published,
            r.deliveries,
            r.lost,
            r.duplicates,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            r.deliveries_per_second,
            r.requests_per_delivery,
            r.bytes_per_delivery,
            server_cell(r, |s| format!("{:.2}", s.cpu_seconds)),
            server_cell(r, |s| format!("{:.0}", s.cpu_system_share * 100.0)),
            server_cell(r, |s| format!("{:.2}", s.cpu_us_per_delivery)),
            r.floor_ratio
                .map_or_else(|| "n/a".into(), |x| format!("{x:.2}")),
            server_cell(r, |s| s
                .cpu_us_per_connect
                .map_or_else(|| "n/a".into(), |c| format!("{c:.0}"))),
            server_cell(r, |s| format!("{:.1}", s.peak_rss_kib as f64 / 1024.0)),
            server_cell(r, |s| format!("{:.1}", s.rss_per_subscriber_kib)),
            server_cell(r, |s| format!("{:+.1}", s.rss_growth_kib as f64 / 1024.0)),
        );
    }
    out
}

/// A short reading of the table: who won on what, and by how much.
pub fn reading(results: &[PhaseResult]) -> Vec<String> {
    let mut lines = publisher_limits(results);
    lines.extend(delivery_summary(results));
    lines.extend(rankings(results));
    lines.extend(floor_comparisons(results));
    lines.extend(server_notes(results));
    lines
}

/// One line per transport whose run the bench's own publisher held back: its figures say
/// where this host stops, not where the server does.
fn publisher_limits(results: &[PhaseResult]) -> Vec<String> {
    results
        .iter()
        .filter(|r| r.publisher_limited())
        .map(|r| {
            format!(
                "{}: the bench publisher reached only {:.0} of {:.0} msg/s, so the server's limit for it lies above what this host can drive.",
                r.transport, r.publish_rate, r.rate
            )
        })
        .collect()
}

/// Whether every message arrived once (or nothing was published), else one line per
/// overloaded transport, so that its other figures are not read as clean.
fn delivery_summary(results: &[PhaseResult]) -> Vec<String> {
    let mut lines = Vec::new();
    if results.iter().all(|r| r.published == 0) {
        lines.push("Idle run: subscribers connected, nothing published; the figures are the cost of holding connections.".into());
    } else if !results.iter().any(|r| r.overloaded()) {
        lines.push("Every transport delivered every message to every subscriber exactly once (0 lost, 0 duplicated).".into());
    } else {
        for r in results.iter().filter(|r| r.overloaded()) {
            lines.push(format!(
                "**{} was overloaded**: {} lost, {} duplicated, {} publishes failed, drained: {}. Its other figures describe an overloaded run.",
                r.transport, r.lost, r.duplicates, r.publish_errors, r.drained
            ));
        }
    }
    lines
}

/// The lowest and highest transport on each compared figure: the delivery figures when
/// anything was delivered (else the idle CPU), and the memory per subscriber.
fn rankings(results: &[PhaseResult]) -> Vec<String> {
    let mut lines = Vec::new();
    if results.iter().any(|r| r.deliveries > 0) {
        lines.extend(ranking(results, "p99 latency", "ms", &|r| {
            Some(r.latency_ms.p99)
        }));
        lines.extend(ranking(results, "server CPU per delivery", "µs", &|r| {
            r.server.as_ref().map(|s| s.cpu_us_per_delivery)
        }));
        lines.extend(ranking(results, "bytes per delivery", "B", &|r| {
            Some(r.bytes_per_delivery)
        }));
        lines.extend(ranking(
            results,
            "requests per delivery",
            "requests",
            &|r| Some(r.requests_per_delivery),
        ));
    } else {
        lines.extend(ranking(results, "server CPU while idle", "s", &|r| {
            r.server.as_ref().map(|s| s.cpu_seconds)
        }));
    }
    lines.extend(ranking(
        results,
        "server memory per subscriber",
        "KiB",
        &|r| r.server.as_ref().map(|s| s.rss_per_subscriber_kib),
    ));
    lines
}

/// The lowest and the highest `value` among the results that have one, and how many times
/// the one the other; `None` with fewer than two to compare.
fn ranking(
    results: &[PhaseResult],
    label: &str,
    unit: &str,
    value: &dyn Fn(&PhaseResult) -> Option<f64>,
) -> Option<String> {
    let mut ranked: Vec<(&str, f64)> = results
        .iter()
        .filter_map(|r| value(r).map(|v| (r.transport.as_str(), v)))
        .collect();
    if ranked.len() < 2 {
        return None;
    }
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (best, best_value) = ranked[0];
    let (worst, worst_value) = ranked[ranked.len() - 1];
    let ratio = if best_value > 0.0 {
        format!("{:.1}×", worst_value / best_value)
    } else {
        "far".into()
    };
    Some(format!(
        "Lowest {label}: **{best}** ({best_value:.2} {unit}); highest: {worst} ({worst_value:.2} {unit}), {ratio} more."
    ))
}

/// Each transport's server CPU against the write floor, per delivery (per request when
/// nothing was delivered).
fn floor_comparisons(results: &[PhaseResult]) -> Vec<String> {
    let mut lines = Vec::new();
    for r in results {
        if let Some(ratio) = r.floor_ratio {
            let what = if r.deliveries > 0 {
                "per delivery"
            } else {
                "per request"
            };
            lines.push(format!(
                "{}: {ratio:.2}× the write floor {what}{}.",
                r.transport,
                if ratio < 1.0 && r.deliveries > 0 {
                    " (below it: several messages left in one write)"
                } else {
                    ""
                }
            ));
        }
    }
    lines
}

/// Per transport the server was measured for: the cost of an empty request when nothing was
/// delivered, and how its RSS moved while messages were published.
fn server_notes(results: &[PhaseResult]) -> Vec<String> {
    let mut lines = Vec::new();
    for r in results {
        let Some(server) = &r.server else { continue };
        if let (0, Some(requests), Some(cost)) =
            (r.deliveries, server.requests, server.cpu_us_per_request)
        {
            lines.push(format!(
                "{}: {requests} requests answered with nothing new, {cost:.1} µs of server CPU each.",
                r.transport
            ));
        }
        if r.published > 0 {
            lines.push(format!(
                "{}: server RSS changed by {:+.1} MiB while {} messages were published ({:.0}% of its CPU in the kernel).",
                r.transport,
                server.rss_growth_kib as f64 / 1024.0,
                r.published,
                server.cpu_system_share * 100.0
            ));
        }
    }
    lines
}

/// What the floor was, in one sentence.
pub fn floor_line(floor: &super::floor::Floor) -> String {
    format!(
        "Write floor (one `write()` of a {}-byte frame to each of {} loopback sockets, {} messages at {:.0}/s, measured in this run): **{:.2} µs** per write{}. \"× floor\" is each transport's server CPU per delivery (per request, for pollers that got nothing) divided by it.",
        floor.frame_bytes,
        floor.subscribers,
        floor.messages,
        floor.rate,
        floor.cpu_us_per_delivery,
        if floor.short_writes > 0 {
            format!(" ({} short writes)", floor.short_writes)
        } else {
            String::new()
        }
    )
}

/// The Markdown report.
pub fn markdown(args: &BenchArgs, run: &Run) -> String {
    let results = &run.results[..];
    let mut out = String::from("# pushhub benchmark\n\n");
    let _ = writeln!(out, "Command: `{}`\n", command_line(args));
    let _ = writeln!(
        out,
        "{} subscribers per transport, {} msg/s for {:.1} s, {}-byte payloads. Latency is publish to receipt, measured by the subscribers (same host clock). Server CPU and memory are read from /proc for the server process only.\n",
        args.subscribers,
        args.rate,
        args.duration.as_secs_f64(),
        args.payload_bytes
    );
    if let Some(floor) = &run.floor {
        let _ = writeln!(out, "{}\n", floor_line(floor));
    }
    out.push_str("Each transport runs on a fresh server after a short warm-up (20 subscribers, 20 messages), so \"RSS/sub\" is what its own connections added; \"connect µs\" is server CPU from the first connection to the server counting the last, per subscriber.\n\n");
    out.push_str(&table(results));
    if results
        .iter()
        .any(|r| r.cross_node_latency_ms.is_some() || r.redis_us_per_publish.is_some())
    {
        out.push_str(&cross_node_table(results));
    }
    out.push_str("\n## Reading\n\n");
    for line in reading(results) {
        let _ = writeln!(out, "- {line}");
    }
    out.push_str("\n![latency, server CPU and memory, bytes and requests per delivery, per transport](latency.svg)\n");
    out
}

/// Latency of every delivery against those that crossed nodes, and what each node and the
/// Redis they share spent.
pub fn cross_node_table(results: &[PhaseResult]) -> String {
    let mut out = String::from(
        "\n## Across nodes\n\nSubscribers were spread over the nodes round-robin, and publishes over the nodes too (16 keep-alive connections spread over them, each publish on whichever is free). \"Other node\" latency is of the deliveries published through another node than the subscriber's. Server CPU and memory above are the sum over all nodes; \"µs/delivery per node\" is each node's own CPU over its own subscribers' deliveries (it also pays for the publishes it took). \"Redis µs/publish\" is every Redis process the bench started (primaries and replicas) over the acknowledged publishes.\n\n| transport | nodes | p50 ms (all) | p99 ms (all) | p50 ms (other node) | p99 ms (other node) | Redis µs/publish | µs/delivery per node |\n|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in results {
        if r.cross_node_latency_ms.is_none() && r.redis_us_per_publish.is_none() {
            continue;
        }
        let cross = |p: fn(&Percentiles) -> f64| {
            r.cross_node_latency_ms
                .as_ref()
                .map_or_else(|| "-".to_owned(), |c| format!("{:.2}", p(c)))
        };
        let redis = r
            .redis_us_per_publish
            .map_or_else(|| "-".to_owned(), |us| format!("{us:.1}"));
        let per_node = r
            .node_cpu_us_per_delivery
            .iter()
            .map(|us| format!("{us:.1}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.2} | {} | {} | {redis} | {per_node} |",
            r.transport,
            r.nodes,
            r.latency_ms.p50,
            r.latency_ms.p99,
            cross(|c| c.p50),
            cross(|c| c.p99)
        );
    }
    out
}

/// The chart of a run's results (`latency.svg`).
pub fn svg(results: &[PhaseResult]) -> String {
    super::chart::svg(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::ServerUsage;

    fn result(transport: &str, p99: f64, cpu: f64, lost: u64) -> PhaseResult {
        PhaseResult {
            transport: transport.into(),
            rate: 100.0,
            publish_rate: 100.0,
            subscribers: 10,
            published: 100,
            deliveries: 1000 - lost,
            expected_deliveries: 1000,
            lost,
            undelivered: 0,
            duplicates: 0,
            publish_errors: 0,
            latency_ms: Percentiles {
                p50: p99 / 2.0,
                p90: p99,
                p99,
                p999: p99,
                max: p99,
                mean: p99 / 2.0,
            },
            nodes: 1,
            cross_node_latency_ms: None,
            redis_us_per_publish: None,
            node_cpu_us_per_delivery: Vec::new(),
            deliveries_per_second: 500.0,
            requests_per_delivery: 0.01,
            bytes_per_delivery: 120.0,
            drained: lost == 0,
            server: Some(ServerUsage {
                cpu_seconds: 0.1,
                cpu_system_share: 0.6,
                cpu_us_per_delivery: cpu,
                requests: Some(10),
                cpu_us_per_request: Some(10_000.0),
                cpu_us_per_connect: Some(40.0),
                peak_rss_kib: 9000,
                rss_per_subscriber_kib: 8.0,
                rss_growth_kib: 512,
            }),
            floor_ratio: Some(cpu / 2.0),
            link: None,
            wire_bytes_per_delivery: None,
            server_wire_bytes_per_delivery: None,
            link_cuts: None,
            reconnects: 0,
            recovery_ms: None,
            failure: None,
        }
    }

    #[test]
    fn reading_names_winners_ratios_and_overload() {
        let results = [result("ws", 2.0, 3.0, 0), result("poll", 900.0, 12.0, 0)];
        let lines = reading(&results);
        assert!(lines[0].contains("exactly once"), "{lines:?}");
        assert!(lines.iter().any(|l| l.contains("Lowest p99 latency: **ws** (2.00 ms)") && l.contains("450.0×")), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("server CPU per delivery: **ws** (3.00 µs)")
                    && l.contains("4.0×")),
            "{lines:?}"
        );

        let mut idle = result("poll", 0.0, 0.0, 0);
        idle.published = 0;
        idle.deliveries = 0;
        let lines = reading(&[idle]);
        assert!(
            lines.iter().any(|l| l
                == "poll: 10 requests answered with nothing new, 10000.0 µs of server CPU each."),
            "{lines:?}"
        );

        let lines = reading(&[result("ws", 2.0, 3.0, 5), result("sse", 2.5, 3.5, 0)]);
        assert!(
            lines[0].contains("**ws was overloaded**: 5 lost"),
            "{lines:?}"
        );
    }

    #[test]
    fn report_files_hold_every_transport() {
        let dir = std::env::temp_dir().join(format!("pushhub-report-{}", std::process::id()));
        let args = BenchArgs {
            url: Vec::new(),
            server_pid: Vec::new(),
            nodes: 1,
            redis_start: None,
            allow_remote: false,
            scenario: crate::bench::Scenario::Fanout,
            topics: 1,
            transports: vec![
                crate::message::TransportKind::Ws,
                crate::message::TransportKind::Poll,
            ],
            subscribers: 10,
            topics_per_subscriber: 1,
            topic_pattern: false,
            distinct_lists: false,
            pattern_watchers: 0,
            rate: 50.0,
            duration: std::time::Duration::from_secs(2),
            payload_bytes: 100,
            poll_interval: std::time::Duration::from_secs(1),
            drain_timeout: std::time::Duration::from_secs(5),
            out: dir.clone(),
            json: false,
            server_args: vec!["--write-delay=5ms".into()],
            server_bin: None,
            cpus: crate::bench::CpuMode::Split,
            link: Vec::new(),
            via: Vec::new(),
        };
        let run = Run {
            floor: None,
            results: vec![result("ws", 2.0, 3.0, 0), result("poll", 900.0, 12.0, 0)],
        };
        write_all(&args, &run).unwrap();
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(
            md.contains("| ws | 100 | 10 | 100 | 1000 | 0 | 0 | 1.00 |"),
            "{md}"
        );
        assert!(md.contains("| poll |") && md.contains("## Reading"));
        assert!(md.contains("--server-arg=--write-delay=5ms`"), "{md}");
        assert!(
            md.contains("ws: server RSS changed by +0.5 MiB while 100 messages were published (60% of its CPU in the kernel)"),
            "{md}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap())
                .unwrap();
        assert_eq!(json["results"].as_array().unwrap().len(), 2);
        assert_eq!(json["results"][1]["server"]["cpu_us_per_delivery"], 12.0);
        let svg = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains(">poll<") && svg.trim_end().ends_with("</svg>")
        );
        // Every compared figure has its panel, with its unit; the shades are explained.
        for title in [
            "latency p50 / p99, ms (log)",
            "server CPU per delivery, µs",
            "server memory per subscriber, KiB",
            "bytes per delivery",
            "requests per delivery (log)",
            "latency: solid p50, light p99",
        ] {
            assert!(svg.contains(title), "{title}");
        }
        // Values on the bars (poll's 12 µs of CPU, its 450/900 ms latency), ticks on the axes.
        assert!(svg.contains(">12<") && svg.contains(">450/900<"), "{svg}");
        assert!(
            svg.contains(">1000<") && svg.contains(">0.01<"),
            "log ticks"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
