//! Micro-benchmarks of the hot path: publishing to a topic with 0..10,000 subscribers,
//! encoding a message, and reading history by cursor.
//!
//! `cargo bench --bench hub`. Subscribers here are held but not read, so the publish figures
//! are the publisher's own cost (append, encode once, queue to the live ring), which is what
//! must stay flat as subscribers grow; delivery to sockets is measured by `pushhub bench`.
#![allow(missing_docs)]

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pushhub::{
    hub::{Hub, HubSettings, Transport},
    message::{EventName, Message, Payload, TopicName},
    store::{MemoryStore, Retention, Store},
};

fn hub() -> Arc<Hub> {
    let store = MemoryStore::new(Retention {
        max_messages: 1000,
        max_age: None,
    });
    Hub::new(
        Arc::new(store),
        HubSettings {
            subscriber_queue: 256,
            catch_up_batch: 256,
            poller_window: Duration::from_secs(30),
            disconnect_slow: false,
        },
    )
}

fn publish(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("publish");
    group.throughput(Throughput::Elements(1));
    let payload = Payload::from_json(r#"{"text":"hello","n":12345}"#).unwrap();
    for subscribers in [0usize, 1, 100, 10_000] {
        let hub = hub();
        let topic = TopicName::parse("bench").unwrap();
        let held: Vec<_> = runtime.block_on(async {
            let mut held = Vec::new();
            for _ in 0..subscribers {
                held.push(hub.subscribe(&topic, None, Transport::Ws).await.unwrap());
            }
            held
        });
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| {
                b.to_async(&runtime).iter(|| async {
                    black_box(
                        hub.publish(&topic, EventName::default_event(), &payload)
                            .await
                            .unwrap(),
                    )
                });
            },
        );
        drop(held);
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
    let log = store.open(&TopicName::parse("bench").unwrap());
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

criterion_group!(benches, publish, encode, history);
criterion_main!(benches);
