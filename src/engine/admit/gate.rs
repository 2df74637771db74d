//! The admission part of the engine ([`Gate`]): the tenant table, the `Idempotency-Key`s this
//! node saw, the credentials the directory did not know, the lookups of API keys per client
//! address, the requests in flight and the places of fleet concurrencies, behind the verbs that
//! decide on a request. Its verbs are spread by stage over this folder's files (`entry.rs`: a
//! request described and routed; `admission.rs`: the decision chain, without waiting;
//! `keyed.rs`: the `Idempotency-Key` stage, beside `idempotency.rs`, the node's memory of keys;
//! `wait.rs`, `fleet.rs`, `places.rs`: what waits on the store; `directory.rs`: tenants looked
//! up); this file holds the part, the loop a pending request goes through, and how refusals are
//! counted.

use crate::engine::table::TenantTable;
use std::sync::Arc;

#[cfg(feature = "dashboard")]
use crate::engine::admit::recent::RecentRejections;

use crate::engine::{
    admit::{
        clients::KeyLookups,
        idempotency::Idempotency,
        place_node::PlacesNode,
        stage::{Decision, PendingAdmission, Ready, ReadyParts, Stage},
        ticket::Pass,
    },
    shared::Shared,
    usage::{hold::Hold, hold::RouteHeld, units::Units},
};
use crate::{
    base::CustomerField,
    config::{HeaderStyle, RouteHold},
    response::{Rejection, RejectionKind},
    tenant::InFlightCounts,
};

/// The admission part: what decides on a request, and the state only admission reads.
pub(crate) struct Gate {
    pub(super) shared: Arc<Shared>,
    /// The usage part: the quota leases a request takes from, the holds its route takes.
    pub(super) units: Arc<Units>,
    pub(super) table: Arc<TenantTable>,
    /// The `Idempotency-Key`s this node saw, and the settlements of their claims.
    pub(super) idempotency: Idempotency,
    /// Credentials the directory did not know, each with when it stops being remembered (the
    /// engine clock's Unix nanoseconds): `limits.negative_ttl` after the lookup that found it
    /// unknown, whatever the hits since.
    pub(super) unknown: moka::sync::Cache<(u64, u64), i64>,
    /// Directory lookups of API keys per client address (`identify.unknown_key_rate`).
    pub(super) key_lookups: KeyLookups,
    /// The requests in flight of tenants whose plan limits them, by tenant.
    pub(super) in_flight: InFlightCounts,
    /// This node's places of tenants with a fleet concurrency.
    pub(super) places: Arc<PlacesNode>,
    /// Which of a tenant's billing customers its usage is billed to (a tenant's state carries
    /// it from its lookup).
    pub(super) customer_field: CustomerField,
    /// What this node last read of the directory's feed of tenants changed (`follow.rs`).
    pub(super) follow: Box<Follow>,
    /// The last refusals of identified tenants, for the operator dashboard.
    #[cfg(feature = "dashboard")]
    pub(super) recent: RecentRejections,
    /// The test of the two decision paths (`paths.rs`): how `decide` goes.
    #[cfg(test)]
    pub(super) path: std::sync::atomic::AtomicU8,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("tenants", &self.table.len()).finish_non_exhaustive()
    }
}

/// What the builder hands the admission part.
pub(crate) struct GateParts {
    pub(crate) table: Arc<TenantTable>,
    pub(crate) idempotency: Idempotency,
    pub(crate) unknown: moka::sync::Cache<(u64, u64), i64>,
    pub(crate) key_lookups: KeyLookups,
    pub(crate) customer_field: CustomerField,
}

