//! The quota role: counters of reserved units per (tenant, meter, period), reserved and released
//! in leases by every node.

use std::fmt;

use async_trait::async_trait;

use super::{RechargeMode, RechargeSeen, RechargeState, StoreError};
pub use crate::base::SpendCap;
use crate::base::{MeterId, Period, RefundAttribution, TenantId};

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

    /// The counter of `tenant` on `meter` named by a period's tag ([`period_tag`](Self::period_tag))
    /// and bounds, as a store keeps it; `None` for a tag no period has.
    #[must_use]
    pub fn from_tag(tenant: TenantId, meter: MeterId, tag: &str, start: i64, end: i64) -> Option<Self> {
        let period = match tag {
            "day" => Period::Day,
            "prepaid" => Period::Prepaid,
            _ => {
                let day: u8 = tag.strip_prefix("month@")?.parse().ok()?;
                Period::Month { anchor_day: day }
            }
        };
        Some(Self::new(tenant, meter, period, start, end))
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
/// call's answer) with the time of that call; a call whose sequence number is not higher is not
/// applied again. Senders are forgotten by the time of their last call, never by sequence
/// number (those of different nodes do not compare): see
/// [`SENDERS_KEPT`](super::contract::SENDERS_KEPT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ReserveToken {
    /// The node (one engine in one process), drawn at random when the engine is built.
    pub node: u64,
    /// Increases with every quota call of that node.
    pub seq: u64,
    /// When the call was made, by the sender's clock (Unix seconds): the store remembers its
    /// senders by it.
    pub at: i64,
}

impl ReserveToken {
    /// A token made now (by the system clock).
    #[must_use]
    pub fn new(node: u64, seq: u64) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { node, seq, at: i64::try_from(now).unwrap_or(i64::MAX) }
    }

    /// Made at `secs` (Unix seconds), by the sender's own clock.
    #[must_use]
    pub fn at(mut self, secs: i64) -> Self {
        self.at = secs;
        self
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
    /// Whether the tenant's own cap on the counter's meter (a spend cap, kept by the store
    /// beside its counters) holds the call instead of `limit`, or is set by it. Never for a
    /// [`Period::Prepaid`] key.
    pub cap: CapMode,
    /// With a `cap` other than [`CapMode::Ignored`]: the most a stored hard cap holds the call
    /// to (the plan's `spend.max_limit` in force, so that a cap set under another plan or
    /// override never lifts the one in force); `None`: the stored cap alone.
    pub cap_max: Option<u64>,
    /// What the caller keeps of the counter besides this grant (its lease's unused units, its
    /// holds, its jobs' reservations): the store counts them reserved and unused
    /// ([`Kept`]).
    pub kept: Kept,
    /// When the caller's reservation of the counter (its lease and holds, with this grant)
    /// expires unless a later call renews it (Unix seconds, by the caller's clock; 0: never).
    pub expires_at: i64,
    /// Of the units granted, how many the caller uses at once (the request waiting on the
    /// call): they are used, not kept in its lease.
    pub taking: u64,
    /// What the call does with the tenant's recharge of the meter ([`RechargeMode`], on a
    /// [`Period::Prepaid`] key only): the answer's [`Grant::recharge`] says what it saw.
    pub recharge: RechargeMode,
}

/// What a sender keeps of a counter besides what it used, as it says with each call: the
/// unused units of its lease, the units its requests' holds hold, and the units its jobs'
/// reservations hold. A store counts them reserved and not used, and gives the lease and the
/// holds back if the sender's reservation expires (a node that died); jobs' reservations stay
/// spent, by their rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Kept {
    /// The lease's unused units.
    pub lease: u64,
    /// Units held by the sender's requests' holds, not recorded yet.
    pub held: u64,
    /// Units held by the sender's jobs' reservations (`reserve_event`).
    pub jobs: u64,
}

impl Kept {
    /// `lease` unused, `held` by holds, `jobs` by jobs' reservations.
    #[must_use]
    pub fn new(lease: u64, held: u64, jobs: u64) -> Self {
        Self { lease, held, jobs }
    }

    /// What goes back to the counter if the sender's reservation expires: its lease and its
    /// holds.
    #[must_use]
    pub fn unused(&self) -> u64 {
        self.lease.saturating_add(self.held)
    }

    /// Everything kept: lease, holds and jobs.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.unused().saturating_add(self.jobs)
    }
}

