//! The usage role of the SqliteStore.

use super::*;

#[async_trait]
impl UsageStore for SqliteStore {
    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError> {
        Tally::check_all(&batch.tallies)?;
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
            for t in &batch.tallies {
                let tenant = match &t.scope {
                    TallyScope::Fleet => "",
                    TallyScope::Tenant(id) => id.as_str(),
                };
                for (outcome, n) in &t.counts {
                    tx.prepare_cached(
                        "INSERT INTO tally (start, tenant, outcome, n) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (start, tenant, outcome) DO UPDATE SET n = \
                         CASE WHEN n > 9223372036854775807 - excluded.n THEN 9223372036854775807 \
                         ELSE n + excluded.n END",
                    )?
                    .execute(params![
                        t.start,
                        tenant,
                        outcome,
                        i64::try_from(*n).unwrap_or(i64::MAX)
                    ])?;
                }
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

    async fn tallies(&self, query: &TallyQuery) -> Result<Vec<Tally>, StoreError> {
        let query = query.clone();
        let (from, to) = query.span(unix_now());
        self.read(move |tx| {
            // Rows in (start, tenant, outcome) order, folded into tallies; at most `max`
            // tallies, so at most `max` times the outcomes rows.
            let (sql, tenant): (&str, Option<&str>) = match &query.scope {
                TallyRead::Fleet => (
                    "SELECT start, tenant, outcome, n FROM tally WHERE start >= ?1 AND start < ?2 AND tenant = '' \
                     ORDER BY start, tenant, outcome",
                    None,
                ),
                TallyRead::Tenants => (
                    "SELECT start, tenant, outcome, n FROM tally WHERE start >= ?1 AND start < ?2 AND tenant <> '' \
                     ORDER BY start, tenant, outcome",
                    None,
                ),
                TallyRead::Tenant(t) => (
                    "SELECT start, tenant, outcome, n FROM tally WHERE start >= ?1 AND start < ?2 AND tenant = ?3 \
                     ORDER BY start, tenant, outcome",
                    Some(t.as_str()),
                ),
            };
            let mut stmt = tx.prepare_cached(sql)?;
            let map = |r: &rusqlite::Row<'_>| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
            };
            // Read as folded: the rows past the last tally wanted are never read.
            let as_counts =
                |r: Sql<(i64, String, String, i64)>| r.map(|(s, t, o, n)| (s, t, o, u64::try_from(n).unwrap_or(0)));
            match tenant {
                Some(t) => crate::store::usage::fold_tallies(
                    stmt.query_map(params![from, to, t], map)?.map(as_counts),
                    query.max,
                ),
                None => {
                    crate::store::usage::fold_tallies(stmt.query_map(params![from, to], map)?.map(as_counts), query.max)
                }
            }
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
