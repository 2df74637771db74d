//! The shared engine: one per application, behind every front door.

use std::{fmt, sync::Arc, time::Duration};

use arc_swap::ArcSwap;

use crate::engine::{
    admit::charge::RateCharge,
    admit::idempotency::{check_key, Claim, Idempotency},
    admit::table::{Lookup, ANONYMOUS},
    admit::ticket::Ticket,
    export::exporter::ExportReport,
    export::reconcile::{ReconcileError, ReconcileReport, ReconcileRequest},
    shared::Shared,
    usage::flush::FlushReport,
};
use crate::{
    billing::MeterEvent,
    clock::Clock,
    config::TenantId,
    metrics::Stats,
    plan::{RouteCost, Runtime},
    response::{Rejection, RejectionKind},
    store::{DirectoryStore, IdempotencyStore, QuotaStore, StoreError, UsageExportStore},
    tenant::{check_api_key, Credential, Tenant},
};

/// A request as the engine sees it, whatever the framework.
///
/// ```
/// use tollgate::door::{Credential, RequestInfo};
/// let info = RequestInfo::new("POST", "/v1/orders", Credential::ApiKey(b"tg_test_acme"))
///     .with_query(Some("dry_run=1"))
///     .with_idempotency_key(b"order-7");
/// assert_eq!(info.path, "/v1/orders");
/// ```
///
/// Its `Debug` never prints the API key nor the `Idempotency-Key`.
#[derive(Clone, Copy)]
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
    /// Header fields of the request (name, value), for what a route reads from them: the
    /// estimate of a `[[routes]] hold` read from a header (a field given twice is a repeated
    /// header, refused). A front door gives at least the fields
    /// [`FrontDoor::hold_headers`](crate::door::FrontDoor::hold_headers) names; without them such a route holds its `default`.
    pub headers: &'a [(&'a str, &'a [u8])],
}

impl fmt::Debug for RequestInfo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestInfo")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("credential", &self.credential)
            .field("idempotency_key", &self.idempotency_key.map(|k| format!("<{} bytes, not shown>", k.len())))
            .field("client", &self.client)
            .field("headers", &self.headers.len())
            .finish()
    }
}

impl<'a> RequestInfo<'a> {
    /// A request with this method, path and credential, no query and no `Idempotency-Key`.
    #[must_use]
    pub fn new(method: &'a str, path: &'a str, credential: Credential<'a>) -> Self {
        Self { method, path, query: None, credential, idempotency_key: None, client: None, headers: &[] }
    }