/// A call to [`QuotaStore::release`]: units given back to a counter, and what the caller
/// keeps of it after them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Release {
    /// The counter.
    pub key: QuotaKey,
    /// Units given back (0: a report of what the caller keeps, renewing its reservation).
    pub units: u64,
    /// The call's token.
    pub token: ReserveToken,
    /// What the caller keeps of the counter after the release.
    pub kept: Kept,
    /// When the caller's reservation of the counter expires unless a later call renews it
    /// (Unix seconds, by the caller's clock; 0: never).
    pub expires_at: i64,
}

impl Release {
    /// `units` of `key` given back with `token`, the caller keeping nothing after them and its
    /// reservation never expiring.
    #[must_use]
    pub fn new(key: QuotaKey, units: u64, token: ReserveToken) -> Self {
        Self { key, units, token, kept: Kept::default(), expires_at: 0 }
    }

    /// The caller keeps `kept` after it, its reservation expiring at `expires_at`.
    #[must_use]
    pub fn keeping(mut self, kept: Kept, expires_at: i64) -> Self {
        self.kept = kept;
        self.expires_at = expires_at;
        self
    }
}

/// A sender's reservation of a counter as a store keeps it beside the sender's last call:
/// what it said it keeps (its lease with the grants answered since, its holds, its jobs),
/// until when, and what its expiry gave back while it did not call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Keeping {
    pub(crate) kept: Kept,
    /// When it expires (Unix seconds, the sender's clock; 0: never).
    pub(crate) expires_at: i64,
    /// Units its expiry gave back (its lease and holds), the sender not having called since.
    pub(crate) gone: u64,
}

impl Keeping {
    /// The record of a call with `kept` (before its grant), `granted` more in its lease but
    /// the `taking` of them it uses at once, expiring at `expires_at`. A caller that keeps no
    /// reservation (`expires_at` 0: it says nothing of what it keeps) keeps nothing as the
    /// store knows: its grants count as used.
    #[must_use]
    pub(crate) fn after(kept: Kept, granted: u64, taking: u64, expires_at: i64) -> Self {
        let granted = if expires_at > 0 { granted - granted.min(taking) } else { 0 };
        let kept = Kept { lease: kept.lease.saturating_add(granted), ..kept };
        Self { kept, expires_at, gone: 0 }
    }

    /// Whether its sender is kept from being forgotten at `now`, its last call at `at`: its
    /// reservation is live, or it keeps jobs' reservations and called within
    /// [`SENDER_JOBS_KEPT_SECS`](super::contract::SENDER_JOBS_KEPT_SECS) (their late
    /// releases must find it: a sender not remembered keeps nothing, [`standing`]).
    #[must_use]
    pub(crate) fn unforgettable(&self, at: i64, now: i64) -> bool {
        self.live() || (self.kept.jobs > 0 && at >= now.saturating_sub(super::contract::SENDER_JOBS_KEPT_SECS))
    }

    /// Whether it holds anything that an expiry would give back.
    #[must_use]
    pub(crate) fn live(&self) -> bool {
        self.gone == 0 && self.kept.unused() > 0 && self.expires_at > 0
    }
}

/// Expires the senders' reservations whose time has come at `now` (the calling sender's
/// clock): each gives back its lease and its holds (its jobs' reservations stay spent, by
/// their rule, and count as used from then on), and is marked gone with what it gave back.
/// Returns the units given back. Every store expires by this rule, at every call of the
/// counter: before applying the call, or on DynamoDB right after the call's conditional write
/// (a call near the limit may then be granted less by what expired with it; the next call
/// finds those units).
#[must_use]
pub(crate) fn expire<'k>(keepings: impl IntoIterator<Item = &'k mut Keeping>, now: i64) -> u64 {
    let mut back = 0u64;
    for k in keepings {
        if k.live() && k.expires_at <= now {
            let units = k.kept.unused();
            back = back.saturating_add(units);
            k.gone = units;
            k.kept = Kept::default();
        }
    }
    back
}

