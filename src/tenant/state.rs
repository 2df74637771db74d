//! The per-tenant state of the request path, reached through one map lookup: the token
//! bucket, the quota leases and the usage counters.

use std::sync::{
    atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    Arc,
};

use governor::{middleware::StateInformationMiddleware, state::InMemoryState, state::NotKeyed, RateLimiter};
use smallvec::SmallVec;

use crate::{
    clock::Clock,
    config::{MeterId, QuotaMode, QuotaSpec, TenantId},
    plan::CompiledPlan,
};

pub(crate) type Limiter = RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;

/// Aligned to a cache line, so that the `Arc` counts (written by every request) do not share
/// a line with the fields every request reads. Quota and usage cells are inline (for up to two
/// quotas and two meters), so a request touches a few adjacent lines of one allocation.
///
/// `repr(C)`: the fields every request reads or writes come first, packed into as few lines as
/// possible; the cold ones come last.
#[repr(C, align(64))]
pub(crate) struct TenantState {
    evicted: AtomicBool,
    last_seen: AtomicI64,
    pub(crate) plan: Arc<CompiledPlan>,
    pub(crate) window_secs: i64,
    pub(crate) limiter: Option<Limiter>,
    /// (meter index, cell), one per quota of the plan, in the plan's order.
    quotas: SmallVec<[(u16, QuotaCell); 2]>,
    usage: SmallVec<[UsageCell; 2]>,
    pub(crate) id: TenantId,
    pub(crate) customer: Option<Arc<str>>,
    pub(crate) clock: Clock,
}

impl std::fmt::Debug for TenantState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantState").field("id", &self.id).field("plan", &self.plan.id).finish_non_exhaustive()
    }
}

impl TenantState {
    pub(crate) fn new(
        id: TenantId,
        plan: Arc<CompiledPlan>,
        customer: Option<Arc<str>>,
        clock: Clock,
        window_secs: i64,
    ) -> Self {
        let limiter = plan.rate.as_ref().map(|r| {
            RateLimiter::direct_with_clock(r.quota, clock.clone()).with_middleware::<StateInformationMiddleware>()
        });
        let quotas = plan.quotas.iter().enumerate().map(|(i, (meter, _))| (*meter as u16, QuotaCell::new(i))).collect();
        let usage = (0..plan.meters.ids.len()).map(|_| UsageCell::default()).collect();
        let now = clock.unix_secs();
        Self {
            id,
            plan,
            customer,
            clock,
            window_secs,
            limiter,
            quotas,
            usage,
            last_seen: AtomicI64::new(now),
            evicted: AtomicBool::new(false),
        }
    }

    #[inline]
    pub(crate) fn touch(&self, now: i64) {
        // Skip the store when the second has not changed: keeps the line shared between cores.
        if self.last_seen.load(Ordering::Relaxed) != now {
            self.last_seen.store(now, Ordering::Relaxed);
        }
    }

    pub(crate) fn last_seen(&self) -> i64 {
        self.last_seen.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    pub(crate) fn mark_evicted(&self) {
        self.evicted.store(true, Ordering::Release);
    }

    #[inline]
    pub(crate) fn quota(&self, meter: usize) -> Option<QuotaRef<'_>> {
        let (_, cell) = self.quotas.iter().find(|(m, _)| usize::from(*m) == meter)?;
        Some(self.view(meter, cell))
    }

    fn view<'a>(&'a self, meter: usize, cell: &'a QuotaCell) -> QuotaRef<'a> {
        QuotaRef {
            cell,
            meter,
            spec: &self.plan.quotas[usize::from(cell.index)].1,
            meter_id: &self.plan.meters.ids[meter],
        }
    }

