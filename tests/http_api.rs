//! The HTTP endpoints: publish, poll, long poll, topic info, health, demo page, and every
//! bad input answered with a JSON error.

#![allow(missing_docs)]

mod support;

use std::time::{Duration, Instant};

use pushhub::message::TransportKind;
use serde_json::{Value, json};
use support::{ids, start, start_with};

#[tokio::test]
async fn publish_answers_201_with_the_envelope_fields() {
    let server = start().await;
    let response = server
        .http
        .post(server.url("/topics/chat?event=greeting"))
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{ "text" : "hi", "big": 12345678901234567890 }"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let ack: Value = response.json().await.unwrap();
    assert_eq!(ack["id"], 1);
    assert_eq!(ack["topic"], "chat");
    assert_eq!(ack["event"], "greeting");
    assert!(ack["time"].as_u64().unwrap() > 1_700_000_000_000);

    // Non-JSON content types publish the text as a JSON string.
    let response = server
        .http
        .post(server.url("/topics/chat"))
        .header("content-type", "text/plain")
        .body("line 1\nline \"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    // The JSON body is kept exactly (big numbers included), minus insignificant whitespace.
    let raw = server
        .http
        .get(server.url("/topics/chat/poll?after=0"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        raw.contains(r#""data":{"text":"hi","big":12345678901234567890}"#),
        "{raw}"
    );
    let (_, body) = server.get("/topics/chat/poll?after=0").await;
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(ids(messages), [1, 2]);
    assert_eq!(messages[0]["event"], "greeting");
    assert_eq!(messages[1]["event"], "message");
    assert_eq!(messages[1]["data"], "line 1\nline \"2\"");
    assert_eq!(messages[1]["topic"], "chat");
}

#[tokio::test]
async fn short_poll_pages_by_cursor_and_reports_now_without_one() {
    let server = start().await;
    server.publish_many("p", 5).await;

    let (status, body) = server.get("/topics/p/poll").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"messages": [], "last_id": 5, "next_after": 5}));

    let (_, body) = server.get("/topics/p/poll?after=1&limit=2").await;
    assert_eq!(ids(body["messages"].as_array().unwrap()), [2, 3]);
    assert_eq!(body["more"], true);
    assert_eq!(body["next_after"], 3);
    let (_, body) = server.get("/topics/p/poll?after=3&limit=2").await;
    assert_eq!(ids(body["messages"].as_array().unwrap()), [4, 5]);
    assert!(body.get("more").is_none());
    let (_, body) = server.get("/topics/p/poll?after=5").await;
    assert_eq!(body["messages"], json!([]));

    // A topic never used answers like an empty one.
    let (status, body) = server.get("/topics/fresh/poll?after=0").await;
    assert_eq!((status, body["last_id"].clone()), (200, json!(0)));
}

#[tokio::test]
async fn long_poll_answers_at_once_when_behind_and_waits_when_current() {
    let server = start().await;
    server.publish_many("lp", 2).await;
    let (_, body) = server.get("/topics/lp/longpoll?after=0&timeout=5").await;
    assert_eq!(ids(body["messages"].as_array().unwrap()), [1, 2]);

    // Parked at the head: a publish wakes it with just the new message.
    let body = park_then_publish(&server, "/topics/lp/longpoll?after=2&timeout=30", "wake").await;
    assert_eq!(ids(body["messages"].as_array().unwrap()), [3]);
    assert_eq!(body["messages"][0]["data"], "wake");

    // Without a cursor it waits for the next message after "now". Under a client name of its
    // own: the earlier polls keep the topic's long-poll count at 1 for --poller-window, so
    // waiting for 1 would publish before this poll has taken its "now" (it then waits for
    // message 5 and times out; seen once under CI load).
    let body = park_then_publish_counted(
        &server,
        "/topics/lp/longpoll?timeout=30&client=fresh",
        "next",
        2,
    )
    .await;
    assert_eq!(ids(body["messages"].as_array().unwrap()), [4]);
}

/// Starts a long poll on topic `lp`, waits until the server counts it as parked, publishes
/// `data`, and returns the long poll's answer.
async fn park_then_publish(server: &support::TestServer, path: &str, data: &str) -> Value {
    park_then_publish_counted(server, path, data, 1).await
}

