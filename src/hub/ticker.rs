//! The ticker: one timer task per fan-out shard, on the shard's worker, serving its
//! connections' timers. SSE and NDJSON heartbeats, WebSocket pings and their pong deadlines
//! walk the shard's registry of streaming connections, so an idle connection costs no timer.

use std::{sync::Weak, time::Duration};

use tokio::time::Instant;

use super::{format::Format, outlet::Outlet};

/// What the ticker walks: a shard's streaming connections, for as long as timers run.
pub(super) trait Streams: Send + Sync + 'static {
    /// Whether timers have stopped (the server is stopping).
    fn stopping(&self) -> bool;
    /// Calls `visit` with every live streaming connection of shard `index`.
    fn each_stream(&self, index: usize, visit: &mut dyn FnMut(&Outlet));
}

/// How often the ticker acts.
#[derive(Clone, Copy, Debug)]
pub(super) struct Intervals {
    /// SSE and NDJSON heartbeat interval.
    pub(super) heartbeat: Duration,
    /// WebSocket ping interval.
    pub(super) ping_interval: Duration,
    /// How long a WebSocket peer gets to answer a ping.
    pub(super) pong_timeout: Duration,
}

/// Heartbeats, pings and pong deadlines for every connection of shard `index`, from one
/// timer on the shard's worker: no timer per connection, and each worker writes the
/// heartbeats of its own connections.
pub(super) async fn tick_loop<S: Streams>(source: Weak<S>, index: usize, settings: Intervals) {
    let start = Instant::now();
    let mut next_heartbeat = start + settings.heartbeat;
    let mut next_ping = start + settings.ping_interval;
    let mut pong_checks: std::collections::VecDeque<(Instant, u32)> = Default::default();
    let mut round: u32 = 0;
    loop {
        let due = pong_checks
            .front()
            .map_or(next_heartbeat.min(next_ping), |(at, _)| {
                (*at).min(next_heartbeat).min(next_ping)
            });
        tokio::time::sleep_until(due).await;
        let Some(source) = source.upgrade() else {
            return;
        };
        if source.stopping() {
            return;
        }
        let now = Instant::now();
        if now >= next_heartbeat {
            source.each_stream(index, &mut |outlet| {
                if outlet.format() != Format::Ws {
                    outlet.heartbeat_if_idle();
                }
            });
            next_heartbeat = now + settings.heartbeat;
        }
        if now >= next_ping {
            round = round.wrapping_add(1).max(1);
            source.each_stream(index, &mut |outlet| {
                if outlet.format() == Format::Ws {
                    outlet.ping(round);
                }
            });
            pong_checks.push_back((now + settings.pong_timeout, round));
            next_ping = now + settings.ping_interval;
        }
        while let Some(&(at, checked)) = pong_checks.front() {
            if at > now {
                break;
            }
            pong_checks.pop_front();
            source.each_stream(index, &mut |outlet| {
                if outlet.format() == Format::Ws {
                    outlet.check_pong(checked);
                }
            });
        }
    }
}
