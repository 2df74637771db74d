//! The export role of the MemoryStore.

use super::*;

#[async_trait]
impl ExportStore for MemoryStore {
    async fn pending_exports(
        &self,
        window_start_before: i64,
        after: Option<&ExportKey>,
        limit: usize,
    ) -> Result<Vec<UsageAggregate>, StoreError> {
        use std::ops::Bound;
        let inner = self.lock();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner
            .pending
            .range((from, Bound::Unbounded))
            .filter(|k| k.window_start < window_start_before)
            .filter_map(|k| inner.usage.get(k).map(|a| a.view(k)))
            .take(limit)
            .collect())
    }

    async fn begin_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        send: &ExportSend,
    ) -> Result<Option<UsageAggregate>, StoreError> {
        let mut inner = self.lock();
        match inner.usage.get_mut(&aggregate.key) {
            Some(a) if a.revision == aggregate.revision && a.dead.is_none() => {
                if let Some((node, until)) = a.claim {
                    if node != claim.node && until > claim.now {
                        return Ok(None);
                    }
                }
                a.claim = Some((claim.node, claim.until));
                a.attempts += 1;
                // Nothing in flight, or nothing of it may have reached the billing system (and
                // the caller planned it so, from the quantity it read): fixed (anew).
                let planned_anew = aggregate.in_flight.is_none() || aggregate.first_attempt_at.is_none();
                if a.in_flight.is_none() || (a.first_attempt_at.is_none() && planned_anew) {
                    a.in_flight = Some(aggregate.quantity.min(a.quantity));
                    a.send = Some(send.clone());
                }
                a.first_attempt_at.get_or_insert(claim.now);
                let view = a.view(&aggregate.key);
                inner.index(&aggregate.key);
                Ok(Some(view))
            }
            _ => Ok(None),
        }
    }

    async fn defer_export(
        &self,
        aggregate: &UsageAggregate,
        claim: &ExportClaim,
        deferral: Deferral,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        match inner.usage.get_mut(&aggregate.key) {
            Some(a) if a.revision == aggregate.revision && a.dead.is_none() && a.in_flight.is_some() => {
                if a.claim.is_some_and(|(node, until)| node != claim.node && until > claim.now) {
                    return Ok(false);
                }
                a.claim = Some((claim.node, claim.until));
                match deferral {
                    Deferral::Unknown => a.unknown_failures += 1,
                    Deferral::NeverSent(n) if a.attempts == n => a.first_attempt_at = None,
                    Deferral::NeverSent(_) => {}
                    Deferral::Failed => {}
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn finish_export(&self, aggregate: &UsageAggregate, now: i64) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        match inner.usage.get_mut(&aggregate.key) {
            Some(a) if a.revision == aggregate.revision && a.in_flight.is_some() => {
                let sent = a.send.clone().filter(|s| s.customer.is_some());
                a.exported = a.in_flight.take().unwrap_or(a.exported);
                // All exported: no longer a candidate until billable usage comes again.
                if a.exported >= a.quantity {
                    a.billable = false;
                }
                a.send = None;
                a.dead = None;
                a.revision += 1;
                a.attempts = 0;
                a.unknown_failures = 0;
                a.first_attempt_at = None;
                a.claim = None;
                inner.index(&aggregate.key);
                if let Some(send) = sent {
                    let entry = LedgerEntry::new(aggregate.key.clone(), aggregate.revision, send, Some(now));
                    inner.put_ledger(entry, now);
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn dead_letter(&self, aggregate: &UsageAggregate, reason: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(a) = inner.usage.get_mut(&aggregate.key).filter(|a| a.revision == aggregate.revision) {
            a.dead = Some(reason.to_owned());
            inner.index(&aggregate.key);
        }
        Ok(())
    }

    async fn dead_letters(&self, after: Option<&ExportKey>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        use std::ops::Bound;
        let inner = self.lock();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner
            .parked
            .range((from, Bound::Unbounded))
            .filter_map(|k| inner.usage.get(k).map(|a| (k, a)))
            .filter_map(|(k, a)| {
                a.dead.as_ref().map(|reason| {
                    let mut d = DeadLetter::new(k.clone(), a.quantity - a.exported, reason.clone());
                    d.revision = a.revision;
                    d.send = a.send.clone();
                    d
                })
            })
            .take(limit)
            .collect())
    }

    async fn requeue_dead_letter(&self, key: &ExportKey) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let Some(a) = inner.usage.get_mut(key).filter(|a| a.dead.is_some()) else {
            return Ok(false);
        };
        a.dead = None;
        a.in_flight = None;
        a.send = None;
        a.claim = None;
        a.attempts = 0;
        a.unknown_failures = 0;
        a.first_attempt_at = None;
        a.revision += 1;
        inner.index(key);
        Ok(true)
    }

    fn is_durable(&self) -> bool {
        false
    }

    async fn identifier_namespace(&self) -> Result<String, StoreError> {
        Ok(self.lock().namespace.clone())
    }

    async fn set_identifier_namespace(&self, current: &str, new: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        if inner.namespace != current {
            return Ok(false);
        }
        new.clone_into(&mut inner.namespace);
        Ok(true)
    }
}
