//! Holds: units of a hard quota or a prepaid balance set aside while a request's work runs,
//! recorded as the work reports them, the rest given back when the hold settles. A hold comes
//! out of the node's lease as a request's cost does (so the fleet's limit holds it), and waits
//! on the store only when the lease is short. A route's hold ([`RouteHeld`]) is one a route
//! takes for its requests (`[[routes]] hold`).

use std::{
    borrow::Cow,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use crate::engine::usage::{
    held::{Closed, OpenHold, Refused},
    lease::{Leases, LEASE_PER_HOLD},
    taken::Taken,
    units::Units,
};
use crate::{
    config::{HoldSettle, Overrun, RouteHold, StoreErrorPolicy},
    metrics::HoldOutcome,
    response::{HeaderState, Rejection, RejectionKind},
    tenant::{QuotaRef, Take, Tenant},
};

/// Why [`TenantContext::record`](crate::TenantContext::record) refused a quantity (nothing was recorded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The meter is not declared in the configuration.
    #[error("unknown meter `{0}`")]
    UnknownMeter(String),
    /// The quantity is larger than `i64::MAX` (no meter counts that much at once; it is
    /// certainly a bug in the caller).
    #[error("the quantity {0} is larger than i64::MAX")]
    TooLarge(u64),
    /// A [`Hold`](crate::Hold) with [`Overrun::Refuse`](crate::Overrun::Refuse): this many
    /// units beyond what it holds do not fit the node's lease. Nothing was recorded: the work
    /// they stand for must not be delivered (stop, or [`extend`](crate::Hold::extend) first).
    #[error("{0} units beyond the hold do not fit")]
    Overrun(u64),
    /// A [`Hold`](crate::Hold) with [`Overrun::Refuse`](crate::Overrun::Refuse) on a priced
    /// meter: the spend of these units beyond what the hold holds of the tenant's hard spend
    /// cap (this many nano-units of the currency) does not fit the node's lease. Nothing was
    /// recorded: the work must not be delivered (stop, or [`extend`](crate::Hold::extend)
    /// first).
    #[error("{0} nano-units of spend beyond the hold do not fit the spend cap")]
    SpendCap(u64),
    /// The dimension values name no series of the meter (a value its list lacks, a dimension
    /// missing or unknown), or the meter is a selector, which counts only what its series
    /// record. Nothing was recorded; [`TenantContext::refusal`](crate::TenantContext::refusal)
    /// gives the 400 to answer.
    #[error("{0}")]
    Dimension(crate::config::DimensionError),
}

/// Units of a tenant's hard quota or prepaid balance held for the work of one request
/// ([`TenantContext::hold`](crate::TenantContext::hold)): taken from the limit before the
/// work, recorded as the work reports them ([`record`](Self::record)), extended while it runs
/// ([`extend`](Self::extend)), and what is held and not recorded given back when it settles
/// ([`settle`](Self::settle), or its drop: a handler that fails, panics or is cut off gives
/// its whole hold back, minus what it recorded).
///
/// A hold on a meter where the tenant's plan (with its overrides) has no hard quota or
/// balance, or of a replayed `Idempotency-Key`, holds nothing: its records are recorded as
/// [`TenantContext::record`](crate::TenantContext::record) records them.
///
/// A hold stays open at most `limits.hold_timeout` (15 minutes by default): past it, or when
/// the engine shuts down with it open, it is settled as recorded so far, and a record through
/// it after that is charged as debt and counted
/// ([`Stats::records_after_settle`](crate::report::Stats::records_after_settle)).
#[must_use = "a hold dropped at once gives its units back: record through it while the work runs"]
pub struct Hold {
    inner: Arc<HoldInner>,
    /// The usage part: its open holds, its leases, its store calls.
    units: Arc<Units>,
    /// On a plan with a spend cap, a hold on a priced meter holds its estimated cost too: a
    /// hold of the spend meter beside it.
    spend: Option<Box<SpendSide>>,
    /// A hold on a series of a meter with dimensions: holds on its total and on the selectors
    /// it matches beside it, extended and recorded with it (their own units, never priced).
    rollups: Vec<Hold>,
}

/// The spend a hold on a priced meter holds beside its units: ⌈units held × price⌉ of the
/// spend cap, recorded as ⌈units recorded × price⌉ (the hold's spend is rounded once, as it
/// settles).
struct SpendSide {
    hold: Hold,
    price: rust_decimal::Decimal,
    /// Units the meter's hold was extended by in all, and units recorded through it.
    extended: u64,
    recorded: u64,
}

impl SpendSide {
    /// ⌈units × price⌉ in nano-units.
    fn nanos(&self, units: u64) -> u64 {
        crate::config::ceil_nanos(crate::config::cost_nanos(units, self.price))
    }
}

/// What a hold shares with the node's open holds ([`OpenHolds`](crate::engine::usage::held::OpenHolds)),
/// which settle it past its deadline or at shutdown.
pub(crate) struct HoldInner {
    id: u64,
    state: Tenant,
    /// The meter's index (else its name: not declared, its records fail).
    meter: Result<usize, Box<str>>,
    /// An open series' value (`max_values`): what its records count under.
    value: Option<Box<str>>,
    /// `false` for a replay: nothing is held or recorded.
    charged: bool,
    overrun: Overrun,
    /// How long it may stay open, in seconds.
    timeout: i64,
    /// When it is settled if still open (Unix seconds), read by the node's expiry pass without
    /// the lock below (the pass holds the open holds' lock, which a settle takes after this
    /// one: never the other way round).
    deadline: AtomicI64,
    /// The leases its units go back through when the node settles it.
    leases: Arc<Leases>,
    /// The spend side of a priced hold ([`OpenHold::side`]).
    side: bool,
    /// Asks the worker to give units back past the lease's cap.
    prefetcher: crate::engine::usage::taken::Prefetcher,
    open: Mutex<Open>,
}

