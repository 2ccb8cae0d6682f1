//! `pushhub bench` end to end: small runs of every scenario against a child server,
//! asserting zero loss and a complete report. Timings are not asserted.

mod support;

use std::process::Command;

use serde_json::Value;

/// Runs `pushhub bench ARGS --json --out DIR` and returns what it printed and the directory.
fn bench(name: &str, args: &[&str]) -> (Value, support::Removed) {
    let out = support::Removed(
        std::env::temp_dir().join(format!("pushhub-{name}-{}", std::process::id())),
    );
    let output = Command::new(env!("CARGO_BIN_EXE_pushhub"))
        .arg("bench")
        .args(args)
        .args(["--json", "--out"])
        .arg(&*out)
        .output()
        .expect("run pushhub bench");
    assert!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = serde_json::from_slice(&output.stdout).expect("--json prints JSON");
    (printed, out)
}

#[test]
fn a_small_bench_run_loses_nothing_and_writes_a_complete_report() {
    let (printed, out) = bench(
        "fanout",
        &[
            "--subscribers",
            "20",
            "--rate",
            "100",
            "--duration",
            "500ms",
        ],
    );
    let results = printed["results"].as_array().unwrap();
    let transports: Vec<&str> = results
        .iter()
        .map(|r| r["transport"].as_str().unwrap())
        .collect();
    assert_eq!(transports, ["ws", "sse", "stream", "longpoll", "poll"]);
    for r in results {
        let t = r["transport"].as_str().unwrap();
        assert_eq!(r["published"], 50, "{t}");
        assert_eq!(r["deliveries"], 1000, "{t}: 20 subscribers x 50 messages");
        assert_eq!(r["expected_deliveries"], 1000, "{t}");
        assert_eq!(r["lost"], 0, "{t}");
        assert_eq!(r["duplicates"], 0, "{t}");
        assert_eq!(r["drained"], true, "{t}");
        assert!(r["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{t}");
        assert!(
            r["bytes_per_delivery"].as_f64().unwrap() > 100.0,
            "{t}: payload plus envelope"
        );
        let server = &r["server"];
        assert!(
            server["cpu_us_per_delivery"].as_f64().is_some(),
            "{t}: server usage measured"
        );
        assert!(server["peak_rss_kib"].as_u64().unwrap() > 0, "{t}");
    }
    // Streams use one request per subscriber; polls at least one per answer.
    for stream in &results[..3] {
        assert!(stream["requests_per_delivery"].as_f64().unwrap() <= 0.05);
    }
    assert!(
        results[3]["requests_per_delivery"].as_f64().unwrap() <= 1.0 + 1e-9,
        "long poll: never more than one request per delivery"
    );

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "# pushhub benchmark",
        "pushhub bench --scenario fanout --transports ws,sse,stream,longpoll,poll",
        "| stream |",
        "| ws |",
        "| poll |",
        "## Reading",
        "exactly once",
    ] {
        assert!(
            report.contains(needle),
            "report lacks {needle:?}:\n{report}"
        );
    }
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(on_disk["results"], printed["results"]);
    assert!(
        std::fs::read_to_string(out.join("latency.svg"))
            .unwrap()
            .contains("</svg>")
    );
}

