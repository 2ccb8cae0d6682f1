//! Presence over real sockets: named subscribers listed by `GET /topics/{t}/presence`, the
//! `presence` envelopes watchers receive on every streaming transport, long pollers kept
//! between requests, the coalescing bound, and two Redis nodes with one killed.

#![allow(missing_docs)]

mod support;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use pushhub::Config;
use serde_json::{Value, json};
use support::{
    Endpoint, PATIENCE, RedisServer, StreamClient, eventually, spawn_binary, start, start_with,
};

/// The `client` names of a presence list.
async fn listed(endpoint: &Endpoint, topic: &str) -> BTreeSet<String> {
    let (status, body) = endpoint.get(&format!("/topics/{topic}/presence")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["count"].as_u64().unwrap() as usize,
        body["members"].as_array().unwrap().len()
    );
    body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["client"].as_str().unwrap().to_owned())
        .collect()
}

/// Joins and leaves, by client name, that a watcher has heard so far.
#[derive(Default, Debug)]
struct Heard {
    joins: Vec<String>,
    leaves: Vec<String>,
    envelopes: usize,
    /// Members counted by envelopes that were capped (`overflow`).
    overflow_joins: usize,
    overflow_leaves: usize,
}

impl Heard {
    fn take(&mut self, envelope: &Value) {
        assert_eq!(envelope["type"], "presence");
        self.envelopes += 1;
        let names = |list: &Value| -> Vec<String> {
            list.as_array()
                .unwrap()
                .iter()
                .map(|m| m["client"].as_str().unwrap().to_owned())
                .collect()
        };
        let joins = names(&envelope["joins"]);
        let leaves = names(&envelope["leaves"]);
        assert!(
            joins.len() + leaves.len() <= 100,
            "an envelope lists at most 100 changes"
        );
        self.joins.extend(joins);
        self.leaves.extend(leaves);
        if let Some(overflow) = envelope.get("overflow") {
            self.overflow_joins += overflow["joins"].as_u64().unwrap() as usize;
            self.overflow_leaves += overflow["leaves"].as_u64().unwrap() as usize;
        }
    }

