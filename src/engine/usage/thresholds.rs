//! Threshold notifications: a tenant's quota crossing `usage.notify_at` (percent used) or
//! `usage.notify_left` (units left) calls the hook once per threshold, quota and period (for a
//! prepaid balance: per limit, so each top-up starts afresh) on this node.

use std::{collections::HashMap, sync::Mutex};

use crate::{
    base::{MeterId, Period, PlanId, QuotaMode, TenantId},
    plan::Runtime,
    tenant::QuotaRef,
};

/// A tenant crossed a threshold of a quota (`usage.notify_at`): given to the
/// [`on_threshold`](crate::Builder::on_threshold) hook, once per threshold, quota and period on a
/// node. Measured by the units the fleet has used, as the store said on this node's last
/// lease refill: reserved, less what every node keeps unused (its lease, its requests' holds,
/// its jobs' reservations) as its last call said. A threshold is seen within a lease of the
/// moment usage reaches it; units only leased or held never cross one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ThresholdCrossed {
    /// The tenant.
    pub tenant: TenantId,
    /// Its plan.
    pub plan: PlanId,
    /// The quota's meter.
    pub meter: MeterId,
    /// The quota's period.
    pub period: Period,
    /// The period's start (Unix seconds).
    pub start: i64,
    /// The period's end.
    pub end: i64,
    /// The quota's limit (a prepaid balance's: the units of its open grants then).
    pub limit: u64,
    /// Hard or soft.
    pub mode: QuotaMode,
    /// The threshold crossed, in percent of the limit (`usage.notify_at`); for a threshold
    /// of units left, the percentage used then (rounded down).
    pub percent: u16,
    /// For a threshold of units left (`usage.notify_left`), its units: `limit − used` is
    /// at most this many. `None` for a percentage.
    pub left: Option<u64>,
    /// The units the fleet had reserved then: used, and kept by nodes in leases and holds.
    pub reserved: u64,
    /// Of them, the units used (what the threshold measures).
    pub used: u64,
}

/// The thresholds notified for a tenant's quota: of which period and limit, which percentages.
pub(crate) struct Marks {
    pub(crate) start: i64,
    pub(crate) end: i64,
    pub(crate) limit: u64,
    pub(crate) done: Vec<u16>,
    pub(crate) left_done: Vec<u64>,
}

/// The threshold hook.
pub(crate) type ThresholdHook = std::sync::Arc<dyn Fn(&ThresholdCrossed) + Send + Sync>;

/// The most (tenant, meter, month) a node remembers offering a recharge limit's alert for.
const MAX_LIMITED_MONTHS: usize = 10_000;

/// The hook and what it was told, and the queue of crossings for the alerts outbox: kept by
/// the engine, not the tenants' states.
pub(crate) struct Thresholds {
    hook: Option<ThresholdHook>,
    /// Crossings waiting to be written to the alerts outbox (`[alerts]`).
    queue: std::sync::Arc<crate::engine::alerts::AlertQueue>,
    /// The thresholds notified, per (tenant, meter): in which period and limit, which
    /// percentages (bounded: see [`check`](Self::check)).
    marks: Mutex<HashMap<(TenantId, MeterId), Marks>>,
}

impl std::fmt::Debug for Thresholds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Thresholds").field("hook", &self.hook.is_some()).finish_non_exhaustive()
    }
}

impl Thresholds {
    /// Whether anything watches `cell`'s use: the hook, or alerts it may send (to the
    /// operator's endpoints, or its tenant's). Nothing watches a minute's: a rate of units
    /// would cross its thresholds every minute.
    pub(crate) fn watches(&self, rt: &Runtime, cell: QuotaRef<'_>) -> bool {
        if cell.spec.period() == crate::base::Period::Minute {
            return false;
        }
        let usage = &rt.config.usage;
        let thresholds = !usage.notify_at.is_empty() || !usage.notify_left.is_empty();
        let alerts = !rt.config.alerts().endpoints.is_empty()
            || rt.config.plan(cell.plan_id()).is_some_and(crate::config::PlanSpec::tenant_alerts);
        (self.hook.is_some() && thresholds) || alerts
    }

