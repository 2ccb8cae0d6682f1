//! Stopping the server answers parked long polls, ends SSE streams and closes WebSockets
//! with 1001 (going away), then returns.

#![allow(missing_docs)]

mod support;

use futures::StreamExt;
use serde_json::{Value, json};
use support::start;
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

#[tokio::test]
async fn shutdown_answers_long_polls_ends_streams_and_closes_sockets() {
    let server = start().await;
    server.publish("s", json!(1)).await;
    let mut sse = server.sse("/topics/s/sse?after=0", None).await;
    assert_eq!(sse.next_event().await.unwrap().id.as_deref(), Some("1"));
    let mut ws = server.ws("/topics/s/ws").await;
    let url = server.url("/topics/s/longpoll?after=1&timeout=60");
    let http = server.http.clone();
    let parked = tokio::spawn(async move {
        let response = http.get(url).send().await.unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    });
    support::eventually("the long poll to park", || async {
        server.get("/topics/s").await.1["subscribers"]["longpoll"] == 1
    })
    .await;

    server.stop().await;

    let (status, body) = parked.await.unwrap();
    assert_eq!(
        (status, body),
        (200, json!({"messages": [], "last_id": 1, "next_after": 1}))
    );
    assert!(
        sse.next_item().await.is_none(),
        "SSE stream must end cleanly"
    );
    match ws.ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
}
