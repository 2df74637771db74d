//! Admission under a fleet rate (`rate_scope = "fleet"`): a request spends cells of its
//! tenant's lease of the shared bucket, with no store call while the lease lasts; an empty
//! lease is refilled by one store call for the tenant's waiting requests together.

use std::{borrow::Cow, sync::Arc};

use crate::engine::admit::{
    charge::RateCharge,
    gate::Gate,
    stage::{Decision, RateWait, Stage},
};
use crate::engine::store_calls::Counted;
use crate::{
    config::{HeaderStyle, StoreErrorPolicy},
    plan::{fleet_key, RouteCost, Runtime},
    response::{HeaderState, Rejection, RejectionKind},
    store::{CellCall, ReserveToken},
    tenant::{FleetCells, Tenant},
};

/// How long a node serves a fail-open fleet rate from its own bucket once the rate role's
/// store failed, before it asks the store again.
const FALLBACK_NANOS: i64 = 1_000_000_000;

/// What a lease call came to.
enum Lease {
    /// The request's cells, from this lease.
    Taken(u32),
    /// The store is taken as down: the plan's own bucket serves.
    Fallback,
    /// The shared bucket cannot give them: its TAT, read at this time.
    Refused(i64, i64),
    /// Other waiters' calls held the tenant's lease lock past the request's time.
    Busy,
}

fn ceil_secs_nanos(nanos: i128) -> u64 {
    u64::try_from((nanos.max(0) + 999_999_999) / 1_000_000_000).unwrap_or(u64::MAX)
}

/// What a fleet rate's lease did for a request ([`Gate::take_fleet_cells`]).
pub(crate) enum FleetTake {
    /// Its cells came from the lease (or the plan's own bucket serves it, or shadow mode
    /// admits it without cells): on to its rate check.
    Served,
    /// Refused by the shared bucket's last reading.
    Refused(Decision),
    /// The lease is empty: it waits for one ([`Gate::rate_wait`]).
    Waits,
}

impl Gate {
    /// Takes the request's cells from its tenant's fleet lease (the route then carries their
    /// lease, [`fleet_key`]: its rate check reports them and its charge gives them back);
    /// `Some` when it must wait for a lease first, or is refused at once because the shared
    /// bucket, as last read, cannot give its cells (no store call for a tenant over its rate).
    /// While the store is taken as down (fail-open), the plan's own bucket serves instead (the
    /// route is left as it is).
    #[cold]
    #[inline(never)]
    pub(crate) fn take_fleet_cells(&self, charge: &mut RateCharge, route: &mut RouteCost) -> FleetTake {
        let state = charge.state();
        let (Some(fleet), Some(rate)) = (state.fleet(), state.plan.fleet.as_ref()) else { return FleetTake::Served };
        let now = self.shared.clock().unix_nanos();
        if fleet.in_fallback(now) {
            return FleetTake::Served;
        }
        if let Some(generation) = fleet.take(route.cost, now) {
            route.client = fleet_key(generation);
            charge.took(route.client, route.cost, 0);
            return FleetTake::Served;
        }
        if let Some(tat) = fleet.refused_by_reading(route.cost, now, rate.bucket) {
            let r = Self::fleet_refusal(state, *route, tat, now);
            if !self.shadowed(state, &r) {
                return FleetTake::Refused(self.reject(r));
            }
            // Shadow mode: counted, admitted without cells.
            route.client = fleet_key(0);
            return FleetTake::Served;
        }
        FleetTake::Waits
    }

    /// A request of a fleet rate whose tenant's lease is empty: it waits for a lease of cells
    /// ([`Stage::Rate`]).
    #[cold]
    #[inline(never)]
    pub(crate) fn rate_wait(charge: RateCharge, route: RouteCost, key: Option<(&[u8], u128)>) -> Decision {
        let key = key.map(|(k, request)| (Box::from(k), request));
        Decision::pending(Stage::Rate(Box::new(RateWait { charge, key })), route)
    }

