//! The usage part of the engine ([`Units`]): the quota leases of the tenants, the usage
//! pipeline, usage events, the holds open on the node, the expiry of prepaid credits and the
//! prefetch queue, behind their verbs. Every hold is handed an `Arc` of it, every ticket and
//! context a [`UnitsHandle`] counted on its thread's lane (no back-pointer through the plans).

use std::sync::Arc;

use crate::engine::{
    shared::Shared,
    usage::{
        credits::{CreditExpiry, CreditExpiryReport},
        events::EventRecorder,
        flush::Pipeline,
        held::OpenHolds,
        lease::Leases,
        taken::{Prefetch, Prefetcher},
        views::UsageViews,
    },
};
use crate::store::StoreError;

/// The usage part: what takes, gives back and records units. Built once by the builder.
pub(crate) struct Units {
    shared: Arc<Shared>,
    /// Quota leases (with the threshold notifications their answers trigger).
    leases: Arc<Leases>,
    /// Usage drained from the tenants and not yet committed, flushed in batches.
    pipeline: Pipeline,
    /// Usage events of jobs and queues.
    events: EventRecorder,
    /// The holds open on this node.
    holds: Arc<OpenHolds>,
    /// Expired credit grants whose close failed here, waiting to be tried again.
    credit_expiry: CreditExpiry,
    prefetcher: Prefetcher,
    /// The tenants' own usage views, made at most once a second each.
    views: UsageViews,
}

impl std::fmt::Debug for Units {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Units").field("holds", &self.holds).finish_non_exhaustive()
    }
}

impl Units {
    pub(crate) fn new(
        shared: Arc<Shared>,
        leases: Arc<Leases>,
        pipeline: Pipeline,
        events: EventRecorder,
        holds: Arc<OpenHolds>,
        prefetcher: Prefetcher,
    ) -> Self {
        Self {
            shared,
            leases,
            pipeline,
            events,
            holds,
            credit_expiry: CreditExpiry::default(),
            prefetcher,
            views: UsageViews::default(),
        }
    }

    /// The tenants' own usage views.
    pub(crate) fn views(&self) -> &UsageViews {
        &self.views
    }

    /// What every part shares.
    #[inline]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Quota leases.
    #[inline]
    pub(crate) fn leases(&self) -> &Arc<Leases> {
        &self.leases
    }

    /// The usage pipeline.
    #[inline]
    pub(crate) fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Usage events of jobs and queues.
    #[inline]
    pub(crate) fn events(&self) -> &EventRecorder {
        &self.events
    }

    /// The holds open on this node.
    #[inline]
    pub(crate) fn holds(&self) -> &OpenHolds {
        &self.holds
    }

    /// The queue of leases to refill ahead of need.
    #[inline]
    pub(crate) fn prefetcher(&self) -> &Prefetcher {
        &self.prefetcher
    }

    /// How long a hold may stay open, as the configuration in force says.
    pub(crate) fn hold_timeout(&self) -> std::time::Duration {
        self.shared.runtime().load().config.limits.hold_timeout
    }

    /// Refills a lease a request asked for (the worker's prefetch queue), if it is still
    /// below its low watermark, and gives its spare units back to the store.
    pub(crate) async fn refill(&self, job: Prefetch) {
        // A retired state needs no refill: its lease goes back when its last request is done.
        let state = job.state;
        let Some(cell) = state.quota(job.meter) else { return };
        let done = || {
            if job.flagged {
                cell.prefetch_done();
            }
        };
        if state.is_evicted() {
            done();
            return;
        }
        let rt = self.shared.runtime().load_full();
        let now = self.shared.clock().unix_secs();
        let result = self
            .shared
            .stores()
            .under_lock(cell.lock(), async {
                self.leases.settle_inflight(cell).await?;
                if cell.spare() > 0 {
                    let tag = crate::tenant::PeriodBits::tag(crate::tenant::PeriodBits::pack(
                        cell.period().0,
                        cell.period().1,
                    ));
                    self.leases.release_spare(cell, tag).await?;
                }
                // Still asked (a flush may have done it meanwhile), and still low.
                if job.flagged && cell.prefetch_pending() && cell.lease() < cell.low() {
                    self.leases.refill_locked(&rt, cell, now, 0, 0, false).await?;
                }
                Ok(())
            })
            .await;
        done();
        if let Err(e) = result {
            tracing::debug!(error = %e, "a lease could not be prefetched, or its spare units given back");
        }
    }

    /// Closes expired credit grants (see
    /// [`Tollgate::expire_credits`](crate::Tollgate::expire_credits)).
    pub(crate) async fn expire_credits(&self) -> Result<CreditExpiryReport, StoreError> {
        self.credit_expiry.pass(&*self.shared.stores().background().quota, self.shared.clock()).await
    }
}

/// A counted handle on the engine's [`Units`] for what lives as long as one request (its
/// ticket, its context): a clone of one of the engine's [`UnitsLanes`], the lane of the thread
/// that made it, not of the one `Arc<Units>` that every request of every tenant would otherwise
/// count on the same cache line at its admission and again at its response.
pub(crate) type UnitsHandle = LaneHandle<Units>;

