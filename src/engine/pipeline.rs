//! The background side of the engine: flushing usage to the store, exporting closed windows
//! to the billing sink, evicting idle tenants, refilling leases, reloading, shutting down.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use super::{
    engine::{with_timeout, Prefetch},
    metrics::Totals,
    Tollgate,
};
use crate::{
    billing::{identifier, MeterEvent, SinkError},
    config::{Config, MeterId, TenantId},
    plan::Runtime,
    store::{CommitOutcome, FlushId, StoreError, UsageBatch, UsageRecord},
    tenant::Tenant,
};

/// Usage batches not yet committed, retried in order with their own ids.
pub(crate) struct Pipeline {
    pending: VecDeque<UsageBatch>,
    seq: u64,
    node: String,
}

impl Pipeline {
    pub(crate) fn new() -> Self {
        use std::hash::BuildHasher;
        let nonce = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        Self { pending: VecDeque::new(), seq: 0, node: format!("{nonce:016x}") }
    }
}

/// What one [`Tollgate::flush`] committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// Batches committed.
    pub batches: usize,
    /// Usage records in them.
    pub records: usize,
    /// Units in them.
    pub units: u64,
}

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

/// What [`Tollgate::shutdown`] drained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The final flush.
    pub flush: FlushReport,
    /// The final export of closed windows.
    pub export: ExportReport,
}

const COMMIT_ATTEMPTS: u32 = 3;

impl Tollgate {
    /// Commits all usage recorded so far to the store, exactly once: a batch that fails is
    /// kept and retried first, with the same id, by the next flush (no new usage is drained
    /// while one is pending; it waits in the bounded per-tenant counters).
    ///
    /// # Errors
    /// The store error that stopped the flush; nothing is lost.
    pub async fn flush(&self) -> Result<FlushReport, StoreError> {
        let mut p = self.shared.pipeline.lock().await;
        self.shared.clock.resync();
        let mut report = FlushReport::default();
        self.commit_pending(&mut p, &mut report).await?;
        let (records, leases) = self.drain();
        self.return_leases(leases).await;
        if !records.is_empty() {
            let max = self.shared.store.max_batch_records().max(1);
            for chunk in records.chunks(max) {
                p.seq += 1;
                let id = FlushId(format!("{}-{:010}", p.node, p.seq));
                p.pending.push_back(UsageBatch { id, records: chunk.to_vec() });
            }
        }
        self.commit_pending(&mut p, &mut report).await?;
        if report.batches > 0 {
            tracing::debug!(batches = report.batches, records = report.records, units = report.units, "usage flushed");
        }
        Ok(report)
    }

