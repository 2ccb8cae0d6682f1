//! WebSocket: per-topic and multiplexed connections, publishing, and bad frames.

#![allow(missing_docs)]

mod support;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use support::{start, start_with};
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

#[tokio::test]
async fn per_topic_socket_publishes_with_ack_and_receives_envelopes() {
    let server = start().await;
    let mut ws = server.ws("/topics/room/ws").await;
    ws.send_json(json!({"type": "publish", "data": {"text": "hi"}, "event": "chat", "ref": 7}))
        .await;
    let mut frames = [ws.next_json().await.unwrap(), ws.next_json().await.unwrap()];
    frames.sort_by_key(|f| f.get("type").is_some()); // envelope and ack may come in either order
    assert_eq!(frames[0]["id"], 1);
    assert_eq!(frames[0]["data"], json!({"text": "hi"}));
    assert_eq!(frames[0]["event"], "chat");
    assert_eq!(frames[1]["type"], "ack");
    assert_eq!(frames[1]["id"], 1);
    assert_eq!(frames[1]["ref"], 7);
    // `"data": null` is a value, not a missing field.
    ws.send_json(json!({"type": "publish", "data": null})).await;
    support::eventually("the null publish", || async {
        server.get("/topics/room/poll?after=1").await.1["messages"]
            .as_array()
            .unwrap()
            .len()
            == 1
    })
    .await;
    // HTTP publishes reach the socket too.
    server.publish("room", json!("from http")).await;
    assert_eq!(ws.next_envelope().await["data"], json!(null));
    assert_eq!(ws.next_envelope().await["data"], "from http");
}

#[tokio::test]
async fn bad_frames_get_error_replies_and_the_connection_stays_usable() {
    let server = start().await;
    let mut ws = server.ws("/topics/room/ws").await;
    let cases = [
        ("not json", "invalid_message"),
        ("[1,2]", "invalid_message"),
        (r#"{"no":"type"}"#, "invalid_message"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"type":42}"#, "invalid_message"),
        (r#"{"type":"publish"}"#, "invalid_message"),
        (
            r#"{"type":"publish","data":1,"topic":"bad topic"}"#,
            "invalid_topic",
        ),
        (
            r#"{"type":"publish","data":1,"event":"bad event"}"#,
            "invalid_event",
        ),
        (r#"{"type":"subscribe"}"#, "invalid_message"),
        (
            r#"{"type":"subscribe","topic":"x","after":-1}"#,
            "invalid_parameter",
        ),
        (
            r#"{"type":"subscribe","topic":"x","after":"abc"}"#,
            "invalid_parameter",
        ),
        (
            r#"{"type":"subscribe","topic":"x","after":1e99}"#,
            "invalid_parameter",
        ),
        (
            r#"{"type":"subscribe","topic":"x","after":18446744073709551616}"#,
            "invalid_parameter",
        ),
    ];
    for (frame, code) in cases {
        ws.send_text(frame).await;
        let reply = ws.next_json().await.unwrap();
        assert_eq!(reply["type"], "error", "{frame}");
        assert_eq!(reply["code"], code, "{frame}: {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    ws.ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(ws.next_json().await.unwrap()["code"], "invalid_message");

    ws.send_json(json!({"type": "ping", "ref": "p"})).await;
    assert_eq!(
        ws.next_json().await.unwrap(),
        json!({"type": "pong", "ref": "p"})
    );
    server.publish("room", json!("still here")).await;
    assert_eq!(ws.next_envelope().await["data"], "still here");
}

#[tokio::test]
async fn multiplexed_socket_follows_several_topics() {
    let server = start().await;
    server.publish_many("a", 2).await;
    let mut ws = server.ws("/ws").await;
    ws.send_json(json!({"type": "publish", "data": 1})).await;
    assert_eq!(
        ws.next_json().await.unwrap()["code"],
        "invalid_message",
        "publish on /ws needs a topic"
    );

    ws.send_json(json!({"type": "subscribe", "topic": "a", "after": 1}))
        .await;
    assert_eq!(
        ws.next_json().await.unwrap(),
        json!({"type": "subscribed", "topic": "a", "after": 1})
    );
    let envelope = ws.next_envelope().await;
    assert_eq!(
        (envelope["topic"].clone(), envelope["id"].clone()),
        (json!("a"), json!(2))
    );

    ws.send_json(json!({"type": "subscribe", "topic": "b"}))
        .await;
    assert_eq!(ws.next_json().await.unwrap()["type"], "subscribed");
    server.publish("b", json!("to b")).await;
    server.publish("a", json!("to a")).await;
    let mut got = [ws.next_envelope().await, ws.next_envelope().await];
    got.sort_by_key(|e| e["topic"].as_str().unwrap().to_owned());
    assert_eq!(
        (got[0]["topic"].clone(), got[0]["id"].clone()),
        (json!("a"), json!(3))
    );
    assert_eq!(
        (got[1]["topic"].clone(), got[1]["id"].clone()),
        (json!("b"), json!(1))
    );

    ws.send_json(json!({"type": "unsubscribe", "topic": "a"}))
        .await;
    assert_eq!(
        ws.next_json().await.unwrap(),
        json!({"type": "unsubscribed", "topic": "a", "was_subscribed": true})
    );
    server.publish("a", json!("unheard")).await;
    server.publish("b", json!("heard")).await;
    let next = ws.next_envelope().await;
    assert_eq!(
        (next["topic"].clone(), next["data"].clone()),
        (json!("b"), json!("heard"))
    );

    ws.send_json(json!({"type": "publish", "topic": "c", "data": "x"}))
        .await;
    let ack = ws.next_json().await.unwrap();
    assert_eq!(
        (ack["type"].clone(), ack["topic"].clone(), ack["id"].clone()),
        (json!("ack"), json!("c"), json!(1))
    );
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009() {
    let config = pushhub::Config {
        ws_max_message: 1024,
        ..Default::default()
    };
    let server = start_with(config).await;
    let mut ws = server.ws("/topics/big/ws").await;
    let huge = json!({"type": "publish", "data": "x".repeat(4096)}).to_string();
    ws.ws.send(Message::text(huge)).await.unwrap();
    loop {
        match ws.ws.next().await {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(frame.code, CloseCode::Size);
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    // The server still serves others.
    assert_eq!(server.publish("big", json!("ok")).await, 1);
}
