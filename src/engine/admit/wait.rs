//! Admission that waits on the store: a quota cell's lease refilled (the request's units
//! straight from its reservation), the reported meters' quotas asked, `on_store_error` when
//! the store does not answer in time.

use std::sync::Arc;

use crate::engine::{
    admit::{
        gate::Gate,
        stage::{Decision, Partial},
    },
    usage::{
        spend::RouteSpend,
        taken::{Source, Taken},
    },
};
use crate::{
    config::StoreErrorPolicy,
    plan::{RouteCost, Runtime},
    response::{Rejection, RejectionKind},
    tenant::Take,
};

impl Gate {
    /// Takes the units with the quota cell's lock held: from the lease if a refill came in
    /// meanwhile, else straight from a new reservation, so that no other request can take
    /// them first. Its turn on the lock is bounded by `queue_timeout` (past it, 429 `Tenant
    /// busy` where the quota fails closed), the calls once it has come by `store_timeout`,
    /// then `on_store_error` applies. A hard quota
    /// refuses only when the store has fewer units left than the request costs. Refused (or
    /// dropped while it waits), its rate cells go back (its charge's drop).
    pub(crate) async fn lease_and_take(&self, mut p: Partial, route: RouteCost, rt: &Arc<Runtime>) -> Decision {
        let state = p.charge.state().clone();
        if route.reports != 0 {
            p = match self.check_reports_with_store(p, route, rt).await {
                Ok(p) => p,
                Err(r) => return Decision::Rejected(r),
            };
        }
        // On a plan with a spend cap, the route's cost in money first; it goes back (as it
        // drops) if the request is refused after (its route's own quota, the store).
        let spend = match state.plan.spend {
            Some(s) if p.charged => match self.route_spend_with_store(p, route, s, rt).await {
                Ok((spend, back)) => {
                    p = back;
                    Some(spend)
                }
                Err(r) => return Decision::Rejected(r),
            },
            _ => None,
        };
        // A tenant in an organization: the organization's quotas (`org.rs`), then its own.
        if state.plan.org.is_some() {
            p = match self.org_units_with_store(p, route, rt).await {
                Ok(p) => p,
                Err(r) => return Decision::Rejected(r),
            };
        }
        self.lease_and_take_units(p, route, rt, spend).await
    }

    /// The spend of the route's cost ([`route_spend`](Self::route_spend)), asking the store
    /// with the spend cell's lock held when the lease cannot tell; `on_store_error` when it
    /// does not answer. Refused: 402 (its rate cells go back, its key is released).
    async fn route_spend_with_store(
        &self,
        p: Partial,
        route: RouteCost,
        spend: usize,
        rt: &Arc<Runtime>,
    ) -> Result<(RouteSpend, Partial), Rejection> {
        let state = p.charge.state().clone();
        let at = p.charge.at;
        match self.route_spend(&state, &route, spend, at) {
            Ok(s) => return Ok((s, p)),
            Err(Take::Exhausted) => return Err(self.count(Self::spend_cap_reached(p))),
            Err(_) => {}
        }
        let Some(cell) = state.quota(spend) else { return Ok((RouteSpend::nothing(at), p)) };
        let exact =
            crate::engine::usage::spend::cost_of(&state, route.meter, u64::from(route.cost)).unwrap_or_default();
        let need = crate::config::ceil_nanos(exact);
        if need > crate::base::LEASE_MAX {
            // No lease can hold it (2⁴⁶ nano-units): no period can ever cover it, as a hold
            // past it (400, no `Retry-After`); shadow mode counts it.
            let r = crate::engine::usage::hold::spent(&state, spend, at, false);
            if state.plan.shadow {
                self.would_refuse(&r);
                return Ok((RouteSpend { exact, taken: Taken::force(&state, spend, need, at), at }, p));
            }
            drop(p);
            return Err(self.count(r));
        }
        // Wanted while it waits its turn: the call ahead of it asks for these units too.
        let wanted = cell.want(need);
        let outcome = self
            .shared
            .stores()
            .under_lock(cell.lock(), async {
                self.units.leases().settle_inflight(cell).await?;
                if need == 0 {
                    // Only checked: a unit of the cap must be left (a soft cap's overdrawn
                    // lease goes to the store: its debt paid, the tenant's own cap read).
                    if (cell.lease() < 0 && !cell.hard()) || matches!(cell.check_units(1, at), Err(Take::NeedLease)) {
                        self.units.leases().refill_locked(rt, cell, at, 0, 0, false).await?;
                    }
                    return Ok(cell.check_units(1, at).map(|()| None).map_err(drop));
                }
                Ok(match self.units.leases().take_locked(rt, cell, at, need, 0, true, Some(&wanted)).await? {
                    Some(t) => Ok(Some(t.tag)),
                    None => Err(()),
                })
            })
            .await;
        drop(wanted);
        let spent = |taken| RouteSpend { exact, taken, at };
        match outcome {
            Ok(Ok(Some(tag))) => Ok((spent(Taken::lease(&state, spend, need, tag, at)), p)),
            Ok(Ok(None)) => Ok((spent(Taken::none()), p)),
            Ok(Err(())) if state.plan.shadow => {
                self.would_refuse(&Self::shadow_spend(&state, at));
                Ok((spent(Taken::force(&state, spend, need, at)), p))
            }
            Ok(Err(())) => Err(self.count(Self::spend_cap_reached(p))),
            // Waited past `queue_timeout` behind the tenant's own calls: refused busy where the
            // quota fails closed (the store answered: not 503); failing open, admitted as below.
            Err(e)
                if crate::engine::store_calls::busy(&e)
                    && state.quota_policy(spend) == StoreErrorPolicy::FailClosed =>
            {
                drop(p);
                Err(self.count(crate::engine::usage::hold::busy(&state)))
            }
            Err(_) => match state.quota_policy(spend) {
                // Admitted without a lease: its spend is owed, and charged (past the cap if
                // need be) once the store answers again.
                StoreErrorPolicy::FailOpen => Ok((spent(Taken::force(&state, spend, need, at)), p)),
                StoreErrorPolicy::FailClosed => {
                    drop(p);
                    let r = Rejection::new(RejectionKind::StoreUnavailable, "the quota store did not answer in time");
                    Err(self.count(r.with_retry_after(1).for_tenant(&state)))
                }
            },
        }
    }

