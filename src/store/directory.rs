//! The directory role: API key hashes to tenants; tenants to plans, billing customers and
//! overrides; plan changes applied once per webhook event.

use std::fmt;

use async_trait::async_trait;

use super::{ChangeCall, Changes, StoreError};
use crate::base::{KeyHash, KeyScopes, PlanId, TenantId};

/// A tenant in the directory. `Debug` never shows its alert endpoint's secrets.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TenantRecord {
    /// The tenant.
    pub id: TenantId,
    /// Its plan.
    pub plan: PlanId,
    /// Its billing customer (a Stripe customer id), if any.
    pub customer: Option<String>,
    /// Its Metronome customer id or ingest alias, if any: what its events carry when the
    /// billing sink is Metronome.
    pub metronome_customer: Option<String>,
    /// When the newest billing event applied to it was created (Unix seconds).
    pub last_event_at: Option<i64>,
    /// Its overrides of its plan, in their JSON form
    /// ([`PlanOverride::to_json`](crate::config::PlanOverride::to_json)): kept as text by the
    /// store, read by the engine against its configuration.
    pub overrides: Option<String>,
    /// Its customer's subscriptions as the webhooks last saw them, in their JSON form (kept as
    /// text by the store, read by the webhook handler): each subscription's last event and the
    /// plan it gives, so that events are ordered per subscription and the plan follows every
    /// live one.
    pub subscriptions: Option<String>,
    /// Its own endpoint for its alerts, in its JSON form (`{"url": …, "secrets": ["whsec_…"]}`,
    /// kept as text by the store, read by the engine): the signing secrets are kept here, at
    /// rest in the directory.
    pub alert_endpoint: Option<String>,
}

impl fmt::Debug for TenantRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantRecord")
            .field("id", &self.id)
            .field("plan", &self.plan)
            .field("customer", &self.customer)
            .field("metronome_customer", &self.metronome_customer)
            .field("last_event_at", &self.last_event_at)
            .field("overrides", &self.overrides)
            .field("subscriptions", &self.subscriptions)
            .field("alert_endpoint", &self.alert_endpoint.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TenantRecord {
    /// `id` on `plan`, without a billing customer.
    #[must_use]
    pub fn new(id: TenantId, plan: PlanId) -> Self {
        Self {
            id,
            plan,
            customer: None,
            metronome_customer: None,
            last_event_at: None,
            overrides: None,
            subscriptions: None,
            alert_endpoint: None,
        }
    }

    /// With a Metronome customer id or ingest alias.
    #[must_use]
    pub fn with_metronome_customer(mut self, customer: impl Into<String>) -> Self {
        self.metronome_customer = Some(customer.into());
        self
    }

    /// Its customer in the billing system `field` names.
    #[must_use]
    pub fn customer_in(&self, field: crate::base::CustomerField) -> Option<&str> {
        match field {
            crate::base::CustomerField::Stripe => self.customer.as_deref(),
            crate::base::CustomerField::Metronome => self.metronome_customer.as_deref(),
        }
    }

    /// With a billing customer (a Stripe customer id).
    #[must_use]
    pub fn with_customer(mut self, customer: impl Into<String>) -> Self {
        self.customer = Some(customer.into());
        self
    }
}

/// An API key in the directory: its SHA-256 hash (never the key), its tenant, a short id to
/// name it by, the first characters of the key to recognise it by, an optional expiry, and its
/// scopes (what it may do at its tenant's own routes).
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
    /// What it may do at its tenant's own routes: [`KeyScopes::DEFAULT`] unless given others
    /// (a key stored before keys had scopes has the default).
    pub scopes: KeyScopes,
}

impl ApiKeyRecord {
    /// The key with this hash, identifying `tenant`, added at `created_at`, without a prefix
    /// or an expiry, with the default scopes.
    #[must_use]
    pub fn new(hash: KeyHash, tenant: TenantId, created_at: i64) -> Self {
        Self {
            id: hash.id(),
            hash,
            tenant,
            prefix: String::new(),
            created_at,
            expires_at: None,
            scopes: KeyScopes::DEFAULT,
        }
    }