/// A hold's units and what became of them.
struct Open {
    /// Whether units are held from a quota (a hard quota or a balance).
    live: bool,
    /// Whether it is among the node's open holds.
    registered: bool,
    /// The units held and not recorded yet, with the period they came from and when.
    taken: Taken,
    recorded: u64,
    /// Whether the store did not answer and the quota failed open: nothing is held, and
    /// records are charged as [`TenantContext::record`](crate::TenantContext::record) charges
    /// them.
    failed_open: bool,
    /// Settled by the node rather than by its owner.
    closed: Option<Closed>,
}

/// How a record through a hold is covered, decided (and its units beyond the hold taken from
/// the lease) before anything is recorded, so that a record refused by its spend takes
/// nothing.
struct Step {
    /// Units held from a quota (else recorded as `TenantContext::record` records them).
    held: bool,
    covered: u64,
    beyond: u64,
    /// The units beyond taken from the lease (none: taken past the limit, at commit); they go
    /// back as the step drops unless the record is committed.
    taken: Taken,
}

impl HoldInner {
    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The quota cell units are held from: a hard quota or a balance of a charged request.
    fn cell(&self) -> Option<QuotaRef<'_>> {
        if !self.charged {
            return None;
        }
        self.state.quota(*self.meter.as_ref().ok()?).filter(QuotaRef::hard)
    }

    /// Covers `units` to record at `now`: from what is held, then from the node's lease; what
    /// neither covers is refused ([`Overrun::Refuse`]: `Err` with the units beyond) or taken
    /// past the limit at commit.
    fn prepare(&self, open: &Open, units: u64, overrun: Overrun, now: i64) -> Result<Step, u64> {
        let state = &self.state;
        let (Some(cell), Ok(meter)) = (self.cell().filter(|_| !open.failed_open && open.closed.is_none()), &self.meter)
        else {
            return Ok(Step { held: false, covered: 0, beyond: units, taken: Taken::none() });
        };
        let covered = units.min(open.taken.units());
        let beyond = units - covered;
        let mut taken = Taken::none();
        if beyond > 0 {
            match cell.try_take(beyond, now) {
                Take::Taken { tag, .. } => taken = Taken::lease(state, *meter, beyond, tag, now),
                _ if overrun == Overrun::Refuse => {
                    if !state.plan.shadow {
                        return Err(beyond);
                    }
                    // Shadow mode: counted, and recorded past the limit.
                    let kind = if cell.prepaid() {
                        state.plan.balance_refusal
                    } else if state.plan.spend == Some(*meter) {
                        RejectionKind::SpendCapReached
                    } else {
                        RejectionKind::QuotaExceeded
                    };
                    state.plan.metrics.would_refuse(kind).increment(1);
                }
                _ => {}
            }
        }
        Ok(Step { held: true, covered, beyond, taken })
    }

    /// Records `units` as `step` covers them.
    fn commit(&self, open: &mut Open, step: Step, units: u64, now: i64, hold: &Units) {
        let state = &self.state;
        let Ok(meter) = self.meter else { return };
        let spend = state.plan.spend == Some(meter);
        match self.cell().filter(|_| step.held) {
            Some(cell) => {
                if step.beyond > 0 && step.taken.source().is_none() {
                    if spend {
                        state.plan.metrics.spend_past_cap_nanos.increment(step.beyond);
                    }
                    cell.force_take(step.beyond, now);
                }
                // Recorded: the units beyond are the record's.
                step.taken.keep();
                // Held units belong to the period they were taken in: after its end, they are
                // recorded in its last second, as its counter charged them.
                let (_, end) = cell.window(open.taken.at());
                let at = if now >= end && !cell.prepaid() { end - 1 } else { now };
                if step.covered > 0 {
                    open.taken.keep_part(step.covered);
                    cell.count_held(step.covered, false, open.taken.tag());
                    state.record_series(meter, self.value.as_deref(), at, step.covered);
                }
                if step.beyond > 0 {
                    // Recorded beyond the hold (from the lease, or past the limit): counted.
                    state.plan.metrics.hold(HoldOutcome::Overrun).increment(1);
                    hold.holds().overruns.fetch_add(1, Ordering::Relaxed);
                    state.record_series(meter, self.value.as_deref(), now, step.beyond);
                }
            }
            None => {
                if let Some(cell) = state.quota(meter) {
                    // A soft quota, a hold that failed open or was settled: counted as
                    // `record` counts it.
                    if spend && cell.hard() && matches!(cell.check_units(units, now), Err(Take::Exhausted)) {
                        state.plan.metrics.spend_past_cap_nanos.increment(units);
                    }
                    cell.force_take(units, now);
                    if spend {
                        hold.prefetcher().when_low(state, meter, cell);
                    }
                }
                state.record_series(meter, self.value.as_deref(), now, units);
            }
        }
        if spend {
            state.plan.metrics.spend_nanos.increment(units);
        } else if state.plan.counts_for.is_some() {
            // An organization's side of a tenant's hold: the tenant's hold counts the usage.
        } else if state.plan.meters.recorded(meter) || self.value.is_some() {
            state.plan.metrics.usage_units.increment(units);
        }
        open.recorded += units;
    }

    /// Gives back what it holds and has not recorded (settled): counted no longer held as it
    /// reaches the lease ([`Taken::give_back_held`]).
    fn give_back(&self, taken: Taken) {
        if self.meter.as_ref().ok().and_then(|m| self.state.quota(*m)).is_none() {
            return;
        }
        let units = taken.units();
        if units > 0 {
            self.state.plan.metrics.hold_returned_units.increment(units);
        }
        taken.give_back_held(&self.leases, &self.prefetcher);
    }
}

impl OpenHold for HoldInner {
    fn side(&self) -> bool {
        self.side
    }

    fn id(&self) -> u64 {
        self.id
    }

    fn tenant(&self) -> &crate::config::TenantId {
        &self.state.id
    }

