//! A tenant's quota state as one value, and the quota role's rules applied to it: every meter's
//! counters (one per period still of use, each with its senders' last calls), the tenant's own
//! caps, its recharges and its credit grants. The rules themselves are those of
//! [`quota`](super::quota); this is how a store that keeps a tenant's quota whole applies them:
//! the [`MemoryStore`](super::MemoryStore) keeps one per tenant in a map, under its lock; the
//! [`RedisStore`](super::RedisStore) keeps one per tenant as a row, read, changed here, and
//! written back under a compare-and-set of its version.
//!
//! What concerns several tenants (a refund that arrives before its grant, the grants due to
//! expire) stays with each store.

use std::collections::{BTreeMap, HashMap};

use super::{
    contract::{OPEN_GRANTS_MAX, SENDERS_KEPT, SENDER_QUIET_SECS},
    quota::{
        close_against, close_used_up, expire, expire_against, fits, forgive, forgotten, kept_of, mark, mark_after,
        release_against, standing, used_of, CreditRefund, ForgivenBy, Keeping, SenderCall,
    },
    CapMode, CreditBalance, CreditClosure, CreditGrant, Grant, GrantOutcome, Kept, QuotaCounter, QuotaKey,
    RechargeMode, RechargeState, RefundOutcome, Release, Reservation, ReserveToken,
};
use crate::base::{MeterId, Period, SpendCap, TenantId};

/// A tenant's quota: its meters' state.
#[derive(Debug, Default)]
pub(crate) struct TenantQuota {
    meters: BTreeMap<MeterId, MeterQuota>,
}

/// One meter's quota state of a tenant.
#[derive(Debug, Default)]
struct MeterQuota {
    counters: Counters,
    /// The tenant's own cap on the meter (a spend cap), if it set one.
    cap: Option<SpendCap>,
    /// The tenant's recharge of its prepaid balance, if it ever set one.
    recharge: Option<RechargeState>,
    /// Its credit grants, open and recently closed.
    credits: Vec<CreditGrant>,
    /// The calendar periods a store keeps in rows of their own (the RedisStore), each counter
    /// beside the tenant's quota rather than in it: their keys, so that a new period drops
    /// those that ended before it as `Counters::get` does. Empty for a store that keeps the
    /// counters here.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    listed: Vec<QuotaKey>,
}

/// The counters of one (tenant, meter): a few periods at most (the current one, the one
/// before, and another kind of period after a plan change; of minutes, the current one and
/// the eleven that ended within the last 10 minutes of its start).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) periods: Vec<Counter>,
    /// Periods that ended before this have been dropped: calls for them change nothing.
    dropped_before: i64,
}

/// A sender's last call applied to a counter: its sequence number, its grant, its time (the
/// latest of its calls), and the reservation it keeps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sender {
    seq: u64,
    grant: Grant,
    at: i64,
    keeping: Keeping,
    /// What its record says of its next call (`store::quota::mark`).
    mark: i64,
}

#[derive(Debug)]
pub(crate) struct Counter {
    key: QuotaKey,
    pub(crate) reserved: u64,
    /// A prepaid balance's granted units (its limit); `None` for a calendar period.
    granted: Option<u64>,
    /// Per node: its last call applied.
    pub(crate) applied: HashMap<u64, Sender>,
    /// A prepaid balance's forgiven units, per sender, and until when they hold.
    forgiven: u64,
    forgiven_until: i64,
    forgiven_by: ForgivenBy,
    /// The latest last-call time of a sender forgotten (0: none): a call from a sender not
    /// remembered that is no later may have been applied before it was forgotten.
    forgotten_at: i64,
}

/// The key of `(tenant, meter)`'s prepaid balance.
fn prepaid(tenant: &TenantId, meter: &MeterId) -> QuotaKey {
    let (start, end) = Period::Prepaid.bounds(0);
    QuotaKey::new(tenant.clone(), meter.clone(), Period::Prepaid, start, end)
}

impl Counters {
    /// The counter of `key`, created if its period is still of use; drops the periods that
    /// ended before `key`'s started.
    fn get(&mut self, key: &QuotaKey) -> Option<&mut Counter> {
        if key.end <= self.dropped_before {
            return None;
        }
        if let Some(i) = self.periods.iter().position(|c| c.key == *key) {
            return Some(&mut self.periods[i]);
        }
        // A prepaid balance ends nothing: the calendar periods beside it stay.
        let start = key.drops_ended_before();
        let mut dropped = self.dropped_before;
        self.periods.retain(|c| {
            let keep = c.key.end >= start;
            if !keep {
                dropped = dropped.max(c.key.end);
            }
            keep
        });
        self.dropped_before = dropped;
        let granted = (key.period == Period::Prepaid).then_some(0);
        self.periods.push(Counter {
            key: key.clone(),
            reserved: 0,
            granted,
            applied: HashMap::new(),
            forgiven: 0,
            forgiven_until: 0,
            forgiven_by: ForgivenBy::default(),
            forgotten_at: 0,
        });
        self.periods.last_mut()
    }

