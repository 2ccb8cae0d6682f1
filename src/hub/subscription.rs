//! A subscriber that follows a topic from a cursor, for the streaming transports.

use std::{collections::VecDeque, sync::Arc};

use tokio::sync::broadcast::{self, error::RecvError};

use super::{Signal, Topic, presence::Gauge};
use crate::{
    error::Error,
    message::{Message, MessageId, TopicName},
};

/// One thing to send to a subscriber.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// The next message.
    Message(Arc<Message>),
    /// The cursor could not be honoured exactly; sent before the messages it concerns.
    Signal(Signal),
}

/// Follows a topic: first what history holds after the cursor, then the live stream.
///
/// Policy for a subscriber that falls behind: the live channel holds at most
/// `subscriber_queue` messages for it; once it falls further, the channel drops its
/// position (`Lagged`) and the subscription reads the missed messages from the log by cursor,
/// `catch_up_batch` at a time. Memory held for a slow subscriber is therefore bounded by
/// those two numbers, whatever the publish rate. If the log no longer retains its position,
/// it gets [`Signal::Truncated`] and goes on from the oldest retained message.
///
/// Ids are contiguous, so any id other than `cursor + 1` arriving live also triggers a
/// catch-up read: concurrent publishers may fan out slightly out of order, and this keeps
/// delivery in id order with no duplicates.
pub struct Subscription {
    topic: Arc<Topic>,
    live: broadcast::Receiver<Arc<Message>>,
    cursor: MessageId,
    backlog: VecDeque<Delivery>,
    catching_up: bool,
    /// The cursor is still the client's own, where 0 means "from the oldest retained".
    from_client: bool,
    catch_up_batch: usize,
    /// End instead of resyncing when the live channel drops this subscriber's position.
    disconnect_slow: bool,
    _gauge: Gauge,
}

impl Subscription {
    pub(super) fn new(
        topic: Arc<Topic>,
        live: broadcast::Receiver<Arc<Message>>,
        cursor: MessageId,
        from_client: bool,
        catch_up_batch: usize,
        disconnect_slow: bool,
        gauge: Gauge,
    ) -> Self {
        Self {
            topic,
            live,
            cursor,
            backlog: VecDeque::new(),
            catching_up: true,
            from_client,
            catch_up_batch,
            disconnect_slow,
            _gauge: gauge,
        }
    }

    /// The topic followed.
    pub fn topic(&self) -> &TopicName {
        &self.topic.name
    }

    /// The id of the last message delivered (or the starting cursor).
    pub fn cursor(&self) -> MessageId {
        self.cursor
    }

    /// The next delivery. `Ok(None)` means the topic is gone and nothing more will come.
    ///
    /// Cancel-safe: state changes only after each await completes, so it can sit in a
    /// `select!` beside heartbeats, shutdown and incoming frames.
    pub async fn next(&mut self) -> Result<Option<Delivery>, Error> {
        loop {
            if let Some(delivery) = self.backlog.pop_front() {
                if let Delivery::Message(message) = &delivery {
                    self.cursor = message.id;
                }
                return Ok(Some(delivery));
            }
            if self.catching_up {
                self.catch_up().await?;
                continue;
            }
            match self.live.recv().await {
                Ok(message) if message.id <= self.cursor => continue,
                Ok(message) if message.id == self.cursor + 1 => {
                    self.cursor = message.id;
                    return Ok(Some(Delivery::Message(message)));
                }
                Err(RecvError::Lagged(_)) if self.disconnect_slow => {
                    return Err(Error::SlowConsumer);
                }
                Err(RecvError::Lagged(_)) => {
                    crate::telemetry::slow_consumer("resync");
                    self.catching_up = true;
                }
                Ok(_) => self.catching_up = true,
                Err(RecvError::Closed) => return Ok(None),
            }
        }
    }

    async fn catch_up(&mut self) -> Result<(), Error> {
        let batch = self
            .topic
            .read_batch(self.cursor, self.catch_up_batch, self.from_client)
            .await?;
        self.from_client = false;
        if let Some(signal) = batch.signal {
            self.backlog.push_back(Delivery::Signal(signal));
        }
        if batch.messages.is_empty() {
            // Nothing retained after the cursor: resume from the newest id, so a truncation
            // or reset is signalled once, not again at the next catch-up.
            self.cursor = batch.last_id;
        }
        self.catching_up = batch.more;
        self.backlog
            .extend(batch.messages.into_iter().map(Delivery::Message));
        Ok(())
    }
}
