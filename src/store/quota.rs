//! The quota role: counters of reserved units per (tenant, meter, period), reserved and released
//! in leases by every node.

use std::fmt;

use async_trait::async_trait;

pub use super::credits::*;
use super::{RechargeMode, RechargeSeen, RechargeState, StoreError};
pub use crate::base::SpendCap;
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

    /// A store's first call on this counter drops the counters of the meter's calendar periods
    /// that ended before this (its start less
    /// [`ENDED_PERIODS_KEPT_SECS`](super::contract::ENDED_PERIODS_KEPT_SECS)), and answers later
    /// calls on them as on a period long over; a prepaid balance drops none.
    #[must_use]
    pub fn drops_ended_before(&self) -> i64 {
        if self.period == Period::Prepaid {
            return i64::MIN;
        }
        self.start - super::contract::ENDED_PERIODS_KEPT_SECS
    }

    /// The counter of `tenant` on `meter` named by a period's tag ([`period_tag`](Self::period_tag))
    /// and bounds, as a store keeps it; `None` for a tag no period has.
    #[must_use]
    pub fn from_tag(tenant: TenantId, meter: MeterId, tag: &str, start: i64, end: i64) -> Option<Self> {
        let period = match tag {
            "minute" => Period::Minute,
            "day" => Period::Day,
            "prepaid" => Period::Prepaid,
            _ => {
                let day: u8 = tag.strip_prefix("month@")?.parse().ok()?;
                Period::Month { anchor_day: day }
            }
        };
        Some(Self::new(tenant, meter, period, start, end))
    }

    /// The period's kind as a short stable text: `minute`, `day`, or `month@D` for a month anchored on day D.
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
    /// A store that keeps time by its own clock (the RedisStore) moves it, and the token's
    /// time, by how far its clock is ahead of the caller's.
    pub expires_at: i64,
    /// Of the units granted, how many the caller uses at once (the request waiting on the
    /// call): they are used, not kept in its lease.
    pub taking: u64,
    /// What the call does with the tenant's recharge of the meter ([`RechargeMode`], on a
    /// [`Period::Prepaid`] key only): the answer's [`Grant::recharge`] says what it saw.
    pub recharge: RechargeMode,
    /// When the caller sends it (Unix seconds, its clock; the token's time unless
    /// [`sent_at`](Self::sent_at) says otherwise): a call sent again keeps its token, made
    /// earlier. A store that keeps time by its own clock (the RedisStore) moves the call's
    /// times by how far its clock is ahead of this.
    pub sent: i64,
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
    /// When the caller sends it ([`Reservation::sent`]).
    pub sent: i64,
}

impl Release {
    /// `units` of `key` given back with `token`, the caller keeping nothing after them and its
    /// reservation never expiring.
    #[must_use]
    pub fn new(key: QuotaKey, units: u64, token: ReserveToken) -> Self {
        Self { key, units, token, kept: Kept::default(), expires_at: 0, sent: token.at }
    }

    /// Sent at `secs` ([`Reservation::sent_at`]).
    #[must_use]
    pub fn sent_at(mut self, secs: i64) -> Self {
        self.sent = secs;
        self
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
    /// When it expires (Unix seconds, by the clock the store applies calls at: the sender's,
    /// or the store's own; 0: never).
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
            sent: token.at,
        }
    }

    /// Sent at `secs` (Unix seconds, the caller's clock): a call sent again, its token made
    /// earlier.
    #[must_use]
    pub fn sent_at(mut self, secs: i64) -> Self {
        self.sent = secs;
        self
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

/// Whether a call made at `at` by a sender a counter does not remember may have been applied
/// before the sender was forgotten: no later than `forgotten_at`, the latest last-call time of
/// a sender it forgot (0: none), with [`FORGOTTEN_SLACK_SECS`](super::contract::FORGOTTEN_SLACK_SECS)
/// of slack. Senders are forgotten only past
/// [`SENDER_QUIET_SECS`](super::contract::SENDER_QUIET_SECS) of quiet, so a new sender's first
/// call is never taken for one, unless its clock is that far behind. Such a call is answered
/// as an older call (nothing granted), never applied: a retry that comes after its sender
/// was forgotten is not applied twice. Every store answers by this rule.
#[must_use]
pub(crate) fn forgotten(at: i64, forgotten_at: i64) -> bool {
    forgotten_at > 0 && at <= forgotten_at.saturating_add(super::contract::FORGOTTEN_SLACK_SECS)
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

    /// Applies `call` in `mode` to the tenant's values of an open dimension in a period
    /// ([`ValueRow::apply`](super::ValueRow::apply)), in one atomic read-modify-write of its
    /// row: the values held after it. The row never holds more than the call's cap, whatever
    /// calls race it; a store drops it after its `keep_until`.
    async fn values(&self, call: &super::ValueCall, mode: super::ValueMode) -> Result<super::HeldValues, StoreError>;

    /// Applies `call` at `now` (Unix seconds) to the tenant's payments row
    /// ([`PaymentRow::apply`](super::PaymentRow::apply)) in one atomic read-modify-write, or
    /// reads it: what the call did, and where the tenant stands after it (what it has paid,
    /// net, and since when). A payment counts once per id whatever calls race it; the row is
    /// written only when it changed, and is never dropped (it is bounded by its rules).
    async fn payments(&self, call: &super::PaymentCall, now: i64) -> Result<super::PaymentAnswer, StoreError>;
}
