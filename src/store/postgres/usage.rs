//! The usage role of the PostgresStore: a flush is one transaction with its flush id.

use std::collections::BTreeMap;

use super::*;

/// Records summed per aggregate, in the order of the table's key: concurrent flushes lock the
/// rows they share in one order (no deadlock between them), and one statement never touches
/// a row twice.
struct Rows {
    tenants: Vec<String>,
    meters: Vec<String>,
    windows: Vec<i64>,
    quantities: Vec<i64>,
    billable: Vec<bool>,
}

impl Rows {
    fn of<'a>(records: impl IntoIterator<Item = &'a UsageRecord>) -> Self {
        let mut sums: BTreeMap<(&str, &str, i64), (u64, bool)> = BTreeMap::new();
        for r in records {
            let sum = sums.entry((r.tenant.as_str(), r.meter.as_str(), r.window_start)).or_default();
            sum.0 = sum.0.saturating_add(r.quantity);
            sum.1 |= r.billable;
        }
        let mut rows = Rows {
            tenants: Vec::with_capacity(sums.len()),
            meters: Vec::with_capacity(sums.len()),
            windows: Vec::with_capacity(sums.len()),
            quantities: Vec::with_capacity(sums.len()),
            billable: Vec::with_capacity(sums.len()),
        };
        for ((t, m, w), (q, b)) in sums {
            rows.tenants.push(t.to_owned());
            rows.meters.push(m.to_owned());
            rows.windows.push(w);
            rows.quantities.push(int(q));
            rows.billable.push(b);
        }
        rows
    }

    /// Adds the rows to their aggregates (saturating at the largest `bigint`); an aggregate
    /// is an export candidate once a billable record was added to it.
    async fn add(&self, store: &PostgresStore, tx: &deadpool_postgres::Transaction<'_>) -> Pg<()> {
        if self.tenants.is_empty() {
            return Ok(());
        }
        let sql = store.sql(&format!(
            "INSERT INTO {{s}}.usage AS u (tenant, meter, window_start, quantity, billable) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::boolean[]) \
             ON CONFLICT (tenant, meter, window_start) DO UPDATE SET \
             quantity = LEAST(u.quantity::numeric + excluded.quantity, {MAX_INT})::bigint, \
             billable = u.billable OR excluded.billable"
        ));
        tx.query_typed(&sql, args![self.tenants, self.meters, self.windows, self.quantities, self.billable]).await?;
        Ok(())
    }
}

#[async_trait]
impl UsageStore for PostgresStore {
    async fn commit_usage(&self, batch: &UsageBatch) -> Result<CommitOutcome, StoreError> {
        let rows = Rows::of(&batch.records);
        let flush =
            self.sql("INSERT INTO {s}.flush (id, seen_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING RETURNING 1");
        let outcome = self
            .retrying(|| async {
                let mut client = self.client().await?;
                let tx = self.begin(&mut client).await?;
                // A flush id inserted by a call still in flight (the same flush sent again
                // after a timeout) is waited for: exactly one of them applies.
                if tx.query_typed(&flush, args![batch.id.as_str(), unix_now()]).await?.is_empty() {
                    return Ok(CommitOutcome::AlreadyApplied);
                }
                rows.add(self, &tx).await?;
                tx.commit().await?;
                Ok(CommitOutcome::Applied)
            })
            .await?;
        self.progressed(batch.records.iter().map(|r| r.window_start).max()).await;
        Ok(outcome)
    }

    async fn commit_events(&self, events: &[UsageEvent]) -> Result<Vec<EventOutcome>, StoreError> {
        let insert = self
            .sql("INSERT INTO {s}.usage_event (id, seen_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING RETURNING 1");
        let out = self
            .retrying(|| async {
                let mut client = self.client().await?;
                let tx = self.begin(&mut client).await?;
                let mut out = Vec::with_capacity(events.len());
                let mut applied = Vec::new();
                for e in events {
                    if tx.query_typed(&insert, args![e.id.as_str(), e.at]).await?.is_empty() {
                        out.push(EventOutcome::Duplicate);
                    } else {
                        out.push(EventOutcome::Applied);
                        applied.push(&e.record);
                    }
                }
                let newest_at = events.iter().map(|e| e.at).max().unwrap_or(0);
                count_ids(self, &tx, "usage_event", applied.len() as i64, newest_at).await?;
                Rows::of(applied).add(self, &tx).await?;
                tx.commit().await?;
                Ok(out)
            })
            .await?;
        self.progressed(events.iter().map(|e| e.record.window_start).max()).await;
        Ok(out)
    }

    async fn usage_range(&self, tenant: &TenantId, from: i64, to: i64) -> Result<Vec<UsageAggregate>, StoreError> {
        let sql = self.sql(&format!(
            "SELECT {AGGREGATE_COLUMNS} FROM {{s}}.usage u \
             WHERE u.tenant = $1 AND u.window_start >= $2 AND u.window_start < $3 \
             ORDER BY u.tenant, u.meter, u.window_start"
        ));
        self.retrying(|| async {
            let client = self.client().await?;
            let rows = client.query_typed(&sql, args![tenant.as_str(), from, to]).await?;
            Ok(rows.iter().map(aggregate).collect())
        })
        .await
    }

    fn max_batch_records(&self) -> usize {
        MAX_BATCH_RECORDS
    }
}
