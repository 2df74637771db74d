//! Holds: units of a hard quota or a prepaid balance set aside while a request's work runs,
//! recorded as the work reports them, the rest given back when the hold settles. A hold comes
//! out of the node's lease as a request's cost does (so the fleet's limit holds it), and waits
//! on the store only when the lease is short.

use std::{
    borrow::Cow,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use crate::engine::{
    admit::admission::NO_TAG,
    shared::Shared,
    usage::{held::Refused, lease::LEASE_PER_HOLD},
    Prefetch,
};
use crate::response::HeaderState;
use crate::{
    config::{Overrun, StoreErrorPolicy},
    metrics::HoldOutcome,
    response::{Rejection, RejectionKind},
    tenant::{QuotaRef, Take, Tenant},
    usage::{RecordError, TenantContext},
};

impl TenantContext {
    /// Holds `units` of `meter` for this request's work, before it runs: a hard quota's or a
    /// prepaid balance's units are taken now (from the node's lease, else from the store),
    /// recorded as the work reports them ([`Hold::record`]), and what is not recorded is given
    /// back when the hold settles or drops. Records beyond the hold are charged as debt
    /// ([`Overrun::Debt`]); [`hold_with`](Self::hold_with) picks [`Overrun::Refuse`].
    ///
    /// ```no_run
    /// # async fn generate(ctx: tollgate::TenantContext, max_tokens: u64) -> Result<String, tollgate::Rejection> {
    /// use tollgate::Overrun;
    /// let mut hold = ctx.hold_with("tokens", max_tokens, Overrun::Refuse).await?;
    /// let mut out = String::new();
    /// for chunk in ["Hello", ", ", "world"] {
    ///     // Each chunk is billed before it is sent; past the hold, more is asked for.
    ///     if hold.record(1).is_err() {
    ///         hold.extend(64).await?;
    ///         hold.record(1).expect("just extended");
    ///     }
    ///     out.push_str(chunk);
    /// }
    /// hold.settle(); // what was held and not used goes back
    /// # Ok(out) }
    /// ```
    ///
    /// # Errors
    /// The rejection to answer with (put it in the response as it is, so the front door gives
    /// the request's units back): 429 when the quota's period cannot cover `units` (402 for a
    /// balance; a hold past the limit is refused before anything is taken), 503 when the store
    /// does not answer and the quota fails closed (failing open, the hold holds nothing). In
    /// shadow mode the refusal is counted and the units taken past the limit (a hold past the
    /// limit takes nothing).
    pub async fn hold(&self, meter: &str, units: u64) -> Result<Hold, Rejection> {
        self.hold_with(meter, units, Overrun::Debt).await
    }

    /// [`hold`](Self::hold), with what a record beyond the hold does.
    ///
    /// # Errors
    /// As [`hold`](Self::hold).
    pub async fn hold_with(&self, meter: &str, units: u64, overrun: Overrun) -> Result<Hold, Rejection> {
        let state = self.state().clone();
        let index = state.plan.meters.index(meter).ok_or_else(|| meter.into());
        let mut hold = Hold::new(state, index, self.is_charged(), overrun, None);
        hold.extend(units).await?;
        Ok(hold)
    }
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
    /// The engine (its open holds, its store calls), while it runs.
    engine: Option<Arc<Shared>>,
    /// On a plan with a spend cap, a hold on a priced meter holds its estimated cost too: a
    /// hold of the spend meter beside it.
    spend: Option<Box<SpendSide>>,
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

/// What a hold shares with the node's open holds ([`OpenHolds`]), which settle it past its
/// deadline or at shutdown.
pub(crate) struct HoldInner {
    pub(crate) id: u64,
    state: Tenant,
    /// The meter's index (else its name: not declared, its records fail).
    meter: Result<usize, Box<str>>,
    /// `false` for a replay: nothing is held or recorded.
    charged: bool,
    overrun: Overrun,
    /// How long it may stay open, in seconds.
    timeout: i64,
    /// When it is settled if still open (Unix seconds), read by the node's expiry pass without
    /// the lock below (the pass holds the open holds' lock, which a settle takes after this
    /// one: never the other way round).
    deadline: AtomicI64,
    open: Mutex<Open>,
}

/// A hold's units and what became of them.
struct Open {
    /// Whether units are held from a quota (a hard quota or a balance).
    live: bool,
    /// Whether it is among the node's open holds.
    registered: bool,
    /// The tag of the period the held units came from ([`NO_TAG`]: none).
    tag: u32,
    /// When they were taken (Unix seconds).
    at: i64,
    held: u64,
    recorded: u64,
    /// Whether the store did not answer and the quota failed open: nothing is held, and
    /// records are charged as [`TenantContext::record`] charges them.
    failed_open: bool,
    /// Settled by the node rather than by its owner.
    closed: Option<Closed>,
}

/// Why the node settled a hold its owner had not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// Open past its `hold_timeout`.
    Expired,
    /// The engine shut down.
    Shutdown,
}

/// How a record through a hold is covered, decided (and its units beyond the hold taken from
/// the lease) before anything is recorded, so that a record refused by its spend takes
/// nothing.
struct Step {
    /// Units held from a quota (else recorded as `TenantContext::record` records them).
    held: bool,
    covered: u64,
    beyond: u64,
    /// The tag of the lease the units beyond came from (`None`: taken past the limit, at
    /// commit).
    taken: Option<u16>,
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
        let Some(cell) = self.cell().filter(|_| !open.failed_open && open.closed.is_none()) else {
            return Ok(Step { held: false, covered: 0, beyond: units, taken: None });
        };
        let covered = units.min(open.held);
        let beyond = units - covered;
        let mut taken = None;
        if beyond > 0 {
            match cell.try_take(beyond, now) {
                Take::Taken { tag, .. } => taken = Some(tag),
                _ if overrun == Overrun::Refuse => {
                    if !state.plan.shadow {
                        return Err(beyond);
                    }
                    // Shadow mode: counted, and recorded past the limit.
                    let kind = if cell.prepaid() {
                        state.plan.balance_refusal
                    } else if state.plan.spend == self.meter.as_ref().ok().copied() {
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

    /// Gives back what [`prepare`](Self::prepare) took: the record was refused.
    fn undo(&self, step: &Step) {
        if let (Some(tag), Some(cell)) = (step.taken, self.cell()) {
            cell.refund(step.beyond, tag);
        }
    }

    /// Records `units` as `step` covers them.
    fn commit(&self, open: &mut Open, step: &Step, units: u64, now: i64, engine: Option<&Arc<Shared>>) {
        let state = &self.state;
        let Ok(meter) = self.meter else { return };
        let spend = state.plan.spend == Some(meter);
        match self.cell().filter(|_| step.held) {
            Some(cell) => {
                if step.beyond > 0 && step.taken.is_none() {
                    if spend {
                        state.plan.metrics.spend_past_cap_nanos.increment(step.beyond);
                    }
                    cell.force_take(step.beyond, now);
                }
                // Held units belong to the period they were taken in: after its end, they are
                // recorded in its last second, as its counter charged them.
                let (_, end) = cell.window(open.at);
                let at = if now >= end && !cell.prepaid() { end - 1 } else { now };
                if step.covered > 0 {
                    open.held -= step.covered;
                    cell.count_held(step.covered, false);
                    state.record(meter, at, step.covered);
                }
                if step.beyond > 0 {
                    // Recorded beyond the hold (from the lease, or past the limit): counted.
                    state.plan.metrics.hold(HoldOutcome::Overrun).increment(1);
                    if let Some(engine) = engine {
                        engine.holds().overruns.fetch_add(1, Ordering::Relaxed);
                    }
                    state.record(meter, now, step.beyond);
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
                        crate::engine::usage::spend::refill_when_low(state, meter, cell);
                    }
                }
                state.record(meter, now, units);
            }
        }
        if spend {
            state.plan.metrics.spend_nanos.increment(units);
        } else {
            state.plan.metrics.usage_units.increment(units);
        }
        open.recorded += units;
    }

    /// Units held and not recorded yet.
    pub(crate) fn held(&self) -> u64 {
        self.lock().held
    }

    /// When it is settled if still open.
    pub(crate) fn deadline(&self) -> i64 {
        self.deadline.load(Ordering::Relaxed)
    }

    /// Settles it as recorded so far, for `why`: whether it held units.
    pub(crate) fn close(&self, why: Closed) -> bool {
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
        let held = std::mem::take(&mut open.held);
        if let Ok(meter) = self.meter {
            give_back(&self.state, meter, held, open.tag, open.at, None);
        }
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
    ) -> Self {
        let at = state.clock.unix_secs();
        let engine = engine(&state);
        let timeout = timeout
            .or_else(|| engine.as_ref().map(|e| e.runtime().load().config.limits.hold_timeout))
            .map_or(i64::MAX, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX));
        let id = engine.as_ref().map_or(0, |e| e.holds().next_id());
        let open = Open {
            live: false,
            registered: false,
            tag: NO_TAG,
            at,
            held: 0,
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
        let spend = priced.map(|(s, price)| {
            let hold = Hold::new(
                state.clone(),
                Ok(s),
                charged,
                overrun,
                Some(std::time::Duration::from_secs(u64::try_from(timeout).unwrap_or(u64::MAX))),
            );
            Box::new(SpendSide { hold, price, extended: 0, recorded: 0 })
        });
        let inner = HoldInner { id, state, meter, charged, overrun, timeout, deadline, open: Mutex::new(open) };
        Self { inner: Arc::new(inner), engine, spend }
    }

    /// Units held and not recorded yet.
    #[must_use]
    pub fn held(&self) -> u64 {
        self.inner.lock().held
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
        let now = inner.state.clock.unix_secs();
        let mut open = inner.lock();
        if open.closed.is_some() {
            if let Some(engine) = &self.engine {
                engine.holds().records_after_settle.fetch_add(1, Ordering::Relaxed);
            }
        }
        let step = inner.prepare(&open, units, overrun, now).map_err(RecordError::Overrun)?;
        if let Some(side) = self.spend.as_deref_mut() {
            // Its spend first: refused, the units taken for the record go back.
            let nanos = side.nanos(side.recorded.saturating_add(units)) - side.nanos(side.recorded);
            if let Err(e) = side.hold.record_nanos(nanos, overrun, now) {
                inner.undo(&step);
                return Err(e);
            }
            side.recorded = side.recorded.saturating_add(units);
        }
        inner.commit(&mut open, &step, units, now, self.engine.as_ref());
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
        inner.commit(&mut open, &step, nanos, now, self.engine.as_ref());
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
        if let Some(side) = self.spend.as_deref_mut() {
            // Its estimated cost first (a refusal holds no units); kept if its units are
            // refused after (given back as the hold settles).
            let nanos = side.nanos(side.extended.saturating_add(units)) - side.nanos(side.extended);
            Box::pin(side.hold.extend(nanos)).await?;
            side.extended = side.extended.saturating_add(units);
        }
        if self.cell().is_none() {
            return Ok(());
        }
        let Ok(meter) = self.inner.meter else { return Ok(()) };
        let state = &self.inner.state;
        {
            let mut open = self.inner.lock();
            if let Some(why) = open.closed {
                return Err(closed(state, why));
            }
            if !open.live && !open.registered {
                if let Some(engine) = &self.engine {
                    let max = engine.runtime().load().config.limits.max_holds;
                    let deadline = state.clock.unix_secs().saturating_add(self.inner.timeout);
                    self.inner.deadline.store(deadline, Ordering::Relaxed);
                    match engine.holds().enter(&self.inner, max) {
                        Ok(()) => {}
                        // Shutdown began: its units would be leased after the leases went
                        // back (stranded), its records made after the final flush (lost).
                        Err(Refused::Stopping) => return Err(closed(state, Closed::Shutdown)),
                        Err(Refused::Full) => {
                            drop(open);
                            engine.holds().refused_full.fetch_add(1, Ordering::Relaxed);
                            state.plan.metrics.hold(HoldOutcome::RefusedFull).increment(1);
                            state.plan.metrics.rejected(RejectionKind::UnitsHeld).increment(1);
                            return Err(full(state, max));
                        }
                    }
                    open.registered = true;
                }
            }
        }
        // `None`: the store did not answer and the quota fails open: nothing is held, and
        // what is recorded is charged as `record` charges it.
        // What this hold holds already is not "held by others" to its own extension.
        let own = self.inner.held();
        let taken = take(state, meter, units, own).await;
        let mut open = self.inner.lock();
        let taken = match taken {
            Ok(Some(taken)) => taken,
            other => {
                if !open.live && open.registered {
                    open.registered = false;
                    if let Some(engine) = &self.engine {
                        engine.holds().leave(self.inner.id);
                    }
                }
                if matches!(other, Ok(None)) {
                    open.failed_open = true;
                }
                return other.map(drop);
            }
        };
        let (tag, at) = taken;
        if let Some(why) = open.closed {
            // Settled by the node while this waited on the store: the units go back (counted
            // held first: a give-back counts them no longer held).
            if let Some(cell) = state.quota(meter) {
                cell.count_held(units, true);
            }
            give_back(state, meter, units, tag, at, self.engine.as_ref());
            return Err(closed(state, why));
        }
        let outcome = if open.live { HoldOutcome::Extended } else { HoldOutcome::Taken };
        state.plan.metrics.hold(outcome).increment(1);
        if let Some(cell) = state.quota(meter) {
            cell.count_held(units, true);
        }
        if open.live && tag != open.tag && open.held > 0 {
            // The period rolled since: what is left of the old one goes back to it.
            let old = std::mem::take(&mut open.held);
            give_back(state, meter, old, open.tag, open.at, self.engine.as_ref());
        }
        open.live = true;
        // The store answers again: records come out of the hold from now on.
        open.failed_open = false;
        open.tag = tag;
        open.at = at;
        open.held = open.held.saturating_add(units);
        Ok(())
    }

    /// Gives back what is held and not recorded: the work is done.
    pub fn settle(mut self) {
        self.release();
    }

    fn release(&mut self) {
        let mut open = self.inner.lock();
        if open.registered {
            open.registered = false;
            if let Some(engine) = &self.engine {
                engine.holds().leave(self.inner.id);
            }
        }
        if !open.live {
            return;
        }
        open.live = false;
        let state = &self.inner.state;
        state.plan.metrics.hold(HoldOutcome::Settled).increment(1);
        let held = std::mem::take(&mut open.held);
        if held == 0 {
            return;
        }
        if let Ok(meter) = self.inner.meter {
            give_back(state, meter, held, open.tag, open.at, self.engine.as_ref());
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
            .field("held", &open.held)
            .field("recorded", &open.recorded)
            .field("overrun", &self.inner.overrun)
            .finish_non_exhaustive()
    }
}

/// Gives `units` held from the period tagged `tag` (taken at `at`) back: to its lease, after
/// that period's roll to its counter in the store, and after the lease was given back
/// (eviction, reload, shutdown) to the store at once, as a late release.
fn give_back(state: &Tenant, meter: usize, units: u64, tag: u32, at: i64, engine_: Option<&Arc<Shared>>) {
    let Some(cell) = state.quota(meter) else { return };
    cell.count_held(units, false);
    if units == 0 {
        return;
    }
    state.plan.metrics.hold_returned_units.increment(units);
    if let Ok(tag) = u16::try_from(tag) {
        return_units(state, meter, units, tag, at, engine_.cloned());
    }
}

/// Gives `units` taken from the lease of the period tagged `tag` (at `at`) back, as
/// [`give_back`] does, without counting them: a hold's, or a job's reservation's.
pub(crate) fn return_units(state: &Tenant, meter: usize, units: u64, tag: u16, at: i64, engine_: Option<Arc<Shared>>) {
    let Some(cell) = state.quota(meter) else { return };
    let late = {
        // The lock the lease's return marks it under: the units reach the lease before it is
        // emptied, or go to the store.
        let locked = cell.locked();
        if !locked.returned {
            cell.refund(units, tag);
        }
        locked.returned
    };
    if late {
        release_late(state, meter, units, at, engine_.or_else(|| engine(state)));
    }
}

/// Sends `units` of a hold whose lease was given back to the store, in the background.
fn release_late(state: &Tenant, meter: usize, units: u64, at: i64, engine: Option<Arc<Shared>>) {
    let (Some(engine), Ok(runtime)) = (engine, tokio::runtime::Handle::try_current()) else {
        tracing::warn!(tenant = %state.id, units, "a hold settled after its lease was given back, with no engine running: its units stay reserved until the period ends");
        return;
    };
    let state = state.clone();
    runtime.spawn(async move {
        let Some(cell) = state.quota(meter) else { return };
        let (start, end) = cell.window(at);
        if let Err(e) = engine.leases().release_late(cell, start, end, units).await {
            tracing::warn!(tenant = %state.id, units, error = %e, "a hold's units could not be given back to the store: they stay reserved until the period ends");
        }
    });
}

/// The engine the tenant's plan was compiled for, if it still runs.
fn engine(state: &Tenant) -> Option<Arc<Shared>> {
    state.plan.host.get()?.upgrade()?.downcast::<Shared>().ok()
}

/// Takes `units` of the tenant's hard quota or balance on `meter` for a hold: from the lease,
/// else with the cell's lock held from a refill (the units straight from its reservation), as
/// a request that waits takes its cost. Returns the tag of the period they came from, and
/// when; `None` when the store did not answer and the quota fails open (nothing held).
async fn take(state: &Tenant, meter: usize, units: u64, own: u64) -> Result<Option<(u32, i64)>, Rejection> {
    let cell = state.quota(meter).expect("a hold takes from a quota");
    let at = state.clock.unix_secs();
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
    match cell.try_take(units, at) {
        Take::Taken { tag, left } => {
            if cell.wants_prefetch(left) {
                prefetch(state, meter);
            }
            return Ok(Some((u32::from(tag), at)));
        }
        Take::Exhausted => return refused(state, meter, units, own, at, true),
        Take::NeedLease => {}
    }
    let Some(shared) = engine(state) else {
        // The engine is gone (shut down and dropped): nothing can be asked of the store.
        return failed(state, meter);
    };
    let rt = shared.runtime().load_full();
    let outcome = shared
        .stores()
        .under_lock(cell.lock(), async {
            // A call left in flight by a timeout may have landed: its units come first.
            shared.leases().settle_inflight(cell).await?;
            Ok(match shared.leases().take_locked(&rt, cell, at, units, units.saturating_mul(LEASE_PER_HOLD)).await? {
                Some(t) => Ok((u32::from(t.tag), t.start.map_or(at, |start| at.max(start)))),
                None => Err(()),
            })
        })
        .await;
    match outcome {
        Ok(Ok(taken)) => Ok(Some(taken)),
        Ok(Err(())) => refused(state, meter, units, own, at, true),
        Err(_) => failed(state, meter),
    }
}

/// The store did not answer: the quota's policy decides. Failing open, nothing is held.
fn failed(state: &Tenant, meter: usize) -> Result<Option<(u32, i64)>, Rejection> {
    match state.plan.quota_policy(meter) {
        StoreErrorPolicy::FailOpen => Ok(None),
        StoreErrorPolicy::FailClosed => Err(unavailable(state)),
    }
}

/// Asks the worker to refill the lease ahead of need, as a request that took from it does.
pub(crate) fn prefetch(state: &Tenant, meter: usize) {
    let sent = engine(state)
        .is_some_and(|shared| shared.prefetch().try_send(Prefetch { state: state.clone(), meter }).is_ok());
    if !sent {
        if let Some(cell) = state.quota(meter) {
            cell.prefetch_done();
        }
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
) -> Result<Option<(u32, i64)>, Rejection> {
    let (r, outcome) = match units_held(state, meter, units, own, at).filter(|_| fits) {
        Some(r) => (r, HoldOutcome::RefusedHeld),
        None => (spent(state, meter, at, fits), HoldOutcome::RefusedSpent),
    };
    state.plan.metrics.hold(outcome).increment(1);
    if state.plan.shadow {
        state.plan.metrics.would_refuse(r.kind()).increment(1);
        tracing::debug!(tenant = %state.id, "shadow mode: would refuse a hold ({r})");
        let cell = state.quota(meter).expect("a hold takes from a quota");
        // Taken past the limit from this period's lease; owed outside a lease, nothing is held.
        return Ok(fits.then(|| cell.force_take(units, at)).flatten().map(|tag| (u32::from(tag), at)));
    }
    state.plan.metrics.rejected(r.kind()).increment(1);
    Err(r)
}

/// The answer to a hold of `units` that this node's other open holds (requests' and jobs',
/// not the asking hold's `own` units) keep from fitting (`None`: what they do not hold cannot
/// cover it either). Holds of other nodes are not known here: their units count as spent, as
/// the rest of their leases do.
fn units_held(state: &Tenant, meter: usize, units: u64, own: u64, at: i64) -> Option<Rejection> {
    let cell = state.quota(meter)?;
    let held = cell.held().saturating_sub(own);
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
    r.inner.headers.set_quota(free, if cell.prepaid() { 0 } else { (end - at).max(0) as u64 });
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
fn spent(state: &Tenant, meter: usize, at: i64, fits: bool) -> Rejection {
    if state.plan.spend == Some(meter) {
        // A priced meter's cost, held beside its units: the spend cap refuses (402).
        let mut r = crate::engine::usage::spend::cap_reached(state, at);
        if !fits {
            r.inner.retry_after = None;
            r.inner.detail = Cow::Borrowed("this work costs more than the whole spend cap: no period can cover it");
        }
        return r;
    }
    let cell = state.quota(meter).expect("a hold takes from a quota");
    let policy = format!("{}-{}", cell.meter_id(), cell.spec.period().name());
    let mut r = if cell.prepaid() {
        // An empty balance comes back with a payment, not with time: no Retry-After.
        Rejection::new(
            state.plan.balance_refusal,
            Cow::Owned(format!("the prepaid {} balance cannot cover this work: a top-up restores it", cell.meter_id())),
        )
    } else if !fits {
        Rejection::new(
            RejectionKind::QuotaExceeded,
            Cow::Owned(format!(
                "the {} quota of {} {} on plan `{}` can never cover this work: it is larger than the limit",
                cell.spec.period().name(),
                cell.spec.limit(),
                cell.meter_id(),
                state.plan.id
            )),
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

fn unavailable(state: &Tenant) -> Rejection {
    let r = Rejection::new(RejectionKind::StoreUnavailable, "the quota store did not answer in time");
    state.plan.metrics.rejected(r.kind()).increment(1);
    r.with_retry_after(1).for_tenant(state)
}
