//! Counters through the `metrics` facade, registered once when the engine is built (so the
//! request path never formats a metric key). Install the recorder before building.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{counter, gauge, Counter, Gauge};

use crate::base::RejectionKind;

pub(crate) struct Metrics {
    pub(crate) admitted: Counter,
    rejected: [Counter; RejectionKind::ALL.len()],
    pub(crate) usage_units: Counter,
    pub(crate) refunded_units: Counter,
    pub(crate) replays: Counter,
    pub(crate) overage_units: Counter,
    pub(crate) store_errors: Counter,
    pub(crate) flushes: Counter,
    pub(crate) flush_errors: Counter,
    pub(crate) flushed_units: Counter,
    pub(crate) exported_events: Counter,
    pub(crate) dead_letters: Counter,
    pub(crate) export_retries: Counter,
    pub(crate) unbillable_windows: Counter,
    pub(crate) late_revisions: Counter,
    pub(crate) events_past_limit: Counter,
    pub(crate) waiting_windows: Counter,
    pub(crate) unconfirmed_exports: Counter,
    #[cfg_attr(not(feature = "stripe"), allow(dead_code))]
    pub(crate) webhooks_applied: Counter,
    #[cfg_attr(not(feature = "stripe"), allow(dead_code))]
    pub(crate) webhooks_ignored: Counter,
    #[cfg_attr(not(feature = "stripe"), allow(dead_code))]
    pub(crate) webhooks_rejected: Counter,
    #[cfg_attr(not(feature = "stripe"), allow(dead_code))]
    pub(crate) webhooks_not_credited: Counter,
    #[cfg_attr(not(feature = "stripe"), allow(dead_code))]
    pub(crate) meter_errors: Counter,
    pub(crate) evictions: Counter,
    pub(crate) rate_states_dropped: Counter,
    pub(crate) overrides_not_served: Counter,
    pub(crate) store_fast_failures: Counter,
    pub(crate) negative_hits: Counter,
    pub(crate) buffer_full: Counter,
    pub(crate) dropped_units: Counter,
    pub(crate) tenants: Gauge,
    /// Units by which the billing system differs from the ledger, as the last reconciliation
    /// pass found: lacking, then surplus.
    pub(crate) drift: [Gauge; 2],
    /// Usage events: applied, duplicate, then one per refusal reason ([`EVENT_REFUSALS`]).
    pub(crate) events: [Counter; 2 + EVENT_REFUSALS.len()],
    /// Anonymous requests without a client address (one shared bucket).
    pub(crate) anonymous_without_address: Counter,
    /// Refusals shadow mode let through, by reason.
    pub(crate) would_refuse: [Counter; RejectionKind::ALL.len()],
}

/// The reasons a usage event is refused, as labelled in `tollgate_usage_events_total`.
const EVENT_REFUSALS: [&str; 6] = ["invalid", "too_old", "in_future", "quota", "store_error", "not_yet"];

impl Metrics {
    pub(crate) fn register() -> Self {
        Self {
            admitted: counter!("tollgate_requests_admitted_total"),
            rejected: RejectionKind::ALL.map(|k| counter!("tollgate_requests_rejected_total", "reason" => k.label())),
            usage_units: counter!("tollgate_usage_recorded_units_total"),
            refunded_units: counter!("tollgate_usage_refunded_units_total"),
            replays: counter!("tollgate_idempotent_replays_total"),
            overage_units: counter!("tollgate_overage_units_total"),
            store_errors: counter!("tollgate_store_errors_total"),
            flushes: counter!("tollgate_flushes_total"),
            flush_errors: counter!("tollgate_flush_errors_total"),
            flushed_units: counter!("tollgate_usage_flushed_units_total"),
            exported_events: counter!("tollgate_export_events_total"),
            dead_letters: counter!("tollgate_export_dead_letters_total"),
            export_retries: counter!("tollgate_export_retries_total"),
            unbillable_windows: counter!("tollgate_export_unbillable_windows_total"),
            late_revisions: counter!("tollgate_export_late_revisions_total"),
            events_past_limit: counter!("tollgate_usage_events_past_limit_total"),
            waiting_windows: counter!("tollgate_export_waiting_windows_total"),
            unconfirmed_exports: counter!("tollgate_export_unconfirmed_total"),
            webhooks_applied: counter!("tollgate_webhook_events_total", "outcome" => "applied"),
            webhooks_ignored: counter!("tollgate_webhook_events_total", "outcome" => "ignored"),
            webhooks_rejected: counter!("tollgate_webhook_events_total", "outcome" => "rejected"),
            webhooks_not_credited: counter!("tollgate_webhook_events_total", "outcome" => "not_credited"),
            meter_errors: counter!("tollgate_billing_meter_errors_total"),
            evictions: counter!("tollgate_tenants_evicted_total"),
            rate_states_dropped: counter!("tollgate_rate_states_dropped_total"),
            overrides_not_served: counter!("tollgate_overrides_not_served_total"),
            store_fast_failures: counter!("tollgate_store_fast_failures_total"),
            negative_hits: counter!("tollgate_unknown_credential_cache_hits_total"),
            buffer_full: counter!("tollgate_usage_buffer_full_total"),
            dropped_units: counter!("tollgate_usage_dropped_units_total"),
            tenants: gauge!("tollgate_tenants_tracked"),
            drift: [
                gauge!("tollgate_billing_drift_units", "direction" => "lacking"),
                gauge!("tollgate_billing_drift_units", "direction" => "surplus"),
            ],
            anonymous_without_address: counter!("tollgate_anonymous_without_address_total"),
            would_refuse: RejectionKind::ALL
                .map(|k| counter!("tollgate_shadow_would_refuse_total", "reason" => k.label())),
            events: std::array::from_fn(|i| {
                let outcome = match i {
                    0 => "applied",
                    1 => "duplicate",
                    i => EVENT_REFUSALS[i - 2],
                };
                counter!("tollgate_usage_events_total", "outcome" => outcome)
            }),
        }
    }