impl Gate {
    pub(crate) fn new(shared: Arc<Shared>, units: Arc<Units>, parts: GateParts) -> Self {
        let GateParts { table, idempotency, unknown, key_lookups, customer_field } = parts;
        let in_flight = InFlightCounts::default();
        let places = Arc::new(PlacesNode::new(shared.clone(), table.clone(), in_flight.clone()));
        let follow = Box::new(Follow::new(shared.clock().unix_nanos() / 1_000_000));
        Self {
            shared,
            units,
            table,
            idempotency,
            unknown,
            key_lookups,
            in_flight,
            places,
            customer_field,
            follow,
            #[cfg(feature = "dashboard")]
            recent: RecentRejections::default(),
            #[cfg(test)]
            path: std::sync::atomic::AtomicU8::new(super::paths::AUTO),
        }
    }

    /// The tenant table.
    #[inline]
    pub(crate) fn table(&self) -> &Arc<TenantTable> {
        &self.table
    }

    /// The last refusals of identified tenants on this node.
    #[cfg(feature = "dashboard")]
    pub(crate) fn recent(&self) -> &RecentRejections {
        &self.recent
    }

    /// The `Idempotency-Key`s this node saw.
    #[inline]
    pub(crate) fn idempotency(&self) -> &Idempotency {
        &self.idempotency
    }

    /// This node's places of fleet concurrencies.
    #[inline]
    pub(crate) fn places(&self) -> &Arc<PlacesNode> {
        &self.places
    }

    /// Forgets the credentials remembered as unknown (a process restored from a snapshot, a
    /// reload, keys imported by their hashes). Every credential is marked changed first, so
    /// that a lookup that read the directory before does not remember one again.
    pub(crate) fn forget_unknown(&self) {
        self.table.mark_all_changed();
        self.unknown.invalidate_all();
    }

    /// Finishes a pending admission: asks the store, within `usage.store_timeout`, under the
    /// configuration it was decided under.
    pub(crate) async fn resolve(&self, pending: PendingAdmission) -> Result<Pass, Rejection> {
        let PendingAdmission { mut stage, mut route, rt, idempotency, hold, .. } = pending;
        let rt = rt.unwrap_or_else(|| self.shared.runtime().load_full());
        loop {
            let next = match stage {
                Stage::Quota(partial) => self.lease_and_take(*partial, route, &rt).await,
                Stage::Hold(ready) => match &hold {
                    Some((spec, units, values)) => {
                        return self.take_hold(*ready, route.cost, spec.clone(), *units, values).await
                    }
                    None => {
                        let ReadyParts { partial, taken, spend } = ready.into_parts();
                        self.count_admitted(partial.charge.state());
                        return Ok(Self::ticket(partial, route.cost, taken.into_source(), spend));
                    }
                },
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
                Decision::Admitted(t) => return Ok(t),
                Decision::Rejected(r) => return Err(r),
                Decision::Pending(p) => (stage, route) = (p.stage, p.route),
            }
        }
    }

