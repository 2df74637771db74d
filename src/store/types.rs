use std::{fmt, time::Duration};

use async_trait::async_trait;

use crate::{
    config::{MeterId, Period, PlanId, TenantId},
    tenant::KeyHash,
};

/// One quota counter: a tenant's units of one meter in one calendar period.
///
/// The key carries the period's kind and anchor with its bounds, so that a tenant moved from a
/// day quota to a month quota (or to another anchor day) starts a counter of its own instead of
/// sharing or exhausting another one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct QuotaKey {
    /// The tenant.
    pub tenant: TenantId,
    /// The meter.
    pub meter: MeterId,
    /// The kind of period (day, or month with its anchor day).
    pub period: Period,
    /// The start of the period, in Unix seconds (UTC).
    pub start: i64,
    /// The end of the period (exclusive), in Unix seconds (UTC).
    pub end: i64,
}

impl QuotaKey {
    /// The counter of `tenant` on `meter` for the period `[start, end)` of kind `period`.
    pub fn new(tenant: TenantId, meter: MeterId, period: Period, start: i64, end: i64) -> Self {
        Self { tenant, meter, period, start, end }
    }

    /// The period's kind as a short stable text: `day`, or `month@D` for a month anchored on day D.
    pub fn period_tag(&self) -> String {
        match self.period {
            Period::Month { anchor_day } => format!("month@{anchor_day}"),
            _ => self.period.name().to_owned(),
        }
    }
}

/// Who sent a quota call, and its place in that sender's sequence: a call retried after a
/// timeout carries the same token, so a store applies it at most once.
///
/// A store keeps, per key and node, the sequence number of the last call it applied (and that
/// call's answer); a call whose sequence number is not higher is not applied again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ReserveToken {
    /// The node (one engine in one process), drawn at random when the engine is built.
    pub node: u64,
    /// Increases with every quota call of that node.
    pub seq: u64,
}

impl ReserveToken {
    /// A token.
    pub fn new(node: u64, seq: u64) -> Self {
        Self { node, seq }
    }
}

/// A call to [`Store::reserve`]: units wanted under a limit, and units owed regardless.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reservation {
    /// The counter.
    pub key: QuotaKey,
    /// Units wanted: with `limit`, granted only as far as the limit allows.
    pub units: u64,
    /// Units already used (admitted while the store was unreachable, or reported by handlers
    /// beyond the lease): added to the counter unconditionally, past the limit if need be, so
    /// that the period stays spent and the overage is visible.
    pub owed: u64,
    /// The hard limit of the period, if any.
    pub limit: Option<u64>,
    /// The call's token.
    pub token: ReserveToken,
    /// Under a limit, the fewest units worth granting (what a waiting request needs): near
    /// the limit the grant shrinks towards it, see [`grant_for`](Self::grant_for). Equal to
    /// `units` unless [`shrinking`](Self::shrinking) was called: no shrinking.
    pub at_least: u64,
}

/// Near a hard limit a grant is at most `1 / SHRINK` of the units left.
pub const SHRINK: u64 = 8;

impl Reservation {
    /// A reservation of `units` of `key` under `limit`, owing `owed`.
    pub fn new(key: QuotaKey, units: u64, owed: u64, limit: Option<u64>, token: ReserveToken) -> Self {
        Self { key, units, owed, limit, token, at_least: units }
    }

    /// A lease that shrinks near the limit: it is granted at most an eighth of the units left
    /// (rounded up), but `at_least` of them if that many are left. So the last units of a
    /// period go out in ever smaller leases, and a node that goes quiet strands few.
    #[must_use]
    pub fn shrinking(mut self, at_least: u64) -> Self {
        self.at_least = at_least.min(self.units);
        self
    }

    /// The units granted when `left` remain under the limit (after what is owed): what is
    /// asked, at most [`SHRINK`]th of `left` rounded up (never below `at_least`), and never
    /// more than `left`. Every store grants by this rule.
    pub fn grant_for(&self, left: u64) -> u64 {
        self.units.min(left.div_ceil(SHRINK).max(self.at_least)).min(left)
    }

    /// The fewest units that must be left for [`grant_for`](Self::grant_for) to allow a
    /// grant of `granted` (for stores that grant by a conditional write: the condition).
    pub fn left_needed(&self, granted: u64) -> u64 {
        if granted <= self.at_least {
            granted
        } else {
            granted.max(SHRINK * (granted - 1) + 1)
        }
    }
}

/// The answer to [`Store::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Grant {
    /// Units granted (reserved) to the caller: at most what was asked, beside what was owed.
    pub granted: u64,
    /// Units reserved by every node together for this key after the call (owed units
    /// included).
    pub reserved: u64,
}

