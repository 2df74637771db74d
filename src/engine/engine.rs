//! The shared engine: one per application, behind every front door.

use std::{fmt, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch, Notify};

use super::{
    flush::Pipeline,
    idempotency::{check_key, Claim, Idempotency},
    table::{Lookup, TenantTable, ANONYMOUS},
    Ticket,
};
use crate::{
    billing::BillingSink,
    clock::Clock,
    config::TenantId,
    metrics::{Metrics, Stats, Totals},
    plan::{RouteCost, Runtime},
    response::{HeaderState, Rejection, RejectionKind},
    store::{DirectoryStore, IdempotencyStore, QuotaStore, Roles, StoreError, UsageExportStore},
    tenant::{check_api_key, Credential, Tenant},
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
    /// The client's address (the front doors fill it in when anonymous callers are limited
    /// per address: the peer, or through trusted proxies the forwarded client).
    pub client: Option<std::net::IpAddr>,
}

impl<'a> RequestInfo<'a> {
    /// A request with this method, path and credential, no query and no `Idempotency-Key`.
    pub fn new(method: &'a str, path: &'a str, credential: Credential<'a>) -> Self {
        Self { method, path, query: None, credential, idempotency_key: None, client: None }
    }

    /// With a query string (without the `?`).
    #[must_use]
    pub fn with_query(mut self, query: Option<&'a str>) -> Self {
        self.query = query;
        self
    }

    /// With the client's address.
    #[must_use]
    pub fn with_client(mut self, client: Option<std::net::IpAddr>) -> Self {
        self.client = client;
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
    pub(crate) stage: Stage,
    pub(crate) route: RouteCost,
    pub(crate) idempotency: Option<(Box<[u8]>, u128)>,
}

pub(crate) enum Stage {
    Resolve {
        credential: OwnedCredential,
        meters: Arc<crate::plan::MeterTable>,
    },
    /// An `Idempotency-Key` this node has not seen: claimed in the store first.
    Claim(Box<KeyClaim>),
    Quota(Box<Partial>),
}

/// A request whose `Idempotency-Key` the store is asked about.
pub(crate) struct KeyClaim {
    pub(crate) state: Tenant,
    pub(crate) claim: Claim,
    pub(crate) key: Box<[u8]>,
    pub(crate) request: u128,
}

pub(crate) enum OwnedCredential {
    ApiKey(Box<[u8]>),
    Tenant(TenantId),
    Anonymous,
}

/// A request that passed the rate check and waits for quota units.
pub(crate) struct Partial {
    pub(crate) state: Tenant,
    pub(crate) headers: HeaderState,
    pub(crate) claim: Option<Claim>,
    pub(crate) charged: bool,
    pub(crate) at: i64,
}

impl fmt::Debug for PendingAdmission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = match &self.stage {
            Stage::Resolve { .. } => "resolve tenant",
            Stage::Claim(_) => "claim idempotency key",
            Stage::Quota(_) => "lease quota",
        };
        f.debug_struct("PendingAdmission").field("stage", &stage).field("cost", &self.route.cost).finish()
    }
}

pub(crate) struct Prefetch {
    pub(crate) state: Tenant,
    pub(crate) meter: usize,
}

/// A burst of store errors is logged at most once per this long.
pub(crate) const STORE_ERROR_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// When store errors were last logged, and how many came since.
#[derive(Debug, Default)]
pub(crate) struct StoreErrorLog {
    pub(crate) logged_at: std::sync::atomic::AtomicI64,
    pub(crate) unlogged: std::sync::atomic::AtomicU64,
}

