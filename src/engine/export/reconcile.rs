//! Reconciliation: what the billing system holds, hour by hour, against the store's ledger of
//! what it accepted.
//!
//! For each (customer, meter) with ledger entries (or open dead letters) in the range, one
//! paced read of the billing system's hourly totals; each hour is compared with the sum of the
//! entries stamped in it. A meter with dimensions is compared series by series (the read
//! grouped by its dimension keys) when the billing system reads back per value (Stripe), else
//! as the total of its series, named by the meter. Hours exported less than `export.reconcile_after` ago are settling
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

use crate::engine::export::exporter::Exporter;
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
    /// The meter; of a meter with dimensions, the series (`tokens{model=m-large,kind=output}`)
    /// when the billing system reads back per value, else (or when it refused to read this
    /// meter by value) the meter: the total of its series.
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
    /// Hours of a (customer, meter) compared: of each series apart, for a meter with
    /// dimensions compared per series.
    pub compared: usize,
    /// Hours not compared yet: exported less than `export.reconcile_after` ago.
    pub settling: usize,
    /// Ledger entries of meters that are not sums (pre-aggregated), not compared: the
    /// billing meter keeps the newest value of a window, not a sum.
    pub not_compared: usize,
    /// Reads of the billing system.
    pub reads: usize,
    /// (customer, meter) pairs whose read failed (a refused customer, a meter gone, a 429):
    /// left for the next pass, logged.
    pub unread: usize,
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

/// An open dead letter that may have been taken.
#[derive(Debug)]
struct Letter {
    entry: LedgerEntry,
    /// Whether reconciliation may requeue it once proven lacking: not an `unsettled` one,
    /// since the billing system holds something under its identifier, perhaps stamped in
    /// another hour or with another value.
    requeueable: bool,
}

/// The entries of one hour of one (customer, meter).
#[derive(Debug, Default)]
struct Cell {
    /// Exported and not superseded: what the billing system should hold.
    expected: Vec<LedgerEntry>,
    /// Open dead letters that may have been taken.
    letters: Vec<Letter>,
    /// An entry exported less than `reconcile_after` ago.
    settling: bool,
}

/// A group's place in [`Cells`]: (customer, event name), and its series' values (none for the
/// total).
type Key = ((String, String), Vec<String>);

/// The hours of one (customer, meter), and the tenants met in them.
#[derive(Debug)]
struct Group {
    meter: MeterId,
    hours: BTreeMap<i64, Cell>,
    tenants: BTreeSet<TenantId>,
}

/// (customer, event name) -> its groups: one per series of a meter with dimensions when the
/// billing system reads back per value (under the series' values, in the order the meter
/// declares its dimensions), else one (under no values), as for a meter without dimensions and
/// usage exported before the meter had them.
type Cells = BTreeMap<(String, String), BTreeMap<Vec<String>, Group>>;

/// What an hour compared shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Equal: marks of lacking entries are cleared.
    Clean,
    /// The billing system holds more.
    Surplus,
    /// It holds this much less, and the hour has no letters.
    Short(u64),
    /// It holds the ledger's total and the letters'.
    LettersHeld,
    /// It holds the ledger's total, none of the letters'.
    LettersLacking,
    /// Anything else.
    Unclear,
}

/// An hour of a series judged: what the acting part needs.
struct Judged {
    customer: String,
    meter: MeterId,
    tenant: TenantId,
    hour: i64,
    cell: Cell,
    held: u64,
    verdict: Verdict,
    /// The tenants of every series of the (customer, meter) in the hour.
    tenants: BTreeSet<TenantId>,
}

