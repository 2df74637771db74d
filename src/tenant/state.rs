//! The per-tenant state of the request path, reached through one map lookup: the GCRA cell,
//! the quota leases and the usage counters.

use std::sync::{
    atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering},
    Arc,
};

use once_cell::race::OnceBox;

use super::{CallLock, GcraCell};
use crate::{
    clock::Clock,
    config::{MeterId, QuotaMode, QuotaSpec, TenantId},
    plan::CompiledPlan,
    store::{QuotaKey, ReserveToken},
};

/// The state of one tenant, shared through [`Tenant`](super::Tenant) handles.
///
/// Laid out for the request path: everything a request on the plan's first meter reads or
/// writes (the handle count, the last-seen second, the GCRA cell, the plan, that meter's lease
/// and usage slots) fills the first cache line; the rest is one cold line. Aligned to a cache
/// line, so that no other allocation shares it. What few tenants need (the cells of a plan's
/// other meters, a fleet rate's cells, a billing customer) is one allocation of its own, made
/// only for a tenant that has it ([`Extra`]); usage moved out of a slot by a new window is
/// kept in one made on first use.
#[repr(C, align(64))]
pub(crate) struct TenantState {
    /// The number of [`Tenant`](super::Tenant) handles; only they touch it.
    pub(super) refs: AtomicU32,
    /// Unix seconds (`u32`: until 2106).
    last_seen: AtomicU32,
    pub(crate) gcra: GcraCell,
    pub(crate) plan: Arc<CompiledPlan>,
    first: MeterCell,
    // The cold line from here.
    /// One per quota of the plan, in the plan's order.
    quotas: Box<[QuotaCold]>,
    pub(crate) id: TenantId,
    /// Serializes moving a usage slot to a new window; holds the usage a slot still had then
    /// (no flush drained it for two windows): (meter, window index, quantity). Made on first
    /// use, given back by the drain that takes it.
    stale: std::sync::Mutex<Rare<(usize, u32, u64)>>,
    /// The cells of meters 1.., the fleet rate's cells and the customer: `None` for a tenant
    /// whose plan has one meter and no fleet rate and who has no customer.
    extra: Option<Box<Extra>>,
    evicted: AtomicBool,
    /// When the directory last confirmed this tenant, in Unix seconds (`u32`: until 2106);
    /// [`DECLARED`]: declared in the configuration, never revalidated. Kept here, in the cold
    /// line's last four bytes, rather than in the tenant table's entry, which it would make
    /// 8 bytes wider for every bucket of the table, half of them empty.
    validated: AtomicU32,
}

/// [`TenantState::validated`] of a tenant declared in the configuration.
const DECLARED: u32 = u32::MAX;

/// What a tenant's state holds only when the tenant has it: 40 bytes.
struct Extra {
    /// The cells of meters 1.. of the configuration's meter table (every meter has a cell,
    /// so a configuration of two meters gives each tenant one).
    more: Box<[MeterCell]>,
    /// The cells of the tenant's fleet rate this node holds (a plan with `rate_scope =
    /// "fleet"`): boxed, so that a tenant with more meters or a customer does not pay for
    /// them.
    fleet: Option<Box<super::FleetCells>>,
    customer: Option<Arc<str>>,
}

impl TenantState {
    /// The tenant's own rate bucket as a theoretical arrival time on the engine clock's
    /// monotonic nanoseconds, to carry it to another state of the tenant (`None`: the plan has
    /// no rate of the tenant's own, or the bucket was never used).
    pub(crate) fn rate_tat(&self) -> Option<u64> {
        let rate = self.plan.rate.as_ref().filter(|_| self.plan.clients.is_none())?;
        let tat = self.gcra.tat();
        (tat != 0).then(|| rate.start.saturating_add(tat))
    }

    /// Sets the tenant's bucket to `tat` ([`rate_tat`](Self::rate_tat) of another state),
    /// measured from this state's plan limiter; a plan without a rate of the tenant's own
    /// keeps nothing. Never emptier than this plan's own bucket can be: a tenant moved from
    /// `10/day` to `100/s` waits at most the new bucket's time, not the old one's.
    pub(crate) fn restore_rate(&self, tat: u64) {
        if let Some(rate) = self.plan.rate.as_ref().filter(|_| self.plan.clients.is_none()) {
            let cap = self.rate_now().saturating_add(rate.nanos(rate.burst.get()));
            self.gcra.set_tat(tat.min(cap).saturating_sub(rate.start).max(1));
        }
    }

    /// The engine clock's monotonic reading, in nanoseconds (what [`rate_tat`](Self::rate_tat)
    /// is measured on).
    pub(crate) fn rate_now(&self) -> u64 {
        governor::clock::Clock::now(&self.plan.clock).into()
    }

    /// Gives back the `cost` cells a request refused after its rate check took from its rate
    /// bucket (the tenant's, or for the anonymous tenant the client's: `client`, its address's
    /// key). What was given back, with the bucket's burst, for the request's headers; `None`
    /// when the plan has no rate.
    pub(crate) fn give_back_rate(&self, client: u64, cost: u32) -> Option<(u32, u32)> {
        if crate::plan::is_fleet(client) {
            // Cells of the tenant's fleet lease: back to the lease they came from.
            let (fleet, bucket) = (self.fleet()?, self.plan.fleet.as_ref()?);
            fleet.give_back(cost, client as u32);
            return Some((cost, bucket.bucket.burst));
        }
        let policy = self.plan.rate.as_ref()?;
        let nanos = policy.nanos(cost);
        match &self.plan.clients {
            None => self.gcra.give_back(nanos),
            Some(clients) => clients.cells.give_back(client, nanos),
        }
        Some((cost, policy.burst.get()))
    }
}

impl std::fmt::Debug for TenantState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantState").field("id", &self.id).field("plan", &self.plan.id).finish_non_exhaustive()
    }
}

impl TenantState {
    pub(crate) fn new(id: TenantId, plan: Arc<CompiledPlan>, customer: Option<Arc<str>>) -> Self {
        let meters = plan.meters.ids.len().max(1);
        let quotas = plan
            .quotas
            .iter()
            .map(|(_, spec)| {
                let cold = QuotaCold::default();
                if spec.capped || spec.period() == crate::base::Period::Prepaid {
                    // A spend cap's: the tenant's own cap is not known until the store answers.
                    let cap = if spec.capped { CAP_UNKNOWN } else { 0 };
                    cold.rare_made().cap.store(cap, Ordering::Relaxed);
                }
                cold
            })
            .collect();
        let now = plan.clock.unix_secs();
        let extra = (meters > 1 || plan.fleet.is_some() || customer.is_some()).then(|| {
            Box::new(Extra {
                more: (1..meters).map(|_| MeterCell::default()).collect(),
                fleet: plan.fleet.is_some().then(Box::default),
                customer,
            })
        });
        Self {
            refs: AtomicU32::new(1),
            last_seen: AtomicU32::new(now as u32),
            gcra: GcraCell::default(),
            plan,
            first: MeterCell::default(),
            quotas,
            id,
            stale: std::sync::Mutex::new(Rare::default()),
            extra,
            evicted: AtomicBool::new(false),
            validated: AtomicU32::new(0),
        }
    }

    /// The engine's clock.
    #[inline]
    pub(crate) fn clock(&self) -> &Clock {
        &self.plan.clock
    }

    /// The tenant's billing customer, if it has one.
    #[inline]
    pub(crate) fn customer(&self) -> Option<&str> {
        self.extra.as_deref()?.customer.as_deref()
    }

    #[inline]
    fn meter(&self, meter: usize) -> Option<&MeterCell> {
        if meter == 0 {
            Some(&self.first)
        } else {
            self.extra.as_deref()?.more.get(meter - 1)
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

    /// The cells of the tenant's fleet rate this node holds (`rate_scope = "fleet"`).
    pub(crate) fn fleet(&self) -> Option<&super::FleetCells> {
        self.extra.as_deref()?.fleet.as_deref()
    }

    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    pub(crate) fn mark_evicted(&self) {
        self.evicted.store(true, Ordering::Release);
    }

    /// When the directory last confirmed this tenant (Unix seconds); `i64::MAX`: declared in
    /// the configuration (never revalidated: a reload replaces it).
    pub(crate) fn validated(&self) -> i64 {
        match self.validated.load(Ordering::Relaxed) {
            DECLARED => i64::MAX,
            secs => i64::from(secs),
        }
    }

    /// Records that the directory confirmed this tenant at `at` (Unix seconds; `i64::MAX`:
    /// declared). A time before 1970 counts as 1970; one past 2106 as declared, which is
    /// never revalidated: both are outside any clock this engine runs on.
    pub(crate) fn set_validated(&self, at: i64) {
        let secs = u32::try_from(at.max(0)).unwrap_or(DECLARED);
        self.validated.store(secs, Ordering::Relaxed);
    }

    /// The quota of the tenant's plan on `meter`, if it has one.
    #[inline]
    pub(crate) fn quota(&self, meter: usize) -> Option<QuotaRef<'_>> {
        let index = usize::from(*self.plan.quota_of.get(meter)?.as_ref()?);
        Some(self.view(meter, index))
    }

    /// What a request gets when the store does not answer for the quota on `meter`: the
    /// plan's policy (`CompiledPlan::quota_policy`), except that a
    /// spend cap held as hard for this tenant (a hard cap of its own, or one not read yet) on a
    /// plan whose cap is soft fails closed when `on_store_error` is not set, as every hard
    /// limit does.
    pub(crate) fn quota_policy(&self, meter: usize) -> crate::config::StoreErrorPolicy {
        match self.quota(meter) {
            Some(cell) if cell.spec.capped && !self.plan.on_store_error_set && cell.hard() => {
                crate::config::StoreErrorPolicy::FailClosed
            }
            _ => self.plan.quota_policy(meter),
        }
    }

    /// What this tenant's requests get where no quota is involved and the store fails (a full
    /// usage buffer): the plan's `on_store_error`, or fail-closed for a tenant holding a hard
    /// spend cap of its own (or one not read yet) on a plan that does not set it, as a plan
    /// with a hard quota does.
    pub(crate) fn usage_policy(&self) -> crate::config::StoreErrorPolicy {
        match self.plan.spend {
            Some(spend)
                if !self.plan.on_store_error_set
                    && self.plan.on_store_error == crate::config::StoreErrorPolicy::FailOpen =>
            {
                self.quota_policy(spend)
            }
            _ => self.plan.on_store_error,
        }
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
            let window = self.plan.window_index(now);
            if !cell.add(window, quantity) {
                self.move_slot(cell, meter, window, quantity);
            }
        }
    }