    async fn commit_pending(&self, p: &mut Pipeline, report: &mut FlushReport) -> Result<(), StoreError> {
        let timeout = self.shared.runtime.load().config.usage.store_timeout.max(Duration::from_secs(2));
        while let Some(batch) = p.pending.front() {
            let mut attempt = 0;
            let outcome = loop {
                attempt += 1;
                match with_timeout(timeout, self.shared.store.commit_usage(batch)).await {
                    Ok(outcome) => break Ok(outcome),
                    Err(e) if attempt < COMMIT_ATTEMPTS => {
                        tracing::debug!(error = %e, attempt, "usage commit failed, retrying");
                        tokio::time::sleep(Duration::from_millis(50 << (2 * attempt))).await;
                    }
                    Err(e) => break Err(e),
                }
            };
            match outcome {
                Ok(outcome) => {
                    let units: u64 = batch.records.iter().map(|r| r.quantity).sum();
                    if outcome == CommitOutcome::Applied {
                        report.units += units;
                    }
                    report.batches += 1;
                    report.records += batch.records.len();
                    let t = &self.shared.totals;
                    Totals::add(&t.flushes, 1);
                    Totals::add(&t.flushed_units, units);
                    self.shared.metrics.flushes.increment(1);
                    self.shared.metrics.flushed_units.increment(units);
                    p.pending.pop_front();
                }
                Err(e) => {
                    Totals::add(&self.shared.totals.flush_errors, 1);
                    self.shared.metrics.flush_errors.increment(1);
                    tracing::warn!(error = %e, pending = p.pending.len(), "usage flush failed; the batch is kept and retried");
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Takes the usage of every tenant (retired ones included), one record per (tenant, meter,
    /// window). Also returns the retired states nobody holds any more (their leases go back).
    fn drain(&self) -> (Vec<UsageRecord>, Vec<Tenant>) {
        // A live tenant is in the table once: its records need no merging.
        let mut records = Vec::new();
        let mut seen = std::collections::HashSet::new();
        self.shared.table.for_each(|s| {
            s.drain_usage(|m, window_start, quantity| {
                records.push(UsageRecord {
                    tenant: s.id.clone(),
                    meter: s.plan.meters.ids[m].clone(),
                    window_start,
                    quantity,
                });
            });
        });
        // Retired states may share a tenant with a live one (evicted, then seen again): merge.
        let mut dropped = Vec::new();
        let mut retired_usage: HashMap<(TenantId, MeterId, i64), u64> = HashMap::new();
        {
            let mut retired = self.shared.table.retired.lock().unwrap_or_else(|e| e.into_inner());
            retired.retain(|s| {
                // Checked before draining: with no other holder, nothing can record after.
                let sole = Tenant::count(s) == 1;
                s.drain_usage(|m, window, q| {
                    *retired_usage.entry((s.id.clone(), s.plan.meters.ids[m].clone(), window)).or_default() += q;
                });
                if sole {
                    dropped.push(s.clone());
                }
                !sole
            });
        }
        if !retired_usage.is_empty() {
            for r in &mut records {
                if let Some(q) = retired_usage.remove(&(r.tenant.clone(), r.meter.clone(), r.window_start)) {
                    r.quantity += q;
                }
            }
            records.extend(retired_usage.into_iter().map(|((tenant, meter, window_start), quantity)| UsageRecord {
                tenant,
                meter,
                window_start,
                quantity,
            }));
        }
        debug_assert!(records.iter().all(|r| seen.insert((r.tenant.clone(), r.meter.clone(), r.window_start))));
        (records, dropped)
    }

    /// Gives the unused units of these states' current leases back to the store, and owes
    /// what they used beyond them.
    async fn return_leases(&self, states: Vec<Tenant>) {
        for state in states {
            for cell in state.quotas() {
                self.return_lease(cell).await;
            }
        }
    }

    /// Sends the usage of closed windows (ended more than `usage.grace` ago) to the billing
    /// sink, exactly once per (tenant, meter, window, revision). Does nothing without a sink.
    ///
    /// # Errors
    /// A store error; what was sent before it stays marked.
    pub async fn export(&self) -> Result<ExportReport, StoreError> {
        let mut report = ExportReport::default();
        let Some(sink) = self.shared.sink.clone() else {
            return Ok(report);
        };
        let _serial = self.shared.pipeline.lock().await;
        let rt = self.shared.runtime.load_full();
        let store = &self.shared.store;
        let window = rt.config.usage.window.as_secs() as i64;
        let grace = rt.config.usage.grace.as_secs() as i64;
        let before = self.shared.clock.unix_secs() - grace - window + 1;
        loop {
            let page = store.pending_exports(before, 100).await?;
            let mut progressed = false;
            for agg in page {
                let Some(agg) = store.begin_export(&agg).await? else {
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
                    timestamp: agg.key.window_start + window - 1,
                };
                match sink.send(&event).await {
                    Ok(()) => {
                        if store.finish_export(&agg).await? {
                            progressed = true;
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
                        progressed = true;
                        report.dead_letters += 1;
                        Totals::add(&self.shared.totals.dead_letters, 1);
                        self.shared.metrics.dead_letters.increment(1);
                    }
                }
            }
            if !progressed {
                break;
            }
        }
        Ok(report)
    }

    /// Evicts tenants idle for longer than `limits.idle_timeout`, then the least recently
    /// seen ones while more than `limits.max_tenants` are held. Their usage is flushed by the
    /// next flush and their leases are given back. Returns how many were evicted.
    pub async fn sweep(&self) -> usize {
        let rt = self.shared.runtime.load_full();
        let limits = &rt.config.limits;
        let cutoff = self.shared.clock.unix_secs() - limits.idle_timeout.as_secs() as i64;
        let mut seen = self.shared.table.last_seen();
        let (mut evict, mut keep): (Vec<_>, Vec<_>) = seen.drain(..).partition(|(t, _)| *t < cutoff);
        if keep.len() > limits.max_tenants {
            keep.sort_by_key(|(t, _)| *t);
            let extra = keep.len() - limits.max_tenants;
            evict.extend(keep.drain(..extra));
        }
        let states = self.shared.table.evict(evict.into_iter().map(|(_, id)| id));
        let n = states.len();
        if n > 0 {
            Totals::add(&self.shared.totals.evictions, n as u64);
            self.shared.metrics.evictions.increment(n as u64);
            self.shared.metrics.tenants.set(self.shared.table.len() as f64);
            tracing::debug!(evicted = n, "tenants evicted");
        }
        self.return_leases(states).await;
        n
    }

    /// Replaces the configuration of a running engine. Quota counters and recorded usage are
    /// kept (they live in the store and the usage pipeline); every tenant is resolved again
    /// under its new plan on its next request, with a fresh token bucket.
    pub async fn reload(&self, config: Config) {
        let rt = Runtime::compile(config, &self.shared.metrics, &self.shared.clock);
        self.shared.runtime.store(Arc::new(rt));
        let states = self.shared.table.evict_all();
        self.return_leases(states).await;
        tracing::info!("configuration reloaded");
    }

    /// Flushes, exports closed windows and gives every lease back; stops the worker. Call it
    /// once the server has stopped taking requests.
    ///
    /// # Errors
    /// The store error that stopped the final flush or export.
    pub async fn shutdown(&self) -> Result<ShutdownReport, StoreError> {
        let _ = self.shared.shutdown.send(true);
        let flush = self.flush().await?;
        let export = self.export().await?;
        let mut live = Vec::new();
        self.shared.table.for_each(|s| live.push(s.clone()));
        self.return_leases(live).await;
        Ok(ShutdownReport { flush, export })
    }

    /// Refills a lease that fell below its low watermark.
    pub(crate) async fn prefetch(&self, job: Prefetch) {
        // A retired state needs no refill: its lease goes back when its last request is done.
        let state = job.state;
        if state.is_evicted() {
            if let Some(cell) = state.quota(job.meter) {
                cell.prefetch_done();
            }
            return;
        }
        let Some(cell) = state.quota(job.meter) else {
            return;
        };
        let timeout = self.shared.runtime.load().config.usage.store_timeout;
        let now = self.shared.clock.unix_secs();
        let result = with_timeout(timeout, async {
            let _guard = cell.lock().lock().await;
            self.settle_inflight(cell).await?;
            if cell.lease() < cell.low() {
                self.refill_locked(&state, cell, now, 0).await?;
            }
            Ok(())
        })
        .await;
        cell.prefetch_done();
        if let Err(e) = result {
            self.store_error("prefetch lease", &e);
        }
    }
}

fn event_name(rt: &Runtime, meter: &MeterId) -> String {
    rt.config.meters.iter().find(|m| &m.id == meter).map_or_else(|| meter.to_string(), |m| m.event_name.clone())
}
