//! The bench's publisher: messages at a steady rate over a few keep-alive connections, each
//! carrying its publish time for the subscribers' latency, and the node it was published
//! through (the connections are spread over the nodes), so that a subscriber tells a
//! delivery that crossed nodes from one that did not.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinSet;

use super::{BenchArgs, accounting::now_micros, http};
use crate::message::TransportKind;

/// Publishes in flight at once.
const PUBLISH_CONCURRENCY: usize = 16;

/// Publishes `rate × duration` messages at a steady pace, over `PUBLISH_CONCURRENCY`
/// keep-alive connections spread over the nodes at `bases` (each publish takes whichever
/// connection is free, so publishes go through every node); returns the highest id per topic, how many were acknowledged,
/// and how many failed.
/// For a Durable Streams transport the messages are appends (`POST /v1/stream/{t}`) and a
/// topic's last id is how many of them were acknowledged (the topics are fresh).
pub(super) async fn publish(
    args: &BenchArgs,
    rate: f64,
    bases: &[String],
    topics: &[String],
    transport: TransportKind,
) -> (Vec<u64>, u64, u64) {
    let count = (rate * args.duration.as_secs_f64()).round().max(1.0) as u64;
    let padding = "x".repeat(args.payload_bytes.saturating_sub(36));
    // Idle connections wait here; a publish takes one and gives it back.
    let (give_back, pool) = tokio::sync::mpsc::unbounded_channel();
    for k in 0..PUBLISH_CONCURRENCY.max(bases.len()) {
        let node = k % bases.len();
        let _ = give_back.send((node, http::Connection::new(&bases[node])));
    }
    let pool = Arc::new(tokio::sync::Mutex::new(pool));
    let mut posts = JoinSet::new();
    let start = tokio::time::Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let Some((node, mut connection)) = pool.lock().await.recv().await else {
            break;
        };
        let slot = i as usize % topics.len();
        let path = if transport.is_durable() {
            format!("/v1/stream/{}", topics[slot])
        } else {
            format!("/topics/{}", topics[slot])
        };
        let body = format!(r#"{{"t":{},"n":{node},"p":"{padding}"}}"#, now_micros());
        let give_back = give_back.clone();
        posts.spawn(async move {
            let answer = connection.post_json(&path, body.as_bytes()).await;
            let _ = give_back.send((node, connection));
            let answer = answer.ok()?;
            if !(200..300).contains(&answer.status) {
                return None;
            }
            if answer.status == 204 {
                // A Durable Streams append: acknowledged, counted below.
                return Some((slot, None));
            }
            let id =
                serde_json::from_slice::<serde_json::Value>(&answer.body).ok()?["id"].as_u64()?;
            Some((slot, Some(id)))
        });
    }
    let (mut last_ids, mut ok, mut failed) = (vec![0; topics.len()], 0, 0);
    while let Some(joined) = posts.join_next().await {
        match joined.ok().flatten() {
            Some((slot, id)) => {
                ok += 1;
                last_ids[slot] = match id {
                    Some(id) => last_ids[slot].max(id),
                    None => last_ids[slot] + 1,
                };
            }
            None => failed += 1,
        }
    }
    (last_ids, ok, failed)
}
