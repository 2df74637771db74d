//! The engine's store calls: the handles of each path ([`StoreCalls::request`],
//! [`StoreCalls::background`], [`StoreCalls::events`]), each role's store wrapped in
//! [`Limited`] by one [`Policy`], and the request's whole time for the calls made under a
//! quota cell's lock.

use std::{future::Future, sync::Arc};

use tokio::time::Instant;

use crate::{
    clock::Clock,
    config::Config,
    metrics::Totals,
    store::{
        limited::{within_deadline, within_deadline_unguarded, Limited, Path, Policy},
        Roles, StoreError, UsageExportStore,
    },
    tenant::Turn,
};

/// Each role's store wrapped for one path.
fn wrapped(roles: &Roles, policy: &Arc<Policy>, path: Path) -> Roles {
    Roles {
        quota: Arc::new(Limited::new(roles.quota.clone(), policy.clone(), path)),
        usage: Arc::new(Limited::new(roles.usage.clone(), policy.clone(), path)),
        directory: Arc::new(Limited::new(roles.directory.clone(), policy.clone(), path)),
        idempotency: Arc::new(Limited::new(roles.idempotency.clone(), policy.clone(), path)),
        rate: Arc::new(Limited::new(roles.rate.clone(), policy.clone(), path)),
        places: Arc::new(Limited::new(roles.places.clone(), policy.clone(), path)),
        alerts: Arc::new(Limited::new(roles.alerts.clone(), policy.clone(), path)),
        audit: Arc::new(Limited::new(roles.audit.clone(), policy.clone(), path)),
    }
}

/// Timeouts in a row of one role's request-path calls on a node (the rate role's, the places
/// role's) after which its store is taken as down ([`StoreCalls::down`]), as the breaker does
/// for the engine's calls.
pub(crate) const TIMEOUTS_DOWN: u32 = 3;

/// A role whose request-path calls count their own timeouts in a row ([`StoreCalls::answered`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counted {
    /// Fleet rates' lease calls.
    Rate = 0,
    /// Fleet concurrencies' acquires.
    Places = 1,
}

/// What [`StoreCalls::under_lock`] answers a request that waited past `usage.queue_timeout`
/// for its turn on a quota cell's lock (its tenant's other calls ahead of it): busy, not a store
/// failure ([`queued`]).
pub(crate) const QUEUED: &str = "the turn of a quota cell's calls (usage.queue_timeout)";

/// Whether `e` says the tenant is busy, not the store down: the request waited past
/// `usage.queue_timeout` behind its tenant's other calls ([`QUEUED`]), or its call lost the
/// races for the tenant's rows to other nodes until its deadline (a store that writes under a
/// condition stops trying before the deadline, `store::race`). Either way the store answered.
pub(crate) fn busy(e: &StoreError) -> bool {
    matches!(e, StoreError::Conflict(_))
}

/// `usage.queue_timeout` in nanoseconds.
fn queue_nanos(config: &Config) -> u64 {
    u64::try_from(config.usage.queue_timeout.as_nanos()).unwrap_or(u64::MAX)
}

/// The stores an engine calls: the handles of each path, and the stores as given (for the
/// engine's accessors, never called here).
#[derive(Debug)]
pub(crate) struct StoreCalls {
    policy: Arc<Policy>,
    /// Each [`Counted`] role's calls that timed out in a row on this node (0 after any answer
    /// of its store, to any tenant).
    timeouts: [std::sync::atomic::AtomicU32; 2],
    /// `usage.queue_timeout`, in nanoseconds: how long a request waits its turn on a quota
    /// cell's lock (set again at each reload).
    queue: std::sync::atomic::AtomicU64,
    given: Roles,
    request: Roles,
    background: Roles,
    events: Arc<dyn UsageExportStore>,
}

impl StoreCalls {
    pub(crate) fn new(given: Roles, totals: Arc<Totals>, clock: Clock, config: &Config) -> Self {
        let policy = Arc::new(Policy::new(totals, clock));
        policy.configure(config);
        Self {
            timeouts: Default::default(),
            queue: std::sync::atomic::AtomicU64::new(queue_nanos(config)),
            request: wrapped(&given, &policy, Path::Request),
            background: wrapped(&given, &policy, Path::Background),
            events: Arc::new(Limited::new(given.usage.clone(), policy.clone(), Path::Events)),
            given,
            policy,
        }
    }

    /// The stores as the builder was given them.
    pub(crate) fn given(&self) -> &Roles {
        &self.given
    }

    /// The request path's handles: `usage.store_timeout` a call, failing fast.
    pub(crate) fn request(&self) -> &Roles {
        &self.request
    }

    /// Background work's handles: `limits.background_timeout` a call.
    pub(crate) fn background(&self) -> &Roles {
        &self.background
    }

    /// The handle of batches of usage events: `events.store_timeout` a call.
    pub(crate) fn events(&self) -> &Arc<dyn UsageExportStore> {
        &self.events
    }

    /// The policy every handle shares.
    pub(crate) fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// `fut` (calls made on the [request](Self::request) handles) within
    /// `usage.store_timeout` in all, failing fast while the breaker is open and feeding it: a
    /// request's own call, with nothing it waited for.
    pub(crate) async fn guarded<T>(&self, fut: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let deadline = Instant::now() + self.policy.limit(Path::Request);
        within_deadline(deadline, fut).await
    }

