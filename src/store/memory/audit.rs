//! The audit role of the MemoryStore: each tenant's records under the store's lock.

use super::*;
use crate::store::{AuditQuery, AuditRecord, AuditStore, AUDIT_PER_TENANT};

#[async_trait]
impl AuditStore for MemoryStore {
    async fn append_audit(&self, record: &AuditRecord) -> Result<i64, StoreError> {
        let mut inner = self.lock();
        let head = inner.audit_heads.entry(record.tenant.clone()).or_insert(0);
        *head += 1;
        let seq = *head;
        let mut kept = record.clone();
        kept.seq = seq;
        inner.audit.insert((record.tenant.clone(), seq), kept);
        // The tenant's records of this kind past the newest AUDIT_PER_TENANT.
        let own = record.actor.is_tenant();
        let range = (record.tenant.clone(), i64::MIN)..=(record.tenant.clone(), i64::MAX);
        let mine: Vec<i64> =
            inner.audit.range(range).filter(|(_, r)| r.actor.is_tenant() == own).map(|((_, s), _)| *s).collect();
        let past = mine.len().saturating_sub(usize::try_from(AUDIT_PER_TENANT).unwrap_or(usize::MAX));
        for s in &mine[..past] {
            inner.audit.remove(&(record.tenant.clone(), *s));
        }
        Ok(seq)
    }

    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let inner = self.lock();
        let found = match &query.tenant {
            Some(t) => {
                inner.audit.range((t.clone(), i64::MIN)..=(t.clone(), i64::MAX)).map(|(_, r)| r.clone()).collect()
            }
            None => inner.audit.values().filter(|r| query.matches(r)).cloned().collect(),
        };
        Ok(query.finish(found))
    }

    async fn prune_audit(&self, before: i64) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let was = inner.audit.len();
        inner.audit.retain(|_, r| r.at >= before);
        Ok((was - inner.audit.len()) as u64)
    }
}
