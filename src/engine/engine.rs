//! The shared engine: one per application, behind every front door.

use std::{borrow::Cow, fmt, num::NonZeroU32, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use governor::clock::Clock as _;
use tokio::sync::{mpsc, watch, Notify};

use super::{
    flush::Pipeline,
    idempotency::{check_key, Claim, Idempotency, Verdict},
    lease::Refill,
    table::{Lookup, TenantTable, ANONYMOUS},
    Ticket,
};
use crate::{
    billing::BillingSink,
    clock::Clock,
    config::{HeaderStyle, StoreErrorPolicy, TenantId},
    metrics::{Metrics, Stats, Totals},
    plan::{RouteCost, Runtime},
    response::{HeaderState, Rejection, RejectionKind},
    store::{Store, StoreError},
    tenant::{check_api_key, Credential, QuotaRef, Take, Tenant, TenantState},
};

/// A request as the engine sees it, whatever the framework.
///
/// ```
/// use tollgate::{Credential, RequestInfo};
/// let info = RequestInfo::new("POST", "/v1/orders", Credential::ApiKey(b"tg_test_acme"))
///     .with_query(Some("dry_run=1"))
///     .with_idempotency_key(b"order-7");
/// assert_eq!(info.path, "/v1/orders");
/// ```
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RequestInfo<'a> {
    /// The method, such as `GET`.
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// The query string, without the `?`, if the URI has one.
    pub query: Option<&'a str>,
    /// What identifies the tenant.
    pub credential: Credential<'a>,
    /// The `Idempotency-Key` header, if present (ignored on methods that do not honour it).
    pub idempotency_key: Option<&'a [u8]>,
}

impl<'a> RequestInfo<'a> {
    /// A request with this method, path and credential, no query and no `Idempotency-Key`.
    pub fn new(method: &'a str, path: &'a str, credential: Credential<'a>) -> Self {
        Self { method, path, query: None, credential, idempotency_key: None }
    }

    /// With a query string (without the `?`).
    #[must_use]
    pub fn with_query(mut self, query: Option<&'a str>) -> Self {
        self.query = query;
        self
    }

    /// With an `Idempotency-Key` header value.
    #[must_use]
    pub fn with_idempotency_key(mut self, key: &'a [u8]) -> Self {
        self.idempotency_key = Some(key);
        self
    }
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
    route: RouteCost,
    idempotency: Option<(Box<[u8]>, u128)>,
}

enum Stage {
    Resolve { credential: OwnedCredential },
    Quota(Box<Partial>),
}

