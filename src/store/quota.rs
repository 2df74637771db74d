//! The quota role: counters of reserved units per (tenant, meter, period), reserved and released
//! in leases by every node.

use std::fmt;

use async_trait::async_trait;

use super::StoreError;
use crate::base::{MeterId, Period, TenantId};

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
    #[must_use]
    pub fn new(tenant: TenantId, meter: MeterId, period: Period, start: i64, end: i64) -> Self {
        Self { tenant, meter, period, start, end }
    }

    /// The period's kind as a short stable text: `day`, or `month@D` for a month anchored on day D.
    #[must_use]
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
    #[must_use]
    pub fn new(node: u64, seq: u64) -> Self {
        Self { node, seq }
    }
}

/// A call to [`QuotaStore::reserve`]: units wanted under a limit, and units owed regardless.
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
    #[must_use]
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
    #[must_use]
    pub fn grant_for(&self, left: u64) -> u64 {
        self.units.min(left.div_ceil(SHRINK).max(self.at_least)).min(left)
    }

    /// The fewest units that must be left for [`grant_for`](Self::grant_for) to allow a
    /// grant of `granted` (for stores that grant by a conditional write: the condition).
    #[must_use]
    pub fn left_needed(&self, granted: u64) -> u64 {
        if granted <= self.at_least {
            granted
        } else {
            granted.max(SHRINK * (granted - 1) + 1)
        }
    }
}

/// The answer to [`QuotaStore::reserve`].
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
    #[must_use]
    pub fn new(granted: u64, reserved: u64) -> Self {
        Self { granted, reserved }
    }
}

/// Where quota counters live: a conditional atomic add per call, so that the units leased by all
/// nodes never exceed a hard limit, applied at most once per [`ReserveToken`].
#[async_trait]
pub trait QuotaStore: Send + Sync + fmt::Debug + 'static {
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
}