    fn find(&self, key: &QuotaKey) -> Option<&Counter> {
        self.periods.iter().find(|c| c.key == *key)
    }
}

impl Counter {
    /// Its senders' last calls, as [`forgive`] reads them.
    fn sender_calls(&self) -> Vec<SenderCall> {
        self.applied.iter().map(|(node, c)| (node.to_string(), c.seq, c.grant.granted, c.grant.reserved)).collect()
    }

    /// Its balance, as the credit rules read it.
    fn balance(&self) -> CreditBalance {
        CreditBalance::new(self.granted.unwrap_or(0), self.reserved).forgiving(self.forgiven, self.forgiven_until)
    }

    /// Sets its balance after a close or a refund, what it forgives to each sender with it.
    fn set_balance(&mut self, before: CreditBalance, after: CreditBalance, used: super::quota::UsedTaken, now: i64) {
        let (after, by) =
            forgive(before, after, std::mem::take(&mut self.forgiven_by), used, &self.sender_calls(), now);
        self.forgiven_by = by;
        self.granted = Some(after.granted);
        self.reserved = after.reserved;
        self.forgiven = after.forgiven;
        self.forgiven_until = after.forgiven_until;
    }

    /// The reservations of other senders expired at `now` give back their lease and holds
    /// (`store::quota::expire`); the call from `token` then, if the store gave its own back,
    /// owes what it used since (`store::quota::standing`). What the caller keeps before its
    /// call, and whether its reservation had been given back.
    fn expire_for(&mut self, token: ReserveToken, kept: Kept) -> (Kept, bool) {
        if self.granted.is_some() {
            // A prepaid balance: each expiry draws first on what is forgiven to its sender.
            let senders = self.applied.iter_mut().map(|(n, c)| (n.to_string(), c.seq, &mut c.keeping));
            let held = (self.reserved, self.forgiven, self.forgiven_until);
            (self.reserved, self.forgiven) = expire_against(senders, token.at, held, &mut self.forgiven_by);
        } else {
            let back = expire(self.applied.values_mut().map(|c| &mut c.keeping), token.at);
            self.reserved = self.reserved.saturating_sub(back);
        }
        let own = self.applied.get(&token.node);
        let mark = own.map_or(mark::NONE, |c| c.mark);
        match standing(own.map(|c| &c.keeping), mark, kept) {
            Some((owed, kept)) => {
                self.reserved = self.reserved.saturating_add(owed);
                (kept, true)
            }
            None => (kept, false),
        }
    }

    /// What every sender keeps, and the units used.
    fn used(&self) -> u64 {
        used_of(self.reserved, self.applied.values().map(|c| &c.keeping))
    }

    /// Records the answer to `token`'s call and the reservation its sender keeps, forgetting
    /// the senders past [`SENDERS_KEPT`] by the time of their last call, never one within
    /// [`SENDER_QUIET_SECS`] of this call nor one whose reservation is live (it expires first).
    fn applied(&mut self, token: ReserveToken, grant: Grant, keeping: Keeping, mark: i64) {
        let at = self.applied.get(&token.node).map_or(token.at, |c| token.at.max(c.at));
        self.applied.insert(token.node, Sender { seq: token.seq, grant, at, keeping, mark });
        let quiet_since = token.at.saturating_sub(SENDER_QUIET_SECS);
        while self.applied.len() > SENDERS_KEPT {
            let oldest = self
                .applied
                .iter()
                .filter(|(_, c)| c.at < quiet_since && !c.keeping.unforgettable(c.at, token.at))
                .min_by_key(|(n, c)| (c.at, **n));
            let Some(oldest) = oldest.map(|(n, _)| *n) else { break };
            if let Some(c) = self.applied.remove(&oldest) {
                self.forgotten_at = self.forgotten_at.max(c.at);
            }
        }
    }

