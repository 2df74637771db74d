//! The shared engine: one per application, behind every front door.

use std::{borrow::Cow, fmt, num::NonZeroU32, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use governor::clock::Clock as _;
use tokio::sync::{mpsc, watch, Notify};

use super::{
    idempotency::{check_key, Claim, Idempotency},
    metrics::{Metrics, Stats, Totals},
    pipeline::Pipeline,
    table::{Lookup, TenantTable, ANONYMOUS},
    Ticket,
};
use crate::{
    billing::BillingSink,
    clock::Clock,
    config::{HeaderStyle, QuotaMode, StoreErrorPolicy, TenantId},
    plan::{CompiledPlan, Runtime},
    response::{HeaderState, Rejection, RejectionKind},
    store::{QuotaKey, Store, StoreError},
    tenant::{check_api_key, Credential, KeyHash, QuotaRef, Take, Tenant, TenantState},
};

/// A request as the engine sees it, whatever the framework.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The method, such as `GET`.
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// What identifies the tenant.
    pub credential: Credential<'a>,
    /// The `Idempotency-Key` header, if present.
    pub idempotency_key: Option<&'a [u8]>,
}

/// The engine's answer to a request.
#[derive(Debug)]
#[must_use]
pub enum Admission {
    /// Go ahead; complete the ticket with the response status.
    Admitted(Ticket),
    /// Answer with this rejection.
    Rejected(Rejection),
    /// The engine must ask the store first (an unseen tenant, or an empty quota lease): await
    /// [`Tollgate::resolve`].
    Pending(PendingAdmission),
}

/// A request waiting on the store. Await [`Tollgate::resolve`] with it.
pub struct PendingAdmission {
    stage: Stage,
    meter: usize,
    cost: u32,
    idempotency_key: Option<Box<[u8]>>,
}

enum Stage {
    Resolve { credential: OwnedCredential },
    Quota(Box<Partial>),
}

enum OwnedCredential {
    ApiKey(Box<[u8]>),
    Tenant(TenantId),
    Anonymous,
}

/// A request that passed the rate check and waits for quota units.
struct Partial {
    state: Tenant,
    headers: HeaderState,
    claim: Option<Claim>,
    charged: bool,
    at: i64,
}

impl fmt::Debug for PendingAdmission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = match &self.stage {
            Stage::Resolve { .. } => "resolve tenant",
            Stage::Quota(_) => "lease quota",
        };
        f.debug_struct("PendingAdmission").field("stage", &stage).field("cost", &self.cost).finish()
    }
}

pub(crate) struct Prefetch {
    pub(crate) state: Tenant,
    pub(crate) meter: usize,
}

pub(crate) struct Shared {
    pub(crate) runtime: ArcSwap<Runtime>,
    pub(crate) table: TenantTable,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) sink: Option<Arc<dyn BillingSink>>,
    pub(crate) clock: Clock,
    pub(crate) idempotency: Idempotency,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) totals: Totals,
    pub(crate) prefetch: mpsc::Sender<Prefetch>,
    pub(crate) pipeline: tokio::sync::Mutex<Pipeline>,
    pub(crate) sweep_now: Notify,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Serialize the refills of one quota cell (striped: the request path never takes them).
    pub(crate) refill_locks: Box<[tokio::sync::Mutex<()>]>,
}

/// Derefs to the engine's configuration slot, for [`arc_swap::Cache`].
#[derive(Clone)]
pub(crate) struct RuntimeSource(Arc<Shared>);

impl std::ops::Deref for RuntimeSource {
    type Target = ArcSwap<Runtime>;

    fn deref(&self) -> &ArcSwap<Runtime> {
        &self.0.runtime
    }
}

/// A front door's copy of the configuration in force: one relaxed load per request to see
/// whether a reload replaced it, instead of a shared-counter update.
#[derive(Clone)]
pub(crate) struct RuntimeCache(arc_swap::Cache<RuntimeSource, Arc<Runtime>>);