pub(crate) enum OwnedCredential {
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

/// No quota units were taken (no quota on the meter, or a replay).
pub(crate) const NO_TAG: u32 = u32::MAX;

impl fmt::Debug for PendingAdmission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = match &self.stage {
            Stage::Resolve { .. } => "resolve tenant",
            Stage::Quota(_) => "lease quota",
        };
        f.debug_struct("PendingAdmission").field("stage", &stage).field("cost", &self.route.cost).finish()
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
    /// Credentials the directory did not know, for `limits.negative_ttl`.
    pub(crate) unknown: moka::sync::Cache<(u64, u64), ()>,
    /// This engine's id in the tokens of its quota calls, drawn at random when it is built.
    pub(crate) node: u64,
    /// The sequence number of its latest quota call.
    pub(crate) seq: std::sync::atomic::AtomicU64,
    /// How many quota cells have drawn a sender id.
    pub(crate) senders: std::sync::atomic::AtomicU64,
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
                if !TenantId::is_valid(id) {
                    return self.reject(Rejection::new(
                        RejectionKind::MalformedCredentials,
                        "a tenant identity is 1 to 128 visible ASCII characters",
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
        let route = rt.route(req.method, req.path);
        let idem = req.idempotency_key.map(|k| (k, self.shared.idempotency.request(req.method, req.path, req.query)));
        match self.shared.table.get(lookup) {
            Some(state) => self.decide(state, route, idem),
            None => {
                let credential = match lookup {
                    Lookup::ApiKey(k) => OwnedCredential::ApiKey(k.into()),
                    Lookup::Identity(ANONYMOUS) => OwnedCredential::Anonymous,
                    Lookup::Identity(t) => OwnedCredential::Tenant(t.into()),
                };
                Admission::Pending(PendingAdmission {
                    stage: Stage::Resolve { credential },
                    route,
                    idempotency: idem.map(|(k, r)| (k.into(), r)),
                })
            }
        }
    }

    /// Finishes a pending admission: asks the store, within `usage.store_timeout`.
    pub async fn resolve(&self, pending: PendingAdmission) -> Result<Ticket, Rejection> {
        let PendingAdmission { stage, route, idempotency } = pending;
        let partial = match stage {
            Stage::Quota(partial) => partial,
            Stage::Resolve { credential } => {
                let state = match self.lookup(credential).await {
                    Ok(state) => state,
                    Err(rejection) => return Err(self.count(rejection)),
                };
                match self.decide(state, route, idempotency.as_ref().map(|(k, r)| (&k[..], *r))) {
                    Admission::Admitted(t) => return Ok(t),
                    Admission::Rejected(r) => return Err(r),
                    Admission::Pending(PendingAdmission { stage: Stage::Quota(p), .. }) => p,
                    Admission::Pending(_) => unreachable!("decide never asks to resolve a tenant"),
                }
            }
        };
        self.lease_and_take(*partial, route).await
    }

    /// Rate, idempotency and quota for a known tenant, without waiting.
    #[inline]
    fn decide(&self, state: Tenant, route: RouteCost, idem: Option<(&[u8], u128)>) -> Admission {
        let (meter, cost) = (route.meter, route.cost);
        let (charged, claim) = match idem {
            None => (true, None),
            Some((key, request)) => match self.shared.idempotency.check(&state.id, key, request) {
                Verdict::First(claim) => (true, Some(claim)),
                Verdict::Replay => {
                    self.shared.metrics.replays.increment(1);
                    (false, None)
                }
                Verdict::InFlight => {
                    let r = Rejection::new(
                        RejectionKind::IdempotencyKeyInUse,
                        "a request with this Idempotency-Key is still being processed",
                    );
                    return self.reject(r.with_retry_after(1).for_tenant(&state));
                }
                Verdict::Mismatch => {
                    let r = Rejection::new(
                        RejectionKind::IdempotencyKeyMismatch,
                        "this Idempotency-Key was used for another request (method or path)",
                    );
                    return self.reject(r.for_tenant(&state));
                }
            },
        };
        let plan = &state.plan;
        let mut headers = HeaderState::new(meter, route.shape);
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
                    // Retry-After: until this request could pass; t: until the bucket is
                    // full again, as on a 200.
                    let retry = ceil_secs(wait).max(1);
                    let full = wait + Duration::from_nanos(policy.nanos(policy.burst.get().saturating_sub(cost)));
                    drop(claim);
                    headers.set_rate(0, ceil_secs(full).max(1));
                    self.quota_headers(&state, &mut headers, meter, now);
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
        if route.reports != 0 {
            match self.check_reports(&state, route.reports, now) {
                Ok(()) => {}
                Err((m, Take::Exhausted)) => {
                    if let Some(policy) = &plan.rate {
                        state.give_back_cells(policy.nanos(cost));
                        headers.give_back(cost, policy.burst.get());
                    }
                    let p = Partial { state, headers, claim, charged, at: now };
                    return self.reject(self.quota_exceeded(p, m));
                }
                Err(_) => {
                    return Admission::Pending(PendingAdmission {
                        stage: Stage::Quota(Box::new(Partial { state, headers, claim, charged, at: now })),
                        route,
                        idempotency: None,
                    })
                }
            }
        }
        match self.take_units(&state, &mut headers, meter, cost, charged, now) {
            Ok(quota_tag) => {
                self.shared.metrics.admitted.increment(1);
                Admission::Admitted(Ticket {
                    state,
                    headers,
                    quota_tag,
                    at: now,
                    claim: claim.map(Box::new),
                    cost,
                    charged,
                    done: false,
                })
            }
            Err(Take::Exhausted) => {
                // Refused for its quota: the request spends no rate cells.
                if let Some(policy) = &plan.rate {
                    state.give_back_cells(policy.nanos(cost));
                    headers.give_back(cost, policy.burst.get());
                }
                self.reject(self.quota_exceeded(Partial { state, headers, claim, charged, at: now }, meter))
            }
            Err(_) => Admission::Pending(PendingAdmission {
                stage: Stage::Quota(Box::new(Partial { state, headers, claim, charged, at: now })),
                route,
                idempotency: None,
            }),
        }
    }

    /// Whether the hard quotas of the meters a route's handler reports still have units: the
    /// first that does not (spent, or only the store can tell), with why.
    #[inline]
    fn check_reports(&self, state: &Tenant, reports: u64, now: i64) -> Result<(), (usize, Take)> {
        let mut bits = reports;
        while bits != 0 {
            let m = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(cell) = state.quota(m) {
                cell.check_units(1, now).map_err(|why| (m, why))?;
            }
        }
        Ok(())
    }

    /// Takes quota units from the local lease, in place. `Ok`: the tag of the period they
    /// were taken from ([`NO_TAG`]: none were, the meter has no quota or the request is a
    /// replay); `Err`: [`Take::Exhausted`], or [`Take::NeedLease`] (refill the lease first).
    #[inline]
    fn take_units(
        &self,
        state: &Tenant,
        headers: &mut HeaderState,
        meter: usize,
        cost: u32,
        charged: bool,
        at: i64,
    ) -> Result<u32, Take> {
        let Some(cell) = state.quota(meter) else {
            return Ok(NO_TAG);
        };
        if !charged {
            // A replay takes nothing, but a hard quota must still have the units.
            return cell.check_units(u64::from(cost), at).map(|()| NO_TAG);
        }
        match cell.try_take(u64::from(cost), at) {
            Take::Taken { left, tag } => {
                self.taken(state, headers, meter, cell, cost, left, at);
                Ok(u32::from(tag))
            }
            other => Err(other),
        }
    }

    /// Headers, overage and prefetch after units were taken, `left` remaining in the lease.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn taken(
        &self,
        state: &Tenant,
        headers: &mut HeaderState,
        meter: usize,
        cell: QuotaRef<'_>,
        cost: u32,
        left: i64,
        at: i64,
    ) {
        let informed = state.plan.header_style != HeaderStyle::None;
        // The estimate reads the cold part of the quota: only for soft quotas (overage)
        // and headers.
        if informed || !cell.hard() {
            let (remaining, overage) = cell.estimate(left);
            if overage {
                state.plan.metrics.overage_units.increment(u64::from(cost));
            }
            if informed {
                let (_, end) = cell.period();
                headers.set_quota(remaining, (end - at).max(0) as u64);
            }
        }
        if cell.wants_prefetch(left) {
            self.request_prefetch(state, meter, cell);
        }
    }

    /// The quota's header item for a request refused before it took units: what remains,
    /// read without taking.
    fn quota_headers(&self, state: &Tenant, headers: &mut HeaderState, meter: usize, at: i64) {
        if state.plan.header_style == HeaderStyle::None {
            return;
        }
        if let Some(cell) = state.quota(meter) {
            let (_, end) = cell.period();
            let (remaining, _) = if at < end { cell.estimate(cell.lease()) } else { (cell.spec.limit().get(), false) };
            let end = if at < end { end } else { cell.spec.period().bounds(at).1 };
            headers.set_quota(remaining, (end - at).max(0) as u64);
        }
    }

    #[inline]
    fn ticket(&self, p: Partial, cost: u32, quota_tag: u32) -> Ticket {
        Ticket {
            headers: p.headers,
            state: p.state,
            cost,
            charged: p.charged,
            quota_tag,
            at: p.at,
            claim: p.claim.map(Box::new),
            done: false,
        }
    }

    fn quota_exceeded(&self, mut p: Partial, meter: usize) -> Rejection {
        // Refused: the key is released (the claim's drop).
        p.claim = None;
        let state = p.state.clone();
        let cell = state.quota(meter).expect("a quota rejection names a meter with a quota");
        p.headers.set_meter(meter);
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

    /// Takes the units with the quota cell's lock held: from the lease if a refill came in
    /// meanwhile, else straight from a new reservation, so that no other request can take
    /// them first. Bounded by `store_timeout`, then `on_store_error` applies. A hard quota
    /// refuses only when the store has fewer units left than the request costs.
    async fn lease_and_take(&self, mut p: Partial, route: RouteCost) -> Result<Ticket, Rejection> {
        let (meter, cost) = (route.meter, route.cost);
        let timeout = self.shared.runtime.load().config.usage.store_timeout;
        let state = p.state.clone();
        if route.reports != 0 {
            p = self.check_reports_with_store(p, route).await?;
        }
        let Some(cell) = state.quota(meter) else {
            return Ok(self.ticket(p, cost, NO_TAG));
        };
        let at = p.at;
        let charged = p.charged;
        let outcome = with_timeout(timeout, async {
            let _guard = cell.lock().lock().await;
            // A call left in flight by a timeout may have landed: its units come first.
            self.settle_inflight(cell).await?;
            if !charged {
                // A replay: the units must be there, but are not taken.
                if cell.check_units(u64::from(cost), at).is_err() {
                    self.refill_locked(&state, cell, at, 0).await?;
                }
                return Ok(match cell.check_units(u64::from(cost), at) {
                    Ok(()) => Ok((None, cell.lease(), None)),
                    Err(_) => Err(()),
                });
            }
            match cell.try_take(u64::from(cost), at) {
                Take::Taken { left, tag } => return Ok(Ok((Some(tag), left, None))),
                Take::Exhausted => return Ok(Err(())),
                Take::NeedLease => {}
            }
            match self.refill_locked(&state, cell, at, u64::from(cost)).await? {
                Refill::Taken { tag, start } => Ok(Ok((Some(tag), cell.lease(), Some(start)))),
                Refill::Short | Refill::Done => Ok(Err(())),
            }
        })
        .await;
        match outcome {
            Ok(Ok((tag, left, start))) => {
                if let Some(start) = start {
                    // A request read the clock just before a period that another one rolled
                    // in: its units come from the new period, and so does its usage.
                    p.at = p.at.max(start);
                }
                let tag = match tag {
                    Some(tag) => {
                        self.taken(&p.state, &mut p.headers, meter, cell, cost, left, p.at);
                        u32::from(tag)
                    }
                    None => NO_TAG,
                };
                self.shared.metrics.admitted.increment(1);
                Ok(self.ticket(p, cost, tag))
            }
            Ok(Err(())) => {
                if let Some(policy) = &p.state.plan.rate {
                    p.state.give_back_cells(policy.nanos(cost));
                    p.headers.give_back(cost, policy.burst.get());
                }
                Err(self.count(self.quota_exceeded(p, meter)))
            }
            Err(e) => {
                self.store_error("reserve quota", &e);
                match p.state.plan.on_store_error {
                    StoreErrorPolicy::FailOpen => {
                        // Admitted without a lease: its units are owed, and charged to the
                        // period (past the limit if need be) once the store answers again.
                        let tag = if charged {
                            cell.force_take(u64::from(cost), at).map_or(NO_TAG, u32::from)
                        } else {
                            NO_TAG
                        };
                        self.shared.metrics.admitted.increment(1);
                        Ok(self.ticket(p, cost, tag))
                    }
                    StoreErrorPolicy::FailClosed => {
                        p.claim = None;
                        let r =
                            Rejection::new(RejectionKind::StoreUnavailable, "the quota store did not answer in time");
                        Err(self.count(r.with_retry_after(1).for_tenant(&p.state)))
                    }
                }
            }
        }
    }

    /// [`check_reports`](Self::check_reports), asking the store where the lease cannot
    /// tell: a reported meter's debt is owed first, and the store then says whether units are
    /// left.
    async fn check_reports_with_store(&self, mut p: Partial, route: RouteCost) -> Result<Partial, Rejection> {
        let timeout = self.shared.runtime.load().config.usage.store_timeout;
        let state = p.state.clone();
        let mut bits = route.reports;
        while bits != 0 {
            let m = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let Some(cell) = state.quota(m) else { continue };
            if cell.check_units(1, p.at).is_ok() {
                continue;
            }
            let checked = with_timeout(timeout, async {
                let _guard = cell.lock().lock().await;
                self.settle_inflight(cell).await?;
                if let Err(Take::NeedLease) = cell.check_units(1, p.at) {
                    self.refill_locked(&state, cell, p.at, 0).await?;
                }
                Ok(cell.check_units(1, p.at))
            })
            .await;
            match checked {
                Ok(Err(Take::Exhausted)) => {
                    if let Some(policy) = &p.state.plan.rate {
                        p.state.give_back_cells(policy.nanos(route.cost));
                        p.headers.give_back(route.cost, policy.burst.get());
                    }
                    return Err(self.count(self.quota_exceeded(p, m)));
                }
                Ok(_) => {}
                Err(e) => {
                    self.store_error("reserve quota", &e);
                    if p.state.plan.on_store_error == StoreErrorPolicy::FailClosed {
                        p.claim = None;
                        let r =
                            Rejection::new(RejectionKind::StoreUnavailable, "the quota store did not answer in time");
                        return Err(self.count(r.with_retry_after(1).for_tenant(&p.state)));
                    }
                }
            }
        }
        Ok(p)
    }

    fn request_prefetch(&self, state: &Tenant, meter: usize, cell: QuotaRef<'_>) {
        if self.shared.prefetch.try_send(Prefetch { state: state.clone(), meter }).is_err() {
            cell.prefetch_done();
        }
    }

    fn reject(&self, rejection: Rejection) -> Admission {
        Admission::Rejected(self.count(rejection))
    }

    pub(crate) fn count(&self, rejection: Rejection) -> Rejection {
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
