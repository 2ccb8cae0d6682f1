//! A WebSocket client that stops reading must not slow anyone else nor make the server
//! buffer without bound. The server runs as its own process so its memory is measured alone.

#![allow(missing_docs)]

mod support;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

const MESSAGES: u64 = 100_000;
const PAYLOAD: usize = 1000;
/// The fast reader is never more than this far behind, so it stays inside the history.
const BURST: u64 = 500;

/// Resident and peak resident memory of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_websocket_reader_neither_blocks_others_nor_grows_memory() {
    let server = support::spawn_binary(
        &[
            "serve",
            "--history-size",
            "1000",
            "--subscriber-queue",
            "128",
        ],
        &[],
    );
    let url = format!("ws://{}/topics/flood/ws", server.addr);
    let (mut stalled, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (fast, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (publisher, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (rss_before, _) = memory_kib(server.child.id());

    // The fast reader checks every id arrives once, in order, and reports its progress.
    let (progress_tx, mut progress) = watch::channel(0u64);
    let reader = tokio::spawn(async move {
        let mut fast = fast;
        let mut last = 0;
        while last < MESSAGES {
            let Some(Ok(Message::Text(text))) = fast.next().await else {
                panic!("fast reader lost its socket")
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame.get("type").is_some() {
                panic!("fast reader got a control frame: {frame}");
            }
            let id = frame["id"].as_u64().unwrap();
            assert_eq!(id, last + 1, "fast reader saw a gap or repeat");
            last = id;
            let _ = progress_tx.send(last);
        }
        last
    });

    let (mut sink, mut acks) = publisher.split();
    let ack_reader = tokio::spawn(async move {
        let mut count = 0u64;
        while count < MESSAGES {
            match acks.next().await {
                Some(Ok(Message::Text(text))) if text.contains("\"type\":\"ack\"") => count += 1,
                Some(Ok(_)) => {}
                other => panic!("publisher socket failed: {other:?}"),
            }
        }
        count
    });
    let data = "x".repeat(PAYLOAD);
    let mut sent = 0;
    while sent < MESSAGES {
        for _ in 0..BURST {
            let frame = json!({"type": "publish", "data": data}).to_string();
            sink.feed(Message::text(frame)).await.unwrap();
        }
        sink.flush().await.unwrap();
        sent += BURST;
        let target = sent;
        tokio::time::timeout(Duration::from_secs(60), progress.wait_for(|&n| n >= target))
            .await
            .expect("the fast reader stalled behind the slow one")
            .unwrap();
    }
    assert_eq!(reader.await.unwrap(), MESSAGES);
    assert_eq!(ack_reader.await.unwrap(), MESSAGES);

    // ~100 MB of messages went through; buffering them for the stalled reader would show.
    let (rss_after, peak) = memory_kib(server.child.id());
    eprintln!("server RSS before {rss_before} KiB, after {rss_after} KiB, peak {peak} KiB");
    assert!(
        peak < 64 * 1024,
        "server peak RSS {peak} KiB: a stalled reader is being buffered"
    );

    // The stalled reader finally reads: it gets what its socket held, then is told it was
    // truncated, then the retained tail, in order, ending at the last id.
    let mut last = 0;
    let mut truncated = 0;
    while last < MESSAGES {
        let frame = tokio::time::timeout(Duration::from_secs(30), stalled.next())
            .await
            .unwrap();
        let Some(Ok(Message::Text(text))) = frame else {
            panic!("stalled reader lost its socket")
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        match frame["type"].as_str() {
            Some("truncated") => {
                truncated += 1;
                let oldest = frame["oldest_id"].as_u64().unwrap();
                assert!(oldest > last + 1);
                last = oldest - 1;
            }
            Some(other) => panic!("unexpected {other}"),
            None => {
                let id = frame["id"].as_u64().unwrap();
                assert_eq!(id, last + 1, "stalled reader saw an unsignalled gap");
                last = id;
            }
        }
    }
    assert!(
        truncated >= 1,
        "the stalled reader cannot have kept up with 100k messages"
    );
}