    /// The rate check of a request whose cells came from its tenant's fleet lease: its time,
    /// and the headers from the lease and the shared bucket's last reading.
    #[cold]
    #[inline(never)]
    pub(crate) fn fleet_rate_of(&self, state: &Tenant, headers: &mut HeaderState) -> i64 {
        let now = self.shared.clock().unix_nanos();
        let at = now.div_euclid(1_000_000_000);
        state.touch(at);
        if let (Some(fleet), Some(rate)) = (state.fleet(), state.plan.fleet.as_ref()) {
            if state.plan.header_style != HeaderStyle::None {
                let (left, tat) = fleet.peek(now);
                let r = FleetCells::remaining(left, tat, now, rate.bucket);
                let empty = rate.bucket.burst.saturating_sub(r);
                let cells = if state.plan.header_style == HeaderStyle::DraftCompat { empty } else { empty.min(1) };
                headers.set_rate(r, ceil_secs_nanos(i128::from(cells) * i128::from(rate.bucket.interval)));
            }
        }
        at
    }

    /// Leases cells of the waiting request's tenant (one store call for the tenant's waiting
    /// requests on this node, within `usage.store_timeout` with the wait for it), then decides
    /// the request again, its cells taken from the new lease. Refused by the shared bucket (or
    /// by a bucket other nodes keep writing), it is answered 429 with the time its cells come
    /// back; the store failing, the fleet rate's `on_store_error` decides (fail-open: the
    /// plan's own bucket, rate / N, serves for a second; fail-closed: 503).
    pub(crate) async fn lease_cells(&self, w: RateWait, mut route: RouteCost, rt: &Arc<Runtime>) -> Decision {
        let RateWait { mut charge, key } = w;
        let key = key.as_ref().map(|(k, r)| (&k[..], *r));
        let state = charge.state().clone();
        let (Some(fleet), Some(rate)) = (state.fleet(), state.plan.fleet.as_ref()) else {
            return self.decide_charged(charge, route, key);
        };
        let bucket = rate.bucket;
        let cost = route.cost;
        // A waiter left with less than half the time for its own call answers busy rather
        // than call: its call timing out would be taken for a store failure (the fallback).
        let began = tokio::time::Instant::now();
        let half = rt.config.usage.store_timeout / 2;
        let leased = self
            .shared
            .stores()
            .under_lock_or_busy(fleet.lock(), async {
                let now = self.shared.clock().unix_nanos();
                if fleet.in_fallback(now) {
                    return Ok(Lease::Fallback);
                }
                // Another request's lease came meanwhile.
                if let Some(generation) = fleet.take(cost, now) {
                    return Ok(Lease::Taken(generation));
                }
                // Another waiter's call just read the bucket spent: refused from that reading,
                // with no call of its own (the waiters of a spent bucket cost one call, and
                // none waits its turn into a timeout).
                if let Some(tat) = fleet.refused_by_reading(cost, now, bucket) {
                    return Ok(Lease::Refused(tat, now));
                }
                if began.elapsed() > half {
                    return Ok(Lease::Busy);
                }
                let want = fleet.want(cost, now, bucket);
                let sender = fleet.sender(|| self.shared.ids().new_sender());
                // A call whose answer was lost goes again first, with its token (made anew at
                // `now`): a store that applied it answers what it granted then, else weighs it
                // now. Then, if that left this request short, a call of its own.
                for attempt in 0..2 {
                    let (token, resent) = fleet.token(|| {
                        ReserveToken::new(sender, self.shared.ids().next_seq()).at(now.div_euclid(1_000_000_000))
                    });
                    let call = CellCall::new(state.id.clone(), want, cost, bucket.interval, bucket.burst, now, token);
                    let grant = self.shared.stores().request().rate.take_cells(&call).await;
                    self.shared.stores().answered(Counted::Rate, &grant);
                    let grant = grant?;
                    fleet.answered();
                    // Answered again, the grant may be an old one: only its cells whose time in
                    // the shared bucket is still ahead serve (as a return gives back only those).
                    let granted =
                        if resent { FleetCells::ahead(grant.granted, grant.tat, now, bucket) } else { grant.granted };
                    if granted >= cost {
                        return Ok(Lease::Taken(fleet.leased(granted, cost, grant.tat, now, bucket)));
                    }
                    if resent && granted > 0 {
                        // The lost call's cells serve the next requests (this one costs more).
                        fleet.leased(granted, 0, grant.tat, now, bucket);
                    }
                    if !resent || attempt == 1 || began.elapsed() > half {
                        fleet.read(grant.tat);
                        return Ok(Lease::Refused(grant.tat, now));
                    }
                }
                Ok(Lease::Busy)
            })
            .await
            .map(|lease| lease.unwrap_or(Lease::Busy));
        match leased {
            Ok(Lease::Taken(generation)) => {
                route.client = fleet_key(generation);
                charge.took(route.client, cost, 0);
            }
            Ok(Lease::Fallback) => {}
            // The lock did not come in time: the call that held it failed (the fallback serves,
            // as it does for that call) or the tenant is busy.
            Ok(Lease::Busy) if fleet.in_fallback(self.shared.clock().unix_nanos()) => {}
            Ok(Lease::Busy) => {
                let now = self.shared.clock().unix_nanos();
                let tat = fleet
                    .refused_by_reading(cost, now, bucket)
                    .unwrap_or_else(|| now.saturating_add(i64::try_from(bucket.interval).unwrap_or(i64::MAX)));
                let r = Self::fleet_refusal(&state, route, tat, now);
                if !self.shadowed(&state, &r) {
                    return self.reject(r);
                }
                route.client = fleet_key(0);
            }
            Ok(Lease::Refused(tat, now)) => {
                let r = Self::fleet_refusal(&state, route, tat, now);
                if !self.shadowed(&state, &r) {
                    return self.reject(r);
                }
                // Shadow mode: counted, admitted without cells.
                route.client = fleet_key(0);
            }
            Err(e) if !self.shared.stores().down(&e, Counted::Rate) => {
                // The bucket is written (or locked) by other nodes all along: a busy tenant,
                // not an outage.
                tracing::debug!(tenant = %state.id, error = %e, "a fleet rate's bucket stayed contended");
                let now = self.shared.clock().unix_nanos();
                let r = Self::fleet_refusal(
                    &state,
                    route,
                    now.saturating_add(i64::try_from(bucket.interval).unwrap_or(i64::MAX)),
                    now,
                );
                if !self.shadowed(&state, &r) {
                    return self.reject(r);
                }
                route.client = fleet_key(0);
            }
            Err(e) => {
                tracing::debug!(tenant = %state.id, error = %e, "the rate store failed");
                if rate.on_store_error == StoreErrorPolicy::FailClosed {
                    let r = Rejection::new(RejectionKind::StoreUnavailable, "the rate store did not answer in time");
                    return self.reject(r.with_retry_after(1).for_tenant(&state));
                }
                fleet.fall_back(self.shared.clock().unix_nanos().saturating_add(FALLBACK_NANOS));
            }
        }
        self.decide_charged(charge, route, key)
    }