pub(crate) struct Shared {
    pub(crate) runtime: ArcSwap<Runtime>,
    pub(crate) table: TenantTable,
    pub(crate) stores: Roles,
    pub(crate) store_error_log: StoreErrorLog,
    /// The usage buffer is at `usage.max_buffered_records`: fail-closed tenants are refused.
    pub(crate) buffer_full: std::sync::atomic::AtomicBool,
    /// Whether the store is the one the configuration's `[store]` names (opened by
    /// `Builder::open`), which a reload may then not change.
    pub(crate) store_configured: bool,
    pub(crate) sink: Option<Arc<dyn BillingSink>>,
    /// Quota units of usage events whose write may have landed, held for their retry (keyed
    /// by tenant and event id; bounded, expiring).
    pub(crate) held_events: moka::sync::Cache<String, super::events::HeldUnits>,
    /// Called when a tenant crosses a quota threshold.
    pub(crate) on_threshold: Option<super::ThresholdHook>,
    /// The thresholds notified, per (tenant, meter): in which period and limit, which
    /// percentages (bounded: see `check_thresholds`).
    pub(crate) notified: std::sync::Mutex<std::collections::HashMap<(TenantId, crate::config::MeterId), super::Marks>>,
    pub(crate) clock: Clock,
    pub(crate) idempotency: Idempotency,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) totals: Totals,
    pub(crate) prefetch: mpsc::Sender<Prefetch>,
    pub(crate) pipeline: tokio::sync::Mutex<Pipeline>,
    /// One export pass at a time on this node (apart from the pipeline: Stripe's latency
    /// never delays a flush).
    pub(crate) export_pass: tokio::sync::Mutex<()>,
    pub(crate) sweep_now: Notify,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Credentials the directory did not know, for `limits.negative_ttl`.
    pub(crate) unknown: moka::sync::Cache<(u64, u64), ()>,
    /// This engine's id in the tokens of its quota calls, its idempotency claims and its
    /// export claims, drawn at random when it is built and after a SnapStart restore (read
    /// it with [`Shared::node`]).
    pub(crate) node: std::sync::atomic::AtomicU64,
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
            .field("stores", &self.shared.stores)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// This engine's node id.
    #[inline]
    pub(crate) fn node(&self) -> u64 {
        self.node.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Tollgate {
    /// Decides on a request without waiting. Most requests of known tenants are decided here;
    /// the rest come back as [`Admission::Pending`].
    #[inline]
    pub fn admit(&self, req: &RequestInfo<'_>) -> Admission {
        self.admit_with(|_| *req)
    }

    /// Like [`admit`](Self::admit), for front doors that need the configured way of
    /// identifying tenants to describe the request: [`FrontDoor::admit_with`](crate::FrontDoor::admit_with) on a door made
    /// for this one request (a door kept per service saves that). An `Idempotency-Key` on a
    /// method the configuration does not list (`limits.idempotency_methods`) is ignored.
    pub fn admit_with<'a>(&self, describe: impl FnOnce(&crate::config::Identify) -> RequestInfo<'a>) -> Admission {
        self.front_door().admit_with(describe)
    }

    /// The configuration compiled for the request path, for front doors that keep a
    /// [`RuntimeCache`].
    pub(crate) fn runtime_cache(&self) -> RuntimeCache {
        RuntimeCache(arc_swap::Cache::new(RuntimeSource(self.shared.clone())))
    }

    /// Decides on a request described against `rt`, whose `idempotency_key` is only set on
    /// methods that honour it.
    #[inline]
    pub(crate) fn admit_in(
        &self,
        rt: &Runtime,
        req: &RequestInfo<'_>,
        client: impl FnOnce() -> Option<std::net::IpAddr>,
    ) -> Admission {
        if let Some(key) = req.idempotency_key {
            if let Err(why) = check_key(key) {
                return self.reject(Rejection::new(RejectionKind::MalformedIdempotencyKey, why));
            }
        }
        let lookup = match req.credential {
            Credential::ApiKey(key) => {
                if let Err(why) = check_api_key(key) {
                    // A comma: a repeated header a proxy joined; answered as a repeated one.
                    let why = if why == crate::tenant::COMMA_IN_KEY { super::REPEATED_KEY } else { why };
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
        let mut route = rt.route(req.method, req.path);
        let idem = req.idempotency_key.map(|k| (k, self.shared.idempotency.request(req.method, req.path, req.query)));
        match self.shared.table.get(lookup) {
            Some(state) => {
                // A state of the configuration before a reload, met in the moment before its
                // eviction: its plan indexes meters its own way.
                let mut route = if Arc::ptr_eq(&state.plan.meters, &rt.meters) {
                    route
                } else {
                    rt.meters.remap(route, &state.plan.meters)
                };
                if state.plan.clients.is_some() {
                    // The anonymous tenant: its rate is per client address.
                    route.client = rt.client_keys.as_ref().map_or(0, |k| k.key(req.client.or_else(client)));
                }
                self.decide(state, route, idem)
            }
            None => {
                // Anonymous callers (or an unknown key served as one) need their address.
                if let Some(keys) = &rt.client_keys {
                    route.client = keys.key(req.client.or_else(client));
                }
                let credential = match lookup {
                    Lookup::ApiKey(k) => OwnedCredential::ApiKey(k.into()),
                    Lookup::Identity(ANONYMOUS) => OwnedCredential::Anonymous,
                    Lookup::Identity(t) => OwnedCredential::Tenant(t.into()),
                };
                Admission::Pending(PendingAdmission {
                    stage: Stage::Resolve { credential, meters: rt.meters.clone() },
                    route,
                    idempotency: idem.map(|(k, r)| (k.into(), r)),
                })
            }
        }
    }

    /// Finishes a pending admission: asks the store, within `usage.store_timeout`.
    pub async fn resolve(&self, pending: PendingAdmission) -> Result<Ticket, Rejection> {
        let PendingAdmission { mut stage, mut route, idempotency } = pending;
        loop {
            let next = match stage {
                Stage::Quota(partial) => return self.lease_and_take(*partial, route).await,
                Stage::Resolve { credential, meters } => {
                    let state = match self.lookup(credential).await {
                        Ok(state) => state,
                        Err(rejection) => return Err(self.count(rejection)),
                    };
                    // A reload while the request waited: its route indexes the old meters.
                    if !Arc::ptr_eq(&state.plan.meters, &meters) {
                        route = meters.remap(route, &state.plan.meters);
                    }
                    self.decide(state, route, idempotency.as_ref().map(|(k, r)| (&k[..], *r)))
                }
                Stage::Claim(c) => self.claim_in_store(*c, route).await,
            };
            match next {
                Admission::Admitted(t) => return Ok(t),
                Admission::Rejected(r) => return Err(r),
                Admission::Pending(p) => (stage, route) = (p.stage, p.route),
            }
        }
    }

    pub(crate) fn reject(&self, rejection: Rejection) -> Admission {
        Admission::Rejected(self.count(rejection))
    }

    pub(crate) fn count(&self, mut rejection: Rejection) -> Rejection {
        if matches!(
            rejection.kind(),
            RejectionKind::MissingCredentials | RejectionKind::UnknownCredentials | RejectionKind::MalformedCredentials
        ) && self.shared.runtime.load().config.limits.shadow
        {
            // Shadow mode for the whole configuration: unidentified requests pass, counted.
            rejection.inner.shadowed = true;
            self.would_refuse(&rejection);
            return rejection;
        }
        self.shared.metrics.rejected(rejection.kind()).increment(1);
        tracing::debug!(
            reason = rejection.kind().label(),
            tenant = rejection.tenant().map(|t| t.as_str()),
            policy = rejection.policy(),
            "request rejected"
        );
        rejection
    }

    /// Counts a store error, and logs it once per burst: the first of a burst at once, then at
    /// most one line every [`STORE_ERROR_LOG_EVERY`] with the number of errors since the last
    /// line (an outage does not log once per request).
    pub(crate) fn store_error(&self, op: &'static str, e: &StoreError) {
        use std::sync::atomic::Ordering::Relaxed;
        self.shared.metrics.store_errors.increment(1);
        Totals::add(&self.shared.totals.store_errors, 1);
        let log = &self.shared.store_error_log;
        let now = self.shared.clock.unix_nanos();
        log.unlogged.fetch_add(1, Relaxed);
        let last = log.logged_at.load(Relaxed);
        let every = i64::try_from(STORE_ERROR_LOG_EVERY.as_nanos()).unwrap_or(i64::MAX);
        let due = last == 0 || now.saturating_sub(last) >= every || now < last;
        if due && log.logged_at.compare_exchange(last, now.max(1), Relaxed, Relaxed).is_ok() {
            let errors = log.unlogged.swap(0, Relaxed);
            tracing::warn!(op, error = %e, errors, "store error ({errors} since the last such line)");
        }
    }

    /// `usage.flush_interval` of the configuration in force: how often usage should reach the
    /// store (the worker's pace; a front door that flushes itself, as on Lambda, follows it).
    pub fn flush_interval(&self) -> Duration {
        self.shared.runtime.load().config.usage.flush_interval
    }

    /// This engine's node id (drawn anew by [`after_restore`](Self::after_restore)), for tests.
    #[doc(hidden)]
    pub fn node_id(&self) -> u64 {
        self.shared.node()
    }

    /// Counters of the background paths, and the number of tenants held.
    pub fn stats(&self) -> Stats {
        let mut stats = self.shared.totals.snapshot(self.shared.table.len());
        if let Some(clients) = self.shared.runtime.load().anonymous.as_ref().and_then(|p| p.clients.as_ref()) {
            clients.cells.settle();
            stats.tracked_clients = clients.cells.len();
        }
        stats
    }

    /// The clock the engine reads.
    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// The store of the quota role: leases are reserved from it.
    pub fn quota_store(&self) -> &Arc<dyn QuotaStore> {
        &self.shared.stores.quota
    }

    /// The store of the usage and export roles: usage is flushed to it and exported from it.
    pub fn usage_store(&self) -> &Arc<dyn UsageExportStore> {
        &self.shared.stores.usage
    }

    /// The store of the directory role: tenants and keys are looked up in it.
    pub fn directory_store(&self) -> &Arc<dyn DirectoryStore> {
        &self.shared.stores.directory
    }

    /// The store of the idempotency role: `Idempotency-Key` bindings are claimed in it.
    pub fn idempotency_store(&self) -> &Arc<dyn IdempotencyStore> {
        &self.shared.stores.idempotency
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

    pub(crate) fn for_tenant(mut self, state: &Tenant) -> Self {
        self.inner.tenant = Some(state.id.clone());
        self.inner.state = Some(state.clone());
        self
    }
}
