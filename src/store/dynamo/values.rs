//! The quota role's open values in the DynamoStore: a tenant's values of one open dimension in
//! a month as one item, read consistently and written back under a condition on its version
//! (read again when another node wrote it); DynamoDB's time to live drops it after its
//! `keep_until`.

use super::race::{Race, Retries, ATTEMPTS};
use super::*;
use crate::store::{HeldValues, ValueCall, ValueMode, ValueRow};

impl DynamoStore {
    /// [`QuotaStore::values`].
    pub(super) async fn apply_values(&self, call: &ValueCall, mode: ValueMode) -> Result<HeldValues, StoreError> {
        let pk = &values_pk(&call.tenant);
        let sk = &values_sk(call.meter.as_str(), &call.dimension, call.period);
        let what = "a tenant's values of an open dimension, written by other nodes all along";
        self.until_won(what, Retries::BACKING_OFF.attempts(2 * ATTEMPTS), (), |(), _| {
            Box::pin(async move {
                let found = self.get(pk.clone(), sk).await?;
                let (mut row, version) = match &found {
                    Some(item) => {
                        (ValueRow::from_json(get_s(item, "row").unwrap_or_default())?, get_i(item, "ver").unwrap_or(0))
                    }
                    None => (ValueRow::default(), 0),
                };
                let before = row.clone();
                let out = row.apply(call, mode);
                if row == before {
                    return Ok(Race::Won(out));
                }
                let put = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .item("pk", s(pk.as_str()))
                    .item("sk", s(sk.as_str()))
                    .item("row", s(row.to_json()))
                    .item("ver", n(version + 1))
                    .item("ttl", n(row.expires()));
                let put = if found.is_some() {
                    put.condition_expression("ver = :ver").expression_attribute_values(":ver", n(version))
                } else {
                    put.condition_expression("attribute_not_exists(pk)")
                };
                match put.send().await {
                    Ok(_) => Ok(Race::Won(out)),
                    Err(e) if is_ccf(&e) => Ok(Race::Lost(())),
                    Err(e) => Err(sdk(e)),
                }
            })
        })
        .await
    }
}