    /// [`lease_and_take`](Self::lease_and_take) once the reported meters and the spend are
    /// settled: the route meter's units.
    async fn lease_and_take_units(
        &self,
        mut p: Partial,
        route: RouteCost,
        rt: &Arc<Runtime>,
        spend: Option<RouteSpend>,
    ) -> Decision {
        let (meter, cost) = (route.meter, route.cost);
        let state = p.charge.state().clone();
        let Some(cell) = state.quota(meter) else {
            // No quota on the route's meter (the request waited for its spend or reported
            // meters): admitted, and counted as every admission is.
            self.count_admitted_unless_held(&state, &route, p.charged);
            return Self::admitted(p, &route, None, spend);
        };
        let at = p.charge.at;
        let charged = p.charged;
        // Its turn within `queue_timeout`, its calls within `store_timeout`; only the store
        // calls' own time counts toward failing fast, never the wait for other requests'.
        let leases = self.units.leases();
        // Wanted while it waits its turn: the call ahead of it asks for these units too.
        let wanted = charged.then(|| cell.want(u64::from(cost)));
        let outcome = self
            .shared
            .stores()
            .under_lock(cell.lock(), async {
                // A call left in flight by a timeout may have landed: its units come first.
                leases.settle_inflight(cell).await?;
                if !charged {
                    // A replay: the units must be there, but are not taken.
                    if cell.check_units(u64::from(cost), at).is_err() {
                        leases.refill_locked(rt, cell, at, 0, 0, false).await?;
                    }
                    return Ok(match cell.check_units(u64::from(cost), at) {
                        Ok(()) => Ok((None, cell.lease(), None)),
                        Err(_) => Err(()),
                    });
                }
                Ok(match leases.take_locked(rt, cell, at, u64::from(cost), 0, true, wanted.as_ref()).await? {
                    Some(t) => Ok((Some(t.tag), t.left, t.start)),
                    None => Err(()),
                })
            })
            .await;
        drop(wanted);
        match outcome {
            Ok(Ok((tag, left, start))) => {
                if let Some(start) = start {
                    // A request read the clock just before a period that another one rolled
                    // in: its units come from the new period, and so does its usage.
                    p.charge.at = p.charge.at.max(start);
                }
                let source = tag.map(|tag| {
                    let at = p.charge.at;
                    let (state, headers) = p.charge.split();
                    self.taken(state, headers, meter, cell, cost, left, at);
                    Source::Lease(tag)
                });
                self.count_admitted_unless_held(&state, &route, p.charged);
                Self::admitted(p, &route, source, spend)
            }
            Ok(Err(())) if charged && state.plan.shadow => {
                // Shadow mode: the units are taken past the limit (owed to the store), and the
                // refusal only counted.
                self.would_refuse(&Self::shadow_quota(&state, meter));
                let source = Source::forced(cell.force_take(u64::from(cost), at));
                p.charge.headers.set_quota(0, (cell.period().1 - p.charge.at).max(0) as u64);
                self.count_admitted_unless_held(&state, &route, p.charged);
                Self::admitted(p, &route, Some(source), spend)
            }
            Ok(Err(())) if state.plan.shadow => {
                self.would_refuse(&Self::shadow_quota(&state, meter));
                self.count_admitted_unless_held(&state, &route, p.charged);
                Self::admitted(p, &route, None, spend)
            }
            Ok(Err(())) => Decision::Rejected(self.count(Self::quota_exceeded(p, meter))),
            Err(e)
                if crate::engine::store_calls::busy(&e)
                    && state.quota_policy(meter) == StoreErrorPolicy::FailClosed =>
            {
                // Refused for its turn: its rate cells go back, its key is released.
                drop(p);
                Decision::Rejected(self.count(crate::engine::usage::hold::busy(&state)))
            }
            Err(_) => {
                match state.quota_policy(meter) {
                    StoreErrorPolicy::FailOpen => {
                        // Admitted without a lease: its units are owed, and charged to the
                        // period (past the limit if need be) once the store answers again.
                        let source = charged.then(|| Source::forced(cell.force_take(u64::from(cost), at)));
                        self.count_admitted_unless_held(&state, &route, p.charged);
                        Self::admitted(p, &route, source, spend)
                    }
                    StoreErrorPolicy::FailClosed => {
                        // Refused for the store: the request spends no rate cells (its charge
                        // goes back as it drops), and its key is released.
                        drop(p);
                        let r =
                            Rejection::new(RejectionKind::StoreUnavailable, "the quota store did not answer in time");
                        Decision::Rejected(self.count(r.with_retry_after(1).for_tenant(&state)))
                    }
                }
            }
        }
    }

