//! The quota role of the MemoryStore.

use super::*;
use crate::store::{
    contract::{CLOSED_GRANTS_KEPT_SECS, OPEN_GRANTS_MAX, REFUNDS_KEPT_MAX, REFUNDS_KEPT_SECS},
    quota::{close_against, fits, forgive, newer_refund, refund_against, release_against, CreditRefund},
    CapMode, RefundOutcome, Release,
};

/// One release of a batch, in the store's lock.
fn release_one(inner: &mut Inner, r: &Release) {
    let token = r.token;
    let counters = inner.quotas.entry((r.key.tenant.clone(), r.key.meter.clone())).or_default();
    let Some(c) = counters.get(&r.key) else { return };
    if c.seen(token).is_some() {
        return;
    }
    // What it kept before the release: what it keeps after, and what it gives back.
    let before = crate::store::Kept { lease: r.kept.lease.saturating_add(r.units), ..r.kept };
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
    let keeping = crate::store::quota::Keeping::after(kept, 0, 0, r.expires_at);
    let grant = Grant::new(0, c.reserved).with_limit(c.granted).with_expired(expired);
    c.applied(token, grant, keeping, crate::store::quota::mark_after(expired, false));
    let used = c.used();
    if let Some(s) = c.applied.get_mut(&token.node) {
        s.grant = grant.with_used(used);
    }
}

/// The key of `(tenant, meter)`'s prepaid balance.
fn prepaid(tenant: &TenantId, meter: &MeterId) -> QuotaKey {
    let (start, end) = crate::base::Period::Prepaid.bounds(0);
    QuotaKey::new(tenant.clone(), meter.clone(), crate::base::Period::Prepaid, start, end)
}

