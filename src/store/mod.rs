//! Where counters, usage and the tenant directory live: one small trait per role, and the
//! stores that implement them.
//!
//! | role | trait | what it holds | who calls it |
//! |---|---|---|---|
//! | quota | [`QuotaStore`] | reserved units per (tenant, meter, period); the values of an open dimension a tenant used per month | leases, on the request path's refills |
//! | usage | [`UsageStore`] | usage aggregates per (tenant, meter, window) | the flush pipeline, usage events, reports |
//! | export | [`ExportStore`] | each aggregate's export state, dead letters, the identifier namespace | the exporter, `tollgate dead-letters` |
//! | ledger | [`LedgerStore`] | what each export sent, and what reconciliation found lacking | reconciliation |
//! | directory | [`DirectoryStore`] | key hashes, tenants, plans, customers, overrides; the feed of tenants changed ([`Changes`]) | tenant lookups, [`Admin`](crate::admin::Admin), webhooks, every node's follow of the feed |
//! | idempotency | [`IdempotencyStore`] | `Idempotency-Key` bindings | requests carrying the header |
//! | rate | [`RateStore`] | a GCRA bucket per tenant whose rate the fleet shares (`rate_scope = "fleet"`) | cell leases, on the request path |
//! | places | [`PlaceStore`] | each node's places among a tenant's requests in flight (`concurrency_scope = "fleet"`) | place leases, their renewal and release |
//! | alerts | [`OutboxStore`] | alerts (threshold crossings) to deliver as signed webhooks, and their delivery state | the nodes that see a crossing, the worker's deliveries, `tollgate alerts` |
//! | audit | [`AuditStore`] | every change to a tenant's settings: who, what, before and after, when ([`AuditRecord`]) | whoever changes a setting, `tollgate audit`, the dashboard; kept with the directory |
//!
//! [`Store`] is every role at once, implemented for any type that has them all. The usage,
//! export and ledger roles share writes, so one store holds the three ([`UsageExportStore`]).
//! [`Tollgate::builder`](crate::Tollgate::builder) takes one store for everything, or one per
//! role (for example a directory kept in the team's own database, quotas in DynamoDB).
//!
//! The stores here: `SqliteStore` (durable, one file; feature `sqlite`, on by default),
//! [`MemoryStore`] (tests and ephemeral use), `DynamoStore` (a fleet on AWS; feature
//! `dynamodb`) and `PostgresStore` (a fleet on PostgreSQL, behind PgBouncer too; feature
//! `postgres`). The numbers they all keep to are in [`contract`].

mod audit;
mod changes;
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod conformance;
pub mod contract;
mod credits;
mod directory;
#[cfg(feature = "dynamodb")]
mod dynamo;
mod error;
mod export;
mod ext;
#[cfg(any(test, feature = "test-util"))]
mod faults;
mod idempotency;
mod ledger;
pub(crate) mod limited;
mod memory;
mod outbox;
mod payments;
mod place;
#[cfg(feature = "postgres")]
mod postgres;
mod quota;
#[cfg(any(feature = "dynamodb", feature = "redis"))]
pub(crate) mod race;
mod rate;
pub(crate) mod recharge;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
mod sqlite;
pub(crate) mod tenant_quota;
mod tiers;
mod usage;
mod values;

use std::sync::Arc;

pub use crate::base::{
    DirectoryEvents, KeyHash, KeyScope, KeyScopes, RechargeNews, RefundAttribution, Standing, TierNews, Told,
    WebhookCount,
};
pub(crate) use audit::append_audit;
pub use audit::{
    Actor, AuditCursor, AuditQuery, AuditRecord, AuditStore, Setting, AUDIT_ACTOR_MAX, AUDIT_KEPT_SECS,
    AUDIT_PER_TENANT, AUDIT_VALUE_MAX, DEFAULT_OPERATOR,
};
pub use changes::{ChangeCall, Changes, TenantChange, CHANGES_KEPT};
pub(crate) use directory::tell_changed;
pub use directory::{
    ApiKeyRecord, DirectoryStore, KeyWrite, PastDue, PlanChange, PlanChangeOutcome, SubscriptionsChange, TenantRecord,
    TenantUpdate, UpdateWhen,
};
#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub use dynamo::{DynamoReads, DynamoStore};
pub use error::StoreError;
pub(crate) use export::draw_namespace;
pub use export::{DeadLetter, Deferral, ExportClaim, ExportKey, ExportSend, ExportStore, UsageAggregate};
pub use ext::{DirectoryStoreExt, ExportStoreExt, QuotaStoreExt, UsageStoreExt};
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub use faults::{Defect, Fault, FaultCounts, FaultPlan, Faults};
pub use idempotency::{
    CompletedRequest, IdempotencyClaim, IdempotencySettle, IdempotencySettled, IdempotencyState, IdempotencyStore,
    StoredResponse,
};
pub use ledger::{LedgerEntry, LedgerStore, LEDGER_KEPT_SECS};
pub use memory::MemoryStore;
pub use outbox::{
    AlertClaim, AlertKey, AlertOutcome, AlertQuery, AlertState, OutboxEntry, OutboxStore, DEAD_KEPT_SECS, MAX_ERROR,
};
pub use payments::{
    DisputeMark, DisputeStep, PaymentAnswer, PaymentCall, PaymentEntry, PaymentOutcome, PaymentRow, DISPUTES_KEPT,
    ORPHANS_KEPT, PAYMENTS_KEPT, PAYMENT_ID_MAX, PAYMENT_KEPT_SECS,
};
pub use place::{PlaceCall, PlaceMode, PlaceRow, PlaceStore, PlaceStoreExt, Places};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{PostgresOptions, PostgresStore, POSTGRES_SCHEMA_VERSION};
pub use quota::{
    capped_limit, Apart, CapMode, Closed, CreditBalance, CreditClosure, CreditGrant, CreditRefund, CreditTake, Grant,
    GrantOutcome, Kept, QuotaCounter, QuotaKey, QuotaStore, RefundOutcome, Release, Reservation, ReserveToken,
    SpendCap, SHRINK, TAKES_MAX,
};
pub use rate::{CellCall, CellGrant, CellReturn, RateRow, RateStore};
pub use recharge::{
    month_of, RechargeAction, RechargeClaim, RechargeFailure, RechargeMode, RechargePack, RechargeSeen,
    RechargeSetting, RechargeState, CLAIM_TAKEN_SECS, CREDIT_UNANNOUNCED_SECS, FAILURES_BEFORE_OFF, PROCESSING_SECS,
    RETRY_AFTER_FAILURE_SECS, UNWANTED_CLAIM_SECS,
};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{RedisCalls, RedisOptions, RedisStore, LAYOUT_VERSION as REDIS_LAYOUT_VERSION};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::SqliteStore;
pub(crate) use tiers::climb;
pub use usage::{
    CommitOutcome, EventOutcome, FlushId, Tally, TallyQuery, TallyRead, TallyScope, UsageBatch, UsageEvent,
    UsageRecord, UsageStore, TALLY_ADMITTED, TALLY_OUTCOME_MAX, TALLY_PAID, TALLY_SPENT,
};
pub use values::{HeldValues, ValueCall, ValueMode, ValueRow};