    fn deadline(&self) -> i64 {
        self.deadline.load(Ordering::Relaxed)
    }

    fn held(&self) -> u64 {
        self.lock().taken.units()
    }

    fn close(&self, why: Closed) -> bool {
        let mut open = self.lock();
        if open.closed.is_none() {
            open.closed = Some(why);
        }
        open.registered = false;
        if !open.live {
            return false;
        }
        open.live = false;
        let outcome = if why == Closed::Expired { HoldOutcome::Expired } else { HoldOutcome::Settled };
        self.state.plan.metrics.hold(outcome).increment(1);
        let held = std::mem::take(&mut open.taken);
        self.give_back(held);
        true
    }
}

impl Hold {
    pub(crate) fn new(
        state: Tenant,
        meter: Result<usize, Box<str>>,
        charged: bool,
        overrun: Overrun,
        timeout: Option<std::time::Duration>,
        units: Arc<Units>,
    ) -> Self {
        let timeout = timeout.unwrap_or_else(|| units.hold_timeout());
        let timeout_secs = i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX);
        let id = units.holds().next_id();
        let open = Open {
            live: false,
            registered: false,
            taken: Taken::none(),
            recorded: 0,
            failed_open: false,
            closed: None,
        };
        let deadline = AtomicI64::new(i64::MAX);
        // A priced meter on a plan with a spend cap: its cost is held too.
        let priced = match (&meter, state.plan.spend) {
            (Ok(m), Some(s)) if charged && *m != s => state.plan.price(*m).map(|price| (s, price)),
            _ => None,
        };
        // Its request's hold counts toward the caps on open holds once: the meter's own hold
        // when it holds units of a hard quota or balance (and registers), else the cost's.
        let counted_by_meter = matches!(&meter, Ok(m) if state.quota(*m).is_some_and(|c| c.hard()));
        let spend = priced.map(|(s, price)| {
            let mut hold = Hold::new(state.clone(), Ok(s), charged, overrun, Some(timeout), units.clone());
            if counted_by_meter {
                if let Some(inner) = Arc::get_mut(&mut hold.inner) {
                    inner.side = true;
                }
            }
            Box::new(SpendSide { hold, price, extended: 0, recorded: 0 })
        });
        let leases = units.leases().clone();
        let inner = HoldInner {
            id,
            state,
            meter,
            value: None,
            charged,
            overrun,
            timeout: timeout_secs,
            deadline,
            leases,
            side: false,
            prefetcher: units.prefetcher().clone(),
            open: Mutex::new(open),
        };
        Self { inner: Arc::new(inner), units, spend, rollups: Vec::new() }
    }

    /// A hold on the series `series` of a meter with dimensions (under `value` for an open
    /// series, its value admitted), with a hold on each meter of `rollups` (its total, the
    /// selectors it matches) beside it. One of them counts toward the caps on open holds: the
    /// series' (or its cost's), else the first that holds units.
    #[allow(clippy::too_many_arguments, reason = "the hold's meter, then Hold::new's")]
    pub(crate) fn dimensioned(
        state: Tenant,
        series: usize,
        value: Option<&str>,
        mut rollups: u64,
        charged: bool,
        overrun: Overrun,
        timeout: Option<std::time::Duration>,
        units: Arc<Units>,
    ) -> Self {
        let mut hold = Hold::new(state.clone(), Ok(series), charged, overrun, timeout, units.clone());
        if let Some(inner) = Arc::get_mut(&mut hold.inner) {
            inner.value = value.map(Box::from);
        }
        // The spend side registers (and counts) when the spend cap is hard and the series'
        // own hold does not.
        let hard = |m: usize| state.quota(m).is_some_and(|c| c.hard());
        let mut counted = hard(series) || (hold.spend.is_some() && state.plan.spend.is_some_and(hard));
        while rollups != 0 {
            let m = rollups.trailing_zeros() as usize;
            rollups &= rollups - 1;
            let mut r = Hold::new(state.clone(), Ok(m), charged, overrun, timeout, units.clone());
            if counted || !hard(m) {
                if let Some(inner) = Arc::get_mut(&mut r.inner) {
                    inner.side = true;
                }
            } else {
                counted = true;
            }
            hold.rollups.push(r);
        }
        hold
    }

    /// Beside this hold, one on its tenant's organization's counters (`org`, their state) for
    /// each meter it holds that the organization limits: extended and recorded with it, as
    /// its total's and selectors' holds are, so that a hold refused at either scope holds
    /// nothing, and what is given back goes back at both. Counted toward the caps on open holds
    /// only when the tenant's side holds nothing that registers (see below).
    pub(crate) fn with_org(mut self, org: Option<&Tenant>) -> Self {
        let (Some(org), Some(limits)) = (org, self.inner.state.plan.org.as_ref()) else { return self };
        let bit = |m: &Result<usize, Box<str>>| match m {
            Ok(m) if *m < 64 => 1u64 << m,
            _ => 0,
        };
        let mut meters = self.rollups.iter().fold(bit(&self.inner.meter), |bits, r| bits | bit(&r.inner.meter));
        meters &= limits.meters;
        let timeout = std::time::Duration::from_secs(u64::try_from(self.inner.timeout).unwrap_or(u64::MAX));
        // The request's hold counts toward the caps on open holds once: by its tenant's side
        // when that holds units of a hard quota (or its cost), else by its organization's
        // first (counted under the organization's counters' id, which its tenants share).
        let hard = |h: &Hold| h.cell().is_some() || h.spend.as_ref().is_some_and(|s| s.hold.cell().is_some());
        let mut counted = hard(&self) || self.rollups.iter().any(hard);
        while meters != 0 {
            let m = meters.trailing_zeros() as usize;
            meters &= meters - 1;
            let (charged, overrun) = (self.inner.charged, self.inner.overrun);
            let mut side = Hold::new(org.clone(), Ok(m), charged, overrun, Some(timeout), self.units.clone());
            if counted || side.cell().is_none() {
                if let Some(inner) = Arc::get_mut(&mut side.inner) {
                    inner.side = true;
                }
            } else {
                counted = true;
            }
            self.rollups.push(side);
        }
        self
    }

    /// Units held and not recorded yet.
    #[must_use]
    pub fn held(&self) -> u64 {
        self.inner.held()
    }

    /// Units recorded through this hold.
    #[must_use]
    pub fn recorded(&self) -> u64 {
        self.inner.lock().recorded
    }

    /// The quota cell units are held from: a hard quota or a balance of a charged request.
    fn cell(&self) -> Option<QuotaRef<'_>> {
        self.inner.cell()
    }

    /// Records `units` of the held meter, in the current window. Never waits: they come out
    /// of the hold, then out of the node's lease; what neither covers is taken past the limit
    /// ([`Overrun::Debt`]) or refused ([`Overrun::Refuse`]: nothing recorded). Does nothing for
    /// a replayed request. After the node settled the hold (past `limits.hold_timeout`, or at
    /// shutdown), the units are charged as debt, and counted.
    ///
    /// # Errors
    /// [`RecordError::Overrun`] (with [`Overrun::Refuse`]), [`RecordError::UnknownMeter`] when
    /// the held meter is not declared, [`RecordError::TooLarge`] past `i64::MAX`.
    pub fn record(&mut self, units: u64) -> Result<(), RecordError> {
        self.record_with(units, self.inner.overrun)
    }

    /// Records `units` of work that was done (a route's actual, or its estimate billed in
    /// full): beyond the hold, as debt whatever the hold's `overrun`.
    pub(crate) fn record_done(&mut self, units: u64) {
        if let Err(e) = self.record_with(units, Overrun::Debt) {
            tracing::warn!(tenant = %self.inner.state.id, error = %e, "a held route's usage could not be recorded");
        }
    }

    fn record_with(&mut self, units: u64, overrun: Overrun) -> Result<(), RecordError> {
        let inner = &*self.inner;
        if let Err(name) = &inner.meter {
            return Err(RecordError::UnknownMeter(name.to_string()));
        }
        if i64::try_from(units).is_err() {
            return Err(RecordError::TooLarge(units));
        }
        if !inner.charged || units == 0 {
            return Ok(());
        }
        let now = inner.state.clock().unix_secs();
        let mut open = inner.lock();
        if open.closed.is_some() {
            self.units.holds().records_after_settle.fetch_add(1, Ordering::Relaxed);
        }
        let step = inner.prepare(&open, units, overrun, now).map_err(RecordError::Overrun)?;
        // A series' total and selectors: each covered before anything is recorded (a refusal
        // drops the steps, their units going back).
        let mut rolled = Vec::with_capacity(self.rollups.len());
        for r in &self.rollups {
            let ri = &*r.inner;
            let ropen = ri.lock();
            let rstep = ri.prepare(&ropen, units, overrun, now).map_err(RecordError::Overrun)?;
            rolled.push((ri, ropen, rstep));
        }
        if let Some(side) = self.spend.as_deref_mut() {
            // Its spend first: refused, the units taken for the record go back (the step's
            // drop).
            let nanos = side.nanos(side.recorded.saturating_add(units)) - side.nanos(side.recorded);
            side.hold.record_nanos(nanos, overrun, now)?;
            side.recorded = side.recorded.saturating_add(units);
        }
        inner.commit(&mut open, step, units, now, &self.units);
        for (ri, mut ropen, rstep) in rolled {
            ri.commit(&mut ropen, rstep, units, now, &self.units);
        }
        Ok(())
    }

    /// Records `nanos` of spend through this hold of the spend meter (a priced meter's side).
    fn record_nanos(&mut self, nanos: u64, overrun: Overrun, now: i64) -> Result<(), RecordError> {
        if nanos == 0 {
            return Ok(());
        }
        let inner = &*self.inner;
        let mut open = inner.lock();
        let step = inner.prepare(&open, nanos, overrun, now).map_err(RecordError::SpendCap)?;
        inner.commit(&mut open, step, nanos, now, &self.units);
        Ok(())
    }

    /// Holds `units` more while the work runs (a streaming answer, per chunk): from the node's
    /// lease, else from the store (waiting at most `usage.store_timeout`). Refused, nothing
    /// more is held (what is held stays): the handler should stop the work and answer with
    /// the rejection, or end what it streams.
    ///
    /// # Errors
    /// The rejection: 429 when the quota is spent (402 for a balance), 429 `Units held` when
    /// other requests hold the units it needs (or the node has `limits.max_holds` open), 503
    /// when the store does not answer and the quota fails closed, or when the node settled the
    /// hold (past `limits.hold_timeout`, or at shutdown).
    pub async fn extend(&mut self, units: u64) -> Result<(), Rejection> {
        if units == 0 {
            return Ok(());
        }
        // A series' total and selectors first (units alone, never priced): refused by one,
        // the units the others took for this extension go back, and nothing of the series or
        // its cost was held.
        let mut taken = Vec::with_capacity(self.rollups.len());
        for i in 0..self.rollups.len() {
            match Box::pin(self.rollups[i].extend_own(units)).await {
                Ok(n) => taken.push(n),
                Err(refused) => {
                    for (r, n) in self.rollups.iter().zip(taken) {
                        r.put_back(n);
                    }
                    let refused = match (&self.rollups[i].inner.state.plan.counts_for, &self.rollups[i].inner.meter) {
                        // Refused at the tenant's organization: answered as the tenant's.
                        (Some(_), Ok(meter)) => for_member(refused, &self.inner.state, *meter),
                        _ => refused,
                    };
                    return Err(refused);
                }
            }
        }
        // Then the series and its cost (refused, its cost stays held until the hold settles,
        // as any hold's does when its units are refused; the rollups' units go back).
        if let Err(refused) = self.extend_own(units).await {
            for (r, n) in self.rollups.iter().zip(taken) {
                r.put_back(n);
            }
            return Err(refused);
        }
        Ok(())
    }

    /// Gives back `units` this hold took for an extension that did not go through.
    fn put_back(&self, units: u64) {
        if units == 0 {
            return;
        }
        let part = self.inner.lock().taken.split(units);
        self.inner.give_back(part);
    }

    /// Extends this hold alone (not its rollups): the units it took from a quota (0 when it
    /// holds none).
    async fn extend_own(&mut self, units: u64) -> Result<u64, Rejection> {
        if let Some(side) = self.spend.as_deref_mut() {
            // Its estimated cost first (a refusal holds no units); kept if its units are
            // refused after (given back as the hold settles). Counted from what was recorded
            // when records went past what was held (from the lease): a record of `units` next
            // is always covered, whatever the rounding.
            let base = side.extended.max(side.recorded);
            let nanos = side.nanos(base.saturating_add(units)) - side.nanos(base);
            Box::pin(side.hold.extend(nanos)).await?;
            side.extended = base.saturating_add(units);
        }
        if self.cell().is_none() {
            return Ok(0);
        }
        let Ok(meter) = self.inner.meter else { return Ok(0) };
        let state = &self.inner.state;
        {
            let mut open = self.inner.lock();
            if let Some(why) = open.closed {
                return Err(closed(state, why));
            }
            if !open.live && !open.registered {
                let (max, per_tenant) = {
                    let rt = self.units.shared().runtime().load();
                    (rt.config.limits.max_holds, rt.config.limits.max_holds_per_tenant)
                };
                let deadline = state.clock().unix_secs().saturating_add(self.inner.timeout);
                self.inner.deadline.store(deadline, Ordering::Relaxed);
                match self.units.holds().enter(self.inner.clone(), max, per_tenant) {
                    Ok(()) => {}
                    // Shutdown began: its units would be leased after the leases went back
                    // (stranded), its records made after the final flush (lost).
                    Err(Refused::Stopping) => return Err(closed(state, Closed::Shutdown)),
                    Err(why @ (Refused::Full | Refused::TenantFull)) => {
                        drop(open);
                        self.units.holds().refused_full.fetch_add(1, Ordering::Relaxed);
                        state.plan.metrics.hold(HoldOutcome::RefusedFull).increment(1);
                        state.plan.metrics.rejected(RejectionKind::UnitsHeld).increment(1);
                        return Err(match why {
                            Refused::TenantFull => tenant_full(state, per_tenant),
                            _ => full(state, max),
                        });
                    }
                }
                open.registered = true;
            }
        }
        // `None`: the store did not answer and the quota fails open: nothing is held, and
        // what is recorded is charged as `record` charges it.
        // What this hold holds already is not "held by others" to its own extension: of the
        // current period's holds, its units if they are of that period.
        let (own_units, tag) = {
            let open = self.inner.lock();
            (open.taken.units(), open.taken.tag())
        };
        let own = state.quota(meter).map_or(0, |c| c.held_now_of(own_units, tag));
        let taken = take(&self.units, state, meter, units, own).await;
        let mut open = self.inner.lock();
        let taken = match taken {
            Ok(Some(taken)) => taken,
            other => {
                if !open.live && open.registered {
                    open.registered = false;
                    self.units.holds().leave(self.inner.id);
                }
                if matches!(other, Ok(None)) {
                    open.failed_open = true;
                }
                return other.map(|_| 0);
            }
        };
        // `take` counted them held.
        if let Some(why) = open.closed {
            // Settled by the node while this waited on the store: the units go back (`take`
            // counted them held; a give-back counts them no longer held).
            self.inner.give_back(taken);
            return Err(closed(state, why));
        }
        let took = taken.units();
        let outcome = if open.live { HoldOutcome::Extended } else { HoldOutcome::Taken };
        state.plan.metrics.hold(outcome).increment(1);
        if let Some(old) = open.taken.add(taken) {
            // The period rolled since: what is left of the old one goes back to it.
            self.inner.give_back(old);
        }
        open.live = true;
        // The store answers again: records come out of the hold from now on.
        open.failed_open = false;
        Ok(took)
    }

    /// Gives back what is held and not recorded: the work is done.
    pub fn settle(mut self) {
        self.release();
    }

    fn release(&mut self) {
        let mut open = self.inner.lock();
        let registered = std::mem::replace(&mut open.registered, false);
        if open.live {
            open.live = false;
            self.inner.state.plan.metrics.hold(HoldOutcome::Settled).increment(1);
            let held = std::mem::take(&mut open.taken);
            if held.units() > 0 {
                self.inner.give_back(held);
            } else {
                held.keep();
            }
        }
        // Left once its units are given back (or on their way, counted): a shutdown that finds
        // no hold open finds every give-back begun.
        if registered {
            self.units.holds().leave(self.inner.id);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self.inner.lock();
        f.debug_struct("Hold")
            .field("tenant", &self.inner.state.id)
            .field("held", &open.taken.units())
            .field("recorded", &open.recorded)
            .field("overrun", &self.inner.overrun)
            .finish_non_exhaustive()
    }
}

