//! The usage role of the SqliteStore.

use super::*;

#[async_trait]
impl UsageStore for SqliteStore {
    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError> {
        let batch = batch.clone();
        self.write(move |tx, progress| {
            let fresh = tx
                .prepare_cached("INSERT INTO flush (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING")?
                .execute(params![batch.id.as_str(), unix_now()])?;
            if fresh == 0 {
                return Ok(CommitOutcome::AlreadyApplied);
            }
            for r in &batch.records {
                add_usage(tx, r)?;
                progress.newest_window = progress.newest_window.max(Some(r.window_start));
            }
            progress.prune = true;
            Ok(CommitOutcome::Applied)
        })
        .await
    }

    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError> {
        let events = events.to_vec();
        self.write(move |tx, progress| {
            let mut out = Vec::with_capacity(events.len());
            for e in &events {
                let fresh = tx
                    .prepare_cached("INSERT INTO usage_event (id, at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING")?
                    .execute(params![e.id, e.at])?;
                if fresh == 0 {
                    out.push(EventOutcome::Duplicate);
                    continue;
                }
                if progress.at_cap().0 {
                    // Ids past their horizon (by this event's time too) go before one is refused.
                    let freed = prune_ids(tx, "usage_event", e.at)?;
                    progress.freed(freed, 0);
                }
                progress.add_event_id()?;
                let r = &e.record;
                add_usage(tx, r)?;
                progress.newest_window = progress.newest_window.max(Some(r.window_start));
                out.push(EventOutcome::Applied);
            }
            progress.prune = true;
            Ok(out)
        })
        .await
    }

    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError> {
        let tenant = tenant.clone();
        self.read(move |tx| {
            tx.prepare_cached(&format!(
                "SELECT {AGGREGATE_COLUMNS} FROM usage u \
                 WHERE u.tenant = ?1 AND u.window_start >= ?2 AND u.window_start < ?3 \
                 ORDER BY u.tenant, u.meter, u.window_start"
            ))?
            .query_map(params![tenant.as_str(), from, to], aggregate)?
            .collect()
        })
        .await
    }

    fn max_batch_records(&self) -> usize {
        MAX_BATCH_RECORDS
    }
}

fn add_usage(tx: &Transaction<'_>, r: &UsageRecord) -> Sql<()> {
    tx.prepare_cached(
        // Saturating: past i64::MAX, SQLite would turn the sum into a float. An aggregate is an
        // export candidate once a billable record was added to it.
        "INSERT INTO usage (tenant, meter, window_start, quantity, billable) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (window_start, tenant, meter) DO UPDATE SET quantity = \
         CASE WHEN quantity > 9223372036854775807 - excluded.quantity THEN 9223372036854775807 \
         ELSE quantity + excluded.quantity END, billable = max(billable, excluded.billable)",
    )?
    .execute(params![r.tenant.as_str(), r.meter.as_str(), r.window_start, int(r.quantity), r.billable])?;
    Ok(())
}