    /// Adds usage to a slot that belongs to another window: moves it over (once a window),
    /// keeping whatever usage it still has in its own window. Off the request path's line.
    #[cold]
    #[inline(never)]
    fn move_slot(&self, cell: &MeterCell, meter: usize, window: u32, quantity: u64) {
        let mut stale = self.stale.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (window & 1) as usize;
        let old = cell.windows[slot].load(Ordering::Acquire);
        if old != window {
            let left = cell.quantity[slot].swap(0, Ordering::AcqRel);
            if left > 0 {
                stale.make().push((meter, old, left));
            }
            cell.windows[slot].store(window, Ordering::Release);
        }
        cell.quantity[slot].fetch_add(quantity, Ordering::AcqRel);
    }

    /// Reads the recorded usage without taking it: (meter index, window start in Unix seconds,
    /// quantity).
    pub(crate) fn peek_usage(&self, out: impl FnMut(usize, i64, u64)) {
        self.visit_usage(false, out);
    }

    /// Takes all recorded usage: (meter index, window start in Unix seconds, quantity).
    pub(crate) fn drain_usage(&self, out: impl FnMut(usize, i64, u64)) {
        self.visit_usage(true, out);
    }

    /// Every usage slot with units, taken (`take`) or only read.
    fn visit_usage(&self, take: bool, mut out: impl FnMut(usize, i64, u64)) {
        let window_secs = self.plan.window_secs;
        // Held meanwhile: no slot moves to another window.
        let mut stale = self.stale.lock().unwrap_or_else(|e| e.into_inner());
        for &(meter, window, quantity) in stale.list() {
            out(meter, i64::from(window) * window_secs, quantity);
        }
        if take {
            stale.clear();
        }
        let more = self.extra.as_deref().map_or(&[][..], |e| &e.more[..]);
        let cells = std::iter::once(&self.first).chain(more.iter());
        for (meter, cell) in cells.enumerate() {
            for slot in 0..2 {
                let window = cell.windows[slot].load(Ordering::Acquire);
                let quantity = if take {
                    cell.quantity[slot].swap(0, Ordering::AcqRel)
                } else {
                    cell.quantity[slot].load(Ordering::Acquire)
                };
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
    /// The units of the lease held, tagged with its period: see [`Lease`].
    lease: AtomicU64,
    /// The period the lease belongs to, packed by [`PeriodBits`]; 0: no lease yet.
    period: AtomicU32,
    /// Below this many units left, the lease is refilled ahead of need.
    low: AtomicU32,
    windows: [AtomicU32; 2],
    quantity: [AtomicU64; 2],
}

/// A lease word: the units left (a signed 48-bit count; negative is a debt the next refill
/// covers) and, in the top 16 bits, the tag of the period they belong to. Taking, refunding,
/// rolling and granting all compare-and-swap the one word, so units can never move from one
/// period into another.
struct Lease;

impl Lease {
    const MASK: u64 = (1 << 48) - 1;
    /// The largest lease held (and the largest debt): far beyond any lease size in use.
    pub(crate) const MAX: i64 = crate::base::LEASE_MAX as i64;

    #[inline]
    fn tag(word: u64) -> u16 {
        (word >> 48) as u16
    }

    #[inline]
    fn value(word: u64) -> i64 {
        ((word << 16) as i64) >> 16
    }

    #[inline]
    fn word(tag: u16, value: i64) -> u64 {
        (u64::from(tag) << 48) | (value as u64 & Self::MASK)
    }
}

/// The most periods whose units taken outside a lease are owed separately.
const UNLEASED_PERIODS: usize = 4;

/// A quota period packed in 32 bits: its end in hours since the epoch (22 bits: until 2448)
/// and its length in hours (10 bits: up to 42 days). Calendar periods start and end at
/// midnight UTC; a prepaid balance's lease windows are 512 hours long, on whole hours.
pub(crate) struct PeriodBits;

impl PeriodBits {
    pub(crate) fn pack(start: i64, end: i64) -> u32 {
        let end_h = (end / 3600) as u32;
        let len_h = ((end - start) / 3600).clamp(1, 1023) as u32;
        (end_h << 10) | len_h
    }

    /// (start, end) in Unix seconds; (0, 0) for no period.
    #[inline]
    pub(crate) fn bounds(bits: u32) -> (i64, i64) {
        let end = i64::from(bits >> 10) * 3600;
        (end - i64::from(bits & 1023) * 3600, end)
    }

    /// The tag of the period's lease words: the low 16 bits of its end hour (consecutive
    /// periods of one cell end 24 to 744 hours apart, so their tags differ).
    #[inline]
    pub(crate) fn tag(bits: u32) -> u16 {
        (bits >> 10) as u16
    }
}

impl MeterCell {
    /// Adds usage to the slot of `window` if the slot is that window's; `false` otherwise
    /// (the slot must first be moved to the window).
    #[inline]
    fn add(&self, window: u32, quantity: u64) -> bool {
        let slot = (window & 1) as usize;
        if self.windows[slot].load(Ordering::Acquire) != window {
            return false;
        }
        self.quantity[slot].fetch_add(quantity, Ordering::AcqRel);
        true
    }
}

/// The parts of a quota the request path reads only on its slow paths.
#[derive(Default)]
struct QuotaCold {
    /// Serializes the store calls of this cell (refills, returns, period rolls): a slow store
    /// call for one tenant never holds up another. One byte, beside the flags.
    lock: CallLock,
    exhausted: AtomicBool,
    prefetching: AtomicBool,
    /// The size of the next lease (0: the configured one); grows while refills come fast.
    size: AtomicU64,
    /// When the lease was last refilled, in Unix nanoseconds.
    refilled_at: AtomicI64,
    reserved: AtomicU64,
    /// The tag of the period before the current one (`u32::MAX`: none): its requests
    /// refunded after the roll are given back to that period ([`QuotaRare::late_refunds`]).
    prev_tag: AtomicU32,
    /// What only some quotas use, or use only at some moments: made on first use, kept with
    /// the cell (one pointer here instead of 48 bytes).
    rare: OnceBox<QuotaRare>,
    /// The sender id of this cell's store calls (0: not drawn yet).
    sender: AtomicU64,
    /// The lease is not to be spent: its reservation was not renewed in time ([`QuotaRef::stash`]).
    /// Units given back go to the spare ones meanwhile; a call that renews it lifts it.
    stopped: AtomicBool,
    /// When the last answered call of the current period renewed what the node keeps (Unix
    /// seconds, this node's clock; 0: none). Read without the lock by the stop pass.
    reported_at: AtomicI64,

    /// The call lock's bookkeeping, touched with `lock` held: the previous period, and the
    /// store call sent but not answered (it is sent again, with its token, before any other
    /// call of this cell); and the open holds' units, which any thread counts under this mutex.
    locked: std::sync::Mutex<Locked>,
}

/// The parts of a quota's cold part that only some quotas use (a prepaid balance, a spend
/// cap), or that others use only at some moments (the store unreachable, a refund after a
/// roll or past the lease's cap). Made by the first write that needs it (at once for a
/// prepaid balance or a spend cap, which always do), and kept with the cell: a read finds
/// nothing (zero, none) until then, which is what every field starts as.
#[derive(Default)]
struct QuotaRare {
    /// Usage taken while no lease of its period was held, per period (packed by
    /// [`PeriodBits`], oldest first, at most [`UNLEASED_PERIODS`]): owed to that period's
    /// counter by the next store calls.
    unleased: std::sync::Mutex<Rare<(u32, u64)>>,
    /// A prepaid balance's limit, as the store's last answer said: the units of its open
    /// grants (0 before an answer).
    balance: AtomicU64,
    /// A spend cap's quota: the tenant's own cap as the store's last answer said (0: none, the
    /// plan's holds; [`CAP_UNKNOWN`]: no answer yet): its limit, with [`CAP_SOFT`] set for a
    /// soft one. A prepaid balance (never capped): the number of the tenant's recharge the
    /// store's last watching answer said is open (0: none).
    cap: AtomicU64,
    /// The units of the previous period's requests refunded after the roll: given back to that
    /// period by the next store call.
    late_refunds: AtomicU64,
    /// Units given back past the lease's cap ([`QuotaRef::trim`]), tagged with their period as
    /// a lease word: not spendable here, they go back to the store with the cell's next call
    /// (or the worker's, asked at once).
    spare: AtomicU64,
}

impl QuotaRare {
    fn unleased(&self) -> std::sync::MutexGuard<'_, Rare<(u32, u64)>> {
        self.unleased.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl QuotaCold {
    /// The rare parts, if anything made them.
    #[inline]
    fn rare(&self) -> Option<&QuotaRare> {
        self.rare.get()
    }

    /// The rare parts, made now if nothing made them yet.
    fn rare_made(&self) -> &QuotaRare {
        self.rare.get_or_init(Box::default)
    }

    /// A rare part's value (zero until made).
    #[inline]
    fn rare_load(&self, field: impl FnOnce(&QuotaRare) -> &AtomicU64) -> u64 {
        self.rare().map_or(0, |r| field(r).load(Ordering::Acquire))
    }
}

/// Held for every quota of every tenant: kept small (the previous period packed; the call in
/// flight and the holds in one allocation, made only while there is one or the other).
#[derive(Default)]
pub(crate) struct Locked {
    /// The previous period, packed by [`PeriodBits`] (its key: [`QuotaRef::key`]); 0: none.
    prev: u32,
    /// Whether the lease was given back ([`QuotaRef::take_all`], on eviction, reload and
    /// shutdown) and none leased since: units a hold gives back then go to the store, not to
    /// a lease nobody returns. Also read, without the cell's lock, by a hold giving back.
    pub(crate) returned: bool,
    /// The lease's part of what the last answered call of the current period told the store
    /// this node keeps ([`reported`](Self::reported): the holds' parts are kept with the
    /// holds), and when it was sent (Unix seconds, this node's clock; 0: no call
    /// renewed a reservation yet). A flush reports what changed since, and renews it before
    /// it expires; past its expiry less the clock-skew bound the node stops spending it.
    reported_lease: u64,
    /// The call in flight and the open holds: made by the first call or hold, let go once
    /// neither is left (most tenants never hold, and a call is in flight only while the
    /// store has not answered).
    rare: Option<Box<LockedRare>>,
}

/// What a quota's bookkeeping holds only at times ([`Locked::rare`]).
#[derive(Default)]
struct LockedRare {
    /// The units this node holds for open holds, and what the store was last told of them
    /// (kept until the store is told they are gone).
    holds: Holds,
    /// The store call sent but not answered: sent again, with its token, before any other
    /// call of this cell.
    inflight: Option<Call>,
}

/// The units a quota's open holds hold on this node, counted under [`QuotaRef::locked`] so
/// that a roll of the period moves them in one step.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct Holds {
    /// Held for open holds of the current period: taken from its lease, not recorded yet
    /// (jobs' reservations among them).
    held: u64,
    /// Of `held`, the units held by jobs' reservations (`reserve_event`): they stay spent if
    /// their hold ends unrecorded, and a store never gives them back at an expiry.
    jobs: u64,
    /// `held` and `jobs` of earlier periods (holds open across a roll of a calendar period):
    /// never told to the current period's counter.
    held_old: u64,
    jobs_old: u64,
    /// What the last answered call of the current period told the store of holds and jobs
    /// ([`Locked::reported`]).
    reported_held: u64,
    reported_jobs: u64,
}

impl Locked {
    /// The open holds' units (none: all zero).
    fn holds(&self) -> Holds {
        self.rare.as_deref().map(|r| r.holds).unwrap_or_default()
    }

    /// The rare part, made now if need be.
    fn rare_made(&mut self) -> &mut LockedRare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Lets the rare part go if it holds nothing.
    fn tidy(&mut self) {
        if self.rare.as_deref().is_some_and(|r| r.holds == Holds::default() && r.inflight.is_none()) {
            self.rare = None;
        }
    }

    /// The store call sent but not answered, if any.
    pub(crate) fn inflight(&self) -> Option<&Call> {
        self.rare.as_deref()?.inflight.as_ref()
    }

    pub(crate) fn inflight_mut(&mut self) -> Option<&mut Call> {
        self.rare.as_deref_mut()?.inflight.as_mut()
    }

    /// Records the call sent (`Some`) or that none is in flight any more (`None`).
    pub(crate) fn set_inflight(&mut self, call: Option<Call>) {
        match call {
            Some(call) => self.rare_made().inflight = Some(call),
            None => {
                if let Some(r) = self.rare.as_deref_mut() {
                    r.inflight = None;
                }
                self.tidy();
            }
        }
    }

    /// What the last answered call of the current period told the store this node keeps
    /// (lease, holds, jobs).
    pub(crate) fn reported(&self) -> crate::store::Kept {
        let h = self.holds();
        crate::store::Kept::new(self.reported_lease, h.reported_held, h.reported_jobs)
    }

    /// Records what a call told the store this node keeps.
    fn set_reported(&mut self, kept: crate::store::Kept) {
        self.reported_lease = kept.lease;
        if kept.held == 0 && kept.jobs == 0 && self.rare.is_none() {
            return;
        }
        let h = &mut self.rare_made().holds;
        (h.reported_held, h.reported_jobs) = (kept.held, kept.jobs);
        self.tidy();
    }

    /// `units` more (`more`) or fewer held, of the current period or an earlier one, and
    /// among them a job's (`job`). Their storage is made by the first units counted and let
    /// go once they hold nothing; counting nothing, or fewer where nothing is held, makes none.
    fn change_holds(&mut self, units: u64, more: bool, current: bool, job: bool) {
        if units == 0 || (!more && self.rare.is_none()) {
            return;
        }
        let h = &mut self.rare_made().holds;
        let (held, jobs) = if current { (&mut h.held, &mut h.jobs) } else { (&mut h.held_old, &mut h.jobs_old) };
        count(held, units, more);
        if job {
            count(jobs, units, more);
        }
        self.tidy();
    }
}

impl Locked {
    /// The previous period's bounds, if the cell rolled since it was made.
    pub(crate) fn prev(&self) -> Option<(i64, i64)> {
        (self.prev != 0).then(|| PeriodBits::bounds(self.prev))
    }
}

/// A list most tenants never fill, one pointer until they do: made on first use
/// ([`make`](Self::make)), let go once empty (by [`remove`](Self::remove)) or cleared. What a
/// new window moved out of a usage slot; a quota's units taken outside any lease.
#[allow(
    clippy::box_collection,
    reason = "one pointer in the state's and the quotas' cold parts, where a vector is three words"
)]
struct Rare<T>(Option<Box<Vec<T>>>);

impl<T> Default for Rare<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> Rare<T> {
    fn list(&self) -> &[T] {
        self.0.as_deref().map_or(&[], |v| &v[..])
    }