/// A reserve under the store's lock ([`QuotaStore::reserve`] without its recharge).
fn reserve_locked(inner: &mut Inner, r: &Reservation) -> Grant {
    let pair = (r.key.tenant.clone(), r.key.meter.clone());
    // The tenant's own cap, set first in the same step (under the lock).
    let cap = match r.cap {
        CapMode::Ignored => None,
        CapMode::Stored => inner.caps.get(&pair).copied(),
        CapMode::Set(Some(cap)) => {
            inner.caps.insert(pair.clone(), cap);
            Some(cap)
        }
        CapMode::Set(None) => {
            inner.caps.remove(&pair);
            None
        }
    };
    let counters = inner.quotas.entry(pair).or_default();
    let Some(c) = counters.get(&r.key) else {
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
    let keeping = crate::store::quota::Keeping::after(kept, granted, r.taking, r.expires_at);
    let mut grant = Grant::new(granted, c.reserved).with_limit(c.granted).with_expired(expired);
    c.applied(r.token, grant, keeping, crate::store::quota::mark_after(expired, true));
    grant = grant.with_used(c.used());
    if let Some(s) = c.applied.get_mut(&r.token.node) {
        s.grant = grant;
    }
    grant.with_cap(cap)
}

#[async_trait]
impl QuotaStore for MemoryStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let mut inner = self.lock();
        let grant = reserve_locked(&mut inner, r);
        if r.recharge == crate::store::RechargeMode::Ignored {
            return Ok(grant);
        }
        // The tenant's recharge, in the same step as the reserve (under the lock): the balance
        // it checks is the one the reserve left.
        let pair = (r.key.tenant.clone(), r.key.meter.clone());
        let key = prepaid(&pair.0, &pair.1);
        let balance = inner
            .quotas
            .get(&pair)
            .and_then(|c| c.periods.iter().find(|p| p.key == key))
            .and_then(|c| c.granted.map(|g| g.saturating_sub(c.reserved)));
        let state = inner.recharges.entry(pair).or_default();
        Ok(grant.with_recharge(state.apply(r.recharge, balance)))
    }

    async fn release(&self, releases: &[Release]) -> Vec<Result<(), StoreError>> {
        let mut inner = self.lock();
        releases
            .iter()
            .map(|r| {
                release_one(&mut inner, r);
                Ok(())
            })
            .collect()
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        let mut inner = self.lock();
        let pair = (grant.tenant.clone(), grant.meter.clone());
        // One grant per id and per payment, on any meter of the tenant.
        let same = |g: &&CreditGrant| g.id == grant.id || (g.payment.is_some() && g.payment == grant.payment);
        let seen = inner.credits.get(&pair).and_then(|l| l.iter().find(same)).or_else(|| {
            inner.credits.iter().filter(|((t, _), _)| *t == grant.tenant).flat_map(|(_, l)| l.iter()).find(same)
        });
        if let Some(seen) = seen {
            return Ok(GrantOutcome::Duplicate(seen.clone()));
        }
        let grants = inner.credits.entry(pair.clone()).or_default();
        if grants.iter().filter(|g| g.closed.is_none()).count() >= OPEN_GRANTS_MAX {
            return Ok(GrantOutcome::TooMany);
        }
        let key = prepaid(&grant.tenant, &grant.meter);
        let c = inner.quotas.entry(pair.clone()).or_default().get(&key).expect("the prepaid period never ends");
        if !fits(c.granted.unwrap_or(0), grant.units) {
            return Ok(GrantOutcome::TooLarge);
        }
        c.granted = Some(c.granted.unwrap_or(0) + grant.units);
        let mut stored = grant.clone();
        stored.closed = None;
        stored.bought = grant.units;
        stored.taken = 0;
        stored.refunded = 0;
        stored.duplicate = false;
        inner.credits.entry(pair.clone()).or_default().push(stored);
        // A refund of this payment that came first is applied now, in the same write.
        let payment = grant.payment.clone().unwrap_or_else(|| grant.id.clone());
        let kept: Vec<String> = inner
            .kept_refunds
            .iter()
            .filter(|(p, r)| **p == payment || **p == grant.id || r.invoice.as_deref() == Some(grant.id.as_str()))
            .map(|(p, _)| p.clone())
            .collect();
        let refund = kept.iter().filter_map(|p| inner.kept_refunds.remove(p)).reduce(newer_refund);
        if let Some(refund) = refund {
            let _ = apply_refund(&mut inner, &pair, &refund.landing(grant));
        }
        let c = inner.quotas.entry(pair).or_default().get(&key).expect("the prepaid period never ends");
        Ok(GrantOutcome::Granted(CreditBalance::new(c.granted.unwrap_or(0), c.reserved)))
    }

    async fn credit_grants(
        &self,
        tenant: &TenantId,
        meter: Option<&MeterId>,
    ) -> Result<(Vec<CreditGrant>, Vec<(MeterId, CreditBalance)>), StoreError> {
        let inner = self.lock();
        let mut grants = Vec::new();
        let mut balances = Vec::new();
        for ((t, m), list) in &inner.credits {
            if t != tenant || meter.is_some_and(|x| x != m) {
                continue;
            }
            let mut list = list.clone();
            if list.is_empty() {
                continue;
            }
            list.sort_by(|a, b| a.spending_order().cmp(&b.spending_order()));
            grants.extend(list);
            let balance = inner
                .quotas
                .get(&(t.clone(), m.clone()))
                .and_then(|c| c.find(&prepaid(t, m)))
                .map_or_else(CreditBalance::default, |c| CreditBalance::new(c.granted.unwrap_or(0), c.reserved));
            balances.push((m.clone(), balance));
        }
        Ok((grants, balances))
    }

    async fn close_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        revoke: bool,
        now: i64,
    ) -> Result<Option<CreditClosure>, StoreError> {
        let mut inner = self.lock();
        let pair = (tenant.clone(), meter.clone());
        let Some(grants) = inner.credits.get(&pair) else { return Ok(None) };
        let Some(grant) = grants.iter().find(|g| g.id == id && g.closed.is_none()) else { return Ok(None) };
        if !revoke && grant.expires_at.is_none_or(|at| at > now) {
            return Ok(None);
        }
        let grants = grants.clone();
        let key = prepaid(tenant, meter);
        let c = inner.quotas.entry(pair.clone()).or_default().get(&key).expect("the prepaid period never ends");
        let balance = CreditBalance::new(c.granted.unwrap_or(0), c.reserved).forgiving(c.forgiven, c.forgiven_until);
        let Some((lost, after, used)) = close_against(&grants, id, balance, revoke) else { return Ok(None) };
        let (after, by) = forgive(balance, after, std::mem::take(&mut c.forgiven_by), used, &c.sender_calls(), now);
        c.forgiven_by = by;
        c.granted = Some(after.granted);
        c.reserved = after.reserved;
        c.forgiven = after.forgiven;
        c.forgiven_until = after.forgiven_until;
        let closure = CreditClosure { at: now, revoked: revoke, lost };
        let list = inner.credits.get_mut(&pair).expect("read above");
        if let Some(g) = list.iter_mut().find(|g| g.id == id) {
            g.closed = Some(closure);
        }
        // Closed grants are kept a while (their ids, for duplicates), then dropped.
        list.retain(|g| g.closed.is_none_or(|c| c.at + CLOSED_GRANTS_KEPT_SECS > now));
        Ok(Some(closure))
    }

    async fn refund_credits(&self, refund: &CreditRefund) -> Result<RefundOutcome, StoreError> {
        let mut inner = self.lock();
        let mut of = inner
            .credits
            .iter()
            .flat_map(|(pair, l)| l.iter().map(move |g| (pair, g)))
            .filter(|(_, g)| refund.is_of(g));
        let open = of.clone().find(|(_, g)| g.closed.is_none()).map(|(pair, _)| pair.clone());
        if let Some(pair) = open {
            return Ok(apply_refund(&mut inner, &pair, refund).unwrap_or_else(|outcome| outcome));
        }
        if of.next().is_some() {
            return Ok(RefundOutcome::Nothing);
        }
        if !refund.kept() {
            return Ok(RefundOutcome::Unknown);
        }
        inner.kept_refunds.retain(|_, r| r.at >= refund.at - REFUNDS_KEPT_SECS);
        let kept = match inner.kept_refunds.remove(&refund.payment) {
            Some(before) => newer_refund(before, refund.clone()),
            None if inner.kept_refunds.len() >= REFUNDS_KEPT_MAX => return Ok(RefundOutcome::Full),
            None => refund.clone(),
        };
        inner.kept_refunds.insert(kept.payment.clone(), kept);
        Ok(RefundOutcome::Kept)
    }

    async fn counters(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
    ) -> Result<Vec<crate::store::QuotaCounter>, StoreError> {
        let inner = self.lock();
        let cap = inner.caps.get(&(tenant.clone(), meter.clone())).copied();
        let mut out: Vec<crate::store::QuotaCounter> = inner
            .quotas
            .get(&(tenant.clone(), meter.clone()))
            .map(|c| {
                c.periods
                    .iter()
                    .map(|p| {
                        crate::store::QuotaCounter::new(p.key.clone(), p.reserved, p.granted)
                            .with_cap(cap)
                            .keeping(crate::store::quota::kept_of(p.applied.values().map(|c| &c.keeping)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|c| c.key.start);
        let recharge = inner.recharges.get(&(tenant.clone(), meter.clone())).copied();
        crate::store::quota::recharge_listed(&mut out, tenant, meter, recharge);
        Ok(out)
    }

    async fn expired_credits(&self, now: i64, limit: usize) -> Result<Vec<CreditGrant>, StoreError> {
        let inner = self.lock();
        let mut due: Vec<CreditGrant> = inner
            .credits
            .values()
            .flatten()
            .filter(|g| g.closed.is_none() && g.expires_at.is_some_and(|at| at <= now))
            .cloned()
            .collect();
        due.sort_by_key(|g| g.expires_at);
        due.truncate(limit);
        Ok(due)
    }
}

/// Applies `refund` to its open grant of `pair` (`Err`: the answer when it changes nothing).
fn apply_refund(
    inner: &mut Inner,
    pair: &(TenantId, MeterId),
    refund: &CreditRefund,
) -> Result<RefundOutcome, RefundOutcome> {
    let grants: Vec<CreditGrant> =
        inner.credits.get(pair).ok_or(RefundOutcome::Nothing)?.iter().filter(|g| g.closed.is_none()).cloned().collect();
    let key = prepaid(&pair.0, &pair.1);
    let c = inner.quotas.entry(pair.clone()).or_default().get(&key).ok_or(RefundOutcome::Nothing)?;
    let balance = CreditBalance::new(c.granted.unwrap_or(0), c.reserved).forgiving(c.forgiven, c.forgiven_until);
    let applied = refund_against(&grants, refund, balance)?;
    let (after, used) = (applied.after, applied.used);
    let (after, by) = forgive(balance, after, std::mem::take(&mut c.forgiven_by), used, &c.sender_calls(), refund.at);
    c.forgiven_by = by;
    c.granted = Some(after.granted);
    c.reserved = after.reserved;
    c.forgiven = after.forgiven;
    c.forgiven_until = after.forgiven_until;
    let g = inner
        .credits
        .get_mut(pair)
        .and_then(|l| l.iter_mut().find(|g| g.closed.is_none() && g.id == applied.grant.id))
        .expect("found above");
    *g = applied.grant.clone();
    Ok(applied.outcome())
}
