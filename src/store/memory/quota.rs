//! The quota role of the MemoryStore.

use super::*;
use crate::store::{
    contract::{CLOSED_GRANTS_KEPT_SECS, OPEN_GRANTS_MAX},
    quota::{close_against, fits, refund_against, CreditRefund},
};

/// The key of `(tenant, meter)`'s prepaid balance.
fn prepaid(tenant: &TenantId, meter: &MeterId) -> QuotaKey {
    let (start, end) = crate::base::Period::Prepaid.bounds(0);
    QuotaKey::new(tenant.clone(), meter.clone(), crate::base::Period::Prepaid, start, end)
}

#[async_trait]
impl QuotaStore for MemoryStore {
    async fn reserve(&self, r: &Reservation) -> Result<Grant, StoreError> {
        let mut inner = self.lock();
        let counters = inner.quotas.entry((r.key.tenant.clone(), r.key.meter.clone())).or_default();
        let Some(c) = counters.get(&r.key) else {
            // A late call for a period long over: nothing is left to reserve in it.
            return Ok(Grant::new(0, 0));
        };
        if let Some(grant) = c.seen(r.token) {
            return Ok(grant);
        }
        c.reserved = c.reserved.saturating_add(r.owed);
        // A prepaid balance is held to its grants, whatever the caller says.
        let granted = match c.granted.or(r.limit) {
            Some(limit) => r.grant_for(limit.saturating_sub(c.reserved)),
            None => r.units,
        };
        c.reserved = c.reserved.saturating_add(granted);
        let grant = Grant::new(granted, c.reserved).with_limit(c.granted);
        c.applied(r.token, grant);
        Ok(grant)
    }

    async fn release(&self, key: &QuotaKey, units: u64, token: ReserveToken) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let counters = inner.quotas.entry((key.tenant.clone(), key.meter.clone())).or_default();
        if let Some(c) = counters.get(key) {
            if c.seen(token).is_none() {
                c.reserved = c.reserved.saturating_sub(units);
                let grant = Grant::new(0, c.reserved).with_limit(c.granted);
                c.applied(token, grant);
            }
        }
        Ok(())
    }

    async fn grant_credits(&self, grant: &CreditGrant) -> Result<GrantOutcome, StoreError> {
        let mut inner = self.lock();
        let pair = (grant.tenant.clone(), grant.meter.clone());
        let grants = inner.credits.entry(pair.clone()).or_default();
        if let Some(seen) = grants.iter().find(|g| g.id == grant.id) {
            return Ok(GrantOutcome::Duplicate(seen.clone()));
        }
        if grants.iter().filter(|g| g.closed.is_none()).count() >= OPEN_GRANTS_MAX {
            return Ok(GrantOutcome::TooMany);
        }
        let key = prepaid(&grant.tenant, &grant.meter);
        let c = inner.quotas.entry(pair.clone()).or_default().get(&key).expect("the prepaid period never ends");
        if !fits(c.granted.unwrap_or(0), grant.units) {
            return Ok(GrantOutcome::TooLarge);
        }
        let granted = c.granted.unwrap_or(0) + grant.units;
        c.granted = Some(granted);
        let reserved = c.reserved;
        let mut stored = grant.clone();
        stored.closed = None;
        inner.credits.entry(pair).or_default().push(stored);
        Ok(GrantOutcome::Granted(CreditBalance::new(granted, reserved)))
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
        let balance = CreditBalance::new(c.granted.unwrap_or(0), c.reserved);
        let Some((lost, after)) = close_against(&grants, id, balance) else { return Ok(None) };
        c.granted = Some(after.granted);
        c.reserved = after.reserved;
        let closure = CreditClosure { at: now, revoked: revoke, lost };
        let list = inner.credits.get_mut(&pair).expect("read above");
        if let Some(g) = list.iter_mut().find(|g| g.id == id) {
            g.closed = Some(closure);
        }
        // Closed grants are kept a while (their ids, for duplicates), then dropped.
        list.retain(|g| g.closed.is_none_or(|c| c.at + CLOSED_GRANTS_KEPT_SECS > now));
        Ok(Some(closure))
    }

    async fn refund_credits(
        &self,
        tenant: &TenantId,
        meter: &MeterId,
        id: &str,
        refund: CreditRefund,
    ) -> Result<Option<u64>, StoreError> {
        let mut inner = self.lock();
        let pair = (tenant.clone(), meter.clone());
        let Some(grants) = inner.credits.get(&pair).cloned() else { return Ok(None) };
        let key = prepaid(tenant, meter);
        let Some(c) = inner.quotas.entry(pair.clone()).or_default().get(&key) else { return Ok(None) };
        let balance = CreditBalance::new(c.granted.unwrap_or(0), c.reserved);
        let Some((removed, after)) = refund_against(&grants, id, balance, refund) else { return Ok(None) };
        c.granted = Some(after.granted);
        let list = inner.credits.get_mut(&pair).expect("read above");
        if let Some(g) = list.iter_mut().find(|g| g.id == id) {
            g.units -= removed;
            g.refunded = refund.refunded;
        }
        Ok(Some(removed))
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