    /// Whether a call with `token` was applied already; `Some(grant)` answers it again. A
    /// call from a sender no longer remembered, no later than the last call of a sender
    /// forgotten, may have been applied: it is answered as an older call, never applied.
    fn seen(&self, token: ReserveToken) -> Option<Grant> {
        match self.applied.get(&token.node) {
            Some(c) if token.seq <= c.seq => Some(if token.seq == c.seq {
                c.grant
            } else {
                Grant::new(0, self.reserved).with_limit(self.granted).with_used(self.used())
            }),
            None if forgotten(token.at, self.forgotten_at) => {
                Some(Grant::new(0, self.reserved).with_limit(self.granted).with_used(self.used()))
            }
            _ => None,
        }
    }
}

impl TenantQuota {
    fn meter(&mut self, meter: &MeterId) -> &mut MeterQuota {
        self.meters.entry(meter.clone()).or_default()
    }

    /// [`QuotaStore::reserve`](super::QuotaStore::reserve), the tenant's cap and recharge read
    /// and written in the same step.
    pub(crate) fn reserve(&mut self, r: &Reservation) -> Grant {
        let m = self.meter(&r.key.meter);
        // The tenant's own cap, set first in the same step.
        let cap = match r.cap {
            CapMode::Ignored => None,
            CapMode::Stored => m.cap,
            CapMode::Set(cap) => {
                m.cap = cap;
                cap
            }
        };
        let grant = m.reserve_counter(r, cap);
        if r.recharge == RechargeMode::Ignored {
            return grant;
        }
        // The tenant's recharge checks the balance the reserve left.
        let key = prepaid(&r.key.tenant, &r.key.meter);
        let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let balance =
            m.counters.find(&key).and_then(|c| c.granted.map(|g| signed(g).saturating_sub(signed(c.reserved))));
        let state = m.recharge.get_or_insert_with(RechargeState::default);
        grant.with_recharge(state.apply(r.recharge.clone(), balance))
    }

    /// One release of [`QuotaStore::release`](super::QuotaStore::release).
    pub(crate) fn release(&mut self, r: &Release) {
        let token = r.token;
        let Some(c) = self.meter(&r.key.meter).counters.get(&r.key) else { return };
        if c.seen(token).is_some() {
            return;
        }
        // What it kept before the release: what it keeps after, and what it gives back.
        let before = Kept { lease: r.kept.lease.saturating_add(r.units), ..r.kept };
        let (dropped, expired) = c.expire_for(token, before);
        let kept = if expired { dropped } else { r.kept };
        if expired {
            // Given back at its expiry already: not again.
        } else if c.granted.is_some() {
            // A prepaid balance draws on its forgiven units first.
            let last = c.applied.get(&token.node).map(|s| s.seq);
            (c.reserved, c.forgiven) = release_against(
                c.reserved,
                c.forgiven,
                c.forgiven_until,
                &mut c.forgiven_by,
                (&token.node.to_string(), last),
                r.units,
                token.at,
            );
        } else {
            c.reserved = c.reserved.saturating_sub(r.units);
        }
        let keeping = Keeping::after(kept, 0, 0, r.expires_at);
        let grant = Grant::new(0, c.reserved).with_limit(c.granted).with_expired(expired);
        c.applied(token, grant, keeping, mark_after(expired, false));
        let used = c.used();
        if let Some(s) = c.applied.get_mut(&token.node) {
            s.grant = grant.with_used(used);
        }
    }

    /// A grant of the tenant under `grant`'s id or payment, on any meter.
    pub(crate) fn granted_before(&self, grant: &CreditGrant) -> Option<&CreditGrant> {
        let same = |g: &&CreditGrant| g.id == grant.id || (g.payment.is_some() && g.payment == grant.payment);
        let own = self.meters.get(&grant.meter).and_then(|m| m.credits.iter().find(same));
        own.or_else(|| self.meters.values().flat_map(|m| &m.credits).find(same))
    }

