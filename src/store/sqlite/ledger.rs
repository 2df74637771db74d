//! The ledger role of the SqliteStore: what exports sent, as reconciliation reads it.

use super::*;

#[async_trait]
impl LedgerStore for SqliteStore {
    async fn ledger(
        &self,
        hour: i64,
        after: Option<(&ExportKey, u32)>,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let after = after.map(|(k, r)| (k.clone(), r));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |tx| {
            let columns = "SELECT tenant, meter, window_start, revision, send, exported_at, lacking_since, superseded \
                           FROM ledger WHERE hour = ?1";
            let row = |r: &Row<'_>| -> Sql<Option<LedgerEntry>> {
                let key = ExportKey::new(r.get::<_, String>(0)?.into(), r.get::<_, String>(1)?.into(), r.get(2)?);
                let revision = u32::try_from(r.get::<_, i64>(3)?).unwrap_or(u32::MAX);
                let Some(send) = ExportSend::from_json(&r.get::<_, String>(4)?) else { return Ok(None) };
                let mut e = LedgerEntry::new(key, revision, send, r.get(5)?);
                e.lacking_since = r.get(6)?;
                e.superseded = r.get(7)?;
                Ok(Some(e))
            };
            let rows = match &after {
                None => tx
                    .prepare_cached(&format!("{columns} ORDER BY tenant, meter, window_start, revision LIMIT ?2"))?
                    .query_map(params![hour, limit], row)?
                    .collect::<Sql<Vec<_>>>(),
                Some((k, rev)) => tx
                    .prepare_cached(&format!(
                        "{columns} AND (tenant, meter, window_start, revision) > (?2, ?3, ?4, ?5) \
                         ORDER BY tenant, meter, window_start, revision LIMIT ?6"
                    ))?
                    .query_map(
                        params![hour, k.tenant.as_str(), k.meter.as_str(), k.window_start, i64::from(*rev), limit],
                        row,
                    )?
                    .collect::<Sql<Vec<_>>>(),
            };
            Ok(rows?.into_iter().flatten().collect())
        })
        .await
    }

    async fn note_lacking(&self, entry: &LedgerEntry, now: i64) -> Result<i64, StoreError> {
        let entry = entry.clone();
        self.write(move |tx, _| {
            let k = &entry.key;
            let args =
                params![entry.hour(), k.tenant.as_str(), k.meter.as_str(), k.window_start, i64::from(entry.revision)];
            let since: Option<Option<i64>> = tx
                .prepare_cached(
                    "SELECT lacking_since FROM ledger WHERE hour = ?1 AND tenant = ?2 AND meter = ?3 \
                     AND window_start = ?4 AND revision = ?5",
                )?
                .query_row(args, |r| r.get(0))
                .optional()?;
            match since {
                Some(Some(since)) => Ok(since),
                Some(None) => {
                    tx.prepare_cached(
                        "UPDATE ledger SET lacking_since = ?6 WHERE hour = ?1 AND tenant = ?2 AND meter = ?3 \
                         AND window_start = ?4 AND revision = ?5",
                    )?
                    .execute(params![
                        entry.hour(),
                        k.tenant.as_str(),
                        k.meter.as_str(),
                        k.window_start,
                        i64::from(entry.revision),
                        now
                    ])?;
                    Ok(now)
                }
                None => {
                    let mut observed = entry.clone();
                    observed.exported_at = None;
                    observed.lacking_since = Some(now);
                    put_ledger(tx, &observed, now)?;
                    Ok(now)
                }
            }
        })
        .await
    }

    async fn clear_lacking(&self, entry: &LedgerEntry) -> Result<(), StoreError> {
        let entry = entry.clone();
        self.write(move |tx, _| {
            let k = &entry.key;
            let args =
                params![entry.hour(), k.tenant.as_str(), k.meter.as_str(), k.window_start, i64::from(entry.revision)];
            let filter = "hour = ?1 AND tenant = ?2 AND meter = ?3 AND window_start = ?4 AND revision = ?5";
            tx.prepare_cached(&format!("DELETE FROM ledger WHERE {filter} AND exported_at IS NULL"))?.execute(args)?;
            tx.prepare_cached(&format!("UPDATE ledger SET lacking_since = NULL WHERE {filter}"))?.execute(args)?;
            Ok(())
        })
        .await
    }

    async fn reexport(&self, entry: &LedgerEntry) -> Result<bool, StoreError> {
        let entry = entry.clone();
        self.write(move |tx, _| {
            let k = &entry.key;
            let (tenant, meter, rev) = (k.tenant.as_str(), k.meter.as_str(), i64::from(entry.revision));
            let open: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM ledger WHERE hour = ?1 AND tenant = ?2 AND meter = ?3 \
                     AND window_start = ?4 AND revision = ?5 AND exported_at IS NOT NULL AND superseded = 0) \
                     AND EXISTS (SELECT 1 FROM usage WHERE tenant = ?2 AND meter = ?3 AND window_start = ?4 \
                     AND revision > ?5 AND dead IS NULL AND in_flight IS NULL AND exported >= ?6)",
                )?
                .query_row(params![entry.hour(), tenant, meter, k.window_start, rev, int(entry.send.value)], |r| {
                    r.get(0)
                })?;
            if !open {
                return Ok(false);
            }
            tx.prepare_cached(
                "UPDATE ledger SET superseded = 1, lacking_since = NULL WHERE hour = ?1 AND tenant = ?2 \
                 AND meter = ?3 AND window_start = ?4 AND revision = ?5",
            )?
            .execute(params![entry.hour(), tenant, meter, k.window_start, rev])?;
            tx.prepare_cached(
                // A new revision: an export pass that read the aggregate before cannot begin
                // from the old `exported` (it would mark the value exported unsent).
                "UPDATE usage SET exported = exported - ?4, billable = 1, revision = revision + 1 \
                 WHERE tenant = ?1 AND meter = ?2 AND window_start = ?3",
            )?
            .execute(params![tenant, meter, k.window_start, int(entry.send.value)])?;
            Ok(true)
        })
        .await
    }
}

/// Writes (or replaces) a ledger row, kept from `now`.
pub(super) fn put_ledger(tx: &Transaction<'_>, entry: &LedgerEntry, now: i64) -> Sql<()> {
    let k = &entry.key;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO ledger (hour, tenant, meter, window_start, revision, send, exported_at, \
         lacking_since, superseded, kept_from) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
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
    ])?;
    Ok(())
}
