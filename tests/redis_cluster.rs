//! `--redis` on a real Redis Cluster (3 primaries, one replica each, started by the test),
//! and on a primary with a replica: topics spread over shards and fan out by sharded
//! pub/sub, a topic's creation is announced to every node, a killed primary's replica takes
//! over without losing an acknowledged publish, and `--redis-min-replicas` answers 201 only
//! for what a replica has.

#![allow(missing_docs)]

mod support;

use std::{collections::BTreeMap, process::Command, sync::Arc, time::Duration};

use pushhub::store::{RedisMode, RedisOptions, RedisStore, Retention};
use serde_json::{Value, json};
use support::{Endpoint, PATIENCE, RedisCluster, RedisServer, eventually, spawn_binary};

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Publishes `data` once; the status, the id when 201, and the Retry-After when 503.
async fn try_publish(node: &Endpoint, topic: &str, data: Value) -> (u16, Option<u64>, bool) {
    let sent = node
        .http
        .post(node.url(&format!("/topics/{topic}")))
        .timeout(Duration::from_secs(8))
        .json(&data)
        .send()
        .await;
    let Ok(response) = sent else {
        return (0, None, false);
    };
    let status = response.status().as_u16();
    let retry_after = response.headers().contains_key("retry-after");
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["id"].as_u64(), retry_after)
}

/// An SSE subscriber of `topic` on `b` and a WebSocket one on `a`, once both nodes count
/// them.
async fn follow_on_both(
    a: &Endpoint,
    b: &Endpoint,
    topic: &str,
) -> (support::SseClient, support::WsClient) {
    let sse = b.sse(&format!("/topics/{topic}/sse"), None).await;
    let ws = a.ws(&format!("/topics/{topic}/ws")).await;
    eventually("subscribers", || async {
        b.get(&format!("/topics/{topic}")).await.1["subscribers"]["sse"] == 1
            && a.get(&format!("/topics/{topic}")).await.1["subscribers"]["ws"] == 1
    })
    .await;
    (sse, ws)
}

/// Publishes acknowledged so far, as (id, n).
type Acked = Arc<std::sync::Mutex<Vec<(u64, u64)>>>;

/// Publishes `{"n": n}` to `topic` for `duration`, alternating nodes `a` and `b`, `pace`
/// apart (and `after_refusal` more after a 503); returns what was acknowledged as (id, n),
/// how many were refused, and how many of those lacked a Retry-After. Any other answer
/// fails the test.
fn publish_for(
    nodes: (Endpoint, Endpoint),
    topic: &'static str,
    duration: Duration,
    pace: Duration,
    after_refusal: Duration,
) -> (Acked, tokio::task::JoinHandle<(usize, usize)>) {
    let acked = Arc::new(std::sync::Mutex::new(Vec::<(u64, u64)>::new()));
    let (a, b) = nodes;
    let publisher = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let (mut refused, mut without_retry_after) = (0, 0);
            let deadline = tokio::time::Instant::now() + duration;
            let mut n = 0u64;
            while tokio::time::Instant::now() < deadline {
                let node = if n.is_multiple_of(2) { &a } else { &b };
                match try_publish(node, topic, json!({ "n": n })).await {
                    (201, Some(id), _) => acked.lock().unwrap().push((id, n)),
                    (503, _, retry_after) => {
                        refused += 1;
                        without_retry_after += usize::from(!retry_after);
                        tokio::time::sleep(after_refusal).await;
                    }
                    other => panic!("publish {n}: {other:?}"),
                }
                n += 1;
                tokio::time::sleep(pace).await;
            }
            (refused, without_retry_after)
        })
    };
    (acked, publisher)
}

