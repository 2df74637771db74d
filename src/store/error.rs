//! What a store call can fail with.

use std::time::Duration;

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer within the allowed time.
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// A conditional write lost a race; retrying with fresh state may succeed.
    #[error("a concurrent update changed {0}")]
    Conflict(&'static str),
    /// The store cannot be used at all: a database file that is not the store's, is damaged,
    /// or was written by a newer version. Retrying does not help.
    #[error("the store cannot be used: {0}")]
    Unusable(String),
    /// The store holds as many of these as it keeps (usage event ids, webhook event ids) and
    /// none is old enough to go: the new one is refused rather than an id forgotten inside
    /// its horizon (a redelivery would then be counted again). Back-pressure: retry later.
    #[error("the store holds as many {0} as it keeps; retry later")]
    Full(&'static str),
    /// The store answered with an error.
    #[error("store error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// The same error, for each of several callers (a batch failed as a whole): the
    /// backend's source as its message.
    #[must_use]
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Timeout(d) => StoreError::Timeout(*d),
            StoreError::Conflict(what) => StoreError::Conflict(what),
            StoreError::Unusable(why) => StoreError::Unusable(why.clone()),
            StoreError::Full(what) => StoreError::Full(what),
            StoreError::Backend(e) => StoreError::Backend(e.to_string().into()),
        }
    }
}