/// The lanes a request's [`UnitsHandle`] is cloned from.
pub(crate) type UnitsLanes = Lanes<Units>;

/// A counted handle on a `T` shared by many threads, counted on the lane of the thread that
/// took it from the [`Lanes`] ([`Lanes::handle`]); its clones count on the same lane, wherever
/// they are made or dropped.
pub(crate) struct LaneHandle<T>(Arc<Lane<T>>);

impl<T> Clone for LaneHandle<T> {
    #[inline]
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// One lane: a strong reference to the value, aligned so that the count of the `Arc` around it
/// (at the start of its allocation) shares no line, nor the adjacent line a processor may fetch
/// with it, with another lane's.
#[repr(align(128))]
struct Lane<T>(Arc<T>);

impl<T> std::ops::Deref for LaneHandle<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0 .0
    }
}

impl<T> LaneHandle<T> {
    /// The value's own `Arc`, for what outlives a request's handle (a hold).
    pub(crate) fn arc(&self) -> &Arc<T> {
        &self.0 .0
    }
}

/// The lanes a handle is cloned from: one per thread up to the machine's parallelism (a power
/// of two, at most [`MAX_LANES`]), a thread keeping its lane for its life. Each lane holds the
/// value alive, so the value lives while any handle does.
pub(crate) struct Lanes<T>(Box<[Arc<Lane<T>>]>);

/// The most lanes of a value.
const MAX_LANES: usize = 64;

impl<T> Lanes<T> {
    /// Lanes for `value`, as many as the machine runs threads at once (a power of two).
    pub(crate) fn new(value: &Arc<T>) -> Self {
        let n = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self::with_lanes(value, n)
    }

    /// `lanes` lanes, rounded up to a power of two, at most [`MAX_LANES`].
    fn with_lanes(value: &Arc<T>, lanes: usize) -> Self {
        let lanes = lanes.clamp(1, MAX_LANES).next_power_of_two();
        Self((0..lanes).map(|_| Arc::new(Lane(value.clone()))).collect())
    }

    /// A handle on the value for one request, counted on the lane of the calling thread.
    #[inline]
    pub(crate) fn handle(&self) -> LaneHandle<T> {
        LaneHandle(self.0[thread_lane() & (self.0.len() - 1)].clone())
    }
}

impl<T> std::fmt::Debug for Lanes<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes").field("lanes", &self.0.len()).finish()
    }
}

/// The calling thread's lane number, given in turn to threads as they first ask.
#[inline]
fn thread_lane() -> usize {
    use std::{
        cell::Cell,
        sync::atomic::{AtomicUsize, Ordering},
    };
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static LANE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    LANE.with(|lane| {
        let mut n = lane.get();
        if n == usize::MAX {
            // Below `MAX_LANES`, so never the mark of no number; every count of lanes divides it.
            n = NEXT.fetch_add(1, Ordering::Relaxed) % MAX_LANES;
            lane.set(n);
        }
        n
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{thread_lane, Lane, Lanes};

    /// A thread's handles are counted on the lane of its number, the same for its life; two
    /// threads have two numbers; every handle reaches the one value; a lane's value starts a
    /// 128-byte block of its own, so no two lanes' counts share a line or a line pair.
    #[test]
    fn threads_count_their_handles_on_the_lanes_of_their_numbers() {
        let value = Arc::new(7_u32);
        let lanes = Lanes::with_lanes(&value, 2);
        let on_a_thread =
            || std::thread::scope(|s| s.spawn(|| (thread_lane(), lanes.handle(), lanes.handle())).join().unwrap());
        let (na, a, again) = on_a_thread();
        let (nb, b, _) = on_a_thread();
        assert_ne!(na, nb, "two threads, one number");
        assert!(Arc::ptr_eq(&a.0, &again.0), "a thread moved to another lane");
        assert!(Arc::ptr_eq(&a.0, &lanes.0[na & 1]) && Arc::ptr_eq(&b.0, &lanes.0[nb & 1]));
        assert!(Arc::ptr_eq(a.arc(), &value) && Arc::ptr_eq(b.arc(), &value));
        assert_eq!((*a, *b), (7, 7));
        assert_eq!(std::mem::align_of::<Lane<u32>>(), 128);
        assert!(lanes.0.iter().all(|lane| Arc::as_ptr(lane) as usize % 128 == 0));
    }

    /// The value lives while a handle does, the lanes gone; and goes with the last handle.
    #[test]
    fn a_handle_keeps_the_value_after_its_lanes() {
        let value = Arc::new(String::from("units"));
        let lanes = Lanes::with_lanes(&value, 3);
        assert_eq!(lanes.0.len(), 4, "rounded up to a power of two");
        let handle = lanes.handle();
        drop(lanes);
        assert_eq!(Arc::strong_count(&value), 2, "the handle's lane and the test's");
        assert_eq!(handle.as_str(), "units");
        drop(handle);
        assert_eq!(Arc::strong_count(&value), 1);
    }
}
