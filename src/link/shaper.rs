//! When each segment of one direction of a link arrives: after it has been serialised at the
//! link's bandwidth (behind the segments before it) and has crossed the one-way delay, with
//! jitter, and never before the segment sent ahead of it (a TCP stream keeps its order, so
//! jitter delays what follows a late segment: head-of-line blocking, as on a real link).

use std::time::{Duration, Instant};

use super::Profile;

/// The most a segment carries: an Ethernet TCP segment's payload. Larger writes are split, so
/// a slow link delivers them progressively, as a real one does.
pub(super) const SEGMENT: usize = 1448;

/// The schedule of one direction of one connection.
#[derive(Debug)]
pub(super) struct Shaper {
    delay: Duration,
    jitter: Duration,
    profile: Profile,
    /// When the link finishes sending what it was given so far.
    link_free: Instant,
    /// When the last segment arrives.
    last_arrival: Instant,
    rng: fastrand::Rng,
}

impl Shaper {
    /// A direction whose first byte can leave at `ready` (a connection's first request waits
    /// for the handshake's round trip).
    pub(super) fn new(profile: &Profile, ready: Instant, seed: u64) -> Shaper {
        Shaper {
            delay: profile.delay,
            jitter: profile.jitter,
            profile: profile.clone(),
            link_free: ready,
            last_arrival: ready,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// When a segment of `bytes` handed to the link at `now` arrives at the other end.
    pub(super) fn arrival(&mut self, now: Instant, bytes: usize) -> Instant {
        let start = now.max(self.link_free);
        self.link_free = start + self.profile.transmission(bytes);
        let arrival = (self.link_free + self.one_way()).max(self.last_arrival);
        self.last_arrival = arrival;
        arrival
    }

    /// The delay of one segment: `delay ± jitter`, uniformly, at least zero.
    fn one_way(&mut self) -> Duration {
        if self.jitter.is_zero() {
            return self.delay;
        }
        let jitter = self.jitter.as_secs_f64();
        let offset = (self.rng.f64() * 2.0 - 1.0) * jitter;
        Duration::from_secs_f64((self.delay.as_secs_f64() + offset).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_pay_delay_and_bandwidth_and_keep_their_order() {
        let three_g = Profile::named("3g").unwrap();
        let t0 = Instant::now();
        let mut shaper = Shaper::new(&three_g, t0, 7);
        // 200 bytes at 1.6 Mbit/s take 1 ms, then 100 ms ± 30 ms.
        let first = shaper.arrival(t0, 200) - t0;
        assert!(first >= Duration::from_millis(71) && first <= Duration::from_millis(131));
        // A burst of 100 full segments: serialised one after the other (1448 × 8 / 1.6e6 =
        // 7.24 ms each), never out of order.
        let mut last = Instant::now() - Duration::from_secs(1);
        let mut arrivals = Vec::new();
        for _ in 0..100 {
            let at = shaper.arrival(t0, SEGMENT);
            assert!(at >= last);
            last = at;
            arrivals.push(at);
        }
        let spread = *arrivals.last().unwrap() - t0;
        // 1 ms + 100 × 7.24 ms of serialisation, plus one delay within its jitter.
        assert!(
            spread >= Duration::from_millis(725 + 70) && spread <= Duration::from_millis(725 + 131),
            "{spread:?}"
        );
    }

    #[test]
    fn the_link_is_free_again_after_a_quiet_spell() {
        let lan = Profile::named("lan").unwrap();
        let t0 = Instant::now();
        let mut shaper = Shaper::new(&lan, t0, 1);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            shaper.arrival(later, 100_000) - later,
            Duration::from_micros(500)
        );
    }
}
