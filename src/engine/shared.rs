//! What every clone of the engine shares: the configuration in force, the tenants, and the
//! parts that own the rest, each behind its own verbs and handed out read-only.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch, Notify};

use crate::{
    clock::Clock,
    engine::{
        admit::{idempotency::Idempotency, table::TenantTable},
        export::exporter::Exporter,
        node::NodeIds,
        store_calls::StoreCalls,
        usage::{events::EventRecorder, flush::Pipeline, lease::Leases},
    },
    metrics::{Metrics, Totals},
    plan::Runtime,
    tenant::Tenant,
};

/// A lease to refill in the background, asked for by a request that took from it.
pub(crate) struct Prefetch {
    pub(crate) state: Tenant,
    pub(crate) meter: usize,
}

/// What every clone of the engine shares: the configuration in force, the tenants, and the
/// parts that own the rest (each handed what it needs).
///
/// Assembled once by the builder (its fields are visible there for that, within `engine`);
/// every part reads it through the accessors below, and nothing writes it: it lives behind the
/// engine's `Arc`.
pub(crate) struct Shared {
    pub(super) runtime: ArcSwap<Runtime>,
    pub(super) table: TenantTable,
    /// The store of each role, the time limit of a call and the log of store errors.
    pub(super) stores: Arc<StoreCalls>,
    /// This node's id and the sequence numbers of its calls.
    pub(super) ids: Arc<NodeIds>,
    /// Quota leases (with the threshold notifications their answers trigger).
    pub(super) leases: Leases,
    /// Usage drained from the tenants and not yet committed, flushed in batches.
    pub(super) pipeline: Pipeline,
    /// The billing export.
    pub(super) exporter: Exporter,
    /// Which of a tenant's billing customers its usage is billed to: the sink's, else the one
    /// of the sink the configuration names.
    pub(super) customer_field: crate::base::CustomerField,
    /// Usage events of jobs and queues.
    pub(super) events: EventRecorder,
    /// Whether the store is the one the configuration's `[store]` names (opened by
    /// `Builder::open`), which a reload may then not change.
    pub(super) store_configured: bool,
    pub(super) clock: Clock,
    pub(super) idempotency: Idempotency,
    pub(super) metrics: Arc<Metrics>,
    pub(super) totals: Arc<Totals>,
    pub(super) prefetch: mpsc::Sender<Prefetch>,
    pub(super) sweep_now: Notify,
    /// The requests in flight of tenants whose plan limits them, by tenant.
    pub(super) in_flight: crate::tenant::InFlightCounts,
    pub(super) shutdown: watch::Sender<bool>,
    /// Credentials the directory did not know, each with when it stops being remembered (the
    /// engine clock's Unix nanoseconds): `limits.negative_ttl` after the lookup that found it
    /// unknown, whatever the hits since.
    pub(super) unknown: moka::sync::Cache<(u64, u64), i64>,
    /// Directory lookups of API keys per client address (`identify.unknown_key_rate`).
    pub(super) key_lookups: crate::engine::admit::clients::KeyLookups,
    /// Expired credit grants whose close failed here, waiting to be tried again.
    pub(super) credit_expiry: crate::engine::usage::credits::CreditExpiry,
    /// Set when shutdown begins: no request is admitted after it (its usage would come after
    /// the final flush, and its lease after the leases were given back).
    pub(super) stopping: std::sync::atomic::AtomicBool,
    /// When the engine was built: settlements begun since then are all of them.
    pub(super) started: std::time::Instant,
    /// The holds open on this node.
    pub(super) holds: Arc<crate::engine::usage::held::OpenHolds>,
    /// This node's places of tenants with a fleet concurrency.
    pub(super) places: crate::engine::admit::places::PlacesNode,
    /// Crossings waiting to be written to the alerts outbox.
    pub(super) alerts: Arc<crate::engine::alerts::AlertQueue>,
    /// The HTTP clients alerts are delivered through, made at the first delivery.
    #[cfg(feature = "alerts")]
    pub(super) deliverer: std::sync::OnceLock<Result<crate::engine::alerts::Deliverer, String>>,
}

impl Shared {
    /// `runtime`.
    #[inline]
    pub(crate) fn runtime(&self) -> &ArcSwap<Runtime> {
        &self.runtime
    }