/// Takes `units` of the tenant's hard quota or balance on `meter` for a hold: from the lease,
/// else with the cell's lock held from a refill (the units straight from its reservation), as
/// a request that waits takes its cost. Returns the tag of the period they came from, and
/// when; `None` when the store did not answer and the quota fails open (nothing held).
async fn take(hold: &Units, state: &Tenant, meter: usize, units: u64, own: u64) -> Result<Option<Taken>, Rejection> {
    let cell = state.quota(meter).expect("a hold takes from a quota");
    let at = state.clock().unix_secs();
    // A hold no period could ever cover is refused before anything is asked: a calendar
    // quota's limit, or the largest balance a store keeps.
    let most = if cell.prepaid() {
        crate::base::MAX_BALANCE
    } else if cell.spec.capped {
        // A spend cap: the tenant's own may be above the plan's (the store holds it).
        crate::config::MAX_CAP_NANOS
    } else {
        cell.spec.limit().get()
    }
    .min(crate::base::LEASE_MAX);
    if units > most {
        return refused(state, meter, units, own, at, false);
    }
    // Counted held as they leave the lease (the caller counts none).
    match cell.try_take_held(units, at) {
        Take::Taken { tag, left } => {
            if cell.wants_prefetch(left) {
                hold.prefetcher().request(state, meter, cell);
            }
            return Ok(Some(Taken::lease(state, meter, units, tag, at)));
        }
        Take::Exhausted => return refused(state, meter, units, own, at, true),
        Take::NeedLease => {}
    }
    let rt = hold.shared().runtime().load_full();
    let leases = hold.leases();
    // Wanted while it waits its turn: the call ahead of it asks for these units too.
    let wanted = cell.want(units);
    let outcome = hold
        .shared()
        .stores()
        .under_lock(cell.lock(), async {
            // A call left in flight by a timeout may have landed: its units come first.
            leases.settle_inflight(cell).await?;
            Ok(
                match leases
                    .take_locked(&rt, cell, at, units, units.saturating_mul(LEASE_PER_HOLD), false, Some(&wanted))
                    .await?
                {
                    Some(t) => {
                        // Counted held before the cell's lock goes: no call of the cell can
                        // find them in neither the lease nor the holds.
                        cell.count_held(units, true, Some(t.tag));
                        Ok(Taken::lease(state, meter, units, t.tag, t.start.map_or(at, |start| at.max(start))))
                    }
                    None => Err(()),
                },
            )
        })
        .await;
    drop(wanted);
    match outcome {
        Ok(Ok(taken)) => Ok(Some(taken)),
        Ok(Err(())) => refused(state, meter, units, own, at, true),
        Err(e) if crate::engine::store_calls::busy(&e) && state.quota_policy(meter) == StoreErrorPolicy::FailClosed => {
            let r = busy(state);
            state.plan.metrics.rejected(r.kind()).increment(1);
            Err(r)
        }
        Err(_) => failed(state, meter),
    }
}