/// [`park_then_publish`], waiting until the topic counts `pollers` long pollers.
async fn park_then_publish_counted(
    server: &support::TestServer,
    path: &str,
    data: &str,
    pollers: u64,
) -> Value {
    let url = server.url(path);
    let http = server.http.clone();
    let parked = tokio::spawn(async move {
        let response = http.get(url).send().await.unwrap();
        response.json::<Value>().await.unwrap()
    });
    support::eventually("the long poll to park", || async {
        server.get("/topics/lp").await.1["subscribers"]["longpoll"] == pollers
    })
    .await;
    server.publish("lp", json!(data)).await;
    tokio::time::timeout(support::PATIENCE, parked)
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn long_poll_times_out_with_an_empty_200() {
    let server = start().await;
    server.publish_many("idle", 1).await;
    let started = Instant::now();
    let (status, body) = server
        .get("/topics/idle/longpoll?after=1&timeout=0.3")
        .await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "answered before the timeout"
    );
    assert_eq!(status, 200);
    assert_eq!(body, json!({"messages": [], "last_id": 1, "next_after": 1}));
}

#[tokio::test]
async fn topic_info_counts_subscribers_per_transport() {
    let server = start().await;
    server.publish_many("info", 3).await;
    server.get("/topics/info/poll?client=a").await;
    server.get("/topics/info/poll?client=b").await;
    server.get("/topics/info/poll?client=a").await;
    let _sse = server.sse("/topics/info/sse", None).await;
    let _ws1 = server.ws("/topics/info/ws").await;
    let _stream = server.stream("/topics/info/stream").await;
    // The stream's head may arrive before its subscription is counted.
    support::eventually("the stream to count", || async {
        server.get("/topics/info").await.1["subscribers"]["stream"] == 1
    })
    .await;
    let mut mux = server.ws("/ws").await;
    mux.send_json(json!({"type": "subscribe", "topic": "info"}))
        .await;
    assert_eq!(mux.next_json().await.unwrap()["type"], "subscribed");

    let (status, body) = server.get("/topics/info").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"topic": "info", "last_id": 3, "oldest_id": 1,
               "subscribers": {"poll": 2, "longpoll": 0, "sse": 1, "ws": 2, "stream": 1,
                               "ds-sse": 0, "ds-longpoll": 0}})
    );

    drop(_sse);
    support::eventually("the SSE subscriber to be uncounted", || async {
        server.get("/topics/info").await.1["subscribers"]["sse"] == 0
    })
    .await;
}

#[tokio::test]
async fn health_and_demo_page() {
    let server = start().await;
    assert_eq!(server.get("/healthz").await, (200, json!({"status": "ok"})));
    let page = server.http.get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("lab.js"));
    for asset in ["/lab.js", "/pushhub.js", "/style.css"] {
        let response = server.http.get(server.url(asset)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{asset}");
    }
}

/// method, path, content type, body, expected status, expected code
type BadRequest = (
    &'static str,
    String,
    Option<&'static str>,
    Vec<u8>,
    u16,
    &'static str,
);

