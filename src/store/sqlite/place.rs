//! The places role of the SqliteStore: a tenant's places read and written in one write
//! transaction.

use super::*;
use crate::store::{PlaceCall, PlaceMode, PlaceRow, PlaceStore, Places};

#[async_trait]
impl PlaceStore for SqliteStore {
    async fn places(&self, call: &PlaceCall, mode: PlaceMode) -> Result<Places, StoreError> {
        let call = call.clone();
        self.write(move |tx, _| {
            let found: Option<String> = tx
                .prepare_cached("SELECT holders FROM place_leases WHERE tenant = ?1")?
                .query_row([call.tenant.as_str()], |r| r.get(0))
                .optional()?;
            let mut row = match PlaceRow::from_json(found.as_deref().unwrap_or_default()) {
                Ok(row) => row,
                Err(e) => return Ok(Err(e)),
            };
            let before = row.clone();
            let out = row.apply(&call, mode);
            if row.is_empty() {
                tx.prepare_cached("DELETE FROM place_leases WHERE tenant = ?1")?.execute([call.tenant.as_str()])?;
            } else if row != before || found.is_none() {
                tx.prepare_cached(
                    "INSERT INTO place_leases (tenant, holders, expires) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (tenant) DO UPDATE SET holders = excluded.holders, expires = excluded.expires",
                )?
                .execute(params![call.tenant.as_str(), row.to_json(), row.expires()])?;
            }
            Ok(Ok(out))
        })
        .await?
    }
}
