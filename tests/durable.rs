//! `--data-dir`: acknowledged publishes survive `kill -9`, graceful stops and restarts, ids
//! never repeat or go back, and clients resume with cursors they got before the crash.

#![allow(missing_docs)]

mod support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use support::{ServerProcess, spawn_binary};

const TOPIC: &str = "crash";

fn start(dir: &str, fsync: &str) -> ServerProcess {
    spawn_binary(
        &[
            "--data-dir",
            dir,
            "--fsync",
            fsync,
            "--history-size",
            "1000000",
            "--history-max-age",
            "off",
        ],
        &[],
    )
}

/// Every retained message of `TOPIC`, as id → data, read by short polls from cursor 0.
async fn read_all(http: &reqwest::Client, base: &str) -> BTreeMap<u64, Value> {
    let mut stored = BTreeMap::new();
    let mut after = 0;
    loop {
        let url = format!("{base}/topics/{TOPIC}/poll?after={after}&limit=1000");
        let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
        let messages = body["messages"].as_array().unwrap();
        if messages.is_empty() {
            return stored;
        }
        for message in messages {
            after = message["id"].as_u64().unwrap();
            stored.insert(after, message["data"].clone());
        }
    }
}

/// Publishes from `writers` concurrent clients until the server goes away; returns what was
/// acknowledged with 201, as id → data.
async fn publish_until_gone(base: &str, round: usize, writers: usize) -> Vec<(u64, Value)> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let (base, acked) = (base.to_owned(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for seq in 0.. {
                let data = json!({"round": round, "writer": writer, "seq": seq});
                let sent = http
                    .post(format!("{base}/topics/{TOPIC}"))
                    .json(&data)
                    .send()
                    .await;
                let Ok(response) = sent else { return };
                if response.status() != 201 {
                    return;
                }
                let Ok(body) = response.json::<Value>().await else {
                    return;
                };
                acked
                    .lock()
                    .unwrap()
                    .push((body["id"].as_u64().unwrap(), data));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    std::mem::take(&mut *acked.lock().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_publishes_survive_repeated_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_str().unwrap().to_owned();
    let http = reqwest::Client::new();
    let mut acked: BTreeMap<u64, Value> = BTreeMap::new();
    let mut cursors = Vec::new();
    // Six crashes, then one graceful stop (SIGTERM) racing the same publish stream.
    for round in 0..7 {
        let fsync = if round % 2 == 0 { "batch" } else { "always" };
        let mut server = start(&dir, fsync);
        let base = format!("http://{}", server.addr);
        // Right after each crash: every acknowledged message is there, with its data.
        let stored = read_all(&http, &base).await;
        for (id, data) in &acked {
            assert_eq!(stored.get(id), Some(data), "id {id} after restart {round}");
        }
        // A cursor taken before the last crash still resumes exactly after itself.
        if let Some(&cursor) = cursors.last() {
            let url = format!("{base}/topics/{TOPIC}/poll?after={cursor}&limit=1");
            let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            assert_eq!(
                body["messages"][0]["id"],
                cursor + 1,
                "resume from {cursor}"
            );
        }
        let publishers = tokio::spawn({
            let base = base.clone();
            async move { publish_until_gone(&base, round, 4).await }
        });
        // Kill at a different moment each round, mid-stream.
        tokio::time::sleep(Duration::from_millis(300 + 97 * round as u64)).await;
        if round < 6 {
            server.child.kill().unwrap();
        } else {
            let pid = server.child.id().to_string();
            let sent = std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status();
            assert!(sent.unwrap().success());
        }
        server.child.wait().unwrap();
        let this_round = publishers.await.unwrap();
        assert!(
            this_round.len() > 10,
            "round {round}: only {} acked",
            this_round.len()
        );
        let mut round_ids: Vec<u64> = this_round.iter().map(|(id, _)| *id).collect();
        round_ids.sort_unstable();
        // A cursor from the middle of the round: later acknowledged ids exist past it.
        cursors.push(round_ids[round_ids.len() / 2]);
        for (id, data) in this_round {
            assert!(
                acked.insert(id, data.clone()).is_none(),
                "id {id} acknowledged twice (round {round})"
            );
        }
    }

    let server = start(&dir, "batch");
    let base = format!("http://{}", server.addr);
    let stored = read_all(&http, &base).await;
    for (id, data) in &acked {
        assert_eq!(
            stored.get(id),
            Some(data),
            "acknowledged id {id} lost or changed"
        );
    }
    let last = *stored.keys().next_back().unwrap();
    assert_eq!(
        stored.keys().copied().collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "stored ids are contiguous from 1"
    );
    let next: Value = http
        .post(format!("{base}/topics/{TOPIC}"))
        .json(&json!("after"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        next["id"],
        last + 1,
        "the counter goes on after the last stored id"
    );
}
