//! The per-tenant state of the request path, reached through one map lookup: the GCRA cell,
//! the quota leases and the usage counters.

use std::sync::{
    atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering},
    Arc,
};

use governor::{
    nanos::Nanos,
    state::{InMemoryState, NotKeyed, StateStore},
};

use super::Tenant;
use crate::{
    clock::Clock,
    config::{MeterId, QuotaMode, QuotaSpec, TenantId},
    plan::CompiledPlan,
};

/// The state of one tenant, shared through [`Tenant`](super::Tenant) handles.
///
/// Laid out for the request path: everything a request on the plan's first meter reads or
/// writes (the handle count, the last-seen second, the GCRA cell, the plan, that meter's lease
/// and usage slots) fills the first cache line; the rest is cold. Aligned to a cache line, so
/// that no other allocation shares it.
#[repr(C, align(64))]
pub(crate) struct TenantState {
    /// The number of [`Tenant`](super::Tenant) handles; only they touch it.
    pub(super) refs: AtomicU32,
    /// Unix seconds (`u32`: until 2106).
    last_seen: AtomicU32,
    gcra: InMemoryState,
    pub(crate) plan: Arc<CompiledPlan>,
    first: MeterCell,
    // Cold from here.
    /// The cells of meters 1.. of the plan's meter table.
    more: Box<[MeterCell]>,
    /// One per quota of the plan, in the plan's order.
    quotas: Box<[QuotaCold]>,
    evicted: AtomicBool,
    pub(crate) id: TenantId,
    pub(crate) customer: Option<Arc<str>>,
    pub(crate) clock: Clock,
}

/// governor's keyed state store over the GCRA cells that live in the tenants' states: one
/// rate limiter per plan (its parameters, its clock) serves every tenant of the plan, and a
/// tenant's rate state costs 8 bytes on the line the request touches anyway.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct TenantCells;

impl StateStore for TenantCells {
    type Key = Tenant;

    #[inline]
    fn measure_and_replace<T, F, E>(&self, key: &Self::Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        key.gcra.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl std::fmt::Debug for TenantState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantState").field("id", &self.id).field("plan", &self.plan.id).finish_non_exhaustive()
    }
}

impl TenantState {
    pub(crate) fn new(id: TenantId, plan: Arc<CompiledPlan>, customer: Option<Arc<str>>, clock: Clock) -> Self {
        let meters = plan.meters.ids.len().max(1);
        let more = (1..meters).map(|_| MeterCell::default()).collect();
        let quotas = plan.quotas.iter().map(|_| QuotaCold::default()).collect();
        let now = clock.unix_secs();
        Self {
            refs: AtomicU32::new(1),
            last_seen: AtomicU32::new(now as u32),
            gcra: InMemoryState::default(),
            plan,
            first: MeterCell::default(),
            more,
            quotas,
            evicted: AtomicBool::new(false),
            id,
            customer,
            clock,
        }
    }

    #[inline]
    fn meter(&self, meter: usize) -> Option<&MeterCell> {
        if meter == 0 {
            Some(&self.first)
        } else {
            self.more.get(meter - 1)
        }
    }

    #[inline]
    pub(crate) fn touch(&self, now: i64) {
        // Skip the store when the second has not changed: keeps the line shared between cores.
        let now = now as u32;
        if self.last_seen.load(Ordering::Relaxed) != now {
            self.last_seen.store(now, Ordering::Relaxed);
        }
    }

    pub(crate) fn last_seen(&self) -> i64 {
        i64::from(self.last_seen.load(Ordering::Relaxed))
    }

    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    pub(crate) fn mark_evicted(&self) {
        self.evicted.store(true, Ordering::Release);
    }

    /// The quota of the tenant's plan on `meter`, if it has one.
    #[inline]
    pub(crate) fn quota(&self, meter: usize) -> Option<QuotaRef<'_>> {
        let index = usize::from(*self.plan.quota_of.get(meter)?.as_ref()?);
        Some(self.view(meter, index))
    }

    #[inline]
    fn view(&self, meter: usize, index: usize) -> QuotaRef<'_> {
        QuotaRef {
            state: self,
            hot: self.meter(meter).expect("every meter of the plan has a cell"),
            index,
            meter,
            spec: &self.plan.quotas[index].1,
        }
    }

    /// Every quota of the tenant.
    pub(crate) fn quotas(&self) -> impl Iterator<Item = QuotaRef<'_>> {
        self.plan.quotas.iter().enumerate().map(|(i, (meter, _))| self.view(*meter, i))
    }

    /// Adds usage to the window containing `now` (Unix seconds).
    #[inline]
    pub(crate) fn record(&self, meter: usize, now: i64, quantity: u64) {
        if let Some(cell) = self.meter(meter) {
            cell.add(self.plan.window_index(now), quantity);
        }
    }

    /// Takes all recorded usage: (meter index, window start in Unix seconds, quantity).
    pub(crate) fn drain_usage(&self, mut out: impl FnMut(usize, i64, u64)) {
        let window_secs = self.plan.window_secs;
        let cells = std::iter::once(&self.first).chain(self.more.iter());
        for (meter, cell) in cells.enumerate() {
            for slot in 0..2 {
                let window = cell.windows[slot].load(Ordering::Acquire);
                let quantity = cell.quantity[slot].swap(0, Ordering::AcqRel);
                if quantity > 0 {
                    out(meter, i64::from(window) * window_secs, quantity);
                }
            }
        }
    }
}

