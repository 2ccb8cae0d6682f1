//! Who is subscribed to a topic, per transport.
//!
//! Streaming subscribers (SSE, WebSocket, the NDJSON stream, Durable Streams SSE reads) are
//! counted while connected. Pollers have no
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

use super::roster::{Pass, Rolls, Roster};
use crate::message::{PerTransport, TopicName, TransportKind};

/// Subscriber counts of one topic, per transport: distinct short pollers seen within the
/// poller window; distinct long pollers seen within the window, or parked now if more (also
/// for Durable Streams long polls); open SSE, NDJSON and Durable Streams SSE streams;
/// WebSocket subscriptions (a multiplexed connection counts once per topic).
pub type Subscribers = PerTransport<usize>;

/// A poller map holds at most this many clients per topic and transport, so a client that
/// invents ids cannot grow it without bound; past it, new pollers are not counted.
const MAX_TRACKED_POLLERS: usize = 10_000;

#[derive(Default)]
pub(crate) struct Presence {
    poll: PollerSet,
    longpoll: PollerSet,
    sse: Arc<AtomicUsize>,
    ws: Arc<AtomicUsize>,
    stream: Arc<AtomicUsize>,
    parked: Arc<AtomicUsize>,
    /// Durable Streams readers: SSE reads and long polls, counted while they wait.
    ds_sse: Arc<AtomicUsize>,
    ds_parked: Arc<AtomicUsize>,
    ds_longpoll: PollerSet,
    /// Named members and presence watchers, once the topic has one.
    roster: std::sync::OnceLock<Arc<Roster>>,
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
///
/// A named subscriber's gauge also holds its [`Pass`] (its place in the topic's roster, left
/// when the gauge is dropped), and a named long poller's the hold that keeps it present while
/// parked. It is boxed, so that every other subscription's gauge stays two words (a
/// connection holds one per topic it follows).
#[derive(Debug)]
pub(crate) struct Gauge(Held);

#[derive(Debug)]
enum Held {
    Nothing,
    Counter(Arc<AtomicUsize>, TransportKind),
    Ticketed(Box<(Arc<AtomicUsize>, TransportKind, Pass)>),
}

impl Gauge {
    fn hold(counter: &Arc<AtomicUsize>, transport: TransportKind) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::stream(transport, true);
        Self(Held::Counter(counter.clone(), transport))
    }

    /// The gauge, holding `pass` too.
    pub(crate) fn with_pass(mut self, pass: Option<Pass>) -> Self {
        if let Some(ticket) = pass {
            self.0 = match std::mem::replace(&mut self.0, Held::Nothing) {
                Held::Counter(counter, transport) => {
                    Held::Ticketed(Box::new((counter, transport, ticket)))
                }
                // Not counted: the ticket alone is held (and left on drop).
                Held::Nothing => {
                    drop(ticket);
                    Held::Nothing
                }
                ticketed @ Held::Ticketed(_) => ticketed,
            };
        }
        self
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        let (counter, transport) = match &self.0 {
            Held::Nothing => return,
            Held::Counter(counter, transport) => (counter, *transport),
            Held::Ticketed(held) => (&held.0, held.1),
        };
        counter.fetch_sub(1, Ordering::Relaxed);
        crate::telemetry::stream(transport, false);
    }
}

impl Presence {
    /// The counter of streaming subscribers (or parked polls) on `transport`; `None` for a
    /// short poll held open (`Hub::outlet` takes any transport), which is not counted.
    fn counter(&self, transport: TransportKind) -> Option<&Arc<AtomicUsize>> {
        match transport {
            TransportKind::Sse => Some(&self.sse),
            TransportKind::Ws => Some(&self.ws),
            TransportKind::Stream => Some(&self.stream),
            TransportKind::Longpoll => Some(&self.parked),
            TransportKind::DsSse => Some(&self.ds_sse),
            TransportKind::DsLongpoll => Some(&self.ds_parked),
            TransportKind::Poll => None,
        }
    }

    /// Counts a streaming subscriber until the returned gauge is dropped.
    pub(crate) fn stream(&self, transport: TransportKind) -> Gauge {
        match self.counter(transport) {
            Some(counter) => Gauge::hold(counter, transport),
            None => Gauge(Held::Nothing),
        }
    }