    /// The list, made if it was not.
    fn make(&mut self) -> &mut Vec<T> {
        self.0.get_or_insert_with(Box::default)
    }

    /// Takes the `i`th entry out; the list is let go once empty.
    fn remove(&mut self, i: usize) -> T {
        let list = self.0.as_mut().expect("an entry to remove");
        let entry = list.remove(i);
        if list.is_empty() {
            self.0 = None;
        }
        entry
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

/// A store call of one quota cell.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub(crate) key: QuotaKey,
    pub(crate) token: ReserveToken,
    pub(crate) kind: CallKind,
    /// How many times it was sent.
    pub(crate) attempts: u32,
    /// How many times the store answered it with an error (a timeout is no answer).
    pub(crate) errors: u32,
    /// What it says the node keeps after it, until when, and when it was first sent (fixed
    /// at the first send: a store that applied an attempt whose answer was lost answers the
    /// next with that attempt's record).
    pub(crate) keeping: Option<(crate::store::Kept, i64, i64)>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum CallKind {
    /// Reserve `units` (under `limit`), owing `owed`; the answer goes to the lease when
    /// `refill` (with `repay` units of the lease's debt that `owed` covers).
    /// `taking` of the grant go to the request waiting on it.
    Reserve { units: u64, owed: u64, limit: Option<u64>, refill: bool, repay: u64, at_least: u64, taking: u64 },
    /// Give back `units`.
    Release { units: u64 },
}

/// The outcome of taking units from a local lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Taken from the lease of the period tagged `tag`; `left` units remain in it.
    Taken { left: i64, tag: u16 },
    /// The local lease is empty or belongs to a past period: ask the store.
    NeedLease,
    /// The hard limit of this period is spent.
    Exhausted,
}

/// The requests in flight of each tenant whose plan limits them (`concurrency`), by tenant id:
/// a tenant whose state is replaced (evicted while its answers stream, revalidated, moved to
/// another plan) keeps its count. Only tenants with a request in flight have an entry: it
/// goes with their last one, so the map is bounded by the requests in flight.
pub(crate) type InFlightCounts = std::sync::Arc<dashmap::DashMap<crate::config::TenantId, u32>>;

/// A request of a tenant in flight under its plan's `concurrency`, from its admission to the
/// end of its response body: dropped, it frees its place.
pub(crate) struct Slot {
    kind: SlotKind,
}

enum SlotKind {
    /// A place of the node's own count.
    Node { counts: InFlightCounts, tenant: crate::config::TenantId },
    /// A place of a fleet concurrency: what frees it.
    Fleet(Option<Box<dyn FnOnce() + Send + Sync>>),
}

impl Slot {
    /// A place whose freeing `free` does (a fleet concurrency's: the engine's).
    pub(crate) fn on_drop(free: Box<dyn FnOnce() + Send + Sync>) -> Box<Slot> {
        Box::new(Slot { kind: SlotKind::Fleet(Some(free)) })
    }