    /// Every quota of the tenant.
    pub(crate) fn quotas(&self) -> impl Iterator<Item = QuotaRef<'_>> {
        self.quotas.iter().map(|(m, cell)| self.view(usize::from(*m), cell))
    }

    /// Adds usage to the window containing `now` (Unix seconds).
    #[inline]
    pub(crate) fn record(&self, meter: usize, now: i64, quantity: u64) {
        if let Some(cell) = self.usage.get(meter) {
            cell.add(now.div_euclid(self.window_secs), quantity);
        }
    }

    /// Takes all recorded usage: (meter index, window start in Unix seconds, quantity).
    pub(crate) fn drain_usage(&self, mut out: impl FnMut(usize, i64, u64)) {
        for (meter, cell) in self.usage.iter().enumerate() {
            for slot in &cell.slots {
                let window = slot.window.load(Ordering::Acquire);
                let quantity = slot.quantity.swap(0, Ordering::AcqRel);
                if quantity > 0 {
                    out(meter, window * self.window_secs, quantity);
                }
            }
        }
    }
}

/// Two window slots per meter: the current window and the one before, each tagged with its
/// window index so the worker attributes usage to the window it was recorded in.
#[derive(Default)]
struct UsageCell {
    slots: [UsageSlot; 2],
}

#[derive(Default)]
struct UsageSlot {
    window: AtomicI64,
    quantity: AtomicU64,
}

impl UsageCell {
    #[inline]
    fn add(&self, window: i64, quantity: u64) {
        let slot = &self.slots[(window & 1) as usize];
        if slot.window.load(Ordering::Relaxed) != window {
            slot.window.store(window, Ordering::Release);
        }
        slot.quantity.fetch_add(quantity, Ordering::AcqRel);
    }
}

/// The outcome of taking units from a local lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Taken; the tenant's remaining units (estimated across nodes) and whether this request is
    /// beyond a soft limit.
    Taken { remaining: u64, overage: bool },
    /// The local lease is empty or belongs to a past period: ask the store.
    NeedLease,
    /// The hard limit of this period is spent.
    Exhausted,
}

/// A tenant's allowance on one meter: a lease of units reserved from the store for one period.
/// Only the atomics live here; the quota's spec is read from the plan (see [`QuotaRef`]).
pub(crate) struct QuotaCell {
    /// Index of the quota in `plan.quotas`.
    index: u8,
    exhausted: AtomicBool,
    prefetching: AtomicBool,
    period_start: AtomicI64,
    period_end: AtomicI64,
    lease: AtomicI64,
    /// Usage reported while no lease of the current period was held: settled by the next refill.
    unleased: AtomicU64,
    reserved: AtomicU64,
}

impl QuotaCell {
    fn new(index: usize) -> Self {
        Self {
            index: index as u8,
            exhausted: AtomicBool::new(false),
            prefetching: AtomicBool::new(false),
            period_start: AtomicI64::new(0),
            period_end: AtomicI64::new(i64::MIN),
            lease: AtomicI64::new(0),
            unleased: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
        }
    }
}

/// A quota cell with its spec and meter.
#[derive(Clone, Copy)]
pub(crate) struct QuotaRef<'a> {
    cell: &'a QuotaCell,
    pub(crate) meter: usize,
    pub(crate) spec: &'a QuotaSpec,
    pub(crate) meter_id: &'a MeterId,
}

