//! Prepaid balances of the quota role: credit grants (the limit of a
//! [`Period::Prepaid`](crate::base::Period::Prepaid) counter is the sum of its open grants),
//! their closing at expiry, refunds and takes apart, the units a closed grant forgives, and the
//! rules every store applies to them.

use crate::base::{MeterId, RefundAttribution, TenantId};

/// A grant of prepaid units to a tenant on a meter: the limit of its
/// [`Period::Prepaid`](crate::base::Period::Prepaid) counter is the sum of its open grants.
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
    /// The payment it came from (a Stripe payment intent id), for refunds: one grant per
    /// payment and tenant.
    pub payment: Option<String>,
    /// What the payment paid for this grant's units: the amounts of its credit lines (in the
    /// payment's currency, smallest unit), if known. A refund takes back the units the refunded
    /// part of it bought.
    pub paid: Option<u64>,
    /// The units bought: [`units`](Self::units) before any refund lowered it.
    pub bought: u64,
    /// The units the payment's refunds take back in all, as
    /// [`refund_credits`](super::QuotaStore::refund_credits) last applied them (at most what the grant
    /// held then): a refund delivered again, or late, takes nothing more.
    pub taken: u64,
    /// Money of the payment refunded before this build recorded [`paid`](Self::paid) (grants
    /// made by earlier versions); 0 otherwise.
    pub refunded: u64,
    /// Another grant of the tenant was made for the same payment first, before one grant per
    /// payment was enforced (schema upgrades keep such grants as they were, marked): listed
    /// for a person to revoke.
    pub duplicate: bool,
    /// The takes applied to it apart from the payment's cumulative refunds, once per id: a
    /// dispute's, a proration credit's (at most [`TAKES_MAX`]).
    pub takes: Vec<CreditTake>,
    /// How it closed, once expired or revoked.
    pub closed: Option<CreditClosure>,
}

/// The most takes one grant records ([`CreditGrant::takes`]): past it, a new take is refused
/// ([`RefundOutcome::Full`]) for a person to look at.
pub const TAKES_MAX: usize = 32;

/// A take of a grant's units applied apart from its payment's cumulative refunds, once per
/// id: a dispute's withdrawal (its id the dispute's), a proration credit (its id the credit
/// line's). What it took of the balance's unspent units is given back once if the take is
/// reversed (a dispute won after its funds were withdrawn), at most what the grant's other
/// takes and refunds leave it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreditTake {
    /// The dispute's or the credit line's id.
    pub id: String,
    /// Units it takes back in all (what its money bought, at most the units bought), whether
    /// the grant still held them or not.
    pub units: u64,
    /// Of them, units the grant lost to it (at most what the grant held then).
    pub removed: u64,
    /// Of those, units taken from what the balance still held (the rest were counted used).
    pub unspent: u64,
    /// Whether it was reversed (its unspent units given back).
    pub given_back: bool,
}

impl CreditTake {
    /// A take of `units`, `removed` of them from the grant, `unspent` of those from what the
    /// balance still held.
    #[must_use]
    pub fn new(id: impl Into<String>, units: u64, removed: u64, unspent: u64) -> Self {
        Self { id: id.into(), units, removed, unspent, given_back: false }
    }
}

/// A grant's takes as a store holds them (JSON; `[]` for none).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "dynamodb", feature = "redis"))]
pub(crate) fn takes_json(takes: &[CreditTake]) -> String {
    serde_json::Value::Array(
        takes
            .iter()
            .map(|t| {
                serde_json::json!({
                    "id": t.id, "units": t.units, "removed": t.removed, "unspent": t.unspent, "back": t.given_back,
                })
            })
            .collect(),
    )
    .to_string()
}

