//! The rate role of the DynamoStore: a tenant's shared bucket as one item, read consistently
//! and written back under a condition on its version (a compare-and-set, tried again when
//! another node wrote it in between).

use super::race::{Race, Retries, ATTEMPTS};
use super::*;
use crate::store::{CellCall, CellGrant, CellReturn, RateRow, RateStore};

impl DynamoStore {
    /// Runs `apply` on `tenant`'s bucket and writes it back if no other call wrote it
    /// meanwhile (else reads it again); with `create`, a missing bucket starts empty, else
    /// `None`.
    async fn with_rate_item<T: Send>(
        &self,
        tenant: &TenantId,
        create: bool,
        apply: impl Fn(&mut RateRow) -> T + Sync,
    ) -> Result<Option<T>, StoreError> {
        let pk = &rate_pk(tenant);
        let apply = &apply;
        // Twice a counter's tries: every node of a busy tenant writes this one item.
        let what = "a tenant's shared rate, written by other nodes all along";
        self.until_won(what, Retries::BACKING_OFF.attempts(2 * ATTEMPTS), (), |(), _| {
            Box::pin(async move {
                let found = self.get(pk.clone(), ONE_SK).await?;
                let (mut row, version) = match &found {
                    Some(item) => (
                        RateRow::from_stored(
                            get_i(item, "tat").unwrap_or(0),
                            get_s(item, "senders").unwrap_or_default(),
                        )?,
                        get_i(item, "ver").unwrap_or(0),
                    ),
                    None if create => (RateRow::default(), 0),
                    None => return Ok(Race::Won(None)),
                };
                let before = row.clone();
                let out = apply(&mut row);
                if row == before && found.is_some() {
                    // Answered again, or refused: nothing to write.
                    return Ok(Race::Won(Some(out)));
                }
                let put = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .item("pk", s(pk.as_str()))
                    .item("sk", s(ONE_SK))
                    .item("tat", n(row.tat))
                    .item("senders", s(row.senders_json()))
                    .item("ver", n(version + 1))
                    // Gone a day after its bucket is full again (TTL deletion is lazy: a row read
                    // after it only finds a full bucket).
                    .item("ttl", n(row.tat / 1_000_000_000 + 86_400));
                let put = if found.is_some() {
                    put.condition_expression("ver = :ver").expression_attribute_values(":ver", n(version))
                } else {
                    put.condition_expression("attribute_not_exists(pk)")
                };
                match put.send().await {
                    Ok(_) => Ok(Race::Won(Some(out))),
                    Err(e) if is_ccf(&e) => Ok(Race::Lost(())),
                    Err(e) => Err(sdk(e)),
                }
            })
        })
        .await
    }
}

#[async_trait]
impl RateStore for DynamoStore {
    async fn take_cells(&self, call: &CellCall) -> Result<CellGrant, StoreError> {
        let grant = self.with_rate_item(&call.tenant, true, |row| row.take(call)).await?;
        grant.ok_or(StoreError::Conflict("a tenant's shared rate vanished while it was written"))
    }

    async fn return_cells(&self, call: &CellReturn) -> Result<(), StoreError> {
        self.with_rate_item(&call.tenant, false, |row| row.give_back(call)).await.map(drop)
    }
}
