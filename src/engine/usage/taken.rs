//! Units taken from a tenant's quota cell, as a type: a [`Taken`] says where they came from
//! (the lease of a period, or owed outside any lease) and when, and gives them back when it is
//! dropped unless it was kept (tokio's `SemaphorePermit` shape, as `RateCharge` is for rate
//! cells). Beside it, what brings units back to a node: the [`Prefetcher`] that asks the worker
//! to refill a lease ahead of need, and the late release of units whose lease was given back.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::engine::usage::lease::Leases;
use crate::tenant::{QuotaRef, Tenant};

/// Where units taken from a quota cell came from. A holder that keeps its tenant itself (a
/// ticket) keeps only this, and makes its [`Taken`] when the units go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The lease of the period with this tag.
    Lease(u16),
    /// Outside any lease (admitted while the store failed, shadow mode past the limit, work
    /// recorded past the lease): owed to the store by the cell's next call.
    Unleased,
}

impl Source {
    /// Where units taken past what the lease holds went ([`QuotaRef::force_take`]'s answer:
    /// the lease tagged, or none).
    #[inline]
    pub(crate) fn forced(tag: Option<u16>) -> Self {
        tag.map_or(Self::Unleased, Self::Lease)
    }
}

/// Units of one tenant's quota cell (a meter's quota, a prepaid balance, a spend cap) taken
/// for a request, a hold, a job's event or a request's spend, and not billed yet. Dropped, they
/// go back where they came from, lock-free: to the lease of their period (after that period's
/// roll, to its counter, by the cell's next store call; after the lease's return, they wait in
/// it for the state's last return), or off what is owed outside a lease.
/// [`keep`](Self::keep) makes them spent for good (billed). A hold's or a job's reservation,
/// which may outlive its lease by long, goes back through [`give_back`](Self::give_back): to
/// the store at once when its lease was given back meanwhile (an eviction, a reload).
#[must_use = "units taken go back when this is dropped: keep them once they are billed"]
pub(crate) struct Taken {
    /// The tenant and the meter they came from; `None`: nothing taken.
    cell: Option<(Tenant, usize)>,
    units: u64,
    source: Source,
    /// When they were taken (Unix seconds): what is owed outside a lease is owed to the period
    /// holding it.
    at: i64,
}

/// What a request of a tenant in an organization holds of the organization: the state its
/// counters are kept under, and the units of its route's cost taken there (none when the
/// organization does not limit the route's meter, or for a replay). Dropped, the units go back
/// to the organization's lease, as the tenant's own do to the tenant's.
pub(crate) struct OrgTaken {
    pub(crate) state: Tenant,
    pub(crate) taken: Taken,
}

impl Taken {
    /// Nothing taken (a meter without a quota, a replay, an empty route cost).
    #[inline]
    pub(crate) const fn none() -> Self {
        Self { cell: None, units: 0, source: Source::Unleased, at: 0 }
    }

    /// `units` of `meter` taken at `at` from `source`.
    #[inline]
    pub(crate) fn new(state: &Tenant, meter: usize, units: u64, source: Source, at: i64) -> Self {
        if units == 0 {
            return Self::none();
        }
        Self { cell: Some((state.clone(), meter)), units, source, at }
    }

    /// `units` of `meter` taken at `at` from the lease tagged `tag`.
    #[inline]
    pub(crate) fn lease(state: &Tenant, meter: usize, units: u64, tag: u16, at: i64) -> Self {
        Self::new(state, meter, units, Source::Lease(tag), at)
    }

    /// Takes `units` of `meter` at `at` past the limit if need be ([`QuotaRef::force_take`]):
    /// usage that already happened, or a request admitted without a lease.
    pub(crate) fn force(state: &Tenant, meter: usize, units: u64, at: i64) -> Self {
        match state.quota(meter) {
            Some(cell) if units > 0 => Self::new(state, meter, units, Source::forced(cell.force_take(units, at)), at),
            _ => Self::none(),
        }
    }

    /// The units it holds.
    #[inline]
    pub(crate) fn units(&self) -> u64 {
        self.units
    }

    /// When they were taken.
    #[inline]
    pub(crate) fn at(&self) -> i64 {
        self.at
    }

    /// Where they came from (`None`: nothing taken).
    #[inline]
    pub(crate) fn source(&self) -> Option<Source> {
        self.cell.as_ref().map(|_| self.source)
    }

    /// The tag of the period whose lease the units came from (`None`: outside any lease).
    pub(crate) fn tag(&self) -> Option<u16> {
        match self.source {
            Source::Lease(tag) => Some(tag),
            Source::Unleased => None,
        }
    }