/// A grant's takes read back (nothing from what is not a list of takes).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "dynamodb", feature = "redis"))]
pub(crate) fn takes_of(json: &str) -> Vec<CreditTake> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let all = v.as_array().map_or(0, Vec::len);
    let takes: Vec<CreditTake> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            Some(CreditTake {
                id: t["id"].as_str()?.to_owned(),
                units: t["units"].as_u64()?,
                removed: t["removed"].as_u64()?,
                unspent: t["unspent"].as_u64()?,
                given_back: t["back"] == true,
            })
        })
        .collect();
    if takes.len() < all || (!v.is_array() && json != "[]") {
        // Never written so: a person edited the row. A take dropped here could apply again.
        tracing::error!(takes = %json, "a credit grant's takes that cannot be read: the unreadable ones are left out");
    }
    takes
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
            paid: None,
            bought: units,
            taken: 0,
            refunded: 0,
            duplicate: false,
            takes: Vec::new(),
            closed: None,
        }
    }

    /// Bought for `amount` (the amounts of the payment's credit lines, smallest currency unit).
    #[must_use]
    pub fn costing(mut self, amount: u64) -> Self {
        self.paid = Some(amount);
        self
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

    /// How it closed, if it has: revoked; used up (it held nothing when it closed, before any
    /// expiry: closed by a later grant's write to make room); or expired.
    #[must_use]
    pub fn closed_as(&self) -> Option<Closed> {
        let c = self.closed?;
        Some(if c.revoked {
            Closed::Revoked
        } else if c.lost == 0 && self.expires_at.is_none_or(|at| c.at < at) {
            Closed::UsedUp
        } else {
            Closed::Expired
        })
    }

    /// Until when a store keeps it once closed (Unix seconds; `None` while open):
    /// [`USED_UP_GRANTS_KEPT_SECS`](super::contract::USED_UP_GRANTS_KEPT_SECS) after it closed
    /// used up, [`CLOSED_GRANTS_KEPT_SECS`](super::contract::CLOSED_GRANTS_KEPT_SECS) after
    /// another close.
    #[must_use]
    pub fn kept_until(&self) -> Option<i64> {
        let c = self.closed?;
        let keep = if self.closed_as() == Some(Closed::UsedUp) {
            super::contract::USED_UP_GRANTS_KEPT_SECS
        } else {
            super::contract::CLOSED_GRANTS_KEPT_SECS
        };
        Some(c.at.saturating_add(keep))
    }

    /// Whether a refund or a take of its payment still reaches it: open, or closed holding
    /// nothing unspent (used up, or expired with nothing lost), never revoked. What such a
    /// take takes of a closed grant comes from what the balance still holds, as it would had
    /// the grant stayed open.
    #[must_use]
    pub fn refundable(&self) -> bool {
        self.closed.is_none_or(|c| !c.revoked && c.lost == 0)
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
    /// Whether it was revoked (else it expired, or closed used up: see
    /// [`CreditGrant::closed_as`]).
    pub revoked: bool,
    /// Units the balance lost with it, beside those counted used that left with it (units
    /// leased to nodes count as used): an expiry, what the grant still held (its units less
    /// those spent from it, soonest-to-expire first); a revoke, what the balance still held,
    /// up to the grant's units (the rest leave as used units).
    pub lost: u64,
}

/// How a credit grant closed ([`CreditGrant::closed_as`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Closed {
    /// Revoked by a person (`tollgate credits revoke`,
    /// [`Admin::revoke_credits`](crate::admin::Admin::revoke_credits)).
    Revoked,
    /// Used up: every unit it held was counted used, so it closed by itself, losing nothing,
    /// to make room for the tenant's next grant.
    UsedUp,
    /// Expired.
    Expired,
}

impl Closed {
    /// Its name in listings: `revoked`, `used_up` or `expired`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::UsedUp => "used_up",
            Self::Expired => "expired",
        }
    }
}

/// A prepaid balance: the units of the open grants, and those used (leased to nodes, or owed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CreditBalance {
    /// Units of the open grants.
    pub granted: u64,
    /// Units used: reserved by nodes (spent or leased) and owed.
    pub reserved: u64,
    /// Units a close (or a refund) took out of `reserved` with its grant that may still be
    /// leased to nodes: the part of it inside each node's last lease, kept per node. That
    /// node's release of that lease draws on them before it lowers `reserved`, so a closed
    /// grant's leased units never come back inside the other grants, and no other release
    /// draws on them. Kept until [`forgiven_until`](Self::forgiven_until).
    pub forgiven: u64,
    /// Until when `forgiven` holds (Unix seconds): [`FORGIVEN_SECS`](super::contract::FORGIVEN_SECS)
    /// after the last close or refund that added to it.
    pub forgiven_until: i64,
}

impl CreditBalance {
    /// A balance of `granted` units with `reserved` used.
    #[must_use]
    pub fn new(granted: u64, reserved: u64) -> Self {
        Self { granted, reserved, forgiven: 0, forgiven_until: 0 }
    }

    /// With `forgiven` units forgiven until `until`.
    #[must_use]
    pub fn forgiving(mut self, forgiven: u64, until: i64) -> Self {
        self.forgiven = forgiven;
        self.forgiven_until = until;
        self
    }

    /// Units left: negative when usage that had to be billed took it below zero (the next
    /// grant pays that first).
    #[must_use]
    pub fn left(&self) -> i128 {
        i128::from(self.granted) - i128::from(self.reserved)
    }
}

