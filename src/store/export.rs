//! The export role: the export state of each usage aggregate (revision, claim, attempts), and the
//! dead letters.

use std::fmt;

use async_trait::async_trait;

use super::StoreError;
use crate::base::{MeterId, TenantId};

/// Identifies one usage aggregate: (tenant, meter, window).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub struct ExportKey {
    /// The tenant.
    pub tenant: TenantId,
    /// The meter.
    pub meter: MeterId,
    /// The start of the window, in Unix seconds.
    pub window_start: i64,
}

impl ExportKey {
    /// The aggregate of `tenant` on `meter` in the window starting at `window_start`.
    #[must_use]
    pub fn new(tenant: TenantId, meter: MeterId, window_start: i64) -> Self {
        Self { tenant, meter, window_start }
    }
}

/// A usage aggregate and its export state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// While revision `revision` is being exported: what it sends, fixed when the export
    /// began, so a retry re-sends exactly the same parameters under the same idempotency key.
    pub send: Option<ExportSend>,
    /// How many times the export of the current revision was begun (claimed).
    pub attempts: u32,
    /// How many of those attempts failed without a status (a dropped connection, a timeout):
    /// past `export.max_unknown_failures` the export is dead-lettered.
    pub unknown_failures: u32,
    /// When the export of the current revision was first begun (Unix seconds).
    pub first_attempt_at: Option<i64>,
    /// Until when the node that last began it holds the export (Unix seconds). After a
    /// failed attempt it is the time of the next one: no node sends it before then.
    pub claimed_until: Option<i64>,
}

impl UsageAggregate {
    /// An aggregate of `quantity` units, nothing exported yet (revision 0, no export in
    /// flight); set the other fields as the store holds them.
    #[must_use]
    pub fn new(key: ExportKey, quantity: u64) -> Self {
        Self {
            key,
            quantity,
            exported: 0,
            revision: 0,
            in_flight: None,
            send: None,
            attempts: 0,
            unknown_failures: 0,
            first_attempt_at: None,
            claimed_until: None,
        }
    }
}

/// What one export of an aggregate sends (the usage itself is `in_flight - exported`, or the
/// running total): fixed by [`ExportStore::begin_export`] and kept in the store until the export is
/// finished, so that a retry, on any node, re-sends exactly the same parameters under the same
/// idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct ExportSend {
    /// The value sent: the delta for a `sum` meter, the window's running total for a
    /// pre-aggregated one.
    pub value: u64,
    /// The event's time, in Unix seconds.
    pub timestamp: i64,
    /// The billing customer it is sent for; `None` when the tenant is not billable (nothing
    /// is sent, the revision is skipped).
    pub customer: Option<String>,
    /// The billing system's name for the meter.
    pub event_name: String,
    /// The meter event's identifier, fixed when the export began (in the store's
    /// [namespace](ExportStore::identifier_namespace) of that time): a later change of
    /// namespace never re-sends an export in flight under another identifier. `None` in what
    /// tollgate stored before identifier namespaces, whose identifiers had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
}

impl ExportSend {
    /// An export of `value` at `timestamp` for `customer`, on the meter named `event_name`.
    pub fn new(value: u64, timestamp: i64, customer: Option<String>, event_name: impl Into<String>) -> Self {
        Self { value, timestamp, customer, event_name: event_name.into(), identifier: None }
    }

    /// The same, sent under `identifier`.
    #[must_use]
    pub fn with_identifier(mut self, identifier: impl Into<String>) -> Self {
        self.identifier = Some(identifier.into());
        self
    }

    /// As stored: compact JSON.
    #[cfg_attr(not(any(feature = "sqlite", feature = "dynamodb")), allow(dead_code))]
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// From what [`to_json`](Self::to_json) stored; `None` if unreadable.
    #[cfg_attr(not(any(feature = "sqlite", feature = "dynamodb")), allow(dead_code))]
    pub(crate) fn from_json(s: &str) -> Option<Self> {
        serde_json::from_str(s).ok()
    }
}

/// A node's claim on an export: it alone sends the current revision until `until`, then
/// another node may take over (the same revision, the same identifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportClaim {
    /// The claiming node.
    pub node: u64,
    /// Now, in Unix seconds.
    pub now: i64,
    /// Until when the claim holds, in Unix seconds.
    pub until: i64,
}

impl ExportClaim {
    /// A claim by `node` at `now`, holding until `until`.
    #[must_use]
    pub fn new(node: u64, now: i64, until: i64) -> Self {
        Self { node, now, until }
    }
}

/// Why an export waits for a later attempt ([`ExportStore::defer_export`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Deferral {
    /// The call failed with a status after which the billing system may hold the event (a
    /// 5xx, a 408), or an earlier attempt may have reached it: retried later, nothing else
    /// changes.
    Failed,
    /// The call failed without a status (a dropped connection, a timeout): it may have been
    /// taken; `unknown_failures` counts it.
    Unknown,
    /// Nothing of this export may have reached the billing system: this attempt was refused
    /// without being executed (a 429, refused credentials) or never left the machine (a
    /// refused connection, a failed name lookup), and it was the attempt that set
    /// `first_attempt_at`. That time is cleared, so that `export.unconfirmed_after` counts from
    /// the first call that may have been taken; only if `attempts` is still the value given
    /// (the count after this attempt's begin): another attempt begun since, which may have
    /// been taken, keeps it.
    NeverSent(u32),
}