/// The store did not answer: the quota's policy decides. Failing open, nothing is held.
fn failed(state: &Tenant, meter: usize) -> Result<Option<Taken>, Rejection> {
    match state.quota_policy(meter) {
        StoreErrorPolicy::FailOpen => Ok(None),
        StoreErrorPolicy::FailClosed => Err(unavailable(state)),
    }
}

/// A hold the limit cannot cover: refused, or in shadow mode counted and (when the period
/// could ever cover it, `fits`) taken past the limit. Refused because this node's other holds
/// hold the units it needs (they come back as their requests end), it is answered `Units
/// held`; else as a spent limit.
fn refused(
    state: &Tenant,
    meter: usize,
    units: u64,
    own: u64,
    at: i64,
    fits: bool,
) -> Result<Option<Taken>, Rejection> {
    let (r, outcome) = match units_held(state, meter, units, own, at).filter(|_| fits) {
        Some(mut r) => {
            if let Some(org) = &state.plan.counts_for {
                // Held at the tenant's organization, by its tenants' requests.
                r.inner.scope = Some("organization");
                r.inner.detail = Cow::Owned(format!("organization `{org}`: {}", r.inner.detail));
            }
            (r, HoldOutcome::RefusedHeld)
        }
        None => (spent(state, meter, at, fits), HoldOutcome::RefusedSpent),
    };
    state.plan.metrics.hold(outcome).increment(1);
    if state.plan.shadow {
        state.plan.metrics.would_refuse(r.kind()).increment(1);
        tracing::debug!(tenant = %state.id, "shadow mode: would refuse a hold ({r})");
        let cell = state.quota(meter).expect("a hold takes from a quota");
        // Taken past the limit from this period's lease; owed outside a lease, nothing is held.
        let tag = if fits { cell.force_take_held(units, at) } else { None };
        return Ok(tag.map(|tag| Taken::lease(state, meter, units, tag, at)));
    }
    state.plan.metrics.rejected(r.kind()).increment(1);
    Err(r)
}