/// The answer to [`QuotaStore::grant_credits`](super::QuotaStore::grant_credits).
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
/// what it loses, the balance after it (the grant's units leave the granted total, the part of
/// them counted used leaves the used total), and where in the used total that part was (see
/// [`forgive`]: the stores forgive the part of it still leased). An expiry loses what the grant
/// still holds when the units used are spent soonest-to-expire first; a revoke (`revoke`) takes
/// what the balance still holds first ([`taking_unspent_first`]), as a refund does, so that
/// revoking either of two identical grants leaves the same balance. Every store closes by this
/// rule.
#[must_use]
pub(crate) fn close_against(
    grants: &[CreditGrant],
    id: &str,
    balance: CreditBalance,
    revoke: bool,
) -> Option<(u64, CreditBalance, UsedTaken)> {
    let grant = grants.iter().find(|g| g.id == id && g.closed.is_none())?;
    let (lost, spent, used) = if revoke {
        taking_unspent_first(grant.units, balance)
    } else {
        let (lo, spent) = spent_of(grants, grant, balance);
        (grant.units - spent, spent, UsedTaken { lo, hi: lo + spent })
    };
    let after = CreditBalance::new(balance.granted.saturating_sub(grant.units), balance.reserved.saturating_sub(spent));
    Some((lost, after, used))
}

/// The open grants of `grants` (of one tenant and meter) that are used up, in spending order,
/// and `balance` after they close: the longest run of them, in the order units are spent
/// (soonest to expire first), whose units together are covered by the units counted used that
/// no sender keeps (`kept`: the leases, holds and jobs' reservations its senders keep,
/// [`Kept::total`](super::Kept::total)). Each closes losing nothing
/// ([`CreditClosure::lost`] 0): its units leave the granted total and the used total alike, so
/// what the balance holds does not change. A lease, a hold or a job's reservation a sender
/// keeps lies in what stays in the used total, so its release later lowers that total as it
/// would have (never past zero: the closed units were all below it). A grant with no units
/// left (refunded in full) is used up at once. Every store closes used-up grants by this rule,
/// in the write of a grant that finds the tenant at
/// [`OPEN_GRANTS_MAX`](super::contract::OPEN_GRANTS_MAX) open grants.
#[must_use]
pub(crate) fn close_used_up(grants: &[CreditGrant], balance: CreditBalance, kept: u64) -> (Vec<String>, CreditBalance) {
    let used = balance.reserved.saturating_sub(kept);
    let mut open: Vec<&CreditGrant> = grants.iter().filter(|g| g.closed.is_none()).collect();
    open.sort_by(|a, b| a.spending_order().cmp(&b.spending_order()));
    let mut covered = 0u64;
    let mut closed = 0u64;
    let mut ids = Vec::new();
    for g in open {
        match covered.checked_add(g.units) {
            Some(next) if next <= used => {
                covered = next;
                closed += g.units;
                ids.push(g.id.clone());
            }
            _ => break,
        }
    }
    let after = CreditBalance {
        granted: balance.granted.saturating_sub(closed),
        reserved: balance.reserved - closed,
        ..balance
    };
    (ids, after)
}

/// `units` of a grant taken out of `balance` by a refund or a revoke: first from what the
/// balance still holds (its granted units less those used or leased), only the rest from the
/// units counted used, the last used first (they leave the used total, forgiven where still
/// leased: [`forgive`]). `(from unspent, from used, where those were in the used total)`. So a
/// refund takes the same from either of two identical grants, and never the same units twice:
/// what is taken from the unspent units no longer counts in the balance a later close reads.
fn taking_unspent_first(units: u64, balance: CreditBalance) -> (u64, u64, UsedTaken) {
    let unspent = units.min(balance.granted.saturating_sub(balance.reserved));
    let used = (units - unspent).min(balance.reserved);
    (unspent, used, UsedTaken { lo: balance.reserved - used, hi: balance.reserved })
}

/// Where `grant`'s units counted used start in the used total, and how many they are: the
/// used total spent soonest-to-expire first.
fn spent_of(grants: &[CreditGrant], grant: &CreditGrant, balance: CreditBalance) -> (u64, u64) {
    let before: u64 = grants
        .iter()
        .filter(|g| g.closed.is_none() && g.spending_order() < grant.spending_order())
        .fold(0u64, |a, g| a.saturating_add(g.units));
    let lo = balance.reserved.min(before);
    (lo, (balance.reserved - lo).min(grant.units))
}

/// The units counted used that a close or a refund took out of a balance's used total:
/// positions `lo..hi` of the used total as it stood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UsedTaken {
    lo: u64,
    hi: u64,
}

impl UsedTaken {
    /// Of a lease of `granted` units answered with `reserved` used after it (so positions
    /// `reserved − granted..reserved`), the units inside this range.
    #[must_use]
    pub(crate) fn of_lease(&self, granted: u64, reserved: u64) -> u64 {
        let start = reserved.saturating_sub(granted);
        reserved.min(self.hi).saturating_sub(start.max(self.lo))
    }
}
/// Per sender (named as its store names it), the units of closed or refunded grants that its
/// lease at the close may still give back, and the sequence number of its last call then
/// ([`CreditBalance::forgiven`] is their sum).
pub(crate) type ForgivenBy = std::collections::BTreeMap<String, (u64, u64)>;