    /// With header fields of the request, for what a route reads from them (a `hold`
    /// estimate): (name, value) pairs, a repeated header as several pairs.
    #[must_use]
    pub fn with_headers(mut self, headers: &'a [(&'a str, &'a [u8])]) -> Self {
        self.headers = headers;
        self
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
///
/// It keeps the configuration it was decided under, whatever reload lands while it waits.
/// Dropped without being resolved (the client gone, a timeout), the rate cells it took go
/// back.
pub struct PendingAdmission {
    pub(crate) stage: Stage,
    pub(crate) route: RouteCost,
    /// The configuration it was decided under (set by the front door that decided it).
    pub(crate) rt: Option<Arc<Runtime>>,
    /// The `Idempotency-Key` of a request whose tenant is not known yet. (Boxed: rare, and
    /// admissions move by value.)
    pub(crate) idempotency: Option<Box<PendingKey>>,
    /// Its route's `hold` (as configured when it was decided: a reload while it waits does
    /// not move it) and the units it holds, taken once it is admitted.
    pub(crate) hold: Option<(Arc<crate::config::RouteHold>, u64)>,
}

impl Admission {
    /// A request waiting on the store at `stage`.
    #[inline]
    pub(crate) fn pending(stage: Stage, route: RouteCost) -> Self {
        Self::Pending(PendingAdmission { stage, route, rt: None, idempotency: None, hold: None })
    }
}

pub(crate) enum Stage {
    Resolve {
        credential: OwnedCredential,
        meters: Arc<crate::plan::MeterTable>,
        /// Whether the request's address is the client's own
        /// ([`Client::identifies`](crate::tenant::Client)).
        identified: bool,
    },
    /// An `Idempotency-Key` this node has not seen: claimed in the store first.
    Claim(Box<KeyClaim>),
    /// A replay of an `Idempotency-Key` this node saw complete: its response is read from the
    /// store.
    Replay(Box<ReplayRead>),
    Quota(Box<Partial>),
    /// Admitted: the route's hold is taken before the handler runs.
    Hold(Box<Ticket>),
    /// Its tenant's fleet rate lease is empty: cells are leased from the rate store first.
    Rate(Box<crate::engine::admit::fleet::RateWait>),
    /// Its node holds no free place of its tenant's fleet concurrency: one is leased first.
    Places(Box<Partial>),
    /// A first `Idempotency-Key` whose node holds no free place of its tenant's fleet
    /// concurrency: the place is leased first, then the key claimed.
    PlaceThenClaim(Box<KeyClaim>),
}

/// The `Idempotency-Key` of a pending request: the key, the request's digest, and the key
/// scoped to the client's address, for a request served as the anonymous tenant when anonymous
/// callers are limited per address (`None`: no address, the key is not honoured then).
pub(crate) struct PendingKey {
    pub(crate) key: Box<[u8]>,
    pub(crate) request: u128,
    pub(crate) scoped: Option<Box<[u8]>>,
}

/// A request whose `Idempotency-Key` the store is asked about.
pub(crate) struct KeyClaim {
    /// The rate check the request passed before its key was claimed (its tenant, headers and
    /// time): put back if it is dropped.
    pub(crate) charge: RateCharge,
    pub(crate) claim: Claim,
    pub(crate) key: Box<[u8]>,
    pub(crate) request: u128,
    /// Its place among the tenant's requests in flight: taken before the claim (a fleet
    /// concurrency), or after it.
    pub(crate) placed: ClaimPlace,
}

/// Where the place of a first keyed request among its tenant's requests in flight stands.
pub(crate) enum ClaimPlace {
    /// Taken after its key is claimed, as its plan says (a plan without a fleet concurrency).
    After,
    /// Taken before the claim: its slot (none in shadow mode past the limit).
    Taken(Option<Box<crate::tenant::Slot>>),
}

/// A replay whose stored response is read.
pub(crate) struct ReplayRead {
    /// The rate check the request passed.
    pub(crate) charge: RateCharge,
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
    /// The rate check it passed (its tenant, headers and time): put back if it is refused or
    /// dropped.
    pub(crate) charge: RateCharge,
    pub(crate) claim: Option<Claim>,
    pub(crate) charged: bool,
    /// Its place among the tenant's requests in flight (a plan with `concurrency`): freed if
    /// the request is refused, the ticket's once admitted.
    pub(crate) slot: Option<Box<crate::tenant::Slot>>,
}

impl fmt::Debug for PendingAdmission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = match &self.stage {
            Stage::Resolve { .. } => "resolve tenant",
            Stage::Claim(_) => "claim idempotency key",
            Stage::Replay(_) => "read idempotent response",
            Stage::Quota(_) => "lease quota",
            Stage::Hold(_) => "take the route's hold",
            Stage::Rate(_) => "lease fleet rate cells",
            Stage::Places(_) => "lease a place",
            Stage::PlaceThenClaim(_) => "lease a place, then claim idempotency key",
        };
        f.debug_struct("PendingAdmission").field("stage", &stage).field("cost", &self.route.cost).finish()
    }
}

/// An anonymous caller's `Idempotency-Key` scoped to its client address: the key, a NUL (no
/// key has one: they are visible ASCII), the address's group.
fn scoped_key(key: &[u8], keys: &crate::tenant::ClientKeys, ip: Option<std::net::IpAddr>) -> Vec<u8> {
    [key, &[0], &keys.group(ip)].concat()
}

/// Derefs to the engine's configuration slot, for [`arc_swap::Cache`].
#[derive(Clone)]
pub(crate) struct RuntimeSource(Arc<Shared>);