    /// [`QuotaStore::grant_credits`](super::QuotaStore::grant_credits), with `kept`, a refund
    /// of its payment that came first, applied in the same step.
    pub(crate) fn grant(&mut self, grant: &CreditGrant, kept: Option<&CreditRefund>) -> GrantOutcome {
        if let Some(seen) = self.granted_before(grant) {
            return GrantOutcome::Duplicate(seen.clone());
        }
        let m = self.meter(&grant.meter);
        let key = prepaid(&grant.tenant, &grant.meter);
        if m.credits.iter().filter(|g| g.closed.is_none()).count() >= OPEN_GRANTS_MAX {
            // Used-up grants close first, losing nothing, to make room.
            m.close_used_up(&key, grant.granted_at);
            if m.credits.iter().filter(|g| g.closed.is_none()).count() >= OPEN_GRANTS_MAX {
                return GrantOutcome::TooMany;
            }
        }
        let c = m.counters.get(&key).expect("the prepaid period never ends");
        if !fits(c.granted.unwrap_or(0), grant.units) {
            return GrantOutcome::TooLarge;
        }
        c.granted = Some(c.granted.unwrap_or(0) + grant.units);
        let mut stored = grant.clone();
        stored.closed = None;
        stored.bought = grant.units;
        stored.taken = 0;
        stored.refunded = 0;
        stored.duplicate = false;
        m.credits.push(stored);
        if let Some(refund) = kept {
            let _ = m.refund(&key, &refund.landing(grant));
        }
        let c = m.counters.find(&key).expect("made above");
        GrantOutcome::Granted(CreditBalance::new(c.granted.unwrap_or(0), c.reserved))
    }

    /// [`QuotaStore::credit_grants`](super::QuotaStore::credit_grants) of this tenant.
    pub(crate) fn grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> (Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>) {
        let mut grants = Vec::new();
        let mut balances = Vec::new();
        for (m, q) in &self.meters {
            if meter.is_some_and(|x| x != m) || q.credits.is_empty() {
                continue;
            }
            let mut list = q.credits.clone();
            list.sort_by(|a, b| a.spending_order().cmp(&b.spending_order()));
            grants.extend(list);
            let balance = q
                .counters
                .find(&prepaid(tenant, m))
                .map_or_else(CreditBalance::default, |c| CreditBalance::new(c.granted.unwrap_or(0), c.reserved));
            balances.push((m.clone(), balance));
        }
        (grants, balances)
    }

    /// [`QuotaStore::close_credits`](super::QuotaStore::close_credits).
    pub(crate) fn close(
        &mut self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Option<CreditClosure> {
        let m = self.meters.get_mut(meter)?;
        let grant = m.credits.iter().find(|g| g.id == id && g.closed.is_none())?;
        if !revoke && grant.expires_at.is_none_or(|at| at > now) {
            return None;
        }
        let key = prepaid(tenant, meter);
        let c = m.counters.get(&key).expect("the prepaid period never ends");
        let balance = c.balance();
        let (lost, after, used) = close_against(&m.credits, id, balance, revoke)?;
        c.set_balance(balance, after, used, now);
        let closure = CreditClosure { at: now, revoked: revoke, lost };
        if let Some(g) = m.credits.iter_mut().find(|g| g.id == id) {
            g.closed = Some(closure);
        }
        // Closed grants are kept a while (their ids, for duplicates), then dropped.
        m.credits.retain(|g| g.kept_until().is_none_or(|until| until > now));
        Some(closure)
    }

    /// Applies `refund` to the tenant's open grant of its payment: what it came to, or `None`
    /// when the tenant has no open grant of it.
    pub(crate) fn refund(&mut self, refund: &CreditRefund) -> Option<RefundOutcome> {
        // Its open grant, else a closed one it still reaches.
        let found = |of: &dyn Fn(&CreditGrant) -> bool| {
            self.meters
                .iter()
                .find_map(|(meter, m)| m.credits.iter().find(|g| of(g)).map(|g| (meter.clone(), g.tenant.clone())))
        };
        let (meter, tenant) = found(&|g| g.closed.is_none() && refund.is_of(g))
            .or_else(|| found(&|g| g.refundable() && refund.is_of(g)))?;
        let key = prepaid(&tenant, &meter);
        let m = self.meters.get_mut(&meter).expect("found above");
        Some(m.refund(&key, refund).unwrap_or_else(|outcome| outcome))
    }

    /// Whether the tenant has a grant of `refund`'s payment, open or closed.
    pub(crate) fn has_grant_of(&self, refund: &CreditRefund) -> bool {
        self.meters.values().flat_map(|m| &m.credits).any(|g| refund.is_of(g))
    }

    /// Whether it holds nothing at all (a tenant never reserved, granted nor capped).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn is_empty(&self) -> bool {
        self.meters.is_empty()
    }

    /// [`QuotaStore::counters`](super::QuotaStore::counters) of this tenant.
    pub(crate) fn counters(&self, tenant: &TenantId, meter: &MeterId) -> Vec<QuotaCounter> {
        let Some(m) = self.meters.get(meter) else {
            return Vec::new();
        };
        let mut out: Vec<QuotaCounter> = m
            .counters
            .periods
            .iter()
            .map(|p| {
                QuotaCounter::new(p.key.clone(), p.reserved, p.granted)
                    .with_cap(m.cap)
                    .keeping(kept_of(p.applied.values().map(|c| &c.keeping)))
            })
            .collect();
        out.sort_by_key(|c| c.key.start);
        super::quota::recharge_listed(&mut out, tenant, meter, m.recharge.clone());
        out
    }