/// One meter of a tenant: the lease of its quota (if the plan has one on this meter) and two
/// usage slots, the current window and the one before, each tagged with its window index so
/// that the worker attributes usage to the window it was recorded in. 40 bytes.
#[derive(Default)]
struct MeterCell {
    lease: AtomicI64,
    /// The end (Unix seconds, `u32`: until 2106) of the period the lease belongs to; 0: no
    /// lease yet.
    period_end: AtomicU32,
    /// Below this many units left, the lease is refilled ahead of need.
    low: AtomicU32,
    windows: [AtomicU32; 2],
    quantity: [AtomicU64; 2],
}

impl MeterCell {
    #[inline]
    fn add(&self, window: u32, quantity: u64) {
        let slot = (window & 1) as usize;
        if self.windows[slot].load(Ordering::Relaxed) != window {
            self.windows[slot].store(window, Ordering::Release);
        }
        self.quantity[slot].fetch_add(quantity, Ordering::AcqRel);
    }
}

/// The parts of a quota the request path reads only on its slow paths.
#[derive(Default)]
struct QuotaCold {
    exhausted: AtomicBool,
    prefetching: AtomicBool,
    period_start: AtomicI64,
    /// The size of the next lease (0: the configured one); grows while refills come fast.
    size: AtomicU64,
    /// When the lease was last refilled, in Unix nanoseconds.
    refilled_at: AtomicI64,
    /// Usage reported while no lease of the current period was held: settled by the next refill.
    unleased: AtomicU64,
    reserved: AtomicU64,
}

/// The outcome of taking units from a local lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Taken; `left` units remain in the local lease.
    Taken { left: i64 },
    /// The local lease is empty or belongs to a past period: ask the store.
    NeedLease,
    /// The hard limit of this period is spent.
    Exhausted,
}

/// A quota cell with its spec and meter.
#[derive(Clone, Copy)]
pub(crate) struct QuotaRef<'a> {
    state: &'a TenantState,
    hot: &'a MeterCell,
    index: usize,
    pub(crate) meter: usize,
    pub(crate) spec: &'a QuotaSpec,
}

