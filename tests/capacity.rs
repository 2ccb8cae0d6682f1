//! A node at its open-file limit: `--max-connections` lowered to what the limit leaves, the
//! clients over it refused with a clear answer, the clients connected served on, and a node
//! whose files run out below its connection limit still answering.
//!
//! Each test runs the real binary in a process whose open-file limit is a few hundred (set
//! between fork and exec: the server cannot raise it), with raw TCP clients.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{ServerProcess, eventually, spawn_binary_with_files};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The open-file limit of the servers under test.
const FILES: u64 = 220;

/// A raw HTTP/1.1 connection.
struct Raw {
    stream: TcpStream,
    /// Bytes read and not yet consumed.
    buffer: Vec<u8>,
}

impl Raw {
    async fn open(addr: &str) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buffer: Vec::new(),
        }
    }

    /// Sends a request and reads the answer's head: its status and headers, lowercase.
    async fn request(&mut self, head: &str, body: &str) -> (u16, String) {
        let request = format!(
            "{head} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(request.as_bytes()).await.unwrap();
        let end = self.read_until(b"\r\n\r\n").await;
        let head: Vec<u8> = self.buffer.drain(..end).collect();
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        let status = head[9..12].parse().unwrap();
        (status, head)
    }

    /// Reads until `needle` has arrived; where it ends in the buffer.
    async fn read_until(&mut self, needle: &[u8]) -> usize {
        loop {
            if let Some(at) = self.buffer.windows(needle.len()).position(|w| w == needle) {
                return at + needle.len();
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("an answer within 10 s")
                .unwrap();
            assert!(
                read > 0,
                "closed before {:?}",
                String::from_utf8_lossy(needle)
            );
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// Reads the rest of a `connection: close` answer: its body.
    async fn rest(&mut self) -> String {
        let mut rest = std::mem::take(&mut self.buffer);
        self.stream.read_to_end(&mut rest).await.unwrap();
        String::from_utf8(rest).unwrap()
    }

    /// Reads the body of an answer whose head is `head` (by its `content-length`).
    async fn body(&mut self, head: &str) -> Vec<u8> {
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        while self.buffer.len() < length {
            let mut chunk = [0u8; 4096];
            let read = self.stream.read(&mut chunk).await.unwrap();
            assert!(read > 0, "closed within a body");
            self.buffer.extend_from_slice(&chunk[..read]);
        }
        self.buffer.drain(..length).collect()
    }

    /// Publishes `data` to `topic` over this (kept-alive) connection.
    async fn publish(&mut self, topic: &str, data: &str) {
        let (status, head) = self.request(&format!("POST /topics/{topic}"), data).await;
        assert_eq!(status, 201, "{head}");
        self.body(&head).await;
    }
}

/// Opens an SSE stream of `topic`, or returns the refusal: its status, head and body.
async fn subscribe(addr: &str, topic: &str) -> Result<Raw, (u16, String, String)> {
    let mut raw = Raw::open(addr).await;
    let (status, head) = raw.request(&format!("GET /topics/{topic}/sse"), "").await;
    if status == 200 {
        Ok(raw)
    } else {
        let body = raw.rest().await;
        Err((status, head, body))
    }
}

async fn stats(addr: &str) -> Value {
    let mut raw = Raw::open(addr).await;
    let (status, head) = raw.request("GET /stats", "").await;
    assert_eq!(status, 200, "{head}");
    serde_json::from_slice(&raw.body(&head).await).unwrap()
}

/// Every open stream receives the event carrying `marker`.
async fn all_receive(streams: &mut [Raw], marker: &str) {
    for stream in streams {
        stream.read_until(marker.as_bytes()).await;
    }
}

fn logged(server: &ServerProcess, text: &str) -> bool {
    server.log.lock().unwrap().iter().any(|l| l.contains(text))
}

#[tokio::test]
async fn over_the_file_limit_clients_get_503_and_those_connected_keep_receiving() {
    let server = spawn_binary_with_files(&[], FILES);
    let addr = server.addr.clone();
    // 220 files less the reserve (100 and 1%): 118 connections, and the start says so.
    let max = 118;
    eventually("the start to say so", || async {
        logged(
            &server,
            "--max-connections is above what the open-file limit leaves",
        ) && logged(&server, "taking at most 118 connections")
    })
    .await;
    let connections = stats(&addr).await["connections"].clone();
    assert_eq!(connections["max"], max, "{connections}");
    assert_eq!(connections["configured"], 100_000, "{connections}");
    assert_eq!(connections["open_file_limit"], FILES, "{connections}");

    // A publisher's kept-alive connection, then subscribers up to the limit.
    let mut publisher = Raw::open(&addr).await;
    publisher.publish("cap", r#"{"n":0}"#).await;
    let mut streams = Vec::new();
    for _ in 1..max {
        streams.push(subscribe(&addr, "cap").await.expect("under the limit"));
    }

    // Over it: a clear refusal each, SSE and WebSocket alike.
    for _ in 0..20 {
        let (status, head, body) = subscribe(&addr, "cap").await.err().expect("refused");
        assert_eq!(status, 503, "{head}");
        assert!(head.contains("retry-after: "), "{head}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["code"], "at_capacity", "{body}");
    }
    let ws = tokio_tungstenite::connect_async(format!("ws://{addr}/topics/cap/ws")).await;
    match ws {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("a WebSocket over the limit: {:?}", other.map(|_| ())),
    }

    // Everyone connected is still served.
    publisher.publish("cap", r#"{"after":"refusals"}"#).await;
    all_receive(&mut streams, r#""after":"refusals""#).await;

    // A place freed is a place taken again.
    streams.truncate(streams.len() - 10);
    let mut fresh = Vec::new();
    for _ in 0..5 {
        let mut stream = None;
        for _ in 0..50 {
            match subscribe(&addr, "cap").await {
                Ok(raw) => {
                    stream = Some(raw);
                    break;
                }
                // The server may not have seen the closes yet.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        fresh.push(stream.expect("a freed place is taken again"));
    }
    // The publisher, the streams left and the one asking.
    let open = 1 + (max - 1 - 10) + 5 + 1;
    eventually("the connections counted again", || async {
        stats(&addr).await["connections"]["open"] == open
    })
    .await;
    streams.append(&mut fresh);
    publisher.publish("cap", r#"{"after":"freed"}"#).await;
    all_receive(&mut streams, r#""after":"freed""#).await;
}

/// With no files kept back (`--file-reserve 0`), accept runs out of files before the
/// connection limit is reached: the spare file the server holds makes room to answer each
/// client waiting, one at a time, instead of leaving them in the backlog unanswered.
#[tokio::test]
async fn a_node_out_of_files_below_its_limit_still_answers_503() {
    let server = spawn_binary_with_files(&["--file-reserve", "0"], FILES);
    let addr = server.addr.clone();
    let mut publisher = Raw::open(&addr).await;
    let mut streams = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..FILES + 10 {
        match subscribe(&addr, "files").await {
            Ok(raw) if refusals.is_empty() => streams.push(raw),
            Ok(_) => panic!("a place after files ran out, with nothing closed"),
            Err(refusal) => refusals.push(refusal),
        }
        if refusals.len() == 5 {
            break;
        }
    }
    assert!(streams.len() > 150, "{} streams", streams.len());
    assert_eq!(refusals.len(), 5, "every client past the files answered");
    for (status, head, body) in &refusals {
        assert_eq!(*status, 503, "{head}");
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], "at_capacity", "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("out of files"),
            "{body}"
        );
    }
    assert!(logged(&server, "out of files: refused a connection"));
    publisher.publish("files", r#"{"after":"files"}"#).await;
    all_receive(&mut streams, r#""after":"files""#).await;
}

/// A storm of clients far over `--max-connections` on a node with files to spare: every
/// one of them is answered (200 or 503), none closed unanswered. The connections are all
/// established (in the kernel's backlog) before any request is sent, so the server accepts
/// them in a burst and answers hundreds of refusals at once.
#[tokio::test]
async fn a_storm_over_max_connections_is_answered_whole() {
    const CLIENTS: usize = 600;
    let server = support::spawn_binary(&["--max-connections", "20"], &[]);
    let addr = server.addr.clone();
    let mut sockets = Vec::new();
    for _ in 0..CLIENTS {
        sockets.push(TcpStream::connect(&addr).await.unwrap());
    }
    let request = "GET /topics/storm/sse HTTP/1.1\r\nhost: test\r\n\r\n";
    let mut answers = tokio::task::JoinSet::new();
    for mut socket in sockets {
        answers.spawn(async move {
            socket.write_all(request.as_bytes()).await.unwrap();
            let mut head = [0u8; 12];
            // An answer's status line, or nothing (the connection closed unanswered).
            match tokio::time::timeout(Duration::from_secs(10), socket.read_exact(&mut head))
                .await
                .expect("an answer or a close within 10 s")
            {
                Ok(_) => (String::from_utf8_lossy(&head[9..12]).into_owned(), socket),
                Err(_) => ("closed".to_owned(), socket),
            }
        });
    }
    let mut counts = std::collections::BTreeMap::new();
    let mut held = Vec::new();
    while let Some(answer) = answers.join_next().await {
        let (status, socket) = answer.unwrap();
        *counts.entry(status).or_insert(0) += 1;
        held.push(socket);
    }
    let expected: std::collections::BTreeMap<String, usize> =
        [("200".to_owned(), 20), ("503".to_owned(), CLIENTS - 20)].into();
    assert_eq!(counts, expected);
}
