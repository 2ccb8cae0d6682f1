//! A topic's publishes that arrive together go to Redis as one script call ([`Appends`]):
//! the script's fixed cost (calling Lua, the seal check, the trim, one reply, and with
//! `--redis-min-replicas` one `WAIT`) is paid once per batch instead of once per message,
//! which is most of what a publish costs Redis. A publish that finds no batch running starts
//! one at once, so a lone publish waits for nobody; publishes arriving while a batch is in
//! Redis form the next one.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::super::StoreError;
use super::Shared;
use crate::message::{MessageId, TopicName};

/// At most this many messages per script call.
const MAX_MESSAGES: usize = 64;
/// At most about this many bytes of records per script call (one record may exceed it).
const MAX_BYTES: usize = 1 << 20;

/// One publish waiting for its batch.
struct Waiting {
    record: Vec<u8>,
    answer: oneshot::Sender<Result<MessageId, StoreError>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// A task is sending batches; it takes what queues until nothing does.
    running: bool,
}

/// The publishes of one topic on this node, sent to Redis in batches.
pub(super) struct Appends {
    topic: TopicName,
    shared: Arc<Shared>,
    queue: Mutex<Queue>,
}

impl Appends {
    pub(super) fn new(topic: TopicName, shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Self {
            topic,
            shared,
            queue: Mutex::new(Queue::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every critical section is a few moves; a panic cannot leave it inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `record` (with the messages queued beside it) and returns its id. The batch
    /// runs in a task of its own, so a publisher that goes away cannot strand the others.
    pub(super) async fn append(self: &Arc<Self>, record: Vec<u8>) -> Result<MessageId, StoreError> {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut queue = self.lock();
            queue.waiting.push(Waiting { record, answer });
            !std::mem::replace(&mut queue.running, true)
        };
        if start {
            tokio::spawn(self.clone().run());
        }
        answered
            .await
            .unwrap_or_else(|_| Err(StoreError::Internal("redis: publish abandoned".into())))
    }

    /// Sends batches until nothing is queued.
    async fn run(self: Arc<Self>) {
        loop {
            let batch = {
                let mut queue = self.lock();
                if queue.waiting.is_empty() {
                    queue.running = false;
                    return;
                }
                let mut bytes = 0;
                let take = queue
                    .waiting
                    .iter()
                    .take(MAX_MESSAGES)
                    .take_while(|w| {
                        let fits = bytes == 0 || bytes + w.record.len() <= MAX_BYTES;
                        bytes += w.record.len();
                        fits
                    })
                    .count();
                queue.waiting.drain(..take).collect::<Vec<_>>()
            };
            let records: Vec<&[u8]> = batch.iter().map(|w| w.record.as_slice()).collect();
            match self.shared.append_batch(&self.topic, &records).await {
                Ok(ids) => {
                    for (waiting, id) in batch.into_iter().zip(ids) {
                        let _ = waiting.answer.send(Ok(id));
                    }
                }
                Err(error) => {
                    for waiting in batch {
                        let _ = waiting.answer.send(Err(error.clone()));
                    }
                }
            }
        }
    }
}