    /// Whether a request-path call that failed with `e` finds the store down, rather than the
    /// tenant busy: a lost race ([`StoreError::Conflict`], a row locked past the store's short
    /// lock wait) is busy; a timeout is too until a run of failures says otherwise: the
    /// breaker's (the engine's calls timing out), or [`TIMEOUTS_DOWN`] timeouts in a row of
    /// `role`'s calls on this node, whatever tenant made them (a role on a store of its own,
    /// whose timeouts the other roles' answers would keep the breaker from seeing; one tenant's
    /// busy row is not a run, the store answering the others). One row held by other nodes'
    /// calls times out a call as a store down would, and one busy tenant must not make a node
    /// count alone. Any other failure is down.
    pub(crate) fn down(&self, e: &StoreError, role: Counted) -> bool {
        match e {
            StoreError::Conflict(_) => false,
            StoreError::Timeout(_) => {
                self.timeouts[role as usize].load(std::sync::atomic::Ordering::Relaxed) >= TIMEOUTS_DOWN
                    || self.policy.failing_fast()
            }
            _ => true,
        }
    }

    /// Counts the outcome of a call `role` made to its store: a timeout adds to the run of
    /// timeouts in a row, any answer (an error included) ends it. Only calls that were made
    /// count: a request answered busy, or from what its node held, tells nothing of the store.
    pub(crate) fn answered<T>(&self, role: Counted, outcome: &Result<T, StoreError>) {
        let run = &self.timeouts[role as usize];
        if matches!(outcome, Err(StoreError::Timeout(_))) {
            run.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            run.store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Takes the time limits of a reloaded configuration.
    pub(crate) fn configure(&self, config: &Config) {
        self.policy.configure(config);
        self.queue.store(queue_nanos(config), std::sync::atomic::Ordering::Relaxed);
    }

    /// `fut` (a quota cell's calls, made on the [request](Self::request) handles) under the
    /// cell's `lock`. The wait for the lock is time queued in the node behind the tenant's
    /// other requests (whose calls ask for its units too: see the refill's `wanted`), not the
    /// store's: it is bounded by `usage.queue_timeout`, and one that passes it is
    /// `Err(`[`QUEUED`]`)`, which is not a store error (no breaker counts it, no "unavailable"
    /// is logged; the request is answered [`TenantBusy`](crate::RejectionKind::TenantBusy)).
    /// Once the turn has come, `fut` has `usage.store_timeout` for its calls, failing fast
    /// while the breaker is open: only a store that does not answer is a store timeout. While
    /// the store fails fast, the lock is not waited for.
    pub(crate) async fn under_lock<T>(
        &self,
        lock: &impl Turn,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let queue = std::time::Duration::from_nanos(self.queue.load(std::sync::atomic::Ordering::Relaxed));
        let _guard = match lock.try_turn() {
            Some(guard) => guard,
            None if self.policy.failing_fast() => {
                let e = self.policy.fast_failure();
                self.policy.failed("wait for a quota cell's lock", &e);
                return Err(e);
            }
            None => match tokio::time::timeout(queue, lock.turn()).await {
                Ok(guard) => guard,
                Err(_) => {
                    tracing::debug!(?queue, "a request waited past usage.queue_timeout for its tenant's other calls");
                    return Err(StoreError::Conflict(QUEUED));
                }
            },
        };
        within_deadline(Instant::now() + self.policy.limit(Path::Request), fut).await
    }

    /// `fut` under `lock`, within `usage.store_timeout` in all, the wait for the lock
    /// included, a lock that does not come in time answered `Ok(None)` and not counted as a
    /// store error: the caller tells a busy tenant (other requests' calls held the lock) from
    /// a store that failed (a fleet rate's lease, which answers a busy tenant 429 at once
    /// rather than queue it); while the store fails fast, the lock is not waited for.
    pub(crate) async fn under_lock_or_busy<T>(
        &self,
        lock: &impl Turn,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<Option<T>, StoreError> {
        let limit = self.policy.limit(Path::Request);
        let deadline = Instant::now() + limit;
        let _guard = match lock.try_turn() {
            Some(guard) => guard,
            None if self.policy.failing_fast() => {
                let e = self.policy.fast_failure();
                self.policy.failed("wait for a quota cell's lock", &e);
                return Err(e);
            }
            None => match tokio::time::timeout_at(deadline, lock.turn()).await {
                Ok(guard) => guard,
                Err(_) => return Ok(None),
            },
        };
        within_deadline(deadline, fut).await.map(Some)
    }

    /// `fut` (calls made on the [request](Self::request) handles) within
    /// `usage.store_timeout` in all, for a caller that already holds what it waited for, and
    /// never failing fast: a lease given back (shutdown, reload, eviction) is tried whatever
    /// the breaker says, as before the wrapper.
    pub(crate) async fn within<T>(&self, fut: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let deadline = Instant::now() + self.policy.limit(Path::Request);
        within_deadline_unguarded(deadline, fut).await
    }
}
