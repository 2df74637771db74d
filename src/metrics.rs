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
    /// Spend recorded, in nano-units of the currency.
    pub(crate) spend_nanos: Counter,
    /// Spend charged past a hard spend cap (work recorded without a hold that covered it).
    pub(crate) spend_past_cap_nanos: Counter,
    pub(crate) rate_states_dropped: Counter,
    pub(crate) tenants: Gauge,
    /// Units by which the billing system differs from the ledger, as the last reconciliation
    /// pass found: lacking, then surplus.
    pub(crate) drift: [Gauge; 2],
    /// Usage events: applied, duplicate, then one per refusal reason ([`EVENT_REFUSALS`]).
    pub(crate) events: [Counter; 2 + EVENT_REFUSALS.len()],
    /// Anonymous requests without a client address (one shared bucket).
    /// Refusals shadow mode let through, by reason.
    pub(crate) would_refuse: [Counter; RejectionKind::ALL.len()],
    /// Holds by outcome ([`HOLD_OUTCOMES`]).
    holds: [Counter; 8],
    /// Units held and not recorded, given back when their holds settled.
    pub(crate) hold_returned_units: Counter,
    /// Alert rows this node wrote to the outbox (new ones: the fleet writes each once).
    pub(crate) alerts_written: Counter,
    /// Deliveries of alerts by outcome ([`ALERT_OUTCOMES`]).
    alert_deliveries: [Counter; 4],
    /// Values of open dimensions the node's tenant states know now (the node's bound on them,
    /// `tenant/open.rs`'s `NODE_OPEN_VALUES_MAX`, is checked against it).
    pub(crate) open_values: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// What a delivery of an alert came to, as labelled in `tollgate_alert_deliveries_total`.
const ALERT_OUTCOMES: [&str; 4] = ["delivered", "retried", "dead", "released"];

/// What happened to a hold, as labelled in `tollgate_holds_total`.
const HOLD_OUTCOMES: [&str; 8] =
    ["taken", "extended", "refused_spent", "refused_held", "refused_full", "settled", "expired", "overrun"];

/// What happened to a hold, for [`Metrics::hold`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum HoldOutcome {
    /// A hold took its first units.
    Taken = 0,
    /// A hold took more.
    Extended = 1,
    /// A hold (or an extension) was refused: the limit is spent.
    RefusedSpent = 2,
    /// A hold (or an extension) was refused: other requests hold the units.
    RefusedHeld = 3,
    /// A hold was refused: the node has `limits.max_holds` open.
    RefusedFull = 4,
    /// A hold that held units settled (or dropped).
    Settled = 5,
    /// A hold was settled past its `hold_timeout`.
    Expired = 6,
    /// A record through a hold went beyond what it held, charged as debt.
    Overrun = 7,
}

/// The reasons a usage event is refused, as labelled in `tollgate_usage_events_total`.
const EVENT_REFUSALS: [&str; 6] = ["invalid", "too_old", "in_future", "quota", "store_error", "not_yet"];

impl Metrics {
    /// The counter of holds with this outcome.
    #[inline]
    pub(crate) fn hold(&self, outcome: HoldOutcome) -> &Counter {
        &self.holds[outcome as usize]
    }