    /// Offers the alerts outbox every threshold `used` units have crossed (its queue
    /// writes each crossing once per node, put-if-absent in the outbox: once per fleet): the
    /// percentages of `usage.notify_at` (below 100 for a hard quota or a balance, whose limit
    /// reached is its own alert), the units left of `usage.notify_left`, and a hard limit or a
    /// balance reached.
    fn offer_alerts(&self, rt: &Runtime, now: i64, cell: QuotaRef<'_>, used: u64, start: i64, end: i64) {
        let settings = rt.config.alerts();
        let to_tenant = rt.config.plan(cell.plan_id()).is_some_and(crate::config::PlanSpec::tenant_alerts);
        let limit = cell.limit();
        if (settings.endpoints.is_empty() && !to_tenant) || limit == 0 {
            return;
        }
        use crate::engine::alerts::{Crossing, Threshold};
        let usage = &rt.config.usage;
        // A spend cap: its currency; its mode the tenant's own cap's when it set one; its
        // alerts at `notify_at` percent and when reached, whatever its mode.
        let currency = cell.spec.capped.then(|| rt.config.billing().currency.clone()).flatten();
        let prepaid = cell.prepaid();
        let mode = if cell.hard() { QuotaMode::Hard } else { QuotaMode::Soft };
        let capped = prepaid || mode == QuotaMode::Hard || currency.is_some();
        let mut crossed: Vec<Threshold> = usage
            .notify_at
            .iter()
            .filter(|p| !(capped && **p >= 100))
            .filter(|p| u128::from(used) * 100 >= u128::from(limit) * u128::from(**p))
            .map(|p| Threshold::Percent(*p))
            .collect();
        if currency.is_none() {
            crossed.extend(
                usage.notify_left.iter().filter(|n| limit.saturating_sub(used) <= **n).map(|n| Threshold::Left(*n)),
            );
        }
        if capped && used >= limit {
            crossed.push(Threshold::Exhausted);
        }
        if crossed.is_empty() {
            return;
        }
        let crossings = crossed
            .into_iter()
            .map(|threshold| {
                let c = Crossing {
                    tenant: cell.tenant().clone(),
                    plan: cell.plan_id().clone(),
                    meter: cell.meter_id().clone(),
                    period: cell.spec.period(),
                    start,
                    end,
                    limit,
                    mode,
                    prepaid,
                    threshold,
                    used,
                    at: now,
                    episode: String::new(),
                    currency: currency.clone(),
                };
                let to = c.destinations(settings, &rt.config);
                (c, to)
            })
            .collect();
        let cap = rt.config.limits.max_tenants.saturating_mul(4).max(1024);
        let dropped = self.queue.offer(crossings, cap);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "alerts: crossings dropped, too many waiting to be written (seen again at a refill)"
            );
        }
    }

    /// Queues the alert of a month's limit that stopped a recharge, as a store's answer told
    /// it (once per node and month; written by the next flush).
    pub(crate) fn recharge_limited(&self, alert: crate::engine::alerts::RechargeAlert) {
        self.queue.offer_limited(alert, MAX_LIMITED_MONTHS);
    }

    pub(crate) fn new(hook: Option<ThresholdHook>, queue: std::sync::Arc<crate::engine::alerts::AlertQueue>) -> Self {
        Self { hook, queue, marks: Mutex::default() }
    }

    /// Calls the threshold hook for the thresholds of `usage.notify_at` that `used` units (all
    /// the fleet's, as the store just said: of the `reserved`, those not kept by any node)
    /// reach for the first time in this period on this node.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check(
        &self,
        rt: &Runtime,
        now: i64,
        cell: QuotaRef<'_>,
        reserved: u64,
        used: u64,
        start: i64,
        end: i64,
    ) {
        // A minute's quota is a rate: no threshold or alert every minute (see `watches`).
        if cell.spec.period() == crate::base::Period::Minute {
            return;
        }
        self.offer_alerts(rt, now, cell, used, start, end);
        let Some(hook) = &self.hook else { return };
        let limit_units = cell.limit();
        let limit = u128::from(limit_units);
        let usage = &rt.config.usage;
        let crossed: Vec<u16> =
            usage.notify_at.iter().copied().filter(|pct| u128::from(used) * 100 >= limit * u128::from(*pct)).collect();
        let left = limit_units.saturating_sub(used);
        // A balance without a grant yet has nothing to be left of.
        let crossed_left: Vec<u64> =
            usage.notify_left.iter().copied().filter(|n| left <= *n && limit_units > 0).collect();
        let crossed: Vec<u16> = if limit_units == 0 { Vec::new() } else { crossed };
        if crossed.is_empty() && crossed_left.is_empty() {
            return;
        }
        // Kept by the engine, not the tenant's state: a state rebuilt (a reload, an eviction,
        // a plan change) does not notify again in the same period; a new period, or a new
        // limit (a plan change), starts afresh. Marked by percentage, so a reload that changes
        // `notify_at` keeps what was notified.
        let (new, new_left): (Vec<u16>, Vec<u64>) = {
            let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
            let cap = rt.config.limits.max_tenants.saturating_mul(4).max(1024);
            let key = (cell.tenant().clone(), cell.meter_id().clone());
            if !marks.contains_key(&key) && marks.len() >= cap {
                marks.retain(|_, m| m.end > now);
                if marks.len() >= cap {
                    // Held tenants over the cap: the oldest marks go (they may notify again).
                    marks.clear();
                }
            }
            let fresh = || Marks { start, end, limit: limit_units, done: Vec::new(), left_done: Vec::new() };
            let m = marks.entry(key).or_insert_with(fresh);
            if (m.start, m.limit) != (start, limit_units) {
                *m = fresh();
            }
            let new: Vec<u16> = crossed.into_iter().filter(|p| !m.done.contains(p)).collect();
            m.done.extend(&new);
            let new_left: Vec<u64> = crossed_left.into_iter().filter(|n| !m.left_done.contains(n)).collect();
            m.left_done.extend(&new_left);
            (new, new_left)
        };
        let used_pct = (u128::from(used) * 100).checked_div(limit).map_or(0, |p| u16::try_from(p).unwrap_or(u16::MAX));
        let marks = new.into_iter().map(|p| (p, None)).chain(new_left.into_iter().map(|n| (used_pct, Some(n))));
        for (pct, left) in marks {
            let crossed = ThresholdCrossed {
                tenant: cell.tenant().clone(),
                plan: cell.plan_id().clone(),
                meter: cell.meter_id().clone(),
                period: cell.spec.period(),
                start,
                end,
                limit: limit_units,
                mode: cell.spec.mode(),
                percent: pct,
                left,
                reserved,
                used,
            };
            tracing::info!(tenant = %crossed.tenant, meter = %crossed.meter, percent = pct, left = ?left,
                "quota threshold crossed");
            hook(&crossed);
        }
    }
}