/// Every acknowledged publish (`acked`: id, n) reached `sse` and `ws` once, as itself, in
/// strictly increasing ids (an id is never reused for another message), and `reader`'s
/// history of `topic` keeps it.
async fn assert_delivered_once_and_kept(
    acked: &[(u64, u64)],
    sse: &mut support::SseClient,
    ws: &mut support::WsClient,
    reader: &Endpoint,
    topic: &str,
) {
    let by_id: BTreeMap<u64, u64> = acked.iter().copied().collect();
    assert_eq!(by_id.len(), acked.len(), "no id acknowledged twice");
    let last_acked = *by_id.keys().last().unwrap();
    let mut seen_sse = BTreeMap::new();
    let mut last = 0;
    while last < last_acked {
        let event = tokio::time::timeout(PATIENCE, sse.next_event())
            .await
            .expect("SSE event in time")
            .expect("SSE open")
            .json();
        let id = event["id"].as_u64().unwrap();
        assert!(id > last, "SSE ids strictly increase: {id} after {last}");
        last = id;
        seen_sse.insert(id, event["data"]["n"].as_u64().unwrap());
    }
    let mut seen_ws = BTreeMap::new();
    let mut last = 0;
    while last < last_acked {
        let envelope = ws.next_envelope().await;
        let id = envelope["id"].as_u64().unwrap();
        assert!(
            id > last,
            "WebSocket ids strictly increase: {id} after {last}"
        );
        last = id;
        seen_ws.insert(id, envelope["data"]["n"].as_u64().unwrap());
    }
    let (status, history) = reader
        .get(&format!("/topics/{topic}/poll?after=0&limit=1000"))
        .await;
    assert_eq!(status, 200);
    let kept: BTreeMap<u64, u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_u64().unwrap(), m["data"]["n"].as_u64().unwrap()))
        .collect();
    for (id, n) in &by_id {
        assert_eq!(
            seen_sse.get(id),
            Some(n),
            "SSE got acknowledged {id} as itself"
        );
        assert_eq!(
            seen_ws.get(id),
            Some(n),
            "WebSocket got acknowledged {id} as itself"
        );
        assert_eq!(kept.get(id), Some(n), "history keeps acknowledged {id}");
    }
}