    /// The open grants expired at `now`.
    pub(crate) fn expired(&self, now: i64) -> impl Iterator<Item = &CreditGrant> + '_ {
        self.meters
            .values()
            .flat_map(|m| &m.credits)
            .filter(move |g| g.closed.is_none() && g.expires_at.is_some_and(|at| at <= now))
    }

    /// Units reserved of `key`.
    #[cfg(any(test, feature = "test-util"))]
    pub(crate) fn reserved(&self, key: &QuotaKey) -> u64 {
        self.meters.get(&key.meter).and_then(|m| m.counters.find(key)).map_or(0, |c| c.reserved)
    }

    /// Whether anything of `key`'s counter (or balance) is held: units reserved, a sender's
    /// call, a grant; or its period was dropped (a later one made: calls on it change
    /// nothing). A caller that keeps units of it and finds none of this finds it lost.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn holds(&self, key: &QuotaKey) -> bool {
        let Some(m) = self.meters.get(&key.meter) else { return false };
        let counter =
            m.counters.find(key).is_some_and(|c| c.reserved > 0 || !c.applied.is_empty() || c.granted.is_some());
        let dropped = key.period != Period::Prepaid && key.end <= m.counters.dropped_before;
        counter || dropped || (key.period == Period::Prepaid && !m.credits.is_empty())
    }

    /// The counters of `meter` (tests).
    #[cfg(test)]
    pub(crate) fn counters_of(&self, meter: &MeterId) -> &Counters {
        &self.meters[meter].counters
    }
}

impl MeterQuota {
    /// A reserve of one counter, held to `cap` when it is the tenant's.
    fn reserve_counter(&mut self, r: &Reservation, cap: Option<SpendCap>) -> Grant {
        let Some(c) = self.counters.get(&r.key) else {
            // A late call for a period long over: nothing is left to reserve in it.
            return Grant::new(0, 0).with_cap(cap);
        };
        if let Some(grant) = c.seen(r.token) {
            return grant.with_cap(cap);
        }
        let (kept, expired) = c.expire_for(r.token, r.kept);
        c.reserved = c.reserved.saturating_add(r.owed);
        // A prepaid balance is held to its grants, whatever the caller says; a spend cap to
        // the tenant's own cap when it set one.
        let granted = match c.granted.or(r.limit_under(cap)) {
            Some(limit) => r.grant_for(limit.saturating_sub(c.reserved)),
            None => r.units,
        };
        c.reserved = c.reserved.saturating_add(granted);
        let keeping = Keeping::after(kept, granted, r.taking, r.expires_at);
        let mut grant = Grant::new(granted, c.reserved).with_limit(c.granted).with_expired(expired);
        c.applied(r.token, grant, keeping, mark_after(expired, true));
        grant = grant.with_used(c.used());
        if let Some(s) = c.applied.get_mut(&r.token.node) {
            s.grant = grant;
        }
        grant.with_cap(cap)
    }

    /// Applies `refund` to its open grant of the balance `key` (`Err`: the answer when it
    /// changes nothing).
    /// Closes the used-up grants of the balance `key` at `now` (`store::quota::close_used_up`).
    fn close_used_up(&mut self, key: &QuotaKey, now: i64) {
        let Some(c) = self.counters.get(key) else { return };
        let kept = kept_of(c.applied.values().map(|s| &s.keeping)).total();
        let (ids, after) = close_used_up(&self.credits, c.balance(), kept);
        // The units left the bottom of the used total: each sender's last call is that much
        // lower in it now (so a later close or refund finds its lease where it is).
        let closed = c.reserved - after.reserved;
        for sender in c.applied.values_mut() {
            let g = &mut sender.grant;
            g.reserved = g.reserved.saturating_sub(closed);
            g.limit = g.limit.map(|l| l.saturating_sub(closed));
            g.used = g.used.saturating_sub(closed);
        }
        (c.granted, c.reserved) = (Some(after.granted), after.reserved);
        let ids: std::collections::HashSet<String> = ids.into_iter().collect();
        for g in self.credits.iter_mut().filter(|g| g.closed.is_none() && ids.contains(&g.id)) {
            g.closed = Some(CreditClosure { at: now, revoked: false, lost: 0 });
        }
        // Closed grants kept long enough are dropped.
        self.credits.retain(|g| g.kept_until().is_none_or(|until| until > now));
    }