/// The answer to a hold of `units` that this node's other open holds of the current period
/// (requests' and jobs', not the asking hold's `own` units of it) keep from fitting (`None`:
/// what they do not hold cannot cover it either). Holds of other nodes are not known here:
/// their units count as spent, as the rest of their leases do.
fn units_held(state: &Tenant, meter: usize, units: u64, own: u64, at: i64) -> Option<Rejection> {
    let cell = state.quota(meter)?;
    // Holds of a period over (a minute's, a stream open across its end) give back to theirs:
    // nothing they hold would come to this one.
    let held = cell.held_now().saturating_sub(own);
    let (free, _) = cell.estimate(cell.lease());
    if held == 0 || free.saturating_add(held) < units {
        return None;
    }
    let mut r = Rejection::new(
        RejectionKind::UnitsHeld,
        Cow::Owned(format!(
            "other requests hold {held} {} units until they end; {free} are not held, and this work needs {units}",
            cell.meter_id()
        )),
    )
    .with_retry_after(1);
    let (_, end) = cell.period();
    // The held meter's own policy (each meter alone is the shape of its index).
    r.inner.headers = HeaderState::new(meter, meter as u8);
    r.inner.headers.set_quota(cell.spec.in_header(free), if cell.prepaid() { 0 } else { (end - at).max(0) as u64 });
    Some(r.for_tenant(state))
}

/// The answer to a hold refused because the node has `max` holds open.
fn full(state: &Tenant, max: usize) -> Rejection {
    Rejection::new(
        RejectionKind::UnitsHeld,
        Cow::Owned(format!("this node has {max} holds open (limits.max_holds); try again in a moment")),
    )
    .with_retry_after(1)
    .for_tenant(state)
}