impl Grant {
    /// A grant of `granted` units, leaving `reserved` reserved in all.
    pub fn new(granted: u64, reserved: u64) -> Self {
        Self { granted, reserved }
    }
}

/// An opaque, unique id of one flush: a retried flush carries the same id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlushId(String);

impl FlushId {
    /// An id.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
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
}

impl UsageRecord {
    /// `quantity` units of `meter` used by `tenant` in the window starting at `window_start`.
    pub fn new(tenant: TenantId, meter: MeterId, window_start: i64, quantity: u64) -> Self {
        Self { tenant, meter, window_start, quantity }
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
    /// The tenant's billing customer, when the directory knows it.
    pub customer: Option<String>,
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
    /// flight, no customer known); set the other fields as the store holds them.
    pub fn new(key: ExportKey, quantity: u64) -> Self {
        Self {
            key,
            quantity,
            exported: 0,
            revision: 0,
            in_flight: None,
            customer: None,
            send: None,
            attempts: 0,
            unknown_failures: 0,
            first_attempt_at: None,
            claimed_until: None,
        }
    }
}

/// What one export of an aggregate sends (the usage itself is `in_flight - exported`, or the
/// running total): fixed by [`Store::begin_export`] and kept in the store until the export is
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
}

impl ExportSend {
    /// An export of `value` at `timestamp` for `customer`, on the meter named `event_name`.
    pub fn new(value: u64, timestamp: i64, customer: Option<String>, event_name: impl Into<String>) -> Self {
        Self { value, timestamp, customer, event_name: event_name.into() }
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
    pub fn new(node: u64, now: i64, until: i64) -> Self {
        Self { node, now, until }
    }
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

/// Whether [`Store::commit_events`] applied an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventOutcome {
    /// Applied now, and its id marked seen in the same write.
    Applied,
    /// Its id was seen before: nothing changed.
    Duplicate,
}

/// A plan change driven by a billing event (a Stripe webhook): applied to the tenant of
/// `customer` only if `event_id` is new and the event is newer than the last one applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlanChange {
    /// The billing event's id.
    pub event_id: String,
    /// The billing customer.
    pub customer: String,
    /// When the event was created (Unix seconds).
    pub created: i64,
    /// The tenant's new plan.
    pub plan: PlanId,
}

impl PlanChange {
    /// A change of `customer`'s tenant to `plan`, by event `event_id` created at `created`.
    pub fn new(event_id: impl Into<String>, customer: impl Into<String>, created: i64, plan: PlanId) -> Self {
        Self { event_id: event_id.into(), customer: customer.into(), created, plan }
    }
}

/// What [`Store::apply_plan_change`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanChangeOutcome {
    /// Applied: the tenant as stored now. The event id is marked seen in the same write.
    Applied(TenantRecord),
    /// The event id was seen before: nothing changed.
    Duplicate,
    /// An event newer than this one was applied for the customer: its id is marked seen,
    /// nothing else changed.
    Stale,
    /// No tenant has this customer: nothing changed (the id is not marked, so a retry after
    /// the tenant exists applies it).
    UnknownCustomer,
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

/// A tenant in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TenantRecord {
    /// The tenant.
    pub id: TenantId,
    /// Its plan.
    pub plan: PlanId,
    /// Its billing customer (a Stripe customer id), if any.
    pub customer: Option<String>,
    /// When the newest billing event applied to it was created (Unix seconds).
    pub last_event_at: Option<i64>,
    /// Its overrides of its plan, in their JSON form
    /// ([`PlanOverride::to_json`](crate::config::PlanOverride::to_json)): kept as text by the
    /// store, read by the engine against its configuration.
    pub overrides: Option<String>,
}

impl TenantRecord {
    /// `id` on `plan`, without a billing customer.
    pub fn new(id: TenantId, plan: PlanId) -> Self {
        Self { id, plan, customer: None, last_event_at: None, overrides: None }
    }

    /// With a billing customer (a Stripe customer id).
    #[must_use]
    pub fn with_customer(mut self, customer: impl Into<String>) -> Self {
        self.customer = Some(customer.into());
        self
    }
}

/// An API key in the directory: its SHA-256 hash (never the key), its tenant, a short id to
/// name it by, the first characters of the key to recognise it by, and an optional expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiKeyRecord {
    /// The key's SHA-256 hash.
    pub hash: KeyHash,
    /// The tenant it identifies.
    pub tenant: TenantId,
    /// Its id: [`KeyHash::id`], so an id can be given for a key imported as a hash too.
    pub id: String,
    /// The first characters of the key, for people to recognise it (`tg_live_ab12`); empty
    /// when only the hash was ever known.
    pub prefix: String,
    /// When it was added (Unix seconds).
    pub created_at: i64,
    /// From when it no longer works (Unix seconds, wall clock), if ever: expired keys stay
    /// listed but no longer identify anyone.
    pub expires_at: Option<i64>,
}

