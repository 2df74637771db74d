//! Flushing: usage drained from the tenants' counters every flush (even while the store is
//! down, so no counter slot is ever reused by a later window), merged per (tenant, meter,
//! window), and committed to the store in batches, each exactly once under its own id.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use super::{engine::with_timeout, Tollgate};
use crate::metrics::Totals;
use crate::{
    config::{MeterId, StoreErrorPolicy, TenantId},
    store::{CommitOutcome, FlushId, StoreError, UsageBatch, UsageRecord},
    tenant::Tenant,
};

/// Usage drained but not yet committed: formed batches (retried first, in order, with their
/// own ids) and usage not yet in a batch.
pub(crate) struct Pipeline {
    pending: VecDeque<UsageBatch>,
    staged: HashMap<(TenantId, MeterId, i64), u64>,
    seq: u64,
    node: String,
}

impl Pipeline {
    pub(crate) fn new() -> Self {
        Self { pending: VecDeque::new(), staged: HashMap::new(), seq: 0, node: Self::draw_node() }
    }

    fn draw_node() -> String {
        format!("{:016x}", crate::tenant::draw_u64())
    }

    /// Draws a new node id for the batches formed from now on (after a SnapStart restore).
    /// Batches already formed keep theirs: retried by every copy, the store takes one.
    pub(crate) fn renew_node(&mut self) {
        self.node = Self::draw_node();
        self.seq = 0;
    }

    /// Records drained and not committed.
    fn records(&self) -> usize {
        self.pending.iter().map(|b| b.records.len()).sum::<usize>() + self.staged.len()
    }

    /// (records, units) drained and not committed.
    /// The staged records of `tenant` (drained from the tenant states, not yet sealed in a
    /// batch).
    pub(crate) fn staged_of<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> impl Iterator<Item = (&'a (TenantId, MeterId, i64), u64)> + 'a {
        self.staged.iter().filter(move |((t, _, _), _)| t == tenant).map(|(k, q)| (k, *q))
    }

    pub(crate) fn held(&self) -> (usize, u64) {
        let batches = self.pending.iter().flat_map(|b| b.records.iter().map(|r| r.quantity));
        let (n, units) = batches.fold((0, 0u64), |(n, u), q| (n + 1, u + q));
        (n + self.staged.len(), units + self.staged.values().sum::<u64>())
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

const COMMIT_ATTEMPTS: u32 = 3;

impl Tollgate {
    /// Commits all usage recorded so far to the store, exactly once: a batch that fails is
    /// kept and retried first, with the same id, by the next flush. Usage is drained from the
    /// tenants' counters even when the store is down (held in memory, merged per tenant,
    /// meter and window, up to a bound), so an outage longer than a window keeps every
    /// window's usage in its own window.
    ///
    /// # Errors
    /// The store error that stopped the flush; nothing is lost.
    pub async fn flush(&self) -> Result<FlushReport, StoreError> {
        let mut p = self.shared.pipeline.lock().await;
        self.shared.clock.resync();
        let mut report = FlushReport::default();
        let dropped = self.drain(&mut p);
        self.return_leases(dropped).await;
        self.commit_pending(&mut p, &mut report).await?;
        if !p.staged.is_empty() {
            let records: Vec<UsageRecord> = p
                .staged
                .drain()
                .map(|((tenant, meter, window_start), quantity)| {
                    UsageRecord::new(tenant, meter, window_start, quantity)
                })
                .collect();
            let max = self.shared.stores.usage.max_batch_records().max(1);
            for chunk in records.chunks(max) {
                p.seq += 1;
                let id = FlushId::new(format!("{}-{:010}", p.node, p.seq));
                p.pending.push_back(UsageBatch::new(id, chunk.to_vec()));
            }
        }
        self.commit_pending(&mut p, &mut report).await?;
        // Everything held was taken: the buffer has room again.
        self.shared.buffer_full.store(false, std::sync::atomic::Ordering::Relaxed);
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
                match with_timeout(timeout, self.shared.stores.usage.commit_usage(batch)).await {
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
                    let (records, units) = p.held();
                    tracing::warn!(error = %e, records, units, "usage flush failed; the usage is kept and retried");
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Moves the usage of every tenant (retired ones included) into the staged records, one
    /// per (tenant, meter, window). Returns the retired states nobody holds any more (their
    /// leases go back).
    fn drain(&self, p: &mut Pipeline) -> Vec<Tenant> {
        use std::sync::atomic::Ordering::Relaxed;
        let max = self.shared.runtime.load().config.usage.max_buffered_records;
        let mut room = max.saturating_sub(p.records());
        let was_full = self.shared.buffer_full.load(Relaxed);
        let (mut full, mut dropped_units) = (false, 0u64);
        let staged = &mut p.staged;
        // A pre-aggregated meter's usage is aggregated per window of the billing meter (an
        // hour or a day, which `usage.window` divides): its export sends that window's total.
        let rt = self.shared.runtime.load();
        let coarse: Vec<(&MeterId, i64)> =
            rt.config.meters.iter().filter_map(|m| m.aggregation.window_secs().map(|w| (&m.id, w))).collect();
        let mut add = |s: &Tenant, m: usize, window_start: i64, quantity: u64| {
            let meter = &s.plan.meters.ids[m];
            let window_start = match coarse.iter().find(|(id, _)| *id == meter) {
                Some((_, w)) => window_start - window_start.rem_euclid(*w),
                None => window_start,
            };
            let key = (s.id.clone(), meter.clone(), window_start);
            if let Some(q) = staged.get_mut(&key) {
                *q = q.saturating_add(quantity);
            } else if room > 0 || s.plan.on_store_error == StoreErrorPolicy::FailClosed {
                // Fail-closed usage is always kept: its tenants are refused while the buffer
                // is full, so only requests already admitted can pass the bound.
                room = room.saturating_sub(1);
                full |= room == 0;
                staged.insert(key, quantity);
            } else {
                full = true;
                dropped_units = dropped_units.saturating_add(quantity);
            }
        };
        self.shared.table.for_each(|s| s.drain_usage(|m, w, q| add(s, m, w, q)));
        let mut dropped = Vec::new();
        let mut retired = self.shared.table.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.retain(|s| {
            // Checked before draining: with no other holder, nothing can record after.
            let sole = Tenant::count(s) == 1;
            s.drain_usage(|m, w, q| add(s, m, w, q));
            if sole {
                dropped.push(s.clone());
            }
            !sole
        });
        drop(retired);
        let full = full || room == 0;
        self.shared.buffer_full.store(full, Relaxed);
        if full {
            Totals::add(&self.shared.totals.buffer_full, 1);
            self.shared.metrics.buffer_full.increment(1);
            Totals::add(&self.shared.totals.dropped_units, dropped_units);
            self.shared.metrics.dropped_units.increment(dropped_units);
            if !was_full || dropped_units > 0 {
                tracing::error!(
                    max,
                    dropped_units,
                    "the usage buffer is full (usage.max_buffered_records): fail-closed tenants are refused, \
                     fail-open usage past the bound is dropped"
                );
            }
        } else if was_full {
            tracing::warn!("the usage buffer has room again");
        }
        dropped
    }

    /// Gives the unused units of these states' current leases back to the store, and owes
    /// what they used beyond them.
    pub(crate) async fn return_leases(&self, states: Vec<Tenant>) {
        for state in states {
            for cell in state.quotas() {
                self.return_lease(cell).await;
            }
        }
    }
}