    /// A place among the `limit` requests of `tenant` that may be in flight at once, if one is
    /// free (checked and taken under the map's lock: a refused attempt never counts).
    /// Boxed: it travels in every ticket, which stays a pointer bigger for it (the plans that
    /// set no limit pay no allocation).
    pub(crate) fn enter(counts: &InFlightCounts, tenant: &crate::config::TenantId, limit: u32) -> Option<Box<Slot>> {
        let mut n = counts.entry(tenant.clone()).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        drop(n);
        Some(Box::new(Slot { kind: SlotKind::Node { counts: counts.clone(), tenant: tenant.clone() } }))
    }

    /// Whether `tenant` has `limit` requests in flight already (a check before work that a
    /// refusal would waste, such as claiming an `Idempotency-Key`).
    pub(crate) fn full(counts: &InFlightCounts, tenant: &crate::config::TenantId, limit: u32) -> bool {
        counts.get(tenant).is_some_and(|n| *n >= limit)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        match &mut self.kind {
            SlotKind::Node { counts, tenant } => {
                if let dashmap::mapref::entry::Entry::Occupied(mut e) = counts.entry(tenant.clone()) {
                    *e.get_mut() = e.get().saturating_sub(1);
                    if *e.get() == 0 {
                        e.remove();
                    }
                }
            }
            SlotKind::Fleet(free) => {
                if let Some(free) = free.take() {
                    free();
                }
            }
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            SlotKind::Node { tenant, .. } => f.debug_tuple("Slot").field(tenant).finish(),
            SlotKind::Fleet(_) => f.write_str("Slot(fleet)"),
        }
    }
}

/// The bit of [`QuotaRare::cap`] that marks a soft cap.
const CAP_SOFT: u64 = 1 << 63;

/// [`QuotaRare::cap`] before the store's first answer: the tenant may have set a hard cap of
/// its own (on any node), so the quota is held as a hard one until the store says (its holds
/// and checks ask the store).
const CAP_UNKNOWN: u64 = u64::MAX;

/// The largest limit [`QuotaRare::cap`] holds (a cap's largest is far below).
const CAP_LIMIT_MAX: u64 = 1 << 62;

/// The length of a prepaid balance's lease windows: 512 hours (a packed period is at most
/// 1,023 hours long).
pub(crate) const PREPAID_WINDOW: i64 = 512 * 3600;

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

    /// The tenant.
    pub(crate) fn tenant(&self) -> &'a crate::config::TenantId {
        &self.state.id
    }

