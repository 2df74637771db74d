//! The usage role of the MemoryStore.

use super::*;

#[async_trait]
impl UsageStore for MemoryStore {
    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError> {
        Tally::check_all(&batch.tallies)?;
        let mut inner = self.lock();
        if inner.flushes.contains(&batch.id) {
            return Ok(CommitOutcome::AlreadyApplied);
        }
        let now = crate::store::unix_now();
        for t in &batch.tallies {
            let counts = inner.tallies.entry((t.start, t.scope.clone())).or_default();
            for (outcome, n) in &t.counts {
                let c = counts.entry(outcome.clone()).or_default();
                *c = c.saturating_add(*n);
            }
        }
        // Tallies past their time go as they are added: bounded by the wall clock.
        let horizon = TallyQuery::horizon(now);
        while inner.tallies.first_key_value().is_some_and(|((start, scope), _)| *start + scope.window_secs() <= horizon)
        {
            inner.tallies.pop_first();
        }
        for r in &batch.records {
            let key = ExportKey { tenant: r.tenant.clone(), meter: r.meter.clone(), window_start: r.window_start };
            let agg = inner.usage.entry(key.clone()).or_default();
            agg.quantity = agg.quantity.saturating_add(r.quantity);
            agg.billable |= r.billable;
            inner.index(&key);
            inner.newest_window = inner.newest_window.max(r.window_start);
        }
        inner.prune();
        inner.flushes.insert(batch.id.clone());
        inner.flush_order.push_back(batch.id.clone());
        while inner.flush_order.len() > MEMORY_FLUSH_IDS {
            if let Some(old) = inner.flush_order.pop_front() {
                inner.flushes.remove(&old);
            }
        }
        Ok(CommitOutcome::Applied)
    }

    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError> {
        let mut inner = self.lock();
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            if inner.events.contains(&e.id) {
                out.push(EventOutcome::Duplicate);
                continue;
            }
            if !inner.events.has_room(e.at) {
                // Those before it in this call are applied: a retry finds them duplicates.
                return Err(StoreError::Full("usage event ids"));
            }
            let r = &e.record;
            let key = ExportKey::new(r.tenant.clone(), r.meter.clone(), r.window_start);
            let agg = inner.usage.entry(key.clone()).or_default();
            agg.quantity = agg.quantity.saturating_add(r.quantity);
            agg.billable |= r.billable;
            inner.index(&key);
            inner.newest_window = inner.newest_window.max(r.window_start);
            inner.events.insert(&e.id, e.at);
            out.push(EventOutcome::Applied);
        }
        inner.prune();
        Ok(out)
    }

    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError> {
        let inner = self.lock();
        // The tenant's aggregates only: keys are ordered by tenant first.
        let first = ExportKey::new(tenant.clone(), MeterId::from(""), i64::MIN);
        Ok(inner
            .usage
            .range(first..)
            .take_while(|(k, _)| k.tenant == *tenant)
            .filter(|(k, _)| k.window_start >= from && k.window_start < to)
            .map(|(k, a)| a.view(k))
            .collect())
    }

    async fn tallies(&self, query: &TallyQuery) -> Result<Vec<Tally>, StoreError> {
        let now = crate::store::unix_now();
        let inner = self.lock();
        Ok(inner
            .tallies
            .range((query.from, TallyScope::Fleet)..)
            .take_while(|((start, _), _)| *start < query.to)
            .filter(|((start, scope), _)| query.reads(scope, *start, now))
            .take(query.max)
            .map(|((start, scope), counts)| {
                Tally::new(scope.clone(), *start, counts.iter().map(|(o, n)| (o.clone(), *n)).collect())
            })
            .collect())
    }
}
