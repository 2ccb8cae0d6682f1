//! Several topics on one request (`/topics/a,b,news.*/{transport}`) and the one cursor
//! that resumes them: every transport, patterns that pick up topics created later,
//! switching transports mid-stream, every refusal, restarts and Redis nodes.

#![allow(missing_docs)]

mod support;

use std::collections::BTreeSet;

use pushhub::{
    Config,
    message::{
        cursor::{Cursor, Tracker},
        pattern::Selection,
    },
};
use serde_json::{Value, json};
use support::{Endpoint, RedisServer, ServerProcess, TestServer, spawn_binary, start, start_with};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Poll,
    LongPoll,
    Sse,
    Stream,
    Ws,
}

const KINDS: [Kind; 5] = [
    Kind::Poll,
    Kind::LongPoll,
    Kind::Sse,
    Kind::Stream,
    Kind::Ws,
];

/// What one reading saw: the envelopes, and the cursor right after the last of them.
struct Read {
    messages: Vec<Value>,
    signals: Vec<Value>,
    cursor: String,
}

/// (topic, id) of each envelope.
fn pairs(messages: &[Value]) -> Vec<(String, u64)> {
    messages
        .iter()
        .map(|m| {
            (
                m["topic"].as_str().unwrap().to_owned(),
                m["id"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Reads at least `count` messages of `list` from `after` over `kind`, the way that
/// transport's client keeps its cursor, then disconnects.
async fn read(node: &Endpoint, kind: Kind, list: &str, after: Option<&str>, count: usize) -> Read {
    let selection = Selection::parse(list, 1000).unwrap();
    let mut read = Read {
        messages: Vec::new(),
        signals: Vec::new(),
        cursor: after.unwrap_or_default().to_owned(),
    };
    let query = after.map_or(String::new(), |after| format!("?after={after}"));
    match kind {
        Kind::Poll | Kind::LongPoll => loop {
            let endpoint = if kind == Kind::Poll {
                "poll"
            } else {
                "longpoll"
            };
            let after = if read.cursor.is_empty() {
                String::new()
            } else {
                format!("after={}&", read.cursor)
            };
            let (status, body) = node
                .get(&format!(
                    "/topics/{list}/{endpoint}?{after}limit=3&timeout=5"
                ))
                .await;
            assert_eq!(status, 200, "{body}");
            read.messages
                .extend(body["messages"].as_array().unwrap().iter().cloned());
            for (topic, fields) in body["topics"].as_object().unwrap() {
                if fields.get("truncated").is_some() || fields.get("reset").is_some() {
                    read.signals.push(json!({"topic": topic, "fields": fields}));
                }
            }
            read.cursor = body["next_after"].as_str().unwrap().to_owned();
            if read.messages.len() >= count {
                return read;
            }
            if kind == Kind::Poll {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        },
        Kind::Sse => {
            // A reconnecting browser sends the cursor as Last-Event-ID.
            let mut sse = node.sse(&format!("/topics/{list}/sse"), after).await;
            while read.messages.len() < count {
                match sse.next_item().await.expect("SSE ended") {
                    support::SseItem::Event(event) => {
                        let data = event.json();
                        let id = event.id.expect("every event carries the cursor");
                        assert!(id.len() <= 2048, "an id of {} bytes", id.len());
                        Cursor::decode(&id, 1000).expect("the id is a cursor");
                        read.cursor = id;
                        if data.get("type").is_some() {
                            read.signals.push(data);
                        } else {
                            read.messages.push(data);
                        }
                    }
                    support::SseItem::Cursor(id) => read.cursor = id,
                    support::SseItem::Comment(_) | support::SseItem::Retry(_) => {}
                }
            }
        }
        Kind::Stream | Kind::Ws => {
            let path = format!(
                "/topics/{list}/{}{query}",
                if kind == Kind::Ws { "ws" } else { "stream" }
            );
            let (mut stream, mut ws) = match kind {
                Kind::Stream => (Some(node.stream(&path).await), None),
                _ => (None, Some(node.ws(&path).await)),
            };
            let mut tracker: Option<Tracker> = None;
            while read.messages.len() < count {
                let frame = match (&mut stream, &mut ws) {
                    (Some(stream), _) => stream.next_json().await,
                    (_, Some(ws)) => ws.next_json().await,
                    _ => unreachable!(),
                }
                .expect("stream ended");
                match frame["type"].as_str() {
                    Some("cursor") => {
                        let cursor =
                            Cursor::decode(frame["cursor"].as_str().unwrap(), 1000).unwrap();
                        tracker = Some(Tracker::new(selection.clone(), cursor));
                    }
                    Some(signal @ ("truncated" | "reset")) => {
                        let topic = frame["topic"].as_str().unwrap();
                        let at = match signal {
                            "truncated" => frame["oldest_id"].as_u64().unwrap() - 1,
                            _ => 0,
                        };
                        tracker.as_mut().expect("cursor first").saw(topic, at);
                        read.signals.push(frame);
                    }
                    Some(other) => panic!("unexpected {other}: {frame}"),
                    None => {
                        let tracker = tracker.as_mut().expect("the stream opens with its cursor");
                        tracker.saw(
                            frame["topic"].as_str().unwrap(),
                            frame["id"].as_u64().unwrap(),
                        );
                        read.messages.push(frame);
                    }
                }
                read.cursor = tracker.as_ref().unwrap().cursor().encode();
            }
        }
    }
    read
}

/// Every (topic, id) once, and each topic's ids in order.
fn assert_once_in_order(messages: &[Value], expected: &BTreeSet<(String, u64)>, what: &str) {
    let got = pairs(messages);
    let set: BTreeSet<_> = got.iter().cloned().collect();
    assert_eq!(set.len(), got.len(), "{what}: a message twice: {got:?}");
    assert_eq!(&set, expected, "{what}");
    for topic in expected.iter().map(|(t, _)| t) {
        let ids: Vec<u64> = got
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, id)| *id)
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{what}: {topic} out of order: {ids:?}"
        );
    }
}

fn expected(topics: &[(&str, std::ops::RangeInclusive<u64>)]) -> BTreeSet<(String, u64)> {
    topics
        .iter()
        .flat_map(|(t, ids)| ids.clone().map(|id| (t.to_string(), id)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_follows_two_topics_and_resumes_from_the_middle() {
    let server = start().await;
    for kind in KINDS {
        let (a, b) = (format!("a-{kind:?}"), format!("b-{kind:?}"));
        for _ in 0..3 {
            server.publish(&a, json!({})).await;
            server.publish(&b, json!({})).await;
        }
        let list = format!("{a},{b}");
        let all = read(&server, kind, &list, Some("0"), 6).await;
        assert_once_in_order(
            &all.messages,
            &expected(&[(&a, 1..=3), (&b, 1..=3)]),
            &format!("{kind:?} from 0"),
        );

        // From the middle: what the first reading did not get, then live messages.
        let first = read(&server, kind, &list, Some("0"), 2).await;
        let publisher = {
            let (server, a, b) = (server.endpoint.clone(), a.clone(), b.clone());
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                server.publish(&a, json!({})).await;
                server.publish(&b, json!({})).await;
            })
        };
        let rest = read(
            &server,
            kind,
            &list,
            Some(&first.cursor),
            8 - first.messages.len(),
        )
        .await;
        publisher.await.unwrap();
        let both: Vec<Value> = first
            .messages
            .iter()
            .chain(&rest.messages)
            .cloned()
            .collect();
        assert_once_in_order(
            &both,
            &expected(&[(&a, 1..=4), (&b, 1..=4)]),
            &format!("{kind:?} resumed"),
        );
        assert!(first.signals.is_empty() && rest.signals.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cursor_carries_a_list_across_every_transport_in_turn() {
    let server = start().await;
    for _ in 0..8 {
        server.publish("x", json!({})).await;
        server.publish("y", json!({})).await;
    }
    let mut seen = Vec::new();
    let mut cursor = "0".to_owned();
    for kind in [
        Kind::Sse,
        Kind::Stream,
        Kind::Poll,
        Kind::Ws,
        Kind::LongPoll,
        Kind::Sse,
    ] {
        let read = read(&server, kind, "x,y", Some(&cursor), 2).await;
        seen.extend(read.messages);
        cursor = read.cursor;
    }
    let read = read(&server, Kind::Stream, "x,y", Some(&cursor), 16 - seen.len()).await;
    seen.extend(read.messages);
    assert_once_in_order(
        &seen,
        &expected(&[("x", 1..=8), ("y", 1..=8)]),
        "handed from transport to transport",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_follows_topics_created_later_and_resumes_them_exactly_once() {
    let server = start().await;
    for kind in KINDS {
        let p = format!("n{kind:?}").to_lowercase();
        let (old, new, later) = (format!("{p}.old"), format!("{p}.new"), format!("{p}.later"));
        server.publish(&old, json!({})).await;
        let list = format!("{p}.*");
        // From now: the existing topic's next message, and all of a topic created later.
        let first = {
            let (publish, old, new) = (server.endpoint.clone(), old.clone(), new.clone());
            let publisher = tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                publish.publish(&old, json!({})).await;
                publish.publish(&new, json!({})).await;
            });
            if matches!(kind, Kind::Poll) {
                // A poll without a cursor says where now is; the next one gets what came.
                let now = read_now(&server, &list).await;
                publisher.await.unwrap();
                read(&server, kind, &list, Some(&now), 2).await
            } else {
                let read = read(&server, kind, &list, None, 2).await;
                publisher.await.unwrap();
                read
            }
        };
        assert_once_in_order(
            &first.messages,
            &expected(&[(&old, 2..=2), (&new, 1..=1)]),
            &format!("{kind:?} live"),
        );
        // While nobody follows: more of both, and another new topic.
        server.publish(&new, json!({})).await;
        server.publish(&later, json!({})).await;
        server.publish(&old, json!({})).await;
        let rest = read(&server, kind, &list, Some(&first.cursor), 3).await;
        assert_once_in_order(
            &rest.messages,
            &expected(&[(&old, 3..=3), (&new, 2..=2), (&later, 1..=1)]),
            &format!("{kind:?} resumed"),
        );
    }
}

/// The cursor a poll of `list` answers without one: every topic at its newest id.
async fn read_now(node: &Endpoint, list: &str) -> String {
    let (status, body) = node.get(&format!("/topics/{list}/poll")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"], json!([]));
    body["next_after"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_topics_picked_up_by_a_pattern_fit_a_two_kilobyte_cursor() {
    let server = start().await;
    let names: Vec<String> = (0..100)
        .map(|i| format!("wide.{i:03}.{}", "x".repeat(115)))
        .collect();
    for name in &names {
        server.publish(name, json!({})).await;
    }
    // Every event's id is checked to be a cursor of at most 2 KiB (`read`).
    let first = read(&server, Kind::Sse, "wide.*", Some("0"), 60).await;
    let rest = read(&server, Kind::Sse, "wide.*", Some(&first.cursor), 40).await;
    // Every topic at 1 now: the cursor names all 100 by hash.
    let full = rest.cursor.len();
    assert!(full > 1000 && full <= 2048, "{full}");
    assert_eq!(Cursor::decode(&rest.cursor, 100).unwrap().hashed.len(), 100);
    let all: Vec<Value> = first.messages.into_iter().chain(rest.messages).collect();
    let expected: BTreeSet<(String, u64)> = names.iter().map(|n| (n.clone(), 1)).collect();
    assert_once_in_order(&all, &expected, "100 topics across a reconnect");
}

/// The status and error code of a GET (a WebSocket handshake on `/ws` endpoints).
async fn refused(node: &Endpoint, path: &str) -> (u16, String, String) {
    let (status, body) = if path.split('?').next().unwrap().ends_with("/ws") {
        let url = format!("ws://{}{}", node.host, path);
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response.body().clone().unwrap_or_default();
                (
                    response.status().as_u16(),
                    serde_json::from_slice(&body).unwrap_or(Value::Null),
                )
            }
            other => panic!(
                "{path}: the handshake was not refused: {:?}",
                other.map(|_| ())
            ),
        }
    } else {
        node.get(path).await
    };
    (
        status,
        body["code"].as_str().unwrap_or_default().to_owned(),
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

/// A server that lets a connection follow 3 topics, holding 4 that `wide.*` matches.
async fn narrow_server() -> TestServer {
    let server = start_with(Config {
        max_subscriptions_per_connection: 3,
        ..Config::default()
    })
    .await;
    for i in 0..4 {
        server.publish(&format!("wide.{i}"), json!({})).await;
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refusal_has_its_code_and_loses_nothing() {
    let server = narrow_server().await;
    server.publish("a", json!({})).await;
    // A subscriber of the same topics is served throughout.
    let mut watcher = server.sse("/topics/a,b/sse?after=0", None).await;
    let position_five = Cursor {
        listed: vec![(5, 1)],
        hashed: vec![],
    }
    .encode();
    let hashed = Cursor {
        listed: vec![],
        hashed: vec![(42, 1)],
    }
    .encode();
    let cases = [
        ("a,b,c,d", String::new(), "too_many_topics"),
        ("a,b,a", String::new(), "invalid_topic_list"),
        ("a,b%20c", String::new(), "invalid_topic"),
        ("wide.*", String::new(), "pattern_too_broad"),
        ("a,wide.*", String::new(), "pattern_too_broad"),
        ("a,b", "?after=5".into(), "invalid_cursor"),
        ("a,b", "?after=AAAA".into(), "invalid_cursor"),
        ("a,b", "?after=A$".into(), "invalid_cursor"),
        ("a,b", format!("?after={position_five}"), "cursor_mismatch"),
        ("a,b", format!("?after={hashed}"), "cursor_mismatch"),
    ];
    for endpoint in ["poll", "longpoll", "sse", "stream", "ws"] {
        for (list, query, code) in &cases {
            let path = format!("/topics/{list}/{endpoint}{query}");
            let (status, got, message) = refused(&server, &path).await;
            assert_eq!((status, got.as_str()), (400, *code), "{path}: {message}");
            assert!(!message.is_empty());
        }
    }
    server.publish("b", json!({})).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Some(event) = watcher.next_event().await {
            got.push(event.json());
        }
    }
    assert_once_in_order(
        &got,
        &expected(&[("a", 1..=1), ("b", 1..=1)]),
        "the watcher",
    );
}

#[tokio::test]
async fn a_refused_websocket_pattern_follows_nothing_and_patterns_are_bounded() {
    let server = narrow_server().await;
    let mut ws = server.ws("/ws").await;
    ws.send_json(json!({"type": "subscribe", "topic": "wide.*", "after": 0}))
        .await;
    let reply = ws.next_json().await.unwrap();
    assert_eq!(reply["code"], "pattern_too_broad", "{reply}");
    // Refused: not watched. A new topic under it must not end the connection (1008 for the
    // limit) nor reach it.
    server.publish("wide.new", json!({})).await;
    ws.send_json(json!({"type": "subscribe", "topic": "calm", "after": 0}))
        .await;
    let reply = ws.next_json().await.unwrap();
    assert_eq!(
        (reply["type"].as_str(), reply["topic"].as_str()),
        (Some("subscribed"), Some("calm")),
        "{reply}"
    );
    // Patterns count against the limit, and one watched twice is entered once.
    for prefix in ["p1.*", "p2.*", "p2.*", "p3.*"] {
        ws.send_json(json!({"type": "subscribe", "topic": prefix}))
            .await;
        let reply = ws.next_json().await.unwrap();
        assert_eq!(reply["type"], "subscribed", "{prefix}: {reply}");
    }
    ws.send_json(json!({"type": "subscribe", "topic": "p4.*"}))
        .await;
    let reply = ws.next_json().await.unwrap();
    assert_eq!(reply["code"], "too_many_topics", "{reply}");
    server.stop().await;
}

#[tokio::test]
async fn a_pattern_picks_up_a_durable_stream_created_after_it() {
    let server = start().await;
    let mut follower = server.stream("/topics/ds.*/stream?after=0").await;
    let opening = follower.next_json().await.unwrap();
    assert_eq!(opening["type"], "cursor");
    // A Durable Stream created with content: its topic's first message is written by the
    // stream layer, not a publish, and must be announced all the same.
    let created = server
        .http
        .put(server.url("/v1/stream/ds.made"))
        .header("content-type", "application/json")
        .body(r#"[{"n":1}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let envelope = follower.next_json().await.unwrap();
    assert_eq!(
        (envelope["topic"].as_str(), envelope["id"].as_u64()),
        (Some("ds.made"), Some(1)),
        "{envelope}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_must_cover_every_listed_name_and_each_pattern_itself() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let server = start_with(Config {
        jwt_secret: Some("secret".into()),
        ..Config::default()
    })
    .await;
    let token = encode(
        &Header::default(),
        &json!({"exp": pushhub::access::unix_now() + 60, "pushhub": {"subscribe": ["a", "news.*"]}}),
        &EncodingKey::from_secret(b"secret"),
    )
    .unwrap();
    for (list, allowed, named) in [
        ("a,news.*", true, ""),
        ("a,news.sport.*", true, ""),
        ("a,b", false, "b"),
        ("a,new*", false, "new*"),
        ("*", false, "*"),
    ] {
        if allowed {
            let path = format!("/topics/{list}/poll?after=0&token={token}");
            assert_eq!(server.get(&path).await.0, 200, "{list}");
            continue;
        }
        // Streams are refused before they start, so their answer ends.
        for endpoint in ["poll", "longpoll", "sse", "stream", "ws"] {
            let path = format!("/topics/{list}/{endpoint}?after=0&token={token}");
            let (status, code, message) = refused(&server, &path).await;
            assert_eq!(
                (status, code.as_str()),
                (403, "forbidden"),
                "{list} {endpoint}"
            );
            assert!(
                message.ends_with(&format!(" {named}")),
                "{message:?} names {named}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_cursor_resumes_after_a_restart_on_the_disk_store() {
    let dir = tempdir();
    let args = ["--data-dir", dir.as_str()];
    let first = spawn_binary(&args, &[]);
    let node = first.endpoint();
    for topic in ["d.one", "d.two", "plain"] {
        node.publish(topic, json!({})).await;
        node.publish(topic, json!({})).await;
    }
    let list = "plain,d.*";
    let before = read(&node, Kind::Sse, list, Some("0"), 3).await;
    drop(first);
    let second = spawn_binary(&args, &[]);
    let node = second.endpoint();
    node.publish("d.three", json!({})).await;
    let after = read(&node, Kind::Stream, list, Some(&before.cursor), 4).await;
    let all: Vec<Value> = before.messages.into_iter().chain(after.messages).collect();
    assert_once_in_order(
        &all,
        &expected(&[
            ("plain", 1..=2),
            ("d.one", 1..=2),
            ("d.two", 1..=2),
            ("d.three", 1..=1),
        ]),
        "across a restart",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> String {
    let dir = std::env::temp_dir().join(format!(
        "pushhub-lists-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    dir.to_string_lossy().into_owned()
}

/// A Redis and two nodes on it (kept running while the processes are held), with their
/// endpoints; `None` when Redis cannot run here.
fn two_redis_nodes() -> Option<(RedisServer, [ServerProcess; 2], Endpoint, Endpoint)> {
    let redis = RedisServer::start()?;
    let nodes = [(); 2].map(|()| spawn_binary(&["--redis", &redis.url()], &[]));
    let (one, two) = (nodes[0].endpoint(), nodes[1].endpoint());
    Some((redis, nodes, one, two))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_on_one_redis_node_picks_up_a_topic_created_on_another() {
    let Some((_redis, _nodes, one, two)) = two_redis_nodes() else {
        return;
    };
    two.publish("r.old", json!({})).await;
    let publisher = {
        let two = two.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            two.publish("r.new", json!({})).await;
            two.publish("r.old", json!({})).await;
        })
    };
    let first = read(&one, Kind::Ws, "r.*", Some("0"), 3).await;
    publisher.await.unwrap();
    assert_once_in_order(
        &first.messages,
        &expected(&[("r.old", 1..=2), ("r.new", 1..=1)]),
        "node one",
    );
    two.publish("r.new", json!({})).await;
    two.publish("r.third", json!({})).await;
    // The cursor node one's client kept resumes on node two, and the other way round.
    let rest = read(&two, Kind::LongPoll, "r.*", Some(&first.cursor), 2).await;
    assert_once_in_order(
        &rest.messages,
        &expected(&[("r.new", 2..=2), ("r.third", 1..=1)]),
        "node two",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_picks_up_a_topic_created_while_its_node_was_cut_from_redis_pub_sub() {
    let Some((redis, _nodes, one, two)) = two_redis_nodes() else {
        return;
    };
    two.publish("cut.old", json!({})).await;
    let reader = {
        let one = one.clone();
        tokio::spawn(async move { read(&one, Kind::Sse, "cut.*", Some("0"), 2).await })
    };
    // Node one follows the pattern (it has read `cut.old`'s history) ...
    eventually_subscribed(&one, "cut.old").await;
    // ... when every pub/sub connection to Redis is cut, again and again for 1.5 s, and
    // node two creates `cut.new` in the middle (with its command connection, which stays):
    // node one's announcement of it is lost. It must list the pattern again once its
    // subscription is back. (Without that listing this failed in 3 of 7 runs: the
    // announcement sometimes slips through while a connection is back between two cuts.)
    let port = redis.port;
    let cutter = std::thread::spawn(move || {
        let until = std::time::Instant::now() + std::time::Duration::from_millis(1500);
        while std::time::Instant::now() < until {
            support::wait_redis_says(port, b"CLIENT KILL TYPE pubsub\r\n", ":");
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    two.publish("cut.new", json!({})).await;
    tokio::task::spawn_blocking(move || cutter.join().unwrap())
        .await
        .unwrap();
    let read = tokio::time::timeout(support::PATIENCE, reader)
        .await
        .expect("the topic created during the cut reaches the pattern's subscriber")
        .unwrap();
    assert_once_in_order(
        &read.messages,
        &expected(&[("cut.old", 1..=1), ("cut.new", 1..=1)]),
        "node one",
    );
}

/// Waits until `node` counts an SSE subscriber of `topic`.
async fn eventually_subscribed(node: &Endpoint, topic: &str) {
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        let (_, body) = node.get(&format!("/topics/{topic}")).await;
        if body["subscribers"]["sse"].as_u64() == Some(1) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_multiplexed_websocket_subscribes_to_a_pattern_and_resumes_it() {
    let server = start().await;
    server.publish("w.one", json!({})).await;
    let mut ws = server.ws("/ws").await;
    ws.send_json(json!({"type": "subscribe", "topic": "w.*", "after": 0}))
        .await;
    let reply = ws.next_json().await.unwrap();
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["topic"], "w.*");
    let opened = Cursor::decode(reply["cursor"].as_str().unwrap(), 100).unwrap();
    // From 0: a topic at 0 is left out of a cursor (not naming it means from its start).
    assert_eq!(opened, Cursor::default());
    let mut tracker = Tracker::new(Selection::parse("w.*", 1).unwrap(), opened);
    server.publish("w.two", json!({})).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let envelope = ws.next_envelope().await;
        tracker.saw(
            envelope["topic"].as_str().unwrap(),
            envelope["id"].as_u64().unwrap(),
        );
        got.push(envelope);
    }
    assert_once_in_order(
        &got,
        &expected(&[("w.one", 1..=1), ("w.two", 1..=1)]),
        "subscribed",
    );

    ws.send_json(json!({"type": "unsubscribe", "topic": "w.*"}))
        .await;
    let reply = ws.next_json().await.unwrap();
    assert_eq!(
        reply,
        json!({"type": "unsubscribed", "topic": "w.*", "was_subscribed": true})
    );
    server.publish("w.one", json!({})).await;
    server.publish("w.three", json!({})).await;
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(
        ws.next_json().await.unwrap()["type"],
        "pong",
        "nothing of w.* after unsubscribe"
    );

    let cursor = tracker.cursor().encode();
    ws.send_json(json!({"type": "subscribe", "topic": "w.*", "after": cursor}))
        .await;
    assert_eq!(ws.next_json().await.unwrap()["type"], "subscribed");
    let mut rest = Vec::new();
    while rest.len() < 2 {
        rest.push(ws.next_envelope().await);
    }
    assert_once_in_order(
        &rest,
        &expected(&[("w.one", 2..=2), ("w.three", 1..=1)]),
        "resumed",
    );
    ws.send_json(json!({"type": "subscribe", "topic": "w.*", "after": 7}))
        .await;
    let refused = ws.next_json().await.unwrap();
    assert_eq!(refused["code"], "invalid_cursor", "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_stream_is_counted_on_each_topic_and_drained_on_shutdown() {
    use pushhub::message::TransportKind;
    let server = start().await;
    let mut sse = server.sse("/topics/s1,s2/sse?after=0", None).await;
    let mut ndjson = server.stream("/topics/s1,s2/stream?after=0").await;
    for topic in ["s1", "s2"] {
        let subscribers = server.subscribers(topic).await;
        assert_eq!(
            (
                subscribers[TransportKind::Sse],
                subscribers[TransportKind::Stream]
            ),
            (1, 1),
            "{topic}"
        );
    }
    for _ in 0..3 {
        server.publish("s1", json!({})).await;
        server.publish("s2", json!({})).await;
    }
    // Everything published before the stop reaches both streams, then they end.
    let stopping = tokio::spawn(server.stop());
    let mut got = Vec::new();
    while let Some(event) = sse.next_event().await {
        got.push(event.json());
    }
    assert_once_in_order(
        &got,
        &expected(&[("s1", 1..=3), ("s2", 1..=3)]),
        "SSE drained",
    );
    let mut lines = Vec::new();
    while let Some(line) = ndjson.next_json().await {
        if line.get("type").is_none() {
            lines.push(line);
        }
    }
    assert_once_in_order(
        &lines,
        &expected(&[("s1", 1..=3), ("s2", 1..=3)]),
        "NDJSON drained",
    );
    stopping.await.unwrap();
}