    /// With these scopes.
    #[must_use]
    pub fn with_scopes(mut self, scopes: KeyScopes) -> Self {
        self.scopes = scopes;
        self
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
    #[must_use]
    pub fn is_live(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
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
    /// For a subscription's event: the tenant's subscriptions it was computed from, and after
    /// it. The change is then ordered by its subscription (by the caller), not by the
    /// tenant's last event: it applies only if the tenant's subscriptions are still those read.
    pub subscriptions: Option<SubscriptionsChange>,
}

impl PlanChange {
    /// A change of `customer`'s tenant to `plan`, by event `event_id` created at `created`.
    pub fn new(event_id: impl Into<String>, customer: impl Into<String>, created: i64, plan: PlanId) -> Self {
        Self { event_id: event_id.into(), customer: customer.into(), created, plan, subscriptions: None }
    }

    /// The same, by a subscription's event computed from the tenant as `read` (its plan and
    /// [subscriptions](TenantRecord::subscriptions)), whose subscriptions become `written`.
    #[must_use]
    pub fn with_subscriptions(mut self, read: &TenantRecord, written: impl Into<String>) -> Self {
        self.subscriptions = Some(SubscriptionsChange {
            read: read.subscriptions.clone(),
            plan: read.plan.clone(),
            written: written.into(),
        });
        self
    }
}

/// A tenant whose subscription went `past_due`, within its grace (`[stripe] past_due_grace`):
/// it keeps its plan until `until`, then moves to `plan` (a pass every 10 minutes makes the
/// move) unless a payment brings the subscription back first. Read from the tenant's
/// [subscriptions](TenantRecord::subscriptions) by the node serving it (the
/// `Tollgate-Past-Due` response header) and by the usage route.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PastDue {
    /// When the grace ends (Unix seconds).
    pub until: i64,
    /// The plan the tenant moves to then.
    pub plan: PlanId,
}

impl PastDue {
    /// A grace ending at `until`, moving to `plan`.
    #[must_use]
    pub fn new(until: i64, plan: PlanId) -> Self {
        Self { until, plan }
    }

    /// The `Tollgate-Past-Due` header's value: a structured-field dictionary (RFC 8941) of
    /// the end of the grace (RFC 3339, UTC) and the plan, `until="2026-12-06T12:00:00Z",
    /// plan="free"`.
    #[must_use]
    pub fn header_value(&self) -> String {
        let until = self.until_text();
        let plan = self.plan.as_str().replace('\\', "\\\\").replace('"', "\\\"");
        format!("until=\"{until}\", plan=\"{plan}\"")
    }

    /// When the grace ends, RFC 3339 in UTC (the number, out of chrono's range).
    #[must_use]
    pub fn until_text(&self) -> String {
        chrono::DateTime::from_timestamp(self.until, 0)
            .map_or_else(|| self.until.to_string(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
    }

    /// For a person: `keeps its plan until 2026-12-06T12:00:00Z, then moves to free`.
    #[must_use]
    pub fn line(&self) -> String {
        format!("keeps its plan until {}, then moves to {}", self.until_text(), self.plan)
    }
}

/// The subscriptions part of a [`PlanChange`]: what they were read as, what they become.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionsChange {
    /// The tenant's subscriptions as read: the change applies only if they are still these.
    pub read: Option<String>,
    /// The tenant's plan as read: the change applies only if it is still this (a plan set by
    /// hand meanwhile is not overwritten).
    pub plan: PlanId,
    /// The tenant's subscriptions after the change.
    pub written: String,
}

/// What [`DirectoryStore::apply_plan_change`] did.
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
    /// A subscription's change whose tenant's subscriptions or plan are no longer those it was
    /// computed from (another event applied meanwhile, a plan set by hand): nothing changed,
    /// the id is not marked; read the tenant again and compute it anew.
    Changed,
}

/// One of a tenant's own settings, written by [`DirectoryStore::update_tenant`] alone: the
/// rest of the tenant (its plan, if not this, its last billing event, its subscriptions) is
/// kept, so a webhook's change at the same moment is not overwritten.
///
/// Not `#[non_exhaustive]`, on purpose: a new setting is a new variant that every store must
/// write, so it breaks a store's build rather than falling into a catch-all at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantUpdate {
    /// Its plan.
    Plan(TenantId, PlanId),
    /// Its billing customer (a Stripe customer id), or with `None` none.
    Customer(TenantId, Option<String>),
    /// Its Metronome customer id or ingest alias, or with `None` none.
    MetronomeCustomer(TenantId, Option<String>),
    /// Its overrides of its plan in their JSON form, or with `None` none.
    Overrides(TenantId, Option<String>),
    /// Its own alert endpoint in its JSON form ([`TenantRecord::alert_endpoint`]), or with
    /// `None` none.
    AlertEndpoint(TenantId, Option<String>),
}

impl TenantUpdate {
    /// The tenant it writes.
    #[must_use]
    pub fn tenant(&self) -> &TenantId {
        match self {
            Self::Plan(t, _)
            | Self::Customer(t, _)
            | Self::MetronomeCustomer(t, _)
            | Self::Overrides(t, _)
            | Self::AlertEndpoint(t, _) => t,
        }
    }
}

/// When [`DirectoryStore::put_key`] writes: object_store's `PutMode` for an API key.
///
/// Not `#[non_exhaustive]`, on purpose: a new mode breaks a store's build rather than being
/// taken for another at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyWrite {
    /// Adds the key, or updates it if its tenant holds it.
    Upsert,
    /// Updates the key only if its tenant still holds it: a key removed meanwhile is not
    /// written back ([`StoreError::Conflict`]), so a change of its expiry or scopes made as it
    /// is revoked never revives it.
    Existing,
}