    fn refund(&mut self, key: &QuotaKey, refund: &CreditRefund) -> Result<RefundOutcome, RefundOutcome> {
        let grants: Vec<CreditGrant> = self.credits.iter().filter(|g| g.refundable()).cloned().collect();
        let c = self.counters.get(key).ok_or(RefundOutcome::Nothing)?;
        let balance = c.balance();
        let applied = super::quota::refund_against(&grants, refund, balance)?;
        c.set_balance(balance, applied.after, applied.used, refund.at);
        let g = self.credits.iter_mut().find(|g| g.id == applied.grant.id).expect("found by refund_against");
        *g = applied.grant.clone();
        Ok(applied.outcome())
    }
}

#[cfg(feature = "redis")]
pub(crate) use stored::Roll;

/// A tenant's quota as a store writes it down: JSON, short field names (it is read and written
/// whole at each call).
#[cfg(feature = "redis")]
mod stored {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::store::quota::{takes_json, takes_of};

    #[derive(Serialize, Deserialize)]
    struct TenantForm {
        m: BTreeMap<String, MeterForm>,
    }

    #[derive(Serialize, Deserialize)]
    struct MeterForm {
        p: Vec<CounterForm>,
        d: i64,
        c: Option<(u64, bool)>,
        r: Option<RechargeState>,
        g: Vec<GrantForm>,
        /// The calendar periods kept in rows of their own: tag, start, end.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        l: Vec<(String, i64, i64)>,
    }

    #[derive(Serialize, Deserialize)]
    struct CounterForm {
        /// Period tag, start, end.
        k: (String, i64, i64),
        r: u64,
        g: Option<u64>,
        a: Vec<SenderForm>,
        f: (u64, i64, i64),
        fb: ForgivenBy,
    }

    #[derive(Serialize, Deserialize)]
    struct SenderForm {
        /// Node, seq, at, mark.
        n: (u64, u64, i64, i64),
        /// Granted, reserved, limit, used, expired.
        g: (u64, u64, Option<u64>, u64, bool),
        /// Lease, held, jobs, expires at, gone.
        k: (u64, u64, u64, i64, u64),
    }

    #[derive(Serialize, Deserialize)]
    struct GrantForm {
        id: String,
        /// Units, bought, taken, refunded.
        u: (u64, u64, u64, u64),
        /// Granted at, expires at.
        t: (i64, Option<i64>),
        p: Option<String>,
        pd: Option<u64>,
        dup: bool,
        tk: String,
        /// Closed: at, revoked, lost.
        c: Option<(i64, bool, u64)>,
    }

    impl TenantQuota {
        /// Written down.
        pub(crate) fn to_json(&self) -> String {
            let m = self
                .meters
                .iter()
                .map(|(meter, q)| {
                    let p = q.counters.periods.iter().map(counter_form).collect();
                    let g = q
                        .credits
                        .iter()
                        .map(|g| GrantForm {
                            id: g.id.clone(),
                            u: (g.units, g.bought, g.taken, g.refunded),
                            t: (g.granted_at, g.expires_at),
                            p: g.payment.clone(),
                            pd: g.paid,
                            dup: g.duplicate,
                            tk: takes_json(&g.takes),
                            c: g.closed.map(|c| (c.at, c.revoked, c.lost)),
                        })
                        .collect();
                    let mut l: Vec<(String, i64, i64)> =
                        q.listed.iter().map(|k| (k.period_tag(), k.start, k.end)).collect();
                    l.sort();
                    let form = MeterForm {
                        p,
                        d: q.counters.dropped_before,
                        c: q.cap.map(|c| (c.limit, c.hard)),
                        r: q.recharge.clone(),
                        g,
                        l,
                    };
                    (meter.as_str().to_owned(), form)
                })
                .collect();
            serde_json::to_string(&TenantForm { m }).expect("plain data")
        }