/// [`expire`] on a prepaid balance holding `reserved`, with `forgiven` units forgiven (`by`
/// per sender) until `until`: each sender's expiry gives its units back as its release would
/// ([`release_against`]), drawing first on what is forgiven to it for the lease it holds (the
/// units of a grant closed or refunded meanwhile left the balance then), so they never go
/// back twice. `senders` names each (as its store names it) with its last call's sequence
/// number. Returns `(reserved, forgiven)` after; `by` updated.
#[must_use]
pub(crate) fn expire_against<'k>(
    senders: impl IntoIterator<Item = (String, u64, &'k mut Keeping)>,
    now: i64,
    (reserved, forgiven, until): (u64, u64, i64),
    by: &mut ForgivenBy,
) -> (u64, u64) {
    let mut after = (reserved, forgiven);
    for (name, seq, k) in senders {
        let back = expire(std::iter::once(k), now);
        if back > 0 {
            after = release_against(after.0, after.1, until, by, (&name, Some(seq)), back, now);
        }
    }
    after
}

/// A call of a sender whose reservation expired (`gone` units given back, the sender cut off
/// from the store or paused past its expiry): it said it keeps `kept` now, so it used `gone −
/// kept` since its last call, units the store no longer counts: they are owed again (returned
/// here). The sender drops what it keeps (the answer says [`Grant::expired`]): its record
/// keeps only its jobs. `None` for a sender that did not expire.
#[must_use]
pub(crate) fn revive(keeping: &Keeping, kept: Kept) -> Option<(u64, Kept)> {
    (keeping.gone > 0)
        .then(|| (keeping.gone.saturating_sub(kept.unused()), Kept { jobs: kept.jobs, ..Kept::default() }))
}

/// What a sender's record says of its next call, beside its reservation: each store keeps it
/// with the record (`gone`'s column or field, as these numbers, where `gone` > 0 is an expiry
/// not yet told).
pub(crate) mod mark {
    /// Nothing to tell.
    pub(crate) const NONE: i64 = 0;
    /// The sender's reservation expired and a call whose answer it does not read (a release)
    /// took it: its next call drops what it keeps and is answered expired, owing nothing more.
    pub(crate) const TELL: i64 = -1;
    /// Its last call was answered expired: the same call sent again is answered so.
    pub(crate) const TOLD: i64 = -2;
}

/// How a call of a sender is taken, by what the counter remembers of it: `own` its record's
/// reservation (`None`: no record, a sender never seen or one forgotten), `mark` what the
/// record says of its next call ([`mark`]), `kept` what the caller keeps before its call (a
/// release's units included). `Some((owed, kept))` for a sender the store gave its
/// reservation back (the call is answered [`Grant::expired`], and owes `owed` again; it keeps
/// `kept` after, its jobs alone):
/// - one whose expiry is not yet told: [`revive`];
/// - one whose record says [`mark::TELL`]: it owes nothing more;
/// - one the counter does not remember that says it keeps leased or held units: a counter
///   forgets a sender only once its reservation is no longer live, so its units went back;
///   what it used after its last renewal and before it stopped (within the clock-skew bound
///   of its expiry) is not owed again (its record, which said how much went back, is gone).
#[must_use]
pub(crate) fn standing(own: Option<&Keeping>, mark: i64, kept: Kept) -> Option<(u64, Kept)> {
    let dropped = Kept { jobs: kept.jobs, ..Kept::default() };
    match own {
        Some(_) if mark == mark::TELL => Some((0, dropped)),
        Some(own) => revive(own, kept),
        None if kept.lease.saturating_add(kept.held) > 0 => Some((0, dropped)),
        None => None,
    }
}

/// The mark a call leaves on its sender's record: a sender answered expired by a call whose
/// answer it does not read (`answered` false: a release) is told by its next call.
#[must_use]
pub(crate) fn mark_after(expired: bool, answered: bool) -> i64 {
    match (expired, answered) {
        (true, false) => mark::TELL,
        (true, true) => mark::TOLD,
        (false, _) => mark::NONE,
    }
}

/// The units of `reserved` used, as a store knows: less what the senders keep (leases, holds,
/// jobs' reservations). Thresholds and alerts follow it, not `reserved`.
#[must_use]
pub(crate) fn used_of<'k>(reserved: u64, keepings: impl IntoIterator<Item = &'k Keeping>) -> u64 {
    let kept = keepings.into_iter().fold(0u64, |a, k| a.saturating_add(k.kept.total()));
    reserved.saturating_sub(kept)
}

/// What the senders keep together ([`QuotaCounter`]'s `leased`, `held`, `jobs`).
#[must_use]
pub(crate) fn kept_of<'k>(keepings: impl IntoIterator<Item = &'k Keeping>) -> Kept {
    keepings.into_iter().fold(Kept::default(), |a, k| Kept {
        lease: a.lease.saturating_add(k.kept.lease),
        held: a.held.saturating_add(k.kept.held),
        jobs: a.jobs.saturating_add(k.kept.jobs),
    })
}