    /// Counts one topic an outlet follows, until [`Presence::leave`]: an outlet's sub, which
    /// knows its topic and transport, uncounts itself when dropped. (Not a [`Gauge`]: that
    /// would cost every followed topic of every connection two words.)
    pub(crate) fn join(&self, transport: TransportKind) {
        if let Some(counter) = self.counter(transport) {
            counter.fetch_add(1, Ordering::Relaxed);
            crate::telemetry::stream(transport, true);
        }
    }

    /// Uncounts what [`Presence::join`] counted.
    pub(crate) fn leave(&self, transport: TransportKind) {
        if let Some(counter) = self.counter(transport) {
            counter.fetch_sub(1, Ordering::Relaxed);
            crate::telemetry::stream(transport, false);
        }
    }

    /// Records a poll request from `client`.
    pub(crate) fn touch(&self, transport: TransportKind, client: &str, window: Duration) {
        let now = Instant::now();
        match transport {
            TransportKind::Poll => self.poll.touch(client, now, window),
            TransportKind::Longpoll => self.longpoll.touch(client, now, window),
            TransportKind::DsLongpoll => self.ds_longpoll.touch(client, now, window),
            TransportKind::Sse
            | TransportKind::Ws
            | TransportKind::Stream
            | TransportKind::DsSse => {}
        }
    }

    pub(crate) fn counts(&self, window: Duration) -> Subscribers {
        let now = Instant::now();
        // Named pollers are kept by the roster alone (see `Hub::park`).
        let named = |transport| {
            self.roster
                .get()
                .map_or(0, |roster| roster.pollers(transport, window))
        };
        PerTransport::from_fn(|transport| match transport {
            TransportKind::Poll => self.poll.count(now, window) + named(transport),
            TransportKind::Longpoll => (self.longpoll.count(now, window) + named(transport))
                .max(self.parked.load(Ordering::Relaxed)),
            TransportKind::Sse => self.sse.load(Ordering::Relaxed),
            TransportKind::Ws => self.ws.load(Ordering::Relaxed),
            TransportKind::Stream => self.stream.load(Ordering::Relaxed),
            TransportKind::DsSse => self.ds_sse.load(Ordering::Relaxed),
            TransportKind::DsLongpoll => self
                .ds_longpoll
                .count(now, window)
                .max(self.ds_parked.load(Ordering::Relaxed)),
        })
    }

    /// The topic's roster, made on first use.
    pub(crate) fn roster(&self, rolls: &Arc<Rolls>, topic: &TopicName) -> &Arc<Roster> {
        self.roster.get_or_init(|| rolls.roster(topic))
    }

    /// The topic's roster, if it has one.
    pub(crate) fn roster_if_any(&self) -> Option<&Arc<Roster>> {
        self.roster.get()
    }

    /// No subscriber of any kind: the topic may be dropped once its history is gone.
    pub(crate) fn is_idle(&self, window: Duration) -> bool {
        if self.roster.get().is_some_and(|roster| !roster.is_idle()) {
            return false;
        }
        let now = Instant::now();
        self.poll.prune(now, window);
        self.longpoll.prune(now, window);
        self.ds_longpoll.prune(now, window);
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
        presence.touch(TransportKind::Poll, "a", window);
        presence.touch(TransportKind::Poll, "a", window);
        presence.touch(TransportKind::Poll, "b", window);
        let gauge = presence.stream(TransportKind::Sse);
        let counts = presence.counts(window);
        assert_eq!(
            (counts[TransportKind::Poll], counts[TransportKind::Sse]),
            (2, 1)
        );
        assert!(!presence.is_idle(window));
        drop(gauge);
        assert_eq!(presence.counts(window)[TransportKind::Sse], 0);
        // With a zero window every poller seen so far has expired.
        assert!(presence.is_idle(Duration::ZERO));
        // A short poll "held open" (any transport may be given to `Hub::outlet`) counts
        // nothing, and does not panic.
        let held_poll = presence.stream(TransportKind::Poll);
        assert!(presence.is_idle(Duration::ZERO));
        drop(held_poll);
    }

    #[test]
    fn a_gauge_stays_two_words() {
        // One per topic a connection follows: presence's ticket must not grow it.
        assert_eq!(std::mem::size_of::<Gauge>(), 16);
    }
}
