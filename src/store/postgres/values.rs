//! The quota role's open values in the PostgresStore: a row of `dimension_values` read under a
//! row lock and written in one transaction.

use super::*;
use crate::store::{HeldValues, ValueCall, ValueMode, ValueRow};

impl PostgresStore {
    /// [`QuotaStore::values`].
    pub(super) async fn apply_values(&self, call: &ValueCall, mode: ValueMode) -> Result<HeldValues, StoreError> {
        const KEY: &str = "tenant = $1 AND meter = $2 AND dimension = $3 AND period = $4";
        let insert = self.sql(
            "INSERT INTO {s}.dimension_values (tenant, meter, dimension, period, row, expires) \
             VALUES ($1, $2, $3, $4, '', 0) ON CONFLICT DO NOTHING",
        );
        let lock = self.sql(&format!("SELECT row FROM {{s}}.dimension_values WHERE {KEY} FOR UPDATE"));
        let read = self.sql(&format!("SELECT row FROM {{s}}.dimension_values WHERE {KEY}"));
        let write = self.sql(&format!("UPDATE {{s}}.dimension_values SET row = $5, expires = $6 WHERE {KEY}"));
        let (tenant, meter, dimension) = (call.tenant.as_str(), call.meter.as_str(), call.dimension.as_str());
        if mode == ValueMode::Read {
            return self
                .retrying(|| async {
                    let client = self.client().await?;
                    let found = client.query_typed_opt(&read, args![tenant, meter, dimension, call.period]).await?;
                    let text = found.as_ref().map(|r| r.get::<_, &str>(0)).unwrap_or_default();
                    Ok(ValueRow::from_json(text).map_err(Fail::Store)?.apply(call, mode))
                })
                .await;
        }
        // The row is kept when it holds no value (the prune deletes it after `expires`): a call
        // racing the deletion would find no row to lock.
        self.retrying(|| async {
            let mut client = self.client().await?;
            let tx = self.begin_contended(&mut client).await?;
            tx.query_typed(&insert, args![tenant, meter, dimension, call.period]).await?;
            let Some(found) = tx.query_typed_opt(&lock, args![tenant, meter, dimension, call.period]).await? else {
                return Err(Fail::Store(StoreError::Conflict("a values row deleted under the call")));
            };
            let text = found.get::<_, &str>(0);
            let mut row = ValueRow::from_json(text).map_err(Fail::Store)?;
            let before = row.clone();
            let out = row.apply(call, mode);
            if row != before || text.is_empty() {
                tx.query_typed(&write, args![tenant, meter, dimension, call.period, row.to_json(), row.expires()])
                    .await?;
            }
            tx.commit().await?;
            Ok(out)
        })
        .await
    }
}
