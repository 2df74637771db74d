//! The per-tenant state of the request path, reached through one map lookup, laid out here:
//! the GCRA cell, the meters' lease words and usage slots, each quota's cold part, the
//! bookkeeping under its mutex, the parts only some quotas use; and a quota cell, [`QuotaRef`],
//! with the accessors every verb shares. Its verbs are in files by what they do, as tokio keeps
//! `batch_semaphore.rs` beside `semaphore.rs`:
//!
//! - `state/take.rs`: the request path's take from the lease, and what headers and prefetch read;
//! - `state/cap.rs`: limits in force, a tenant's own spend cap, a balance's open recharge;
//! - `state/owed.rs`: units taken outside a lease, owed by period, and refunds;
//! - `state/spare.rs`: units kept back (trimmed, spare, stopped and resumed);
//! - `state/holds.rs`: units held and kept, and what the store was told of them;
//! - `state/lease.rs`: the lease refilled, sized, rolled to a new period, granted, returned.

use std::sync::{
    atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicU32, AtomicU64, Ordering},
    Arc,
};

use once_cell::race::OnceBox;

use super::{CallLock, GcraCell};
use crate::{
    clock::Clock,
    config::{MeterId, QuotaSpec, TenantId},
    plan::CompiledPlan,
    store::{QuotaKey, ReserveToken},
};

mod cap;
mod holds;
mod lease;
mod owed;
mod spare;
mod take;

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
    /// Requests admitted since the last flush drained them ([`admitted`](Self::admitted)),
    /// modulo 2^16: kept in the cold line's padding (the line stays 64 bytes); each wrap is
    /// handed to the caller, which counts it apart.
    admitted: AtomicU16,
    /// When the directory last confirmed this tenant, in Unix seconds (`u32`: until 2106);
    /// [`DECLARED`]: declared in the configuration, never revalidated. Kept here, in the cold
    /// line's last four bytes, rather than in the tenant table's entry, which it would make
    /// 8 bytes wider for every bucket of the table, half of them empty.
    validated: AtomicU32,
}

/// [`TenantState::validated`] of a tenant declared in the configuration.
const DECLARED: u32 = u32::MAX;

/// What a tenant's state holds only when the tenant has it: 56 bytes.
struct Extra {
    /// The cells of meters 1.. of the configuration's meter table (every meter has a cell,
    /// so a configuration of two meters gives each tenant one).
    more: Box<[MeterCell]>,
    /// The cells of the tenant's fleet rate this node holds (a plan with `rate_scope =
    /// "fleet"`): boxed, so that a tenant with more meters or a customer does not pay for
    /// them.
    fleet: Option<Box<super::FleetCells>>,
    customer: Option<Arc<str>>,
    /// The values of open dimensions (`max_values`) and their usage: boxed, made for a tenant
    /// whose plan has an open meter.
    open: Option<Box<std::sync::Mutex<super::OpenValues>>>,
    /// Past due within a grace (`[stripe] past_due_grace`): when it ends, the plan then, and
    /// the `Tollgate-Past-Due` header's value.
    past_due: Option<Box<PastDueNote>>,
}

/// A tenant past due within its grace, as its state carries it: the grace, and the value of
/// the `Tollgate-Past-Due` header every response of the tenant carries.
#[derive(Debug)]
pub(crate) struct PastDueNote {
    pub(crate) grace: crate::store::PastDue,
    pub(crate) header: Box<str>,
}

impl TenantState {
    /// Counts one request admitted. `true` when the count wrapped (2^16 since the last
    /// drain): the caller counts the 2^16 apart. A few instructions, on the request path.
    #[inline]
    pub(crate) fn admitted(&self) -> bool {
        self.admitted.fetch_add(1, Ordering::Relaxed) == u16::MAX
    }