/// A sender's last quota call on a counter, as a store keeps it: `(name, seq, granted,
/// reserved after)`.
pub(crate) type SenderCall = (String, u64, u64, u64);

/// `after` (a close's or a refund's balance, from `before`) with the units of `taken` that
/// the senders' last leases hold forgiven, per sender, for
/// [`FORGIVEN_SECS`](super::contract::FORGIVEN_SECS) from `now`. A lease is taken from the
/// used total in order, so a node whose last lease lies inside the units that left may give
/// them back, and only that node's release is drawn on them
/// ([`release_against`]); a release by any other node, or by that node after a later call
/// (its lease since is another grant's), lowers the used total in full. Entries of a window
/// that has passed are dropped; what is still forgiven is kept.
#[must_use]
pub(crate) fn forgive(
    before: CreditBalance,
    after: CreditBalance,
    by: ForgivenBy,
    taken: UsedTaken,
    senders: &[SenderCall],
    now: i64,
) -> (CreditBalance, ForgivenBy) {
    let live = before.forgiven_until > now;
    let mut by = if live { by } else { ForgivenBy::new() };
    // An entry whose sender has called since, or was forgotten, can never be drawn on: gone.
    by.retain(|name, (_, seq)| senders.iter().any(|(n, s, _, _)| n == name && s == seq));
    let mut added = 0u64;
    for (name, seq, granted, reserved) in senders {
        let units = taken.of_lease(*granted, *reserved);
        if units == 0 {
            continue;
        }
        added = added.saturating_add(units);
        let entry = by.entry(name.clone()).or_insert((0, *seq));
        if entry.1 != *seq {
            // Forgiven for an earlier lease: the sender has called since.
            *entry = (0, *seq);
        }
        entry.0 = entry.0.saturating_add(units);
    }
    by.retain(|_, (units, _)| *units > 0);
    let total = by.values().fold(0u64, |a, (u, _)| a.saturating_add(*u));
    let until = match (added, total) {
        (0, 0) => 0,
        (0, _) => before.forgiven_until,
        _ => now.saturating_add(super::contract::FORGIVEN_SECS),
    };
    (after.forgiving(total, until), by)
}

/// A release of `units` at `now` by `sender`, whose last call before it had sequence number
/// `last` (`None`: not remembered), from a prepaid balance holding `reserved` with `forgiven`
/// units forgiven (`by` per sender) until `until`: `(reserved, forgiven)` after it, `by`
/// updated. The release draws first on what is forgiven to this sender for the lease it still
/// holds (units of a closed or refunded grant: they do not come back), then lowers `reserved`
/// (never below zero). What is forgiven to it for an earlier lease is dropped. Every store
/// releases by this rule.
#[must_use]
pub(crate) fn release_against(
    reserved: u64,
    forgiven: u64,
    until: i64,
    by: &mut ForgivenBy,
    (sender, last): (&str, Option<u64>),
    units: u64,
    now: i64,
) -> (u64, u64) {
    if until <= now {
        by.clear();
        return (reserved.saturating_sub(units), 0);
    }
    let Some(&(held, seq)) = by.get(sender) else { return (reserved.saturating_sub(units), forgiven) };
    if last != Some(seq) {
        by.remove(sender);
        return (reserved.saturating_sub(units), forgiven.saturating_sub(held));
    }
    let drawn = held.min(units);
    if drawn == held {
        by.remove(sender);
    } else {
        by.insert(sender.to_owned(), (held - drawn, seq));
    }
    (reserved.saturating_sub(units - drawn), forgiven.saturating_sub(drawn))
}

/// [`ForgivenBy`] as the SQL stores keep it: a JSON object of `[units, seq]`.
#[must_use]
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "dynamodb"))]
pub(crate) fn forgiven_by_json(by: &ForgivenBy) -> String {
    serde_json::to_string(by).unwrap_or_else(|_| "{}".to_owned())
}

/// [`ForgivenBy`] read back from [`forgiven_by_json`] (empty if unreadable).
#[must_use]
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "dynamodb"))]
pub(crate) fn forgiven_by_of(json: &str) -> ForgivenBy {
    serde_json::from_str(json).unwrap_or_default()
}

