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
    /// For a [`Period::Prepaid`] key, the limit the call was held to: the units of the open
    /// grants. `None` for a calendar period (its limit is the caller's).
    pub limit: Option<u64>,
}

impl Grant {
    /// A grant of `granted` units, leaving `reserved` reserved in all.
    #[must_use]
    pub fn new(granted: u64, reserved: u64) -> Self {
        Self { granted, reserved, limit: None }
    }

    /// Held to this limit (a prepaid balance's granted units).
    #[must_use]
    pub fn with_limit(mut self, limit: Option<u64>) -> Self {
        self.limit = limit;
        self
    }
}

/// A grant of prepaid units to a tenant on a meter: the limit of its
/// [`Period::Prepaid`] counter is the sum of its open grants.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreditGrant {
    /// The tenant.
    pub tenant: TenantId,
    /// The meter.
    pub meter: MeterId,
    /// Its id, unique per (tenant, meter): a grant sent again under its id adds nothing (a
    /// payment's invoice or payment intent id, so one payment never grants twice).
    pub id: String,
    /// Units granted.
    pub units: u64,
    /// When it was granted (Unix seconds).
    pub granted_at: i64,
    /// When it expires (Unix seconds), if ever. Grants are spent soonest-to-expire first.
    pub expires_at: Option<i64>,
    /// The payment it came from (a Stripe payment intent id), for refunds.
    pub payment: Option<String>,
    /// How much of that payment has been refunded so far, as
    /// [`refund_credits`](QuotaStore::refund_credits) last applied (in the payment's currency,
    /// smallest unit); 0 without refunds.
    pub refunded: u64,
    /// How it closed, once expired or revoked.
    pub closed: Option<CreditClosure>,
}

impl CreditGrant {
    /// `units` granted to `tenant` on `meter` under `id` at `granted_at`, never expiring.
    #[must_use]
    pub fn new(tenant: TenantId, meter: MeterId, id: impl Into<String>, units: u64, granted_at: i64) -> Self {
        Self {
            tenant,
            meter,
            id: id.into(),
            units,
            granted_at,
            expires_at: None,
            payment: None,
            refunded: 0,
            closed: None,
        }
    }

    /// Expiring at `at` (Unix seconds).
    #[must_use]
    pub fn expiring(mut self, at: Option<i64>) -> Self {
        self.expires_at = at;
        self
    }

    /// Paid by `payment` (a payment intent id).
    #[must_use]
    pub fn paid_by(mut self, payment: impl Into<String>) -> Self {
        self.payment = Some(payment.into());
        self
    }

    /// The order grants are spent in: soonest to expire first (never-expiring last), then
    /// oldest, then by id.
    #[must_use]
    pub fn spending_order(&self) -> (bool, i64, i64, &str) {
        (self.expires_at.is_none(), self.expires_at.unwrap_or(i64::MAX), self.granted_at, &self.id)
    }
}

/// How a credit grant closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreditClosure {
    /// When (Unix seconds).
    pub at: i64,
    /// Whether it was revoked (else it expired).
    pub revoked: bool,
    /// Units it still held, taken from the balance: its units less those spent from it
    /// (soonest-to-expire first), counting units leased to nodes as spent.
    pub lost: u64,
}

/// A prepaid balance: the units of the open grants, and those used (leased to nodes, or owed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CreditBalance {
    /// Units of the open grants.
    pub granted: u64,
    /// Units used: reserved by nodes (spent or leased) and owed.
    pub reserved: u64,
}

impl CreditBalance {
    /// A balance of `granted` units with `reserved` used.
    #[must_use]
    pub fn new(granted: u64, reserved: u64) -> Self {
        Self { granted, reserved }
    }

    /// Units left: negative when usage that had to be billed took it below zero (the next
    /// grant pays that first).
    #[must_use]
    pub fn left(&self) -> i128 {
        i128::from(self.granted) - i128::from(self.reserved)
    }
}

/// The answer to [`QuotaStore::grant_credits`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrantOutcome {
    /// Granted: the balance after it.
    Granted(CreditBalance),
    /// A grant with this id exists (open or closed): nothing was added. The grant as stored.
    Duplicate(CreditGrant),
    /// The tenant holds [`OPEN_GRANTS_MAX`](super::contract::OPEN_GRANTS_MAX) open grants on
    /// the meter already: nothing was added.
    TooMany,
    /// The grant would take the balance's open grants past
    /// [`MAX_BALANCE`](super::contract::MAX_BALANCE) units (or it holds none): nothing was added.
    TooLarge,
}

/// Whether `units` more may join open grants holding `granted`.
pub(crate) fn fits(granted: u64, units: u64) -> bool {
    units > 0 && granted.checked_add(units).is_some_and(|t| t <= super::contract::MAX_BALANCE)
}

