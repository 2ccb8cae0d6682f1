//! What the hub fails with. The hub has no policy of its own to refuse on (limits, auth and
//! the stop signal sit in front of it), so its only failure is its store's; a subscriber that
//! falls behind or is drained is not a failure but the end of its delivery ([`super::End`]).

use crate::store::StoreError;

/// A hub operation that could not be done.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The topic's log failed to append or read.
    #[error(transparent)]
    Store(#[from] StoreError),
}
