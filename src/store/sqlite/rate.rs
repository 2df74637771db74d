//! The rate role of the SqliteStore: tenants' shared buckets, each read and written in one
//! write transaction (SQLite serializes writers: the read is the compare of a compare-and-set).

use super::*;
use crate::store::{CellCall, CellGrant, CellReturn, RateRow, RateStore};

/// Reads a tenant's bucket (`None`: never written).
fn row(tx: &Transaction<'_>, tenant: &str) -> Sql<Option<(i64, String)>> {
    tx.prepare_cached("SELECT tat, senders FROM rate_cells WHERE tenant = ?1")?
        .query_row([tenant], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

/// Writes a tenant's bucket.
fn put(tx: &Transaction<'_>, tenant: &str, row: &RateRow) -> Sql<()> {
    tx.prepare_cached(
        "INSERT INTO rate_cells (tenant, tat, senders) VALUES (?1, ?2, ?3) \
         ON CONFLICT (tenant) DO UPDATE SET tat = excluded.tat, senders = excluded.senders",
    )?
    .execute(params![tenant, row.tat, row.senders_json()])?;
    Ok(())
}

/// The row as stored, or the error of one that does not read.
fn stored(found: Option<(i64, String)>) -> Result<RateRow, StoreError> {
    match found {
        None => Ok(RateRow::default()),
        Some((tat, senders)) => RateRow::from_stored(tat, &senders),
    }
}

#[async_trait]
impl RateStore for SqliteStore {
    async fn take_cells(&self, call: &CellCall) -> Result<CellGrant, StoreError> {
        let call = call.clone();
        self.write(move |tx, _| {
            let mut row = match stored(row(tx, call.tenant.as_str())?) {
                Ok(row) => row,
                Err(e) => return Ok(Err(e)),
            };
            let before = row.clone();
            let grant = row.take(&call);
            if row != before {
                put(tx, call.tenant.as_str(), &row)?;
            }
            Ok(Ok(grant))
        })
        .await?
    }

    async fn return_cells(&self, call: &CellReturn) -> Result<(), StoreError> {
        let call = call.clone();
        self.write(move |tx, _| {
            let Some(found) = row(tx, call.tenant.as_str())? else { return Ok(Ok(())) };
            let mut row = match stored(Some(found)) {
                Ok(row) => row,
                Err(e) => return Ok(Err(e)),
            };
            let before = row.clone();
            row.give_back(&call);
            if row != before {
                put(tx, call.tenant.as_str(), &row)?;
            }
            Ok(Ok(()))
        })
        .await?
    }
}
