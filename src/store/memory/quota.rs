//! The quota role of the MemoryStore.

use super::*;

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
        let granted = match r.limit {
            Some(limit) => r.grant_for(limit.saturating_sub(c.reserved)),
            None => r.units,
        };
        c.reserved = c.reserved.saturating_add(granted);
        let grant = Grant::new(granted, c.reserved);
        c.applied(r.token, grant);
        Ok(grant)
    }

    async fn release(&self, key: &QuotaKey, units: u64, token: ReserveToken) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let counters = inner.quotas.entry((key.tenant.clone(), key.meter.clone())).or_default();
        if let Some(c) = counters.get(key) {
            if c.seen(token).is_none() {
                c.reserved = c.reserved.saturating_sub(units);
                let grant = Grant::new(0, c.reserved);
                c.applied(token, grant);
            }
        }
        Ok(())
    }
}
