//! The decision chain of admission, without waiting: the common request's straight path, and
//! the whole chain (a route's feature, the usage buffer, a fleet rate's cells, the key's stage,
//! the rate, concurrency, the reported meters, the spend cap, the route meter's units) to the
//! pass that admits it. Each stage's methods are in its own file: `keyed.rs` (the
//! `Idempotency-Key`), `rate.rs`, `places.rs` (concurrency), `quota.rs` (quotas, balances and
//! spend caps), `fleet.rs` and `wait.rs` (what waits on the store).

use std::borrow::Cow;

use crate::engine::{
    admit::{
        capture::ResponseCapture,
        charge::RateCharge,
        fleet::FleetTake,
        gate::Gate,
        idempotency::Claim,
        stage::{Decision, Partial, Ready, Stage},
        ticket::{Held, Pass},
    },
    usage::{
        spend::{RouteSpend, SpendTab},
        taken::{OrgTaken, Source, Taken},
    },
};
use crate::{
    config::StoreErrorPolicy,
    plan::RouteCost,
    response::{Rejection, RejectionKind},
    tenant::{Slot, Take, Tenant},
};

impl Gate {
    /// Rate, idempotency and quota for a known tenant, without waiting.
    #[inline]
    pub(crate) fn decide(&self, state: Tenant, route: RouteCost, idem: Option<(&[u8], u128)>) -> Decision {
        // The common request, decided in one step: a plan with nothing beyond its rate and its
        // quotas (`CompiledPlan::straight`), a route that needs no feature, reports no meter
        // and holds nothing (`RouteCost::plain`), no `Idempotency-Key`.
        #[cfg(test)]
        match self.path.load(std::sync::atomic::Ordering::Relaxed) {
            super::paths::CHAIN => return self.decide_charged(RateCharge::new(state, &route), route, idem),
            super::paths::STRAIGHT if route.plain && idem.is_none() => return self.decide_straight(state, route),
            _ => {}
        }
        if route.plain && state.plan.straight && idem.is_none() {
            return self.decide_straight(state, route);
        }
        self.decide_charged(RateCharge::new(state, &route), route, idem)
    }

    /// [`decide`](Self::decide) of the common request: its rate, then its route meter's units,
    /// as [`decide_charged`](Self::decide_charged) would decide it with nothing else to check.
    #[inline(always)]
    fn decide_straight(&self, state: Tenant, route: RouteCost) -> Decision {
        if let Some(refused) = self.usage_buffer_full(&state) {
            return refused;
        }
        let mut charge = RateCharge::new(state, &route);
        if let Err(r) = self.check_rate(&mut charge, &route) {
            return self.reject(r);
        }
        self.take_and_ticket(charge, route, true, None, None, None, None)
    }

    /// The refusal of a request whose usage could not be recorded (the usage buffer full, on
    /// a plan that fails closed).
    #[inline(always)]
    fn usage_buffer_full(&self, state: &Tenant) -> Option<Decision> {
        if self.units.pipeline().is_full() && state.usage_policy() == StoreErrorPolicy::FailClosed {
            return Some(self.buffer_full(state));
        }
        None
    }

    #[cold]
    #[inline(never)]
    fn buffer_full(&self, state: &Tenant) -> Decision {
        let r = Rejection::new(
            RejectionKind::StoreUnavailable,
            "usage cannot be recorded: the store has not taken it and the usage buffer is full",
        );
        self.reject(r.with_retry_after(1).for_tenant(state))
    }

    /// [`decide`](Self::decide) with the request's rate charge, which may hold cells already
    /// (a fleet rate's, from a lease it waited for): refused before its rate check, they go
    /// back as the charge drops.
    #[inline]
    pub(crate) fn decide_charged(
        &self,
        mut charge: RateCharge,
        mut route: RouteCost,
        idem: Option<(&[u8], u128)>,
    ) -> Decision {
        let state = charge.state();
        if !state.plan.allows(route.feature) {
            let r = self.feature_refusal(state, route.feature);
            if !self.shadowed(state, &r) {
                return self.reject(r);
            }
        }
        if let Some(refused) = self.usage_buffer_full(state) {
            return refused;
        }
        // A fleet rate: the request's cells come from its tenant's lease (waiting for one when
        // it is empty); its rate check then reports them, and its charge gives them back.
        if state.plan.fleet.is_some() && !crate::plan::is_fleet(route.client) {
            match self.take_fleet_cells(&mut charge, &mut route) {
                FleetTake::Served => {}
                FleetTake::Refused(refused) => return refused,
                FleetTake::Waits => return Self::rate_wait(charge, route, idem),
            }
        }
        // A request with an `Idempotency-Key`: the key's stage (`keyed.rs`) decides it.
        if let Some((key, request)) = idem {
            return self.decide_key(charge, route, key, request);
        }
        self.decide_keyed(charge, route, true, None)
    }

