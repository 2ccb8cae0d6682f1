//! The link emulator: a TCP proxy hop that makes loopback look like a real access network, so
//! the push techniques can be compared where they differ (round trips, bandwidth, dropped
//! connections, hostile middleboxes).
//!
//! A [`Link`] is a [`Profile`] (one-way delay with jitter, a bandwidth cap, and for `flaky`
//! connection cuts and blackouts) plus [`Middleboxes`] (`buffering-proxy`, `no-websocket`,
//! `idle-cutter`), written `3g`, `3g+buffering-proxy`, `flaky+idle-cutter=5s`. A [`Proxy`]
//! listens on its own port and forwards every connection to the server through the link,
//! counting the bytes that cross it each way (request and response heads, framing and bodies:
//! what the network carries).
//!
//! The bench puts its subscribers behind one (`pushhub bench --link 3g --via
//! buffering-proxy`); the proxy runs in the bench's process, so its work is never charged to
//! the server measured.
//!
//! This layer imports nothing of the crate: it knows bytes and HTTP/1.1 framing, not topics.

mod framing;
mod lanes;
mod profile;
mod proxy;
mod shaper;

use std::{fmt, str::FromStr, time::Duration};

pub use lanes::Lanes;
pub use profile::{Cuts, Profile};
pub use proxy::{Counters, Proxy};

/// A proxy in the path that changes what crosses it, combinable with any profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Middleboxes {
    /// `buffering-proxy`: holds each response until this many bytes of it (head included)
    /// are buffered, or it ends; then again for the next bytes (nginx's `proxy_buffering on`
    /// with 8 KiB buffers). An upgraded connection is a tunnel and is not held.
    pub buffering: Option<usize>,
    /// `no-websocket`: answers any upgrade request `403` itself and closes the connection.
    pub no_websocket: bool,
    /// `idle-cutter`: closes any connection silent (no byte either way) for this long.
    pub idle_cut: Option<Duration>,
}

impl Middleboxes {
    /// Each middlebox's name, as `--via` takes it.
    pub const NAMES: [&'static str; 3] = ["buffering-proxy", "no-websocket", "idle-cutter"];
    /// What a `buffering-proxy` holds.
    pub const BUFFER_BYTES: usize = 8 * 1024;
    /// Silence an `idle-cutter` allows by default.
    pub const IDLE_CUT: Duration = Duration::from_secs(20);

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        *self == Middleboxes::default()
    }

    /// Adds the middlebox named `item` (`idle-cutter` may carry its silence:
    /// `idle-cutter=5s`).
    fn add(&mut self, item: &str) -> Result<(), String> {
        let (name, value) = match item.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (item, None),
        };
        match (name, value) {
            ("none", None) => {}
            ("buffering-proxy", None) => self.buffering = Some(Self::BUFFER_BYTES),
            ("no-websocket", None) => self.no_websocket = true,
            ("idle-cutter", None) => self.idle_cut = Some(Self::IDLE_CUT),
            ("idle-cutter", Some(silence)) => {
                let silence = humantime::parse_duration(silence)
                    .map_err(|e| format!("idle-cutter={silence}: {e}"))?;
                self.idle_cut = Some(silence);
            }
            _ => {
                return Err(format!(
                    "unknown middlebox `{item}` (known: none, {})",
                    Self::NAMES.join(", ")
                ));
            }
        }
        Ok(())
    }
}

impl FromStr for Middleboxes {
    type Err = String;

    /// `buffering-proxy`, `no-websocket+idle-cutter=5s`, `none`.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut boxes = Middleboxes::default();
        for item in text.split('+') {
            boxes.add(item.trim())?;
        }
        Ok(boxes)
    }
}

impl fmt::Display for Middleboxes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        if self.buffering.is_some() {
            names.push("buffering-proxy".to_owned());
        }
        if self.no_websocket {
            names.push("no-websocket".to_owned());
        }
        match self.idle_cut {
            Some(Self::IDLE_CUT) => names.push("idle-cutter".to_owned()),
            Some(silence) => names.push(format!(
                "idle-cutter={}",
                humantime::format_duration(silence)
            )),
            None => {}
        }
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join("+"))
        }
    }
}

/// A link: a profile and the middleboxes on the path.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    /// Delay, jitter, bandwidth, cuts.
    pub profile: Profile,
    /// Proxies in the path.
    pub middleboxes: Middleboxes,
}

impl Link {
    /// `profile` with no middlebox.
    pub fn new(profile: Profile) -> Link {
        Link {
            profile,
            middleboxes: Middleboxes::default(),
        }
    }
}

impl FromStr for Link {
    type Err = String;

    /// `3g`, `3g+buffering-proxy`, `flaky+no-websocket+idle-cutter=5s`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, rest) = match text.split_once('+') {
            Some((name, rest)) => (name, Some(rest)),
            None => (text, None),
        };
        let profile = Profile::named(name.trim()).ok_or_else(|| {
            format!(
                "unknown link profile `{name}` (known: {})",
                Profile::NAMES.join(", ")
            )
        })?;
        let middleboxes = rest.map(str::parse).transpose()?.unwrap_or_default();
        Ok(Link {
            profile,
            middleboxes,
        })
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.profile.name)?;
        if !self.middleboxes.is_empty() {
            write!(f, "+{}", self.middleboxes)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_parse_and_print_back() {
        for text in [
            "lan",
            "3g+buffering-proxy",
            "flaky+no-websocket+idle-cutter",
            "wifi+idle-cutter=5s",
        ] {
            let link: Link = text.parse().unwrap();
            assert_eq!(link.to_string(), text);
        }
        let link: Link = "4g+buffering-proxy+idle-cutter=2s".parse().unwrap();
        assert_eq!(link.profile.name, "4g");
        assert_eq!(link.middleboxes.buffering, Some(8192));
        assert_eq!(link.middleboxes.idle_cut, Some(Duration::from_secs(2)));
        assert!(
            "5g".parse::<Link>()
                .unwrap_err()
                .contains("unknown link profile")
        );
        assert!(
            "3g+firewall"
                .parse::<Link>()
                .unwrap_err()
                .contains("unknown middlebox")
        );
        assert!("none".parse::<Middleboxes>().unwrap().is_empty());
    }
}
