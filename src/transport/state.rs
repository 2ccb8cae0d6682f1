//! [`TransportState`]: what every transport needs of the server, and nothing more. The app
//! builds it (and hands it to axum handlers through `FromRef`); the gate hands it to a
//! transport with each call. A transport never sees the command line or the gate.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{durable, settings::TransportSettings};
use crate::{
    access::{Auth, OriginPolicy, RateLimiter},
    error::Error,
    hub::Hub,
    message, store,
};

/// What the transports share: one `Arc`, so that cloning it into each request, connection
/// and session is one reference count, and holding it costs a pointer.
#[derive(Clone)]
pub struct TransportState(Arc<Transports>);

impl std::ops::Deref for TransportState {
    type Target = Transports;

    fn deref(&self) -> &Transports {
        &self.0
    }
}

/// The state behind a [`TransportState`].
pub struct Transports {
    /// The hub.
    pub hub: Arc<Hub>,
    /// What the transports take from the configuration.
    pub settings: TransportSettings,
    /// Fired when the server stops: every long-lived response (long poll, SSE, WebSocket)
    /// selects on it and ends.
    pub shutdown: CancellationToken,
    /// Who may publish and subscribe where (the axum handlers' [`crate::access::Access`]).
    pub auth: Arc<Auth>,
    /// Which browser origins may open WebSockets (the axum handlers' check).
    pub origins: Arc<OriginPolicy>,
    /// Publishes per second per client.
    pub publish_limiter: Arc<RateLimiter>,
    /// Places for parked long polls.
    pub parked_longpolls: Arc<tokio::sync::Semaphore>,
    /// The Durable Streams this process has touched: their write locks, last accesses and
    /// wake-ups.
    pub streams: Arc<durable::Streams>,
    /// Held (shared) by each publish while it appends; taken exclusively by a stream that is
    /// stopping, so that it drains only once every acknowledged publish is appended.
    publishing: tokio::sync::RwLock<()>,
}

/// What a [`TransportState`] is built from.
#[derive(Debug)]
pub struct TransportParts {
    /// The hub.
    pub hub: Arc<Hub>,
    /// The transports' settings.
    pub settings: TransportSettings,
    /// The stop signal.
    pub shutdown: CancellationToken,
    /// The token policy.
    pub auth: Arc<Auth>,
    /// The origin policy.
    pub origins: Arc<OriginPolicy>,
    /// The publish rate limiter.
    pub publish_limiter: Arc<RateLimiter>,
    /// How many long polls may be parked at once.
    pub max_parked_longpolls: usize,
}

impl TransportState {
    /// The transports' state from its parts.
    pub fn new(parts: TransportParts) -> Self {
        Self(Arc::new(Transports {
            hub: parts.hub,
            settings: parts.settings,
            shutdown: parts.shutdown,
            auth: parts.auth,
            origins: parts.origins,
            publish_limiter: parts.publish_limiter,
            parked_longpolls: Arc::new(tokio::sync::Semaphore::new(parts.max_parked_longpolls)),
            streams: Arc::default(),
            publishing: tokio::sync::RwLock::new(()),
        }))
    }
}

impl Transports {
    /// Counts a poll or long-poll answer of `messages` in `bytes` (and the lag of its first
    /// message, for long polls, which wait for it).
    pub fn count_answer(
        &self,
        transport: message::TransportKind,
        messages: &[Arc<message::Message>],
        bytes: usize,
    ) {
        self.hub.record_request(transport);
        if let (message::TransportKind::Longpoll, Some(first)) = (transport, messages.first()) {
            crate::telemetry::delivery_lag(transport, first.time);
        }
        self.hub
            .record_delivery(transport, messages.len() as u64, bytes as u64);
    }

    /// Publishes, unless the server is stopping (503 `shutting_down`): a publish is either
    /// refused or appended before any stream drains for the stop, so an acknowledged message
    /// reaches every subscriber still connected.
    pub async fn publish(
        &self,
        topic: &message::TopicName,
        event: message::EventName,
        payload: &message::Payload,
    ) -> Result<Arc<message::Message>, Error> {
        let _appending = self.publishing.read().await;
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        Ok(self.hub.publish(topic, event, payload).await?)
    }

    /// Applies a stream write (a Durable Streams append, create, close or delete) under the
    /// same rule as a publish: refused once the server is stopping, and drained before the
    /// streams are.
    pub async fn write_stream(
        &self,
        topic: &message::TopicName,
        write: store::StreamWrite,
    ) -> Result<store::StreamWritten, Error> {
        let _appending = self.publishing.read().await;
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        Ok(self.hub.write_stream(topic, write).await?)
    }

    /// Waits until every publish admitted before the stop has been appended.
    pub async fn publishes_settled(&self) {
        drop(self.publishing.write().await);
    }
}

impl std::fmt::Debug for TransportState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportState")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Transports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transports")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
