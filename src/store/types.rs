use std::{fmt, time::Duration};

use async_trait::async_trait;

use crate::{
    config::{MeterId, PlanId, TenantId},
    tenant::KeyHash,
};

/// One quota counter: a tenant's units of one meter in one calendar period.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuotaKey {
    /// The tenant.
    pub tenant: TenantId,
    /// The meter.
    pub meter: MeterId,
    /// The start of the period, in Unix seconds (UTC).
    pub period_start: i64,
}

/// The answer to [`Store::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Units granted (reserved) to the caller: at most what was asked.
    pub granted: u64,
    /// Units reserved by every node together for this key after the call.
    pub reserved: u64,
}

/// An opaque, unique id of one flush: a retried flush carries the same id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlushId(pub String);

impl fmt::Display for FlushId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Usage of one tenant on one meter in one aggregation window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// The tenant.
    pub tenant: TenantId,
    /// The meter.
    pub meter: MeterId,
    /// The start of the window, in Unix seconds.
    pub window_start: i64,
    /// Units used.
    pub quantity: u64,
}

/// The usage aggregated by one node since its last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageBatch {
    /// The flush id: committing the same batch twice counts it once.
    pub id: FlushId,
    /// The records, at most one per (tenant, meter, window).
    pub records: Vec<UsageRecord>,
}

/// Whether a batch was applied by this call or by an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The batch was applied now.
    Applied,
    /// A batch with the same id was applied before: nothing changed.
    AlreadyApplied,
}

/// Identifies one usage aggregate: (tenant, meter, window).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExportKey {
    /// The tenant.
    pub tenant: TenantId,
    /// The meter.
    pub meter: MeterId,
    /// The start of the window, in Unix seconds.
    pub window_start: i64,
}

/// A usage aggregate and its export state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageAggregate {
    /// Which aggregate.
    pub key: ExportKey,
    /// All usage committed for it.
    pub quantity: u64,
    /// How much of it has been exported to the billing sink.
    pub exported: u64,
    /// How many exports were finished for it (each export is one revision).
    pub revision: u32,
    /// While revision `revision` is being exported: the quantity it exports up to. A retry
    /// after a crash re-sends exactly `in_flight - exported` under the same identifier.
    pub in_flight: Option<u64>,
    /// The tenant's billing customer, when the directory knows it.
    pub customer: Option<String>,
}

/// A tenant in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    /// The tenant.
    pub id: TenantId,
    /// Its plan.
    pub plan: PlanId,
    /// Its billing customer (a Stripe customer id), if any.
    pub customer: Option<String>,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer within the allowed time.
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// A conditional write lost a race; retrying with fresh state may succeed.
    #[error("a concurrent update changed {0}")]
    Conflict(&'static str),
    /// The store answered with an error.
    #[error("store error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Where counters, usage aggregates and the tenant directory live.
///
/// Every method must be safe to call from many nodes at once: `reserve` is an atomic
/// conditional add, `commit_usage` applies a batch exactly once per [`FlushId`], and
/// `begin_export`/`finish_export` only move an aggregate from the revision the caller read.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Reserves up to `units` of `key` for the caller. With `limit`, the total reserved by all
    /// callers never exceeds it (a hard quota); without, everything asked is granted.
    async fn reserve(&self, key: &QuotaKey, units: u64, limit: Option<u64>) -> Result<Grant, StoreError>;

    /// Gives back `units` reserved earlier and not used.
    async fn release(&self, key: &QuotaKey, units: u64) -> Result<(), StoreError>;

    /// Adds a batch of usage to the aggregates, exactly once per batch id.
    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError>;

    /// Aggregates of windows that started before `window_start_before` with usage not yet
    /// exported (or an export in flight), at most `limit` of them.
    async fn pending_exports(&self, window_start_before: i64, limit: usize) -> Result<Vec<UsageAggregate>, StoreError>;

    /// Fixes what revision `aggregate.revision` exports: sets `in_flight` to the aggregate's
    /// current quantity, if no export is in flight and the revision has not moved. Returns the
    /// aggregate as stored after the call, or `None` when the revision moved.
    async fn begin_export(&self, aggregate: &UsageAggregate) -> Result<Option<UsageAggregate>, StoreError>;

    /// Records that the in-flight export of `aggregate.revision` was accepted: `exported`
    /// becomes `in_flight` and the revision moves on. Returns `false` (and changes nothing)
    /// when the stored revision is no longer `aggregate.revision`.
    async fn finish_export(&self, aggregate: &UsageAggregate) -> Result<bool, StoreError>;

    /// Parks an aggregate whose export was refused for good, so it is not retried.
    async fn dead_letter(&self, aggregate: &UsageAggregate, reason: &str) -> Result<(), StoreError>;

    /// The tenant owning the API key with this hash.
    async fn find_key(&self, key: &KeyHash) -> Result<Option<TenantRecord>, StoreError>;

    /// A tenant by id.
    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError>;

    /// Creates or replaces a tenant and gives it these keys (keys held by nobody else).
    async fn put_tenant(&self, record: &TenantRecord, keys: &[KeyHash]) -> Result<(), StoreError>;

    /// Removes an API key from the directory.
    async fn remove_key(&self, key: &KeyHash) -> Result<(), StoreError>;

    /// The most usage records one [`commit_usage`](Self::commit_usage) call takes; larger
    /// flushes are split into several batches, each with its own id.
    fn max_batch_records(&self) -> usize {
        usize::MAX
    }

    /// Units reserved so far for `key` (for reports and tests).
    async fn reserved(&self, key: &QuotaKey) -> Result<u64, StoreError>;

    /// The aggregate of (tenant, meter, window), if any usage was committed for it.
    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError>;
}
