//! The audit role: every change to a tenant's settings, who made it, the value before and after,
//! and when, kept in the directory's store.
//!
//! Whoever changes a setting ([`Admin`](crate::admin::Admin) and the CLI, a tenant's own route,
//! a Stripe webhook, the engine's own passes) appends a record after its write, as it tells the
//! feed of tenants changed ([`ChangeCall`](super::ChangeCall)). The store numbers each tenant's
//! records (`seq`, one more than the tenant's last, never reused) and keeps, for each tenant,
//! the newest [`AUDIT_PER_TENANT`] of the changes it made itself (at its own routes) and the
//! newest [`AUDIT_PER_TENANT`] of the others' (operators, Stripe, tollgate), none older than
//! [`AUDIT_KEPT_SECS`]: a tenant that changes its own spend cap in a loop pushes out only its
//! own oldest changes, never what an operator or a webhook did to it, and the log never grows
//! past `tenants × 2 × AUDIT_PER_TENANT` records. A value longer than [`AUDIT_VALUE_MAX`] bytes
//! is kept cut, marked with `…`.
//!
//! An append lost (the store down after the change was written, the writer killed between
//! the two) leaves the change unrecorded: the writer logs it at `error` with the record's
//! fields and counts it (`tollgate_audit_lost_total`). An append retried after an answer lost
//! may record the change twice. Neither changes a setting.

use std::fmt;

use async_trait::async_trait;

use super::StoreError;
use crate::base::TenantId;

/// Who changes made through [`Admin`](crate::admin::Admin) (or
/// [`Tollgate::set_recharge`](crate::Tollgate::set_recharge)) are recorded as made by when no
/// [`operator`](crate::admin::Admin::operator) is given: `operator:admin`.
pub const DEFAULT_OPERATOR: &str = "admin";

/// A tenant's records are kept at most this long (400 days: a year and its audit).
pub const AUDIT_KEPT_SECS: i64 = 400 * 86_400;

/// At most this many of a tenant's records of each kind are kept, the newest: of the changes
/// it made itself ([`Actor::is_tenant`]), and of the others'. An append drops the oldest of its
/// kind.
pub const AUDIT_PER_TENANT: i64 = 500;

/// The longest value (before or after) a record keeps, in bytes; a longer one is cut at a
/// character's boundary and ends with `…`.
pub const AUDIT_VALUE_MAX: usize = 2_048;

/// The longest actor name kept (an operator's name, a key id, an event id), in bytes.
pub const AUDIT_ACTOR_MAX: usize = 200;

/// Who made a change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Actor {
    /// An operator, through [`Admin`](crate::admin::Admin) or the `tollgate` command: the name
    /// it was given ([`Admin::operator`](crate::admin::Admin::operator)).
    Operator(String),
    /// The tenant itself, at one of its own routes: the id of the API key that called
    /// ([`KeyHash::id`](crate::base::KeyHash::id)).
    Key(String),
    /// The tenant itself, at one of its own routes, identified without a key (an
    /// [`Identity`](crate::Identity) its resolver read): `tenant`.
    Tenant(String),
    /// A Stripe webhook: the event's id (`evt_…`).
    Stripe(String),
    /// tollgate itself: the pass that made the change (`grace-ended`, `tier-check`).
    Tollgate(String),
    /// An actor this build does not know, as stored (a newer tollgate's).
    Other(String),
}

impl Actor {
    /// The actor as stored: `operator:NAME`, `key:ID`, `stripe:EVENT`, `tollgate:PASS`, the
    /// name cut at [`AUDIT_ACTOR_MAX`] bytes.
    #[must_use]
    pub fn to_stored(&self) -> String {
        match self {
            // Its stored form as it was read: stored again unchanged.
            Self::Other(stored) => clip(stored, AUDIT_ACTOR_MAX),
            _ => {
                let (kind, name) = self.parts();
                format!("{kind}:{}", clip(name, AUDIT_ACTOR_MAX))
            }
        }
    }