    pub(crate) fn register() -> Self {
        Self {
            admitted: counter!("tollgate_requests_admitted_total"),
            rejected: RejectionKind::ALL.map(|k| counter!("tollgate_requests_rejected_total", "reason" => k.label())),
            usage_units: counter!("tollgate_usage_recorded_units_total"),
            refunded_units: counter!("tollgate_usage_refunded_units_total"),
            replays: counter!("tollgate_idempotent_replays_total"),
            overage_units: counter!("tollgate_overage_units_total"),
            spend_nanos: counter!("tollgate_spend_nanos_total"),
            spend_past_cap_nanos: counter!("tollgate_spend_past_cap_nanos_total"),
            rate_states_dropped: counter!("tollgate_rate_states_dropped_total"),
            tenants: gauge!("tollgate_tenants_tracked"),
            drift: [
                gauge!("tollgate_billing_drift_units", "direction" => "lacking"),
                gauge!("tollgate_billing_drift_units", "direction" => "surplus"),
            ],
            would_refuse: RejectionKind::ALL
                .map(|k| counter!("tollgate_shadow_would_refuse_total", "reason" => k.label())),
            holds: HOLD_OUTCOMES.map(|o| counter!("tollgate_holds_total", "outcome" => o)),
            hold_returned_units: counter!("tollgate_hold_returned_units_total"),
            alerts_written: counter!("tollgate_alerts_written_total"),
            open_values: std::sync::Arc::default(),
            alert_deliveries: ALERT_OUTCOMES.map(|o| counter!("tollgate_alert_deliveries_total", "outcome" => o)),
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

    /// The counter of alert deliveries with this outcome (`delivered`, `retried`, `dead`,
    /// `released`).
    pub(crate) fn alert_deliveries(&self, outcome: &str) -> &Counter {
        let i = ALERT_OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(3);
        &self.alert_deliveries[i]
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

/// A background counter: the engine's own total (read by [`Stats`]) and its metric, added to
/// at once.
#[derive(Debug)]
pub(crate) struct Tally {
    total: AtomicU64,
    metric: Counter,
}

impl Tally {
    fn new(metric: Counter) -> Self {
        Self { total: AtomicU64::new(0), metric }
    }

    /// Adds `n` to the total and to the metric.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
        self.metric.increment(n);
    }

    /// The total so far.
    pub(crate) fn get(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// Totals kept by the engine itself for the background paths (never touched per request):
/// each [`Tally`] with its metric, the rest (labelled metrics counted apart) alone.
#[derive(Debug)]
pub(crate) struct Totals {
    pub(crate) flushes: Tally,
    pub(crate) flushed_units: Tally,
    pub(crate) flushed_spend_nanos: Tally,
    pub(crate) flush_errors: Tally,
    pub(crate) store_errors: Tally,
    pub(crate) exported_events: Tally,
    pub(crate) exported_units: AtomicU64,
    pub(crate) dead_letters: Tally,
    pub(crate) export_retries: Tally,
    pub(crate) unbillable_windows: Tally,
    pub(crate) late_revisions: Tally,
    pub(crate) events_past_limit: Tally,
    pub(crate) waiting_windows: Tally,
    pub(crate) unconfirmed_exports: Tally,
    pub(crate) webhooks_applied: Tally,
    pub(crate) webhooks_ignored: Tally,
    pub(crate) webhooks_rejected: Tally,
    pub(crate) webhooks_not_credited: Tally,
    pub(crate) webhooks_api_refused: Tally,
    pub(crate) meter_errors: Tally,
    pub(crate) evictions: Tally,
    pub(crate) overrides_not_served: Tally,
    pub(crate) store_fast_failures: Tally,
    pub(crate) negative_hits: Tally,
    pub(crate) usage_refreshes: Tally,
    pub(crate) usage_refreshes_refused: Tally,
    pub(crate) give_backs_untold: Tally,
    pub(crate) buffer_full: Tally,
    pub(crate) dropped_units: Tally,
    pub(crate) events_applied: AtomicU64,
    pub(crate) events_duplicate: AtomicU64,
    pub(crate) events_refused: AtomicU64,
    pub(crate) shadow_would_refuse: AtomicU64,
    pub(crate) anonymous_without_address: Tally,
    /// Recharges by what happened to them ([`RECHARGE_OUTCOMES`]).
    pub(crate) recharges: [Tally; 6],
}

/// What happened to a recharge, as labelled in `tollgate_recharges_total{outcome}`.
const RECHARGE_OUTCOMES: [&str; 6] = ["claimed", "charged", "paid", "failed", "limited", "credited_unannounced"];

/// What happened to a recharge, for [`Totals::recharge`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum RechargeOutcome {
    /// Claimed by a refill of this node (or taken again once its delivery lapsed).
    Claimed = 0,
    /// Charged by this node's worker: Stripe says its invoice is paid.
    Charged = 1,
    /// Closed by its `invoice.paid` (handled by this node): its units granted.
    Paid = 2,
    /// A payment failure counted by this node (its worker's charge, or a webhook).
    Failed = 3,
    /// The month's limit stopped a recharge (once per tenant, meter and month).
    Limited = 4,
    /// Found paid by a delivery long after its claim, `invoice.paid` never having come: credited
    /// by the worker through the top-up path.
    CreditedUnannounced = 5,
}

impl Totals {
    /// The totals, their metrics registered (install the recorder before).
    pub(crate) fn register() -> Self {
        Self {
            flushes: Tally::new(counter!("tollgate_flushes_total")),
            flushed_units: Tally::new(counter!("tollgate_usage_flushed_units_total")),
            flushed_spend_nanos: Tally::new(counter!("tollgate_usage_flushed_spend_nanos_total")),
            flush_errors: Tally::new(counter!("tollgate_flush_errors_total")),
            store_errors: Tally::new(counter!("tollgate_store_errors_total")),
            exported_events: Tally::new(counter!("tollgate_export_events_total")),
            dead_letters: Tally::new(counter!("tollgate_export_dead_letters_total")),
            export_retries: Tally::new(counter!("tollgate_export_retries_total")),
            unbillable_windows: Tally::new(counter!("tollgate_export_unbillable_windows_total")),
            late_revisions: Tally::new(counter!("tollgate_export_late_revisions_total")),
            events_past_limit: Tally::new(counter!("tollgate_usage_events_past_limit_total")),
            waiting_windows: Tally::new(counter!("tollgate_export_waiting_windows_total")),
            unconfirmed_exports: Tally::new(counter!("tollgate_export_unconfirmed_total")),
            webhooks_applied: Tally::new(counter!("tollgate_webhook_events_total", "outcome" => "applied")),
            webhooks_ignored: Tally::new(counter!("tollgate_webhook_events_total", "outcome" => "ignored")),
            webhooks_rejected: Tally::new(counter!("tollgate_webhook_events_total", "outcome" => "rejected")),
            webhooks_not_credited: Tally::new(counter!("tollgate_webhook_events_total", "outcome" => "not_credited")),
            webhooks_api_refused: Tally::new(counter!("tollgate_webhook_events_total", "outcome" => "api_refused")),
            meter_errors: Tally::new(counter!("tollgate_billing_meter_errors_total")),
            evictions: Tally::new(counter!("tollgate_tenants_evicted_total")),
            overrides_not_served: Tally::new(counter!("tollgate_overrides_not_served_total")),
            store_fast_failures: Tally::new(counter!("tollgate_store_fast_failures_total")),
            negative_hits: Tally::new(counter!("tollgate_unknown_credential_cache_hits_total")),
            usage_refreshes: Tally::new(counter!("tollgate_usage_view_refreshes_total")),
            usage_refreshes_refused: Tally::new(counter!("tollgate_usage_view_refreshes_refused_total")),
            give_backs_untold: Tally::new(counter!("tollgate_quota_give_backs_untold_total")),
            buffer_full: Tally::new(counter!("tollgate_usage_buffer_full_total")),
            dropped_units: Tally::new(counter!("tollgate_usage_dropped_units_total")),
            anonymous_without_address: Tally::new(counter!("tollgate_anonymous_without_address_total")),
            recharges: RECHARGE_OUTCOMES.map(|o| Tally::new(counter!("tollgate_recharges_total", "outcome" => o))),
            exported_units: AtomicU64::new(0),
            events_applied: AtomicU64::new(0),
            events_duplicate: AtomicU64::new(0),
            events_refused: AtomicU64::new(0),
            shadow_would_refuse: AtomicU64::new(0),
        }
    }

    /// A recharge's outcome: its total and its metric at once.
    pub(crate) fn recharge(&self, outcome: RechargeOutcome) {
        self.recharges[outcome as usize].add(1);
    }

    /// Adds `n` to a total that has no metric of its own.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A usage event processed: its total and its metric (labelled by outcome) at once.
    pub(crate) fn event(&self, metrics: &Metrics, outcome: ProcessedAs) {
        let total = match outcome {
            ProcessedAs::Applied => &self.events_applied,
            ProcessedAs::Duplicate => &self.events_duplicate,
            ProcessedAs::Refused(_) => &self.events_refused,
        };
        Self::add(total, 1);
        metrics.events(outcome).increment(1);
    }

    /// A refusal shadow mode let through: its total and its metric (labelled by reason) at
    /// once.
    pub(crate) fn would_refuse(&self, metrics: &Metrics, kind: RejectionKind) {
        Self::add(&self.shadow_would_refuse, 1);
        metrics.would_refuse(kind).increment(1);
    }
}

/// The fields of [`Stats`] that are levels (what is held now), not running totals.
#[cfg(feature = "otel")]
const LEVELS: [&str; 7] = [
    "tracked_tenants",
    "open_values",
    "tracked_clients",
    "held_rate_states",
    "response_bytes_buffered",
    "holds_open",
    "units_held",
];

#[cfg(feature = "otel")]
impl Stats {
    /// Each field by its name, its value, and whether it is a level rather than a running
    /// total: read from `Debug` (a flat struct of counts), so a new field is never left out.
    pub(crate) fn entries(&self) -> Vec<(String, u64, bool)> {
        let text = format!("{self:?}");
        let fields = text.trim_start_matches("Stats").trim().trim_start_matches('{').trim_end_matches('}');
        fields
            .split(',')
            .filter_map(|pair| {
                let (name, value) = pair.split_once(':')?;
                let name = name.trim();
                Some((name.to_owned(), value.trim().parse().ok()?, LEVELS.contains(&name)))
            })
            .collect()
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
    /// Units committed to the store, of every meter but `spend`.
    pub flushed_units: u64,
    /// Money committed to the store (the reserved meter `spend`), in nano-units of `[billing]
    /// currency`. Metric `tollgate_usage_flushed_spend_nanos_total`.
    pub flushed_spend_nanos: u64,
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
    /// Verified payments whose details Stripe refused to read for the key (401, 403, 404),
    /// answered 500 so Stripe delivers them again
    /// ([`WebhookOutcome::ApiRefused`](crate::billing::WebhookOutcome::ApiRefused)).
    pub webhooks_api_refused: u64,
    /// Stripe's meter error events received (meter events it refused after taking them),
    /// verified with the event destination's secret.
    pub meter_errors: u64,
    /// Tenants evicted (idle, or over the cap).
    pub evictions: u64,
    /// Tenants served their plan without their overrides, which do not fit it (a plan change
    /// made without looking at them): logged as errors. Counted each time this node begins
    /// serving such a tenant (its first request, and again after an eviction or a reload), so
    /// it keeps rising while the overrides are not mended.
    pub overrides_not_served: u64,
    /// Store calls of the request path not made because the store had failed several times in
    /// a row (their requests' `on_store_error` applied at once).
    pub store_fast_failures: u64,
    /// Requests with a credential the directory had just said it did not know, answered
    /// without asking it again.
    pub negative_hits: u64,
    /// Refreshes of tenants' own usage views (the usage route,
    /// [`Tollgate::tenant_usage`](crate::Tollgate::tenant_usage)): at most one per tenant per
    /// second on a node, however often it is polled.
    pub usage_refreshes: u64,
    /// Refreshes of usage views not made because the node's budget (`usage.view_refresh_rate`)
    /// was spent: the poll was answered the tenant's view of the last minute if one was kept,
    /// else 503 (counted either way).
    pub usage_refreshes_refused: u64,
    /// Quotas whose units a job (its reservation recorded fewer, or released) or a duplicate
    /// event gave back to the lease could not be told to the store at once, after the write:
    /// the report failed (sent again by the worker's next pass), or the quota's call was under
    /// way (told by that call or the next flush). The store counts those units used until
    /// told (a node killed first leaves them spent:
    /// docs/architecture.md, "Stranded units"). Metric `tollgate_quota_give_backs_untold_total`.
    pub give_backs_untold: u64,
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
    /// Holds open on this node now ([`TenantContext::hold`](crate::TenantContext::hold)).
    pub holds_open: u64,
    /// Units those holds hold now (taken from the limits, not recorded yet).
    pub units_held: u64,
    /// Holds settled by the node past their `hold_timeout`, as recorded so far.
    pub holds_expired: u64,
    /// Records through a hold after the node settled it (past its `hold_timeout`, or at
    /// shutdown): charged as debt.
    pub records_after_settle: u64,
    /// Holds refused because the node had `limits.max_holds` open.
    pub holds_refused_full: u64,
    /// Records through a hold beyond what it held (taken from the node's lease, or past the
    /// limit as debt when it is spent, with [`Overrun::Debt`](crate::Overrun)): a handler that
    /// recorded more than it held, or a route whose actual (`actual_header`) says more than
    /// its estimate. Where they happen, the limit holds only as far as the lease covers them;
    /// the metric is `tollgate_holds_total{outcome="overrun"}`.
    pub hold_overruns: u64,
    /// Recharges this node's refills claimed (or took again once their delivery lapsed).
    pub recharges_claimed: u64,
    /// Recharges this node's worker charged: Stripe said their invoice was paid.
    pub recharges_charged: u64,
    /// Recharges closed by their `invoice.paid` on this node (their units granted).
    pub recharges_paid: u64,
    /// Payment failures of recharges this node counted (its worker's, or a webhook's).
    pub recharges_failed: u64,
    /// Recharges the month's limit stopped (once per tenant, meter and month).
    pub recharges_limited: u64,
    /// Recharges this node's worker found paid an hour or more after their claim with no
    /// `invoice.paid` handled (the endpoint not subscribed to it, or down past Stripe's 3 days
    /// of retries), and credited itself through the top-up path (logged at error level).
    pub recharges_credited_unannounced: u64,
    /// Values of open dimensions (`max_values`) this node's tenants' states know now: at most
    /// each tenant's `max_values` per open meter, and 1,048,576 on the node.
    pub open_values: u64,
}

impl Totals {
    pub(crate) fn snapshot(&self, tracked_tenants: usize) -> Stats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            tracked_tenants,
            flushes: self.flushes.get(),
            flushed_units: self.flushed_units.get(),
            flushed_spend_nanos: self.flushed_spend_nanos.get(),
            flush_errors: self.flush_errors.get(),
            store_errors: self.store_errors.get(),
            exported_events: self.exported_events.get(),
            exported_units: l(&self.exported_units),
            dead_letters: self.dead_letters.get(),
            export_retries: self.export_retries.get(),
            unbillable_windows: self.unbillable_windows.get(),
            late_revisions: self.late_revisions.get(),
            events_past_limit: self.events_past_limit.get(),
            waiting_windows: self.waiting_windows.get(),
            unconfirmed_exports: self.unconfirmed_exports.get(),
            webhooks_applied: self.webhooks_applied.get(),
            webhooks_ignored: self.webhooks_ignored.get(),
            webhooks_rejected: self.webhooks_rejected.get(),
            webhooks_not_credited: self.webhooks_not_credited.get(),
            webhooks_api_refused: self.webhooks_api_refused.get(),
            meter_errors: self.meter_errors.get(),
            evictions: self.evictions.get(),
            overrides_not_served: self.overrides_not_served.get(),
            store_fast_failures: self.store_fast_failures.get(),
            negative_hits: self.negative_hits.get(),
            usage_refreshes: self.usage_refreshes.get(),
            usage_refreshes_refused: self.usage_refreshes_refused.get(),
            give_backs_untold: self.give_backs_untold.get(),
            buffer_full: self.buffer_full.get(),
            dropped_units: self.dropped_units.get(),
            events_applied: l(&self.events_applied),
            events_duplicate: l(&self.events_duplicate),
            events_refused: l(&self.events_refused),
            shadow_would_refuse: l(&self.shadow_would_refuse),
            anonymous_without_address: self.anonymous_without_address.get(),
            held_rate_states: 0,
            rate_states_dropped: 0,
            tracked_clients: 0,
            responses_stored: 0,
            responses_not_stored: 0,
            response_bytes_buffered: 0,
            holds_open: 0,
            units_held: 0,
            holds_expired: 0,
            records_after_settle: 0,
            holds_refused_full: 0,
            hold_overruns: 0,
            recharges_claimed: self.recharges[RechargeOutcome::Claimed as usize].get(),
            recharges_charged: self.recharges[RechargeOutcome::Charged as usize].get(),
            recharges_paid: self.recharges[RechargeOutcome::Paid as usize].get(),
            recharges_failed: self.recharges[RechargeOutcome::Failed as usize].get(),
            recharges_limited: self.recharges[RechargeOutcome::Limited as usize].get(),
            recharges_credited_unannounced: self.recharges[RechargeOutcome::CreditedUnannounced as usize].get(),
            open_values: 0,
        }
    }
}

/// How an event was processed, for the metric.
pub(crate) enum ProcessedAs {
    Applied,
    Duplicate,
    Refused(&'static str),
}

#[cfg(all(test, feature = "otel"))]
mod otel_tests {
    use super::*;

    #[test]
    fn every_field_is_an_entry_and_the_levels_are_known() {
        let stats = Stats { tracked_tenants: 3, holds_open: 2, flushes: 7, ..Stats::default() };
        let entries = stats.entries();
        assert_eq!(entries.len(), format!("{stats:?}").matches(':').count(), "every field");
        let find = |n: &str| entries.iter().find(|(name, _, _)| name == n).cloned().unwrap();
        assert_eq!(find("tracked_tenants"), ("tracked_tenants".into(), 3, true));
        assert_eq!(find("flushes"), ("flushes".into(), 7, false));
        assert!(LEVELS.iter().all(|l| entries.iter().any(|(n, _, level)| n == l && *level)), "a level renamed");
    }
}