impl RuntimeCache {
    #[inline]
    pub(crate) fn load(&mut self) -> &Arc<Runtime> {
        self.0.load()
    }
}

impl fmt::Debug for RuntimeCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RuntimeCache")
    }
}

/// The engine: tenants, plans, counters and the usage pipeline, shared by every front door
/// and every clone of them. A cheap `Clone` handle.
///
/// Build it with [`Tollgate::builder`]. Front doors call [`admit`](Self::admit) per request;
/// operations call [`flush`](Self::flush), [`shutdown`](Self::shutdown) and
/// [`reload`](Self::reload).
#[derive(Clone)]
pub struct Tollgate {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for Tollgate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tollgate")
            .field("tenants", &self.shared.table.len())
            .field("store", &self.shared.store)
            .finish_non_exhaustive()
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Tollgate {
    /// Decides on a request without waiting. Most requests of known tenants are decided here;
    /// the rest come back as [`Admission::Pending`].
    #[inline]
    pub fn admit(&self, req: &RequestInfo<'_>) -> Admission {
        self.admit_with(|_| *req)
    }

    /// Like [`admit`](Self::admit), for front doors that need the configured way of
    /// identifying tenants to describe the request. An `Idempotency-Key` on a method the
    /// configuration does not list (`limits.idempotency_methods`) is ignored.
    #[inline]
    pub fn admit_with<'a>(&self, describe: impl FnOnce(&crate::config::Identify) -> RequestInfo<'a>) -> Admission {
        let rt = self.shared.runtime.load();
        let mut req = describe(&rt.config.identify);
        if !rt.honours_idempotency(req.method) {
            req.idempotency_key = None;
        }
        self.admit_in(&rt, &req)
    }

    /// The configuration compiled for the request path, for front doors that keep a
    /// [`RuntimeCache`].
    pub(crate) fn runtime_cache(&self) -> RuntimeCache {
        RuntimeCache(arc_swap::Cache::new(RuntimeSource(self.shared.clone())))
    }