/// The limit a call of `limit` (the plan's: `None` for a soft cap) is held to under the
/// tenant's own cap `stored`: a hard cap's limit, at most `max`; else (none, or a soft one) the
/// call's own. A soft cap of the tenant's never lifts a hard limit of the plan's (a tenant
/// moved to a plan with a hard cap is held to it), and a hard one never passes the maximum in
/// force (a tenant moved to a smaller plan is held to that plan's maximum).
#[must_use]
pub fn capped_limit(limit: Option<u64>, max: Option<u64>, stored: Option<SpendCap>) -> Option<u64> {
    match stored {
        Some(cap) if cap.hard => Some(max.map_or(cap.limit, |m| cap.limit.min(m))),
        _ => limit,
    }
}

/// What a [`Reservation`] does with the tenant's own cap on its meter ([`SpendCap`]): a mode
/// of [`QuotaStore::reserve`], as a balance's grants are of a prepaid key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CapMode {
    /// No cap is read: the call's `limit` holds it. Every counter but a spend cap's.
    #[default]
    Ignored,
    /// The cap stored for the key's tenant and meter, if there is one, holds the call (its
    /// limit and mode) in place of the call's `limit`; without one, the call's `limit` does.
    /// The answer's [`Grant::cap`] says which.
    Stored,
    /// Stores this cap for the key's tenant and meter (`None`: removes the one stored, and
    /// the call's `limit` holds again), then reserves as [`Stored`](Self::Stored) does.
    Set(Option<SpendCap>),
}

/// A quota counter as a store holds it ([`QuotaStore::counters`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuotaCounter {
    /// The counter.
    pub key: QuotaKey,
    /// Units reserved by every node together: leased (spent or not yet) and owed.
    pub reserved: u64,
    /// A prepaid balance's granted units (its limit); `None` for a calendar period.
    pub granted: Option<u64>,
    /// The tenant's own cap on the meter ([`SpendCap`]), if one is stored.
    pub cap: Option<SpendCap>,
    /// Of `reserved`, what the nodes keep and have not used, as their last calls said: in
    /// their leases, held by their requests' holds, held by their jobs' reservations.
    pub kept: Kept,
    /// On a prepaid balance's counter: the tenant's recharge of the meter, if it ever set one
    /// (a balance with no counter yet is listed with 0 units when a recharge is kept).
    pub recharge: Option<RechargeState>,
}

impl QuotaCounter {
    /// `key` holding `reserved`, with a prepaid balance's `granted`.
    #[must_use]
    pub fn new(key: QuotaKey, reserved: u64, granted: Option<u64>) -> Self {
        Self { key, reserved, granted, cap: None, kept: Kept::default(), recharge: None }
    }

    /// With what the nodes keep of it.
    #[must_use]
    pub fn keeping(mut self, kept: Kept) -> Self {
        self.kept = kept;
        self
    }

    /// The units used: reserved, less what the nodes keep.
    #[must_use]
    pub fn used(&self) -> u64 {
        self.reserved.saturating_sub(self.kept.total())
    }

    /// With the tenant's own cap on the meter.
    #[must_use]
    pub fn with_cap(mut self, cap: Option<SpendCap>) -> Self {
        self.cap = cap;
        self
    }

    /// With the tenant's recharge of the meter.
    #[must_use]
    pub fn with_recharge(mut self, recharge: Option<RechargeState>) -> Self {
        self.recharge = recharge;
        self
    }
}

/// The answer of a recharge written apart from its reserve (a store whose reserve is one
/// write and its recharge another), once the reserve went through: an error of a watch is
/// logged and answered [`RechargeSeen::Nothing`] (the reserve's units are the caller's; the
/// next watch tries again), an error of any other mode is the call's.
#[cfg_attr(not(any(feature = "postgres", feature = "dynamodb")), allow(dead_code))]
pub(crate) fn recharge_after(
    r: &Reservation,
    seen: Result<RechargeSeen, StoreError>,
) -> Result<RechargeSeen, StoreError> {
    match seen {
        Err(e) if matches!(r.recharge, RechargeMode::Watch { .. }) => {
            tracing::warn!(tenant = %r.key.tenant, meter = %r.key.meter, error = %e, "the balance's recharge could not be watched");
            Ok(RechargeSeen::Nothing)
        }
        seen => seen,
    }
}