    /// The requests admitted since the last call, less the wraps handed to
    /// [`admitted`](Self::admitted)'s callers: what the flush drains.
    pub(crate) fn take_admitted(&self) -> u64 {
        u64::from(self.admitted.swap(0, Ordering::Relaxed))
    }

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
        let quotas = plan.quotas.iter().map(|(_, spec)| QuotaCold::for_spec(spec)).collect();
        let now = plan.clock.unix_secs();
        let extra = (meters > 1 || plan.fleet.is_some() || customer.is_some()).then(|| {
            Box::new(Extra {
                more: (1..meters).map(|_| MeterCell::default()).collect(),
                fleet: plan.fleet.is_some().then(Box::default),
                customer,
                open: plan.meters.open.iter().any(Option::is_some).then(|| {
                    let node = plan.metrics.open_values.clone();
                    Box::new(std::sync::Mutex::new(super::OpenValues::new(node, plan.window_secs)))
                }),
                past_due: None,
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
            admitted: AtomicU16::new(0),
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

    /// The same state, past due within `grace` (a state is made past due or not, never
    /// changed: the directory's read makes a new one when the grace starts or ends).
    pub(crate) fn with_past_due(mut self, grace: Option<crate::store::PastDue>) -> Self {
        if let Some(grace) = grace {
            let header = grace.header_value().into_boxed_str();
            let extra = self.extra.get_or_insert_with(|| {
                Box::new(Extra { more: Box::default(), fleet: None, customer: None, open: None, past_due: None })
            });
            extra.past_due = Some(Box::new(PastDueNote { grace, header }));
        }
        self
    }

    /// Past due within a grace, if the tenant is.
    #[inline]
    pub(crate) fn past_due(&self) -> Option<&PastDueNote> {
        self.extra.as_deref()?.past_due.as_deref()
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
    /// [`record`](Self::record) of a handler's record or hold, which may be of a meter with
    /// dimensions' total or a selector: those record no usage (their series are the usage).
    pub(crate) fn record_usage(&self, meter: usize, now: i64, quantity: u64) {
        if self.plan.meters.recorded(meter) {
            self.record(meter, now, quantity);
        }
    }

    /// The tenant's values of open dimensions and their usage on this node (`None`: its plan
    /// has no open meter).
    pub(crate) fn open_values(&self) -> Option<std::sync::MutexGuard<'_, super::OpenValues>> {
        let open = self.extra.as_deref()?.open.as_deref()?;
        Some(open.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The value the open series `series`'s units at `value` would count under at `now`:
    /// `value`, known to this node or new with room for it in the tenant's `max_values` this
    /// calendar month; past them, `"other"`, or a refusal under `on_unknown = "refuse"`; past
    /// the node's bound, `"other"`. `"other"` itself needs no room. Takes no place: a record
    /// does ([`record_open`](Self::record_open)).
    ///
    /// # Errors
    /// [`DimensionError::TooManyValues`](crate::config::DimensionError::TooManyValues).
    pub(crate) fn check_open<'v>(
        &self,
        series: usize,
        value: &'v str,
        now: i64,
    ) -> Result<&'v str, crate::config::DimensionError> {
        let Some(spec) = self.plan.meters.open.get(series).and_then(|o| o.as_deref()) else { return Ok(value) };
        if value == crate::config::OTHER_VALUE {
            return Ok(value);
        }
        let admit =
            self.open_values().map_or(super::Admit::NodeFull, |mut o| o.check(spec.meter, value, spec.cap, now));
        match (admit, spec.refuse) {
            (super::Admit::Yes, _) => Ok(value),
            (super::Admit::NodeFull, _) | (super::Admit::PastCap, false) => Ok(crate::config::OTHER_VALUE),
            (super::Admit::PastCap, true) => Err(crate::config::DimensionError::TooManyValues {
                dimension: spec.dimension.to_string(),
                value: crate::config::dimensions_truncated(value),
                max: spec.cap,
            }),
        }
    }

    /// Records `quantity` of the open series `series` under `value` at `now`, admitting the
    /// value then (a value refused or forgotten since it was checked counts under `"other"`:
    /// see [`OpenValues::add`](super::OpenValues::add)).
    pub(crate) fn record_open(&self, series: usize, value: &str, now: i64, quantity: u64) {
        let Some(spec) = self.plan.meters.open.get(series).and_then(|o| o.as_deref()) else { return };
        if let (Some(mut open), Ok(s)) = (self.open_values(), u8::try_from(series)) {
            // Waiting since the clock's now (a hold's units may be recorded at its period's end).
            open.add(spec.meter, s, value, spec.cap, now, self.clock().unix_secs(), quantity);
        }
    }

    /// Reads the usage of open values not taken yet: (series index, value, window start in
    /// Unix seconds, quantity).
    pub(crate) fn peek_open(&self, mut out: impl FnMut(usize, &str, i64, u64)) {
        let Some(open) = self.open_values() else { return };
        let window_secs = self.plan.window_secs;
        open.peek(|s, v, w, q| out(usize::from(s), v, i64::from(w) * window_secs, q));
    }

    /// Records `quantity` of `meter` (a series, under `open` for an open series).
    pub(crate) fn record_series(&self, meter: usize, open: Option<&str>, now: i64, quantity: u64) {
        if self.plan.counts_for.is_some() {
            // An organization's counters: its tenants record the usage.
            return;
        }
        match open {
            Some(value) => self.record_open(meter, value, now, quantity),
            None => self.record_usage(meter, now, quantity),
        }
    }

    /// Takes the usage of open values claimed (see [`OpenValues::drain`](super::OpenValues::drain)):
    /// (series index, value, window start in Unix seconds, quantity). Returns how many values
    /// waited too long for their claim.
    pub(crate) fn drain_open(&self, now: i64, all: bool, mut out: impl FnMut(usize, &str, i64, u64)) -> usize {
        let Some(mut open) = self.open_values() else { return 0 };
        let table = &self.plan.meters;
        let series_of = |s: u8| table.open.get(usize::from(s)).and_then(|o| o.as_deref()).map(|o| o.meter);
        let window_secs = self.plan.window_secs;
        open.drain(now, all, &series_of, |s, v, w, q| out(usize::from(s), v, i64::from(w) * window_secs, q))
    }

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
    /// The units of the lease held, tagged with its period (`quota/mod.rs`'s `Lease`).
    lease: AtomicU64,
    /// The period the lease belongs to, packed by [`PeriodBits`](super::PeriodBits); 0: no
    /// lease yet.
    period: AtomicU32,
    /// Below this many units left, the lease is refilled ahead of need.
    low: AtomicU32,
    windows: [AtomicU32; 2],
    quantity: [AtomicU64; 2],
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
/// midnight UTC; a prepaid balance's lease windows are 512 hours long, on whole hours. A
/// minute period keeps the hour it ends in (rounded up) and, in the length's place,
/// `MINUTE_CODE` plus the minutes from its end to that hour (0 to 59): lengths in hours stop at
/// 744 (31 days) and the prepaid one's is 1,023, so the codes 960 to 1,019 are free.
pub(crate) struct PeriodBits;

/// The length field of a minute period ending `m` minutes before a whole hour: `MINUTE_CODE + m`.
const MINUTE_CODE: u32 = 960;

impl PeriodBits {
    pub(crate) fn pack(start: i64, end: i64) -> u32 {
        if end - start == 60 && end % 60 == 0 {
            let end_h = end.div_euclid(3600) + i64::from(end.rem_euclid(3600) != 0);
            let before = ((end_h * 3600 - end) / 60) as u32;
            return ((end_h as u32) << 10) | (MINUTE_CODE + before);
        }
        let end_h = (end / 3600) as u32;
        let len_h = ((end - start) / 3600).clamp(1, 1023) as u32;
        (end_h << 10) | len_h
    }

    /// (start, end) in Unix seconds; (0, 0) for no period.
    #[inline(always)]
    pub(crate) fn bounds(bits: u32) -> (i64, i64) {
        if Self::is_minute(bits) {
            return Self::minute_bounds(bits);
        }
        let end = i64::from(bits >> 10) * 3600;
        (end - i64::from(bits & 1023) * 3600, end)
    }

    /// Whether `bits` are a minute's: one compare on the request path.
    #[inline(always)]
    fn is_minute(bits: u32) -> bool {
        (bits & 1023).wrapping_sub(MINUTE_CODE) < 60
    }

    #[cold]
    #[inline(never)]
    fn minute_bounds(bits: u32) -> (i64, i64) {
        let end = i64::from(bits >> 10) * 3600 - i64::from((bits & 1023) - MINUTE_CODE) * 60;
        (end - 60, end)
    }

    /// The tag of the period's lease words: the low 16 bits of its end hour (consecutive
    /// periods of one cell end 24 to 744 hours apart, so their tags differ), or of a minute
    /// period's end minute (consecutive ones a minute apart).
    #[inline(always)]
    pub(crate) fn tag(bits: u32) -> u16 {
        if Self::is_minute(bits) {
            return Self::minute_tag(bits);
        }
        (bits >> 10) as u16
    }

    #[cold]
    #[inline(never)]
    fn minute_tag(bits: u32) -> u16 {
        ((bits >> 10).wrapping_mul(60).wrapping_sub((bits & 1023) - MINUTE_CODE)) as u16
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
    /// The units wanted by the requests and holds waiting for this cell's call lock
    /// ([`QuotaRef::want`]): the call that holds it asks for them too, so that one store call
    /// serves every waiter.
    wanted: AtomicU64,
    /// The refills that asked for waiters' units, numbered ([`QuotaRef::asking`]).
    asked: AtomicU64,
    /// The last of them answered, shifted left by one, its low bit set when its answer said
    /// the hard limit was reached ([`QuotaRef::answered_asking`]).
    last_answer: AtomicU64,
}

impl QuotaRare {
    fn unleased(&self) -> std::sync::MutexGuard<'_, Rare<(u32, u64)>> {
        self.unleased.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl QuotaCold {
    /// The cold part of a new cell of a quota of `spec`: a spend cap's or a balance's rare
    /// part is made at once (a spend cap's own cap is not known until the store answers).
    fn for_spec(spec: &QuotaSpec) -> Self {
        let cold = QuotaCold::default();
        if spec.capped || spec.period() == crate::base::Period::Prepaid {
            let cap = if spec.capped { CAP_UNKNOWN } else { 0 };
            cold.rare_made().cap.store(cap, Ordering::Relaxed);
        }
        cold
    }

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
    /// Units drained from the lease for the hold waiting on this refill: held by it from now
    /// on, so the call says they are kept (in neither the lease nor the open holds yet).
    pub(crate) holding: u64,
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

    /// The bounds of the period of the lease held ((0, 0) before the first lease).
    #[inline]
    pub(crate) fn period(&self) -> (i64, i64) {
        PeriodBits::bounds(self.hot.period.load(Ordering::Acquire))
    }

    /// The units left in the lease held (negative: a debt).
    #[inline]
    pub(crate) fn lease(&self) -> i64 {
        Lease::value(self.hot.lease.load(Ordering::Acquire))
    }
}

/// Adds `units` to `counter` (`more`) or takes them off it (never below 0).
fn count(counter: &mut u64, units: u64, more: bool) {
    *counter = if more { counter.saturating_add(units) } else { counter.saturating_sub(units) };
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

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub(crate) fn state(toml: &str, customer: Option<&str>) -> TenantState {
        let config = crate::config::Config::from_toml_str(toml).unwrap();
        let clock = Clock::fake_at_unix(1_700_000_000).0;
        let rt = crate::plan::Runtime::compile(config, &Arc::new(crate::metrics::Metrics::register()), &clock);
        let plan = rt.plans.values().next().unwrap().clone();
        TenantState::new("t".into(), plan, customer.map(Arc::from))
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::state, *};

    #[test]
    fn the_request_path_fields_fill_one_cache_line() {
        assert_eq!(std::mem::size_of::<MeterCell>(), 40);
        assert_eq!(std::mem::offset_of!(TenantState, quotas), 64);
        assert_eq!(std::mem::offset_of!(TenantState, refs), 0);
        assert_eq!(std::mem::size_of::<TenantState>(), 128, "one hot line, one cold one");
    }

    /// A tenant with one meter, no fleet rate and no customer is its 128 bytes and its
    /// quotas' cold parts; the others get what they have, and read it back.
    #[test]
    fn what_few_tenants_need_is_made_only_for_them() {
        assert_eq!(
            std::mem::size_of::<Extra>(),
            56,
            "a tenant with more meters or a customer pays for no fleet cells, nor open values"
        );
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

    #[test]
    fn a_minute_period_packs_into_its_own_bounds_and_a_tag_of_its_own() {
        let mut tags = std::collections::HashSet::new();
        for at in (1_795_000_000..1_795_000_000 + 7_200).step_by(60) {
            let (start, end) = crate::base::Period::Minute.bounds(at);
            let bits = PeriodBits::pack(start, end);
            assert_eq!(PeriodBits::bounds(bits), (start, end), "at {at}");
            assert!(tags.insert(PeriodBits::tag(bits)), "consecutive minutes differ in tag");
        }
        let day = crate::base::Period::Day.bounds(1_795_000_000);
        assert_eq!(PeriodBits::bounds(PeriodBits::pack(day.0, day.1)), day, "days unchanged");
    }

    #[test]
    fn the_prepaid_period_packs_into_its_own_bounds() {
        let (start, end) = crate::base::Period::Prepaid.bounds(1_795_000_000);
        assert_eq!(PeriodBits::bounds(PeriodBits::pack(start, end)), (start, end));
        assert_eq!(crate::base::Period::Prepaid.bounds(0), (start, end), "one period, whatever the time");
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
}

/// Units a request, hold or job wants of a cell while it waits for the cell's call lock
/// ([`QuotaRef::want`]); no longer wanted once dropped.
#[must_use = "the units are wanted only while this is held"]
pub(crate) struct Wanted<'a> {
    pub(super) wanted: &'a AtomicU64,
    pub(super) units: u64,
    /// The refills that had asked for waiters when it began to wait.
    pub(super) since: u64,
}

impl Wanted<'_> {
    /// Whether a refill that asked for these units too (one begun after they were wanted)
    /// was the last answered, and its answer said the hard limit was reached: then the
    /// store has nothing for them, and the waiter is refused without asking again. Call with
    /// the cell's lock held.
    pub(crate) fn refused(&self, cell: QuotaRef<'_>) -> bool {
        let last = cell.cold().rare_load(|r| &r.last_answer);
        last & 1 == 1 && last >> 1 > self.since
    }
}

impl Drop for Wanted<'_> {
    fn drop(&mut self) {
        self.wanted.fetch_sub(self.units, Ordering::AcqRel);
    }
}
