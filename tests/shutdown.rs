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
    let mut stream = server.stream("/topics/s/stream?after=0").await;
    assert_eq!(stream.next_json().await.unwrap()["id"], 1);
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
    assert!(stream.next_line().await.is_none(), "HTTP stream must end");
    assert!(stream.leftover().is_empty(), "and end on a line boundary");
}

#[tokio::test]
async fn every_publish_acknowledged_before_a_stop_reaches_connected_subscribers_whole() {
    let server = support::start_with(pushhub::Config {
        history_size: 1_000_000,
        shutdown_grace: std::time::Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let mut sse = server.sse("/topics/race/sse", None).await;
    let mut ws = server.ws("/topics/race/ws").await;
    let mut stream = server.stream("/topics/race/stream").await;
    // Slow readers: at the stop, deliveries are still queued for them on the server.
    let sse_reader = tokio::spawn(async move {
        let mut ids = Vec::new();
        while let Some(event) = sse.next_event().await {
            ids.push(event.id.unwrap().parse::<u64>().unwrap());
            if ids.len() % 4 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        assert_eq!(sse.leftover(), "", "the SSE stream ended inside a frame");
        ids
    });
    let stream_reader = tokio::spawn(async move {
        let mut ids = Vec::new();
        while let Some(line) = stream.next_json().await {
            ids.push(line["id"].as_u64().expect("only messages"));
            if ids.len() % 4 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        assert!(
            stream.leftover().is_empty(),
            "the stream ended inside a line"
        );
        ids
    });
    let ws_reader = tokio::spawn(async move {
        let mut ids = Vec::new();
        loop {
            match ws.ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).expect("whole JSON frames");
                    ids.push(frame["id"].as_u64().unwrap());
                    if ids.len() % 4 == 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                }
                Some(Ok(Message::Close(Some(frame)))) => {
                    assert_eq!(frame.code, CloseCode::Away);
                    return ids;
                }
                other => panic!("expected frames then close 1001, got {other:?}"),
            }
        }
    });
    // Publishers keep going through the stop; whatever got a 201 must be delivered.
    let publishers: Vec<_> = (0..4)
        .map(|_| {
            let (http, url) = (server.http.clone(), server.url("/topics/race"));
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                loop {
                    let body = json!({"pad": "x".repeat(4096)});
                    match http.post(&url).json(&body).send().await {
                        Ok(response) if response.status() == 201 => {
                            let body: Value = response.json().await.unwrap();
                            acknowledged.push(body["id"].as_u64().unwrap());
                        }
                        Ok(response) => {
                            assert_eq!(response.status(), 503, "refused while stopping");
                            return acknowledged;
                        }
                        Err(_) => return acknowledged,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    server.stop().await;
    let mut acknowledged: Vec<u64> = Vec::new();
    for publisher in publishers {
        acknowledged.extend(publisher.await.unwrap());
    }
    acknowledged.sort_unstable();
    assert!(
        acknowledged.len() > 10,
        "the stop raced a real publish stream"
    );
    let over_sse = sse_reader.await.unwrap();
    let over_ws = ws_reader.await.unwrap();
    let over_stream = stream_reader.await.unwrap();
    for (transport, received) in [
        ("sse", &over_sse),
        ("ws", &over_ws),
        ("stream", &over_stream),
    ] {
        let missing: Vec<_> = acknowledged
            .iter()
            .filter(|id| received.binary_search(id).is_err())
            .collect();
        assert!(
            missing.is_empty(),
            "{transport} lost {} of {} acknowledged ids, first {:?}",
            missing.len(),
            acknowledged.len(),
            missing.first()
        );
    }
}
