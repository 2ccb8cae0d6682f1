//! Micro-benchmarks of the hot path: publishing, the fan-out step (one message to N
//! subscribers), encoding a message, and reading history by cursor.
//!
//! `cargo bench --bench hub`. The fan-out group reports time per subscriber per message
//! (criterion's "thrpt" is subscribers delivered per second): `queued` subscribers have no
//! socket, so it is the fan-out's own work (walk the followers, lock each, hand over the
//! shared frame); `socket` subscribers are loopback TCP connections a reader thread drains,
//! so it adds the `write()` each delivery costs, as in a server.
#![allow(missing_docs)]

use std::{
    hint::black_box,
    io::Read,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pushhub::{
    hub::{Action, Hub, HubSettings, Native, OutletGuard},
    message::{EventName, Message, Payload, TopicName, TransportKind},
    store::{Live, MemoryStore, Retention, Store},
};

fn hub(queue: usize) -> Arc<Hub> {
    let store = MemoryStore::new(Retention {
        max_messages: 1000,
        max_age: None,
    });
    Hub::new(
        Arc::new(store),
        HubSettings {
            subscriber_queue: queue,
            ..HubSettings::default()
        },
    )
}

fn publish(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("publish");
    group.throughput(Throughput::Elements(1));
    let payload = Payload::from_json(r#"{"text":"hello","n":12345}"#).unwrap();
    // The publisher's own cost: append, encode once, queue once per fan-out shard. No
    // subscriber here, so no writer work is timed with it.
    let hub = hub(256);
    let topic = TopicName::parse("bench").unwrap();
    group.bench_function("no_subscribers", |b| {
        b.to_async(&runtime).iter(|| async {
            black_box(
                hub.publish(&topic, EventName::default_event(), &payload)
                    .await
                    .unwrap(),
            )
        });
    });
    group.finish();
}

/// Deliveries counted by the hub so far (WebSocket subscribers).
fn delivered(hub: &Hub) -> u64 {
    hub.deliveries(TransportKind::Ws)
}

/// `n` loopback TCP connections: the server ends, and a thread that drains the client ends.
fn socket_pairs(n: usize) -> (Vec<Arc<tokio::net::TcpStream>>, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..n {
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        server.set_nodelay(true).unwrap();
        client.set_nonblocking(true).unwrap();
        servers.push(server);
        clients.push(client);
    }
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut idle = 0;
        // Drains until the servers are gone (every read then ends with 0 or an error).
        while idle < 200 {
            let mut got = false;
            for client in &mut clients {
                if let Ok(n) = client.read(&mut buf) {
                    if n == 0 {
                        continue;
                    }
                    got = true;
                }
            }
            if got {
                idle = 0;
            } else {
                idle += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    });
    let servers = servers
        .into_iter()
        .map(|s| Arc::new(tokio::net::TcpStream::from_std(s).unwrap()))
        .collect();
    (servers, reader)
}

/// Does what a new subscriber's task does until it is live: its first catch-up read.
async fn settle(outlet: &OutletGuard) {
    use std::task::Poll;
    loop {
        let action = std::future::poll_fn(|cx| match outlet.poll_action(cx) {
            Poll::Ready(action) => Poll::Ready(Some(action)),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        match action {
            None => return,
            Some(Action::CatchUp(catch_up)) => outlet.catch_up(catch_up).await.unwrap(),
            Some(Action::Write(_)) => {}
            Some(Action::End(end)) => panic!("subscriber ended: {end:?}"),
        }
    }
}

fn fanout(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let payload = Payload::from_json(r#"{"t":1764000000000000,"p":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#).unwrap();
    let mut group = c.benchmark_group("fanout");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for with_sockets in [false, true] {
        for subscribers in [1usize, 100, 1000] {
            // A queue long enough that queued subscribers never fall behind within a sample.
            let hub = hub(1 << 20);
            let topic = TopicName::parse("bench").unwrap();
            let (sockets, reader) = if with_sockets {
                let _runtime = runtime.enter();
                let (sockets, reader) = socket_pairs(subscribers);
                (sockets.into_iter().map(Some).collect(), Some(reader))
            } else {
                (vec![None; subscribers], None)
            };
            let outlets: Vec<OutletGuard> = runtime.block_on(async {
                let mut outlets = Vec::new();
                for socket in sockets {
                    if let Some(socket) = &socket {
                        // Writable readiness known before the first delivery, as on a
                        // connection that has already sent its handshake.
                        socket.writable().await.unwrap();
                    }
                    let outlet = hub.outlet(socket, Native::Ws);
                    hub.subscribe(&topic, None, &outlet).await.unwrap();
                    settle(&outlet).await;
                    outlets.push(outlet);
                }
                outlets
            });
            let label = if with_sockets { "socket" } else { "queued" };
            group.throughput(Throughput::Elements(subscribers as u64));
            group.bench_with_input(
                BenchmarkId::new(label, subscribers),
                &subscribers,
                |b, &n| {
                    b.iter_custom(|iterations| {
                        runtime.block_on(async {
                            let mut spent = Duration::ZERO;
                            for _ in 0..iterations {
                                let target = delivered(&hub) + n as u64;
                                let start = Instant::now();
                                hub.publish(&topic, EventName::default_event(), &payload)
                                    .await
                                    .unwrap();
                                // The shard's writer runs on this runtime: yield until it has
                                // delivered the message to every subscriber.
                                while delivered(&hub) < target {
                                    tokio::task::yield_now().await;
                                }
                                spent += start.elapsed();
                                // Untimed: queued subscribers hand back what they were given.
                                for outlet in &outlets {
                                    while outlet.take_pending().is_some() {}
                                }
                            }
                            spent
                        })
                    });
                },
            );
            drop(outlets);
            drop(hub);
            if let Some(reader) = reader {
                let _ = reader.join();
            }
        }
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let topic = TopicName::parse("bench").unwrap();
    let mut group = c.benchmark_group("encode");
    for size in [100usize, 1000] {
        let body = format!(r#"{{"t":1764000000000000,"p":"{}"}}"#, "x".repeat(size));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("payload_from_json", size),
            &body,
            |b, body| {
                b.iter(|| black_box(Payload::from_json(body).unwrap()));
            },
        );
        let payload = Payload::from_json(&body).unwrap();
        // Both wire forms (envelope JSON for WS and polls, the SSE frame) are built here, once.
        group.bench_with_input(
            BenchmarkId::new("message_all_transports", size),
            &payload,
            |b, payload| {
                b.iter(|| {
                    black_box(Message::new(
                        42,
                        topic.clone(),
                        EventName::default_event(),
                        1_764_000_000_000,
                        payload,
                    ))
                });
            },
        );
    }
    group.finish();
}

fn history(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = MemoryStore::new(Retention {
        max_messages: 1000,
        max_age: None,
    });
    struct Nowhere;
    impl Live for Nowhere {
        fn deliver(&self, _: &Arc<Message>) {}
    }
    let log = store.open(&TopicName::parse("bench").unwrap(), Arc::new(Nowhere));
    let payload = Payload::from_text("x");
    runtime.block_on(async {
        for _ in 0..1000 {
            log.append(
                EventName::default_event(),
                &payload,
                pushhub::message::now_millis(),
            )
            .await
            .unwrap();
        }
    });
    let mut group = c.benchmark_group("history_read");
    for limit in [1usize, 100, 1000] {
        group.throughput(Throughput::Elements(limit as u64));
        group.bench_with_input(
            BenchmarkId::new("after_cursor", limit),
            &limit,
            |b, &limit| {
                b.to_async(&runtime).iter(|| async {
                    black_box(log.read(1000 - limit as u64, limit).await.unwrap())
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, publish, fanout, encode, history);
criterion_main!(benches);
