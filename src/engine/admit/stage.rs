//! The admission state machine: a request as the engine sees it ([`RequestInfo`]), the
//! engine's answer ([`Admission`]), and what a request waiting on the store carries from one
//! stage to the next ([`PendingAdmission`], [`Stage`]): each stage owns what the request took so
//! far as guards (its rate cells, its key's claim, its place, its units), so a request refused
//! or dropped at any stage gives them back by dropping them.

use std::{fmt, sync::Arc};

use crate::engine::{
    admit::{
        charge::RateCharge,
        idempotency::Claim,
        ticket::{Pass, Ticket},
    },
    usage::{spend::RouteSpend, taken::Taken, units::Units},
};
use crate::{
    config::TenantId,
    plan::RouteCost,
    response::Rejection,
    tenant::{Credential, Tenant},
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
    /// header, refused), and the dimension values its `hold_values` reads. A front door gives
    /// at least the fields [`FrontDoor::hold_headers`](crate::door::FrontDoor::hold_headers)
    /// names; without them such a route holds its `default`, and one reading dimension values
    /// refuses 400 (or counts `other`).
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
    /// [`Tollgate::resolve`](crate::Tollgate::resolve).
    Pending(PendingAdmission),
}

/// A request waiting on the store. Await [`Tollgate::resolve`](crate::Tollgate::resolve) with it.
///
/// It keeps the configuration it was decided under, whatever reload lands while it waits.
/// Dropped without being resolved (the client gone, a timeout), the rate cells it took go
/// back.
pub struct PendingAdmission {
    pub(crate) stage: Stage,
    pub(crate) route: RouteCost,
    /// The configuration it was decided under (set by the front door that decided it).
    pub(crate) rt: Option<Arc<crate::plan::Runtime>>,
    /// The `Idempotency-Key` of a request whose tenant is not known yet. (Boxed: rare, and
    /// admissions move by value.)
    pub(crate) idempotency: Option<Box<PendingKey>>,
    /// Its route's `hold` (as configured when it was decided: a reload while it waits does
    /// not move it) and the units it holds, taken once it is admitted.
    pub(crate) hold: Option<(Arc<crate::config::RouteHold>, u64, HoldValues)>,
    /// Its admission's span (feature `otel`), ended when it is resolved.
    #[cfg(feature = "otel")]
    pub(crate) trace: Option<Box<crate::base::trace::RequestSpan>>,
}

/// A route's hold's dimension values as the request gave them (`hold_values`): (dimension,
/// value), empty for a meter without dimensions.
pub(crate) type HoldValues = Vec<(Box<str>, Box<str>)>;

/// The engine's decision on a request, as admission makes it: an admitted request is a
/// [`Pass`], which the engine's entry points hand out as a [`Ticket`] carrying the engine's
/// units ([`carrying`](Self::carrying)). The tower layer keeps the pass, and makes its
/// requests' contexts from the engine it holds: so a request of the layer takes no count of
/// the units, and no ticket without units can be asked for a context.
#[must_use]
pub(crate) enum Decision {
    /// Go ahead; complete the pass with the response status.
    Admitted(Pass),
    /// Answer with this rejection.
    Rejected(Rejection),
    /// The engine must ask the store first.
    Pending(PendingAdmission),
}

impl Decision {
    /// The decision as an entry point hands it out: an admitted request's ticket carries the
    /// engine's units, for its contexts ([`Ticket::context`]).
    #[inline]
    pub(crate) fn carrying(self, units: &Arc<Units>) -> Admission {
        match self {
            Self::Admitted(pass) => Admission::Admitted(Ticket::new(pass, units.clone())),
            Self::Rejected(r) => Admission::Rejected(r),
            Self::Pending(p) => Admission::Pending(p),
        }
    }

    /// A request waiting on the store at `stage`.
    #[inline]
    pub(crate) fn pending(stage: Stage, route: RouteCost) -> Self {
        Self::Pending(PendingAdmission {
            stage,
            route,
            rt: None,
            idempotency: None,
            hold: None,
            #[cfg(feature = "otel")]
            trace: None,
        })
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
    /// Admitted, on a route that holds: the hold is taken before the request's rate cells and
    /// units become its ticket's (refused, they go back as it drops).
    Hold(Box<Ready>),
    /// Its tenant's fleet rate lease is empty: cells are leased from the rate store first.
    Rate(Box<RateWait>),
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
    /// What it took of its organization's (a tenant in an organization): given back if it is
    /// refused, the ticket's once admitted.
    pub(crate) org: Option<Box<crate::engine::usage::taken::OrgTaken>>,
}

impl Partial {
    /// Refused: its rate cells go back, its key is released and its place freed (their
    /// drops). Its tenant and headers, for the refusal.
    pub(crate) fn refuse(self) -> (Tenant, crate::response::HeaderState) {
        let Partial { charge, claim, slot, org, .. } = self;
        drop((claim, slot, org));
        charge.refuse()
    }
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
pub(crate) fn scoped_key(key: &[u8], keys: &crate::tenant::ClientKeys, ip: Option<std::net::IpAddr>) -> Vec<u8> {
    [key, &[0], &keys.group(ip)].concat()
}

/// A request of a fleet rate waiting for its tenant's lease of cells, with what it carries to
/// be decided again once the lease came.
pub(crate) struct RateWait {
    pub(crate) charge: RateCharge,
    pub(crate) key: Option<(Box<[u8]>, u128)>,
}

/// A request admitted on a route that holds (`[[routes]] hold`), before its hold is taken:
/// what becomes its ticket once the hold is there. Dropped unused (its hold refused, the
/// request gone while it waited), everything it took goes back as its parts drop, and its
/// cost is counted refunded, as a ticket's would be.
pub(crate) struct Ready {
    parts: Option<ReadyParts>,
    /// Its route's cost.
    cost: u32,
}

/// What a [`Ready`] request took.
pub(crate) struct ReadyParts {
    pub(crate) partial: Partial,
    /// The units of its route's cost, taken from the quota.
    pub(crate) taken: Taken,
    /// Its route cost's spend, on a plan with a spend cap.
    pub(crate) spend: Option<RouteSpend>,
}

impl Ready {
    pub(crate) fn new(partial: Partial, taken: Taken, spend: Option<RouteSpend>, cost: u32) -> Self {
        Self { parts: Some(ReadyParts { partial, taken, spend }), cost }
    }

    /// Its tenant.
    pub(crate) fn state(&self) -> &Tenant {
        self.parts.as_ref().expect("a Ready request keeps its parts until it goes").partial.charge.state()
    }

    /// The state of its tenant's organization's counters, for a tenant in an organization.
    pub(crate) fn org_state(&self) -> Option<Tenant> {
        let parts = self.parts.as_ref().expect("a Ready request keeps its parts until it goes");
        parts.partial.org.as_ref().map(|o| o.state.clone())
    }

    /// Its parts, to become its ticket (or its refusal, counted refunded here).
    pub(crate) fn into_parts(mut self) -> ReadyParts {
        self.parts.take().expect("a Ready request's parts are taken once")
    }

    /// Its parts, given up (its hold refused): its cost counted refunded. What the parts took
    /// goes back as they drop.
    pub(crate) fn refused(mut self) -> ReadyParts {
        let parts = self.parts.take().expect("a Ready request's parts are taken once");
        parts.partial.charge.state().plan.metrics.refunded_units.increment(u64::from(self.cost));
        parts
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        if let Some(parts) = &self.parts {
            // Gone while it waited for its hold: as a ticket dropped before its service.
            parts.partial.charge.state().plan.metrics.refunded_units.increment(u64::from(self.cost));
        }
    }
}