/// A refund of a payment that bought credits ([`QuotaStore::refund_credits`](super::QuotaStore::refund_credits)), as Stripe holds
/// it now: everything is cumulative (in all, this refund included), so that refunds delivered
/// again, late or out of order take back each unit once.
///
/// The grant loses the units that the money refunded of its credit lines bought, at the
/// grant's price per unit ([`units_for`](Self::units_for)), at most what it still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreditRefund {
    /// The payment (a payment intent id): the grant with this payment, or with this id.
    pub payment: String,
    /// The payment's invoice, if any: a grant with this id is the payment's too.
    pub invoice: Option<String>,
    /// The payment's amount (smallest currency unit).
    pub amount: u64,
    /// Money refunded in all that no credit note or metadata attributes (shared by
    /// [`attribution`](Self::attribution)).
    pub refunded: u64,
    /// How `refunded` is shared.
    pub attribution: RefundAttribution,
    /// Money refunded in all of the credit lines themselves, as the invoice's credit notes
    /// name them.
    pub of_credits: u64,
    /// Units taken back in all by refunds that say how many (`tollgate_units` metadata).
    pub units: u64,
    /// When the refund was seen (Unix seconds): one that arrives before its grant is kept
    /// [`REFUNDS_KEPT_SECS`](super::contract::REFUNDS_KEPT_SECS) from then.
    pub at: i64,
    /// The tenant whose customer paid, when known: a store that finds grants by tenant looks
    /// there for grants made before it recorded payments apart.
    pub tenant: Option<TenantId>,
    /// Whether it is kept until its grant lands when no grant of its payment has landed yet
    /// (`false`: a dispute, which only concerns a grant already made: nothing is stored).
    pub keep: bool,
    /// Applied apart from the payment's cumulative refunds, once per id (a dispute, a
    /// proration credit), or the reversal of such a take; `None`: a refund.
    pub apart: Option<Apart>,
}

/// A take applied apart from a payment's cumulative refunds ([`CreditRefund::apart`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Apart {
    /// Takes what the refund's money bought ([`CreditRefund::units_for`]), at most what the
    /// grant holds, once per id (recorded as a [`CreditTake`]); it moves no cumulative refund.
    Take(String),
    /// Gives back, once, the unspent units the take of this id took, at most what the grant's
    /// refunds and other takes leave it (units bought less what they take, less what it holds,
    /// less the units this take removed that were counted used); before its take, records it
    /// as given back, so that the take takes nothing.
    GiveBack(String),
}

impl CreditRefund {
    /// `refunded` of `amount` refunded in all, of `payment`, attributed pro rata, seen at `at`.
    #[must_use]
    pub fn new(payment: impl Into<String>, refunded: u64, amount: u64, at: i64) -> Self {
        Self {
            payment: payment.into(),
            invoice: None,
            amount,
            refunded,
            attribution: RefundAttribution::ProRata,
            of_credits: 0,
            units: 0,
            at,
            tenant: None,
            keep: true,
            apart: None,
        }
    }

    /// Taken once under `id` (a dispute's, a proration credit line's), apart from the
    /// payment's cumulative refunds, and only from a grant already made (never kept): see
    /// [`Apart::Take`].
    #[must_use]
    pub fn taking_once(mut self, id: impl Into<String>) -> Self {
        self.apart = Some(Apart::Take(id.into()));
        self.only_if_granted()
    }

    /// Gives back what the take `id` took of the balance's unspent units, once, to a grant
    /// already made (never kept): see [`Apart::GiveBack`].
    #[must_use]
    pub fn giving_back(mut self, id: impl Into<String>) -> Self {
        self.apart = Some(Apart::GiveBack(id.into()));
        self.only_if_granted()
    }

    /// Whether it is kept until its grant lands when none has landed: [`keep`](Self::keep),
    /// and never a take apart or its reversal (they concern a grant already made).
    #[must_use]
    pub fn kept(&self) -> bool {
        self.keep && self.apart.is_none()
    }

    /// Applied only to a grant already made: without one, nothing is kept
    /// ([`RefundOutcome::Unknown`]).
    #[must_use]
    pub fn only_if_granted(mut self) -> Self {
        self.keep = false;
        self
    }

    /// Paid by `tenant`'s customer.
    #[must_use]
    pub fn for_tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Of this invoice's payment.
    #[must_use]
    pub fn of_invoice(mut self, invoice: impl Into<String>) -> Self {
        self.invoice = Some(invoice.into());
        self
    }

    /// Shared by this rule.
    #[must_use]
    pub fn attributed(mut self, attribution: RefundAttribution) -> Self {
        self.attribution = attribution;
        self
    }

    /// With `money` refunded of the credit lines in all (credit notes), beside what is
    /// attributed.
    #[must_use]
    pub fn of_credit_lines(mut self, money: u64) -> Self {
        self.of_credits = money;
        self
    }

    /// With `units` taken back in all by refunds that say so.
    #[must_use]
    pub fn naming_units(mut self, units: u64) -> Self {
        self.units = units;
        self
    }

    /// This refund, kept until `grant` landed, as applied by the grant's write: at the grant's
    /// time if that is later (what it forgives is kept from then).
    #[must_use]
    pub(crate) fn landing(&self, grant: &CreditGrant) -> Self {
        let mut r = self.clone();
        r.at = r.at.max(grant.granted_at);
        r
    }

