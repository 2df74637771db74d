//! Where counters, usage and the tenant directory live: the [`Store`] trait and the embedded
//! [`MemoryStore`]. A DynamoDB store shared by a fleet plugs into the same trait.

mod memory;
mod types;

pub use memory::MemoryStore;
pub use types::{
    CommitOutcome, DeadLetter, EventOutcome, ExportClaim, ExportKey, FlushId, Grant, PlanChange, PlanChangeOutcome,
    QuotaKey, Reservation, ReserveToken, Store, StoreError, StoreInspect, TenantRecord, UsageAggregate, UsageBatch,
    UsageEvent, UsageRecord,
};
