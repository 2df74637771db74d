//! The usage part of the engine ([`Units`]): the quota leases of the tenants, the usage
//! pipeline, usage events, the holds open on the node, the expiry of prepaid credits and the
//! prefetch queue, behind their verbs. One `Arc` of it is handed to every context and hold, and
//! to the tickets the engine's entry points hand out (not to those the tower layer admits
//! without waiting, whose contexts the layer makes from the engine it holds; no back-pointer
//! through the plans).

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
        // Within `store_timeout`, the wait for the lock included: a busy tenant's queue (whose
        // own calls refill it) is passed over rather than waited for, so that one tenant never
        // holds the worker's other work.
        let result = self
            .shared
            .stores()
            .under_lock_or_busy(cell.lock(), async {
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
        match result {
            Ok(Some(())) => {}
            Ok(None) => tracing::debug!("a lease was not prefetched: its tenant's requests held its calls"),
            Err(e) => tracing::debug!(error = %e, "a lease could not be prefetched, or its spare units given back"),
        }
    }

    /// Closes expired credit grants (see
    /// [`Tollgate::expire_credits`](crate::Tollgate::expire_credits)).
    pub(crate) async fn expire_credits(&self) -> Result<CreditExpiryReport, StoreError> {
        self.credit_expiry.pass(&*self.shared.stores().background().quota, self.shared.clock()).await
    }
}
