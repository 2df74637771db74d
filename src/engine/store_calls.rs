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

/// Failures in a row of the request path's store calls after which they fail fast.
const FAILURES_BEFORE_FAST: u32 = 3;
/// The first interval of failing fast; it doubles while the probe fails, up to the most.
const FAST_FIRST: Duration = Duration::from_millis(100);
const FAST_MOST: Duration = Duration::from_secs(5);

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
    /// The request path's store calls failed this many times in a row.
    failures: std::sync::atomic::AtomicU32,
    /// Until when (engine clock, Unix nanoseconds) they fail fast, and the interval that set it.
    fast_until: AtomicI64,
    fast_for: AtomicU64,
}

impl StoreCalls {
    pub(crate) fn new(roles: Roles, metrics: Arc<Metrics>, totals: Arc<Totals>, clock: Clock) -> Self {
        Self {
            roles,
            logged_at: AtomicI64::new(0),
            unlogged: AtomicU64::new(0),
            metrics,
            totals,
            clock,
            failures: std::sync::atomic::AtomicU32::new(0),
            fast_until: AtomicI64::new(0),
            fast_for: AtomicU64::new(0),
        }
    }

    /// Before a store call of the request path: `Err` at once while the store fails fast
    /// (after [`FAILURES_BEFORE_FAST`] failures in a row), so that an outage costs a few
    /// timeouts and not one per request. When the interval is over, one call goes through to
    /// probe the store (the others still fail fast); its outcome ([`Self::after`]) closes the
    /// breaker or opens it again for twice as long, up to [`FAST_MOST`].
    pub(crate) fn before(&self) -> Result<(), StoreError> {
        if self.failures.load(Relaxed) < FAILURES_BEFORE_FAST {
            return Ok(());
        }
        let now = self.clock.unix_nanos();
        let until = self.fast_until.load(Relaxed);
        if now >= until {
            // The probe: the interval is taken again meanwhile, so only this call goes.
            let again = i64::try_from(self.fast_for.load(Relaxed)).unwrap_or(i64::MAX);
            if self.fast_until.compare_exchange(until, now.saturating_add(again), Relaxed, Relaxed).is_ok() {
                return Ok(());
            }
        }
        self.metrics.store_fast_failures.increment(1);
        Totals::add(&self.totals.store_fast_failures, 1);
        Err(StoreError::Backend("the store failed several times in a row: failing fast for a moment".into()))
    }

    /// After a store call of the request path let through by [`Self::before`]: a timeout
    /// counts towards opening the breaker (or opens it again, longer); an answer, even an
    /// error, closes it (a store that answers costs no timeout, and one key it refuses must not
    /// hold up every other tenant).
    pub(crate) fn after<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_)
            | Err(StoreError::Conflict(_) | StoreError::Unusable(_) | StoreError::Full(_) | StoreError::Backend(_)) => {
                if self.failures.swap(0, Relaxed) >= FAILURES_BEFORE_FAST {
                    tracing::info!("the store answers again: no longer failing fast");
                }
                self.fast_for.store(0, Relaxed);
            }
            Err(StoreError::Timeout(_)) => {
                let failures = self.failures.fetch_add(1, Relaxed).saturating_add(1);
                if failures >= FAILURES_BEFORE_FAST {
                    let first = FAST_FIRST.as_nanos() as u64;
                    let most = FAST_MOST.as_nanos() as u64;
                    let next = match self.fast_for.load(Relaxed) {
                        0 => first,
                        last => last.saturating_mul(2).min(most),
                    };
                    self.fast_for.store(next, Relaxed);
                    let until = self.clock.unix_nanos().saturating_add(i64::try_from(next).unwrap_or(i64::MAX));
                    self.fast_until.store(until, Relaxed);
                    if failures == FAILURES_BEFORE_FAST {
                        tracing::warn!(
                            failures,
                            "the store keeps failing: requests fail fast for a moment, then probe it"
                        );
                    }
                }
            }
        }
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

impl StoreCalls {
    /// A store call of the request path: `fut` within `limit`, failed fast while the store
    /// keeps failing ([`StoreCalls::before`], [`StoreCalls::after`]).
    pub(crate) async fn guarded<T>(
        &self,
        limit: Duration,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.before()?;
        let result = with_timeout(limit, fut).await;
        self.after(&result);
        result
    }

    /// `fut` (a quota cell's store calls) under the cell's `lock`, within `limit` in all: the
    /// wait for the lock never counts toward failing fast, the calls do
    /// ([`StoreCalls::lock_within`], [`StoreCalls::locked`]).
    pub(crate) async fn under_lock<T>(
        &self,
        limit: Duration,
        lock: &tokio::sync::Mutex<()>,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + limit;
        let (_guard, waited) = self.lock_within(limit, deadline, lock).await?;
        self.locked(limit, deadline, waited, fut).await
    }

    /// The lock of a quota cell, waited for until `deadline` (the request's whole time for
    /// its store calls), after [`StoreCalls::before`]: while the store fails fast, at once.
    /// The wait is for other requests' store calls, so it never counts toward failing fast;
    /// `Err(Timeout)` when it runs out (answered by `on_store_error` as any). With the guard,
    /// whether the wait left the calls under it less than half their time.
    async fn lock_within<'a>(
        &self,
        limit: Duration,
        deadline: tokio::time::Instant,
        lock: &'a tokio::sync::Mutex<()>,
    ) -> Result<(tokio::sync::MutexGuard<'a, ()>, bool), StoreError> {
        self.before()?;
        if let Ok(guard) = lock.try_lock() {
            return Ok((guard, false));
        }
        let guard = tokio::time::timeout_at(deadline, lock.lock()).await.map_err(|_| StoreError::Timeout(limit))?;
        // A call with at least half its time left still tells whether the store answers.
        let short = deadline.saturating_duration_since(tokio::time::Instant::now()) < limit / 2;
        Ok((guard, short))
    }

    /// The store calls made under a lock taken with [`StoreCalls::lock_within`], in what is
    /// left until `deadline`: their outcome counts toward failing fast ([`StoreCalls::after`]),
    /// but for a timeout of calls made after a long wait for the lock (`waited`: they had less
    /// than half their `limit`, and the store may have answered in time).
    async fn locked<T>(
        &self,
        limit: Duration,
        deadline: tokio::time::Instant,
        waited: bool,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let whole = !waited;
        let result = match tokio::time::timeout_at(deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(limit)),
        };
        if whole || !matches!(result, Err(StoreError::Timeout(_))) {
            self.after(&result);
        }
        result
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
