//! Reconciliation: what the billing system holds, hour by hour, against the store's ledger of
//! what it accepted.
//!
//! For each (customer, meter) with ledger entries (or open dead letters) in the range, one
//! paced read of the billing system's hourly totals; each hour is compared with the sum of the
//! entries stamped in it. Hours exported less than `export.reconcile_after` ago are settling
//! (the billing system's totals are eventually consistent) and not compared.
//!
//! What it does about a difference, only when asked to fix (`fix`):
//! - the billing system lacks entries of an hour (the whole hour, or one entry's value): once
//!   two passes at least `reconcile_after` apart found them lacking, and their identifiers are
//!   past the billing system's de-duplication horizon (24 hours after export), their values are
//!   sent again as new revisions, once;
//! - it holds more than the ledger: reported, never "fixed" by sending negative values;
//! - an open dead letter that may have been taken (`unconfirmed`, `unsettled`, or failed
//!   without a status): confirmed when the billing system holds its value on top of the
//!   ledger's, requeued when two passes apart found it lacking.
//!
//! Anything else (several letters in one hour, a difference matching no entry) is reported as
//! ambiguous, for a person.

use std::collections::{BTreeMap, BTreeSet};

use super::export::Exporter;
use crate::{
    billing::SinkError,
    config::{MeterAggregation, MeterId, TenantId},
    plan::Runtime,
    store::{DeadLetter, ExportKey, LedgerEntry, StoreError, UsageAggregate, LEDGER_KEPT_SECS},
};

/// Stripe de-duplicates meter event identifiers for at least 24 hours: an event proven lacking
/// is sent again under a new identifier only past this, so that the old one, if it was merely
/// late, cannot be counted beside it.
const DEDUPLICATION_SECS: i64 = 24 * 3600;
/// At most this many rows of drift are kept in a report (the totals count them all).
const MAX_DRIFT_ROWS: usize = 10_000;
/// Ledger entries read per store call.
const PAGE: usize = 500;
const HOUR: i64 = 3600;

/// What a reconciliation compares: the hours from `from` to `to` (Unix seconds, rounded out to
/// whole hours, at most the 35 days the ledger keeps), for one tenant or all; with `fix`, it
/// acts on what it proves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileRequest {
    /// The first hour compared.
    pub from: i64,
    /// The end of the range.
    pub to: i64,
    /// Only this tenant, if set.
    pub tenant: Option<TenantId>,
    /// Whether to act on what is proven (send lost events again, settle dead letters), or
    /// only report.
    pub fix: bool,
}

impl ReconcileRequest {
    /// A report of the hours from `from` to `to`, for every tenant, changing nothing.
    #[must_use]
    pub fn new(from: i64, to: i64) -> Self {
        Self { from, to, tenant: None, fix: false }
    }

    /// Only `tenant`.
    #[must_use]
    pub fn tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Acts on what is proven (see [`Tollgate::reconcile`](crate::Tollgate::reconcile)).
    #[must_use]
    pub fn fix(mut self, fix: bool) -> Self {
        self.fix = fix;
        self
    }
}

/// What was done about one hour of drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DriftAction {
    /// Reported only: the billing system holds more than the ledger (never fixed by sending
    /// negative values), or the request did not ask to fix.
    Reported,
    /// Found lacking, first at this time (Unix seconds): acted on once a pass at least
    /// `export.reconcile_after` later finds it lacking too, and, for an exported event, once
    /// its identifier is past the billing system's de-duplication horizon.
    Lacking {
        /// When it was first found lacking.
        since: i64,
    },
    /// Proven lost: its value is back in line for export as a new revision, with a new
    /// identifier (the next export pass sends it).
    Resent,
    /// Dead letters the billing system holds: marked exported.
    Confirmed,
    /// Dead letters proven never taken: back in line as new revisions.
    Requeued,
    /// The difference matches no entry, or the hour has several open dead letters: for a
    /// person (`tollgate export --dead-letters`, the billing system's dashboard).
    Ambiguous,
}

impl DriftAction {
    /// A short label: `reported`, `lacking`, `resent`, `confirmed`, `requeued`, `ambiguous`.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Reported => "reported",
            Self::Lacking { .. } => "lacking",
            Self::Resent => "resent",
            Self::Confirmed => "confirmed",
            Self::Requeued => "requeued",
            Self::Ambiguous => "ambiguous",
        }
    }
}

/// One hour of one (tenant, meter) where the billing system and the ledger differ, or where
/// dead letters were settled.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Drift {
    /// The tenant.
    pub tenant: TenantId,
    /// Its billing customer.
    pub customer: String,
    /// The meter.
    pub meter: MeterId,
    /// The start of the hour (Unix seconds).
    pub hour: i64,
    /// What the ledger says the billing system holds for the hour.
    pub expected: u64,
    /// What the billing system holds for the hour (rounded to a whole number).
    pub held: u64,
    /// Units of open dead letters stamped in the hour (which it may or may not hold).
    pub letters: u64,
    /// What was done.
    pub action: DriftAction,
}