#[test]
fn durable_streams_reads_are_benched_beside_the_native_transports() {
    let (printed, _) = bench(
        "ds",
        &[
            "--transports",
            "ds-sse,ds-longpoll,sse",
            "--subscribers",
            "20",
        ]
        .into_iter()
        .chain(["--rate", "100", "--duration", "500ms"])
        .collect::<Vec<_>>(),
    );
    let results = printed["results"].as_array().unwrap();
    let transports: Vec<&str> = results
        .iter()
        .filter_map(|r| r["transport"].as_str())
        .collect();
    assert_eq!(transports, ["ds-sse", "ds-longpoll", "sse"]);
    for r in results {
        let t = r["transport"].as_str().unwrap();
        let counts = ["published", "deliveries", "lost", "duplicates"].map(|k| r[k].clone());
        assert_eq!(
            counts,
            [50, 1000, 0, 0].map(Value::from),
            "{t}: 20 x 50 appends, exactly once"
        );
        assert_eq!(r["drained"], true, "{t}");
        assert!(r["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{t}");
        assert!(r["server"]["cpu_us_per_delivery"].as_f64().is_some(), "{t}");
    }
}

#[test]
fn bench_refuses_a_remote_url_without_allow_remote() {
    let output = Command::new(env!("CARGO_BIN_EXE_pushhub"))
        .args([
            "bench",
            "--url",
            "http://192.0.2.1:8080",
            "--duration",
            "1s",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--allow-remote"));
}

#[test]
fn the_idle_scenario_holds_connections_without_publishing() {
    let (printed, out) = bench(
        "idle",
        &[
            "--scenario",
            "idle",
            "--transports",
            "ws,sse",
            "--subscribers",
            "50",
            "--duration",
            "300ms",
        ],
    );
    for r in printed["results"].as_array().unwrap() {
        assert_eq!(r["published"], 0);
        assert_eq!(r["deliveries"], 0);
        assert_eq!(r["subscribers"], 50);
        assert!(r["server"]["rss_per_subscriber_kib"].as_f64().is_some());
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("Idle run"), "{report}");
    assert!(
        !report.contains("p99 latency"),
        "an idle run compares no latency: {report}"
    );
}

#[test]
fn the_chat_scenario_spreads_messages_over_topics_and_loses_none() {
    let (printed, _out) = bench(
        "chat",
        &[
            "--scenario",
            "chat",
            "--topics",
            "5",
            "--subscribers",
            "20",
            "--rate",
            "100",
            "--duration",
            "500ms",
            "--transports",
            "ws,longpoll",
        ],
    );
    for r in printed["results"].as_array().unwrap() {
        let t = r["transport"].as_str().unwrap();
        // 50 messages over 5 topics = 10 each; 4 subscribers per topic receive their topic's 10.
        assert_eq!(r["published"], 50, "{t}");
        assert_eq!(r["expected_deliveries"], 200, "{t}");
        assert_eq!(r["deliveries"], 200, "{t}");
        assert_eq!(r["lost"], 0, "{t}");
        assert_eq!(r["duplicates"], 0, "{t}");
    }
}

#[test]
fn a_three_node_bench_spreads_subscribers_and_reports_cross_node_latency() {
    let Some(redis) = support::RedisServer::start() else {
        return;
    };
    let redis_arg = format!("--server-arg=--redis={}", redis.url());
    let (printed, out) = bench(
        "nodes",
        &[
            "--nodes",
            "3",
            &redis_arg,
            "--transports",
            "ws,sse,longpoll",
            "--subscribers",
            "30",
            "--rate",
            "100",
            "--duration",
            "500ms",
        ],
    );
    for r in printed["results"].as_array().unwrap() {
        let t = r["transport"].as_str().unwrap();
        assert_eq!(r["nodes"], 3, "{t}");
        assert_eq!(
            r["deliveries"], 1500,
            "{t}: 30 subscribers over 3 nodes x 50 messages"
        );
        assert_eq!(
            (r["lost"].as_u64(), r["duplicates"].as_u64()),
            (Some(0), Some(0)),
            "{t}"
        );
        assert!(
            r["cross_node_latency_ms"]["p50"].as_f64().unwrap() > 0.0,
            "{t}: subscribers on the other nodes measured apart"
        );
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## Across nodes"), "{report}");
    assert!(report.contains("--nodes 3"), "{report}");
}

/// The Redis processes and directories a `--redis-start` bench of this test process made
/// (their directories are named after the bench's PID, which is not ours: any bench's).
fn bench_redis_left() -> Vec<String> {
    let dirs = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("pushhub-bench-redis-"));
    dirs.collect()
}

/// `--redis-start` starts the Redis the nodes share (a single primary, or a cluster of 3
/// primaries with a replica each), reports Redis's CPU per publish and each node's CPU per
/// delivery, publishes through every node (so deliveries cross nodes both ways), and
/// removes every Redis process and directory afterwards.
#[test]
fn the_bench_starts_and_removes_the_redis_its_nodes_share() {
    if !support::redis_installed() {
        return;
    }
    for (start, nodes) in [("single", "2"), ("cluster:3", "3")] {
        let before = bench_redis_left();
        let (printed, out) = bench(
            "redis-start",
            &[
                "--nodes",
                nodes,
                "--redis-start",
                start,
                "--transports",
                "sse",
                "--subscribers",
                "6",
                "--rate",
                "200",
                "--duration",
                "500ms",
            ],
        );
        let r = &printed["results"][0];
        assert_eq!(r["nodes"].as_u64(), nodes.parse().ok(), "{start}");
        assert_eq!(
            r["deliveries"], 600,
            "{start}: 6 subscribers x 100 messages"
        );
        assert_eq!(
            (r["lost"].as_u64(), r["duplicates"].as_u64()),
            (Some(0), Some(0))
        );
        assert!(
            r["redis_us_per_publish"].as_f64().unwrap() > 0.0,
            "{start}: Redis CPU measured: {r}"
        );
        let per_node = r["node_cpu_us_per_delivery"].as_array().unwrap();
        assert_eq!(per_node.len().to_string(), nodes, "{start}: {r}");
        assert!(per_node.iter().all(|us| us.as_f64().unwrap() > 0.0), "{r}");
        // Publishes went through every node: each node's subscribers got some from others.
        assert!(
            r["cross_node_latency_ms"]["p50"].as_f64().unwrap() > 0.0,
            "{start}: {r}"
        );
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(
            report.contains(&format!("--redis-start {start}")),
            "{report}"
        );
        assert!(report.contains("Redis µs/publish"), "{report}");
        let after = bench_redis_left();
        assert!(
            after.iter().all(|dir| before.contains(dir)),
            "{start}: the bench removed its Redis directories: {after:?}"
        );
    }
}

#[test]
fn a_server_that_cannot_start_is_reported_with_its_own_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_pushhub"))
        .args(["bench", "--duration", "1s", "--server-arg=--no-such-flag"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("server exited before listening") && stderr.contains("--no-such-flag"),
        "{stderr}"
    );
}

#[test]
fn several_nodes_without_a_shared_store_are_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_pushhub"))
        .args(["bench", "--nodes", "2", "--duration", "1s"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--redis"));
}

#[test]
fn the_compare_scenario_gives_each_cell_a_verdict_its_link_explains() {
    let (printed, out) = bench(
        "compare",
        &[
            "--scenario",
            "compare",
            "--transports",
            "ws,sse,longpoll",
            "--link",
            "3g",
            "--via",
            "none,buffering-proxy,no-websocket",
            "--subscribers",
            "3",
            "--rate",
            "20",
            "--duration",
            "2s",
            "--drain-timeout",
            "2s",
        ],
    );
    let results = printed["results"].as_array().unwrap();
    let cell = |link: &str, transport: &str| {
        results
            .iter()
            .find(|r| r["link"] == link && r["transport"] == transport)
            .unwrap_or_else(|| panic!("no cell {link} {transport}"))
    };
    assert_eq!(results.len(), 9);
    // On 3g every technique delivers everything, one way of 100 ms ± 30 later at least.
    for transport in ["ws", "sse", "longpoll"] {
        let r = cell("3g", transport);
        assert_eq!(
            (r["lost"].as_u64(), r["duplicates"].as_u64()),
            (Some(0), Some(0)),
            "{r}"
        );
        assert!(r["latency_ms"]["p50"].as_f64().unwrap() >= 70.0, "{r}");
        assert!(
            r["wire_bytes_per_delivery"].as_f64().unwrap() > 100.0,
            "{r}"
        );
    }
    // A long poll pays a round trip per answer: slower than the WebSocket on the same link.
    assert!(
        cell("3g", "longpoll")["latency_ms"]["p50"].as_f64()
            > cell("3g", "ws")["latency_ms"]["p50"].as_f64()
    );
    // The buffering proxy holds SSE (late, and the tail never arrives) but not whole answers.
    let held = cell("3g+buffering-proxy", "sse");
    assert!(
        held["lost"].as_u64().unwrap() > 0 || held["latency_ms"]["p50"].as_f64().unwrap() > 500.0,
        "{held}"
    );
    assert_eq!(cell("3g+buffering-proxy", "longpoll")["lost"], 0);
    assert_eq!(cell("3g+buffering-proxy", "ws")["lost"], 0);
    // The WebSocket cannot pass a proxy that refuses upgrades; SSE can.
    let refused = cell("3g+no-websocket", "ws");
    assert!(
        refused["failure"].as_str().unwrap().contains("403"),
        "{refused}"
    );
    assert_eq!(cell("3g+no-websocket", "sse")["lost"], 0);

    let md = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    assert!(md.contains("| 3g+no-websocket | ws | **broken** |"), "{md}");
    assert!(
        md.contains("| 3g+buffering-proxy | sse | **degraded** |"),
        "{md}"
    );
    assert!(md.contains("| 3g | ws | **works** |"), "{md}");
    let svg = std::fs::read_to_string(out.join("comparison.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains(">3g+no-websocket<"));
}

#[test]
fn subscribers_behind_a_flaky_link_reconnect_and_resume_without_loss_or_repeats() {
    let (printed, _out) = bench(
        "flaky",
        &[
            "--transports",
            "ws,sse,poll",
            "--link",
            "flaky",
            "--subscribers",
            "8",
            "--rate",
            "50",
            "--duration",
            "6s",
            "--poll-interval",
            "200ms",
        ],
    );
    for r in printed["results"].as_array().unwrap() {
        // Every connection is cut after 2-8 s: over 6 s, some of the 8 subscribers' were
        // (all 8 surviving has odds of 1 in 6,500).
        assert!(r["link_cuts"].as_u64().unwrap() > 0, "{r}");
        assert!(r["reconnects"].as_u64().unwrap() > 0, "{r}");
        assert!(r["recovery_ms"]["p50"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["lost"], 0, "{r}");
        assert_eq!(r["duplicates"], 0, "{r}");
        assert_eq!(r["deliveries"], r["expected_deliveries"], "{r}");
    }
}

#[test]
fn subscribers_following_many_topics_on_one_connection_lose_nothing() {
    for pattern in [false, true] {
        let mut args = vec![
            "--subscribers",
            "10",
            "--rate",
            "100",
            "--duration",
            "300ms",
            "--topics-per-subscriber",
            "10",
            "--pattern-watchers",
            "5",
        ];
        if pattern {
            args.push("--topic-pattern");
        }
        let (printed, _out) = bench(if pattern { "pattern" } else { "list" }, &args);
        let command = printed["command"].as_str().unwrap();
        assert!(command.contains("--topics-per-subscriber 10"), "{command}");
        assert_eq!(command.contains("--topic-pattern"), pattern, "{command}");
        for r in printed["results"].as_array().unwrap() {
            let t = r["transport"].as_str().unwrap();
            assert_eq!(r["published"], 30, "{t}");
            // Only the published topic counts: the others' messages are left out.
            assert_eq!(r["deliveries"], 300, "{t} (pattern: {pattern})");
            assert_eq!(
                (r["lost"].as_u64(), r["duplicates"].as_u64()),
                (Some(0), Some(0)),
                "{t}"
            );
        }
    }
}
