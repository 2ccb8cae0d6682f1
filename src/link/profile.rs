//! Link profiles: one-way delay with jitter, a bandwidth cap, and (for `flaky`) connection
//! cuts and blackouts. The figures are the issue's: typical of each kind of access network,
//! not of any one operator.

use std::{fmt, time::Duration};

/// How a link delays, limits and cuts the bytes that cross it.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The profile's name, as `--link` takes it.
    pub name: &'static str,
    /// One-way delay (each direction pays it).
    pub delay: Duration,
    /// Each segment's delay is `delay ± jitter` (uniform), never less than zero; segments keep
    /// their order, as a TCP stream's bytes do.
    pub jitter: Duration,
    /// Bits per second in each direction; `None` for no cap.
    pub bandwidth_bps: Option<u64>,
    /// Connection cuts and blackouts, for links that drop.
    pub cuts: Option<Cuts>,
}

/// How a flaky link drops connections.
#[derive(Debug, Clone, PartialEq)]
pub struct Cuts {
    /// Every connection is cut after a uniformly random time in this range.
    pub after: (Duration, Duration),
    /// The share of cuts that reset the connection (RST) instead of closing it (FIN).
    pub reset_share: f64,
    /// A blackout starts every `blackout_every` (at the end of each period, so a run does
    /// not begin in one) ...
    pub blackout_every: Duration,
    /// ... and lasts this long; new connections are refused (reset at once) during it.
    pub blackout_for: Duration,
}

const MBIT: u64 = 1_000_000;

impl Profile {
    /// Every profile's name, in order of their delay.
    pub const NAMES: [&'static str; 6] = ["lan", "wifi", "4g", "3g", "satellite", "flaky"];

    /// The profile called `name`.
    pub fn named(name: &str) -> Option<Profile> {
        let ms = Duration::from_millis;
        let shaped = |name, delay, jitter, mbit: f64| Profile {
            name,
            delay,
            jitter,
            bandwidth_bps: Some((mbit * MBIT as f64) as u64),
            cuts: None,
        };
        Some(match name {
            "lan" => Profile {
                name: "lan",
                delay: Duration::from_micros(500),
                jitter: Duration::ZERO,
                bandwidth_bps: None,
                cuts: None,
            },
            "wifi" => shaped("wifi", ms(5), ms(2), 50.0),
            "4g" => shaped("4g", ms(25), ms(10), 20.0),
            "3g" => shaped("3g", ms(100), ms(30), 1.6),
            "satellite" => shaped("satellite", ms(300), ms(20), 10.0),
            "flaky" => Profile {
                cuts: Some(Cuts {
                    after: (ms(2000), ms(8000)),
                    reset_share: 0.2,
                    blackout_every: ms(30_000),
                    blackout_for: ms(3000),
                }),
                ..shaped("flaky", ms(5), ms(2), 50.0)
            },
            _ => return None,
        })
    }

    /// This profile with every time multiplied by `factor` (delays, jitter, cut times,
    /// blackouts); the bandwidth stays. Tests use it to see a flaky link's cuts and
    /// blackouts in a fraction of their real time.
    pub fn scaled(mut self, factor: f64) -> Profile {
        let scale = |d: Duration| d.mul_f64(factor);
        self.delay = scale(self.delay);
        self.jitter = scale(self.jitter);
        if let Some(cuts) = &mut self.cuts {
            cuts.after = (scale(cuts.after.0), scale(cuts.after.1));
            cuts.blackout_every = scale(cuts.blackout_every);
            cuts.blackout_for = scale(cuts.blackout_for);
        }
        self
    }

    /// The time `bytes` take to cross the link at its bandwidth.
    pub fn transmission(&self, bytes: usize) -> Duration {
        match self.bandwidth_bps {
            Some(bps) if bps > 0 => Duration::from_secs_f64(bytes as f64 * 8.0 / bps as f64),
            _ => Duration::ZERO,
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?}", self.name, self.delay)?;
        if !self.jitter.is_zero() {
            write!(f, " ± {:?}", self.jitter)?;
        }
        if let Some(bps) = self.bandwidth_bps {
            write!(f, ", {} Mbit/s", bps as f64 / MBIT as f64)?;
        }
        if self.cuts.is_some() {
            write!(f, ", cuts")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_a_profile_and_scaling_keeps_bandwidth() {
        for name in Profile::NAMES {
            assert_eq!(Profile::named(name).unwrap().name, name);
        }
        assert!(Profile::named("5g").is_none());
        let flaky = Profile::named("flaky").unwrap().scaled(0.1);
        assert_eq!(flaky.delay, Duration::from_micros(500));
        assert_eq!(
            flaky.cuts.unwrap().blackout_every,
            Duration::from_millis(3000)
        );
        assert_eq!(flaky.bandwidth_bps, Some(50 * MBIT));
        // 1.6 Mbit/s: 200 bytes take 1 ms.
        let three_g = Profile::named("3g").unwrap();
        assert_eq!(three_g.transmission(200), Duration::from_millis(1));
    }
}