/// Every malformed request gets the right status and a JSON `{"error","code"}` body, and the
/// server keeps serving: a subscriber connected throughout receives every message.
#[tokio::test]
async fn bad_input_is_rejected_with_json_errors_and_loses_nothing() {
    let config = pushhub::Config {
        max_body: 1024,
        ..Default::default()
    };
    let server = start_with(config).await;
    let mut watcher = server.sse("/topics/ok/sse?after=0", None).await;
    server.publish("ok", json!(1)).await;

    let long_topic = "a".repeat(129);
    let cases: Vec<BadRequest> = vec![
        (
            "GET",
            "/topics/bad%20topic/poll".into(),
            None,
            vec![],
            400,
            "invalid_topic",
        ),
        (
            "GET",
            "/topics/bad%2Ftopic/sse".into(),
            None,
            vec![],
            400,
            "invalid_topic",
        ),
        (
            "GET",
            format!("/topics/{long_topic}/poll"),
            None,
            vec![],
            400,
            "invalid_topic",
        ),
        (
            "POST",
            "/topics/caf%C3%A9".into(),
            None,
            b"x".to_vec(),
            400,
            "invalid_topic",
        ),
        (
            "POST",
            "/topics/ok?event=bad%20event".into(),
            None,
            b"x".to_vec(),
            400,
            "invalid_event",
        ),
        (
            "GET",
            "/topics/ok/poll?after=-1".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/poll?after=abc".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/poll?after=1e99".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/poll?after=18446744073709551616".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/poll?after=NaN".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/poll?after=0&limit=0".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/poll?after=0&limit=-1".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/poll?after=0&limit=abc".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/poll?after=0&limit=1e99".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/poll?after=0&limit=1001".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/poll?client=bad%20id".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/longpoll?after=-1".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/longpoll?timeout=-1".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/longpoll?timeout=abc".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/longpoll?timeout=1e99".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/longpoll?timeout=121".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/sse?after=-1".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/topics/ok/ws?after=abc".into(),
            None,
            vec![],
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/topics/ok".into(),
            None,
            vec![b'x'; 1025],
            413,
            "payload_too_large",
        ),
        (
            "POST",
            "/topics/ok".into(),
            Some("application/json"),
            b"{\"a\":".to_vec(),
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/topics/ok".into(),
            Some("application/json"),
            vec![],
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/topics/ok".into(),
            Some("application/json"),
            b"{} {}".to_vec(),
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/topics/ok".into(),
            Some("text/plain"),
            vec![0xff, 0xfe, b'a'],
            400,
            "invalid_utf8",
        ),
        (
            "POST",
            "/topics/ok".into(),
            Some("application/json"),
            vec![b'"', 0xc3, b'"'],
            400,
            "invalid_utf8",
        ),
        (
            "GET",
            "/topics/ok/ws".into(),
            None,
            vec![],
            426,
            "upgrade_required",
        ),
        ("GET", "/ws".into(), None, vec![], 426, "upgrade_required"),
        (
            "GET",
            "/no/such/path".into(),
            None,
            vec![],
            404,
            "not_found",
        ),
        (
            "DELETE",
            "/topics/ok".into(),
            None,
            vec![],
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, content_type, body, status, code) in cases {
        let mut request = server
            .http
            .request(method.parse().unwrap(), server.url(&path))
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        let what = format!("{method} {path}");
        assert_eq!(response.status().as_u16(), status, "{what}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{what}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], code, "{what}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}"
        );
    }

    // A Last-Event-ID that is not a message id is rejected like `after`.
    let response = server
        .http
        .get(server.url("/topics/ok/sse"))
        .header("Last-Event-ID", "x".repeat(10_000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    // Nothing was lost: the watcher got exactly the two good publishes.
    server.publish("ok", json!(2)).await;
    for expected in [1, 2] {
        let event = watcher.next_event().await.unwrap();
        assert_eq!(event.json()["id"], expected);
    }
    let (_, body) = server.get("/topics/ok/poll?after=0").await;
    assert_eq!(ids(body["messages"].as_array().unwrap()), [1, 2]);
}

#[tokio::test]
async fn stats_count_subscribers_deliveries_requests_and_bytes_per_transport() {
    let server = start().await;
    let mut sse = server.sse("/topics/st/sse", None).await;
    let mut ws = server.ws("/topics/st/ws").await;
    let mut stream = server.stream("/topics/st/stream").await;
    support::eventually("the stream to subscribe", || async {
        server.get("/topics/st").await.1["subscribers"]["stream"] == 1
    })
    .await;
    server.publish("st", json!("a")).await;
    server.publish("st", json!("b")).await;
    sse.next_event().await.unwrap();
    sse.next_event().await.unwrap();
    stream.next_json().await.unwrap();
    stream.next_json().await.unwrap();
    ws.next_envelope().await;
    ws.next_envelope().await;
    let (_, poll) = server.get("/topics/st/poll?after=0&client=p").await;
    assert_eq!(ids(poll["messages"].as_array().unwrap()), [1, 2]);
    server.get("/topics/st/poll?after=2&client=p").await;
    let (_, long) = server.get("/topics/st/longpoll?after=1").await;
    assert_eq!(ids(long["messages"].as_array().unwrap()), [2]);

    // A fan-out writer adds what it delivered to the counters at the end of its walk, which
    // may be just after the clients have read it.
    let expected = json!({"poll": 2, "longpoll": 1, "sse": 2, "ws": 2, "stream": 2, "ds-sse": 0, "ds-longpoll": 0});
    support::eventually("every delivery counted", || async {
        server.get("/stats").await.1["deliveries"] == expected
    })
    .await;
    let (status, stats) = server.get("/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["publishes"], 2);
    assert_eq!(stats["topics"], 1);
    assert_eq!(stats["subscribers"]["sse"], 1);
    assert_eq!(stats["subscribers"]["ws"], 1);
    assert_eq!(stats["subscribers"]["poll"], 1);
    assert_eq!(
        stats["deliveries"],
        json!({"poll": 2, "longpoll": 1, "sse": 2, "ws": 2, "stream": 2, "ds-sse": 0, "ds-longpoll": 0})
    );
    assert_eq!(
        stats["requests"],
        json!({"poll": 2, "longpoll": 1, "sse": 1, "ws": 1, "stream": 1, "ds-sse": 0, "ds-longpoll": 0})
    );
    for transport in ["poll", "longpoll", "sse", "ws", "stream"] {
        assert!(
            stats["bytes"][transport].as_u64().unwrap() > 100,
            "{transport}: {stats}"
        );
    }
}

#[tokio::test]
async fn switched_off_transports_answer_404() {
    let config = pushhub::Config {
        transports: vec![TransportKind::Poll, TransportKind::Sse],
        ..Default::default()
    };
    let server = start_with(config).await;
    for path in ["/topics/t/ws", "/ws", "/topics/t/longpoll"] {
        let (status, body) = server.get(path).await;
        assert_eq!(
            (status, body["code"].clone()),
            (404, json!("not_found")),
            "{path}"
        );
    }
    assert_eq!(server.get("/topics/t/poll").await.0, 200);
    let ws = tokio_tungstenite::connect_async(format!("ws://{}/topics/t/ws", server.addr)).await;
    assert!(ws.is_err(), "a WebSocket upgrade must be refused");
}

/// Sends `request` on a fresh connection and reads until `done` says the answer is complete;
/// returns what was read.
async fn exchange(addr: std::net::SocketAddr, request: &[u8], done: fn(&[u8]) -> bool) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    while !done(&got) {
        let n = tokio::time::timeout(support::PATIENCE, socket.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn head_len(answer: &[u8]) -> usize {
    answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4
}

#[tokio::test]
async fn stats_count_the_http_heads_each_transport_puts_on_the_wire() {
    let server = start().await;
    server.publish("heads", json!({"n": 1})).await;
    let heads = |stats: &Value, t: &str| stats["head_bytes"][t].as_u64().unwrap();

    // A poll: its request head and its answer's head (the body is in `bytes`).
    let request = b"GET /topics/heads/poll?after=0 HTTP/1.1\r\nhost: x\r\nuser-agent: test\r\n\r\n";
    let answer = exchange(server.addr, request, |got| {
        got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}")
    })
    .await;
    let (_, stats) = server.get("/stats").await;
    assert_eq!(
        heads(&stats, "poll"),
        (request.len() + head_len(&answer)) as u64
    );

    // An SSE stream: its request head and its response head, once.
    let request =
        b"GET /topics/heads/sse?after=1 HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n";
    let answer = exchange(server.addr, request, |got| {
        got.windows(4).any(|w| w == b"\r\n\r\n")
    })
    .await;
    let (_, stats) = server.get("/stats").await;
    assert_eq!(
        heads(&stats, "sse"),
        (request.len() + head_len(&answer)) as u64
    );
    // Refusals count whole: a bad cursor's 400 with its JSON body.
    let request = b"GET /topics/heads/longpoll?after=x HTTP/1.1\r\nhost: x\r\n\r\n";
    let answer = exchange(server.addr, request, |got| got.ends_with(b"}")).await;
    assert!(answer.starts_with(b"HTTP/1.1 400"));
    let (_, stats) = server.get("/stats").await;
    assert_eq!(
        heads(&stats, "longpoll"),
        (request.len() + answer.len()) as u64
    );
    assert_eq!(heads(&stats, "ws"), 0);
}