impl ApiKeyRecord {
    /// The key with this hash, identifying `tenant`, added at `created_at`, without a prefix
    /// or an expiry.
    pub fn new(hash: KeyHash, tenant: TenantId, created_at: i64) -> Self {
        Self { id: hash.id(), hash, tenant, prefix: String::new(), created_at, expires_at: None }
    }

    /// With the first characters of the key.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Expiring at `at` (Unix seconds).
    #[must_use]
    pub fn with_expiry(mut self, at: Option<i64>) -> Self {
        self.expires_at = at;
        self
    }

    /// Whether the key still works at `now` (Unix seconds).
    pub fn is_live(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// A claim on an `Idempotency-Key` for the whole fleet: the first node to put it runs the
/// request; every node answers the others from it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyClaim {
    /// The key with its tenant: a SHA-256 digest in hexadecimal (never the key itself).
    pub key: String,
    /// The request the key is bound to (method, path and query): a digest in hexadecimal.
    pub request: String,
    /// Who claims it: drawn per request, so only this claim can settle it.
    pub owner: u64,
    /// Now, in Unix seconds.
    pub now: i64,
    /// Until when an unsettled claim holds (a node that dies with the request in flight
    /// leaves the key usable again after this).
    pub in_flight_until: i64,
    /// When the binding expires (`limits.idempotency_window` after the claim).
    pub expires_at: i64,
}

impl IdempotencyClaim {
    /// A claim of `key` for `request` by `owner` at `now`, in flight until `in_flight_until`,
    /// forgotten at `expires_at`.
    pub fn new(
        key: impl Into<String>,
        request: impl Into<String>,
        owner: u64,
        now: i64,
        in_flight_until: i64,
        expires_at: i64,
    ) -> Self {
        Self { key: key.into(), request: request.into(), owner, now, in_flight_until, expires_at }
    }
}

/// What the store said to an [`IdempotencyClaim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencyState {
    /// The key was free (never used, expired, or its holder's in-flight time ran out): it is
    /// now bound to this request, in flight, for this owner.
    Claimed,
    /// The key is bound to this request, which another claim is still running: 409.
    InFlight,
    /// The key is bound to this request, which completed: a replay (not charged).
    Completed,
    /// The key is bound to another request: 422.
    Mismatch,
}