        /// Read back from [`to_json`](Self::to_json) for `tenant`.
        ///
        /// # Errors
        /// Not what `to_json` writes.
        pub(crate) fn from_json(tenant: &TenantId, json: &str) -> Result<Self, String> {
            let form: TenantForm = serde_json::from_str(json).map_err(|e| e.to_string())?;
            let mut meters = BTreeMap::new();
            for (meter, q) in form.m {
                let meter = MeterId::from(meter.as_str());
                let mut periods = Vec::with_capacity(q.p.len());
                for c in q.p {
                    periods.push(counter_of(tenant, &meter, c)?);
                }
                let credits =
                    q.g.into_iter()
                        .map(|g| {
                            let mut grant = CreditGrant::new(tenant.clone(), meter.clone(), g.id, g.u.0, g.t.0);
                            grant.expires_at = g.t.1;
                            grant.payment = g.p;
                            grant.paid = g.pd;
                            (grant.bought, grant.taken, grant.refunded) = (g.u.1, g.u.2, g.u.3);
                            grant.duplicate = g.dup;
                            grant.takes = takes_of(&g.tk);
                            grant.closed = g.c.map(|(at, revoked, lost)| CreditClosure { at, revoked, lost });
                            grant
                        })
                        .collect();
                let mut listed = Vec::with_capacity(q.l.len());
                for (tag, start, end) in q.l {
                    listed.push(
                        QuotaKey::from_tag(tenant.clone(), meter.clone(), &tag, start, end)
                            .ok_or_else(|| format!("a period of kind `{tag}`"))?,
                    );
                }
                let quota = MeterQuota {
                    counters: Counters { periods, dropped_before: q.d },
                    cap: q.c.map(|(limit, hard)| SpendCap::new(limit, hard)),
                    recharge: q.r,
                    credits,
                    listed,
                };
                meters.insert(meter, quota);
            }
            Ok(Self { meters })
        }
    }

    /// One counter as written down.
    fn counter_form(c: &Counter) -> CounterForm {
        // By node: the same state is always written the same.
        let mut senders: Vec<_> = c.applied.iter().collect();
        senders.sort_by_key(|(n, _)| **n);
        CounterForm {
            k: (c.key.period_tag(), c.key.start, c.key.end),
            r: c.reserved,
            g: c.granted,
            a: senders
                .into_iter()
                .map(|(n, s)| SenderForm {
                    n: (*n, s.seq, s.at, s.mark),
                    g: (s.grant.granted, s.grant.reserved, s.grant.limit, s.grant.used, s.grant.expired),
                    k: (
                        s.keeping.kept.lease,
                        s.keeping.kept.held,
                        s.keeping.kept.jobs,
                        s.keeping.expires_at,
                        s.keeping.gone,
                    ),
                })
                .collect(),
            f: (c.forgiven, c.forgiven_until, c.forgotten_at),
            fb: c.forgiven_by.clone(),
        }
    }

    /// [`counter_form`] read back, for `tenant`'s `meter`.
    fn counter_of(tenant: &TenantId, meter: &MeterId, c: CounterForm) -> Result<Counter, String> {
        let (tag, start, end) = c.k;
        let key = QuotaKey::from_tag(tenant.clone(), meter.clone(), &tag, start, end)
            .ok_or_else(|| format!("a period of kind `{tag}`"))?;
        let applied =
            c.a.into_iter()
                .map(|s| {
                    let (node, seq, at, mark) = s.n;
                    let (granted, reserved, limit, used, expired) = s.g;
                    let grant = Grant::new(granted, reserved).with_limit(limit).with_used(used).with_expired(expired);
                    let (lease, held, jobs, expires_at, gone) = s.k;
                    let keeping = Keeping { kept: Kept::new(lease, held, jobs), expires_at, gone };
                    (node, Sender { seq, grant, at, keeping, mark })
                })
                .collect();
        let (forgiven, forgiven_until, forgotten_at) = c.f;
        Ok(Counter {
            key,
            reserved: c.r,
            granted: c.g,
            applied,
            forgiven,
            forgiven_until,
            forgiven_by: c.fb,
            forgotten_at,
        })
    }

