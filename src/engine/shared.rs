//! What every part of the engine needs: the configuration in force, the store calls, the
//! node's ids, the clock, the counters, and the shutdown signals. Each part (admission, usage,
//! export, alerts) owns the rest of its state and is handed an `Arc` of this.

use std::sync::{atomic::AtomicBool, Arc};

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use crate::{
    clock::Clock,
    engine::{node::NodeIds, store_calls::StoreCalls},
    metrics::{Metrics, Totals},
    plan::Runtime,
};

/// What every part shares. Assembled once by the builder; nothing writes it but through its
/// fields' own verbs.
pub(crate) struct Shared {
    runtime: ArcSwap<Runtime>,
    /// The store of each role, the time limit of a call and the log of store errors.
    stores: Arc<StoreCalls>,
    /// This node's id and the sequence numbers of its calls.
    ids: Arc<NodeIds>,
    clock: Clock,
    metrics: Arc<Metrics>,
    totals: Arc<Totals>,
    /// Whether the store is the one the configuration's `[store]` names (opened by
    /// `Builder::open`), which a reload may then not change.
    store_configured: bool,
    /// Tells the worker to stop.
    shutdown: watch::Sender<bool>,
    /// Wakes the worker's sweep (the tenant cap passed on insertion).
    sweep_now: Notify,
    /// Set when shutdown begins: no request is admitted after it (its usage would come after
    /// the final flush, and its lease after the leases were given back).
    stopping: AtomicBool,
    /// When the engine was built: settlements begun since then are all of them.
    started: std::time::Instant,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("stores", &self.stores).finish_non_exhaustive()
    }
}

/// What the builder hands [`Shared::new`].
pub(crate) struct SharedParts {
    pub(crate) runtime: Runtime,
    pub(crate) stores: Arc<StoreCalls>,
    pub(crate) ids: Arc<NodeIds>,
    pub(crate) clock: Clock,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) totals: Arc<Totals>,
    pub(crate) store_configured: bool,
    pub(crate) shutdown: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn new(parts: SharedParts) -> Self {
        let SharedParts { runtime, stores, ids, clock, metrics, totals, store_configured, shutdown } = parts;
        Self {
            runtime: ArcSwap::from_pointee(runtime),
            stores,
            ids,
            clock,
            metrics,
            totals,
            store_configured,
            shutdown,
            sweep_now: Notify::new(),
            stopping: AtomicBool::new(false),
            started: std::time::Instant::now(),
        }
    }

    /// The configuration in force, compiled for the request path.
    #[inline]
    pub(crate) fn runtime(&self) -> &ArcSwap<Runtime> {
        &self.runtime
    }

    /// The store of each role, the time limit of a call and the log of store errors.
    #[inline]
    pub(crate) fn stores(&self) -> &Arc<StoreCalls> {
        &self.stores
    }

    /// This node's id and the sequence numbers of its calls.
    #[inline]
    pub(crate) fn ids(&self) -> &Arc<NodeIds> {
        &self.ids
    }

    /// The clock the engine reads.
    #[inline]
    pub(crate) fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The metrics.
    #[inline]
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The counters of the background paths.
    #[inline]
    pub(crate) fn totals(&self) -> &Arc<Totals> {
        &self.totals
    }

    /// Whether the store is the one the configuration's `[store]` names, which a reload may
    /// then not change.
    #[inline]
    pub(crate) fn store_configured(&self) -> bool {
        self.store_configured
    }

    /// Tells the worker to stop.
    #[inline]
    pub(crate) fn shutdown(&self) -> &watch::Sender<bool> {
        &self.shutdown
    }

    /// Wakes the worker's sweep.
    #[inline]
    pub(crate) fn sweep_now(&self) -> &Notify {
        &self.sweep_now
    }

    /// Set when shutdown begins: no request is admitted after it.
    #[inline]
    pub(crate) fn stopping(&self) -> &AtomicBool {
        &self.stopping
    }

    /// When the engine was built.
    #[inline]
    pub(crate) fn started(&self) -> std::time::Instant {
        self.started
    }
}
