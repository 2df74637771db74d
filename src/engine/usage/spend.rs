//! Spend: money, counted on the reserved meter `spend` in nano-units of the currency, that
//! every priced meter feeds at price × units. A hard spend cap is a hard quota on that meter:
//! it rides the same leases and holds as any quota.
//!
//! Rounding: a request's spend is ⌈Σ units × price⌉ over its route's cost and the records of
//! its work made without a hold (its [`SpendTab`]: each record charges what the rounded total
//! moves, so the request settles to the total rounded once); a hold's is ⌈its units × price⌉,
//! rounded when it settles (the same way, record by record); a record outside any request
//! (a job's context) is rounded per call.

use std::{
    borrow::Cow,
    sync::{Arc, Mutex},
};

use rust_decimal::Decimal;

use crate::{
    base::{amount_of, ceil_nanos, cost_nanos},
    engine::usage::taken::{Prefetcher, Taken},
    response::{Rejection, RejectionKind},
    tenant::{Take, Tenant},
};

/// What a request's route cost took of its tenant's spend at admission: given back as it
/// drops, unless it became its ticket's tab.
#[derive(Debug)]
pub(crate) struct RouteSpend {
    /// The cost's exact spend (nano-units, not rounded).
    pub(crate) exact: Decimal,
    /// Nano-units taken from the spend lease for it (⌈exact⌉; none for a route whose meter is
    /// not priced).
    pub(crate) taken: Taken,
    /// When (the request's time).
    pub(crate) at: i64,
}

impl RouteSpend {
    /// Nothing taken: a route whose meter is not priced (its tab only).
    pub(crate) fn nothing(at: i64) -> Self {
        Self { exact: Decimal::ZERO, taken: Taken::none(), at }
    }
}

/// A request's spend, shared by its ticket and its contexts: its route's cost, taken at
/// admission, and the records of its work made without a hold, charged as the rounded total
/// moves.
#[derive(Debug)]
pub(crate) struct SpendTab {
    inner: Mutex<Tab>,
}

#[derive(Debug)]
struct Tab {
    /// The request's spend so far, not rounded (nano-units).
    exact: Decimal,
    /// Nano-units charged so far: ⌈exact⌉ (taken from the spend lease).
    charged: u64,
    /// The route cost's exact spend.
    route_exact: Decimal,
    /// The nano-units taken for the route's cost, not yet recorded (recorded when the request
    /// is billed), and when.
    pending: Taken,
    at: i64,
}

impl SpendTab {
    pub(crate) fn new(route: RouteSpend) -> Arc<Self> {
        let RouteSpend { exact, taken, at } = route;
        let tab = Tab { exact, charged: taken.units(), route_exact: exact, pending: taken, at };
        Arc::new(Self { inner: Mutex::new(tab) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tab> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Work of `exact` nano-units done at `now` (a record without a hold): charged what the
    /// request's rounded total moves by.
    pub(crate) fn add(&self, state: &Tenant, exact: Decimal, now: i64, prefetcher: &Prefetcher) {
        let delta = {
            let mut t = self.lock();
            t.exact = t.exact.saturating_add(exact);
            let total = ceil_nanos(t.exact);
            let delta = total.saturating_sub(t.charged);
            t.charged = t.charged.max(total);
            delta
        };
        charge(state, delta, now, prefetcher);
    }

    /// The request is billed: its route's spend is recorded.
    pub(crate) fn bill(&self, state: &Tenant) {
        let (pending, at) = {
            let mut t = self.lock();
            (std::mem::take(&mut t.pending), t.at)
        };
        record(state, pending.units(), at);
        pending.keep();
    }

    /// The request is not billed: its route's spend goes back, less what the rounding of
    /// the work it recorded keeps (that part is recorded).
    pub(crate) fn refund(&self, state: &Tenant) {
        let (give, keep, at) = {
            let mut t = self.lock();
            let mut pending = std::mem::take(&mut t.pending);
            t.exact = (t.exact - t.route_exact).max(Decimal::ZERO);
            let total = ceil_nanos(t.exact);
            let give = t.charged.saturating_sub(total).min(pending.units());
            t.charged -= give;
            t.route_exact = Decimal::ZERO;
            (pending.split(give), pending, t.at)
        };
        drop(give);
        record(state, keep.units(), at);
        keep.keep();
    }
}

/// Records `nanos` of spend already taken from the spend lease.
fn record(state: &Tenant, nanos: u64, at: i64) {
    let Some(spend) = state.plan.spend else { return };
    if nanos > 0 {
        state.record(spend, at, nanos);
        state.plan.metrics.spend_nanos.increment(nanos);
    }
}

/// Charges `nanos` of spend for work done at `now`: taken from the spend lease (past a hard
/// cap if need be, as debt: counted in `tollgate_spend_past_cap_nanos_total`) and recorded.
pub(crate) fn charge(state: &Tenant, nanos: u64, now: i64, prefetcher: &Prefetcher) {
    let Some(spend) = state.plan.spend else { return };
    if nanos == 0 {
        return;
    }
    if let Some(cell) = state.quota(spend) {
        if cell.hard() && matches!(cell.check_units(nanos, now), Err(Take::Exhausted)) {
            state.plan.metrics.spend_past_cap_nanos.increment(nanos);
        }
        cell.force_take(nanos, now);
        prefetcher.when_low(state, spend, cell);
    }
    record(state, nanos, now);
}

/// The spend of `units` of `meter` recorded outside a request (a context of its own), rounded
/// per call: charged at once.
pub(crate) fn charge_units(state: &Tenant, meter: usize, units: u64, now: i64, prefetcher: &Prefetcher) {
    if let Some(price) = state.plan.spend.and_then(|_| state.plan.price(meter)) {
        charge(state, ceil_nanos(cost_nanos(units, price)), now, prefetcher);
    }
}

/// The exact spend of `units` of `meter` (nano-units, not rounded), if the plan counts spend
/// and prices the meter.
pub(crate) fn cost_of(state: &Tenant, meter: usize, units: u64) -> Option<Decimal> {
    state.plan.spend.and_then(|_| state.plan.price(meter)).map(|p| cost_nanos(units, p))
}

/// The refusal of work the tenant's hard spend cap cannot cover in the period holding `at`:
/// 402, with `Retry-After` at the period's end (a cap belongs to a calendar period).
#[cold]
pub(crate) fn cap_reached(state: &Tenant, at: i64) -> Rejection {
    let spend = state.plan.spend.expect("a spend refusal is of a plan with a spend cap");
    let cell = state.quota(spend).expect("a spend cap is a quota on the spend meter");
    let (_, end) = cell.window(at);
    let period = cell.spec.period().name();
    let whose = if cell.own_cap_in_force().is_some() { "the tenant's" } else { "the plan's" };
    let mut r = Rejection::new(
        RejectionKind::SpendCapReached,
        Cow::Owned(format!(
            "{whose} {period} spend cap of {} cannot cover this work until the period ends",
            amount_of(cell.limit())
        )),
    );
    r.inner.policy = Some(format!("spend-{period}"));
    // The spend meter's own policy (each meter alone is the shape of its index).
    r.inner.headers = crate::response::HeaderState::new(spend, spend as u8);
    // What remains of the cap for cheaper work (in the headers' unit), not 0.
    let (remaining, _) = cell.estimate(cell.lease());
    r.inner.headers.set_quota(cell.spec.in_header(remaining), (end - at).max(0) as u64);
    r.with_retry_after((end - at).max(1) as u64).for_tenant(state)
}
