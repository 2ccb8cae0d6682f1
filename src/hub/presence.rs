//! Who is subscribed to a topic, per transport.
//!
//! Streaming subscribers (SSE, WebSocket) are counted while connected. Pollers have no
//! connection to count, so a poller counts while its last request is younger than the
//! poller window; a parked long-poll counts until it is answered.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

/// The four ways a subscriber is fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Short polling.
    Poll,
    /// Long polling.
    Longpoll,
    /// Server-Sent Events.
    Sse,
    /// WebSocket.
    Ws,
}

impl Transport {
    /// Every transport, in the order of their indices.
    pub const ALL: [Transport; 4] = [
        Transport::Poll,
        Transport::Longpoll,
        Transport::Sse,
        Transport::Ws,
    ];
}

/// Subscriber counts of one topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Subscribers {
    /// Distinct short pollers seen within the poller window.
    pub poll: usize,
    /// Distinct long pollers seen within the window, or parked now if more.
    pub longpoll: usize,
    /// Open SSE streams.
    pub sse: usize,
    /// WebSocket subscriptions (a multiplexed connection counts once per topic).
    pub ws: usize,
}

/// A poller map holds at most this many clients per topic and transport, so a client that
/// invents ids cannot grow it without bound; past it, new pollers are not counted.
const MAX_TRACKED_POLLERS: usize = 10_000;

#[derive(Default)]
pub(crate) struct Presence {
    poll: PollerSet,
    longpoll: PollerSet,
    sse: Arc<AtomicUsize>,
    ws: Arc<AtomicUsize>,
    parked: Arc<AtomicUsize>,
}

#[derive(Default)]
struct PollerSet {
    seen: Mutex<HashMap<Box<str>, Instant, foldhash::fast::RandomState>>,
}

impl PollerSet {
    fn touch(&self, client: &str, now: Instant, window: Duration) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = seen.get_mut(client) {
            *at = now;
            return;
        }
        if seen.len() >= MAX_TRACKED_POLLERS {
            seen.retain(|_, at| now.duration_since(*at) < window);
        }
        if seen.len() < MAX_TRACKED_POLLERS {
            seen.insert(client.into(), now);
        }
    }

    /// Pollers seen within `window`; forgets nobody (that is the sweeper's [`Self::prune`]).
    fn count(&self, now: Instant, window: Duration) -> usize {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.values()
            .filter(|at| now.duration_since(**at) < window)
            .count()
    }

    /// Forgets pollers not seen within `window`.
    fn prune(&self, now: Instant, window: Duration) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, at| now.duration_since(*at) < window);
    }
}

/// Decrements a gauge when dropped, so a subscriber is uncounted however its task ends. A
/// gauge without a counter counts nothing (a short poll held open, which no endpoint does).
#[derive(Debug)]
pub(crate) struct Gauge(Option<Arc<AtomicUsize>>, Transport);

impl Gauge {
    fn hold(counter: &Arc<AtomicUsize>, transport: Transport) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::stream(transport, true);
        Self(Some(counter.clone()), transport)
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        if let Some(counter) = &self.0 {
            counter.fetch_sub(1, Ordering::Relaxed);
            crate::telemetry::stream(self.1, false);
        }
    }
}

impl Presence {
    /// Counts a streaming subscriber until the returned gauge is dropped.
    pub(crate) fn stream(&self, transport: Transport) -> Gauge {
        match transport {
            Transport::Sse => Gauge::hold(&self.sse, transport),
            Transport::Ws => Gauge::hold(&self.ws, transport),
            Transport::Longpoll => Gauge::hold(&self.parked, transport),
            // `Hub::outlet` takes any transport; a short poll held open is not counted.
            Transport::Poll => Gauge(None, transport),
        }
    }

    /// Records a poll request from `client`.
    pub(crate) fn touch(&self, transport: Transport, client: &str, window: Duration) {
        let now = Instant::now();
        match transport {
            Transport::Poll => self.poll.touch(client, now, window),
            Transport::Longpoll => self.longpoll.touch(client, now, window),
            Transport::Sse | Transport::Ws => {}
        }
    }

    pub(crate) fn counts(&self, window: Duration) -> Subscribers {
        let now = Instant::now();
        Subscribers {
            poll: self.poll.count(now, window),
            longpoll: self
                .longpoll
                .count(now, window)
                .max(self.parked.load(Ordering::Relaxed)),
            sse: self.sse.load(Ordering::Relaxed),
            ws: self.ws.load(Ordering::Relaxed),
        }
    }

    /// No subscriber of any kind: the topic may be dropped once its history is gone.
    pub(crate) fn is_idle(&self, window: Duration) -> bool {
        let now = Instant::now();
        self.poll.prune(now, window);
        self.longpoll.prune(now, window);
        self.counts(window) == Subscribers::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pollers_expire_after_the_window_and_streams_on_drop() {
        let presence = Presence::default();
        let window = Duration::from_secs(30);
        presence.touch(Transport::Poll, "a", window);
        presence.touch(Transport::Poll, "a", window);
        presence.touch(Transport::Poll, "b", window);
        let gauge = presence.stream(Transport::Sse);
        let counts = presence.counts(window);
        assert_eq!((counts.poll, counts.sse), (2, 1));
        assert!(!presence.is_idle(window));
        drop(gauge);
        assert_eq!(presence.counts(window).sse, 0);
        // With a zero window every poller seen so far has expired.
        assert!(presence.is_idle(Duration::ZERO));
        // A short poll "held open" (any transport may be given to `Hub::outlet`) counts
        // nothing, and does not panic.
        let held_poll = presence.stream(Transport::Poll);
        assert!(presence.is_idle(Duration::ZERO));
        drop(held_poll);
    }
}
