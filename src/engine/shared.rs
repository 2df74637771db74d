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
pub(crate) struct Shared {
    runtime: ArcSwap<Runtime>,
    table: TenantTable,
    /// The store of each role, the time limit of a call and the log of store errors.
    stores: Arc<StoreCalls>,
    /// This node's id and the sequence numbers of its calls.
    ids: Arc<NodeIds>,
    /// Quota leases (with the threshold notifications their answers trigger).
    leases: Leases,
    /// Usage drained from the tenants and not yet committed, flushed in batches.
    pipeline: Pipeline,
    /// The billing export.
    exporter: Exporter,
    /// Which of a tenant's billing customers its usage is billed to: the sink's, else the one
    /// of the sink the configuration names.
    customer_field: crate::base::CustomerField,
    /// Usage events of jobs and queues.
    events: EventRecorder,
    /// Whether the store is the one the configuration's `[store]` names (opened by
    /// `Builder::open`), which a reload may then not change.
    store_configured: bool,
    clock: Clock,
    idempotency: Idempotency,
    metrics: Arc<Metrics>,
    totals: Arc<Totals>,
    prefetch: mpsc::Sender<Prefetch>,
    sweep_now: Notify,
    /// The requests in flight of tenants whose plan limits them, by tenant.
    in_flight: crate::tenant::InFlightCounts,
    shutdown: watch::Sender<bool>,
    /// Credentials the directory did not know, each with when it stops being remembered (the
    /// engine clock's Unix nanoseconds): `limits.negative_ttl` after the lookup that found it
    /// unknown, whatever the hits since.
    unknown: moka::sync::Cache<(u64, u64), i64>,
    /// Directory lookups of API keys per client address (`identify.unknown_key_rate`).
    key_lookups: crate::engine::admit::clients::KeyLookups,
    /// Expired credit grants whose close failed here, waiting to be tried again.
    credit_expiry: crate::engine::usage::credits::CreditExpiry,
    /// Set when shutdown begins: no request is admitted after it (its usage would come after
    /// the final flush, and its lease after the leases were given back).
    stopping: std::sync::atomic::AtomicBool,
    /// When the engine was built: settlements begun since then are all of them.
    started: std::time::Instant,
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

    /// When the engine was built: settlements begun since then are all of them.
    #[inline]
    pub(crate) fn started(&self) -> std::time::Instant {
        self.started
    }
}

/// What the builder hands over to make a [`Shared`] (once).
pub(crate) struct SharedParts {
    pub(crate) runtime: ArcSwap<Runtime>,
    pub(crate) table: TenantTable,
    pub(crate) stores: Arc<StoreCalls>,
    pub(crate) ids: Arc<NodeIds>,
    pub(crate) leases: Leases,
    pub(crate) pipeline: Pipeline,
    pub(crate) exporter: Exporter,
    pub(crate) customer_field: crate::base::CustomerField,
    pub(crate) events: EventRecorder,
    pub(crate) store_configured: bool,
    pub(crate) clock: Clock,
    pub(crate) idempotency: Idempotency,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) totals: Arc<Totals>,
    pub(crate) prefetch: mpsc::Sender<Prefetch>,
    pub(crate) sweep_now: Notify,
    pub(crate) in_flight: crate::tenant::InFlightCounts,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) unknown: moka::sync::Cache<(u64, u64), i64>,
    pub(crate) key_lookups: crate::engine::admit::clients::KeyLookups,
    pub(crate) credit_expiry: crate::engine::usage::credits::CreditExpiry,
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    pub(crate) started: std::time::Instant,
}

impl From<SharedParts> for Shared {
    fn from(parts: SharedParts) -> Self {
        let SharedParts {
            runtime,
            table,
            stores,
            ids,
            leases,
            pipeline,
            exporter,
            customer_field,
            events,
            store_configured,
            clock,
            idempotency,
            metrics,
            totals,
            prefetch,
            sweep_now,
            in_flight,
            shutdown,
            unknown,
            key_lookups,
            credit_expiry,
            stopping,
            started,
        } = parts;
        Self {
            runtime,
            table,
            stores,
            ids,
            leases,
            pipeline,
            exporter,
            customer_field,
            events,
            store_configured,
            clock,
            idempotency,
            metrics,
            totals,
            prefetch,
            sweep_now,
            in_flight,
            shutdown,
            unknown,
            key_lookups,
            credit_expiry,
            stopping,
            started,
        }
    }
}
