//! What a fan-out writer counts during one walk (deliveries, bytes, lag per transport),
//! added to the shared counters once at the walk's end rather than per delivery.

use bytes::Bytes;

use super::stats::Counters;
use crate::{
    message::{PerTransport, TransportKind},
    telemetry::LagTally,
};

/// What a writer counts during one walk, added to the shared counters once at its end.
#[derive(Default)]
pub(super) struct Tally {
    deliveries: PerTransport<u64>,
    bytes: PerTransport<u64>,
    lag: LagTally,
    /// The time of the walk, for lag: read once per walk, not per delivery.
    pub(super) now_ms: u64,
}

impl Tally {
    pub(super) fn delivered(
        &mut self,
        transport: TransportKind,
        messages: usize,
        frames: &[Bytes],
        published_ms: u64,
    ) {
        self.deliveries[transport] += messages as u64;
        self.bytes[transport] += frames.iter().map(|f| f.len() as u64).sum::<u64>();
        self.lag
            .record(transport, self.now_ms.saturating_sub(published_ms));
    }

    pub(super) fn flush(&mut self, counters: &Counters) {
        for transport in TransportKind::ALL {
            let (deliveries, bytes) = (self.deliveries[transport], self.bytes[transport]);
            if deliveries > 0 || bytes > 0 {
                counters.delivered(transport, deliveries, bytes);
            }
        }
        self.lag.flush();
        *self = Self::default();
    }
}
