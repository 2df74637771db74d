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
}

impl UsageBatch {
    /// A batch of records under one flush id.
    #[must_use]
    pub fn new(id: FlushId, records: Vec<UsageRecord>) -> Self {
        Self { id, records }
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
    /// Adds a batch of usage to the aggregates, exactly once per batch id.
    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError>;

    /// Applies usage events, each at most once per id: an event's id is marked seen in the same
    /// write as its usage, never before. Ids are kept for a documented window after the
    /// event's time (bounded, expiring). Returns one outcome per event, in order.
    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError>;

    /// Every aggregate of `tenant` in the windows starting in `[from, to)`, in key order.
    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError>;

    /// The most usage records one [`commit_usage`](Self::commit_usage) call takes; larger
    /// flushes are split into several batches, each with its own id.
    fn max_batch_records(&self) -> usize {
        usize::MAX
    }
}