/// Topic names whose slots fall on every shard: `count` per primary.
fn topics_on_every_shard(cluster: &RedisCluster, count: usize) -> Vec<String> {
    let mut by_primary: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let topic = format!("room{i}");
        let primary = cluster.primary_of(&format!("pushhub:{{{topic}}}:seq"));
        let names = by_primary.entry(primary).or_default();
        if names.len() < count {
            names.push(topic);
        }
        if by_primary.len() == 3 && by_primary.values().all(|n| n.len() == count) {
            break;
        }
    }
    by_primary.into_values().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topics_spread_over_shards_and_fan_out_by_sharded_pub_sub() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    // One seed is enough: the node asks it, learns it is a cluster, and finds the rest.
    let a = spawn_binary(&["--redis", &cluster.nodes[0].url()], &[]);
    let b = spawn_binary(&["--redis", &cluster.seeds()], &[]);
    assert!(
        a.log.lock().unwrap().iter().any(|l| l.contains("redis")),
        "startup names the store"
    );
    let (a, b) = (a.endpoint(), b.endpoint());
    let topics = topics_on_every_shard(&cluster, 2);

    // A store of the test's own, as a third node, hears of each topic as it is created.
    let store = RedisStore::connect(
        &RedisOptions {
            urls: vec![cluster.nodes[1].url()],
            mode: RedisMode::Cluster,
            min_replicas: 0,
            replica_timeout: Duration::from_secs(1),
        },
        Retention {
            max_messages: 100,
            max_age: None,
        },
    )
    .unwrap();
    let mut created = store.created_topics();
    // The announcements' channel is classic: each subscriber sits on one node or another.
    eventually(
        "the two nodes and this store hear announcements",
        || async {
            let subscribers: u64 = cluster
                .nodes
                .iter()
                .filter_map(|n| {
                    redis_cli(n.port, &["pubsub", "numsub", "pushhub:topics"])
                        .lines()
                        .nth(1)
                        .and_then(|count| count.trim().parse::<u64>().ok())
                })
                .sum();
            subscribers >= 3
        },
    )
    .await;

    let mut sse = Vec::new();
    let mut ws = Vec::new();
    for topic in &topics {
        sse.push(b.sse(&format!("/topics/{topic}/sse"), None).await);
        ws.push(a.ws(&format!("/topics/{topic}/ws")).await);
    }
    for topic in &topics {
        eventually("subscribers counted", || async {
            b.get(&format!("/topics/{topic}")).await.1["subscribers"]["sse"] == 1
                && a.get(&format!("/topics/{topic}")).await.1["subscribers"]["ws"] == 1
        })
        .await;
    }
    for round in 0..5u64 {
        for (i, topic) in topics.iter().enumerate() {
            let node = if (round as usize + i).is_multiple_of(2) {
                &a
            } else {
                &b
            };
            let id = node.publish(topic, json!({ "round": round })).await;
            assert_eq!(id, round + 1, "ids are per topic, assigned in Redis");
        }
    }
    for (i, topic) in topics.iter().enumerate() {
        for round in 0..5u64 {
            let event = tokio::time::timeout(PATIENCE, sse[i].next_event())
                .await
                .expect("SSE event in time")
                .expect("SSE open")
                .json();
            assert_eq!(
                (event["topic"].as_str(), event["id"].as_u64()),
                (Some(topic.as_str()), Some(round + 1))
            );
            let envelope = ws[i].next_envelope().await;
            assert_eq!(envelope["id"].as_u64(), Some(round + 1));
            assert_eq!(envelope["data"]["round"].as_u64(), Some(round));
        }
    }
    let mut announced = Vec::new();
    while announced.len() < topics.len() {
        let created = tokio::time::timeout(PATIENCE, created.recv())
            .await
            .expect("every new topic announced")
            .unwrap();
        match created {
            pushhub::store::Created::Topic(topic) => announced.push(topic.as_str().to_owned()),
            // Word that announcements may have been lost (a connection dropped): not one.
            pushhub::store::Created::Missed => {}
        }
    }
    announced.sort();
    let mut expected = topics.clone();
    expected.sort();
    assert_eq!(
        announced, expected,
        "each topic announced once, on its first message"
    );

    // Sharded: each topic's channel has subscribers on its own shard's primary (both nodes
    // follow it), and no node uses classic pub/sub for it.
    for topic in &topics {
        let channel = format!("pushhub:{{{topic}}}:live");
        let primary = cluster.nodes[cluster.primary_of(&channel)].port;
        let sharded = redis_cli(primary, &["pubsub", "shardnumsub", &channel]);
        assert!(
            sharded.ends_with("2\n"),
            "{channel} on {primary}: {sharded:?}"
        );
        for node in &cluster.nodes {
            let classic = redis_cli(node.port, &["pubsub", "numsub", &channel]);
            assert!(classic.ends_with("0\n"), "{channel} classic: {classic:?}");
        }
    }

    // Presence on a cluster: members in each topic's slot, envelopes on its sharded
    // channel, the nodes' beats in their own slot. A watcher on one node hears a member
    // joining on the other, on topics of every shard, and both nodes list it.
    for topic in &topics {
        let mut watcher = b
            .stream(&format!("/topics/{topic}/stream?client=watcher&presence=1"))
            .await;
        let _member = a
            .sse(&format!("/topics/{topic}/sse?client=ada"), None)
            .await;
        let joined = loop {
            let line = watcher.next_json().await.expect("watcher open");
            let joins = &line["joins"];
            if line["type"] == "presence"
                && joins
                    .as_array()
                    .is_some_and(|j| j.iter().any(|m| m["client"] == "ada"))
            {
                break line;
            }
        };
        assert_eq!(joined["topic"].as_str(), Some(topic.as_str()));
        for node in [&a, &b] {
            eventually("both nodes list both members", || async {
                let (_, body) = node.get(&format!("/topics/{topic}/presence")).await;
                body["count"] == 2
            })
            .await;
        }
    }
}

