//! The usage role: usage batches applied exactly once per flush id, usage events once per event id,
//! and usage read back over a range.

use std::fmt;

use async_trait::async_trait;

use super::{StoreError, UsageAggregate};
use crate::base::{MeterId, TenantId};

/// An opaque, unique id of one flush: a retried flush carries the same id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlushId(String);

impl FlushId {
    /// An id.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FlushId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Usage of one tenant on one meter in one aggregation window.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageRecord {
    /// The tenant.
    pub tenant: TenantId,
    /// The meter.
    pub meter: MeterId,
    /// The start of the window, in Unix seconds.
    pub window_start: i64,
    /// Units used.
    pub quantity: u64,
    /// Whether the usage is to be exported (billed): `false` for a tenant without a billing
    /// customer on a plan that is not `billed` (a free tier), when the sink needs customers.
    /// An aggregate is an export candidate
    /// ([`pending_exports`](crate::store::ExportStore::pending_exports) lists it) once a billable
    /// record was committed to it, until an export leaves nothing of it unexported; while it
    /// is one, all of its usage is exported. Usage that is not billable is kept all the same
    /// (reports, retention).
    pub billable: bool,
}

impl UsageRecord {
    /// `quantity` units of `meter` used by `tenant` in the window starting at `window_start`,
    /// billable.
    #[must_use]
    pub fn new(tenant: TenantId, meter: MeterId, window_start: i64, quantity: u64) -> Self {
        Self { tenant, meter, window_start, quantity, billable: true }
    }

    /// The same, billable or not.
    #[must_use]
    pub fn with_billable(mut self, billable: bool) -> Self {
        self.billable = billable;
        self
    }
}

/// The usage aggregated by one node since its last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageBatch {
    /// The flush id: committing the same batch twice counts it once.
    pub id: FlushId,
    /// The records, at most one per (tenant, meter, window).
    pub records: Vec<UsageRecord>,
    /// Requests admitted and refused, and money spent, counted by the node since its last
    /// tallies: added to the store's tallies in the same write as the records, exactly once
    /// with them. At most one per (scope, start). The engine sends them in batches of their
    /// own (no records), so that a tally's write never holds up usage.
    pub tallies: Vec<Tally>,
}

impl UsageBatch {
    /// A batch of records under one flush id.
    #[must_use]
    pub fn new(id: FlushId, records: Vec<UsageRecord>) -> Self {
        Self { id, records, tallies: Vec::new() }
    }

    /// The same, with tallies.
    #[must_use]
    pub fn with_tallies(mut self, tallies: Vec<Tally>) -> Self {
        self.tallies = tallies;
        self
    }
}

/// What the tallies count as requests admitted: the outcome beside each refusal's reason
/// ([`RejectionKind::label`](crate::response::RejectionKind::label)).
pub const TALLY_ADMITTED: &str = "admitted";

/// What the tallies count as money spent (nano-units of `[billing] currency`, the reserved
/// `spend` meter's usage as the flush drained it), beside the requests.
pub const TALLY_SPENT: &str = "spent_nanos";

/// What the tallies count as money paid (the currency's smallest unit, cents of `usd`, before
/// refunds and disputes): each payment Stripe's webhook delivers, once per event.
pub const TALLY_PAID: &str = "paid_minor";

/// The longest a tally's outcome name may be; longer ones are refused by every store.
pub const TALLY_OUTCOME_MAX: usize = 48;

/// Whose requests a [`Tally`] counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TallyScope {
    /// The fleet's, every tenant and requests that named none (an unknown key), per minute.
    Fleet,
    /// One tenant's, per UTC day.
    Tenant(TenantId),
}

impl TallyScope {
    /// The length of this scope's windows, in seconds: a minute for the fleet, a day for a
    /// tenant.
    #[must_use]
    pub const fn window_secs(&self) -> i64 {
        match self {
            Self::Fleet => 60,
            Self::Tenant(_) => 86_400,
        }
    }
}

/// Requests counted by outcome in one window of one scope: the fleet's minute, or a tenant's
/// day. Stores add tallies up; what every node counted of a window is its sum.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tally {
    /// The fleet, or one tenant.
    pub scope: TallyScope,
    /// The window's start (Unix seconds, a multiple of the scope's
    /// [`window_secs`](TallyScope::window_secs)).
    pub start: i64,
    /// (outcome, count), each outcome once: [`TALLY_ADMITTED`], a refusal's reason label, or
    /// [`TALLY_SPENT`].
    pub counts: Vec<(String, u64)>,
}

