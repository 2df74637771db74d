//! Where counters, usage and the tenant directory live: the [`Store`] trait and the embedded
//! stores: `SqliteStore` (durable, one file; feature `sqlite`, on by default) and [`MemoryStore`] (tests and ephemeral use). A DynamoDB store shared by a fleet
//! plugs into the same trait.

#[cfg(feature = "dynamodb")]
mod dynamo;
mod memory;
#[cfg(feature = "sqlite")]
mod sqlite;
mod types;

#[cfg(feature = "dynamodb")]
pub use dynamo::DynamoStore;
pub use memory::MemoryStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
pub use types::{
    ApiKeyRecord, CommitOutcome, DeadLetter, EventOutcome, ExportClaim, ExportKey, ExportSend, FlushId, Grant,
    IdempotencyClaim, IdempotencySettle, IdempotencyState, PlanChange, PlanChangeOutcome, QuotaKey, Reservation,
    ReserveToken, Store, StoreError, StoreInspect, TenantRecord, UsageAggregate, UsageBatch, UsageEvent, UsageRecord,
    SHRINK,
};

/// Now by the wall clock, in Unix seconds: what key expiry is measured against.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}
