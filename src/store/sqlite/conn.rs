//! The connection ([`Conn`], with the id counts it keeps) and what every call of the
//! SQLiteStore shares: the busy timeout, the conversions of integers, the errors.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use rusqlite::{Connection, ErrorCode};

use crate::store::{contract, unix_now, StoreError};

/// How long a call waits for another connection's write lock (SQLite's busy handler) before
/// the call is retried.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection's page cache, in KiB: a flush touches a page per tenant of the batch, and a
/// page read from the cache costs no system call.
pub(super) const CACHE_KIB: u32 = 32 * 1024;

/// The connection, and what it remembers to prune old rows.
pub(super) struct Conn {
    pub(super) db: Connection,
    /// The newest usage window committed through this connection (or found at open).
    pub(super) newest_window: i64,
    /// The newest window when rows were last pruned, and when (wall clock).
    pub(super) pruned_window: i64,
    pub(super) pruned_at: Option<Instant>,
    /// How many usage event ids and webhook event ids the file holds.
    pub(super) ids: IdCounts,
}

/// The ids a file holds of each kind (`None`: to be counted, at open and after a prune), and
/// the most it keeps ([`contract::EVENT_IDS_MAX`]): at the cap a new one is refused, never one
/// forgotten inside its horizon.
#[derive(Debug)]
pub(super) struct IdCounts {
    pub(super) events: Option<usize>,
    pub(super) webhooks: Option<usize>,
    pub(super) cap: usize,
}

impl Default for IdCounts {
    fn default() -> Self {
        Self { events: None, webhooks: None, cap: contract::EVENT_IDS_MAX }
    }
}

/// Refuses a new id at the cap: the call's transaction rolls back, and the caller gets
/// [`StoreError::Full`].
#[derive(Debug)]
pub(super) struct AtCapacity(pub(super) &'static str);

impl std::fmt::Display for AtCapacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at capacity", self.0)
    }
}

impl std::error::Error for AtCapacity {}

/// A failure inside a call: SQLite's, or a value that does not fit.
pub(super) type Sql<T> = Result<T, rusqlite::Error>;

pub(super) fn unusable(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Unusable(format!("{}: {what}", path.display()))
}

pub(super) fn backend(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::ToSqlConversionFailure(inner) = &e {
        if let Some(AtCapacity(what)) = inner.downcast_ref::<AtCapacity>() {
            return StoreError::Full(what);
        }
    }
    StoreError::Backend(Box::new(e))
}

pub(super) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// A u64 as SQLite stores it (values past `i64::MAX` saturate).
pub(super) fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A count read back (never negative in a valid file).
pub(super) fn uint(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A node or sender id (any u64) as an SQLite integer, bit for bit.
pub(super) fn node_int(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

pub(super) fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(unix_now().unsigned_abs());
    h.finish()
}
