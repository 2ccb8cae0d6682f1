//! What the delivery path must never do, over real sockets: lose, repeat or reorder bytes
//! when a socket takes only part of a frame; let a subscriber that stopped reading delay the
//! others; mishandle a request pipelined behind a long poll or an SSE stream; answer
//! differently from hyper's path.

#![allow(missing_docs)]

mod support;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use pushhub::{Config, message::TransportKind};
use serde_json::{Value, json};
use support::{PATIENCE, start_with};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// A client socket whose receive buffer is small, so the server's writes back up quickly.
async fn small_window(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends a request and reads up to the end of the response head; returns the head and
/// whatever came after it.
async fn request_head(stream: &mut TcpStream, request: &str) -> (String, Vec<u8>) {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = seen.split_off(end + 4);
            return (String::from_utf8(seen).unwrap(), rest);
        }
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buffer))
            .await
            .expect("a response head")
            .unwrap();
        assert!(n > 0, "closed before the head ended");
        seen.extend_from_slice(&buffer[..n]);
    }
}

/// Reads from `stream` into `seen` until `done(seen)` holds.
async fn read_until(stream: &mut TcpStream, seen: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) {
    let mut buffer = vec![0u8; 65536];
    while !done(seen) {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buffer))
            .await
            .expect("more data in time")
            .unwrap();
        assert!(n > 0, "closed early");
        seen.extend_from_slice(&buffer[..n]);
    }
}

/// The server frames (unmasked) in `bytes`, and how many bytes they used.
fn ws_frames(bytes: &[u8]) -> (Vec<(u8, Vec<u8>)>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        let Some(&[first, second]) = bytes
            .get(at..at + 2)
            .map(|b| <&[u8; 2]>::try_from(b).unwrap())
        else {
            return (frames, at);
        };
        assert_eq!(second & 0x80, 0, "server frames are not masked");
        let (len, header) = match second & 0x7F {
            126 => match bytes.get(at + 2..at + 4) {
                Some(b) => (u16::from_be_bytes([b[0], b[1]]) as usize, 4),
                None => return (frames, at),
            },
            127 => match bytes.get(at + 2..at + 10) {
                Some(b) => (u64::from_be_bytes(b.try_into().unwrap()) as usize, 10),
                None => return (frames, at),
            },
            short => (short as usize, 2),
        };
        let Some(payload) = bytes.get(at + header..at + header + len) else {
            return (frames, at);
        };
        frames.push((first & 0x0F, payload.to_vec()));
        at += header + len;
    }
}

