//! The places role of the RedisStore: a tenant's places as one hash, read and written back
//! under a compare-and-set of its version (read again when another node wrote it), on the
//! server's clock: every node's places expire by one clock, however skewed the nodes' own (as
//! PostgreSQL's do).

use async_trait::async_trait;

use super::{kept_for, RedisStore, Ttl};
use crate::store::{
    race::{until_won, Race, Retries, ATTEMPTS},
    PlaceCall, PlaceMode, PlaceRow, PlaceStore, Places, StoreError,
};

const NANOS: i64 = 1_000_000_000;

#[async_trait]
impl PlaceStore for RedisStore {
    async fn places(&self, call: &PlaceCall, mode: PlaceMode) -> Result<Places, StoreError> {
        let key = &self.keys().places(&call.tenant);
        let what = "a tenant's places, written by other nodes all along";
        until_won(what, Retries::BACKING_OFF.attempts(2 * ATTEMPTS), (), |(), _| {
            Box::pin(async move {
                // The server's time as the row was read: a write from it lands only if no other
                // came between, so no call applied before this one carries a later time.
                let (found, ahead) = self.row_at(key, call.now).await?;
                let call = &call.clone().at(call.now.saturating_add(ahead));
                let mut row = match found.exists() {
                    true => PlaceRow::from_json(found.text("holders").unwrap_or(""))?,
                    false => PlaceRow::default(),
                };
                let before = row.clone();
                let out = row.apply(call, mode);
                if row == before && (found.exists() || row.is_empty()) {
                    return Ok(Race::Won(out));
                }
                // Gone a day after its last node's places expired.
                let ttl = kept_for(call.now / NANOS, row.expires().max(call.now) / NANOS + 86_400);
                let holders = row.to_json();
                match self.put(key, &found.version(), Ttl::For(ttl), &[("holders", holders.as_bytes())]).await? {
                    true => Ok(Race::Won(out)),
                    false => Ok(Race::Lost(())),
                }
            })
        })
        .await
    }
}