/// Lists `state` (the tenant's recharge of the meter, if kept) on the prepaid balance's counter
/// among `counters` of `(tenant, meter)`, or beside them on a balance with no counter yet
/// (0 units granted). Every store's `counters` lists a recharge by this rule.
pub(crate) fn recharge_listed(
    counters: &mut Vec<QuotaCounter>,
    tenant: &crate::base::TenantId,
    meter: &crate::base::MeterId,
    state: Option<RechargeState>,
) {
    let Some(state) = state else { return };
    if let Some(c) = counters.iter_mut().find(|c| c.key.period == crate::base::Period::Prepaid) {
        c.recharge = Some(state);
        return;
    }
    let (start, end) = crate::base::Period::Prepaid.bounds(0);
    let key = QuotaKey::new(tenant.clone(), meter.clone(), crate::base::Period::Prepaid, start, end);
    counters.push(QuotaCounter::new(key, 0, Some(0)).with_recharge(Some(state)));
}

/// Near a hard limit a grant is at most `1 / SHRINK` of the units left.
pub const SHRINK: u64 = 8;

impl Reservation {
    /// A reservation of `units` of `key` under `limit`, owing `owed`.
    #[must_use]
    pub fn new(key: QuotaKey, units: u64, owed: u64, limit: Option<u64>, token: ReserveToken) -> Self {
        Self {
            key,
            units,
            owed,
            limit,
            token,
            at_least: units,
            cap: CapMode::Ignored,
            cap_max: None,
            kept: Kept::default(),
            expires_at: 0,
            taking: 0,
            recharge: RechargeMode::Ignored,
        }
    }

    /// The caller keeps `kept` besides this grant, its reservation expiring at `expires_at`.
    #[must_use]
    pub fn keeping(mut self, kept: Kept, expires_at: i64) -> Self {
        self.kept = kept;
        self.expires_at = expires_at;
        self
    }

    /// Of the grant, `units` are used at once by the caller (the request waiting on it).
    #[must_use]
    pub fn taking(mut self, units: u64) -> Self {
        self.taking = units;
        self
    }

    /// Held to (or setting) the tenant's own cap on the meter ([`CapMode`]).
    #[must_use]
    pub fn capped(mut self, cap: CapMode) -> Self {
        self.cap = cap;
        self
    }

    /// Reads or writes the tenant's recharge of the meter ([`RechargeMode`]).
    #[must_use]
    pub fn recharging(mut self, mode: RechargeMode) -> Self {
        self.recharge = mode;
        self
    }

    /// Held by a stored hard cap to at most `max` ([`cap_max`](Self::cap_max)).
    #[must_use]
    pub fn cap_within(mut self, max: u64) -> Self {
        self.cap_max = Some(max);
        self
    }

    /// The limit the call is held to once the store's cap for its tenant and meter (`stored`,
    /// after a [`CapMode::Set`]) is known, when the call reads it: [`capped_limit`]. Every
    /// store holds a call by this rule.
    #[must_use]
    pub fn limit_under(&self, stored: Option<SpendCap>) -> Option<u64> {
        match self.cap {
            CapMode::Ignored => self.limit,
            _ => capped_limit(self.limit, self.cap_max, stored),
        }
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
    /// For a call that read the tenant's own cap ([`CapMode::Stored`] or [`CapMode::Set`]):
    /// the cap stored, which held the call in place of its `limit`; `None` when none is
    /// stored (or the call read none).
    pub cap: Option<SpendCap>,
    /// Of `reserved`, the units used: less what every sender keeps (leases, holds, jobs'
    /// reservations) as its last call said.
    pub used: u64,
    /// The caller's earlier reservation of the counter expired before this call (the store
    /// gave back its lease and holds): it must drop what it keeps, its holds owed as used.
    pub expired: bool,
    /// For a call with a [`RechargeMode`]: what it saw of the tenant's recharge.
    pub recharge: RechargeSeen,
}

impl Grant {
    /// A grant of `granted` units, leaving `reserved` reserved in all (and as many used).
    #[must_use]
    pub fn new(granted: u64, reserved: u64) -> Self {
        Self {
            granted,
            reserved,
            limit: None,
            cap: None,
            used: reserved,
            expired: false,
            recharge: RechargeSeen::Nothing,
        }
    }