/// The SSE events in a chunked body read so far: (id, data) of each complete one.
fn sse_events(body: &[u8]) -> Vec<(String, String)> {
    // De-chunk what is complete.
    let mut data = Vec::new();
    let mut at = 0;
    while let Some(end) = body[at..].windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&body[at..at + end]).unwrap(), 16)
            .expect("a chunk size");
        let start = at + end + 2;
        if body.len() < start + size + 2 {
            break;
        }
        data.extend_from_slice(&body[start..start + size]);
        assert_eq!(&body[start + size..start + size + 2], b"\r\n", "chunk ends");
        at = start + size + 2;
    }
    let text = String::from_utf8(data).expect("UTF-8 events");
    text.split("\n\n")
        .filter(|block| block.starts_with("id: "))
        .filter_map(|block| {
            let id = block.lines().find_map(|l| l.strip_prefix("id: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((id.to_owned(), data.to_owned()))
        })
        .collect()
}

fn websocket_upgrade(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// The value of a counter in the server's `/metrics`.
async fn metric(server: &support::TestServer, name: &str) -> f64 {
    let (_, text) = server.get("/metrics").await;
    let text = text.as_str().unwrap().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A payload whose content can be checked from its index: big enough that writes of it
/// back up and land in parts.
fn big_payload(i: usize) -> Value {
    let pad: String = (0..(40_000 + i * 97 % 20_000))
        .map(|k| char::from(b'a' + ((i + k) % 26) as u8))
        .collect();
    json!({"i": i, "pad": pad})
}

fn check_payload(envelope: &Value, expected_id: u64) {
    assert_eq!(envelope["id"].as_u64(), Some(expected_id), "in order");
    let i = envelope["data"]["i"].as_u64().unwrap() as usize;
    assert_eq!(i as u64 + 1, expected_id);
    assert_eq!(
        envelope["data"],
        big_payload(i),
        "message {expected_id} intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_takes_part_of_a_frame_gets_the_rest_from_the_right_byte() {
    const MESSAGES: usize = 120;
    let server = start_with(Config {
        workers: 1,
        ..Default::default()
    })
    .await;
    let mut ws = small_window(server.addr).await;
    let (head, mut ws_bytes) = request_head(&mut ws, &websocket_upgrade("/topics/parts/ws")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut sse = small_window(server.addr).await;
    let (head, mut sse_bytes) = request_head(
        &mut sse,
        "GET /topics/parts/sse HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let blocked_before = metric(&server, "pushhub_blocked_writes_total").await;
    // About 6 MB while neither reads: the sockets fill, and writes land in parts.
    for i in 0..MESSAGES {
        server.publish("parts", big_payload(i)).await;
    }
    let blocked = metric(&server, "pushhub_blocked_writes_total").await - blocked_before;
    assert!(blocked >= 2.0, "the writes did not back up ({blocked})");

    read_until(&mut ws, &mut ws_bytes, |b| ws_frames(b).0.len() >= MESSAGES).await;
    let (frames, _) = ws_frames(&ws_bytes);
    for (k, (opcode, payload)) in frames.iter().enumerate() {
        assert_eq!(*opcode, 1, "text frames only");
        check_payload(&serde_json::from_slice(payload).unwrap(), k as u64 + 1);
    }
    read_until(&mut sse, &mut sse_bytes, |b| {
        sse_events(b).len() >= MESSAGES
    })
    .await;
    for (k, (id, data)) in sse_events(&sse_bytes).iter().enumerate() {
        assert_eq!(id, &(k + 1).to_string());
        check_payload(&serde_json::from_str(data).unwrap(), k as u64 + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stopped_reading_delays_no_one() {
    const MESSAGES: usize = 150;
    // One worker: the stalled subscribers and the readers share one fan-out writer.
    let server = start_with(Config {
        workers: 1,
        ..Default::default()
    })
    .await;
    let mut stalled_ws = small_window(server.addr).await;
    let (head, _) = request_head(&mut stalled_ws, &websocket_upgrade("/topics/jam/ws")).await;
    assert!(head.starts_with("HTTP/1.1 101"));
    let mut stalled_sse = small_window(server.addr).await;
    let (head, _) = request_head(
        &mut stalled_sse,
        "GET /topics/jam/sse HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"));
    let mut ws = server.ws("/topics/jam/ws").await;
    let mut sse = server.sse("/topics/jam/sse", None).await;
    for i in 0..MESSAGES {
        let id = server.publish("jam", big_payload(i)).await;
        // Each message reaches the readers before the next is published, however full the
        // stalled sockets are.
        let envelope = tokio::time::timeout(Duration::from_secs(5), ws.next_envelope())
            .await
            .expect("the WebSocket reader was held up");
        check_payload(&envelope, id);
        let event = tokio::time::timeout(Duration::from_secs(5), sse.next_event())
            .await
            .expect("the SSE reader was held up")
            .unwrap();
        check_payload(&event.json(), id);
    }
    let subscribers = server.subscribers("jam").await;
    assert_eq!(
        (
            subscribers[TransportKind::Ws],
            subscribers[TransportKind::Sse]
        ),
        (2, 2),
        "the stalled ones are still there"
    );
}

#[tokio::test]
async fn requests_pipelined_behind_a_long_poll_are_answered_in_order() {
    let server = start_with(Config::default()).await;
    // Both requests in one write: the second waits while the first is parked.
    let mut both = TcpStream::connect(server.addr).await.unwrap();
    both.write_all(b"GET /topics/pipe/longpoll?after=0&timeout=30 HTTP/1.1\r\nHost: x\r\n\r\nGET /topics/pipe/poll?after=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The second request comes while the first is parked (and may be answered by the
    // fan-out directly).
    let mut later = TcpStream::connect(server.addr).await.unwrap();
    later
        .write_all(b"GET /topics/pipe/longpoll?after=0&timeout=30 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    support::eventually("both long polls parked", || async {
        server.subscribers("pipe").await[TransportKind::Longpoll] >= 2
    })
    .await;
    later
        .write_all(b"GET /topics/pipe/poll?after=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.publish("pipe", json!("first")).await;
    for stream in [&mut both, &mut later] {
        let mut seen = Vec::new();
        // Well before the long poll's own 30 s timeout: the pipelined request must not wait
        // for it.
        read_until(stream, &mut seen, |b| {
            b.windows(11).filter(|w| w == b"\"last_id\":1").count() >= 2
        })
        .await;
        let text = String::from_utf8(seen).unwrap();
        let answers: Vec<&str> = text.split("HTTP/1.1 ").filter(|a| !a.is_empty()).collect();
        assert_eq!(answers.len(), 2, "{text}");
        for answer in answers {
            assert!(answer.starts_with("200 OK"), "{answer}");
            assert!(answer.contains("{\"messages\":[{\"id\":1,"), "{answer}");
        }
    }
}

#[tokio::test]
async fn a_request_pipelined_behind_an_sse_stream_is_answered_when_the_stream_ends() {
    let secret = "pipelining";
    let server = start_with(Config {
        jwt_secret: Some(secret.into()),
        ..Default::default()
    })
    .await;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"exp": pushhub::access::unix_now() + 2, "pushhub": {"subscribe": ["pipe2"]}}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let requests = format!(
        "GET /topics/pipe2/sse?token={token} HTTP/1.1\r\nHost: x\r\n\r\nGET /topics/pipe2/poll?after=0 HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    stream.write_all(requests.as_bytes()).await.unwrap();
    // The stream lives until the token expires (2 s), then ends with an `expired` event and
    // the end of its chunked body; the poll behind it (without a token) is answered after.
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, |b| {
        String::from_utf8_lossy(b).contains("\"code\":\"unauthorized\"}")
    })
    .await;
    let text = String::from_utf8(seen).unwrap();
    let expired = text
        .find("event: expired")
        .expect("the stream ended with `expired`");
    let end = text.find("\r\n0\r\n\r\n").expect("the chunked body ended");
    let second = text
        .find("HTTP/1.1 401")
        .expect("the pipelined request was answered");
    assert!(expired < end && end < second, "{text}");
}

/// Sends `request` (with an `x-request-id`, so that both paths echo the same one) and
/// returns the status line, the headers but `date`, and the body read until `done`.
async fn exchange(addr: SocketAddr, request: &str) -> (String, BTreeMap<String, String>, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (head, mut body) = request_head(&mut stream, request).await;
    let mut lines = head.lines();
    let status = lines.next().unwrap().to_owned();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
        .filter(|(n, _)| n != "date")
        .collect();
    if let Some(length) = headers.get("content-length") {
        let length: usize = length.parse().unwrap();
        read_until(&mut stream, &mut body, |b| b.len() >= length).await;
    }
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn hyper_and_the_raw_path_answer_alike() {
    let server = start_with(Config {
        allowed_origins: vec!["https://app.example".into()],
        ..Default::default()
    })
    .await;
    server.publish("same", json!({"n": 1})).await;
    for target in [
        "/topics/same/poll?after=0",
        "/topics/same/poll?after=-1",
        "/topics/same/longpoll?after=0&timeout=1",
        "/topics/same/longpoll?after=1&timeout=0.1",
        "/topics/same/ws",
        "/topics/bad%20topic/poll",
        "/topics/same/poll?limit=0",
    ] {
        let common = format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\nx-request-id: same-id\r\n"
        );
        let raw = exchange(server.addr, &format!("{common}\r\n")).await;
        // A chunked request body (empty) is something only hyper serves.
        let hyper = exchange(
            server.addr,
            &format!("{common}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        )
        .await;
        assert_eq!(raw, hyper, "{target}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_in_the_middle_of_a_frame_ends_the_stream_after_it() {
    const MESSAGES: usize = 150;
    let secret = "expiry";
    let server = start_with(Config {
        jwt_secret: Some(secret.into()),
        workers: 1,
        ..Default::default()
    })
    .await;
    let sign = |claims: Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let now = pushhub::access::unix_now();
    let reader = sign(json!({"exp": now + 3, "pushhub": {"subscribe": ["late"]}}));
    let writer = sign(json!({"exp": now + 60, "pushhub": {"publish": ["late"]}}));
    let mut sse = small_window(server.addr).await;
    let (head, mut bytes) = request_head(
        &mut sse,
        &format!("GET /topics/late/sse?token={reader} HTTP/1.1\r\nHost: x\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let blocked_before = metric(&server, "pushhub_blocked_writes_total").await;
    // About 7 MB that the client does not read: the socket fills in the middle of a frame,
    // and the token expires (2 to 3 s from now) while the rest of that frame waits.
    for i in 0..MESSAGES {
        let status = server
            .http
            .post(server.url("/topics/late"))
            .bearer_auth(&writer)
            .json(&big_payload(i))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 201);
    }
    let blocked = metric(&server, "pushhub_blocked_writes_total").await - blocked_before;
    assert!(blocked >= 1.0, "the writes did not back up ({blocked})");
    // Past the expiry, then read.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    read_until(&mut sse, &mut bytes, |b| b.ends_with(b"\r\n0\r\n\r\n")).await;
    // The body is a sequence of whole chunks up to the last one: a frame cut short would
    // put the next chunk's bytes where this one's were announced.
    let mut at = 0;
    loop {
        let line = bytes[at..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let size = std::str::from_utf8(&bytes[at..at + line])
            .ok()
            .and_then(|text| usize::from_str_radix(text, 16).ok())
            .unwrap_or_else(|| panic!("not a chunk size at byte {at}"));
        let end = at + line + 2 + size;
        assert_eq!(
            bytes.get(end..end + 2),
            Some(&b"\r\n"[..]),
            "chunk at {at} ends"
        );
        at = end + 2;
        if size == 0 {
            break;
        }
    }
    assert_eq!(at, bytes.len(), "nothing after the last chunk");
    // Every message before the end is intact and in order, and the last event says why the
    // stream ended.
    let events = sse_events(&bytes);
    assert!(!events.is_empty());
    for (k, (id, data)) in events.iter().enumerate() {
        assert_eq!(id, &(k + 1).to_string());
        check_payload(&serde_json::from_str(data).unwrap(), k as u64 + 1);
    }
    let text = String::from_utf8_lossy(&bytes);
    let last_event = text.rfind("event: ").expect("events");
    assert!(
        text[last_event..].starts_with("event: expired"),
        "{}",
        &text[last_event..]
    );
}
