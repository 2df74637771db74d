//! The billing export: aggregates of closed windows (or, at shutdown on a store that does not
//! outlive the process, of every window) become meter events, sent exactly once per (tenant,
//! meter, window, revision).

use super::Tollgate;
use crate::metrics::Totals;
use crate::{
    billing::{identifier, MeterEvent, SinkError},
    config::MeterId,
    plan::Runtime,
    store::{ExportClaim, ExportKey, StoreError},
};

/// What one [`Tollgate::export`] sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportReport {
    /// Events accepted by the sink.
    pub events: usize,
    /// Units in them.
    pub units: u64,
    /// Aggregates refused for good and parked.
    pub dead_letters: usize,
    /// Whether the sink asked to retry later (the rest waits for the next export).
    pub deferred: bool,
}

/// How many aggregates one store call lists.
const PAGE: usize = 100;

impl Tollgate {
    /// Sends the usage of closed windows (ended more than `usage.grace` ago) to the billing
    /// sink, exactly once per (tenant, meter, window, revision). Does nothing without a sink.
    ///
    /// # Errors
    /// A store error; what was sent before it stays marked.
    pub async fn export(&self) -> Result<ExportReport, StoreError> {
        let rt = self.shared.runtime.load_full();
        let window = rt.config.usage.window.as_secs() as i64;
        let grace = rt.config.usage.grace.as_secs() as i64;
        let before = self.shared.clock.unix_secs() - grace - window + 1;
        self.export_before(before).await
    }

    /// [`export`](Self::export) of the windows that start before `before` (Unix seconds); an
    /// event's timestamp is the last second of its window, or now if that is earlier.
    pub(crate) async fn export_before(&self, before: i64) -> Result<ExportReport, StoreError> {
        let mut report = ExportReport::default();
        let Some(sink) = self.shared.sink.clone() else {
            return Ok(report);
        };
        let _serial = self.shared.pipeline.lock().await;
        let rt = self.shared.runtime.load_full();
        let store = &self.shared.store;
        let window = rt.config.usage.window.as_secs() as i64;
        let now = self.shared.clock.unix_secs();
        // A cursor: aggregates that cannot progress (another node exports them, a revision
        // moved) are passed over, never starving the rest.
        let mut after: Option<ExportKey> = None;
        loop {
            let page = store.pending_exports(before, after.as_ref(), PAGE).await?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.key.clone());
            for agg in page {
                // Held for five minutes: a node that dies mid-export leaves it to another then.
                let claim = ExportClaim::new(self.shared.node, now, now + 300);
                let Some(agg) = store.begin_export(&agg, &claim).await? else {
                    continue;
                };
                let upto = agg.in_flight.unwrap_or(agg.quantity);
                let event = MeterEvent {
                    identifier: identifier(&agg.key.tenant, &agg.key.meter, agg.key.window_start, agg.revision),
                    event_name: event_name(&rt, &agg.key.meter),
                    tenant: agg.key.tenant.clone(),
                    customer: agg
                        .customer
                        .clone()
                        .or_else(|| rt.static_tenants.get(&agg.key.tenant).and_then(|t| t.customer.clone())),
                    meter: agg.key.meter.clone(),
                    window_start: agg.key.window_start,
                    window_end: agg.key.window_start + window,
                    value: upto.saturating_sub(agg.exported),
                    revision: agg.revision,
                    timestamp: (agg.key.window_start + window - 1).min(now),
                };
                match sink.send(&event).await {
                    Ok(()) => {
                        if store.finish_export(&agg).await? {
                            report.events += 1;
                            report.units += event.value;
                            Totals::add(&self.shared.totals.exported_events, 1);
                            Totals::add(&self.shared.totals.exported_units, event.value);
                            self.shared.metrics.exported_events.increment(1);
                        }
                    }
                    Err(SinkError::Retryable(e)) => {
                        tracing::warn!(error = %e, identifier = %event.identifier, "billing sink asked to retry later");
                        report.deferred = true;
                        return Ok(report);
                    }
                    Err(SinkError::Permanent(reason)) => {
                        tracing::error!(%reason, identifier = %event.identifier, tenant = %event.tenant,
                            meter = %event.meter, value = event.value, "billing sink refused a meter event; dead-lettered");
                        store.dead_letter(&agg, &reason).await?;
                        report.dead_letters += 1;
                        Totals::add(&self.shared.totals.dead_letters, 1);
                        self.shared.metrics.dead_letters.increment(1);
                    }
                }
            }
        }
        Ok(report)
    }
}

fn event_name(rt: &Runtime, meter: &MeterId) -> String {
    rt.config.meters.iter().find(|m| &m.id == meter).map_or_else(|| meter.to_string(), |m| m.event_name.clone())
}