/// What a cell shows against what the billing system holds of it.
fn verdict_of(cell: &Cell, held: u64) -> Verdict {
    let expected: u64 = cell.expected.iter().map(|e| e.send.value).sum();
    let letters: u64 = cell.letters.iter().map(|l| l.entry.send.value).sum();
    match (cell.letters.is_empty(), held.cmp(&expected)) {
        (true, std::cmp::Ordering::Equal) => Verdict::Clean,
        (true, std::cmp::Ordering::Greater) => Verdict::Surplus,
        (true, std::cmp::Ordering::Less) => Verdict::Short(expected - held),
        (false, _) if held == expected + letters => Verdict::LettersHeld,
        (false, std::cmp::Ordering::Equal) => Verdict::LettersLacking,
        (false, _) => Verdict::Unclear,
    }
}

/// A pass lacking this many hours or more, over a tenth of those compared, looks like a
/// misread (a wrong meter, a delayed summary) rather than loss: nothing lacking is acted on.
const SUSPICIOUS_HOURS: usize = 10;

impl Exporter {
    /// See [`Tollgate::reconcile`](crate::Tollgate::reconcile).
    pub(crate) async fn reconcile(
        &self,
        rt: &Runtime,
        request: &ReconcileRequest,
    ) -> Result<ReconcileReport, ReconcileError> {
        let sink = self.sink.clone().ok_or(ReconcileError::Unreadable)?;
        let store = &self.deps.stores.background().usage;
        let settings = &rt.config.export;
        let now = self.deps.clock.unix_secs();
        let after = settings.reconcile_after.as_secs() as i64;
        let from = floor_hour(request.from.max(now - LEDGER_KEPT_SECS));
        let to = floor_hour(request.to.saturating_add(HOUR - 1)).min(floor_hour(now) + HOUR);
        let mut report = ReconcileReport::default();
        let mut cells: Cells = BTreeMap::new();
        // Each series of a meter with dimensions compared on its own, when the billing system
        // reads back per value; else the meter's total (its drift named by the meter).
        let by_values = sink.reads_back_by_values();
        let series_of = |entry: &LedgerEntry| -> Vec<String> {
            if by_values {
                declared_values(rt, &entry.key.meter)
            } else {
                Vec::new()
            }
        };
        let group = |cells: &mut Cells, entry: &LedgerEntry| -> Key {
            let key = (entry.send.customer.clone().unwrap_or_default(), entry.send.event_name.clone());
            let series = series_of(entry);
            // Named by the series (values in the declared order), else by the meter.
            let meter = match dimension_names(rt, &entry.key.meter) {
                Some((of, names)) if !series.is_empty() => MeterId::from(crate::config::selector_id(
                    of.as_str(),
                    names.iter().map(String::as_str).zip(series.iter().map(String::as_str)),
                )),
                _ => family(&entry.key.meter),
            };
            let g = cells.entry(key.clone()).or_default().entry(series.clone()).or_insert_with(|| Group {
                meter,
                hours: BTreeMap::new(),
                tenants: BTreeSet::new(),
            });
            g.tenants.insert(entry.key.tenant.clone());
            (key, series)
        };

        // The open dead letters that may have been taken, whatever their hour.
        let mut cursor: Option<ExportKey> = None;
        loop {
            let page = store.dead_letters(cursor.as_ref(), 100).await?;
            let Some(last) = page.last() else { break };
            cursor = Some(last.key.clone());
            for letter in page {
                let Some(letter) = observable(&letter) else { continue };
                let entry = &letter.entry;
                if entry.send.timestamp < now - LEDGER_KEPT_SECS
                    || aggregation(rt, &entry.key.meter) != MeterAggregation::Sum
                    || !rt.config.exports_meter(&entry.key.meter)
                {
                    continue;
                }
                let (key, series) = group(&mut cells, entry);
                let hour = entry.hour();
                if let Some(g) = cells.get_mut(&key).and_then(|m| m.get_mut(&series)) {
                    g.hours.entry(hour).or_default().letters.push(letter);
                }
            }
        }
        // The ledger, each hour read once: those of the range, and those of letters outside it
        // (where only the entries of the letters' (customer, meter) are compared).
        let outside: BTreeSet<i64> = cells
            .values()
            .flat_map(BTreeMap::values)
            .flat_map(|g| g.hours.keys().copied())
            .filter(|h| *h < from || *h >= to)
            .collect();
        let in_range = (from..to).step_by(HOUR as usize);
        for hour in in_range.chain(outside) {
            let in_range = hour >= from && hour < to;
            for entry in self.ledger_hour(hour).await? {
                // A meter kept out of the export (`export = false`) is neither compared nor sent.
                if entry.send.customer.is_none()
                    || entry.exported_at.is_none()
                    || entry.superseded
                    || !rt.config.exports_meter(&entry.key.meter)
                {
                    continue;
                }
                if aggregation(rt, &entry.key.meter) != MeterAggregation::Sum {
                    if in_range && request.tenant.as_ref().is_none_or(|t| t == &entry.key.tenant) {
                        report.not_compared += 1;
                    }
                    continue;
                }
                let key = (entry.send.customer.clone().unwrap_or_default(), entry.send.event_name.clone());
                // An hour outside the range is read whole (every series of the pair) where
                // the pair has letters, so that its total is whole too.
                let letters_here = cells.get(&key).is_some_and(|m| m.values().any(|g| g.hours.contains_key(&hour)));
                if !in_range && !letters_here {
                    continue;
                }
                let (_, series) = group(&mut cells, &entry);
                if let Some(cell) =
                    cells.get_mut(&key).and_then(|m| m.get_mut(&series)).map(|g| g.hours.entry(hour).or_default())
                {
                    cell.settling |= entry.exported_at.is_some_and(|at| at > now - after);
                    cell.expected.push(entry);
                }
            }
        }
        // One tenant: the (customer, meter) pairs it has, compared whole (a customer moved
        // between tenants has entries of both).
        if let Some(tenant) = &request.tenant {
            cells.retain(|_, groups| groups.values().any(|g| g.tenants.contains(tenant)));
        }

        // One read per (customer, meter), paced with the export's calls; each hour judged.
        let mut judged: Vec<Judged> = Vec::new();
        let (mut short_hours, mut compared_hours) = (BTreeSet::new(), BTreeSet::new());
        for ((customer, event_name), mut groups) in cells {
            let hours = groups.values().flat_map(|g| g.hours.keys().copied());
            let (Some(first), Some(last)) = (hours.clone().min(), hours.max()) else {
                continue;
            };
            let (read_from, read_to) = (first.min(from), (last + HOUR).max(to));
            // The meter's dimensions, as the configuration declares them, if it has any and its
            // series are compared apart.
            let dimensioned = groups.values().next().filter(|_| by_values).and_then(|g| dimension_names(rt, &g.meter));
            // Read as a total: compared as one (series of a meter that lost its dimensions
            // since, or that is gone from the configuration, among them).
            if dimensioned.is_none() && groups.len() > 1 {
                let of = groups.values().next().map_or_else(|| MeterId::from(""), |g| family(&g.meter));
                groups = total_of(groups, &of);
            }
            self.pacer.wait(settings.calls_per_second).await;
            report.reads += 1;
            let read = match &dimensioned {
                Some((of, keys)) => {
                    match sink.held_by_hour_and_values(&event_name, &customer, keys, read_from, read_to).await {
                        // Refused (an account or version that does not group by dimension): the
                        // meter's total is compared instead.
                        // `Ok(None)`: a sink that says it reads by value but does not.
                        Err(SinkError::Permanent(_)) | Ok(None) => {
                            tracing::warn!(%customer, event_name,
                            "the billing system did not read this meter by dimension: its total is compared");
                            groups = total_of(groups, of);
                            self.pacer.wait(settings.calls_per_second).await;
                            report.reads += 1;
                            sink.held_by_hour(&event_name, &customer, read_from, read_to)
                                .await
                                .map(|held| held.map(|held| BTreeMap::from([(Vec::new(), held)])))
                        }
                        read => read.map(|held| held.map(by_values_hours)),
                    }
                }
                // The meter's total, under no values.
                None => sink
                    .held_by_hour(&event_name, &customer, read_from, read_to)
                    .await
                    .map(|held| held.map(|held| BTreeMap::from([(Vec::new(), held)]))),
            };
            let held_by_series = match read {
                Ok(Some(held)) => held,
                Ok(None) => return Err(ReconcileError::Unreadable),
                // Every call would get it (the key, the address): the pass stops.
                Err(e @ SinkError::Halt(_)) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(%customer, event_name, error = %e,
                        "reconciliation could not read the billing system for this customer's meter: left for the next pass");
                    report.unread += 1;
                    continue;
                }
            };
            let tenants: BTreeSet<TenantId> = groups.values().flat_map(|g| g.tenants.iter().cloned()).collect();
            // Series the billing system holds that the ledger has no entry of (compared in
            // the range: all surplus).
            for series in held_by_series.keys() {
                if !groups.contains_key(series) {
                    let meter = match &dimensioned {
                        Some((of, names)) if !series.is_empty() => MeterId::from(crate::config::selector_id(
                            of.as_str(),
                            names.iter().map(String::as_str).zip(series.iter().map(String::as_str)),
                        )),
                        Some((of, _)) => of.clone(),
                        None => groups.values().next().map_or_else(|| MeterId::from(""), |g| g.meter.clone()),
                    };
                    groups.insert(series.clone(), Group { meter, hours: BTreeMap::new(), tenants: tenants.clone() });
                }
            }
            // The pair's hours, each judged across all its series at once: the hours of the
            // ledger's cells, and those the billing system holds in the range compared.
            let mut hours: BTreeSet<i64> = groups.values().flat_map(|g| g.hours.keys().copied()).collect();
            hours.extend(
                held_by_series
                    .values()
                    .flat_map(|h| h.iter().filter(|(_, v)| **v != 0.0).map(|(h, _)| *h))
                    .filter(|h| *h >= from && *h < to),
            );
            for hour in hours {
                let in_range = hour >= from && hour < to;
                // Every series of the pair in this hour: its cell, and what the billing system
                // holds of it.
                let mut rows: Vec<(MeterId, TenantId, Cell, u64)> = Vec::new();
                let mut settling = hour + HOUR > now - after;
                for (series, g) in &mut groups {
                    let cell = g.hours.remove(&hour);
                    let held = held_by_series.get(series).and_then(|h| h.get(&hour)).copied();
                    // A series the hour has no cell of and the billing system holds nothing of
                    // is not in the hour (one it reads as a value, even a fraction, is).
                    if cell.is_none() && held.is_none_or(|v| v == 0.0) {
                        continue;
                    }
                    let held = held.unwrap_or(0.0).round().max(0.0) as u64;
                    let cell = cell.unwrap_or_default();
                    settling |= cell.settling;
                    let tenant = cell
                        .expected
                        .first()
                        .or(cell.letters.first().map(|l| &l.entry))
                        .map(|e| e.key.tenant.clone())
                        .or_else(|| g.tenants.iter().next().cloned())
                        .unwrap_or_else(|| TenantId::from(""));
                    rows.push((g.meter.clone(), tenant, cell, held));
                }
                // One series settling: the whole hour is (its total is not to be trusted yet).
                if settling {
                    report.settling += rows.iter().filter(|r| in_range || !r.2.letters.is_empty()).count();
                    continue;
                }
                let here: BTreeSet<TenantId> = rows
                    .iter()
                    .flat_map(|r| {
                        r.2.expected
                            .iter()
                            .map(|e| &e.key.tenant)
                            .chain(r.2.letters.iter().map(|l| &l.entry.key.tenant))
                    })
                    .cloned()
                    .collect();
                // A series is acted on only where no series of the hour holds more than the
                // ledger or is unclear: a read that put a series' units under other values (or
                // none) never makes one series look lost, nor another's letters look held.
                // Outside the range, series without letters only vouch for the hour.
                // A series short beside another whose letters look held is blocked too: the
                // letters' units could be the short series' under other values.
                let mut blocked = false;
                let (mut short, mut letters_held) = (false, false);
                let mut mine = Vec::new();
                for (meter, tenant, cell, held) in rows {
                    let verdict = verdict_of(&cell, held);
                    let context = !in_range && cell.letters.is_empty();
                    blocked |= matches!(verdict, Verdict::Surplus | Verdict::Unclear)
                        || (context && verdict != Verdict::Clean);
                    short |= matches!(verdict, Verdict::Short(_));
                    letters_held |= verdict == Verdict::LettersHeld;
                    if !context {
                        mine.push((meter, tenant, cell, held, verdict));
                    }
                }
                blocked |= short && letters_held;
                for (meter, tenant, cell, held, verdict) in mine {
                    let acts = matches!(verdict, Verdict::Short(_) | Verdict::LettersLacking | Verdict::LettersHeld);
                    let verdict = if blocked && acts { Verdict::Unclear } else { verdict };
                    report.compared += 1;
                    compared_hours.insert((customer.clone(), event_name.clone(), hour));
                    if matches!(verdict, Verdict::Short(_) | Verdict::LettersLacking) {
                        short_hours.insert((customer.clone(), event_name.clone(), hour));
                    }
                    judged.push(Judged {
                        customer: customer.clone(),
                        meter,
                        tenant,
                        hour,
                        cell,
                        held,
                        verdict,
                        tenants: here.clone(),
                    });
                }
            }
        }