    /// Reads `watcher` until `done` says so.
    async fn until(&mut self, watcher: &mut StreamClient, done: impl Fn(&Heard) -> bool) {
        while !done(self) {
            let line = watcher.next_json().await.expect("watcher ended");
            if line["type"] == "presence" {
                self.take(&line);
            }
        }
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn named_subscribers_on_every_stream_are_listed_and_watchers_hear_them_come_and_go() {
    let server = start().await;
    let mut watcher = server.stream("/topics/room/stream?presence=1").await;
    let mut heard = Heard::default();
    let sse = server.sse("/topics/room/sse?client=sam", None).await;
    let ndjson = server.stream("/topics/room/stream?client=nina").await;
    let ws = server.ws("/topics/room/ws?client=walt").await;
    let mut multiplexed = server.ws("/ws?client=max").await;
    multiplexed
        .send_json(json!({"type": "subscribe", "topic": "room"}))
        .await;
    // Anonymous subscribers are counted, not listed.
    let _anonymous = server.sse("/topics/room/sse", None).await;
    heard.until(&mut watcher, |h| h.joins.len() == 4).await;
    assert_eq!(
        heard.joins.iter().cloned().collect::<BTreeSet<_>>(),
        set(&["sam", "nina", "walt", "max"])
    );
    let (_, body) = server.get("/topics/room/presence").await;
    let transports: BTreeSet<(String, String)> = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert!(m["node"].as_str().unwrap().contains(':'), "{m}");
            assert!(m["since"].as_u64().unwrap() > 1_700_000_000_000, "{m}");
            (
                m["client"].as_str().unwrap().to_owned(),
                m["transport"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        transports,
        [
            ("max", "ws"),
            ("nina", "stream"),
            ("sam", "sse"),
            ("walt", "ws")
        ]
        .iter()
        .map(|(c, t)| (c.to_string(), t.to_string()))
        .collect()
    );
    drop((sse, ndjson, ws));
    multiplexed
        .send_json(json!({"type": "unsubscribe", "topic": "room"}))
        .await;
    heard.until(&mut watcher, |h| h.leaves.len() == 4).await;
    assert_eq!(
        heard.leaves.iter().cloned().collect::<BTreeSet<_>>(),
        set(&["sam", "nina", "walt", "max"])
    );
    assert!(listed(&server, "room").await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn sse_presence_events_carry_no_id_and_lists_take_them_per_topic() {
    let server = start().await;
    let mut watcher = server
        .sse("/topics/a,b/sse?client=wendy&presence=1&after=0", None)
        .await;
    server.publish("a", json!({"n": 1})).await;
    let _b = server.stream("/topics/b/stream?client=bea").await;
    let mut seen_topics = BTreeSet::new();
    let mut message_id = None;
    while seen_topics.len() < 3 || message_id.is_none() {
        let event = watcher.next_event().await.expect("stream ended");
        if event.event == "presence" {
            // Not in history: a reconnecting EventSource must keep the cursor it had.
            assert_eq!(event.id, None);
            let json = event.json();
            for join in json["joins"].as_array().unwrap() {
                seen_topics.insert(format!("{}:{}", json["topic"], join["client"]));
            }
        } else {
            message_id = event.id;
        }
    }
    // The watcher is a member of both its topics; bea only of b.
    assert_eq!(
        seen_topics,
        set(&[r#""a":"wendy""#, r#""b":"wendy""#, r#""b":"bea""#])
    );
    assert!(message_id.is_some());
    assert_eq!(listed(&server, "a").await, set(&["wendy"]));
    assert_eq!(listed(&server, "b").await, set(&["bea", "wendy"]));
    server.stop().await;
}

#[tokio::test]
async fn bad_presence_input_is_refused_and_a_token_names_its_holder() {
    let server = start().await;
    for path in [
        "/topics/room/sse?presence=2",
        "/topics/room/stream?client=no%20spaces",
        "/topics/room/poll?client=no%20spaces",
        "/topics/room/presence?limit=0",
        "/topics/room/presence?limit=10001",
    ] {
        let (status, body) = server.get(path).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("invalid_parameter")),
            "{path}"
        );
    }
    let (status, body) = server.get("/topics/bad%20name/presence").await;
    assert_eq!(status, 400, "{body}");
    server.stop().await;

    let secret = "presence-secret";
    let server = start_with(Config {
        jwt_secret: Some(secret.into()),
        ..Default::default()
    })
    .await;
    let claims = json!({
        "exp": pushhub::access::unix_now() + 60,
        "sub": "reader-7",
        "pushhub": {"subscribe": ["room"]},
    });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    // The token's subject wins over a name the client picks.
    let _stream = server
        .stream(&format!(
            "/topics/room/stream?client=impostor&token={token}"
        ))
        .await;
    let path = format!("/topics/room/presence?token={token}");
    eventually("the token's subject is listed", || async {
        let (_, body) = server.get(&path).await;
        body["members"][0]["client"] == "reader-7"
    })
    .await;
    let (status, _) = server.get("/topics/room/presence").await;
    assert_eq!(
        status, 401,
        "the list is read with the subscribe permission"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_long_poller_stays_while_parked_and_between_requests_then_leaves_after_the_window() {
    let window = Duration::from_secs(1);
    let server = start_with(Config {
        poller_window: window,
        ..Default::default()
    })
    .await;
    let mut watcher = server.stream("/topics/room/stream?presence=1").await;
    let mut heard = Heard::default();
    // Parked for twice the window: it must not be seen to leave meanwhile.
    let poll = {
        let endpoint = server.endpoint.clone();
        tokio::spawn(async move {
            endpoint
                .get("/topics/room/longpoll?client=carol&timeout=2")
                .await
        })
    };
    heard.until(&mut watcher, |h| h.joins == ["carol"]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        listed(&server, "room").await,
        set(&["carol"]),
        "parked for 1.5 s"
    );
    // Named pollers are counted by their roster entry.
    let counts = server.subscribers("room").await;
    assert_eq!(counts[pushhub::message::TransportKind::Longpoll], 1);
    let (status, _) = poll.await.unwrap();
    assert_eq!(status, 200);
    let answered = Instant::now();
    // Back within the window: still the same member, no leave, no second join.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = server
        .get("/topics/room/longpoll?client=carol&timeout=0.1")
        .await;
    assert_eq!(status, 200);
    let last = Instant::now();
    heard.until(&mut watcher, |h| h.leaves == ["carol"]).await;
    let gone_after = last.elapsed();
    assert_eq!(heard.joins, ["carol"], "one join for the whole visit");
    assert!(
        answered.elapsed() > window + Duration::from_millis(400),
        "not seen to leave between requests"
    );
    // The window, then at most one expiry check (every second) and one flush.
    assert!(
        gone_after >= window && gone_after < window + Duration::from_millis(2500),
        "left {gone_after:?} after its last request"
    );
    // A short poller joins and leaves the same way.
    server.get("/topics/room/poll?client=pat").await;
    heard.until(&mut watcher, |h| h.joins.len() == 2).await;
    assert_eq!(heard.joins[1], "pat");
    assert_eq!(
        server.subscribers("room").await[pushhub::message::TransportKind::Poll],
        1
    );
    heard.until(&mut watcher, |h| h.leaves.len() == 2).await;
    server.stop().await;
}

#[tokio::test]
async fn a_crowd_arriving_at_once_is_told_in_few_capped_envelopes() {
    let server = start().await;
    let mut watcher = server.stream("/topics/room/stream?presence=1").await;
    let started = Instant::now();
    let crowd: Vec<StreamClient> = futures::future::join_all((0..150).map(|i| {
        let endpoint = server.endpoint.clone();
        async move {
            endpoint
                .stream(&format!("/topics/room/stream?client=guest-{i}"))
                .await
        }
    }))
    .await;
    let mut heard = Heard::default();
    heard
        .until(&mut watcher, |h| h.joins.len() + h.overflow_joins == 150)
        .await;
    let took = started.elapsed();
    // At most one envelope per flush interval (250 ms) while they arrive, however many.
    let bound = (took.as_millis() / 250) as usize + 1;
    assert!(
        heard.envelopes <= bound,
        "{} envelopes in {took:?} (bound {bound})",
        heard.envelopes
    );
    assert!(heard.envelopes < 150 / 2);
    assert_eq!(listed(&server, "room").await.len(), 150);
    let (_, body) = server.get("/topics/room/presence?limit=10").await;
    assert_eq!(
        (
            body["count"].as_u64(),
            body["members"].as_array().unwrap().len()
        ),
        (Some(150), 10)
    );
    drop(crowd);
    heard
        .until(&mut watcher, |h| h.leaves.len() + h.overflow_leaves == 150)
        .await;
    server.stop().await;
}

/// Reads the next presence envelope of `watcher`, waiting at most `within`.
async fn next_presence(watcher: &mut StreamClient, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let line = tokio::time::timeout_at(deadline, watcher.next_json())
            .await
            .ok()??;
        if line["type"] == "presence" {
            return Some(line);
        }
    }
}

#[tokio::test]
async fn across_redis_nodes_a_killed_node_s_members_leave_within_the_node_timeout() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let node = |name: &str| spawn_binary(&["--redis", &redis.url(), "--node-name", name], &[]);
    let mut a = node("node-a");
    let b = node("node-b");
    let c = node("node-c");
    let (a_end, b_end, c_end) = (a.endpoint(), b.endpoint(), c.endpoint());
    let mut watcher = b_end
        .stream("/topics/room/stream?client=bob&presence=1")
        .await;
    let mut heard = Heard::default();
    heard.until(&mut watcher, |h| h.joins == ["bob"]).await;
    let _alice = a_end.sse("/topics/room/sse?client=alice", None).await;
    let _amy = a_end.ws("/topics/room/ws?client=amy").await;
    let cleo = c_end.stream("/topics/room/stream?client=cleo").await;
    heard.until(&mut watcher, |h| h.joins.len() == 4).await;
    let everyone = set(&["alice", "amy", "bob", "cleo"]);
    for endpoint in [&a_end, &b_end, &c_end] {
        eventually("every node lists every member", || async {
            listed(endpoint, "room").await == everyone
        })
        .await;
    }
    let (_, body) = c_end.get("/topics/room/presence").await;
    let nodes: BTreeSet<&str> = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["node-a", "node-b", "node-c"].into_iter().collect());

    // A node that dies says nothing: the others declare it dead once it stops beating.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    let envelope = next_presence(&mut watcher, Duration::from_secs(9))
        .await
        .expect("the dead node's members leave");
    heard.take(&envelope);
    let took = killed.elapsed();
    eprintln!("the killed node's members left {took:?} after the kill");
    assert_eq!(
        heard.leaves.iter().cloned().collect::<BTreeSet<_>>(),
        set(&["alice", "amy"]),
        "one envelope for the dead node's members"
    );
    // The documented bound: the node timeout (5 s) plus one beat (1 s), and the
    // envelope's way through Redis.
    assert!(
        took > Duration::from_secs(3) && took < Duration::from_millis(7500),
        "left {took:?} after the kill"
    );
    assert_eq!(listed(&b_end, "room").await, set(&["bob", "cleo"]));
    assert_eq!(listed(&c_end, "room").await, set(&["bob", "cleo"]));

    // A node that stops cleanly tells its members' leaving at once.
    drop(cleo);
    heard.until(&mut watcher, |h| h.leaves.len() == 3).await;
    let _carl = c_end.stream("/topics/room/stream?client=carl").await;
    heard.until(&mut watcher, |h| h.joins.len() == 5).await;
    let stopping = Instant::now();
    let pid = c.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    heard.until(&mut watcher, |h| h.leaves.len() == 4).await;
    assert_eq!(heard.leaves[3], "carl");
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "a clean stop is told without the timeout: {:?}",
        stopping.elapsed()
    );
    assert!(PATIENCE > Duration::from_secs(9));
    drop((b, c));
}