    /// What [`TenantQuota::roll`] found of a calendar period.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) enum Roll {
        /// Dropped before: calls for it change nothing.
        Dropped,
        /// Listed already: its row is its counter.
        Listed,
        /// Listed now; the periods it ended (their rows are dropped).
        Made(Vec<QuotaKey>),
    }

    impl TenantQuota {
        /// The tenant's quota with one counter only, `key`'s (its row `json`, or a new one),
        /// the meter's cap as read from the tenant's quota: what a call on a calendar period
        /// kept in a row of its own reads and changes. `dropped`: the period was dropped
        /// (calls change nothing).
        pub(crate) fn one_counter(
            key: &QuotaKey,
            json: Option<&str>,
            cap: Option<SpendCap>,
            dropped: bool,
        ) -> Result<Self, String> {
            let mut m = MeterQuota { cap, ..MeterQuota::default() };
            if dropped {
                m.counters.dropped_before = key.end;
            } else if let Some(json) = json {
                let form: CounterForm = serde_json::from_str(json).map_err(|e| e.to_string())?;
                m.counters.periods.push(counter_of(&key.tenant, &key.meter, form)?);
            }
            let mut meters = BTreeMap::new();
            meters.insert(key.meter.clone(), m);
            Ok(Self { meters })
        }

        /// The counter of `key` written down, if the quota holds it.
        pub(crate) fn counter_json(&self, key: &QuotaKey) -> Option<String> {
            let c = self.meters.get(&key.meter)?.counters.find(key)?;
            Some(serde_json::to_string(&counter_form(c)).expect("plain data"))
        }

        /// The cap the tenant set on `meter`.
        pub(crate) fn cap(&self, meter: &MeterId) -> Option<SpendCap> {
            self.meters.get(meter).and_then(|m| m.cap)
        }

        /// Sets the tenant's cap on `meter` (`CapMode::Set`).
        pub(crate) fn set_cap(&mut self, meter: &MeterId, cap: Option<SpendCap>) {
            self.meter(meter).cap = cap;
        }

        /// `key`, a calendar period kept in a row of its own, as `Counters::get` would make it:
        /// dropped already, listed, or listed now (dropping the listed periods of its meter that
        /// ended before it started, as a new period does).
        pub(crate) fn roll(&mut self, key: &QuotaKey) -> Roll {
            let m = self.meter(&key.meter);
            if key.end <= m.counters.dropped_before {
                return Roll::Dropped;
            }
            if m.listed.contains(key) {
                return Roll::Listed;
            }
            let mut ended = Vec::new();
            let mut dropped = m.counters.dropped_before;
            m.listed.retain(|k| {
                let keep = k.end >= key.drops_ended_before();
                if !keep {
                    dropped = dropped.max(k.end);
                    ended.push(k.clone());
                }
                keep
            });
            m.counters.dropped_before = dropped;
            m.listed.push(key.clone());
            Roll::Made(ended)
        }

        /// The listed periods of `key`'s meter that [`roll`](Self::roll) would drop as it lists
        /// `key` (none when `key` is dropped or listed already).
        pub(crate) fn ending(&self, key: &QuotaKey) -> Vec<QuotaKey> {
            let Some(m) = self.meters.get(&key.meter) else { return Vec::new() };
            if key.end <= m.counters.dropped_before || m.listed.contains(key) {
                return Vec::new();
            }
            m.listed.iter().filter(|k| k.end < key.drops_ended_before()).cloned().collect()
        }

        /// The calendar counters held in the quota itself (as an earlier layout wrote them),
        /// each with its row as written down.
        pub(crate) fn inline_calendar(&self) -> Vec<(QuotaKey, String)> {
            self.meters
                .values()
                .flat_map(|m| &m.counters.periods)
                .filter(|c| c.key.period != Period::Prepaid)
                .map(|c| (c.key.clone(), serde_json::to_string(&counter_form(c)).expect("plain data")))
                .collect()
        }

        /// The calendar counters held in the quota itself (as an earlier layout wrote them),
        /// taken out and listed: each with its row as written down. Prepaid balances stay.
        pub(crate) fn take_calendar(&mut self) -> Vec<(QuotaKey, String)> {
            let mut out = Vec::new();
            for m in self.meters.values_mut() {
                let (calendar, prepaid): (Vec<Counter>, Vec<Counter>) =
                    std::mem::take(&mut m.counters.periods).into_iter().partition(|c| c.key.period != Period::Prepaid);
                m.counters.periods = prepaid;
                for c in calendar {
                    if !m.listed.contains(&c.key) {
                        m.listed.push(c.key.clone());
                    }
                    out.push((c.key.clone(), serde_json::to_string(&counter_form(&c)).expect("plain data")));
                }
            }
            out
        }

        /// The calendar periods of `meter` kept in rows of their own.
        pub(crate) fn listed(&self, meter: &MeterId) -> &[QuotaKey] {
            self.meters.get(meter).map_or(&[], |m| &m.listed)
        }

        /// Adds a counter read from its own row (`json`), for [`counters`](Self::counters).
        pub(crate) fn add_counter(&mut self, key: &QuotaKey, json: &str) -> Result<(), String> {
            let form: CounterForm = serde_json::from_str(json).map_err(|e| e.to_string())?;
            let c = counter_of(&key.tenant, &key.meter, form)?;
            self.meter(&key.meter).counters.periods.push(c);
            Ok(())
        }
    }
}