    /// The units are spent for good: billed, or usage recorded.
    #[inline]
    pub(crate) fn keep(mut self) {
        self.cell = None;
    }

    /// Where the units came from, handed to a holder that keeps their tenant itself (a
    /// ticket): it gives them back through a [`Taken`] of its own.
    #[inline]
    pub(crate) fn into_source(mut self) -> Option<Source> {
        self.cell.take().map(|_| self.source)
    }

    /// `units` of them are spent for good (recorded through a hold); the rest still go back.
    pub(crate) fn keep_part(&mut self, units: u64) {
        self.units = self.units.saturating_sub(units);
        if self.units == 0 {
            self.cell = None;
        }
    }

    /// Adds `more`, taken from the same source, to these units (a hold extended); units of
    /// another source (the period rolled since) replace them, and the old ones are returned to
    /// go back.
    pub(crate) fn add(&mut self, more: Taken) -> Option<Taken> {
        more.cell.as_ref()?;
        if self.cell.is_none() {
            *self = more;
            return None;
        }
        if self.source == more.source {
            self.units = self.units.saturating_add(more.units);
            self.at = more.at;
            more.keep();
            return None;
        }
        Some(std::mem::replace(self, more))
    }

    /// Splits `units` off into a guard of their own (the part of a request's spend that goes
    /// back while the rest is recorded).
    pub(crate) fn split(&mut self, units: u64) -> Taken {
        let units = units.min(self.units);
        let Some((state, meter)) = &self.cell else { return Self::none() };
        let part = Self::new(state, *meter, units, self.source, self.at);
        self.keep_part(units);
        part
    }

    /// The cell they came from, with its tenant.
    fn cell(&self) -> Option<(&Tenant, QuotaRef<'_>)> {
        let (state, meter) = self.cell.as_ref()?;
        Some((state, state.quota(*meter)?))
    }

    /// Gives the units back to where they came from, here: their lease, or off what is owed
    /// outside a lease.
    fn restore(&mut self) {
        if let Some((_, cell)) = self.cell() {
            match self.source {
                Source::Lease(tag) => cell.refund(self.units, tag),
                Source::Unleased => cell.refund_unleased(self.units, self.at),
            }
        }
        self.cell = None;
    }

    /// Gives the units back, to the store at once (in the background, through `leases`) when
    /// their lease was given back meanwhile (a hold or a reservation may outlive its lease by
    /// long). Under the lock a lease's return marks it with, so they reach the lease before
    /// it is emptied, or the store after.
    pub(crate) fn give_back(self, leases: &Arc<Leases>, prefetcher: &Prefetcher) {
        drop(self.give_back_counted(leases, prefetcher, false));
    }

    /// [`give_back`](Self::give_back), answering the release it sent to the store when their
    /// lease was given back meanwhile (a reload, an eviction): the task answers `false` when
    /// the store could not take them (they stay counted used there until the period ends,
    /// logged). For units the store counts used (a duplicate event's): back in a lease already
    /// given back, no call would tell it, and a node killed before the state's last return
    /// would leave them spent. The release runs in the background, so that a caller gone
    /// meanwhile does not cut it.
    pub(crate) fn give_back_started(
        self,
        leases: &Arc<Leases>,
        prefetcher: &Prefetcher,
    ) -> Option<tokio::task::JoinHandle<bool>> {
        self.give_back_counted(leases, prefetcher, false)
    }

    /// [`give_back`](Self::give_back) of units a hold held: counted no longer held in the
    /// same step as they reach the lease (under the cell's mutex, which every call reads what
    /// the node keeps under), so that a call made meanwhile never finds them in neither.
    pub(crate) fn give_back_held(self, leases: &Arc<Leases>, prefetcher: &Prefetcher) {
        drop(self.give_back_counted(leases, prefetcher, true));
    }

