//! The `pushhub` binary: configuration from the environment, and a clean stop on Ctrl-C.

#![allow(missing_docs)]

mod support;

use std::time::{Duration, Instant};

#[tokio::test]
async fn environment_configures_and_sigint_stops_cleanly() {
    let mut server = support::spawn_binary(&[], &[("PUSHHUB_MAX_BODY", "10")]);
    let http = reqwest::Client::new();
    let url = format!("http://{}/topics/env", server.addr);
    let small = http.post(&url).body("0123456789").send().await.unwrap();
    assert_eq!(small.status(), 201);
    let large = http.post(&url).body("0123456789a").send().await.unwrap();
    assert_eq!(large.status(), 413);
    // An open SSE stream must not hold the process up.
    let sse = http
        .get(format!("http://{}/topics/env/sse", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);

    let status = std::process::Command::new("kill")
        .args(["-INT", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "pushhub did not stop on SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "pushhub exited with {exit}");
}

#[test]
fn help_lists_the_serve_flags() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pushhub"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--listen",
        "--history-size",
        "--history-max-age",
        "--max-body",
        "--longpoll-max-timeout",
        "--heartbeat",
        "--data-dir",
        "--fsync",
        "--fsync-window",
        "--redis",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[tokio::test]
async fn json_logs_carry_request_ids_and_never_tokens() {
    let secret_token = "eyJhbGciOiJIUzI1NiJ9.e30.not-a-real-signature";
    let server = support::spawn_binary(
        &["--jwt-secret", "s3cret"],
        &[
            ("PUSHHUB_LOG", "pushhub=debug,tower_http=debug"),
            ("PUSHHUB_LOG_FORMAT", "json"),
        ],
    );
    let http = reqwest::Client::new();
    let response = http
        .get(format!(
            "http://{}/topics/t/poll?token={secret_token}",
            server.addr
        ))
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["x-request-id"], "req-42");
    let fresh = http
        .post(format!("http://{}/topics/t", server.addr))
        .bearer_auth(secret_token)
        .body("secret body")
        .send()
        .await
        .unwrap();
    assert!(
        !fresh.headers()["x-request-id"].is_empty(),
        "an id is made when none is sent"
    );
    support::eventually("the request is logged", || async {
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("req-42"))
    })
    .await;
    let log = server.log.lock().unwrap().join("\n");
    for line in log.lines() {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "not a JSON log line: {line}");
    }
    assert!(
        !log.contains("not-a-real-signature"),
        "a token reached the log:\n{log}"
    );
    assert!(!log.contains("secret body"), "a body reached the log");
}

#[tokio::test]
async fn a_node_starts_while_redis_is_unreachable_and_answers_503_without_logging_credentials() {
    // Nothing listens on port 9 (discard) here: Redis is "down" from the start.
    let server = support::spawn_binary(&["--redis", "redis://:hunter2@127.0.0.1:9/"], &[]);
    let response = reqwest::Client::new()
        .post(format!("http://{}/topics/t", server.addr))
        .json(&serde_json::json!("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "store_unavailable");
    let log = server.log.lock().unwrap().join("\n");
    assert!(log.contains("redis at redis://127.0.0.1:9/"), "{log}");
    assert!(!log.contains("hunter2"), "credentials logged: {log}");
}