    /// Decides on a request described against `rt`, whose `idempotency_key` is only set on
    /// methods that honour it.
    #[inline]
    pub(crate) fn admit_in(&self, rt: &Runtime, req: &RequestInfo<'_>) -> Admission {
        if let Some(key) = req.idempotency_key {
            if let Err(why) = check_key(key) {
                return self.reject(Rejection::new(RejectionKind::MalformedIdempotencyKey, why));
            }
        }
        let lookup = match req.credential {
            Credential::ApiKey(key) => {
                if let Err(why) = check_api_key(key) {
                    return self.reject(Rejection::new(RejectionKind::MalformedCredentials, why));
                }
                Lookup::ApiKey(key)
            }
            Credential::Tenant(id) => {
                if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
                    return self.reject(Rejection::new(
                        RejectionKind::MalformedCredentials,
                        "the tenant identity must be 1 to 256 characters, none of them control characters",
                    ));
                }
                Lookup::Identity(id)
            }
            Credential::Missing if rt.anonymous.is_some() => Lookup::Identity(ANONYMOUS),
            Credential::Missing => {
                let mut r =
                    Rejection::new(RejectionKind::MissingCredentials, "the request does not identify its tenant");
                r.inner.challenge = Some(rt.challenge.clone());
                return self.reject(r);
            }
            Credential::Malformed(why) => return self.reject(Rejection::new(RejectionKind::MalformedCredentials, why)),
        };
        let (meter, cost) = rt.route(req.method, req.path);
        match self.shared.table.get(lookup) {
            Some(state) => self.decide(state, meter, cost, req.idempotency_key),
            None => {
                let credential = match lookup {
                    Lookup::ApiKey(k) => OwnedCredential::ApiKey(k.into()),
                    Lookup::Identity(ANONYMOUS) => OwnedCredential::Anonymous,
                    Lookup::Identity(t) => OwnedCredential::Tenant(t.into()),
                };
                Admission::Pending(PendingAdmission {
                    stage: Stage::Resolve { credential },
                    meter,
                    cost,
                    idempotency_key: req.idempotency_key.map(Into::into),
                })
            }
        }
    }

    /// Finishes a pending admission: asks the store, within `usage.store_timeout`.
    pub async fn resolve(&self, pending: PendingAdmission) -> Result<Ticket, Rejection> {
        let PendingAdmission { stage, meter, cost, idempotency_key } = pending;
        let partial = match stage {
            Stage::Quota(partial) => partial,
            Stage::Resolve { credential } => {
                let state = match self.lookup(credential).await {
                    Ok(state) => state,
                    Err(rejection) => return Err(self.count(rejection)),
                };
                match self.decide(state, meter, cost, idempotency_key.as_deref()) {
                    Admission::Admitted(t) => return Ok(t),
                    Admission::Rejected(r) => return Err(r),
                    Admission::Pending(PendingAdmission { stage: Stage::Quota(p), .. }) => p,
                    Admission::Pending(_) => unreachable!("decide never asks to resolve a tenant"),
                }
            }
        };
        self.lease_and_take(*partial, meter, cost).await
    }

    /// Finds (or creates) the state of a tenant the table does not know yet.
    async fn lookup(&self, credential: OwnedCredential) -> Result<Tenant, Rejection> {
        let rt = self.shared.runtime.load_full();
        let timeout = rt.config.usage.store_timeout;
        let record = match &credential {
            OwnedCredential::ApiKey(key) => {
                let hash = KeyHash::of(key);
                match rt.static_keys.get(&hash).and_then(|t| rt.static_tenants.get(t)) {
                    Some(r) => Ok(Some(r.clone())),
                    None => with_timeout(timeout, self.shared.store.find_key(&hash)).await,
                }
            }
            OwnedCredential::Tenant(id) => match rt.static_tenants.get(id) {
                Some(r) => Ok(Some(r.clone())),
                None => with_timeout(timeout, self.shared.store.tenant(id)).await,
            },
            OwnedCredential::Anonymous => Ok(None),
        };
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                self.store_error("find tenant", &e);
                // Without a tenant nothing can be billed: only an anonymous plan can fail open.
                return match &rt.anonymous {
                    Some(plan) if plan.on_store_error == StoreErrorPolicy::FailOpen => Ok(self.anonymous(&rt, plan)),
                    _ => Err(Rejection::new(
                        RejectionKind::StoreUnavailable,
                        "the tenant directory did not answer in time",
                    )
                    .with_retry_after(1)),
                };
            }
        };
        let Some(record) = record else {
            return match &rt.anonymous {
                Some(plan) => Ok(self.anonymous(&rt, plan)),
                None => {
                    let mut r =
                        Rejection::new(RejectionKind::UnknownCredentials, "the credential does not match any tenant");
                    r.inner.challenge = Some(rt.challenge.clone());
                    Err(r)
                }
            };
        };
        let Some(plan) = rt.plans.get(&record.plan) else {
            tracing::error!(tenant = %record.id, plan = %record.plan, "tenant is on a plan the configuration does not declare");
            return Err(Rejection::new(RejectionKind::StoreUnavailable, "the tenant's plan is not configured")
                .with_retry_after(60));
        };
        let lookup = match &credential {
            OwnedCredential::ApiKey(key) => Lookup::ApiKey(key),
            OwnedCredential::Tenant(id) => Lookup::Identity(id.as_str()),
            OwnedCredential::Anonymous => Lookup::Identity(ANONYMOUS),
        };
        let state = self
            .shared
            .table
            .attach(lookup, &record.id, || self.new_state(record.id.clone(), plan, record.customer.clone()));
        self.after_insert(&rt);
        Ok(state)
    }

    fn anonymous(&self, rt: &Runtime, plan: &Arc<CompiledPlan>) -> Tenant {
        let id = TenantId::from("anonymous");
        let state =
            self.shared.table.attach(Lookup::Identity(ANONYMOUS), &id, || self.new_state(id.clone(), plan, None));
        self.after_insert(rt);
        state
    }

    fn new_state(&self, id: TenantId, plan: &Arc<CompiledPlan>, customer: Option<String>) -> TenantState {
        TenantState::new(id, plan.clone(), customer.map(Arc::from), self.shared.clock.clone())
    }

    fn after_insert(&self, rt: &Runtime) {
        let tracked = self.shared.table.len();
        self.shared.metrics.tenants.set(tracked as f64);
        if tracked > rt.config.limits.max_tenants {
            self.shared.sweep_now.notify_one();
        }
    }

    /// Rate, idempotency and quota for a known tenant, without waiting.
    #[inline]
    fn decide(&self, state: Tenant, meter: usize, cost: u32, idem: Option<&[u8]>) -> Admission {
        let (charged, claim) = match idem {
            None => (true, None),
            Some(key) => match self.shared.idempotency.claim(&state.id, key) {
                Some(claim) => (true, Some(claim)),
                None => {
                    self.shared.metrics.replays.increment(1);
                    (false, None)
                }
            },
        };
        let plan = &state.plan;
        let mut headers = HeaderState::new(meter);
        let now = if let Some(policy) = &plan.rate {
            let cells = NonZeroU32::new(cost).unwrap_or(NonZeroU32::MIN);
            let checked = policy.limiter.check(&state, cells);
            // The check read the clock: its reading is the request's time.
            let now = Clock::last_check_secs();
            state.touch(now);
            match checked {
                // Header values are only computed when headers are sent.
                Ok(Ok(None)) => {}
                Ok(Ok(Some(remaining))) => {
                    let empty = policy.burst.get() - remaining.min(policy.burst.get());
                    headers.set_rate(remaining, ceil_secs(policy.rate.interval() * empty));
                }
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.shared.clock.now());
                    let retry = ceil_secs(wait).max(1);
                    if let Some(c) = claim {
                        c.release();
                    }
                    headers.set_rate(0, retry);
                    let mut r = Rejection::new(
                        RejectionKind::RateLimited,
                        Cow::Owned(format!(
                            "the rate of plan `{}` ({}, burst {}) is spent",
                            plan.id, policy.rate, policy.burst
                        )),
                    );
                    r.inner.policy = Some("rate".to_owned());
                    r.inner.headers = headers;
                    return self.reject(r.with_retry_after(retry).for_tenant(&state));
                }
                Err(_) => {
                    let r = Rejection::new(RejectionKind::RateLimited, "the request costs more than the plan's burst");
                    return self.reject(r.for_tenant(&state));
                }
            }
            now
        } else {
            let now = self.shared.clock.unix_secs();
            state.touch(now);
            now
        };
        match self.take_units(&state, &mut headers, meter, cost, charged, now) {
            Ok(quota_period_end) => {
                self.shared.metrics.admitted.increment(1);
                Admission::Admitted(Ticket {
                    state,
                    headers,
                    quota_period_end,
                    at: now,
                    claim: claim.map(Box::new),
                    cost,
                    charged,
                    done: false,
                })
            }
            Err(Take::Exhausted) => {
                self.reject(self.quota_exceeded(Partial { state, headers, claim, charged, at: now }, meter))
            }
            Err(_) => Admission::Pending(PendingAdmission {
                stage: Stage::Quota(Box::new(Partial { state, headers, claim, charged, at: now })),
                meter,
                cost,
                idempotency_key: None,
            }),
        }
    }

    /// Takes quota units from the local lease, in place. `Ok`: the end of the period they were
    /// taken from (`i64::MIN`: none were, the meter has no quota or the request is a replay);
    /// `Err`: [`Take::Exhausted`], or [`Take::NeedLease`] (refill the lease first).
    #[inline]
    fn take_units(
        &self,
        state: &Tenant,
        headers: &mut HeaderState,
        meter: usize,
        cost: u32,
        charged: bool,
        at: i64,
    ) -> Result<i64, Take> {
        let cell = match state.quota(meter) {
            Some(cell) if charged => cell,
            _ => return Ok(i64::MIN),
        };
        match cell.try_take(u64::from(cost), at) {
            Take::Taken { left } => {
                let end = cell.period_end();
                let informed = state.plan.header_style != HeaderStyle::None;
                // The estimate reads the cold part of the quota: only for soft quotas (overage)
                // and headers.
                if informed || !cell.hard() {
                    let (remaining, overage) = cell.estimate(left);
                    if overage {
                        state.plan.metrics.overage_units.increment(u64::from(cost));
                    }
                    if informed {
                        headers.set_quota(remaining, (end - at).max(0) as u64);
                    }
                }
                if cell.wants_prefetch(left) {
                    self.request_prefetch(state, meter, cell);
                }
                Ok(end)
            }
            other => Err(other),
        }
    }

    /// [`take_units`](Self::take_units) for a request that waited for a lease.
    // The large `Err` hands the partial admission back for another refill; boxing it would
    // only add an allocation there.
    #[allow(clippy::result_large_err)]
    fn take(&self, mut p: Partial, meter: usize, cost: u32) -> Result<Ticket, Result<Rejection, Partial>> {
        match self.take_units(&p.state, &mut p.headers, meter, cost, p.charged, p.at) {
            Ok(end) => Ok(self.ticket(p, cost, Some(end))),
            Err(Take::Exhausted) => Err(Ok(self.quota_exceeded(p, meter))),
            Err(_) => Err(Err(p)),
        }
    }

    #[inline]
    fn ticket(&self, p: Partial, cost: u32, period_end: Option<i64>) -> Ticket {
        Ticket {
            headers: p.headers,
            state: p.state,
            cost,
            charged: p.charged,
            quota_period_end: period_end.unwrap_or(i64::MIN),
            at: p.at,
            claim: p.claim.map(Box::new),
            done: false,
        }
    }

    fn quota_exceeded(&self, mut p: Partial, meter: usize) -> Rejection {
        if let Some(c) = p.claim {
            c.release();
        }
        let state = p.state.clone();
        let cell = state.quota(meter).expect("a quota rejection names a meter with a quota");
        let (_, end) = cell.period();
        let retry = (end - p.at).max(1) as u64;
        let policy = format!("{}-{}", cell.meter_id(), cell.spec.period().name());
        let mut r = Rejection::new(
            RejectionKind::QuotaExceeded,
            Cow::Owned(format!(
                "the {} quota of {} {} on plan `{}` is spent until the period ends",
                cell.spec.period().name(),
                cell.spec.limit(),
                cell.meter_id(),
                p.state.plan.id
            )),
        );
        r.inner.policy = Some(policy);
        p.headers.set_quota(0, retry);
        r.inner.headers = p.headers;
        r.with_retry_after(retry).for_tenant(&p.state)
    }

    /// Refills the lease from the store (bounded by `store_timeout`), then takes the units.
    async fn lease_and_take(&self, p: Partial, meter: usize, cost: u32) -> Result<Ticket, Rejection> {
        let timeout = self.shared.runtime.load().config.usage.store_timeout;
        let state = p.state.clone();
        let Some(cell) = state.quota(meter) else {
            return Ok(self.ticket(p, cost, None));
        };
        let at = p.at;
        let refilled = with_timeout(timeout, async {
            let _guard = self.refill_lock(&state, meter).lock().await;
            let (_, end) = cell.period();
            if at >= end || cell.lease() < i64::from(cost) {
                self.refill_locked(&state, cell, at, u64::from(cost)).await?;
            }
            Ok(())
        })
        .await;
        match refilled {
            Ok(()) => match self.take(p, meter, cost) {
                Ok(ticket) => {
                    self.shared.metrics.admitted.increment(1);
                    Ok(ticket)
                }
                Err(Ok(rejection)) => Err(self.count(rejection)),
                // The store granted less than the cost: the hard limit is reached.
                Err(Err(p)) => Err(self.count(self.quota_exceeded(p, meter))),
            },
            Err(e) => {
                self.store_error("reserve quota", &e);
                match p.state.plan.on_store_error {
                    StoreErrorPolicy::FailOpen => {
                        self.shared.metrics.admitted.increment(1);
                        Ok(self.ticket(p, cost, None))
                    }
                    StoreErrorPolicy::FailClosed => {
                        if let Some(c) = p.claim {
                            c.release();
                        }
                        let r =
                            Rejection::new(RejectionKind::StoreUnavailable, "the quota store did not answer in time");
                        Err(self.count(r.with_retry_after(1).for_tenant(&p.state)))
                    }
                }
            }
        }
    }

    /// Reserves a new lease for `cell`; call with `cell.refill` held.
    pub(crate) async fn refill_locked(
        &self,
        state: &TenantState,
        cell: QuotaRef<'_>,
        now: i64,
        need: u64,
    ) -> Result<(), StoreError> {
        let (_, end) = cell.period();
        if now >= end {
            let (start, end) = cell.spec.period().bounds(now);
            // The units left in a period that is over cannot be used by anyone: drop them.
            cell.roll_period(start, end);
        }
        cell.settle_unleased();
        let (start, _) = cell.period();
        let debt = (-cell.lease()).max(0) as u64;
        let now_nanos = self.shared.clock.unix_nanos();
        let size = cell.next_size(now_nanos);
        let want = size.max(need).saturating_add(debt);
        let key = QuotaKey { tenant: state.id.clone(), meter: cell.meter_id().clone(), period_start: start };
        let limit = (cell.spec.mode() == QuotaMode::Hard).then(|| cell.spec.limit().get());
        let grant = self.shared.store.reserve(&key, want, limit).await?;
        cell.leased(size, now_nanos);
        cell.grant(grant.granted, grant.reserved, want);
        Ok(())
    }

    /// The lock that serializes refills of `state`'s quota on `meter`.
    pub(crate) fn refill_lock(&self, state: &TenantState, meter: usize) -> &tokio::sync::Mutex<()> {
        let locks = &self.shared.refill_locks;
        let at = (std::ptr::from_ref(state) as usize >> 6).wrapping_add(meter.wrapping_mul(0x9e37));
        &locks[at % locks.len()]
    }

    fn request_prefetch(&self, state: &Tenant, meter: usize, cell: QuotaRef<'_>) {
        if self.shared.prefetch.try_send(Prefetch { state: state.clone(), meter }).is_err() {
            cell.prefetch_done();
        }
    }

    fn reject(&self, rejection: Rejection) -> Admission {
        Admission::Rejected(self.count(rejection))
    }

    fn count(&self, rejection: Rejection) -> Rejection {
        self.shared.metrics.rejected(rejection.kind()).increment(1);
        tracing::debug!(
            reason = rejection.kind().label(),
            tenant = rejection.tenant().map(|t| t.as_str()),
            policy = rejection.policy(),
            "request rejected"
        );
        rejection
    }

    pub(crate) fn store_error(&self, op: &'static str, e: &StoreError) {
        self.shared.metrics.store_errors.increment(1);
        Totals::add(&self.shared.totals.store_errors, 1);
        tracing::warn!(op, error = %e, "store error");
    }

    /// Counters of the background paths, and the number of tenants held.
    pub fn stats(&self) -> Stats {
        self.shared.totals.snapshot(self.shared.table.len())
    }

    /// The clock the engine reads.
    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// The store the engine writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The configuration in force.
    pub fn config(&self) -> crate::Config {
        self.shared.runtime.load().config.clone()
    }
}

pub(crate) async fn with_timeout<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Timeout(limit)),
    }
}

impl Rejection {
    pub(crate) fn with_retry_after(mut self, secs: u64) -> Self {
        self.inner.retry_after = Some(secs);
        self
    }

    pub(crate) fn for_tenant(mut self, state: &TenantState) -> Self {
        self.inner.tenant = Some(state.id.clone());
        self.inner.plan = Some(state.plan.clone());
        self
    }
}
