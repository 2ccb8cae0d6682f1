//! The shared cursor: resume across every pair of transports, the history/live race,
//! truncation, reset, and idle topics being dropped.

#![allow(missing_docs)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{TestServer, ids, start, start_with};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Poll,
    LongPoll,
    Sse,
    Ws,
    Multiplexed,
    Stream,
}

const KINDS: [Kind; 6] = [
    Kind::Poll,
    Kind::LongPoll,
    Kind::Sse,
    Kind::Ws,
    Kind::Multiplexed,
    Kind::Stream,
];

/// What a reader saw: signal frames (`truncated`/`reset` JSON) and message envelopes.
#[derive(Debug, Default)]
struct Seen {
    signals: Vec<Value>,
    messages: Vec<Value>,
}

/// Reads `count` messages of `topic` after `after` over one transport, the way a client of
/// that transport would, then disconnects.
async fn read(server: &TestServer, kind: Kind, topic: &str, after: u64, count: usize) -> Seen {
    let mut seen = Seen::default();
    match kind {
        Kind::Poll | Kind::LongPoll => {
            let mut cursor = after;
            while seen.messages.len() < count {
                let path = match kind {
                    Kind::Poll => format!("/topics/{topic}/poll?after={cursor}&limit=7"),
                    _ => format!("/topics/{topic}/longpoll?after={cursor}&limit=7&timeout=5"),
                };
                let (status, body) = server.get(&path).await;
                assert_eq!(status, 200, "{body}");
                for flag in ["truncated", "reset"] {
                    if body.get(flag).is_some() {
                        seen.signals
                            .push(json!({"type": flag, "body": body.clone()}));
                    }
                }
                seen.messages
                    .extend(body["messages"].as_array().unwrap().iter().cloned());
                cursor = body["next_after"].as_u64().unwrap();
                if body["messages"].as_array().unwrap().is_empty() && matches!(kind, Kind::Poll) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        Kind::Sse => {
            // Resume the way a reconnecting browser does: with Last-Event-ID.
            let mut sse = server
                .sse(&format!("/topics/{topic}/sse"), Some(&after.to_string()))
                .await;
            while seen.messages.len() < count {
                let event = sse.next_event().await.expect("SSE ended");
                let data = event.json();
                if data.get("type").is_some() {
                    assert_eq!(data["type"], event.event);
                    seen.signals.push(data);
                } else {
                    assert_eq!(event.id.as_deref(), Some(data["id"].to_string().as_str()));
                    assert_eq!(data["event"], event.event);
                    seen.messages.push(data);
                }
            }
        }
        Kind::Stream => {
            let mut stream = server
                .stream(&format!("/topics/{topic}/stream?after={after}"))
                .await;
            while seen.messages.len() < count {
                let line = stream.next_json().await.expect("stream ended");
                match line.get("type") {
                    None => seen.messages.push(line),
                    Some(_) => seen.signals.push(line),
                }
            }
        }
        Kind::Ws | Kind::Multiplexed => {
            let mut ws = match kind {
                Kind::Ws => {
                    server
                        .ws(&format!("/topics/{topic}/ws?after={after}"))
                        .await
                }
                _ => {
                    let mut ws = server.ws("/ws").await;
                    ws.send_json(json!({"type": "subscribe", "topic": topic, "after": after}))
                        .await;
                    ws
                }
            };
            while seen.messages.len() < count {
                let frame = ws.next_json().await.expect("WebSocket closed");
                match frame.get("type").and_then(Value::as_str) {
                    None => seen.messages.push(frame),
                    Some("subscribed") => {}
                    Some(_) => seen.signals.push(frame),
                }
            }
        }
    }
    seen
}

/// Read 1..3 over one transport, disconnect, and continue from 3 over another while more is
/// published: every id arrives exactly once, in order, for every ordered pair.
#[tokio::test]
async fn every_pair_of_transports_resumes_without_loss_or_repeat() {
    let server = start().await;
    for first in KINDS {
        for second in KINDS {
            let topic = format!("pair-{first:?}-{second:?}");
            server.publish_many(&topic, 6).await;
            let head = read(&server, first, &topic, 0, 3).await;
            let mut got = ids(&head.messages);
            got.truncate(3);
            assert_eq!(got, [1, 2, 3], "{first:?} first read");

            let publisher = {
                let (http, url) = (server.http.clone(), server.url(&format!("/topics/{topic}")));
                tokio::spawn(async move {
                    for n in 0..4 {
                        http.post(&url)
                            .json(&json!({"late": n}))
                            .send()
                            .await
                            .unwrap();
                    }
                })
            };
            let tail = read(&server, second, &topic, 3, 7).await;
            publisher.await.unwrap();
            assert!(
                tail.signals.is_empty(),
                "{first:?}->{second:?}: {:?}",
                tail.signals
            );
            assert_eq!(
                ids(&tail.messages),
                (4..=10).collect::<Vec<_>>(),
                "{first:?}->{second:?}"
            );
        }
    }
}

/// Subscribers that join while two publishers race get every message once, in id order:
/// nothing falls between the history read and the live stream.
#[tokio::test]
async fn joining_during_a_publish_storm_misses_and_repeats_nothing() {
    const PER_PUBLISHER: usize = 600;
    const TOTAL: usize = 2 * PER_PUBLISHER;
    let config = pushhub::Config {
        history_size: 10_000,
        ..Default::default()
    };
    let server = std::sync::Arc::new(start_with(config).await);
    let publishers: Vec<_> = (0..2)
        .map(|_| {
            let server = server.clone();
            tokio::spawn(async move { server.publish_many("storm", PER_PUBLISHER).await })
        })
        .collect();
    let mut readers = Vec::new();
    for (i, kind) in KINDS.iter().copied().cycle().take(10).enumerate() {
        // Join at staggered points of the storm.
        let target = (i as u64 + 1) * 100;
        support::eventually("the storm to progress", || async {
            server
                .state
                .transport
                .hub
                .info(&pushhub::message::TopicName::parse("storm").unwrap())
                .await
                .unwrap()
                .last_id
                >= target
                || i == 0
        })
        .await;
        let server = server.clone();
        readers.push(tokio::spawn(async move {
            (kind, read(&server, kind, "storm", 0, TOTAL).await)
        }));
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    for reader in readers {
        let (kind, seen) = reader.await.unwrap();
        assert!(seen.signals.is_empty(), "{kind:?}");
        assert_eq!(
            ids(&seen.messages),
            (1..=TOTAL as u64).collect::<Vec<_>>(),
            "{kind:?}"
        );
    }
}

#[tokio::test]
async fn a_cursor_older_than_history_is_told_truncated() {
    let config = pushhub::Config {
        history_size: 5,
        ..Default::default()
    };
    let server = start_with(config).await;
    server.publish_many("t", 20).await;
    for kind in KINDS {
        let seen = read(&server, kind, "t", 3, 5).await;
        assert_eq!(ids(&seen.messages), [16, 17, 18, 19, 20], "{kind:?}");
        assert_eq!(seen.signals.len(), 1, "{kind:?}");
        let signal = &seen.signals[0];
        match kind {
            Kind::Poll | Kind::LongPoll => {
                assert_eq!(signal["body"]["truncated"], true);
                assert_eq!(signal["body"]["oldest_id"], 16);
            }
            _ => assert_eq!(
                signal,
                &json!({"type": "truncated", "topic": "t", "oldest_id": 16})
            ),
        }
        // after=0 means "from the oldest retained" and is not a truncation.
        let seen = read(&server, kind, "t", 0, 5).await;
        assert!(seen.signals.is_empty(), "{kind:?}");
        assert_eq!(ids(&seen.messages), [16, 17, 18, 19, 20], "{kind:?}");
    }
    // The SSE signal carries the cursor to reconnect from, so a reconnect does not repeat it.
    let mut sse = server.sse("/topics/t/sse?after=3", None).await;
    let signal = sse.next_event().await.unwrap();
    assert_eq!(
        (signal.event.as_str(), signal.id.as_deref()),
        ("truncated", Some("15"))
    );
}

#[tokio::test]
async fn a_cursor_ahead_of_the_topic_is_told_reset_and_restarts() {
    let server = start().await;
    server.publish_many("r", 3).await;
    for kind in KINDS {
        let seen = read(&server, kind, "r", 10, 3).await;
        assert_eq!(ids(&seen.messages), [1, 2, 3], "{kind:?}");
        assert_eq!(seen.signals.len(), 1, "{kind:?}");
        match kind {
            Kind::Poll | Kind::LongPoll => assert_eq!(seen.signals[0]["body"]["reset"], true),
            _ => assert_eq!(
                seen.signals[0],
                json!({"type": "reset", "topic": "r", "last_id": 3})
            ),
        }
    }
    let mut sse = server.sse("/topics/r/sse", Some("99")).await;
    let signal = sse.next_event().await.unwrap();
    assert_eq!(
        (signal.event.as_str(), signal.id.as_deref()),
        ("reset", Some("0"))
    );
}

#[tokio::test]
async fn idle_topics_are_dropped_and_restart_at_one_with_a_reset() {
    let config = pushhub::Config {
        history_max_age: Duration::from_millis(200),
        sweep_interval: Duration::from_millis(20),
        poller_window: Duration::from_millis(100),
        ..Default::default()
    };
    let server = start_with(config).await;
    server.publish_many("once", 3).await;
    // A topic with a live subscriber stays, even with its history expired.
    let mut ws = server.ws("/topics/kept/ws").await;
    server.publish("kept", json!("x")).await;
    assert_eq!(ws.next_envelope().await["id"], 1);

    let hub = server.state.transport.hub.clone();
    support::eventually("the idle topic to be dropped", || async {
        hub.topic_count() == 1
    })
    .await;

    let (_, body) = server.get("/topics/once/poll?after=3").await;
    assert_eq!(
        body,
        json!({"messages": [], "last_id": 0, "next_after": 0, "reset": true})
    );
    assert_eq!(server.publish("once", json!("again")).await, 1);
    // The topic with a subscriber kept its counter.
    assert_eq!(server.publish("kept", json!("y")).await, 2);
    assert_eq!(ws.next_envelope().await["id"], 2);
}
