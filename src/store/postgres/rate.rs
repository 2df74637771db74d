//! The rate role of the PostgresStore: tenants' shared buckets, each read under a row lock and
//! written in one transaction.

use super::*;
use crate::store::{CellCall, CellGrant, CellReturn, RateRow, RateStore};

impl PostgresStore {
    /// Runs `apply` on `tenant`'s bucket in one transaction (its row locked), creating it
    /// first when `create`; `None` when it does not exist and is not created.
    async fn with_rate_row<T>(
        &self,
        tenant: &str,
        create: bool,
        apply: impl Fn(&mut RateRow) -> T,
    ) -> Result<Option<T>, StoreError> {
        let insert =
            self.sql("INSERT INTO {s}.rate_cells (tenant, tat, senders) VALUES ($1, 0, '') ON CONFLICT DO NOTHING");
        let read = self.sql("SELECT tat, senders FROM {s}.rate_cells WHERE tenant = $1 FOR UPDATE");
        let write = self.sql("UPDATE {s}.rate_cells SET tat = $2, senders = $3 WHERE tenant = $1");
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin_contended(&mut client).await?;
            if create {
                tx.query_typed(&insert, args![tenant]).await?;
            }
            let Some(found) = tx.query_typed_opt(&read, args![tenant]).await? else { return Ok(None) };
            let mut row = RateRow::from_stored(found.get(0), found.get::<_, &str>(1)).map_err(Fail::Store)?;
            let before = row.clone();
            let out = apply(&mut row);
            if row != before {
                tx.query_typed(&write, args![tenant, row.tat, row.senders_json()]).await?;
            }
            tx.commit().await?;
            Ok(Some(out))
        })
        .await
    }
}

#[async_trait]
impl RateStore for PostgresStore {
    async fn take_cells(&self, call: &CellCall) -> Result<CellGrant, StoreError> {
        let grant = self.with_rate_row(call.tenant.as_str(), true, |row| row.take(call)).await?;
        grant.ok_or_else(|| StoreError::Backend("a rate row created in this transaction is missing".into()))
    }

    async fn return_cells(&self, call: &CellReturn) -> Result<(), StoreError> {
        self.with_rate_row(call.tenant.as_str(), false, |row| row.give_back(call)).await.map(drop)
    }
}