    /// The actor of its stored form ([`Other`](Self::Other) for a kind this build does not
    /// know); `None` for a text that is no actor's (no `:`).
    #[must_use]
    pub fn parse(stored: &str) -> Option<Self> {
        let (kind, name) = stored.split_once(':')?;
        let name = name.to_owned();
        Some(match kind {
            "operator" => Self::Operator(name),
            "key" => Self::Key(name),
            "tenant" => Self::Tenant(name),
            "stripe" => Self::Stripe(name),
            "tollgate" => Self::Tollgate(name),
            _ => Self::Other(stored.to_owned()),
        })
    }

    /// Whether the tenant itself made the change (at its own routes, by a key or an identity):
    /// the records a tenant makes are bounded apart from the others'
    /// ([`AUDIT_PER_TENANT`]).
    #[must_use]
    pub fn is_tenant(&self) -> bool {
        matches!(self, Self::Key(_) | Self::Tenant(_))
    }

    /// Its kind (`operator`, `key`, `tenant`, `stripe`, `tollgate`) and name; an actor this
    /// build does not know is its stored form's kind and name.
    #[must_use]
    pub fn parts(&self) -> (&'static str, &str) {
        match self {
            Self::Operator(n) => ("operator", n),
            Self::Key(n) => ("key", n),
            Self::Tenant(n) => ("tenant", n),
            Self::Stripe(n) => ("stripe", n),
            Self::Tollgate(n) => ("tollgate", n),
            Self::Other(n) => n.split_once(':').map_or(("other", n.as_str()), |(_, name)| ("other", name)),
        }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(stored) => f.write_str(stored),
            _ => {
                let (kind, name) = self.parts();
                write!(f, "{kind}:{name}")
            }
        }
    }
}

/// Which of a tenant's settings changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Setting {
    /// Its plan (the value: the plan's id).
    Plan,
    /// Its Stripe customer.
    Customer,
    /// Its Metronome customer id or ingest alias.
    MetronomeCustomer,
    /// Its overrides of its plan (their JSON form).
    Overrides,
    /// Its own spend cap (`5.00 hard`).
    SpendCap,
    /// Its auto-recharge of a prepaid meter (`on`/`off` and its amounts).
    Recharge,
    /// One of its API keys (`ID scopes=… expires=…`; none before an issue, none after a
    /// revoke).
    Key,
    /// Its own alert endpoint: its URL without user, query or fragment, and fingerprints of
    /// the whole URL and of its secret (neither is ever recorded).
    AlertEndpoint,
    /// The tier an operator pinned it to (`PaymentCall::Pin`).
    Tier,
    /// The tenant itself: created (none before) or replaced.
    Tenant,
    /// A setting this build does not know, as stored (a newer tollgate's).
    Other(String),
}

impl Setting {
    /// The setting as stored.
    #[must_use]
    pub fn as_str(&self) -> &str {
        match self {
            Self::Plan => "plan",
            Self::Customer => "customer",
            Self::MetronomeCustomer => "metronome-customer",
            Self::Overrides => "overrides",
            Self::SpendCap => "spend-cap",
            Self::Recharge => "recharge",
            Self::Key => "key",
            Self::AlertEndpoint => "alert-endpoint",
            Self::Tier => "tier",
            Self::Tenant => "tenant",
            Self::Other(s) => s,
        }
    }

