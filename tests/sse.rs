//! Server-Sent Events: headers, framing, heartbeats, resume.

#![allow(missing_docs)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::{SseItem, start, start_with};

#[tokio::test]
async fn sse_sends_proxy_safe_headers_a_retry_hint_and_framed_envelopes() {
    let server = start().await;
    let mut sse = server.sse("/topics/news/sse", None).await;
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert_eq!(sse.headers["cache-control"], "no-cache");
    assert_eq!(sse.headers["x-accel-buffering"], "no");
    assert_eq!(sse.retry, Some(2000));

    let response = server
        .http
        .post(server.url("/topics/news?event=headline"))
        .header("content-type", "application/json")
        .body(r#"{"title": "multi\nline"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let event = sse.next_event().await.unwrap();
    assert_eq!(event.id.as_deref(), Some("1"));
    assert_eq!(event.event, "headline");
    let envelope = event.json();
    assert_eq!(envelope["data"], json!({"title": "multi\nline"}));
    assert_eq!(envelope["topic"], "news");
    assert_eq!(envelope["id"], 1);
}

#[tokio::test]
async fn sse_sends_comment_heartbeats() {
    let config = pushhub::Config {
        heartbeat: Duration::from_millis(50),
        ..Default::default()
    };
    let server = start_with(config).await;
    let mut sse = server.sse("/topics/quiet/sse", None).await;
    let mut item = sse.next_item().await.unwrap();
    if let SseItem::Cursor(_) = item {
        item = sse.next_item().await.unwrap();
    }
    match item {
        SseItem::Comment(text) => assert_eq!(text, "keep-alive"),
        _ => panic!("expected a heartbeat comment"),
    }
}

/// A browser's `EventSource` opened without a cursor must learn where its stream starts:
/// if the connection drops before the first message, it reconnects with `Last-Event-ID`
/// and gets what was published meanwhile (docs/api.md).
#[tokio::test]
async fn sse_tells_the_browser_where_it_starts_before_any_message() {
    let server = start().await;
    server.publish_many("start", 4).await;
    // From now: the stream starts after id 4.
    let mut sse = server.sse("/topics/start/sse", None).await;
    match sse.next_item().await.unwrap() {
        SseItem::Cursor(id) => assert_eq!(id, "4"),
        _ => panic!("expected an id-only block first"),
    }
    server.publish("start", json!("next")).await;
    assert_eq!(sse.next_event().await.unwrap().id.as_deref(), Some("5"));
    // From a cursor: the same block, with the cursor, then the messages after it.
    let mut sse = server.sse("/topics/start/sse?after=2", None).await;
    match sse.next_item().await.unwrap() {
        SseItem::Cursor(id) => assert_eq!(id, "2"),
        _ => panic!("expected an id-only block first"),
    }
    assert_eq!(sse.next_event().await.unwrap().id.as_deref(), Some("3"));
}

#[tokio::test]
async fn last_event_id_wins_over_the_after_parameter() {
    let server = start().await;
    server.publish_many("resume", 5).await;
    // A browser reconnects to its original URL (after=1) with the newer Last-Event-ID (4).
    let mut sse = server.sse("/topics/resume/sse?after=1", Some("4")).await;
    assert_eq!(sse.next_event().await.unwrap().id.as_deref(), Some("5"));
    let mut sse = server.sse("/topics/resume/sse?after=3", None).await;
    assert_eq!(sse.next_event().await.unwrap().id.as_deref(), Some("4"));
}

#[tokio::test]
async fn a_write_delay_gathers_messages_into_fewer_writes_in_order() {
    let config = pushhub::Config {
        write_delay: Duration::from_millis(300),
        ..Default::default()
    };
    let server = start_with(config).await;
    let mut sse = server.sse("/topics/batched/sse", None).await;
    let mut ws = server.ws("/topics/batched/ws").await;
    // 150 messages: more than one write's worth (64), published well inside the window.
    let published =
        futures::future::join_all((0..150).map(|n| server.publish("batched", json!(n)))).await;
    assert_eq!(published.len(), 150);
    let mut sse_ids = Vec::new();
    let mut ws_ids = Vec::new();
    for _ in 0..150 {
        sse_ids.push(
            sse.next_event().await.unwrap().json()["id"]
                .as_u64()
                .unwrap(),
        );
        ws_ids.push(ws.next_envelope().await["id"].as_u64().unwrap());
    }
    let expected: Vec<u64> = (1..=150).collect();
    assert_eq!(sse_ids, expected);
    assert_eq!(ws_ids, expected);

    // Ten messages 10 ms apart: without a delay, ten writes; with one, they share a write.
    let before = sse.chunks;
    for n in 0..10 {
        server.publish("batched", json!(n)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..10 {
        sse.next_event().await.unwrap();
    }
    let writes = sse.chunks - before;
    assert!(
        writes <= 3,
        "10 messages inside one window came in {writes} SSE chunks"
    );
}