/// How a claimed key ends: [`Store::settle_idempotency`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencySettle {
    /// The request completed and was billed: later requests with the key are replays until
    /// the binding expires.
    Completed,
    /// The request was not billed (refused, failed, dropped): the key is free again.
    Released,
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
    /// The store cannot be used at all: a database file that is not the store's, is damaged,
    /// or was written by a newer version. Retrying does not help.
    #[error("the store cannot be used: {0}")]
    Unusable(String),
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
    /// Adds `owed` to the counter of `r.key`, then reserves up to `r.units` more for the
    /// caller: with `r.limit`, the total reserved by all callers never exceeds it through
    /// `units` (a hard quota); without, everything asked is granted.
    ///
    /// Applied at most once per [`ReserveToken`]: a call whose token's sequence number is not
    /// higher than the last one applied for that node and key changes nothing, and answers
    /// the grant of the call applied with that token if it is the same one.
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError>;

    /// Gives back `units` reserved earlier and not used; at most once per token, as
    /// [`reserve`](Self::reserve).
    async fn release(&self, key: &QuotaKey, units: u64, token: ReserveToken) -> Result<(), StoreError>;

    /// Adds a batch of usage to the aggregates, exactly once per batch id.
    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError>;

    /// Aggregates of windows that started before `window_start_before` with usage not yet
    /// exported (or an export in flight), not dead-lettered, in key order after `after` (a
    /// cursor: the last key of the previous page), at most `limit` of them.
    async fn pending_exports(
        &self,
        window_start_before: i64,
        after: Option<&ExportKey>,
        limit: usize,
    ) -> Result<Vec<UsageAggregate>, StoreError>;

    /// Claims the export of revision `aggregate.revision` for `claim.node` until `claim.until`,
    /// if the revision has not moved, it is not dead-lettered and no other node holds an
    /// unexpired claim; counts the attempt and records when the first began. If no export of
    /// the revision is in flight, fixes what it exports: `in_flight` becomes
    /// `aggregate.quantity` (what the caller read) and `send` the parameters given; an export
    /// already in flight keeps the ones fixed when it began. Returns the aggregate as stored
    /// after the call, or `None` when the revision moved or another node holds it.
    async fn begin_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError>;

    /// Holds the in-flight export of `aggregate.revision` for `claim.node` until `claim.until`
    /// without sending: the time of its next attempt, after a failure worth retrying; with
    /// `unknown`, the failure had no status and `unknown_failures` counts it. Returns `false`
    /// (and changes nothing) when the revision moved or another node holds it.
    async fn defer_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        unknown: bool,
    ) -> Result<bool, StoreError>;

    /// Records that the in-flight export of `aggregate.revision` was accepted (or, for a
    /// dead letter, confirmed by hand): `exported` becomes `in_flight`, the revision moves
    /// on, and the claim, the fixed parameters and any dead letter are cleared. Returns
    /// `false` (and changes nothing) when the stored revision is no longer
    /// `aggregate.revision` or nothing is in flight.
    async fn finish_export(&self, aggregate: &UsageAggregate) -> Result<bool, StoreError>;

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

    /// For a store that does not outlive its process: a value drawn when it was made, mixed
    /// into meter event identifiers, so that a restarted process (whose windows start at
    /// revision 0 again) never reuses an identifier it sent before. `None` for a durable
    /// store (identifiers stay the same across restarts, which is what makes a re-send after
    /// a crash a duplicate).
    fn identifier_salt(&self) -> Option<u64> {
        None
    }

    /// Applies usage events, each at most once per id: an event's id is marked seen in the same
    /// write as its usage, never before. Ids are kept for a documented window after the
    /// event's time (bounded, expiring). Returns one outcome per event, in order.
    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError>;

    /// Every aggregate of `tenant` in the windows starting in `[from, to)`, in key order.
    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError>;

    /// The tenants of the directory, in id order after `after`, at most `limit` of them.
    async fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>, StoreError>;

    /// The tenant whose billing customer is `customer`.
    async fn tenant_by_customer(&self, customer: &str) -> Result<Option<TenantRecord>, StoreError>;

    /// Applies a plan change atomically: only if `change.event_id` was never seen and the
    /// event is not older than the last one applied to that customer; the id is marked seen in
    /// the same write as the change.
    async fn apply_plan_change(&self, change: &PlanChange) -> Result<PlanChangeOutcome, StoreError>;

    /// The tenant owning the API key with this hash, if the key has not expired (by the wall
    /// clock).
    async fn find_key(&self, key: &KeyHash) -> Result<Option<TenantRecord>, StoreError>;

    /// Adds an API key, or updates its prefix and expiry. Refused with
    /// [`StoreError::Conflict`] when the hash belongs to another tenant.
    async fn put_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError>;

    /// The API keys of `tenant`, expired ones included, in id order.
    async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError>;

    /// A tenant by id.
    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError>;

    /// Creates or replaces a tenant and gives it these keys (keys held by nobody else); a key
    /// new to the store gets no prefix and no expiry, one it holds keeps them.
    async fn put_tenant(&self, record: &TenantRecord, keys: &[KeyHash]) -> Result<(), StoreError>;

    /// Sets (or with `None` removes) a tenant's overrides of its plan, changing nothing else
    /// of it (a plan change by a webhook at the same moment is kept). Returns whether the
    /// tenant exists.
    async fn set_overrides(&self, tenant: &TenantId, overrides: Option<&str>) -> Result<bool, StoreError>;

    /// Removes an API key from the directory.
    async fn remove_key(&self, key: &KeyHash) -> Result<(), StoreError>;

    /// Claims an `Idempotency-Key` for the fleet: one conditional write. A binding that
    /// expired, or whose in-flight time ran out unsettled, is replaced; otherwise the binding
    /// stays and the answer says what it is. Bindings are bounded and expire at
    /// `expires_at`.
    async fn claim_idempotency(&self, claim: &IdempotencyClaim) -> Result<IdempotencyState, StoreError>;

    /// Settles a claim made by `owner`: marks the key completed, or frees it. Changes nothing
    /// when the key is no longer held by `owner`.
    async fn settle_idempotency(&self, key: &str, owner: u64, how: IdempotencySettle) -> Result<(), StoreError>;

    /// The most usage records one [`commit_usage`](Self::commit_usage) call takes; larger
    /// flushes are split into several batches, each with its own id.
    fn max_batch_records(&self) -> usize {
        usize::MAX
    }
}

/// What tests and reports read from a store beyond what the engine needs.
#[async_trait]
pub trait StoreInspect: Store {
    /// Units reserved so far for `key`.
    async fn reserved(&self, key: &QuotaKey) -> Result<u64, StoreError>;

    /// The aggregate of (tenant, meter, window), if any usage was committed for it.
    async fn usage(&self, key: &ExportKey) -> Result<Option<UsageAggregate>, StoreError>;
}
