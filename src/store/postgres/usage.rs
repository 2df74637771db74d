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
        Tally::check_all(&batch.tallies)?;
        let rows = Rows::of(&batch.records);
        let tallies = TallyRows::of(&batch.tallies);
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
                tallies.add(self, &tx).await?;
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

    async fn tallies(&self, query: &TallyQuery) -> Result<Vec<Tally>, StoreError> {
        let (from, to) = query.span(unix_now());
        let (filter, tenant) = match &query.scope {
            TallyRead::Fleet => ("tenant = ''", None),
            TallyRead::Tenants => ("tenant <> ''", None),
            TallyRead::Tenant(t) => ("tenant = $3", Some(t.as_str())),
        };
        // At most `max` tallies' rows (every outcome of each), folded.
        let sql = self.sql(&format!(
            "SELECT start, tenant, outcome, n FROM {{s}}.tally WHERE start >= $1 AND start < $2 AND {filter} \
             ORDER BY start, tenant, outcome LIMIT $4"
        ));
        let sql = match tenant {
            Some(_) => sql,
            None => sql.replace("LIMIT $4", "LIMIT $3"),
        };
        // Every outcome of a tally at most: each reason's label, admitted, spent, paid.
        let outcomes = crate::base::RejectionKind::ALL.len() + 3;
        let limit = i64::try_from(query.max.saturating_mul(outcomes)).unwrap_or(i64::MAX);
        self.retrying(|| async {
            let client = self.client().await?;
            let rows = match tenant {
                Some(t) => client.query_typed(&sql, args![from, to, t, limit]).await?,
                None => client.query_typed(&sql, args![from, to, limit]).await?,
            };
            let rows = rows.iter().map(|r| {
                Ok::<_, std::convert::Infallible>((
                    r.get::<_, i64>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                ))
            });
            Ok(crate::store::usage::fold_tallies(rows, query.max).unwrap_or_default())
        })
        .await
    }

    fn max_batch_records(&self) -> usize {
        MAX_BATCH_RECORDS
    }
}

/// Tallies as rows of (start, tenant (`''`: the fleet), outcome, count), in the table's key
/// order: concurrent batches lock the rows they share in one order.
struct TallyRows {
    starts: Vec<i64>,
    tenants: Vec<String>,
    outcomes: Vec<String>,
    counts: Vec<i64>,
}

impl TallyRows {
    fn of(tallies: &[Tally]) -> Self {
        let mut sums: BTreeMap<(i64, &str, &str), u64> = BTreeMap::new();
        for t in tallies {
            let tenant = match &t.scope {
                TallyScope::Fleet => "",
                TallyScope::Tenant(id) => id.as_str(),
            };
            for (outcome, n) in &t.counts {
                let sum = sums.entry((t.start, tenant, outcome.as_str())).or_default();
                *sum = sum.saturating_add(*n);
            }
        }
        let mut rows = TallyRows { starts: Vec::new(), tenants: Vec::new(), outcomes: Vec::new(), counts: Vec::new() };
        for ((s, t, o), n) in sums {
            rows.starts.push(s);
            rows.tenants.push(t.to_owned());
            rows.outcomes.push(o.to_owned());
            rows.counts.push(int(n));
        }
        rows
    }

    /// Adds the rows to the tallies (saturating at the largest `bigint`).
    async fn add(&self, store: &PostgresStore, tx: &deadpool_postgres::Transaction<'_>) -> Pg<()> {
        if self.starts.is_empty() {
            return Ok(());
        }
        let sql = store.sql(&format!(
            "INSERT INTO {{s}}.tally AS t (start, tenant, outcome, n) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[]) \
             ON CONFLICT (start, tenant, outcome) DO UPDATE SET \
             n = LEAST(t.n::numeric + excluded.n, {MAX_INT})::bigint"
        ));
        tx.query_typed(&sql, args![self.starts, self.tenants, self.outcomes, self.counts]).await?;
        Ok(())
    }
}