/// When [`DirectoryStore::update_tenant`] writes: object_store's `PutMode` for a tenant's
/// settings.
///
/// Not `#[non_exhaustive]`, on purpose: a new mode breaks a store's build rather than being
/// taken for another at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateWhen<'a> {
    /// Whenever the tenant exists.
    Always,
    /// Only if the tenant is unchanged since this read of it: stored, it still equals `read`
    /// in everything the directory keeps of it ([`TenantRecord`]'s fields: plan, customers,
    /// overrides, last billing event, subscriptions). A read of another tenant never matches.
    /// A check-then-write without a lost update: a check made on the read (overrides that fit
    /// the plan read, a customer no one else holds) still holds when the write lands.
    Unchanged(&'a TenantRecord),
}

/// Where the tenant directory lives: key hash → tenant, tenant → plan, customer and overrides, and
/// the last plan change applied per customer.
#[async_trait]
pub trait DirectoryStore: Send + Sync + fmt::Debug + 'static {
    /// The tenant owning the API key with this hash, if the key has not expired (by the wall
    /// clock).
    async fn find_key(&self, key: &KeyHash) -> Result<Option<TenantRecord>, StoreError>;

    /// A tenant by id.
    async fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError>;

    /// The tenant whose billing customer is `customer`.
    async fn tenant_by_customer(&self, customer: &str) -> Result<Option<TenantRecord>, StoreError>;

    /// The tenants of the directory, in id order after `after`, at most `limit` of them.
    async fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>, StoreError>;

    /// The API keys of `tenant`, expired ones included, in id order.
    async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKeyRecord>, StoreError>;

    /// The API key with this hash, expired or not, as stored now (read consistently: a key
    /// removed or changed before the call is seen so, where `list_keys` may read an index
    /// that lags). What the tenant routes check a caller's scopes against.
    async fn key(&self, key: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError>;

    /// Creates or replaces a tenant and gives it these keys (keys held by nobody else); a key
    /// new to the store gets no prefix, no expiry and the default scopes, one it holds keeps
    /// them (a key it takes from another tenant keeps its prefix and expiry, and has the
    /// default scopes).
    async fn put_tenant(&self, record: &TenantRecord, keys: &[KeyHash]) -> Result<(), StoreError>;

    /// Adds an API key, or updates its prefix, expiry and scopes ([`KeyWrite::Upsert`]), or
    /// only updates a key its tenant still holds ([`KeyWrite::Existing`]). Refused with
    /// [`StoreError::Conflict`] when the hash belongs to another tenant, or, to update only, is
    /// held by no one.
    async fn put_key(&self, key: &ApiKeyRecord, when: KeyWrite) -> Result<(), StoreError>;

    /// Removes an API key from the directory.
    async fn remove_key(&self, key: &KeyHash) -> Result<(), StoreError>;

    /// Writes one of a tenant's own settings ([`TenantUpdate`]), changing nothing else of it:
    /// [`UpdateWhen::Always`], or only if the tenant is unchanged since a read of it
    /// ([`UpdateWhen::Unchanged`], one conditional write). Returns whether it wrote: `false`
    /// when the tenant is gone, or changed since the read (read it again).
    ///
    /// A billing customer given to this tenant leaves any other, as with
    /// [`put_tenant`](Self::put_tenant) (callers check who holds it first), and a tenant whose
    /// customer changes forgets its subscriptions (another customer's are not its own).
    async fn update_tenant(&self, update: &TenantUpdate, when: UpdateWhen<'_>) -> Result<bool, StoreError>;

    /// Applies a plan change atomically: only if `change.event_id` was never seen and the
    /// event is not older than the last one applied to that customer (for a change with
    /// [`subscriptions`](PlanChange::subscriptions): only if the tenant's subscriptions are
    /// still those read, whatever its last event; they are written with the plan, and
    /// `last_event_at` becomes the later of the two); the id is marked seen in the same write
    /// as the change.
    async fn apply_plan_change(&self, change: &PlanChange) -> Result<PlanChangeOutcome, StoreError>;

    /// The feed of tenants changed ([`Changes`], `store/changes.rs`): a change told
    /// ([`ChangeCall::Tell`], by whoever wrote it, after its write), or the whole feed read
    /// ([`ChangeCall::Read`], by every node once a second). Every store applies
    /// [`Changes::tell`] in one atomic write; a tell answers an empty feed.
    async fn changes(&self, call: ChangeCall<'_>) -> Result<Changes, StoreError>;
}

/// Tells `directory`'s feed that `tenant` changed at `at` (Unix milliseconds), after the
/// change was written. A failure is logged, not answered: the change is written, and every node
/// still reads it again within `limits.directory_ttl`.
pub(crate) async fn tell_changed(directory: &dyn DirectoryStore, tenant: &TenantId, at: i64) {
    if let Err(e) = directory.changes(ChangeCall::Tell { tenant, at }).await {
        tracing::warn!(%tenant, error = %e, "the directory's feed of tenants changed was not told: other nodes \
            serve the change within limits.directory_ttl");
    }
}