    /// Takes the hold of an admitted request's route before its handler runs, then makes its
    /// ticket. Refused, everything the request took goes back as it drops (its rate cells, its
    /// units, its place, its key), as for a request refused at admission (a client told to
    /// retry in a second spends nothing on the refusal), and the refusal is its answer.
    async fn take_hold(
        &self,
        ready: Ready,
        cost: u32,
        spec: Arc<RouteHold>,
        units: u64,
        values: &crate::engine::admit::stage::HoldValues,
    ) -> Result<Pass, Rejection> {
        let state = ready.state().clone();
        let Some(meter) = state.plan.meters.index(spec.meter.as_str()) else {
            let ReadyParts { partial, taken, spend } = ready.into_parts();
            self.count_admitted(&state);
            return Ok(Self::ticket(partial, cost, taken.into_source(), spend));
        };
        // A meter with dimensions: its series at the request's values, held with its total
        // and selectors (checked at entry; a reload since may refuse them).
        // An open series' value is checked too (past the tenant's `max_values` under `refuse`,
        // the same 400), before anything is taken. The hold keeps the value the request named:
        // its records take its place then, or count under `"other"`.
        let admitted = |(series, value): (usize, Option<&str>)| match value {
            None => Ok((series, None)),
            Some(v) => {
                state.check_open(series, v, state.clock().unix_secs()).map(|_| (series, Some(Box::<str>::from(v))))
            }
        };
        let (meter, open, rollups) = if state.plan.meters.dims[meter].is_some() {
            match state.plan.meters.series(meter, values).and_then(admitted) {
                Ok((series, open)) => (series, open, state.plan.meters.rollups[series]),
                Err(e) => {
                    let mut r = Rejection::new(RejectionKind::InvalidDimension, format!("meter `{}`: {e}", spec.meter));
                    r.inner.policy = Some(spec.meter.to_string());
                    drop(ready);
                    let r = self.typed(r.for_tenant(&state));
                    self.tally_refusal(&r);
                    return Err(r);
                }
            }
        } else {
            (meter, None, 0)
        };
        // Whole while its hold is asked for: dropped meanwhile, it gives everything back.
        let hold = if rollups == 0 {
            Hold::new(state, Ok(meter), true, spec.overrun, spec.timeout, self.units.clone())
        } else {
            let units = self.units.clone();
            Hold::dimensioned(state, meter, open.as_deref(), rollups, true, spec.overrun, spec.timeout, units)
        };
        // At its organization's too, for a meter the organization limits.
        let org = ready.org_state();
        let mut hold = hold.with_org(org.as_ref());
        match hold.extend(units).await {
            Ok(()) => {
                self.count_admitted(ready.state());
                let ReadyParts { partial, taken, spend } = ready.into_parts();
                let mut ticket = Self::ticket(partial, cost, taken.into_source(), spend);
                ticket.hold = Some(Arc::new(RouteHeld::new(spec, meter, units, hold)));
                Ok(ticket)
            }
            Err(mut r) => {
                // The route's policies, the held meter's read live; the rate cells back.
                let ReadyParts { partial, taken, spend } = ready.refused();
                let (_, headers) = partial.refuse();
                r.inner.headers = headers;
                drop((taken, spend));
                let r = self.typed(r);
                self.tally_refusal(&r);
                Err(r)
            }
        }
    }

    pub(crate) fn reject(&self, rejection: Rejection) -> Decision {
        Decision::Rejected(self.count(rejection))
    }

    /// `rejection` with the problem type its kind is answered with (the draft's
    /// `quota-exceeded` for a 429 of a policy under `limits.headers = "draft"`; a prepaid
    /// balance answered 429 is not a policy of `RateLimit-Policy`).
    pub(crate) fn typed(&self, mut rejection: Rejection) -> Rejection {
        if matches!(
            rejection.kind(),
            RejectionKind::RateLimited | RejectionKind::QuotaExceeded | RejectionKind::ConcurrencyLimited
        ) && rejection.status() == http::StatusCode::TOO_MANY_REQUESTS
            && !rejection.policy().is_some_and(|p| p.ends_with("-prepaid"))
            && self.shared.runtime().load().config.limits.headers == HeaderStyle::Draft
        {
            rejection.inner.quota_exceeded_type = true;
        }
        rejection
    }

    /// Counts a request of `state`'s tenant admitted: the node's counter, and the tenant's
    /// tally (one atomic add in its state; a wrap of it, once in 65,536, counted apart).
    #[inline]
    pub(crate) fn count_admitted(&self, state: &crate::tenant::TenantState) {
        self.shared.metrics().admitted.increment(1);
        if state.admitted() {
            self.wrapped(&state.id);
        }
    }

    /// [`count_admitted`](Self::count_admitted), unless the request goes on to its route's
    /// hold (`route.hold` and charged: [`admitted`](Self::admitted)'s test), where it is
    /// counted once the hold is taken, as the hold may refuse it.
    #[inline]
    pub(crate) fn count_admitted_unless_held(
        &self,
        state: &crate::tenant::TenantState,
        route: &crate::plan::RouteCost,
        charged: bool,
    ) {
        if route.hold == 0 || !charged {
            self.count_admitted(state);
        }
    }