/// A killed primary: its replica is promoted; publishes meanwhile are refused (503 with
/// Retry-After), never falsely acknowledged. With `--redis-min-replicas 1` and one replica
/// per shard, the promoted primary has no replica until the killed one comes back as its
/// replica: until then its publishes are refused too. Every acknowledged publish reaches
/// the subscribers on both nodes exactly once, in order, and stays in the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_primary_fails_over_and_no_acknowledged_publish_is_lost() {
    let Some(mut cluster) = RedisCluster::start(3) else {
        return;
    };
    let seeds = cluster.seeds();
    let args = [
        "--redis",
        seeds.as_str(),
        "--redis-min-replicas",
        "1",
        "--redis-replica-timeout",
        "500ms",
    ];
    let a = spawn_binary(&args, &[]);
    let b = spawn_binary(&args, &[]);
    let (a, b) = (a.endpoint(), b.endpoint());
    let topic = "failover";
    let (mut sse, mut ws) = follow_on_both(&a, &b, topic).await;

    let primary = cluster.primary_of(&format!("pushhub:{{{topic}}}:seq"));
    let (acked, publisher) = publish_for(
        (a.clone(), b.clone()),
        topic,
        Duration::from_secs(16),
        Duration::from_millis(10),
        Duration::from_millis(50),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = acked.lock().unwrap().len();
    cluster.nodes[primary].kill();
    let key = format!("pushhub:{{{topic}}}:seq");
    eventually("the replica is promoted", || async {
        cluster.primary_of(&key) != primary
    })
    .await;
    let promoted = cluster.primary_of(&key);
    cluster.nodes[primary].restart();
    cluster.wait_healthy();
    let (refused, without_retry_after) = publisher.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(before > 20, "publishes flowed before the kill: {before}");
    assert!(
        acked.len() > before + 20,
        "publishes flowed again after the failover: {} then {}",
        before,
        acked.len()
    );
    assert!(refused > 0, "the switch was felt (503s)");
    assert_eq!(without_retry_after, 0, "every 503 says when to retry");
    assert_eq!(
        cluster.primary_of(&key),
        promoted,
        "the killed primary came back as a replica"
    );

    // Every acknowledged publish, once, in id order, on both nodes' subscribers; ids only
    // grow, and an id is never reused for another message.
    assert_delivered_once_and_kept(&acked, &mut sse, &mut ws, &a, topic).await;
    eprintln!(
        "failover: {} acknowledged ({before} before the kill), {refused} refused with 503",
        acked.len()
    );
}

/// `--redis-min-replicas 1` on a primary with one replica: 201 while the replica is there,
/// 503 with Retry-After (after the replica timeout, not for ever) once it is gone, 201 again
/// when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn min_replicas_answers_201_only_for_what_a_replica_has() {
    let Some(primary) = RedisServer::start() else {
        return;
    };
    let primary_port = primary.port.to_string();
    let Some(mut replica) = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary_port])
    else {
        return;
    };
    // The primary counts the replica as online (what `WAIT` counts), not only the replica
    // its link.
    let online = |primary: u16| {
        support::wait_redis_says(primary, b"INFO replication\r\n", "state=online");
    };
    online(primary.port);
    let node = spawn_binary(
        &[
            "--redis",
            &primary.url(),
            "--redis-min-replicas",
            "1",
            "--redis-replica-timeout",
            "1s",
        ],
        &[],
    );
    let process = node;
    let node = process.endpoint();
    let mut sse = node.sse("/topics/w/sse", None).await;
    for n in 1..=3u64 {
        let published = try_publish(&node, "w", json!(n)).await;
        assert_eq!(
            published,
            (201, Some(n), false),
            "{:?}",
            process.log.lock().unwrap()
        );
    }
    for n in 1..=3u64 {
        let event = sse.next_event().await.unwrap().json();
        assert_eq!(event["id"].as_u64(), Some(n));
    }
    replica.kill();
    eventually("the primary notices its replica is gone", || async {
        redis_cli(primary.port, &["info", "replication"]).contains("connected_slaves:0")
    })
    .await;
    let started = std::time::Instant::now();
    let (status, id, retry_after) = try_publish(&node, "w", json!(4)).await;
    assert_eq!((status, id, retry_after), (503, None, true));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "waited for the replica timeout: {waited:?}"
    );
    // Stored, not acknowledged, not delivered live: the subscriber sees nothing yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sse.next_event())
            .await
            .is_err(),
        "a message no replica has is not delivered"
    );
    replica.restart();
    online(primary.port);
    let published = try_publish(&node, "w", json!(5)).await;
    assert_eq!(
        published,
        (201, Some(5), false),
        "the refused message kept its id; this one is next: {:?}",
        process.log.lock().unwrap()
    );
    // The refused message may still appear, once, before the next one: it was stored.
    let mut delivered = Vec::new();
    while delivered.last() != Some(&5) {
        let event = sse.next_event().await.unwrap().json();
        delivered.push(event["id"].as_u64().unwrap());
    }
    assert_eq!(delivered, vec![4, 5]);
}

