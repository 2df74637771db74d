//! The engine's store calls: the store of each role, the time limit of a call, and the log of
//! store errors (one line per burst, every error counted).

use std::{
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use crate::{
    clock::Clock,
    metrics::{Metrics, Totals},
    store::{Roles, StoreError},
};

/// A burst of store errors is logged at most once per this long.
pub(crate) const STORE_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// The stores an engine calls, and what it does when a call fails.
#[derive(Debug)]
pub(crate) struct StoreCalls {
    /// The store of each role.
    pub(crate) roles: Roles,
    /// When store errors were last logged, and how many came since.
    logged_at: AtomicI64,
    unlogged: AtomicU64,
    metrics: Arc<Metrics>,
    totals: Arc<Totals>,
    clock: Clock,
}

impl StoreCalls {
    pub(crate) fn new(roles: Roles, metrics: Arc<Metrics>, totals: Arc<Totals>, clock: Clock) -> Self {
        Self { roles, logged_at: AtomicI64::new(0), unlogged: AtomicU64::new(0), metrics, totals, clock }
    }

    /// Counts a store error, and logs it once per burst: the first of a burst at once, then at
    /// most one line every [`STORE_ERROR_LOG_EVERY`] with the number of errors since the last
    /// line (an outage does not log once per request).
    pub(crate) fn failed(&self, op: &'static str, e: &StoreError) {
        self.metrics.store_errors.increment(1);
        Totals::add(&self.totals.store_errors, 1);
        let now = self.clock.unix_nanos();
        self.unlogged.fetch_add(1, Relaxed);
        let last = self.logged_at.load(Relaxed);
        let every = i64::try_from(STORE_ERROR_LOG_EVERY.as_nanos()).unwrap_or(i64::MAX);
        let due = last == 0 || now.saturating_sub(last) >= every || now < last;
        if due && self.logged_at.compare_exchange(last, now.max(1), Relaxed, Relaxed).is_ok() {
            let errors = self.unlogged.swap(0, Relaxed);
            tracing::warn!(op, error = %e, errors, "store error ({errors} since the last such line)");
        }
    }
}

/// `fut`, or [`StoreError::Timeout`] once `limit` has passed.
pub(crate) async fn with_timeout<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Timeout(limit)),
    }
}
