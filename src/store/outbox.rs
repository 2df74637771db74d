//! The alerts role: a durable outbox of alerts (threshold crossings) to deliver as signed
//! webhooks, one row per alert and destination, written once per fleet and delivered by one
//! node at a time.

use std::fmt;

use async_trait::async_trait;

use super::StoreError;
use crate::base::TenantId;

/// Where an outbox row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AlertState {
    /// To deliver (again, from `next_at`).
    Pending,
    /// Delivered: the destination answered 2xx.
    Delivered,
    /// Given up after the retry horizon (or by hand): a dead letter, kept until it is requeued
    /// or pruned.
    Dead,
}

impl AlertState {
    /// The state as stored (`pending`, `delivered`, `dead`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Pending => "pending",
            AlertState::Delivered => "delivered",
            AlertState::Dead => "dead",
        }
    }

    /// The state of its stored name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(AlertState::Pending),
            "delivered" => Some(AlertState::Delivered),
            "dead" => Some(AlertState::Dead),
            _ => None,
        }
    }
}

impl fmt::Display for AlertState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An outbox row's key: the alert's id (its crossing's, deterministic: every node that sees
/// the crossing names it alike; the `webhook-id` of every delivery of it) and the destination
/// (`endpoint:NAME` for an endpoint of `[alerts]`, `tenant` for the tenant's own).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub struct AlertKey {
    /// The alert's id.
    pub id: String,
    /// Where it goes.
    pub destination: String,
}

impl AlertKey {
    /// The row of alert `id` for `destination`.
    #[must_use]
    pub fn new(id: impl Into<String>, destination: impl Into<String>) -> Self {
        Self { id: id.into(), destination: destination.into() }
    }
}

impl fmt::Display for AlertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} to {}", self.id, self.destination)
    }
}

/// One alert for one destination, as the outbox keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxEntry {
    /// Its key.
    pub key: AlertKey,
    /// The tenant it is about.
    pub tenant: TenantId,
    /// Its event type (`quota.threshold_crossed`, …).
    pub event: String,
    /// The JSON body every delivery sends, fixed when the alert was written.
    pub body: String,
    /// When it was written (Unix seconds): the retry horizon counts from it.
    pub created_at: i64,
    /// Once delivered or dead, pruned after this (Unix seconds); it must outlast the period
    /// whose crossing it is, or a node seeing the crossing again would write it anew.
    pub keep_until: i64,
    /// Where it stands.
    pub state: AlertState,
    /// Deliveries tried so far.
    pub attempts: u32,
    /// Pending: not tried before this (Unix seconds).
    pub next_at: i64,
    /// The node delivering it now and until when (Unix seconds): none may claim it before.
    /// `(0, 0)`: unclaimed.
    pub claim: (u64, i64),
    /// What the last failed delivery came to (at most [`MAX_ERROR`] bytes).
    pub last_error: Option<String>,
    /// When it was delivered (Unix seconds).
    pub delivered_at: Option<i64>,
}

/// The longest `last_error` a store keeps, in bytes.
pub const MAX_ERROR: usize = 300;

/// A dead letter is kept at least this long after its last attempt was due (35 days), whatever
/// its row's `keep_until` said.
pub const DEAD_KEPT_SECS: i64 = 35 * 86_400;

impl OutboxEntry {
    /// A pending row of a new alert, due at once.
    #[must_use]
    pub fn new(
        key: AlertKey,
        tenant: TenantId,
        event: impl Into<String>,
        body: impl Into<String>,
        created_at: i64,
        keep_until: i64,
    ) -> Self {
        Self {
            key,
            tenant,
            event: event.into(),
            body: body.into(),
            created_at,
            keep_until,
            state: AlertState::Pending,
            attempts: 0,
            next_at: created_at,
            claim: (0, 0),
            last_error: None,
            delivered_at: None,
        }
    }

    /// Whether a claim at `now` may take it: pending, due, and no live claim.
    #[must_use]
    pub fn claimable(&self, now: i64) -> bool {
        self.state == AlertState::Pending && self.next_at <= now && self.claim.1 <= now
    }

    /// Applies a claim: `owner` holds it until `until`.
    pub fn claimed(&mut self, owner: u64, until: i64) {
        self.claim = (owner, until);
    }