    /// Of the reserved, `used` used.
    #[must_use]
    pub fn with_used(mut self, used: u64) -> Self {
        self.used = used;
        self
    }

    /// The caller's earlier reservation had expired.
    #[must_use]
    pub fn with_expired(mut self, expired: bool) -> Self {
        self.expired = expired;
        self
    }

    /// Held to this cap of the tenant's ([`CapMode`]).
    #[must_use]
    pub fn with_cap(mut self, cap: Option<SpendCap>) -> Self {
        self.cap = cap;
        self
    }

    /// What the call saw of the tenant's recharge.
    #[must_use]
    pub fn with_recharge(mut self, seen: RechargeSeen) -> Self {
        self.recharge = seen;
        self
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
    /// [`refund_credits`](QuotaStore::refund_credits) last applied them (at most what the grant
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
    /// Units the balance lost with it, beside those counted used that left with it (units
    /// leased to nodes count as used): an expiry, what the grant still held (its units less
    /// those spent from it, soonest-to-expire first); a revoke, what the balance still held,
    /// up to the grant's units (the rest leave as used units).
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

/// Whether a call made at `at` by a sender a counter does not remember may have been applied
/// before the sender was forgotten: no later than `forgotten_at`, the latest last-call time of
/// a sender it forgot (0: none). Senders are forgotten only past
/// [`SENDER_QUIET_SECS`](super::contract::SENDER_QUIET_SECS) of quiet, so a new sender's first
/// call is never taken for one, unless its clock is that far behind. Such a call is answered
/// as an older call (nothing granted), never applied: a retry that comes after its sender
/// was forgotten is not applied twice. Every store answers by this rule.
#[must_use]
pub(crate) fn forgotten(at: i64, forgotten_at: i64) -> bool {
    forgotten_at > 0 && at <= forgotten_at
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

/// A refund of a payment that bought credits ([`QuotaStore::refund_credits`]), as Stripe holds
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

/// Applies `refund` to its grant among `grants` (open ones, of one tenant and meter) against
/// `balance`; `None` when it changes nothing (a redelivery, less refunded than before, a take
/// applied or given back before). A refund takes `units_for − taken`, at most what the grant
/// has: first from what the balance still holds, then from the units counted used, the last
/// used first, which leave it as a close's do ([`taking_unspent_first`]). A take apart
/// ([`Apart::Take`]) takes `units_for` by the same rule once per id and records it; its
/// reversal ([`Apart::GiveBack`]) adds back the unspent units it took (never past
/// [`MAX_BALANCE`](super::contract::MAX_BALANCE)), to the grant and the balance. Every store
/// refunds by this rule.
pub(crate) fn refund_against(
    grants: &[CreditGrant],
    refund: &CreditRefund,
    balance: CreditBalance,
) -> Result<RefundApplied, RefundOutcome> {
    let grant = grants.iter().find(|g| g.closed.is_none() && refund.is_of(g)).ok_or(RefundOutcome::Nothing)?;
    let mut now = grant.clone();
    let take = |units: u64| {
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
            let back = t.unspent.min(room).min(super::contract::MAX_BALANCE.saturating_sub(balance.granted));
            t.given_back = true;
            now.units += back;
            let after = CreditBalance { granted: balance.granted + back, ..balance };
            let used = UsedTaken { lo: balance.reserved, hi: balance.reserved };
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

/// The answer to [`QuotaStore::refund_credits`].
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

/// Where quota counters live: a conditional atomic add per call, so that the units leased by all
/// nodes never exceed a hard limit, applied at most once per [`ReserveToken`].
///
/// A counter of a [`Period::Prepaid`] key is a prepaid balance: its limit is the sum of the
/// tenant's open credit grants on the meter, held beside it (never the reservation's `limit`),
/// so a lease is checked against the balance in the same conditional write.
///
/// Every call says what its sender keeps of the counter ([`Kept`]: its lease's unused units,
/// its holds, its jobs' reservations) and until when ([`Reservation::expires_at`],
/// [`Release::expires_at`]); the store keeps it beside the sender's last call. In the same
/// write as each call, the reservations of other senders that expired give back their lease
/// and holds (`expire`), and a sender that calls after its own expired owes again what it
/// used since and is told to drop what it kept ([`Grant::expired`]); each answer says the
/// units used, less what every sender keeps ([`Grant::used`]). The rules are written once, in
/// this module; every store applies them.
#[async_trait]
pub trait QuotaStore: Send + Sync + fmt::Debug + 'static {
    /// Adds `owed` to the counter of `r.key`, then reserves up to `r.units` more for the
    /// caller: with `r.limit`, the total reserved by all callers never exceeds it through
    /// `units` (a hard quota); without, everything asked is granted.
    ///
    /// Applied at most once per [`ReserveToken`]: a call whose token's sequence number is not
    /// higher than the last one applied for that node and key changes nothing, and answers
    /// the grant of the call applied with that token if it is the same one.
    ///
    /// With [`CapMode::Stored`], the tenant's own cap on the meter, when one is stored, holds
    /// the call in place of `r.limit` ([`Reservation::limit_under`]); [`CapMode::Set`] stores
    /// (or removes) that cap first, whether or not the token was seen (a write that is the
    /// same when sent again). The answer carries the cap ([`Grant::cap`]). SQLite, PostgreSQL
    /// and the memory store read the cap in the counter's own atomic write; DynamoDB reads it
    /// just before its conditional write, so a reserve racing a change of the cap may be held
    /// to the cap as it was, as a lease taken just before the change is.
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError>;

    /// Gives back, for each of `releases`, `units` reserved earlier and not used, recording
    /// what its sender keeps after them; each at most once per token, as
    /// [`reserve`](Self::reserve). A prepaid balance's release draws first on the units
    /// forgiven to this node for the lease it gives back ([`CreditBalance::forgiven`], at the
    /// token's time). A batch (leases returned at shutdown, reload or eviction; reports of
    /// what senders keep) is written in as few round trips as the store allows (one
    /// transaction, or DynamoDB's transactions of 100); the answer has one result per
    /// release, in order: one that fails (its counter written by another meanwhile, past
    /// retries) does not stop the others, and its sender sends it again alone.
    async fn release(&self, releases: &[Release]) -> Vec<Result<(), StoreError>>;

    /// Adds a grant of prepaid units: its units join the balance of `(grant.tenant,
    /// grant.meter)` in the same write that records the grant, once per grant id and once per
    /// payment: a grant whose id, or whose [`payment`](CreditGrant::payment), another grant of
    /// the tenant has (on any meter) is a [`GrantOutcome::Duplicate`] and adds nothing.
    ///
    /// A refund of its payment (or invoice) kept by [`refund_credits`](Self::refund_credits)
    /// is applied in the same write, and forgotten: the grant lands with those units taken
    /// back.
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
    /// `now` (the worker's expiry). Its units leave the balance: an expiry loses what the grant
    /// still holds when units used are taken from the soonest-to-expire grants first; a revoke
    /// takes what the balance still holds first, as a refund does. Its units counted used that
    /// nodes' last leases hold are forgiven ([`CreditBalance::forgiven`]); its closure is returned,
    /// or `None` if there is no such open grant (or it has not expired).
    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError>;

    /// Applies a refund of the payment that bought a grant, in the grant's write: the units
    /// [`CreditRefund::units_for`] says, less those the grant's refunds took already
    /// ([`taken`](CreditGrant::taken), which it then records), first from what the grant still
    /// holds, then from its units counted used (see `refund_against`'s rule in
    /// [`CreditRefund`]). The grant is the open grant of any tenant whose payment, or id, is
    /// the refund's payment, or whose id is its invoice.
    ///
    /// Without such a grant (Stripe delivers a refund before a grant that is still being
    /// retried), the refund is kept by its payment and invoice, the newer of two copies
    /// winning, and [`grant_credits`](Self::grant_credits) applies it in the grant's own write:
    /// [`RefundOutcome::Kept`], or [`RefundOutcome::Full`] past
    /// [`REFUNDS_KEPT_MAX`](super::contract::REFUNDS_KEPT_MAX) kept refunds. Whether the grant
    /// exists and the keeping are one atomic step, so a grant landing meanwhile is never missed.
    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError>;

    /// Open grants expired by `now`, of every tenant, up to `limit`: for the worker to close.
    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError>;

    /// The counters of `tenant` on `meter` the store holds (the periods still of use, a
    /// prepaid balance among them), by period start: for reading (`tollgate quota show`), never
    /// on the request path. What a counter holds includes the units leased to nodes and not
    /// used yet: once every node has given its leases back (stopped), it is what was used.
    async fn counters(&self, tenant: &TenantId, meter: &MeterId) -> Result<Vec<QuotaCounter>, StoreError>;
}