/// The answer to a hold refused because its tenant has `max` holds open on the node.
fn tenant_full(state: &Tenant, max: usize) -> Rejection {
    Rejection::new(
        RejectionKind::UnitsHeld,
        Cow::Owned(format!(
            "this tenant has {max} holds open on this node (limits.max_holds_per_tenant); try again in a moment"
        )),
    )
    .with_retry_after(1)
    .for_tenant(state)
}

/// The answer to an extension of a hold the node settled.
fn closed(state: &Tenant, why: Closed) -> Rejection {
    let detail = match why {
        Closed::Expired => "the hold was open past limits.hold_timeout and was settled: it cannot be extended",
        Closed::Shutdown => "the node is shutting down: no hold is taken or extended; send the request again",
    };
    state.plan.metrics.rejected(RejectionKind::StoreUnavailable).increment(1);
    Rejection::new(RejectionKind::StoreUnavailable, detail).with_retry_after(1).for_tenant(state)
}

/// The answer to a hold the quota's period, or the balance, cannot cover (`fits`: one could,
/// else no period ever will, and no `Retry-After` says otherwise).
pub(crate) fn spent(state: &Tenant, meter: usize, at: i64, fits: bool) -> Rejection {
    let cell = state.quota(meter).expect("a hold takes from a quota");
    if !fits {
        // No period, no top-up can cover it: not a 429 to retry.
        let whole = if state.plan.spend == Some(meter) {
            "the whole spend cap".to_owned()
        } else if cell.prepaid() {
            format!("the largest {} balance a store keeps", cell.meter_id())
        } else {
            format!(
                "the whole {} quota of {} {} on plan `{}`",
                cell.spec.period().name(),
                cell.spec.limit(),
                cell.meter_id(),
                state.plan.id
            )
        };
        let whole = match &state.plan.counts_for {
            Some(org) => format!("{whole} of organization `{org}`, which its tenants share"),
            None => whole,
        };
        let mut r = Rejection::new(
            RejectionKind::HoldExceedsLimit,
            Cow::Owned(format!("this work is larger than {whole}: no period can ever cover it")),
        );
        if state.plan.counts_for.is_some() {
            r.inner.scope = Some("organization");
        }
        r.inner.headers = HeaderState::new(meter, meter as u8);
        return r.for_tenant(state);
    }
    if state.plan.spend == Some(meter) {
        // A priced meter's cost, held beside its units: the spend cap refuses (402).
        return crate::engine::usage::spend::cap_reached(state, at);
    }
    if let Some(org) = &state.plan.counts_for {
        // An organization's side of a tenant's hold: its quota, which its tenants share.
        let (_, end) = cell.period();
        let mut r = Rejection::new(
            RejectionKind::QuotaExceeded,
            Cow::Owned(format!(
                "the {} quota of {} {} of organization `{org}` (plan `{}`), which its tenants share, cannot cover \
                 this work until the period ends",
                cell.spec.period().name(),
                cell.spec.limit(),
                cell.meter_id(),
                state.plan.id
            )),
        )
        .with_retry_after((end - at).max(1) as u64);
        r.inner.policy =
            Some(format!("org-{}-{}", crate::base::policy_name(cell.meter_id().as_str()), cell.spec.period().name()));
        r.inner.scope = Some("organization");
        r.inner.headers = HeaderState::new(meter, meter as u8);
        return r.for_tenant(state);
    }
    let policy = format!("{}-{}", crate::base::policy_name(cell.meter_id().as_str()), cell.spec.period().name());
    let mut r = if cell.prepaid() {
        // An empty balance comes back with a payment, not with time: no Retry-After.
        Rejection::new(
            state.plan.balance_refusal,
            Cow::Owned(format!("the prepaid {} balance cannot cover this work: a top-up restores it", cell.meter_id())),
        )
    } else {
        let (_, end) = cell.period();
        Rejection::new(
            RejectionKind::QuotaExceeded,
            Cow::Owned(format!(
                "the {} quota of {} {} on plan `{}` cannot cover this work until the period ends",
                cell.spec.period().name(),
                cell.spec.limit(),
                cell.meter_id(),
                state.plan.id
            )),
        )
        .with_retry_after((end - at).max(1) as u64)
    };
    r.inner.policy = Some(policy);
    // The held meter's own policy (each meter alone is the shape of its index).
    r.inner.headers = HeaderState::new(meter, meter as u8);
    r.for_tenant(state)
}

/// A refusal at a tenant's organization's counters (`r`, of the hold beside the tenant's on
/// `meter`), answered as the tenant's: its tenant, and the headers of the tenant's own policy
/// of the meter, whose quota item shows nothing left when the organization's refused for
/// its quota (the tightest scope).
pub(crate) fn for_member(mut r: Rejection, tenant: &Tenant, meter: usize) -> Rejection {
    if r.inner.scope.is_none() {
        // Its organization's turn or holds (busy, full): named so.
        r.inner.scope = Some("organization");
        if let Some(org) = r.inner.state.as_ref().and_then(|s| s.plan.counts_for.clone()) {
            r.inner.detail = Cow::Owned(format!("organization `{org}`: {}", r.inner.detail));
        }
    }
    let mut headers = HeaderState::new(meter, meter as u8);
    if r.kind() == RejectionKind::QuotaExceeded && tenant.quota(meter).is_some() {
        headers.set_quota(0, r.inner.retry_after.unwrap_or(0));
    }
    r.inner.headers = headers;
    r.for_tenant(tenant)
}

/// A request that waited past `usage.queue_timeout` for its turn behind its tenant's other
/// calls on this node, on a quota that fails closed: 429
/// [`TenantBusy`](RejectionKind::TenantBusy), with `Retry-After: 1` (not counted here). The
/// store answered: not 503.
pub(crate) fn busy(state: &Tenant) -> Rejection {
    let r = Rejection::new(
        RejectionKind::TenantBusy,
        "the tenant's other requests kept its quota busy (queued past usage.queue_timeout, or its rows \
         written by other nodes until the call's deadline)",
    );
    r.with_retry_after(1).for_tenant(state)
}