    /// Applies `outcome` of a delivery by `owner`: `false` (nothing changed) unless `owner`
    /// holds its claim and it is pending. A settle re-sent after it landed finds no claim:
    /// applied once.
    pub fn settle(&mut self, owner: u64, outcome: &AlertOutcome) -> bool {
        if self.state != AlertState::Pending || self.claim.0 != owner || owner == 0 {
            return false;
        }
        self.claim = (0, 0);
        match outcome {
            AlertOutcome::Delivered { at } => {
                self.state = AlertState::Delivered;
                self.attempts = self.attempts.saturating_add(1);
                self.delivered_at = Some(*at);
                self.last_error = None;
            }
            AlertOutcome::Retry { at, error } => {
                self.attempts = self.attempts.saturating_add(1);
                self.next_at = *at;
                self.last_error = Some(clip(error));
            }
            AlertOutcome::Dead { error } => {
                self.state = AlertState::Dead;
                self.attempts = self.attempts.saturating_add(1);
                self.last_error = Some(clip(error));
                // A dead letter stays listed (and can be sent again) at least this long.
                self.keep_until = self.keep_until.max(self.next_at.max(self.created_at).saturating_add(DEAD_KEPT_SECS));
            }
            AlertOutcome::Release => {}
        }
        true
    }

    /// Applies a requeue at `now` of a dead letter: pending again, due at once, its horizon
    /// counted from `now`. `false` unless it is dead.
    pub fn requeue(&mut self, now: i64) -> bool {
        if self.state != AlertState::Dead {
            return false;
        }
        self.state = AlertState::Pending;
        self.next_at = now;
        self.created_at = now;
        self.claim = (0, 0);
        true
    }

    /// Whether a prune at `now` removes it: delivered or dead, past `keep_until`.
    #[must_use]
    pub fn prunable(&self, now: i64) -> bool {
        self.state != AlertState::Pending && self.keep_until < now
    }
}

/// `error` cut to [`MAX_ERROR`] bytes, on a character boundary.
fn clip(error: &str) -> String {
    let mut end = error.len().min(MAX_ERROR);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    error[..end].to_owned()
}

/// A claim of due rows ([`OutboxStore::claim_alerts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AlertClaim {
    /// The claiming node (non-zero).
    pub owner: u64,
    /// Its clock (Unix seconds).
    pub now: i64,
    /// Its claims hold until then.
    pub until: i64,
    /// The most rows it takes.
    pub limit: usize,
}

impl AlertClaim {
    /// `limit` rows due at `now`, held by `owner` until `until`.
    #[must_use]
    pub fn new(owner: u64, now: i64, until: i64, limit: usize) -> Self {
        Self { owner, now, until, limit }
    }
}

/// What a delivery came to ([`OutboxStore::settle_alert`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AlertOutcome {
    /// Delivered at `at` (Unix seconds).
    Delivered {
        /// When.
        at: i64,
    },
    /// Failed: tried again from `at` (Unix seconds).
    Retry {
        /// The next attempt.
        at: i64,
        /// Why it failed.
        error: String,
    },
    /// Failed past the retry horizon: a dead letter.
    Dead {
        /// Why the last attempt failed.
        error: String,
    },
    /// Not tried (the node stops): the claim goes, nothing else changes.
    Release,
}

/// Which rows a listing reads ([`OutboxStore::list_alerts`]), in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AlertQuery {
    /// Only rows in this state.
    pub state: Option<AlertState>,
    /// Only rows of this alert id.
    pub id: Option<String>,
    /// Only rows after this key.
    pub after: Option<AlertKey>,
    /// At most this many (at least 1).
    pub limit: usize,
}

impl AlertQuery {
    /// Up to `limit` rows, any state.
    #[must_use]
    pub fn new(limit: usize) -> Self {
        Self { limit: limit.max(1), ..Self::default() }
    }

    /// Only rows in `state`.
    #[must_use]
    pub fn state(mut self, state: AlertState) -> Self {
        self.state = Some(state);
        self
    }

    /// Only the rows of alert `id`.
    #[must_use]
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Only rows after `key`.
    #[must_use]
    pub fn after(mut self, key: AlertKey) -> Self {
        self.after = Some(key);
        self
    }

