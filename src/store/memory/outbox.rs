//! The alerts role of the MemoryStore: the outbox under the store's lock.

use super::*;
use crate::store::{AlertClaim, AlertKey, AlertOutcome, AlertQuery, OutboxEntry, OutboxStore};

#[async_trait]
impl OutboxStore for MemoryStore {
    async fn put_alerts(&self, entries: &[OutboxEntry]) -> Result<usize, StoreError> {
        let mut inner = self.lock();
        let mut written = 0;
        for e in entries {
            if let std::collections::btree_map::Entry::Vacant(slot) = inner.alerts.entry(e.key.clone()) {
                slot.insert(e.clone());
                written += 1;
            }
        }
        Ok(written)
    }

    async fn claim_alerts(&self, claim: &AlertClaim) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut inner = self.lock();
        let mut due: Vec<(i64, AlertKey)> =
            inner.alerts.values().filter(|e| e.claimable(claim.now)).map(|e| (e.next_at, e.key.clone())).collect();
        due.sort();
        due.truncate(claim.limit);
        Ok(due
            .into_iter()
            .filter_map(|(_, key)| {
                let e = inner.alerts.get_mut(&key)?;
                e.claimed(claim.owner, claim.until);
                Some(e.clone())
            })
            .collect())
    }

    async fn settle_alert(&self, key: &AlertKey, owner: u64, outcome: &AlertOutcome) -> Result<bool, StoreError> {
        Ok(self.lock().alerts.get_mut(key).is_some_and(|e| e.settle(owner, outcome)))
    }

    async fn list_alerts(&self, query: &AlertQuery) -> Result<Vec<OutboxEntry>, StoreError> {
        let inner = self.lock();
        Ok(inner.alerts.values().filter(|e| query.matches(e)).take(query.limit.max(1)).cloned().collect())
    }

    async fn requeue_alert(&self, key: &AlertKey, now: i64) -> Result<bool, StoreError> {
        Ok(self.lock().alerts.get_mut(key).is_some_and(|e| e.requeue(now)))
    }

    async fn prune_alerts(&self, now: i64) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let before = inner.alerts.len();
        inner.alerts.retain(|_, e| !e.prunable(now));
        Ok((before - inner.alerts.len()) as u64)
    }
}