    pub(crate) fn events(&self, outcome: ProcessedAs) -> &Counter {
        let i = match outcome {
            ProcessedAs::Applied => 0,
            ProcessedAs::Duplicate => 1,
            ProcessedAs::Refused(label) => 2 + EVENT_REFUSALS.iter().position(|l| *l == label).unwrap_or(0),
        };
        &self.events[i]
    }

    pub(crate) fn would_refuse(&self, kind: RejectionKind) -> &Counter {
        let i = RejectionKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        &self.would_refuse[i]
    }

    pub(crate) fn rejected(&self, kind: RejectionKind) -> &Counter {
        let i = RejectionKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        &self.rejected[i]
    }
}

/// Totals kept by the engine itself for the background paths (never touched per request).
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub(crate) flushes: AtomicU64,
    pub(crate) flushed_units: AtomicU64,
    pub(crate) flush_errors: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) exported_events: AtomicU64,
    pub(crate) exported_units: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) export_retries: AtomicU64,
    pub(crate) unbillable_windows: AtomicU64,
    pub(crate) late_revisions: AtomicU64,
    pub(crate) events_past_limit: AtomicU64,
    pub(crate) waiting_windows: AtomicU64,
    pub(crate) unconfirmed_exports: AtomicU64,
    pub(crate) webhooks_applied: AtomicU64,
    pub(crate) webhooks_ignored: AtomicU64,
    pub(crate) webhooks_rejected: AtomicU64,
    pub(crate) webhooks_not_credited: AtomicU64,
    pub(crate) meter_errors: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) overrides_not_served: AtomicU64,
    pub(crate) store_fast_failures: AtomicU64,
    pub(crate) negative_hits: AtomicU64,
    pub(crate) buffer_full: AtomicU64,
    pub(crate) dropped_units: AtomicU64,
    pub(crate) events_applied: AtomicU64,
    pub(crate) events_duplicate: AtomicU64,
    pub(crate) events_refused: AtomicU64,
    pub(crate) shadow_would_refuse: AtomicU64,
    pub(crate) anonymous_without_address: AtomicU64,
}