    /// The setting of its stored name.
    #[must_use]
    pub fn parse(stored: &str) -> Self {
        match stored {
            "plan" => Self::Plan,
            "customer" => Self::Customer,
            "metronome-customer" => Self::MetronomeCustomer,
            "overrides" => Self::Overrides,
            "spend-cap" => Self::SpendCap,
            "recharge" => Self::Recharge,
            "key" => Self::Key,
            "alert-endpoint" => Self::AlertEndpoint,
            "tier" => Self::Tier,
            "tenant" => Self::Tenant,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change to one of a tenant's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditRecord {
    /// The tenant changed.
    pub tenant: TenantId,
    /// Its number among the tenant's records, given by the store at the append (one more than
    /// the tenant's last; 0 before).
    pub seq: i64,
    /// When (Unix milliseconds, the writer's clock).
    pub at: i64,
    /// Who made it.
    pub actor: Actor,
    /// What changed.
    pub setting: Setting,
    /// The value before (none: not set).
    pub before: Option<String>,
    /// The value after (none: removed).
    pub after: Option<String>,
}

impl AuditRecord {
    /// A change of `tenant`'s `setting` by `actor` at `at` (Unix milliseconds), its values cut
    /// at [`AUDIT_VALUE_MAX`] bytes.
    #[must_use]
    pub fn new(
        tenant: TenantId,
        at: i64,
        actor: Actor,
        setting: Setting,
        before: Option<String>,
        after: Option<String>,
    ) -> Self {
        let cut = |v: Option<String>| v.map(|v| if v.len() > AUDIT_VALUE_MAX { clip(&v, AUDIT_VALUE_MAX) } else { v });
        // Its name as every store keeps it: cut at AUDIT_ACTOR_MAX.
        let actor = Actor::parse(&actor.to_stored()).unwrap_or(actor);
        Self { tenant, seq: 0, at, actor, setting, before: cut(before), after: cut(after) }
    }

    /// Where a listing after this record goes on ([`AuditQuery::before`]).
    #[must_use]
    pub fn cursor(&self) -> AuditCursor {
        AuditCursor { at: self.at, tenant: self.tenant.clone(), seq: self.seq }
    }

    /// Whether this record lists before `cursor` in a listing of `tenant` (by `seq`) or of the
    /// fleet (by time, tenant, `seq`, newest first): the order every store applies.
    #[must_use]
    pub fn is_before(&self, cursor: &AuditCursor, by_tenant: bool) -> bool {
        if by_tenant {
            self.seq < cursor.seq
        } else {
            (self.at, &self.tenant, self.seq) < (cursor.at, &cursor.tenant, cursor.seq)
        }
    }
}

/// A place in a listing: the last record read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditCursor {
    /// Its time (Unix milliseconds).
    pub at: i64,
    /// Its tenant.
    pub tenant: TenantId,
    /// Its number among its tenant's records.
    pub seq: i64,
}

/// What [`AuditStore::list_audit`] reads: one tenant's records newest first by their number,
/// or the fleet's newest first by time, at most `limit` (at least 1), none older than `since`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditQuery {
    /// One tenant's records, or (none) every tenant's.
    pub tenant: Option<TenantId>,
    /// Only records listed after this one (the next page).
    pub before: Option<AuditCursor>,
    /// Now (Unix milliseconds, the caller's clock): a fleet listing starts here (none later),
    /// and reaches back at most [`AUDIT_KEPT_SECS`] from it.
    pub now: i64,
    /// None older than this (Unix milliseconds): [`AUDIT_KEPT_SECS`] before `now` unless set.
    pub since: i64,
    /// At most this many.
    pub limit: usize,
}

impl AuditQuery {
    /// The fleet's newest records at `now` (Unix milliseconds), at most `limit`.
    #[must_use]
    pub fn new(now: i64, limit: usize) -> Self {
        Self { tenant: None, before: None, now, since: now.saturating_sub(AUDIT_KEPT_SECS * 1_000), limit }
    }

    /// `tenant`'s records only.
    #[must_use]
    pub fn tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// After `cursor` (the last record of the page before).
    #[must_use]
    pub fn before(mut self, cursor: AuditCursor) -> Self {
        self.before = Some(cursor);
        self
    }

    /// None older than `since` (Unix milliseconds).
    #[must_use]
    pub fn since(mut self, since: i64) -> Self {
        self.since = since;
        self
    }

    /// Whether `record` belongs in this listing (its tenant, within `since`, after the cursor).
    #[must_use]
    pub fn matches(&self, record: &AuditRecord) -> bool {
        self.tenant.as_ref().map_or(record.at <= self.now, |t| *t == record.tenant)
            && record.at >= self.since
            && self.before.as_ref().is_none_or(|c| record.is_before(c, self.tenant.is_some()))
    }

    /// Records as a store found them, put in the listing's order (newest first) and cut at
    /// its limit: what every store returns.
    #[must_use]
    pub fn finish(&self, mut records: Vec<AuditRecord>) -> Vec<AuditRecord> {
        records.retain(|r| self.matches(r));
        if self.tenant.is_some() {
            records.sort_by_key(|r| std::cmp::Reverse(r.seq));
        } else {
            records.sort_by(|a, b| (b.at, &b.tenant, b.seq).cmp(&(a.at, &a.tenant, a.seq)));
        }
        records.truncate(self.limit.max(1));
        records
    }
}

