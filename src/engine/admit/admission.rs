//! Admission without waiting: idempotency, rate, the quotas of the route's meter and of the
//! meters its handler reports, the headers of the answer.

use std::{borrow::Cow, num::NonZeroU32, time::Duration};

use governor::clock::Clock as _;

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
        taken::{Source, Taken},
    },
};
use crate::{
    clock::Clock,
    config::{HeaderStyle, StoreErrorPolicy},
    plan::RouteCost,
    response::{HeaderState, Rejection, RejectionKind},
    tenant::{QuotaRef, Slot, Take, Tenant},
};

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

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
        self.take_and_ticket(charge, route, true, None, None, None)
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

    /// The rate check of a request: the cells it takes become its charge's (with its headers
    /// and its time, the clock reading of the check), put back unless it is admitted; or its
    /// 429.
    #[inline(always)]
    pub(super) fn check_rate(&self, charge: &mut RateCharge, route: &RouteCost) -> Result<(), Rejection> {
        let (state, headers) = charge.split();
        let (at, took) = self.rate_of(state, route, headers)?;
        if took {
            charge.took(route.client, route.cost, at);
        } else {
            charge.at = at;
        }
        Ok(())
    }

    /// [`check_rate`](Self::check_rate)'s check: the request's time, and whether it took cells
    /// of its bucket (those of a fleet lease were taken before); or its 429.
    #[inline(always)]
    fn rate_of(&self, state: &Tenant, route: &RouteCost, headers: &mut HeaderState) -> Result<(i64, bool), Rejection> {
        let (meter, cost) = (route.meter, route.cost);
        let plan = &state.plan;
        let mut took = false;
        let now = if let Some(policy) = &plan.rate {
            if crate::plan::is_fleet(route.client) {
                // Taken from the tenant's fleet lease already.
                return Ok((self.fleet_rate_of(state, headers), false));
            }
            let cells = NonZeroU32::new(cost).unwrap_or(NonZeroU32::MIN);
            let checked = match &plan.clients {
                None => policy.limiter.check(&state.gcra, cells),
                Some(clients) => {
                    if route.client == 0 {
                        self.without_address();
                    }
                    clients.limiter.check(&route.client, cells)
                }
            };
            // The check read the clock: its reading is the request's time.
            let now = Clock::last_check_secs();
            state.touch(now);
            match checked {
                // Header values are only computed when headers are sent.
                Ok(Ok(None)) => took = true,
                Ok(Ok(Some(remaining))) => {
                    took = true;
                    let empty = policy.burst.get() - remaining.min(policy.burst.get());
                    // t: until the next cell (at most one cell's time; none when full); under
                    // "draft-compat", until the bucket is full.
                    let cells = if plan.header_style == HeaderStyle::DraftCompat { empty } else { empty.min(1) };
                    headers.set_rate(remaining, ceil_secs(policy.rate.interval() * cells));
                }
                Ok(Err(not_until)) if plan.shadow => {
                    let wait = not_until.wait_time_from(self.shared.clock().now());
                    let t = if plan.header_style == HeaderStyle::DraftCompat {
                        wait + Duration::from_nanos(policy.nanos(policy.burst.get().saturating_sub(cost)))
                    } else {
                        wait
                    };
                    headers.set_rate(0, ceil_secs(t).max(1));
                    self.would_refuse(&Self::shadow_rate(state));
                }
                Err(_) if plan.shadow => self.would_refuse(&Self::shadow_rate(state)),
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.shared.clock().now());
                    // Retry-After: until this request could pass; t: the same (the next cells
                    // it needs), so Retry-After is never earlier than t; under "draft-compat",
                    // t until the bucket is full again, as on a 200.
                    let retry = ceil_secs(wait).max(1);
                    let t = if plan.header_style == HeaderStyle::DraftCompat {
                        let full = wait + Duration::from_nanos(policy.nanos(policy.burst.get().saturating_sub(cost)));
                        ceil_secs(full).max(1)
                    } else {
                        retry
                    };
                    headers.set_rate(0, t);
                    Self::quota_headers(state, headers, meter, now);
                    let mut r = Rejection::new(
                        RejectionKind::RateLimited,
                        Cow::Owned(format!(
                            "the rate of plan `{}` ({}, burst {}) is spent",
                            plan.id, policy.rate, policy.burst
                        )),
                    );
                    r.inner.policy = Some("rate".to_owned());
                    r.inner.headers = *headers;
                    return Err(r.with_retry_after(retry).for_tenant(state));
                }
                Err(_) => {
                    // Every 429 says when to come back: here, never sooner than the bucket is
                    // full (a configuration keeps every route's cost within the burst, so this
                    // takes a plan compiled otherwise).
                    let full = ceil_secs(policy.rate.interval() * policy.burst.get()).max(1);
                    let r = Rejection::new(RejectionKind::RateLimited, "the request costs more than the plan's burst");
                    return Err(r.with_retry_after(full).for_tenant(state));
                }
            }
            now
        } else {
            let now = self.shared.clock().unix_secs();
            state.touch(now);
            now
        };
        Ok((now, took))
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
                    let partial = Partial { charge, claim, charged, slot: None };
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
                    return self.reject(Self::quota_exceeded(Partial { charge, claim, charged, slot }, m));
                }
                Err(_) => {
                    return Decision::pending(Stage::Quota(Box::new(Partial { charge, claim, charged, slot })), route)
                }
            }
        }
        // On a plan with a spend cap, the route's cost in money, before its units: refused,
        // nothing is taken.
        let spend = match plan.spend {
            Some(s) if charged => match self.route_spend(state, &route, s, now) {
                Ok(spend) => Some(spend),
                Err(Take::Exhausted) => {
                    return self.reject(Self::spend_cap_reached(Partial { charge, claim, charged, slot }));
                }
                Err(_) => {
                    return Decision::pending(Stage::Quota(Box::new(Partial { charge, claim, charged, slot })), route)
                }
            },
            _ => None,
        };
        self.take_and_ticket(charge, route, charged, claim, slot, spend)
    }

    /// The end of every admission without waiting: the route meter's units taken, and the
    /// ticket (or the request ready for its hold); or the quota's refusal, or the wait for the
    /// store.
    #[inline(always)]
    fn take_and_ticket(
        &self,
        mut charge: RateCharge,
        route: RouteCost,
        charged: bool,
        claim: Option<Claim>,
        slot: Option<Box<Slot>>,
        spend: Option<RouteSpend>,
    ) -> Decision {
        let (meter, cost, now) = (route.meter, route.cost, charge.at);
        let (state, headers) = charge.split();
        match self.take_units(state, headers, meter, cost, charged, now) {
            Ok(source) => {
                self.shared.metrics().admitted.increment(1);
                if route.hold != 0 && charged {
                    return Self::ready_for_hold(Partial { charge, claim, charged, slot }, &route, source, spend);
                }
                Decision::Admitted(Self::ticket_of(charge, claim, charged, slot, cost, source, spend))
            }
            // Refused for its quota: the request spends no rate cells, nor money (its spend
            // goes back as it drops).
            Err(Take::Exhausted) => self.reject(Self::quota_exceeded(Partial { charge, claim, charged, slot }, meter)),
            Err(_) => Decision::pending(Stage::Quota(Box::new(Partial { charge, claim, charged, slot })), route),
        }
    }

    /// The spend of a request's route cost on a plan with a spend cap (`spend`, the spend
    /// meter's index): taken from the spend lease at once, or (a route whose meter is not
    /// priced, that reports priced meters) only checked for a unit left. `Err`: the hard cap
    /// cannot cover it ([`Take::Exhausted`]), or only the store can tell.
    #[cold]
    #[inline(never)]
    pub(crate) fn route_spend(
        &self,
        state: &Tenant,
        route: &RouteCost,
        spend: usize,
        at: i64,
    ) -> Result<RouteSpend, Take> {
        let Some(cell) = state.quota(spend) else { return Ok(RouteSpend::nothing(at)) };
        let exact = crate::engine::usage::spend::cost_of(state, route.meter, u64::from(route.cost));
        let exact = exact.unwrap_or_default();
        let need = crate::config::ceil_nanos(exact);
        if need == 0 {
            if route.reports & state.plan.priced != 0 {
                // A soft cap whose lease the records overdrew: to the store (its debt paid,
                // and the tenant's own cap, maybe set meanwhile, read).
                if cell.lease() < 0 && !cell.hard() {
                    return Err(Take::NeedLease);
                }
                match cell.check_units(1, at) {
                    Ok(()) => {}
                    Err(Take::Exhausted) if state.plan.shadow => self.would_refuse(&Self::shadow_spend(state, at)),
                    Err(why) => return Err(why),
                }
            }
            return Ok(RouteSpend { exact, ..RouteSpend::nothing(at) });
        }
        match cell.try_take(need, at) {
            Take::Taken { left, tag } => {
                if cell.wants_prefetch(left) {
                    self.units.prefetcher().request(state, spend, cell);
                }
                Ok(RouteSpend { exact, taken: Taken::lease(state, spend, need, tag, at), at })
            }
            Take::Exhausted if state.plan.shadow => {
                // Shadow mode: taken past the cap (owed to the store), the refusal counted.
                self.would_refuse(&Self::shadow_spend(state, at));
                Ok(RouteSpend { exact, taken: Taken::force(state, spend, need, at), at })
            }
            other => Err(other),
        }
    }

    /// The refusal of a spent spend cap that shadow mode counts.
    #[cold]
    pub(crate) fn shadow_spend(state: &Tenant, at: i64) -> Rejection {
        crate::engine::usage::spend::cap_reached(state, at)
    }

    /// The refusal of a request whose route's cost the hard spend cap cannot cover: its rate
    /// cells go back and its key is released.
    #[cold]
    #[inline(never)]
    pub(crate) fn spend_cap_reached(p: Partial) -> Rejection {
        let at = p.charge.at;
        let (state, _) = p.refuse();
        crate::engine::usage::spend::cap_reached(&state, at)
    }

    /// Whether the hard quotas of the meters a route's handler reports still have units: the
    /// first that does not (spent, or only the store can tell), with why.
    #[inline]
    pub(crate) fn check_reports(state: &Tenant, reports: u64, now: i64) -> Result<(), (usize, Take)> {
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

    /// Takes quota units from the local lease, in place. `Ok`: where they came from (`None`:
    /// none were taken, the meter has no quota or the request is a replay); `Err`:
    /// [`Take::Exhausted`], or [`Take::NeedLease`] (refill the lease first).
    #[inline(always)]
    pub(crate) fn take_units(
        &self,
        state: &Tenant,
        headers: &mut HeaderState,
        meter: usize,
        cost: u32,
        charged: bool,
        at: i64,
    ) -> Result<Option<Source>, Take> {
        let Some(cell) = state.quota(meter) else {
            return Ok(None);
        };
        if !charged {
            // A replay takes nothing.
            return Ok(None);
        }
        match cell.try_take(u64::from(cost), at) {
            Take::Taken { left, tag } => {
                self.taken(state, headers, meter, cell, cost, left, at);
                Ok(Some(Source::Lease(tag)))
            }
            Take::Exhausted if state.plan.shadow => {
                // Shadow mode: taken past the limit (owed to the store), the refusal counted.
                self.would_refuse(&Self::shadow_quota(state, meter));
                headers.set_quota(0, (cell.period().1 - at).max(0) as u64);
                Ok(Some(Source::forced(cell.force_take(u64::from(cost), at))))
            }
            other => Err(other),
        }
    }

    /// Counts an anonymous request without a client address: it shares one bucket with the
    /// others like it.
    #[cold]
    fn without_address(&self) {
        self.shared.totals().anonymous_without_address.add(1);
    }

    /// The refusal of a spent rate that shadow mode counts.
    #[cold]
    fn shadow_rate(state: &Tenant) -> Rejection {
        let mut r = Rejection::new(RejectionKind::RateLimited, "the rate is spent (shadow mode: not refused)");
        r.inner.policy = Some("rate".to_owned());
        r.for_tenant(state)
    }

    /// The refusal of a spent hard quota that shadow mode counts.
    #[cold]
    pub(crate) fn shadow_quota(state: &Tenant, meter: usize) -> Rejection {
        let mut r = Rejection::new(RejectionKind::QuotaExceeded, "the quota is spent (shadow mode: not refused)");
        if let Some(cell) = state.quota(meter) {
            r.inner.policy = Some(format!("{}-{}", cell.meter_id(), cell.spec.period().name()));
        }
        r.for_tenant(state)
    }

    /// Headers, overage and prefetch after units were taken, `left` remaining in the lease.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn taken(
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
            self.units.prefetcher().request(state, meter, cell);
        }
    }

    /// The quota's header item for a request refused before it took units: what remains,
    /// read without taking.
    pub(crate) fn quota_headers(state: &Tenant, headers: &mut HeaderState, meter: usize, at: i64) {
        if state.plan.header_style == HeaderStyle::None {
            return;
        }
        if let Some(cell) = state.quota(meter) {
            let (remaining, end) = cell.status_at(at).unwrap_or_else(|| (cell.limit(), cell.window(at).1));
            headers.set_quota(remaining, (end - at).max(0) as u64);
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
        let Partial { charge, claim, charged, slot } = p;
        Self::ticket_of(charge, claim, charged, slot, cost, source, spend)
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
    ) -> Pass {
        let at = charge.at;
        let (state, headers) = charge.keep();
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
        }
    }

    /// `Retry-After` of a refusal of an empty balance while a recharge of it is under way.
    pub(crate) const RECHARGE_RETRY_AFTER_SECS: u64 = 5;

    /// The refusal of a spent quota (of the route's meter, or of a meter its handler
    /// reports): its rate cells go back and its key is released.
    #[cold]
    #[inline(never)]
    pub(crate) fn quota_exceeded(p: Partial, meter: usize) -> Rejection {
        // Refused: the key is released and the place freed (their drops).
        let at = p.charge.at;
        let (state, mut headers) = p.refuse();
        let cell = state.quota(meter).expect("a quota rejection names a meter with a quota");
        let (_, end) = cell.period();
        let policy = format!("{}-{}", cell.meter_id(), cell.spec.period().name());
        // An empty balance comes back with a payment, not with time: no Retry-After; but for
        // a recharge under way, a few seconds (its grant reaches every node within a second
        // of `invoice.paid`).
        let (mut r, retry) = if let Some(n) = cell.recharge_pending() {
            let r = Rejection::new(
                state.plan.balance_refusal,
                Cow::Owned(format!(
                    "the prepaid {} balance is spent, and recharge {n} is under way: its units are granted once \
                     its payment goes through; try again in a few seconds",
                    cell.meter_id(),
                )),
            );
            (r, Some(Self::RECHARGE_RETRY_AFTER_SECS))
        } else if cell.prepaid() {
            let r = Rejection::new(
                state.plan.balance_refusal,
                // No count: this node's last answer from the store may be stale (a top-up
                // since), and the store alone knows what is left.
                Cow::Owned(format!(
                    "the prepaid {} balance is spent: the units granted and not expired are all used; a top-up \
                     restores it",
                    cell.meter_id(),
                )),
            );
            (r, None)
        } else {
            let r = Rejection::new(
                RejectionKind::QuotaExceeded,
                Cow::Owned(format!(
                    "the {} quota of {} {} on plan `{}` is spent until the period ends",
                    cell.spec.period().name(),
                    cell.spec.limit(),
                    cell.meter_id(),
                    state.plan.id
                )),
            );
            (r, Some((end - at).max(1) as u64))
        };
        r.inner.policy = Some(policy);
        if meter == headers.meter() {
            headers.set_quota(0, retry.unwrap_or(0));
        } else {
            // A reported meter: its item is read live from the tenant; the route's meter
            // keeps its own.
            let own = headers.meter();
            Self::quota_headers(&state, &mut headers, own, at);
        }
        r.inner.headers = headers;
        match retry {
            Some(retry) => r.with_retry_after(retry).for_tenant(&state),
            None => r.for_tenant(&state),
        }
    }

    /// The tenant has its plan's `concurrency` requests in flight on this node: 429, to come
    /// back in a second; `RateLimit-Policy` names the limit (`qu="concurrent-requests"`).
    #[cold]
    pub(crate) fn too_many_in_flight(charge: RateCharge, meter: usize) -> Rejection {
        let at = charge.at;
        let (state, mut headers) = charge.refuse();
        let state = &state;
        Self::quota_headers(state, &mut headers, meter, at);
        headers.set_concurrency();
        let limit = state.plan.concurrency;
        let mut r = Rejection::new(
            RejectionKind::ConcurrencyLimited,
            Cow::Owned(format!(
                "{limit} requests of this tenant are in flight already: plan `{}` allows {limit} at once",
                state.plan.id
            )),
        );
        r.inner.policy = Some("concurrency".to_owned());
        r.inner.headers = headers;
        r.with_retry_after(1).for_tenant(state)
    }

    #[cold]
    pub(crate) fn shadow_concurrency(state: &Tenant) -> Rejection {
        let mut r =
            Rejection::new(RejectionKind::ConcurrencyLimited, "too many requests in flight (shadow mode: not refused)");
        r.inner.policy = Some("concurrency".to_owned());
        r.for_tenant(state)
    }
}
