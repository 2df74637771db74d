//! Admission that waits on the store: a quota cell's lease refilled (the request's units
//! straight from its reservation), the reported meters' quotas asked, `on_store_error` when
//! the store does not answer in time.

use super::{admission::NO_TAG, engine::Partial, lease::Refill, ticket::UNLEASED, Ticket, Tollgate};
use crate::{
    config::StoreErrorPolicy,
    plan::RouteCost,
    response::{Rejection, RejectionKind},
    tenant::Take,
};

impl Tollgate {
    /// Takes the units with the quota cell's lock held: from the lease if a refill came in
    /// meanwhile, else straight from a new reservation, so that no other request can take
    /// them first. Bounded by `store_timeout`, then `on_store_error` applies. A hard quota
    /// refuses only when the store has fewer units left than the request costs.
    pub(crate) async fn lease_and_take(&self, mut p: Partial, route: RouteCost) -> Result<Ticket, Rejection> {
        let (meter, cost) = (route.meter, route.cost);
        let rt = self.shared.runtime.load_full();
        let state = p.state.clone();
        if route.reports != 0 {
            p = self.check_reports_with_store(p, route).await?;
        }
        let Some(cell) = state.quota(meter) else {
            return Ok(Self::ticket(p, cost, NO_TAG));
        };
        let at = p.at;
        let charged = p.charged;
        // At most `store_timeout` in all; only the store calls' own time counts toward
        // failing fast, never the wait for other requests' calls on the cell's lock.
        let outcome = self
            .shared
            .stores
            .under_lock(cell.lock(), async {
                // A call left in flight by a timeout may have landed: its units come first.
                self.shared.leases.settle_inflight(cell).await?;
                if !charged {
                    // A replay: the units must be there, but are not taken.
                    if cell.check_units(u64::from(cost), at).is_err() {
                        self.shared.leases.refill_locked(&rt, cell, at, 0).await?;
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
                match self.shared.leases.refill_locked(&rt, cell, at, u64::from(cost)).await? {
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
                Ok(Self::ticket(p, cost, tag))
            }
            Ok(Err(())) if charged && p.state.plan.shadow => {
                // Shadow mode: the units are taken past the limit (owed to the store), and the
                // refusal only counted.
                self.would_refuse(&Self::shadow_quota(&p.state, meter));
                let tag = cell.force_take(u64::from(cost), at).map_or(UNLEASED, u32::from);
                p.headers.set_quota(0, (cell.period().1 - p.at).max(0) as u64);
                self.shared.metrics.admitted.increment(1);
                Ok(Self::ticket(p, cost, tag))
            }
            Ok(Err(())) if p.state.plan.shadow => {
                self.would_refuse(&Self::shadow_quota(&p.state, meter));
                self.shared.metrics.admitted.increment(1);
                Ok(Self::ticket(p, cost, NO_TAG))
            }
            Ok(Err(())) => {
                p.state.give_back_rate(route.client, cost, &mut p.headers);
                Err(self.count(Self::quota_exceeded(p, meter)))
            }
            Err(_) => {
                match p.state.plan.quota_policy(meter) {
                    StoreErrorPolicy::FailOpen => {
                        // Admitted without a lease: its units are owed, and charged to the
                        // period (past the limit if need be) once the store answers again.
                        let tag = if charged {
                            cell.force_take(u64::from(cost), at).map_or(UNLEASED, u32::from)
                        } else {
                            NO_TAG
                        };
                        self.shared.metrics.admitted.increment(1);
                        Ok(Self::ticket(p, cost, tag))
                    }
                    StoreErrorPolicy::FailClosed => {
                        p.claim = None;
                        // Refused for the store: the request spends no rate cells.
                        p.state.give_back_rate(route.client, cost, &mut p.headers);
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
    pub(crate) async fn check_reports_with_store(
        &self,
        mut p: Partial,
        route: RouteCost,
    ) -> Result<Partial, Rejection> {
        let rt = self.shared.runtime.load_full();
        let state = p.state.clone();
        let mut bits = route.reports;
        while bits != 0 {
            let m = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let Some(cell) = state.quota(m) else { continue };
            if cell.check_units(1, p.at).is_ok() {
                continue;
            }
            let checked = self
                .shared
                .stores
                .under_lock(cell.lock(), async {
                    self.shared.leases.settle_inflight(cell).await?;
                    if let Err(Take::NeedLease) = cell.check_units(1, p.at) {
                        self.shared.leases.refill_locked(&rt, cell, p.at, 0).await?;
                    }
                    Ok(cell.check_units(1, p.at))
                })
                .await;
            match checked {
                Ok(Err(Take::Exhausted)) if p.state.plan.shadow => self.would_refuse(&Self::shadow_quota(&p.state, m)),
                Ok(Err(Take::Exhausted)) => {
                    p.state.give_back_rate(route.client, route.cost, &mut p.headers);
                    return Err(self.count(Self::quota_exceeded(p, m)));
                }
                Ok(_) => {}
                Err(_) => {
                    if p.state.plan.quota_policy(m) == StoreErrorPolicy::FailClosed {
                        p.claim = None;
                        p.state.give_back_rate(route.client, route.cost, &mut p.headers);
                        let r =
                            Rejection::new(RejectionKind::StoreUnavailable, "the quota store did not answer in time");
                        return Err(self.count(r.with_retry_after(1).for_tenant(&p.state)));
                    }
                }
            }
        }
        Ok(p)
    }
}