/// Where the audit of tenants' settings lives: in the directory's store, beside the tenants.
#[async_trait]
pub trait AuditStore: Send + Sync + fmt::Debug + 'static {
    /// Appends `record` as its tenant's next (its `seq` ignored: the store gives one more than
    /// the tenant's last, in the same atomic write), and drops the tenant's records of its
    /// kind ([`Actor::is_tenant`]) past the newest [`AUDIT_PER_TENANT`]. Returns the number
    /// given.
    async fn append_audit(&self, record: &AuditRecord) -> Result<i64, StoreError>;

    /// The records `query` names, in its order ([`AuditQuery::finish`]).
    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;

    /// Removes the records older than `before` (Unix milliseconds); returns how many went.
    async fn prune_audit(&self, before: i64) -> Result<u64, StoreError>;
}

/// Appends `record` after the change it records was written: a failure is logged at `error`
/// with the record's fields and counted (`tollgate_audit_lost_total`), not answered: the
/// change is written, and answering an error would have its writer make it again.
pub(crate) async fn append_audit(store: &dyn AuditStore, record: &AuditRecord) {
    if let Err(e) = store.append_audit(record).await {
        metrics::counter!("tollgate_audit_lost_total").increment(1);
        tracing::error!(
            tenant = %record.tenant, at = record.at, actor = %record.actor, setting = %record.setting,
            before = ?record.before, after = ?record.after, error = %e,
            "a change to a tenant's settings was written but its audit record was not"
        );
    }
}

/// `s` cut at `max` bytes on a character's boundary, marked `…` when cut.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actors_and_settings_read_back_as_stored_and_long_values_are_cut() {
        for a in [
            Actor::Operator("ana".into()),
            Actor::Key("k_1".into()),
            Actor::Stripe("evt_1".into()),
            Actor::Tollgate("grace-ended".into()),
        ] {
            assert_eq!(Actor::parse(&a.to_stored()), Some(a));
        }
        assert_eq!(Actor::parse("robot:x"), Some(Actor::Other("robot:x".into())));
        let other = Actor::Other("robot:x".into());
        assert_eq!((other.to_stored(), other.to_string()), ("robot:x".into(), "robot:x".into()), "as it was stored");
        assert_eq!(Actor::parse(&other.to_stored()), Some(other));
        assert_eq!(Actor::parse("nothing"), None);
        let long = AuditRecord::new("t".into(), 1, Actor::Operator("o".repeat(500)), Setting::Plan, None, None);
        assert!(matches!(&long.actor, Actor::Operator(n) if n.len() <= AUDIT_ACTOR_MAX), "cut as the stores keep it");
        assert_eq!(Setting::parse("spend-cap"), Setting::SpendCap);
        assert_eq!(Setting::parse("limits"), Setting::Other("limits".into()));
        let long = "é".repeat(AUDIT_VALUE_MAX);
        let r = AuditRecord::new("t".into(), 1, Actor::Key("k".into()), Setting::Overrides, Some(long), None);
        let kept = r.before.unwrap();
        assert!(kept.len() <= AUDIT_VALUE_MAX && kept.ends_with('…'), "{}", kept.len());
    }

    #[test]
    fn a_tenant_lists_by_number_and_the_fleet_by_time() {
        let rec = |t: &str, seq: i64, at: i64| {
            let mut r = AuditRecord::new(t.into(), at, Actor::Key("k".into()), Setting::Plan, None, None);
            r.seq = seq;
            r
        };
        let all = vec![rec("a", 1, 10), rec("a", 2, 5), rec("b", 1, 7), rec("a", 3, 20)];
        let fleet = AuditQuery::new(100, 10).since(0);
        let order: Vec<_> = fleet.finish(all.clone()).iter().map(|r| (r.tenant.to_string(), r.seq)).collect();
        assert_eq!(order, [("a".into(), 3), ("a".into(), 1), ("b".into(), 1), ("a".into(), 2)]);
        let a = AuditQuery::new(100, 2).since(0).tenant("a".into());
        let page = a.finish(all.clone());
        assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 2]);
        let next = a.clone().before(page[1].cursor()).finish(all.clone());
        assert_eq!(next.iter().map(|r| r.seq).collect::<Vec<_>>(), [1]);
        assert!(AuditQuery::new(100, 10).since(8).finish(all).iter().all(|r| r.at >= 8));
    }
}