    /// Whether `cell` has a unit left at `at`, asking the store with the cell's lock held when
    /// its lease cannot tell: its debt owed first, then a refill if need be.
    pub(crate) async fn unit_left(
        &self,
        rt: &Runtime,
        cell: crate::tenant::QuotaRef<'_>,
        at: i64,
    ) -> Result<Result<(), Take>, crate::store::StoreError> {
        let leases = self.units.leases();
        self.shared
            .stores()
            .under_lock(cell.lock(), async {
                leases.settle_inflight(cell).await?;
                if let Err(Take::NeedLease) = cell.check_units(1, at) {
                    leases.refill_locked(rt, cell, at, 0, 0, false).await?;
                }
                Ok(cell.check_units(1, at))
            })
            .await
    }

    /// [`check_reports`](Self::check_reports), asking the store where the lease cannot
    /// tell: a reported meter's debt is owed first, and the store then says whether units are
    /// left.
    pub(crate) async fn check_reports_with_store(
        &self,
        p: Partial,
        route: RouteCost,
        rt: &Arc<Runtime>,
    ) -> Result<Partial, Rejection> {
        let state = p.charge.state().clone();
        let at = p.charge.at;
        let mut bits = route.reports;
        while bits != 0 {
            let m = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let Some(cell) = state.quota(m) else { continue };
            if cell.check_units(1, at).is_ok() {
                continue;
            }
            let checked = self.unit_left(rt, cell, at).await;
            match checked {
                Ok(Err(Take::Exhausted)) if state.plan.shadow => self.would_refuse(&Self::shadow_quota(&state, m)),
                Ok(Err(Take::Exhausted)) => return Err(self.count(Self::quota_exceeded(p, m))),
                Ok(_) => {}
                Err(e)
                    if crate::engine::store_calls::busy(&e)
                        && state.quota_policy(m) == StoreErrorPolicy::FailClosed =>
                {
                    drop(p);
                    return Err(self.count(crate::engine::usage::hold::busy(&state)));
                }
                Err(_) => {
                    if state.quota_policy(m) == StoreErrorPolicy::FailClosed {
                        // Refused: its rate cells go back and its key is released (the drop).
                        drop(p);
                        let r =
                            Rejection::new(RejectionKind::StoreUnavailable, "the quota store did not answer in time");
                        return Err(self.count(r.with_retry_after(1).for_tenant(&state)));
                    }
                }
            }
        }
        Ok(p)
    }
}