    /// The tenant's plan.
    pub(crate) fn plan_id(&self) -> &'a crate::config::PlanId {
        &self.state.plan.id
    }

    #[inline]
    pub(crate) fn hard(&self) -> bool {
        // A spend cap: hard when the tenant set a hard cap of its own, or may have (not known
        // yet). A soft one of its own never makes the plan's hard cap soft
        // (`store::capped_limit`).
        self.spec.mode() == QuotaMode::Hard || (self.spec.capped && self.hard_cap())
    }

    /// Whether this spend cap's quota is hard by the tenant's own cap ([`hard`](Self::hard)):
    /// out of line, as only spend caps ask.
    #[cold]
    #[inline(never)]
    fn hard_cap(&self) -> bool {
        let cap = self.cold().rare_load(|r| &r.cap);
        cap == CAP_UNKNOWN || (cap != 0 && cap & CAP_SOFT == 0)
    }

    /// The tenant's own cap on this spend cap's quota, as the store last said.
    pub(crate) fn tenant_cap(&self) -> Option<crate::store::SpendCap> {
        match self.cold().rare_load(|r| &r.cap) {
            0 | CAP_UNKNOWN => None,
            cap => Some(crate::store::SpendCap::new(cap & !CAP_SOFT, cap & CAP_SOFT == 0)),
        }
    }

    /// The tenant's own cap, as the store last said, when it is the one in force
    /// ([`QuotaSpec::own_in_force`](crate::config::QuotaSpec)).
    pub(crate) fn own_cap_in_force(&self) -> Option<crate::store::SpendCap> {
        self.spec.own_in_force(self.tenant_cap())
    }

    /// The tenant's own cap was just set (or removed) through this node: known at once, and
    /// the store asked again at the next request rather than a refusal kept to the second.
    pub(crate) fn cap_changed(&self, cap: Option<crate::store::SpendCap>) {
        self.capped_by(cap);
        self.cold().exhausted.store(false, Ordering::Release);
    }

    /// Records the tenant's own cap the store's answer carried (a spend cap's quota). Call
    /// with the lock held, before [`granted`](Self::granted).
    pub(crate) fn capped_by(&self, cap: Option<crate::store::SpendCap>) {
        if !self.spec.capped {
            return;
        }
        let word = cap.map_or(0, |c| c.limit.clamp(1, CAP_LIMIT_MAX) | if c.hard { 0 } else { CAP_SOFT });
        self.cold().rare_made().cap.store(word, Ordering::Relaxed);
    }

    /// Records what the store's answer to a call watching this balance's recharge said is
    /// open: recharge `n` (0: none).
    pub(crate) fn recharge_open(&self, n: u64) {
        if self.prepaid() && !self.spec.capped {
            self.cold().rare_made().cap.store(n, Ordering::Relaxed);
        }
    }

    /// The recharge of this balance open as the store last said (a request finding the balance
    /// empty meanwhile is told to come back in a few seconds).
    pub(crate) fn recharge_pending(&self) -> Option<u64> {
        if !self.prepaid() || self.spec.capped {
            return None;
        }
        Some(self.cold().rare_load(|r| &r.cap)).filter(|n| *n != 0)
    }

    /// Whether this is a prepaid balance ([`Period::Prepaid`](crate::base::Period::Prepaid)).
    #[inline]
    pub(crate) fn prepaid(&self) -> bool {
        self.spec.period() == crate::base::Period::Prepaid
    }

    /// The period of the lease at `at`: the calendar period holding it, or for a prepaid
    /// balance (which has no calendar) a window of [`PREPAID_WINDOW`] seconds holding it. A
    /// lease is tagged with its period like any quota's; a balance's windows all count against
    /// its one counter ([`key`](Self::key)), so a window's roll only gives its lease back.
    #[inline]
    pub(crate) fn window(&self, at: i64) -> (i64, i64) {
        if self.prepaid() {
            let start = at - at.rem_euclid(PREPAID_WINDOW);
            (start, start + PREPAID_WINDOW)
        } else {
            self.spec.period().bounds(at)
        }
    }

    /// The limit: the spec's, or for a prepaid balance the units of its open grants as the
    /// store last said (0 before the first answer).
    #[inline]
    pub(crate) fn limit(&self) -> u64 {
        if self.prepaid() {
            self.cold().rare_load(|r| &r.balance)
        } else if let Some(cap) = self.spec.capped.then(|| self.own_cap_in_force()).flatten() {
            // As the store holds it (`store::capped_limit`): a hard cap of the tenant's within
            // the maximum in force; a soft one on a plan whose cap is soft (its warnings).
            cap.limit
        } else {
            self.spec.limit().get()
        }
    }

    /// The lock serializing this cell's store calls.
    pub(crate) fn lock(&self) -> &'a CallLock {
        &self.cold().lock
    }

    /// The sender id of this cell's store calls, drawn by `draw` on the first call.
    pub(crate) fn sender(&self, draw: impl FnOnce() -> u64) -> u64 {
        let cold = self.cold();
        match cold.sender.load(Ordering::Acquire) {
            0 => {
                let id = draw().max(1);
                match cold.sender.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => id,
                    Err(existing) => existing,
                }
            }
            id => id,
        }
    }

    /// The cell's bookkeeping: what the holder of [`lock`](Self::lock) touches, and the open
    /// holds' units, which any thread counts under it.
    pub(crate) fn locked(&self) -> std::sync::MutexGuard<'a, Locked> {
        self.cold().locked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counter of the period `[start, end)` of this cell (a prepaid balance's one
    /// counter, whatever the window).
    pub(crate) fn key(&self, start: i64, end: i64) -> QuotaKey {
        let (start, end) = if self.prepaid() { crate::base::Period::Prepaid.bounds(0) } else { (start, end) };
        QuotaKey::new(self.state.id.clone(), self.meter_id().clone(), self.spec.period(), start, end)
    }

    /// Takes `cost` units without waiting, from the lease of the period holding `now`. Reads
    /// only the meter's hot cell when it succeeds.
    #[inline]
    pub(crate) fn try_take(&self, cost: u64, now: i64) -> Take {
        let h = self.hot;
        let bits = h.period.load(Ordering::Acquire);
        let (start, end) = PeriodBits::bounds(bits);
        if now >= end || now < start {
            return Take::NeedLease;
        }
        let tag = PeriodBits::tag(bits);
        // A cost past any lease (a spend of a huge record) is never covered by one.
        let cost = i64::try_from(cost).unwrap_or(i64::MAX);
        let mut word = h.lease.load(Ordering::Acquire);
        loop {
            let left = Lease::value(word);
            if Lease::tag(word) != tag {
                return Take::NeedLease;
            }
            if left < cost {
                return self.short(now);
            }
            // `left >= cost >= 0`: the subtraction cannot borrow from the tag.
            match h.lease.compare_exchange_weak(word, word - cost as u64, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Take::Taken { left: left - cost, tag },
                Err(now_word) => word = now_word,
            }
        }
    }

    /// What a request finding the lease short gets: refused if the store said this hard
    /// quota is spent this second, else sent to the store. Out of line: most requests find
    /// their units, and the request path stays small enough to inline.
    #[cold]
    #[inline(never)]
    fn short(&self, now: i64) -> Take {
        if self.hard() && self.spent(now) {
            Take::Exhausted
        } else {
            Take::NeedLease
        }
    }

    /// Whether a request of `cost` at `now` could take its units, without taking them (an
    /// idempotent replay): `Ok` when the quota is soft or the lease covers it,
    /// [`Take::Exhausted`] when a hard quota is spent, [`Take::NeedLease`] when only the store
    /// can tell.
    #[inline]
    pub(crate) fn check_units(&self, cost: u64, now: i64) -> Result<(), Take> {
        if !self.hard() {
            return Ok(());
        }
        let bits = self.hot.period.load(Ordering::Acquire);
        let (start, end) = PeriodBits::bounds(bits);
        let word = self.hot.lease.load(Ordering::Acquire);
        if now < start || now >= end || Lease::tag(word) != PeriodBits::tag(bits) {
            return Err(Take::NeedLease);
        }
        if Lease::value(word) >= i64::try_from(cost).unwrap_or(i64::MAX) {
            Ok(())
        } else if self.spent(now) {
            Err(Take::Exhausted)
        } else {
            Err(Take::NeedLease)
        }
    }

    /// Whether the store said this period's hard limit was reached, in the same second of
    /// the clock as `now`: from the next second on the store is asked again (other nodes may
    /// have given units back, a top-up may have landed), at most once a second per cell, and
    /// a refusal never outlives the second of the answer that said "spent".
    #[inline]
    fn spent(&self, now: i64) -> bool {
        let cold = self.cold();
        cold.exhausted.load(Ordering::Acquire)
            && now <= cold.refilled_at.load(Ordering::Relaxed).div_euclid(1_000_000_000)
    }

    /// Takes `quantity` units even if that leaves the lease negative (usage that already
    /// happened: reported by a handler, or admitted while the store was unreachable). The next
    /// store call owes the debt, past a hard limit if need be. Returns the tag of the period
    /// whose lease took them, if one did.
    pub(crate) fn force_take(&self, quantity: u64, now: i64) -> Option<u16> {
        let h = self.hot;
        let bits = h.period.load(Ordering::Acquire);
        let (start, end) = PeriodBits::bounds(bits);
        let tag = PeriodBits::tag(bits);
        let quantity = i64::try_from(quantity).unwrap_or(i64::MAX);
        if now >= start && now < end {
            let mut word = h.lease.load(Ordering::Acquire);
            while Lease::tag(word) == tag {
                let left = Lease::value(word);
                let taken = quantity.min(left.saturating_add(Lease::MAX));
                let next = Lease::word(tag, left - taken);
                match h.lease.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        if taken < quantity {
                            self.owe_unleased(now, (quantity - taken) as u64);
                        }
                        return Some(tag);
                    }
                    Err(w) => word = w,
                }
            }
        }
        self.owe_unleased(now, quantity as u64);
        None
    }

    /// Records `units` used at `now` outside any lease, owed to the period holding `now`.
    fn owe_unleased(&self, now: i64, units: u64) {
        let (start, end) = self.window(now);
        let bits = PeriodBits::pack(start, end);
        let mut guard = self.cold().rare_made().unleased();
        let owed = guard.make();
        match owed.iter_mut().find(|(b, _)| *b == bits) {
            Some((_, u)) => *u = u.saturating_add(units),
            None => owed.push((bits, units)),
        }
        if owed.len() > UNLEASED_PERIODS {
            // Periods without a single store call in between: the oldest is folded into the
            // next one (its counter is long over).
            let (_, oldest) = owed.remove(0);
            owed[0].1 = owed[0].1.saturating_add(oldest);
        }
    }

    /// Units used outside any lease, not yet owed to the store.
    pub(crate) fn unleased(&self) -> u64 {
        self.cold().rare().map_or(0, |r| r.unleased().list().iter().map(|(_, u)| *u).sum())
    }

    /// Gives back units taken outside any lease at `at` ([`force_take`](Self::force_take)
    /// returned `None`) by a request that is not billed, if the store has not been told yet.
    pub(crate) fn refund_unleased(&self, cost: u64, at: i64) {
        let (start, end) = self.window(at);
        let bits = PeriodBits::pack(start, end);
        let Some(rare) = self.cold().rare() else { return };
        let mut owed = rare.unleased();
        if let Some(i) = owed.list().iter().position(|(b, _)| *b == bits) {
            let left = owed.list()[i].1.saturating_sub(cost);
            if left == 0 {
                owed.remove(i);
            } else {
                owed.make()[i].1 = left;
            }
        }
    }

    /// Takes the units owed to a period other than the lease's current one (any, when no
    /// lease is held): `(start, end, units)`. Call with the lock held.
    pub(crate) fn pop_unleased_elsewhere(&self) -> Option<(i64, i64, u64)> {
        let current = self.hot.period.load(Ordering::Acquire);
        let mut owed = self.cold().rare()?.unleased();
        let i = owed.list().iter().position(|(b, _)| *b != current)?;
        let (bits, units) = owed.remove(i);
        let (start, end) = PeriodBits::bounds(bits);
        Some((start, end, units))
    }

    /// Gives back units of a request that is not billed to the lease of the period they were
    /// taken from; after that period's roll, to that period's counter in the store.
    pub(crate) fn refund(&self, cost: u64, tag: u16) {
        let cold = self.cold();
        if cold.stopped.load(Ordering::Acquire) && tag == PeriodBits::tag(self.hot.period.load(Ordering::Acquire)) {
            // Not spendable until a call renews the reservation: waiting with the spare units.
            self.add_spare(tag, cost);
            return;
        }
        let mut word = self.hot.lease.load(Ordering::Acquire);
        while Lease::tag(word) == tag {
            let cost = i64::try_from(cost).unwrap_or(i64::MAX);
            let next = Lease::word(tag, Lease::value(word).saturating_add(cost).min(Lease::MAX));
            match self.hot.lease.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    cold.exhausted.store(false, Ordering::Release);
                    return;
                }
                Err(w) => word = w,
            }
        }
        if cold.prev_tag.load(Ordering::Acquire) == u32::from(tag) && cost > 0 {
            cold.rare_made().late_refunds.fetch_add(cost, Ordering::AcqRel);
        }
    }

    /// The most units this node keeps in its lease once units come back to it (a hold's,
    /// a job's): the cell's largest lease, and near a hard limit an eighth of what the store
    /// last said was left (as a refill asks), so that the leases other nodes keep never strand
    /// much of what is left.
    pub(crate) fn keep_cap(&self) -> u64 {
        let cap = self.lease_cap();
        let limit = self.limit();
        if !self.hard() || limit == 0 {
            return cap;
        }
        cap.min(limit.saturating_sub(self.known_reserved()).div_ceil(crate::store::SHRINK)).max(1)
    }

    /// Moves what the lease of the period tagged `tag` holds past [`keep_cap`](Self::keep_cap)
    /// to the cell's spare units, to go back to the store. Returns the units moved.
    pub(crate) fn trim(&self, tag: u16) -> u64 {
        self.trim_to(tag, self.keep_cap())
    }

    /// Moves what the lease of the period tagged `tag` holds past `cap` to the spare units.
    fn trim_to(&self, tag: u16, cap: u64) -> u64 {
        let cap = i64::try_from(cap).unwrap_or(i64::MAX);
        let h = self.hot;
        let mut word = h.lease.load(Ordering::Acquire);
        loop {
            let left = Lease::value(word);
            if Lease::tag(word) != tag || left <= cap {
                return 0;
            }
            match h.lease.compare_exchange_weak(word, Lease::word(tag, cap), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(w) => word = w,
            }
        }
        let excess = (Lease::value(word) - cap) as u64;
        self.add_spare(tag, excess);
        excess
    }

    /// Adds `units` of the period tagged `tag` to the spare units.
    fn add_spare(&self, tag: u16, excess: u64) {
        let spare = &self.cold().rare_made().spare;
        let mut word = spare.load(Ordering::Acquire);
        loop {
            // Spare units of an older period (not gone back yet) go to that period's late
            // refunds first.
            let next = if Lease::tag(word) == tag || Lease::value(word) == 0 {
                Lease::word(tag, Lease::value(word).saturating_add(excess as i64).min(Lease::MAX))
            } else {
                Lease::word(tag, excess as i64)
            };
            match spare.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(old) => {
                    if Lease::tag(old) != tag && Lease::value(old) > 0 {
                        self.late_spare(Lease::tag(old), Lease::value(old) as u64);
                    }
                    return;
                }
                Err(w) => word = w,
            }
        }
    }

    /// The spare units waiting to go back ([`trim`](Self::trim)).
    #[inline]
    pub(crate) fn spare(&self) -> u64 {
        Lease::value(self.cold().rare_load(|r| &r.spare)).max(0) as u64
    }

    /// Takes the spare units of the current period (those of the period before go to its late
    /// refunds). Call with the lock held.
    pub(crate) fn take_spare(&self) -> u64 {
        let word = self.cold().rare().map_or(0, |r| r.spare.swap(0, Ordering::AcqRel));
        let units = Lease::value(word).max(0) as u64;
        if units == 0 {
            return 0;
        }
        let current = PeriodBits::tag(self.hot.period.load(Ordering::Acquire));
        if Lease::tag(word) == current {
            return units;
        }
        self.late_spare(Lease::tag(word), units);
        0
    }

    /// Spare units of the period tagged `tag`, no longer the current one: to its counter with
    /// the late refunds, if it is the period before; else (older) its counter is settled.
    fn late_spare(&self, tag: u16, units: u64) {
        let cold = self.cold();
        if cold.prev_tag.load(Ordering::Acquire) == u32::from(tag) && units > 0 {
            cold.rare_made().late_refunds.fetch_add(units, Ordering::AcqRel);
        }
    }

    /// Takes up to `units` from the lease of the current period (what a request waiting on a
    /// refill uses of the lease before asking the store for the rest). Returns the units
    /// taken. Call with the lock held.
    pub(crate) fn drain(&self, units: u64) -> u64 {
        let h = self.hot;
        let tag = PeriodBits::tag(h.period.load(Ordering::Acquire));
        let mut word = h.lease.load(Ordering::Acquire);
        loop {
            let left = Lease::value(word);
            if Lease::tag(word) != tag || left <= 0 {
                return 0;
            }
            let taken = left.min(i64::try_from(units).unwrap_or(i64::MAX));
            match h.lease.compare_exchange_weak(
                word,
                Lease::word(tag, left - taken),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return taken as u64,
                Err(w) => word = w,
            }
        }
    }

    /// Units this node holds for open holds (jobs' among them), of any period.
    pub(crate) fn held(&self) -> u64 {
        let holds = self.locked().holds();
        holds.held.saturating_add(holds.held_old)
    }

    /// Whether units taken from the lease of the period tagged `tag` (`None`: outside any
    /// lease) belong to the current period's counter. A balance has one counter, whatever
    /// its window.
    fn of_current(&self, tag: Option<u16>) -> bool {
        self.prepaid() || tag.is_none_or(|t| t == PeriodBits::tag(self.hot.period.load(Ordering::Acquire)))
    }

    /// `units` more held (`true`) or no longer held (`false`) by an open hold, taken from the
    /// lease of the period tagged `tag`.
    pub(crate) fn count_held(&self, units: u64, more: bool, tag: Option<u16>) {
        // The period read under the mutex, which a roll changes it and ages the holds under:
        // units counted land on the side of the roll they were taken on.
        let mut locked = self.locked();
        let current = self.of_current(tag);
        locked.change_holds(units, more, current, false);
    }

    /// `units` more held (`true`) or no longer held (`false`) by a job's reservation: counted
    /// held, and apart as jobs'.
    pub(crate) fn count_jobs(&self, units: u64, more: bool, tag: Option<u16>) {
        let mut locked = self.locked();
        let current = self.of_current(tag);
        locked.change_holds(units, more, current, true);
    }

    /// What this node keeps of the current period's counter, as it tells the store with each
    /// call: the lease's unused units (and spare ones going back), the units its requests'
    /// holds hold, and its jobs' reservations. With `debt`, a lease in debt (units used past
    /// it, not owed to the store yet) takes its debt from the holds' units: those units are
    /// used, and a store that gives the holds back at an expiry must keep them. A lease given
    /// back (eviction, reload, shutdown) keeps its open holds as jobs' reservations are kept:
    /// they never expire (no call renews a returned cell), and come back as they settle.
    pub(crate) fn kept(&self, locked: &Locked, debt: bool, returned: bool) -> crate::store::Kept {
        let Holds { held, jobs, .. } = locked.holds();
        if returned {
            return crate::store::Kept::new(0, 0, held);
        }
        let left = self.lease();
        let lease = u64::try_from(left.max(0)).unwrap_or(0).saturating_add(self.spare());
        let mut holds = held.saturating_sub(jobs);
        if debt {
            holds = holds.saturating_sub(left.min(0).unsigned_abs());
        }
        crate::store::Kept::new(lease, holds, jobs)
    }

    /// Whether what this node keeps of the counter is to be told to the store at `now`: it
    /// changed since the last call said it, or that call renewed it more than half of
    /// `expiry` ago. `Some(true)`: the reservation is within `skew` of its expiry, and the
    /// lease must not be spent until a call renews it.
    pub(crate) fn report_due(&self, now: i64, expiry: i64, skew: i64) -> Option<bool> {
        let locked = self.locked();
        let kept = self.kept(&locked, true, locked.returned);
        let at = self.cold().reported_at.load(Ordering::Acquire);
        let reported = locked.reported();
        let keeps = kept.total() > 0 || reported.total() > 0;
        if at > 0 && keeps && now >= at.saturating_add(expiry - skew) {
            return Some(true);
        }
        (kept != reported || (keeps && now >= at.saturating_add(expiry / 2))).then_some(false)
    }

    /// Whether the reservation of what this node keeps was last renewed `expiry − skew` ago
    /// or more (the store could not be reached): its lease must not be spent until a call
    /// renews it.
    pub(crate) fn stale(&self, now: i64, expiry: i64, skew: i64) -> bool {
        let at = self.cold().reported_at.load(Ordering::Acquire);
        at > 0 && now >= at.saturating_add(expiry - skew) && self.lease() > 0
    }

    /// Records that a call sent at `at` told the store `kept` (what it now counts this node
    /// keeps). Call with the lock held.
    pub(crate) fn reported(&self, kept: crate::store::Kept, at: i64) {
        self.locked().set_reported(kept);
        self.cold().reported_at.store(at, Ordering::Release);
    }

    /// Forgets what the store was told of the period that ended (its counter's record was
    /// settled by the roll's call).
    pub(crate) fn forget_reported(&self) {
        self.locked().set_reported(crate::store::Kept::default());
        self.cold().reported_at.store(0, Ordering::Release);
    }

    /// When the last call renewed what this node keeps (0: none).
    pub(crate) fn reported_at(&self) -> i64 {
        self.cold().reported_at.load(Ordering::Acquire)
    }

    /// What the store was last told this node keeps.
    pub(crate) fn reported_kept(&self) -> crate::store::Kept {
        self.locked().reported()
    }

    /// Stops spending the lease: its unused units move to the spare ones (they go back to the
    /// store with the next call, or serve again once a call renews the reservation). Call
    /// with the lock held.
    pub(crate) fn stash(&self) -> u64 {
        self.cold().stopped.store(true, Ordering::Release);
        let tag = PeriodBits::tag(self.hot.period.load(Ordering::Acquire));
        self.trim_to(tag, 0)
    }

    /// Whether the lease is stopped ([`stash`](Self::stash)) until a call renews it.
    pub(crate) fn stopped(&self) -> bool {
        self.cold().stopped.load(Ordering::Acquire)
    }

    /// A call renewed the reservation: the lease may be spent again, with what waited as
    /// spare units. Call with the lock held.
    pub(crate) fn resume(&self) {
        if self.cold().stopped.swap(false, Ordering::AcqRel) {
            let spare = self.take_spare();
            self.credit(spare);
        }
    }

    /// The store gave back what this node kept of the current period's counter (its
    /// reservation expired: the node was cut off or paused past it): the lease and spare
    /// units are dropped, and the units its requests' holds hold become a debt (what they
    /// record is owed again; what they give back pays it). After a call that took the lease's
    /// debt from the holds (`debt`), the debt and the holds are one: the lease owes the larger;
    /// after a refill, which owed the debt, it owes both. Returns the lease units dropped.
    /// Call with the lock held.
    pub(crate) fn drop_kept(&self, debt: bool) -> u64 {
        let cold = self.cold();
        let Holds { held, jobs, .. } = self.locked().holds();
        let holds = held.saturating_sub(jobs);
        let holds = i64::try_from(holds).unwrap_or(Lease::MAX).min(Lease::MAX);
        let mut word = self.hot.lease.load(Ordering::Acquire);
        loop {
            let left = Lease::value(word);
            let owed = left.min(0).saturating_neg();
            let owes = if debt { -(owed.max(holds)) } else { -(owed.saturating_add(holds)) };
            let next = Lease::word(Lease::tag(word), owes.max(-Lease::MAX));
            match self.hot.lease.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // After the lease: a stash meanwhile finds nothing to move.
                    if let Some(rare) = cold.rare() {
                        rare.spare.store(0, Ordering::Release);
                    }
                    cold.stopped.store(false, Ordering::Release);
                    return u64::try_from(left.max(0)).unwrap_or(0);
                }
                Err(w) => word = w,
            }
        }
    }

    /// `units` given back to the store: its count as this node knows it, less them; the
    /// limit is no longer reached.
    pub(crate) fn released(&self, units: u64) {
        let cold = self.cold();
        let _ = cold.reserved.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| Some(r.saturating_sub(units)));
        // The store has them left now: not spent.
        if units > 0 {
            cold.exhausted.store(false, Ordering::Release);
        }
    }

    /// (remaining units across nodes, over a soft limit?) when `lease_left` units remain here
    /// (spare units, unused, going back, count as remaining too).
    pub(crate) fn estimate(&self, lease_left: i64) -> (u64, bool) {
        let reserved = self.cold().reserved.load(Ordering::Relaxed);
        let used = reserved.saturating_sub((lease_left.max(0) as u64).saturating_add(self.spare()));
        let limit = self.limit();
        (limit.saturating_sub(used), used > limit)
    }

    /// What the `RateLimit` header says of this quota at `now` for a request that takes
    /// nothing of it (a request that takes `c` units says `c` fewer): the units remaining
    /// across nodes as this node knows them and the end of the period; `None` when this node
    /// holds no lease of the current period (its next request leases first).
    pub(crate) fn status_at(&self, now: i64) -> Option<(u64, i64)> {
        let (_, end) = self.period();
        (now < end).then(|| (self.estimate(self.lease()).0, end))
    }

    /// The bounds of the period of the lease held ((0, 0) before the first lease).
    pub(crate) fn period(&self) -> (i64, i64) {
        PeriodBits::bounds(self.hot.period.load(Ordering::Acquire))
    }

    /// The units left in the lease held (negative: a debt).
    pub(crate) fn lease(&self) -> i64 {
        Lease::value(self.hot.lease.load(Ordering::Acquire))
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
        let base = self.spec.lease().get().min(Lease::MAX as u64 / 4);
        let cap = self.lease_cap();
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

    /// The largest lease of this cell: a sixteenth of the limit, or the configured size if
    /// larger.
    pub(crate) fn lease_cap(&self) -> u64 {
        let base = self.spec.lease().get().min(Lease::MAX as u64 / 4);
        base.max(self.limit() / 16).min(Lease::MAX as u64 / 4)
    }

    /// Records a lease of `size` units granted at `now_nanos` (the pace the next size
    /// follows) and moves the low watermark to a quarter of it. Call with the lock held, only
    /// once the store has answered: a failed refill changes nothing.
    pub(crate) fn leased(&self, size: u64, now_nanos: i64) {
        let cold = self.cold();
        cold.size.store(size, Ordering::Relaxed);
        cold.refilled_at.store(now_nanos, Ordering::Relaxed);
        self.hot.low.store(u32::try_from(size / 4).unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    /// Whether a refill ahead of need was asked for and not done yet.
    pub(crate) fn prefetch_pending(&self) -> bool {
        self.cold().prefetching.load(Ordering::Acquire)
    }

    pub(crate) fn prefetch_done(&self) {
        self.cold().prefetching.store(false, Ordering::Release);
    }

    /// Starts the period `[start, end)`: the lease of the old one is emptied in the same
    /// atomic step that tags the word with the new period. Returns the old period's key (if a
    /// lease of it was held) and the units left in it (negative: a debt), to settle with the
    /// store; the old period is kept as the previous one ([`Locked::prev`]), which its late
    /// refunds go to. Call with the lock held.
    pub(crate) fn roll_period(&self, start: i64, end: i64) -> Option<(QuotaKey, i64)> {
        let cold = self.cold();
        let bits = PeriodBits::pack(start, end);
        let old_bits = self.hot.period.load(Ordering::Acquire);
        let old_tag = PeriodBits::tag(old_bits);
        // Late refunds of the old period go to it from now on.
        cold.prev_tag.store(if old_bits == 0 { u32::MAX } else { u32::from(old_tag) }, Ordering::Release);
        let old = self.hot.lease.swap(Lease::word(PeriodBits::tag(bits), 0), Ordering::AcqRel);
        cold.exhausted.store(false, Ordering::Release);
        cold.reserved.store(0, Ordering::Release);
        // The period changes under the bookkeeping mutex, with the holds aged in the same
        // step: a hold counted or given back meanwhile reads the period under it too, so it
        // finds its units on the side of the roll they are on.
        let mut locked = self.locked();
        self.hot.period.store(bits, Ordering::Release);
        if !self.prepaid() {
            // Holds open now belong to the period that ends (a hold counted from now on is
            // counted by its own tag).
            age_holds(&mut locked);
        }
        if old_bits == 0 {
            return None;
        }
        // The previous period, as the lease's own word packed it: a late refund's key.
        locked.prev = old_bits;
        drop(locked);
        let (old_start, old_end) = PeriodBits::bounds(old_bits);
        let left = if Lease::tag(old) == old_tag { Lease::value(old) } else { 0 };
        Some((self.key(old_start, old_end), left))
    }

    /// Usage owed by the next store call of the current period: what was taken outside any
    /// lease in it. Call with the lock held.
    pub(crate) fn take_unleased(&self) -> u64 {
        let current = self.hot.period.load(Ordering::Acquire);
        let Some(rare) = self.cold().rare() else { return 0 };
        let mut owed = rare.unleased();
        match owed.list().iter().position(|(b, _)| *b == current) {
            Some(i) => owed.remove(i).1,
            None => 0,
        }
    }

    /// Forgets every unit owed outside a lease (state left in a snapshot).
    pub(crate) fn forget_unleased(&self) {
        if let Some(rare) = self.cold().rare() {
            rare.unleased().clear();
        }
    }

    /// Units refunded to the previous period since the last call. Call with the lock held.
    pub(crate) fn take_late_refunds(&self) -> u64 {
        self.cold().rare().map_or(0, |r| r.late_refunds.swap(0, Ordering::AcqRel))
    }

    /// Adds `units` to the lease of the current period (units granted by the store, and the
    /// debt the store call covered). Call with the lock held.
    pub(crate) fn credit(&self, units: u64) {
        let tag = PeriodBits::tag(self.hot.period.load(Ordering::Acquire));
        let mut word = self.hot.lease.load(Ordering::Acquire);
        while Lease::tag(word) == tag {
            let next = Lease::word(tag, Lease::value(word).saturating_add(units as i64).min(Lease::MAX));
            match self.hot.lease.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(w) => word = w,
            }
        }
    }

    /// Records the store's answer: `reserved` units in all; whether the hard limit is reached
    /// (fewer units granted than asked). Call with the lock held.
    /// Units reserved by the whole fleet as of the store's last answer (0 before one in this
    /// period): a lower bound, other nodes may have reserved more since.
    pub(crate) fn known_reserved(&self) -> u64 {
        self.cold().reserved.load(Ordering::Relaxed)
    }

    /// `limit`: a prepaid balance's granted units, as the store said. An answer with room
    /// left clears what an earlier one said: a top-up (or units given back by other nodes)
    /// is spendable at once, and leases grow again.
    pub(crate) fn granted(&self, reserved: u64, limit: Option<u64>, short: bool) {
        if let Some(limit) = limit {
            self.cold().rare_made().balance.store(limit, Ordering::Relaxed);
        }
        self.cold().reserved.store(reserved, Ordering::Release);
        if self.hard() {
            self.cold().exhausted.store(short, Ordering::Release);
        }
    }

    /// Empties the lease of the current period (on eviction and shutdown): returns the units
    /// to give back (negative: a debt to owe). Call with the lock held.
    pub(crate) fn take_all(&self) -> i64 {
        let mut word = self.hot.lease.load(Ordering::Acquire);
        loop {
            let next = Lease::word(Lease::tag(word), 0);
            match self.hot.lease.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Lease::value(word),
                Err(w) => word = w,
            }
        }
    }
}