    /// The 403 of a route whose feature the tenant's plan lacks.
    #[cold]
    fn feature_refusal(&self, state: &Tenant, feature: u8) -> Rejection {
        let rt = self.shared.runtime().load();
        let name = usize::from(feature)
            .checked_sub(1)
            .and_then(|i| state.plan.meters.features.get(i).or_else(|| rt.meters.features.get(i)))
            .map_or("(unknown)", |f| &**f)
            .to_owned();
        let mut r = Rejection::new(
            RejectionKind::FeatureNotInPlan,
            Cow::Owned(format!(
                "this route needs the feature `{name}`, which plan `{}` does not include",
                state.plan.id
            )),
        );
        r.inner.policy = Some(name);
        r.for_tenant(state)
    }

    /// [`decide`](Self::decide) once the `Idempotency-Key` (if any) has answered: `charged`
    /// is false for a replay; `claim` holds the key of a first request.
    #[inline(always)]
    pub(crate) fn decide_keyed(
        &self,
        mut charge: RateCharge,
        route: RouteCost,
        charged: bool,
        claim: Option<Claim>,
    ) -> Decision {
        match self.check_rate(&mut charge, &route) {
            Ok(()) => self.decide_rated(charge, route, charged, claim),
            Err(r) => {
                drop(claim);
                self.reject(r)
            }
        }
    }

    /// [`decide_keyed`](Self::decide_keyed) once the rate check passed (at `now`, its
    /// headers in `headers`): the reported meters and the quota.
    #[inline(always)]
    pub(crate) fn decide_rated(
        &self,
        charge: RateCharge,
        route: RouteCost,
        charged: bool,
        claim: Option<Claim>,
    ) -> Decision {
        let meter = route.meter;
        if !charged {
            self.shared.metrics().replays.increment(1);
        }
        let state = charge.state();
        let plan = &state.plan;
        // A place among the tenant's requests in flight, taken before any unit: refused, the
        // request spends no rate cells and takes no units.
        let slot = match plan.concurrency {
            0 => None,
            _ if plan.concurrency_fleet => match self.places.enter(state) {
                Ok(Some(slot)) => Some(slot),
                Ok(None) if plan.shadow => {
                    self.would_refuse(&Self::shadow_concurrency(state));
                    None
                }
                Ok(None) => {
                    drop(claim);
                    return self.reject(Self::too_many_in_flight(charge, meter));
                }
                Err(()) => {
                    let partial = Partial { charge, claim, charged, slot: None, org: None };
                    return Decision::pending(Stage::Places(Box::new(partial)), route);
                }
            },
            limit => match Slot::enter(&self.in_flight, &state.id, limit) {
                Some(slot) => Some(slot),
                None if plan.shadow => {
                    self.would_refuse(&Self::shadow_concurrency(state));
                    None
                }
                None => {
                    drop(claim);
                    return self.reject(Self::too_many_in_flight(charge, meter));
                }
            },
        };
        self.decide_placed(charge, route, charged, claim, slot)
    }

    /// [`decide_rated`](Self::decide_rated) once the request has its place among its tenant's
    /// requests in flight (`slot`, when its plan limits them): the reported meters and the
    /// quota.
    #[inline(always)]
    pub(crate) fn decide_placed(
        &self,
        charge: RateCharge,
        route: RouteCost,
        charged: bool,
        claim: Option<Claim>,
        slot: Option<Box<Slot>>,
    ) -> Decision {
        let now = charge.at;
        let state = charge.state();
        let plan = &state.plan;
        if route.reports != 0 {
            match Self::check_reports(state, route.reports, now) {
                Ok(()) => {}
                Err((m, Take::Exhausted)) if plan.shadow => self.would_refuse(&Self::shadow_quota(state, m)),
                Err((m, Take::Exhausted)) => {
                    return self.reject(Self::quota_exceeded(Partial { charge, claim, charged, slot, org: None }, m));
                }
                Err(_) => {
                    let partial = Partial { charge, claim, charged, slot, org: None };
                    return Decision::pending(Stage::Quota(Box::new(partial)), route);
                }
            }
        }
        // On a plan with a spend cap, the route's cost in money, before its units: refused,
        // nothing is taken.
        let spend = match plan.spend {
            Some(s) if charged => match self.route_spend(state, &route, s, now) {
                Ok(spend) => Some(spend),
                Err(Take::Exhausted) => {
                    return self.reject(Self::spend_cap_reached(Partial { charge, claim, charged, slot, org: None }));
                }
                Err(_) => {
                    let partial = Partial { charge, claim, charged, slot, org: None };
                    return Decision::pending(Stage::Quota(Box::new(partial)), route);
                }
            },
            _ => None,
        };
        // A tenant in an organization: the organization's quotas (`org.rs`), before the
        // tenant's own units; refused, what it took goes back as it drops.
        let org = match plan.org {
            None => None,
            Some(_) => match self.org_units(state, &route, charged, now) {
                Ok(org) => org,
                Err((org_state, m, Take::Exhausted)) => {
                    let partial = Partial { charge, claim, charged, slot, org: None };
                    return self.reject(Self::org_quota_exceeded(partial, &org_state, m));
                }
                Err(_) => {
                    let partial = Partial { charge, claim, charged, slot, org: None };
                    return Decision::pending(Stage::Quota(Box::new(partial)), route);
                }
            },
        };
        self.take_and_ticket(charge, route, charged, claim, slot, spend, org)
    }