fn unavailable(state: &Tenant) -> Rejection {
    let r = Rejection::new(RejectionKind::StoreUnavailable, "the quota store did not answer in time");
    state.plan.metrics.rejected(r.kind()).increment(1);
    r.with_retry_after(1).for_tenant(state)
}

/// The hold a route takes for a request before its handler runs (`[[routes]] hold`): shared
/// by the ticket and the request's [`TenantContext`](crate::TenantContext)s (whose records of the held meter go
/// through it). It settles when the last of them goes: the ticket has ended (billed or not)
/// and the work that could record through it (the handler, a body it streams) is done. A
/// response billed at its head (the first request with an `Idempotency-Key`) keeps its hold
/// while its body streams.
pub(crate) struct RouteHeld {
    pub(crate) spec: Arc<RouteHold>,
    meter: usize,
    /// The units the route held for the request (its estimate): what `settle = "estimate"`
    /// bills, whether or not the hold holds them (a plan without a hard quota on the meter, a
    /// hold failed open, one the node settled).
    estimate: u64,
    hold: Mutex<Option<Hold>>,
    /// What the response said the work used (`actual_header`).
    actual: Mutex<Actual>,
    /// How the ticket ended: [`NOT_ENDED`], [`BILLED`] or [`NOT_BILLED`].
    ended: AtomicU8,
    /// Whether the handler answered (the door read the response's head): a route whose
    /// `actual_header` was never said bills its estimate only then (the work was delivered,
    /// its size unknown); cut off before, it bills what was recorded.
    pub(crate) responded: AtomicBool,
}

const NOT_ENDED: u8 = 0;
const BILLED: u8 = 1;
const NOT_BILLED: u8 = 2;

/// What a response said of its work's units.
#[derive(Clone, Copy)]
enum Actual {
    /// Nothing (yet).
    Unsaid,
    /// This many.
    Said(u64),
    /// Something that does not parse.
    Unreadable,
}

impl RouteHeld {
    pub(crate) fn new(spec: Arc<RouteHold>, meter: usize, estimate: u64, hold: Hold) -> Self {
        Self {
            spec,
            meter,
            estimate,
            hold: Mutex::new(Some(hold)),
            actual: Mutex::new(Actual::Unsaid),
            ended: AtomicU8::new(NOT_ENDED),
            responded: AtomicBool::new(false),
        }
    }

    /// The meter it holds (a series, for a meter with dimensions).
    pub(crate) fn meter(&self) -> usize {
        self.meter
    }

    /// The value an open series' hold counts under (`None`: not an open series, or settled).
    pub(crate) fn value(&self) -> Option<Box<str>> {
        let hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        hold.as_ref().and_then(|h| h.inner.value.clone())
    }

    /// Records `units` of `meter` (under `value`, an open series') through the hold, if it
    /// holds that meter at that value and is open.
    pub(crate) fn record(&self, meter: usize, value: Option<&str>, units: u64) -> Option<Result<(), RecordError>> {
        if meter != self.meter {
            return None;
        }
        let mut hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        if hold.as_ref().is_some_and(|h| h.inner.value.as_deref() != value) {
            return None;
        }
        hold.as_mut().map(|h| h.record(units))
    }

    /// The response header (or trailer) that says the work's units, if the route names one.
    pub(crate) fn actual_header(&self) -> Option<&http::HeaderName> {
        self.spec.actual_header.as_ref()
    }

    /// Sets what the response's `actual_header` says (see [`Ticket::set_actual`]).
    pub(crate) fn set_actual(&self, value: &[u8]) {
        let parsed = std::str::from_utf8(value).ok().map(str::trim).and_then(|v| v.parse::<u64>().ok());
        if parsed.is_none() {
            tracing::warn!(meter = %self.spec.meter, header = ?self.spec.actual_header,
                "the response's actual usage does not parse: the hold's estimate is billed in full");
        }
        *self.actual.lock().unwrap_or_else(|e| e.into_inner()) = parsed.map_or(Actual::Unreadable, Actual::Said);
    }

    /// The ticket ended, `billed` or not: the hold settles so once the work is done.
    pub(crate) fn end(&self, billed: bool) {
        self.ended.store(if billed { BILLED } else { NOT_BILLED }, Ordering::Release);
    }

    /// Settles the hold. Billed: with what the route's `settle` bills beyond what was
    /// recorded: the estimate, or the actual the response said; a route that names
    /// `actual_header` whose response said none (once the handler answered), or nothing
    /// readable, bills the estimate in full: the work was done and its size is not known.
    /// Billed whether or not the hold holds the units (a tenant without a hard quota on the
    /// meter, a hold that failed open or that the node settled: then as debt). Not billed:
    /// what was not recorded goes back whole.
    fn settle(&self) {
        let Some(mut hold) = self.hold.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        if self.ended.load(Ordering::Acquire) != NOT_BILLED {
            let actual = *self.actual.lock().unwrap_or_else(|e| e.into_inner());
            let estimate = self.estimate.saturating_sub(hold.recorded());
            let more = match (self.spec.settle, actual) {
                (HoldSettle::Estimate, _) | (_, Actual::Unreadable) => estimate,
                (_, Actual::Said(actual)) => actual.saturating_sub(hold.recorded()),
                (_, Actual::Unsaid) if self.spec.actual_header.is_some() && self.responded.load(Ordering::Acquire) => {
                    estimate
                }
                (_, Actual::Unsaid) => 0,
            };
            if more > estimate {
                tracing::warn!(meter = %self.spec.meter, estimate = self.estimate, reported = more,
                    "a held route reported more than it held: charged past the hold, as debt (cap the work at the hold)");
            }
            if more > 0 {
                // The work was done: billed, beyond the hold as debt if need be.
                hold.record_done(more);
            }
        }
        hold.settle();
    }
}

impl Drop for RouteHeld {
    fn drop(&mut self) {
        self.settle();
    }
}