/// Adds `units` to `counter` (`more`) or takes them off it (never below 0).
/// The holds of the current period become an earlier period's (at a roll, under the
/// bookkeeping mutex that the period changed under).
fn age_holds(locked: &mut Locked) {
    if let Some(h) = locked.rare.as_deref_mut().map(|r| &mut r.holds) {
        h.held_old = h.held_old.saturating_add(std::mem::take(&mut h.held));
        h.jobs_old = h.jobs_old.saturating_add(std::mem::take(&mut h.jobs));
    }
}

fn count(counter: &mut u64, units: u64, more: bool) {
    *counter = if more { counter.saturating_add(units) } else { counter.saturating_sub(units) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prepaid_period_packs_into_its_own_bounds() {
        let (start, end) = crate::base::Period::Prepaid.bounds(1_795_000_000);
        assert_eq!(PeriodBits::bounds(PeriodBits::pack(start, end)), (start, end));
        assert_eq!(crate::base::Period::Prepaid.bounds(0), (start, end), "one period, whatever the time");
    }

    #[test]
    fn the_request_path_fields_fill_one_cache_line() {
        assert_eq!(std::mem::size_of::<MeterCell>(), 40);
        assert_eq!(std::mem::offset_of!(TenantState, quotas), 64);
        assert_eq!(std::mem::offset_of!(TenantState, refs), 0);
        assert_eq!(std::mem::size_of::<TenantState>(), 128, "one hot line, one cold one");
    }

    /// A quota's cold part, held for every quota of every tenant: the units owed outside a
    /// lease and the previous period take a pointer and a packed period.
    #[test]
    fn a_quota_keeps_its_rare_parts_small() {
        assert_eq!(
            std::mem::size_of::<QuotaCold>(),
            88,
            "its call lock in the flags' padding; its holds, what the store was told of them and its rare parts made on first use"
        );
        let mut locked = Locked::default();
        assert_eq!(locked.prev(), None);
        for (start, end) in [
            (1_701_388_800, 1_704_067_200), // December 2023
            (1_700_000_000 / 86_400 * 86_400, 1_700_000_000 / 86_400 * 86_400 + 86_400), // a day
            crate::base::Period::Prepaid.bounds(0),
        ] {
            locked.prev = PeriodBits::pack(start, end);
            assert_eq!(locked.prev(), Some((start, end)));
        }
        let mut owed = Rare::default();
        owed.make().extend([(1, 5), (2, 7)]);
        assert_eq!(owed.remove(0), (1, 5));
        assert!(owed.0.is_some(), "one period still owed");
        assert_eq!(owed.remove(0), (2, 7));
        assert!(owed.0.is_none() && owed.list().is_empty(), "let go once empty");
    }

    /// Units taken outside any lease are owed per period, at most four periods (the oldest
    /// folded into the next), a period refunded to nothing is gone, and the storage is let go
    /// once everything owed was taken.
    #[test]
    fn units_owed_outside_a_lease_fold_refund_and_let_go() {
        let s = state("[plans.p]\nquotas.requests = { limit = 100, period = \"day\" }", None);
        let q = s.quota(0).expect("a quota");
        let day = |d: i64| 1_700_006_400 + d * 86_400; // midnight UTC, then d days on
        let owed = |q: &QuotaRef<'_>| q.cold().rare().map(|r| r.unleased().list().to_vec()).unwrap_or_default();
        assert!(q.cold().rare().is_none(), "nothing owed, nothing made");
        for d in 0..5 {
            assert_eq!(q.force_take(1, day(d) + 60), None, "no lease: owed");
        }
        assert_eq!(q.unleased(), 5);
        let list = owed(&q);
        assert_eq!(list.len(), UNLEASED_PERIODS);
        assert_eq!(list[0], (PeriodBits::pack(day(1), day(2)), 2), "the oldest folded into the next");
        q.refund_unleased(1, day(2) + 60);
        assert_eq!(q.unleased(), 4);
        assert!(!owed(&q).iter().any(|(b, _)| *b == PeriodBits::pack(day(2), day(3))), "refunded to nothing: gone");
        let mut popped = 0;
        while let Some((_, _, units)) = q.pop_unleased_elsewhere() {
            popped += units;
        }
        assert_eq!(popped, 4);
        assert!(q.cold().rare().unwrap().unleased().0.is_none(), "let go once empty");
    }

    /// A quota's open holds are counted in storage made by the first hold, moved to the
    /// earlier period at a roll, and let go once no hold holds anything.
    #[test]
    fn holds_are_counted_in_storage_made_on_first_use_and_let_go() {
        let s = state("[plans.p]\nquotas.requests = { limit = 100, period = \"day\" }", None);
        let q = s.quota(0).expect("a quota");
        let made = |q: &QuotaRef<'_>| q.locked().rare.is_some();
        assert!(!made(&q), "no hold, nothing made");
        q.count_held(5, true, None);
        q.count_jobs(2, true, None);
        assert!(made(&q));
        assert_eq!((q.held(), q.kept(&q.locked(), false, false).held), (7, 5));
        let midnight = 1_700_006_400;
        q.roll_period(midnight, midnight + 86_400);
        assert_eq!(q.held(), 7, "of the day before now");
        assert_eq!(q.kept(&q.locked(), false, false).held, 0, "never told to the new day");
        let before = PeriodBits::tag(PeriodBits::pack(midnight - 86_400, midnight));
        q.count_held(5, false, Some(before));
        q.count_jobs(2, false, Some(before));
        assert_eq!(q.held(), 0);
        assert!(!made(&q), "let go once nothing is held");
    }

    /// What the store was last told of holds lives with the holds: it keeps their storage
    /// until the store is told they are gone, and reads back whole.
    #[test]
    fn what_the_store_was_told_of_holds_keeps_their_storage_until_it_is_told_none() {
        let s = state("[plans.p]\nquotas.requests = { limit = 100, period = \"day\" }", None);
        let q = s.quota(0).expect("a quota");
        let made = |q: &QuotaRef<'_>| q.locked().rare.is_some();
        let kept = |q: &QuotaRef<'_>| q.kept(&q.locked(), false, false);
        q.reported(crate::store::Kept::new(9, 0, 0), 1_700_000_000);
        assert!(!made(&q), "a lease alone makes nothing");
        assert_eq!(q.reported_kept(), crate::store::Kept::new(9, 0, 0));
        q.count_held(5, true, None);
        q.count_jobs(2, true, None);
        let told = kept(&q);
        q.reported(told, 1_700_000_001);
        assert_eq!(q.reported_kept(), crate::store::Kept::new(0, 5, 2));
        q.count_held(5, false, None);
        q.count_jobs(2, false, None);
        assert_eq!(q.held(), 0);
        assert!(made(&q), "the store still counts the holds: kept to compare with");
        assert_eq!(q.report_due(1_700_000_002, 60, 5), Some(false), "what it keeps changed");
        let told = kept(&q);
        q.reported(told, 1_700_000_002);
        assert!(!made(&q), "let go once the store was told");
        assert_eq!(q.reported_kept(), crate::store::Kept::default());
        assert_eq!(q.report_due(1_700_000_003, 60, 5), None, "nothing to tell");
        q.count_held(1, true, None);
        let told = kept(&q);
        q.reported(told, 1_700_000_003);
        assert_eq!(q.reported_kept(), crate::store::Kept::new(0, 1, 0));
        q.forget_reported();
        assert_eq!(q.reported_kept(), crate::store::Kept::default(), "forgotten at a roll");
        assert!(made(&q), "the hold is still open");
    }

    /// A plain quota's rare parts are not made by reading them; a prepaid balance's are made
    /// with the cell, as it always uses them.
    #[test]
    fn a_quotas_rare_parts_are_made_only_where_they_are_used() {
        let s = state("[plans.p]\nquotas.requests = { limit = 100, period = \"day\" }", None);
        let q = s.quota(0).expect("a quota");
        assert_eq!(
            (q.spare(), q.take_spare(), q.take_late_refunds(), q.unleased(), q.take_unleased()),
            (0, 0, 0, 0, 0)
        );
        assert_eq!(
            (q.limit(), q.tenant_cap(), q.recharge_pending(), q.pop_unleased_elsewhere()),
            (100, None, None, None)
        );
        q.refund_unleased(1, 1_700_000_000);
        q.forget_unleased();
        assert!(q.cold().rare().is_none(), "reads make nothing");
        let prepaid = state("[plans.p]\nquotas.requests = { period = \"prepaid\" }", None);
        let b = prepaid.quota(0).expect("a balance");
        assert!(b.cold().rare().is_some());
        assert_eq!((b.limit(), b.recharge_pending()), (0, None), "nothing granted, no recharge open");
        b.recharge_open(3);
        assert_eq!(b.recharge_pending(), Some(3));
    }

    fn state(toml: &str, customer: Option<&str>) -> TenantState {
        let config = crate::config::Config::from_toml_str(toml).unwrap();
        let clock = Clock::fake_at_unix(1_700_000_000).0;
        let rt = crate::plan::Runtime::compile(config, &Arc::new(crate::metrics::Metrics::register()), &clock);
        let plan = rt.plans.values().next().unwrap().clone();
        TenantState::new("t".into(), plan, customer.map(Arc::from))
    }

    /// A tenant with one meter, no fleet rate and no customer is its 128 bytes and its
    /// quotas' cold parts; the others get what they have, and read it back.
    #[test]
    fn what_few_tenants_need_is_made_only_for_them() {
        assert_eq!(std::mem::size_of::<Extra>(), 40, "a tenant with more meters or a customer pays for no fleet cells");
        let plain = state("[plans.p]\nrate = \"10/s\"\nquotas.requests = { limit = 10, period = \"day\" }", None);
        assert!(plain.extra.is_none() && plain.fleet().is_none() && plain.customer().is_none());
        assert!(plain.meter(0).is_some() && plain.meter(1).is_none());
        let billed = state("[plans.p]\nrate = \"10/s\"", Some("cus_1"));
        assert_eq!(billed.customer(), Some("cus_1"));
        assert!(billed.extra.as_ref().is_some_and(|e| e.more.is_empty() && e.fleet.is_none()));
        let two = state(
            "[meters.tokens]\n[plans.p]\nquotas.tokens = { limit = 10, period = \"day\", mode = \"soft\" }",
            None,
        );
        assert!(two.meter(1).is_some() && two.meter(2).is_none() && two.customer().is_none());
        let fleet = state("[limits]\nfleet_size_hint = 2\n[plans.p]\nrate = \"10/s\"\nrate_scope = \"fleet\"", None);
        assert!(fleet.fleet().is_some() && fleet.customer().is_none());
    }

    /// Usage a slot still had when a new window took it is kept in storage made on first use,
    /// reported with the rest, and given back by the drain that takes it.
    #[test]
    fn usage_moved_by_a_new_window_is_kept_until_drained_then_let_go() {
        let two = state("[meters.tokens]\n[usage]\nwindow = \"1m\"\n[plans.p]\nrate = \"10/s\"", None);
        let t0 = 1_700_000_040; // a window's start
        two.record(0, t0, 3);
        two.record(1, t0, 5);
        let moved = |s: &TenantState| s.stale.lock().unwrap().0.as_ref().map(|m| m.len());
        assert_eq!(moved(&two), None, "nothing moved yet, nothing made");
        // Two windows on, undrained: both slots of window t0 are taken by window t0 + 120.
        two.record(0, t0 + 120, 1);
        two.record(1, t0 + 120, 2);
        assert_eq!(moved(&two), Some(2));
        let mut seen = Vec::new();
        two.peek_usage(|m, w, q| seen.push((m, w, q)));
        seen.sort_unstable();
        assert_eq!(seen, [(0, t0, 3), (0, t0 + 120, 1), (1, t0, 5), (1, t0 + 120, 2)]);
        let mut taken = Vec::new();
        two.drain_usage(|m, w, q| taken.push((m, w, q)));
        taken.sort_unstable();
        assert_eq!(taken, seen, "the drain takes what the peek saw");
        assert!(two.stale.lock().unwrap().0.is_none(), "given back by the drain");
        let mut after = Vec::new();
        two.drain_usage(|m, w, q| after.push((m, w, q)));
        assert!(after.is_empty(), "taken once");
    }
}