/// Closes one credit grant of `grants` (open ones, of one tenant and meter) against `balance`:
/// what the grant still holds when the units used are spent soonest-to-expire first, and the
/// balance after it (the grant's units leave the granted total, the part of it used leaves the
/// used total). Every store closes by this rule.
#[must_use]
pub(crate) fn close_against(grants: &[CreditGrant], id: &str, balance: CreditBalance) -> Option<(u64, CreditBalance)> {
    let grant = grants.iter().find(|g| g.id == id && g.closed.is_none())?;
    let before: u64 = grants
        .iter()
        .filter(|g| g.closed.is_none() && g.spending_order() < grant.spending_order())
        .fold(0u64, |a, g| a.saturating_add(g.units));
    let spent = balance.reserved.saturating_sub(before).min(grant.units);
    let lost = grant.units - spent;
    Some((
        lost,
        CreditBalance::new(balance.granted.saturating_sub(grant.units), balance.reserved.saturating_sub(spent)),
    ))
}

/// A refund of the payment that bought a grant ([`QuotaStore::refund_credits`]): how much of
/// the payment's `amount` has been refunded in all (Stripe's charge `amount_refunded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreditRefund {
    /// Refunded in all, this refund included.
    pub refunded: u64,
    /// The payment's amount.
    pub amount: u64,
}

impl CreditRefund {
    /// `refunded` of `amount` refunded in all.
    #[must_use]
    pub fn new(refunded: u64, amount: u64) -> Self {
        Self { refunded, amount }
    }
}

/// Refunds part of one open credit grant of `grants` (open ones, of one tenant and meter)
/// against `balance`: the units it takes back and the balance after it. Of what the grant still
/// holds (units used are taken from the soonest-to-expire grants first, as
/// [`close_against`] counts them), the share the refund is of what was not refunded before
/// leaves it: `held × (refunded − before) / (amount − before)`, rounded down (all of it once the
/// whole amount is refunded). `None` when there is no such open grant or that much was refunded
/// already. Every store refunds by this rule.
#[must_use]
pub(crate) fn refund_against(
    grants: &[CreditGrant],
    id: &str,
    balance: CreditBalance,
    refund: CreditRefund,
) -> Option<(u64, CreditBalance)> {
    let grant = grants.iter().find(|g| g.id == id && g.closed.is_none())?;
    if refund.refunded <= grant.refunded {
        return None;
    }
    let (held, _) = close_against(grants, id, balance)?;
    let removed = if refund.refunded >= refund.amount || refund.amount <= grant.refunded {
        held
    } else {
        let share = u128::from(held) * u128::from(refund.refunded - grant.refunded)
            / u128::from(refund.amount - grant.refunded);
        (share as u64).min(held)
    };
    Some((removed, CreditBalance::new(balance.granted.saturating_sub(removed), balance.reserved)))
}

/// Where quota counters live: a conditional atomic add per call, so that the units leased by all
/// nodes never exceed a hard limit, applied at most once per [`ReserveToken`].
///
/// A counter of a [`Period::Prepaid`] key is a prepaid balance: its limit is the sum of the
/// tenant's open credit grants on the meter, held beside it (never the reservation's `limit`),
/// so a lease is checked against the balance in the same conditional write.
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

    /// Adds a grant of prepaid units: its units join the balance of `(grant.tenant,
    /// grant.meter)` in the same write that records the grant, once per grant id.
    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError>;

    /// The tenant's credit grants (open, and closed ones not dropped yet: a closed grant is
    /// kept at least [`CLOSED_GRANTS_KEPT_SECS`](super::contract::CLOSED_GRANTS_KEPT_SECS),
    /// then dropped by a later close on its balance), on `meter` or on every meter, by meter
    /// then spending order; with the balance of each meter that has grants.
    async fn credit_grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), StoreError>;

    /// Closes an open grant, once: with `revoke`, at once; without, only if it has expired by
    /// `now` (the worker's expiry). Its units leave the balance (units used are taken from the soonest-to-expire grants first,
    /// so it loses what it still holds by that rule); its
    /// closure is returned, or `None` if there is no such open grant (or it has not expired).
    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError>;

    /// Takes back what a refund of the payment that bought an open grant refunds of what the
    /// grant still holds (see [`CreditRefund`]; the rule every store applies is
    /// `held × (refunded − before) / (amount − before)`), once per refunded amount: applied
    /// only when `refund.refunded` is more than the grant's [`refunded`](CreditGrant::refunded)
    /// so far, which it then records, in the same write that lowers the grant's units and the
    /// balance. The units taken back; `None` when there is no such open grant or that much was
    /// refunded already (a redelivery).
    async fn refund_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        refund: CreditRefund,
    ) -> Result<Option<u64>, StoreError>;

    /// Open grants expired by `now`, of every tenant, up to `limit`: for the worker to close.
    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError>;
}