/// What one reconciliation pass found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// Hours of a (customer, meter) compared.
    pub compared: usize,
    /// Hours not compared yet: exported less than `export.reconcile_after` ago.
    pub settling: usize,
    /// Ledger entries of meters that are not sums (pre-aggregated), not compared: the
    /// billing meter keeps the newest value of a window, not a sum.
    pub not_compared: usize,
    /// Reads of the billing system.
    pub reads: usize,
    /// Units the billing system lacks, over the hours compared.
    pub lacking_units: u64,
    /// Units the billing system holds beyond the ledger, over the hours compared.
    pub surplus_units: u64,
    /// Events proven lost and put back in line for export.
    pub resent: usize,
    /// Dead letters confirmed (the billing system holds them).
    pub confirmed: usize,
    /// Dead letters requeued (proven never taken).
    pub requeued: usize,
    /// The hours of drift, in (customer, meter, hour) order, at most 10,000.
    pub drift: Vec<Drift>,
    /// Hours of drift beyond those listed.
    pub more_drift: usize,
}

impl ReconcileReport {
    fn push(&mut self, drift: Drift) {
        if self.drift.len() < MAX_DRIFT_ROWS {
            self.drift.push(drift);
        } else {
            self.more_drift += 1;
        }
    }
}

/// Why a reconciliation could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    /// The engine has no billing sink, or one that cannot be read back (a file).
    #[error("the billing sink cannot be read back: nothing to reconcile with")]
    Unreadable,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The billing system failed.
    #[error("the billing system failed: {0}")]
    Sink(#[from] SinkError),
}

/// The entries of one hour of one (customer, meter).
#[derive(Debug, Default)]
struct Cell {
    /// Exported and not superseded: what the billing system should hold.
    expected: Vec<LedgerEntry>,
    /// Open dead letters that may have been taken.
    letters: Vec<LedgerEntry>,
    /// An entry exported less than `reconcile_after` ago.
    settling: bool,
}

/// (customer, event name) -> (its meter, hour -> cell).
type Cells = BTreeMap<(String, String), (MeterId, BTreeMap<i64, Cell>)>;

