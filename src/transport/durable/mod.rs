//! Durable Streams (ElectricSQL's open protocol for offset-addressed, append-only HTTP
//! streams) on the hub: issue 14, in progress. docs/durable-streams.md has the design and
//! what is built; this module holds, so far, the protocol's pure parts, each tested against
//! what the conformance suite (`@durable-streams/server-conformance-tests` 0.3.6) checks:
//!
//! - [`offset`]: the opaque offsets (`0000000000000000_0000000000000042`), the `-1` and `now`
//!   sentinels and their validation;
//! - [`content`]: content types (stored verbatim, compared normalised, JSON mode or bytes),
//!   JSON bodies flattened one level into values, and the numeric header formats;
//! - [`sse`]: the SSE framing the protocol specifies (`event: data` / `event: control`,
//!   `data:` lines split on every line break, base64 for binary streams).
//!
//! Not yet served: the endpoints under `/v1/stream/`, stream metadata in the stores,
//! producers, closing, TTLs and forks.

pub mod content;
pub mod offset;
pub mod sse;