/// The role traits, to call store methods on any store: `use tollgate::store::prelude::*;`.
pub mod prelude {
    pub use super::{
        AuditStore, DirectoryStore, DirectoryStoreExt, ExportStore, ExportStoreExt, IdempotencyStore, LedgerStore,
        OutboxStore, PlaceStore, PlaceStoreExt, QuotaStore, QuotaStoreExt, RateStore, Store, UsageExportStore,
        UsageStore, UsageStoreExt,
    };
    #[cfg(any(test, feature = "test-util"))]
    pub use super::{QuotaInspect, StoreInspect, UsageInspect};
}

/// Every role at once: what [`Tollgate::builder`](crate::Tollgate::builder)'s `store` takes.
///
/// Implemented for every type that implements the ten roles; implement those, never this.
pub trait Store:
    QuotaStore + UsageExportStore + DirectoryStore + IdempotencyStore + RateStore + PlaceStore + OutboxStore + AuditStore
{
}

impl<T> Store for T where
    T: QuotaStore
        + UsageStore
        + ExportStore
        + LedgerStore
        + DirectoryStore
        + IdempotencyStore
        + RateStore
        + PlaceStore
        + OutboxStore
        + AuditStore
        + ?Sized
{
}

/// The usage, export and ledger roles together, as one store holds them: they share writes
/// (the export state is kept beside the usage it exports, and an export's ledger entry is
/// written with its export).
///
/// Implemented for every type that implements the three.
pub trait UsageExportStore: UsageStore + ExportStore + LedgerStore {}

impl<T> UsageExportStore for T where T: UsageStore + ExportStore + LedgerStore + ?Sized {}

/// What tests read from a quota store beyond what the engine needs (feature `test-util`).
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
#[async_trait::async_trait]
pub trait QuotaInspect: QuotaStore {
    /// Units reserved so far for `key`.
    async fn reserved(&self, key: &QuotaKey) -> Result<u64, StoreError>;
}

/// What tests read from a usage store beyond what the engine needs (feature `test-util`).
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
#[async_trait::async_trait]
pub trait UsageInspect: UsageExportStore {
    /// The aggregate of (tenant, meter, window), if any usage was committed for it.
    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError>;
}

/// A whole store that tests can read beyond what the engine needs (feature `test-util`):
/// implemented for every [`Store`] that implements [`QuotaInspect`] and [`UsageInspect`].
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub trait StoreInspect: Store + QuotaInspect + UsageInspect {}

#[cfg(any(test, feature = "test-util"))]
impl<T> StoreInspect for T where T: Store + QuotaInspect + UsageInspect + ?Sized {}

/// The store of each role an engine uses.
#[derive(Debug, Clone)]
pub(crate) struct Roles {
    pub(crate) quota: Arc<dyn QuotaStore>,
    pub(crate) usage: Arc<dyn UsageExportStore>,
    pub(crate) directory: Arc<dyn DirectoryStore>,
    pub(crate) idempotency: Arc<dyn IdempotencyStore>,
    pub(crate) rate: Arc<dyn RateStore>,
    pub(crate) places: Arc<dyn PlaceStore>,
    pub(crate) alerts: Arc<dyn OutboxStore>,
    /// The directory's store, or one given in code.
    pub(crate) audit: Arc<dyn AuditStore>,
}

/// Now by the wall clock, in Unix seconds: what key expiry is measured against.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}
