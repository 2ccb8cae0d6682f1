//! The ways a subscriber is fed, named once: [`TransportKind`] and a table with one value per
//! kind ([`PerTransport`]). Counters, gauges, metrics labels, routes and `--transports` all
//! go through these, so adding a transport is one variant here and the compiler lists every
//! place that must learn it.

use std::{
    fmt,
    ops::{Index, IndexMut},
    str::FromStr,
};

use serde::{Serialize, Serializer, ser::SerializeMap};

/// One way of pushing messages to a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Short polling: `GET /topics/{t}/poll`.
    Poll,
    /// Long polling: `GET /topics/{t}/longpoll`.
    Longpoll,
    /// Server-Sent Events: `GET /topics/{t}/sse`.
    Sse,
    /// WebSocket: `GET /topics/{t}/ws` and `/ws`.
    Ws,
    /// HTTP streaming, one JSON envelope per line: `GET /topics/{t}/stream`.
    Stream,
    /// A Durable Streams SSE read: `GET /v1/stream/{t}?live=sse`.
    DsSse,
    /// A Durable Streams long poll: `GET /v1/stream/{t}?live=long-poll`.
    DsLongpoll,
}

impl TransportKind {
    /// How many kinds there are.
    pub const COUNT: usize = 7;

    /// Every kind, in the order of [`TransportKind::index`].
    pub const ALL: [TransportKind; Self::COUNT] = [
        TransportKind::Poll,
        TransportKind::Longpoll,
        TransportKind::Sse,
        TransportKind::Ws,
        TransportKind::Stream,
        TransportKind::DsSse,
        TransportKind::DsLongpoll,
    ];

    /// pushhub's own transports, under `/topics/{t}/...` (what `--transports` switches);
    /// the Durable Streams reads are served under `--ds-path`.
    pub const NATIVE: [TransportKind; 5] = [
        TransportKind::Poll,
        TransportKind::Longpoll,
        TransportKind::Sse,
        TransportKind::Ws,
        TransportKind::Stream,
    ];

    /// The name used in URLs, `--transports`, `/stats` keys and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            TransportKind::Poll => "poll",
            TransportKind::Longpoll => "longpoll",
            TransportKind::Sse => "sse",
            TransportKind::Ws => "ws",
            TransportKind::Stream => "stream",
            TransportKind::DsSse => "ds-sse",
            TransportKind::DsLongpoll => "ds-longpoll",
        }
    }

    /// Whether this is a Durable Streams read rather than one of pushhub's own transports.
    pub const fn is_durable(self) -> bool {
        matches!(self, TransportKind::DsSse | TransportKind::DsLongpoll)
    }

    /// Its place in [`TransportKind::ALL`] and in a [`PerTransport`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of [`TransportKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport {0:?}: use poll, longpoll, sse, ws, stream, ds-sse or ds-longpoll")]
pub struct UnknownTransport(pub String);

impl FromStr for TransportKind {
    type Err = UnknownTransport;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        TransportKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| UnknownTransport(name.to_owned()))
    }
}

impl Serialize for TransportKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// One value per transport kind, indexed by [`TransportKind`]; serialized as an object keyed
/// by the kinds' names, in [`TransportKind::ALL`]'s order (`{"poll": .., "longpoll": ..,
/// "sse": .., "ws": .., "stream": .., "ds-sse": .., "ds-longpoll": ..}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerTransport<T>([T; TransportKind::COUNT]);

impl<T> PerTransport<T> {
    /// The table whose value for each kind is `value(kind)`.
    pub fn from_fn(mut value: impl FnMut(TransportKind) -> T) -> Self {
        Self(TransportKind::ALL.map(&mut value))
    }

    /// Each kind with its value, in [`TransportKind::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (TransportKind, &T)> {
        TransportKind::ALL.into_iter().zip(self.0.iter())
    }
}

impl<T> Index<TransportKind> for PerTransport<T> {
    type Output = T;

    fn index(&self, kind: TransportKind) -> &T {
        &self.0[kind.index()]
    }
}

impl<T> IndexMut<TransportKind> for PerTransport<T> {
    fn index_mut(&mut self, kind: TransportKind) -> &mut T {
        &mut self.0[kind.index()]
    }
}

impl<T: Serialize> Serialize for PerTransport<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(TransportKind::COUNT))?;
        for (kind, value) in self.iter() {
            map.serialize_entry(kind.name(), value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_index_in_order() {
        for (index, kind) in TransportKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), index);
            assert_eq!(kind.name().parse::<TransportKind>(), Ok(kind));
        }
        assert!("websocket".parse::<TransportKind>().is_err());
    }

    #[test]
    fn a_table_serializes_as_an_object_keyed_by_name() {
        let mut counts = PerTransport::<u64>::default();
        counts[TransportKind::Sse] = 3;
        assert_eq!(
            serde_json::to_string(&counts).unwrap(),
            r#"{"poll":0,"longpoll":0,"sse":3,"ws":0,"stream":0,"ds-sse":0,"ds-longpoll":0}"#
        );
    }
}