    /// Whether this refund is of `grant`'s payment.
    #[must_use]
    pub fn is_of(&self, grant: &CreditGrant) -> bool {
        grant.payment.as_deref() == Some(self.payment.as_str())
            || grant.id == self.payment
            || self.invoice.as_deref().is_some_and(|i| grant.id == i)
    }

    /// The units this refund takes back from `grant` in all (before the cap at what the grant
    /// still holds): `units` named, plus what the money refunded of the credit lines bought at
    /// the grant's price, `bought × money / paid` rounded down, all of `bought` once the
    /// credit lines are refunded in full. The money of the credit lines is `of_credits` plus
    /// `refunded` attributed: pro rata `refunded × paid / amount`, credits first
    /// `min(refunded, paid)`. A grant made before its cost was recorded counts the payment's
    /// amount less what was refunded then as its cost, and its units then as bought. Every
    /// store refunds by this rule.
    #[must_use]
    pub fn units_for(&self, grant: &CreditGrant) -> u64 {
        let (paid, amount, refunded) = match grant.paid {
            Some(paid) => (paid, self.amount, self.refunded),
            None => {
                let left = self.amount.saturating_sub(grant.refunded);
                (left, left, self.refunded.saturating_sub(grant.refunded))
            }
        };
        let attributed = match self.attribution {
            RefundAttribution::ProRata if amount > 0 => {
                (u128::from(refunded) * u128::from(paid) / u128::from(amount)) as u64
            }
            RefundAttribution::ProRata => 0,
            RefundAttribution::CreditsFirst => refunded.min(paid),
        };
        let money = attributed.saturating_add(self.of_credits);
        let bought = if money >= paid && paid > 0 {
            grant.bought
        } else if paid == 0 {
            0
        } else {
            (u128::from(grant.bought) * u128::from(money) / u128::from(paid)) as u64
        };
        bought.saturating_add(self.units).min(grant.bought)
    }
}

/// What [`refund_against`] did: the units taken from what the balance still held (or given
/// back), the grant as it is now (its units, [`taken`](CreditGrant::taken) and
/// [`takes`](CreditGrant::takes)), the balance after it, and where the units counted used that
/// left were in the used total (to [`forgive`]).
#[derive(Debug, Clone)]
pub(crate) struct RefundApplied {
    pub(crate) units: u64,
    pub(crate) grant: CreditGrant,
    pub(crate) after: CreditBalance,
    pub(crate) used: UsedTaken,
    /// A take reversed: `units` were given back.
    pub(crate) given_back: bool,
}