impl Exporter {
    /// See [`Tollgate::reconcile`](crate::Tollgate::reconcile).
    pub(crate) async fn reconcile(
        &self,
        rt: &Runtime,
        request: &ReconcileRequest,
    ) -> Result<ReconcileReport, ReconcileError> {
        let sink = self.sink.clone().ok_or(ReconcileError::Unreadable)?;
        let store = &self.deps.stores.roles.usage;
        let settings = &rt.config.export;
        let now = self.deps.clock.unix_secs();
        let after = settings.reconcile_after.as_secs() as i64;
        let from = floor_hour(request.from.max(now - LEDGER_KEPT_SECS));
        let to = floor_hour(request.to.saturating_add(HOUR - 1)).min(floor_hour(now) + HOUR);
        let mut report = ReconcileReport::default();
        let mut cells: Cells = BTreeMap::new();
        let wanted = |tenant: &TenantId| request.tenant.as_ref().is_none_or(|t| t == tenant);

        // The ledger, hour by hour.
        let mut hour = from;
        while hour < to {
            let mut cursor: Option<(ExportKey, u32)> = None;
            loop {
                let page = store.ledger(hour, cursor.as_ref().map(|(k, r)| (k, *r)), PAGE).await?;
                let Some(last) = page.last() else { break };
                cursor = Some((last.key.clone(), last.revision));
                let full = page.len() == PAGE;
                for entry in page {
                    let Some(customer) = entry.send.customer.clone() else { continue };
                    if !wanted(&entry.key.tenant) || entry.exported_at.is_none() || entry.superseded {
                        continue;
                    }
                    if aggregation(rt, &entry.key.meter) != MeterAggregation::Sum {
                        report.not_compared += 1;
                        continue;
                    }
                    let (_, hours) = cells
                        .entry((customer, entry.send.event_name.clone()))
                        .or_insert_with(|| (entry.key.meter.clone(), BTreeMap::new()));
                    let cell = hours.entry(hour).or_default();
                    cell.settling |= entry.exported_at.is_some_and(|at| at > now - after);
                    cell.expected.push(entry);
                }
                if !full {
                    break;
                }
            }
            hour += HOUR;
        }

        // The open dead letters that may have been taken, whatever their hour.
        let mut cursor: Option<ExportKey> = None;
        loop {
            let page = store.dead_letters(cursor.as_ref(), 100).await?;
            let Some(last) = page.last() else { break };
            cursor = Some(last.key.clone());
            for letter in page {
                let Some(entry) = observable(&letter) else { continue };
                if !wanted(&entry.key.tenant)
                    || entry.send.timestamp < now - LEDGER_KEPT_SECS
                    || aggregation(rt, &entry.key.meter) != MeterAggregation::Sum
                {
                    continue;
                }
                let customer = entry.send.customer.clone().unwrap_or_default();
                let (_, hours) = cells
                    .entry((customer, entry.send.event_name.clone()))
                    .or_insert_with(|| (entry.key.meter.clone(), BTreeMap::new()));
                let cell = hours.entry(entry.hour()).or_default();
                cell.letters.push(entry);
            }
        }
        // Hours of letters outside the range hold ledger entries too: read them.
        for ((customer, event_name), (_, hours)) in &mut cells {
            let outside: Vec<i64> = hours.keys().copied().filter(|h| *h < from || *h >= to).collect();
            for hour in outside {
                let mut cursor: Option<(ExportKey, u32)> = None;
                loop {
                    let page = store.ledger(hour, cursor.as_ref().map(|(k, r)| (k, *r)), PAGE).await?;
                    let Some(last) = page.last() else { break };
                    cursor = Some((last.key.clone(), last.revision));
                    let full = page.len() == PAGE;
                    let cell = hours.entry(hour).or_default();
                    for entry in page {
                        if entry.send.customer.as_deref() == Some(customer.as_str())
                            && &entry.send.event_name == event_name
                            && entry.exported_at.is_some()
                            && !entry.superseded
                        {
                            cell.settling |= entry.exported_at.is_some_and(|at| at > now - after);
                            cell.expected.push(entry);
                        }
                    }
                    if !full {
                        break;
                    }
                }
            }
        }

        // One read per (customer, meter), paced with the export's calls.
        let (mut lacking, mut surplus) = (0u64, 0u64);
        for ((customer, event_name), (meter, hours)) in cells {
            let (Some(first), Some(last)) = (hours.keys().next().copied(), hours.keys().next_back().copied()) else {
                continue;
            };
            let (read_from, read_to) = (first.min(from), (last + HOUR).max(to));
            self.pacer.wait(settings.calls_per_second).await;
            report.reads += 1;
            let held = sink
                .held_by_hour(&event_name, &customer, read_from, read_to)
                .await?
                .ok_or(ReconcileError::Unreadable)?;
            let tenant = hours
                .values()
                .flat_map(|c| c.expected.iter().chain(&c.letters))
                .map(|e| e.key.tenant.clone())
                .next()
                .unwrap_or_else(|| TenantId::from(""));
            // Hours the billing system holds without a ledger entry (in the range compared).
            let mut all: BTreeSet<i64> = hours.keys().copied().collect();
            all.extend(held.iter().filter(|(_, v)| **v != 0.0).map(|(h, _)| *h).filter(|h| *h >= from && *h < to));
            let mut hours = hours;
            for hour in all {
                let cell = hours.remove(&hour).unwrap_or_default();
                if cell.settling || hour + HOUR > now - after {
                    report.settling += 1;
                    continue;
                }
                report.compared += 1;
                let held_units = held.get(&hour).copied().unwrap_or(0.0).round().max(0.0) as u64;
                let expected: u64 = cell.expected.iter().map(|e| e.send.value).sum();
                let letters: u64 = cell.letters.iter().map(|e| e.send.value).sum();
                let row = |action| Drift {
                    tenant: cell
                        .expected
                        .first()
                        .or(cell.letters.first())
                        .map_or_else(|| tenant.clone(), |e| e.key.tenant.clone()),
                    customer: customer.clone(),
                    meter: meter.clone(),
                    hour,
                    expected,
                    held: held_units,
                    letters,
                    action,
                };
                if !cell.letters.is_empty() {
                    let action = self.settle_letters(&cell, expected, held_units, now, after, request.fix).await?;
                    match action {
                        DriftAction::Confirmed => report.confirmed += cell.letters.len(),
                        DriftAction::Requeued => report.requeued += cell.letters.len(),
                        _ => {}
                    }
                    report.push(row(action));
                    continue;
                }
                if held_units == expected {
                    for e in cell.expected.iter().filter(|e| e.lacking_since.is_some()) {
                        store.clear_lacking(e).await?;
                    }
                    continue;
                }
                if held_units > expected {
                    surplus += held_units - expected;
                    tracing::warn!(%customer, %meter, hour, expected, held = held_units,
                        "the billing system holds more than tollgate exported: reported, never sent as negative values");
                    report.push(row(DriftAction::Reported));
                    continue;
                }
                let short = expected - held_units;
                lacking += short;
                let action = self.lost(&cell, short, now, after, request.fix).await?;
                if action == DriftAction::Resent {
                    report.resent += 1;
                }
                tracing::warn!(%customer, %meter, hour, expected, held = held_units, action = action.label(),
                    "the billing system lacks usage tollgate exported");
                report.push(row(action));
            }
        }
        report.lacking_units = lacking;
        report.surplus_units = surplus;
        self.deps.metrics.drift[0].set(lacking as f64);
        self.deps.metrics.drift[1].set(surplus as f64);
        Ok(report)
    }