    /// Whether `entry` is one this query reads.
    #[must_use]
    pub fn matches(&self, entry: &OutboxEntry) -> bool {
        self.state.is_none_or(|s| s == entry.state)
            && self.id.as_ref().is_none_or(|id| *id == entry.key.id)
            && self.after.as_ref().is_none_or(|after| entry.key > *after)
    }
}

/// Where alerts wait to be delivered (the alerts role): a durable outbox.
///
/// Rows are written put-if-absent: every node that sees a crossing writes its rows, and the
/// fleet holds one per alert and destination. A row is delivered by the node holding its claim;
/// a claim expires, so a node that died mid-delivery leaves the row to another, which delivers
/// it again under the same id (receivers deduplicate by `webhook-id`). [`OutboxEntry`] holds
/// the rules (what a claim may take, what a settle changes) for a store that reads and writes
/// a row atomically.
#[async_trait]
pub trait OutboxStore: Send + Sync + fmt::Debug + 'static {
    /// Writes each row unless one with its key exists (whatever its state): how many were new.
    /// A call re-sent after a timeout writes nothing more.
    async fn put_alerts(&self, entries: &[OutboxEntry]) -> Result<usize, StoreError>;

    /// Claims up to `limit` rows claimable at `now` ([`OutboxEntry::claimable`]), the earliest
    /// due first, for `owner` until `until`: two claims never take one row while the first
    /// holds. The rows as claimed.
    async fn claim_alerts(&self, claim: &AlertClaim) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Settles `owner`'s delivery of a row ([`OutboxEntry::settle`]): `false` when it no longer
    /// holds the claim (it expired and another node took it, or the settle was applied
    /// already), nothing changed then.
    async fn settle_alert(&self, key: &AlertKey, owner: u64, outcome: &AlertOutcome) -> Result<bool, StoreError>;

    /// The rows `query` reads, in key order.
    async fn list_alerts(&self, query: &AlertQuery) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Makes a dead letter pending again at `now` ([`OutboxEntry::requeue`]): `false` when the
    /// row is missing or not dead.
    async fn requeue_alert(&self, key: &AlertKey, now: i64) -> Result<bool, StoreError>;

    /// Removes the rows prunable at `now` ([`OutboxEntry::prunable`]): how many.
    async fn prune_alerts(&self, now: i64) -> Result<u64, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> OutboxEntry {
        OutboxEntry::new(AlertKey::new("alert_1", "tenant"), "t".into(), "quota.exhausted", "{}", 100, 1_000)
    }

    #[test]
    fn a_row_is_claimed_settled_once_and_requeued_when_dead() {
        let mut e = entry();
        assert!(e.claimable(100));
        e.claimed(7, 160);
        assert!(!e.claimable(150), "claimed");
        assert!(!e.settle(8, &AlertOutcome::Delivered { at: 120 }), "another node's claim");
        assert!(e.settle(7, &AlertOutcome::Retry { at: 200, error: "é".repeat(400) }));
        assert_eq!((e.attempts, e.next_at, e.claim), (1, 200, (0, 0)));
        assert!(e.last_error.as_ref().unwrap().len() <= MAX_ERROR);
        assert!(!e.settle(7, &AlertOutcome::Retry { at: 300, error: String::new() }), "re-sent: applied once");
        assert!(!e.claimable(199) && e.claimable(200));
        e.claimed(9, 260);
        assert!(e.settle(9, &AlertOutcome::Dead { error: "gone".into() }));
        assert!(!e.claimable(10_000) && !e.prunable(1_001), "a dead letter outlives its keep time");
        assert!(!e.prunable(200 + DEAD_KEPT_SECS) && e.prunable(200 + DEAD_KEPT_SECS + 1));
        assert!(e.requeue(5_000));
        assert!(!e.requeue(5_000), "pending already");
        assert_eq!((e.state, e.next_at, e.created_at), (AlertState::Pending, 5_000, 5_000));
        e.claimed(9, 5_060);
        assert!(e.settle(9, &AlertOutcome::Delivered { at: 5_001 }));
        assert_eq!(e.delivered_at, Some(5_001));
        assert!(!e.settle(9, &AlertOutcome::Delivered { at: 5_001 }));
    }
}
