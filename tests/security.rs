//! Production hardening over real sockets: tokens, origins, limits, liveness, slow consumers.

#![allow(missing_docs)]

mod support;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use pushhub::{Config, access::unix_now, hub::SlowConsumerPolicy, message::TransportKind};
use serde_json::{Value, json};
use support::{PATIENCE, SseItem, TestServer, eventually, start_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{
    Message as WsMessage, client::IntoClientRequest, protocol::frame::coding::CloseCode,
};

const SECRET: &str = "test-secret";

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn reader_token(topics: &[&str], seconds: u64) -> String {
    token(json!({"exp": unix_now() + seconds, "sub": "reader", "pushhub": {"subscribe": topics}}))
}

fn secured() -> Config {
    Config {
        jwt_secret: Some(SECRET.into()),
        public_topics: vec!["lobby".into()],
        ..Default::default()
    }
}

async fn status_and_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

async fn post(server: &TestServer, topic: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut request = server
        .http
        .post(server.url(&format!("/topics/{topic}")))
        .json(&json!({"n": 1}));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn tokens_gate_publishing_with_401_and_403_that_reveal_nothing() {
    let server = start_with(secured()).await;
    let response = post(&server, "news.a", None).await;
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"pushhub\""
    );
    assert_eq!(
        status_and_code(response).await,
        (401, "unauthorized".into())
    );
    let expired = token(json!({"exp": unix_now() - 5, "pushhub": {"publish": ["*"]}}));
    assert_eq!(
        status_and_code(post(&server, "news.a", Some(&expired)).await).await,
        (401, "token_expired".into())
    );
    let forged = encode(
        &Header::default(),
        &json!({"exp": unix_now() + 60, "pushhub": {"publish": ["*"]}}),
        &EncodingKey::from_secret(b"guessed"),
    )
    .unwrap();
    assert_eq!(
        status_and_code(post(&server, "news.a", Some(&forged)).await).await,
        (401, "invalid_token".into())
    );

    let writer = token(json!({"exp": unix_now() + 60, "pushhub": {"publish": ["news.*"]}}));
    assert_eq!(post(&server, "news.a", Some(&writer)).await.status(), 201);
    // A topic that exists and one that does not are refused alike, byte for byte.
    let existing = post(&server, "news", Some(&writer)).await;
    let missing = post(&server, "never-used", Some(&writer)).await;
    assert_eq!(existing.status(), 403);
    assert_eq!(missing.status(), 403);
    assert_eq!(
        existing.text().await.unwrap(),
        missing.text().await.unwrap()
    );

    // ?token= works where headers cannot be set.
    let response = server
        .http
        .post(server.url(&format!("/topics/news.b?token={writer}")))
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

#[tokio::test]
async fn every_transport_needs_a_subscribe_grant_outside_public_topics() {
    let server = start_with(secured()).await;
    let reader = reader_token(&["news.*"], 60);
    let other = reader_token(&["chat"], 60);
    for path in [
        "/topics/news.a/poll",
        "/topics/news.a/longpoll?timeout=0",
        "/topics/news.a/sse",
        "/topics/news.a/ws",
        "/topics/news.a/stream",
        "/topics/news.a",
    ] {
        let anonymous = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(
            status_and_code(anonymous).await,
            (401, "unauthorized".into()),
            "{path}"
        );
        let url = server.url(path);
        let joiner = if path.contains('?') { '&' } else { '?' };
        let wrong = server
            .http
            .get(format!("{url}{joiner}token={other}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            status_and_code(wrong).await,
            (403, "forbidden".into()),
            "{path}"
        );
    }
    let (status, _) = server
        .get(&format!("/topics/news.a/poll?token={reader}"))
        .await;
    assert_eq!(status, 200);
    let (status, _) = server.get("/topics/lobby/poll").await;
    assert_eq!(status, 200, "public topic without a token");
    let mut sse = server
        .sse(&format!("/topics/news.a/sse?token={reader}"), None)
        .await;
    let mut ws = server
        .ws(&format!("/topics/news.a/ws?token={reader}"))
        .await;
    let writer = token(json!({"exp": unix_now() + 60, "pushhub": {"publish": ["news.a"]}}));
    assert_eq!(post(&server, "news.a", Some(&writer)).await.status(), 201);
    assert_eq!(sse.next_event().await.unwrap().id.as_deref(), Some("1"));
    assert_eq!(ws.next_envelope().await["id"], 1);

    // On the multiplexed socket, each subscribe and publish frame is checked.
    let mut mux = server.ws(&format!("/ws?token={reader}")).await;
    mux.send_json(json!({"type": "subscribe", "topic": "chat"}))
        .await;
    let reply = mux.next_json().await.unwrap();
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    mux.send_json(json!({"type": "publish", "topic": "news.a", "data": 1}))
        .await;
    assert_eq!(mux.next_json().await.unwrap()["code"], "forbidden");
    mux.send_json(json!({"type": "subscribe", "topic": "news.a"}))
        .await;
    assert_eq!(mux.next_json().await.unwrap()["type"], "subscribed");
}

#[tokio::test]
async fn an_expiring_token_ends_sse_with_an_event_and_closes_websockets_with_4001() {
    let server = start_with(secured()).await;
    let short = reader_token(&["news.*"], 2);
    let mut sse = server
        .sse(&format!("/topics/news.a/sse?token={short}"), None)
        .await;
    let mut ws = server.ws(&format!("/topics/news.a/ws?token={short}")).await;
    let mut stream = server
        .stream(&format!("/topics/news.a/stream?token={short}"))
        .await;
    let started = std::time::Instant::now();
    let event = sse.next_event().await.expect("an expired event");
    assert_eq!(event.event, "expired");
    assert_eq!(event.json()["code"], "token_expired");
    assert!(sse.next_item().await.is_none(), "the stream ends after it");
    assert_eq!(
        stream.next_json().await.expect("an expired line"),
        json!({"type": "expired", "code": "token_expired"})
    );
    assert!(
        stream.next_line().await.is_none(),
        "the HTTP stream ends after it"
    );
    let close = ws.next_close().await;
    assert_eq!(close.code, CloseCode::Library(4001));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn websocket_handshakes_and_cors_follow_the_origin_allowlist() {
    let server = start_with(Config {
        allowed_origins: vec!["https://app.example".into()],
        ..Default::default()
    })
    .await;
    let handshake = |origin: &'static str| {
        let mut request = format!("ws://{}/topics/t/ws", server.addr)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    assert!(handshake("https://app.example").await.is_ok());
    match handshake("https://evil.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("cross-site handshake accepted: {:?}", other.map(|_| ())),
    }
    let preflight = |origin: &'static str| {
        server
            .http
            .request(reqwest::Method::OPTIONS, server.url("/topics/t"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let refused = preflight("https://evil.example").await.unwrap();
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn connection_limits_answer_json_503_and_429_with_retry_after() {
    for (config, status, code) in [
        (
            Config {
                max_connections_per_ip: 2,
                ..Default::default()
            },
            429,
            "rate_limited",
        ),
        (
            Config {
                max_connections: 2,
                ..Default::default()
            },
            503,
            "at_capacity",
        ),
    ] {
        let server = start_with(config).await;
        let _first = server.sse("/topics/t/sse", None).await;
        let _second = server.sse("/topics/t/sse", None).await;
        let third = reqwest::Client::new()
            .get(server.url("/topics/t/poll"))
            .send()
            .await
            .unwrap();
        assert!(third.headers().contains_key("retry-after"));
        assert_eq!(status_and_code(third).await, (status, code.into()));
        drop(_first);
        eventually("a freed place is reusable", || async {
            reqwest::Client::new()
                .get(server.url("/topics/t/poll"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_huge_headers_refused() {
    let server = start_with(Config {
        header_timeout: Duration::from_millis(300),
        max_header_bytes: 8 * 1024,
        ..Default::default()
    })
    .await;
    let mut watcher = server.sse("/topics/calm/sse", None).await;
    // Slowloris: a request line, then nothing.
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /topics/calm/poll HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a slow client is disconnected");

    let huge = "a".repeat(20 * 1024);
    let response = server
        .http
        .get(server.url("/topics/calm/poll"))
        .header("x-padding", huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);

    // Meanwhile a well-behaved subscriber keeps receiving.
    server.publish("calm", json!("still here")).await;
    assert_eq!(
        watcher.next_event().await.unwrap().json()["data"],
        "still here"
    );
}

#[tokio::test]
async fn publishes_are_rate_limited_per_client() {
    let server = start_with(Config {
        publish_rate: 3,
        ..Default::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(post(&server, "t", None).await.status(), 201);
    }
    let limited = post(&server, "t", None).await;
    assert_eq!(limited.headers()["retry-after"], "1");
    assert_eq!(status_and_code(limited).await, (429, "rate_limited".into()));
    let mut ws = server.ws("/topics/t/ws").await;
    ws.send_json(json!({"type": "publish", "data": 1})).await;
    assert_eq!(ws.next_json().await.unwrap()["code"], "rate_limited");
}

#[tokio::test]
async fn parked_long_polls_and_subscriptions_per_socket_are_bounded() {
    let server = start_with(Config {
        max_parked_longpolls: 1,
        max_subscriptions_per_connection: 2,
        ..Default::default()
    })
    .await;
    let parked = {
        let url = server.url("/topics/t/longpoll?timeout=1");
        tokio::spawn(async move { reqwest::get(url).await.unwrap().status() })
    };
    eventually("the first long poll is parked", || async {
        server.subscribers("t").await[TransportKind::Longpoll] == 1
    })
    .await;
    let refused = server
        .http
        .get(server.url("/topics/t/longpoll?timeout=1"))
        .send()
        .await
        .unwrap();
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(status_and_code(refused).await, (503, "at_capacity".into()));
    assert_eq!(parked.await.unwrap(), 200);
    let (status, _) = server.get("/topics/t/longpoll?timeout=0").await;
    assert_eq!(status, 200, "the place is free again");

    let mut mux = server.ws("/ws").await;
    for topic in ["a", "b", "c"] {
        mux.send_json(json!({"type": "subscribe", "topic": topic}))
            .await;
    }
    assert_eq!(mux.next_json().await.unwrap()["type"], "subscribed");
    assert_eq!(mux.next_json().await.unwrap()["type"], "subscribed");
    assert_eq!(
        mux.next_json().await.unwrap()["code"],
        "too_many_subscriptions"
    );
}

#[tokio::test]
async fn a_websocket_peer_that_stops_answering_is_dropped() {
    let server = start_with(Config {
        ws_ping_interval: Duration::from_millis(200),
        ws_pong_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    // A live client answers pings (tungstenite does when read) and stays.
    let mut live = server.ws("/topics/beat/ws").await;
    // A dead one completes the handshake, then never reads or writes again.
    let (_dead, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/topics/beat/ws", server.addr))
            .await
            .unwrap();
    let ws_count = || async { server.subscribers("beat").await[TransportKind::Ws] };
    eventually("both subscribed", || async { ws_count().await == 2 }).await;
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        while let Some(Ok(frame)) = live.ws.next().await {
            if frame.is_ping() {
                pings += 1;
            }
            if pings == 5 {
                return live;
            }
        }
        panic!("live connection closed");
    });
    eventually("the silent peer is dropped", || async {
        ws_count().await == 1
    })
    .await;
    let mut live = reader.await.unwrap();
    server.publish("beat", json!(1)).await;
    assert_eq!(live.next_envelope().await["id"], 1);
}

#[tokio::test]
async fn slow_consumers_are_disconnected_under_the_disconnect_policy() {
    let server = start_with(Config {
        slow_consumer: SlowConsumerPolicy::Disconnect,
        subscriber_queue: 4,
        ..Default::default()
    })
    .await;
    let mut sse = server.sse("/topics/flood/sse", None).await;
    let mut ws = server.ws("/topics/flood/ws").await;
    let big = "x".repeat(16 * 1024);
    for _ in 0..2000 {
        server.publish("flood", json!(big)).await;
    }
    let close = ws.next_close().await;
    assert_eq!(close.code, CloseCode::Again, "1013: try again later");
    let mut events = 0;
    while let Some(item) = sse.next_item().await {
        if let SseItem::Event(_) = item {
            events += 1;
        }
    }
    assert!(
        events < 2000,
        "the SSE stream ended early ({events} events)"
    );
}

#[tokio::test]
async fn metrics_are_served_in_prometheus_text_format() {
    let server = start_with(secured()).await;
    let reader = reader_token(&["m"], 60);
    let mut sse = server
        .sse(&format!("/topics/m/sse?token={reader}"), None)
        .await;
    let writer = token(json!({"exp": unix_now() + 60, "pushhub": {"publish": ["m"]}}));
    assert_eq!(post(&server, "m", Some(&writer)).await.status(), 201);
    assert_eq!(post(&server, "m", None).await.status(), 401);
    sse.next_event().await.unwrap();
    let response = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    };
    assert!(value("pushhub_deliveries_total{transport=\"sse\"}") >= 1.0);
    assert!(value("pushhub_subscribers{transport=\"sse\"}") >= 1.0);
    assert!(value("pushhub_publishes_total") >= 1.0);
    assert!(value("pushhub_rejected_total{code=\"unauthorized\"}") >= 1.0);
    assert!(value("pushhub_stream_subscriptions_total{transport=\"sse\",event=\"opened\"}") >= 1.0);
    assert!(value("pushhub_delivery_lag_seconds_count{transport=\"sse\"}") >= 1.0);
    assert!(text.contains("pushhub_delivery_lag_seconds_bucket{transport=\"sse\",le=\"0.005\"}"));
    assert!(value("pushhub_open_connections") >= 1.0);
}

#[tokio::test]
async fn an_sse_reader_that_stops_reading_is_cut_off_and_others_keep_receiving() {
    let server = start_with(Config {
        stall_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let mut live = server.sse("/topics/stall/sse", None).await;
    // The stalled reader: a raw socket that sends the request and never reads again.
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stalled
        .write_all(b"GET /topics/stall/sse HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    eventually("both streams open", || async {
        server.subscribers("stall").await[TransportKind::Sse] == 2
    })
    .await;
    let big = "y".repeat(32 * 1024);
    let publisher = async {
        for _ in 0..400 {
            server.publish("stall", json!(big)).await;
        }
    };
    let reader = async {
        for _ in 0..400 {
            live.next_event().await.unwrap();
        }
    };
    tokio::join!(publisher, reader);
    eventually("the stalled stream is dropped", || async {
        server.subscribers("stall").await[TransportKind::Sse] == 1
    })
    .await;
    drop(stalled);
}

#[tokio::test]
async fn fragmented_frames_are_reassembled_and_stray_continuations_close_1002() {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let server = start_with(Config::default()).await;
    let mut ws = server.ws("/topics/frag/ws").await;
    let command = json!({"type": "publish", "data": {"split": true}}).to_string();
    let (head, tail) = command.split_at(10);
    ws.ws
        .send(WsMessage::Frame(Frame::message(
            head.as_bytes().to_vec(),
            OpCode::Data(Data::Text),
            false,
        )))
        .await
        .unwrap();
    ws.ws
        .send(WsMessage::Frame(Frame::message(
            tail.as_bytes().to_vec(),
            OpCode::Data(Data::Continue),
            true,
        )))
        .await
        .unwrap();
    let ack = loop {
        let frame = ws.next_json().await.unwrap();
        if frame["type"] == "ack" {
            break frame;
        }
    };
    assert_eq!(ack["id"], 1);

    let mut stray = server.ws("/topics/frag/ws").await;
    stray
        .ws
        .send(WsMessage::Frame(Frame::message(
            b"orphan".to_vec(),
            OpCode::Data(Data::Continue),
            true,
        )))
        .await
        .unwrap();
    assert_eq!(stray.next_close().await.code, CloseCode::Protocol);
    // The first connection is unaffected: it gets its own message, then the next.
    assert_eq!(ws.next_envelope().await["id"], 1);
    server.publish("frag", json!(2)).await;
    assert_eq!(ws.next_envelope().await["id"], 2);
}

#[tokio::test]
async fn ten_thousand_topics_from_one_client_are_forgotten_and_hurt_no_one() {
    let server = start_with(Config {
        sweep_interval: Duration::from_millis(200),
        // A poller counts as a subscriber for this long, which keeps its topic.
        poller_window: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let mut watcher = server.sse("/topics/watched/sse", None).await;
    let http = server.http.clone();
    let statuses: Vec<u16> = futures::stream::iter(0..10_000)
        .map(|n| {
            let (http, url) = (http.clone(), server.url(&format!("/topics/junk-{n}/poll")));
            async move { http.get(url).send().await.unwrap().status().as_u16() }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 200));
    server.publish("watched", json!("still served")).await;
    assert_eq!(
        watcher.next_event().await.unwrap().json()["data"],
        "still served"
    );
    // Topics with no history and no subscriber are dropped by the sweeper.
    eventually("the junk topics are swept", || async {
        server.get("/stats").await.1["topics"].as_u64().unwrap() <= 2
    })
    .await;
}

#[tokio::test]
async fn an_oversized_request_line_is_refused() {
    let server = start_with(Config {
        max_header_bytes: 8 * 1024,
        ..Default::default()
    })
    .await;
    let long = "9".repeat(20 * 1024);
    let response = server
        .http
        .get(server.url(&format!("/topics/t/poll?after={long}")))
        .send()
        .await
        .unwrap();
    assert!(
        [414, 431].contains(&response.status().as_u16()),
        "{}",
        response.status()
    );
    let (status, _) = server.get("/topics/t/poll").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn malformed_http_gets_400_and_idle_keep_alive_connections_are_closed() {
    let server = start_with(Config {
        header_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let mut watcher = server.sse("/topics/calm/sse", None).await;
    for garbage in [
        &b"NOT HTTP AT ALL\r\n\r\n"[..],
        b"GET /topics/calm/poll HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"GET /topics/calm/poll HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        b"GET /\x00\x01 HTTP/1.1\r\n\r\n",
    ] {
        let mut raw = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        raw.write_all(garbage).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, raw.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{garbage:?} got {answer:?}");
    }
    // A keep-alive connection that goes quiet after one request is closed.
    let mut idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, idle.read_to_end(&mut answer))
        .await
        .expect("an idle keep-alive connection is closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    server.publish("calm", json!("still here")).await;
    assert_eq!(
        watcher.next_event().await.unwrap().json()["data"],
        "still here"
    );
}

#[tokio::test]
async fn rs256_and_es256_tokens_are_verified_with_a_public_key_file() {
    use jsonwebtoken::Algorithm;
    let dir = std::env::temp_dir().join(format!("pushhub-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ec = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cases = [
        (
            Algorithm::RS256,
            fixtures.join("rs256-public.pem"),
            EncodingKey::from_rsa_pem(&std::fs::read(fixtures.join("rs256-private.pem")).unwrap())
                .unwrap(),
        ),
        (
            Algorithm::ES256,
            {
                let path = dir.join("es256-public.pem");
                std::fs::write(&path, ec.public_key_pem()).unwrap();
                path
            },
            EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
        ),
    ];
    for (algorithm, public_key, signing_key) in cases {
        let public_pem = std::fs::read(&public_key).unwrap();
        let server = start_with(Config {
            jwt_public_key: Some(public_key),
            ..Default::default()
        })
        .await;
        let claims = json!({"exp": unix_now() + 60, "pushhub": {"publish": ["k"]}});
        let good = encode(&Header::new(algorithm), &claims, &signing_key).unwrap();
        assert_eq!(
            post(&server, "k", Some(&good)).await.status(),
            201,
            "{algorithm:?}"
        );
        // The HS256-with-the-public-key confusion, and a plain HS256 token, are refused.
        let confused = encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(&public_pem),
        )
        .unwrap();
        for refused in [confused, token(claims.clone())] {
            assert_eq!(
                status_and_code(post(&server, "k", Some(&refused)).await).await,
                (401, "invalid_token".into()),
                "{algorithm:?}"
            );
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