impl<'a> QuotaRef<'a> {
    /// The parts of the quota only slow paths touch (another cache line).
    #[inline]
    fn cold(&self) -> &'a QuotaCold {
        &self.state.quotas[self.index]
    }

    pub(crate) fn meter_id(&self) -> &'a MeterId {
        &self.state.plan.meters.ids[self.meter]
    }

    pub(crate) fn hard(&self) -> bool {
        self.spec.mode() == QuotaMode::Hard
    }

    /// Takes `cost` units without waiting. Reads only the meter's hot cell when it succeeds.
    #[inline]
    pub(crate) fn try_take(&self, cost: u64, now: i64) -> Take {
        let h = self.hot;
        if now >= i64::from(h.period_end.load(Ordering::Acquire)) {
            return Take::NeedLease;
        }
        let cost = cost as i64;
        let before = h.lease.fetch_sub(cost, Ordering::AcqRel);
        if before >= cost {
            return Take::Taken { left: before - cost };
        }
        h.lease.fetch_add(cost, Ordering::AcqRel);
        if self.hard() && self.cold().exhausted.load(Ordering::Acquire) {
            Take::Exhausted
        } else {
            Take::NeedLease
        }
    }

    /// Takes `quantity` units even if that leaves the lease negative (usage that already
    /// happened, reported by a handler). The next refill covers the debt.
    pub(crate) fn force_take(&self, quantity: u64, now: i64) {
        if now < i64::from(self.hot.period_end.load(Ordering::Acquire)) {
            self.hot.lease.fetch_sub(quantity as i64, Ordering::AcqRel);
        } else {
            self.cold().unleased.fetch_add(quantity, Ordering::AcqRel);
        }
    }

    /// Gives back units of a request that is not billed, if its period is still current.
    pub(crate) fn refund(&self, cost: u64, period_end: i64) {
        if i64::from(self.hot.period_end.load(Ordering::Acquire)) == period_end {
            self.hot.lease.fetch_add(cost as i64, Ordering::AcqRel);
            self.cold().exhausted.store(false, Ordering::Release);
        }
    }

    /// (remaining units across nodes, over a soft limit?) when `lease_left` units remain here.
    pub(crate) fn estimate(&self, lease_left: i64) -> (u64, bool) {
        let reserved = self.cold().reserved.load(Ordering::Relaxed);
        let used = reserved.saturating_sub(lease_left.max(0) as u64);
        let limit = self.spec.limit().get();
        (limit.saturating_sub(used), used > limit)
    }

    pub(crate) fn period(&self) -> (i64, i64) {
        (self.cold().period_start.load(Ordering::Acquire), self.period_end())
    }

    /// The end of the period of the lease held.
    #[inline]
    pub(crate) fn period_end(&self) -> i64 {
        i64::from(self.hot.period_end.load(Ordering::Acquire))
    }

    pub(crate) fn lease(&self) -> i64 {
        self.hot.lease.load(Ordering::Acquire)
    }

    /// Whether `lease_left` is below the low watermark (a quarter of the last lease) and no
    /// prefetch is under way; claims the prefetch if so. Reads the cold part only below the
    /// watermark.
    #[inline]
    pub(crate) fn wants_prefetch(&self, lease_left: i64) -> bool {
        lease_left < self.low()
            && !self.cold().exhausted.load(Ordering::Relaxed)
            && !self.cold().prefetching.swap(true, Ordering::AcqRel)
    }

    /// The low watermark: a quarter of the last lease.
    #[inline]
    pub(crate) fn low(&self) -> i64 {
        i64::from(self.hot.low.load(Ordering::Relaxed)).max(1)
    }

    /// The size of the next lease, adapted to how fast the tenant uses its units, so that a
    /// busy tenant asks the store about once a second whatever its request rate (store traffic
    /// follows tenants, not requests): doubled when the last lease lasted under a second,
    /// halved (down to the configured size) when it lasted over a minute. Capped at a
    /// sixteenth of the limit (or the configured size, if larger), so that one node of a fleet
    /// never holds much of a hard quota. Reads only; [`leased`](Self::leased) records it.
    pub(crate) fn next_size(&self, now_nanos: i64) -> u64 {
        let cold = self.cold();
        let base = self.spec.lease().get();
        let cap = base.max(self.spec.limit().get() / 16);
        let size = match cold.size.load(Ordering::Relaxed) {
            0 => base,
            s => s,
        };
        let last = cold.refilled_at.load(Ordering::Relaxed);
        let lasted = now_nanos.saturating_sub(last);
        if last == 0 {
            size
        } else if lasted < 1_000_000_000 {
            size.saturating_mul(2).min(cap)
        } else if lasted > 60_000_000_000 {
            (size / 2).max(base)
        } else {
            size
        }
    }

    /// Records a lease of `size` units granted at `now_nanos` (the pace the next size
    /// follows) and moves the low watermark to a quarter of it. Call with the refill lock held,
    /// only once the store has answered: a failed refill changes nothing.
    pub(crate) fn leased(&self, size: u64, now_nanos: i64) {
        let cold = self.cold();
        cold.size.store(size, Ordering::Relaxed);
        cold.refilled_at.store(now_nanos, Ordering::Relaxed);
        self.hot.low.store(u32::try_from(size / 4).unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    pub(crate) fn prefetch_done(&self) {
        self.cold().prefetching.store(false, Ordering::Release);
    }

    /// Starts a new period: returns the units left from the old one (negative: a debt).
    /// Call with the cell's refill lock held.
    pub(crate) fn roll_period(&self, start: i64, end: i64) -> i64 {
        let left = self.hot.lease.swap(0, Ordering::AcqRel);
        self.cold().exhausted.store(false, Ordering::Release);
        self.cold().reserved.store(0, Ordering::Release);
        self.cold().period_start.store(start, Ordering::Release);
        self.hot.period_end.store(u32::try_from(end).unwrap_or(u32::MAX), Ordering::Release);
        left
    }

    /// Moves usage reported outside any lease into the current lease (as a debt the refill
    /// covers). Call with the refill lock held, after [`roll_period`](Self::roll_period).
    pub(crate) fn settle_unleased(&self) {
        let debt = self.cold().unleased.swap(0, Ordering::AcqRel);
        if debt > 0 {
            self.hot.lease.fetch_sub(debt as i64, Ordering::AcqRel);
        }
    }

    /// Adds units granted by the store. Call with the refill lock held.
    pub(crate) fn grant(&self, granted: u64, reserved: u64, asked: u64) {
        self.cold().reserved.store(reserved, Ordering::Release);
        self.hot.lease.fetch_add(granted as i64, Ordering::AcqRel);
        if self.hard() && granted < asked {
            self.cold().exhausted.store(true, Ordering::Release);
        }
    }

    /// Empties the lease (on eviction and shutdown): returns the units to give back.
    pub(crate) fn take_all(&self) -> i64 {
        self.hot.lease.swap(0, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_path_fields_fill_one_cache_line() {
        assert_eq!(std::mem::size_of::<MeterCell>(), 40);
        assert_eq!(std::mem::offset_of!(TenantState, more), 64);
        assert_eq!(std::mem::offset_of!(TenantState, refs), 0);
        assert_eq!(std::mem::size_of::<TenantState>(), 192, "one hot line, two cold ones");
    }
}
