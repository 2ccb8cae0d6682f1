//! Durable Streams on the hub: a stream is a topic, so what is appended through the protocol
//! reaches every pushhub transport, what pushhub publishes is read through the protocol, a
//! closed stream refuses both, and `--redis` nodes share streams. (The protocol itself is
//! checked by its conformance suite, `tests/conformance`, against the real binary.)

#![allow(missing_docs)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Endpoint, PATIENCE, RedisServer, spawn_binary};

const OFFSET_ZERO: &str = "0000000000000000_0000000000000000";

async fn put(node: &Endpoint, name: &str, content_type: &str, body: &'static [u8]) -> u16 {
    node.http
        .put(node.url(&format!("/v1/stream/{name}")))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn append(node: &Endpoint, name: &str, content_type: &str, body: &'static [u8]) -> String {
    let response = node
        .http
        .post(node.url(&format!("/v1/stream/{name}")))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    response.headers()["stream-next-offset"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// A catch-up read: status, `Stream-Next-Offset`, body.
async fn read(node: &Endpoint, name: &str, offset: &str) -> (u16, String, Vec<u8>) {
    let response = node
        .http
        .get(node.url(&format!("/v1/stream/{name}?offset={offset}")))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let next = response
        .headers()
        .get("stream-next-offset")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, next, response.bytes().await.unwrap().to_vec())
}

/// The next native SSE event that carries a message.
async fn next_message(sse: &mut support::SseClient) -> Value {
    loop {
        let event = tokio::time::timeout(PATIENCE, sse.next_event())
            .await
            .expect("an SSE event in time")
            .expect("the stream stays open");
        if !event.data.is_empty() && event.event != "keepalive" {
            return event.json();
        }
    }
}

/// The next NDJSON line that carries a message.
async fn next_line_message(stream: &mut support::StreamClient) -> Value {
    loop {
        let line = tokio::time::timeout(PATIENCE, stream.next_line())
            .await
            .expect("a line in time")
            .expect("the stream stays open");
        if line.get("id").is_some() {
            return line;
        }
    }
}

#[tokio::test]
async fn an_append_reaches_every_pushhub_transport_and_a_publish_is_read_as_a_stream() {
    let server = support::start().await;
    let node = &server.endpoint;
    assert_eq!(put(node, "orders", "application/json", b"[]").await, 201);

    let mut sse = node.sse("/topics/orders/sse", None).await;
    let mut ws = node.ws("/topics/orders/ws").await;
    let mut stream = node.stream("/topics/orders/stream").await;
    let long_poll = {
        let node = Endpoint::new(&node.host);
        tokio::spawn(async move { node.get("/topics/orders/longpoll?timeout=10").await })
    };
    // Every subscriber is in place before the append.
    support::eventually("four subscribers", || async {
        use pushhub::message::TransportKind as T;
        let s = server.subscribers("orders").await;
        [T::Sse, T::Ws, T::Stream, T::Longpoll]
            .iter()
            .all(|&kind| s[kind] == 1)
    })
    .await;

    let next = append(node, "orders", "application/json", br#"{"item":"tea"}"#).await;
    assert_eq!(next, "0000000000000000_0000000000000001");
    let expected = json!({"item": "tea"});
    assert_eq!(next_message(&mut sse).await["data"], expected);
    assert_eq!(ws.next_envelope().await["data"], expected);
    assert_eq!(next_line_message(&mut stream).await["data"], expected);
    let (status, body) = long_poll.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"][0]["data"], expected);
    let (_, polled) = node.get("/topics/orders/poll?after=0").await;
    assert_eq!(polled["messages"][0]["data"], expected);
    assert_eq!(polled["messages"][0]["event"], "message");

    // A pushhub publish is the stream's next value.
    node.publish("orders", json!({"item": "cake"})).await;
    let (status, next, body) = read(node, "orders", "-1").await;
    assert_eq!(status, 200);
    assert_eq!(next, "0000000000000000_0000000000000002");
    let values: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(values, json!([{"item": "tea"}, {"item": "cake"}]));
    // A multi-value append is one message holding its values.
    append(node, "orders", "application/json", br#"[1, "two"]"#).await;
    assert_eq!(ws.next_envelope().await["data"], json!({"item": "cake"}));
    let envelope = ws.next_envelope().await;
    assert_eq!(
        (envelope["event"].clone(), envelope["data"].clone()),
        (json!("values"), json!([1, "two"]))
    );
    server.stop().await;
}

#[tokio::test]
async fn text_and_byte_streams_map_onto_json_messages() {
    let server = support::start().await;
    let node = &server.endpoint;
    assert_eq!(put(node, "log", "text/plain", b"line one\n").await, 201);
    node.publish("log", json!("line two\n")).await;
    let (_, _, body) = read(node, "log", "-1").await;
    assert_eq!(body, b"line one\nline two\n");

    assert_eq!(
        put(node, "blob", "application/octet-stream", b"").await,
        201
    );
    append(node, "blob", "application/octet-stream", &[0, 1, 254, 255]).await;
    let (_, polled) = node.get("/topics/blob/poll?after=0").await;
    assert_eq!(polled["messages"][0]["event"], "bytes");
    assert_eq!(polled["messages"][0]["data"], "AAH+/w==");
    let (_, _, body) = read(node, "blob", OFFSET_ZERO).await;
    assert_eq!(body, [0, 1, 254, 255]);
    server.stop().await;
}

#[tokio::test]
async fn a_closed_stream_refuses_pushhub_publishes_too() {
    let server = support::start().await;
    let node = &server.endpoint;
    assert_eq!(put(node, "done", "application/json", b"[1]").await, 201);
    let closed = node
        .http
        .post(node.url("/v1/stream/done"))
        .header("stream-closed", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 204);
    let refused = node
        .http
        .post(node.url("/topics/done"))
        .json(&json!(2))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "stream_closed");
    let (_, _, body) = read(node, "done", "-1").await;
    assert_eq!(body, b"[1]");
    // A topic that is not a stream is not affected, and a deleted stream is a topic again.
    node.publish("other", json!(1)).await;
    let deleted = node
        .http
        .delete(node.url("/v1/stream/done"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    node.publish("done", json!(3)).await;
    assert_eq!(read(node, "done", "-1").await.0, 404);
    server.stop().await;
}

#[tokio::test]
async fn redis_nodes_share_streams_appends_and_closes() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = spawn_binary(&["--redis", &redis.url()], &[]);
    let b = spawn_binary(
        &["--redis", &redis.url(), "--ds-long-poll-timeout", "10s"],
        &[],
    );
    let (a, b) = (a.endpoint(), b.endpoint());
    assert_eq!(put(&a, "shared", "text/plain", b"from a;").await, 201);
    let (status, tail, body) = read(&b, "shared", "-1").await;
    assert_eq!((status, body.as_slice()), (200, &b"from a;"[..]));
    // A long poll on B at the tail wakes on A's append.
    let waiting = {
        let url = b.url(&format!("/v1/stream/shared?offset={tail}&live=long-poll"));
        let http = b.http.clone();
        tokio::spawn(async move {
            let response = http.get(url).send().await.unwrap();
            (response.status().as_u16(), response.bytes().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    append(&a, "shared", "text/plain", b"again").await;
    let (status, body) = tokio::time::timeout(PATIENCE, waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((status, &body[..]), (200, &b"again"[..]));
    // B sees A's close, and refuses appends after it.
    let closed = a
        .http
        .post(a.url("/v1/stream/shared"))
        .header("stream-closed", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 204);
    let refused = b
        .http
        .post(b.url("/v1/stream/shared"))
        .header("content-type", "text/plain")
        .body("late")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    assert_eq!(refused.headers()["stream-closed"], "true");
}