/// With `--redis-min-replicas`, a topic's confirmed id (what reads may see) is raised by a
/// command sent after `WAIT`, which a failover can lose while keeping the messages it
/// confirmed (they were replicated; the raise was not yet). The promoted primary then holds
/// acknowledged messages above its confirmed id. Reproduced here without the race: ten
/// publishes acknowledged, then the confirmed id set back to 4 by hand. A history read from
/// a node must still return all ten (the read finds the log ahead of the confirmed id,
/// proves with `WAIT` that a replica has it, and raises the confirmed id), not stop at 4
/// until the topic's next publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_messages_stay_readable_when_the_confirmed_id_fell_back() {
    let Some(primary) = RedisServer::start() else {
        return;
    };
    let primary_port = primary.port.to_string();
    let Some(_replica) = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary_port])
    else {
        return;
    };
    support::wait_redis_says(primary.port, b"INFO replication\r\n", "state=online");
    let args = ["--redis", &primary.url(), "--redis-min-replicas", "1"];
    let writer = spawn_binary(&args, &[]);
    let writer = writer.endpoint();
    for n in 1..=10u64 {
        assert_eq!(
            try_publish(&writer, "fell", json!(n)).await,
            (201, Some(n), false)
        );
    }
    let ack = "pushhub:{fell}:ack";
    assert_eq!(redis_cli(primary.port, &["get", ack]).trim(), "10");
    assert_eq!(redis_cli(primary.port, &["set", ack, "4"]).trim(), "OK");
    // A node that does not follow the topic reads it from Redis.
    let reader = spawn_binary(&args, &[]);
    let reader = reader.endpoint();
    let (status, history) = reader.get("/topics/fell/poll?after=0&limit=100").await;
    assert_eq!(status, 200);
    assert_eq!(
        support::ids(history["messages"].as_array().unwrap()),
        (1..=10).collect::<Vec<u64>>(),
        "every acknowledged message is readable: {history}"
    );
    assert_eq!(
        redis_cli(primary.port, &["get", ack]).trim(),
        "10",
        "raised again"
    );
}

