//! The ledger role of the PostgresStore: what exports sent, as reconciliation reads it.

use super::*;

#[async_trait]
impl LedgerStore for PostgresStore {
    async fn ledger(
        &self,
        hour: i64,
        after: Option<(&ExportKey, u32)>,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let limit = int(limit as u64);
        let first = self.sql(&format!(
            "SELECT {LEDGER_COLUMNS} FROM {{s}}.ledger WHERE hour = $1 \
             ORDER BY tenant, meter, window_start, revision LIMIT $2"
        ));
        let next = self.sql(&format!(
            "SELECT {LEDGER_COLUMNS} FROM {{s}}.ledger WHERE hour = $1 \
             AND (tenant, meter, window_start, revision) > ($2, $3, $4, $5) \
             ORDER BY tenant, meter, window_start, revision LIMIT $6"
        ));
        self.retrying(|| async {
            let client = self.client().await?;
            let rows = match after {
                None => client.query_typed(&first, args![hour, limit]).await?,
                Some((k, rev)) => {
                    client
                        .query_typed(
                            &next,
                            args![hour, k.tenant.as_str(), k.meter.as_str(), k.window_start, i64::from(rev), limit],
                        )
                        .await?
                }
            };
            Ok(rows.iter().filter_map(ledger_entry).collect())
        })
        .await
    }

    async fn note_lacking(&self, entry: &LedgerEntry, now: i64) -> Result<i64, StoreError> {
        let k = &entry.key;
        let read = self.sql(&format!("SELECT lacking_since FROM {{s}}.ledger WHERE {LEDGER_KEY} FOR UPDATE"));
        let set = self.sql(&format!("UPDATE {{s}}.ledger SET lacking_since = $6 WHERE {LEDGER_KEY}"));
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let (hour, t, m, rev) = (entry.hour(), k.tenant.as_str(), k.meter.as_str(), i64::from(entry.revision));
            let args = args![hour, t, m, k.window_start, rev];
            let since = tx.query_typed_opt(&read, args).await?.map(|r| r.get::<_, Option<i64>>(0));
            let since = match since {
                Some(Some(since)) => since,
                Some(None) => {
                    tx.query_typed(
                        &set,
                        args![
                            entry.hour(),
                            k.tenant.as_str(),
                            k.meter.as_str(),
                            k.window_start,
                            i64::from(entry.revision),
                            now
                        ],
                    )
                    .await?;
                    now
                }
                None => {
                    // A row of its own, under observation (another reconciler inserting the
                    // same one at once makes this transaction run again, and find it).
                    let mut observed = entry.clone();
                    observed.exported_at = None;
                    observed.lacking_since = Some(now);
                    let insert = self.sql(
                        "INSERT INTO {s}.ledger (hour, tenant, meter, window_start, revision, send, exported_at, \
                         lacking_since, superseded, kept_from) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, $8, $7)",
                    );
                    tx.query_typed(
                        &insert,
                        args![
                            observed.hour(),
                            k.tenant.as_str(),
                            k.meter.as_str(),
                            k.window_start,
                            i64::from(observed.revision),
                            observed.send.to_json(),
                            now,
                            observed.superseded
                        ],
                    )
                    .await?;
                    now
                }
            };
            tx.commit().await?;
            Ok(since)
        })
        .await
    }

    async fn clear_lacking(&self, entry: &LedgerEntry) -> Result<(), StoreError> {
        let k = &entry.key;
        let delete = self.sql(&format!("DELETE FROM {{s}}.ledger WHERE {LEDGER_KEY} AND exported_at IS NULL"));
        let clear = self.sql(&format!("UPDATE {{s}}.ledger SET lacking_since = NULL WHERE {LEDGER_KEY}"));
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let (hour, t, m, rev) = (entry.hour(), k.tenant.as_str(), k.meter.as_str(), i64::from(entry.revision));
            let args = args![hour, t, m, k.window_start, rev];
            tx.query_typed(&delete, args).await?;
            tx.query_typed(&clear, args).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn reexport(&self, entry: &LedgerEntry) -> Result<bool, StoreError> {
        let k = &entry.key;
        // The aggregate's row is locked first: an export beginning or finishing waits.
        let lock = self.sql(
            "SELECT revision, dead IS NULL AND in_flight IS NULL AND exported >= $5 FROM {s}.usage \
             WHERE tenant = $1 AND meter = $2 AND window_start = $3 AND revision > $4 FOR UPDATE",
        );
        let open = self.sql(&format!(
            "SELECT 1 FROM {{s}}.ledger WHERE {LEDGER_KEY} AND exported_at IS NOT NULL AND NOT superseded FOR UPDATE"
        ));
        let supersede =
            self.sql(&format!("UPDATE {{s}}.ledger SET superseded = true, lacking_since = NULL WHERE {LEDGER_KEY}"));
        // A new revision: an export pass that read the aggregate before cannot begin from the
        // old `exported` (it would mark the value exported unsent).
        let requeue = self.sql(
            "UPDATE {s}.usage SET exported = exported - $4, billable = true, revision = revision + 1 \
             WHERE tenant = $1 AND meter = $2 AND window_start = $3",
        );
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin(&mut client).await?;
            let (tenant, meter, rev, value) =
                (k.tenant.as_str(), k.meter.as_str(), i64::from(entry.revision), int(entry.send.value));
            let ready = tx
                .query_typed_opt(&lock, args![tenant, meter, k.window_start, rev, value])
                .await?
                .is_some_and(|r| r.get::<_, bool>(1));
            let hour = entry.hour();
            let ledger_args = args![hour, tenant, meter, k.window_start, rev];
            if !ready || tx.query_typed_opt(&open, ledger_args).await?.is_none() {
                tx.commit().await?;
                return Ok(false);
            }
            tx.query_typed(&supersede, ledger_args).await?;
            tx.query_typed(&requeue, args![tenant, meter, k.window_start, value]).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }
}

fn ledger_entry(r: &Row) -> Option<LedgerEntry> {
    let key = ExportKey::new(r.get::<_, String>(0).into(), r.get::<_, String>(1).into(), r.get(2));
    let send = ExportSend::from_json(&r.get::<_, String>(4))?;
    let mut e = LedgerEntry::new(key, small(r.get(3)), send, r.get(5));
    e.lacking_since = r.get(6);
    e.superseded = r.get(7);
    Some(e)
}
const LEDGER_COLUMNS: &str = "tenant, meter, window_start, revision, send, exported_at, lacking_since, superseded";
const LEDGER_KEY: &str = "hour = $1 AND tenant = $2 AND meter = $3 AND window_start = $4 AND revision = $5";
impl PostgresStore {
    /// Writes (or replaces) a ledger row, kept from `now`.
    pub(super) async fn put_ledger(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        entry: &LedgerEntry,
        now: i64,
    ) -> Pg<()> {
        let k = &entry.key;
        tx.query_typed(
            &self.sql(
                "INSERT INTO {s}.ledger (hour, tenant, meter, window_start, revision, send, exported_at, \
                 lacking_since, superseded, kept_from) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (hour, tenant, meter, window_start, revision) DO UPDATE SET send = excluded.send, \
                 exported_at = excluded.exported_at, lacking_since = excluded.lacking_since, \
                 superseded = excluded.superseded, kept_from = excluded.kept_from",
            ),
            args![
                entry.hour(),
                k.tenant.as_str(),
                k.meter.as_str(),
                k.window_start,
                i64::from(entry.revision),
                entry.send.to_json(),
                entry.exported_at,
                entry.lacking_since,
                entry.superseded,
                now
            ],
        )
        .await?;
        Ok(())
    }
}