    /// The 429 of a request whose cells the shared bucket refused: `Retry-After` when the
    /// cells it costs come back (the bucket's TAT `tat`, at `now`).
    fn fleet_refusal(state: &Tenant, route: RouteCost, tat: i64, now: i64) -> Rejection {
        let rate = state.plan.fleet.as_ref().expect("a fleet rate");
        let b = rate.bucket;
        let t = i128::from(b.interval);
        let wait = i128::from(tat.max(now)) + i128::from(route.cost) * t - i128::from(b.burst) * t - i128::from(now);
        let retry = ceil_secs_nanos(wait).max(1);
        let mut headers = HeaderState::new(route.meter, route.shape);
        let full = i128::from(tat.max(now)) - i128::from(now);
        let reset =
            if state.plan.header_style == HeaderStyle::DraftCompat { ceil_secs_nanos(full).max(1) } else { retry };
        headers.set_rate(0, reset);
        Self::quota_headers(state, &mut headers, route.meter, now.div_euclid(1_000_000_000));
        let mut r = Rejection::new(
            RejectionKind::RateLimited,
            Cow::Owned(format!(
                "the fleet rate of plan `{}` ({}, burst {}) is spent",
                state.plan.id, rate.rate, b.burst
            )),
        );
        r.inner.policy = Some("rate".to_owned());
        r.inner.headers = headers;
        r.with_retry_after(retry).for_tenant(state)
    }
}
