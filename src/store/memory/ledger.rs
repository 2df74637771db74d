//! The ledger role of the MemoryStore: what exports sent, as reconciliation reads it.

use super::*;

#[async_trait]
impl LedgerStore for MemoryStore {
    async fn ledger(
        &self,
        hour: i64,
        after: Option<(&ExportKey, u32)>,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        use std::ops::Bound;
        let inner = self.lock();
        let from = match after {
            Some((k, r)) => Bound::Excluded((hour, k.clone(), r)),
            None => Bound::Included((hour, ExportKey::new(TenantId::from(""), MeterId::from(""), i64::MIN), 0)),
        };
        Ok(inner
            .ledger
            .range((from, Bound::Unbounded))
            .take_while(|((h, _, _), _)| *h == hour)
            .map(|(_, e)| e.clone())
            .take(limit)
            .collect())
    }

    async fn note_lacking(&self, entry: &LedgerEntry, now: i64) -> Result<i64, StoreError> {
        let mut inner = self.lock();
        let at = (entry.hour(), entry.key.clone(), entry.revision);
        if let Some(e) = inner.ledger.get_mut(&at) {
            return Ok(*e.lacking_since.get_or_insert(now));
        }
        let mut observed = entry.clone();
        observed.exported_at = None;
        observed.lacking_since = Some(now);
        inner.put_ledger(observed, now);
        Ok(now)
    }

    async fn clear_lacking(&self, entry: &LedgerEntry) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let at = (entry.hour(), entry.key.clone(), entry.revision);
        match inner.ledger.get_mut(&at) {
            Some(e) if e.exported_at.is_none() => {
                inner.ledger.remove(&at);
            }
            Some(e) => e.lacking_since = None,
            None => {}
        }
        Ok(())
    }

    async fn reexport(&self, entry: &LedgerEntry) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let at = (entry.hour(), entry.key.clone(), entry.revision);
        if !inner.ledger.get(&at).is_some_and(|e| e.exported_at.is_some() && !e.superseded) {
            return Ok(false);
        }
        match inner.usage.get_mut(&entry.key) {
            Some(a)
                if a.dead.is_none()
                    && a.in_flight.is_none()
                    && a.revision > entry.revision
                    && a.exported >= entry.send.value =>
            {
                a.exported -= entry.send.value;
                a.billable = true;
                // A new revision: an export pass that read the aggregate before cannot begin
                // from the old `exported` (it would mark the value exported unsent).
                a.revision += 1;
            }
            _ => return Ok(false),
        }
        inner.index(&entry.key);
        if let Some(e) = inner.ledger.get_mut(&at) {
            e.superseded = true;
            e.lacking_since = None;
        }
        Ok(true)
    }
}