        // Acting: nothing lacking is acted on in a pass that finds too much lacking (hours of
        // a (customer, meter), whatever its series).
        let (short_hours, compared_hours) = (short_hours.len(), compared_hours.len());
        let suspicious = short_hours >= SUSPICIOUS_HOURS && short_hours * 10 > compared_hours;
        if suspicious && request.fix {
            tracing::error!(
                short_hours,
                compared = compared_hours,
                "reconciliation finds the billing system lacking too many hours to be loss (a wrong meter or \
                 customer, delayed summaries?): reported, nothing sent again"
            );
        }
        let store = &self.deps.stores.background().usage;
        for Judged { customer, meter, tenant, hour, cell, held, verdict, tenants } in judged {
            let expected: u64 = cell.expected.iter().map(|e| e.send.value).sum();
            let letters: u64 = cell.letters.iter().map(|l| l.entry.send.value).sum();
            let action = match verdict {
                Verdict::Clean | Verdict::Surplus => {
                    for e in cell.expected.iter().filter(|e| e.lacking_since.is_some()) {
                        store.clear_lacking(e).await?;
                    }
                    if verdict == Verdict::Clean {
                        continue;
                    }
                    report.surplus_units += held - expected;
                    tracing::warn!(%customer, %meter, hour, expected, held,
                        "the billing system holds more than tollgate exported: reported, never sent as negative values");
                    DriftAction::Reported
                }
                Verdict::Short(short) => {
                    report.lacking_units += short;
                    let action = self.lost(&cell, short, now, after, request.fix && !suspicious).await?;
                    if action == DriftAction::Resent {
                        report.resent += 1;
                    }
                    tracing::warn!(%customer, %meter, hour, expected, held, action = action.label(),
                        "the billing system lacks usage tollgate exported");
                    action
                }
                Verdict::LettersHeld => {
                    if self.in_flight_in(&cell, &tenants, &customer, hour).await? {
                        // An export in flight may be what it holds: judged at a later pass.
                        report.compared -= 1;
                        report.settling += 1;
                        continue;
                    }
                    let action = self.confirm_letters(&cell, now, request.fix).await?;
                    if action == DriftAction::Confirmed {
                        report.confirmed += cell.letters.len();
                    }
                    action
                }
                Verdict::LettersLacking => {
                    report.lacking_units += letters;
                    let action = self.requeue_letters(&cell, now, after, request.fix && !suspicious).await?;
                    if action == DriftAction::Requeued {
                        report.requeued += cell.letters.len();
                    }
                    action
                }
                Verdict::Unclear => DriftAction::Ambiguous,
            };
            report.push(Drift { tenant, customer, meter, hour, expected, held, letters, action });
        }
        Ok(report)
    }

    /// Sets the drift gauges from a finished pass of the worker.
    pub(crate) fn record_drift(&self, report: &ReconcileReport) {
        self.deps.metrics.drift[0].set(report.lacking_units as f64);
        self.deps.metrics.drift[1].set(report.surplus_units as f64);
    }

    /// Every ledger entry of the hour starting at `hour`, page after page until one is empty.
    async fn ledger_hour(&self, hour: i64) -> Result<Vec<LedgerEntry>, StoreError> {
        let store = &self.deps.stores.background().usage;
        let mut out = Vec::new();
        let mut cursor: Option<(ExportKey, u32)> = None;
        loop {
            let page = store.ledger(hour, cursor.as_ref().map(|(k, r)| (k, *r)), PAGE).await?;
            let Some(last) = page.last() else { break };
            cursor = Some((last.key.clone(), last.revision));
            out.extend(page);
        }
        Ok(out)
    }

    /// Whether an export of the hour's tenants for `customer` and the cell's meter is in
    /// flight with its stamp in `hour` (not in the ledger yet, perhaps already held).
    async fn in_flight_in(
        &self,
        cell: &Cell,
        hour_tenants: &BTreeSet<TenantId>,
        customer: &str,
        hour: i64,
    ) -> Result<bool, StoreError> {
        let store = &self.deps.stores.background().usage;
        // The tenants of every series of the pair in the hour: an export of another series
        // may be what the billing system holds.
        let tenants: BTreeSet<&TenantId> = cell
            .letters
            .iter()
            .map(|l| &l.entry.key.tenant)
            .chain(cell.expected.iter().map(|e| &e.key.tenant))
            .chain(hour_tenants)
            .collect();
        let event_name = cell.letters.first().map(|l| l.entry.send.event_name.as_str()).unwrap_or_default();
        for tenant in tenants {
            let mut cursor = ExportKey::new(tenant.clone(), MeterId::from(""), i64::MIN);
            loop {
                let page = store.pending_exports(i64::MAX, Some(&cursor), 100).await?;
                let Some(last) = page.last() else { break };
                cursor = last.key.clone();
                let mut mine = false;
                for agg in &page {
                    if &agg.key.tenant != tenant {
                        continue;
                    }
                    mine = true;
                    let flying = agg.send.as_ref().filter(|_| agg.in_flight.is_some());
                    if flying.is_some_and(|s| {
                        s.customer.as_deref() == Some(customer)
                            && s.event_name == event_name
                            && floor_hour(s.timestamp) == hour
                    }) {
                        return Ok(true);
                    }
                }
                if !mine || page.last().is_some_and(|a| &a.key.tenant != tenant) {
                    break;
                }
            }
        }
        Ok(false)
    }

    /// An hour whose billing-system total is `short` below the ledger's: the entries lacking,
    /// if they can be told (all of them, or the one whose value is the shortfall), are noted,
    /// and sent again once proven lost.
    async fn lost(
        &self,
        cell: &Cell,
        short: u64,
        now: i64,
        after: i64,
        fix: bool,
    ) -> Result<DriftAction, ReconcileError> {
        let store = &self.deps.stores.background().usage;
        let expected: u64 = cell.expected.iter().map(|e| e.send.value).sum();
        let lacking: Vec<&LedgerEntry> = if short == expected {
            cell.expected.iter().collect()
        } else {
            let same: Vec<&LedgerEntry> = cell.expected.iter().filter(|e| e.send.value == short).collect();
            // Several of that value: which one is lacking cannot be told.
            if same.len() != 1 {
                return Ok(DriftAction::Ambiguous);
            }
            same
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

    /// An hour whose billing-system total is the ledger's and the letters': they are marked
    /// exported.
    async fn confirm_letters(&self, cell: &Cell, now: i64, fix: bool) -> Result<DriftAction, ReconcileError> {
        if !fix {
            return Ok(DriftAction::Reported);
        }
        let store = &self.deps.stores.background().usage;
        for l in &cell.letters {
            let e = &l.entry;
            let mut agg = UsageAggregate::new(e.key.clone(), 0);
            agg.revision = e.revision;
            agg.send = Some(e.send.clone());
            if store.finish_export(&agg, now).await? {
                tracing::info!(tenant = %e.key.tenant, meter = %e.key.meter, window = e.key.window_start,
                    "a dead letter the billing system holds is confirmed");
            }
            store.clear_lacking(e).await?;
        }
        Ok(DriftAction::Confirmed)
    }

    /// An hour whose billing-system total is the ledger's, none of the letters': requeued once
    /// two passes at least `after` and the de-duplication horizon apart found them lacking
    /// (a letter's last attempt may be recent, and the billing system's summaries late).
    /// `unsettled` letters are never requeued: the billing system holds something under their
    /// identifiers, perhaps in another hour.
    async fn requeue_letters(
        &self,
        cell: &Cell,
        now: i64,
        after: i64,
        fix: bool,
    ) -> Result<DriftAction, ReconcileError> {
        if !cell.letters.iter().all(|l| l.requeueable) {
            return Ok(DriftAction::Ambiguous);
        }
        if !fix {
            return Ok(DriftAction::Reported);
        }
        let store = &self.deps.stores.background().usage;
        let mut since = now;
        for l in &cell.letters {
            since = since.min(store.note_lacking(&l.entry, now).await?);
        }
        if since > now - after.max(DEDUPLICATION_SECS) {
            return Ok(DriftAction::Lacking { since });
        }
        for l in &cell.letters {
            let e = &l.entry;
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
/// to observe; `None` for one refused for good or never sent.
fn observable(letter: &DeadLetter) -> Option<Letter> {
    let send = letter.send.clone()?;
    send.customer.as_ref()?;
    let reason = letter.reason.as_str();
    let unsettled = reason.starts_with("unsettled");
    let maybe_taken = unsettled || reason.starts_with("unconfirmed") || reason.starts_with("failed ");
    maybe_taken.then(|| Letter {
        entry: LedgerEntry::new(letter.key.clone(), letter.revision, send, None),
        requeueable: !unsettled,
    })
}

/// How far back (by stamp) the worker's pass reaches: an event exported at `t` is stamped no
/// earlier than `t - unconfirmed_after - invoice_grace - window` (a revision begun then, sent
/// at last), and is re-sent by the first pass past `t + 24 h` (the de-duplication horizon,
/// after two passes `reconcile_after` apart), which runs before `t + 24 h + interval`. An hour
/// more for the rounding to whole hours.
pub(crate) fn worker_reach(rt: &Runtime) -> i64 {
    let export = &rt.config.export;
    let grace = rt.config.stripe().map_or(0, |s| s.invoice_grace.as_secs() as i64);
    let longest = rt.config.meters.iter().filter_map(|m| m.aggregation.window_secs()).max().unwrap_or(0);
    let window = (rt.config.usage.window.as_secs() as i64).max(longest);
    reach(
        export.reconcile_interval.as_secs() as i64,
        export.reconcile_after.as_secs() as i64,
        export.unconfirmed_after.as_secs() as i64,
        grace,
        window,
    )
}

fn reach(interval: i64, after: i64, unconfirmed: i64, grace: i64, window: i64) -> i64 {
    DEDUPLICATION_SECS + interval.max(after) + after + unconfirmed + grace + window + HOUR
}

fn aggregation(rt: &Runtime, meter: &MeterId) -> MeterAggregation {
    rt.config.meters.iter().find(|m| &m.id == meter).map_or(MeterAggregation::Sum, |m| m.aggregation)
}

/// The meter a series belongs to (`tokens` of `tokens{model=m-large}`); a meter without
/// dimensions is its own.
fn family(meter: &MeterId) -> MeterId {
    match crate::config::parse_selector(meter.as_str()) {
        Some(Ok((of, _))) => MeterId::from(of),
        _ => meter.clone(),
    }
}

/// The groups of a meter's series as one: the meter's total, under no values.
fn total_of(groups: BTreeMap<Vec<String>, Group>, of: &MeterId) -> BTreeMap<Vec<String>, Group> {
    let mut total = Group { meter: of.clone(), hours: BTreeMap::new(), tenants: BTreeSet::new() };
    for g in groups.into_values() {
        total.tenants.extend(g.tenants);
        for (hour, cell) in g.hours {
            let t = total.hours.entry(hour).or_default();
            t.expected.extend(cell.expected);
            t.letters.extend(cell.letters);
            t.settling |= cell.settling;
        }
    }
    BTreeMap::from([(Vec::new(), total)])
}

/// What the billing system holds per (values, hour), by values, hour by hour. Events without
/// values (sent before the meter had dimensions) are under no values, as the ledger's are.
fn by_values_hours(held: crate::billing::HeldByValues) -> BTreeMap<Vec<String>, BTreeMap<i64, f64>> {
    let mut out: BTreeMap<Vec<String>, BTreeMap<i64, f64>> = BTreeMap::new();
    for ((values, hour), value) in held {
        let values = if values.iter().all(String::is_empty) { Vec::new() } else { values };
        *out.entry(values).or_default().entry(hour).or_insert(0.0) += value;
    }
    out
}

/// The meter a series belongs to, with its dimensions in their declared order, if the
/// configuration gives it dimensions.
fn dimension_names(rt: &Runtime, meter: &MeterId) -> Option<(MeterId, Vec<String>)> {
    let of = family(meter);
    let spec = rt.config.meters.iter().find(|m| m.id == of)?;
    let names: Vec<String> = spec.dimensions.as_ref()?.names().map(str::to_owned).collect();
    Some((of, names))
}

/// The values of a series' id in the order its meter declares its dimensions; none for a
/// meter the configuration gives no dimensions (now), for the meter's own id (usage from
/// before it had them), or for values under none of the declared names.
fn declared_values(rt: &Runtime, meter: &MeterId) -> Vec<String> {
    let values = crate::config::series_values(meter);
    let Some((_, names)) = dimension_names(rt, meter).filter(|_| !values.is_empty()) else {
        return Vec::new();
    };
    let declared: Vec<String> =
        names.iter().map(|n| values.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap_or_default()).collect();
    if declared.iter().all(String::is_empty) {
        Vec::new()
    } else {
        declared
    }
}

fn floor_hour(t: i64) -> i64 {
    t - t.rem_euclid(HOUR)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event, exported at `t` with the earliest stamp it may have, is inside the range of
    /// the first worker pass past its de-duplication horizon, whenever the passes fall.
    #[test]
    fn the_worker_reaches_each_event_past_its_horizon() {
        for (interval, after) in [(6 * HOUR, HOUR), (60, HOUR), (HOUR, 3 * HOUR), (24 * HOUR, 60)] {
            let (unconfirmed, grace, window) = (20 * HOUR, HOUR, 900);
            let reach = reach(interval, after, unconfirmed, grace, window);
            let t = 1_773_489_600;
            let stamp = t - unconfirmed - grace - window;
            // Passes every `interval` from some offset; the first at or past t + 24 h, and
            // proven by one `after` before it (the interval is at least... or passes caught it).
            for offset in (0..interval).step_by((interval / 7).max(1) as usize) {
                let first_past = {
                    let mut p = t - (t % interval) + offset;
                    while p < t + DEDUPLICATION_SECS + after {
                        p += interval;
                    }
                    p
                };
                let from = floor_hour(first_past - reach);
                assert!(from <= floor_hour(stamp), "interval {interval}, after {after}, offset {offset}");
            }
        }
    }
}