    /// A refusal in the fleet's tallies: its tenant's (when identified) and the fleet's, under
    /// its reason, a prepaid balance's refusal under `credits_exhausted` whatever its status
    /// (`limits.balance_status = 429` answers it as `quota_exceeded`).
    pub(crate) fn tally_refusal(&self, rejection: &Rejection) {
        let kind = match rejection.kind() {
            RejectionKind::QuotaExceeded if rejection.policy().is_some_and(|p| p.ends_with("-prepaid")) => {
                RejectionKind::CreditsExhausted
            }
            kind => kind,
        };
        self.units.pipeline().tallies().refused(rejection.tenant(), kind, self.shared.clock().unix_secs());
    }

    #[cold]
    fn wrapped(&self, tenant: &crate::base::TenantId) {
        self.units.pipeline().tallies().admitted(tenant, 1 << 16, self.shared.clock().unix_secs());
    }

    /// `rejection` typed ([`typed`](Self::typed)) and counted; in shadow mode for the whole
    /// configuration, an unidentified request passes, counted.
    pub(crate) fn count(&self, rejection: Rejection) -> Rejection {
        let mut rejection = self.typed(rejection);
        if matches!(
            rejection.kind(),
            RejectionKind::MissingCredentials | RejectionKind::UnknownCredentials | RejectionKind::MalformedCredentials
        ) && self.shared.runtime().load().config.limits.shadow
        {
            rejection.inner.shadowed = true;
            self.would_refuse(&rejection);
            return rejection;
        }
        self.shared.metrics().rejected(rejection.kind()).increment(1);
        // The fleet's tallies: every refusal, of an identified tenant or not.
        self.tally_refusal(&rejection);
        #[cfg(feature = "dashboard")]
        if let Some(tenant) = rejection.tenant() {
            self.recent.note(tenant, rejection.kind(), self.shared.clock().unix_secs());
        }
        tracing::debug!(
            reason = rejection.kind().label(),
            tenant = rejection.tenant().map(|t| t.as_str()),
            policy = rejection.policy(),
            "request rejected"
        );
        rejection
    }

    /// In shadow mode, a refusal is counted and logged instead of answered: `true` (go on).
    #[cold]
    pub(crate) fn shadowed(&self, state: &crate::tenant::Tenant, r: &Rejection) -> bool {
        if !state.plan.shadow {
            return false;
        }
        self.would_refuse(r);
        true
    }

    /// Counts and logs a refusal shadow mode let through.
    #[cold]
    pub(crate) fn would_refuse(&self, r: &Rejection) {
        self.shared.totals().would_refuse(self.shared.metrics(), r.kind());
        tracing::debug!(
            reason = r.kind().label(),
            tenant = r.tenant().map(|t| t.as_str()),
            policy = r.policy(),
            "shadow mode: would refuse ({r})"
        );
    }
}

/// What this node last read of the directory's feed of tenants changed (its reader is
/// `follow.rs`). Held across a whole follow, its revalidation
/// included: a follow that finds nothing new has waited for the one that found it to have read
/// its tenants again.
#[derive(Debug)]
pub(crate) struct Follow {
    /// When the engine started (Unix milliseconds): at the first read, the entries told since
    /// are the changes this node may have missed.
    pub(super) started: i64,
    /// Whether this node ever read a tenant from the directory: until it does (every tenant
    /// it serves declared in the configuration) it holds nothing the feed could change, and
    /// reads no feed.
    pub(super) looked_up: std::sync::atomic::AtomicBool,
    pub(super) last: tokio::sync::Mutex<Seen>,
}

#[derive(Debug, Default)]
pub(super) struct Seen {
    /// The feed's head at the last read (`None`: no read yet): every change stamped up to it
    /// was seen.
    pub(super) head: Option<i64>,
    /// A revalidation stopped at a store error with tenants marked: tried again at the next
    /// follow, whatever it finds.
    pub(super) pending: bool,
}

impl Follow {
    pub(crate) fn new(started: i64) -> Self {
        Self {
            started,
            looked_up: std::sync::atomic::AtomicBool::new(false),
            last: tokio::sync::Mutex::new(Seen::default()),
        }
    }
}
