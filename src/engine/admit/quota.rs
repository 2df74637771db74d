//! The quota stage of admission, without waiting: the route meter's units taken from the
//! tenant's lease (or forced in shadow mode), the reported meters' leases checked, a spend cap's
//! spend taken or checked, the quota's headers, and the 429 or 402 of a spent quota, balance or
//! cap. What waits on the store for a lease is `wait.rs`'s.

use std::borrow::Cow;

use crate::engine::{
    admit::{gate::Gate, stage::Partial},
    usage::{
        spend::RouteSpend,
        taken::{Source, Taken},
    },
};
use crate::{
    config::HeaderStyle,
    plan::RouteCost,
    response::{HeaderState, Rejection, RejectionKind},
    tenant::{QuotaRef, Take, Tenant},
};

impl Gate {
    /// `Retry-After` of a refusal of an empty balance while a recharge of it is under way.
    pub(crate) const RECHARGE_RETRY_AFTER_SECS: u64 = 5;

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
        let policy = format!("{}-{}", crate::base::policy_name(cell.meter_id().as_str()), cell.spec.period().name());
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

    /// The refusal of a spent hard quota that shadow mode counts.
    #[cold]
    pub(crate) fn shadow_quota(state: &Tenant, meter: usize) -> Rejection {
        let mut r = Rejection::new(RejectionKind::QuotaExceeded, "the quota is spent (shadow mode: not refused)");
        if let Some(cell) = state.quota(meter) {
            r.inner.policy =
                Some(format!("{}-{}", crate::base::policy_name(cell.meter_id().as_str()), cell.spec.period().name()));
        }
        r.for_tenant(state)
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
}