    /// `table`.
    #[inline]
    pub(crate) fn table(&self) -> &TenantTable {
        &self.table
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

    /// Quota leases (with the threshold notifications their answers trigger).
    #[inline]
    pub(crate) fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Usage drained from the tenants and not yet committed, flushed in batches.
    #[inline]
    pub(crate) fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// The billing export.
    #[inline]
    pub(crate) fn exporter(&self) -> &Exporter {
        &self.exporter
    }

    /// Which of a tenant's billing customers its usage is billed to: the sink's, else the one
    /// of the sink the configuration names.
    #[inline]
    pub(crate) fn customer_field(&self) -> crate::base::CustomerField {
        self.customer_field
    }

    /// Usage events of jobs and queues.
    #[inline]
    pub(crate) fn events(&self) -> &EventRecorder {
        &self.events
    }

    /// Whether the store is the one the configuration's `[store]` names (opened by
    /// `Builder::open`), which a reload may then not change.
    #[inline]
    pub(crate) fn store_configured(&self) -> bool {
        self.store_configured
    }

    /// `clock`.
    #[inline]
    pub(crate) fn clock(&self) -> &Clock {
        &self.clock
    }

    /// `idempotency`.
    #[inline]
    pub(crate) fn idempotency(&self) -> &Idempotency {
        &self.idempotency
    }

    /// `metrics`.
    #[inline]
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// `totals`.
    #[inline]
    pub(crate) fn totals(&self) -> &Arc<Totals> {
        &self.totals
    }

    /// `prefetch`.
    #[inline]
    pub(crate) fn prefetch(&self) -> &mpsc::Sender<Prefetch> {
        &self.prefetch
    }

    /// `sweep_now`.
    #[inline]
    pub(crate) fn sweep_now(&self) -> &Notify {
        &self.sweep_now
    }

    /// The requests in flight of tenants whose plan limits them, by tenant.
    #[inline]
    pub(crate) fn in_flight(&self) -> &crate::tenant::InFlightCounts {
        &self.in_flight
    }

    /// This node's places of tenants with a fleet concurrency.
    pub(crate) fn places(&self) -> &crate::engine::admit::places::PlacesNode {
        &self.places
    }

    /// Crossings waiting to be written to the alerts outbox.
    pub(crate) fn alerts(&self) -> &crate::engine::alerts::AlertQueue {
        &self.alerts
    }

    /// The HTTP clients alerts are delivered through (each call within `timeout`).
    #[cfg(feature = "alerts")]
    pub(crate) fn deliverer(&self, timeout: std::time::Duration) -> Result<&crate::engine::alerts::Deliverer, String> {
        self.deliverer.get_or_init(|| crate::engine::alerts::Deliverer::new(timeout)).as_ref().map_err(Clone::clone)
    }

    /// `shutdown`.
    #[inline]
    pub(crate) fn shutdown(&self) -> &watch::Sender<bool> {
        &self.shutdown
    }

    /// Credentials the directory did not know, each with when it stops being remembered (the
    /// engine clock's Unix nanoseconds): `limits.negative_ttl` after the lookup that found it
    /// unknown, whatever the hits since.
    #[inline]
    pub(crate) fn unknown(&self) -> &moka::sync::Cache<(u64, u64), i64> {
        &self.unknown
    }

    /// Directory lookups of API keys per client address (`identify.unknown_key_rate`).
    #[inline]
    pub(crate) fn key_lookups(&self) -> &crate::engine::admit::clients::KeyLookups {
        &self.key_lookups
    }

    /// Expired credit grants whose close failed here, waiting to be tried again.
    #[inline]
    pub(crate) fn credit_expiry(&self) -> &crate::engine::usage::credits::CreditExpiry {
        &self.credit_expiry
    }

    /// Set when shutdown begins: no request is admitted after it (its usage would come after
    /// the final flush, and its lease after the leases were given back).
    #[inline]
    pub(crate) fn stopping(&self) -> &std::sync::atomic::AtomicBool {
        &self.stopping
    }

    /// The holds open on this node.
    #[inline]
    pub(crate) fn holds(&self) -> &crate::engine::usage::held::OpenHolds {
        &self.holds
    }

    /// When the engine was built: settlements begun since then are all of them.
    pub(crate) fn started(&self) -> std::time::Instant {
        self.started
    }
}
