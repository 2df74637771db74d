//! The quota role's open values in the RedisStore: a tenant's values of one open dimension in a
//! month as one hash, read and written back under a compare-and-set of its version (read again
//! when another node wrote it).
//!
//! A row carries a time to live from each write that outlasts its `keep_until` (the call's
//! `keep_until` less its month's start: a write never comes before its month), so that the
//! rows of tenants gone quiet go. Under a `volatile-*` eviction policy a full server may evict
//! one: the tenant may then use up to `max_values` values more that month (docs/redis.md).

use std::time::Duration;

use super::{RedisStore, Ttl};
use crate::store::{
    race::{until_won, Race, Retries, ATTEMPTS},
    HeldValues, StoreError, ValueCall, ValueMode, ValueRow,
};

impl RedisStore {
    /// [`QuotaStore::values`](crate::store::QuotaStore::values).
    pub(super) async fn apply_values(&self, call: &ValueCall, mode: ValueMode) -> Result<HeldValues, StoreError> {
        let key = &self.keys().values(&call.tenant, call.meter.as_str(), &call.dimension, call.period);
        let what = "a tenant's values of an open dimension, written by other nodes all along";
        // From any write at or after the month's start, kept past `keep_until`.
        let kept = Duration::from_secs(u64::try_from(call.keep_until.saturating_sub(call.period)).unwrap_or(0).max(1));
        until_won(what, Retries::BACKING_OFF.attempts(2 * ATTEMPTS), (), |(), _| {
            Box::pin(async move {
                let found = self.row(key).await?;
                let mut row = match found.exists() {
                    true => ValueRow::from_json(found.text("row").unwrap_or(""))?,
                    false => ValueRow::default(),
                };
                let before = row.clone();
                let out = row.apply(call, mode);
                if row == before {
                    return Ok(Race::Won(out));
                }
                let text = row.to_json();
                match self.put(key, &found.version(), Ttl::For(kept), &[("row", text.as_bytes())]).await? {
                    true => Ok(Race::Won(out)),
                    false => Ok(Race::Lost(())),
                }
            })
        })
        .await
    }
}