impl QuotaRef<'_> {
    fn hard(&self) -> bool {
        self.spec.mode() == QuotaMode::Hard
    }

    /// Takes `cost` units without waiting.
    #[inline]
    pub(crate) fn try_take(&self, cost: u64, now: i64) -> Take {
        let c = self.cell;
        if now >= c.period_end.load(Ordering::Acquire) {
            return Take::NeedLease;
        }
        let cost = cost as i64;
        let before = c.lease.fetch_sub(cost, Ordering::AcqRel);
        if before >= cost {
            let (remaining, overage) = self.estimate(before - cost);
            return Take::Taken { remaining, overage };
        }
        c.lease.fetch_add(cost, Ordering::AcqRel);
        if self.hard() && c.exhausted.load(Ordering::Acquire) {
            Take::Exhausted
        } else {
            Take::NeedLease
        }
    }

    /// Takes `quantity` units even if that leaves the lease negative (usage that already
    /// happened, reported by a handler). The next refill covers the debt.
    pub(crate) fn force_take(&self, quantity: u64, now: i64) {
        let c = self.cell;
        if now < c.period_end.load(Ordering::Acquire) {
            c.lease.fetch_sub(quantity as i64, Ordering::AcqRel);
        } else {
            c.unleased.fetch_add(quantity, Ordering::AcqRel);
        }
    }

    /// Gives back units of a request that is not billed, if its period is still current.
    pub(crate) fn refund(&self, cost: u64, period_end: i64) {
        let c = self.cell;
        if c.period_end.load(Ordering::Acquire) == period_end {
            c.lease.fetch_add(cost as i64, Ordering::AcqRel);
            c.exhausted.store(false, Ordering::Release);
        }
    }

    /// (remaining units across nodes, over a soft limit?) when `lease_left` units remain here.
    fn estimate(&self, lease_left: i64) -> (u64, bool) {
        let reserved = self.cell.reserved.load(Ordering::Relaxed);
        let used = reserved.saturating_sub(lease_left.max(0) as u64);
        let limit = self.spec.limit().get();
        (limit.saturating_sub(used), used > limit)
    }

    pub(crate) fn period(&self) -> (i64, i64) {
        (self.cell.period_start.load(Ordering::Acquire), self.cell.period_end.load(Ordering::Acquire))
    }

    pub(crate) fn lease(&self) -> i64 {
        self.cell.lease.load(Ordering::Acquire)
    }

    /// Whether the lease is below its low watermark (a quarter of a lease) and no prefetch is
    /// under way; claims the prefetch if so.
    #[inline]
    pub(crate) fn wants_prefetch(&self, now: i64) -> bool {
        let c = self.cell;
        let low = (self.spec.lease().get() / 4).max(1) as i64;
        now < c.period_end.load(Ordering::Relaxed)
            && c.lease.load(Ordering::Relaxed) < low
            && !c.exhausted.load(Ordering::Relaxed)
            && !c.prefetching.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn prefetch_done(&self) {
        self.cell.prefetching.store(false, Ordering::Release);
    }

    /// Starts a new period: returns the units left from the old one (negative: a debt).
    /// Call with the cell's refill lock held.
    pub(crate) fn roll_period(&self, start: i64, end: i64) -> i64 {
        let c = self.cell;
        let left = c.lease.swap(0, Ordering::AcqRel);
        c.exhausted.store(false, Ordering::Release);
        c.reserved.store(0, Ordering::Release);
        c.period_start.store(start, Ordering::Release);
        c.period_end.store(end, Ordering::Release);
        left
    }

    /// Moves usage reported outside any lease into the current lease (as a debt the refill
    /// covers). Call with the refill lock held, after [`roll_period`](Self::roll_period).
    pub(crate) fn settle_unleased(&self) {
        let debt = self.cell.unleased.swap(0, Ordering::AcqRel);
        if debt > 0 {
            self.cell.lease.fetch_sub(debt as i64, Ordering::AcqRel);
        }
    }

    /// Adds units granted by the store. Call with the refill lock held.
    pub(crate) fn grant(&self, granted: u64, reserved: u64, asked: u64) {
        let c = self.cell;
        c.reserved.store(reserved, Ordering::Release);
        c.lease.fetch_add(granted as i64, Ordering::AcqRel);
        if self.hard() && granted < asked {
            c.exhausted.store(true, Ordering::Release);
        }
    }

    /// Empties the lease (on eviction and shutdown): returns the units to give back.
    pub(crate) fn take_all(&self) -> i64 {
        self.cell.lease.swap(0, Ordering::AcqRel)
    }
}
