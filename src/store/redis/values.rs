//! The quota role's open values in the RedisStore: a tenant's values of one open dimension in a
//! month as one hash, read and written back under a compare-and-set of its version (read again
//! when another node wrote it).
//!
//! A row carries no time to live while its month runs (a `volatile-*` policy never evicts it:
//! an evicted row would give the tenant its month's values again). The first write of the
//! next month's row gives the row before it 35 days.

use std::time::Duration;

use redis::AsyncCommands;

use super::{backend, RedisStore, Ttl};
use crate::base::Period;
use crate::store::{
    race::{until_won, Race, Retries, ATTEMPTS},
    HeldValues, StoreError, ValueCall, ValueMode, ValueRow,
};

/// How long a month's row is kept once the next month's is written.
const ENDED_KEPT: Duration = Duration::from_secs(35 * 86_400);

impl RedisStore {
    /// [`QuotaStore::values`](crate::store::QuotaStore::values).
    pub(super) async fn apply_values(&self, call: &ValueCall, mode: ValueMode) -> Result<HeldValues, StoreError> {
        let keys = self.keys();
        let key = &keys.values(&call.tenant, call.meter.as_str(), &call.dimension, call.period);
        let what = "a tenant's values of an open dimension, written by other nodes all along";
        let (out, created) = until_won(what, Retries::BACKING_OFF.attempts(2 * ATTEMPTS), (), |(), _| {
            Box::pin(async move {
                let found = self.row(key).await?;
                let mut row = match found.exists() {
                    true => ValueRow::from_json(found.text("row").unwrap_or(""))?,
                    false => ValueRow::default(),
                };
                let before = row.clone();
                let out = row.apply(call, mode);
                if row == before {
                    return Ok(Race::Won((out, false)));
                }
                let text = row.to_json();
                match self.put(key, &found.version(), Ttl::Never, &[("row", text.as_bytes())]).await? {
                    true => Ok(Race::Won((out, !found.exists()))),
                    false => Ok(Race::Lost(())),
                }
            })
        })
        .await?;
        if created {
            // The month before's row, if the tenant has one, is kept 35 days from now.
            let (before, _) = Period::Month { anchor_day: 1 }.bounds(call.period.saturating_sub(1));
            let old = keys.values(&call.tenant, call.meter.as_str(), &call.dimension, before);
            let mut conn = self.conn.clone();
            let _: i64 = conn.expire(&old, ENDED_KEPT.as_secs() as i64).await.map_err(|e| backend(&e))?;
        }
        Ok(out)
    }
}
