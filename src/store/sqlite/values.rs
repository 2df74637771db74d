//! The quota role's open values in the SqliteStore: a row of `dimension_values` read and
//! written in one write transaction.

use super::*;
use crate::store::{HeldValues, ValueCall, ValueMode, ValueRow};

impl SqliteStore {
    /// [`QuotaStore::values`].
    pub(super) async fn apply_values(&self, call: &ValueCall, mode: ValueMode) -> Result<HeldValues, StoreError> {
        let call = call.clone();
        self.write(move |tx, _| {
            let key = params![call.tenant.as_str(), call.meter.as_str(), call.dimension, call.period];
            let found: Option<String> = tx
                .prepare_cached(
                    "SELECT row FROM dimension_values WHERE tenant = ?1 AND meter = ?2 AND dimension = ?3 AND period = ?4",
                )?
                .query_row(key, |r| r.get(0))
                .optional()?;
            let mut row = match ValueRow::from_json(found.as_deref().unwrap_or_default()) {
                Ok(row) => row,
                Err(e) => return Ok(Err(e)),
            };
            let before = row.clone();
            let out = row.apply(&call, mode);
            if row.is_empty() {
                if found.is_some() {
                    tx.prepare_cached(
                        "DELETE FROM dimension_values WHERE tenant = ?1 AND meter = ?2 AND dimension = ?3 AND period = ?4",
                    )?
                    .execute(key)?;
                }
            } else if row != before {
                tx.prepare_cached(
                    "INSERT INTO dimension_values (tenant, meter, dimension, period, row, expires) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (tenant, meter, dimension, period) DO UPDATE SET row = excluded.row, \
                     expires = excluded.expires",
                )?
                .execute(params![
                    call.tenant.as_str(),
                    call.meter.as_str(),
                    call.dimension,
                    call.period,
                    row.to_json(),
                    row.expires()
                ])?;
            }
            Ok(Ok(out))
        })
        .await?
    }
}
