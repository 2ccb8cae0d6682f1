//! What the hub fails with. The hub has no policy of its own to refuse on (limits, auth and
//! the stop signal sit in front of it), so it fails with its store, when a connection's
//! patterns pick up more topics than the connection may follow, or when the connection has
//! ended; a subscriber that falls behind or is drained is not a failure but the end of its
//! delivery ([`super::End`]).

use crate::store::StoreError;

/// A hub operation that could not be done.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The topic's log failed to append or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A connection that follows a topic list would follow more than its limit.
    #[error("a connection may follow at most {limit} topics")]
    TooManyTopics {
        /// The limit.
        limit: usize,
    },
    /// The connection ended (its client left, or it was ended) before it could follow the
    /// topic.
    #[error("the connection has ended")]
    Ended,
}
