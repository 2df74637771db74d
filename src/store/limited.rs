//! The policy of store calls. Every call of every role goes through a [`Limited`] store, as
//! object_store's `LimitStore` wraps a store in the role it implements: the wrapper holds the
//! call's time limit, fails fast while the store keeps timing out (on the request path only),
//! and counts and logs the errors (one line per burst, every error counted). No call site picks
//! its own time limit, and nothing calls a store bare.
//!
//! The engine holds two handles per role, the request path's and background work's, and one
//! more for the batch writes of usage events; an [`Admin`](crate::admin::Admin) or a webhook
//! handler built on stores alone holds background handles:
//!
//! | path | time limit of a call | fails fast |
//! |---|---|---|
//! | request: key lookups, `Idempotency-Key` claims, quota calls under a cell's lock, tenant reports | `usage.store_timeout`, and under a cell's lock what is left of that wait's (the lock wait included) | yes (lease returns: no) |
//! | events: a batch of usage events | `events.store_timeout` | no |
//! | background: flush, export, reconciliation, webhooks, `Admin`, settlements, the worker | `limits.background_timeout` | no |

use crate::store::KeyWrite;
use std::{
    future::Future,
    sync::{
        atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::time::Instant;

use crate::{
    clock::Clock,
    config::{Config, MeterId, TenantId},
    metrics::Totals,
    store::{
        ApiKeyRecord, ChangeCall, Changes, CommitOutcome, CreditBalance, CreditClosure, CreditGrant, CreditRefund,
        DeadLetter, Deferral, DirectoryStore, EventOutcome, ExportClaim, ExportKey, ExportSend, ExportStore, Grant,
        GrantOutcome, IdempotencyClaim, IdempotencySettle, IdempotencySettled, IdempotencyState, IdempotencyStore,
        KeyHash, LedgerEntry, LedgerStore, OutboxStore, PlaceStore, PlanChange, PlanChangeOutcome, QuotaCounter,
        QuotaStore, RateStore, RefundOutcome, Release, Reservation, StoreError, TenantRecord, TenantUpdate, UpdateWhen,
        UsageAggregate, UsageBatch, UsageEvent, UsageStore,
    },
};

/// A burst of store errors is logged at most once per this long.
pub(crate) const STORE_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Failures in a row of the request path's store calls after which they fail fast.
const FAILURES_BEFORE_FAST: u32 = 3;
/// The first interval of failing fast; it doubles while the probe fails, up to the most.
const FAST_FIRST: Duration = Duration::from_millis(100);
const FAST_MOST: Duration = Duration::from_secs(5);

/// `limits.background_timeout` when there is no configuration (an [`Admin`](crate::admin::Admin)
/// or a webhook handler built on stores alone).
pub(crate) const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(10);

/// Which calls a [`Limited`] store makes: its time limit, and whether it fails fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// The request path: `usage.store_timeout` a call, fails fast.
    Request = 0,
    /// Batches of usage events: `events.store_timeout` a call.
    Events = 1,
    /// Background work: `limits.background_timeout` a call.
    Background = 2,
}

tokio::task_local! {
    /// The end of a request's whole time for its store calls (set by [`within_deadline`]): a
    /// call made under it has what is left, at most its own limit.
    static DEADLINE: Instant;
}

/// `fut`, its calls of the request path given at most until `deadline` in all.
pub(crate) async fn within_deadline<T>(deadline: Instant, fut: impl Future<Output = T>) -> T {
    DEADLINE.scope(deadline, fut).await
}

tokio::task_local! {
    /// The end of the one store call running (set by [`Policy::call`]): the call's own limit,
    /// or what is left of the request's, whichever ends first. A store that writes under a
    /// condition tries again after a lost race only while another attempt fits before it
    /// ([`call_deadline`]).
    static CALL_DEADLINE: Instant;
}

/// The end of the store call running on this task, if a [`Limited`] store made it: past it
/// the call is cut and answered a timeout.
#[cfg(any(feature = "dynamodb", feature = "redis"))]
pub(crate) fn call_deadline() -> Option<Instant> {
    CALL_DEADLINE.try_with(|d| *d).ok()
}

/// `fut` as a [`Limited`] store's call ending at `deadline` runs it (tests).
#[cfg(test)]
pub(crate) async fn as_call_ending<T>(deadline: Instant, fut: impl Future<Output = T>) -> T {
    CALL_DEADLINE.scope(deadline, fut).await
}

tokio::task_local! {
    /// Set by [`within_deadline_unguarded`]: the request path's calls made under it never fail
    /// fast, nor feed the breaker.
    static UNGUARDED: ();
}

/// [`within_deadline`], the calls never failing fast: work that must be tried whatever the
/// breaker says (a lease given back at shutdown or eviction: one not tried stays leased until
/// its period ends).
pub(crate) async fn within_deadline_unguarded<T>(deadline: Instant, fut: impl Future<Output = T>) -> T {
    UNGUARDED.scope((), DEADLINE.scope(deadline, fut)).await
}

tokio::task_local! {
    /// Set by [`reading`]: the request path's calls made under it fail fast while the breaker
    /// is open, but never probe it nor count towards opening it.
    static READING: ();
}

/// `fut`, its calls of the request path reads for a tenant's own view of its usage (made once
/// a second per tenant, heavier than a request's calls): failing fast while the store does,
/// never taken as the probe, and their timeouts not counted against the requests' breaker.
pub(crate) async fn reading<T>(fut: impl Future<Output = T>) -> T {
    READING.scope((), fut).await
}

/// What every [`Limited`] store of an engine shares: the time limits of each path, the
/// breaker of the request path, and the count and log of errors.
#[derive(Debug)]
pub(crate) struct Policy {
    /// The time limit of a call of each [`Path`], in nanoseconds (set again at each reload).
    limits: [AtomicU64; 3],
    /// When store errors were last logged, and how many came since.
    logged_at: AtomicI64,
    unlogged: AtomicU64,
    totals: Arc<Totals>,
    clock: Clock,
    /// The request path's store calls failed this many times in a row.
    failures: AtomicU32,
    /// Until when (engine clock, Unix nanoseconds) they fail fast, and the interval that set it.
    fast_until: AtomicI64,
    fast_for: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Policy {
    /// The engine's totals its errors are counted in.
    pub(crate) fn totals(&self) -> &Arc<Totals> {
        &self.totals
    }

    pub(crate) fn new(totals: Arc<Totals>, clock: Clock) -> Self {
        Self {
            limits: [nanos(Duration::from_millis(250)), nanos(Duration::from_secs(10)), nanos(BACKGROUND_TIMEOUT)]
                .map(AtomicU64::new),
            logged_at: AtomicI64::new(0),
            unlogged: AtomicU64::new(0),
            totals,
            clock,
            failures: AtomicU32::new(0),
            fast_until: AtomicI64::new(0),
            fast_for: AtomicU64::new(0),
        }
    }

    /// The policy of stores used without an engine: background calls of
    /// [`BACKGROUND_TIMEOUT`] each until [configured](Self::configure).
    pub(crate) fn standalone() -> Arc<Self> {
        Arc::new(Self::new(Arc::new(Totals::register()), Clock::system()))
    }

    /// Takes the time limits of `config`.
    pub(crate) fn configure(&self, config: &Config) {
        let limits = [config.usage.store_timeout, config.events.store_timeout, config.limits.background_timeout];
        for (slot, limit) in self.limits.iter().zip(limits) {
            slot.store(nanos(limit), Relaxed);
        }
    }

    /// The time limit of one call of `path`.
    pub(crate) fn limit(&self, path: Path) -> Duration {
        Duration::from_nanos(self.limits[path as usize].load(Relaxed))
    }

    /// Whether the request path's calls fail fast now (without taking the probe).
    pub(crate) fn failing_fast(&self) -> bool {
        self.failures.load(Relaxed) >= FAILURES_BEFORE_FAST && self.clock.unix_nanos() < self.fast_until.load(Relaxed)
    }

    /// Before a store call of the request path: `Err` at once while the store fails fast
    /// (after [`FAILURES_BEFORE_FAST`] failures in a row), so that an outage costs a few
    /// timeouts and not one per request. When the interval is over, one call goes through to
    /// probe the store (the others still fail fast); its outcome ([`Self::after`]) closes the
    /// breaker or opens it again for twice as long, up to [`FAST_MOST`].
    fn before(&self) -> Result<(), StoreError> {
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
        Err(self.fast_failure())
    }

    /// A call failed fast: counted.
    pub(crate) fn fast_failure(&self) -> StoreError {
        self.totals.store_fast_failures.add(1);
        StoreError::Backend("the store failed several times in a row: failing fast for a moment".into())
    }

    /// After a store call of the request path let through by [`Self::before`]: a timeout
    /// counts towards opening the breaker (or opens it again, longer); an answer, even an
    /// error, closes it (a store that answers costs no timeout, and one key it refuses must not
    /// hold up every other tenant).
    fn after<T>(&self, result: &Result<T, StoreError>) {
        if !matches!(result, Err(StoreError::Timeout(_))) {
            if self.failures.swap(0, Relaxed) >= FAILURES_BEFORE_FAST {
                tracing::info!("the store answers again: no longer failing fast");
            }
            self.fast_for.store(0, Relaxed);
            return;
        }
        let failures = self.failures.fetch_add(1, Relaxed).saturating_add(1);
        if failures >= FAILURES_BEFORE_FAST {
            let next = match self.fast_for.load(Relaxed) {
                0 => nanos(FAST_FIRST),
                last => last.saturating_mul(2).min(nanos(FAST_MOST)),
            };
            self.fast_for.store(next, Relaxed);
            let until = self.clock.unix_nanos().saturating_add(i64::try_from(next).unwrap_or(i64::MAX));
            self.fast_until.store(until, Relaxed);
            if failures == FAILURES_BEFORE_FAST {
                tracing::warn!(failures, "the store keeps failing: requests fail fast for a moment, then probe it");
            }
        }
    }

    /// Counts a store error, and logs it once per burst: the first of a burst at once, then at
    /// most one line every [`STORE_ERROR_LOG_EVERY`] with the number of errors since the last
    /// line (an outage does not log once per request). A lost race
    /// ([`StoreError::Conflict`]) is an answer, not a failure: neither.
    pub(crate) fn failed(&self, op: &'static str, e: &StoreError) {
        if matches!(e, StoreError::Conflict(_)) {
            return;
        }
        self.totals.store_errors.add(1);
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

    /// One store call `op` of `path`: within the path's limit (and, under
    /// [`within_deadline`], what is left of the request's); on the request path failed
    /// at once while the store fails fast, and its outcome fed to the breaker; an error
    /// counted and logged.
    ///
    /// A timeout of a call that had less than half its limit (the request's time went to the
    /// wait for a lock, or to calls before it) tells nothing of the store: it is not fed to
    /// the breaker.
    pub(crate) async fn call<T>(
        &self,
        path: Path,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let reading = path == Path::Request && READING.try_with(|()| ()).is_ok();
        if reading && self.failing_fast() {
            let e = self.fast_failure();
            self.failed(op, &e);
            return Err(e);
        }
        let fast = path == Path::Request && !reading && UNGUARDED.try_with(|()| ()).is_err();
        if fast {
            if let Err(e) = self.before() {
                self.failed(op, &e);
                return Err(e);
            }
        }
        let limit = self.limit(path);
        let now = Instant::now();
        let own = now.checked_add(limit).unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
        let (until, whole) = match DEADLINE.try_with(|d| *d) {
            Ok(deadline) if deadline < own => (deadline, deadline.saturating_duration_since(now) >= limit / 2),
            _ => (own, true),
        };
        let result = match tokio::time::timeout_at(until, CALL_DEADLINE.scope(until, fut)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(limit)),
        };
        if fast && (whole || !matches!(result, Err(StoreError::Timeout(_)))) {
            self.after(&result);
        }
        if let Err(e) = &result {
            self.failed(op, e);
        }
        result
    }
}

/// A store in one role, its calls made by a [`Policy`] on one [`Path`]. Implements each role
/// its store does; a role method it does not forward is a compile error
/// (`clippy::missing_trait_methods`).
pub(crate) struct Limited<S: ?Sized> {
    inner: Arc<S>,
    policy: Arc<Policy>,
    path: Path,
    /// The store's `db.system` (feature `otel`): its calls' spans name it.
    #[cfg(feature = "otel")]
    system: &'static str,
}

impl<S: ?Sized + std::fmt::Debug> Limited<S> {
    pub(crate) fn new(inner: Arc<S>, policy: Arc<Policy>, path: Path) -> Self {
        #[cfg(feature = "otel")]
        let system = crate::base::trace::db_system(&*inner);
        Self {
            inner,
            policy,
            path,
            #[cfg(feature = "otel")]
            system,
        }
    }
}

impl<S: ?Sized> Limited<S> {
    /// One call of `role` (what its span names, feature `otel`) made by the policy.
    async fn call_as<T>(
        &self,
        role: &'static str,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        #[cfg(not(feature = "otel"))]
        let _ = role;
        // Under a request's or a pass's span (feature `otel`): the call is its child span.
        #[cfg(feature = "otel")]
        {
            use opentelemetry::{context::FutureExt as _, KeyValue};
            let span = crate::base::trace::CallSpan::start(op, || {
                vec![
                    KeyValue::new("db.system", self.system),
                    KeyValue::new("db.operation.name", op),
                    KeyValue::new("tollgate.store.role", role),
                ]
            });
            if let Some(cx) = span.context().cloned() {
                let result = self.policy.call(self.path, op, fut).with_context(cx).await;
                span.end(match &result {
                    Ok(_) => "ok",
                    Err(StoreError::Timeout(_)) => "timeout",
                    Err(StoreError::Conflict(_)) => "conflict",
                    Err(_) => "error",
                });
                return result;
            }
        }
        self.policy.call(self.path, op, fut).await
    }
}

impl<S: ?Sized + std::fmt::Debug> std::fmt::Debug for Limited<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limited").field("store", &self.inner).field("path", &self.path).finish()
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: QuotaStore + ?Sized> QuotaStore for Limited<S> {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        self.call_as("quota", "reserve quota", self.inner.reserve(r)).await
    }

    async fn release(&self, releases: &[Release]) -> Vec<Result<(), StoreError>> {
        // One call for the policy: a batch every release of which failed is a failed call
        // (counted, and within the path's time limit as a whole).
        let answer = self
            .call_as("quota", "release quota", async {
                let results = self.inner.release(releases).await;
                match results.first() {
                    Some(Err(e)) if results.iter().all(Result::is_err) => Err(e.duplicate()),
                    _ => Ok(results),
                }
            })
            .await;
        match answer {
            Ok(results) => results,
            Err(e) => releases.iter().map(|_| Err(e.duplicate())).collect(),
        }
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        self.call_as("quota", "grant credits", self.inner.grant_credits(grant)).await
    }

    async fn credit_grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), StoreError> {
        self.call_as("quota", "read credit grants", self.inner.credit_grants(tenant, meter)).await
    }

    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError> {
        self.call_as("quota", "close credits", self.inner.close_credits(tenant, meter, id, revoke, now)).await
    }

    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        self.call_as("quota", "refund credits", self.inner.refund_credits(refund)).await
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError> {
        self.call_as("quota", "list expired credits", self.inner.expired_credits(now, limit)).await
    }

    async fn counters(&self, tenant: &TenantId, meter: &MeterId) -> Result<Vec<QuotaCounter>, StoreError> {
        self.call_as("quota", "read quota counters", self.inner.counters(tenant, meter)).await
    }

    async fn values(
        &self,
        call: &crate::store::ValueCall,
        mode: crate::store::ValueMode,
    ) -> Result<crate::store::HeldValues, StoreError> {
        self.call_as("quota", mode.name(), self.inner.values(call, mode)).await
    }

    async fn payments(
        &self,
        call: &crate::store::PaymentCall,
        now: i64,
    ) -> Result<crate::store::PaymentAnswer, StoreError> {
        let what =
            if matches!(call, crate::store::PaymentCall::Read { .. }) { "read payments" } else { "record a payment" };
        self.call_as("quota", what, self.inner.payments(call, now)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: UsageStore + ?Sized> UsageStore for Limited<S> {
    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError> {
        self.call_as("usage", "flush usage", self.inner.commit_usage(batch)).await
    }

    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError> {
        self.call_as("usage", "record usage events", self.inner.commit_events(events)).await
    }

    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError> {
        self.call_as("usage", "read usage", self.inner.usage_range(tenant, from, to)).await
    }

    async fn tallies(&self, query: &crate::store::TallyQuery) -> Result<Vec<crate::store::Tally>, StoreError> {
        self.call_as("usage", "read tallies", self.inner.tallies(query)).await
    }

    fn max_batch_records(&self) -> usize {
        self.inner.max_batch_records()
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: ExportStore + ?Sized> ExportStore for Limited<S> {
    async fn pending_exports(
        &self,
        window_start_before: i64,
        after: Option<&ExportKey>,
        limit: usize,
    ) -> Result<Vec<UsageAggregate>, StoreError> {
        self.call_as("export", "list pending exports", self.inner.pending_exports(window_start_before, after, limit))
            .await
    }

    async fn begin_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError> {
        self.call_as("export", "begin export", self.inner.begin_export(aggregate, claim, send)).await
    }

    async fn defer_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        deferral: Deferral,
    ) -> Result<bool, StoreError> {
        self.call_as("export", "defer export", self.inner.defer_export(aggregate, claim, deferral)).await
    }

    async fn finish_export(&self, aggregate: &UsageAggregate, now: i64) -> Result<bool, StoreError> {
        self.call_as("export", "finish export", self.inner.finish_export(aggregate, now)).await
    }

    async fn dead_letter(&self, aggregate: &UsageAggregate, reason: &str) -> Result<(), StoreError> {
        self.call_as("export", "dead-letter", self.inner.dead_letter(aggregate, reason)).await
    }

    async fn dead_letters(&self, after: Option<&ExportKey>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.call_as("export", "list dead letters", self.inner.dead_letters(after, limit)).await
    }

    async fn requeue_dead_letter(&self, key: &ExportKey) -> Result<bool, StoreError> {
        self.call_as("export", "requeue a dead letter", self.inner.requeue_dead_letter(key)).await
    }

    fn is_durable(&self) -> bool {
        self.inner.is_durable()
    }

    async fn identifier_namespace(&self) -> Result<String, StoreError> {
        self.call_as("export", "read the identifier namespace", self.inner.identifier_namespace()).await
    }

    async fn set_identifier_namespace(&self, current: &str, new: &str) -> Result<bool, StoreError> {
        self.call_as("export", "set the identifier namespace", self.inner.set_identifier_namespace(current, new)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: LedgerStore + ?Sized> LedgerStore for Limited<S> {
    async fn ledger(
        &self,
        hour: i64,
        after: Option<(&ExportKey, u32)>,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        self.call_as("ledger", "read the ledger", self.inner.ledger(hour, after, limit)).await
    }

    async fn note_lacking(&self, entry: &LedgerEntry, now: i64) -> Result<i64, StoreError> {
        self.call_as("ledger", "note lacking units", self.inner.note_lacking(entry, now)).await
    }

    async fn clear_lacking(&self, entry: &LedgerEntry) -> Result<(), StoreError> {
        self.call_as("ledger", "clear lacking units", self.inner.clear_lacking(entry)).await
    }

    async fn reexport(&self, entry: &LedgerEntry) -> Result<bool, StoreError> {
        self.call_as("ledger", "export again", self.inner.reexport(entry)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: DirectoryStore + ?Sized> DirectoryStore for Limited<S> {
    async fn find_key(&self, key: &KeyHash) -> Result<Option<TenantRecord>, StoreError> {
        self.call_as("directory", "find key", self.inner.find_key(key)).await
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        self.call_as("directory", "find tenant", self.inner.tenant(id)).await
    }

    async fn tenant_by_customer(&self, customer: &str) -> Result<Option<TenantRecord>, StoreError> {
        self.call_as("directory", "find tenant by customer", self.inner.tenant_by_customer(customer)).await
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>, StoreError> {
        self.call_as("directory", "list tenants", self.inner.list_tenants(after, limit)).await
    }

    async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.call_as("directory", "list keys", self.inner.list_keys(tenant)).await
    }

    async fn key(&self, key: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.call_as("directory", "read key", self.inner.key(key)).await
    }

    async fn put_tenant(&self, record: &TenantRecord, keys: &[KeyHash]) -> Result<(), StoreError> {
        self.call_as("directory", "put tenant", self.inner.put_tenant(record, keys)).await
    }

    async fn put_key(&self, key: &ApiKeyRecord, when: KeyWrite) -> Result<(), StoreError> {
        self.call_as("directory", "put key", self.inner.put_key(key, when)).await
    }

    async fn remove_key(&self, key: &KeyHash) -> Result<(), StoreError> {
        self.call_as("directory", "remove key", self.inner.remove_key(key)).await
    }

    async fn update_tenant(&self, update: &TenantUpdate, when: UpdateWhen<'_>) -> Result<bool, StoreError> {
        let what = match update {
            TenantUpdate::Plan(..) => "set plan",
            TenantUpdate::Customer(..) => "set customer",
            TenantUpdate::MetronomeCustomer(..) => "set Metronome customer",
            TenantUpdate::Overrides(..) => "set overrides",
            TenantUpdate::AlertEndpoint(..) => "set alert endpoint",
        };
        self.call_as("directory", what, self.inner.update_tenant(update, when)).await
    }

    async fn apply_plan_change(&self, change: &PlanChange) -> Result<PlanChangeOutcome, StoreError> {
        self.call_as("directory", "apply plan change", self.inner.apply_plan_change(change)).await
    }

    async fn changes(&self, call: ChangeCall<'_>) -> Result<Changes, StoreError> {
        let what = match call {
            ChangeCall::Tell { .. } => "tell a tenant changed",
            ChangeCall::Read => "read the tenants changed",
        };
        self.call_as("directory", what, self.inner.changes(call)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: IdempotencyStore + ?Sized> IdempotencyStore for Limited<S> {
    async fn claim_idempotency(&self, claim: &IdempotencyClaim) -> Result<IdempotencyState, StoreError> {
        self.call_as("idempotency", "claim idempotency key", self.inner.claim_idempotency(claim)).await
    }

    async fn read_idempotency(
        &self,
        key: &str,
        request: &str,
        now: i64,
    ) -> Result<Option<IdempotencyState>, StoreError> {
        self.call_as("idempotency", "read idempotent response", self.inner.read_idempotency(key, request, now)).await
    }

    async fn settle_idempotency(
        &self,
        key: &str,
        owner: u64,
        how: &IdempotencySettle,
    ) -> Result<IdempotencySettled, StoreError> {
        self.call_as("idempotency", "settle idempotency key", self.inner.settle_idempotency(key, owner, how)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: RateStore + ?Sized> RateStore for Limited<S> {
    async fn take_cells(&self, call: &crate::store::CellCall) -> Result<crate::store::CellGrant, StoreError> {
        self.call_as("rate", "take rate cells", self.inner.take_cells(call)).await
    }

    async fn return_cells(&self, call: &crate::store::CellReturn) -> Result<(), StoreError> {
        self.call_as("rate", "return rate cells", self.inner.return_cells(call)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: PlaceStore + ?Sized> PlaceStore for Limited<S> {
    async fn places(
        &self,
        call: &crate::store::PlaceCall,
        mode: crate::store::PlaceMode,
    ) -> Result<crate::store::Places, StoreError> {
        self.call_as("places", mode.name(), self.inner.places(call, mode)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: OutboxStore + ?Sized> OutboxStore for Limited<S> {
    async fn put_alerts(&self, entries: &[crate::store::OutboxEntry]) -> Result<usize, StoreError> {
        self.call_as("alerts", "put alerts", self.inner.put_alerts(entries)).await
    }

    async fn claim_alerts(
        &self,
        claim: &crate::store::AlertClaim,
    ) -> Result<Vec<crate::store::OutboxEntry>, StoreError> {
        self.call_as("alerts", "claim alerts", self.inner.claim_alerts(claim)).await
    }

    async fn settle_alert(
        &self,
        key: &crate::store::AlertKey,
        owner: u64,
        outcome: &crate::store::AlertOutcome,
    ) -> Result<bool, StoreError> {
        self.call_as("alerts", "settle an alert", self.inner.settle_alert(key, owner, outcome)).await
    }

    async fn list_alerts(
        &self,
        query: &crate::store::AlertQuery,
    ) -> Result<Vec<crate::store::OutboxEntry>, StoreError> {
        self.call_as("alerts", "list alerts", self.inner.list_alerts(query)).await
    }

    async fn requeue_alert(&self, key: &crate::store::AlertKey, now: i64) -> Result<bool, StoreError> {
        self.call_as("alerts", "requeue an alert", self.inner.requeue_alert(key, now)).await
    }

    async fn prune_alerts(&self, now: i64) -> Result<u64, StoreError> {
        self.call_as("alerts", "prune alerts", self.inner.prune_alerts(now)).await
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: crate::store::AuditStore + ?Sized> crate::store::AuditStore for Limited<S> {
    async fn append_audit(&self, record: &crate::store::AuditRecord) -> Result<i64, StoreError> {
        self.call_as("audit", "append an audit record", self.inner.append_audit(record)).await
    }

    async fn list_audit(&self, query: &crate::store::AuditQuery) -> Result<Vec<crate::store::AuditRecord>, StoreError> {
        self.call_as("audit", "list audit records", self.inner.list_audit(query)).await
    }

    async fn prune_audit(&self, before: i64) -> Result<u64, StoreError> {
        self.call_as("audit", "prune audit records", self.inner.prune_audit(before)).await
    }
}
