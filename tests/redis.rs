//! `--redis`: several pushhub processes share topics through a real redis-server. Ids are
//! cluster-wide, a cursor from one node resumes on another over every transport, and a Redis
//! outage refuses publishes (503) while keeping subscribers, who are caught up afterwards.

#![allow(missing_docs)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Endpoint, RedisServer, ServerProcess, eventually, spawn_binary};

fn node(redis: &RedisServer) -> ServerProcess {
    spawn_binary(&["--redis", &redis.url()], &[])
}

/// Long polls `topic` on `node` from `after` until `count` messages arrived; returns ids.
async fn long_poll_ids(node: &Endpoint, topic: &str, mut after: u64, count: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    while ids.len() < count {
        let (status, body) = node
            .get(&format!(
                "/topics/{topic}/longpoll?after={after}&timeout=10"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        for message in body["messages"].as_array().unwrap() {
            after = message["id"].as_u64().unwrap();
            ids.push(after);
        }
    }
    ids
}

async fn sse_ids(sse: &mut support::SseClient, count: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    while ids.len() < count {
        let event = tokio::time::timeout(support::PATIENCE, sse.next_event())
            .await
            .expect("SSE event in time")
            .expect("SSE stream open");
        ids.push(event.json()["id"].as_u64().unwrap());
    }
    ids
}

async fn ws_ids(ws: &mut support::WsClient, count: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    while ids.len() < count {
        ids.push(ws.next_envelope().await["id"].as_u64().unwrap());
    }
    ids
}

async fn subscribed(node: &Endpoint, topic: &str, transport: &str, count: u64) {
    eventually(
        &format!("{count} {transport} subscribers of {topic}"),
        || async {
            node.get(&format!("/topics/{topic}")).await.1["subscribers"][transport] == count
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_transport_on_every_node_gets_what_any_node_publishes() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let processes: Vec<_> = (0..3).map(|_| node(&redis)).collect();
    let nodes: Vec<Endpoint> = processes.iter().map(ServerProcess::endpoint).collect();
    let (b, c) = (&nodes[1], &nodes[2]);
    let mut sse_b = b.sse("/topics/t/sse", None).await;
    let mut ws_b = b.ws("/topics/t/ws").await;
    let mut sse_c = c.sse("/topics/t/sse", None).await;
    let mut mux_c = c.ws("/ws").await;
    mux_c
        .send_json(json!({"type": "subscribe", "topic": "t", "after": 0}))
        .await;
    subscribed(b, "t", "sse", 1).await;
    subscribed(b, "t", "ws", 1).await;
    subscribed(c, "t", "sse", 1).await;
    subscribed(c, "t", "ws", 1).await;
    let long_poll = tokio::spawn({
        let c = c.clone();
        async move { long_poll_ids(&c, "t", 0, 30).await }
    });

    // Every node publishes in turn: the ids come from Redis, one sequence for the topic.
    let mut acked = Vec::new();
    for i in 0..30 {
        acked.push(nodes[i % 3].publish("t", json!({ "i": i })).await);
    }
    let expected: Vec<u64> = (1..=30).collect();
    assert_eq!(acked, expected);
    assert_eq!(sse_ids(&mut sse_b, 30).await, expected, "SSE on node B");
    assert_eq!(ws_ids(&mut ws_b, 30).await, expected, "WebSocket on node B");
    assert_eq!(sse_ids(&mut sse_c, 30).await, expected, "SSE on node C");
    assert_eq!(
        ws_ids(&mut mux_c, 30).await,
        expected,
        "multiplexed WS on node C"
    );
    assert_eq!(long_poll.await.unwrap(), expected, "long poll on node C");
    let (_, polled) = c.get("/topics/t/poll?after=0&limit=100").await;
    assert_eq!(
        support::ids(polled["messages"].as_array().unwrap()),
        expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cursor_from_one_node_resumes_on_another_over_every_transport() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (node(&redis), node(&redis));
    let (a, b) = (a.endpoint(), b.endpoint());
    for i in 0..10 {
        a.publish("r", json!(i)).await;
    }
    let (_, first) = a.get("/topics/r/poll?after=0&limit=4").await;
    let seen = support::ids(first["messages"].as_array().unwrap());
    assert_eq!(seen, [1, 2, 3, 4]);
    let rest: Vec<u64> = (5..=10).collect();

    let (_, polled) = b.get("/topics/r/poll?after=4").await;
    assert_eq!(
        support::ids(polled["messages"].as_array().unwrap()),
        rest,
        "poll"
    );
    assert_eq!(long_poll_ids(&b, "r", 4, 6).await, rest, "long poll");
    let mut sse = b.sse("/topics/r/sse", Some("4")).await;
    assert_eq!(sse_ids(&mut sse, 6).await, rest, "SSE with Last-Event-ID");
    let mut ws = b.ws("/topics/r/ws?after=4").await;
    assert_eq!(ws_ids(&mut ws, 6).await, rest, "WebSocket");
    let mut mux = b.ws("/ws").await;
    mux.send_json(json!({"type": "subscribe", "topic": "r", "after": 4}))
        .await;
    assert_eq!(ws_ids(&mut mux, 6).await, rest, "multiplexed WebSocket");

    // And back: live messages published on B reach the subscribers there in order.
    a.publish("r", json!("live")).await;
    assert_eq!(sse_ids(&mut sse, 1).await, [11]);
    assert_eq!(ws_ids(&mut ws, 1).await, [11]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_refuses_publishes_keeps_subscribers_and_catches_them_up() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (node(&redis), node(&redis));
    let (a, b) = (a.endpoint(), b.endpoint());
    let mut sse = b.sse("/topics/o/sse", None).await;
    let mut ws = b.ws("/topics/o/ws").await;
    subscribed(&b, "o", "sse", 1).await;
    subscribed(&b, "o", "ws", 1).await;
    for i in 0..5 {
        a.publish("o", json!(i)).await;
    }
    assert_eq!(sse_ids(&mut sse, 5).await, [1, 2, 3, 4, 5]);
    assert_eq!(ws_ids(&mut ws, 5).await, [1, 2, 3, 4, 5]);

    redis.kill();
    for node in [&a, &b] {
        let response = node
            .http
            .post(node.url("/topics/o"))
            .json(&json!("during the outage"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503, "a publish while Redis is down");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "store_unavailable");
    }
    // The streams stay open while Redis is away (node-wide counts need no Redis).
    tokio::time::sleep(Duration::from_secs(1)).await;
    // B's copy of the topic's newest messages was dropped with its subscription: history
    // reads need Redis now.
    let (status, body) = b.get("/topics/o/poll?after=0").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("store_unavailable"))
    );
    let (_, stats) = b.get("/stats").await;
    assert_eq!(
        (&stats["subscribers"]["sse"], &stats["subscribers"]["ws"]),
        (&json!(1), &json!(1))
    );

    redis.restart();
    // Publish on A as soon as it works again; B's listener may still be reconnecting, and
    // catches its subscribers up from history when it is back.
    let mut acked = Vec::new();
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while acked.len() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishes never recovered"
        );
        let response = a
            .http
            .post(a.url("/topics/o"))
            .json(&json!("after"))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            201 => acked.push(
                response.json::<Value>().await.unwrap()["id"]
                    .as_u64()
                    .unwrap(),
            ),
            503 => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("publish answered {other}"),
        }
    }
    assert_eq!(
        acked,
        [6, 7, 8, 9, 10],
        "ids go on from Redis's counter, none false"
    );
    assert_eq!(
        sse_ids(&mut sse, 5).await,
        acked,
        "the same SSE stream resumes"
    );
    assert_eq!(
        ws_ids(&mut ws, 5).await,
        acked,
        "the same WebSocket resumes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_history_keeps_the_newest_messages_and_a_late_cursor_is_told_so() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let process = spawn_binary(&["--redis", &redis.url(), "--history-size", "3"], &[]);
    let node = process.endpoint();
    for i in 0..5 {
        node.publish("h", json!(i)).await;
    }
    let (_, info) = node.get("/topics/h").await;
    assert_eq!(
        (&info["last_id"], &info["oldest_id"]),
        (&json!(5), &json!(3))
    );
    let (_, polled) = node.get("/topics/h/poll?after=1").await;
    assert_eq!(polled["truncated"], true, "{polled}");
    assert_eq!(
        support::ids(polled["messages"].as_array().unwrap()),
        [3, 4, 5]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_redis_is_down_every_transport_tells_its_clients_to_come_back() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let a = node(&redis);
    let a = a.endpoint();
    redis.kill();

    // SSE: `200` and a stream that says when to come back, then ends. A browser's EventSource
    // reconnects after `retry` with its Last-Event-ID; on a `503` it would give up for good.
    // From now: the store cannot say where now is, so the stream cannot start.
    // From a cursor: the stream starts there (its id line), and its catch-up cannot be read.
    for (last_event_id, expected) in [
        (
            None,
            "retry: 2000\n: message store unavailable; come back with your cursor\n\n",
        ),
        (
            Some("7"),
            "retry: 2000\n\nid: 7\n\n: message store unavailable; come back with your cursor\n\n",
        ),
    ] {
        let mut request = a.http.get(a.url("/topics/d/sse"));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let body = tokio::time::timeout(support::PATIENCE, response.text())
            .await
            .expect("the stream ends")
            .unwrap();
        assert_eq!(body, expected);
    }

    // WebSocket: the handshake completes, and the session closes with 1013 (try again later).
    let (mut ws, _) = tokio_tungstenite::connect_async(a.url("/topics/d/ws").replace("http", "ws"))
        .await
        .expect("the handshake completes");
    match tokio::time::timeout(support::PATIENCE, ws.next())
        .await
        .unwrap()
    {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Again);
            assert_eq!(frame.reason, "store_unavailable");
        }
        other => panic!("expected a 1013 close, got {other:?}"),
    }

    // An HTTP stream from a cursor starts, and ends with a line saying why.
    let response = a
        .http
        .get(a.url("/topics/d/stream?after=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        "{\"type\":\"unavailable\",\"code\":\"store_unavailable\"}\n"
    );
    // Polls, long polls and an HTTP stream from now (read with fetch, which sees the status):
    // 503 with Retry-After.
    for path in [
        "/topics/d/poll?after=0",
        "/topics/d/longpoll?after=0&timeout=1",
        "/topics/d/stream",
    ] {
        let response = a.http.get(a.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 503, "{path}");
        assert_eq!(response.headers()["retry-after"], "1", "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "store_unavailable", "{path}");
    }

    // Back: the same SSE request is a live stream again.
    redis.restart();
    let mut sse = None;
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while sse.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SSE never recovered"
        );
        let response = a
            .http
            .get(a.url("/topics/d/sse?after=0"))
            .send()
            .await
            .unwrap();
        let mut body = Box::pin(response.bytes_stream());
        // A live stream starts with its hint and its starting id; the unavailable answer
        // has no id and ends.
        let mut start = String::new();
        while !start.contains("id: 0\n") {
            match tokio::time::timeout(support::PATIENCE, body.next())
                .await
                .unwrap()
            {
                Some(chunk) => start.push_str(&String::from_utf8_lossy(&chunk.unwrap())),
                None => break,
            }
        }
        if start.contains("id: 0\n") {
            sse = Some(body);
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eventually("a publish works again", || async {
        a.http
            .post(a.url("/topics/d"))
            .json(&json!("back"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 201)
    })
    .await;
    let mut body = sse.unwrap();
    let mut seen = String::new();
    while !seen.contains("\"back\"") {
        let chunk = tokio::time::timeout(support::PATIENCE, body.next())
            .await
            .expect("the message arrives")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}