    /// Gives the units back; the release sent to the store for units whose lease was given
    /// back, when one is (it runs whether or not it is awaited).
    fn give_back_counted(
        mut self,
        leases: &Arc<Leases>,
        prefetcher: &Prefetcher,
        held: bool,
    ) -> Option<tokio::task::JoinHandle<bool>> {
        if held && !matches!(self.source, Source::Lease(_)) {
            if let Some((_, cell)) = self.cell() {
                cell.count_held(self.units, false, self.tag());
            }
        }
        let (late, tag) = match (self.source, self.cell()) {
            (Source::Lease(tag), Some((state, cell))) => {
                let mut locked = cell.locked();
                // Given back to a lease that went back, they stay held until the release that
                // gives them to the store says so (`release_late`).
                if held && !locked.returned {
                    cell.uncount_held(&mut locked, self.units, Some(tag));
                }
                if !locked.returned {
                    cell.refund(self.units, tag);
                    // Past the lease's cap, they go back to the store for the other nodes,
                    // asked of the worker at once.
                    if cell.trim(tag) > 0 {
                        prefetcher.tend(state, self.cell.as_ref().map_or(0, |(_, m)| *m));
                    }
                }
                (locked.returned, tag)
            }
            _ => {
                self.restore();
                return None;
            }
        };
        let (state, meter) = self.cell.take()?;
        if late {
            return release_late(state, meter, self.units, (tag, held), self.at, leases.clone());
        }
        None
    }
}

impl Default for Taken {
    fn default() -> Self {
        Self::none()
    }
}

impl Drop for Taken {
    #[inline]
    fn drop(&mut self) {
        if self.cell.is_some() {
            self.restore();
        }
    }
}

impl std::fmt::Debug for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Taken")
            .field("units", &self.units)
            .field("source", &self.source())
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

/// Sends `units` taken at `at` from a lease that was given back to the store, in the
/// background: the task answers whether the store took them (`None`: no runtime to send them
/// with).
fn release_late(
    state: Tenant,
    meter: usize,
    units: u64,
    (tag, held): (u16, bool),
    at: i64,
    leases: Arc<Leases>,
) -> Option<tokio::task::JoinHandle<bool>> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // No runtime to send them with: they go to the lease, as a request's do (a lease
        // taken again carries them; else they stay reserved in the store until the period
        // ends).
        tracing::debug!(tenant = %state.id, units, "units given back after their lease was, with no runtime: left in the lease");
        if let Some(cell) = state.quota(meter) {
            let mut locked = cell.locked();
            if held {
                cell.uncount_held(&mut locked, units, Some(tag));
            }
            cell.refund(units, tag);
        }
        return None;
    };
    // Counted until the task ends: a shutdown waits for it (`Leases::late_done`).
    let late = leases.late_begun();
    Some(runtime.spawn(async move {
        let _late = late;
        let Some(cell) = state.quota(meter) else { return true };
        let (start, end) = cell.window(at);
        match leases.release_late(cell, start, end, units, held.then_some(tag)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(tenant = %state.id, units, error = %e, "units could not be given back to the store: they stay reserved until the period ends");
                false
            }
        }
    }))
}

/// A lease to refill in the background, asked for by a request that took from it; or (a
/// `tend`) spare units to give back.
pub(crate) struct Prefetch {
    pub(crate) state: Tenant,
    pub(crate) meter: usize,
    /// Asked by a request that won the cell's prefetch flag (cleared once done).
    pub(crate) flagged: bool,
}

/// Asks the worker to refill leases ahead of need (its queue bounded: a request never waits
/// for it).
#[derive(Clone)]
pub(crate) struct Prefetcher(mpsc::Sender<Prefetch>);

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prefetcher")
    }
}

impl Prefetcher {
    pub(crate) fn new(sender: mpsc::Sender<Prefetch>) -> Self {
        Self(sender)
    }

    /// Asks for `meter`'s lease of `state` to be refilled (a request took from it past its
    /// low watermark, and won the cell's prefetch flag): a full queue drops the ask and frees
    /// the flag for the next request.
    pub(crate) fn request(&self, state: &Tenant, meter: usize, cell: QuotaRef<'_>) {
        if self.0.try_send(Prefetch { state: state.clone(), meter, flagged: true }).is_err() {
            cell.prefetch_done();
        }
    }

    /// Asks for the spare units of `meter`'s cell of `state` to go back to the store (units
    /// given back past its lease's cap). A full queue drops the ask: they go with the cell's
    /// next call, or the next flush.
    pub(crate) fn tend(&self, state: &Tenant, meter: usize) {
        let _ = self.0.try_send(Prefetch { state: state.clone(), meter, flagged: false });
    }

    /// After units were charged past the lease's low watermark (work done, whatever the lease
    /// held): the lease is refilled in the background, so that the node reads the store's
    /// count (and, for a spend cap, the tenant's own cap, maybe set through another node)
    /// within a lease, however long its requests run.
    pub(crate) fn when_low(&self, state: &Tenant, meter: usize, cell: QuotaRef<'_>) {
        if cell.wants_prefetch(cell.lease()) {
            self.request(state, meter, cell);
        }
    }
}