impl std::ops::Deref for RuntimeSource {
    type Target = ArcSwap<Runtime>;

    fn deref(&self) -> &ArcSwap<Runtime> {
        self.0.runtime()
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
            .field("tenants", &self.shared.table().len())
            .field("stores", self.shared.stores())
            .finish_non_exhaustive()
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
    /// identifying tenants to describe the request: [`FrontDoor::admit_with`](crate::door::FrontDoor::admit_with) on a door made
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
        client: impl FnOnce() -> Option<crate::tenant::Client>,
    ) -> Admission {
        if self.shared.stopping().load(std::sync::atomic::Ordering::Relaxed) {
            return self.reject(
                Rejection::new(RejectionKind::StoreUnavailable, "the server is stopping; send the request again")
                    .with_retry_after(1),
            );
        }
        if let Some(key) = req.idempotency_key {
            if let Err(why) = check_key(key) {
                return self.reject(Rejection::new(RejectionKind::MalformedIdempotencyKey, why));
            }
        }
        let lookup = match req.credential {
            Credential::ApiKey(key) => {
                // Its length bounds the digest's work; its characters are checked only when
                // the table does not hold it: a key reaches the table only through the
                // directory's lookup, which checks it first, and a match of the 128-bit keyed
                // digest stands for the key.
                if key.is_empty() || key.len() > crate::base::MAX_KEY_LEN {
                    return self.malformed_key(key);
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
        // The path as the routers match it: rules are matched, and idempotent requests told
        // apart, on what the application serves.
        let path = match crate::config::normalize_path(req.path) {
            Ok(path) => path,
            Err(why) => {
                // A malformed key is answered first, as when it was checked before the path.
                if let Lookup::ApiKey(key) = lookup {
                    if check_api_key(key).is_err() {
                        return self.malformed_key(key);
                    }
                }
                return self.reject(Rejection::new(RejectionKind::MalformedPath, why));
            }
        };
        let route = rt.route(req.method, &path);
        if route.hold != 0 {
            return self.admit_holding(rt, req, lookup, route, &path, client);
        }
        self.admit_routed(rt, req, lookup, route, &path, client)
    }

    /// [`admit_in`](Self::admit_in) on a route that holds: its estimate is read before
    /// anything is taken (a bad one is refused, nothing charged), and the hold taken once the
    /// request is admitted.
    #[cold]
    #[inline(never)]
    fn admit_holding(
        &self,
        rt: &Runtime,
        req: &RequestInfo<'_>,
        lookup: Lookup<'_>,
        route: RouteCost,
        path: &str,
        client: impl FnOnce() -> Option<crate::tenant::Client>,
    ) -> Admission {
        let spec = &rt.holds[usize::from(route.hold) - 1];
        match Self::hold_estimate(spec, req.headers) {
            Ok(units) => {
                Self::holding(self.admit_routed(rt, req, lookup, route, path, client), route, spec.clone(), units)
            }
            Err(r) => self.reject(r),
        }
    }

    /// [`admit_in`](Self::admit_in) once the route is known.
    #[inline(always)]
    fn admit_routed(
        &self,
        rt: &Runtime,
        req: &RequestInfo<'_>,
        lookup: Lookup<'_>,
        mut route: RouteCost,
        path: &str,
        client: impl FnOnce() -> Option<crate::tenant::Client>,
    ) -> Admission {
        let idem = req.idempotency_key.map(|k| (k, Idempotency::request(req.method, path, req.query)));
        match self.shared.table().get(lookup) {
            Some(state) => {
                // A state of the configuration before a reload, met in the moment before its
                // eviction: its plan indexes meters its own way.
                let mut route = if Arc::ptr_eq(&state.plan.meters, &rt.meters) {
                    route
                } else {
                    rt.meters.remap(route, &state.plan.meters)
                };
                let anonymous = || rt.anonymous.is_some() && state.id.as_str() == crate::config::ANONYMOUS_TENANT;
                if state.plan.clients.is_some() || (idem.is_some() && anonymous()) {
                    // The anonymous tenant: its rate is per client address, and so are its
                    // `Idempotency-Key`s (client B's key `1` is not client A's).
                    let ip = req.client.map(crate::tenant::Client::given).or_else(client).map(|c| c.ip);
                    route.client = rt.client_keys.as_ref().map_or(0, |k| k.key(ip));
                    if let (Some((key, request)), Some(keys), true) = (idem, &rt.client_keys, anonymous()) {
                        // Without its address an anonymous caller cannot be told from the
                        // others: its key is not honoured (a stored response is never
                        // answered to another client).
                        let Some(ip) = ip else { return self.decide(state, route, None) };
                        let scoped = scoped_key(key, keys, Some(ip));
                        return self.decide(state, route, Some((&scoped, request)));
                    }
                }
                self.decide(state, route, idem)
            }
            None => {
                if let Lookup::ApiKey(key) = lookup {
                    if check_api_key(key).is_err() {
                        return self.malformed_key(key);
                    }
                }
                // Anonymous callers (or an unknown key served as one) need their address.
                let who = req.client.map(crate::tenant::Client::given).or_else(client);
                let ip = who.map(|c| c.ip);
                if let Some(keys) = &rt.client_keys {
                    route.client = keys.key(ip);
                }
                // Its lookups of API keys are limited per address only when the address is the
                // client's own; else they share the node's budget.
                let identified = who.is_some_and(|c| c.identifies);
                let credential = match lookup {
                    Lookup::ApiKey(k) => OwnedCredential::ApiKey(k.into()),
                    Lookup::Identity(ANONYMOUS) => OwnedCredential::Anonymous,
                    Lookup::Identity(t) => OwnedCredential::Tenant(t.into()),
                };
                let idempotency = idem.map(|(key, request)| {
                    let scoped = rt.client_keys.as_ref().and_then(|keys| Some(scoped_key(key, keys, Some(ip?)).into()));
                    Box::new(PendingKey { key: key.into(), request, scoped })
                });
                Admission::Pending(PendingAdmission {
                    stage: Stage::Resolve { credential, meters: rt.meters.clone(), identified },
                    route,
                    rt: None,
                    idempotency,
                    hold: None,
                })
            }
        }
    }

    /// The units a route's hold holds for a request: its estimate, or read from the header
    /// it names (its `default` without one; refused, 400, when it does not parse, is zero or
    /// is above its `max`).
    fn hold_estimate(hold: &crate::config::RouteHold, headers: &[(&str, &[u8])]) -> Result<u64, Rejection> {
        match &hold.estimate {
            crate::config::HoldEstimate::Units(n) => Ok(*n),
            crate::config::HoldEstimate::Header { header, default, max } => {
                let mut values = headers.iter().filter(|(name, _)| name.eq_ignore_ascii_case(header.as_str()));
                let parsed = match (values.next(), values.next()) {
                    (None, _) => return Ok(*default),
                    // Repeated: no one estimate.
                    (Some(_), Some(_)) => None,
                    (Some((_, value)), None) => std::str::from_utf8(value)
                        .ok()
                        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|v| v.parse::<u64>().ok()),
                };
                match parsed {
                    Some(n) if n >= 1 && n <= *max => Ok(n),
                    _ => Err(Rejection::new(
                        RejectionKind::MalformedHoldEstimate,
                        format!(
                            "the `{header}` header must be sent once, a whole number of {} units from 1 to {max}",
                            hold.meter
                        ),
                    )),
                }
            }
        }
    }

    /// `admission` of a request on a route that holds `units`: admitted, it waits for its
    /// hold ([`resolve`](Self::resolve)).
    #[cold]
    #[inline(never)]
    fn holding(admission: Admission, route: RouteCost, spec: Arc<crate::config::RouteHold>, units: u64) -> Admission {
        match admission {
            Admission::Admitted(ticket) => Admission::Pending(PendingAdmission {
                stage: Stage::Hold(Box::new(ticket)),
                route,
                rt: None,
                idempotency: None,
                hold: Some((spec, units)),
            }),
            Admission::Pending(mut p) => {
                p.hold = Some((spec, units));
                Admission::Pending(p)
            }
            rejected @ Admission::Rejected(_) => rejected,
        }
    }

    /// Takes the hold of an admitted request's route before its handler runs; refused, the
    /// request's units and its rate cells (of its tenant's bucket) go back, as for a request
    /// refused at admission, and the refusal is its answer. A replay holds nothing.
    async fn take_hold(
        &self,
        mut ticket: Ticket,
        spec: Arc<crate::config::RouteHold>,
        units: u64,
    ) -> Result<Ticket, Rejection> {
        if !ticket.charged {
            return Ok(ticket);
        }
        let state = ticket.state.clone();
        let Some(meter) = state.plan.meters.index(spec.meter.as_str()) else { return Ok(ticket) };
        let mut hold = crate::engine::Hold::new(state, Ok(meter), true, spec.overrun, spec.timeout);
        match hold.extend(units).await {
            Ok(()) => {
                ticket.hold =
                    Some(std::sync::Arc::new(crate::engine::admit::ticket::RouteHeld::new(spec, meter, units, hold)));
                Ok(ticket)
            }
            Err(mut r) => {
                // Refused at admission: its rate cells go back too (a client told to retry in
                // a second spends none on the refusal). Not an anonymous caller's (its bucket
                // is its address's) nor a fleet rate's (its lease): the ticket keeps neither,
                // and the cell stays spent.
                if ticket.state.plan.clients.is_none() && ticket.state.plan.fleet.is_none() {
                    if let Some((cells, burst)) = ticket.state.give_back_rate(0, ticket.cost) {
                        ticket.headers.give_back(cells, burst);
                    }
                }
                // The route's policies, the held meter's read live.
                r.inner.headers = ticket.headers;
                ticket.give_back();
                Err(self.typed(r))
            }
        }
    }

    /// The 400 of an API key that cannot be one (empty, too long, characters other than
    /// visible ASCII, a comma).
    #[cold]
    #[inline(never)]
    fn malformed_key(&self, key: &[u8]) -> Admission {
        let why = check_api_key(key).err().unwrap_or("the API key is malformed");
        // A comma: a repeated header a proxy joined; answered as a repeated one.
        let why = if why == crate::tenant::COMMA_IN_KEY { crate::response::REPEATED_KEY } else { why };
        self.reject(Rejection::new(RejectionKind::MalformedCredentials, why))
    }

    /// Finishes a pending admission: asks the store, within `usage.store_timeout`, under the
    /// configuration it was decided under.
    pub async fn resolve(&self, pending: PendingAdmission) -> Result<Ticket, Rejection> {
        let PendingAdmission { mut stage, mut route, rt, idempotency, hold } = pending;
        let rt = rt.unwrap_or_else(|| self.shared.runtime().load_full());
        loop {
            let next = match stage {
                Stage::Quota(partial) => match self.lease_and_take(*partial, route, &rt).await {
                    Ok(t) => Admission::Admitted(t),
                    Err(r) => Admission::Rejected(r),
                },
                Stage::Hold(ticket) => Admission::Admitted(*ticket),
                Stage::Rate(w) => self.lease_cells(*w, route, &rt).await,
                Stage::Places(p) => self.acquire_place(*p, route, &rt).await,
                Stage::PlaceThenClaim(c) => self.place_then_claim(*c, route, &rt).await,
                Stage::Resolve { credential, meters, identified } => {
                    // The client address's key limits its lookups of API keys, when the address
                    // is the client's own (0: the node's shared budget).
                    let address = if identified { route.client } else { 0 };
                    let state = match self.lookup(credential, address).await {
                        Ok(state) => state,
                        Err(rejection) => return Err(self.count(rejection)),
                    };
                    // A reload while the request waited: its route indexes the old meters.
                    if !Arc::ptr_eq(&state.plan.meters, &meters) {
                        route = meters.remap(route, &state.plan.meters);
                    }
                    // Served as the anonymous tenant, under the configuration it was decided
                    // under or one a reload brought while it waited (a key scoped for nothing
                    // is never honoured unscoped there, where every caller shares the tenant).
                    let anonymous = state.id.as_str() == crate::config::ANONYMOUS_TENANT
                        && (rt.anonymous.is_some() || self.shared.runtime().load().anonymous.is_some());
                    // Its key scoped to its address (without its address, not honoured).
                    let key = idempotency.as_ref().and_then(|k| match anonymous {
                        true => k.scoped.as_deref().map(|key| (key, k.request)),
                        false => Some((&k.key[..], k.request)),
                    });
                    self.decide(state, route, key)
                }
                Stage::Claim(c) => self.claim_in_store(*c, route, &rt).await,
                Stage::Replay(r) => self.read_replay(*r, route, &rt).await,
            };
            match next {
                Admission::Admitted(t) => {
                    return match hold {
                        None => Ok(t),
                        Some((spec, units)) => self.take_hold(t, spec, units).await,
                    }
                }
                Admission::Rejected(r) => return Err(r),
                Admission::Pending(p) => (stage, route) = (p.stage, p.route),
            }
        }
    }

    pub(crate) fn reject(&self, rejection: Rejection) -> Admission {
        Admission::Rejected(self.count(rejection))
    }

    /// `rejection` with the problem type its kind is answered with (the draft's
    /// `quota-exceeded` for a 429 of a policy under `limits.headers = "draft"`).
    pub(crate) fn typed(&self, mut rejection: Rejection) -> Rejection {
        if matches!(
            rejection.kind(),
            RejectionKind::RateLimited | RejectionKind::QuotaExceeded | RejectionKind::ConcurrencyLimited
        ) && rejection.status() == http::StatusCode::TOO_MANY_REQUESTS
            && !rejection.policy().is_some_and(|p| p.ends_with("-prepaid"))
            && self.shared.runtime().load().config.limits.headers == crate::config::HeaderStyle::Draft
        {
            rejection.inner.quota_exceeded_type = true;
        }
        rejection
    }

    pub(crate) fn count(&self, mut rejection: Rejection) -> Rejection {
        if matches!(
            rejection.kind(),
            RejectionKind::RateLimited | RejectionKind::QuotaExceeded | RejectionKind::ConcurrencyLimited
        ) && rejection.status() == http::StatusCode::TOO_MANY_REQUESTS
            // A prepaid balance answered 429 is not a policy of RateLimit-Policy.
            && !rejection.policy().is_some_and(|p| p.ends_with("-prepaid"))
            && self.shared.runtime().load().config.limits.headers == crate::config::HeaderStyle::Draft
        {
            rejection.inner.quota_exceeded_type = true;
        }
        if matches!(
            rejection.kind(),
            RejectionKind::MissingCredentials | RejectionKind::UnknownCredentials | RejectionKind::MalformedCredentials
        ) && self.shared.runtime().load().config.limits.shadow
        {
            // Shadow mode for the whole configuration: unidentified requests pass, counted.
            rejection.inner.shadowed = true;
            self.would_refuse(&rejection);
            return rejection;
        }
        self.shared.metrics().rejected(rejection.kind()).increment(1);
        tracing::debug!(
            reason = rejection.kind().label(),
            tenant = rejection.tenant().map(|t| t.as_str()),
            policy = rejection.policy(),
            "request rejected"
        );
        rejection
    }

    /// Commits all usage recorded so far to the store, exactly once: a batch that fails is
    /// kept and retried first, with the same id, by the next flush. Usage is drained from the
    /// tenants' counters even when the store is down (held in memory, merged per tenant,
    /// meter and window, up to a bound), so an outage longer than a window keeps every
    /// window's usage in its own window.
    ///
    /// It also writes the alerts this node saw (threshold crossings, `[alerts]`) to the
    /// outbox; one that cannot be written is written when a refill sees it again.
    ///
    /// # Errors
    /// The store error that stopped the flush; nothing is lost.
    pub async fn flush(&self) -> Result<FlushReport, StoreError> {
        let flushed =
            self.shared.pipeline().flush(self.shared.runtime(), self.shared.table(), self.shared.leases()).await;
        self.write_alerts().await;
        flushed
    }

    /// Sends the usage of closed windows to the billing sink, exactly once per (tenant, meter,
    /// window, revision). A window is closed once it ended (for a pre-aggregated meter, the
    /// billing meter's hour or day) and `usage.grace` passed. Does nothing without a sink.
    ///
    /// Runs apart from [`flush`](Self::flush) (never under its lock); the worker calls it
    /// every `export.interval`, and a scheduled job may call it too (`tollgate export`).
    ///
    /// # Errors
    /// A store error; what was sent before it stays marked.
    pub async fn export(&self) -> Result<ExportReport, StoreError> {
        self.export_pass(false).await
    }

    /// Compares what the billing system holds with the store's ledger of what it accepted,
    /// hour by hour, for each (customer, meter) with events stamped in the request's range or
    /// open dead letters that may have been taken; with [`ReconcileRequest::fix`], acts on
    /// what it proves:
    ///
    /// - an hour the billing system lacks (all of its events, or one whose value is the
    ///   shortfall), found so by two passes at least `export.reconcile_after` apart and past
    ///   the billing system's de-duplication horizon (24 hours after export): its value is
    ///   put back in line as a new revision, which the next export sends under a new
    ///   identifier, once;
    /// - an hour it holds more of: reported (`tollgate_billing_drift_units{direction="surplus"}`),
    ///   never corrected by negative values;
    /// - an `unconfirmed`, `unsettled` or status-less dead letter: confirmed when the billing
    ///   system holds its value on top of the ledger's, requeued when two passes apart found it
    ///   lacking.
    ///
    /// Hours with an event exported less than `export.reconcile_after` ago are settling and
    /// not compared; meters that are not sums are not compared. Reads are paced with the
    /// export's calls (`export.calls_per_second`). The worker runs it every
    /// `export.reconcile_interval`, with `fix`, over the window described in the
    /// [Stripe guide](crate::guide::stripe).
    ///
    /// # Errors
    /// No sink or one that cannot be read back ([`ReconcileError::Unreadable`]), the store, or
    /// the billing system failed.
    pub async fn reconcile(&self, request: &ReconcileRequest) -> Result<ReconcileReport, ReconcileError> {
        self.shared.exporter().reconcile(&self.shared.runtime().load_full(), request).await
    }

    /// The worker's reconciliation pass: with `fix`, over the hours that reach every event
    /// from `export.reconcile_after` after its export until past the billing system's
    /// de-duplication horizon ([`worker_reach`](crate::engine::export::reconcile::worker_reach)); sets the drift gauges.
    pub(crate) async fn reconcile_pass(&self) -> Result<ReconcileReport, ReconcileError> {
        let rt = self.shared.runtime().load_full();
        let now = self.shared.clock().unix_secs();
        let from = now - crate::engine::export::reconcile::worker_reach(&rt);
        let report = self.reconcile(&ReconcileRequest::new(from, now).fix(true)).await?;
        self.shared.exporter().record_drift(&report);
        Ok(report)
    }

    /// What the next [`export`](Self::export) would send, without sending or claiming
    /// anything: an export already in flight with its fixed parameters, the others as they
    /// would be fixed now. Windows of tenants that are not billable are left out.
    ///
    /// # Errors
    /// A store error.
    pub async fn export_preview(&self) -> Result<Vec<MeterEvent>, StoreError> {
        self.shared.exporter().preview(&self.shared.runtime().load_full()).await
    }

    /// [`export`](Self::export); with `all`, windows still open count as closed (the final
    /// export of a store that does not outlive the process), with timestamps no later than
    /// now.
    pub(crate) async fn export_pass(&self, all: bool) -> Result<ExportReport, StoreError> {
        self.shared.exporter().export_pass(self.shared.runtime(), all).await
    }

    /// Gives the unused units of these states' current leases back to the store, and owes
    /// what they used beyond them.
    pub(crate) async fn return_leases(&self, states: Vec<Tenant>) -> usize {
        self.shared.leases().return_leases(states).await
    }

    /// Waits, at most `limit`, for this node's `Idempotency-Key` settlements that began at or
    /// after `since` (each completed or failed keyed request's, made in the background after
    /// its response) to reach the store: `true` when none of them is left. A front door whose
    /// process is frozen after each response (Lambda on-demand) awaits those of the invocation
    /// (`since` its start) before it returns, or the others in the fleet would answer 409 to
    /// the key's retries until its claim expires (and then run them again, billed again).
    /// Usually `usage.store_timeout` is enough. Settlements begun earlier (retrying after a
    /// store hiccup) are not waited for.
    pub async fn settlements_done(&self, since: std::time::Instant, limit: Duration) -> bool {
        self.shared.idempotency().all_settled(since, limit).await
    }

    /// `usage.store_timeout` of the configuration in force: how long one store call may take.
    #[must_use]
    pub fn store_timeout(&self) -> Duration {
        self.shared.runtime().load().config.usage.store_timeout
    }

    /// `usage.flush_interval` of the configuration in force: how often usage should reach the
    /// store (the worker's pace; a front door that flushes itself, as on Lambda, follows it).
    #[must_use]
    pub fn flush_interval(&self) -> Duration {
        self.shared.runtime().load().config.usage.flush_interval
    }

    /// This engine's node id (drawn anew by [`after_restore`](Self::after_restore)), for tests
    /// (feature `test-util`).
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    #[must_use]
    pub fn node_id(&self) -> u64 {
        self.shared.ids().node()
    }

    /// Counters of the background paths, and the number of tenants held.
    #[must_use]
    pub fn stats(&self) -> Stats {
        let mut stats = self.shared.totals().snapshot(self.shared.table().len());
        stats.held_rate_states = self.shared.table().rates().len() as u64;
        stats.rate_states_dropped = self.shared.table().rates().dropped();
        let responses = self.shared.idempotency().responses();
        stats.responses_stored = responses.stored.load(std::sync::atomic::Ordering::Relaxed);
        stats.responses_not_stored = responses.not_stored_total();
        stats.response_bytes_buffered = responses.buffered.load(std::sync::atomic::Ordering::Relaxed);
        // Jobs' holds whose hold ended are counted gone.
        self.shared.events().sweep();
        let holds = self.shared.holds();
        stats.holds_open = holds.len() as u64;
        stats.units_held = holds.units();
        stats.holds_expired = holds.expired.load(std::sync::atomic::Ordering::Relaxed);
        stats.records_after_settle = holds.records_after_settle.load(std::sync::atomic::Ordering::Relaxed);
        stats.holds_refused_full = holds.refused_full.load(std::sync::atomic::Ordering::Relaxed);
        stats.hold_overruns = holds.overruns.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(clients) = self.shared.runtime().load().anonymous.as_ref().and_then(|p| p.clients.as_ref()) {
            clients.cells.settle();
            stats.tracked_clients = clients.cells.len();
        }
        stats
    }

    /// The clock the engine reads.
    #[must_use]
    pub fn clock(&self) -> &Clock {
        self.shared.clock()
    }

    /// The store of the quota role: leases are reserved from it.
    #[must_use]
    pub fn quota_store(&self) -> &Arc<dyn QuotaStore> {
        &self.shared.stores().given().quota
    }

    /// The store of the usage and export roles: usage is flushed to it and exported from it.
    #[must_use]
    pub fn usage_store(&self) -> &Arc<dyn UsageExportStore> {
        &self.shared.stores().given().usage
    }

    /// The store of the directory role: tenants and keys are looked up in it.
    #[must_use]
    pub fn directory_store(&self) -> &Arc<dyn DirectoryStore> {
        &self.shared.stores().given().directory
    }

    /// The store of the idempotency role: `Idempotency-Key` bindings are claimed in it.
    #[must_use]
    pub fn idempotency_store(&self) -> &Arc<dyn IdempotencyStore> {
        &self.shared.stores().given().idempotency
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> crate::config::Config {
        self.shared.runtime().load().config.clone()
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