    /// The end of every admission without waiting: the route meter's units taken, and the
    /// ticket (or the request ready for its hold); or the quota's refusal, or the wait for the
    /// store.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn take_and_ticket(
        &self,
        mut charge: RateCharge,
        route: RouteCost,
        charged: bool,
        claim: Option<Claim>,
        slot: Option<Box<Slot>>,
        spend: Option<RouteSpend>,
        org: Option<Box<OrgTaken>>,
    ) -> Decision {
        let (meter, cost, now) = (route.meter, route.cost, charge.at);
        let (state, headers) = charge.split();
        match self.take_units(state, headers, meter, cost, charged, now) {
            Ok(source) => {
                if route.hold != 0 && charged {
                    // Counted once its hold is taken (`Gate::take_hold`): the hold may refuse it.
                    return Self::ready_for_hold(Partial { charge, claim, charged, slot, org }, &route, source, spend);
                }
                self.count_admitted(state);
                Decision::Admitted(Self::ticket_of(charge, claim, charged, slot, cost, source, spend, org))
            }
            // Refused for its quota: the request spends no rate cells, nor money (its spend
            // and its organization's units go back as they drop).
            Err(Take::Exhausted) => {
                self.reject(Self::quota_exceeded(Partial { charge, claim, charged, slot, org }, meter))
            }
            // Waits for the store: what it took of its organization's goes back meanwhile, and
            // is taken again (`org_units_with_store`).
            Err(_) => {
                Decision::pending(Stage::Quota(Box::new(Partial { charge, claim, charged, slot, org: None })), route)
            }
        }
    }

    /// An admitted request's ticket (its route cost's units came from `source`), or on a route
    /// that holds, the request ready for its hold ([`Stage::Hold`]): its rate cells and units
    /// become the ticket's once the hold is there, and go back as they drop if it is refused.
    #[inline(always)]
    pub(crate) fn admitted(
        p: Partial,
        route: &RouteCost,
        source: Option<Source>,
        spend: Option<RouteSpend>,
    ) -> Decision {
        if route.hold != 0 && p.charged {
            return Self::ready_for_hold(p, route, source, spend);
        }
        Decision::Admitted(Self::ticket(p, route.cost, source, spend))
    }

    /// A request admitted on a route that holds, waiting for its hold.
    #[cold]
    #[inline(never)]
    fn ready_for_hold(p: Partial, route: &RouteCost, source: Option<Source>, spend: Option<RouteSpend>) -> Decision {
        let taken = match source {
            Some(source) => Taken::new(p.charge.state(), route.meter, u64::from(route.cost), source, p.charge.at),
            None => Taken::none(),
        };
        Decision::pending(Stage::Hold(Box::new(Ready::new(p, taken, spend, route.cost))), *route)
    }

    /// The ticket of an admitted request: its rate cells, place, key and units are its own.
    #[inline]
    pub(crate) fn ticket(p: Partial, cost: u32, source: Option<Source>, spend: Option<RouteSpend>) -> Pass {
        let Partial { charge, claim, charged, slot, org } = p;
        Self::ticket_of(charge, claim, charged, slot, cost, source, spend, org)
    }

    /// [`ticket`](Self::ticket) of a request's parts (the admitted path builds no
    /// [`Partial`]).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn ticket_of(
        charge: RateCharge,
        claim: Option<Claim>,
        charged: bool,
        slot: Option<Box<Slot>>,
        cost: u32,
        source: Option<Source>,
        spend: Option<RouteSpend>,
        org: Option<Box<OrgTaken>>,
    ) -> Pass {
        let at = charge.at;
        let (state, mut headers) = charge.keep();
        if let Some(org) = &org {
            Self::org_headers(org, &mut headers, at);
        }
        Pass {
            headers,
            state,
            cost,
            charged,
            source,
            at,
            claim: claim.map(|c| Box::new(Held::First(ResponseCapture::new(c)))),
            done: false,
            called: false,
            in_poll: false,
            slot,
            hold: None,
            spend: spend.map(SpendTab::new),
            org,
        }
    }
}
