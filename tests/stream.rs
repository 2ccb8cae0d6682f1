//! HTTP streaming (`GET /topics/{t}/stream`): headers, one envelope per line, keep-alives,
//! resume, and the same lines through hyper as on the raw socket.

#![allow(missing_docs)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{ids, start, start_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_stream_sends_ndjson_headers_and_one_envelope_per_line() {
    let server = start().await;
    let mut stream = server.stream("/topics/news/stream").await;
    assert_eq!(stream.headers["content-type"], "application/x-ndjson");
    assert_eq!(stream.headers["cache-control"], "no-cache");
    assert_eq!(stream.headers["x-accel-buffering"], "no");

    let response = server
        .http
        .post(server.url("/topics/news?event=headline"))
        .header("content-type", "application/json")
        .body(r#"{"title": "multi\nline"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let envelope = stream.next_json().await.unwrap();
    assert_eq!(envelope["id"], 1);
    assert_eq!(envelope["event"], "headline");
    assert_eq!(envelope["topic"], "news");
    // A newline inside the data is escaped by JSON: one message is one line.
    assert_eq!(envelope["data"], json!({"title": "multi\nline"}));
    assert!(stream.leftover().is_empty());
}

#[tokio::test]
async fn a_stream_resumes_after_its_cursor_and_counts_as_a_subscriber() {
    let server = start().await;
    server.publish_many("resume", 5).await;
    let mut stream = server.stream("/topics/resume/stream?after=3").await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(stream.next_json().await.unwrap());
    }
    assert_eq!(ids(&seen), [4, 5]);
    support::eventually("the stream to count", || async {
        server.get("/topics/resume").await.1["subscribers"]["stream"] == 1
    })
    .await;
    server.publish("resume", json!("live")).await;
    assert_eq!(stream.next_json().await.unwrap()["data"], "live");
    let stats = server.get("/stats").await.1;
    assert_eq!(stats["requests"]["stream"], 1);
    assert!(stats["deliveries"]["stream"].as_u64().unwrap() >= 3);
}

#[tokio::test]
async fn a_quiet_stream_sends_keepalive_lines() {
    let server = start_with(pushhub::Config {
        heartbeat: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let mut stream = server.stream("/topics/quiet/stream").await;
    assert_eq!(
        stream.next_line().await.unwrap(),
        json!({"type": "keepalive"})
    );
}

#[tokio::test]
async fn a_bad_cursor_gets_a_json_400_and_a_switched_off_stream_a_404() {
    let server = start().await;
    let (status, body) = server.get("/topics/t/stream?after=-1").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_parameter"))
    );
    let server = start_with(pushhub::Config {
        transports: vec![pushhub::message::TransportKind::Sse],
        ..Default::default()
    })
    .await;
    let (status, body) = server.get("/topics/t/stream").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
}

/// Sends `request` on a raw socket, publishes 2 messages, and returns what came back.
async fn raw_exchange(server: &support::TestServer, topic: &str, request: &str) -> String {
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    support::eventually("the stream to subscribe", || async {
        server.get(&format!("/topics/{topic}")).await.1["subscribers"]["stream"] == 1
    })
    .await;
    server.publish(topic, json!("a")).await;
    server.publish(topic, json!("b")).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"data\":\"b\"") {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buf))
            .await
            .expect("the stream went silent")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn the_raw_socket_and_hyper_send_the_same_lines() {
    let server = start().await;
    // Served on the raw socket: the body ends with the connection, no chunk framing.
    let raw = raw_exchange(
        &server,
        "same",
        "GET /topics/same/stream?after=0 HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("content-type: application/x-ndjson"),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    let raw_lines: Vec<Value> = body
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();

    // A request with a body is handed to hyper: the same lines, chunked by hyper.
    let hyper = raw_exchange(
        &server,
        "same2",
        "GET /topics/same2/stream?after=0 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    let (head, body) = hyper.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains("content-type: application/x-ndjson"),
        "{head}"
    );
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    // De-chunk: every other line is a chunk size.
    let mut hyper_lines = Vec::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 || after.len() < size {
            break;
        }
        for line in after[..size].lines() {
            hyper_lines.push(serde_json::from_str::<Value>(line).unwrap());
        }
        rest = &after[size + 2..];
    }
    let strip = |lines: &[Value]| -> Vec<(Value, Value)> {
        lines
            .iter()
            .map(|l| (l["id"].clone(), l["data"].clone()))
            .collect()
    };
    assert_eq!(
        strip(&raw_lines),
        [(json!(1), json!("a")), (json!(2), json!("b"))]
    );
    assert_eq!(strip(&hyper_lines), strip(&raw_lines));
}
