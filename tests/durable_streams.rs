//! Durable Streams on the hub: a stream is a topic, so what is appended through the protocol
//! reaches every pushhub transport, what pushhub publishes is read through the protocol, a
//! closed stream refuses both, and `--redis` nodes share streams. (The protocol itself is
//! checked by its conformance suite, `tests/conformance`, against the real binary.)

#![allow(missing_docs)]

mod support;

use std::time::Duration;

use jsonwebtoken::{EncodingKey, Header, encode};
use pushhub::{Config, access::unix_now};
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
    // B's readers wait 60 s: whatever ends them sooner came from A.
    let b = spawn_binary(
        &["--redis", &redis.url(), "--ds-long-poll-timeout", "60s"],
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
    // Readers on B waiting at the tail (an SSE read, a long poll) end as soon as A closes
    // the stream, not at their wait's end.
    let (_, tail, _) = read(&b, "shared", "-1").await;
    let mut sse = DsSse::open(&b, "shared", &format!("offset={tail}")).await;
    assert_eq!(sse.next().await.unwrap().0, "control");
    let waiting = {
        let url = b.url(&format!("/v1/stream/shared?offset={tail}&live=long-poll"));
        let http = b.http.clone();
        tokio::spawn(async move {
            let response = http.get(url).send().await.unwrap();
            let closed = response.headers().get("stream-closed").cloned();
            (response.status().as_u16(), closed)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let closed = a
        .http
        .post(a.url("/v1/stream/shared"))
        .header("stream-closed", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 204);
    let rest = sse.until_end().await;
    let (event, data) = rest.last().expect("the closing control event");
    assert_eq!(event, "control");
    assert!(data.contains(r#""streamClosed":true"#), "{data}");
    let (status, closed) = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the long poll answered at the close")
        .unwrap();
    assert_eq!((status, closed.unwrap()), (204, "true".parse().unwrap()));
    // B refuses appends after A's close.
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

const SECRET: &str = "ds-secret";

fn token(grants: Value) -> String {
    let claims = json!({"exp": unix_now() + 600, "sub": "ds", "pushhub": grants});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Status and error code of an answer.
async fn refusal(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn tokens_body_limits_and_shutdown_apply_to_streams_as_to_topics() {
    let server = support::start_with(Config {
        jwt_secret: Some(SECRET.into()),
        ds_max_body: 1024,
        ds_long_poll_timeout: Duration::from_secs(30),
        ..Config::default()
    })
    .await;
    let node = &server.endpoint;
    let url = node.url("/v1/stream/secret");
    let writer = token(json!({"publish": ["secret"], "subscribe": ["secret"]}));
    let reader = token(json!({"subscribe": ["secret"]}));

    // Writes need a token that may publish; reads one that may subscribe.
    let anonymous = node.http.put(&url).send().await.unwrap();
    assert_eq!(refusal(anonymous).await, (401, "unauthorized".into()));
    let read_only = node
        .http
        .put(&url)
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(read_only).await, (403, "forbidden".into()));
    let created = node
        .http
        .put(&url)
        .bearer_auth(&writer)
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let anonymous = node
        .http
        .get(format!("{url}?offset=-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(anonymous).await, (401, "unauthorized".into()));
    // The raw path's live reads check tokens too, and keep the protocol's headers on refusals.
    let anonymous = node
        .http
        .get(format!("{url}?offset=-1&live=sse"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.headers()["x-content-type-options"], "nosniff");
    assert_eq!(refusal(anonymous).await, (401, "unauthorized".into()));
    // So does a token the gate refuses before the call reaches the transport.
    let forged = node
        .http
        .get(format!("{url}?offset=-1&live=long-poll"))
        .bearer_auth("not.a.token")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.headers()["x-content-type-options"], "nosniff");
    assert_eq!(refusal(forged).await, (401, "invalid_token".into()));

    // An append over --ds-max-body is refused whole, and nothing of it is kept.
    let too_big = node
        .http
        .post(&url)
        .bearer_auth(&writer)
        .header("content-type", "text/plain")
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(too_big).await, (413, "payload_too_large".into()));
    let read = node
        .http
        .get(format!("{url}?offset=-1"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(read.headers()["stream-next-offset"], OFFSET_ZERO);

    // A stopping server answers waiting long polls and ends SSE reads.
    let long_poll = node
        .http
        .get(format!("{url}?offset=now&live=long-poll"))
        .bearer_auth(&reader)
        .send();
    let long_poll = tokio::spawn(long_poll);
    let sse = node
        .http
        .get(format!("{url}?offset=now&live=sse"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    support::eventually("both readers waiting", || async {
        use pushhub::message::TransportKind as T;
        let s = server.subscribers("secret").await;
        s[T::DsSse] == 1 && s[T::DsLongpoll] == 1
    })
    .await;
    let stopped = tokio::time::Instant::now();
    server.stop().await;
    let answered = tokio::time::timeout(PATIENCE, long_poll)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(answered.status(), 204);
    let body = tokio::time::timeout(PATIENCE, sse.text())
        .await
        .unwrap()
        .unwrap();
    assert!(body.contains("event: control"), "{body}");
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "readers end with the server, not at their 30-s wait"
    );
}

/// A Durable Streams SSE read, parsed block by block: `(event, data)` with the `data:` lines
/// joined by newlines.
struct DsSse {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl DsSse {
    async fn open(node: &Endpoint, name: &str, query: &str) -> Self {
        let response = node
            .http
            .get(node.url(&format!("/v1/stream/{name}?{query}&live=sse")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Self {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next event; `None` when the response ends.
    async fn next(&mut self) -> Option<(String, String)> {
        use futures::StreamExt;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = String::new();
                let mut data = Vec::new();
                for line in block.lines().filter(|l| !l.is_empty()) {
                    if let Some(name) = line.strip_prefix("event: ") {
                        event = name.to_owned();
                    } else if let Some(line) = line.strip_prefix("data:") {
                        data.push(line);
                    } else {
                        panic!("unexpected line {line:?} in {block:?}");
                    }
                }
                return Some((event, data.join("\n")));
            }
            match tokio::time::timeout(PATIENCE, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
                Ok(Some(Err(_)) | None) => {
                    assert!(self.buffer.is_empty(), "a partial event: {:?}", self.buffer);
                    return None;
                }
                Err(_) => panic!("SSE read silent for {PATIENCE:?}"),
            }
        }
    }

    /// Every event until the response ends.
    async fn until_end(mut self) -> Vec<(String, String)> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

async fn post(node: &Endpoint, name: &str, body: String, close: bool) -> reqwest::Response {
    let mut request = node
        .http
        .post(node.url(&format!("/v1/stream/{name}")))
        .header("content-type", "application/json")
        .body(body);
    if close {
        request = request.header("stream-closed", "true");
    }
    request.send().await.unwrap()
}

/// The values a JSON stream's SSE events carry, in order, and its control events.
fn values_and_controls(events: &[(String, String)]) -> (Vec<Value>, Vec<Value>) {
    let (mut values, mut controls) = (Vec::new(), Vec::new());
    for (event, data) in events {
        let data: Value = serde_json::from_str(data).unwrap();
        match event.as_str() {
            "data" => values.extend(data.as_array().unwrap().iter().cloned()),
            "control" => controls.push(data),
            other => panic!("unexpected event {other}"),
        }
    }
    (values, controls)
}

#[tokio::test]
async fn live_sse_reads_follow_appends_and_end_right_after_the_closing_one() {
    let server = support::start_with(Config {
        ds_long_poll_timeout: Duration::from_millis(400),
        ..Config::default()
    })
    .await;
    let node = &server.endpoint;
    assert_eq!(put(node, "feed", "application/json", b"[]").await, 201);
    // A backlog longer than a catch-up page (4096 messages): the reader from the start reads
    // the first page itself and the rest through its subscription.
    const BACKLOG: u64 = 4100;
    for i in 0..BACKLOG {
        assert_eq!(post(node, "feed", i.to_string(), false).await.status(), 204);
    }
    let interval = (unix_now() * 1000 - 1_728_432_000_000) / 20_000;
    let ahead = interval + 1000;
    let mut readers = vec![DsSse::open(node, "feed", "offset=-1").await];
    for _ in 0..3 {
        readers.push(DsSse::open(node, "feed", "offset=now").await);
    }
    readers.push(DsSse::open(node, "feed", &format!("offset=now&cursor={ahead}")).await);
    support::eventually("every reader following the stream", || async {
        server.subscribers("feed").await[pushhub::message::TransportKind::DsSse] == 5
    })
    .await;
    let live: Vec<u64> = (BACKLOG..BACKLOG + 6).collect();
    for i in &live[..5] {
        assert_eq!(post(node, "feed", i.to_string(), false).await.status(), 204);
    }
    // The last append closes the stream.
    let closed = post(node, "feed", live[5].to_string(), true).await;
    assert_eq!(closed.status(), 204);
    let last = closed.headers()["stream-next-offset"]
        .to_str()
        .unwrap()
        .to_owned();

    let mut reads = Vec::new();
    for reader in readers {
        reads.push(reader.until_end().await);
    }
    let expected_all: Vec<Value> = (0..BACKLOG + 6).map(|i| json!(i)).collect();
    let expected_live: Vec<Value> = live.iter().map(|i| json!(i)).collect();
    for (index, events) in reads.iter().enumerate() {
        let (values, controls) = values_and_controls(events);
        let expected = if index == 0 {
            &expected_all
        } else {
            &expected_live
        };
        assert_eq!(
            &values, expected,
            "reader {index}: every value once, in order"
        );
        // Offsets only move forward, and the response ends with the closing control event.
        let offsets: Vec<&str> = controls
            .iter()
            .map(|c| c["streamNextOffset"].as_str().unwrap())
            .collect();
        assert!(offsets.is_sorted(), "reader {index}: {offsets:?}");
        let closing = controls.last().unwrap();
        assert_eq!(closing["streamClosed"], true, "reader {index}: {closing}");
        assert_eq!(closing["streamNextOffset"], last.as_str());
        assert_eq!(events.last().unwrap().0, "control");
        for control in &controls[..controls.len() - 1] {
            let cursor: u64 = control["streamCursor"].as_str().unwrap().parse().unwrap();
            if index == 4 {
                // Asked with a cursor of the future: always answered with a later one.
                assert!(cursor > ahead, "{control}");
            } else {
                assert!(cursor >= interval && cursor < ahead, "{control}");
            }
        }
    }
    // The readers that came without a cursor got the same events, byte for byte (one
    // encoding per append, shared).
    assert_eq!(reads[1], reads[2]);
    assert_eq!(reads[2], reads[3]);
    // The first control event, then per append a data event and its control event, then
    // the closing control event.
    assert_eq!(reads[1].len(), 1 + 6 * 2 + 1, "{:?}", reads[1]);

    // A quiet reader gets keep-alive control events at its offset; a delete ends its read.
    assert_eq!(put(node, "quiet", "application/json", b"[]").await, 201);
    let mut quiet = DsSse::open(node, "quiet", "offset=now").await;
    let (event, first) = quiet.next().await.unwrap();
    assert_eq!(event, "control");
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["upToDate"], true);
    let (event, keep_alive) = quiet.next().await.unwrap();
    assert_eq!(event, "control");
    let keep_alive: Value = serde_json::from_str(&keep_alive).unwrap();
    assert_eq!(keep_alive["streamNextOffset"], first["streamNextOffset"]);
    assert_eq!(keep_alive["upToDate"], true);
    assert_eq!(post(node, "quiet", "7".into(), false).await.status(), 204);
    loop {
        let (event, data) = quiet.next().await.unwrap();
        if event == "data" {
            assert_eq!(data, "[7]");
            break;
        }
    }
    let deleted = node
        .http
        .delete(node.url("/v1/stream/quiet"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let rest = quiet.until_end().await;
    assert!(
        rest.iter().all(|(event, _)| event == "control"),
        "nothing but control events after the last value: {rest:?}"
    );
}

/// One idempotent producer appending the same sequence numbers through two nodes at once:
/// each sequence is accepted once (200) and answered as a duplicate (204) on the other node,
/// and the stream holds each append once. Without the compare-and-set on the stream's state
/// (`StreamExpect::Version`), both nodes read the same producer state and both accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_producer_through_two_nodes_is_accepted_once_per_sequence() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = spawn_binary(&["--redis", &redis.url()], &[]);
    let b = spawn_binary(&["--redis", &redis.url()], &[]);
    let (a, b) = (a.endpoint(), b.endpoint());
    assert_eq!(put(&a, "once", "text/plain", b"").await, 201);
    const APPENDS: u64 = 60;
    let send = |node: Endpoint, seq: u64| async move {
        node.http
            .post(node.url("/v1/stream/once"))
            .header("content-type", "text/plain")
            .header("producer-id", "p1")
            .header("producer-epoch", "0")
            .header("producer-seq", seq.to_string())
            .body(format!("<{seq}>"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    for seq in 0..APPENDS {
        let (from_a, from_b) = tokio::join!(send(a.clone(), seq), send(b.clone(), seq));
        let mut statuses = [from_a, from_b];
        statuses.sort_unstable();
        assert_eq!(
            statuses,
            [200, 204],
            "seq {seq}: one node accepts, the other sees a duplicate"
        );
    }
    let (status, _, body) = read(&b, "once", "-1").await;
    assert_eq!(status, 200);
    let expected: String = (0..APPENDS).map(|seq| format!("<{seq}>")).collect();
    assert_eq!(String::from_utf8(body).unwrap(), expected);
}