/// Moves `slot` from the primary `from` to the primary `to` the way `redis-cli --cluster
/// reshard` does (IMPORTING and MIGRATING, `MIGRATE` of each key, then `SETSLOT NODE` on
/// every primary), slowly: a second with the slot migrating before any key moves, a key
/// every 300 ms, and a second with every key moved but the slot not yet handed over. The
/// publish script names the topic's stream key, which a plain topic never has, so on a
/// migrating slot Redis answers it `TRYAGAIN` (a key missing) for the whole move: its
/// publishes are refused (503 after the write path's retries), not lost, until the slot
/// is handed over.
fn move_slot(cluster: &RedisCluster, slot: u16, from: usize, to: usize) {
    let id = |node: usize| redis_cli(cluster.nodes[node].port, &["cluster", "myid"]);
    let (from_id, to_id) = (id(from), id(to));
    let (from_port, to_port) = (cluster.nodes[from].port, cluster.nodes[to].port);
    let slot = slot.to_string();
    let ok = |answer: String, what: &str| assert!(answer.starts_with("OK"), "{what}: {answer}");
    ok(
        redis_cli(
            to_port,
            &["cluster", "setslot", &slot, "importing", from_id.trim()],
        ),
        "importing",
    );
    ok(
        redis_cli(
            from_port,
            &["cluster", "setslot", &slot, "migrating", to_id.trim()],
        ),
        "migrating",
    );
    std::thread::sleep(Duration::from_secs(1));
    let keys = redis_cli(from_port, &["cluster", "getkeysinslot", &slot, "100"]);
    assert!(
        keys.lines().count() >= 2,
        "the topic's keys are there: {keys:?}"
    );
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let to_port = to_port.to_string();
        let args = [
            "migrate",
            "127.0.0.1",
            &to_port,
            "",
            "0",
            "5000",
            "KEYS",
            key,
        ];
        ok(redis_cli(from_port, &args), "migrate");
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(1));
    for node in [to, from]
        .into_iter()
        .chain((0..cluster.nodes.len()).filter(|n| ![from, to].contains(n)))
    {
        // Replicas refuse SETSLOT; they learn the move from their primaries.
        let _ = redis_cli(
            cluster.nodes[node].port,
            &["cluster", "setslot", &slot, "node", to_id.trim()],
        );
    }
}

/// A topic's slot moves to another primary while publishes flow through two nodes:
/// publishes meanwhile are acknowledged, or refused with 503 and Retry-After, never falsely
/// acknowledged; the nodes' sharded subscriptions follow the slot to its new primary; every
/// acknowledged publish reaches the subscribers on both nodes once, in order, and stays in
/// the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_moved_under_load_loses_nothing() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let seeds = cluster.seeds();
    let a = spawn_binary(&["--redis", &seeds], &[]);
    let b = spawn_binary(&["--redis", &seeds], &[]);
    let (a, b) = (a.endpoint(), b.endpoint());
    let topic = "moving";
    let (mut sse, mut ws) = follow_on_both(&a, &b, topic).await;
    let key = format!("pushhub:{{{topic}}}:seq");
    let channel = format!("pushhub:{{{topic}}}:live");
    let from = cluster.primary_of(&key);
    let to = (0..cluster.nodes.len())
        .find(|&n| n != from && redis_cli(cluster.nodes[n].port, &["role"]).starts_with("master"))
        .expect("another primary");

    let (acked, publisher) = publish_for(
        (a.clone(), b.clone()),
        topic,
        Duration::from_secs(8),
        Duration::from_millis(5),
        Duration::ZERO,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = acked.lock().unwrap().len();
    let slot = cluster.slot_of(&key);
    // Blocking (redis-cli and pauses) on this worker; the publisher runs on the others.
    tokio::task::block_in_place(|| move_slot(&cluster, slot, from, to));
    assert_eq!(cluster.primary_of(&key), to, "the slot moved");
    let (refused, without_retry_after) = publisher.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(before > 20, "publishes flowed before the move: {before}");
    assert!(
        acked.len() > before + 100,
        "publishes flowed during and after the move: {before} then {}",
        acked.len()
    );
    assert_eq!(without_retry_after, 0, "every 503 says when to retry");
    eventually(
        "both nodes follow the channel on its new primary",
        || async {
            redis_cli(cluster.nodes[to].port, &["pubsub", "shardnumsub", &channel]).ends_with("2\n")
        },
    )
    .await;

    assert_delivered_once_and_kept(&acked, &mut sse, &mut ws, &a, topic).await;
    eprintln!(
        "slot move: {} acknowledged ({before} before it), {refused} refused with 503",
        acked.len()
    );
}
