//! The places role of the DynamoStore: a tenant's places as one item, read consistently and
//! written back under a condition on its version (read again when another node wrote it).

use super::race::{Race, Retries, ATTEMPTS};
use super::*;
use crate::store::{PlaceCall, PlaceMode, PlaceRow, PlaceStore, Places};

#[async_trait]
impl PlaceStore for DynamoStore {
    async fn places(&self, call: &PlaceCall, mode: PlaceMode) -> Result<Places, StoreError> {
        let pk = &places_pk(&call.tenant);
        let what = "a tenant's places, written by other nodes all along";
        self.until_won(what, Retries::BACKING_OFF.attempts(2 * ATTEMPTS), (), |(), _| {
            Box::pin(async move {
                let found = self.get(pk.clone(), ONE_SK).await?;
                let (mut row, version) = match &found {
                    Some(item) => (
                        PlaceRow::from_json(get_s(item, "holders").unwrap_or_default())?,
                        get_i(item, "ver").unwrap_or(0),
                    ),
                    None => (PlaceRow::default(), 0),
                };
                let before = row.clone();
                let out = row.apply(call, mode);
                if row == before && (found.is_some() || row.is_empty()) {
                    return Ok(Race::Won(out));
                }
                let put = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .item("pk", s(pk.as_str()))
                    .item("sk", s(ONE_SK))
                    .item("holders", s(row.to_json()))
                    .item("ver", n(version + 1))
                    // Gone a day after its last node's places expired (TTL deletion is lazy: a
                    // row read after it only holds expired places).
                    .item("ttl", n(row.expires().max(call.now) / 1_000_000_000 + 86_400));
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