/// An aggregate whose export was refused for good, parked until requeued.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Which aggregate.
    pub key: ExportKey,
    /// Its units not exported.
    pub units: u64,
    /// Why it was parked: a refusal by the billing system, or `unconfirmed: …` for an export
    /// sent but never confirmed within the billing system's de-duplication time.
    pub reason: String,
    /// The revision whose export was parked.
    pub revision: u32,
    /// What that export sent (or would have sent), if it had begun: with the identifier of
    /// (key, revision), what to look for in the billing system when reconciling.
    pub send: Option<ExportSend>,
}

impl DeadLetter {
    /// A dead letter of `units` units of `key`.
    pub fn new(key: ExportKey, units: u64, reason: impl Into<String>) -> Self {
        Self { key, units, reason: reason.into(), revision: 0, send: None }
    }
}

/// Where the export state of the usage aggregates lives: `begin_export` and `finish_export` only
/// move an aggregate from the revision the caller read, so that any node may export and each
/// revision is sent under one identifier.
#[async_trait]
pub trait ExportStore: Send + Sync + fmt::Debug + 'static {
    /// Aggregates of windows that started before `window_start_before` with usage not yet
    /// exported (or an export in flight), not dead-lettered, in key order after `after` (a
    /// cursor: the last key of the previous page), at most `limit` of them. Only export
    /// candidates: aggregates to which a [billable](crate::store::UsageRecord::billable) record
    /// was committed.
    async fn pending_exports(
        &self,
        window_start_before: i64,
        after: Option<&ExportKey>,
        limit: usize,
    ) -> Result<Vec<UsageAggregate>, StoreError>;

    /// Claims the export of revision `aggregate.revision` for `claim.node` until `claim.until`,
    /// if the revision has not moved, it is not dead-lettered and no other node holds an
    /// unexpired claim; counts the attempt and records when the first that may reach the
    /// billing system began (`first_attempt_at`, if none is recorded). If no export of the
    /// revision is in flight, or one is but nothing of it may have reached the billing system
    /// (`first_attempt_at` cleared by a [`Deferral::NeverSent`]) and the caller read it so
    /// (`aggregate.first_attempt_at` is `None`: it planned from the quantity), fixes what it exports:
    /// `in_flight` becomes `aggregate.quantity` (what the caller read) and `send` the
    /// parameters given; an export in flight that may have reached it keeps the ones fixed
    /// when it began. Returns the aggregate as stored after the call, or `None` when the
    /// revision moved or another node holds it.
    async fn begin_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError>;

    /// Holds the in-flight export of `aggregate.revision` for `claim.node` until `claim.until`
    /// without sending: the time of its next attempt, after a failure worth retrying. A
    /// [`Deferral::Unknown`] counts in `unknown_failures`; a [`Deferral::NeverSent`] clears
    /// `first_attempt_at` if no attempt began since. Returns `false` (and changes nothing) when the revision moved or
    /// another node holds it.
    async fn defer_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        deferral: Deferral,
    ) -> Result<bool, StoreError>;

    /// Records that the in-flight export of `aggregate.revision` was accepted (or, for a
    /// dead letter, confirmed by hand), at `now`: `exported` becomes `in_flight`, the revision
    /// moves on, and the claim, the fixed parameters and any dead letter are cleared. What it
    /// sent, if it had a customer, goes in the [ledger](super::LedgerStore::ledger) in the same write.
    /// Returns `false` (and changes nothing) when the stored revision is no longer
    /// `aggregate.revision` or nothing is in flight.
    async fn finish_export(&self, aggregate: &UsageAggregate, now: i64) -> Result<bool, StoreError>;

    /// Parks an aggregate whose export was refused for good (or never confirmed), so it is
    /// not retried; what was in flight stays, for reconciliation. Changes nothing when the
    /// stored revision is no longer `aggregate.revision`.
    async fn dead_letter(&self, aggregate: &UsageAggregate, reason: &str) -> Result<(), StoreError>;

    /// The dead letters, in key order after `after`, at most `limit` of them.
    async fn dead_letters(&self, after: Option<&ExportKey>, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;

    /// Puts a dead letter back in line for export (after its cause was fixed) as a new
    /// revision, with a new identifier and parameters fixed anew: whatever the parked export
    /// had sent was not taken. Returns whether there was one.
    async fn requeue_dead_letter(&self, key: &ExportKey) -> Result<bool, StoreError>;

    /// Whether what the store holds outlives this process (a database, a shared table).
    /// `false` for an in-memory store: shutdown then exports every window, open ones
    /// included, since nothing would be left to export them later.
    fn is_durable(&self) -> bool {
        true
    }

    /// The namespace mixed into the identifiers of the meter events this store's exports
    /// send: drawn once when the store is made (a new SQLite file, a table made by
    /// `tollgate dynamodb create-table`, each memory store) and kept, so that two deployments
    /// billing into one account, or a memory store of a restarted process, never send one
    /// identifier for two events. A store made before identifier namespaces has the empty
    /// namespace (its identifiers as they were) until it is changed.
    ///
    /// An export in flight keeps the identifier it began with
    /// ([`ExportSend::identifier`]).
    async fn identifier_namespace(&self) -> Result<String, StoreError>;

    /// Replaces the namespace with `new` if it is still `current` (one conditional write).
    /// Returns whether it did.
    async fn set_identifier_namespace(&self, current: &str, new: &str) -> Result<bool, StoreError>;
}

/// A namespace for a new store: 16 hex digits from the operating system's randomness.
pub(crate) fn draw_namespace() -> String {
    format!("{:016x}", crate::base::draw_u64())
}