/// Applies `refund` to its grant among `grants` (of one tenant and meter: the open ones, and
/// a closed one it still reaches, [`CreditGrant::refundable`], the open one first) against
/// `balance`; `None` when it changes nothing (a redelivery, less refunded than before, a take
/// applied or given back before). A refund takes `units_for − taken`, at most what the grant
/// has: first from what the balance still holds, then from the units counted used, the last
/// used first, which leave it as a close's do ([`taking_unspent_first`]). A take apart
/// ([`Apart::Take`]) takes `units_for` by the same rule once per id and records it; its
/// reversal ([`Apart::GiveBack`]) adds back the unspent units it took (never past
/// [`MAX_BALANCE`](super::contract::MAX_BALANCE)), to the grant and the balance. A grant that
/// closed used up held nothing unspent when it closed: had it stayed open, a take of it would
/// take the balance's unspent units (which its used units then displace onto the other
/// grants), so a take of it takes as many of those, counted used from then on, and its
/// reversal stops counting them used; the balance holds what it would have. Every store
/// refunds by this rule.
pub(crate) fn refund_against(
    grants: &[CreditGrant],
    refund: &CreditRefund,
    balance: CreditBalance,
) -> Result<RefundApplied, RefundOutcome> {
    let grant = grants
        .iter()
        .find(|g| g.closed.is_none() && refund.is_of(g))
        .or_else(|| grants.iter().find(|g| g.refundable() && refund.is_of(g)))
        .ok_or(RefundOutcome::Nothing)?;
    let mut now = grant.clone();
    let open = grant.closed.is_none();
    let take = |units: u64| {
        if !open {
            // Closed holding nothing unspent: its units left the balance as used ones. Open, a
            // take would take the balance's unspent units first and then used ones, which
            // leave with it; closed, the unspent units it takes become used ones (so the
            // balance holds what it would have), and the rest have left already.
            let unspent = units.min(balance.granted.saturating_sub(balance.reserved));
            let after = CreditBalance { reserved: balance.reserved + unspent, ..balance };
            let none = UsedTaken { lo: balance.reserved, hi: balance.reserved };
            return (unspent, units, after, none);
        }
        let (from_held, from_spent, used) = taking_unspent_first(units, balance);
        let after =
            CreditBalance::new(balance.granted.saturating_sub(from_held + from_spent), balance.reserved - from_spent);
        (from_held, from_held + from_spent, after, used)
    };
    match &refund.apart {
        None => {
            let target = refund.units_for(grant);
            if target <= grant.taken {
                return Err(RefundOutcome::Nothing);
            }
            let (units, removed, after, used) = take((target - grant.taken).min(grant.units));
            now.units -= removed;
            now.taken = target;
            Ok(RefundApplied { units, grant: now, after, used, given_back: false })
        }
        Some(Apart::Take(id)) => {
            if grant.takes.iter().any(|t| t.id == *id) {
                return Err(RefundOutcome::Nothing);
            }
            if grant.takes.len() >= TAKES_MAX {
                return Err(RefundOutcome::Full);
            }
            let meant = refund.units_for(grant);
            let (units, removed, after, used) = take(meant.min(grant.units));
            now.units -= removed;
            now.takes.push(CreditTake::new(id.clone(), meant, removed, units));
            Ok(RefundApplied { units, grant: now, after, used, given_back: false })
        }
        Some(Apart::GiveBack(id)) => {
            if !now.takes.iter().any(|t| t.id == *id) {
                // Reversed before its take came (events out of order): recorded as given back,
                // so that the take, when it comes, takes nothing.
                if now.takes.len() >= TAKES_MAX {
                    return Err(RefundOutcome::Full);
                }
                now.takes.push(CreditTake::new(id.clone(), 0, 0, 0));
            }
            // What the grant may hold back at most: its units bought less what its refunds and
            // its other takes take (whether it still held them when they came), less what it
            // holds, less the units this take removed that were counted used (they stay used).
            let others =
                now.takes.iter().filter(|t| t.id != *id && !t.given_back).fold(0u64, |a, t| a.saturating_add(t.units));
            let t = now.takes.iter_mut().find(|t| t.id == *id && !t.given_back).ok_or(RefundOutcome::Nothing)?;
            let room = now.bought.saturating_sub(
                now.taken
                    .saturating_add(others)
                    .saturating_add(now.units)
                    .saturating_add(t.removed.saturating_sub(t.unspent)),
            );
            let used = UsedTaken { lo: balance.reserved, hi: balance.reserved };
            if !open {
                // Its take's unspent units became used ones: they stop being used (at most
                // what the balance counts used).
                let back = t.unspent.min(room).min(balance.reserved);
                t.given_back = true;
                now.units += back;
                let after = CreditBalance { reserved: balance.reserved - back, ..balance };
                return Ok(RefundApplied { units: back, grant: now, after, used, given_back: true });
            }
            let back = t.unspent.min(room).min(super::contract::MAX_BALANCE.saturating_sub(balance.granted));
            t.given_back = true;
            now.units += back;
            let after = CreditBalance { granted: balance.granted + back, ..balance };
            Ok(RefundApplied { units: back, grant: now, after, used, given_back: true })
        }
    }
}

impl RefundApplied {
    /// The answer to the refund.
    pub(crate) fn outcome(&self) -> RefundOutcome {
        let (tenant, meter, grant, units) =
            (self.grant.tenant.clone(), self.grant.meter.clone(), self.grant.id.clone(), self.units);
        if self.given_back {
            RefundOutcome::GivenBack { tenant, meter, grant, units }
        } else {
            RefundOutcome::Taken { tenant, meter, grant, units }
        }
    }
}

/// The answer to [`QuotaStore::refund_credits`](super::QuotaStore::refund_credits).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefundOutcome {
    /// The refund took units back from the grant `grant` of `tenant` on `meter`: `units` of
    /// what the balance still held (it may also take units counted used, which leave the
    /// balance with it).
    Taken {
        /// The tenant.
        tenant: TenantId,
        /// The meter.
        meter: MeterId,
        /// The grant's id.
        grant: String,
        /// Units taken from what the balance still held (its granted units less those used
        /// or leased); the rest of what the refund takes leaves as used units.
        units: u64,
    },
    /// The grant took this much back already (a redelivery, a late refund, a take applied
    /// or given back before), or it has closed.
    Nothing,
    /// A take apart ([`CreditRefund::taking_once`]) reversed
    /// ([`CreditRefund::giving_back`]): `units` it had taken of what the balance held came
    /// back to the grant `grant` of `tenant` on `meter`.
    GivenBack {
        /// The tenant.
        tenant: TenantId,
        /// The meter.
        meter: MeterId,
        /// The grant's id.
        grant: String,
        /// Units given back.
        units: u64,
    },
    /// No grant of the payment exists, and the refund is not to be kept
    /// ([`CreditRefund::only_if_granted`]): nothing changed.
    Unknown,
    /// No grant of this payment yet: kept (unless [`CreditRefund::keep`] is off), and applied
    /// by the grant's own write when it lands
    /// (within [`REFUNDS_KEPT_SECS`](super::contract::REFUNDS_KEPT_SECS)).
    Kept,
    /// No grant of this payment yet, and [`REFUNDS_KEPT_MAX`](super::contract::REFUNDS_KEPT_MAX)
    /// refunds are kept already: nothing was kept (ask again later); or a take apart found its
    /// grant holding [`TAKES_MAX`] takes (a person must look).
    Full,
}