impl Totals {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A snapshot of the engine's background counters, from [`Tollgate::stats`](crate::Tollgate::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Tenants whose state is held now.
    pub tracked_tenants: usize,
    /// Usage batches committed to the store.
    pub flushes: u64,
    /// Units committed to the store.
    pub flushed_units: u64,
    /// Flushes that failed (their batch is retried with the same id).
    pub flush_errors: u64,
    /// Store calls on the request path that failed or timed out.
    pub store_errors: u64,
    /// Meter events accepted by the billing sink.
    pub exported_events: u64,
    /// Units in those events.
    pub exported_units: u64,
    /// Aggregates whose export was refused for good, never confirmed, or too old to send.
    pub dead_letters: u64,
    /// Export attempts that failed in a way worth retrying (each is retried later, with the
    /// same identifier and parameters).
    pub export_retries: u64,
    /// Windows of tenants without a billing customer, skipped (not billable) when the sink
    /// needs a customer.
    pub unbillable_windows: u64,
    /// Revisions exported later than `stripe.invoice_grace` after their window ended, when
    /// the invoice of the window's period may be final: a `sum` meter's stamped at export time
    /// (so it reaches an open invoice), a pre-aggregated meter's in its window all the same
    /// (its running total belongs there), logged.
    pub late_revisions: u64,
    /// Usage events of work done recorded past their tenant's hard quota (charged all the
    /// same; a job that must respect the quota reserves first).
    pub events_past_limit: u64,
    /// Windows an export pass left pending because their tenant's billing customer could not
    /// be read (the directory failed for the tenant, or neither it nor the file holds it),
    /// counted once per pass that met them.
    pub waiting_windows: u64,
    /// Exports still unconfirmed after `export.unconfirmed_after`, parked for reconciliation
    /// (also counted in `dead_letters`).
    pub unconfirmed_exports: u64,
    /// Verified webhook events that changed a tenant's plan.
    pub webhooks_applied: u64,
    /// Verified webhook events that changed nothing (duplicates, older events, unknown
    /// types, prices or customers).
    pub webhooks_ignored: u64,
    /// Webhook deliveries refused (a bad or expired signature, an unreadable body).
    pub webhooks_rejected: u64,
    /// Verified payments with `[stripe.credits]` configured that granted nothing: none of
    /// their paid lines is on a price of `[stripe.credits.prices]`
    /// ([`WebhookOutcome::NotCredited`](crate::billing::WebhookOutcome::NotCredited)).
    pub webhooks_not_credited: u64,
    /// Stripe's meter error events received (meter events it refused after taking them),
    /// verified with the event destination's secret.
    pub meter_errors: u64,
    /// Tenants evicted (idle, or over the cap).
    pub evictions: u64,
    /// Tenants served their plan without their overrides, which do not fit it (a plan change
    /// made without looking at them): logged as errors.
    pub overrides_not_served: u64,
    /// Store calls of the request path not made because the store had failed several times in
    /// a row (their requests' `on_store_error` applied at once).
    pub store_fast_failures: u64,
    /// Requests with a credential the directory had just said it did not know, answered
    /// without asking it again.
    pub negative_hits: u64,
    /// Flushes that found the usage buffer (`usage.max_buffered_records`) full.
    pub buffer_full: u64,
    /// Units of fail-open usage dropped because the buffer was full (never under fail-closed,
    /// whose tenants are refused instead).
    pub dropped_units: u64,
    /// Usage events ([`Tollgate::record_event`](crate::Tollgate::record_event)) stored.
    pub events_applied: u64,
    /// Usage events whose id had been seen: not counted again.
    pub events_duplicate: u64,
    /// Usage events refused (too old, in the future, over a hard quota, unknown tenant or
    /// meter, or the store failed).
    pub events_refused: u64,
    /// Refusals shadow mode let through, one per limit that would have refused (a request
    /// over both its rate and its quota counts twice; by reason: the metric
    /// `tollgate_shadow_would_refuse_total{reason}`).
    pub shadow_would_refuse: u64,
    /// Anonymous requests that came without a client address (they share one bucket).
    pub anonymous_without_address: u64,
    /// Client addresses whose rate state is held for anonymous callers (at most
    /// `limits.max_clients`).
    pub tracked_clients: u64,
    /// Rate buckets of tenants no longer held, kept until they are full again (at most
    /// `limits.max_tenants`).
    pub held_rate_states: u64,
    /// Such buckets dropped before they were full again, the memory being at its cap (that
    /// tenant finds a full bucket when it comes back).
    pub rate_states_dropped: u64,
    /// Responses of first requests with an `Idempotency-Key` stored for their replays.
    pub responses_stored: u64,
    /// Such responses not stored, their key released (a retry runs again and is billed): too
    /// long, past the node's or the store's bytes, a 5xx, or cut off (by reason: the metric
    /// `tollgate_idempotent_responses_total{outcome}`).
    pub responses_not_stored: u64,
    /// Response bytes this node holds now while responses stream to be stored.
    pub response_bytes_buffered: u64,
}

impl Totals {
    pub(crate) fn snapshot(&self, tracked_tenants: usize) -> Stats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            tracked_tenants,
            flushes: l(&self.flushes),
            flushed_units: l(&self.flushed_units),
            flush_errors: l(&self.flush_errors),
            store_errors: l(&self.store_errors),
            exported_events: l(&self.exported_events),
            exported_units: l(&self.exported_units),
            dead_letters: l(&self.dead_letters),
            export_retries: l(&self.export_retries),
            unbillable_windows: l(&self.unbillable_windows),
            late_revisions: l(&self.late_revisions),
            events_past_limit: l(&self.events_past_limit),
            waiting_windows: l(&self.waiting_windows),
            unconfirmed_exports: l(&self.unconfirmed_exports),
            webhooks_applied: l(&self.webhooks_applied),
            webhooks_ignored: l(&self.webhooks_ignored),
            webhooks_rejected: l(&self.webhooks_rejected),
            webhooks_not_credited: l(&self.webhooks_not_credited),
            meter_errors: l(&self.meter_errors),
            evictions: l(&self.evictions),
            overrides_not_served: l(&self.overrides_not_served),
            store_fast_failures: l(&self.store_fast_failures),
            negative_hits: l(&self.negative_hits),
            buffer_full: l(&self.buffer_full),
            dropped_units: l(&self.dropped_units),
            events_applied: l(&self.events_applied),
            events_duplicate: l(&self.events_duplicate),
            events_refused: l(&self.events_refused),
            shadow_would_refuse: l(&self.shadow_would_refuse),
            anonymous_without_address: l(&self.anonymous_without_address),
            held_rate_states: 0,
            rate_states_dropped: 0,
            tracked_clients: 0,
            responses_stored: 0,
            responses_not_stored: 0,
            response_bytes_buffered: 0,
        }
    }
}

/// How an event was processed, for the metric.
pub(crate) enum ProcessedAs {
    Applied,
    Duplicate,
    Refused(&'static str),
}
