//! The fault checker: 3 pushhub nodes on a Redis Cluster of 3 primaries (one replica each),
//! publishers on every node, subscribers on every transport spread over the nodes, and for
//! about 45 s a fault every 5 s from a seeded schedule: a pushhub node or a Redis primary
//! killed with SIGKILL (and restarted 3 s later), or a node's Redis connections cut. Clients
//! reconnect to surviving nodes with their cursors. Then the whole run is checked:
//!
//! - every publish answered 201 reached every subscriber, exactly once;
//! - per topic and subscriber, ids strictly increase, with no gap the server did not report;
//! - no (topic, id) was ever delivered as two different messages;
//! - the history read at the end holds every acknowledged message (a publish answered 503
//!   may appear, once).
//!
//! `PUSHHUB_FAULT_SEED=N` reproduces a run (the seed is printed). Faults are spaced more than
//! three `cluster-node-timeout`s apart and never take down both members of a shard: a killed
//! primary is back (as a replica) before the next fault.

#![allow(missing_docs)]

mod support;

use std::{
    collections::{BTreeMap, HashMap},
    process::Command,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use futures::StreamExt;
use serde_json::{Value, json};
use support::{Endpoint, RedisCluster, ServerProcess, spawn_binary};
use tokio::time::Instant;

const NODES: usize = 3;
const TOPICS: usize = 6;
const TRANSPORTS: [&str; 4] = ["sse", "stream", "ws", "longpoll"];
/// From the start of the load to the last fault.
const FAULTS_FOR: Duration = Duration::from_secs(45);
const FAULT_EVERY: Duration = Duration::from_secs(5);
/// How long a killed process stays down.
const DOWN_FOR: Duration = Duration::from_secs(3);

/// What one subscriber received, in order, across its reconnections.
#[derive(Default)]
struct Received {
    messages: Vec<(u64, String)>,
    /// Gaps the server announced (`truncated`, `reset`).
    signals: Vec<String>,
    reconnects: usize,
}

/// The nodes' current addresses (a restarted node listens on a new port).
type Nodes = Arc<RwLock<Vec<String>>>;

fn node_args(seeds: &str) -> Vec<String> {
    [
        "--redis",
        seeds,
        "--redis-min-replicas",
        "1",
        "--redis-replica-timeout",
        "500ms",
        "--heartbeat",
        "1s",
        // The whole run stays in history, so the end can check it all.
        "--history-size",
        "100000",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn start_node(seeds: &str) -> ServerProcess {
    let args = node_args(seeds);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // PUSHHUB_FAULT_LOG=pushhub=debug shows each node's Redis pushes when a run fails.
    let log = std::env::var("PUSHHUB_FAULT_LOG").unwrap_or_else(|_| "pushhub=info".into());
    spawn_binary(&args, &[("PUSHHUB_LOG", &log)])
}

/// A message envelope's (id, payload), or a signal's type, from one JSON value.
enum Item {
    Message(u64, String),
    Signal(String),
    Other,
}

fn item(value: &Value) -> Item {
    if let Some(kind) = value["type"].as_str() {
        return match kind {
            "truncated" | "reset" => Item::Signal(format!("{kind}: {value}")),
            _ => Item::Other,
        };
    }
    match (value["id"].as_u64(), value.get("data")) {
        (Some(id), Some(data)) => Item::Message(id, data.to_string()),
        _ => Item::Other,
    }
}

/// One subscriber: follows `topic` on node `home` (and on the next ones when that fails)
/// with `transport`, from the start, until `stop`.
async fn subscribe(
    nodes: Nodes,
    home: usize,
    topic: String,
    transport: &'static str,
    received: Arc<Mutex<Received>>,
    stop: Instant,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut attempt = home;
    while Instant::now() < stop {
        let node = nodes.read().unwrap()[attempt % NODES].clone();
        let after = received.lock().unwrap().messages.last().map_or(0, |m| m.0);
        let record = |value: &Value| {
            let mut received = received.lock().unwrap();
            match item(value) {
                Item::Message(id, data) => received.messages.push((id, data)),
                Item::Signal(signal) => received.signals.push(signal),
                Item::Other => {}
            }
        };
        let outcome: Result<(), ()> = match transport {
            "longpoll" => {
                let url = format!("http://{node}/topics/{topic}/longpoll?after={after}&timeout=2");
                match http.get(url).send().await {
                    Ok(response) if response.status() == 200 => {
                        let body: Value = response.json().await.unwrap_or(Value::Null);
                        if body["truncated"] == true || body["reset"] == true {
                            received.lock().unwrap().signals.push(body.to_string());
                        }
                        for message in body["messages"].as_array().into_iter().flatten() {
                            record(message);
                        }
                        continue;
                    }
                    _ => Err(()),
                }
            }
            "ws" => {
                let url = format!("ws://{node}/topics/{topic}/ws?after={after}");
                match tokio_tungstenite::connect_async(url).await {
                    Ok((mut ws, _)) => {
                        while let Ok(Some(Ok(frame))) =
                            tokio::time::timeout_at(stop, ws.next()).await
                        {
                            if let Ok(text) = frame.to_text()
                                && let Ok(value) = serde_json::from_str::<Value>(text)
                            {
                                record(&value);
                            }
                        }
                        Err(())
                    }
                    Err(_) => Err(()),
                }
            }
            // SSE and NDJSON: a body of lines; SSE's envelopes are on `data:` lines.
            _ => {
                let url = format!("http://{node}/topics/{topic}/{transport}?after={after}");
                let streaming = reqwest::Client::new().get(url).send().await;
                match streaming {
                    Ok(response) if response.status() == 200 => {
                        let mut body = response.bytes_stream();
                        let mut buffer = Vec::new();
                        while let Ok(Some(Ok(chunk))) =
                            tokio::time::timeout_at(stop, body.next()).await
                        {
                            buffer.extend_from_slice(&chunk);
                            while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                                let line: Vec<u8> = buffer.drain(..=end).collect();
                                let line = String::from_utf8_lossy(&line[..end]).into_owned();
                                let json = if transport == "sse" {
                                    line.strip_prefix("data:").map(str::trim)
                                } else {
                                    Some(line.as_str())
                                };
                                if let Some(value) =
                                    json.and_then(|j| serde_json::from_str::<Value>(j).ok())
                                {
                                    record(&value);
                                }
                            }
                        }
                        Err(())
                    }
                    _ => Err(()),
                }
            }
        };
        if outcome.is_err() && Instant::now() < stop {
            // The node went away, or refused: try the next one after a pause.
            received.lock().unwrap().reconnects += 1;
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What the publishers did: per topic, acknowledged id → payload; and every payload refused.
#[derive(Default)]
struct Published {
    acked: BTreeMap<String, BTreeMap<u64, String>>,
    refused: Vec<String>,
}

async fn publish(
    nodes: Nodes,
    publisher: usize,
    topics: Vec<String>,
    published: Arc<Mutex<Published>>,
    seed: u64,
    stop: Instant,
) {
    let mut rng = fastrand::Rng::with_seed(seed ^ ((publisher as u64 + 1) * 0x9e37_79b9));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut n = 0u64;
    while Instant::now() < stop {
        let topic = &topics[rng.usize(..topics.len())];
        let node = nodes.read().unwrap()[(publisher + n as usize) % NODES].clone();
        let data = json!({ "p": publisher, "n": n });
        let payload = data.to_string();
        n += 1;
        let sent = http
            .post(format!("http://{node}/topics/{topic}"))
            .json(&data)
            .send()
            .await;
        let acked = match sent {
            Ok(response) if response.status() == 201 => response
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["id"].as_u64()),
            Ok(response) => {
                assert!(
                    response.status() == 503,
                    "publish answered {}",
                    response.status()
                );
                assert!(response.headers().contains_key("retry-after"));
                None
            }
            Err(_) => None,
        };
        {
            let mut published = published.lock().unwrap();
            match acked {
                Some(id) => {
                    let previous = published
                        .acked
                        .entry(topic.clone())
                        .or_default()
                        .insert(id, payload.clone());
                    assert!(
                        previous.is_none(),
                        "{topic} id {id} acknowledged twice: {previous:?} and {payload}"
                    );
                }
                None => published.refused.push(payload),
            }
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// The local addresses of `pid`'s TCP connections to any of `ports`.
fn connections_of(pid: u32, ports: &[u16]) -> Vec<String> {
    let out = Command::new("ss")
        .args(["-tnpH", "state", "established"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(&format!("pid={pid},")))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, peer) = (fields.get(2)?, fields.get(3)?);
            let port: u16 = peer.rsplit(':').next()?.parse().ok()?;
            ports.contains(&port).then(|| local.to_string())
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL a pushhub node; it restarts (on a new port) 3 s later.
    KillNode(usize),
    /// SIGKILL a shard's primary; once its replica is promoted, it restarts (as a replica).
    KillPrimary(usize),
    /// As `KillPrimary`, but the replica is frozen and its link cut for 1 s first, so the
    /// primary dies holding writes no replica has: the failover a `201` before `WAIT` loses.
    KillLaggingPrimary(usize),
    /// Close a node's Redis connections from the Redis side (`CLIENT KILL`).
    CutRedis(usize),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_is_lost_through_kills_failovers_and_cuts() {
    let seed = std::env::var("PUSHHUB_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("fault checker: seed {seed} (PUSHHUB_FAULT_SEED={seed} reproduces the schedule)");
    let Some(mut cluster) = RedisCluster::start(3) else {
        return;
    };
    let seeds = cluster.seeds();
    let mut processes: Vec<ServerProcess> = (0..NODES).map(|_| start_node(&seeds)).collect();
    let nodes: Nodes = Arc::new(RwLock::new(
        processes.iter().map(|p| p.addr.clone()).collect(),
    ));
    let topics: Vec<String> = (0..TOPICS).map(|i| format!("checked{i}")).collect();

    let start = Instant::now();
    let publishing_ends = start + FAULTS_FOR + Duration::from_secs(5);
    let subscribing_ends = publishing_ends + Duration::from_secs(15);
    let mut subscribers = Vec::new();
    let mut tasks = Vec::new();
    for (i, topic) in topics.iter().enumerate() {
        for (t, transport) in TRANSPORTS.iter().enumerate() {
            let received = Arc::new(Mutex::new(Received::default()));
            subscribers.push((topic.clone(), *transport, received.clone()));
            tasks.push(tokio::spawn(subscribe(
                nodes.clone(),
                (i + t) % NODES,
                topic.clone(),
                transport,
                received,
                subscribing_ends,
            )));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let published = Arc::new(Mutex::new(Published::default()));
    let publishers: Vec<_> = (0..NODES)
        .map(|p| {
            tokio::spawn(publish(
                nodes.clone(),
                p,
                topics.clone(),
                published.clone(),
                seed,
                publishing_ends,
            ))
        })
        .collect();

    // The schedule: one fault every FAULT_EVERY, drawn from the seed.
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut faults = Vec::new();
    let mut at = start + FAULT_EVERY;
    while at < start + FAULTS_FOR {
        tokio::time::sleep_until(at).await;
        let fault = match rng.u8(..4) {
            0 => Fault::KillNode(rng.usize(..NODES)),
            1 => Fault::KillPrimary(rng.usize(..3)),
            2 => Fault::KillLaggingPrimary(rng.usize(..3)),
            _ => Fault::CutRedis(rng.usize(..NODES)),
        };
        eprintln!("[{:>5.1}s] {fault:?}", start.elapsed().as_secs_f64());
        match fault {
            Fault::KillNode(i) => {
                let _ = processes[i].child.kill();
                let _ = processes[i].child.wait();
                tokio::time::sleep(DOWN_FOR).await;
                processes[i] = start_node(&seeds);
                nodes.write().unwrap()[i] = processes[i].addr.clone();
            }
            Fault::KillPrimary(shard) | Fault::KillLaggingPrimary(shard) => {
                // The shard's current primary: the owner of a slot in its third of the range.
                let key = shard_key(&cluster, shard);
                let primary = cluster.primary_of(&key);
                if let Fault::KillLaggingPrimary(_) = fault {
                    // Freeze the replica, then cut its link from the primary's side: what the
                    // primary takes from now on reaches no replica (a frozen process would
                    // still find earlier data in its socket when it wakes).
                    let replica = cluster.replica_of(primary);
                    cluster.nodes[replica].pause();
                    let port = cluster.nodes[primary].port.to_string();
                    let _ = Command::new("redis-cli")
                        .args(["-p", &port, "client", "kill", "type", "replica"])
                        .output();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    cluster.nodes[primary].kill();
                    cluster.nodes[replica].resume();
                } else {
                    cluster.nodes[primary].kill();
                }
                let promoted = Instant::now() + Duration::from_secs(20);
                while cluster.primary_of(&key) == primary {
                    assert!(Instant::now() < promoted, "no replica was promoted");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tokio::time::sleep(DOWN_FOR).await;
                cluster.nodes[primary].restart();
                cluster.wait_healthy();
            }
            Fault::CutRedis(i) => {
                let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
                let cut = connections_of(processes[i].child.id(), &ports);
                for addr in &cut {
                    for port in &ports {
                        let _ = Command::new("redis-cli")
                            .args(["-p", &port.to_string(), "client", "kill", addr])
                            .output();
                    }
                }
                eprintln!("         cut {} connections", cut.len());
            }
        }
        faults.push(fault);
        at = Instant::now().max(at + FAULT_EVERY);
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let published = Arc::try_unwrap(published)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap();

    // The history, read at the end: every acknowledged message, as acknowledged.
    let reader = Endpoint::new(&nodes.read().unwrap()[0]);
    let mut history: HashMap<String, BTreeMap<u64, String>> = HashMap::new();
    for topic in &topics {
        let mut kept: BTreeMap<u64, String> = BTreeMap::new();
        loop {
            let after = kept.keys().last().copied().unwrap_or(0);
            let (status, body) = reader
                .get(&format!("/topics/{topic}/poll?after={after}&limit=1000"))
                .await;
            assert_eq!(status, 200, "history of {topic}: {body}");
            let page = body["messages"].as_array().unwrap();
            if page.is_empty() {
                break;
            }
            for m in page {
                kept.insert(m["id"].as_u64().unwrap(), m["data"].to_string());
            }
        }
        for (id, payload) in published.acked.get(topic).into_iter().flatten() {
            assert_eq!(
                kept.get(id),
                Some(payload),
                "history of {topic} lost acknowledged id {id}"
            );
        }
        let mut payloads: Vec<&String> = kept.values().collect();
        payloads.sort();
        payloads.dedup();
        assert_eq!(
            payloads.len(),
            kept.len(),
            "{topic}: a message stored twice"
        );
        history.insert(topic.clone(), kept);
    }

    // Every subscriber catches up to the end of the history.
    let caught_up = Instant::now() + Duration::from_secs(15);
    for (topic, transport, received) in &subscribers {
        let last = history[topic].keys().last().copied().unwrap_or(0);
        while received.lock().unwrap().messages.last().map_or(0, |m| m.0) < last {
            if Instant::now() >= caught_up {
                for (i, process) in processes.iter().enumerate() {
                    for line in process.log.lock().unwrap().iter() {
                        if line.contains("redis") {
                            eprintln!("node {i}: {line}");
                        }
                    }
                }
                let addresses = nodes.read().unwrap().clone();
                for node in &addresses {
                    let url = format!("http://{node}/topics/{topic}");
                    let stats = reqwest::get(url).await.ok().map(|r| r.text());
                    if let Some(stats) = stats {
                        eprintln!("{node}: {}", stats.await.unwrap_or_default());
                    }
                }
                let received = received.lock().unwrap();
                panic!(
                    "{transport} subscriber of {topic} stuck at {:?} before {last} ({} reconnects)",
                    received.messages.last(),
                    received.reconnects
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut deliveries = 0;
    let mut reconnects = 0;
    for (topic, transport, received) in &subscribers {
        let received = received.lock().unwrap();
        reconnects += received.reconnects;
        let who = format!("{transport} subscriber of {topic}");
        let kept = &history[topic];
        let mut previous = 0;
        for (id, payload) in &received.messages {
            assert!(*id > previous, "{who}: id {id} after {previous}");
            if *id != previous + 1 {
                assert!(
                    !received.signals.is_empty(),
                    "{who}: unreported gap {previous} -> {id}"
                );
            }
            assert_eq!(
                kept.get(id),
                Some(payload),
                "{who}: id {id} delivered as another message than the history's"
            );
            previous = *id;
        }
        let got: BTreeMap<u64, &String> = received.messages.iter().map(|(i, p)| (*i, p)).collect();
        for (id, payload) in published.acked.get(topic).into_iter().flatten() {
            assert_eq!(
                got.get(id),
                Some(&payload),
                "{who} lost acknowledged id {id}"
            );
        }
        deliveries += received.messages.len();
    }
    for task in tasks {
        task.abort();
    }
    let acked: usize = published.acked.values().map(BTreeMap::len).sum();
    let logged = |what: &str| -> usize {
        processes
            .iter()
            .map(|p| {
                p.log
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|l| l.contains(what))
                    .count()
            })
            .sum()
    };
    eprintln!(
        "fault checker: nodes logged {} subscriber disconnections, {} silent subscriptions \
         found and subscribed again",
        logged("subscriber disconnected"),
        logged("subscription silent")
    );
    eprintln!(
        "fault checker: seed {seed}; faults {} ({faults:?}); publishes acknowledged {acked}, \
         refused {}; deliveries checked {deliveries} over {} subscribers ({reconnects} \
         reconnects); lost: 0",
        faults.len(),
        published.refused.len(),
        subscribers.len()
    );
    assert!(acked > 500, "the load ran: {acked} acknowledged");
}

/// A key in the slot range of shard `shard` as `redis-cli --cluster create` assigns ranges
/// (three equal thirds); the shard's primary is whoever owns that slot now.
fn shard_key(cluster: &RedisCluster, shard: usize) -> String {
    (0..)
        .map(|i| format!("pushhub:{{probe{i}}}:seq"))
        .find(|key| {
            let slot = cluster.slot_of(key);
            usize::from(slot) * 3 / 16384 == shard
        })
        .unwrap()
}