/// A refund kept until its grant lands, as a store holds it.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "dynamodb", feature = "redis"))]
pub(crate) fn kept_refund_json(refund: &CreditRefund) -> String {
    serde_json::json!({
        "payment": refund.payment, "invoice": refund.invoice, "amount": refund.amount,
        "refunded": refund.refunded,
        "attribution": match refund.attribution { RefundAttribution::ProRata => "pro_rata", RefundAttribution::CreditsFirst => "credits_first" },
        "of_credits": refund.of_credits, "units": refund.units, "at": refund.at,
    })
    .to_string()
}

/// A kept refund read back (`None`: not one).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "dynamodb", feature = "redis"))]
pub(crate) fn kept_refund_of(json: &str) -> Option<CreditRefund> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let mut r =
        CreditRefund::new(v["payment"].as_str()?, v["refunded"].as_u64()?, v["amount"].as_u64()?, v["at"].as_i64()?);
    r.invoice = v["invoice"].as_str().map(str::to_owned);
    r.attribution =
        if v["attribution"] == "credits_first" { RefundAttribution::CreditsFirst } else { RefundAttribution::ProRata };
    r.of_credits = v["of_credits"].as_u64().unwrap_or(0);
    r.units = v["units"].as_u64().unwrap_or(0);
    Some(r)
}

/// Of two copies of one payment's refund, the one Stripe sent later: more refunded in every
/// part (refunds only grow), else the later seen.
pub(crate) fn newer_refund(a: CreditRefund, b: CreditRefund) -> CreditRefund {
    let key = |r: &CreditRefund| (r.refunded.saturating_add(r.of_credits).saturating_add(r.units), r.at);
    if key(&b) >= key(&a) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, units: u64, expires_at: Option<i64>) -> CreditGrant {
        CreditGrant::new("t".into(), "tokens".into(), id, units, 100).expiring(expires_at)
    }

    /// Used-up grants are the run, in spending order, that the units counted used and kept by
    /// no sender cover whole: the first grant they do not cover ends it, and closing them keeps
    /// what the balance holds.
    #[test]
    fn used_up_grants_are_those_the_unkept_used_units_cover() {
        let grants = [grant("late", 10, None), grant("soon", 10, Some(200)), grant("mid", 10, Some(300))];
        let balance = CreditBalance::new(30, 25);
        // 25 counted used, 6 of them kept by senders: 19 used, which cover `soon` only.
        let (ids, after) = close_used_up(&grants, balance, 6);
        assert_eq!(ids, ["soon"]);
        assert_eq!(after, CreditBalance::new(20, 15));
        assert_eq!(after.left(), balance.left(), "what the balance holds does not change");
        // Kept past what is used: nothing; used past everything (a debt): all.
        assert!(close_used_up(&grants, balance, 25).0.is_empty());
        let (all, after) = close_used_up(&grants, CreditBalance::new(30, 40), 0);
        assert_eq!((all.len(), after), (3, CreditBalance::new(0, 10)));
        // Closed grants are not counted again; a grant with no units left is used up at once.
        let mut refunded = grant("refunded", 0, None);
        refunded.granted_at = 50;
        let (ids, _) = close_used_up(&[refunded, grant("late", 10, None)], CreditBalance::new(10, 0), 0);
        assert_eq!(ids, ["refunded"]);
    }

    /// A grant closed used up is told apart from an expiry and a revoke, and a refund still
    /// reaches it; a revoked one, never.
    #[test]
    fn how_a_grant_closed() {
        let mut g = grant("g", 10, Some(500));
        assert_eq!((g.closed_as(), g.refundable(), g.kept_until()), (None, true, None));
        g.closed = Some(CreditClosure { at: 400, revoked: false, lost: 0 });
        assert_eq!(g.closed_as(), Some(Closed::UsedUp));
        assert_eq!(g.kept_until(), Some(400 + super::super::contract::USED_UP_GRANTS_KEPT_SECS));
        g.closed = Some(CreditClosure { at: 500, revoked: false, lost: 0 });
        assert_eq!((g.closed_as(), g.refundable()), (Some(Closed::Expired), true));
        g.closed = Some(CreditClosure { at: 500, revoked: false, lost: 3 });
        assert_eq!((g.closed_as(), g.refundable()), (Some(Closed::Expired), false));
        g.closed = Some(CreditClosure { at: 400, revoked: true, lost: 0 });
        assert_eq!((g.closed_as(), g.refundable()), (Some(Closed::Revoked), false));
    }
}
