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
    match sse.next_item().await.unwrap() {
        SseItem::Comment(text) => assert_eq!(text, "keep-alive"),
        _ => panic!("expected a heartbeat comment"),
    }
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