impl Tally {
    /// A tally of `scope` in the window starting at `start`.
    #[must_use]
    pub fn new(scope: TallyScope, start: i64, counts: Vec<(String, u64)>) -> Self {
        Self { scope, start, counts }
    }

    /// `outcome`'s count, 0 if not counted.
    #[must_use]
    pub fn count(&self, outcome: &str) -> u64 {
        self.counts.iter().find(|(o, _)| o == outcome).map_or(0, |(_, n)| *n)
    }

    /// Whether a store takes `tallies`, one batch's: each one's ([`check`](Self::check)), and
    /// at most one per (scope, start).
    pub(crate) fn check_all(tallies: &[Tally]) -> Result<(), StoreError> {
        let mut seen = std::collections::HashSet::with_capacity(tallies.len());
        for t in tallies {
            t.check()?;
            if !seen.insert((&t.scope, t.start)) {
                return Err(StoreError::Backend(
                    format!("a batch names the tally of {:?} at {} twice", t.scope, t.start).into(),
                ));
            }
        }
        Ok(())
    }

    /// Whether a store takes it: a tenant's named, its start on its window, each outcome a
    /// name of `[a-z0-9_]`, at most [`TALLY_OUTCOME_MAX`] bytes, once.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        if matches!(&self.scope, TallyScope::Tenant(t) if t.as_str().is_empty()) {
            return Err(StoreError::Backend("a tenant's tally names no tenant".into()));
        }
        if self.start.rem_euclid(self.scope.window_secs()) != 0 {
            return Err(StoreError::Backend(format!("a tally's start {} is not on its window", self.start).into()));
        }
        for (i, (o, _)) in self.counts.iter().enumerate() {
            let named = !o.is_empty()
                && o.len() <= TALLY_OUTCOME_MAX
                && o.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !named || self.counts[..i].iter().any(|(p, _)| p == o) {
                return Err(StoreError::Backend(
                    format!("a tally's outcome {o:?} is not a name, or is repeated").into(),
                ));
            }
        }
        Ok(())
    }
}

/// Which tallies [`UsageStore::tallies`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TallyQuery {
    /// The fleet's minutes, or every tenant's days (`Some(tenant)`: one tenant's).
    pub scope: TallyRead,
    /// Windows starting in `[from, to)` (Unix seconds).
    pub from: i64,
    /// See `from`.
    pub to: i64,
    /// The most tallies read: a store stops once it has this many (in (start, tenant) order).
    pub max: usize,
}

/// The scope a [`TallyQuery`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TallyRead {
    /// The fleet's minutes.
    Fleet,
    /// Every tenant's days.
    Tenants,
    /// One tenant's days.
    Tenant(TenantId),
}

impl TallyQuery {
    /// Tallies of `scope` in the windows starting in `[from, to)`, at most
    /// [`TALLY_READ_MAX`](crate::store::contract::TALLY_READ_MAX).
    #[must_use]
    pub fn new(scope: TallyRead, from: i64, to: i64) -> Self {
        Self { scope, from, to, max: crate::store::contract::TALLY_READ_MAX }
    }

    /// The same, reading at most `max` tallies (never more than
    /// [`TALLY_READ_MAX`](crate::store::contract::TALLY_READ_MAX)).
    #[must_use]
    pub fn with_max(mut self, max: usize) -> Self {
        self.max = max.min(crate::store::contract::TALLY_READ_MAX);
        self
    }

    /// The oldest window a store still returns at `now` (the wall clock): tallies are kept
    /// [`TALLY_KEPT_SECS`](crate::store::contract::TALLY_KEPT_SECS).
    pub(crate) fn horizon(now: i64) -> i64 {
        now.saturating_sub(crate::store::contract::TALLY_KEPT_SECS)
    }

    /// The windows a store reads at `now`: `[from, to)` cut to those it keeps, and to none
    /// starting more than two days ahead (a clock ahead of the others; never a range without
    /// end).
    pub(crate) fn span(&self, now: i64) -> (i64, i64) {
        (self.from.max(Self::horizon(now)), self.to.min(now.saturating_add(2 * 86_400)))
    }