    /// An hour whose billing-system total is `short` below the ledger's: the entries lacking,
    /// if they can be told (all of them, or one whose value is the shortfall), are noted, and
    /// sent again once proven lost.
    async fn lost(
        &self,
        cell: &Cell,
        short: u64,
        now: i64,
        after: i64,
        fix: bool,
    ) -> Result<DriftAction, ReconcileError> {
        let store = &self.deps.stores.roles.usage;
        let expected: u64 = cell.expected.iter().map(|e| e.send.value).sum();
        let lacking: Vec<&LedgerEntry> = if short == expected {
            cell.expected.iter().collect()
        } else {
            match cell.expected.iter().find(|e| e.send.value == short) {
                Some(e) => vec![e],
                None => return Ok(DriftAction::Ambiguous),
            }
        };
        if !fix {
            return Ok(DriftAction::Reported);
        }
        let mut since = now;
        for e in &lacking {
            since = since.min(store.note_lacking(e, now).await?);
        }
        let proven = since <= now - after;
        let past_horizon = lacking.iter().all(|e| e.exported_at.is_some_and(|at| at <= now - DEDUPLICATION_SECS));
        if !(proven && past_horizon) {
            return Ok(DriftAction::Lacking { since });
        }
        let mut resent = false;
        for e in lacking {
            if store.reexport(e).await? {
                resent = true;
                tracing::warn!(tenant = %e.key.tenant, meter = %e.key.meter, window = e.key.window_start,
                    revision = e.revision, value = e.send.value,
                    "an event the billing system lost is sent again as a new revision");
            }
        }
        Ok(if resent { DriftAction::Resent } else { DriftAction::Ambiguous })
    }

    /// An hour with open dead letters: confirmed when the billing system holds exactly the
    /// ledger's total and theirs, requeued when it holds exactly the ledger's total on two passes
    /// `after` apart.
    async fn settle_letters(
        &self,
        cell: &Cell,
        expected: u64,
        held: u64,
        now: i64,
        after: i64,
        fix: bool,
    ) -> Result<DriftAction, ReconcileError> {
        let store = &self.deps.stores.roles.usage;
        let letters: u64 = cell.letters.iter().map(|e| e.send.value).sum();
        if held == expected + letters {
            if !fix {
                return Ok(DriftAction::Reported);
            }
            for e in &cell.letters {
                let mut agg = UsageAggregate::new(e.key.clone(), 0);
                agg.revision = e.revision;
                agg.send = Some(e.send.clone());
                if store.finish_export(&agg, now).await? {
                    tracing::info!(tenant = %e.key.tenant, meter = %e.key.meter, window = e.key.window_start,
                        "a dead letter the billing system holds is confirmed");
                }
                store.clear_lacking(e).await?;
            }
            return Ok(DriftAction::Confirmed);
        }
        if held != expected {
            return Ok(DriftAction::Ambiguous);
        }
        if !fix {
            return Ok(DriftAction::Reported);
        }
        let mut since = now;
        for e in &cell.letters {
            since = since.min(store.note_lacking(e, now).await?);
        }
        if since > now - after {
            return Ok(DriftAction::Lacking { since });
        }
        for e in &cell.letters {
            if store.requeue_dead_letter(&e.key).await? {
                tracing::warn!(tenant = %e.key.tenant, meter = %e.key.meter, window = e.key.window_start,
                    "a dead letter the billing system never took is requeued");
            }
            store.clear_lacking(e).await?;
        }
        Ok(DriftAction::Requeued)
    }
}

/// A dead letter that may have been taken (sent, never confirmed, or refused as already held),
/// as a ledger entry to observe; `None` for one refused for good or never sent.
fn observable(letter: &DeadLetter) -> Option<LedgerEntry> {
    let send = letter.send.clone()?;
    send.customer.as_ref()?;
    let reason = letter.reason.as_str();
    let maybe_taken =
        reason.starts_with("unconfirmed") || reason.starts_with("unsettled") || reason.starts_with("failed ");
    maybe_taken.then(|| LedgerEntry::new(letter.key.clone(), letter.revision, send, None))
}

fn aggregation(rt: &Runtime, meter: &MeterId) -> MeterAggregation {
    rt.config.meters.iter().find(|m| &m.id == meter).map_or(MeterAggregation::Sum, |m| m.aggregation)
}

fn floor_hour(t: i64) -> i64 {
    t - t.rem_euclid(HOUR)
}