    /// Whether a tally of `scope` starting at `start` is one this query reads, at `now`.
    pub(crate) fn reads(&self, scope: &TallyScope, start: i64, now: i64) -> bool {
        let in_scope = match (&self.scope, scope) {
            (TallyRead::Fleet, TallyScope::Fleet) | (TallyRead::Tenants, TallyScope::Tenant(_)) => true,
            (TallyRead::Tenant(t), TallyScope::Tenant(u)) => t == u,
            _ => false,
        };
        let (from, to) = self.span(now);
        in_scope && start >= from && start < to
    }
}

/// Whether a batch was applied by this call or by an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The batch was applied now.
    Applied,
    /// A batch with the same id was applied before: nothing changed.
    AlreadyApplied,
}

/// One usage event from outside a request (a job, a queue message), with its own id: applied
/// at most once per id.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageEvent {
    /// The event's id (its own, or the queue message's): never a hash of its contents.
    pub id: String,
    /// The usage, in the window of the event's own time.
    pub record: UsageRecord,
    /// The event's time (Unix seconds): seen ids are kept a documented time after it.
    pub at: i64,
}

impl UsageEvent {
    /// An event.
    pub fn new(id: impl Into<String>, record: UsageRecord, at: i64) -> Self {
        Self { id: id.into(), record, at }
    }
}

/// Whether [`UsageStore::commit_events`] applied an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventOutcome {
    /// Applied now, and its id marked seen in the same write.
    Applied,
    /// Its id was seen before: nothing changed.
    Duplicate,
}

/// Where usage is aggregated per (tenant, meter, window): batches from the flush pipeline, exactly
/// once per [`FlushId`], and events from jobs and queues, once per event id.
///
/// The aggregates are the ones [`ExportStore`](super::ExportStore) exports: a store holds both
/// roles (see [`UsageExportStore`](super::UsageExportStore)).
#[async_trait]
pub trait UsageStore: Send + Sync + fmt::Debug + 'static {
    /// Adds a batch of usage to the aggregates, and its tallies to the tallies, exactly once
    /// per batch id. A batch whose tallies a store does not take ([`Tally`]'s rules) is
    /// refused whole, before any write.
    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError>;

    /// Applies usage events, each at most once per id: an event's id is marked seen in the same
    /// write as its usage, never before. Ids are kept for a documented window after the
    /// event's time (bounded, expiring). Returns one outcome per event, in order.
    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError>;

    /// Every aggregate of `tenant` in the windows starting in `[from, to)`, in key order.
    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError>;

    /// The tallies `query` names, in (start, tenant) order, at most `query.max`: what every
    /// node's batches added ([`UsageBatch::tallies`]), none older than
    /// [`TALLY_KEPT_SECS`](crate::store::contract::TALLY_KEPT_SECS) by the wall clock (kept
    /// that long, then pruned as the store prunes usage).
    async fn tallies(&self, query: &TallyQuery) -> Result<Vec<Tally>, StoreError>;

    /// The most usage records one [`commit_usage`](Self::commit_usage) call takes; larger
    /// flushes are split into several batches, each with its own id.
    fn max_batch_records(&self) -> usize {
        usize::MAX
    }
}

/// Rows of (start, tenant (`""`: the fleet), outcome, count) in (start, tenant) order folded
/// into tallies, at most `max`: what the SQL stores read.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn fold_tallies<E>(
    rows: impl Iterator<Item = Result<(i64, String, String, u64), E>>,
    max: usize,
) -> Result<Vec<Tally>, E> {
    let mut out: Vec<Tally> = Vec::new();
    for row in rows {
        let (start, tenant, outcome, n) = row?;
        let scope = if tenant.is_empty() { TallyScope::Fleet } else { TallyScope::Tenant(TenantId::from(tenant)) };
        if let Some(last) = out.last_mut().filter(|l| l.start == start && l.scope == scope) {
            last.counts.push((outcome, n));
        } else if out.len() >= max {
            break;
        } else {
            out.push(Tally::new(scope, start, vec![(outcome, n)]));
        }
    }
    Ok(out)
}
